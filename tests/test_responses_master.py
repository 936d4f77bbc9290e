"""The Responses API through the master: stored responses, ``previous_response_id`` continuing one
(with the earlier turns' KV state reused from the prefix cache), ``GET``/``DELETE``, ``store:
false``, and a clear 404 for a response that is gone, even across a dispatcher restart."""

from __future__ import annotations

import os
import signal

import openai
import pytest
import test_cluster as harness
from agent_harness import call
from conftest import wait_until
from openai.types.responses import Response

pytestmark = pytest.mark.e2e
MODEL = harness.MODEL


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, demo_model_dir):
    with harness.ready_cluster(tmp_path_factory.mktemp("responses"), demo_model_dir) as cluster:
        yield cluster


def ask(cluster, **kwargs) -> Response:
    return cluster.client().responses.create(model=MODEL, max_output_tokens=4, temperature=0, **kwargs)


def test_a_continued_response_carries_the_conversation_and_reuses_its_kv_state(cluster) -> None:
    first = ask(cluster, input="Tell me a story about a bay.")
    second = ask(cluster, input="And then?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    # Without the stored turns the model sees far less: the same input alone is a short prompt.
    alone = ask(cluster, input="And then?")
    assert alone.usage.input_tokens < second.usage.input_tokens


def test_a_stored_response_can_be_read_and_deleted(cluster) -> None:
    created = ask(cluster, input="Hello")
    url = f"{cluster.url}/v1/responses/{created.id}"
    got = call("GET", url, cluster.token)
    assert got.status == 200
    assert Response.model_validate(got.json()).output_text == created.output_text
    assert call("DELETE", url, cluster.token).json() == {
        "id": created.id,
        "object": "response",
        "deleted": True,
    }
    gone = call("GET", url, cluster.token)
    assert gone.status == 404 and gone.json()["error"]["code"] == "response_not_found"
    with pytest.raises(openai.NotFoundError) as refused:
        ask(cluster, input="More", previous_response_id=created.id)
    assert refused.value.body["param"] == "previous_response_id"


def test_store_false_keeps_nothing_and_a_streamed_response_is_stored(cluster) -> None:
    unstored = ask(cluster, input="Hello", store=False)
    assert call("GET", f"{cluster.url}/v1/responses/{unstored.id}", cluster.token).status == 404
    with cluster.client().responses.create(
        model=MODEL, input="Hello", max_output_tokens=4, temperature=0, stream=True
    ) as stream:
        events = list(stream)
    final = events[-1].response
    stored = call("GET", f"{cluster.url}/v1/responses/{final.id}", cluster.token).json()
    assert stored["output"] == final.model_dump(mode="json", exclude_none=True)["output"]


def test_a_conversation_survives_its_dispatchers_restart(cluster) -> None:
    first = ask(cluster, input="Remember this.")
    pid = harness.rank0(cluster.wait_ready())["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_until(
        lambda: (d := cluster.ready_status()) and harness.rank0(d)["pid"] != pid, 120, what="a new rank 0"
    )
    second = ask(cluster, input="What was it?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens


def test_an_unknown_previous_response_is_a_404_never_a_fresh_start(cluster) -> None:
    with pytest.raises(openai.NotFoundError) as refused:
        ask(cluster, input="Go on", previous_response_id="resp_nothing_like_this")
    assert refused.value.body["code"] == "response_not_found"
