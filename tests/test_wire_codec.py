"""The wire codec: every wire type round-trips, and a bad document is refused naming its field."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import pytest

from genmlx.wire.agent_state import AgentState, FetchRequest, NodeFacts, RankInfo, StorageReport, StoredModel
from genmlx.wire.argv import from_argv, to_argv
from genmlx.wire.codec import WireError, decode, decode_json, encode
from genmlx.wire.rank_launch import RankCommand, RankLaunch
from genmlx.wire.serving import ServingSettings

LAUNCH = RankLaunch(
    "qwen",
    "/models/qwen",
    1,
    2,
    8101,
    "abc",
    hostfile=("10.0.0.1:32323", "10.0.0.2:32324"),
    serving=ServingSettings(max_batch=4, context_length=4096),
    parallelism="pipeline",
    layer_split=(20, 12),
)


def test_a_whole_agent_report_round_trips_through_json() -> None:
    facts = NodeFacts("studio", "Darwin 24.1.0", "arm64", 24, 192 << 30, 100 << 30, chip="Apple M2 Ultra")
    stored = StoredModel("qwen", "/models/qwen", 123, True, source="hf://org/qwen", commit="c0ffee")
    state = AgentState(
        "studio",
        "0.1.0",
        facts,
        storage=(StorageReport("/models", True, 10**12, 10**11, models=(stored,)),),
        ranks=(RankInfo(LAUNCH, 4242, "running", 1.5e9, phase="ready"),),
    )
    document = json.loads(json.dumps(state.to_json()))
    assert document["facts"]["memoryTotal"] == 192 << 30, "camelCase on the wire"
    serving = {"maxBatch": 4, "maxQueue": None, "contextLength": 4096, "kvBits": None, "kvGroupSize": None}
    serving["diskCacheGB"] = None
    assert document["ranks"][0]["launch"]["serving"] == serving
    assert AgentState.from_json(document) == state


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"worldSize": 0}, "worldSize: 0 must be at least 1"),
        ({"rank": True}, "rank: expected an integer"),
        ({"serving": {"maxBatch": "8"}}, "serving.maxBatch: expected an integer"),
        ({"serving": {"maxQueue": 0}}, "serving.maxQueue: 0 must be at least 1"),
        ({"serving": {"maxBach": 8}}, "serving.maxBach: unknown field"),
        ({"hostfile": ["10.0.0.1:1", "no port"]}, "hostfile[1]: 'no port' must be \"host:port\""),
        ({"parallelism": "data"}, "parallelism: 'data' must be one of tensor, pipeline"),
        ({"layerSplit": [20]}, "layerSplit: 1 entries for worldSize 2"),
        ({"model": "../up"}, "model: '../up' must be 1 to 128 letters"),
        ({"specHash": ""}, "specHash: required, a non-empty string"),
        ({"modelPath": None}, "modelPath: expected a string"),
    ],
)
def test_a_bad_launch_is_refused_naming_the_field(change: dict, message: str) -> None:
    with pytest.raises(WireError) as refused:
        decode(RankLaunch, {**LAUNCH.to_json(), **change})
    assert str(refused.value).startswith(message)


def test_a_missing_field_is_required_and_an_integral_float_is_an_integer() -> None:
    document = LAUNCH.to_json()
    del document["port"]
    with pytest.raises(WireError, match="^port: required$"):
        decode(RankLaunch, document)
    assert decode(RankLaunch, {**LAUNCH.to_json(), "port": 8101.0}).port == 8101


def test_requests_refuse_unknown_fields_and_reports_from_newer_peers_keep_working() -> None:
    newer = {**FetchRequest("m", "/models", peer="10.0.0.2:6790").to_json(), "priority": 3}
    with pytest.raises(WireError, match="^priority: unknown field$"):
        decode_json(FetchRequest, json.dumps(newer).encode())
    assert FetchRequest.from_json(newer).peer == "10.0.0.2:6790"


def test_a_body_that_is_not_json_is_refused_with_the_callers_error() -> None:
    class Refused(Exception):
        pass

    with pytest.raises(Refused, match="^body: not valid JSON"):
        decode_json(RankLaunch, b"{nope", error=Refused)
    with pytest.raises(Refused, match="^body: expected a JSON object$"):
        decode_json(RankLaunch, b"[1]", error=Refused)


def test_a_rank_command_survives_its_command_line() -> None:
    command = RankCommand(
        "/models/qwen",
        "qwen",
        8101,
        rank=1,
        world_size=2,
        serving=LAUNCH.serving,
        prefix_cache_gb=0.5,
        hostfile="/tmp/qwen.1.hostfile.json",
        parallelism="pipeline",
        layer_split=(20, 12),
    )
    argv = to_argv(command)
    assert argv[argv.index("--layer-split") + 1] == "20,12"
    assert "--context-length" in argv and "--prefill-chunk" not in argv, "None leaves the default"
    assert from_argv(RankCommand, argv, argparse.ArgumentParser()) == command
    assert encode(command.serving) == LAUNCH.serving.to_json()


def test_a_launchs_spare_memory_reaches_the_rank_in_gib() -> None:
    from genmlx.wire.rank_launch import rank_command

    spared = replace(LAUNCH, spare_bytes=3 << 29)
    assert rank_command(spared, "/m", "127.0.0.1", 1, None).spare_gb == 1.5
    assert rank_command(LAUNCH, "/m", "127.0.0.1", 1, None).spare_gb is None
    argv = to_argv(rank_command(spared, "/m", "127.0.0.1", 1, None))
    assert argv[argv.index("--spare-gb") + 1] == "1.5"
    with pytest.raises(WireError, match="spareBytes"):
        decode_json(RankLaunch, json.dumps({**LAUNCH.to_json(), "spareBytes": -1}).encode())


def test_a_bad_command_line_exits_with_usage_naming_the_flag(capsys: pytest.CaptureFixture) -> None:
    base = ["--model", "/m", "--name", "m", "--port", "8100"]
    for extra, said in [
        (["--max-batch", "0"], "--max-batch: 0 must be at least 1"),
        (["--port", "http"], "--port: 'http' is not an integer"),
        (["--layer-split", "3,1"], "--layer-split applies to --parallelism pipeline only"),
    ]:
        with pytest.raises(SystemExit) as exited:
            from_argv(RankCommand, base + extra, argparse.ArgumentParser(prog="dispatcher"))
        assert exited.value.code == 2
        assert said in capsys.readouterr().err
