"""``genmlx service``: the files it writes, checked by what reads them (systemd's own
``systemd-analyze verify``, plistlib for launchd's plist), the install, status and uninstall
flows against launchctl and systemctl answering from recorded output (tests/data/service), and
the command line a written unit holds, run for real: it starts an agent that answers and logs
to its rotating file."""

from __future__ import annotations

import argparse
import os
import plistlib
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import free_port, http_status, skip_or_fail, wait_until

from genmlx.cli.service.commands import (
    cmd_service_install,
    cmd_service_status,
    cmd_service_uninstall,
    follow,
    installed_argv,
    service_spec,
)
from genmlx.cli.service.managers import Completed, Launchd, ServiceError, Systemd
from genmlx.cli.service.units import MARKER, ServiceSpec, render_plist, render_unit

RECORDED = Path(__file__).parent / "data" / "service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def need_systemd_analyze() -> None:
    skip_or_fail(
        None if SYSTEMD_ANALYZE else "systemd-analyze is missing: `make test` installs systemd", "unit checks"
    )


def install_args(**given) -> argparse.Namespace:
    defaults = {
        "role": "agent",
        "name": "studio-a",
        "storage": None,
        "file": None,
        "watch": False,
        "port": None,
        "host": None,
        "no_discovery": False,
        "dry_run": False,
    }
    return argparse.Namespace(**{**defaults, **given})


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A GENMLX_HOME with a token, as a node has once it joined."""
    home = tmp_path / "genmlx home"  # a space: every file must quote it
    home.mkdir()
    (home / "token").write_text("a-cluster-token\n")
    monkeypatch.setenv("GENMLX_HOME", str(home))
    return home


class Recorded:
    """launchctl or systemctl: each call noted, answered by the first rule whose argv starts so
    (a list of answers is given one by one, its last one from then on)."""

    def __init__(self, rules: list[tuple[Sequence[str], Completed | list[Completed]]]):
        self.rules = rules
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> Completed:
        self.calls.append(list(argv))
        for prefix, answer in self.rules:
            if list(argv[: len(prefix)]) == list(prefix):
                if isinstance(answer, list):
                    return answer.pop(0) if len(answer) > 1 else answer[0]
                return answer
        return Completed(0, "", "")


def recording(name: str) -> str:
    return (RECORDED / name).read_text()


# ----- the files -----


def tricky_spec(home: Path) -> ServiceSpec:
    """Words systemd would otherwise expand or split: a space, %, $, a quote, a backslash."""
    storage = home / 'models 100% $HOME "quoted" back\\slash'
    argv = (sys.executable, "-m", "genmlx", "agent", "--name", "a", "--storage", str(storage))
    return ServiceSpec(
        "agent",
        (*argv, "--log-file", str(home / "logs" / "agent.log")),
        home,
        "/usr/bin:/bin",
        "GenMLX agent (node a)",
    )


@pytest.mark.parametrize("system", [False, True], ids=["user unit", "system unit"])
def test_systemd_verifies_the_unit_and_its_command_line_reads_back_word_for_word(home, tmp_path, system):
    need_systemd_analyze()
    spec = tricky_spec(home)
    unit = tmp_path / "genmlx-agent.service"
    unit.write_text(render_unit(spec, system))
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    command = [SYSTEMD_ANALYZE, *([] if system else ["--user"]), "verify", str(unit)]
    verified = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    )
    assert verified.returncode == 0 and unit.name not in verified.stderr, verified.stderr
    assert installed_argv(unit, unit.read_text()) == list(spec.argv)
    assert MARKER in unit.read_text()
    assert ("WantedBy=multi-user.target" if system else "WantedBy=default.target") in unit.read_text()


def test_systemd_verify_would_catch_a_broken_unit(home, tmp_path):
    """The check above can fail: a unit naming a program that is not there is refused."""
    need_systemd_analyze()
    spec = tricky_spec(home)
    unit = tmp_path / "genmlx-agent.service"
    unit.write_text(
        render_unit(ServiceSpec("agent", ("/nonexistent/python", *spec.argv[1:]), home, "/bin", "x"), True)
    )
    verified = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True)
    assert verified.returncode != 0 and "/nonexistent/python" in verified.stderr


def test_the_plist_is_a_launch_agent_that_starts_at_login_and_again_when_it_exits(home):
    spec = tricky_spec(home)
    text = render_plist(spec)
    job = plistlib.loads(text.encode())  # what plutil -lint checks: a well-formed property list
    assert job["Label"] == "com.genmlx.agent"
    assert job["ProgramArguments"] == list(spec.argv)
    assert job["RunAtLoad"] is True and job["KeepAlive"] is True
    assert job["EnvironmentVariables"] == {"GENMLX_HOME": str(home), "PATH": "/usr/bin:/bin"}
    assert job["StandardErrorPath"] == str(home / "logs" / "agent.stderr.log")
    assert job["ProcessType"] == "Interactive" and job["WorkingDirectory"] == str(home)
    assert MARKER in text and text.startswith("<?xml")
    assert installed_argv(Path("com.genmlx.agent.plist"), text) == list(spec.argv)


def test_the_agent_service_runs_the_agent_with_this_python_and_the_home_it_was_installed_with(home):
    spec = service_spec(install_args(storage=[str(home / "models")], port=7001, no_discovery=True))
    assert spec.argv[:4] == (sys.executable, "-m", "genmlx", "agent")
    assert spec.argv[4:] == (
        "--name", "studio-a", "--storage", str(home / "models"), "--port", "7001", "--no-discovery",
        "--log-file", str(home / "logs" / "agent.log"),
    )  # fmt: skip
    master = service_spec(install_args(role="master", name=None, port=6800))
    assert master.argv[3:] == ("master", "--port", "6800", "--log-file", str(home / "logs" / "master.log"))
    with pytest.raises(ServiceError, match="--name 'Studio A'"):
        service_spec(install_args(name="Studio A"))
    with pytest.raises(ServiceError, match="are the agent's"):
        service_spec(install_args(role="master"))
    (home / "token").unlink()
    with pytest.raises(ServiceError, match="no cluster token"):
        service_spec(install_args())


# ----- launchd, from recorded output -----

NOT_LOADED = Completed(113, "", recording("launchctl-print-not-found.txt"))
RUNNING = Completed(0, recording("launchctl-print-running.txt"), "")


def launchd(tmp_path: Path, rules) -> tuple[Launchd, Recorded]:
    run = Recorded(rules)
    return Launchd(run, print, tmp_path / "user", uid=501, sleep=lambda s: None), run


def test_launchd_install_loads_once_is_idempotent_and_reloads_a_change(home, tmp_path, capsys):
    target = "gui/501/com.genmlx.agent"
    manager, run = launchd(tmp_path, [(["launchctl", "print"], NOT_LOADED)])
    assert cmd_service_install(install_args(), manager) == 0
    plist = tmp_path / "user" / "Library" / "LaunchAgents" / "com.genmlx.agent.plist"
    assert plistlib.loads(plist.read_bytes())["ProgramArguments"][4:6] == ["--name", "studio-a"]
    assert run.calls == [
        ["launchctl", "print", target],
        ["launchctl", "enable", target],
        ["launchctl", "bootstrap", "gui/501", str(plist)],
        ["launchctl", "print", target],
    ]
    shown = capsys.readouterr().out
    assert f"Writing {plist} (launchd):" in shown and "<key>KeepAlive</key>" in shown, (
        "it shows what it writes"
    )
    assert f"$ launchctl bootstrap gui/501 {plist}" in shown, "and each command it runs"

    manager, run = launchd(tmp_path, [(["launchctl", "print"], RUNNING)])
    cmd_service_install(install_args(), manager)
    assert run.calls == [["launchctl", "print", target]] * 2, "loaded and unchanged: nothing to do"
    assert f"{plist} is already this" in capsys.readouterr().out

    manager, run = launchd(tmp_path, [(["launchctl", "print"], RUNNING)])
    cmd_service_install(install_args(port=7002), manager)
    assert [c[1] for c in run.calls] == ["print", "bootout", "enable", "bootstrap", "print"]
    assert "7002" in plistlib.loads(plist.read_bytes())["ProgramArguments"]


def test_launchd_bootstrap_is_tried_again_while_the_old_job_still_exits(home, tmp_path):
    failing = Completed(5, "", "Bootstrap failed: 5: Input/output error")
    manager, run = launchd(
        tmp_path,
        [
            (["launchctl", "print"], RUNNING),
            (["launchctl", "bootstrap"], [failing, failing, Completed(0, "", "")]),
        ],
    )
    cmd_service_install(install_args(), manager)
    assert [c[1] for c in run.calls] == [
        "print",
        "bootout",
        "enable",
        "bootstrap",
        "bootstrap",
        "bootstrap",
        "print",
    ]
    run.rules[1] = (["launchctl", "bootstrap"], failing)
    with pytest.raises(ServiceError, match="Input/output error"):  # it gives up after a few
        cmd_service_install(install_args(port=7003), manager)


def test_a_file_genmlx_did_not_write_is_never_overwritten_nor_removed(home, tmp_path):
    manager, run = launchd(tmp_path, [(["launchctl", "print"], RUNNING)])
    plist = manager.path("agent")
    plist.parent.mkdir(parents=True)
    foreign = plistlib.dumps(
        {"Label": "com.genmlx.agent", "ProgramArguments": ["/usr/local/bin/other"]}
    ).decode()
    plist.write_text(foreign)
    with pytest.raises(ServiceError, match="not written by genmlx"):
        cmd_service_install(install_args(), manager)
    with pytest.raises(ServiceError, match="not written by genmlx"):
        cmd_service_uninstall(argparse.Namespace(role="agent"), manager)
    assert plist.read_text() == foreign and run.calls == []


def test_launchd_status_reads_launchctl_and_uninstall_unloads_and_removes(home, tmp_path, capsys):
    manager, run = launchd(tmp_path, [(["launchctl", "print"], RUNNING)])
    cmd_service_install(install_args(port=free_port()), manager)
    capsys.readouterr()
    assert cmd_service_status(argparse.Namespace(role=None), manager) == 0
    shown = capsys.readouterr().out
    assert "genmlx master: not installed" in shown
    assert "genmlx agent: running (pid 4242), started 2 time(s), last exit: 1 (launchd" in shown
    assert "no answer at http://127.0.0.1:" in shown, "nothing listens on that port in this test"
    run.calls.clear()
    assert cmd_service_uninstall(argparse.Namespace(role="agent"), manager) == 0
    assert run.calls == [
        ["launchctl", "print", "gui/501/com.genmlx.agent"],
        ["launchctl", "bootout", "gui/501/com.genmlx.agent"],
    ]
    assert not manager.path("agent").exists()
    manager.run = Recorded([(["launchctl", "print"], NOT_LOADED)])
    assert cmd_service_status(argparse.Namespace(role="agent"), manager) == 3


# ----- systemd, from recorded output -----


def systemd(tmp_path: Path, rules) -> tuple[Systemd, Recorded]:
    run = Recorded(rules)
    return Systemd(run, print, system=False, user_config=tmp_path / "config"), run


def test_systemd_install_enables_and_starts_restarts_on_a_change_and_restores_on_failure(
    home, tmp_path, capsys
):
    active = Completed(0, recording("systemctl-show-active.txt"), "")
    inactive = Completed(3, "", "")
    manager, run = systemd(
        tmp_path,
        [(["systemctl", "--user", "show"], active), (["systemctl", "--user", "is-active"], inactive)],
    )
    cmd_service_install(install_args(), manager)
    unit = tmp_path / "config" / "systemd" / "user" / "genmlx-agent.service"
    assert [c[2:] for c in run.calls] == [
        ["daemon-reload"],
        ["is-active", "--quiet", "genmlx-agent.service"],
        ["enable", "--now", "genmlx-agent.service"],
        [
            "show",
            "genmlx-agent.service",
            "--property=LoadState,ActiveState,SubState,MainPID,NRestarts,ExecMainStatus,UnitFileState",
        ],
    ]
    assert (
        "genmlx agent: active (running, pid 31337), enabled at boot, restarted 2 time(s)"
        in capsys.readouterr().out
    )

    run.rules[1] = (["systemctl", "--user", "is-active"], Completed(0, "", ""))
    run.calls.clear()
    cmd_service_install(install_args(), manager)
    assert [c[2] for c in run.calls] == ["is-active", "enable", "show"], (
        "unchanged: enabled and started, no reload"
    )
    run.calls.clear()
    cmd_service_install(install_args(port=7004), manager)
    assert [c[2] for c in run.calls] == ["daemon-reload", "is-active", "enable", "restart", "show"]

    before = unit.read_text()
    run.rules.insert(
        0,
        (
            ["systemctl", "--user", "daemon-reload"],
            Completed(1, "", "Failed to connect to bus: No medium found"),
        ),
    )
    run.calls.clear()
    capsys.readouterr()
    with pytest.raises(ServiceError, match="loginctl enable-linger"):
        cmd_service_install(install_args(port=7005), manager)
    assert unit.read_text() == before, "a failed install leaves the unit as it was"
    assert [c[2] for c in run.calls] == ["daemon-reload", "daemon-reload"], "and tries to load it again"
    assert "could not put" in capsys.readouterr().out, "saying that did not work either"

    run.rules[0] = (
        ["systemctl", "--user", "show"],
        Completed(0, recording("systemctl-show-not-found.txt"), ""),
    )
    assert cmd_service_status(argparse.Namespace(role="agent"), manager) == 3
    assert "not loaded in systemd (not-found)" in capsys.readouterr().out


def test_systemd_uninstall_disables_removes_and_reloads(home, tmp_path):
    manager, run = systemd(tmp_path, [])
    cmd_service_install(install_args(), manager)
    run.calls.clear()
    cmd_service_uninstall(argparse.Namespace(role="agent"), manager)
    assert [c[2:] for c in run.calls] == [["disable", "--now", "genmlx-agent.service"], ["daemon-reload"]]
    assert not manager.path("agent").exists()


# ----- the command line, for real -----


@pytest.mark.e2e
def test_the_units_command_line_starts_an_agent_that_answers_and_logs_to_its_rotating_file(home, tmp_path):
    manager, _ = systemd(tmp_path, [])
    port = free_port()
    cmd_service_install(install_args(port=port, host="127.0.0.1", no_discovery=True), manager)
    argv = installed_argv(manager.path("agent"), manager.path("agent").read_text())
    agent = subprocess.Popen(
        argv, env={**os.environ, "GENMLX_HOME": str(home)}, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_until(lambda: http_status(f"http://127.0.0.1:{port}/healthz") is not None, 60, what="the agent")
        log = home / "logs" / "agent.log"
        wait_until(lambda: log.exists() and "agent studio-a listening" in log.read_text(), 10, what="its log")
    finally:
        agent.send_signal(signal.SIGTERM)  # what systemd's stop sends first (KillMode=mixed)
        code = agent.wait(30)
    assert code == 0 and not agent.stderr.read().strip(), "everything goes to the log file"
    assert "stopped" in log.read_text()


def test_following_a_log_goes_on_into_the_new_file_after_a_rotation(tmp_path):
    import logging
    import threading
    import time
    from logging.handlers import RotatingFileHandler

    log = tmp_path / "agent.log"
    handler = RotatingFileHandler(log, maxBytes=300, backupCount=2)  # rotates every three lines
    writer = logging.getLogger("genmlx.test.rotation")
    writer.addHandler(handler)
    writer.propagate = False
    writer.setLevel(logging.INFO)
    writer.info("first line")
    seen: list[str] = []

    def write() -> None:
        for i in range(12):
            writer.info("line %d of a log that rotates %s", i, "." * 40)
            time.sleep(0.1)

    threading.Timer(0.3, write).start()
    follow(log, seen.append, stop=lambda: "line 11 " in "".join(seen))
    handler.close()
    text = "".join(seen)
    assert [f"line {i} " in text for i in range(12)] == [True] * 12, text
    assert "first line" not in text, "it follows from the end, as tail -f does"
    assert (tmp_path / "agent.log.1").exists(), "the log did rotate"
