"""A dispatcher process shared by the tests of one module: starting one per test would spend most
of the suite's time loading models."""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from conftest import Proc, free_port, http_status, wait_until


@dataclass(frozen=True)
class ServedModel:
    """A running dispatcher: where it listens, the token it wants and the name it serves."""

    base_url: str
    token: str
    name: str
    proc: Proc


@contextmanager
def served_model(model_dir: Path, name: str, log_dir: Path) -> Iterator[ServedModel]:
    """Run a dispatcher on ``model_dir`` until the block ends; its output is printed afterwards."""
    token = secrets.token_hex(16)
    port = free_port()
    args = [sys.executable, "-m", "genmlx.dispatcher", "--model", str(model_dir), "--name", name]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GENMLX_API_TOKEN": token}
    proc = Proc([*args, "--port", str(port)], log_dir / f"{name}.log", env)
    served = ServedModel(f"http://127.0.0.1:{port}", token, name, proc)
    try:
        wait_until(
            lambda: http_status(served.base_url + "/health") == 200, timeout=60, what=f"{name} to load"
        )
        yield served
    finally:
        proc.stop()
        print(f"----- dispatcher {name} -----\n{proc.output()}")
