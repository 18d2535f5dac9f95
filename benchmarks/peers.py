"""corral against its peers, measured side by side in one run.

    python -m benchmarks.peers                    # everything (a few minutes on 2 cores)
    python -m benchmarks.peers --quick            # a smoke run (well under a minute)
    python -m benchmarks.peers --only latency,submit --libs corral,ppe
    python -m benchmarks.peers --only limit,replace    # time limits: corral, pebble, billiard
    python -m benchmarks.peers --baseline f045384 --only latency,submit,map --libs corral

Every (library, measurement) runs in a fresh process (``benchmarks._measure``) under a
time limit, in a process group of its own that is killed afterwards, so no library's
leftovers or hangs reach the next one. Fast measurements run several times; the table
shows the best run of each number, because noise on a shared machine only ever slows a
run down. Every pool has 2 workers and its library's default start method.

``limit`` and ``replace`` (issue #4) are not in the default run; they are measured only for
the libraries with a per-call hard time limit (corral, pebble, billiard), and billiard, not
a default library, joins when they are asked for without ``--libs``.

``--baseline REV`` also measures ``corral@REV``, corral as committed at REV (see
``_revisions``), next to the working tree's, and reports what changed between them. The
runs of one measurement are interleaved across libraries (A, B, A, B, ...), so a slow spell
of the machine falls on all of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._libs import ADAPTERS, DEFAULT_LIBS, WORKERS, adapter
from ._measure import FULL, LIMITED, MEASUREMENTS, QUICK
from ._revisions import short_commit, worktree

ROOT = Path(__file__).resolve().parent.parent

# Runs per (library, measurement) in full mode, and the time limit of one run (seconds).
REPEATS = {
    "latency": 3,
    "submit": 3,
    "map": 1,
    "payload": 1,
    "efficiency": 1,
    "death": 1,
    "startup": 3,
    "limit": 1,
    "replace": 1,
}
TIMEOUT = {
    "latency": 60,
    "submit": 120,
    "map": 180,
    "payload": 90,
    "efficiency": 60,
    "death": 60,
    "startup": 60,
    "limit": 60,
    "replace": 60,
}
QUICK_TIMEOUT = 30


@dataclass(frozen=True)
class Row:
    """One line of the table: a metric of a measurement and which way is better."""

    measurement: str
    metric: str
    label: str
    higher_is_better: bool
    digits: int = 0


def rows(quick: bool) -> list[Row]:
    sizes = QUICK if quick else FULL
    return [
        Row("latency", "median_us", "no-op round trip, median (µs)", False),
        Row("latency", "p99_us", "no-op round trip, p99 (µs)", False),
        Row("submit", "calls_per_s", f"{sizes.submit_calls:,} submits (calls/s)", True),
        Row("map", "calls_per_s", f"map of {sizes.map_items:,} (calls/s)", True),
        Row("payload", "arg_mib_s", f"{sizes.payload_mib} MiB argument (MiB/s)", True),
        Row("payload", "result_mib_s", f"{sizes.payload_mib} MiB result (MiB/s)", True),
        Row("efficiency", "efficiency_pct", f"efficiency, {sizes.sleep_tasks} sleeps (%)", True, 1),
        Row("death", "error_ms", "death → caller gets error (ms)", False, 1),
        Row("death", "served_ms", "death → next call served (ms)", False, 1),
        Row("startup", "startup_ms", "start-up → first call (ms)", False, 1),
        Row(
            "limit",
            "late_ms",
            f"hard limit {sizes.time_limit:g} s: error past the limit (ms)",
            False,
            1,
        ),
        Row("replace", "served_ms", "1 worker: death → new worker serves (ms)", False, 1),
    ]


def applies(measurement: str, lib: str) -> bool:
    """Whether a measurement is run for a library: the time-limit ones need the feature."""
    return measurement not in LIMITED or adapter(lib).time_limits


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


def run_one(lib: str, measurement: str, quick: bool, loop: str, timeout: float) -> dict[str, Any]:
    """One measurement in a fresh process; returns its JSON, or {"problem": ...}."""
    cmd = [sys.executable, "-m", "benchmarks._measure", lib, measurement, "--loop", loop]
    if quick:
        cmd.append("--quick")
    return run_fresh(cmd, timeout)


def run_fresh(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run cmd from the repository root; its last JSON line, or {"problem": ...}.

    Output goes to a file, not a pipe: a worker left behind would hold a pipe open. The
    whole process group is killed at the end, whatever happened.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            proc.wait()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        out.seek(0)
        err.seek(0)
        lines = [line for line in out.read().splitlines() if line.startswith("{")]
        if lines:
            result: dict[str, Any] = json.loads(lines[-1])
            return result
        if timed_out:
            return {"problem": f"timeout (>{timeout:g} s)"}
        tail = err.read().strip().splitlines()
        return {"problem": f"failed: {tail[-1] if tail else f'exit code {proc.returncode}'}"}


def best(values: list[float], higher_is_better: bool) -> float:
    return max(values) if higher_is_better else min(values)


def measure(libs: list[str], measurement: str, args: argparse.Namespace) -> dict[str, Cell]:
    """All runs of one measurement for the libraries, reduced to the best of each number.

    The runs are interleaved (each library's first run, then each one's second, ...), so
    that a slow spell of the shared machine does not fall on one library's runs alone.
    """
    repeats = args.repeats or (1 if args.quick else REPEATS[measurement])
    timeout = QUICK_TIMEOUT if args.quick else TIMEOUT[measurement]
    direction = {
        r.metric: r.higher_is_better for r in rows(args.quick) if r.measurement == measurement
    }
    cells = {lib: Cell() for lib in libs}
    runs: dict[str, list[dict[str, Any]]] = {lib: [] for lib in libs}
    for _ in range(repeats):
        for lib in libs:
            cell = cells[lib]
            if cell.problem:  # its first run is lost already: do not wait for more of them
                continue
            started = time.perf_counter()
            result = run_one(lib, measurement, args.quick, args.loop, timeout)
            cell.seconds += time.perf_counter() - started
            if "problem" in result:
                cell.failed_runs += 1
                cell.notes.append(f"a run failed: {result['problem']}")
                if not runs[lib]:
                    cell.problem = result["problem"]
                continue
            runs[lib].append(result)
    for lib in libs:
        reduce(cells[lib], runs[lib], direction)
    return cells


def reduce(cell: Cell, runs: list[dict[str, Any]], direction: dict[str, bool]) -> None:
    """Fill a cell from its runs: every number's best, and the numbers of every run."""
    if not runs:
        cell.notes.clear()
        return
    cell.start_method = runs[0]["start_method"]
    cell.version = runs[0]["version"]
    for run in runs:
        cell.notes += [n for n in run["notes"] if n not in cell.notes]
    for key, value in runs[0]["metrics"].items():
        values = [run["metrics"].get(key) for run in runs]
        numbers = [v for v in values if isinstance(v, int | float)]
        if key in direction and len(numbers) == len(values):
            cell.metrics[key] = best(numbers, direction[key])
            cell.runs[key] = numbers
        else:
            cell.metrics[key] = value


# -- the report --------------------------------------------------------------------------


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
        if row.measurement not in results:
            continue
        cells = results[row.measurement]
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
            before = results.get(row.measurement, {}).get(old)
            after = results.get(row.measurement, {}).get(new)
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


def _value(
    results: dict[str, dict[str, Cell]], measurement: str, lib: str, metric: str
) -> float | None:
    cell = results.get(measurement, {}).get(lib)
    value = cell.metrics.get(metric) if cell and not cell.problem else None
    return float(value) if isinstance(value, int | float) else None


def targets(results: dict[str, dict[str, Cell]], libs: list[str]) -> str:
    """corral's goals, each checked against this run: met or missed, and by how much."""
    peers = [k for k in libs if not k.startswith("corral")]
    if "corral" not in libs or not peers:
        return ""
    lines = []

    def check(
        goal: str, ours: float | None, theirs: float | None, factor: float, higher: bool
    ) -> None:
        if ours is None or theirs is None:
            lines.append(f"- [?] {goal}: not measured")
            return
        need = theirs * factor if higher else theirs
        met = ours >= need if higher else ours <= need
        rel = ours / theirs if higher else theirs / ours
        lines.append(
            f"- [{'met' if met else 'MISSED'}] {goal}: corral {ours:,.1f} vs {theirs:,.1f}"
            f" → {rel:.2f}x (needs {factor:g}x)"
        )

    medians = [
        (v, k) for k in peers if (v := _value(results, "latency", k, "median_us")) is not None
    ]
    if medians:
        v, k = min(medians)
        check(
            f"median latency no worse than the best peer's ({adapter(k).title}), µs",
            _value(results, "latency", "corral", "median_us"),
            v,
            1,
            False,
        )
    if "submit" in results:
        sub = _value(results, "submit", "corral", "calls_per_s")
        check(
            "individual submits ≥3x ProcessPoolExecutor, calls/s",
            sub,
            _value(results, "submit", "ppe", "calls_per_s"),
            3,
            True,
        )
        check(
            "individual submits ≥ multiprocessing.Pool, calls/s",
            sub,
            _value(results, "submit", "mp", "calls_per_s"),
            1,
            True,
        )
    if "map" in results:
        check(
            "map ≥ mpire, calls/s",
            _value(results, "map", "corral", "calls_per_s"),
            _value(results, "map", "mpire", "calls_per_s"),
            1,
            True,
        )
    if "payload" in results:
        for metric, what in (("arg_mib_s", "argument"), ("result_mib_s", "result")):
            check(
                f"large {what} ≥2x ProcessPoolExecutor, MiB/s",
                _value(results, "payload", "corral", metric),
                _value(results, "payload", "ppe", metric),
                2,
                True,
            )
    eff = _value(results, "efficiency", "corral", "efficiency_pct")
    if eff is not None:
        ideal = _value(results, "efficiency", "corral", "ideal_pct")
        lines.append(
            f"- [{'met' if eff >= 99 else 'MISSED'}] efficiency ≥99%: corral {eff:.1f}%"
            f" (greedy in-order scheduling with no overhead reaches {ideal:.1f}% on this list)"
        )
    if "limit" in results:
        late = _value(results, "limit", "corral", "late_ms")
        if late is None:
            lines.append("- [?] stuck call's error <50 ms past its hard time limit: not measured")
        else:
            lines.append(
                f"- [{'met' if late < 50 else 'MISSED'}] stuck call's error <50 ms past its"
                f" hard time limit: corral {late:.1f} ms"
            )
    if "replace" in results:
        check(
            "1 worker: death → new worker serves ≤ pebble's, ms",
            _value(results, "replace", "corral", "served_ms"),
            _value(results, "replace", "pebble", "served_ms"),
            1,
            False,
        )
    return "\n".join(lines)


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu}; "
        f"{platform.platform()}; Python {platform.python_version()}"
    )


def corral_revision() -> str:
    """The commit measured, and whether src/ had uncommitted changes: corral moves fast."""

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
            )
        except OSError:
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown commit"
    dirty = " + uncommitted changes in src/" if git("status", "--porcelain", "src") else ""
    return f"corral at {head}{dirty}"


def pin(name: str) -> str:
    """A library name with its git revision (if any) as a short commit hash, and that
    revision's checkout made now rather than by the first process that measures it."""
    revision = adapter(name).revision
    if not revision:
        return name
    try:
        worktree(revision)
        return f"{name.partition('@')[0]}@{short_commit(revision)}"
    except RuntimeError as exc:
        raise RuntimeError(f"{name}: {exc}") from None


def ab_pairs(libs: list[str], baseline: str | None) -> list[tuple[str, str]]:
    """The (library, the same library at an earlier revision) pairs that the report compares.

    With ``--baseline REV``: each corral library named against itself at REV. Without: the
    working tree's corral against each ``corral@REV`` named beside it.
    """
    pairs = []
    for lib in libs:
        key, _, revision = lib.partition("@")
        if baseline and key.startswith("corral") and revision != baseline:
            pairs.append((lib, f"{key}@{baseline}"))
        elif not baseline and revision and key in libs:
            pairs.append((key, lib))
    return pairs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.peers",
        description="corral against its peers: each cell is value (value ÷ corral's).",
    )
    parser.add_argument("--quick", action="store_true", help="small workloads, one run each")
    parser.add_argument(
        "--only",
        help=f"measurements, comma-separated: {','.join(MEASUREMENTS)}"
        f" (default: all but {','.join(LIMITED)})",
    )
    parser.add_argument(
        "--libs",
        help=f"libraries, comma-separated: {','.join(ADAPTERS)}; corral@REV is corral as"
        " committed at git revision REV",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also measure each corral library as committed at git revision REV (corral@REV),"
        " and compare each with it",
    )
    parser.add_argument(
        "--loop",
        choices=["asyncio", "uvloop"],
        default="asyncio",
        help="the event loop of the asyncio-driven libraries",
    )
    parser.add_argument("--repeats", type=int, help="runs per cell (default: per measurement)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)

    measurements = (
        args.only.split(",") if args.only else [m for m in MEASUREMENTS if m not in LIMITED]
    )
    libs = args.libs.split(",") if args.libs else list(DEFAULT_LIBS)
    if not args.libs and any(m in LIMITED for m in measurements):
        libs.append("billiard")
    for name in measurements:
        if name not in MEASUREMENTS:
            parser.error(f"unknown measurement {name!r}; choose from {','.join(MEASUREMENTS)}")
    try:
        libs = list(dict.fromkeys(pin(k) for k in libs))
        baseline = pin(f"corral@{args.baseline}").partition("@")[2] if args.baseline else None
    except (ValueError, RuntimeError) as exc:
        parser.error(str(exc))
    pairs = ab_pairs(libs, baseline)
    if baseline and not pairs:
        parser.error("--baseline compares corral with an earlier corral: --libs must name one")
    libs = list(dict.fromkeys([*libs, *(old for _, old in pairs)]))
    skipped = [k for k in libs if not adapter(k).available()]
    libs = [k for k in libs if k not in skipped]
    unmeasured = [k for k in libs if not any(applies(m, k) for m in measurements)]
    libs = [k for k in libs if k not in unmeasured]
    if not libs:
        parser.error("no library left to measure")
    libs.sort(key=lambda k: (not k.startswith("corral"), list(ADAPTERS).index(k.split("@")[0])))

    revision = corral_revision()  # now: the tree may change while the run goes on
    say = sys.stderr.write
    say(
        f"{machine()}\n{WORKERS} workers per pool, {args.loop} loop, "
        f"{'quick' if args.quick else 'full'} run\n"
    )
    for key in skipped:
        say(f"skipping {adapter(key).title}: not installed\n")
    for key in unmeasured:
        say(f"skipping {adapter(key).title}: no per-call time limit\n")
    started = time.perf_counter()
    results: dict[str, dict[str, Cell]] = {}
    for measurement in measurements:
        results[measurement] = measure(
            [k for k in libs if applies(measurement, k)], measurement, args
        )
        for key, cell in results[measurement].items():
            shown = cell.problem or ", ".join(
                f"{k}={v:,.1f}" if isinstance(v, float) else f"{k}={v}"
                for k, v in cell.metrics.items()
            )
            say(f"  {measurement:<10} {adapter(key).title:<22} {cell.seconds:6.1f} s  {shown}\n")
    elapsed = time.perf_counter() - started

    print(f"\n{machine()}; {revision}")
    print(
        f"{WORKERS} workers per pool; {args.loop} loop; {'quick' if args.quick else 'full'} run"
        f" in {elapsed:.0f} s."
    )
    if not args.quick:
        runs = ", ".join(
            f"{m} {args.repeats or n}" for m, n in REPEATS.items() if m in measurements
        )
        print(f"Each number is the best of its runs (fresh processes): {runs}.")
    sizes = QUICK if args.quick else FULL
    medians = [
        f"{m}: of {n} in one pool"
        for m, n in (("limit", sizes.limit_runs), ("replace", sizes.replace_runs))
        if m in measurements
    ]
    if medians:
        print(f"A run's number is a median ({'; '.join(medians)}).")
    print("Cells: value (value ÷ corral's). 'better' says which way wins: for 'lower',")
    print("a ratio above 1 means corral is faster; for 'higher', below 1 means it is.\n")
    print(table(results, libs, args.quick))
    print()
    ab = comparison(results, pairs, args.quick)
    if ab:
        print(ab + "\n")
    print(library_notes(results, libs))
    checks = targets(results, libs)
    if checks:
        print("\nTargets:\n" + checks)
    if skipped:
        print("\nNot installed, skipped: " + ", ".join(adapter(k).title for k in skipped))
    if args.json:
        raw = {m: {k: vars(c) for k, c in cells.items()} for m, cells in results.items()}
        args.json.write_text(
            json.dumps(
                {"machine": machine(), "quick": args.quick, "loop": args.loop, "results": raw},
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
