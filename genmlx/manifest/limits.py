"""How large a manifest may be: explicit bounds, so that a hostile file (an alias bomb, nesting
deeper than Python's stack, a file of gigabytes) is refused with an issue instead of exhausting
memory, time or the stack. Each is far beyond what a cluster of desks needs."""

MAX_MANIFEST_BYTES = 1 << 20  # 1 MiB of YAML
MAX_DEPTH = 32  # levels of nested mappings and lists
MAX_VALUES = 100_000  # values in the document once its aliases are expanded
