"""GenMLX: a declarative, GitOps-style cluster reconciler for serving LLMs with MLX.

Layers, each importing only those below it (``pyproject.toml``'s import-linter contracts hold this):

    cli                               the ``genmlx`` command and what only a terminal needs
    master | agent | dispatcher | demo   the three processes, independent of each other; demo models
    manifest                          cluster.yaml → frozen dataclasses
    wire                              typed documents that cross processes
    core                              errors, HTTP base, tokens and signed requests, paths, mdns
"""

from __future__ import annotations

__version__ = "0.1.0"
