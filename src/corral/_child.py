"""The worker process: run the initializer, announce itself, then serve calls until EOF.

The child blocks on its in-pipe (no polling, no sleeps) and answers on its out-pipe::

    parent                               child
      |  CALL(job, fn, args)  ------------>  unpickle the call
      |                     shared page <--  job id stored: from here the job is "started"
      |                                      fn(*args)
      |  <------------  RESULT | ERROR(job)  the value, or the exception and its traceback

The acknowledgement is a store into a page of shared memory (see ``_shared``), not a
message: the parent reads it only if the worker dies, so a call costs one frame each way.
Unpickling comes before the acknowledgement on purpose: a call whose arguments kill the
process while they are unpickled was never started, so the parent may deliver it again
(a bounded number of times) without running anything twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import inspect
import multiprocessing.forkserver
import os
import signal
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from ._errors import SerializationError, SoftTimeLimitExceeded
from ._shared import ARGS_TAKEN, RESULTS_TAKEN, STARTED, SharedPage, SharedRegion
from ._wire import (
    ACK,
    CALL,
    ERROR,
    INIT_FAILED,
    KIND_MASK,
    RESULT,
    SHARED,
    UP,
    Buffer,
    Frame,
    FrameDecoder,
    describe,
    dumps,
    dumps_error,
    frame,
    framed,
    load_function,
    loads,
    out_of_band,
)

if TYPE_CHECKING:
    from multiprocessing.connection import Connection


class Channels(NamedTuple):
    """The fds a worker gets, wrapped in connections only so that every start method
    carries them across (pass_fds, SCM_RIGHTS or fork)."""

    inbound: Connection  # calls from the parent
    outbound: Connection  # results to the parent
    page: Connection  # memfd of the shared page
    args_region: Connection  # memfd of the region for large arguments
    results_region: Connection  # memfd of the region for large results


def main(channels: Channels, setup: bytes, inherited: list[int]) -> None:
    """Entry point of a worker process (the target of its ``multiprocessing.Process``).


    ``inherited`` lists the parent's pipe ends that a forked child got by accident; closing
    them lets siblings see EOF when the parent closes their pipes.
    """
    _die_with_parent()
    _let_go_of_the_forkserver()
    for fd in inherited:
        with contextlib.suppress(OSError):
            os.close(fd)
    # Ctrl-C in a terminal reaches the whole process group; the parent decides what stops.
    # The parent started this process with SIGINT blocked; ignore it, then let it through.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    with contextlib.suppress(ValueError):  # a forked child must not poke the parent's loop
        signal.set_wakeup_fd(-1)
    page = SharedPage(channels.page.fileno())
    channels.page.close()
    args_region = SharedRegion(os.dup(channels.args_region.fileno()))
    results_region = SharedRegion(os.dup(channels.results_region.fileno()))
    channels.args_region.close()
    channels.results_region.close()
    inbound, outbound = channels.inbound, channels.outbound
    worker = _Worker(inbound.fileno(), outbound.fileno(), page, args_region, results_region)
    try:
        worker.serve(setup)
    except BrokenPipeError:
        pass  # the parent is gone; nobody is left to tell
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass  # an interrupt that landed between calls, as the parent shuts down
    finally:
        inbound.close()
        outbound.close()


def _die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies, even mid-task.

    An idle worker would see EOF on its in-pipe anyway; a busy one is deaf to the pipe. The
    parent is the pool's process, or the forkserver, which exits when the pool's process
    dies. If the parent died before the request took effect, exit now.
    """
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return  # not Linux: the in-pipe's EOF still ends an idle worker
    if os.getppid() != parent:
        os._exit(1)


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

# The signal by which the parent interrupts a cancelled job (SIGALRM is the soft limit's).
INTERRUPT = signal.SIGUSR1


def _let_go_of_the_forkserver() -> None:
    """Close this process's copy of the forkserver's keep-alive pipe.

    multiprocessing gives every child it starts the write end of that pipe (so the child
    could use the forkserver too), and the forkserver exits only once every copy is
    closed: while a worker held one, a dead parent's forkserver lived on, and with it the
    worker, whose parent-death signal waits for the forkserver. multiprocessing has no
    public way to say this, hence the private attribute. A worker that needs a forkserver
    of its own starts a fresh one.
    """
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if isinstance(fd, int):
        with contextlib.suppress(OSError):
            os.close(fd)
        server._forkserver_alive_fd = None  # type: ignore[union-attr]


class _Worker:
    """The child's side of the pipes: blocking reads in, blocking writes out."""

    def __init__(
        self,
        in_fd: int,
        out_fd: int,
        page: SharedPage,
        args_region: SharedRegion,
        results_region: SharedRegion,
    ) -> None:
        self._in = in_fd
        self._out = out_fd
        self._words = page.words
        self._args_region = args_region
        self._results_region = results_region
        self._functions: dict[bytes, Any] = {}  # unpickled functions, by their reference
        self._page = page
        self._soft_limit = 0.0  # the soft limit of the call running now, while armed
        self._running = 0  # the job running now, while it may be interrupted
        self._decoder = FrameDecoder()
        signal.signal(signal.SIGALRM, self._soft_limit_passed)
        signal.signal(INTERRUPT, self._interrupted)

    def _interrupted(self, signum: int, frame: object) -> None:
        """The parent cancelled a job: if it is the one running, raise inside it."""
        job = self._running
        if job and self._page.cancelled(job):
            self._running = 0
            raise asyncio.CancelledError(f"job {job} was cancelled by its caller")

    def _soft_limit_passed(self, signum: int, frame: object) -> None:
        """SIGALRM: raise SoftTimeLimitExceeded in the task, if one is still running."""
        limit, self._soft_limit = self._soft_limit, 0.0
        if limit:
            raise SoftTimeLimitExceeded(limit)

    def serve(self, setup: bytes) -> None:
        """Run the initializer, say UP, and answer calls until the parent closes the pipe."""
        try:
            (setup_frame,) = FrameDecoder().feed(setup)
            initializer, initargs = loads(setup_frame.kind, setup_frame.body)
            if initializer is not None:
                initializer(*initargs)
        except BaseException as exc:
            self._send(frame(INIT_FAILED, 0, dumps_error(exc)))
            raise SystemExit(1) from None
        self._send(frame(UP, 0, dumps(os.getpid())))
        while True:
            frames = self._read()
            if frames is None:
                return
            while frames:
                f = frames.pop()
                if f.kind & KIND_MASK == CALL:
                    job = f.job
                    try:
                        self._call(f)
                    except (SoftTimeLimitExceeded, asyncio.CancelledError) as exc:
                        # the signal fell just as the call ended
                        self._send(frame(ERROR, job, dumps_error(exc)))
                del f  # drop the body, so the decoder may reuse a big buffer

    def _call(self, f: Frame) -> None:
        job = f.job
        try:
            call = loads(f.kind, f.body, self._args_region.view)
            reference, args = call[0], call[1]
            soft_limit, ack = (call[2], call[3]) if len(call) > 2 else (None, False)
            fn = load_function(reference, self._functions)
            if f.kind & SHARED:
                self._words[ARGS_TAKEN] += 1  # copied out: the parent may reuse the region
        except BaseException as exc:
            error = SerializationError(
                "the call", "in the worker", f"unpickling failed: {type(exc).__name__}: {exc}"
            )
            self._send(frame(ERROR, job, dumps_error(error)))
            return
        del f, call
        if self._page.cancelled(job):  # cancelled while it waited in the pipe: never run
            self._send(frame(ERROR, job, dumps_error(asyncio.CancelledError())))
            return
        self._words[STARTED] = job  # the acknowledgement
        if ack:
            self._send(frame(ACK, job))
        if soft_limit:
            self._soft_limit = soft_limit
            signal.setitimer(signal.ITIMER_REAL, soft_limit)
        self._running = job
        failure: BaseException | None = None
        start = time.perf_counter()
        try:
            value = fn(*args)
            if inspect.iscoroutine(value):  # a coroutine function runs on a loop of its own
                value = asyncio.run(value)
        except BaseException as exc:
            failure = exc
        finally:
            # Disarmed before anything is written, so no signal can cut a frame in half;
            # one landing before these lines run is reported by serve() as the outcome.
            self._soft_limit = 0.0
            self._running = 0
            if soft_limit:
                signal.setitimer(signal.ITIMER_REAL, 0)
        run_time = time.perf_counter() - start
        if failure is not None:
            self._send(frame(ERROR, job, dumps_error(failure, run_time)))
            return
        del args
        try:
            sent = out_of_band(value)
            payload = dumps((sent, run_time), wrapped=sent is not value)
        except BaseException as exc:
            error = SerializationError(
                f"the result of {describe(fn)} ({describe(value)})",
                "in the worker",
                f"{type(exc).__name__}: {exc}",
            )
            self._send(frame(ERROR, job, dumps_error(error)))
            return
        taken = self._words[RESULTS_TAKEN]
        self._send(framed(RESULT, job, payload, self._results_region, taken))

    def _read(self) -> list[Frame] | None:
        """Block until at least one whole frame is in; None at EOF."""
        decoder = self._decoder
        while True:
            try:
                n = os.readv(self._in, [decoder.get_buffer()])
            except OSError:
                return None
            if n == 0:
                return None
            frames = decoder.buffer_updated(n)
            if frames:
                frames.reverse()  # served with pop(), oldest first
                return frames

    def _send(self, buffers: list[Buffer]) -> None:
        """Write all buffers, blocking; resumes after partial writes."""
        total = sum(map(len, buffers))  # 1-D byte buffers: len is the size
        n = os.writev(self._out, buffers)
        if n == total:
            return
        views = [memoryview(b) for b in buffers]
        while views:
            while n and views:
                head = views[0]
                if n >= head.nbytes:
                    n -= head.nbytes
                    views.pop(0)
                else:
                    views[0] = head[n:]
                    n = 0
            if views:
                n = os.writev(self._out, views)
