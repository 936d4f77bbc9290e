"""The soak benchmark, short: a few streams for 30 s through a master onto a tensor group over two
agents, with clients that drop streams and requests beyond the queue. Nothing but the intended
429s and client disconnects may go wrong, no rank may restart, no process may hold more files open
once the clients have gone than before they came, and the group's ranks are still in step
afterwards (the same answer at temperature 0). ``benchmarks/soak.py`` runs the long one."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


@pytest.mark.timeout(300)
def test_a_short_soak_loses_nothing_and_leaves_the_group_in_step(tmp_path):
    figures_file = tmp_path / "soak.json"
    command = [sys.executable, str(BENCHMARKS / "soak.py"), "--streams", "6", "--seconds", "30"]
    command += ["--max-batch", "2", "--max-queue", "2", "--seed", "1", "--json", str(figures_file)]
    logs = tmp_path / "logs"
    soak = subprocess.Popen(
        [*command, "--logs", str(logs)],
        cwd=BENCHMARKS,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = soak.communicate(timeout=200)
    except subprocess.TimeoutExpired:
        soak.send_signal(signal.SIGINT)  # its cluster is stopped on the way out, not left running
        stdout, stderr = soak.communicate(timeout=60)
        pytest.fail(f"the soak did not finish:\n{stdout}\n{stderr[-3000:]}\n{log_tails(logs)}")
    finally:
        if soak.poll() is None:  # it did not stop when asked: what it started may be left
            soak.kill()
            soak.wait()
    print(stdout, stderr[-3000:])
    assert soak.returncode == 0
    figures = json.loads(figures_file.read_text())
    assert figures["errors"] == {}, figures["errors"]
    assert figures["in_step"], "the ranks gave another answer after the soak"
    assert figures["completed"] > 20 and figures["rejected"] > 0, "served, and some found the queue full"
    assert figures["disconnected"] > 0, "some clients left mid-stream"
    processes = figures["memory"]
    assert {"master", "agent n1", "agent n2", "rank 0 (n1)", "rank 1 (n2)"} <= set(processes)
    leaks = {
        name: (row["files_before"], row["files_after"])
        for name, row in processes.items()
        if row["files_after"] > row["files_before"] + 8  # a few pooled connections may stay open
    }
    assert not leaks, f"processes hold more files open once every client has gone: {leaks}"


def log_tails(logs: Path, lines: int = 30) -> str:
    """The last lines of every process's log the soak kept: what a soak that never ended was doing."""
    return "\n".join(
        f"--- {path.relative_to(logs)}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        for path in sorted(logs.rglob("*.log"))
    )
