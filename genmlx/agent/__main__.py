"""``python -m genmlx.agent``: the same flags as ``genmlx agent``, the token from GENMLX_HOME."""

from __future__ import annotations

import argparse
import logging
import sys

from genmlx.errors import AuthError, PermanentError
from genmlx.home import read_token

from .config import DEFAULT_AGENT_PORT, AgentConfig
from .run import run_agent


def parse_config(argv: list[str]) -> AgentConfig:
    parser = argparse.ArgumentParser(prog="python -m genmlx.agent", description="Run a GenMLX node agent.")
    parser.add_argument("--name", required=True, help="the node name the manifest uses for this machine")
    parser.add_argument("--storage", action="append", required=True, help="a model storage path (repeatable)")
    parser.add_argument("--port", type=int, default=DEFAULT_AGENT_PORT)
    parser.add_argument("--host", default="0.0.0.0", help="address the agent and its dispatchers bind")
    parser.add_argument("--no-discovery", action="store_true", help="do not announce the agent with zeroconf")
    args = parser.parse_args(argv)
    return AgentConfig(
        name=args.name,
        storage=tuple(args.storage),
        port=args.port,
        host=args.host,
        token=read_token(),
        discovery=not args.no_discovery,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = parse_config(sys.argv[1:] if argv is None else argv)
    except AuthError as e:
        print(f"genmlx agent: {e}", file=sys.stderr)
        return 2
    try:
        run_agent(config)
    except PermanentError as e:  # the node name is already announced by another agent
        print(f"genmlx agent: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
