"""Token samplers with a random key of their own per request.

Each request carries its own key instead of reseeding MLX's global generator, so the same seed
gives the same tokens whatever else the model thread runs before or between them (which a batch
scheduler will rely on).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_p

from genmlx.dispatcher.events import Sampling

TokenSampler = Callable[[mx.array], mx.array]


def make_token_sampler(sampling: Sampling) -> TokenSampler:
    """A sampler for ``mlx_lm.generate.generate_step``: log-probabilities in, token ids out."""
    if sampling.temperature == 0:
        return _greedy
    seed = sampling.seed if sampling.seed is not None else secrets.randbits(64)
    key = mx.random.key(seed % 2**64)
    scale = 1.0 / sampling.temperature

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, step_key = mx.random.split(key)
        if sampling.top_p < 1.0:
            logprobs = apply_top_p(logprobs, sampling.top_p)
        return mx.random.categorical(logprobs * scale, key=step_key)

    return sample


def _greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)
