"""The decoder on the demo model, in process: a sequence that starts alone runs on plain caches and
moves into the batch when a second one joins, at any point (reading its prompt, decoding, on its
last token), with the tokens it would have had alone; a sequence dropped while alone leaves its
state in the prefix cache."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from genmlx.dispatcher.engine.decoding import BatchDecoder, DecoderSettings
from genmlx.dispatcher.engine.events import GenerationRequest, Sampling

FIRST = GenerationRequest("first", (), max_tokens=20, sampling=Sampling(temperature=0.8, seed=11))
SECOND = GenerationRequest("second", (), max_tokens=12, sampling=Sampling(temperature=0.6, seed=12))


@pytest.fixture(scope="module")
def demo_model(demo_model_dir: Path):
    from mlx_lm import load

    return load(str(demo_model_dir))


def with_prompt(request: GenerationRequest, tokenizer, text: str) -> GenerationRequest:
    return GenerationRequest(
        request.request_id, tuple(tokenizer.encode(text)), request.max_tokens, request.sampling
    )


def new_decoder(model, tokenizer, constraints=None, **settings) -> BatchDecoder:
    return BatchDecoder(model, set(tokenizer.eos_token_ids), DecoderSettings(**settings), constraints)


def run(decoder: BatchDecoder, joins: dict[int, tuple[int, GenerationRequest]]) -> dict[int, list[int]]:
    """Step until every sequence ended, joining ``joins[step] = (uid, request)`` before that step."""
    tokens: dict[int, list[int]] = {uid: [] for uid, _ in joins.values()}
    step = 0
    while decoder.active or step <= max(joins):
        if step in joins:
            uid, request = joins[step]
            decoder.join(uid, request)
        for sampled in decoder.step():
            tokens[sampled.uid].append(sampled.token)
        step += 1
    return tokens


@pytest.mark.parametrize("phase", ["reading", "decoding", "last token sampled", "ended"])
def test_a_sequence_moves_from_alone_into_the_batch_with_the_tokens_it_had_alone(
    demo_model, phase: str
) -> None:
    """The first prompt is read in 4-token chunks, a step each, then one token per step: the second
    request joins while it is read, while it decodes, when its last token is already sampled (that
    token is delivered and ends it) or after it ended."""
    model, tokenizer = demo_model
    first = with_prompt(FIRST, tokenizer, "The river ran past the old mill and into the valley where")
    second = with_prompt(SECOND, tokenizer, "Lakes are deep")
    reading_steps = math.ceil((len(first.prompt_tokens) - 1) / 4)
    assert reading_steps >= 3
    last_token_step = reading_steps + FIRST.max_tokens - 1
    second_joins_at = {
        "reading": 2,
        "decoding": reading_steps + 3,
        "last token sampled": last_token_step,
        "ended": last_token_step + 1,
    }[phase]
    alone = {
        0: run(new_decoder(model, tokenizer, prefill_chunk=4, prefill_chunk_alone=4), {0: (0, first)})[0],
        1: run(new_decoder(model, tokenizer, prefill_chunk=4, prefill_chunk_alone=4), {0: (1, second)})[1],
    }
    assert len(alone[0]) == FIRST.max_tokens  # ended by length, not by end of turn
    decoder = new_decoder(model, tokenizer, prefill_chunk=4, prefill_chunk_alone=4)
    together = run(decoder, {0: (0, first), second_joins_at: (1, second)})
    assert together == alone


def test_greedy_tokens_are_the_same_alone_and_in_a_batch(demo_model) -> None:
    model, tokenizer = demo_model
    greedy = Sampling(temperature=0)
    requests = [
        GenerationRequest(f"r{i}", tuple(tokenizer.encode(text)), 24, greedy)
        for i, text in enumerate(("Rivers start in the hills", "The sea is salty because", "Deltas form"))
    ]
    alone = {}
    for uid, request in enumerate(requests):
        alone |= run(new_decoder(model, tokenizer), {0: (uid, request)})
    batched = run(new_decoder(model, tokenizer), {i: (i, r) for i, r in enumerate(requests)})
    assert batched == alone


def test_a_sequence_dropped_while_alone_leaves_its_state_in_the_prefix_cache(demo_model) -> None:
    model, tokenizer = demo_model
    request = with_prompt(FIRST, tokenizer, "The river ran past the old mill and into the valley where")
    decoder = new_decoder(model, tokenizer)
    assert decoder.join(0, request) == 0
    for _ in range(5):
        decoder.step()
    decoder.leave(0)
    assert decoder.active == 0 and decoder.cache_entries == 1
    # The same prompt again: all of it but its last token comes from the cache.
    assert decoder.join(1, request) == len(request.prompt_tokens) - 1


class _Recording:
    """The demo model, recording the shape of what each call feeds: (sequences, tokens each)."""

    def __init__(self, model):
        self._model = model
        self.fed: list[tuple[int, int]] = []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, inputs, *args, **kwargs):
        self.fed.append(tuple(inputs.shape))
        return self._model(inputs, *args, **kwargs)


LONG_TEXT = "The river ran past the old mill and into the valley where the farmers kept their sheep"


def test_a_prompt_is_read_in_long_chunks_alone_and_in_short_ones_beside_others(
    demo_model,
) -> None:
    model, tokenizer = demo_model
    greedy = Sampling(temperature=0)
    long = GenerationRequest("long", tuple(tokenizer.encode(LONG_TEXT)), 3, greedy)
    short = GenerationRequest("short", tuple(tokenizer.encode("Lakes")), 40, greedy)
    assert len(long.prompt_tokens) > 16

    # Alone: read 16 tokens a step.
    alone = _Recording(model)
    tokens_alone = run(new_decoder(alone, tokenizer, prefill_chunk=4, prefill_chunk_alone=16), {0: (0, long)})
    assert max(alone.fed) == (1, 16) and alone.fed.count((1, 16)) == (len(long.prompt_tokens) - 1) // 16

    # Joining a sequence that decodes: 4 tokens a step, one of the other's tokens between each.
    beside = _Recording(model)
    decoder = new_decoder(beside, tokenizer, prefill_chunk=4, prefill_chunk_alone=16)
    together = run(decoder, {0: (1, short), 3: (0, long)})
    assert max(n for _, n in beside.fed[3:]) == 4, "a long chunk would hold the decoding sequence back"
    assert together[0] == tokens_alone[0], "the chunking never changes the tokens"

    # Left alone in the batch (the other came and went): long chunks again.
    brief = GenerationRequest("brief", tuple(tokenizer.encode("Lakes")), 1, greedy)
    left = _Recording(model)
    decoder = new_decoder(left, tokenizer, prefill_chunk=4, prefill_chunk_alone=16)
    assert run(decoder, {0: (1, brief), 1: (0, long)})[0] == tokens_alone[0]
    assert (1, 16) in left.fed[2:], "the batch reads a lone prompt in long chunks"

    # Two prompts read together: short chunks, so that a batch of prompts stays a short step.
    both = _Recording(model)
    run(new_decoder(both, tokenizer, prefill_chunk=4, prefill_chunk_alone=16), {0: (0, long), 1: (1, long)})
    assert both.fed[0] == (1, 16) and (2, 4) in both.fed and (2, 16) not in both.fed


class _ChunkedCaches:
    """The demo model with caches mlx-lm cannot batch (``ChunkedKVCache`` has no ``merge``), as
    models with chunked attention have."""

    def __init__(self, model):
        self._model = model
        self.layers = model.layers

    def __call__(self, *args, **kwargs):
        return self._model(*args, **kwargs)

    def make_cache(self):
        from mlx_lm.models.cache import ChunkedKVCache

        return [ChunkedKVCache(4096) for _ in self.layers]


def test_a_model_whose_caches_cannot_batch_decodes_one_sequence_at_a_time(demo_model) -> None:
    from genmlx.dispatcher.engine.decoders import SequentialDecoder, make_decoder

    model, tokenizer = demo_model
    request = GenerationRequest(
        "r", tuple(tokenizer.encode("Rivers start in the hills")), 16, Sampling(temperature=0)
    )
    decoder = make_decoder(_ChunkedCaches(model), set(tokenizer.eos_token_ids), DecoderSettings(max_batch=8))
    assert isinstance(decoder, SequentialDecoder) and decoder.capacity == 1
    expected = run(new_decoder(model, tokenizer), {0: (0, request)})
    assert run(decoder, {0: (0, request)}) == expected
    # Dropped part-way, the decoder is free for the next sequence, which decodes as if alone.
    decoder.join(1, request)
    decoder.step(), decoder.step()
    decoder.leave(1)
    assert decoder.active == 0
    assert run(decoder, {0: (2, request)}) == {2: expected[0]}


def test_a_quantized_kv_cache_decodes_one_sequence_at_a_time_on_mlx_lms_quantized_cache(tmp_path) -> None:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import QuantizedKVCache

    from genmlx.demo.random_model import ModelShape, write_demo_model
    from genmlx.dispatcher.engine.decoders import SequentialDecoder, make_decoder

    # Heads of 64 values, which 8-bit groups of 64 can quantize (the demo model's have 16).
    shape = ModelShape(hidden_size=128, layers=2, attention_heads=2, kv_heads=1, intermediate_size=256)
    model, tokenizer = load(str(write_demo_model(tmp_path / "heads-of-64", shape=shape)))
    prompt = tuple(tokenizer.encode("Rivers start in the hills and carry water down to the sea"))
    request = GenerationRequest("r", prompt, 8, Sampling(temperature=0))
    expected = [
        int(token)
        for token, _ in generate_step(
            mx.array(prompt), model, max_tokens=8, kv_bits=8, kv_group_size=64, quantized_kv_start=0
        )
    ]
    decoder = make_decoder(model, set(tokenizer.eos_token_ids), DecoderSettings(max_batch=8, kv_bits=8))
    assert isinstance(decoder, SequentialDecoder) and decoder.capacity == 1
    assert decoder.join(0, request) == 0
    tokens = [s.token for _ in range(3) for s in decoder.step()]
    # Quantized from the first forward pass: 8 bits, groups of 64, as mlx-lm's generate_step does.
    assert all(
        isinstance(c, QuantizedKVCache) and (c.bits, c.group_size) == (8, 64) for c in decoder._solo.cache
    )
    while decoder.active:
        tokens += [s.token for s in decoder.step()]
    assert tokens == expected
    # The prefix cache keeps the quantized state: the same prompt again reuses all but its last token.
    assert decoder.cache_entries == 1
    assert decoder.join(1, GenerationRequest("r2", prompt, 8, Sampling(temperature=0))) == len(prompt) - 1
    again = []
    while decoder.active:
        again += [s.token for s in decoder.step()]
    assert again == expected


def test_the_dispatcher_reads_long_chunks_alone_on_a_gpu_and_short_ones_on_the_cpu(monkeypatch) -> None:
    import mlx.core as mx

    from genmlx.dispatcher.settings import decoder_settings, parse_settings

    def alone(*flags: str) -> int:
        argv = ["--model", "/models/m", "--name", "m", "--port", "8100", *flags]
        return decoder_settings(parse_settings(argv)).prefill_chunk_alone

    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.cpu))
    assert (alone(), alone("--prefill-chunk", "64")) == (512, 64), "on the CPU: the short chunk"
    assert alone("--prefill-chunk-alone", "1000") == 1000
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert (alone(), alone("--prefill-chunk", "64")) == (2048, 2048), "on a GPU: mlx_lm.server's 2,048"
    assert alone("--prefill-chunk", "4096") == 4096, "never shorter than the short one"
    assert alone("--world-size", "2", "--hostfile", "/h.json") == 512, "a group's ranks read in step"
