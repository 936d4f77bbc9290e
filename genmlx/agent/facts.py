"""What a node is: the facts the master places models by (memory above all)."""

from __future__ import annotations

import platform
import socket

import psutil

from genmlx.node_state import NodeFacts


def collect_node_facts() -> NodeFacts:
    """Hostname, OS, architecture, CPU count and memory of this machine, read now."""
    memory = psutil.virtual_memory()
    return NodeFacts(
        hostname=socket.gethostname(),
        os=f"{platform.system()} {platform.release()}",
        arch=platform.machine(),
        cpu_count=psutil.cpu_count(logical=True) or 1,
        memory_total=memory.total,
        memory_available=memory.available,
    )
