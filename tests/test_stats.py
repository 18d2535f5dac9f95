"""``stats()``: each worker's kind, pid, state, tasks, busy and idle time and memory, the
queue's length and the timing percentiles, the table it prints as, and the HTML table a
notebook shows (the same cells, escaped)."""

from __future__ import annotations

import asyncio
import os
from html.parser import HTMLParser

import pytest

import corral
from corral._stats import Percentiles, QueueStats, WorkerStats
from tests import tasks
from tests.waits import bounded


@pytest.mark.parametrize("kind", ["process", "thread", "local"])
async def test_busy_time_matches_the_tasks_sleep(kind: str) -> None:
    """Two workers run 10 calls sleeping 0.1 s: their busy times add up to 1 s within 10%,
    run-time percentiles say 0.1 s, and every field is plausible."""
    # A local worker runs in the loop: its calls must await, or each blocks the others.
    sleep = tasks.async_sleep if kind == "local" else tasks.sleep
    async with corral.Pool(2, kind=kind) as pool:  # type: ignore[arg-type]
        await bounded(pool.map(sleep, [0.1] * 10, chunksize=1))
        stats = pool.stats()
    assert len(stats.workers) == 2
    assert sum(w.busy for w in stats.workers) == pytest.approx(1.0, rel=0.1)
    assert sum(w.tasks_done for w in stats.workers) == 10
    for w in stats.workers:
        assert w.kind == kind
        assert w.state == "idle"
        assert w.in_flight == 0
        assert w.idle >= 0
        if kind == "process":
            assert w.pid is not None and w.pid != os.getpid()
            assert w.rss is not None and w.rss > 1_000_000
        else:
            assert w.pid is None and w.rss is None
    assert stats.calls == 10
    assert stats.failed == 0
    assert stats.queued == 0
    assert stats.in_flight == 0
    assert stats.run.count == 10
    assert stats.run.p50 == pytest.approx(0.1, rel=0.1)
    assert 0 <= stats.transfer.p50 < 0.1
    assert stats.wait.max < 1.0
    assert stats.rss > 1_000_000


async def test_stats_while_busy_and_queued() -> None:
    async with corral.Pool(1, kind="thread") as pool:
        jobs = [pool.submit(tasks.sleep, 0.2) for _ in range(3)]
        stats = pool.stats()  # submit hands the first job over at once; two wait
        assert stats.queued == 2
        assert stats.in_flight == 1
        assert [w.state for w in stats.workers] == ["busy"]
        await bounded(asyncio.gather(*jobs))
        stats = pool.stats()
        assert stats.wait.max == pytest.approx(0.4, rel=0.25)


async def test_failures_are_counted() -> None:
    async with corral.Pool(1, kind="local") as pool:
        with pytest.raises(ValueError):
            await pool.run(tasks.fail, "x")
        await pool.run(tasks.add, 1, 1)
        stats = pool.stats()
    assert (stats.calls, stats.failed) == (2, 1)


async def test_calls_lost_with_their_worker_or_killed_at_a_limit_count_as_failed() -> None:
    """A call whose worker died under it (WorkerLostError) and one killed at its hard time
    limit (TimeLimitExceeded) are calls that failed, as a raising one is: no worker
    reports how they ended, so the queue counts them where it ends them."""
    async with corral.Pool(1) as pool:
        with pytest.raises(corral.WorkerLostError):
            await bounded(pool.run(tasks.exit_now, 3))
        with pytest.raises(corral.TimeLimitExceeded):
            await bounded(pool.run(tasks.sleep, 30, time_limit=0.2))
        assert await bounded(pool.run(tasks.square, 3)) == 9
        stats = pool.stats()
    assert (stats.calls, stats.failed) == (3, 2)


async def test_stats_print_as_a_table() -> None:
    async with corral.Pool(2) as pool:
        await bounded(pool.map(tasks.square, range(20), chunksize=1))
        text = str(pool.stats())
    lines = text.splitlines()
    assert lines[0].startswith("2 workers, 0 queued, 0 in flight, 20 calls (0 failed)")
    assert lines[2].split() == [
        "worker",
        "kind",
        "pid",
        "state",
        "done",
        "busy",
        "s",
        "idle",
        "s",
        "rss",
        "MiB",
    ]
    assert sum(1 for line in lines if " process " in line) == 2
    for name in ("queue wait", "transfer", "run"):
        assert any(line.startswith(name) for line in lines)


def test_percentiles() -> None:
    p = Percentiles.of(float(i) for i in range(1, 101))
    assert (p.count, p.p50, p.p90, p.p99, p.max) == (100, 51.0, 91.0, 100.0, 100.0)
    assert Percentiles.of([]) == Percentiles(0, 0.0, 0.0, 0.0, 0.0)


class _Cells(HTMLParser):
    """The text of each paragraph and each table row of an HTML page, cells apart."""

    def __init__(self) -> None:
        super().__init__()  # convert_charrefs: the text comes unescaped
        self.rows: list[list[str]] = []
        self.tags: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag in ("p", "tr"):
            self.rows.append([])
        if tag in ("p", "th", "td"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("p", "th", "td") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def html_lines(page: str) -> list[str]:
    """An HTML stats page as lines of words: its summary, then each row of its tables."""
    parser = _Cells()
    parser.feed(page)
    parser.close()
    return [" ".join(" ".join(row).split()) for row in parser.rows]


def text_lines(text: str) -> list[str]:
    """A text stats table as lines of words (the blank lines between tables left out)."""
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def a_snapshot(name: str = "process-1", state: str = "idle") -> QueueStats:
    """Stats made by hand: a process worker and a thread worker, with known numbers."""
    timing = Percentiles(3, 0.001, 0.002, 0.003, 0.004)
    return QueueStats(
        workers=(
            WorkerStats(
                name=name,
                kind="process",
                pid=1234,
                state=state,
                series=None,
                tasks_done=5000,
                in_flight=0,
                busy=1.5,
                idle=0.25,
                rss=30 * 2**20,
            ),
            WorkerStats(
                name="thread-1",
                kind="thread",
                pid=None,
                state="busy",
                series=("a",),
                tasks_done=7,
                in_flight=1,
                busy=0.0,
                idle=2.0,
                rss=None,
            ),
        ),
        queued=4,
        in_flight=1,
        calls=5007,
        failed=2,
        wait=timing,
        transfer=timing,
        run=timing,
        rss=100 * 2**20,
    )


def test_html_shows_the_cells_of_the_text() -> None:
    """The HTML view has the summary as a paragraph and one table row per line of the
    text tables, with the same words in the same order, a header row of ``th`` cells,
    and right-aligned numbers."""
    stats = a_snapshot()
    page = stats._repr_html_()
    assert html_lines(page) == text_lines(str(stats))
    assert html_lines(page)[:3] == [
        "2 workers, 4 queued, 1 in flight, 5,007 calls (2 failed), parent rss 100.0 MiB",
        "worker kind pid state done busy s idle s rss MiB",
        "process-1 process 1234 idle 5,000 1.500 0.250 30.0",
    ]
    assert page.count("<table>") == 2
    assert page.count("<th ") == 8 + 5
    assert '<td style="text-align: right">1.500</td>' in page


def test_html_escapes_every_cell() -> None:
    """A worker name or state holding markup is shown as text, not interpreted: no tag
    or entity of it reaches the page unescaped, and the page still reads as the text."""
    name = '<script>alert("x")</script> & co'
    stats = a_snapshot(name=name, state="<b>idle</b>")
    page = stats._repr_html_()
    assert "<script>" not in page
    assert "<b>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co" in page
    assert html_lines(page) == text_lines(str(stats))
    parser = _Cells()
    parser.feed(page)
    assert set(parser.tags) == {"div", "p", "table", "thead", "tbody", "tr", "th", "td"}


async def test_html_of_a_live_pool_matches_its_text() -> None:
    """A real pool's stats render as HTML with the same cells as their text."""
    async with corral.Pool(2) as pool:
        await bounded(pool.map(tasks.square, range(20), chunksize=1))
        stats = pool.stats()
    assert html_lines(stats._repr_html_()) == text_lines(str(stats))


def test_ipython_shows_the_text_table() -> None:
    """IPython's plain-text view of the stats (a terminal IPython, a notebook's text/plain)
    is the table ``str()`` gives, not the dataclass's long repr."""
    from IPython.lib.pretty import pretty

    stats = a_snapshot()
    assert pretty(stats) == str(stats)
