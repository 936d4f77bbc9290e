"""Token samplers with a random key of their own per request, and the logit processors that apply
OpenAI's penalties.

Each request carries its own key instead of reseeding MLX's global generator, so the same seed
gives the same tokens whatever else the model thread runs before or between them (which a batch
scheduler will rely on).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    make_frequency_penalty,
    make_presence_penalty,
    make_repetition_penalty,
)

from genmlx.dispatcher.events import Sampling

TokenSampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]
# How many recent tokens (prompt included, as mlx-lm counts them) the penalties look at.
PENALTY_WINDOW = 256


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
        return mx.random.categorical(_truncated(logprobs, sampling) * scale, key=step_key)

    return sample


def make_logits_processors(sampling: Sampling) -> list[LogitsProcessor]:
    """The penalties ``sampling`` asks for, as ``generate_step`` logits processors (none by default)."""
    processors = []
    if sampling.repetition_penalty != 1.0:
        processors.append(make_repetition_penalty(sampling.repetition_penalty, PENALTY_WINDOW))
    if sampling.presence_penalty:
        processors.append(make_presence_penalty(sampling.presence_penalty, PENALTY_WINDOW))
    if sampling.frequency_penalty:
        processors.append(make_frequency_penalty(sampling.frequency_penalty, PENALTY_WINDOW))
    return processors


def _truncated(logprobs: mx.array, sampling: Sampling) -> mx.array:
    """Drop the tokens top-k, top-p and min-p exclude (their log-probability becomes -inf)."""
    if 0 < sampling.top_k < logprobs.shape[-1]:  # a k as large as the vocabulary keeps everything
        logprobs = apply_top_k(logprobs, sampling.top_k)
    if sampling.top_p < 1.0:
        logprobs = apply_top_p(logprobs, sampling.top_p)
    if sampling.min_p > 0.0:
        logprobs = apply_min_p(logprobs, sampling.min_p)
    return logprobs


def _greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)
