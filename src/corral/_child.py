"""The worker process: run the initializer, announce itself, then serve calls until EOF.

The child blocks on its in-pipe (no polling, no sleeps) and answers on its out-pipe:

    parent                               child
      |  CALL(job, fn, args)  ------------>  job id stored as "taken" (and, for a call with
      |  <------------------------ ACK(job)  a hard time limit, ACK: the limit counts from it)
      |                                      unpickle the call
      |                     shared page <--  job id stored: from here the job is "started"
      |                                      fn(*args)
      |  <------------  RESULT | ERROR(job)  the value, or the exception and its traceback

The acknowledgement is a store into a page of shared memory (see ``_shared``), not a
message: the parent reads it only if the worker dies, so a call costs one frame each way.
Unpickling comes before the acknowledgement on purpose: a call whose arguments kill the
process while they are unpickled was never started, so the parent may deliver it again
(a bounded number of times) without running anything twice. Unpickling runs code of the
caller's choosing and may block, so a cancel or a hard limit reaches it there too.

Tasks run in this process and may close fds they do not own: every pipe end and memfd is
vouched for before use (``_Worker.vouch``, ``_shared``), and a worker that finds one taken
over exits at once rather than read calls from, or write results into, someone's file.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import multiprocessing.forkserver
import os
import select
import signal
from time import perf_counter
from types import CoroutineType, FrameType
from typing import TYPE_CHECKING, Any, NamedTuple

from ._errors import SerializationError, SoftTimeLimitExceeded
from ._functions import Functions
from ._interrupt import arm, armed, disarm
from ._report import set_reporter
from ._shared import (
    ARGS_TAKEN,
    RESULTS_TAKEN,
    STARTED,
    TAKEN,
    SharedPage,
    SharedRegion,
    abandon,
    release_inherited,
)
from ._streaming import Batch, LiveIterator, Turns, open_iterator
from ._wire import (
    ACK,
    ACK_WANTED,
    CALL,
    CLOSE,
    CREDIT,
    ERROR,
    FUNCTION,
    INIT_FAILED,
    ITEMS,
    KIND_MASK,
    REPORT,
    RESULT,
    SHARED,
    UP,
    Buffer,
    Frame,
    FrameDecoder,
    describe,
    dumps,
    dumps_error,
    dumps_report,
    dumps_result,
    frame,
    framed,
    loads,
    loads_call,
    loads_setup,
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


def main(
    channels: Channels, setup: bytes | tuple[Any, tuple[Any, ...]], inherited: list[int]
) -> None:
    """Entry point of a worker process (the target of its ``multiprocessing.Process``).


    ``inherited`` lists the parent's pipe ends that a forked child got by accident; closing
    them lets siblings see EOF when the parent closes their pipes.
    """
    _die_with_parent()
    # A group of its own, which what its tasks start joins: killed as one when the worker
    # is (see workers._process) or when the program dies (see _undertaker).
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
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
    release_inherited()  # forked: the siblings' memory is none of this worker's business
    page = SharedPage(channels.page.fileno(), worker=True)
    channels.page.close()
    args_region = SharedRegion(os.dup(channels.args_region.fileno()), worker=True)
    results_region = SharedRegion(os.dup(channels.results_region.fileno()), worker=True)
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
        worker.close()  # or exit, if a task took a pipe over: they are closed by number
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

# The exception a soft time limit raises in this process's tasks: SoftTimeLimitExceeded, or
# the subclass a facade names with ``raise_at_soft_limits``.
_soft_limit_error: type[SoftTimeLimitExceeded] = SoftTimeLimitExceeded


def raise_at_soft_limits(error: type[SoftTimeLimitExceeded]) -> None:
    """In this worker process, have soft time limits raise ``error(limit)`` in the task.

    For a facade whose tasks catch another library's exception: ``corral.celery``'s
    subclass also derives from Celery's ``SoftTimeLimitExceeded``, which Celery tasks catch.
    Call it from the pool's initializer.
    """
    global _soft_limit_error
    if not issubclass(error, SoftTimeLimitExceeded):
        raise TypeError(f"error must subclass corral.SoftTimeLimitExceeded, not {error!r}")
    _soft_limit_error = error


# Where an interrupt is armed rather than raised (Python 3.13), how soon its follow-up
# checks that it landed: the delay a task waiting in a call into C sees before it is ended.
FOLLOW_UP = 0.02


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


def _unpack_setup(setup: bytes | tuple[Any, tuple[Any, ...]]) -> tuple[Any, tuple[Any, ...]]:
    """The initializer and its arguments: pickled by corral (``dumps_setup``), or carried as
    they are by multiprocessing (they hold objects only inheritance may hand over)."""
    if isinstance(setup, bytes):
        return loads_setup(setup)
    return setup


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
        self._functions = Functions()  # resolved by name, or sent by value once
        self._page = page
        self._soft_limit = 0.0  # the soft limit of the call running now, while armed
        self._running = 0  # the job running now, while it may be interrupted
        self._armed: BaseException | None = None  # an interrupt armed, not followed up yet
        self._armed_frame: FrameType | None = None  # the frame it was armed in
        self._soft_left = 0.0  # what was left of the soft limit when it was armed
        self._turns: Turns[int] = Turns()  # open streams, by job: they take turns with calls
        self._decoder = FrameDecoder()
        self._poll = select.poll()
        self._poll.register(in_fd, select.POLLIN)
        # Registered in an epoll set, an fd is known by its number and its open file: asking
        # to modify it fails once the number names another file (see ``vouch``).
        self._own = select.epoll()
        self._own.register(in_fd, 0)
        self._own.register(out_fd, 0)
        signal.signal(signal.SIGALRM, self._soft_limit_passed)
        signal.signal(INTERRUPT, self._interrupted)
        set_reporter(self._report)

    def _report(self, obj: Any) -> None:
        """``corral.report(obj)`` in a call: the parent gets it at once, before the result."""
        job = self._running
        if not job:
            raise RuntimeError("corral.report() was called outside a running task")
        self._send(frame(REPORT, job, dumps_report(obj)))

    def _interrupted(self, signum: int, frame: FrameType | None) -> None:
        """The parent cancelled a job: if it is the one running, raise inside it."""
        job = self._running
        if job and self._page.cancelled(job):
            self._running = 0
            self._raise(asyncio.CancelledError(f"job {job} was cancelled by its caller"), frame)

    def _soft_limit_passed(self, signum: int, frame: FrameType | None) -> None:
        """SIGALRM: raise SoftTimeLimitExceeded in the task, if one is still running; or
        an interrupt's follow-up."""
        if self._armed is not None:
            self._follow_up(frame)
            return
        limit, self._soft_limit = self._soft_limit, 0.0
        if limit:
            self._raise(_soft_limit_error(limit), frame)

    def _raise(self, exc: BaseException, frame: FrameType | None) -> None:
        """Raise exc in the task, from a signal handler that interrupted frame.

        On Python 3.13 an exception raised by the handler may skip the task's own
        handlers (see ``_interrupt``): it is armed to land at the task's next instruction
        instead, and a follow-up (SIGALRM after ``FOLLOW_UP`` s) checks that it did.
        """
        if not arm(frame, exc):
            raise exc
        self._armed, self._armed_frame = exc, frame
        # A soft limit still to come is put back by the follow-up.
        self._soft_left = signal.setitimer(signal.ITIMER_REAL, FOLLOW_UP)[0]

    def _follow_up(self, frame: FrameType | None) -> None:
        """An armed interrupt's follow-up: still pending in the frame it was armed in, the
        task has run no instruction since, so it waits in a call into C (``time.sleep``
        retrying after EINTR), which an exception raised here ends in the right place.
        Pending in a frame called since, it is armed there again."""
        exc, self._armed = self._armed, None
        if not armed():
            if self._soft_left and self._soft_limit:
                signal.setitimer(signal.ITIMER_REAL, max(self._soft_left - FOLLOW_UP, 1e-3))
            return
        assert exc is not None
        if frame is self._armed_frame:
            disarm()
            raise exc
        left = self._soft_left  # what _raise reads from the timer now is only the follow-up's
        self._raise(exc, frame)
        self._soft_left = max(left - FOLLOW_UP, 1e-3) if left else 0.0

    def _disarm(self) -> None:
        """The call (or a stream's turn) ended: no interrupt may land after this, and no
        timer of its own (a soft limit to come, a follow-up) may fire."""
        if self._soft_limit or self._armed is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
        self._soft_limit = 0.0
        self._running = 0
        if self._armed is not None:
            self._armed = self._armed_frame = None
            disarm()

    def serve(self, setup: bytes | tuple[Any, tuple[Any, ...]]) -> None:
        """Run the initializer, say UP, and answer calls until the parent closes the pipe."""
        try:
            initializer, initargs = _unpack_setup(setup)
            if initializer is not None:
                initializer(*initargs)
        except BaseException as exc:
            self._send(frame(INIT_FAILED, 0, dumps_error(exc)))
            raise SystemExit(1) from None
        self._send(frame(UP, 0, dumps(os.getpid())))
        turns = self._turns
        streams = turns.live
        try:
            while True:
                # Without open streams (the common case) the stream checks are skipped.
                frames = self._read(block=not (streams and turns.waiting()))
                if frames is None:
                    return
                while frames:
                    f = frames.pop()
                    kind = f.kind & KIND_MASK
                    if kind == CALL:
                        if streams:  # a call waits: a stream's batch first, if it is its turn
                            while (live := turns.choose(True)) is not None:
                                self._pump(live)
                        job = f.job
                        try:
                            self._call(f)
                        except (SoftTimeLimitExceeded, asyncio.CancelledError) as exc:
                            # the signal fell just as the call ended
                            self._send(frame(ERROR, job, dumps_error(exc)))
                    elif kind == CREDIT:
                        turns.grant(f.job, loads(f.kind, f.body))
                    elif kind == CLOSE:
                        self._close_stream(f.job)
                    elif kind == FUNCTION:  # unpickled when a call first needs it
                        self._functions.define(f.job, f.body)
                    del f  # drop the body, so the decoder may reuse a big buffer
                if streams:  # no call waits: a stream's batch, then a look at the pipe
                    live = turns.choose(False)
                    if live is not None:
                        self._pump(live)
        finally:
            for live in turns.drain():  # the parent left: run the generators' finally
                live.discard()

    # -- streams ----------------------------------------------------------------------------

    def _pump(self, live: LiveIterator[int]) -> None:
        """Send the next batch of a stream, then its turn ends. A batch is as many items as
        the stream's credit allows, up to its batch size, which adapts (see ``_streaming``):
        a fast generator's items travel a thousand to a frame, a slow one's as they come."""
        job = live.job
        self._words[STARTED] = job
        self._running = job
        try:
            items, ended, failure = live.produce(live.limit())
        except (SoftTimeLimitExceeded, asyncio.CancelledError) as exc:
            items, ended, failure = [], False, exc  # the signal fell just as the batch ended
        finally:
            self._disarm()
        if items:
            try:
                payload = dumps(items)
            except Exception as exc:
                failure = SerializationError(
                    f"an item of the stream ({describe(items[0])})",
                    "in the worker",
                    f"{type(exc).__name__}: {exc}",
                )
            else:
                self._send(frame(ITEMS, job, payload))
        self._turns.end_turn(live, Batch(items, ended, failure))  # back of the line, or out
        if failure is not None:
            live.discard()
            self._send(frame(ERROR, job, dumps_error(failure, live.run_time)))
        elif ended:
            self._send(frame(RESULT, job, dumps_result(None, live.run_time)))

    def _close_stream(self, job: int) -> None:
        """The consumer left: close the generator (its ``finally`` runs) and end the job."""
        live = self._turns.pop(job)
        if live is not None:
            error = live.shut(job)  # CancelledError, or what its finally raised
            self._send(frame(ERROR, job, dumps_error(error, live.run_time)))

    def _call(self, f: Frame) -> None:
        job = f.job
        # Unpickling runs code of the caller's choosing (a __reduce__ target) that may
        # block: from here the parent may interrupt it (a cancel) or kill it (a hard limit,
        # which counts from the ACK, sent before any interrupt can cut it short).
        self._words[TAKEN] = job
        if f.kind & ACK_WANTED:
            self._send(frame(ACK, job))
        self._running = job  # a cancel interrupts it (SIGUSR1), unpickling or running
        try:
            reference, args, soft_limit, credit = loads_call(f.kind, f.body, self._args_region.view)
            fn = self._functions.load(reference)
            if f.kind & SHARED:
                self._words[ARGS_TAKEN] += 1  # copied out: the parent may reuse the region
        except BaseException as exc:
            self._disarm()
            error = (
                exc
                if isinstance(exc, asyncio.CancelledError)
                else SerializationError(
                    "the call", "in the worker", f"unpickling failed: {type(exc).__name__}: {exc}"
                )
            )
            self._send(frame(ERROR, job, dumps_error(error)))
            return
        del f
        self._words[STARTED] = job  # the acknowledgement
        # Checked after the acknowledgement, never only before: the parent marks a job
        # cancelled and then reads the acknowledgement, so either the mark is seen here or
        # the parent sees the job started and interrupts it. A cancel falling between a
        # check made before and the acknowledgement was lost, and the job ran to its end.
        if self._page.cancelled(job):  # cancelled while it waited in the pipe: never run
            self._running = 0
            self._send(frame(ERROR, job, dumps_error(asyncio.CancelledError())))
            return
        if soft_limit:
            self._soft_limit = soft_limit
            signal.setitimer(signal.ITIMER_REAL, soft_limit)
        failure: BaseException | None = None
        start = perf_counter()
        try:
            value = fn(*args)
            if isinstance(value, CoroutineType):  # a coroutine function: on a loop of its own
                value = asyncio.run(value)
        except BaseException as exc:
            failure = exc
        finally:
            # Disarmed before anything is written, so no signal can cut a frame in half;
            # one landing before these lines run is reported by serve() as the outcome.
            self._disarm()
        run_time = perf_counter() - start
        if failure is None and credit:
            try:
                self._turns.add(LiveIterator(job, open_iterator(fn, value), credit, run_time))
                return  # the serve loop sends its items as credit allows
            except TypeError as exc:
                failure = exc
        if failure is not None:
            self._send(frame(ERROR, job, dumps_error(failure, run_time)))
            return
        del args
        try:
            payload = dumps_result(value, run_time)
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

    def vouch(self, fd: int) -> None:
        """Exit unless fd is still this worker's pipe end.

        A task ran since the last use: it may have closed the fd and a file of its own may
        have taken the number. Reading calls from that file, or writing results into it,
        must never happen; the worker exits instead (see ``_shared.abandon``). One syscall,
        lighter than an fstat.
        """
        try:
            self._own.modify(fd, 0)
        except OSError:  # ENOENT: the number names another file; EBADF: it is closed
            abandon()

    def close(self) -> None:
        """Vouch for both pipes, so that they may be closed, and close the epoll set (which
        their vouching vouched for)."""
        self.vouch(self._in)
        self.vouch(self._out)
        self._own.close()

    def _read(self, block: bool = True) -> list[Frame] | None:
        """Block until at least one whole frame is in; None at EOF. Without ``block``,
        return [] at once when nothing is waiting (a stream has items to send)."""
        decoder = self._decoder
        self.vouch(self._in)
        while True:
            if not block and not self._poll.poll(0):
                return []
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
        self.vouch(self._out)
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
