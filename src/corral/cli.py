"""The ``corral`` command.

    corral mandelbrot       render mandelbrot.png on every core and say how much faster
                            that was than one worker
    corral bench            run the benchmark of corral against its peers on this
                            machine and print its table

Each job is a subcommand with its own options; ``main`` parses, runs it, and turns the
failures a user can cause (a bad option, an unwritable path, Ctrl-C) into one line on
stderr and an exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import corral

from . import _mandelbrot as mb

if TYPE_CHECKING:
    from collections.abc import Sequence

    from rich.progress import Progress

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
  corral mandelbrot
      render on every core, after timing one worker on the same image
  corral mandelbrot --workers 4 --width 800 --height 600 -o small.png
      four worker processes, a smaller image, written to small.png
  corral mandelbrot --no-baseline --max-iter 2000
      skip the one-worker render; more iterations for sharper edges
  corral mandelbrot | tee timings.txt
      no progress bar when stdout is not a terminal: a clean summary
  python -m corral mandelbrot
      the same command, where the corral script is not on PATH
  corral bench --quick
      corral and its peers side by side, small workloads (about a minute)
  corral bench --only latency,submit --libs corral,ppe,mp
      two measurements, against ProcessPoolExecutor and multiprocessing.Pool
"""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the option, plus a hint."""

    def error(self, message: str) -> NoReturn:
        self.exit(
            EXIT_USAGE,
            f"{self.prog}: error: {message}\nTry '{self.prog} --help' for more information.\n",
        )


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
        usage="%(prog)s [-h] [--version] COMMAND [OPTIONS]",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"corral {corral.__version__}")
    # The command list is written into the description rather than left to argparse,
    # whose layout of subcommands wraps each summary onto a line of its own.
    commands = parser.add_subparsers(dest="command", help=argparse.SUPPRESS)
    summaries: dict[str, str] = {}

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        summaries[name] = summary
        return commands.add_parser(
            name,
            prog=f"corral {name}",
            description=description,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    mandel = command(
        "mandelbrot",
        "render the Mandelbrot set on every core, timed against one worker",
        "Render the Mandelbrot set to a PNG, one job per tile, on a pool of worker\n"
        "processes. Then print the wall time, the speed-up over a one-worker render of\n"
        "the same image, and how many tiles each worker computed.",
    )
    mandel.add_argument(
        "--width",
        type=_positive_int,
        default=WIDTH,
        help="image width in px (default: %(default)s)",
    )
    mandel.add_argument(
        "--height",
        type=_positive_int,
        default=HEIGHT,
        help="image height in px (default: %(default)s)",
    )
    mandel.add_argument(
        "--max-iter",
        type=_positive_int,
        default=MAX_ITER,
        help="iterations before a point counts as inside the set: more gives finer edges "
        "and costs more time (default: %(default)s)",
    )
    mandel.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="worker processes (default: one per CPU this process may use)",
    )
    mandel.add_argument(
        "--tile", type=_positive_int, default=TILE, help="tile size in px (default: %(default)s)"
    )
    mandel.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("mandelbrot.png"),
        help="the PNG to write (default: %(default)s)",
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

    bench = command(
        "bench",
        "run corral and its peers side by side on this machine, print the table",
        "Run the benchmark of a corral source checkout (benchmarks/peers.py): corral,\n"
        "ProcessPoolExecutor, multiprocessing.Pool and the peers installed (pebble, loky,\n"
        "aiomultiprocess, mpire: pip install -e '.[bench]'), each measurement in a fresh\n"
        "process, and print the markdown table with ratios to corral. Options after\n"
        "'bench' go to the runner: 'corral bench --help-runner' lists them.",
    )
    bench.add_argument(
        "--checkout",
        type=Path,
        default=None,
        help="the corral source checkout to run it from (default: the current directory, "
        "else the checkout this corral was installed from)",
    )
    bench.add_argument(
        "--help-runner", action="store_true", help="show the runner's own options and exit"
    )
    bench.set_defaults(run=_bench)

    width = max(map(len, summaries))
    parser.description = "corral: an asyncio-native process pool, and commands to see it work.\n"
    parser.description += "\ncommands:\n" + "".join(
        f"  {name:<{width}}  {summary}\n" for name, summary in summaries.items()
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``corral`` command with argv (default: ``sys.argv[1:]``); the exit status."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and args.command != "bench":  # only bench passes options on
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    args.extra = extra
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


# -- corral bench ---------------------------------------------------------------------------


def _bench(args: argparse.Namespace) -> int:
    """Run the checkout's benchmark runner in a child interpreter, its output passed on."""
    checkout = args.checkout or _find_checkout()
    if checkout is None or not (checkout / "benchmarks" / "peers.py").is_file():
        where = f"{checkout} has no benchmarks/peers.py" if checkout else "no checkout found"
        print(
            f"corral: error: {where}. corral bench runs the benchmarks of a corral source "
            "checkout: run it from the checkout's root, or pass --checkout PATH",
            file=sys.stderr,
        )
        return EXIT_USAGE
    runner = [sys.executable, "-m", "benchmarks.peers"]
    extra = ["--help"] if args.help_runner else args.extra
    return subprocess.run([*runner, *extra], cwd=checkout, check=False).returncode


def _find_checkout() -> Path | None:
    """The current directory if it is a corral checkout, else the checkout an editable
    install of corral points to."""
    for candidate in (Path.cwd(), Path(corral.__file__).resolve().parents[2]):
        if (candidate / "benchmarks" / "peers.py").is_file():
            return candidate
    return None


# -- corral mandelbrot ----------------------------------------------------------------------


@dataclass
class _Render:
    """How one render went: its time and which worker computed how many tiles."""

    workers: int
    seconds: float = 0.0
    tiles_by_worker: Counter[str] = field(default_factory=Counter)


def _check_writable(path: Path) -> None:
    """Fail before rendering, not after, if the PNG could not be written."""
    folder = path.parent
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a directory")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {path}: no directory {folder}")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PermissionError(f"cannot write {path}: permission denied")


def _mandelbrot(args: argparse.Namespace) -> int:
    """``corral mandelbrot``: time a one-worker render, render on all, write the PNG."""
    _check_writable(args.output)
    try:  # the demo draws with rich, an extra: a program that only imports corral needs none
        from rich.console import Console  # noqa: PLC0415
        from rich.progress import (  # noqa: PLC0415
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )
    except ImportError:
        print(
            "corral mandelbrot: error: it draws its progress with rich, which the extra 'cli' "
            "installs: pip install 'corral[cli]'",
            file=sys.stderr,
        )
        return EXIT_ERROR
    workers = args.workers or len(os.sched_getaffinity(0))
    view = mb.View.full_set(args.width, args.height, args.max_iter)
    tiles = mb.tiles(args.width, args.height, args.tile)
    console = Console()
    show = console.is_terminal if args.progress is None else args.progress
    columns = (
        TextColumn("{task.description:<20}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tiles"),
        TimeElapsedColumn(),
    )
    baseline = reference = None
    canvas = mb.Canvas(args.width, args.height)
    # auto_refresh=False: the loop redraws the bar as each tile lands, so rich starts no
    # refresh thread to compete with the workers for the CPUs.
    with Progress(*columns, console=console, disable=not show, auto_refresh=False) as progress:
        if args.baseline and workers > 1:
            reference = mb.Canvas(args.width, args.height)
            one = _render(view, tiles, 1, reference, progress=progress, label="1 worker (baseline)")
            baseline = asyncio.run(one)
        label = f"{workers} worker{_s(workers)}"
        render = asyncio.run(_render(view, tiles, workers, canvas, progress=progress, label=label))
    if reference is not None and reference.rgb != canvas.rgb:
        # Every pixel is computed the same way on any worker; a difference means a tile
        # was lost or pasted in the wrong place.
        print("corral: warning: the image differs from the one-worker render", file=sys.stderr)
    png = mb.encode_png(args.width, args.height, canvas.rgb)
    args.output.write_bytes(png)
    _summary(args, len(tiles), render, baseline)
    print(f"wrote {args.output} ({_size(len(png))})")
    return 0


async def _render(
    view: mb.View,
    tiles: list[mb.Tile],
    workers: int,
    canvas: mb.Canvas,
    *,
    progress: Progress,
    label: str,
) -> _Render:
    """Render every tile on a new pool of workers, pasting each as soon as it is done.

    The clock runs from the first submit to the last tile, after the workers have started,
    so the one-worker and the n-worker renders are timed alike.
    """
    task = progress.add_task(label, total=len(tiles))
    progress.refresh()
    result = _Render(workers)
    pool = corral.Pool(workers)
    jobs: list[corral.Job[mb.RenderedTile]] = []
    try:
        await pool.start()
        started = time.perf_counter()
        jobs = [pool.submit(mb.render_tile, view, tile) for tile in tiles]
        for next_done in asyncio.as_completed([job.future for job in jobs]):
            rendered: mb.RenderedTile = await next_done
            canvas.paste(rendered)
            result.tiles_by_worker[_name_of(pool, rendered.pid)] += 1
            progress.advance(task)
            progress.refresh()
        result.seconds = time.perf_counter() - started
    except BaseException:
        # On Ctrl-C or an error nobody wants the remaining tiles: cancel them (else
        # terminate() fails each with an error nobody retrieves, and asyncio logs every
        # one), then kill the workers rather than wait for the tiles they hold. Not
        # `async with`: its exit drains the queue, and a start() cut short never reaches it.
        for job in jobs:
            job.cancel()
        await pool.terminate()
        raise
    await pool.close()
    return result


def _name_of(pool: corral.Pool, pid: int) -> str:
    """A worker's name and pid, or only the pid of one that has already been replaced."""
    for worker in pool.workers:
        if worker.pid == pid:
            return f"{worker.name} (pid {pid})"
    return f"pid {pid}"


def _summary(
    args: argparse.Namespace, n_tiles: int, render: _Render, baseline: _Render | None
) -> None:
    """Print what was rendered, how fast, against what, and how the tiles were shared."""
    tile_w, tile_h = min(args.tile, args.width), min(args.tile, args.height)
    print(
        f"mandelbrot {args.width}x{args.height}, max-iter {args.max_iter}, "
        f"{n_tiles} tile{_s(n_tiles)} of at most {tile_w}x{tile_h} px"
    )
    print(f"  wall time   {render.seconds:7.2f} s on {render.workers} worker{_s(render.workers)}")
    if render.workers == 1:
        print("  speed-up       1.00x (one worker is its own baseline)")
    elif baseline is None:
        print("  speed-up    not measured (--no-baseline)")
    else:
        speedup = baseline.seconds / render.seconds if render.seconds > 0 else float("inf")
        print(f"  baseline    {baseline.seconds:7.2f} s on 1 worker")
        print(f"  speed-up    {speedup:7.2f}x over one worker (ideal {render.workers}x)")
    print("  tiles per worker:")
    width = max(len(name) for name in render.tiles_by_worker)
    for name, count in sorted(render.tiles_by_worker.items()):
        print(f"    {name:<{width}}  {count:5d}  ({100 * count / n_tiles:.0f}%)")


def _s(n: int) -> str:
    """The plural ending for a count of n."""
    return "" if n == 1 else "s"


def _size(n_bytes: int) -> str:
    """A file size for people: kB below a megabyte, MB above."""
    return f"{n_bytes / 1e6:.1f} MB" if n_bytes >= 1e6 else f"{n_bytes / 1e3:.0f} kB"
