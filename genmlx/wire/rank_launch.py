"""Starting one dispatcher rank, in the two forms it travels in.

``RankLaunch`` is what the master asks an agent for (``POST /api/v1/ranks``, JSON). The agent turns
it into a ``RankCommand``, the rank's command line (``python -m genmlx.dispatcher`` +
``to_argv(command)``), and the dispatcher parses that back with ``from_argv(RankCommand, ...)``: one
field list, one set of checks, on both sides. Serving settings ride along unchanged in both.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Literal

from genmlx.wire.argv import arg
from genmlx.wire.codec import WireError, WireType, bounded
from genmlx.wire.serving import ServingSettings

# A model's name becomes part of a log file name and of URLs: keep it to one safe path segment.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MODEL_NAME_RULE = "must be 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit"
HOST_PORT = re.compile(r"[^\s:]+:\d{1,5}|\[[0-9A-Fa-f:.]+\]:\d{1,5}")
Parallelism = Literal["tensor", "pipeline"]
# MLX's distributed backend of a multi-rank group: its TCP ring, or RDMA over Thunderbolt (jaccl)
# between every pair of ranks, or around a ring of RDMA links (jaccl-ring: MLX_JACCL_RING), or
# NCCL between CUDA GPUs.
RankBackend = Literal["ring", "jaccl", "jaccl-ring", "nccl"]


# The exit status of a rank that could not join its group's backend (sysexits' EX_CONFIG): the
# agent reads it, with the rank's log, as "this backend is unavailable here", not as a crash.
BACKEND_JOIN_FAILED_EXIT = 78
# What a rank logs once it has joined its group: a failure after it is not the backend's.
JOINED_GROUP_MARK = "joined the distributed group"
# How an agent's refusal to start a jaccl rank begins (its checks before launch failed): the master
# reads it as a failed jaccl start, as it reads a rank's ``backend_failure``.
RDMA_NOT_READY = "RDMA not ready"


@dataclass(frozen=True)
class RankLaunch(WireType):
    """Everything an agent needs to start one dispatcher rank."""

    model: str = bounded(pattern=MODEL_NAME, rule=MODEL_NAME_RULE)  # the served id
    model_path: str = bounded(non_empty=True)  # absolute path inside one of the agent's storage paths
    rank: int = bounded(minimum=0)
    world_size: int = bounded(minimum=1)
    port: int = bounded(minimum=1, maximum=65535)  # rank 0's HTTP port (other ranks keep it for the record)
    spec_hash: str = bounded(non_empty=True)  # the master's fingerprint of the group's desired spec
    # "ip:port" per rank, for MLX's ring backend
    hostfile: tuple[str, ...] = bounded((), pattern=HOST_PORT, rule='must be "host:port"')
    serving: ServingSettings = field(default_factory=ServingSettings)
    parallelism: Parallelism = "tensor"  # how a group of ranks splits the model
    layer_split: tuple[int, ...] | None = bounded(None, minimum=1)  # pipeline only: layers per rank
    backend: RankBackend = "ring"
    rdma_devices: str | None = None  # jaccl: the device matrix (JSON) the file MLX_IBV_DEVICES names holds
    # jaccl and nccl: rank 0's "host:port" (MLX_JACCL_COORDINATOR, or NCCL_HOST_IP and NCCL_PORT)
    coordinator: str | None = bounded(None, pattern=HOST_PORT, rule='must be "host:port"')
    # The memory the rank's node has left beside its weights, the prefix cache and the batch's full
    # contexts (``master.planning.batching``); None where placement could not tell.
    spare_bytes: int | None = bounded(None, minimum=0)

    @property
    def key(self) -> str:
        return rank_key(self.model, self.rank)

    def check(self) -> None:
        """The rules between fields; ``WireError`` naming the field at fault."""
        if self.rank >= self.world_size:
            raise WireError("rank", f"{self.rank} is not below worldSize {self.world_size}")
        if self.layer_split is not None and len(self.layer_split) != self.world_size:
            raise WireError("layerSplit", f"{len(self.layer_split)} entries for worldSize {self.world_size}")
        if self.hostfile and len(self.hostfile) != self.world_size:
            raise WireError(
                "hostfile",
                f"{len(self.hostfile)} entries for worldSize {self.world_size}; give one per rank, or none",
            )
        if self.backend != "ring" and self.coordinator is None:
            raise WireError("coordinator", f"backend {self.backend} needs rank 0's host:port")
        if self.backend in ("jaccl", "jaccl-ring"):
            self.check_jaccl()

    def check_jaccl(self) -> None:
        try:
            matrix = json.loads(self.rdma_devices or "")
        except ValueError:
            raise WireError(
                "rdmaDevices", f"backend {self.backend} needs the RDMA device matrix as JSON"
            ) from None
        square = isinstance(matrix, list) and all(
            isinstance(row, list) and len(row) == self.world_size for row in matrix
        )
        if not square or len(matrix) != self.world_size:
            raise WireError("rdmaDevices", f"must be {self.world_size} rows of {self.world_size} devices")


@dataclass(frozen=True)
class RankCommand(WireType):
    """The command line of one dispatcher rank: the launch as the rank needs it, plus what only the
    process needs (where to listen, its parent, the hostfile the agent wrote, decoding knobs)."""

    model_dir: str = arg(flag="--model", help="model directory (config.json, safetensors, tokenizer)")
    model_id: str = arg(flag="--name", help="the model id clients send as `model`")
    port: int = arg(minimum=1, maximum=65535, help="HTTP port of the OpenAI API")
    host: str = arg("127.0.0.1", help="address to listen on")
    rank: int = arg(0, minimum=0, help="this process's rank in the group")
    world_size: int = arg(1, minimum=1, help="number of ranks in the group")
    serving: ServingSettings = field(default_factory=ServingSettings)
    # Tuning knobs an agent never sets: None leaves the decoder's own default.
    prefill_chunk: int | None = arg(
        None,
        minimum=1,
        help="prompt tokens read per step while others decode; a long prompt delays them one chunk (512)",
    )
    prefill_chunk_alone: int | None = arg(
        None,
        minimum=1,
        help="prompt tokens read per step while nothing else decodes (2048 on a GPU, else --prefill-chunk)",
    )
    dequantize_rows: int | None = arg(
        None,
        minimum=0,
        help="rows from which a quantized layer multiplies through its weight dequantized for the call; "
        "0 never (default: where measured faster at load on a CUDA GPU, never elsewhere)",
    )
    prefix_cache_entries: int | None = arg(
        None, minimum=0, help="finished sequences whose KV state later prompts may reuse; 0 turns it off (16)"
    )
    prefix_cache_gb: float | None = arg(None, minimum=0, help="memory the prefix cache may hold (4)")
    spare_gb: float | None = arg(
        None,
        minimum=0,
        help="memory left beside the weights, the prefix cache and the batch's KV cache, which copies "
        "of quantized weights dequantized once may fill where they were measured faster (none)",
    )
    disk_cache_dir: str | None = arg(
        None, help="directory of the prompt cache's disk tier (its size: serving's --disk-cache-gb)"
    )
    parent_pid: int | None = arg(None, help="exit when this process is gone")
    hostfile: str | None = arg(None, help="MLX ring hostfile of a multi-rank group")
    parallelism: Parallelism = arg("tensor", help="how a group of ranks splits the model")
    layer_split: tuple[int, ...] | None = arg(
        None, minimum=1, help="pipeline only: layers per rank, e.g. 20,12 (default: even)"
    )
    backend: RankBackend = arg(
        "ring",
        help="MLX's distributed backend (jaccl reads MLX_IBV_DEVICES and MLX_JACCL_COORDINATOR, nccl "
        "NCCL_HOST_IP and NCCL_PORT)",
    )

    def check(self) -> None:
        size = self.world_size
        if not 0 <= self.rank < size:
            raise WireError("", f"--rank must be in [0, {size - 1}] for --world-size {size}, got {self.rank}")
        if size > 1 and self.backend == "ring" and not self.hostfile:
            raise WireError("", f"--world-size {size} needs --hostfile (MLX's ring hostfile of the group)")
        if self.layer_split is not None and self.parallelism != "pipeline":
            raise WireError("", "--layer-split applies to --parallelism pipeline only")
        if self.layer_split is not None and len(self.layer_split) != size:
            raise WireError("", f"--layer-split needs {size} layer counts separated by commas")
        if self.serving.kv_bits not in (None, 4, 8):
            raise WireError("", f"--kv-bits must be 4 or 8, got {self.serving.kv_bits}")
        if self.serving.kv_group_size not in (None, 32, 64, 128):
            raise WireError("", f"--kv-group-size must be 32, 64 or 128, got {self.serving.kv_group_size}")


def rank_command(
    launch: RankLaunch,
    model_dir: str,
    host: str,
    parent_pid: int,
    hostfile: str | None,
    disk_cache_dir: str | None = None,
) -> RankCommand:
    """The command line the agent starts ``launch`` with, from the directory it resolved."""
    return RankCommand(
        model_dir=model_dir,
        model_id=launch.model,
        port=launch.port,
        host=host,
        rank=launch.rank,
        world_size=launch.world_size,
        serving=launch.serving,
        parent_pid=parent_pid,
        hostfile=hostfile,
        parallelism=launch.parallelism,
        layer_split=launch.layer_split,
        backend=launch.backend,
        disk_cache_dir=disk_cache_dir if launch.serving.disk_cache_gb else None,
        spare_gb=None if launch.spare_bytes is None else launch.spare_bytes / 2**30,
    )


def rank_key(model: str, rank: int) -> str:
    """The id of a rank on its agent, used in URLs: ``<model>.<rank>``."""
    return f"{model}.{rank}"
