"""`genmlx mesh apply`: the networksetup changes planned for one Mac (pure, table-driven, from the
recorded Mac Studio of tests/data/macos), and the real command run as a subprocess against a fake
networksetup (put in place through ``GENMLX_NETWORKSETUP``) and a stand-in master that serves a
status document built with the project's own types, behind the master's own signed-request base.

The fake is a faithful one: a script holding a state of hardware ports and services (seeded from
the recordings, which it prints back byte for byte), answering networksetup's reads in their
formats and applying its changes, and logging every call it gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import shlex
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from conftest import free_port
from tornado.httpserver import HTTPServer
from tornado.web import Application

import genmlx.agent.facts.macos as macos
from genmlx.agent.facts.macos import HardwarePort
from genmlx.cli.mesh_apply import MeshApplyRefused, change_argv, choose_node, format_setup
from genmlx.cli.networksetup import (
    Change,
    MacNetwork,
    NetworkService,
    PortPlan,
    ServiceConfig,
    non_thunderbolt_targets,
    parse_service_info,
    parse_service_order,
    plan_port_setup,
    read_mac_network,
)
from genmlx.core.http import ApiHandler, ClusterAuth
from genmlx.manifest import load_manifest
from genmlx.wire.agent_state import NetworkInterface, NodeFacts
from genmlx.wire.status import ClusterStatus, ConditionReport, NodeStatus

RECORDINGS = Path(__file__).parent / "data" / "macos"
MASK = "255.255.255.252"
# The recorded Mac Studio's plan in a full mesh with studio-b (on its port 1) and mini-c (port 2).
TO_B = PortPlan("192.168.200.1", MASK, "192.168.200.0/30", "studio-b", "en2", True)
TO_C = PortPlan("192.168.200.5", MASK, "192.168.200.4/30", "mini-c", "en3", True)
SERVICE_TO_B = "GenMLX studio-b (Thunderbolt 1)"
SERVICE_TO_C = "GenMLX mini-c (Thunderbolt 2)"
FIRST_RUN = [
    ["-setnetworkserviceenabled", "Thunderbolt Bridge", "off"],
    ["-createnetworkservice", SERVICE_TO_B, "Thunderbolt 1"],
    ["-setmanual", SERVICE_TO_B, "192.168.200.1", MASK],
    ["-createnetworkservice", SERVICE_TO_C, "Thunderbolt 2"],
    ["-setmanual", SERVICE_TO_C, "192.168.200.5", MASK],
]


def recorded(name: str) -> str:
    return (RECORDINGS / name).read_text()


def info_file(service: str) -> str:
    return f"networksetup-getinfo-{service.replace(' ', '_').replace('/', '-')}.txt"


def recorded_answer(argv: list[str]) -> str:
    """networksetup's answers on the recorded Mac, before GenMLX changed anything."""
    if argv[1] == "-getinfo":
        return recorded(info_file(argv[2]))
    return recorded(f"networksetup{argv[1]}.txt")


RECORDED = read_mac_network(recorded_answer, "/usr/sbin/networksetup")


# ----------------------------------------------------------------------------------------------
# Reading networksetup


def test_the_recorded_services_read_as_networksetup_lists_them():
    assert [(s.name, s.port, s.device, s.enabled) for s in RECORDED.services] == [
        ("Ethernet", "Ethernet", "en0", True),
        ("Wi-Fi", "Wi-Fi", "en1", True),
        ("Thunderbolt Bridge", "Thunderbolt Bridge", "bridge0", True),
        ("USB 10/100/1000 LAN", "USB 10/100/1000 LAN", "en8", False),
    ]
    assert [s.config for s in RECORDED.services] == [
        ServiceConfig("DHCP", "192.168.1.20", "255.255.255.0"),
        ServiceConfig("DHCP"),
        ServiceConfig("DHCP"),
        ServiceConfig("DHCP"),
    ]
    assert RECORDED.port_of("en3") == HardwarePort("Thunderbolt 2", "en3")


def test_a_disabled_service_is_known_by_its_asterisk_wherever_it_stands():
    text = (
        "An asterisk (*) denotes that a network service is disabled.\n"
        "(1) Wi-Fi\n(Hardware Port: Wi-Fi, Device: en0)\n\n"
        "(*) Bluetooth PAN\n(Hardware Port: Bluetooth PAN, Device: en5)\n\n"
        "*(3) iPhone USB\n(Hardware Port: iPhone USB, Device: en6)\n\n"
        "(4) Ethernet Adapter (en7)\n(Hardware Port: USB 10/100/1000 LAN, Device: en7)\n\n"
        "(5) Tailscale\n(Hardware Port: io.tailscale.ipn.macos, Device: )\n\n"
    )
    assert [(s.name, s.port, s.device, s.enabled) for s in parse_service_order(text)] == [
        ("Wi-Fi", "Wi-Fi", "en0", True),
        ("Bluetooth PAN", "Bluetooth PAN", "en5", False),
        ("iPhone USB", "iPhone USB", "en6", False),
        ("Ethernet Adapter (en7)", "USB 10/100/1000 LAN", "en7", True),
        ("Tailscale", "io.tailscale.ipn.macos", "", True),
    ]


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "Manual Configuration\nIP address: 192.168.200.1\nSubnet mask: 255.255.255.252\n"
            "Router: (null)\nIPv6: Automatic\nIPv6 IP address: none\nIPv6 Router: none\n",
            ServiceConfig("Manual", "192.168.200.1", MASK),
        ),
        ("DHCP Configuration\nIP address: none\nSubnet mask: none\nRouter: none\n", ServiceConfig("DHCP")),
        (
            "Foo is not a recognized network service.\n** Error: The parameters were not valid.\n",
            ServiceConfig(),
        ),
    ],
)
def test_getinfo_gives_the_method_address_and_mask(text, expected):
    assert parse_service_info(text) == expected


# ----------------------------------------------------------------------------------------------
# Planning the changes (pure)


def port_service(name: str, port: str, config: ServiceConfig, enabled: bool = True) -> NetworkService:
    """A service on one of the recorded Mac's hardware ports."""
    device = next(p.device for p in RECORDED.ports if p.name == port)
    return NetworkService(name, port, device, enabled, config)


def with_services(network: MacNetwork, *added: NetworkService) -> MacNetwork:
    return replace(network, services=(*network.services, *added))


def changed(network: MacNetwork, which: str, /, **fields) -> MacNetwork:
    """``network`` with the service named ``which`` changed as ``fields`` say."""
    services = tuple(replace(s, **fields) if s.name == which else s for s in network.services)
    return replace(network, services=services)


MANUAL_B = ServiceConfig("Manual", "192.168.200.1", MASK)
MANUAL_C = ServiceConfig("Manual", "192.168.200.5", MASK)
CONFIGURED = with_services(
    changed(RECORDED, "Thunderbolt Bridge", enabled=False),
    port_service(SERVICE_TO_B, "Thunderbolt 1", MANUAL_B),
    port_service(SERVICE_TO_C, "Thunderbolt 2", MANUAL_C),
)


@pytest.mark.parametrize(
    "network, expected",
    [
        pytest.param(RECORDED, FIRST_RUN, id="bridge off, a service per port, its address"),
        pytest.param(CONFIGURED, [], id="a second pass plans nothing"),
        pytest.param(
            with_services(
                RECORDED, port_service("TB2", "Thunderbolt 2", ServiceConfig("DHCP"), enabled=False)
            ),
            [
                *FIRST_RUN[:3],
                ["-setnetworkserviceenabled", "TB2", "on"],
                ["-setmanual", "TB2", "192.168.200.5", MASK],
            ],
            id="a disabled service is enabled and kept",
        ),
        pytest.param(
            changed(CONFIGURED, SERVICE_TO_B, config=replace(MANUAL_B, mask="255.255.255.0")),
            [["-setmanual", SERVICE_TO_B, "192.168.200.1", MASK]],
            id="a wrong mask is set again",
        ),
        pytest.param(
            with_services(RECORDED, port_service("Old", "Thunderbolt 1", MANUAL_C)),
            [FIRST_RUN[0], ["-setmanual", "Old", "192.168.200.1", MASK], *FIRST_RUN[3:]],
            id="an old address on a port being re-addressed is no clash",
        ),
    ],
)
def test_only_what_differs_is_changed(network, expected):
    plan = plan_port_setup("studio-a", (TO_B, TO_C), network)
    assert [list(c.args) for c in plan.changes] == expected
    assert plan.left_alone == ()
    assert non_thunderbolt_targets(plan.changes, network) == []


@pytest.mark.parametrize(
    "network, end, state, reason",
    [
        (
            changed(RECORDED, "Ethernet", config=ServiceConfig("Manual", "192.168.200.2", MASK)),
            TO_B,
            "refused",
            'service "Ethernet" (Ethernet, en0) already has 192.168.200.2/255.255.255.252, in the subnet '
            "192.168.200.0/30 planned for en2: change that service (GenMLX will not)",
        ),
        (
            changed(RECORDED, "Ethernet", name=SERVICE_TO_B),
            TO_B,
            "refused",
            f"Thunderbolt 1 has no service, and the name for one, '{SERVICE_TO_B}', is service "
            f'"{SERVICE_TO_B}" (Ethernet, en0)',
        ),
        (
            RECORDED,
            replace(TO_B, interface="en0"),
            "refused",
            "en0 is hardware port 'Ethernet': GenMLX changes only",
        ),
        (RECORDED, replace(TO_B, interface="en42"), "refused", "en42 is no hardware port of this Mac"),
        (RECORDED, replace(TO_B, interface=None, cabled=None), "skipped", "no node facts show which port"),
        (
            RECORDED,
            replace(TO_B, interface=None, cabled=False),
            "skipped",
            "the node facts show no Thunderbolt cable",
        ),
    ],
)
def test_a_cable_that_cannot_be_set_safely_is_left_alone_and_says_why(network, end, state, reason):
    plan = plan_port_setup("studio-a", (end, TO_C), network)
    left = plan.ends[0]
    assert (left.state, left.changes) == (state, ())
    assert reason in left.detail
    # The other cable goes ahead, and no command names a service that is not Thunderbolt.
    assert [list(c.args) for c in plan.changes] == [FIRST_RUN[0], *FIRST_RUN[3:]]
    assert non_thunderbolt_targets(plan.changes, network) == []


def test_with_no_cable_to_set_the_bridge_is_left_as_it_is():
    unknown = replace(TO_B, interface=None, cabled=None)
    plan = plan_port_setup("studio-a", (unknown,), RECORDED)
    assert (plan.changes, [o.state for o in plan.ends]) == ((), ["skipped"])


def test_the_last_check_names_every_command_aimed_at_a_service_that_is_not_thunderbolt():
    changes = [
        Change(("-setmanual", "Ethernet", "192.168.200.1", MASK), "a planner bug"),
        Change(("-createnetworkservice", "GenMLX x (Thunderbolt 3)", "Thunderbolt 3"), "fine"),
        Change(("-setmanual", "GenMLX x (Thunderbolt 3)", "192.168.200.9", MASK), "fine"),
        Change(("-createnetworkservice", "Wi-Fi", "Thunderbolt 4"), "named like the Wi-Fi service"),
        Change(("-setnetworkserviceenabled", "Thunderbolt Bridge", "off"), "fine"),
    ]
    assert non_thunderbolt_targets(changes, RECORDED) == ["Ethernet", "Wi-Fi"]


def test_commands_show_as_the_shell_takes_them_behind_sudo_where_not_root():
    plan = plan_port_setup("studio-a", (TO_B,), RECORDED)
    assert change_argv(plan.changes[2], "/usr/sbin/networksetup", as_root=False) == [
        "sudo",
        "/usr/sbin/networksetup",
        "-setmanual",
        SERVICE_TO_B,
        "192.168.200.1",
        MASK,
    ]
    text = format_setup(plan, "from the master at http://m:6789", "/usr/sbin/networksetup", as_root=False)
    assert "192.168.200.1/30 to studio-b on en2: to change: new service" in text
    assert "3 changes (networksetup, with sudo):" in text
    assert (
        "  sudo /usr/sbin/networksetup -setnetworkserviceenabled 'Thunderbolt Bridge' off"
        "   # a bridged port has no address of its own"
    ) in text
    assert f"sudo /usr/sbin/networksetup -setmanual '{SERVICE_TO_B}' 192.168.200.1 {MASK}" in text


# ----------------------------------------------------------------------------------------------
# Which node this Mac is


READY = ConditionReport("Ready", "True", "Ready", "")
GIB = 1 << 30


def node_facts(hostname: str, *interfaces: NetworkInterface) -> NodeFacts:
    return NodeFacts(
        hostname=hostname, os="Darwin 24.1.0", arch="arm64", cpu_count=24, memory_total=192 * GIB,
        memory_available=160 * GIB, interfaces=interfaces,
    )  # fmt: skip


def manifest_file(folder: Path, nodes: list[str], master_port: int = 6789) -> Path:
    entries = "".join(
        f"    - name: {n}\n      storage: [{{path: /tmp/genmlx-mesh-apply/{n}}}]\n" for n in nodes
    )
    path = folder / "cluster.yaml"
    path.write_text(
        "apiVersion: genmlx/v1\nkind: Cluster\nmetadata: {name: desk}\nspec:\n"
        f"  master: {{node: {nodes[0]}, port: {master_port}}}\n  nodes:\n{entries}"
    )
    return path


def reporting(*hosts: tuple[str, str]) -> ClusterStatus:
    """A status whose nodes' agents report these (node, host name) pairs."""
    nodes = tuple(NodeStatus(node, (READY,), facts=node_facts(host)) for node, host in hosts)
    return ClusterStatus(1, 1, (READY,), name="desk", nodes=nodes)


def test_this_mac_is_the_node_whose_agent_reports_its_host_name_else_the_one_named_like_it(tmp_path):
    manifest = load_manifest(manifest_file(tmp_path, ["a", "studio-b", "c"]))
    assert choose_node(manifest, None, "c", "anything") == "c"
    assert choose_node(manifest, reporting(("a", "Studio-A.local")), None, "studio-a.lan") == "a"
    assert choose_node(manifest, None, None, "Studio-B.local") == "studio-b"
    with pytest.raises(
        MeshApplyRefused, match=r"--node d: the manifest declares no such node \(a, studio-b, c\)"
    ):
        choose_node(manifest, None, "d", "anything")
    with pytest.raises(MeshApplyRefused, match="nodes a, c all report this machine's host name 'box'"):
        choose_node(manifest, reporting(("a", "box"), ("c", "box.local")), None, "box")
    with pytest.raises(MeshApplyRefused, match="or is named 'elsewhere': pass --node NAME"):
        choose_node(manifest, None, None, "elsewhere.local")


# ----------------------------------------------------------------------------------------------
# `genmlx mesh apply`, as a subprocess, against the fake networksetup and a stand-in master

# Thunderbolt domains of the recorded Mac's ports 1 and 2 and of the computers cabled to them.
STUDIO_A_PORT_1 = "A9C3E7F2-4B18-4D6A-9F05-83E2D1B6C47A"
STUDIO_B_PORT = "2D6F8B41-C03E-4957-A1B8-E7940D5C263F"
STUDIO_A_PORT_2 = "E5A18D3C-72F0-4B96-8D1E-4F3B20C6A978"
MINI_C_PORT = "73B0F9C2-5D16-4A8E-B3F7-2C94E60D1A5B"
FAKE_NETWORKSETUP = r"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
STATE = HERE / "state.json"
DISABLED_NOTE = "An asterisk (*) denotes that a network service is disabled."
IPV6 = ["IPv6: Automatic", "IPv6 IP address: none", "IPv6 Router: none"]


def hardware_ports(state, args):
    blocks = [
        f"Hardware Port: {p['name']}\nDevice: {p['device']}\nEthernet Address: {p['mac']}\n"
        for p in state["ports"]
    ]
    return "\n" + "\n".join(blocks) + "\nVLAN Configurations\n===================\n"


def service_order(state, args):
    lines = [DISABLED_NOTE]
    for number, s in enumerate(state["services"], 1):
        lines += [
            f"({number if s['enabled'] else '*'}) {s['name']}",
            f"(Hardware Port: {s['port']}, Device: {s['device']})",
            "",
        ]
    return "\n".join(lines) + "\n"


def all_services(state, args):
    return (
        "\n".join([DISABLED_NOTE, *(("" if s["enabled"] else "*") + s["name"] for s in state["services"])])
        + "\n"
    )


def info(state, args):
    s = service(state, args[0])
    lines = [f"{s['method']} Configuration"]
    if s["ip"]:
        lines += [
            f"IP address: {s['ip']}",
            f"Subnet mask: {s['mask']}",
            f"Router: {s['router'] or '(null)'}",
        ]
    lines += ["Client ID:"] if s["method"] == "DHCP" else []
    mac = next((p["mac"] for p in state["ports"] if p["name"] == s["port"]), None)
    hardware = {"Wi-Fi": "Wi-Fi ID", "Thunderbolt Bridge": None}.get(s["port"], "Ethernet Address")
    lines += IPV6 + ([f"{hardware}: {mac}"] if hardware and mac else [])
    return "\n".join(lines) + "\n"


def create(state, args):
    name, port = args
    if not any(p["name"] == port for p in state["ports"]):
        fail(f"{port} is not a valid hardware port.")
    if any(s["name"] == name for s in state["services"]):
        fail(f"{name} already exists.")
    device = next(p["device"] for p in state["ports"] if p["name"] == port)
    new = {
        "name": name,
        "port": port,
        "device": device,
        "enabled": True,
        "method": "DHCP",
        "ip": None,
        "mask": None,
        "router": None,
    }
    state["services"].append(new)


def manual(state, args):
    s = service(state, args[0])
    s.update(method="Manual", ip=args[1], mask=args[2], router=args[3] if len(args) > 3 else None)


def enabled(state, args):
    service(state, args[0])["enabled"] = args[1] == "on"


def service(state, name):
    found = next((s for s in state["services"] if s["name"] == name), None)
    if found is None:
        fail(f"{name} is not a recognized network service.")
    return found


def fail(message):
    print(f"{message}\n** Error: The parameters were not valid.")
    sys.exit(4)


READS = {
    "-listallhardwareports": hardware_ports,
    "-listnetworkserviceorder": service_order,
    "-listallnetworkservices": all_services,
    "-getinfo": info,
}
CHANGES = {"-createnetworkservice": create, "-setmanual": manual, "-setnetworkserviceenabled": enabled}


def main(argv):
    with open(HERE / "calls.log", "a") as log:
        log.write(json.dumps(argv) + "\n")
    state = json.loads(STATE.read_text())
    command, args = argv[0], argv[1:]
    for prefix, message in state.get("failures", []):
        if argv[: len(prefix)] == prefix:
            print(message, file=sys.stderr)
            sys.exit(4)
    if command in READS:
        sys.stdout.write(READS[command](state, args))
    elif command in CHANGES:
        CHANGES[command](state, args)
        STATE.write_text(json.dumps(state, indent=1))
    else:
        fail(f"{command}: not a command this fake knows")


main(sys.argv[1:])
"""
# What the recorded Mac's services hold, in the fake's state: tests/data/macos prints them.
SEED_SERVICES = [
    {"name": "Ethernet", "port": "Ethernet", "device": "en0", "enabled": True, "method": "DHCP",
     "ip": "192.168.1.20", "mask": "255.255.255.0", "router": "192.168.1.1"},
    {"name": "Wi-Fi", "port": "Wi-Fi", "device": "en1", "enabled": True, "method": "DHCP",
     "ip": None, "mask": None, "router": None},
    {"name": "Thunderbolt Bridge", "port": "Thunderbolt Bridge", "device": "bridge0", "enabled": True,
     "method": "DHCP", "ip": None, "mask": None, "router": None},
    {"name": "USB 10/100/1000 LAN", "port": "USB 10/100/1000 LAN", "device": "en8", "enabled": False,
     "method": "DHCP", "ip": None, "mask": None, "router": None},
]  # fmt: skip
READS = ("-listallhardwareports", "-listnetworkserviceorder", "-listallnetworkservices", "-getinfo")


def recorded_ports() -> list[dict]:
    """The hardware ports of the recorded Mac, with their Ethernet addresses, as the fake holds them."""
    blocks = recorded("networksetup-listallhardwareports.txt").strip().split("\n\n")
    fields = [
        dict(line.split(": ", 1) for line in b.splitlines()) for b in blocks if b.startswith("Hardware")
    ]
    return [{"name": f["Hardware Port"], "device": f["Device"], "mac": f["Ethernet Address"]} for f in fields]


class FakeNetworksetup:
    """The fake's executable, its state and its call log, in ``folder``."""

    def __init__(self, folder: Path, services: list[dict], failures: list = ()):
        folder.mkdir()
        self.path = folder / "networksetup"
        self.path.write_text(f"#!{sys.executable}\n{FAKE_NETWORKSETUP}")
        self.path.chmod(0o755)
        self.state_path, self.log_path = folder / "state.json", folder / "calls.log"
        state = {"ports": recorded_ports(), "services": services, "failures": list(failures)}
        self.state_path.write_text(json.dumps(state))

    def run(self, *args: str) -> str:
        return subprocess.run([self.path, *args], capture_output=True, text=True, check=True).stdout

    def service(self, name: str) -> dict | None:
        services = json.loads(self.state_path.read_text())["services"]
        return next((s for s in services if s["name"] == name), None)

    def calls(self) -> list[list[str]]:
        text = self.log_path.read_text() if self.log_path.exists() else ""
        return [json.loads(line) for line in text.splitlines()]

    def changes(self) -> list[list[str]]:
        return [call for call in self.calls() if call[0] not in READS]

    def forget_calls(self) -> None:
        self.log_path.unlink(missing_ok=True)


def test_the_fake_prints_the_recorded_mac_as_networksetup_does(tmp_path):
    fake = FakeNetworksetup(tmp_path / "fake", SEED_SERVICES)
    assert fake.run("-listallhardwareports") == recorded("networksetup-listallhardwareports.txt")
    assert fake.run("-listnetworkserviceorder") == recorded("networksetup-listnetworkserviceorder.txt")
    for service in SEED_SERVICES:
        assert fake.run("-getinfo", service["name"]) == recorded(info_file(service["name"]))
    fake.run("-setmanual", "Wi-Fi", "10.0.0.2", "255.255.255.0")
    assert parse_service_info(fake.run("-getinfo", "Wi-Fi")) == ServiceConfig(
        "Manual", "10.0.0.2", "255.255.255.0"
    )


def recorded_studio() -> NodeFacts:
    """The recorded Mac's facts as its agent reports them, on this machine's host name."""
    files = {
        macos.HARDWARE_PORTS: "networksetup-listallhardwareports.txt",
        macos.THUNDERBOLT_PROFILE: "system_profiler-SPThunderboltDataType.json",
        macos.RDMA_DEVICES: "ibv_devinfo.txt",
    }
    ports = macos.MacOSProbe(lambda argv: recorded(files[tuple(argv)])).interface_ports()
    interfaces = [
        NetworkInterface(
            name,
            port.kind,
            linked=port.linked,
            domain=port.domain,
            peer_domain=port.peer_domain,
            rdma_device=port.rdma_device,
        )  # fmt: skip
        for name, port in ports.items()
    ]
    return node_facts(socket.gethostname(), *interfaces)


def cabled_mac(hostname: str, port: str, domain: str, peer_domain: str) -> NodeFacts:
    cable = NetworkInterface(port, "thunderbolt", linked=True, domain=domain, peer_domain=peer_domain)
    return node_facts(hostname, cable)


def desk_status(with_laptop: bool) -> ClusterStatus:
    """studio-a (the recorded Mac) cabled to studio-b and mini-c; laptop-d unreachable."""
    nodes = [
        NodeStatus("studio-a", (READY,), "127.0.0.1:6790", facts=recorded_studio()),
        NodeStatus(
            "studio-b",
            (READY,),
            "10.0.0.2:6790",
            cabled_mac("studio-b", "en5", STUDIO_B_PORT, STUDIO_A_PORT_1),
        ),
        NodeStatus(
            "mini-c", (READY,), "10.0.0.3:6790", cabled_mac("mini-c", "en1", MINI_C_PORT, STUDIO_A_PORT_2)
        ),
    ]
    unreachable = ConditionReport("Ready", "False", "AgentUnreachable", "connection refused")
    laptop = [NodeStatus("laptop-d", (unreachable,), "10.0.0.4:6790")] if with_laptop else []
    return ClusterStatus(1, 1, (READY,), name="desk", nodes=(*nodes, *laptop))


class StatusHandler(ApiHandler):
    """``GET /api/v1/status`` as the master answers it: a signed request, a signed reply."""

    def initialize(self, auth: ClusterAuth, document: dict) -> None:
        super().initialize(auth)
        self.document = document

    def get(self) -> None:
        self.write_json(200, self.document)


@contextlib.contextmanager
def master_serving(status: ClusterStatus, token: str) -> Iterator[str]:
    port, loop, ready = free_port(), asyncio.new_event_loop(), threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        deps = {"auth": ClusterAuth(token), "document": status.to_json()}
        server = HTTPServer(Application([(r"/api/v1/status", StatusHandler, deps)]))
        server.listen(port, "127.0.0.1")
        loop.call_soon(ready.set)
        loop.run_forever()
        server.stop()

    thread = threading.Thread(target=serve, name="status-master", daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@dataclass
class Desk:
    manifest: Path
    master: str
    fake: FakeNetworksetup

    def command(self, *args: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "genmlx",
            "mesh",
            "apply",
            "-f",
            str(self.manifest),
            "--master",
            self.master,
            *args,
        ]

    def env(self) -> dict[str, str]:
        return {**os.environ, "GENMLX_NETWORKSETUP": str(self.fake.path)}

    def apply(self, *args: str) -> subprocess.CompletedProcess:
        """The command without a terminal: stdin is /dev/null."""
        return subprocess.run(
            self.command(*args),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=60,
        )

    def apply_answering(self, answer: str) -> subprocess.CompletedProcess:
        """The command on a terminal (a pseudo-terminal), answering its question with ``answer``."""
        leader, follower = pty.openpty()
        with subprocess.Popen(
            self.command(),
            stdin=follower,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env(),
        ) as process:
            os.close(follower)
            os.write(leader, f"{answer}\n".encode())
            out, err = process.communicate(timeout=60)
        os.close(leader)
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def make_desk(
    tmp_path: Path,
    token: str,
    services: list[dict] = SEED_SERVICES,
    failures: list = (),
    laptop: bool = False,
):
    nodes = ["studio-a", "studio-b", "mini-c", *(["laptop-d"] if laptop else [])]
    fake = FakeNetworksetup(tmp_path / "fake", [dict(s) for s in services], failures)
    return desk_status(laptop), Desk(manifest_file(tmp_path, nodes), "", fake)


@pytest.fixture
def desk(tmp_path, token) -> Iterator[Desk]:
    status, desk = make_desk(tmp_path, token)
    with master_serving(status, token) as url:
        yield replace(desk, master=url)


def shown(desk: Desk, change: list[str]) -> str:
    return shlex.join([str(desk.fake.path), *change])


def test_dry_run_shows_the_commands_for_the_mac_it_runs_on_and_changes_nothing(desk):
    done = desk.apply("--dry-run")  # no --node: the recorded Mac's facts carry this machine's host name
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"studio-a: Thunderbolt addresses (node facts: from the master at {desk.master})" in done.stdout
    assert "192.168.200.1/30 to studio-b on en2: to change: new service" in done.stdout
    assert "5 changes (networksetup):" in done.stdout
    for change in FIRST_RUN:
        assert f"  {shown(desk, change)}   # " in done.stdout
    assert "--dry-run: nothing was changed" in done.stdout
    assert desk.fake.calls() and desk.fake.changes() == [], "only reads"


def test_yes_applies_the_plan_and_a_second_run_finds_nothing_to_change(desk):
    done = desk.apply("--node", "studio-a", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert desk.fake.changes() == FIRST_RUN
    assert "studio-a: every change is in place (read back from networksetup)" in done.stdout
    fake = desk.fake
    assert fake.service("Thunderbolt Bridge")["enabled"] is False
    for name, address, port in (
        (SERVICE_TO_B, "192.168.200.1", "Thunderbolt 1"),
        (SERVICE_TO_C, "192.168.200.5", "Thunderbolt 2"),
    ):
        held = fake.service(name)
        assert (held["port"], held["enabled"], held["method"], held["ip"], held["mask"]) == (
            port,
            True,
            "Manual",
            address,
            MASK,
        )
    assert fake.service("Ethernet") == SEED_SERVICES[0]

    fake.forget_calls()
    again = desk.apply("--node", "studio-a", "--yes")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing needs changing: studio-a's Thunderbolt ports have their planned addresses" in again.stdout
    assert fake.calls() and fake.changes() == []


@pytest.mark.parametrize(
    "ethernet, why",
    [
        pytest.param(
            {"method": "Manual", "ip": "192.168.200.1", "mask": MASK},
            "already has 192.168.200.1",
            id="holding the address",
        ),
        pytest.param(
            {"name": SERVICE_TO_B}, "Thunderbolt 1 has no service, and the name for one", id="named like ours"
        ),
    ],
)
def test_an_ethernet_service_is_never_touched(tmp_path, token, ethernet, why):
    services = [{**SEED_SERVICES[0], **ethernet}, *SEED_SERVICES[1:]]
    status, desk = make_desk(tmp_path, token, services)
    with master_serving(status, token) as url:
        done = replace(desk, master=url).apply("--node", "studio-a", "--yes")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "192.168.200.1/30 to studio-b on en2: REFUSED: " in done.stdout and why in done.stdout
    assert "1 of studio-a's 2 Thunderbolt links left unconfigured" in done.stderr
    # The other cable is set; nothing is ever asked of the Ethernet service.
    assert desk.fake.changes() == [FIRST_RUN[0], *FIRST_RUN[3:]]
    assert desk.fake.service(services[0]["name"]) == services[0]
    assert not [
        call for call in desk.fake.calls() if call[1:2] == [services[0]["name"]] and call[0] != "-getinfo"
    ]


def test_without_a_terminal_it_asks_for_yes_and_changes_nothing(desk):
    done = desk.apply("--node", "studio-a")
    assert done.returncode == 1
    assert "no terminal to ask on: pass --yes to make these 5 changes" in done.stderr
    assert desk.fake.changes() == []


def test_on_a_terminal_it_asks_before_changing_anything(desk):
    declined = desk.apply_answering("n")
    assert declined.returncode == 1, declined.stdout + declined.stderr
    assert "Apply these 5 changes? [y/N]" in declined.stdout and "nothing was changed" in declined.stdout
    assert desk.fake.changes() == []
    accepted = desk.apply_answering("y")
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert desk.fake.changes() == FIRST_RUN


def test_a_failing_command_stops_the_run_and_says_what_was_and_was_not_done(tmp_path, token):
    failure = [["-setmanual", SERVICE_TO_B], "** Error: Unable to commit the change (injected by the test)."]
    status, desk = make_desk(tmp_path, token, failures=[failure])
    with master_serving(status, token) as url:
        done = replace(desk, master=url).apply("--node", "studio-a", "--yes")
    assert done.returncode == 1, done.stdout + done.stderr
    assert (
        f"failed: {shown(desk, FIRST_RUN[2])}: exited with code 4: ** Error: Unable to commit" in done.stderr
    )
    not_run = "".join(f"\n  {shown(desk, change)}" for change in FIRST_RUN[3:])
    assert f"2 of the 5 changes made before it; not run:{not_run}" in done.stderr
    assert desk.fake.changes() == FIRST_RUN[:3], "nothing after the failure"
    assert desk.fake.service(SERVICE_TO_C) is None


def test_a_cable_the_facts_do_not_show_is_skipped_not_guessed(tmp_path, token):
    status, desk = make_desk(tmp_path, token, laptop=True)
    with master_serving(status, token) as url:
        done = replace(desk, master=url).apply("--node", "studio-a", "--dry-run")
    assert done.returncode == 1, done.stdout + done.stderr
    assert (
        "192.168.200.9/30 to laptop-d: skipped: no node facts show which port the cable to laptop-d is in"
        in done.stdout
    )
    assert "5 changes (networksetup):" in done.stdout, "the cables the facts show are still planned"
    assert "1 of studio-a's 3 Thunderbolt links left unconfigured" in done.stderr


@pytest.mark.skipif(sys.platform == "darwin", reason="networksetup is there on macOS")
def test_elsewhere_than_macos_without_the_override_it_says_what_it_is_for(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GENMLX_NETWORKSETUP"}
    manifest = manifest_file(tmp_path, ["studio-a", "studio-b"])
    done = subprocess.run(
        [sys.executable, "-m", "genmlx", "mesh", "apply", "-f", str(manifest), "--yes"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    expected = "mesh apply configures macOS Thunderbolt services (networksetup); this machine is Linux"
    assert expected in done.stderr
