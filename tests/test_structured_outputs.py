"""Structured outputs on a real dispatcher, through the real ``openai`` client: JSON mode and JSON
schemas on chat completions and the Responses API always give output that parses and validates —
on a random-weight model that would never write such JSON by chance — a constrained request
batched with free ones gives what it gives alone, and a schema the grammar engine cannot compile is
a 400 naming the construct."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from dispatcher_process import ServedModel

pytestmark = pytest.mark.e2e

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "none"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "pet", "tags"],
    "additionalProperties": False,
}
FLAG = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person."}]


def client(served: ServedModel) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url + "/v1", api_key=served.token, timeout=60, max_retries=0)


def chat(served: ServedModel, **kwargs) -> str:
    reply = client(served).chat.completions.create(model=served.name, messages=ASK, max_tokens=200, **kwargs)
    assert reply.choices[0].finish_reason == "stop", reply
    return reply.choices[0].message.content


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


JSON_REPLY = '{"city": "Paris"}'


@pytest.fixture(scope="module")
def writes_json(tmp_path_factory):
    """A dispatcher on a scripted model that writes ``JSON_REPLY``: JSON mode must let it."""
    from dispatcher_process import served_model

    from genmlx.demo.scripted_model import write_scripted_model

    models = tmp_path_factory.mktemp("models")
    with served_model(write_scripted_model(models / "json", JSON_REPLY), "json", models) as served:
        yield served


def test_json_mode_lets_a_model_write_its_json_and_forces_an_object_on_one_that_would_not(
    writes_json: ServedModel, demo: ServedModel
) -> None:
    text = chat(writes_json, response_format={"type": "json_object"}, temperature=0)
    assert json.loads(text) == json.loads(JSON_REPLY)
    reply = client(demo).chat.completions.create(
        model=demo.name, messages=ASK, max_tokens=8, temperature=0, response_format={"type": "json_object"}
    )
    assert reply.choices[0].message.content.startswith('{"'), "a random model is held to an object"


def test_a_json_schema_is_always_followed(demo: ServedModel) -> None:
    for seed in range(3):
        text = chat(demo, response_format=schema_format(PERSON), temperature=1.0, seed=seed)
        jsonschema.validate(json.loads(text), PERSON)


def test_the_responses_api_follows_text_format(demo: ServedModel) -> None:
    fmt = {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}
    response = client(demo).responses.create(
        model=demo.name,
        input="Describe a person.",
        text={"format": fmt},
        max_output_tokens=200,
        temperature=0,
    )
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), PERSON)
    assert response.text.format.type == "json_schema"


def test_constrained_and_free_requests_batched_give_what_they_give_alone(demo: ServedModel) -> None:
    requests = [
        {"response_format": schema_format(PERSON)},
        {},
        {"response_format": schema_format(FLAG)},
        {},
    ]
    alone = [chat(demo, temperature=0, **r) if r else _free(demo) for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: chat(demo, temperature=0, **r) if r else _free(demo), requests))
    assert together == alone
    jsonschema.validate(json.loads(together[0]), PERSON)


def _free(demo: ServedModel) -> str:
    reply = client(demo).chat.completions.create(model=demo.name, messages=ASK, max_tokens=12, temperature=0)
    return reply.choices[0].message.content


def test_a_schema_the_engine_cannot_compile_is_a_400_naming_the_construct(demo: ServedModel) -> None:
    lookaround = {"type": "object", "properties": {"x": {"type": "string", "pattern": "(?<=a)b"}}}
    with pytest.raises(openai.BadRequestError) as refused:
        chat(demo, response_format=schema_format(lookaround))
    error = refused.value.body
    assert error["param"] == "response_format.json_schema.schema"
    assert "look-around" in error["message"]
