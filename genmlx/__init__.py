"""GenMLX: a declarative, GitOps-style cluster reconciler for serving LLMs with MLX.

Subpackages: ``manifest`` (cluster.yaml → frozen dataclasses), ``reconciler`` (the master),
``agent`` (one daemon per node) and ``dispatcher`` (one process per model rank). The three
process packages share only the modules at this level, never each other's internals.
"""

from __future__ import annotations

__version__ = "0.1.0"
