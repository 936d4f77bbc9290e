"""Real agents for the store and sync tests: ``python -m genmlx agent`` on loopback, driven over
real HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

from conftest import free_port, http_status, signed, wait_until

from genmlx.wire.agent_state import AgentState, FetchRequest, Transfer


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def error_type(self) -> str:
        return self.json()["error"]["type"]


def call(
    method: str, url: str, token: str | None, body: Any = None, headers: dict[str, str] | None = None
) -> Reply:
    """One real HTTP request; a JSON-able ``body`` is sent as JSON."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    for name, value in (signed(token, method, url, data) if token is not None else {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return Reply(response.status, response.headers, response.read())
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.headers, e.read())


@dataclass
class Agent:
    name: str
    port: int
    storage: tuple[Path, ...]
    token: str
    proc: Any  # conftest.Proc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Reply:
        return call(method, self.url + path, self.token, body, headers)

    def state(self) -> AgentState:
        reply = self.call("GET", "/api/v1/state")
        assert reply.status == 200, reply.body
        return AgentState.from_json(reply.json())

    def fetch(self, request: FetchRequest) -> Reply:
        return self.call("POST", "/api/v1/models", request.to_json())

    def transfer(self, model: str) -> Transfer | None:
        found = [t for t in self.state().transfers if t.model == model]
        return found[0] if found else None

    def wait_transfer(self, model: str, timeout: float = 60) -> Transfer:
        """The transfer of ``model`` once it is no longer running."""
        return wait_until(
            lambda: (t := self.transfer(model)) and t.state != "running" and t,
            timeout=timeout,
            interval=0.05,
            what=f"the transfer of {model} on {self.name} to end",
        )


def start_agent(spawn, token: str, name: str, storage: tuple[Path, ...], port: int | None = None) -> Agent:
    """An agent on loopback with these storage paths (discovery off: these tests need no network)."""
    port = port or free_port()
    args = ["-m", "genmlx", "agent", "--name", name, "--port", str(port), "--host", "127.0.0.1"]
    for path in storage:
        args += ["--storage", str(path)]
    proc = spawn(args, name, env={"GENMLX_DISCOVERY": "off"})
    url = f"http://127.0.0.1:{port}/healthz"
    wait_until(lambda: http_status(url) == 200, timeout=30, interval=0.05, what=f"agent {name} to answer")
    return Agent(name, port, storage, token, proc)
