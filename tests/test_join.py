"""Joining a node in one command, on the network-namespace bench: `genmlx join-command` on the
master's machine prints a line; run on a new host (a fresh HOME, root with systemd's unit
directory of its own, systemctl carried out by tests/systemctl_standin.py), it makes a virtual
environment, installs the master's genmlx wheel pinned to its SHA-256, trades the one-time code
for the cluster token and starts the agent from the unit it wrote. The node shows as unmanaged
(in status and on the page, with the YAML to add), is declared, and serves a model. The token is
never on a command line, and a code works once."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import yaml
from agent_harness import call
from conftest import wait_until
from netbench import NetBench, ip_command
from test_multihost import AGENT_PORT, MASTER_PORT, apply_manifest, genmlx, status, write_home
from test_ui_page import WAIT_MS
from test_ui_page import browser as browser  # a fixture, used by name

from genmlx.core.home import ensure_token, read_token
from genmlx.master.runtime.joining import JoinCodes, JoinedNode

STANDIN = Path(__file__).parent / "systemctl_standin.py"
PURELIB = "import sysconfig; print(sysconfig.get_paths()['purelib'])"


def test_a_code_works_once_and_not_after_it_expires():
    now = [1000.0]
    codes = JoinCodes(clock=lambda: now[0])
    code = codes.issue("n2", ttl_s=60)
    assert code.code.startswith("gmxj_") and len(code.code) > 30
    assert codes.find(code.keys.signing_id) is code
    codes.use(code, JoinedNode("n2", "10.0.0.2:6790", ("/m",), now[0]))
    assert codes.find(code.keys.signing_id) is None, "spent"
    late = codes.issue(ttl_s=60)
    now[0] += 61
    assert codes.find(late.keys.signing_id) is None, "expired"
    assert codes.joined["n2"].address == "10.0.0.2:6790"


def test_a_joined_node_keeps_its_storage_paths_once_zeroconf_finds_it_too():
    from genmlx.master.runtime.discovery import DiscoveredAgent, with_known

    joined = DiscoveredAgent("n2", "10.0.0.2:6790", "", "", last_seen=1.0, storage=("/models",))
    announced = DiscoveredAgent("n2", "10.0.0.2:6790", "node-id", "0.1.0", last_seen=2.0)
    elsewhere = DiscoveredAgent("n2", "10.0.0.9:6790", "other-id", "0.1.0", last_seen=2.0)
    assert with_known((), joined) == (joined,)
    (merged,) = with_known((announced,), joined)
    assert (merged.node_id, merged.storage) == ("node-id", ("/models",)), "the status page still has its YAML"
    assert with_known((elsewhere,), joined)[0].storage == (), (
        "another agent claiming the name gets none of it"
    )
    local = DiscoveredAgent("n2", "127.0.0.1:6790", "", "", last_seen=0.0)  # `genmlx up`'s own
    assert with_known((announced,), local) == (announced,), "an announced name needs no local entry"


def new_machine(root: Path) -> dict[str, str]:
    """A HOME for the new host, and a PATH whose python3 makes virtual environments that see the
    test's installed packages (the bench has no package index: PIP_NO_INDEX makes sure nothing is
    fetched) and whose systemctl is the stand-in."""
    home, bin_dir, state = root / "home", root / "bin", root / "systemd-state"
    for directory in (home, bin_dir, state):
        directory.mkdir(parents=True)
    python = Path(sys.base_prefix) / "bin" / "python3"
    site = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    (bin_dir / "python3").write_text(
        "#!/bin/sh\n"
        'if [ "$1" = -m ] && [ "$2" = venv ]; then\n'
        f'  {python} -m venv "$3" || exit 1\n'
        f'  echo {shlex.quote(site)} > "$("$3/bin/python" -c {shlex.quote(PURELIB)})/test-packages.pth"\n'
        "  exit 0\n"
        "fi\n"
        f'exec {python} "$@"\n'
    )
    (bin_dir / "systemctl").write_text(f'#!/bin/sh\nexec {python} {STANDIN} {state} "$@"\n')
    for script in ("python3", "systemctl"):
        (bin_dir / script).chmod(0o755)
    (bin_dir / "python3.13").symlink_to(bin_dir / "python3")  # the newest: the one the line picks
    return {
        "HOME": str(home),
        "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "PIP_NO_INDEX": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "LANG": "C.UTF-8",
    }


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_a_new_host_joins_with_the_printed_line_shows_unmanaged_is_declared_and_serves(
    netns_hosts, tmp_path, demo_model_dir, browser
):
    bench: NetBench = netns_hosts(2)
    token = read_token(ensure_token(tmp_path / "token")[0])
    master_home = write_home(tmp_path, "n1", token)
    shutil.copytree(demo_model_dir, master_home / "models" / "demo")
    manifest = tmp_path / "cluster.yaml"
    nodes = f"    - {{name: n1, storage: [{{path: {master_home / 'models'}}}]}}\n"
    source = f"file://{master_home / 'models' / 'demo'}"

    def write_manifest(extra_nodes: str = "", extra_models: str = "") -> None:
        manifest.write_text(
            "apiVersion: genmlx/v1\nkind: Cluster\nmetadata: {name: joining}\nspec:\n"
            f"  master: {{node: n1}}\n  nodes:\n{nodes}{extra_nodes}"
            f"  models:\n    - {{name: demo, source: '{source}', nodes: [n1]}}\n{extra_models}"
        )

    write_manifest()
    env = {"GENMLX_HOME": str(master_home)}
    bench.run(0, genmlx("agent", "--name", "n1", "--storage", str(master_home / "models")), "n1", env)
    bench.run(0, genmlx("master", "-f", str(manifest)), "master", env)
    url = f"http://{bench.host(0).address}:{MASTER_PORT}"
    wait_until(lambda: (d := status(url, token)) and d["conditions"][0]["status"] == "True", 120, what="n1")

    machine = tmp_path / "new-machine"
    storage = machine / "home" / "models"
    printed = subprocess.run(
        genmlx("join-command", "--master", url, "--name", "n2", "--storage", str(storage)),
        env={**os.environ, "GENMLX_HOME": str(master_home)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert printed.returncode == 0, printed.stderr
    line = printed.stdout.split("\n\n")[1].strip()
    assert token not in printed.stdout and re.search(r"#sha256=[0-9a-f]{64}", line), line
    code = re.search(r"--code (gmxj_\S+)", line)[1]
    # The code crosses the network sealed (it is worth the token); only a signed request gets one.
    issued = call("POST", f"{url}/api/v1/join-codes", token, {})
    assert issued.status == 200 and "gmxj_" not in issued.body.decode(), issued.body
    bearer = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    assert call("POST", f"{url}/api/v1/join-codes", None, {}, headers=bearer).status == 400

    def join_as(name: str, with_code: str) -> subprocess.CompletedProcess:
        """``genmlx join`` from the new host's network, with nothing installed or written."""
        argv = genmlx("join", url, "--code", with_code, "--name", name, "--no-service")
        return subprocess.run(
            [ip_command() or "ip", "netns", "exec", bench.host(1).netns, *argv],
            env={**os.environ, "GENMLX_HOME": str(tmp_path / f"home-of-{name}")},
            capture_output=True,
            text=True,
            timeout=60,
        )

    # A code issued for n2 is n2's only; an open one cannot take a declared node's name. Neither
    # refusal spends the code or writes a token.
    posing = join_as("n1", code)
    assert posing.returncode != 0 and "issued for node 'n2'" in posing.stderr, posing.stderr
    unnamed = subprocess.run(
        genmlx("join-command", "--master", url), env={**os.environ, "GENMLX_HOME": str(master_home)},
        capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    taken = join_as("n1", re.search(r"--code (gmxj_\S+)", unnamed)[1])
    assert taken.returncode != 0 and "already in cluster.yaml" in taken.stderr, taken.stderr
    assert not (tmp_path / "home-of-n1" / "token").exists()

    # The new host: root, with a systemd unit directory of its own (a tmpfs in a mount namespace).
    new_env = new_machine(machine)
    shell = f"mount -t tmpfs genmlx-test /etc/systemd/system && exec bash -c {shlex.quote(line)}"
    netns = bench.host(1).netns
    joined = subprocess.run(
        [
            ip_command() or "ip",
            "netns",
            "exec",
            netns,
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            shell,
        ],
        env=new_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(joined.stdout, joined.stderr)
    assert joined.returncode == 0, joined.stderr[-3000:]
    assert (
        "joined the cluster" in joined.stdout and "/etc/systemd/system/genmlx-agent.service" in joined.stdout
    )
    agent_log = machine / "home" / ".genmlx" / "logs" / "agent.log"
    assert (machine / "home" / ".genmlx" / "token").stat().st_mode & 0o777 == 0o600

    def unmanaged() -> dict | None:
        document = status(url, token)
        agents = {a["name"]: a for a in (document or {}).get("unmanagedAgents", [])}
        return agents.get("n2")

    agent = wait_until(unmanaged, 60, what="n2 to show as unmanaged")
    assert agent["address"] == f"{bench.host(1).address}:{AGENT_PORT}" and agent["storage"] == [str(storage)]
    text = subprocess.run(
        genmlx("status", "--master", url), env={**os.environ, "GENMLX_HOME": str(master_home)},
        capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    listed = text.split("add under spec.nodes in cluster.yaml and apply:\n", 1)[1]
    assert yaml.safe_load(listed) == [{"name": "n2", "storage": [{"path": str(storage)}]}], text
    login = subprocess.run(
        genmlx("ui", "--no-open", "--master", url), env={**os.environ, "GENMLX_HOME": str(master_home)},
        capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    page = browser.new_page()
    page.goto(re.search(r"https?://\S+", login)[0])
    page.wait_for_selector("#unmanaged .node-yaml", timeout=WAIT_MS)
    yaml_block = page.locator("#unmanaged .node-yaml").inner_text()
    assert yaml.safe_load(yaml_block) == [{"name": "n2", "storage": [{"path": str(storage)}]}], yaml_block

    # Declared (the YAML as shown) with a model placed on it: synced there from n1, and served.
    entry = "".join(f"    {line}\n" for line in yaml_block.splitlines())
    write_manifest(entry, f"    - {{name: joined, source: '{source}', nodes: [n2]}}\n")
    apply_manifest(manifest, url, master_home)

    def serving() -> dict | None:
        document = status(url, token)
        models = {m["name"]: m for m in (document or {}).get("models", [])}
        return document if models.get("joined", {}).get("phase") == "Ready" else None

    document = wait_until(serving, 180, what="the model on the joined node to serve")
    assert "n2" not in {a["name"] for a in document.get("unmanagedAgents", [])}
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0, timeout=60)
    assert client.completions.create(model="joined", prompt="hi", max_tokens=3).usage.completion_tokens == 3
    assert "agent n2 listening" in agent_log.read_text(), "the service logs to its rotating file"

    # The token was on no command line: not in the line, the unit (shown by install), the
    # stand-in's records, nor any process's arguments.
    records = json.dumps([p.read_text() for p in (machine / "systemd-state").iterdir()])
    assert token not in line and token not in joined.stdout and token not in records
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert token.encode() not in cmdline.read_bytes(), cmdline
        except OSError:
            continue
    # The code is spent: on another machine (no token yet) it gets nothing.
    again = join_as("n2", code)
    assert again.returncode != 0 and "This join code is not valid" in again.stderr, again.stderr
    assert not (tmp_path / "home-of-n2" / "token").exists()
