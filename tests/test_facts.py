"""Node facts. Linux facts are read for real on this machine and checked against independent
sources (os-release, /proc/cpuinfo, iproute2's JSON), including in a network namespace the test
builds with a veth pair. macOS facts are parsed from recorded output of a Mac Studio (M2 Ultra,
macOS 15.1) with Ethernet, Wi-Fi, a USB LAN adapter, Thunderbolt Bridge and six Thunderbolt ports:
another Mac on ports 1 and 2, a Thunderbolt drive on port 5 (tests/data/macos)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import types
from collections.abc import Sequence
from dataclasses import astuple
from pathlib import Path

import psutil
import pytest
from builders import GIB
from builders import facts as node_facts
from conftest import wait_until

import genmlx.agent.facts.macos as macos
from genmlx.agent.facts.collect import BackgroundRefreshed, NodeFactsCollector, collect_node_facts
from genmlx.agent.facts.linux import LinuxProbe
from genmlx.agent.facts.nvidia import nvidia_gpus
from genmlx.agent.facts.platform import (
    InterfacePort,
    PlatformCommandFailed,
    probe_gpu,
    run_command,
)
from genmlx.agent.facts.replay import RECORDING_FILES
from genmlx.wire.agent_state import GpuDevice, NetworkInterface, NodeFacts

pytestmark = pytest.mark.timeout(60)

RECORDINGS = Path(__file__).parent / "data" / "macos"
RECORDED = RECORDING_FILES
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="reads this machine's Linux facts")


def recorded_mac(*missing: tuple[str, ...], gpu: str = "Metal\n"):
    """A command runner answering from the recordings; ``missing`` commands fail as if absent."""

    def run(argv: Sequence[str]) -> str:
        argv = tuple(argv)
        if argv[:2] == (sys.executable, "-c"):
            return gpu
        if argv in RECORDED and argv not in missing:
            return (RECORDINGS / RECORDED[argv]).read_text()
        raise PlatformCommandFailed(f"{argv[0]}: [Errno 2] No such file or directory")

    return run


# ----------------------------------------------------------------------------------------------
# macOS, from recordings


PEER_ON_1 = "2D6F8B41-C03E-4957-A1B8-E7940D5C263F"  # the Mac Studio on port 1
PEER_ON_2 = "73B0F9C2-5D16-4A8E-B3F7-2C94E60D1A5B"  # the Mac mini on port 2
STUDIO_PORTS = {
    "lo0": InterfacePort("loopback"),
    "en0": InterfacePort("ethernet"),
    "en1": InterfacePort("wifi"),
    "bridge0": InterfacePort("thunderbolt", linked=True),
    # Each port's own Thunderbolt domain, the peer Mac's, and the RDMA device of an active port.
    # ... and the speed system_profiler gives a link to a computer.
    "en2": InterfacePort(
        "thunderbolt", True, "A9C3E7F2-4B18-4D6A-9F05-83E2D1B6C47A", PEER_ON_1, "rdma_en2", 40.0
    ),
    "en3": InterfacePort(
        "thunderbolt", True, "E5A18D3C-72F0-4B96-8D1E-4F3B20C6A978", PEER_ON_2, "rdma_en3", 40.0
    ),
    "en4": InterfacePort("thunderbolt", linked=False, domain="D27C5B08-8E3A-4F61-B94D-0A6E1C3F7B82"),
    "en5": InterfacePort("thunderbolt", linked=False, domain="6A93E2D4-1F58-47C0-9B26-C3D47E8A5F10"),
    "en6": InterfacePort("thunderbolt", False, "0F8D2A51-93C4-4B7E-A6D0-5E2C8B19F3A7"),  # a drive: no peer
    "en7": InterfacePort("thunderbolt", linked=False, domain="B41E6C0F-2D7A-4E95-8C3B-71F05A9D2E64"),
    "en8": InterfacePort("ethernet"),
}


def test_macos_probe_reads_version_chip_and_every_port_from_the_recordings():
    probe = macos.MacOSProbe(recorded_mac())
    assert probe.os_version() == "macOS 15.1"
    assert probe.chip() == "Apple M2 Ultra"
    assert probe.interface_ports() == STUDIO_PORTS


def test_hardware_ports_are_read_in_order_up_to_the_vlan_section():
    ports = macos.parse_hardware_ports((RECORDINGS / RECORDED[macos.HARDWARE_PORTS]).read_text())
    assert [(p.name, p.device) for p in ports] == [
        ("Ethernet", "en0"),
        ("Wi-Fi", "en1"),
        ("Thunderbolt Bridge", "bridge0"),
        *((f"Thunderbolt {n}", f"en{n + 1}") for n in range(1, 7)),
        ("USB 10/100/1000 LAN", "en8"),
    ]


@pytest.mark.parametrize(
    ("port", "kind"),
    [
        ("Thunderbolt Bridge", "thunderbolt"),
        ("Thunderbolt 1", "thunderbolt"),
        ("Thunderbolt 12", "thunderbolt"),
        ("Thunderbolt Ethernet Slot 1", "ethernet"),  # Apple's Thunderbolt-to-Gigabit adapter
        ("Ethernet", "ethernet"),
        ("Ethernet 2", "ethernet"),
        ("USB 10/100/1000 LAN", "ethernet"),
        ("USB 10/100 LAN", "ethernet"),
        ("Belkin USB-C LAN", "ethernet"),
        ("Wi-Fi", "wifi"),
        ("AirPort", "wifi"),
        ("Bluetooth PAN", "other"),
        ("iPhone USB", "other"),
        ("LANtastic", "other"),
    ],
)
def test_hardware_port_names_map_to_interface_kinds(port: str, kind: str):
    assert macos.hardware_port_kind(port) == kind


def test_thunderbolt_peers_are_computers_on_a_connected_receptacle():
    profile = (RECORDINGS / RECORDED[macos.THUNDERBOLT_PROFILE]).read_text()
    assert macos.parse_thunderbolt_peers(profile) == {
        1: True,
        2: True,
        3: False,
        4: False,
        5: False,
        6: False,
    }
    assert macos.parse_thunderbolt_peers('{"SPThunderboltDataType" : []}') == {}
    for garbage in ("", "not json", '{"SPUSBDataType": []}', '{"SPThunderboltDataType": [{"_items": 3}]}'):
        assert macos.parse_thunderbolt_peers(garbage) is None, garbage
        assert macos.parse_thunderbolt_domains(garbage) == {}, garbage


def test_macos_facts_degrade_to_unknown_when_commands_fail():
    without_profiler = macos.MacOSProbe(recorded_mac(macos.THUNDERBOLT_PROFILE))
    unlinked = {
        name: InterfacePort(port.kind, rdma_device=port.rdma_device) for name, port in STUDIO_PORTS.items()
    }
    assert without_profiler.interface_ports() == unlinked, "kinds and RDMA stay known, links become unknown"

    nothing = macos.MacOSProbe(recorded_mac(*RECORDED))
    assert (nothing.os_version(), nothing.chip()) == ("", "")
    assert nothing.interface_ports() == {"lo0": InterfacePort("loopback")}


# What psutil.net_if_addrs() answers on that Mac, IPv4 and IPv6 only, zones as macOS writes them.
STUDIO_ADDRESSES = {
    "lo0": ("127.0.0.1", "::1", "fe80::1%lo0"),
    "en0": ("192.168.1.20", "fe80::1c8e:5a2b:93f0:6d11%en0", "fd3a:9c1e:44b0::20"),
    "en1": (),
    "bridge0": ("10.10.0.1", "fe80::342f:a9ff:fed1:70c0%bridge0"),
    **{f"en{n}": () for n in range(2, 9)},
    "anpi0": (),
    "ap1": (),
    "awdl0": ("fe80::9c2d:e1ff:fe44:7a10%awdl0",),
    "llw0": ("fe80::9c2d:e1ff:fe44:7a10%llw0",),
    "utun0": ("fe80::5e7a:3c4b:1d2e:9f80%utun0",),
    "utun4": ("100.101.12.7",),  # a VPN with a routable address is reported
}


def test_macos_node_facts_put_the_recorded_parts_together():
    run = recorded_mac()
    collector = NodeFactsCollector(
        macos.MacOSProbe(run),
        gpu=lambda: probe_gpu(run),
        interface_addresses=lambda: {
            n: tuple(a.split("%")[0] for a in v) for n, v in STUDIO_ADDRESSES.items()
        },
    )
    facts = collector.collect()
    assert (facts.os_version, facts.chip, facts.gpu) == ("macOS 15.1", "Apple M2 Ultra", "Metal")
    assert facts.interfaces == (
        NetworkInterface("bridge0", "thunderbolt", ("10.10.0.1", "fe80::342f:a9ff:fed1:70c0"), True),
        NetworkInterface(
            "en0", "ethernet", ("192.168.1.20", "fe80::1c8e:5a2b:93f0:6d11", "fd3a:9c1e:44b0::20")
        ),
        NetworkInterface("en1", "wifi"),
        *(
            NetworkInterface(f"en{n}", "thunderbolt", (), *astuple(STUDIO_PORTS[f"en{n}"])[1:])
            for n in range(2, 8)
        ),
        NetworkInterface("en8", "ethernet"),
        NetworkInterface("lo0", "loopback", ("127.0.0.1", "::1", "fe80::1")),
        NetworkInterface("utun4", "other", ("100.101.12.7",)),
    )
    assert NodeFacts.from_json(json.loads(json.dumps(facts.to_json()))) == facts


def test_the_gpu_probe_reads_the_backend_mlx_names():
    assert probe_gpu(recorded_mac(gpu="Metal\n")) == "Metal"
    assert probe_gpu(recorded_mac(gpu="\n")) == ""
    assert probe_gpu(recorded_mac(gpu="Traceback (most recent call last):\n")) == ""

    def broken(argv: Sequence[str]) -> str:
        raise PlatformCommandFailed("python exited with code 1: ModuleNotFoundError: No module named 'mlx'")

    assert probe_gpu(broken) == ""


def test_the_gpu_probe_agrees_with_mlx_on_this_machine():
    import mlx.core as mx  # in the test process only: the agent asks a child process

    expected = "Metal" if mx.metal.is_available() else ""
    assert probe_gpu() == expected


# ----------------------------------------------------------------------------------------------
# Commands and caching


def test_run_command_returns_stdout_and_raises_for_a_failure_or_a_missing_command():
    assert run_command(["/bin/sh", "-c", "echo 15.1"]) == "15.1\n"
    with pytest.raises(PlatformCommandFailed, match=r"exited with code 3: no such key"):
        run_command(["/bin/sh", "-c", "echo no such key >&2; exit 3"])
    with pytest.raises(PlatformCommandFailed, match="/no/such/networksetup"):
        run_command(["/no/such/networksetup", "-listallhardwareports"])


def test_a_slow_value_is_read_once_then_refreshed_in_the_background():
    reads: list[int] = []
    second_read_may_finish = threading.Event()

    def read() -> int:
        reads.append(len(reads) + 1)
        if len(reads) == 2:
            second_read_may_finish.wait(10)
        return len(reads)

    value = BackgroundRefreshed(read, max_age_s=0.05, what="a test value")
    assert (value.get(), value.get(), reads) == (1, 1, [1]), "read once, then served while fresh"
    wait_until(lambda: value.get() == 1 and len(reads) == 2, timeout=5, what="a background re-read")
    # The re-read is stuck, and yet every get answers at once, without starting another.
    assert (value.get(), value.get(), reads) == (1, 1, [1, 2])
    second_read_may_finish.set()
    wait_until(lambda: value.get() == 2, timeout=5, what="the re-read value")


def test_a_failed_background_read_keeps_the_last_value(caplog: pytest.LogCaptureFixture):
    outcomes = itertools.chain(["first", ZeroDivisionError("lost")], itertools.repeat("third"))

    def read() -> str:
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    value = BackgroundRefreshed(read, max_age_s=0.0, what="a test value")
    seen = [value.get()]
    wait_until(lambda: seen.append(value.get()) or seen[-1] == "third", timeout=5, what="a good re-read")
    assert set(seen) == {"first", "third"}, "the failed read changed nothing"
    assert "re-reading a test value failed" in caplog.text


# ----------------------------------------------------------------------------------------------
# Linux, for real


def os_release_pretty_name() -> str:
    for path in (Path("/etc/os-release"), Path("/usr/lib/os-release")):
        if path.exists():
            for line in path.read_text().splitlines():
                if line.startswith("PRETTY_NAME="):
                    return shlex.split(line.partition("=")[2])[0]
    return ""


def first_cpu_model_name() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")


def iproute_interfaces() -> dict[str, NetworkInterface]:
    """This namespace's interfaces as iproute2 reports them, classified the way the kernel's own
    attributes say: loopback link type, a parent bus (real hardware), or virtual."""
    links = json.loads(subprocess.run(["ip", "-j", "-d", "link"], capture_output=True, check=True).stdout)
    addrs = json.loads(subprocess.run(["ip", "-j", "addr"], capture_output=True, check=True).stdout)
    addresses = {a["ifname"]: tuple(i["local"] for i in a.get("addr_info", ())) for a in addrs}
    found = {}
    for link in links:
        name = link["ifname"]
        kind = {"loopback": "loopback"}.get(link["link_type"], "ethernet" if "parentbus" in link else "other")
        found[name] = NetworkInterface(name, kind, addresses.get(name, ()), "LOWER_UP" in link["flags"])
    return found


def comparable(interfaces: Sequence[NetworkInterface]) -> dict[str, tuple]:
    return {i.name: (i.kind, sorted(i.addresses), i.linked) for i in interfaces}


@linux_only
def test_linux_facts_match_os_release_cpuinfo_and_psutil():
    facts = collect_node_facts()
    assert facts.os_version == os_release_pretty_name() != ""
    assert facts.chip == first_cpu_model_name()
    assert (facts.os, facts.arch) == (f"{platform.system()} {platform.release()}", platform.machine())
    assert facts.memory_total == psutil.virtual_memory().total
    assert facts.gpu == ""  # mlx[cpu] here


@linux_only
@pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2")
def test_linux_interfaces_match_what_iproute2_reports():
    facts = collect_node_facts()
    expected = iproute_interfaces()
    reported = {
        name for name, i in expected.items() if i.kind != "other" or any(":" not in a for a in i.addresses)
    }
    assert {i.name for i in facts.interfaces} >= reported
    assert comparable(facts.interfaces) == comparable([expected[i.name] for i in facts.interfaces])
    assert expected["lo"] in facts.interfaces


@linux_only
def test_memory_available_is_read_fresh_on_every_call():
    before = collect_node_facts().memory_available
    ballast = bytearray(b"\x01") * (512 << 20)  # every page written, so really taken
    during = collect_node_facts().memory_available
    del ballast
    assert before - during > 256 << 20


NAMESPACE_SCRIPT = """
set -e
mount -t sysfs sysfs /sys  # /sys shows the namespace of whoever mounted it
sysctl -qw net.ipv6.conf.default.addr_gen_mode=1  # no automatic link-local: addresses are ours alone
ip link set lo up
ip link add v0 type veth peer name v1
ip addr add 10.77.0.1/24 dev v0
ip -6 addr add fd77::1/64 dev v0 nodad
ip -6 addr add fe80::77/64 dev v0 nodad
ip -6 addr add fe80::78/64 dev v1 nodad
ip link set v0 up
{python} -c "$FACTS"
ip link set v1 up
{python} -c "$FACTS"
"""
PRINT_INTERFACES = """
import json
from genmlx.agent.facts.collect import collect_node_facts
print(json.dumps([i.to_json() for i in collect_node_facts().interfaces]))
"""


@pytest.mark.e2e
@linux_only
@pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("ip")),
    reason="needs root, unshare and iproute2",
)
def test_interfaces_addresses_and_links_in_a_network_namespace():
    script = NAMESPACE_SCRIPT.format(python=shlex.quote(sys.executable))
    done = subprocess.run(
        ["unshare", "--net", "--mount", "sh", "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "FACTS": PRINT_INTERFACES},
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    peer_down, peer_up = (
        [NetworkInterface.from_json(i) for i in json.loads(line)] for line in done.stdout.splitlines()
    )
    lo = NetworkInterface("lo", "loopback", ("127.0.0.1", "::1"), True)
    # v1 is left out: virtual, and only a link-local address.
    assert comparable(peer_down) == comparable(
        [lo, NetworkInterface("v0", "other", ("10.77.0.1", "fd77::1", "fe80::77"), False)]
    )
    assert comparable(peer_up) == comparable(
        [lo, NetworkInterface("v0", "other", ("10.77.0.1", "fd77::1", "fe80::77"), True)]
    )


def make_sysfs_entry(
    root: Path, name: str, link_type: int, carrier: int | None, driver: str | None = None
) -> Path:
    """One /sys/class/net/<name> entry as the kernel lays it out: ``device`` and its ``driver``
    are links into the device tree."""
    entry = root / "class" / "net" / name
    entry.mkdir(parents=True)
    (entry / "type").write_text(f"{link_type}\n")
    if carrier is not None:
        (entry / "carrier").write_text(f"{carrier}\n")
    if driver is not None:
        device = root / "devices" / name
        (root / "drivers" / driver).mkdir(parents=True, exist_ok=True)
        device.mkdir(parents=True)
        (device / "driver").symlink_to(root / "drivers" / driver)
        (entry / "device").symlink_to(device)
    return entry


def test_linux_kinds_for_hardware_this_machine_lacks(tmp_path: Path):
    make_sysfs_entry(tmp_path, "lo", 772, 1)
    make_sysfs_entry(tmp_path, "enp3s0", 1, 0, driver="igc")
    (make_sysfs_entry(tmp_path, "wlp2s0", 1, 1, driver="iwlwifi") / "wireless").mkdir()
    make_sysfs_entry(tmp_path, "thunderbolt0", 1, 1, driver="thunderbolt-net")
    (make_sysfs_entry(tmp_path, "br0", 1, 1) / "bridge").mkdir()
    make_sysfs_entry(tmp_path, "docker0", 1, None)  # down: the kernel will not say
    make_sysfs_entry(tmp_path, "wwan0", 519, 1, driver="qmi_wwan")
    assert LinuxProbe(sys_class_net=tmp_path / "class" / "net").interface_ports() == {
        "br0": InterfacePort("other", True),
        "docker0": InterfacePort("other", None),
        "enp3s0": InterfacePort("ethernet", False),
        "lo": InterfacePort("loopback", True),
        "thunderbolt0": InterfacePort("thunderbolt", True),
        "wlp2s0": InterfacePort("wifi", True),
        "wwan0": InterfacePort("other", True),
    }


def test_linux_chip_is_the_first_model_name(tmp_path: Path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n\n"
        "processor\t: 1\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n"
    )
    assert LinuxProbe(cpuinfo=cpuinfo).chip() == "AMD EPYC 7B13 64-Core Processor"
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 48.00\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\n")
    assert LinuxProbe(cpuinfo=cpuinfo).chip() == "", "ARM boards name no model"
    assert LinuxProbe(cpuinfo=tmp_path / "absent").chip() == ""


def test_active_rdma_devices_are_the_ports_ibv_devinfo_says_are_up():
    devinfo = (RECORDINGS / RECORDED[macos.RDMA_DEVICES]).read_text()
    assert macos.parse_active_rdma_devices(devinfo) == {"rdma_en2", "rdma_en3"}
    assert macos.parse_active_rdma_devices("") == frozenset()
    without_rdma = macos.MacOSProbe(recorded_mac(macos.RDMA_DEVICES)).interface_ports()
    assert without_rdma["en2"] == dataclasses.replace(STUDIO_PORTS["en2"], rdma_device=None)


class StandInNvml:
    """The part of ``pynvml`` the facts read: an H200 and an H100, or no driver (``driver`` None)."""

    class NVMLError(Exception):
        pass

    def __init__(self, driver: bytes | str | None = "580.159.03"):
        self.driver, self.shut_down = driver, False

    def nvmlInit(self):
        if self.driver is None:
            raise self.NVMLError("NVML Shared Library Not Found")

    def nvmlSystemGetDriverVersion(self):
        return self.driver

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetName(self, device):
        return (b"NVIDIA H200", "NVIDIA H100 80GB HBM3")[device]  # older bindings answer bytes

    def nvmlDeviceGetMemoryInfo(self, device):
        return types.SimpleNamespace(total=(150_754_820_096, 85_520_809_984)[device], used=0)

    def nvmlShutdown(self):
        self.shut_down = True


def test_nvidia_gpus_are_named_with_their_memory_and_driver_and_a_machine_without_one_has_none():
    nvml = StandInNvml()
    assert nvidia_gpus(nvml) == (
        GpuDevice("NVIDIA H200", 150_754_820_096, "580.159.03"),
        GpuDevice("NVIDIA H100 80GB HBM3", 85_520_809_984, "580.159.03"),
    )
    assert nvml.shut_down, "NVML is let go once read"
    assert nvidia_gpus(StandInNvml(driver=b"550.54.15"))[0].driver == "550.54.15"
    assert nvidia_gpus(StandInNvml(driver=None)) == ()


def test_a_cuda_node_keeps_models_in_its_first_gpus_memory_and_a_mac_in_its_own():
    gpus = nvidia_gpus(StandInNvml())
    linux = dataclasses.replace(node_facts(32, "box"), os="Linux 6.8.0", gpu="CUDA", gpus=gpus)
    assert (linux.models_on_gpu, linux.model_memory) == (True, 150_754_820_096)
    on_cpu = dataclasses.replace(linux, gpu="")  # the CPU build of MLX installed beside the GPU
    assert (on_cpu.models_on_gpu, on_cpu.model_memory) == (False, 32 * GIB)
    mac = node_facts(64)
    assert (mac.models_on_gpu, mac.model_memory) == (False, 64 * GIB)
