"""What a queue has been doing: each worker's load and the timings of recent calls.

Recording is on the hot path, so it is a few subtractions and deque appends per call;
percentiles are computed only when someone asks for ``stats()``. A call's time splits in
three:

    submitted ---- queue wait ---- handed to a worker ---- transfer + run ---- done
                                                          run: inside the function

``transfer`` is the rest: pickling, the pipes, and waiting in a prefetching worker's pipe.
"""

from __future__ import annotations

import dataclasses
import html
import os
from collections import deque
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .workers._base import Worker

# A table's cells: its header and its rows, as the text and HTML views show them.
Table = tuple[Sequence[str], Sequence[Sequence[str]]]

# Timings of this many recent calls are kept for the percentiles: enough for a stable p99,
# bounded so a long-running queue's memory does not grow.
TIMINGS_KEPT = 10_000


class Timings:
    """The timestamps of the last ``TIMINGS_KEPT`` calls, and counts of all of them.

    The queue appends one tuple per call, (submitted, handed over, done, run time or
    None), on perf_counter's clock; splitting them into durations waits for ``stats()``.
    """

    __slots__ = ("calls", "failed", "samples")

    def __init__(self) -> None:
        self.samples: deque[tuple[float, float, float, float | None]] = deque(maxlen=TIMINGS_KEPT)
        self.calls = 0
        self.failed = 0

    def split(self) -> tuple[list[float], list[float], list[float]]:
        """Queue wait, transfer and run time of the kept calls (no transfer for calls
        whose worker kind does not time them)."""
        wait, transfer, run = [], [], []
        for submitted, sent, done, ran in self.samples:
            wait.append(sent - submitted)
            if ran is None:
                run.append(done - sent)
            else:
                run.append(ran)
                transfer.append(max(0.0, done - sent - ran))
        return wait, transfer, run


@dataclasses.dataclass(frozen=True)
class Percentiles:
    """Percentiles of one timing, in seconds, over ``count`` recent calls."""

    count: int
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, samples: Iterable[float]) -> Percentiles:
        ordered = sorted(samples)
        n = len(ordered)
        if not n:
            return cls(0, 0.0, 0.0, 0.0, 0.0)

        def rank(q: float) -> float:
            return ordered[min(n - 1, int(q * n))]

        return cls(n, rank(0.5), rank(0.9), rank(0.99), ordered[-1])


@dataclasses.dataclass(frozen=True)
class WorkerStats:
    """One worker as ``stats()`` saw it. Times in seconds, memory in bytes (None when
    unknown: a thread or local worker shares the parent's memory, see ``QueueStats.rss``)."""

    name: str
    kind: str
    pid: int | None
    state: str
    series: tuple[str, ...] | None
    tasks_done: int
    in_flight: int
    busy: float
    idle: float
    rss: int | None


@dataclasses.dataclass(frozen=True)
class QueueStats:
    """A snapshot of a queue or pool: ``print(pool.stats())`` shows it as a table, and a
    notebook shows it as an HTML table when it is a cell's value."""

    workers: tuple[WorkerStats, ...]
    queued: int
    in_flight: int
    calls: int
    failed: int
    wait: Percentiles
    transfer: Percentiles
    run: Percentiles
    rss: int  # the parent process's resident memory

    def __str__(self) -> str:
        lines = [self._summary(), ""]
        workers, timing = self._tables()
        lines += _text_table(*workers)
        lines.append("")
        lines += _text_table(*timing)
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """The same summary and tables as ``str()``, as HTML: what a notebook shows when a
        cell's value is the stats. Every cell is escaped (a worker's name is anyone's)."""
        workers, timing = self._tables()
        return "\n".join(
            [
                '<div class="corral-stats">',
                f"<p>{html.escape(self._summary())}</p>",
                _html_table(*workers),
                _html_table(*timing),
                "</div>",
            ]
        )

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """IPython's plain-text view (a terminal IPython, a notebook's text/plain): the
        table, not the dataclass's repr."""
        printer.text(str(self))

    def _summary(self) -> str:
        return (
            f"{len(self.workers)} workers, {self.queued} queued, {self.in_flight} in flight, "
            f"{self.calls:,} calls ({self.failed:,} failed), parent rss {_mib(self.rss)} MiB"
        )

    def _tables(self) -> tuple[Table, Table]:
        """The cells of the workers' table and of the timings', each (header, rows): the
        text and the HTML views are drawn from these, so they cannot disagree."""
        header = ("worker", "kind", "pid", "state", "done", "busy s", "idle s", "rss MiB")
        rows = [
            (
                w.name,
                w.kind,
                "-" if w.pid is None else str(w.pid),
                w.state,
                f"{w.tasks_done:,}",
                f"{w.busy:.3f}",
                f"{w.idle:.3f}",
                "-" if w.rss is None else _mib(w.rss),
            )
            for w in self.workers
        ]
        timing = ("ms (last calls)", "p50", "p90", "p99", "max")
        timing_rows = [
            (name, *(f"{v * 1000:.3f}" for v in (p.p50, p.p90, p.p99, p.max)))
            for name, p in (
                ("queue wait", self.wait),
                ("transfer", self.transfer),
                ("run", self.run),
            )
        ]
        return (header, rows), (timing, timing_rows)


def worker_stats(worker: Worker, state: str, in_flight: int, now: float) -> WorkerStats:
    """A worker's line in the snapshot."""
    alive_for = 0.0 if worker.ready_at is None else now - worker.ready_at
    return WorkerStats(
        name=worker.name,
        kind=worker.kind,
        pid=worker.pid,
        state=state,
        series=None if worker.series is None else tuple(sorted(worker.series)),
        tasks_done=worker.tasks_done,
        in_flight=in_flight,
        busy=worker.busy_time,
        idle=max(0.0, alive_for - worker.busy_time),
        rss=worker.rss(),
    )


def parent_rss() -> int:
    """This process's resident memory in bytes."""
    # psutil loads at the first stats() (some milliseconds), not with every pool.
    import psutil  # noqa: PLC0415

    return int(psutil.Process(os.getpid()).memory_info().rss)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first, *rest = cells
        return "  ".join(
            [first.ljust(widths[0]), *(c.rjust(w) for c, w in zip(rest, widths[1:], strict=True))]
        )

    return [line(header), *(line(r) for r in rows)]


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A table aligned as the text one: names left, numbers right."""

    def line(tag: str, cells: Sequence[str]) -> str:
        first, *rest = (html.escape(c) for c in cells)
        return "".join(
            [
                f'<tr><{tag} style="text-align: left">{first}</{tag}>',
                *(f'<{tag} style="text-align: right">{c}</{tag}>' for c in rest),
                "</tr>",
            ]
        )

    return "\n".join(
        [
            "<table>",
            f"<thead>{line('th', header)}</thead>",
            "<tbody>",
            *(line("td", r) for r in rows),
            "</tbody>",
            "</table>",
        ]
    )
