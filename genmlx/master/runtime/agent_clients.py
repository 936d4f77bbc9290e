"""The master's clients of its agents, one per agent it has found, kept across passes: each
remembers which token its agent took last and which of its addresses answered last."""

from __future__ import annotations

from collections.abc import Mapping

from tornado.httpclient import AsyncHTTPClient

from genmlx.core.signing import Keys
from genmlx.core.tokens import TokenSource
from genmlx.manifest.types import Manifest
from genmlx.master.planning.observed import Observed
from genmlx.master.runtime.agent_client import AgentClient
from genmlx.master.runtime.discovery import DiscoveredAgent
from genmlx.master.runtime.observe import agent_addresses


class AgentClients:
    def __init__(self, tokens: TokenSource, http: AsyncHTTPClient):
        self._tokens = tokens
        self._http = http
        self._by_address: dict[str, AgentClient] = {}  # by the address first announced or declared

    def candidates(
        self, manifest: Manifest, announced: Mapping[str, tuple[DiscoveredAgent, ...]]
    ) -> dict[str, list[AgentClient]]:
        """For each node, a client for every place its agent may be (declared address, else
        whatever announces its name): the pass finds out which of them proves itself."""
        return {
            node.name: [self._client(*addresses) for addresses in agent_addresses(node, announced)]
            for node in manifest.nodes
        }

    def proven(self, observed: Observed) -> dict[str, AgentClient]:
        """The client of each node whose agent answered the pass with the cluster's signature:
        the only ones actions go to."""
        answered = {client.address: client for client in self._by_address.values()}
        return {
            name: answered.get(node.address) or self._client(node.address)
            for name, node in observed.nodes.items()
            if node.reachability == "ready"
        }

    def keys_for_host(self, host: str) -> Keys:
        """The keys to sign a request to a rank on ``host`` with: the token its node's agent took
        last first (a rank follows its agent's token file)."""
        for client in self._by_address.values():
            if client.address.rsplit(":", 1)[0] == host:
                return client.keys()
        return self._tokens.keys()

    def _client(self, *addresses: str) -> AgentClient:
        """The client of the agent announced at ``addresses``, the preferred first: one that talks
        to it at one of them already keeps that address (an announcement that gained or lost an
        address does not move the master off one that works)."""
        client = next((c for c in self._by_address.values() if c.address in addresses), None)
        if client is None:
            client = self._by_address.get(addresses[0])
            if client is None:
                client = self._by_address[addresses[0]] = AgentClient(addresses[0], self._tokens, self._http)
            client.address = addresses[0]
        client.alternates = addresses
        return client
