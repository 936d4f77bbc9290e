"""``python -m genmlx.agent``: the same as ``genmlx agent`` (same flags, same token handling)."""

from __future__ import annotations

import sys

from genmlx.cli import main

if __name__ == "__main__":
    sys.exit(main(["agent", *sys.argv[1:]]))
