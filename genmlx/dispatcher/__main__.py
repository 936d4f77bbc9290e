"""``python -m genmlx.dispatcher --model DIR --name ID --port P ...``: serve one model rank."""

from __future__ import annotations

import sys

from genmlx.dispatcher.server import run
from genmlx.dispatcher.settings import parse_settings


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and serve; returns the exit status."""
    return run(parse_settings(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
