"""The batch's decode step with lazy log-probability rows (``engine.lazy_logprobs``) gives what
mlx-lm's own ``GenerationBatch`` gives: the same tokens and the same log-probabilities for every
sequence, with greedy, sampled and penalized requests joining a running batch and leaving it at
different steps, on the demo model through the real ``BatchDecoder``, sampled in one call for the
batch and one call per row; and a step hands the device its tokens and one array, not a row per
sequence."""

from __future__ import annotations

import logging
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from genmlx.dispatcher.engine import decoding, lazy_logprobs
from genmlx.dispatcher.engine.decoding import BatchDecoder, DecoderSettings
from genmlx.dispatcher.engine.events import GenerationRequest, Sampling
from genmlx.dispatcher.engine.lazy_logprobs import LazyLogprobsBatch, use_lazy_logprobs

SAMPLINGS = (
    Sampling(temperature=0),
    Sampling(temperature=0.8, seed=7),
    Sampling(temperature=0, repetition_penalty=1.3),  # a logits processor: rows processed one by one
    Sampling(temperature=1.0, top_p=0.9, seed=8, presence_penalty=0.5),
    Sampling(temperature=0),
    Sampling(temperature=0.7, top_k=20, seed=9),
)


@pytest.fixture(scope="module")
def demo_model(demo_model_dir: Path):
    from mlx_lm import load

    return load(str(demo_model_dir))


def decode(model, tokenizer) -> dict[int, list[tuple[int, list[float]]]]:
    """Each sequence's tokens with its whole row of log-probabilities; sequences join two steps
    apart and ask for different lengths, so the batch grows and shrinks while it decodes."""
    prompt = tokenizer.encode("The river ran past the old mill and into the valley")
    decoder = BatchDecoder(model, set(tokenizer.eos_token_ids), DecoderSettings(max_batch=8, cache_entries=0))
    waiting = [
        GenerationRequest(f"r{i}", tuple(prompt[: 3 + i]), max_tokens=10 + 3 * i, sampling=sampling)
        for i, sampling in enumerate(SAMPLINGS)
    ]
    got: dict[int, list[tuple[int, list[float]]]] = {uid: [] for uid in range(len(waiting))}
    step = 0
    while waiting or decoder.active:
        if waiting and step % 2 == 0:
            uid = len(got) - len(waiting)
            decoder.join(uid, waiting.pop(0))
        for sampled in decoder.step():
            got[sampled.uid].append((sampled.token, sampled.logprobs.tolist()))
        step += 1
    return got


@pytest.mark.parametrize("sampled", ["as one batch", "row by row"])
def test_the_lazy_step_gives_mlx_lms_tokens_and_log_probabilities(demo_model, monkeypatch, sampled) -> None:
    model, tokenizer = demo_model
    if sampled == "row by row":  # each row keeps its own sampler: one call per row, in both classes
        monkeypatch.setattr(BatchDecoder, "_sample_batches_together", lambda self: None)
    lazy = decode(model, tokenizer)
    monkeypatch.setattr(decoding, "use_lazy_logprobs", lambda generator: False)
    mlx_lms = decode(model, tokenizer)
    assert [len(tokens) for tokens in lazy.values()] == [10 + 3 * i for i in range(len(SAMPLINGS))]
    assert lazy == mlx_lms


def test_a_step_hands_the_device_its_tokens_and_one_array_not_a_row_each(demo_model, monkeypatch) -> None:
    model, tokenizer = demo_model
    decoder = BatchDecoder(model, set(), DecoderSettings(max_batch=16, cache_entries=0))
    generator = decoder._generator
    assert type(generator._generation_batch) is LazyLogprobsBatch
    prompt = tuple(tokenizer.encode("Rivers run"))
    for uid in range(16):
        decoder.join(uid, GenerationRequest(f"r{uid}", prompt, 64, Sampling(temperature=0)))
    while len(generator._generation_batch) < 16:
        decoder.step()
    handed: list[int] = []
    async_eval = mx.async_eval

    def counted(*arrays):
        handed.append(len(tree_flatten(list(arrays))))
        return async_eval(*arrays)

    monkeypatch.setattr(lazy_logprobs.mx, "async_eval", counted)
    sampled = decoder.step()
    assert len(sampled) == 16 and handed == [2], handed  # tokens and the whole array; mlx-lm's: 17


def test_a_generator_unlike_mlx_lms_keeps_its_own_batch(caplog) -> None:
    class Other:
        _generation_batch = object()
        sampler = None

    other = Other()
    with caplog.at_level(logging.INFO, logger=lazy_logprobs.__name__):
        assert not use_lazy_logprobs(other)
    assert other._generation_batch is Other._generation_batch
    assert "computes every row" in caplog.text
