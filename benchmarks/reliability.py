"""Write ``docs/reliability.md``: every fault scenario with its measured recovery time, the soak's
figures, and the fuzzing that ran, each with the command that reproduces it.

    python benchmarks/reliability.py [--soak-streams 64] [--soak-seconds 300] [--fuzz-examples 1000]
        [--soak-logs DIR]

It runs, as real processes on this machine: the fault tests (``tests/test_faults.py``, on the
network-namespace bench: root, iproute2, iptables and faketime), which record each recovery
(``GENMLX_RELIABILITY_OUT``); ``benchmarks/soak.py``; and the fuzz tests with
``GENMLX_FUZZ_EXAMPLES`` examples per property. Then it writes the page from what they measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAULT_TESTS = "tests/test_faults.py"
FUZZ_TESTS = ("tests/test_fuzz_manifest.py", "tests/test_fuzz_http.py")


def run_pytest(paths: tuple[str, ...], env: dict[str, str]) -> tuple[bool, float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths], cwd=ROOT, env=env
    )
    return done.returncode == 0, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--soak-streams", type=int, default=64)
    parser.add_argument("--soak-seconds", type=float, default=300)
    parser.add_argument("--fuzz-examples", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reliability.md")
    parser.add_argument("--soak-logs", type=Path, help="keep the soak's process logs in this (new) directory")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        records = Path(work) / "faults.jsonl"
        faults_ok, _ = run_pytest((FAULT_TESTS,), {**os.environ, "GENMLX_RELIABILITY_OUT": str(records)})
        fuzz_env = {**os.environ, "GENMLX_FUZZ_EXAMPLES": str(options.fuzz_examples)}
        fuzz_ok, fuzz_s = run_pytest(FUZZ_TESTS, fuzz_env)
        soak_file = Path(work) / "soak.json"
        soak = [sys.executable, "soak.py", "--streams", str(options.soak_streams)]
        soak += ["--seconds", str(options.soak_seconds), "--json", str(soak_file)]
        soak += ["--logs", str(options.soak_logs.resolve())] if options.soak_logs else []
        subprocess.run(soak, cwd=ROOT / "benchmarks", check=True)
        faults = [json.loads(line) for line in records.read_text().splitlines()] if records.exists() else []
        figures = json.loads(soak_file.read_text())
    options.out.parent.mkdir(exist_ok=True)
    options.out.write_text(page(faults, faults_ok, figures, options, fuzz_ok, fuzz_s))
    print(f"wrote {options.out.relative_to(ROOT)}")


def page(faults: list[dict], faults_ok: bool, soak: dict, options, fuzz_ok: bool, fuzz_s: float) -> str:
    machine = f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores"
    lines = [
        "# Reliability in figures",
        "",
        f"Measured on {machine}, {time.strftime('%Y-%m-%d')}, with the demo model (a tiny random-weight",
        "llama; one of 9 MB where a transfer is cut short).",
        "Regenerate this page with `python benchmarks/reliability.py` (root, for the network-namespace",
        "bench). Every figure below comes from that run; none is written by hand.",
        "",
        "## Faults",
        "",
        "Each scenario is a test of `tests/test_faults.py` on the network-namespace bench: a master on",
        "the first host, an agent on every host, the model served as a tensor group over two hosts, or",
        "on its way to one of them (downloaded from a stand-in for the Hugging Face Hub, or copied from",
        "the other agent, over a link slowed to 1 MiB/s). It breaks one thing, checks what a client",
        "sees and that nothing half-copied is published or left behind, and waits for the model to",
        "serve again with the same answer at temperature 0 as before the fault (or as the same weights",
        "served alone). Recovery is timed from the end of the fault (the kill, the restart, the heal,",
        "the room made) to that answer.",
        "",
        "| Scenario | What the user sees | Bound | Recovered in | Reproduce |",
        "|---|---|---|---|---|",
    ]
    for fault in faults:
        command = f"`make test PYTEST_ARGS='{fault['test']}'`"
        lines.append(
            f"| {fault['scenario']} | {fault['seen']} | {fault['bound_s']:.0f} s | "
            f"{fault['recovery_s']:.1f} s | {command} |"
        )
    if not faults_ok:
        lines += ["", "**Some fault tests failed in this run**: see their output."]
    lines += [
        "",
        "## Load and soak",
        "",
        f"`python benchmarks/soak.py --streams {options.soak_streams} --seconds {options.soak_seconds:.0f}`:",
        f"{soak['streams']} streaming clients through the master for {soak['seconds']:.0f} s onto a tensor",
        "group over two agents, with random prompt and answer lengths, a tenth of the streams dropped by",
        "the client, and more clients than the batch and the queue hold (429s, honoured).",
        "",
        f"- requests: {soak['requests']}; completed {soak['completed']}, dropped by the client "
        f"{soak['disconnected']}, refused with 429 (queue full) {soak['rejected']}",
        f"- errors other than those: {soak['errors'] or 'none'}",
        f"- time to first token: p50 {ms(soak['ttft_p50_s'])}, p99 {ms(soak['ttft_p99_s'])}; "
        f"between tokens: p50 {ms(soak['itl_p50_s'])}, p99 {ms(soak['itl_p99_s'])}",
        f"- tokens per second overall: {soak['tokens_per_second']:.1f}",
        f"- the group's ranks still in step afterwards: {'yes' if soak['in_step'] else 'no'}",
        "",
        "Open files are counted before the clients come and once they have all gone: more afterwards",
        "would be a leak.",
        "",
        "| Process | RSS first (MB) | RSS last (MB) | Slope after warm-up (MB/min) | Open files before, after"
        " |",
        "|---|---|---|---|---|",
    ]
    for name, row in soak["memory"].items():
        rss = f"{row['first_mb']:.1f} | {row['last_mb']:.1f} | {row['slope_mb_per_min']:.2f}"
        lines.append(f"| {name} | {rss} | {row['files_before']}, {row['files_after']} |")
    lines += [
        "",
        "## Fuzzing",
        "",
        f"`GENMLX_FUZZ_EXAMPLES={options.fuzz_examples} make test PYTEST_ARGS='{' '.join(FUZZ_TESTS)}'`:",
        f"{options.fuzz_examples} generated examples per property ({fuzz_s / 60:.0f} min),",
        f"{'all passed' if fuzz_ok else 'SOME FAILED'}. Manifests (mutated field by field, hostile YAML,",
        "random bytes, alias bombs, deep nesting) are loaded whole or refused with `FILE:LINE:COL`",
        "issues, and a master applies them whole or not at all (a dry run, as `genmlx diff` sends,",
        "gives the same verdict and changes nothing); request bodies on every endpoint of",
        "the master, an agent and the dispatchers get an answer below 500 in the API's error shape,",
        "and a two-rank group stays in step; a body over the size limit is a 413 in that shape, unread.",
        "The limits are in the README (Limits).",
        "",
    ]
    return "\n".join(lines)


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


if __name__ == "__main__":
    main()
