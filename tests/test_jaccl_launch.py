"""Our jaccl ranks are started exactly as MLX's own launcher starts them. For desks of 2, 3 and 4
Macs cabled as a full mesh or a ring of Thunderbolt cables with an RDMA device at each end, the
planner (``mesh.backend: jaccl``) builds each rank's launch and the agent its MLX environment and
device file; MLX's ``mlx.launch`` jaccl code (``launch_jaccl``, imported from the installed mlx,
its process spawning replaced by a recorder) is given the same hosts and devices, described
straight from the cables. Every rank's MLX variables and file contents must be equal. The same for
nccl between 2, 3 and 4 Linux machines with a CUDA GPU each (``mesh.backend: auto``), against
``launch_nccl``."""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import replace
from pathlib import Path

import pytest
from builders import NOW, manifest, model, node, observed, stored
from test_plan_groups import SHAPE

from genmlx.agent.ranks.environment import mlx_environment
from genmlx.manifest.types import Mesh
from genmlx.master.planning.actions import StartRankGroup
from genmlx.master.planning.plan import plan
from genmlx.wire.agent_state import NetworkInterface

MESH_PORT = 32323
DEVICES = Path("/agent/logs/qwen.0.ibv-devices.json")


def cables(count: int, topology: str) -> list[tuple[int, int]]:
    if topology == "full-mesh" or count == 2:
        return list(itertools.combinations(range(count), 2))
    return [(i, (i + 1) % count) for i in range(count)]


def cabled_desk(count: int, topology: str):
    """The observed nodes (each holding the model) with one Thunderbolt port per cable, an RDMA
    device ``rdma_<port>`` on each, and the devices each node reaches each peer by."""
    names = "abcd"[:count]
    ports: dict[str, list[NetworkInterface]] = {name: [] for name in names}
    towards: dict[tuple[int, int], str] = {}
    for a, b in cables(count, topology):
        a_port, b_port = f"en{len(ports[names[a]]) + 2}", f"en{len(ports[names[b]]) + 2}"
        for me, port, peer, peer_port in ((a, a_port, b, b_port), (b, b_port, a, a_port)):
            ports[names[me]].append(
                NetworkInterface(
                    port,
                    "thunderbolt",
                    (),
                    True,
                    domain=f"{names[me]}/{port}",
                    peer_domain=f"{names[peer]}/{peer_port}",
                    rdma_device=f"rdma_{port}",
                )
            )
            towards[(me, peer)] = f"rdma_{port}"
    copy = stored("qwen", size=SHAPE.weight_bytes, shape=SHAPE, published_at=NOW - 3600)
    nodes = []
    for name in names:
        plain = node(name, stored=[copy])
        facts = replace(plain.state.facts, interfaces=tuple(ports[name]))
        nodes.append(replace(plain, state=replace(plain.state, facts=facts)))
    return names, nodes, towards


def our_ranks(count: int, topology: str) -> list[dict[str, str]]:
    """Each rank's MLX environment as the agent sets it, the device file's contents in place of its path."""
    names, nodes, _ = cabled_desk(count, topology)
    desk = manifest(
        model("qwen", names, source="file"), nodes=names, mesh=Mesh(backend="jaccl", port=MESH_PORT)
    )
    (start,) = [action for action in plan(desk, observed(*nodes)) if isinstance(action, StartRankGroup)]
    ranks = []
    for _, launch in start.launches:
        env = mlx_environment(launch, hostfile=None, devices=DEVICES)
        assert env.pop("MLX_IBV_DEVICES") == str(DEVICES)
        ranks.append({**env, "MLX_IBV_DEVICES": json.loads(launch.rdma_devices)})
    return ranks


def mlx_ranks(count: int, topology: str, monkeypatch) -> list[dict[str, str]]:
    """Each rank's MLX environment as ``mlx.launch --backend jaccl[-ring]`` would start it."""
    from mlx._distributed_utils import launch
    from mlx._distributed_utils.common import Host

    names, nodes, towards = cabled_desk(count, topology)
    hosts = [
        Host(rank, name, [f"10.0.0.{rank + 1}"], [towards.get((rank, peer)) for peer in range(count)])
        for rank, name in enumerate(names)
    ]
    recorded = []
    monkeypatch.setattr(
        launch, "_launch_with_io", lambda kind, arguments, verbose: recorded.extend(arguments)
    )
    backend = "jaccl" if topology == "full-mesh" or count <= 3 else "jaccl-ring"
    arguments = argparse.Namespace(
        backend=backend, env=[], cwd=None, python=None, starting_port=MESH_PORT, verbose=False
    )
    launch.launch_jaccl(argparse.ArgumentParser(), hosts, arguments, ["python", "-m", "genmlx.dispatcher"])
    ranks = []
    for (rank, _host, _python, _cwd, files, env, _command), _ in recorded:
        variables = dict(entry.split("=", 1) for entry in env)
        variables.update({name: json.loads(content) for name, content in files.items()})
        ranks.append({**variables, "MLX_RANK": str(rank)})
    return ranks


@pytest.mark.parametrize(
    ("count", "topology"),
    [(2, "full-mesh"), (3, "full-mesh"), (4, "full-mesh"), (3, "ring"), (4, "ring")],
)
def test_every_rank_gets_what_mlx_launch_gives_it(count: int, topology: str, monkeypatch) -> None:
    ours, theirs = our_ranks(count, topology), mlx_ranks(count, topology, monkeypatch)
    assert len(ours) == len(theirs) == count
    for rank, (mine, mlx) in enumerate(zip(ours, theirs, strict=True)):
        assert mine == mlx, f"rank {rank} of {count} ({topology})"
    ring = topology == "ring" and count > 3  # three Macs in a ring are a full mesh
    assert all(("MLX_JACCL_RING" in mine) is ring for mine in ours)


# ----------------------------------------------------------------------------------------------
# nccl, between Linux machines with a CUDA GPU each


def cuda_desk(count: int):
    copy = stored("qwen", size=SHAPE.weight_bytes, shape=SHAPE, published_at=NOW - 3600)
    names = "abcd"[:count]
    nodes = []
    for name in names:
        plain = node(name, stored=[copy])
        facts = replace(plain.state.facts, os="Linux 6.8.0", gpu="CUDA")
        nodes.append(replace(plain, state=replace(plain.state, facts=facts)))
    return names, nodes


def our_nccl_ranks(count: int) -> list[dict[str, str]]:
    names, nodes = cuda_desk(count)
    desk = manifest(
        model("qwen", names, source="file"), nodes=names, mesh=Mesh(backend="auto", port=MESH_PORT)
    )
    (start,) = [action for action in plan(desk, observed(*nodes)) if isinstance(action, StartRankGroup)]
    return [mlx_environment(launch, hostfile=None, devices=None) for _, launch in start.launches]


def mlx_nccl_ranks(count: int, monkeypatch) -> list[dict[str, str]]:
    """Each rank's environment as ``mlx.launch --backend nccl`` would start it."""
    from mlx._distributed_utils import launch
    from mlx._distributed_utils.common import Host

    names, _ = cuda_desk(count)
    hosts = [Host(rank, name, [f"10.0.0.{rank + 1}"], []) for rank, name in enumerate(names)]
    recorded = []
    monkeypatch.setattr(
        launch, "_launch_with_io", lambda kind, arguments, verbose: recorded.extend(arguments)
    )
    arguments = argparse.Namespace(
        env=[], cwd=None, python=None, nccl_port=MESH_PORT, verbose=False, repeat_hosts=1
    )
    launch.launch_nccl(argparse.ArgumentParser(), hosts, arguments, ["python", "-m", "genmlx.dispatcher"])
    ranks = []
    for (rank, _host, _python, _cwd, files, env, _command), _ in recorded:
        assert files == {}, "nccl needs no files"
        ranks.append({**dict(entry.split("=", 1) for entry in env), "MLX_RANK": str(rank)})
    return ranks


@pytest.mark.parametrize("count", [2, 3, 4])
def test_nccl_ranks_get_what_mlx_launch_gives_them(count: int, monkeypatch) -> None:
    ours, theirs = our_nccl_ranks(count), mlx_nccl_ranks(count, monkeypatch)
    assert len(ours) == len(theirs) == count
    for rank, (mine, mlx) in enumerate(zip(ours, theirs, strict=True)):
        assert mine == mlx, f"rank {rank} of {count} (nccl)"


def test_a_linux_gpu_node_and_a_mac_share_a_model_over_the_ring() -> None:
    """MLX's CUDA build and Apple's share one backend, the ring (benchmarks/gpu/mixed_group.py
    served a group of a CUDA rank and a rank of another build over it): a model across a Linux GPU
    node and a Mac starts there under ``auto``; asked for nccl, it starts nowhere."""
    (linux,), (gpu_node,) = cuda_desk(1)
    copy = stored("qwen", size=SHAPE.weight_bytes, shape=SHAPE, published_at=NOW - 3600)
    mac = node("m", stored=[copy])
    names = (linux, "m")

    def starts(backend: str) -> list[StartRankGroup]:
        desk = manifest(
            model("qwen", names, source="file"), nodes=names, mesh=Mesh(backend=backend, port=MESH_PORT)
        )
        return [
            action for action in plan(desk, observed(gpu_node, mac)) if isinstance(action, StartRankGroup)
        ]

    (start,) = starts("auto")
    assert [(node_name, launch.backend, launch.world_size) for node_name, launch in start.launches] == [
        (linux, "ring", 2),
        ("m", "ring", 2),
    ]
    assert starts("nccl") == []
