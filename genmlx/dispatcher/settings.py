"""The dispatcher's command line, turned once into a frozen ``DispatcherSettings``."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from genmlx.dispatcher.engine.decoding import DecoderSettings
from genmlx.dispatcher.engine.model_loading import PARALLELISMS, Parallelism


@dataclass(frozen=True)
class DispatcherSettings:
    """How one dispatcher rank was asked to run."""

    model_dir: Path
    model_id: str
    port: int
    host: str = "127.0.0.1"
    rank: int = 0
    world_size: int = 1
    decoding: DecoderSettings = DecoderSettings()
    max_queue: int = 64
    context_length: int | None = None
    parent_pid: int | None = None
    hostfile: Path | None = None
    parallelism: Parallelism = "tensor"
    layer_split: tuple[int, ...] | None = None  # layers per rank, pipeline parallel only


def parse_settings(argv: list[str]) -> DispatcherSettings:
    """Parse ``python -m genmlx.dispatcher`` arguments; exits with a usage message on bad input."""
    parser = _argument_parser()
    args = parser.parse_args(argv)
    layer_split = _parse_layer_split(args.layer_split)
    problem = _rank_problem(args.rank, args.world_size, args.hostfile) or _split_problem(
        layer_split, args.parallelism, args.world_size
    )
    if problem:
        parser.error(problem)
    for name in ("port", "max_batch", "max_queue", "context_length", "prefill_chunk"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("prefix_cache_entries", "prefix_cache_gb"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    decoding = DecoderSettings(
        max_batch=args.max_batch,
        prefill_chunk=args.prefill_chunk,
        cache_entries=args.prefix_cache_entries,
        cache_bytes=int(args.prefix_cache_gb * 2**30),
    )
    return DispatcherSettings(
        model_dir=Path(args.model).expanduser(),
        model_id=args.name,
        port=args.port,
        host=args.host,
        rank=args.rank,
        world_size=args.world_size,
        decoding=decoding,
        max_queue=args.max_queue,
        context_length=args.context_length,
        parent_pid=args.parent_pid,
        hostfile=Path(args.hostfile) if args.hostfile else None,
        parallelism=args.parallelism,
        layer_split=layer_split,
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
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        default=512,
        help="prompt tokens read per step; a long prompt delays the others by one chunk (default 512)",
    )
    parser.add_argument(
        "--prefix-cache-entries",
        type=int,
        default=16,
        help="finished sequences whose KV state later prompts may reuse; 0 turns it off (default 16)",
    )
    parser.add_argument(
        "--prefix-cache-gb", type=float, default=4.0, help="memory the prefix cache may hold (default 4)"
    )
    parser.add_argument("--context-length", type=int, default=None, help="prompt + completion token limit")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    parser.add_argument("--hostfile", default=None, help="MLX ring hostfile of a multi-rank group")
    parser.add_argument(
        "--parallelism", choices=PARALLELISMS, default="tensor", help="how a group of ranks splits the model"
    )
    parser.add_argument(
        "--layer-split", default=None, help="pipeline only: layers per rank, e.g. 20,12 (default: even)"
    )
    return parser


def _rank_problem(rank: int, world_size: int, hostfile: str | None) -> str | None:
    if world_size < 1:
        return f"--world-size must be at least 1, got {world_size}"
    if not 0 <= rank < world_size:
        return f"--rank must be in [0, {world_size - 1}] for --world-size {world_size}, got {rank}"
    if world_size > 1 and not hostfile:
        return f"--world-size {world_size} needs --hostfile (MLX's ring hostfile of the group)"
    return None


def _parse_layer_split(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        return (0,)  # reported by _split_problem as not positive


def _split_problem(split: tuple[int, ...] | None, parallelism: str, world_size: int) -> str | None:
    if split is None:
        return None
    if parallelism != "pipeline":
        return "--layer-split applies to --parallelism pipeline only"
    if len(split) != world_size or any(n < 1 for n in split):
        return f"--layer-split needs {world_size} positive layer counts separated by commas"
    return None
