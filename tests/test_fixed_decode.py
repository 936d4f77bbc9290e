"""A sequence decoded alone through one compiled step over fixed buffers (``engine.fixed_decode``):
the same greedy tokens as the plain call, across the buffers' growth, plain and quantized, and as
the batch gives; one trace per capacity, kept for the next sequence; the cache back in plain
``KVCache`` layers for the prefix cache when the sequence ends; and the plain call kept, with the
reason logged, where the first step's check fails or the call cannot be traced, or where it does
not apply (other caches, a tensor group)."""

from __future__ import annotations

import logging
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear
from mlx_lm.models.cache import KVCache
from test_quantized_batches import load
from test_quantized_batches import quantized_dir as quantized_dir  # a fixture, used by name

from genmlx.dispatcher.engine import decoding, fixed_decode
from genmlx.dispatcher.engine.compiled_decode import compile_decode_mlps
from genmlx.dispatcher.engine.decoding import BatchDecoder, DecoderSettings
from genmlx.dispatcher.engine.events import GenerationRequest, Sampling
from genmlx.dispatcher.engine.fixed_decode import STEP, FixedDecode, fixed_decode_for
from genmlx.dispatcher.engine.fused_projections import fuse_projections
from genmlx.dispatcher.engine.quantized_batches import dequantize_where_it_pays

PROMPT = "The river ran past the old mill and into the valley, where"
LONG = STEP + 40  # tokens to decode: past the first capacity


def decode_alone(
    model, tokenizer, text: str = PROMPT, tokens: int = LONG, prompt: list[int] | None = None
) -> list[int]:
    """``tokens`` greedy tokens of ``text`` (or of ``prompt``'s tokens), the decoder's only
    sequence (so decoded alone)."""
    decoder = BatchDecoder(model, set(), DecoderSettings(cache_entries=2))
    prompt = prompt if prompt is not None else tokenizer.encode(text)
    decoder.join(0, GenerationRequest("r", tuple(prompt), tokens, Sampling(temperature=0)))
    out = []
    while decoder.active:
        out += [s.token for s in decoder.step()]
    return out


def decode_plain(model, tokenizer, monkeypatch, **given) -> list[int]:
    """What ``decode_alone`` gives through the model's plain call."""
    with monkeypatch.context() as patched:
        patched.setattr(decoding, "fixed_decode_for", lambda model: None)
        return decode_alone(model, tokenizer, **given)


def traces_of(monkeypatch) -> list[int]:
    """The capacities the compiled step is traced for, as they come (a replay adds none)."""
    traced: list[int] = []
    logits = FixedDecode._logits

    def tracing(self, token):
        traced.append(self._layers[0].state["keys"].shape[2])
        return logits(self, token)

    monkeypatch.setattr(FixedDecode, "_logits", tracing)
    return traced


def test_greedy_tokens_are_the_same_as_the_plain_calls_across_the_buffers_growth(
    demo_model_dir: Path, monkeypatch, caplog
) -> None:
    model, tokenizer = load(demo_model_dir)
    plain = decode_plain(model, tokenizer, monkeypatch)
    traced = traces_of(monkeypatch)
    with caplog.at_level(logging.INFO, logger="genmlx.dispatcher.engine.fixed_decode"):
        assert decode_alone(model, tokenizer) == plain
    assert len(plain) == LONG
    assert "runs one compiled step per token over fixed buffers" in caplog.text
    assert traced == [STEP, 2 * STEP], "one trace per capacity: the first, and after it grew"


def test_a_quantized_models_tokens_are_the_same_through_the_compiled_step(
    quantized_dir: Path, monkeypatch, caplog
) -> None:
    model, tokenizer = load(quantized_dir)
    fuse_projections(model)  # as the dispatcher loads it
    dequantize_where_it_pays(model, 0)
    compile_decode_mlps(model)
    with caplog.at_level(logging.INFO, logger="genmlx.dispatcher.engine.fixed_decode"):
        fixed = decode_alone(model, tokenizer, tokens=40)
    assert "runs one compiled step per token over fixed buffers" in caplog.text
    assert decode_plain(model, tokenizer, monkeypatch, tokens=40) == fixed


def test_the_trace_serves_the_next_sequence_and_the_cache_goes_back_plain(
    demo_model_dir: Path, monkeypatch
) -> None:
    model, tokenizer = load(demo_model_dir)
    texts = ("Rivers start in the hills", "Deltas form where")
    plain = [decode_plain(model, tokenizer, monkeypatch, text=text, tokens=12) for text in texts]
    traced = traces_of(monkeypatch)
    decoder = BatchDecoder(model, set(), DecoderSettings(cache_entries=4))
    prompts = [tokenizer.encode(text) for text in texts]
    for uid, prompt in enumerate(prompts):
        decoder.join(uid, GenerationRequest(f"r{uid}", tuple(prompt), 12, Sampling(temperature=0)))
        tokens = []
        while decoder.active:
            tokens += [s.token for s in decoder.step()]
        assert tokens == plain[uid], "each sequence its own tokens, through the one trace"
        assert decoder._fixed.holder is None, "released when the sequence ended"
    assert traced == [STEP], "the second sequence replays the first one's trace"
    # Each sequence's cache went to the prefix cache as plain KVCache layers holding what it read,
    # and a prompt that goes on from the first sequence's answer decodes from it as from scratch.
    entry = decoder._prefixes.take(prompts[1] + [0] * 20)
    assert entry is not None and entry.tokens >= len(prompts[1])
    assert all(type(c) is KVCache for c in entry.cache)
    follow_up = prompts[0] + plain[0] + tokenizer.encode(" and then")
    reused = decoder.join(2, GenerationRequest("r2", tuple(follow_up), 12, Sampling(temperature=0)))
    assert reused > len(prompts[0]), "the first sequence's prompt and answer, from its released cache"
    tokens = []
    while decoder.active:
        tokens += [s.token for s in decoder.step()]
    assert tokens == decode_plain(model, tokenizer, monkeypatch, prompt=follow_up, tokens=12)


def test_a_sequence_that_moves_into_the_batch_keeps_its_tokens(demo_model_dir: Path, monkeypatch) -> None:
    """Joined by a second sequence while decoding alone: its cache leaves the buffers for the batch."""
    model, tokenizer = load(demo_model_dir)

    def run(decoder: BatchDecoder) -> dict[int, list[int]]:
        first = GenerationRequest("a", tuple(tokenizer.encode(PROMPT)), 30, Sampling(temperature=0))
        second = GenerationRequest(
            "b", tuple(tokenizer.encode("Lakes are deep")), 10, Sampling(temperature=0)
        )
        tokens: dict[int, list[int]] = {0: [], 1: []}
        decoder.join(0, first)
        for step in range(200):
            if step == 12:
                decoder.join(1, second)
            for s in decoder.step():
                tokens[s.uid].append(s.token)
            if not decoder.active:
                break
        return tokens

    fixed_decoder = BatchDecoder(model, set(), DecoderSettings())
    assert fixed_decoder._fixed is not None
    monkeypatch.setattr(decoding, "fixed_decode_for", lambda model: None)
    plain = run(BatchDecoder(model, set(), DecoderSettings()))
    assert run(fixed_decoder) == plain
    assert fixed_decoder._fixed.usable is True and fixed_decoder._fixed.holder is None


def test_a_failed_first_step_check_keeps_the_plain_call_and_says_why(
    demo_model_dir: Path, monkeypatch, caplog
) -> None:
    """An attention that ignored the cache's mask would read the buffers' empty rest."""
    model, tokenizer = load(demo_model_dir)
    plain = decode_plain(model, tokenizer, monkeypatch, tokens=20)
    monkeypatch.setattr(fixed_decode._Buffers, "make_mask", lambda self, n, **kwargs: None)
    with caplog.at_level(logging.WARNING, logger="genmlx.dispatcher.engine.fixed_decode"):
        assert decode_alone(model, tokenizer, tokens=20) == plain
    assert "keeps the plain step: its logits were" in caplog.text


def test_a_call_that_cannot_be_traced_keeps_the_plain_call(demo_model_dir: Path, monkeypatch, caplog) -> None:
    model, tokenizer = load(demo_model_dir)
    plain = decode_plain(model, tokenizer, monkeypatch, tokens=20)
    logits = FixedDecode._logits

    def reads_the_host(self, token):
        return logits(self, token) * float(token.item() >= 0)  # no host reads inside a trace

    monkeypatch.setattr(FixedDecode, "_logits", reads_the_host)
    with caplog.at_level(logging.WARNING, logger="genmlx.dispatcher.engine.fixed_decode"):
        assert decode_alone(model, tokenizer, tokens=20) == plain
    assert "keeps the plain step: its call could not be compiled" in caplog.text


class _Sharded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = shard_linear(nn.Linear(8, 8), "all-to-sharded", group=mx.distributed.init())


def test_it_applies_only_to_plain_caches_of_a_model_not_split_across_ranks(demo_model_dir: Path) -> None:
    model, _ = load(demo_model_dir)
    assert fixed_decode_for(model) is not None
    model.make_cache = lambda: [object() for _ in model.layers]  # caches of another kind
    assert fixed_decode_for(model) is None
    del model.make_cache
    model.model.pipeline_size = 2
    assert fixed_decode_for(model) is None
    del model.model.pipeline_size
    model.model.layers[0].sharded = _Sharded()
    assert fixed_decode_for(model) is None


def test_a_one_token_prompt_starts_on_the_plain_call_and_then_takes_the_compiled_step(
    demo_model_dir: Path, monkeypatch
) -> None:
    """Nothing is read before the first step: there is nothing to size the buffers by yet."""
    model, tokenizer = load(demo_model_dir)
    plain = decode_plain(model, tokenizer, monkeypatch, text="", tokens=20)
    traced = traces_of(monkeypatch)
    assert decode_alone(model, tokenizer, text="", tokens=20) == plain
    assert traced == [STEP]
