"""What an agent makes of a jaccl rank: before it starts, whether this node's RDMA devices and links
can carry it; after it ended, whether it failed to join its group (the errors exo's users meet,
MLX's own, a segfault in ibv_reg_mr) or crashed later like any rank. And the facts seam that lets a
real agent here report a Mac's Thunderbolt ports and RDMA devices from recorded output."""

from __future__ import annotations

import json
import signal
from dataclasses import replace
from pathlib import Path

import pytest

from genmlx.agent.facts.collect import collector_for_this_platform
from genmlx.agent.facts.macos import MacOSProbe
from genmlx.agent.facts.platform import PlatformCommandFailed
from genmlx.agent.facts.replay import FACTS_REPLAY_ENV, RecordedCommands
from genmlx.agent.ranks.backend_failure import backend_failure
from genmlx.agent.ranks.rdma_checks import RdmaNotReady, check_rdma_launch
from genmlx.wire.agent_state import NetworkInterface, NodeFacts
from genmlx.wire.rank_launch import BACKEND_JOIN_FAILED_EXIT, JOINED_GROUP_MARK, RankLaunch

RECORDINGS = Path(__file__).parent / "data" / "macos"
DEVICES = json.dumps([[None, "rdma_en2", "rdma_en3"], ["rdma_en2", None, None], ["rdma_en3", None, None]])
JACCL = RankLaunch(
    "qwen", "/m/qwen", 0, 3, 8100, "h", backend="jaccl", rdma_devices=DEVICES, coordinator="10.0.0.1:32323"
)
RING = RankLaunch("qwen", "/m/qwen", 0, 2, 8100, "h", hostfile=("10.0.0.1:1", "10.0.0.2:1"))
LOADING = "INFO genmlx.dispatcher: loading qwen\n"


@pytest.mark.parametrize(
    ("launch", "code", "log", "expected"),
    [
        # MLX refused the backend: our dispatcher's exit status and MLX's own message
        (
            JACCL,
            BACKEND_JOIN_FAILED_EXIT,
            LOADING + "2026-12-06 11:36:30,474 ERROR genmlx.dispatcher: cannot serve qwen: "
            "BackendJoinFailed: jaccl backend: Cannot initialize jaccl distributed backend.\n",
            "cannot serve qwen: BackendJoinFailed: jaccl backend: "
            "Cannot initialize jaccl distributed backend.",
        ),
        # libibverbs' error, then an abort: the line and how it ended
        (
            JACCL,
            -signal.SIGABRT,
            LOADING + "[jaccl] Changing queue pair to RTR failed with errno 22\n",
            "[jaccl] Changing queue pair to RTR failed with errno 22 (exit signal 6 (SIGABRT))",
        ),
        # a segfault inside ibv_reg_mr on a Mac without RDMA prints nothing first
        (JACCL, -signal.SIGSEGV, LOADING, "it died on signal 11 (SIGSEGV) before joining the jaccl group"),
        # the same exit status without a line of ours still counts
        (JACCL, BACKEND_JOIN_FAILED_EXIT, "", "it could not join the jaccl group"),
        # after joining, a crash is a crash
        (JACCL, -signal.SIGSEGV, f"INFO {JOINED_GROUP_MARK} as rank 0 of 3 on jaccl\n", None),
        (JACCL, 1, LOADING + "ValueError: bad weights\n", None),
        (JACCL, 0, "", None),
        # a ring rank is never a jaccl failure
        (RING, BACKEND_JOIN_FAILED_EXIT, "[jaccl] Cannot initialize jaccl distributed backend.\n", None),
    ],
)
def test_an_exited_jaccl_rank_is_read_as_a_backend_failure_only_before_it_joined(launch, code, log, expected):
    assert backend_failure(launch, code, log) == expected


def facts(*interfaces: NetworkInterface) -> NodeFacts:
    return NodeFacts("mac", "Darwin 25.2.0", "arm64", 24, 192 << 30, 180 << 30, interfaces=interfaces)


def port(name: str, rdma: bool = True) -> NetworkInterface:
    return NetworkInterface(name, "thunderbolt", (), True, rdma_device=f"rdma_{name}" if rdma else None)


def test_a_jaccl_rank_starts_only_where_its_devices_are_active_and_their_links_not_down():
    check_rdma_launch(JACCL, facts(port("en2"), port("en3")), {})  # all there: no error
    check_rdma_launch(RING, facts(), {})  # a ring rank needs none
    check_rdma_launch(replace(JACCL, rank=1), facts(port("en2")), {})  # rank 1 needs only rdma_en2
    with pytest.raises(
        RdmaNotReady, match=r"RDMA not ready for qwen\.0 on jaccl: no RDMA device is active.*rdma_ctl enable"
    ):
        check_rdma_launch(JACCL, facts(port("en2", rdma=False), port("en3", rdma=False)), {})
    with pytest.raises(RdmaNotReady, match=r"rdma_en3 not PORT_ACTIVE on this node \(active: rdma_en2\)"):
        check_rdma_launch(JACCL, facts(port("en2"), port("en3", rdma=False)), {})
    with pytest.raises(
        RdmaNotReady, match=r"the peer is unreachable over en3 \(no answer from 192\.168\.200\.6\)"
    ):
        check_rdma_launch(JACCL, facts(port("en2"), port("en3")), {"en3": "no answer from 192.168.200.6"})
    assert RdmaNotReady.status == 409


def test_recorded_commands_answer_the_macos_probe_and_the_environment_selects_them(monkeypatch):
    probe = MacOSProbe(run=RecordedCommands(RECORDINGS))
    ports = probe.interface_ports()
    assert (ports["en2"].kind, ports["en2"].rdma_device) == ("thunderbolt", "rdma_en2")
    assert probe.os_version() == "macOS " + (RECORDINGS / "sw_vers-productVersion.txt").read_text().strip()
    with pytest.raises(PlatformCommandFailed, match="no recording"):
        RecordedCommands(RECORDINGS)(["/usr/bin/uptime"])
    monkeypatch.setenv(FACTS_REPLAY_ENV, str(RECORDINGS))
    collected = collector_for_this_platform().collect()
    assert collected.os_version == probe.os_version() and collected.chip == probe.chip()
    assert collected.mlx_version, "the installed mlx's version is a fact"
