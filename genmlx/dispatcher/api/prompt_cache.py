"""The prompt cache as rank 0 counts it, tier by tier: ``GET /api/v1/prompt-cache`` (token needed),
which the agent reads for its report, and the ``genmlx:prompt_cache_*`` families of ``/metrics``."""

from __future__ import annotations

from dataclasses import dataclass

from genmlx.core.http import ApiHandler, ClusterAuth
from genmlx.dispatcher.engine.disk_tier import TierStats
from genmlx.dispatcher.engine.prefix_cache import PromptCacheStats
from genmlx.wire.agent_state import PromptCacheTier


@dataclass(frozen=True)
class PromptCacheView:
    """Rank 0's counts (``stats``) and its disk tier's (``disk``; None without one), read live."""

    stats: PromptCacheStats
    disk: TierStats | None = None

    def tiers(self) -> tuple[PromptCacheTier, ...]:
        counts = self.stats
        memory = PromptCacheTier(
            "memory",
            counts.memory_entries,
            counts.memory_bytes,
            counts.lookups,
            counts.memory_hits,
            counts.memory_hit_tokens,
        )
        if self.disk is None:
            return (memory,)
        disk = PromptCacheTier(
            "disk",
            self.disk.entries,
            self.disk.bytes,
            counts.lookups,
            counts.disk_hits,
            counts.disk_hit_tokens,
            counts.disk_kind,
        )
        return memory, disk


class PromptCacheHandler(ApiHandler):
    """``GET /api/v1/prompt-cache``: ``{"tiers": [PromptCacheTier, ...]}``."""

    def initialize(self, auth: ClusterAuth | None, prompt_cache: PromptCacheView) -> None:
        super().initialize(auth)
        self.prompt_cache = prompt_cache

    def get(self) -> None:
        self.finish({"tiers": [tier.to_json() for tier in self.prompt_cache.tiers()]})
