"""The ``corral`` command, run as a user runs it (a real interpreter, real worker processes),
and the arithmetic and PNG encoding behind ``corral mandelbrot``."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import corral
from corral import _mandelbrot as mb

# Seconds any one run of the command may take; a small image renders in about one.
TIMEOUT = 60

# A small image: 12 tiles of 30x30, rendered in well under a second.
SMALL = ["--width", "120", "--height", "90", "--max-iter", "64", "--tile", "30"]


def corral_cmd(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m corral ARGS`` in cwd and capture what it prints."""
    return subprocess.run(
        [sys.executable, "-m", "corral", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """Split a PNG into (type, data) chunks, checking the signature and every CRC."""
    assert data[:8] == mb.PNG_SIGNATURE
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body), f"bad CRC in {kind!r}"
        chunks.append((kind, body))
        pos += 12 + length
    return chunks


# -- the command, end to end -----------------------------------------------------------------


def test_mandelbrot_writes_png_and_reports_timings(tmp_path: Path) -> None:
    """`corral mandelbrot` on 2 workers writes a PNG of the asked size and prints the wall
    time, a measured speed-up, and per-worker tile counts that add up to every tile, each
    from a worker process other than the command's own."""
    done = corral_cmd(
        "mandelbrot", *SMALL, "--workers", "2", "--no-progress", "-o", "m.png", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""

    kind, header = png_chunks((tmp_path / "m.png").read_bytes())[0]
    assert kind == b"IHDR"
    assert struct.unpack(">II", header[:8]) == (120, 90)

    out = done.stdout
    assert re.search(r"wall time\s+\d+\.\d+ s on 2 workers", out)
    assert re.search(r"baseline\s+\d+\.\d+ s on 1 worker", out)
    assert re.search(r"speed-up\s+\d+\.\d+x over one worker", out)
    counts = {int(pid): int(n) for pid, n in re.findall(r"\(pid (\d+)\)\s+(\d+)", out)}
    assert len(counts) == 2, out  # fair dispatch hands the first two tiles to both workers
    assert sum(counts.values()) == 12
    assert all(n > 0 for n in counts.values())
    assert "\x1b[" not in out  # no progress bar or colour codes when stdout is a pipe


def test_mandelbrot_without_the_cli_extra_names_it(tmp_path: Path) -> None:
    """rich is the `cli` extra, not a dependency of corral: where it is missing, `corral
    mandelbrot` says which extra to install, in one line, and writes nothing; the pool
    itself needs no rich."""
    script = (
        "import sys; sys.modules['rich'] = None  # as if not installed\n"
        "from corral.cli import main\n"
        "if __name__ == '__main__':\n"
        f"    raise SystemExit(main(['mandelbrot', *{SMALL!r}, '--workers', '2']))\n"
    )
    (tmp_path / "no_rich.py").write_text(script)
    done = subprocess.run(
        [sys.executable, "no_rich.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "corral mandelbrot: error: it draws its progress with rich, which the extra 'cli' "
        "installs: pip install 'corral[cli]'"
    ]
    assert not (tmp_path / "mandelbrot.png").exists()


def test_mandelbrot_defaults_to_mandelbrot_png_without_baseline(tmp_path: Path) -> None:
    """With no --output the PNG lands in the working directory as mandelbrot.png, and
    --no-baseline skips the one-worker render and says the speed-up was not measured."""
    done = corral_cmd("mandelbrot", *SMALL, "--workers", "2", "--no-baseline", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "mandelbrot.png").read_bytes()[:8] == mb.PNG_SIGNATURE
    assert "not measured" in done.stdout
    assert "baseline " not in done.stdout


def test_version(tmp_path: Path) -> None:
    """`corral --version` prints the installed package's version and exits 0."""
    done = corral_cmd("--version", cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout.strip() == f"corral {corral.__version__}"


@pytest.mark.parametrize("args", [["--help"], ["mandelbrot", "--help"]])
def test_help(tmp_path: Path, args: list[str]) -> None:
    """--help exits 0 and shows the mandelbrot command, its options and the examples."""
    done = corral_cmd(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "mandelbrot" in done.stdout
    assert "examples:" in done.stdout
    if "mandelbrot" in args:
        for option in ("--width", "--height", "--max-iter", "--workers", "--tile", "--output"):
            assert option in done.stdout


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--workers", "0"], "--workers"),
        (["--width", "wide"], "--width"),
        (["--tile", "-5"], "--tile"),
        (["--max-iter", "0"], "--max-iter"),
    ],
)
def test_bad_option_value(tmp_path: Path, args: list[str], option: str) -> None:
    """A bad option value exits 2 with one error line on stderr that names the option,
    before any worker starts or any file is written."""
    done = corral_cmd("mandelbrot", *args, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    first, *rest = done.stderr.splitlines()
    assert first.startswith("corral mandelbrot: error: ")
    assert option in first
    assert len(rest) <= 1  # at most a hint to try --help
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args", [[], ["frobnicate"]])
def test_missing_or_unknown_command(tmp_path: Path, args: list[str]) -> None:
    """`corral` with no command, or an unknown one, is a usage error: exit 2, on stderr."""
    done = corral_cmd(*args, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    assert "error" in done.stderr


def test_unknown_option_of_mandelbrot_is_a_usage_error(tmp_path: Path) -> None:
    done = corral_cmd("mandelbrot", "--bogus", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("corral: error: unrecognized arguments: --bogus")


# -- corral bench ----------------------------------------------------------------------------

CHECKOUT = Path(__file__).resolve().parent.parent


def test_bench_help_lists_it_with_examples(tmp_path: Path) -> None:
    done = corral_cmd("--help", cwd=tmp_path)
    assert "bench" in done.stdout
    assert "corral bench --quick" in done.stdout
    done = corral_cmd("bench", "--help", cwd=tmp_path)
    assert done.returncode == 0
    assert "--checkout" in done.stdout


def test_bench_without_a_checkout_says_what_it_needs(tmp_path: Path) -> None:
    done = corral_cmd("bench", "--checkout", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    assert f"{tmp_path} has no benchmarks/peers.py" in done.stderr
    assert "--checkout PATH" in done.stderr


def test_bench_passes_the_runners_options_on(tmp_path: Path) -> None:
    done = corral_cmd("bench", "--checkout", str(CHECKOUT), "--help-runner", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "--only" in done.stdout
    assert "--libs" in done.stdout


@pytest.mark.timeout(240)
def test_bench_runs_and_prints_the_table(tmp_path: Path) -> None:
    """A quick run of one measurement against ProcessPoolExecutor, from the checkout."""
    args = ["bench", "--quick", "--only", "latency", "--libs", "corral,ppe"]
    done = subprocess.run(
        [sys.executable, "-m", "corral", *args],
        cwd=CHECKOUT,
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "| ProcessPoolExecutor |" in done.stdout
    assert "round trip of add_one, median" in done.stdout


def test_unwritable_output_fails_before_rendering(tmp_path: Path) -> None:
    """An output path in a missing directory is reported at once (exit 1, no traceback),
    not after the render it would have wasted."""
    done = corral_cmd("mandelbrot", "-o", "missing/m.png", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("corral: error: cannot write missing/m.png")
    assert "Traceback" not in done.stderr


def _workers_of(command: psutil.Process) -> list[psutil.Process]:
    """The worker processes of a running command: the children of its forkserver."""
    return [p for p in command.children(recursive=True) if p.ppid() != command.pid]


@contextlib.contextmanager
def _sigint_not_ignored() -> Iterator[None]:
    """Let a command started here get Ctrl-C even when this process ignores it.

    A shell without job control starts a background command with SIGINT ignored, and a
    program started with SIGINT ignored keeps it so, as Unix wants of background jobs:
    under such a runner the command below would never see the signal. A handler (unlike
    SIG_IGN) is reset to the default across exec.
    """
    previous = signal.getsignal(signal.SIGINT)
    if previous != signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_exits_130_and_stops_the_workers(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) in the middle of
    a render exits 130 with one line on stderr, writes no PNG, and leaves no worker
    process running."""
    with _sigint_not_ignored():
        process = subprocess.Popen(
            [sys.executable, "-m", "corral", "mandelbrot", "--workers", "2", "--no-baseline"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, so the signal spares pytest
        )
    try:
        command = psutil.Process(process.pid)
        deadline = time.monotonic() + TIMEOUT
        while len(workers := _workers_of(command)) < 2:  # the render has begun
            assert time.monotonic() < deadline, "the workers never started"
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, err
    assert err == "corral: interrupted\n"
    assert out == ""
    assert not (tmp_path / "mandelbrot.png").exists()
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"workers still running: {alive}"


# -- the arithmetic and the PNG ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("cr", "ci"),
    [
        (0.0, 0.0),  # the centre of the main cardioid
        (-1.0, 0.0),  # the centre of the period-2 bulb
        (-0.1, 0.6),  # in the cardioid, near its edge
        (-0.1226, 0.7449),  # the centre of the period-3 bulb atop the cardioid
        (-1.754, 0.0),  # the period-3 bulb on the real axis: found by iterating
        (0.0, 1.0),  # i: on the boundary, its orbit cycles and stays bounded
    ],
)
def test_escape_time_inside(cr: float, ci: float) -> None:
    """Points known to lie in the set never escape: escape_time says -1.0 (inside)."""
    assert mb.escape_time(cr, ci, 1000) == -1.0


@pytest.mark.parametrize(
    ("cr", "ci"), [(1.0, 0.0), (0.5, 0.0), (-2.1, 0.0), (0.0, 1.1), (2.0, 2.0), (300.0, 0.0)]
)
def test_escape_time_outside(cr: float, ci: float) -> None:
    """Points known to lie outside escape with a non-negative count below max_iter."""
    nu = mb.escape_time(cr, ci, 1000)
    assert 0.0 <= nu < 1000


def test_escape_time_is_smooth() -> None:
    """Along the real axis from 0.3 out to 2, the count falls steadily and never jumps by
    a whole step between close neighbours (an integer count would): no colour bands."""
    xs = [0.3 + i * (2.0 - 0.3) / 2000 for i in range(2001)]
    counts = [mb.escape_time(x, 0.0, 1000) for x in xs]
    steps = [a - b for a, b in itertools.pairwise(counts)]
    assert counts[0] > 10
    assert counts[-1] > 1
    assert all(0 <= step < 0.5 for step in steps)


def test_image_does_not_depend_on_tiling() -> None:
    """Any tiling covers each pixel once and draws it the same: a 37-px tiling (ragged
    edges) gives the same image, byte for byte, as one tile the size of the image."""
    view = mb.View.full_set(90, 60, 50)
    whole, tiled = mb.Canvas(90, 60), mb.Canvas(90, 60)
    whole.paste(mb.render_tile(view, mb.Tile(0, 0, 90, 60)))
    parts = mb.tiles(90, 60, 37)
    assert sum(t.width * t.height for t in parts) == 90 * 60
    for tile in parts:
        tiled.paste(mb.render_tile(view, tile))
    assert tiled.rgb == whole.rgb
    assert whole.rgb.count(mb.INSIDE) > 0  # the set is in the picture


def test_encode_png_round_trip() -> None:
    """encode_png writes a valid PNG: signature, IHDR (size, 8-bit RGB), chunks with good
    CRCs, IEND last, and IDAT that inflates to the pixels, one filter byte per row."""
    width, height = 3, 2
    rgb = bytes(range(width * height * 3))
    chunks = png_chunks(mb.encode_png(width, height, rgb))
    assert [kind for kind, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    assert struct.unpack(">IIBBBBB", chunks[0][1]) == (width, height, 8, 2, 0, 0, 0)
    raw = zlib.decompress(chunks[1][1])
    rows = [raw[i : i + 1 + width * 3] for i in range(0, len(raw), 1 + width * 3)]
    assert [row[0] for row in rows] == [0, 0]
    assert b"".join(row[1:] for row in rows) == rgb


def test_encode_png_rejects_wrong_sizes() -> None:
    """encode_png refuses a pixel buffer that does not match the size, and an empty image."""
    with pytest.raises(ValueError, match="expected 18 bytes"):
        mb.encode_png(3, 2, b"\x00" * 17)
    with pytest.raises(ValueError, match="at least one pixel"):
        mb.encode_png(0, 2, b"")
