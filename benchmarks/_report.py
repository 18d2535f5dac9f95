"""The report of one run: the rows of the table, its cells, and the A/B comparison.

A measurement that calls the user's functions (``_measure.VARIED``) gives one row per
place the function comes from: the script's own ``__main__`` and an importable module.
Its results are kept under the case ``"measurement:main"`` or ``"measurement:module"``;
the other measurements under their own name.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from ._libs import adapter
from ._measure import FULL, QUICK, VARIED

# Where the function of a varied measurement comes from, as the row's label says it.
FUNCTION_LABELS = {"main": "__main__ fn", "module": "module fn"}


@dataclass(frozen=True)
class Row:
    """One line of the table: a metric of a case and which way is better."""

    case: str
    metric: str
    label: str
    higher_is_better: bool
    digits: int = 0


def case_key(measurement: str, functions: str) -> str:
    """Where the results of a measurement with functions from ``functions`` are kept."""
    return f"{measurement}:{functions}" if measurement in VARIED else measurement


def rows(quick: bool) -> list[Row]:
    """Every row the report can have, in its order; a varied metric's rows side by side."""
    sizes = QUICK if quick else FULL
    mib = sizes.payload_mib
    metrics = [
        ("latency", "median_us", "round trip of add_one, median (µs)", False, 0),
        ("latency", "floor_median_us", "raw pipe floor in the same runs, median (µs)", False, 0),
        (
            "latency",
            "loop_floor_median_us",
            "pipe floor awaited on the event loop, median (µs)",
            False,
            0,
        ),
        ("latency", "p99_us", "round trip of add_one, p99 (µs)", False, 0),
        ("latency", "floor_p99_us", "raw pipe floor in the same runs, p99 (µs)", False, 0),
        ("submit", "calls_per_s", f"{sizes.submit_calls:,} submits + gather (calls/s)", True, 0),
        ("submit", "run_calls_per_s", f"gather of {sizes.submit_calls:,} run() (calls/s)", True, 0),
        ("map", "calls_per_s", f"map of {sizes.map_items:,} (calls/s)", True, 0),
        ("imap", "ordered_per_s", f"imap of {sizes.map_items:,}, ordered (items/s)", True, 0),
        ("imap", "unordered_per_s", f"imap of {sizes.map_items:,}, unordered (items/s)", True, 0),
        ("payload", "arg_mib_s", f"{mib} MiB bytes argument (MiB/s)", True, 0),
        ("payload", "result_mib_s", f"{mib} MiB bytes result, made by the task (MiB/s)", True, 0),
        ("payload", "array_arg_mib_s", f"{mib} MiB ndarray argument (MiB/s)", True, 0),
        (
            "payload",
            "array_result_mib_s",
            f"{mib} MiB ndarray result, made by the task (MiB/s)",
            True,
            0,
        ),
        (
            "overhead",
            "overhead_ms",
            f"{sizes.busy_tasks} CPU tasks of {sizes.busy_seconds * 1e3:g} ms: overhead per task"
            " (ms)",
            False,
            2,
        ),
        ("efficiency", "efficiency_pct", f"efficiency, {sizes.sleep_tasks} sleeps (%)", True, 1),
        ("death", "error_ms", "death → caller gets error (ms)", False, 1),
        ("death", "served_ms", "death → next call served (ms)", False, 1),
        ("startup", "startup_ms", "start-up → first call (ms)", False, 1),
        (
            "limit",
            "late_ms",
            f"hard limit {sizes.time_limit:g} s: error past the limit (ms)",
            False,
            1,
        ),
        ("replace", "served_ms", "1 worker: death → new worker serves (ms)", False, 1),
    ]
    out = []
    for measurement, metric, label, higher, digits in metrics:
        if measurement not in VARIED:
            out.append(Row(measurement, metric, label, higher, digits))
            continue
        for f, where in FUNCTION_LABELS.items():
            out.append(Row(f"{measurement}:{f}", metric, f"{label}, {where}", higher, digits))
    return out


@dataclass
class Cell:
    """What the runs of one (library, measurement) produced."""

    metrics: dict[str, Any] = field(default_factory=dict)  # the best run of each number
    runs: dict[str, list[float]] = field(default_factory=dict)  # every run, in order
    notes: list[str] = field(default_factory=list)
    failed_runs: int = 0
    problem: str | None = None  # "timeout (>60 s)", "crashed: ...": no numbers
    start_method: str | None = None
    version: str | None = None
    seconds: float = 0.0


def best(values: list[float], higher_is_better: bool) -> float:
    return max(values) if higher_is_better else min(values)


def fmt(value: float, digits: int) -> str:
    return f"{value:,.{digits}f}"


def ratio(value: float, base: float) -> str:
    if base == 0:
        return "—"
    r = value / base
    if r < 0.1:
        return f"{r:.2g}x"
    return f"{r:.2f}x" if r < 10 else f"{r:,.0f}x"


def render_cell(row: Row, cell: Cell | None, base: Cell | None, is_base: bool) -> str:
    if cell is None:
        return "—"
    if cell.problem:
        return cell.problem.split(":")[0].split(" (")[0]  # the whole story is in the notes
    value = cell.metrics.get(row.metric)
    if row.metric == "error_ms" and cell.metrics.get("fate") == "lost":
        return "hangs (task lost)"
    if not isinstance(value, int | float):
        return str(cell.metrics.get(f"{row.metric}_why", "—"))  # why there is no number
    text = fmt(value, row.digits)
    base_value = base.metrics.get(row.metric) if base and not base.problem else None
    if is_base or not isinstance(base_value, int | float):
        return text
    return f"{text} ({ratio(value, base_value)})"


def table(results: dict[str, dict[str, Cell]], libs: list[str], quick: bool) -> str:
    base_key = libs[0] if libs[0].startswith("corral") else None
    head = ["measurement", "better"] + [adapter(k).title for k in libs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows(quick):
        cells = results.get(row.case, {})
        if not any(row.metric in c.metrics or c.problem for c in cells.values()):
            continue  # not measured in this run (numpy missing, say)
        base = cells.get(base_key) if base_key else None
        shown = [render_cell(row, cells.get(k), base, k == base_key) for k in libs]
        better = "higher" if row.higher_is_better else "lower"
        lines.append("| " + " | ".join([row.label, better, *shown]) + " |")
    return "\n".join(lines)


def change(new: float, old: float, higher_is_better: bool) -> str:
    """How much worse or better ``new`` is than ``old``: the share of throughput lost, or
    the share by which a time grew."""
    loss = 1 - new / old if higher_is_better else new / old - 1
    return f"{abs(loss):.1%} {'worse' if loss > 0 else 'better'}"


def comparison(
    results: dict[str, dict[str, Cell]], pairs: list[tuple[str, str]], quick: bool
) -> str:
    """Each corral against an earlier revision of itself measured beside it, and every run.

    Three views of the change, since the machine is noisy: between the best runs, between
    the median runs, and the median of the changes between the two runs of each round (run
    i of one against run i of the other, made one after the other, so in about the same
    state of the machine).
    """
    tables = []
    for new, old in pairs:
        this = new if "@" in new else f"{new} (the working tree)"
        lines = [
            f"{this} against {old}: best (median) of the runs, and how much worse or better"
            f" {new} is.",
            "",
            f"| measurement | better | {old} | {new} | change, best | change, median"
            f" | change, round by round | {old}, every run | {new}, every run |",
            "|" + "---|" * 9,
        ]
        for row in rows(quick):
            before = results.get(row.case, {}).get(old)
            after = results.get(row.case, {}).get(new)
            if not (before and after and row.metric in before.runs and row.metric in after.runs):
                continue
            a, b = before.runs[row.metric], after.runs[row.metric]
            up = row.higher_is_better
            ma, mb = statistics.median(a), statistics.median(b)
            by_round = "—"  # unless every run of both worked: else the rounds do not line up
            if before.failed_runs == after.failed_runs == 0 and len(a) == len(b):
                ratios = [y / x for x, y in zip(a, b, strict=True)]
                by_round = change(statistics.median(ratios), 1.0, up)
            d = row.digits
            lines.append(
                f"| {row.label} | {'higher' if up else 'lower'}"
                f" | {fmt(best(a, up), d)} ({fmt(ma, d)}) | {fmt(best(b, up), d)} ({fmt(mb, d)})"
                f" | {change(best(b, up), best(a, up), up)} | {change(mb, ma, up)} | {by_round}"
                f" | {', '.join(fmt(v, d) for v in a)} | {', '.join(fmt(v, d) for v in b)} |"
            )
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def library_notes(results: dict[str, dict[str, Cell]], libs: list[str]) -> str:
    lines = ["| library | version | start method | notes |", "|---|---|---|---|"]
    for key in libs:
        cells = [c for m in results.values() if (c := m.get(key))]
        version = next((c.version for c in cells if c.version), "?")
        method = next((c.start_method for c in cells if c.start_method), "?")
        notes: list[str] = []
        for measurement, by_lib in results.items():
            cell = by_lib.get(key)
            if cell is None:
                continue
            if cell.problem:
                notes.append(f"{measurement}: {cell.problem}")
            if measurement == "death" and cell.metrics.get("error"):
                notes.append(f"death: the dying call raised {cell.metrics['error']}")
            if measurement == "limit" and cell.metrics.get("error"):
                m = cell.metrics
                notes.append(
                    f"limit: the stuck call raised {m['error']}; worst {m['late_max_ms']:.1f} ms"
                    f" past the limit; stuck worker gone {m['killed']}; submit → task start"
                    f" {m['start_delay_ms']:.1f} ms"
                )
            if measurement == "replace" and "served_ms" in cell.metrics:
                m = cell.metrics
                notes.append(
                    f"replace: the dying call: {m.get('error', '?')}; slowest replacement"
                    f" {m['served_max_ms']:.1f} ms"
                )
            notes += [f"{measurement}: {n}" for n in cell.notes]
        lines.append(f"| {adapter(key).title} | {version} | {method} | {'; '.join(notes)} |")
    return "\n".join(lines)


def value(results: dict[str, dict[str, Cell]], case: str, lib: str, metric: str) -> float | None:
    """A number of the run (the best of its runs), or None where it was not measured."""
    cell = results.get(case, {}).get(lib)
    number = cell.metrics.get(metric) if cell and not cell.problem else None
    return float(number) if isinstance(number, int | float) else None
