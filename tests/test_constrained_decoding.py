"""Constrained decoding in the decoder, in process, on the demo model: constrained rows sampled at
any temperature with top-k and top-p, batched with free rows, give exactly the tokens each gives
alone — whether it started alone and moved into the batch, joined a running batch, or ran on a
model whose caches cannot batch — and every constrained output validates against its schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from test_decoding import new_decoder, run

from genmlx.dispatcher.engine.constraints import constraints_for, json_schema_grammar
from genmlx.dispatcher.engine.decoders import SequentialDecoder, make_decoder
from genmlx.dispatcher.engine.decoding import DecoderSettings
from genmlx.dispatcher.engine.events import GenerationRequest, Sampling

POINT = {
    "type": "object",
    "properties": {
        "x": {"type": "integer", "minimum": -50, "maximum": 50},
        "label": {"enum": ["north", "south"]},
        "ok": {"type": "boolean"},
    },
    "required": ["x", "label", "ok"],
    "additionalProperties": False,
}
WORDS = {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 2, "maxItems": 3}
MAX_TOKENS = 80  # enough for either schema: every constrained row ends by end of turn


@pytest.fixture(scope="module")
def demo_model(demo_model_dir: Path):
    from mlx_lm import load

    return load(str(demo_model_dir))


def requests(tokenizer) -> list[GenerationRequest]:
    """Two constrained rows at temperature 1 with truncations, one greedy constrained row, two free
    rows: what a busy dispatcher batches together."""

    def request(name: str, text: str, sampling: Sampling, schema: dict | None) -> GenerationRequest:
        grammar = json_schema_grammar(schema) if schema else None
        prompt = tuple(tokenizer.encode(text))
        return GenerationRequest(name, prompt, MAX_TOKENS, sampling, grammar=grammar)

    return [
        request("point", "Where is it?", Sampling(temperature=1.0, top_p=0.9, seed=1), POINT),
        request("free", "Rivers start in the hills", Sampling(temperature=0.8, seed=2), None),
        request("words", "Say two words.", Sampling(temperature=1.0, top_k=40, seed=3), WORDS),
        request("greedy point", "And now?", Sampling(temperature=0), POINT),
        request("free greedy", "The sea is salty because", Sampling(temperature=0), None),
    ]


def decoder(model, tokenizer, **settings):
    return new_decoder(model, tokenizer, **settings, constraints=constraints_for(tokenizer))


def alone(model, tokenizer) -> dict[int, list[int]]:
    tokens: dict[int, list[int]] = {}
    for uid, request in enumerate(requests(tokenizer)):
        tokens |= run(decoder(model, tokenizer), {0: (uid, request)})
    return tokens


def assert_valid(tokenizer, tokens: dict[int, list[int]]) -> None:
    schemas = [POINT, None, WORDS, POINT, None]
    for uid, schema in enumerate(schemas):
        if schema is not None:
            assert tokens[uid][-1] in tokenizer.eos_token_ids, "a constrained row ends by end of turn"
            jsonschema.validate(json.loads(tokenizer.decode(tokens[uid][:-1])), schema)


@pytest.mark.parametrize(
    "joins_at",
    [
        pytest.param((0, 0, 0, 0, 0), id="all at once"),
        pytest.param((0, 3, 5, 9, 12), id="each into a running batch, the first from alone"),
    ],
)
def test_constrained_rows_give_in_a_batch_what_they_give_alone(demo_model, joins_at) -> None:
    model, tokenizer = demo_model
    expected = alone(model, tokenizer)
    assert_valid(tokenizer, expected)
    joins: dict[int, list] = {}
    for uid, (step, request) in enumerate(zip(joins_at, requests(tokenizer), strict=True)):
        joins.setdefault(step, []).append((uid, request))
    batch = decoder(model, tokenizer, prefill_chunk=4, prefill_chunk_alone=4)
    assert run_joins(batch, joins) == expected


def run_joins(batch, joins: dict[int, list]) -> dict[int, list[int]]:
    """``run`` with several sequences joining before the same step."""
    tokens: dict[int, list[int]] = {uid: [] for group in joins.values() for uid, _ in group}
    step = 0
    while batch.active or step <= max(joins):
        for uid, request in joins.get(step, []):
            batch.join(uid, request)
        for sampled in batch.step():
            tokens[sampled.uid].append(sampled.token)
        step += 1
    return tokens


def test_a_constrained_row_decodes_alike_on_a_model_whose_caches_cannot_batch(demo_model) -> None:
    from test_decoding import _ChunkedCaches

    model, tokenizer = demo_model
    expected = alone(model, tokenizer)
    sequential = make_decoder(
        _ChunkedCaches(model), set(tokenizer.eos_token_ids), DecoderSettings(), tokenizer
    )
    assert isinstance(sequential, SequentialDecoder)
    for uid, request in enumerate(requests(tokenizer)):
        if request.grammar is not None:
            assert until_end_of_turn(sequential, uid, request, tokenizer) == expected[uid]


def until_end_of_turn(sequential: SequentialDecoder, uid: int, request, tokenizer) -> list[int]:
    """The tokens up to the end of turn (the decoder ends the sequence there)."""
    sequential.join(uid, request)
    tokens: list[int] = []
    while sequential.active:
        for sampled in sequential.step():
            tokens.append(sampled.token)
            assert (sampled.end == "stop") == (sampled.token in tokenizer.eos_token_ids)
    return tokens
