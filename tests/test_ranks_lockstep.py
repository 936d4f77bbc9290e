"""Two real dispatcher ranks in lockstep over MLX's ring backend on loopback, tensor and pipeline
parallel, checked against one rank on the same model through the real ``openai`` client."""

from __future__ import annotations

import json
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import openai
import pytest
from conftest import Proc, distinct_free_ports, http_status, wait_until

from genmlx.agent.ranks.launch_request import InvalidLaunch, parse_rank_launch
from genmlx.agent.ranks.supervisor import dispatcher_command
from genmlx.demo.pipeline_model import write_demo_pipeline_model
from genmlx.dispatcher.engine.events import GenerationRequest, Sampling
from genmlx.dispatcher.engine.lockstep import Join, Probe, Shutdown, Step, decode_message, encode_message
from genmlx.wire.rank_launch import RankLaunch

MODEL = "demo"
CHAT = [{"role": "user", "content": "Tell me about rivers and the sea."}]
# Over a minute of generation on two CPU ranks, and within the demo model's 2048-token context:
# only a cancellation ends such a request in a test.
LONG = 1_800
GREEDY = {"temperature": 0, "max_tokens": 12}
PROMPTS = ("Rivers", "The sea at night", "Copper is")


@dataclass(frozen=True)
class Rank:
    proc: Proc
    port: int

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/health"


@pytest.fixture(scope="module")
def qwen2_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model as a three-layer qwen2, which mlx-lm can pipeline (``pipeline_model``)."""
    return write_demo_pipeline_model(tmp_path_factory.mktemp("models") / "demo-qwen2")


@pytest.fixture
def start_ranks(spawn, token: str, tmp_path: Path):
    """``start_ranks(model_dir, world_size, *extra)``: every rank of a group, ready to serve."""

    def start(model_dir: Path, world_size: int, *extra: str) -> list[Rank]:
        # The group's ports and the ranks' HTTP ports, all different.
        ports = distinct_free_ports(2 * world_size)
        group_ports, http_ports = ports[:world_size], ports[world_size:]
        hostfile = tmp_path / f"hostfile-{group_ports[0]}.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in group_ports]))
        ranks = [
            _start_rank(spawn, token, model_dir, r, world_size, hostfile, extra, http_ports[r])
            for r in range(world_size)
        ]
        for rank in ranks:
            wait_until(lambda rank=rank: http_status(rank.health_url) == 200, timeout=90, what="ranks ready")
        return ranks

    return start


def _start_rank(
    spawn, token: str, model_dir: Path, rank: int, world_size: int, hostfile: Path, extra, port: int
) -> Rank:
    args = ["-m", "genmlx.dispatcher", "--model", str(model_dir), "--name", MODEL, "--port", str(port)]
    if world_size > 1:
        args += ["--rank", str(rank), "--world-size", str(world_size), "--hostfile", str(hostfile), *extra]
    return Rank(spawn(args, f"rank{rank}", env={"GENMLX_API_TOKEN": token}), port)


def client_of(rank: Rank, token: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{rank.port}/v1", api_key=token, max_retries=0, timeout=60
    )


def answers(client: openai.OpenAI) -> list[tuple[str, int, int, int]]:
    """Text and usage of a greedy chat, a seeded sampled chat (its prompt from the prefix cache) and
    a greedy completion, then of three greedy completions sent at once (decoded as one batch, the
    second asking for log-probabilities, which rank 0 alone reads: the tokens they were given for
    are the text's)."""
    greedy = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=24)
    seeded = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=1, seed=7, max_tokens=24)
    completion = client.completions.create(
        model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=16
    )
    with ThreadPoolExecutor(3) as pool:
        asked = [{}, {"logprobs": 2}, {}]
        batch = list(
            pool.map(
                lambda p, extra: client.completions.create(model=MODEL, prompt=p, **GREEDY, **extra),
                PROMPTS,
                asked,
            )
        )
    logprobs = batch[1].choices[0].logprobs
    assert "".join(logprobs.tokens) == batch[1].choices[0].text, logprobs
    # Greedy: each chosen token is the likeliest of its own step's row.
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert len(top) == 2 and max(top.values()) == pytest.approx(chosen, abs=1e-5), logprobs
    assert seeded.usage.prompt_tokens_details.cached_tokens == seeded.usage.prompt_tokens - 1
    # Structured output: every rank masks with the same grammar, so the group samples alike.
    shaped = client.chat.completions.create(
        model=MODEL, messages=CHAT, temperature=1, seed=5, max_tokens=60, response_format=SHAPED
    )
    chats = (greedy, seeded, shaped)
    return [(reply.choices[0].message.content, *counts(reply.usage)) for reply in chats] + [
        (reply.choices[0].text, *counts(reply.usage)) for reply in (completion, *batch)
    ]


SHAPED = {
    "type": "json_schema",
    "json_schema": {
        "name": "flag",
        "schema": {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["ok", "n"],
            "additionalProperties": False,
        },
    },
}


def counts(usage) -> tuple[int, int, int]:
    return usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens, usage.completion_tokens


def check_group_survives_disconnect_and_bad_request(group: list[Rank], token: str) -> None:
    client = client_of(group[0], token)
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, temperature=0, max_tokens=LONG, stream=True
    )
    chunks = iter(stream)
    next(chunks), next(chunks)  # the role, then generated text: every rank is mid-request
    stream.close()  # the client leaves; rank 0 cancels, and the other ranks with it
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=CHAT, temperature=5)
    # An unseeded sampled request: rank 0 picks the seed for every rank.
    sampled = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12)
    assert sampled.choices[0].finish_reason in ("stop", "length")
    after = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=8)
    assert after.usage.completion_tokens == 8
    assert all(rank.proc.popen.poll() is None for rank in group)


def check_sigterm_to_rank0_stops_the_group(group: list[Rank]) -> None:
    group[0].proc.signal(signal.SIGTERM)
    for rank in group:
        assert rank.proc.popen.wait(timeout=20) == 0
    assert "rank 0 stopped the group" in group[1].proc.output()


@pytest.mark.e2e
@pytest.mark.parametrize("parallelism", ["tensor", "pipeline"])
def test_two_ranks_write_what_one_rank_writes_and_stay_in_step(
    parallelism: str, start_ranks, demo_model_dir: Path, qwen2_model_dir: Path, token: str
) -> None:
    model_dir = demo_model_dir if parallelism == "tensor" else qwen2_model_dir
    (single,) = start_ranks(model_dir, 1)
    expected = answers(client_of(single, token))
    single.proc.stop()
    group = start_ranks(model_dir, 2, "--parallelism", parallelism)
    assert answers(client_of(group[0], token)) == expected
    # Each rank stacked its blocks' projections (in a tensor group, its own shards of them).
    assert all(
        "groups of projections of the same rows multiply as one layer" in r.proc.output() for r in group
    )
    assert http_status(f"http://127.0.0.1:{group[1].port}/v1/models", token) == 404  # rank 1: /health only
    check_group_survives_disconnect_and_bad_request(group, token)
    check_sigterm_to_rank0_stops_the_group(group)


@pytest.mark.e2e
def test_a_pipeline_layer_split_is_honoured(start_ranks, qwen2_model_dir: Path, token: str) -> None:
    (single,) = start_ranks(qwen2_model_dir, 1)
    expected = answers(client_of(single, token))
    single.proc.stop()
    # The even split of 3 layers is 2,1; ask for the other way round.
    group = start_ranks(qwen2_model_dir, 2, "--parallelism", "pipeline", "--layer-split", "1,2")
    assert "rank 0 runs layers 2 to 2" in group[0].proc.output()
    assert "rank 1 runs layers 0 to 1" in group[1].proc.output()
    assert answers(client_of(group[0], token)) == expected


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_rank_0_exits_1_when_another_rank_leaves(sig: int, start_ranks, demo_model_dir: Path) -> None:
    group = start_ranks(demo_model_dir, 2)
    group[1].proc.signal(sig)
    if sig == signal.SIGTERM:  # a stopped follower leaves at the next heartbeat, cleanly
        assert group[1].proc.popen.wait(timeout=20) == 0
    # Rank 0 notices at its next idle heartbeat (a second), without any request.
    assert group[0].proc.popen.wait(timeout=20) == 1
    assert "lost its group" in group[0].proc.output()


def test_the_agent_passes_parallelism_and_layer_split_to_its_ranks(tmp_path: Path) -> None:
    hosts = ("10.0.0.1:32323", "10.0.0.2:32323")
    launch = RankLaunch("big", "/models/big", 0, 2, 8100, "spec", hosts)
    launch = replace(launch, parallelism="pipeline", layer_split=(3, 1))
    assert parse_rank_launch(json.dumps(launch.to_json()).encode()) == launch
    argv = dispatcher_command(launch, Path("/models/big"), "0.0.0.0", 4242, tmp_path / "hostfile.json")
    flags = dict(zip(argv[3::2], argv[4::2], strict=True))
    assert (flags["--parallelism"], flags["--layer-split"]) == ("pipeline", "3,1")
    with pytest.raises(InvalidLaunch, match="layerSplit"):
        parse_rank_launch(json.dumps({**launch.to_json(), "layerSplit": [4]}).encode())
    with pytest.raises(InvalidLaunch, match="parallelism"):
        parse_rank_launch(json.dumps({**launch.to_json(), "parallelism": "data"}).encode())


def test_a_request_crosses_the_lockstep_encoding_unchanged() -> None:
    sampling = Sampling(temperature=0.5, top_p=0.9, seed=2**62)
    request = GenerationRequest("req-1", (1, 2, 300_000), 16, sampling, stop=("\n\n", "é"))
    step = Step(joins=(Join(3, request, cached_tokens=2),), leaves=(1, 2))
    assert decode_message(encode_message(step)) == step
    assert isinstance(decode_message(encode_message(Shutdown())), Shutdown)
    probe = Probe(prompt=(5, 6, 300_000), tokens=3)
    assert decode_message(encode_message(probe)) == probe
