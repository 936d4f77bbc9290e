"""Loading a model for one rank: whole, or this rank's shard of it (tensor or pipeline parallel).

Sharded loading follows mlx-lm's ``sharded_load``: build the model lazily, shard it (``model.shard``
for tensor parallel, ``model.model.pipeline(group, split)`` for pipeline parallel), and only then
materialise the weights, so a rank reads and keeps only its own part. Unlike ``sharded_load`` it
never downloads: the agent has put the whole model on every node already.

Every rank ends up with the same logits, so the same sampler and seed pick the same token: tensor
parallel all-reduces them, and mlx-lm's pipelined models all-gather the last hidden state so every
rank runs the final norm and head. ``lockstep`` checks the outcome after each request.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

Parallelism = Literal["tensor", "pipeline"]
PARALLELISMS: tuple[Parallelism, ...] = ("tensor", "pipeline")


class ShardingUnsupported(Exception):
    """The model's architecture cannot be split the way it was asked to be."""


@dataclass(frozen=True)
class Sharding:
    """How a multi-rank group splits the model; ``layer_split`` is layers per rank (pipeline)."""

    parallelism: Parallelism = "tensor"
    layer_split: tuple[int, ...] | None = None


def keep_compiled_kernels(home: Path) -> Path:
    """Where MLX keeps the kernels it compiles while it runs: ``home``/mlx-kernels/<MLX version>,
    unless ``MLX_PTX_CACHE_DIR`` names a place already. On CUDA, MLX compiles some kernels the
    first time a process needs them (its tiled quantized product: 24 to 27 s for each tile height
    on an H100) and by default keeps them under the system's temporary directory, which a restart
    may empty; a dispatcher's next start would compile them again while it loads or, worse, while
    it serves. Set before the first compile (MLX reads it once)."""
    import mlx.core as mx

    default = home / "mlx-kernels" / mx.__version__
    return Path(os.environ.setdefault("MLX_PTX_CACHE_DIR", str(default)))


def load_whole(model_dir: Path) -> tuple[Any, Any, dict[str, Any]]:
    """The model, its tokenizer and its config, on one rank."""
    from mlx_lm.utils import load

    _require_model_dir(model_dir)
    return load(str(model_dir), return_config=True)


def load_shard(model_dir: Path, group: Any, sharding: Sharding) -> tuple[Any, Any, dict[str, Any]]:
    """This rank's shard of the model, the tokenizer and the config; every rank of ``group`` calls it."""
    import mlx.core as mx
    from mlx_lm.utils import load_model, load_tokenizer

    _require_model_dir(model_dir)
    model, config = load_model(model_dir, lazy=True, strict=False)
    if sharding.parallelism == "tensor":
        _shard_tensor(model, group)
    else:
        _shard_pipeline(model, group, sharding.layer_split)
    mx.eval(model.parameters())
    tokenizer = load_tokenizer(model_dir, eos_token_ids=config.get("eos_token_id"))
    # Wait for every rank to hold its shard, so the first request does not time out on a slow one.
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))
    return model, tokenizer, config


def _shard_tensor(model: Any, group: Any) -> None:
    if not hasattr(model, "shard"):
        raise ShardingUnsupported(f"{type(model).__module__} has no tensor parallel support in mlx-lm")
    model.shard(group)


def _shard_pipeline(model: Any, group: Any, layer_split: tuple[int, ...] | None) -> None:
    inner = getattr(model, "model", None)
    if not hasattr(inner, "pipeline"):
        raise ShardingUnsupported(f"{type(model).__module__} has no pipeline parallel support in mlx-lm")
    # mlx-lm gives rank 0 the last layers: split[r] is the number of layers rank r runs.
    inner.pipeline(group, split=list(layer_split) if layer_split else None)
    log.info("rank %d runs layers %d to %d", group.rank(), inner.start_idx, inner.end_idx - 1)


def _require_model_dir(model_dir: Path) -> None:
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json)")
