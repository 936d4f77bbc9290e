"""The dispatcher's command line: ``genmlx.wire.rank_launch.RankCommand``, the same field list the
agent writes it from, read once into that frozen dataclass."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path

from genmlx.dispatcher.engine.decoding import DecoderSettings
from genmlx.dispatcher.engine.disk_tier import DiskTier, DiskTierSettings, namespace
from genmlx.wire.agent_state import MODEL_RECORD_NAME
from genmlx.wire.argv import from_argv
from genmlx.wire.rank_launch import RankCommand
from genmlx.wire.serving import UNPLACED_MAX_BATCH, queue_for_batch

log = logging.getLogger(__name__)

BLOCK_TOKENS = 256  # tokens per block of the disk tier: mlx-lm's KV cache grows by as many
GPU_PREFILL_CHUNK_ALONE = 2048  # mlx_lm.server's prefill_step_size


def parse_settings(argv: list[str]) -> RankCommand:
    """Parse ``python -m genmlx.dispatcher`` arguments; exits with a usage message on bad input."""
    parser = argparse.ArgumentParser(
        prog="python -m genmlx.dispatcher",
        description="Serve one model rank with mlx-lm behind an OpenAI-compatible API.",
    )
    return with_batch_limits(from_argv(RankCommand, argv, parser))


def with_batch_limits(settings: RankCommand) -> RankCommand:
    """``settings`` with the batch and queue bounds of a rank started by hand where none were
    given (the master launches its ranks with both)."""
    max_batch = settings.serving.max_batch or UNPLACED_MAX_BATCH
    max_queue = settings.serving.max_queue or queue_for_batch(max_batch)
    return replace(settings, serving=replace(settings.serving, max_batch=max_batch, max_queue=max_queue))


def decoder_settings(settings: RankCommand, disk_tier: DiskTier | None = None) -> DecoderSettings:
    """What the decoder needs of the command line; knobs left out keep ``DecoderSettings``' defaults."""
    given = {
        "max_batch": settings.serving.max_batch,
        "prefill_chunk": settings.prefill_chunk,
        "prefill_chunk_alone": settings.prefill_chunk_alone or prefill_chunk_alone_here(settings),
        "cache_entries": settings.prefix_cache_entries,
        "cache_bytes": None if settings.prefix_cache_gb is None else int(settings.prefix_cache_gb * 2**30),
        "disk_tier": disk_tier,
        "kv_bits": settings.serving.kv_bits,
        "kv_group_size": settings.serving.kv_group_size,
        "spare_bytes": None if settings.spare_gb is None else int(settings.spare_gb * 2**30),
    }
    chosen = {name: value for name, value in given.items() if value is not None}
    return DecoderSettings(**chosen, dequantize_rows=dequantize_rows_here(settings))


def dequantize_rows_here(settings: RankCommand) -> int | None:
    """From how many rows the model's quantized layers multiply through their dequantized weight
    (``engine.quantized_batches``): ``--dequantize-rows`` where given; on a CUDA GPU, whose
    quantized kernel slows with every row, None: the engine measures where it pays when it loads
    the model; elsewhere 0, never (Apple silicon's quantized kernels batch well)."""
    if settings.dequantize_rows is not None:
        return settings.dequantize_rows
    import mlx.core as mx

    cuda = getattr(mx, "cuda", None)
    on_cuda = cuda is not None and cuda.is_available() and mx.default_device().type == mx.gpu
    return None if on_cuda else 0


def prefill_chunk_alone_here(settings: RankCommand) -> int:
    """The prompt tokens a step reads of a prompt read alone, for the device MLX runs on:
    ``GPU_PREFILL_CHUNK_ALONE`` on a GPU, where a long step fills the device (a 4,000-token prompt
    is read 1.2x faster in 2,048-token steps than in 512-token ones on an H100), the short chunk on
    MLX's CPU backend, where longer steps are slower (1.5x for 2,048 over 512 here). The short
    chunk in a group: its ranks must read the same steps, and may run on different devices."""
    import mlx.core as mx

    short = settings.prefill_chunk or DecoderSettings.prefill_chunk
    if settings.world_size == 1 and mx.default_device().type == mx.gpu:
        return max(GPU_PREFILL_CHUNK_ALONE, short)
    return short


def disk_tier_settings(settings: RankCommand) -> DiskTierSettings | None:
    """Where this rank keeps its prompt cache's disk tier, and how much it may fill; None where
    the model has none (no ``--disk-cache-dir`` or no size). The directory is a namespace of
    everything the KV state depends on: the model's files, this rank's place in its group (each
    rank of a group keeps its own shard of every block), the KV cache's quantization."""
    size = settings.serving.disk_cache_gb
    if not settings.disk_cache_dir or not size:
        return None
    identity = {
        "model": model_identity(Path(settings.model_dir).expanduser()),
        "rank": settings.rank,
        "worldSize": settings.world_size,
        "parallelism": settings.parallelism if settings.world_size > 1 else None,
        "layerSplit": list(settings.layer_split or ()),
        "blockTokens": BLOCK_TOKENS,
    }
    if settings.serving.kv_bits:  # only then: plain KV caches keep the namespaces they had
        identity.update(kvBits=settings.serving.kv_bits, kvGroupSize=settings.serving.kv_group_size)
    root = Path(settings.disk_cache_dir).expanduser() / namespace(identity)
    return DiskTierSettings(root, int(size * 2**30), BLOCK_TOKENS)


def model_identity(model_dir: Path) -> dict:
    """What names the model's weights exactly: the agent's record of a verified copy (every file's
    size and SHA-256, the commit it came from); where there is none (a directory given by hand),
    each file's name, size and modification time."""
    try:
        record = json.loads((model_dir / MODEL_RECORD_NAME).read_text())
        return {"files": record["files"], "commit": record.get("commit"), "revision": record.get("revision")}
    except (OSError, ValueError, KeyError, TypeError):
        files = sorted(p for p in model_dir.iterdir() if p.is_file())
        return {"stat": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}
