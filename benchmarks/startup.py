"""Start-up: the first answer from a fresh process's first pool, as a script writes it.

Run it as users run their scripts (a fresh interpreter per run, the default start method)::

    .venv/bin/python benchmarks/startup.py [--runs 9] [--no-bytecode] [--against SRC]

It prints each run and the medians of the split: import (``import asyncio`` and
``import corral``), pool up (``async with corral.Pool(2)`` entered) and first answer (the
result of the first ``pool.run``), the last counted from the first import, so the
interpreter's own start, the same for every library, is left out. Top-level code is only
what it measures: the workers run this file again as their main module, so the driver
imports nothing there.

Bytecode: an installed package has its modules compiled (pip writes the ``.pyc`` files),
so by default the runs read compiled modules from a private cache (``PYTHONPYCACHEPREFIX``
in a temporary folder, filled by one untimed run), whatever ``PYTHONDONTWRITEBYTECODE``
says. ``--no-bytecode`` runs with the environment as it is; where it sets
``PYTHONDONTWRITEBYTECODE`` (as this project's machines do) corral is compiled from source
in every process, the parent's and the forkserver's, which costs tens of milliseconds.

``--against SRC`` measures another checkout of corral (its ``src`` folder, put first on
``PYTHONPATH``) in runs alternating with this one, so that the machine's load hits both
alike: an A/B.
"""

import time

t0 = time.perf_counter()
import asyncio  # noqa: E402

import corral  # noqa: E402

t1 = time.perf_counter()


def f(x: int) -> int:
    """The task: a function of the script's own, as most programs write theirs."""
    return x + 1


async def main() -> tuple[float, float]:
    """Start the first pool, get the first answer, close."""
    async with corral.Pool(2) as pool:
        t2 = time.perf_counter()
        assert await pool.run(f, 1) == 2
        t3 = time.perf_counter()
    return t2, t3


def _once() -> None:
    """One measurement, in this fresh process: one line of milliseconds."""
    t2, t3 = asyncio.run(main())
    print(f"{1000 * (t1 - t0):.1f} {1000 * (t2 - t1):.1f} {1000 * (t3 - t0):.1f}")


def _drive() -> None:
    """Run this file in fresh interpreters, one after the other, and print the medians."""
    import argparse
    import os
    import statistics
    import subprocess
    import sys
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=9, help="fresh processes each (default 9)")
    parser.add_argument(
        "--no-bytecode", action="store_true", help="the environment's bytecode setting as is"
    )
    parser.add_argument("--against", metavar="SRC", help="another corral's src folder: an A/B")
    args = parser.parse_args()

    def run(env: dict[str, str]) -> list[float]:
        done = subprocess.run(
            [sys.executable, __file__, "--once"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode:
            sys.exit(f"a run failed:\n{done.stderr}")
        return [float(v) for v in done.stdout.split()]

    with tempfile.TemporaryDirectory(prefix="corral-startup-") as cache:
        env = dict(os.environ)
        if not args.no_bytecode:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = cache
        variants = {"this corral": env}
        if args.against:
            other = Path(args.against).resolve()
            paths = [str(other), *filter(None, [env.get("PYTHONPATH")])]
            variants[f"corral in {other}"] = {**env, "PYTHONPATH": os.pathsep.join(paths)}
        for variant in variants.values():
            if not args.no_bytecode:
                run(variant)  # fills the cache, untimed
        rows: dict[str, list[list[float]]] = {name: [] for name in variants}
        for _ in range(args.runs):
            for name, variant in variants.items():
                row = run(variant)
                rows[name].append(row)
                print(
                    f"{name}: import {row[0]:6.1f} ms, pool up {row[1]:6.1f} ms, "
                    f"first answer at {row[2]:6.1f} ms"
                )
    mode = "no bytecode cache" if args.no_bytecode else "compiled modules"
    print(f"medians of {args.runs} runs, Python {sys.version.split()[0]}, {mode}:")
    for name, found in rows.items():
        imp, up, first = (statistics.median(column) for column in zip(*found, strict=True))
        fastest = min(row[2] for row in found)  # the least disturbed by the machine's load
        print(
            f"  {name}: import {imp:.0f} ms, pool up {up:.0f} ms, first answer at {first:.0f} ms"
            f" (fastest {fastest:.0f} ms)"
        )


if __name__ == "__main__":
    import sys
    from pathlib import Path

    if sys.argv[1:] == ["--once"]:
        _once()
    else:
        _drive()
