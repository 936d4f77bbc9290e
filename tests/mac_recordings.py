"""Recorded macOS command output for a Mac whose Thunderbolt ports are cabled to other Macs, in the
formats of tests/data/macos (see its README): what an agent started with ``GENMLX_FACTS_REPLAY``
reports as its facts. Used to give agents on the namespace bench the Thunderbolt ports and RDMA
devices of Macs, while their interfaces (veth pairs named like a Mac's ports) are real."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

from genmlx.agent.facts.macos import CHIP_SYSCTL, HARDWARE_PORTS, RDMA_DEVICES, SW_VERS, THUNDERBOLT_PROFILE
from genmlx.agent.facts.replay import RECORDING_FILES


@dataclass(frozen=True)
class Port:
    """One Thunderbolt port of a Mac: its number (hardware port "Thunderbolt N"), its device
    ("en2"), and the Mac cabled to it (that Mac's name and port number), if any."""

    number: int
    device: str
    peer: tuple[str, int] | None = None
    rdma_active: bool = True
    gbps: int = 80  # the link speed system_profiler reports (Thunderbolt 5)


def domain(mac: str, number: int) -> str:
    """The Thunderbolt domain UUID of ``mac``'s port ``number``: stable, so two Macs agree."""
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{mac}.port{number}.genmlx.test")).upper()


def write_recording(directory: Path, mac: str, ports: list[Port]) -> Path:
    """The five recordings of ``mac`` with ``ports`` into ``directory``; returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        SW_VERS: "26.2\n",
        CHIP_SYSCTL: "Apple M4 Max\n",
        HARDWARE_PORTS: hardware_ports(ports),
        THUNDERBOLT_PROFILE: json.dumps(thunderbolt_profile(mac, ports), indent=2),
        RDMA_DEVICES: ibv_devinfo(ports),
    }
    for command, text in files.items():
        (directory / RECORDING_FILES[command]).write_text(text)
    return directory


def hardware_ports(ports: list[Port]) -> str:
    blocks = [("Ethernet", "eth0"), *((f"Thunderbolt {p.number}", p.device) for p in ports)]
    return "\n" + "".join(
        f"Hardware Port: {name}\nDevice: {device}\nEthernet Address: 36:2f:a9:d1:70:{i:02x}\n\n"
        for i, (name, device) in enumerate(blocks)
    )


def thunderbolt_profile(mac: str, ports: list[Port]) -> dict:
    """``system_profiler -json SPThunderboltDataType``: a bus per port, with its domain, its one
    receptacle, and the Mac at the other end (which shows with that Mac's port's domain)."""
    buses = []
    for port in ports:
        bus = {
            "_name": f"thunderboltusb4_bus_{port.number - 1}",
            "device_name_key": "Mac Studio",
            "domain_uuid_key": domain(mac, port.number),
            "receptacle_1_tag": {
                "current_speed_key": f"Up to {port.gbps} Gb/s",
                "receptacle_id_key": str(port.number),
                "receptacle_status_key": "receptacle_connected"
                if port.peer
                else "receptacle_no_devices_connected",
            },
            "vendor_name_key": "Apple Inc.",
        }
        if port.peer:
            peer, number = port.peer
            bus["_items"] = [
                {"_name": peer, "device_name_key": "Mac Studio", "domain_uuid_key": domain(peer, number)}
            ]
        buses.append(bus)
    return {"SPThunderboltDataType": buses}


def ibv_devinfo(ports: list[Port]) -> str:
    """``ibv_devinfo`` with RDMA enabled: a device ``rdma_enN`` per port, active where cabled."""
    blocks = []
    for port in ports:
        state = "PORT_ACTIVE (4)" if port.peer and port.rdma_active else "PORT_DOWN (1)"
        blocks.append(
            f"hca_id:\trdma_{port.device}\n\ttransport:\t\t\tInfiniBand (0)\n\tphys_port_cnt:\t\t\t1\n"
            f"\t\tport:\t1\n\t\t\tstate:\t\t\t{state}\n\t\t\tlink_layer:\t\tEthernet\n"
        )
    return "\n".join(blocks)
