"""The dispatcher's command line, turned once into a frozen ``DispatcherSettings``."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DispatcherSettings:
    """How one dispatcher rank was asked to run."""

    model_dir: Path
    model_id: str
    port: int
    host: str = "127.0.0.1"
    rank: int = 0
    world_size: int = 1
    max_batch: int = 8
    max_queue: int = 64
    context_length: int | None = None
    parent_pid: int | None = None
    hostfile: Path | None = None


def parse_settings(argv: list[str]) -> DispatcherSettings:
    """Parse ``python -m genmlx.dispatcher`` arguments; exits with a usage message on bad input."""
    parser = _argument_parser()
    args = parser.parse_args(argv)
    problem = _rank_problem(args.rank, args.world_size)
    if problem:
        parser.error(problem)
    for name in ("port", "max_batch", "max_queue", "context_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return DispatcherSettings(
        model_dir=Path(args.model).expanduser(),
        model_id=args.name,
        port=args.port,
        host=args.host,
        rank=args.rank,
        world_size=args.world_size,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        context_length=args.context_length,
        parent_pid=args.parent_pid,
        hostfile=Path(args.hostfile) if args.hostfile else None,
    )


def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m genmlx.dispatcher",
        description="Serve one model rank with mlx-lm behind an OpenAI-compatible API.",
    )
    parser.add_argument(
        "--model", required=True, help="model directory (config.json, safetensors, tokenizer)"
    )
    parser.add_argument("--name", required=True, help="the model id clients send as `model`")
    parser.add_argument("--port", type=int, required=True, help="HTTP port of the OpenAI API")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--rank", type=int, default=0, help="this process's rank in the group")
    parser.add_argument("--world-size", type=int, default=1, help="number of ranks in the group")
    parser.add_argument("--max-batch", type=int, default=8, help="most requests generated together")
    parser.add_argument("--max-queue", type=int, default=64, help="most requests waiting; more get 429")
    parser.add_argument("--context-length", type=int, default=None, help="prompt + completion token limit")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    # Accepted so an agent can already pass it; multi-rank serving (which reads it) comes later.
    parser.add_argument("--hostfile", default=None, help="MLX ring hostfile of a multi-rank group")
    return parser


def _rank_problem(rank: int, world_size: int) -> str | None:
    if world_size < 1:
        return f"--world-size must be at least 1, got {world_size}"
    if world_size > 1:
        return (
            f"--world-size {world_size}: multi-rank serving is not implemented yet; "
            "this dispatcher serves a model on one rank only (--world-size 1)"
        )
    if not 0 <= rank < world_size:
        return f"--rank must be in [0, {world_size - 1}] for --world-size {world_size}, got {rank}"
    return None
