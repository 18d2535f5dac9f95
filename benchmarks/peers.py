"""corral against its peers, measured side by side in one run.

    python -m benchmarks.peers                    # everything (a few minutes on 2 cores)
    python -m benchmarks.peers --quick            # a smoke run (well under a minute)
    python -m benchmarks.peers --only latency,submit --libs corral,ppe
    python -m benchmarks.peers --only limit,replace    # time limits: corral, pebble, billiard
    python -m benchmarks.peers --baseline f045384 --only latency,submit,map --libs corral
    python -m benchmarks.peers --only latency,submit --functions main --repeats 1

Every (library, measurement) runs in a fresh process (``benchmarks/_script.py``, run by
path as users run a script, measuring through ``benchmarks._measure``) under a time limit,
in a process group of its own that is killed afterwards, so no library's leftovers or
hangs reach the next one. The measurements that call a user's function (latency, submits,
map, imap, payloads, overhead, start-up) run twice, with the function defined in that
script's own ``__main__`` and in an importable module (``--functions``), each its own row.
Fast measurements run several times; the table shows the best run of each number, because
noise on a shared machine only ever slows a run down. Every pool has 2 workers and its
library's default start method. The report ends with corral's targets (``_targets``),
checked against this run's own numbers.

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
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import _targets
from ._adapter import WORKERS
from ._libs import ADAPTERS, DEFAULT_LIBS, adapter
from ._measure import FULL, FUNCTIONS, LIMITED, MEASUREMENTS, QUICK, VARIED
from ._report import Cell, best, case_key, comparison, library_notes, rows, table
from ._revisions import short_commit, worktree

ROOT = Path(__file__).resolve().parent.parent

# Runs per (library, measurement) in full mode, and the time limit of one run (seconds).
REPEATS = {
    "latency": 3,
    "submit": 3,
    "map": 1,
    "imap": 1,
    "payload": 1,
    "overhead": 2,  # CPU-bound: any other load on the cores inflates one run
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
    "imap": 180,
    "payload": 90,
    "overhead": 90,
    "efficiency": 60,
    "death": 60,
    "startup": 60,
    "limit": 60,
    "replace": 60,
}
QUICK_TIMEOUT = 30
# Fresh processes running benchmarks/startup.py (where it exists) for the start-up target.
SCRIPT_STARTUPS = 5


def applies(measurement: str, lib: str) -> bool:
    """Whether a measurement is run for a library: the time-limit ones need the feature,
    imap a library that has one."""
    if measurement in LIMITED:
        return adapter(lib).time_limits
    return measurement != "imap" or adapter(lib).has_imap


def run_one(
    lib: str, measurement: str, functions: str, *, quick: bool, loop: str, timeout: float
) -> dict[str, Any]:
    """One measurement in a fresh process; returns its JSON, or {"problem": ...}."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "_script.py"), lib, measurement]
    cmd += ["--functions", functions, "--loop", loop]
    if quick:
        cmd.append("--quick")
    return run_fresh(cmd, timeout)


def run_fresh(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run cmd from the repository root; its last JSON line, or {"problem": ...}.

    Output goes to a file, not a pipe: a worker left behind would hold a pipe open. The
    whole process group is killed at the end, whatever happened.
    """
    # The script runs by path: the package it measures through comes from PYTHONPATH.
    inherited = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [inherited])])}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True
        )
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


def measure(
    libs: list[str], measurement: str, functions: str, args: argparse.Namespace
) -> dict[str, Cell]:
    """All runs of one measurement for the libraries, reduced to the best of each number.

    The runs are interleaved (each library's first run, then each one's second, ...), so
    that a slow spell of the shared machine does not fall on one library's runs alone.
    """
    repeats = args.repeats or (1 if args.quick else REPEATS[measurement])
    timeout = QUICK_TIMEOUT if args.quick else TIMEOUT[measurement]
    case = case_key(measurement, functions)
    direction = {r.metric: r.higher_is_better for r in rows(args.quick) if r.case == case}
    cells = {lib: Cell() for lib in libs}
    runs: dict[str, list[dict[str, Any]]] = {lib: [] for lib in libs}
    for _ in range(repeats):
        for lib in libs:
            cell = cells[lib]
            if cell.problem:  # its first run is lost already: do not wait for more of them
                continue
            started = time.perf_counter()
            result = run_one(
                lib, measurement, functions, quick=args.quick, loop=args.loop, timeout=timeout
            )
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


STARTUP_SCRIPT = ROOT / "benchmarks" / "startup.py"


def compile_once() -> None:
    """Let every process of the run keep its compiled modules, in a cache of the run's own.

    The peers, installed by pip, come compiled; corral, run from a source checkout, would
    be compiled afresh by every fresh process where ``PYTHONDONTWRITEBYTECODE`` is set (as
    on the machine of these runs): 45-80 ms of each start-up row that no installed program
    pays. The first process to import a module compiles it; the rest read the cache."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ.setdefault(
        "PYTHONPYCACHEPREFIX", str(Path(tempfile.gettempdir()) / "corral-bench-pycache")
    )


def script_startups(runs: int) -> list[float] | None:
    """The first answers (ms) of ``benchmarks/startup.py --once``, each in a fresh process:
    a script's first pool, import of corral included. None if it printed no such line. One
    untimed run goes first, to fill the cache of compiled modules."""
    firsts = []
    for i in range(runs + 1):
        done = subprocess.run(
            [sys.executable, str(STARTUP_SCRIPT), "--once"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        fields = done.stdout.split()
        if done.returncode != 0 or len(fields) != 3:
            return None
        if i:
            firsts.append(float(fields[2]))
    return firsts


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
    parser.add_argument(
        "--functions",
        choices=["main", "module", "both"],
        default="both",
        help="where the task functions of latency, submit, map, imap, payload, overhead and"
        " startup are defined: the measuring script's __main__, an importable module, or both"
        " (each its own row; default both)",
    )
    parser.add_argument("--repeats", type=int, help="runs per cell (default: per measurement)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    compile_once()

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
    functions = list(FUNCTIONS) if args.functions == "both" else [args.functions]
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
        say(f"skipping {adapter(key).title}: none of {','.join(measurements)} applies to it\n")
    started = time.perf_counter()
    results: dict[str, dict[str, Cell]] = {}
    startups: list[float] | None = None
    for measurement in measurements:
        for f in functions if measurement in VARIED else ["module"]:
            case = case_key(measurement, f)
            results[case] = measure(
                [k for k in libs if applies(measurement, k)], measurement, f, args
            )
            for key, cell in results[case].items():
                shown = cell.problem or ", ".join(
                    f"{k}={v:,.1f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in cell.metrics.items()
                )
                say(f"  {case:<16} {adapter(key).title:<22} {cell.seconds:6.1f} s  {shown}\n")
        if measurement == "startup" and "corral" in libs and STARTUP_SCRIPT.exists():
            startups = script_startups(args.repeats or (3 if args.quick else SCRIPT_STARTUPS))
            say(f"  benchmarks/startup.py, first answer (ms): {startups}\n")
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
    print(
        "Task functions: "
        + " and ".join(
            {
                "main": "defined in the measuring script's __main__ (`__main__ fn` rows)",
                "module": "imported from benchmarks._tasks (`module fn` rows)",
            }[f]
            for f in functions
        )
        + "; every task makes its result."
    )
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
    checks = _targets.report(results, libs, functions, startups)
    if checks:
        print("\n" + checks)
    if skipped:
        print("\nNot installed, skipped: " + ", ".join(adapter(k).title for k in skipped))
    if args.json:
        raw = {m: {k: vars(c) for k, c in cells.items()} for m, cells in results.items()}
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "quick": args.quick,
                    "loop": args.loop,
                    "results": raw,
                    "startup_script_ms": startups,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
