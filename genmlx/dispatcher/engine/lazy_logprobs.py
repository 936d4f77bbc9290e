"""A batch's decode step that leaves each sequence's log-probabilities to whoever reads them.

mlx-lm's ``GenerationBatch`` (0.32) splits each step's log-probabilities into one array per
sequence and computes all of them with the step's tokens, though few requests ask for them: at a
batch of 64 that is 64 more outputs in every step's graph (on this project's 2-core CPU, a step of
64 on the demo model took 9.7 ms that way and 8.3 without, ``decode_step_profile.py``'s ``engine``).
The ``LazyLogprobsBatch`` here computes the step's whole array of log-probabilities with its
tokens, as one output, and leaves each row a lazy view of it, which a request asking for
log-probabilities evaluates when it reads it; the others never touch theirs. The whole array is
an output even though the samplers read it, so that the step's forward pass (and, in a group of
ranks, its collectives) runs on every rank whatever a sampler reads, and a row read later on rank
0 alone is a view, never a computation. The tokens come from the same operations on the same
inputs, so they are the same (tested against mlx-lm's class).

Only the steps of the batch that sequences generate in go through here; the first token of each
joining sequence is still sampled by mlx-lm's own class, which then merges into this one.
``BatchDecoder`` puts it in place through ``use_lazy_logprobs``; the attributes it reads are mlx-lm's
private ones (pinned to 0.32), and where they are not there, mlx-lm's class stays.
"""

from __future__ import annotations

import logging
from typing import Any

import mlx.core as mx
from mlx_lm.generate import GenerationBatch

log = logging.getLogger(__name__)


class LazyLogprobsBatch(GenerationBatch):
    """mlx-lm's ``GenerationBatch``, each step computing only the tokens (see the module)."""

    def _step(self) -> tuple[list[int], list[mx.array]]:
        """Start step n+1 on the device, then wait for step n's tokens; step n's tokens and rows."""
        fed = self._current_tokens = self._next_tokens
        self._current_logprobs = self._next_logprobs
        logits = self.model(fed[:, None], cache=self.prompt_cache)[:, -1, :]
        logits, contexts = self._processed(logits, fed)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        self._next_tokens = self._sampled(logprobs)
        self._next_logprobs = list(logprobs)  # views, computed only where read
        mx.async_eval(self._next_tokens, logprobs, contexts)
        tokens = fed.tolist()
        for written, token in zip(self.tokens, tokens, strict=False):
            written.append(token)  # ``tokens`` is what each sequence's cache holds
        return tokens, self._current_logprobs

    def _processed(self, logits: mx.array, fed: mx.array) -> tuple[mx.array, list[mx.array]]:
        """The logits after each row's processors (penalties), and the token histories they read."""
        if not any(self.logits_processors):
            return logits, []
        rows, contexts = [], []
        for index, processors in enumerate(self.logits_processors):
            row = logits[index : index + 1]
            if processors:
                context = self._token_context[index].update_and_fetch(fed[index : index + 1])
                contexts.append(context)
                for processor in processors:
                    row = processor(context, row)
            rows.append(row)
        return mx.concatenate(rows, axis=0), contexts

    def _sampled(self, logprobs: mx.array) -> mx.array:
        """One token per row: one call where every row has the same sampler, else one per row."""
        samplers = [self.fallback_sampler if s is None else s for s in self.samplers or ()]
        if not samplers:
            return self.fallback_sampler(logprobs)
        if all(sampler is samplers[0] for sampler in samplers):
            return samplers[0](logprobs)
        return mx.concatenate([s(logprobs[i : i + 1]) for i, s in enumerate(samplers)], axis=0)


def use_lazy_logprobs(generator: Any) -> bool:
    """Put an empty ``LazyLogprobsBatch`` in a fresh ``BatchGenerator``'s place for the batch that
    generates; whether it could (mlx-lm's private attributes are where 0.32 has them)."""
    batch = getattr(generator, "_generation_batch", None)
    if type(batch) is not GenerationBatch or len(batch) or not hasattr(generator, "sampler"):
        log.info("mlx-lm's batch is not the one this dispatcher knows: each step computes every row")
        return False
    generator._generation_batch = LazyLogprobsBatch.empty(generator.model, generator.sampler)
    return True
