"""Emptying a model's prompt cache on the disks of its nodes (``genmlx cache clear``)."""

from __future__ import annotations

from collections.abc import Mapping

from genmlx.core.errors import GenMLXError, UnknownModel
from genmlx.manifest.types import Manifest
from genmlx.master.runtime.agent_client import AgentClient
from genmlx.master.runtime.execute import agent
from genmlx.wire.agent_state import PromptCacheReport


async def clear_model_prompt_cache(
    manifest: Manifest | None, clients: Mapping[str, AgentClient], model: str
) -> dict[str, PromptCacheReport | str]:
    """Ask every node ``model`` is placed on to empty its prompt cache; by node, what it held or
    why it could not. ``UnknownModel`` for a model the manifest does not declare."""
    spec = next((m for m in manifest.models if m.name == model), None) if manifest else None
    if spec is None:
        raise UnknownModel(f"no model {model!r} in the applied manifest", param="model")
    outcome: dict[str, PromptCacheReport | str] = {}
    for node in spec.nodes:
        try:
            outcome[node] = await agent(dict(clients), node).clear_prompt_cache(model)
        except GenMLXError as e:
            outcome[node] = str(e)
    return outcome
