"""The arithmetic behind ``corral mandelbrot``: escape times, colours, tiles and a PNG file.

Everything here is pure Python and runs in a worker process, so the demo measures corral
spreading real CPU-bound work over cores. ``render_tile`` is the function the pool calls; it
lives in this importable module (not in the command's ``__main__``) so that every start
method can find it by name. No numpy, no Pillow: the PNG is written with ``zlib`` and
``struct``.
"""

from __future__ import annotations

import itertools
import math
import os
import struct
import zlib
from dataclasses import dataclass

# Bail-out radius for smooth colouring. Radius 2 is enough to prove escape, but the
# fractional escape count ``n + 1 - log2(log|z|)`` is only smooth once |z| is large; 256
# costs a few extra iterations per outside pixel and removes the visible bands.
ESCAPE_RADIUS = 256.0

# The region that holds the whole set, with a small margin: (left, right, bottom, top).
FULL_SET = (-2.45, 0.95, -1.3, 1.3)

# Colour stops of the palette, as (position in 0..1, (r, g, b)). A deep blue through white
# to gold and back to near black; the palette is cyclic, so the last stop meets the first.
_STOPS = (
    (0.0, (0, 7, 100)),
    (0.16, (32, 107, 203)),
    (0.42, (237, 255, 255)),
    (0.6425, (255, 170, 0)),
    (0.8575, (0, 2, 0)),
    (1.0, (0, 7, 100)),
)

# Entries in the precomputed palette: enough that neighbouring entries differ by at most
# one level of a channel, so the gradient shows no steps.
PALETTE_SIZE = 2048

# How many palette cycles one unit of log(escape count) spans: higher gives more bands of
# colour near the set, lower gives broader washes far from it.
_CYCLES_PER_LOG = 0.85

# Where in the palette the far background starts: deep blue, so the set sits in a dark sky.
_PHASE = 0.3

INSIDE = b"\x00\x00\x00"  # the set itself is black


def escape_time(cr: float, ci: float, max_iter: int) -> float:
    """The smooth escape count of c = cr + ci*i, or -1.0 if c seems to be in the set.

    A point outside returns ``n + 1 - log2(log|z_n|)`` for the first n with
    |z_n| > ``ESCAPE_RADIUS``: a real number that grows continuously with c, which is what
    lets the colouring avoid bands. A point still bounded after ``max_iter`` iterations
    counts as inside.
    """
    # Points in the main cardioid or the period-2 bulb never escape; testing for them
    # first saves max_iter iterations on roughly a third of a full-set image.
    x = cr - 0.25
    q = x * x + ci * ci
    if q * (q + x) <= 0.25 * ci * ci or (cr + 1.0) * (cr + 1.0) + ci * ci <= 0.0625:
        return -1.0
    c = complex(cr, ci)
    z = 0j
    for n in range(max_iter):
        z = z * z + c
        if abs(z) > ESCAPE_RADIUS:
            # Far outside the set (|c| in the hundreds) the formula dips below zero,
            # which would read as "inside"; clamp it.
            return max(0.0, n + 1 - math.log2(math.log(abs(z))))
    return -1.0


def _palette(size: int = PALETTE_SIZE) -> list[bytes]:
    """The cyclic palette as ``size`` RGB triples, linearly interpolated between stops."""
    colours = []
    for i in range(size):
        t = i / size
        for (t0, c0), (t1, c1) in itertools.pairwise(_STOPS):
            if t0 <= t <= t1:
                f = (t - t0) / (t1 - t0)
                colours.append(bytes(round(a + (b - a) * f) for a, b in zip(c0, c1, strict=True)))
                break
    return colours


PALETTE = _palette()


def colour(nu: float) -> bytes:
    """The RGB triple for a smooth escape count (negative means inside the set)."""
    if nu < 0:
        return INSIDE
    # A log scale keeps the many low counts far from the set from using up the palette,
    # while the few high counts near its edge still get colours of their own.
    t = math.log(nu + 1.0) * _CYCLES_PER_LOG + _PHASE
    return PALETTE[int((t - math.floor(t)) * PALETTE_SIZE) % PALETTE_SIZE]


@dataclass(frozen=True, slots=True)
class View:
    """Which part of the plane an image shows, and how hard it looks.

    Pixels are square: ``scale`` is the width of one pixel in the plane, and (left, top)
    is the corner of the top-left pixel.
    """

    width: int
    height: int
    left: float
    top: float
    scale: float
    max_iter: int

    @classmethod
    def full_set(cls, width: int, height: int, max_iter: int) -> View:
        """The whole set, centred and scaled to fit an image of this size."""
        left, right, bottom, top = FULL_SET
        scale = max((right - left) / width, (top - bottom) / height)
        cx, cy = (left + right) / 2, (bottom + top) / 2
        return cls(width, height, cx - scale * width / 2, cy + scale * height / 2, scale, max_iter)


@dataclass(frozen=True, slots=True)
class Tile:
    """A rectangle of the image: its corner in pixels and its size."""

    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class RenderedTile:
    """A tile's RGB pixels, row by row, and the pid of the process that computed them."""

    tile: Tile
    rgb: bytes
    pid: int


def tiles(width: int, height: int, size: int) -> list[Tile]:
    """Cut a width x height image into tiles of at most size x size, row by row."""
    return [
        Tile(x, y, min(size, width - x), min(size, height - y))
        for y in range(0, height, size)
        for x in range(0, width, size)
    ]


def render_tile(view: View, tile: Tile) -> RenderedTile:
    """Compute one tile's pixels; the function each worker runs.

    Each pixel's point is computed from its own column and row, never accumulated across
    the tile, so a pixel comes out the same whatever the tiling: the image does not depend
    on ``--tile`` or on which worker drew what.
    """
    rgb = bytearray()
    max_iter, scale, left, top = view.max_iter, view.scale, view.left, view.top
    columns = range(tile.x, tile.x + tile.width)
    for row in range(tile.y, tile.y + tile.height):
        ci = top - (row + 0.5) * scale
        for col in columns:
            rgb += colour(escape_time(left + (col + 0.5) * scale, ci, max_iter))
    return RenderedTile(tile, bytes(rgb), os.getpid())


class Canvas:
    """The whole image in memory, filled in tile by tile in any order."""

    def __init__(self, width: int, height: int) -> None:
        self.width = width
        self.height = height
        self.rgb = bytearray(width * height * 3)

    def paste(self, rendered: RenderedTile) -> None:
        """Copy a rendered tile's rows into place."""
        tile = rendered.tile
        stride = tile.width * 3
        for r in range(tile.height):
            start = ((tile.y + r) * self.width + tile.x) * 3
            self.rgb[start : start + stride] = rendered.rgb[r * stride : (r + 1) * stride]


def _chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, and the CRC of type and data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encode_png(width: int, height: int, rgb: bytes | bytearray) -> bytes:
    """An 8-bit truecolour PNG of width x height pixels given as RGB bytes, row by row.

    Each scanline gets filter type 0 (none): the smooth gradients compress well enough
    without a filter, and choosing one per row would cost more Python time than it saves.
    """
    if width < 1 or height < 1:
        raise ValueError(f"a PNG needs at least one pixel, not {width}x{height}")
    stride = width * 3
    if len(rgb) != stride * height:
        raise ValueError(f"expected {stride * height} bytes of RGB for {width}x{height}")
    raw = b"".join(b"\x00" + rgb[i : i + stride] for i in range(0, len(rgb), stride))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw, 6))
        + _chunk(b"IEND", b"")
    )
