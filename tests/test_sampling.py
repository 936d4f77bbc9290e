"""Sampling a batch at once: every row with its own parameters and key gives the tokens it would give
alone, on random log-probabilities and through the real decoder on the demo model, where a batch of
requests at temperature 0.7 is sampled in one call per step."""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import pytest

from genmlx.dispatcher.engine.events import GenerationRequest, Sampling
from genmlx.dispatcher.engine.sampling import BatchSampler, RowSampler

VOCABULARY = 300
MIXED = (
    Sampling(temperature=0.7, seed=1),
    Sampling(temperature=0),
    Sampling(temperature=1.0, top_p=0.5, seed=2),
    Sampling(temperature=0.9, top_k=5, seed=3),
    Sampling(temperature=1.2, min_p=0.3, seed=4),
    Sampling(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, seed=5),
)


def random_logprobs(rows: int, step: int) -> mx.array:
    logits = mx.random.normal((rows, VOCABULARY), key=mx.random.key(1000 + step)) * 3
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def test_each_row_of_a_batch_samples_what_it_samples_alone() -> None:
    batch, batched = BatchSampler(), [RowSampler(s) for s in MIXED]
    alone = [RowSampler(s) for s in MIXED]
    for step in range(20):
        logprobs = random_logprobs(len(MIXED), step)
        together = batch.sample(logprobs, batched).tolist()
        assert together == [row(logprobs[i : i + 1]).item() for i, row in enumerate(alone)]


def test_rows_keep_their_keys_when_the_batch_changes() -> None:
    """Rows join and leave between steps; each row's tokens follow its own key throughout."""
    batch = BatchSampler()
    rows = [RowSampler(s) for s in MIXED]
    references = [RowSampler(s) for s in MIXED]
    membership = [[0, 1], [0, 1, 2, 3], [1, 2, 3], [3, 4, 5, 2], [5], [0, 5, 4]]
    for step, members in enumerate(membership * 2):
        logprobs = random_logprobs(len(members), step)
        # Rows 0 and 5 first sample alone (as mlx-lm samples a sequence's first token), later in batches.
        together = batch.sample(logprobs, [rows[m] for m in members]).tolist()
        expected = [references[m](logprobs[i : i + 1]).item() for i, m in enumerate(members)]
        assert together == expected, (step, members)


def test_truncation_keeps_what_each_row_asks_for() -> None:
    logprobs = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]] * 4))
    rows = [
        RowSampler(Sampling(temperature=5.0, top_k=1, seed=1)),
        RowSampler(Sampling(temperature=5.0, top_p=0.5, seed=2)),  # 0.5 alone reaches 0.5
        RowSampler(Sampling(temperature=5.0, min_p=0.7, seed=3)),  # 0.3 < 0.7 * 0.5
        RowSampler(Sampling(temperature=5.0, top_p=0.7, seed=4)),  # 0.5 + 0.3 cross 0.7
    ]
    batch = BatchSampler()
    seen: list[set[int]] = [set() for _ in rows]
    for _ in range(200):
        for i, token in enumerate(batch.sample(logprobs, rows).tolist()):
            seen[i].add(token)
    assert seen == [{0}, {0}, {0}, {0, 1}]


def test_truncation_reads_log_probabilities_that_sum_below_one_as_the_renormalized_ones() -> None:
    """A grammar's mask leaves a row's log-probabilities summing to less than 1 (here 0.6: the masked
    tokens had 0.4); top-p keeps the tokens it keeps on the renormalized row, so 0.25 + 0.2 of 0.6
    (75%) do not reach top_p = 0.8, and the third token is kept too."""
    masked = mx.log(mx.array([[0.25, 0.2, 0.1, 0.05]] * 2))
    renormalized = masked - mx.logsumexp(masked, axis=-1, keepdims=True)
    rows = [RowSampler(Sampling(temperature=5.0, top_p=0.8, seed=seed)) for seed in (1, 1)]
    batch, both = BatchSampler(), mx.concatenate([masked[:1], renormalized[:1]])
    seen: list[set[int]] = [set(), set()]
    for _ in range(200):
        for i, token in enumerate(batch.sample(both, rows).tolist()):
            seen[i].add(token)
    assert seen == [{0, 1, 2}, {0, 1, 2}]


def test_temperature_scales_the_distribution() -> None:
    """At temperature 2 a token of probability 0.8 against 0.2 is drawn with probability
    sqrt(0.8) / (sqrt(0.8) + sqrt(0.2)) = 2/3."""
    logprobs = mx.log(mx.array([[0.8, 0.2]] * 100))
    rows = [RowSampler(Sampling(temperature=2.0, seed=seed)) for seed in range(100)]
    batch = BatchSampler()
    draws = sum((batch.sample(logprobs, rows) == 0).sum().item() for _ in range(30))
    assert math.isclose(draws / 3000, 2 / 3, abs_tol=0.04)


def test_the_same_seed_gives_the_same_tokens_and_no_seed_differs() -> None:
    logprobs = random_logprobs(1, 0)
    seeded = []
    for _ in range(2):
        row = RowSampler(Sampling(seed=7))
        seeded.append([row(logprobs).item() for _ in range(8)])
    assert seeded[0] == seeded[1]
    draws = []
    for _ in range(3):
        row = RowSampler(Sampling())
        draws.append([row(logprobs).item() for _ in range(8)])
    assert len({tuple(d) for d in draws}) > 1


@pytest.fixture(scope="module")
def demo_model(demo_model_dir: Path):
    from mlx_lm import load

    model, tokenizer = load(str(demo_model_dir))
    return model, tokenizer


def decode(model, tokenizer, requests: list[GenerationRequest], max_batch: int) -> dict[str, list[int]]:
    from genmlx.dispatcher.engine.decoding import BatchDecoder, DecoderSettings

    decoder = BatchDecoder(model, set(tokenizer.eos_token_ids), DecoderSettings(max_batch=max_batch))
    tokens: dict[int, list[int]] = {}
    for uid, request in enumerate(requests):
        decoder.join(uid, request)
        tokens[uid] = []
    while decoder.active:
        for sampled in decoder.step():
            tokens[sampled.uid].append(sampled.token)
    return {requests[uid].request_id: got for uid, got in tokens.items()}


def test_the_decoder_samples_a_batch_in_one_call_per_step_with_each_request_as_if_alone(
    demo_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = demo_model
    prompt = tuple(tokenizer.encode("The river ran past the old mill"))
    requests = [
        GenerationRequest(f"r{i}", prompt[: 4 + i], max_tokens=24, sampling=sampling)
        for i, sampling in enumerate(MIXED)
    ]
    alone: dict[str, list[int]] = {}
    for request in requests:
        alone |= decode(model, tokenizer, [request], max_batch=1)

    batch_sizes: list[int] = []
    sample = BatchSampler.sample

    def counted(self, logprobs, rows):
        batch_sizes.append(len(rows))
        return sample(self, logprobs, rows)

    monkeypatch.setattr(BatchSampler, "sample", counted)
    together = decode(model, tokenizer, requests, max_batch=len(requests))
    assert together == alone
    assert max(batch_sizes) == len(requests)


def test_a_greedy_row_samples_in_a_batch_on_a_thread_other_than_the_importing_one():
    """The model thread samples greedy and random rows together: nothing made at import on the
    main thread may be left for it to compute (MLX's streams are per thread). A fresh process,
    so that nothing else evaluated it first."""
    import subprocess
    import sys

    script = """
import threading
import mlx.core as mx
from genmlx.dispatcher.engine.events import Sampling
from genmlx.dispatcher.engine.sampling import BatchSampler, RowSampler

def work():
    with mx.stream(mx.new_stream(mx.default_device())):
        rows = [RowSampler(Sampling(temperature=0)), RowSampler(Sampling(temperature=1.0, seed=3))]
        mx.eval(BatchSampler().sample(mx.random.normal((2, 16)), rows))
        print("sampled")

thread = threading.Thread(target=work)
thread.start()
thread.join()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "sampled", done.stderr[-2000:]
