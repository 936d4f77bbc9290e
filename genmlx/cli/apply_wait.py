"""``genmlx apply --wait``: follow the master's status until every model is Ready (exit 0), one is
Stalled (exit 1, with its reason), or the timeout passes (exit 1, naming what is not Ready).

It polls ``GET /api/v1/status`` once a second rather than holding the SSE stream open: the loop
passes every second while anything is under way, so a poll sees each pass about as soon as the
stream would; a master that restarts mid-wait needs no reconnect logic, and the timeout needs no
socket tricks. Progress shows as ``rich`` bars on a terminal, as plain lines (one per change)
anywhere else, so CI logs and tests read the same story.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from rich.console import Console, Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from genmlx.wire.status import ClusterStatus, ModelStatus

POLL_S = 1.0

StatusSource = Callable[[], ClusterStatus | None]  # the status document, or None while unreachable


@dataclass(frozen=True)
class ModelLine:
    """One model as the wait shows it: its phase and its Ready (or Stalled) reason and message."""

    name: str
    phase: str
    ready: bool
    stalled: bool
    reason: str
    message: str


@dataclass(frozen=True)
class TransferLine:
    """One download or sync reported by a node."""

    node: str
    model: str
    kind: str
    state: str
    done: int
    total: int | None

    @property
    def key(self) -> str:
        return f"{self.kind} {self.model} to {self.node}"


@dataclass(frozen=True)
class WaitView:
    """What one status document says, for the wait: the models and transfers, and whether the
    master has made a pass over the applied generation yet."""

    caught_up: bool
    models: tuple[ModelLine, ...]
    transfers: tuple[TransferLine, ...]


@dataclass(frozen=True)
class Outcome:
    code: int  # the exit status
    message: str


def read_view(status: ClusterStatus, generation: int) -> WaitView:
    """The wait's view of a status document (pure)."""
    caught_up = status.observed_generation >= generation
    models = tuple(model_line(m) for m in status.models)
    transfers = tuple(
        TransferLine(n.name, t.model, t.kind, t.state, t.bytes_done, t.bytes_total)
        for n in status.nodes
        for t in n.transfers
    )
    return WaitView(caught_up, models, transfers)


def model_line(model: ModelStatus) -> ModelLine:
    conditions = {c.type: c for c in model.conditions}
    ready, stalled = conditions.get("Ready"), conditions.get("Stalled")
    is_ready = ready is not None and ready.status == "True"
    is_stalled = stalled is not None and stalled.status == "True"
    shown = stalled if is_stalled else ready
    reason, message = (shown.reason, shown.message) if shown else ("", "")
    return ModelLine(model.name, model.phase, is_ready, is_stalled, reason, message)


def judge(view: WaitView) -> Outcome | None:
    """Done, failed, or None to keep waiting (pure). Nothing is judged before the master has
    looked at the applied generation, so an old Ready never passes for a new one."""
    if not view.caught_up:
        return None
    stalled = [m for m in view.models if m.stalled]
    if stalled:
        lines = [f"model {m.name} is Stalled: {m.reason}: {m.message}" for m in stalled]
        return Outcome(1, "\n".join(lines))
    if all(m.ready for m in view.models):
        return Outcome(0, f"{len(view.models)} model(s) Ready")
    return None


def timed_out(view: WaitView | None, timeout: float) -> Outcome:
    """The outcome when the timeout passes: what is still not Ready, and why."""
    if view is None:
        return Outcome(1, f"timed out after {timeout:g}s: the master never answered")
    waiting = [f"  model {m.name}: {m.phase} ({m.reason}: {m.message})" for m in view.models if not m.ready]
    if not view.caught_up:
        waiting.insert(0, "  the master has not yet made a pass over the applied manifest")
    return Outcome(1, "\n".join([f"timed out after {timeout:g}s; still not Ready:", *waiting]))


class Display(Protocol):
    def show(self, view: WaitView) -> None: ...

    def note(self, text: str) -> None: ...

    def close(self) -> None: ...


def follow(
    fetch: StatusSource,
    generation: int,
    timeout: float | None,
    display: Display,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Outcome:
    """Poll ``fetch`` until ``judge`` decides or ``timeout`` seconds pass."""
    deadline = None if timeout is None else clock() + timeout
    view: WaitView | None = None
    unreachable_noted = False
    try:
        while True:
            status = fetch()
            if status is None and not unreachable_noted:
                display.note("the master does not answer; still waiting")
                unreachable_noted = True
            if status is not None:
                view = read_view(status, generation)
                display.show(view)
                if (outcome := judge(view)) is not None:
                    return outcome
            if deadline is not None and clock() >= deadline:
                return timed_out(view, timeout or 0)
            sleep(POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - clock())))
    finally:
        display.close()


class PlainDisplay:
    """One line per change: a model's phase or reason, a transfer's state or every tenth of it."""

    def __init__(self, write: Callable[[str], None] | None = None):
        self._write = write or (lambda text: print(text, flush=True))
        self._last: dict[str, Any] = {}

    def show(self, view: WaitView) -> None:
        for model in view.models:
            self._changed(f"model {model.name}", (model.phase, model.reason), model_text(model))
        for transfer in view.transfers:
            if transfer.key in self._last or transfer.state != "done":  # not old news
                self._changed(transfer.key, (transfer.state, tenth(transfer)), transfer_text(transfer))

    def note(self, text: str) -> None:
        self._write(text)

    def close(self) -> None:
        pass

    def _changed(self, key: str, value: Any, text: str) -> None:
        if self._last.get(key) != value:
            self._last[key] = value
            self._write(text)


def model_text(model: ModelLine) -> str:
    return f"model {model.name}: {model.phase} ({model.reason}) {model.message}".rstrip()


def transfer_text(transfer: TransferLine) -> str:
    size = human_bytes(transfer.done)
    if transfer.total:
        size = f"{100 * transfer.done / transfer.total:.0f}% of {human_bytes(transfer.total)}"
    return f"{transfer.key}: {transfer.state}, {size}"


def human_bytes(count: int) -> str:
    """Decimal units, as disks and download bars count them."""
    units = ("B", "kB", "MB", "GB", "TB")
    value, unit = float(count), 0
    while value >= 1000 and unit < len(units) - 1:
        value, unit = value / 1000, unit + 1
    return f"{count} B" if unit == 0 else f"{value:.1f} {units[unit]}"


def tenth(transfer: TransferLine) -> int | None:
    return int(10 * transfer.done / transfer.total) if transfer.total else None


class RichDisplay:
    """A live table of models above a progress bar per transfer, redrawn in place."""

    def __init__(self, console: Console):
        self._console = console
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self._tasks: dict[str, TaskID] = {}
        self._live = Live(console=console, refresh_per_second=4, transient=False)
        self._live.start()

    def show(self, view: WaitView) -> None:
        for transfer in view.transfers:
            if transfer.key not in self._tasks and transfer.state == "done":
                continue  # finished before this wait began: old news
            if transfer.key not in self._tasks:
                self._tasks[transfer.key] = self._progress.add_task(transfer.key, total=transfer.total)
            description = transfer.key if transfer.state != "failed" else f"{transfer.key} [red]failed"
            self._progress.update(
                self._tasks[transfer.key],
                completed=transfer.done,
                total=transfer.total,
                description=description,
            )
        self._live.update(Group(models_table(view), self._progress))

    def note(self, text: str) -> None:
        self._console.print(text)

    def close(self) -> None:
        self._live.stop()


PHASE_STYLE = {"Ready": "green", "Blocked": "red", "Backoff": "yellow"}


def models_table(view: WaitView) -> Table:
    table = Table(box=None, show_header=True, header_style="bold")
    for column in ("MODEL", "PHASE", "REASON", "MESSAGE"):
        table.add_column(column, overflow="fold" if column == "MESSAGE" else None)
    for model in view.models:
        style = PHASE_STYLE.get(model.phase, "cyan")
        table.add_row(model.name, f"[{style}]{model.phase}", model.reason, model.message)
    return table


def make_display(console: Console | None = None) -> Display:
    """Bars where a person watches a terminal; plain lines for pipes, files and CI."""
    console = console or Console()
    if console.is_terminal and not console.is_dumb_terminal:
        return RichDisplay(console)
    return PlainDisplay()


def wait_for_apply(url: str, token: str, generation: int, timeout: float | None) -> int:
    """Follow the master at ``url`` after an apply of ``generation``; print the outcome and
    return the exit status."""
    from genmlx.cli.master_client import MasterError, fetch_status

    def fetch() -> ClusterStatus | None:
        try:
            return fetch_status(url, token, timeout=10)
        except MasterError:
            return None  # restarting or busy: the deadline decides how long that may last

    console = Console()
    outcome = follow(fetch, generation, timeout, make_display(console))
    console.print(outcome.message, markup=False, highlight=False, soft_wrap=True)
    return outcome.code
