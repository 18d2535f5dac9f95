"""The parent's pipe ends on a running loop, over real ``os.pipe()`` fds and no child
process: writes that outgrow the pipe resume when it drains, one ``writev`` per loop pass,
one close path (off the loop first, then closed, once), and EOF reported once."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from corral._wire import RESULT, Frame, FrameDecoder, dumps, frame, loads, out_of_band
from corral.workers import _pipes
from corral.workers._pipes import PIPE_SIZE, LoopReader, LoopWriter, enlarge, open_fds

EMPTY = 0x2A  # a kind for frames without a body; the pipe ends do not interpret kinds
DEFAULT_PIPE = 64 * 1024  # Linux's default pipe buffer
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


class Pipe:
    """An ``os.pipe()`` for one test. Each fd is closed at the end by whoever owns it then:
    the ``LoopReader``/``LoopWriter`` made on it, or else this object, so that a failing
    test neither leaks an fd nor closes a number that was handed out again."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        self._raw = {self.r, self.w}  # fds no owner took and the test did not close
        self._ends: list[LoopReader | LoopWriter] = []

    def __enter__(self) -> Pipe:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for end in self._ends:
            end.close()
        for fd in self._raw:
            os.close(fd)

    def reader(
        self,
        on_frames: Callable[[list[Frame]], None],
        on_eof: Callable[[], None],
        chunk: int = FrameDecoder.CHUNK,
    ) -> LoopReader:
        self._raw.discard(self.r)
        end = LoopReader(asyncio.get_running_loop(), self.r, FrameDecoder(chunk), on_frames, on_eof)
        self._ends.append(end)
        return end

    def writer(self, errors: list[OSError] | None = None) -> LoopWriter:
        self._raw.discard(self.w)
        sink = errors if errors is not None else []
        end = LoopWriter(asyncio.get_running_loop(), self.w, sink.append)
        self._ends.append(end)
        return end

    def close(self, fd: int) -> None:
        """The test closes one of the raw fds itself (to make EOF or EPIPE)."""
        self._raw.remove(fd)
        os.close(fd)


class Collector:
    """Gathers what a reader reports; ``wait_for(n)`` returns once n frames are in."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.batches: list[int] = []
        self.eofs = 0
        self.eof = asyncio.Event()
        self._want = 0
        self._enough = asyncio.Event()

    def on_frames(self, frames: list[Frame]) -> None:
        self.frames.extend(frames)
        self.batches.append(len(frames))
        if len(self.frames) >= self._want:
            self._enough.set()

    def on_eof(self) -> None:
        self.eofs += 1
        self.eof.set()

    async def wait_for(self, n: int) -> list[Frame]:
        self._want = n
        if len(self.frames) < n:
            self._enough.clear()
            async with asyncio.timeout(20):
                await self._enough.wait()
        return self.frames


def reader_on(pipe: Pipe, collector: Collector, chunk: int = FrameDecoder.CHUNK) -> LoopReader:
    return pipe.reader(collector.on_frames, collector.on_eof, chunk)


def payload_frames(count: int, size: int) -> list[list[Any]]:
    """count RESULT frames, each a distinct out-of-band ``bytes`` of size bytes."""
    return [frame(RESULT, i, dumps(out_of_band(bytes([i % 256]) * size))) for i in range(count)]


async def loop_passes(n: int = 5) -> None:
    """Let the loop run n iterations."""
    for _ in range(n):
        await asyncio.sleep(0)


@contextmanager
def recording_close(
    monkeypatch: pytest.MonkeyPatch, still_watched: Callable[[int], bool]
) -> Iterator[list[tuple[int, bool]]]:
    """Record each ``os.close(fd)`` the pipe module makes, with whether the loop still
    watched the fd at that moment."""
    calls: list[tuple[int, bool]] = []
    real_close = os.close

    def close(fd: int) -> None:
        calls.append((fd, still_watched(fd)))
        real_close(fd)

    monkeypatch.setattr(_pipes.os, "close", close)
    try:
        yield calls
    finally:
        monkeypatch.setattr(_pipes.os, "close", real_close)


# -- writing and reading --------------------------------------------------------------------


async def test_write_larger_than_the_pipe_resumes_when_it_drains() -> None:
    """Frames totalling several times the pipe's size are written as far as the pipe holds,
    then resumed by the loop as a reader drains it; every frame arrives whole and in
    order, and ``written`` ends equal to ``queued``."""
    with Pipe() as p:
        enlarge(p.w)
        capacity = fcntl.fcntl(p.w, F_GETPIPE_SZ)
        writer = p.writer()
        sent = payload_frames(8, capacity)  # 8 pipes' worth, out-of-band bodies
        sent.insert(3, frame(EMPTY, 100))
        for buffers in sent:
            writer.write(buffers)
        total = writer.queued
        await loop_passes()
        assert 0 < writer.written <= capacity < total, "the pipe should be full, the rest queued"
        assert writer.unwritten == total - writer.written

        collector = Collector()
        reader_on(p, collector)
        frames = await collector.wait_for(len(sent))
        assert writer.written == writer.queued == total
        assert writer.unwritten == 0
        assert [f.job for f in frames] == [0, 1, 2, 100, 3, 4, 5, 6, 7]
        for f in frames:
            if f.job != 100:
                assert loads(f.kind, f.body) == bytes([f.job]) * capacity


@pytest.fixture
def writev_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the ``writev`` calls the pipe module makes, by the number of buffers in each."""
    calls: list[int] = []
    real_writev = os.writev

    def writev(fd: int, buffers: list[Any]) -> int:
        calls.append(len(buffers))
        return real_writev(fd, buffers)

    monkeypatch.setattr(_pipes.os, "writev", writev)
    return calls


async def test_write_to_an_idle_pipe_goes_out_at_once(writev_calls: list[int]) -> None:
    """A write to an idle pipe is written before ``write`` returns, in one ``writev``."""
    with Pipe() as p:
        writer = p.writer()
        buffers = frame(RESULT, 1, dumps("now"))
        writer.write(buffers)
        assert writev_calls == [2]
        assert writer.written == writer.queued == sum(len(b) for b in buffers)
        collector = Collector()
        reader_on(p, collector)
        (got,) = await collector.wait_for(1)
        assert loads(got.kind, got.body) == "now"


async def test_corked_frames_go_out_in_one_writev(writev_calls: list[int]) -> None:
    """Frames written while corked are held back, then leave together in a single
    ``writev`` at ``uncork``, and arrive in one batch."""
    with Pipe() as p:
        writer = p.writer()
        collector = Collector()
        reader_on(p, collector)
        writer.cork()
        for i in range(3):
            writer.write(frame(RESULT, i, dumps(i)))
        await loop_passes()
        assert writer.written == 0
        assert writev_calls == []
        writer.uncork()
        assert writev_calls == [6]  # three headers and three pickles, one call
        assert writer.unwritten == 0
        await collector.wait_for(3)
        assert collector.batches == [3]
        assert [loads(f.kind, f.body) for f in collector.frames] == [0, 1, 2]


async def test_writes_while_waiting_for_room_queue_behind(writev_calls: list[int]) -> None:
    """While the pipe is full, later writes only queue (no ``writev`` per write); once it
    drains they follow the earlier bytes, in order."""
    with Pipe() as p:
        enlarge(p.w)
        capacity = fcntl.fcntl(p.w, F_GETPIPE_SZ)
        writer = p.writer()
        writer.write(frame(RESULT, 0, dumps(out_of_band(bytes(2 * capacity)))))
        calls_when_full = len(writev_calls)
        assert writer.unwritten > 0
        for i in range(1, 6):
            writer.write(frame(RESULT, i, dumps(i)))
        assert len(writev_calls) == calls_when_full
        collector = Collector()
        reader_on(p, collector)
        frames = await collector.wait_for(6)
        assert [f.job for f in frames] == [0, 1, 2, 3, 4, 5]
        assert loads(frames[0].kind, frames[0].body) == bytes(2 * capacity)
        assert writer.unwritten == 0


async def test_more_buffers_than_iov_max_in_one_pass() -> None:
    """More buffers than one ``writev`` may take (IOV_MAX) still all go out, in order."""
    with Pipe() as p:
        writer = p.writer()
        collector = Collector()
        reader_on(p, collector)
        for i in range(3000):
            writer.write(frame(RESULT, i, dumps(i)))
        frames = await collector.wait_for(3000)
        assert [loads(f.kind, f.body) for f in frames] == list(range(3000))


async def test_big_frames_through_a_small_decoder_chunk() -> None:
    """Bodies much larger than the decoder's chunk are read in place across many reads, and
    the small frames around them are not disturbed."""
    with Pipe() as p:
        writer = p.writer()
        collector = Collector()
        reader_on(p, collector, chunk=4096)
        sent = []
        for i in range(6):
            sent.append(frame(RESULT, i, dumps(bytes([i]) * (50_000 * i))))
            sent.append(frame(EMPTY, 1000 + i))
        for buffers in sent:
            writer.write(buffers)
        frames = await collector.wait_for(len(sent))
        assert [f.job for f in frames] == [j for i in range(6) for j in (i, 1000 + i)]
        for f in frames[::2]:
            assert loads(f.kind, f.body) == bytes([f.job]) * (50_000 * f.job)


async def test_drain_reads_what_is_buffered_now() -> None:
    """``drain()`` delivers frames already in the pipe at once, without a loop pass."""
    with Pipe() as p:
        collector = Collector()
        reader = reader_on(p, collector)
        os.write(p.w, b"".join(bytes(b) for b in frame(RESULT, 1, dumps("now"))))
        reader.drain()
        assert [loads(f.kind, f.body) for f in collector.frames] == ["now"]
        reader.close()
        reader.drain()  # a closed reader has nothing to drain, and does not fail


async def test_pause_stops_reading() -> None:
    """A paused reader leaves data in the pipe and reports nothing."""
    with Pipe() as p:
        collector = Collector()
        reader = reader_on(p, collector)
        reader.pause()
        os.write(p.w, b"".join(bytes(b) for b in frame(EMPTY, 1)))
        await loop_passes()
        assert collector.frames == []


# -- end of file ----------------------------------------------------------------------------


async def test_eof_is_reported_once_after_every_frame() -> None:
    """Closing the write end once flushed gives the reader every frame written before it,
    then one ``on_eof``, however long the loop keeps running."""
    with Pipe() as p:
        writer = p.writer()
        collector = Collector()
        reader_on(p, collector)
        for buffers in payload_frames(3, 200_000):
            writer.write(buffers)
        writer.close_when_flushed()
        async with asyncio.timeout(20):
            await collector.eof.wait()
        assert [f.job for f in collector.frames] == [0, 1, 2]
        assert writer.fd == -1
        await loop_passes(10)
        assert collector.eofs == 1


async def test_drain_after_eof_does_not_report_eof_again() -> None:
    """``on_eof`` is called once even when the owner drains the reader after EOF (as a
    worker does when its process dies after closing its pipe): the reader is paused, not
    closed, and must not read the end of the file a second time."""
    with Pipe() as p:
        collector = Collector()
        reader = reader_on(p, collector)
        p.close(p.w)
        async with asyncio.timeout(20):
            await collector.eof.wait()
        reader.drain()
        await loop_passes()
        assert collector.eofs == 1


async def test_reader_may_close_itself_from_on_eof() -> None:
    """``on_eof`` may close the reader (as the worker does); nothing fails afterwards."""
    with Pipe() as p:
        eofs: list[int] = []

        def on_eof() -> None:
            eofs.append(1)
            reader.close()

        reader = p.reader(list, on_eof)
        p.close(p.w)
        await loop_passes(10)
        assert eofs == [1]
        assert reader.fd == -1


async def test_reader_may_close_itself_from_on_frames() -> None:
    """``on_frames`` may close the reader mid-stream; it stops reading at once."""
    with Pipe() as p:
        batches: list[list[Frame]] = []

        def on_frames(frames: list[Frame]) -> None:
            batches.append(frames)
            reader.close()

        reader = p.reader(on_frames, list, chunk=4096)
        os.write(p.w, b"".join(bytes(b) for i in range(500) for b in frame(EMPTY, i)))
        await loop_passes(10)
        assert len(batches) == 1
        assert reader.fd == -1


# -- close ----------------------------------------------------------------------------------


@pytest.mark.loops("asyncio")  # uvloop's remove_reader does not say whether fd was watched
async def test_reader_close_takes_the_fd_off_the_loop_then_closes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``close()`` removes the reader from the loop before closing the fd, closes it once,
    and a second ``close()`` does nothing."""
    loop = asyncio.get_running_loop()
    with Pipe() as p:
        reader = reader_on(p, Collector())
        with recording_close(monkeypatch, loop.remove_reader) as calls:
            reader.close()
            reader.close()
        assert calls == [(p.r, False)], "closed while the loop still watched it, or twice"
        assert reader.fd == -1
        with pytest.raises(OSError) as info:
            os.fstat(p.r)
        assert info.value.errno == errno.EBADF


@pytest.mark.loops("asyncio")  # uvloop's remove_writer does not say whether fd was watched
async def test_writer_close_while_waiting_for_room_takes_it_off_the_loop_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A writer blocked on a full pipe (registered with the loop) is taken off the loop
    before its fd is closed; its queue is dropped, later writes are ignored, and the loop
    never calls it again."""
    loop = asyncio.get_running_loop()
    with Pipe() as p:
        errors: list[OSError] = []
        writer = p.writer(errors)
        writer.write([bytes(4 * PIPE_SIZE)])
        await loop_passes()
        assert writer.unwritten > 0
        with recording_close(monkeypatch, loop.remove_writer) as calls:
            writer.close()
            writer.close()
        assert calls == [(p.w, False)], "closed while the loop still watched it, or twice"
        writer.write([b"ignored"])
        await loop_passes()
        assert errors == []
        assert writer.fd == -1


async def test_close_is_idempotent_and_the_loop_stops_calling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On either loop: each end's ``close()`` closes its fd exactly once however often it is
    called, and a closed end gets no more callbacks (the reader reports nothing, a writer
    that was waiting on a full pipe is not resumed)."""
    collector = Collector()
    with Pipe() as p, Pipe() as q:
        reader = reader_on(p, collector)
        errors: list[OSError] = []
        writer = q.writer(errors)
        writer.write([bytes(4 * PIPE_SIZE)])
        await loop_passes()
        assert writer.unwritten > 0
        with recording_close(monkeypatch, lambda fd: False) as calls:
            for _ in range(3):
                reader.close()
                writer.close()
        assert [fd for fd, _ in calls] == [p.r, q.w]
        await loop_passes(10)
        assert collector.frames == []
        assert collector.eofs == 0
        assert errors == []


async def test_writer_close_while_corked_drops_the_queue() -> None:
    """Closing a corked writer drops what it held: ``uncork`` then writes nothing and
    reports no error, and the reader sees EOF with no bytes."""
    with Pipe() as p:
        errors: list[OSError] = []
        writer = p.writer(errors)
        writer.cork()
        writer.write(frame(EMPTY, 1))
        writer.close()
        writer.uncork()
        await loop_passes()
        assert errors == []
        assert writer.written == 0
        os.set_blocking(p.r, False)
        assert os.read(p.r, 100) == b""  # EOF: nothing was written


async def test_close_when_flushed_waits_for_the_queue() -> None:
    """``close_when_flushed`` on a writer with bytes still queued closes only once they are
    all out; on an idle writer it closes at once."""
    with Pipe() as p, Pipe() as q:
        writer = p.writer()
        writer.write(frame(RESULT, 0, dumps(out_of_band(bytes(4 * PIPE_SIZE)))))
        writer.close_when_flushed()
        assert writer.fd >= 0
        collector = Collector()
        reader_on(p, collector)
        async with asyncio.timeout(20):
            await collector.eof.wait()
        assert len(collector.frames) == 1
        assert writer.fd == -1
        idle = q.writer()
        idle.close_when_flushed()
        assert idle.fd == -1


async def test_writer_reports_a_broken_pipe_once_and_closes() -> None:
    """Writing to a pipe whose reader is gone reports ``EPIPE`` to ``on_error`` once; the
    writer has closed itself by then and ignores later writes."""
    with Pipe() as p:
        p.close(p.r)
        errors: list[OSError] = []
        writer = p.writer(errors)
        writer.write(frame(EMPTY, 1))
        writer.write(frame(EMPTY, 2))
        await loop_passes()
        writer.write(frame(EMPTY, 3))
        await loop_passes()
        assert [e.errno for e in errors] == [errno.EPIPE]
        assert writer.fd == -1
        with pytest.raises(OSError):
            os.fstat(p.w)


async def test_open_fds_lists_only_open_ends() -> None:
    """``open_fds()`` (what a forked child must close) lists every end still open and
    forgets each once closed."""
    with Pipe() as p:
        reader = reader_on(p, Collector())
        writer = p.writer()
        assert {p.r, p.w} <= set(open_fds())
        reader.close()
        assert p.r not in open_fds()
        assert p.w in open_fds()
        writer.close()
        assert p.w not in open_fds()


def test_enlarge_grows_a_pipe_and_tolerates_other_fds() -> None:
    """``enlarge`` grows a pipe to ``PIPE_SIZE`` where the system allows it and quietly
    leaves an fd that is not a pipe alone."""
    with open("/proc/sys/fs/pipe-max-size") as f:
        limit = int(f.read())
    with Pipe() as p:
        enlarge(p.w)
        size = fcntl.fcntl(p.w, F_GETPIPE_SZ)
        assert size == (PIPE_SIZE if limit >= PIPE_SIZE else DEFAULT_PIPE)
    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        enlarge(fd)
    finally:
        os.close(fd)
