"""The prompt caches' disk tiers on this node: one directory per model under
``GENMLX_HOME/kv-cache`` (the dispatchers write them; see ``genmlx.dispatcher.engine.disk_tier``),
measured for the agent's report and emptied on request.

A model name is checked against the wire's rule before it becomes a path, so a request can never
reach outside the directory. Emptying it under a running dispatcher is safe: a block it still
lists and cannot open is a miss, and it forgets it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from genmlx.agent.store.metadata import safe_model_name
from genmlx.core.home import genmlx_home
from genmlx.wire.agent_state import PromptCacheReport

BLOCK_SUFFIX = ".safetensors"


def prompt_cache_root() -> Path:
    return genmlx_home() / "kv-cache"


def scan_prompt_caches(root: Path) -> tuple[PromptCacheReport, ...]:
    """Every model's disk tier under ``root``: its bytes and block files. Blocking: run it in an
    executor."""
    try:
        models = sorted(entry for entry in os.scandir(root) if entry.is_dir())
    except OSError:
        return ()
    return tuple(measure(Path(entry.path)) for entry in models)


def measure(model_dir: Path) -> PromptCacheReport:
    total = blocks = 0
    for path in model_dir.glob(f"*/*/*{BLOCK_SUFFIX}"):
        try:
            total += path.stat().st_size
        except OSError:  # evicted while we looked
            continue
        blocks += 1
    return PromptCacheReport(model_dir.name, total, blocks)


def clear_prompt_cache(root: Path, model: str) -> PromptCacheReport:
    """Delete ``model``'s disk tier under ``root``; what it held."""
    safe_model_name(model)
    directory = root / model
    held = measure(directory)
    shutil.rmtree(directory, ignore_errors=True)
    return held
