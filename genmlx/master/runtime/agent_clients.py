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
        # By the addresses of the announcement (or the declared address) each is for: each its
        # own client, so that what else announces a node's name never changes how its agent's
        # client fails over.
        self._clients: dict[tuple[str, ...], AgentClient] = {}

    def candidates(
        self, manifest: Manifest, announced: Mapping[str, tuple[DiscoveredAgent, ...]]
    ) -> dict[str, list[AgentClient]]:
        """For each node, a client for every place its agent may be (declared address, else
        whatever announces its name): the pass finds out which of them proves itself. Clients of
        announcements gone since the last pass are dropped."""
        wanted = {node.name: agent_addresses(node, announced) for node in manifest.nodes}
        clients = {
            addresses: self._clients.get(addresses) or self._new_client(addresses)
            for found in wanted.values()
            for addresses in found
        }
        self._clients = clients
        return {name: [clients[addresses] for addresses in found] for name, found in wanted.items()}

    def proven(self, observed: Observed) -> dict[str, AgentClient]:
        """The client of each node whose agent answered the pass with the cluster's signature:
        the only ones actions go to."""
        answered = {client.address: client for client in self._clients.values()}
        return {
            name: answered.get(node.address) or self._new_client((node.address,))
            for name, node in observed.nodes.items()
            if node.reachability == "ready"
        }

    def keys_for_host(self, host: str) -> Keys:
        """The keys to sign a request to a rank on ``host`` with: the token its node's agent took
        last first (a rank follows its agent's token file)."""
        for client in self._clients.values():
            if client.address.rsplit(":", 1)[0] == host:
                return client.keys()
        return self._tokens.keys()

    def _new_client(self, addresses: tuple[str, ...]) -> AgentClient:
        """A client of the agent announced at ``addresses``, the preferred first. Where a client
        already talks to an agent at one of them (its announcement gained or lost an address),
        the new one goes on there, with the key that agent took last."""
        client = AgentClient(addresses[0], self._tokens, self._http, alternates=addresses)
        previous = next((c for c in self._clients.values() if c.address in addresses), None)
        if previous is not None:
            client.address, client.key_id = previous.address, previous.key_id
        return client
