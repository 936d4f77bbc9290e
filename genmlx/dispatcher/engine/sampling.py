"""Token samplers with a random key of their own per request, sampled a whole batch at a time, and
the logit processors that apply OpenAI's penalties.

Each request carries its own key instead of reseeding MLX's global generator, so the same seed
gives the same tokens whatever else the model thread runs before or between them. ``RowSampler`` is
one request's parameters and key; ``BatchSampler`` samples every row of a batch in one call, each
row with its own temperature, top-k, top-p, min-p and key, so a batch of sixteen requests at
temperature 0.7 costs one sampling graph per step rather than sixteen. A row samples the same token
alone or in any batch: every operation below works row by row (the categorical draw is ``vmap``-ed
over the rows' keys, which is what makes that hold).
"""

from __future__ import annotations

import functools
import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.sample_utils import make_frequency_penalty, make_presence_penalty, make_repetition_penalty

from genmlx.dispatcher.engine.events import Sampling

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]
# How many recent tokens (prompt included, as mlx-lm counts them) the penalties look at.
PENALTY_WINDOW = 256
_UNUSED_KEY = mx.zeros((2,), dtype=mx.uint32)  # a greedy row's place in the stacked keys
# Evaluated here, on the importing thread: left lazy, its graph would name that thread's stream,
# and the model thread, which has no such stream, could not compute it (MLX's streams are per thread).
mx.eval(_UNUSED_KEY)


class RowSampler:
    """One request's sampler: log-probabilities of shape (1, vocabulary) in, a token id out.

    It is the sampler ``generate_step`` and mlx-lm's batches call for this request alone; within a
    batch, ``BatchSampler`` samples it together with the other rows and keeps its key advancing."""

    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        self.greedy = sampling.temperature == 0
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(64)
        self.key = _UNUSED_KEY if self.greedy else mx.random.key(seed % 2**64)
        self._alone: _RowParameters | None = None

    def __call__(self, logprobs: mx.array) -> mx.array:
        if self._alone is None:
            self._alone = _RowParameters.of([self], logprobs.shape[-1])
        tokens, keys = _sample(logprobs, self._alone, self.key[None])
        self.key = keys[0]
        return tokens


class BatchSampler:
    """Samples one batch of rows per call, ``rows[i]`` being the request of row ``i``.

    While the rows stay the same their keys stay stacked from one call to the next (and their
    parameters built); when they change, each row's key is handed back to its ``RowSampler`` first."""

    def __init__(self) -> None:
        self._rows: tuple[RowSampler, ...] = ()
        self._parameters: _RowParameters | None = None
        self._keys: mx.array | None = None

    def sample(self, logprobs: mx.array, rows: Sequence[RowSampler]) -> mx.array:
        if logprobs.shape[0] != len(rows):
            raise RuntimeError(f"{logprobs.shape[0]} rows of log-probabilities for {len(rows)} requests")
        rows = tuple(rows)
        if rows != self._rows or self._parameters is None:
            self._hand_back_keys()
            self._rows = rows
            self._parameters = _RowParameters.of(rows, logprobs.shape[-1])
            self._keys = mx.stack([row.key for row in rows])
        tokens, self._keys = _sample(logprobs, self._parameters, self._keys)
        return tokens

    def _hand_back_keys(self) -> None:
        for i, row in enumerate(self._rows):
            if not row.greedy:
                row.key = self._keys[i]


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


@dataclass(frozen=True)
class _RowParameters:
    """The rows' sampling parameters as columns; a truncation no row asks for is None (skipped)."""

    all_greedy: bool
    greedy: mx.array | None  # (rows,) bool; None when no row is greedy
    inverse_temperature: mx.array  # (rows, 1); 1 for greedy rows, whose draw is discarded
    top_k: mx.array | None  # (rows, 1) int; the vocabulary size where a row keeps everything
    top_p: mx.array | None  # (rows, 1); 1 where a row keeps everything
    log_min_p: mx.array | None  # (rows, 1); -inf where a row keeps everything

    @classmethod
    def of(cls, rows: Sequence[RowSampler], vocabulary: int) -> _RowParameters:
        samplings = [row.sampling for row in rows]
        greedy = [row.greedy for row in rows]

        def column(values: list, dtype: mx.Dtype = mx.float32) -> mx.array:
            return mx.array(values, dtype=dtype)[:, None]

        inverse_temperature = [1.0 if row.greedy else 1.0 / row.sampling.temperature for row in rows]
        top_k = [s.top_k if 0 < s.top_k < vocabulary else vocabulary for s in samplings]
        top_p = [s.top_p for s in samplings]
        log_min_p = [math.log(s.min_p) if s.min_p > 0 else -math.inf for s in samplings]
        return cls(
            all_greedy=all(greedy),
            greedy=mx.array(greedy) if any(greedy) else None,
            inverse_temperature=column(inverse_temperature),
            top_k=column(top_k, mx.int32) if min(top_k) < vocabulary else None,
            top_p=column(top_p) if min(top_p) < 1.0 else None,
            log_min_p=column(log_min_p) if max(log_min_p) > -math.inf else None,
        )


def _sample(logprobs: mx.array, parameters: _RowParameters, keys: mx.array) -> tuple[mx.array, mx.array]:
    """One token per row of ``logprobs`` (rows, vocabulary) and the rows' next keys."""
    if parameters.all_greedy:
        return mx.argmax(logprobs, axis=-1), keys
    columns = (parameters.greedy, parameters.top_k, parameters.top_p, parameters.log_min_p)
    present = tuple(column is not None for column in columns)
    given = [column for column in columns if column is not None]
    return _fused_sampler(*present)(logprobs, keys, parameters.inverse_temperature, *given)


@functools.cache
def _fused_sampler(
    greedy: bool, top_k: bool, top_p: bool, min_p: bool
) -> Callable[..., tuple[mx.array, mx.array]]:
    """The sampling graph for rows with these truncations, compiled (``mx.compile``): its
    element-wise steps run as a few fused kernels instead of one launch each. One per combination
    of the columns present; MLX keeps one compiled graph per shape of its inputs."""

    def sample(logprobs: mx.array, keys: mx.array, inverse_temperature: mx.array, *given: mx.array):
        columns = iter(given)
        parameters = _RowParameters(
            all_greedy=False,
            greedy=next(columns) if greedy else None,
            inverse_temperature=inverse_temperature,
            top_k=next(columns) if top_k else None,
            top_p=next(columns) if top_p else None,
            log_min_p=next(columns) if min_p else None,
        )
        split = mx.vmap(mx.random.split)(keys)
        next_keys, step_keys = split[:, 0], split[:, 1]
        scaled = _truncated(logprobs, parameters) * parameters.inverse_temperature
        tokens = mx.vmap(_categorical)(scaled, step_keys)
        if parameters.greedy is not None:
            tokens = mx.where(parameters.greedy, mx.argmax(logprobs, axis=-1), tokens)
        return tokens, next_keys

    return mx.compile(sample)


def _categorical(logits: mx.array, key: mx.array) -> mx.array:
    return mx.random.categorical(logits, key=key)


def _truncated(logprobs: mx.array, parameters: _RowParameters) -> mx.array:
    """Drop, row by row, the tokens top-k, top-p and min-p exclude (their log-probability becomes
    -inf), in that order."""
    dropped = mx.array(-math.inf, dtype=logprobs.dtype)
    if parameters.top_k is not None:
        descending = -mx.sort(-logprobs, axis=-1)
        kth = mx.take_along_axis(descending, parameters.top_k - 1, axis=-1)
        logprobs = mx.where(logprobs < kth, dropped, logprobs)
    if parameters.top_p is not None:
        # Keep the most likely tokens whose probabilities add up to top_p, and the one that crosses it.
        # Normalized here: a grammar's mask leaves a row's log-probabilities summing to less than 1.
        order = mx.argsort(logprobs, axis=-1)
        ascending = mx.take_along_axis(logprobs, order, axis=-1)
        ascending = ascending - mx.logsumexp(ascending, axis=-1, keepdims=True)
        mass_above = 1.0 - mx.cumsum(mx.exp(ascending), axis=-1)  # the mass of the tokens after each
        kept = mx.where(mass_above < parameters.top_p, ascending, dropped)
        truncated = mx.put_along_axis(logprobs, order, kept, axis=-1)
        logprobs = mx.where(parameters.top_p < 1.0, truncated, logprobs)
    if parameters.log_min_p is not None:
        threshold = mx.max(logprobs, axis=-1, keepdims=True) + parameters.log_min_p
        logprobs = mx.where(logprobs < threshold, dropped, logprobs)
    return logprobs
