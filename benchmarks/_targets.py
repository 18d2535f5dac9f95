"""corral's targets, each checked against the numbers of the run that prints it.

Issue 14's targets come first, each for the task functions of the script's ``__main__`` and
of a module where the run measured both: many small calls (both ways of writing them) at
least 1.5x ``multiprocessing.Pool``, the median round trip within 1.3x the raw pipe floor
measured in the same runs, the overhead per 100 ms task no higher than
``multiprocessing.Pool``'s, and the first answer of a fresh process's first pool within
100 ms. The standing goals of earlier issues follow. Every line says met or MISSED, the two
numbers and their ratio, so a miss says by how much.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._libs import adapter
from ._report import FUNCTION_LABELS, Cell, value

Results = dict[str, dict[str, Cell]]


def _num(x: float) -> str:
    """A number as the table shows it: whole above 100, else to 2 decimals."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.2f}"


class Checks:
    """The lines of the report, one per target."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def ratio(
        self,
        goal: str,
        ours: float | None,
        theirs: float | None,
        *,
        factor: float,
        higher: bool,
        unit: str,
    ) -> None:
        """corral's ``ours`` against ``theirs``: at least ``factor`` times theirs (higher is
        better), or at most ``factor`` times theirs (lower is better)."""
        if ours is None or theirs is None:
            self.lines.append(f"- [?] {goal}: not measured in this run")
            return
        if theirs <= 0 or ours <= 0:
            met = ours >= theirs * factor if higher else ours <= theirs * factor
            self.lines.append(
                f"- [{'met' if met else 'MISSED'}] {goal}: corral {_num(ours)} vs"
                f" {_num(theirs)} {unit} (no ratio: not both above zero)"
            )
            return
        rel = ours / theirs
        met = rel >= factor if higher else rel <= factor
        sign = "≥" if higher else "≤"
        self.lines.append(
            f"- [{'met' if met else 'MISSED'}] {goal}: corral {_num(ours)} vs {_num(theirs)}"
            f" {unit} → {rel:.2f}x (needs {sign}{factor:g}x)"
        )

    def limit(self, goal: str, ours: float | None, most: float, unit: str, how: str) -> None:
        """A number that must not pass ``most``."""
        if ours is None:
            self.lines.append(f"- [?] {goal}: not measured in this run")
            return
        self.lines.append(
            f"- [{'met' if ours <= most else 'MISSED'}] {goal}: {how} {ours:,.1f} {unit}"
            f" → {ours / most:.2f}x the limit"
        )


def issue14(
    results: Results, functions: Sequence[str], script_startup: list[float] | None
) -> list[str]:
    """Issue 14's targets, from this run. ``script_startup``: the first answers (ms) of
    ``benchmarks/startup.py`` in fresh processes, where it was run."""
    checks = Checks()
    for f in functions:
        fn = FUNCTION_LABELS[f]
        mp = value(results, f"submit:{f}", "mp", "calls_per_s")
        for metric, shape in (
            ("calls_per_s", "pool.submit + gather"),
            ("run_calls_per_s", "gather of pool.run"),
        ):
            checks.ratio(
                f"(a) individual submits as {shape}, {fn}, ≥1.5x multiprocessing.Pool's"
                " apply_async",
                value(results, f"submit:{f}", "corral", metric),
                mp,
                factor=1.5,
                higher=True,
                unit="calls/s",
            )
    for f in functions:
        checks.ratio(
            f"(b) median round trip ≤1.3x the raw pipe floor of the same runs,"
            f" {FUNCTION_LABELS[f]}",
            value(results, f"latency:{f}", "corral", "median_us"),
            value(results, f"latency:{f}", "corral", "floor_median_us"),
            factor=1.3,
            higher=False,
            unit="µs",
        )
    for f in functions:
        checks.ratio(
            f"(c) overhead per 100 ms task ≤ multiprocessing.Pool's, {FUNCTION_LABELS[f]}",
            value(results, f"overhead:{f}", "corral", "overhead_ms"),
            value(results, f"overhead:{f}", "mp", "overhead_ms"),
            factor=1,
            higher=False,
            unit="ms",
        )
    if script_startup:
        ordered = sorted(script_startup)
        median = ordered[len(ordered) // 2]
        checks.limit(
            "(d) first answer of a fresh process's first pool ≤100 ms (benchmarks/startup.py,"
            f" {len(ordered)} fresh interpreters, import included; best {ordered[0]:.1f} ms)",
            median,
            100,
            "ms",
            "median",
        )
    for f in functions:
        checks.limit(
            "(d) start-up → first call ≤100 ms (the startup measurement: import of corral"
            f" included, not the interpreter's own), {FUNCTION_LABELS[f]}",
            value(results, f"startup:{f}", "corral", "startup_ms"),
            100,
            "ms",
            "best run",
        )
    return checks.lines


# The standing goals against one peer: (measurement, metric, peer, factor, goal, unit);
# corral's value must be at least factor times the peer's.
PEER_GOALS = (
    ("submit", "calls_per_s", "ppe", 3, "individual submits ≥3x ProcessPoolExecutor", "calls/s"),
    ("map", "calls_per_s", "mpire", 1, "map ≥ mpire", "calls/s"),
    ("payload", "arg_mib_s", "ppe", 2, "large bytes argument ≥2x ProcessPoolExecutor", "MiB/s"),
    ("payload", "result_mib_s", "ppe", 2, "large bytes result ≥2x ProcessPoolExecutor", "MiB/s"),
    (
        "payload",
        "array_arg_mib_s",
        "ppe",
        2,
        "large ndarray argument ≥2x ProcessPoolExecutor",
        "MiB/s",
    ),
    (
        "payload",
        "array_result_mib_s",
        "ppe",
        2,
        "large ndarray result ≥2x ProcessPoolExecutor",
        "MiB/s",
    ),
)


def standing(results: Results, libs: list[str], functions: Sequence[str]) -> list[str]:
    """The goals of earlier issues that issue 14 did not replace."""
    checks = Checks()
    peers = [k for k in libs if not k.startswith("corral")]
    for f in functions:
        fn = FUNCTION_LABELS[f]
        medians = [
            (v, k)
            for k in peers
            if (v := value(results, f"latency:{f}", k, "median_us")) is not None
        ]
        if medians:
            v, k = min(medians)
            checks.ratio(
                f"median round trip no worse than the best peer's ({adapter(k).title}), {fn}",
                value(results, f"latency:{f}", "corral", "median_us"),
                v,
                factor=1,
                higher=False,
                unit="µs",
            )
        for measurement, metric, peer, factor, goal, unit in PEER_GOALS:
            if f"{measurement}:{f}" in results:
                checks.ratio(
                    f"{goal}, {fn}",
                    value(results, f"{measurement}:{f}", "corral", metric),
                    value(results, f"{measurement}:{f}", peer, metric),
                    factor=factor,
                    higher=True,
                    unit=unit,
                )
    eff = value(results, "efficiency", "corral", "efficiency_pct")
    if eff is not None:
        ideal = value(results, "efficiency", "corral", "ideal_pct")
        checks.lines.append(
            f"- [{'met' if eff >= 99 else 'MISSED'}] efficiency ≥99%: corral {eff:.1f}%"
            f" (greedy in-order scheduling with no overhead reaches {ideal:.1f}% on this list)"
        )
    if "limit" in results:
        checks.limit(
            "stuck call's error ≤50 ms past its hard time limit",
            value(results, "limit", "corral", "late_ms"),
            50,
            "ms",
            "corral",
        )
    if "replace" in results:
        checks.ratio(
            "1 worker: death → new worker serves ≤ pebble's",
            value(results, "replace", "corral", "served_ms"),
            value(results, "replace", "pebble", "served_ms"),
            factor=1,
            higher=False,
            unit="ms",
        )
    return checks.lines


def report(
    results: Results,
    libs: list[str],
    functions: Sequence[str],
    script_startup: list[float] | None,
) -> str:
    """The targets section: issue 14's, then the standing goals; empty without corral."""
    if "corral" not in libs:
        return ""
    parts = [
        "Targets of issue 14 (corral with its defaults):",
        *issue14(results, functions, script_startup),
    ]
    others = standing(results, libs, functions)
    if others:
        parts += ["", "Standing goals:", *others]
    return "\n".join(parts)
