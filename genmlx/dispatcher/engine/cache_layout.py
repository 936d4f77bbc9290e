"""What a model's KV caches look like to the prefix cache, and their arrays as the disk tier keeps
them.

Caches whose every layer is a plain ``KVCache`` (or, with ``serving.kvBits``, a ``QuantizedKVCache``)
can be cut at any token and joined again: the disk tier keeps them in ``blocks`` of positions,
shared by every prompt that starts the same way. Any other layer (a sliding window's
``RotatingKVCache``, the recurrent state of a hybrid model's linear layers) holds state that no
slice of positions reproduces, so those models keep whole-state ``snapshots`` instead, each the
complete state after exactly the tokens it is keyed by.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.cache import KVCache, QuantizedKVCache, make_prompt_cache

from genmlx.dispatcher.engine.solo import KvQuantization

Kind = Literal["blocks", "snapshots"]
Arrays = dict[str, mx.array]
Segment = tuple[int, Arrays]  # the tokens a block covers, and its arrays
SCALARS = (int, float, str, bool, type(None))


@dataclass(frozen=True)
class CacheLayout:
    """A model's caches: how the disk tier stores them, how many layers, the quantization of
    blocks (None: plain ``KVCache``), and each layer's cache class (what a snapshot must match)."""

    kind: Kind
    layers: int
    quantized: KvQuantization | None
    classes: tuple[str, ...]

    @property
    def block_format(self) -> str:
        """What a block of this layout holds, as its metadata names it: a block of another
        format (another quantization) is never read as this one."""
        if self.quantized is None:
            return "kv"
        return f"kv-q{self.quantized.bits}g{self.quantized.group_size}"

    def describe(self) -> str:
        if self.kind == "blocks":
            return "blocks of quantized KV" if self.quantized else "blocks of KV"
        return "whole-state snapshots (" + ", ".join(sorted(set(self.classes))) + ")"


def cache_layout(model: Any, quantize: KvQuantization | None = None) -> CacheLayout:
    template = make_prompt_cache(model)
    if quantize:
        quantize(template)
    classes = tuple(type(layer).__name__ for layer in template)
    if set(classes) == {KVCache.__name__}:
        return CacheLayout("blocks", len(template), None, classes)
    if set(classes) == {QuantizedKVCache.__name__}:
        return CacheLayout("blocks", len(template), quantize, classes)
    return CacheLayout("snapshots", len(template), None, classes)


def covered_tokens(cache: Sequence[Any]) -> int | None:
    """How many tokens ``cache`` holds the state of (its layers' least offset); None where no
    layer counts them."""
    offsets = [layer.offset for layer in cache if isinstance(getattr(layer, "offset", None), int)]
    return min(offsets) if offsets else None


# ----- blocks -----


def sliced(cache: Sequence[Any], start: int, end: int) -> Arrays:
    """Every layer's keys and values of positions ``start`` to ``end`` (each part of a quantized
    layer's, ``layers.<i>.keys.<part>``)."""
    arrays = {}
    for i, layer in enumerate(cache):
        for name, value in (("keys", layer.keys), ("values", layer.values)):
            if isinstance(value, mx.array):
                arrays[f"layers.{i}.{name}"] = value[..., start:end, :]
            else:
                for part, array in enumerate(value):
                    arrays[f"layers.{i}.{name}.{part}"] = array[..., start:end, :]
    return arrays


def cache_from_blocks(segments: Sequence[Segment], layout: CacheLayout) -> list[Any]:
    """The layout's caches holding the segments' positions, in order."""

    def joined(name: str) -> mx.array:
        return mx.concatenate([block[name] for _, block in segments], axis=2)

    caches: list[Any] = []
    for i in range(layout.layers):
        if layout.quantized is None:
            keys, values = joined(f"layers.{i}.keys"), joined(f"layers.{i}.values")
            cache = KVCache()
            cache.state = (keys, values, keys.shape[2])
        else:
            keys = [joined(f"layers.{i}.keys.{part}") for part in range(3)]
            values = [joined(f"layers.{i}.values.{part}") for part in range(3)]
            cache = QuantizedKVCache(layout.quantized.group_size, layout.quantized.bits)
            cache.state = (keys, values, keys[0].shape[2], layout.quantized.group_size, layout.quantized.bits)
        caches.append(cache)
    mx.eval([cache.state for cache in caches])
    return caches


# ----- whole-state snapshots -----


def state_arrays(cache: Sequence[Any]) -> tuple[Arrays, dict[str, str]]:
    """Every layer's whole state: its arrays, and (as metadata) each layer's class and the state's
    other values (offsets, window sizes; ``None`` where a part is unset). ``ValueError`` for a
    state of anything else."""
    arrays: Arrays = {}
    scalars: dict[str, Any] = {}
    for i, layer in enumerate(cache):
        for part, value in tree_flatten(_trimmed_state(layer)):
            path = f"layers.{i}.{part}"
            if isinstance(value, mx.array):
                arrays[path] = value
            elif isinstance(value, SCALARS):
                scalars[path] = value
            else:
                raise ValueError(f"a {type(layer).__name__} keeps a {type(value).__name__} in its state")
    classes = [type(layer).__name__ for layer in cache]
    return arrays, {"classes": json.dumps(classes), "scalars": json.dumps(scalars)}


def cache_from_state(arrays: Arrays, meta: dict[str, str], layout: CacheLayout) -> list[Any]:
    """The caches a snapshot holds; ``ValueError`` unless its layers are the layout's."""
    classes = tuple(json.loads(meta["classes"]))
    if classes != layout.classes:
        raise ValueError(f"a snapshot of {', '.join(classes)}, this model keeps {', '.join(layout.classes)}")
    leaves = {**arrays, **json.loads(meta["scalars"])}
    layers: dict[str, Any] = tree_unflatten(list(leaves.items()))["layers"]
    caches = []
    for i, name in enumerate(classes):
        cache = getattr(mlx_cache, name).__new__(getattr(mlx_cache, name))
        cache.state = layers[i] if isinstance(layers, list) else layers[str(i)]
        caches.append(cache)
    mx.eval([array for array in arrays.values()])
    return caches


def _trimmed_state(layer: Any) -> Any:
    """A layer's state, a plain or quantized KV cache's cut to the positions it holds (its buffer
    runs ahead in steps of 256)."""
    if type(layer) is KVCache and layer.keys is not None:
        keys, values = layer.keys_and_values()
        return keys, values, layer.offset
    if type(layer) is QuantizedKVCache and layer.keys is not None:
        keys, values = layer.keys_and_values()
        return list(keys), list(values), layer.offset, layer.group_size, layer.bits
    return layer.state
