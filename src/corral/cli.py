"""The ``corral`` command.

    corral mandelbrot       render mandelbrot.png on every core and say how much faster
                            that was than one worker

Each job is a subcommand with its own options; ``main`` parses, runs it, and turns the
failures a user can cause (a bad option, an unwritable path, Ctrl-C) into one line on
stderr and an exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import corral

from . import _mandelbrot as mb

if TYPE_CHECKING:
    from collections.abc import Sequence

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C

# Defaults of `corral mandelbrot`, sized so that on a 2-core machine the one-worker
# baseline plus the parallel render take about 15 s: long enough that pool start-up and
# per-job costs are a small part of the time, short enough for a demo.
WIDTH, HEIGHT, MAX_ITER = 1600, 1200, 512
# 80 px tiles cut the default image into 300 jobs: enough that the costly tiles along the
# set's edge spread evenly over the workers, few enough that per-job costs stay invisible.
TILE = 80

EPILOG = """\
examples:
  corral mandelbrot                      all cores, timed against one worker first
  corral mandelbrot --workers 4 -o m.png four worker processes, written to m.png
  corral mandelbrot --no-baseline --max-iter 2000
                                         skip the one-worker run; sharper edges
  corral mandelbrot | tee timings.txt    no progress bar when stdout is not a terminal
  python -m corral mandelbrot --help     the same command, without the script
"""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the option, plus a hint."""

    def error(self, message: str) -> NoReturn:
        self.exit(
            EXIT_USAGE,
            f"{self.prog}: error: {message}\nTry '{self.prog} --help' for more information.\n",
        )


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default and keeps the epilog's examples as written."""


def _positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1, with a message that says so."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``corral`` and of each of its subcommands."""
    parser = _Parser(
        prog="corral",
        description="corral: an asyncio-native process pool. Commands to see it work.",
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"corral {corral.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    mandel = commands.add_parser(
        "mandelbrot",
        help="render the Mandelbrot set on every core, timed against one worker",
        description=(
            "Render the Mandelbrot set to a PNG, one job per tile, on a pool of worker "
            "processes; then print the wall time, the speed-up over a one-worker render of "
            "the same image, and how many tiles each worker computed."
        ),
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
    )
    mandel.add_argument("--width", type=_positive_int, default=WIDTH, help="image width, px")
    mandel.add_argument("--height", type=_positive_int, default=HEIGHT, help="image height, px")
    mandel.add_argument(
        "--max-iter",
        type=_positive_int,
        default=MAX_ITER,
        help="iterations before a point counts as inside the set (detail and cost)",
    )
    mandel.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="worker processes (default: one per CPU this process may use)",
    )
    mandel.add_argument("--tile", type=_positive_int, default=TILE, help="tile size, px")
    mandel.add_argument(
        "-o", "--output", type=Path, default=Path("mandelbrot.png"), help="the PNG to write"
    )
    mandel.add_argument(
        "--no-baseline",
        dest="baseline",
        action="store_false",
        help="skip the one-worker render, so no speed-up is measured",
    )
    mandel.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar (default: only when stdout is a terminal)",
    )
    mandel.set_defaults(run=_mandelbrot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``corral`` command with argv (default: ``sys.argv[1:]``); the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("corral: error: name a command, e.g. 'corral mandelbrot'", file=sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        print("corral: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout went away (`corral ... | head -1`). Point stdout at devnull
        # so the interpreter's final flush does not raise a second time at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except (corral.CorralError, OSError) as exc:
        print(f"corral: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


# -- corral mandelbrot ----------------------------------------------------------------------


@dataclass
class _Render:
    """How one render went: its time and which worker computed how many tiles."""

    workers: int
    seconds: float = 0.0
    tiles_by_worker: Counter[str] = field(default_factory=Counter)


def _check_writable(path: Path) -> None:
    """Fail before rendering, not after, if the PNG could not be written."""
    folder = path.parent if str(path.parent) else Path()
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a directory")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {path}: no directory {folder}")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PermissionError(f"cannot write {path}: permission denied")


def _mandelbrot(args: argparse.Namespace) -> int:
    """``corral mandelbrot``: render, time, compare with one worker, write the PNG."""
    _check_writable(args.output)
    workers = args.workers or len(os.sched_getaffinity(0))
    view = mb.View.full_set(args.width, args.height, args.max_iter)
    tiles = mb.tiles(args.width, args.height, args.tile)
    console = Console()
    show = console.is_terminal if args.progress is None else args.progress
    columns = (
        TextColumn("{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tiles"),
        TimeElapsedColumn(),
    )
    # auto_refresh=False: the bar is redrawn as each tile lands, by the loop itself, so
    # rich starts no refresh thread to compete with the workers for the CPUs.
    with Progress(*columns, console=console, disable=not show, auto_refresh=False) as progress:
        baseline = None
        if args.baseline and workers > 1:
            reference = mb.Canvas(args.width, args.height)
            baseline = asyncio.run(_render(view, tiles, 1, reference, progress))
        canvas = mb.Canvas(args.width, args.height)
        render = asyncio.run(_render(view, tiles, workers, canvas, progress))
    if baseline is not None and reference.rgb != canvas.rgb:
        # Both renders compute the same pixels; a difference means a tile went astray.
        print("corral: warning: the image differs from the one-worker render", file=sys.stderr)
    if baseline is None and args.baseline:
        baseline = render  # one worker: the render is its own baseline
    png = mb.encode_png(args.width, args.height, canvas.rgb)
    args.output.write_bytes(png)
    _summary(args, len(tiles), render, baseline, len(png))
    return 0


async def _render(
    view: mb.View, tiles: list[mb.Tile], workers: int, canvas: mb.Canvas, progress: Progress
) -> _Render:
    """Render every tile on a new pool of workers, pasting each as soon as it is done.

    The clock runs from the first submit to the last tile, after the workers have started,
    so the one-worker and the n-worker renders are timed alike.
    """
    plural = "worker" if workers == 1 else "workers"
    label = f"{workers} {plural}" + (" (baseline)" if workers == 1 else "")
    task = progress.add_task(label, total=len(tiles))
    progress.refresh()
    result = _Render(workers)
    async with corral.Pool(workers) as pool:
        names = {w.pid: f"{w.name} (pid {w.pid})" for w in pool.workers}
        started = time.perf_counter()
        jobs = [pool.submit(mb.render_tile, view, tile) for tile in tiles]
        try:
            for next_done in asyncio.as_completed([job.future for job in jobs]):
                rendered: mb.RenderedTile = await next_done
                canvas.paste(rendered)
                name = names.get(rendered.pid) or _name_of(pool, rendered.pid)
                result.tiles_by_worker[name] += 1
                progress.advance(task)
                progress.refresh()
        except BaseException:
            # Leaving `async with` drains the queue; on Ctrl-C or an error nobody wants
            # the remaining tiles. Cancel them first (terminate() would fail each one with
            # an error that nobody retrieves, and asyncio would log every one), then kill
            # the workers instead of waiting for the tiles they hold.
            for job in jobs:
                job.cancel()
            await pool.terminate()
            raise
        result.seconds = time.perf_counter() - started
    return result


def _name_of(pool: corral.Pool, pid: int) -> str:
    """A worker's name and pid, or only the pid of one that has already been replaced."""
    for worker in pool.workers:
        if worker.pid == pid:
            return f"{worker.name} (pid {pid})"
    return f"pid {pid}"


def _summary(
    args: argparse.Namespace, n_tiles: int, render: _Render, baseline: _Render | None, size: int
) -> None:
    """Print what was rendered, how fast, and how the tiles were shared."""
    plural = "worker" if render.workers == 1 else "workers"
    print(
        f"mandelbrot {args.width}x{args.height}, max-iter {args.max_iter}, "
        f"{n_tiles} tiles of up to {args.tile}x{args.tile} px"
    )
    print(f"  wall time   {render.seconds:7.2f} s on {render.workers} {plural}")
    if baseline is None:
        print("  speed-up    not measured (--no-baseline)")
    else:
        speedup = baseline.seconds / render.seconds if render.seconds > 0 else float("nan")
        print(f"  baseline    {baseline.seconds:7.2f} s on 1 worker")
        print(f"  speed-up    {speedup:7.2f}x over one worker (ideal {render.workers}x)")
    print("  tiles per worker:")
    width = max(len(name) for name in render.tiles_by_worker)
    for name, count in sorted(render.tiles_by_worker.items()):
        print(f"    {name:<{width}}  {count:5d}  ({100 * count / n_tiles:.0f}%)")
    print(f"wrote {args.output} ({size / 1e6:.1f} MB)")
