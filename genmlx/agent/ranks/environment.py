"""A rank's environment: the agent's own, less what must not reach a rank (Hugging Face
credentials, the MLX and NCCL settings of another group), plus the cluster token and what its
group's MLX backend reads, set exactly as ``mlx.launch`` sets it."""

from __future__ import annotations

import os
from pathlib import Path

from genmlx.core.tokens import TOKEN_FILE_ENV, TokenSource
from genmlx.wire.rank_launch import RankLaunch

# What MLX's distributed backends read from a rank's environment: never inherited from the agent's.
MLX_GROUP_ENV = (
    "MLX_RANK",
    "MLX_HOSTFILE",
    "MLX_IBV_DEVICES",
    "MLX_JACCL_COORDINATOR",
    "MLX_JACCL_RING",
    "JACCL_RANK",
    "JACCL_IBV_DEVICES",
    "JACCL_COORDINATOR",
    "JACCL_RING",
    "NCCL_HOST_IP",
    "NCCL_PORT",
    "MLX_WORLD_SIZE",
)


def rank_environment(
    token: str | TokenSource, launch: RankLaunch, hostfile: Path | None, devices: Path | None = None
) -> dict[str, str]:
    """The agent's environment plus the token (and the token file, which the rank follows through
    a rotation) and, for a multi-rank group, what its MLX backend reads (``mlx_environment``).
    Hugging Face credentials stay with the agent: a rank loads local files only."""
    dropped = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", TOKEN_FILE_ENV, *MLX_GROUP_ENV)
    env = {key: value for key, value in os.environ.items() if key not in dropped}
    source = token if isinstance(token, TokenSource) else TokenSource.fixed(token)
    env.update(GENMLX_API_TOKEN=source.token, PYTHONUNBUFFERED="1")
    if source.path is not None:
        env[TOKEN_FILE_ENV] = str(source.path)
    env.update(mlx_environment(launch, hostfile, devices))
    return env


def mlx_environment(launch: RankLaunch, hostfile: Path | None, devices: Path | None) -> dict[str, str]:
    """What MLX's backend of a multi-rank group reads, as ``mlx.launch`` sets it: the rank and the
    ring's hostfile; for jaccl the file of the RDMA device matrix, rank 0's coordinator address and,
    around a ring of RDMA links, ``MLX_JACCL_RING``; for nccl rank 0's address and port, the world
    size and the GPU (the first, as ``mlx.launch`` gives one rank per host). Nothing for a rank
    alone."""
    if launch.backend == "ring":
        return {} if hostfile is None else {"MLX_RANK": str(launch.rank), "MLX_HOSTFILE": str(hostfile)}
    if launch.backend == "nccl":
        host, _, port = (launch.coordinator or "").rpartition(":")
        return {
            "MLX_RANK": str(launch.rank),
            "NCCL_HOST_IP": host.strip("[]"),
            "NCCL_PORT": port,
            "MLX_WORLD_SIZE": str(launch.world_size),
            "CUDA_VISIBLE_DEVICES": "0",
        }
    env = {
        "MLX_RANK": str(launch.rank),
        "MLX_IBV_DEVICES": str(devices),
        "MLX_JACCL_COORDINATOR": launch.coordinator or "",
    }
    if launch.backend == "jaccl-ring":
        env["MLX_JACCL_RING"] = "1"
    return env
