"""A stored model's shape for placement: layers, heads, head size and KV dtype from ``config.json``,
and the weights' size from the safetensors index (or the ``*.safetensors`` files themselves).

Configs differ between architectures: multimodal ones nest the language model's fields in
``text_config``, older ones use GPT-2 style names (``n_layer``, ``n_head``). The first name found
wins. A directory whose shape cannot be read gets none (the master then cannot capacity-check it),
never an error in the agent's report. Reads only small JSON files and file sizes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from genmlx.wire.agent_state import ModelShape

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

LAYER_KEYS = ("num_hidden_layers", "num_layers", "n_layers", "n_layer")
HEAD_KEYS = ("num_attention_heads", "n_heads", "n_head")
KV_HEAD_KEYS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim")
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
DTYPE_KEYS = ("torch_dtype", "dtype")
QUANTIZATION_KEYS = ("quantization", "quantization_config")

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
DEFAULT_KV_DTYPE_BYTES = 2  # mlx-lm's models compute in float16 or bfloat16 unless told otherwise


class UnreadableShape(Exception):
    """config.json or the weights do not say what placement needs; the message says what is missing."""


def model_shape_or_none(model_dir: Path) -> ModelShape | None:
    """The shape of the model in ``model_dir``, or None (logged) where it cannot be read."""
    try:
        return read_model_shape(model_dir)
    except UnreadableShape as e:
        log.warning("%s: no shape for placement: %s", model_dir, e)
        return None


def read_model_shape(model_dir: Path) -> ModelShape:
    """The shape of the model in ``model_dir``; raises ``UnreadableShape`` saying what is missing."""
    fields = language_model_fields(read_json_object(model_dir / CONFIG_NAME))
    heads = required_count(fields, HEAD_KEYS)
    return ModelShape(
        weight_bytes=weight_bytes(model_dir),
        num_layers=required_count(fields, LAYER_KEYS),
        num_attention_heads=heads,
        num_key_value_heads=optional_count(fields, KV_HEAD_KEYS) or heads,  # absent: multi-head attention
        head_dim=head_dim(fields, heads),
        kv_dtype_bytes=kv_dtype_bytes(fields),
        max_position_embeddings=optional_count(fields, CONTEXT_KEYS),
    )


def read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UnreadableShape(f"cannot read {path.name}: {e}") from e
    if not isinstance(data, dict):
        raise UnreadableShape(f"{path.name} is not a JSON object")
    return data


def language_model_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The config's fields with a multimodal model's ``text_config`` laid over the top level, so the
    language model's layers and heads win over the vision tower's while top-level ``torch_dtype``
    still counts."""
    nested = config.get("text_config")
    return {**config, **nested} if isinstance(nested, dict) else config


def optional_count(fields: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    """The first positive integer among ``keys``; None where none of them holds one."""
    for key in keys:
        value = fields.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def required_count(fields: dict[str, Any], keys: tuple[str, ...]) -> int:
    value = optional_count(fields, keys)
    if value is None:
        raise UnreadableShape(f"config.json has no positive integer {' or '.join(keys)}")
    return value


def head_dim(fields: dict[str, Any], heads: int) -> int:
    """``head_dim`` where the config gives it (Qwen3 and Gemma differ from hidden_size / heads)."""
    explicit = optional_count(fields, ("head_dim",))
    if explicit is not None:
        return explicit
    hidden = required_count(fields, HIDDEN_KEYS)
    if hidden < heads:
        raise UnreadableShape(f"config.json: hidden size {hidden} is smaller than its {heads} heads")
    return hidden // heads


def kv_dtype_bytes(fields: dict[str, Any]) -> int:
    """Bytes per cached key or value: quantized models keep a float16 cache, others their dtype."""
    if any(fields.get(key) for key in QUANTIZATION_KEYS):
        return DEFAULT_KV_DTYPE_BYTES
    dtype = next((fields[key] for key in DTYPE_KEYS if isinstance(fields.get(key), str)), None)
    return DTYPE_BYTES.get(dtype, DEFAULT_KV_DTYPE_BYTES)


def weight_bytes(model_dir: Path) -> int:
    """The index's ``metadata.total_size``, else the size of the ``*.safetensors`` files (mlx-lm
    loads only those, from the directory's top level)."""
    total = indexed_weight_bytes(model_dir / WEIGHTS_INDEX_NAME)
    if total is not None:
        return total
    try:
        total = sum(path.stat().st_size for path in model_dir.glob("*.safetensors") if path.is_file())
    except OSError as e:  # a file removed while we count: the next report sees the directory as it is
        raise UnreadableShape(f"cannot size the weights: {e}") from e
    if total == 0:
        raise UnreadableShape("no *.safetensors weights")
    return total


def indexed_weight_bytes(index_path: Path) -> int | None:
    if not index_path.is_file():
        return None
    try:
        metadata = read_json_object(index_path).get("metadata")
    except UnreadableShape as e:
        log.warning("%s: counting the weight files instead: %s", index_path.parent, e)
        return None
    return optional_count(metadata, ("total_size",)) if isinstance(metadata, dict) else None
