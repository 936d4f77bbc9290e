"""An agent announces every address it has (Ethernet, Wi-Fi, a Thunderbolt cable); the master
keeps those on its own networks, and where the one it uses cannot be connected to, goes on at the
next: a real agent on loopback, real HTTP, signed both ways. A request that
reached an agent and got no answer is not sent again elsewhere."""

from __future__ import annotations

import asyncio
import socket

import pytest
from agent_harness import start_agent
from builders import declared_node, manifest
from conftest import free_port
from tornado.httpclient import AsyncHTTPClient
from zeroconf.asyncio import AsyncServiceInfo

from genmlx.core.errors import AgentUnreachable
from genmlx.core.mdns import API_VERSION, SERVICE_TYPE
from genmlx.core.tokens import TokenSource
from genmlx.master.runtime.agent_client import AgentClient
from genmlx.master.runtime.agent_clients import AgentClients
from genmlx.master.runtime.discovery import DiscoveredAgent, agent_from_service

pytestmark = pytest.mark.timeout(60)


def client(token: str, address: str, *alternates: str) -> AgentClient:
    return AgentClient(
        address, TokenSource.fixed(token), AsyncHTTPClient(force_instance=True), alternates=alternates
    )


def test_where_the_address_in_use_refuses_the_next_announced_one_answers_and_is_kept(spawn, tmp_path, token):
    agent = start_agent(spawn, token, "n2", (tmp_path / "models",))
    gone = f"127.0.0.1:{free_port()}"  # an interface that went down: nothing listens there
    at = client(token, gone, agent.address)

    async def twice():
        return await at.state(), at.address, await at.state(), at.address

    first, after_first, second, after_second = asyncio.run(twice())
    assert first.name == second.name == "n2"
    assert after_first == after_second == agent.address  # the next call starts where one answered

    nowhere = client(token, gone, f"127.0.0.1:{free_port()}")
    with pytest.raises(AgentUnreachable) as refused:
        asyncio.run(nowhere.state())
    assert str(refused.value).count("does not answer") == 2, refused.value  # every address, said
    assert nowhere.address == gone


def test_a_request_that_got_through_and_no_answer_is_not_sent_again_elsewhere(token):
    with socket.create_server(("127.0.0.1", 0)) as silent, socket.create_server(("127.0.0.1", 0)) as other:
        other.setblocking(False)
        at = client(token, *(f"127.0.0.1:{server.getsockname()[1]}" for server in (silent, other)))
        with pytest.raises(AgentUnreachable, match="does not answer: Timeout during request"):
            asyncio.run(at.state())  # connected (the kernel accepts), then nothing came back
        with pytest.raises(BlockingIOError):
            other.accept()  # nothing ever connected to the other address


def announcement(*addresses: str) -> AsyncServiceInfo:
    return AsyncServiceInfo(
        SERVICE_TYPE,
        f"n2.{SERVICE_TYPE}",
        port=6790,
        properties={"api": API_VERSION, "name": "n2", "id": "node-id", "version": "0"},
        parsed_addresses=list(addresses),
    )


def test_discovery_keeps_the_addresses_on_this_machines_networks_and_no_other():
    # Loopback is the one network of these that this machine is on.
    agent = agent_from_service(announcement("203.0.113.7", "127.0.0.1", "198.51.100.2", "127.0.0.2"), "n2")
    assert agent is not None and agent.name == "n2"
    assert (agent.address, agent.alternates) == ("127.0.0.1:6790", ("127.0.0.2:6790",))
    # None on its networks: the first announced, as before (a master reached through a router).
    elsewhere = agent_from_service(announcement("203.0.113.7", "198.51.100.2"), "n2")
    assert elsewhere is not None
    assert (elsewhere.address, elsewhere.alternates) == ("203.0.113.7:6790", ())


def test_each_announcement_has_a_client_of_its_own_that_follows_its_agent_across_changes(token):
    clients = AgentClients(TokenSource.fixed(token), AsyncHTTPClient(force_instance=True))
    declared = manifest(nodes=(declared_node("n2"),))  # no address: whatever announces the name

    def agent(*addresses: str) -> DiscoveredAgent:
        return DiscoveredAgent("n2", addresses[0], "node-id", "0", 0.0, alternates=addresses[1:])

    real, rogue = agent("10.0.0.2:6790", "192.168.200.2:6790"), agent("10.0.0.2:6790", "10.0.0.66:6790")
    found = {
        client.alternates: client for client in clients.candidates(declared, {"n2": (real, rogue)})["n2"]
    }
    assert set(found) == {real.addresses, rogue.addresses}
    at_real = found[real.addresses]  # what else announces the name has a client of its own
    at_real.address = "192.168.200.2:6790"  # as after a failed connect to 10.0.0.2
    (again,) = clients.candidates(declared, {"n2": (real,)})["n2"]
    assert again is at_real
    # The announcement gains an address: a new client, still at the address that answered.
    (grown,) = clients.candidates(declared, {"n2": (agent(*real.addresses, "10.1.0.2:6790"),)})["n2"]
    assert grown is not at_real and grown.address == "192.168.200.2:6790"
