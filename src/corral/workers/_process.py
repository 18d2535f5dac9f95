"""``ProcessWorker``: the parent's side of one worker process.

It owns the process, the parent's ends of its two pipes and one fd that becomes readable
when the process dies (a pidfd, or the forkserver's status pipe). All three sit on the event
loop, so a result, a crash or an exit is noticed the moment it happens, with no thread and
no timer. Which jobs the process held when it died decides their fate:

    sent, never acknowledged  ->  unstarted: back to the queue, run elsewhere exactly once
    acknowledged, running     ->  started: lost, WorkerLostError (or a retry)

The acknowledgement is the job id the child stores in a shared page before running a call
(see ``_shared``); the parent reads it when the child dies. Unpickling happens before it,
so a call whose unpickling kills the process counts as undelivered; ``deliveries`` on the
job bounds how often that may happen.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import sys
import tempfile
import types
import weakref
from collections.abc import Iterator
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from .. import _child, _forkserver
from .. import _log as log
from .. import _undertaker as undertaker
from .._checks import check_seconds
from .._errors import SerializationError, WorkerLostError, WorkerStartupError
from .._job import JobState
from .._shared import ARGS_TAKEN, RESULTS_TAKEN, SharedPage, SharedRegion
from .._wire import (
    ACK,
    CALL,
    CLOSE,
    CREDIT,
    ERROR,
    INIT_FAILED,
    ITEMS,
    KIND_MASK,
    REPORT,
    RESULT,
    SHARED,
    UP,
    FrameDecoder,
    dumps,
    dumps_setup,
    frame,
    framed,
    loads,
    loads_outcome,
    unpickling_failed,
)
from ._base import CANCEL_GRACE, Worker, WorkerHost, WorkerState, check_initializer
from ._pipes import LoopReader, LoopWriter, enlarge, open_fds

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext
    from multiprocessing.process import BaseProcess

    from .._job import Job
    from .._wire import Frame, Outcome

# A worker that has not said UP by then is killed: generous, since a spawned interpreter
# importing a large application on a loaded machine can take seconds.
STARTUP_TIMEOUT = 60.0

# The exit code of a worker that found its main module starting a pool at import (see
# ``_rerun_in_a_worker``); no exit code of Python's own or of a signal.
UNGUARDED_MAIN = 86

# Listings of a worker's descendants, each stopping those it found, before the kill: a
# process forking as it is stopped shows its child in the next listing. Three passes catch
# a fork in flight at each of two levels; each costs a scan of /proc.
TREE_PASSES = 3

# After the child closes its end of the pipe it should be gone at once; one that lingers
# this long is killed.
LINGER = 1.0


def default_start_method() -> str:
    """forkserver where it exists (the safe default Python 3.14 chose), else spawn.

    fork copies the parent's threads' locks in whatever state they are and is unsafe under a
    running event loop; forkserver forks from a clean single-threaded server instead.
    """
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


def _preload_in_forkserver(ctx: BaseContext) -> None:
    """Have the forkserver import corral, and what the main module imported, once, so the
    workers it forks start in milliseconds instead of importing them each; and import
    ``_forkserver``, which keeps it alive when a fork fails.

    multiprocessing starts every worker by running the main module again. The forkserver
    is meant to preload it (``"__main__"`` is in its list by default), but Python 3.11's
    looks for a key its own ``get_preparation_data()`` no longer returns, and skips it
    (gh-126631): each worker then re-imports everything the main module imports. With
    those modules preloaded, that second run finds them imported already. The same
    forkserver also ignores the parent's ``sys.path``, so it preloads what its own path
    reaches (installed packages, the current directory); a module found only through a
    path added at run time is still imported by each worker.

    Only takes effect if the forkserver is not running yet. The modules asked for so far
    are kept; multiprocessing offers no public way to read them.
    """
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    modules = list(getattr(server, "_preload_modules", None) or ["__main__"])
    # _forkserver last: its import says the server is ready (see _boot_forkserver)
    wanted = [_child.__name__, *_imported_by_main(), _forkserver.__name__]
    if not set(wanted) <= set(modules):
        ctx.set_forkserver_preload([*modules, *(m for m in wanted if m not in modules)])


# The forkserver's boot under way: a task of its own, which every worker of that loop
# starting meanwhile awaits, so that one start cancelled leaves the boot to the others.
_booting: asyncio.Task[None] | None = None


async def _boot_forkserver(ctx: BaseContext, timeout: float) -> None:
    """Start the forkserver unless it runs, and wait on the event loop until it has
    preloaded the main module's imports, which may take seconds (numpy, torch).

    Left to multiprocessing, the first worker's start waits for that blocked in a read of
    the pid, the program's loop frozen meanwhile. A server that dies, or is not ready within
    timeout, is left to that start, which fails (or waits) as it would have.
    """
    global _booting
    loop = asyncio.get_running_loop()
    if _booting is None or _booting.done() or _booting.get_loop() is not loop:
        server = multiprocessing.forkserver._forkserver
        if getattr(server, "_forkserver_pid", None) is not None:
            return  # running already (or booting for another thread's loop)
        _preload_in_forkserver(ctx)
        _booting = loop.create_task(_boot(server, timeout), name="corral-forkserver-boot")
    await asyncio.shield(_booting)


async def _boot(server: Any, timeout: float) -> None:
    """Start the forkserver, told to say on a FIFO when it is ready, and wait for that, or
    for its death, or timeout."""
    try:
        folder = tempfile.TemporaryDirectory(prefix="corral-forkserver-")
    except OSError:
        return  # no FIFO to be had: the first start waits as multiprocessing has it wait
    loop = asyncio.get_running_loop()
    with folder:
        path = os.path.join(folder.name, "ready")
        try:
            os.mkfifo(path, 0o600)
            ready = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            return
        booted = loop.create_future()
        watched = [ready]
        try:
            _start_forkserver(path)
            pid = getattr(server, "_forkserver_pid", None)
            if pid is not None and hasattr(os, "pidfd_open"):
                try:
                    watched.append(os.pidfd_open(pid))  # readable if it dies instead
                except OSError:  # gone already: the start that follows says how
                    _settle(booted)
            for fd in watched:
                loop.add_reader(fd, _settle, booted)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await booted
        finally:
            for fd in watched:
                loop.remove_reader(fd)
                os.close(fd)


def _settle(booted: asyncio.Future[None]) -> None:
    if not booted.done():
        booted.set_result(None)


def _start_forkserver(ready: str) -> None:
    """Start the forkserver, told to say on the FIFO ``ready`` when it is, and the
    undertaker, which boots meanwhile."""
    with _sigint_held("forkserver"):
        os.environ[_forkserver.READY] = ready
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            del os.environ[_forkserver.READY]
        undertaker.prepare()


@contextlib.contextmanager
def _sigint_held(start_method: str) -> Iterator[None]:
    """Hold SIGINT blocked while processes start, so that they are born with it blocked
    (the mask survives fork, exec and the forkserver): a worker ignores it before it
    unblocks it, so a Ctrl-C during its start-up cannot print a KeyboardInterrupt traceback
    from it, and the forkserver's preloading would not survive one. The forkserver and
    spawn start multiprocessing's resource tracker first, whose start unblocks SIGINT
    whatever the mask was: it is started before the mask is taken."""
    if start_method != "fork":
        resource_tracker.ensure_running()
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _imported_by_main() -> list[str]:
    """The modules the main module has imported."""
    main = sys.modules.get("__main__")
    if main is None:
        return []
    # The main module itself is left out even when run with -m: each worker runs it anew
    # as __mp_main__, and runpy warns when that module was imported before.
    names: set[str] = set()
    for value in list(vars(main).values()):
        if isinstance(value, types.ModuleType):
            names.add(value.__name__)
        else:
            module = getattr(value, "__module__", None)
            if isinstance(module, str) and module in sys.modules:
                names.add(module)
    names.discard("__main__")
    names.discard("__mp_main__")
    return sorted(names)


_live: weakref.WeakSet[ProcessWorker] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    """A pool left open at exit must not leave its processes behind (runs before
    multiprocessing's own exit hook, which would otherwise wait for them forever)."""
    for worker in list(_live):
        worker.kill_now()


def _setup(initializer: Any, initargs: tuple[Any, ...]) -> bytes | tuple[Any, tuple[Any, ...]]:
    """What the child needs to run the initializer: pickled here, so a lambda or a closure
    travels (cloudpickle) and one that cannot travel fails at the call that gave it.

    A multiprocessing ``Lock``, ``Queue``, ``Event`` or ``Value`` refuses to be pickled
    except while a process is being started (it shares an OS object, which only
    inheritance may hand over): such a setup is handed to ``Process`` as it is, for
    multiprocessing to carry across as it does for ``multiprocessing.Pool``.
    """
    try:
        return dumps_setup(initializer, initargs)  # the child decodes it (loads_setup)
    except RuntimeError:  # "... should only be shared between processes through inheritance"
        return (initializer, initargs)
    except Exception as exc:
        raise SerializationError(
            "the initializer or its arguments", "in the parent", f"{type(exc).__name__}: {exc}"
        ) from exc


class ProcessWorker(Worker):
    """A worker process whose pipes the event loop drives."""

    kind = "process"

    def __init__(
        self,
        *,
        series: list[str] | None = None,
        name: str | None = None,
        start_method: str | None = None,
        initializer: Any = None,
        initargs: tuple[Any, ...] = (),
        startup_timeout: float = STARTUP_TIMEOUT,
    ) -> None:
        super().__init__(series=series, name=name)
        methods = multiprocessing.get_all_start_methods()
        method = start_method or default_start_method()
        if method not in methods:
            raise ValueError(
                f"start_method={start_method!r} is not available here; choose one of {methods}"
            )
        check_initializer(initializer)
        check_seconds("startup_timeout", startup_timeout)
        self.start_method = method
        self.startup_timeout = startup_timeout
        self._setup = _setup(initializer, tuple(initargs))
        self._host: WorkerHost | None = None
        self._process: BaseProcess | None = None
        self._reader: LoopReader | None = None
        self._writer: LoopWriter | None = None
        self._death_fd = -1
        self._owns_death_fd = False
        self._page: SharedPage | None = None
        self._regions: tuple[SharedRegion, SharedRegion] | None = None  # args, results
        self._overdue: dict[int, asyncio.TimerHandle] = {}  # cancelled jobs given grace
        self._pid: int | None = None
        self._sent: dict[int, tuple[Job[Any], int]] = {}  # job id -> (job, frame end offset)
        self._up: asyncio.Future[int] | None = None
        self._gone: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._expected_exit = False
        self._exitcode: int | None = None  # once it is DEAD (None: unknown)

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def in_flight(self) -> int:
        """Jobs sent and not yet finished."""
        return len(self._sent)

    async def start(self, host: WorkerHost) -> None:
        if self.state is not WorkerState.NEW:
            raise RuntimeError(f"cannot start {self.name}: it is {self.state.value}")
        if _rerun_in_a_worker():
            # This process is a worker running the main module again, as spawn and the
            # forkserver do, and the module starts a pool at import: unguarded. It would
            # only fail to start workers of its own and print a traceback, once per worker
            # and retry; it leaves quietly instead, and the exit code tells the parent why.
            os._exit(UNGUARDED_MAIN)
        self._host = host
        loop = self._loop = asyncio.get_running_loop()
        self._up = loop.create_future()
        self._gone = loop.create_future()
        self.state = WorkerState.STARTING
        try:
            if self.start_method == "forkserver":
                ctx = multiprocessing.get_context(self.start_method)
                await _boot_forkserver(ctx, self.startup_timeout)
            self._launch(loop)
        except Exception as exc:  # OSError, or multiprocessing refusing (no __main__ guard)
            self._finish(None)
            raise WorkerStartupError(
                1, f"could not start a process: {type(exc).__name__}: {exc}"
            ) from exc
        except BaseException:  # cancelled while the forkserver booted: nothing launched
            self._finish(None)
            raise
        try:
            # asyncio.timeout, not wait_for: a start cancelled just as the worker failed
            # raises CancelledError, not the failure chained to a CancelledError
            async with asyncio.timeout(self.startup_timeout):
                await asyncio.shield(self._up)
        except TimeoutError:
            await self.kill()
            raise WorkerStartupError(
                1, f"{self.name} did not announce itself within {self.startup_timeout:g} s"
            ) from None
        except BaseException:  # the initializer raised, the process died, or cancelled
            await self.kill()  # when start() raises, nothing of the worker is left
            raise
        if self.state is WorkerState.DEAD:
            # It said UP, then died before this task resumed (its UP and its death handled
            # in one turn of a busy loop). Its death was not reported, since it was still
            # STARTING: marking it READY would have the queue send jobs to a dead worker.
            raise WorkerStartupError(
                1, f"{self.name} {_how(self._exitcode)} right after announcing itself"
            ) from _lost(self.name, self._exitcode)
        self.state = WorkerState.READY

    def _launch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Create the pipes, the shared memory and the process; only the parent's ends stay
        open here.

        Anything may fail half-way (no fd left: EMFILE; no process: EAGAIN). Each fd has one
        owner from the moment it exists, and one closer: the child's ends their
        ``Connection`` (closed here once the child has them), the parent's pipe ends their
        ``LoopReader``/``LoopWriter``, the memfds their page or region. A failure undoes
        what was made, closing each once: a number closed twice may by then be a file of
        the program's own.
        """
        ctx: BaseContext = multiprocessing.get_context(self.start_method)
        if self.start_method == "forkserver":
            _preload_in_forkserver(ctx)
        with contextlib.ExitStack() as child_ends, contextlib.ExitStack() as undo:
            in_r, in_w = os.pipe()
            child_in = child_ends.enter_context(Connection(in_r, writable=False))
            writer = LoopWriter(loop, in_w, self._on_write_error)
            undo.callback(writer.close)
            out_r, out_w = os.pipe()
            child_out = child_ends.enter_context(Connection(out_w, readable=False))
            reader = LoopReader(loop, out_r, FrameDecoder(), self._on_frames, self._on_eof)
            undo.callback(reader.close)
            enlarge(in_w)
            enlarge(out_w)
            page, page_fd = SharedPage.create()
            undo.callback(page.close)
            child_page = child_ends.enter_context(Connection(page_fd))
            # The regions keep their own fds, so the child gets copies.
            args_region, args_fd = SharedRegion.create()
            undo.callback(args_region.close)
            child_args = child_ends.enter_context(Connection(os.dup(args_fd)))
            results_region, results_fd = SharedRegion.create()
            undo.callback(results_region.close)
            child_results = child_ends.enter_context(Connection(os.dup(results_fd)))
            # Connections carry fds through every start method (pass_fds, SCM_RIGHTS or
            # fork). A forked child also gets every parent-side pipe end, these included.
            channels = _child.Channels(child_in, child_out, child_page, child_args, child_results)
            inherited = open_fds() if self.start_method == "fork" else []
            process = ctx.Process(  # type: ignore[attr-defined]
                target=_child.main,
                args=(channels, self._setup, inherited),
                name=f"corral-{self.name}",
            )
            _check_fd_room(in_w)
            with _sigint_held(self.start_method):
                if self.start_method == "forkserver":
                    # Running already, unless start() could not wait for its boot on the
                    # loop (no FIFO to be had): then the read of the first pid waits it out.
                    multiprocessing.forkserver.ensure_running()
                undertaker.prepare()  # before the first fork: no worker waits for it after
                process.start()
            undo.callback(_reap, process)  # run first: the process goes before its pipes
            if self.start_method != "forkserver" and hasattr(os, "pidfd_open"):
                # Readable once the process is a zombie, so its exit status is ready to reap.
                death_fd = os.pidfd_open(process.pid)
                owns_death_fd = True
            else:
                # The forkserver reaps its children and writes the status to this pipe.
                death_fd = process.sentinel
                owns_death_fd = False
            undo.pop_all()
        self._process = process
        self._pid = process.pid
        self._page = page
        self._regions = (args_region, results_region)
        self._reader = reader
        self._writer = writer
        self._death_fd = death_fd
        self._owns_death_fd = owns_death_fd
        _live.add(self)
        undertaker.watch(process.pid)  # the worker leads its group: see _child.main
        loop.add_reader(self._death_fd, self._on_death)

    def send(self, job: Job[Any]) -> None:
        writer = self._writer
        if writer is None or self.state is not WorkerState.READY:
            raise RuntimeError(f"cannot send to {self.name}: it is {self.state.value}")
        assert self._page is not None and self._regions is not None
        taken = self._page.words[ARGS_TAKEN]
        writer.write(framed(CALL, job.id, job.encode(), self._regions[0], taken))
        self._sent[job.id] = (job, writer.queued)

    def credit(self, job: Job[Any], n: int) -> None:
        """The consumer of job's stream took n items: the worker may send n more."""
        if job.id in self._sent and self._writer is not None and self.state is WorkerState.READY:
            self._writer.write(frame(CREDIT, job.id, dumps(n)))

    def cancel(self, job: Job[Any], *, grace: float = CANCEL_GRACE) -> None:
        """Stop job: one not started yet is skipped by the worker; a running one is
        interrupted (``asyncio.CancelledError`` is raised inside it), and if it is still
        running after grace seconds, the process is killed (0: kill at once). A stream
        waiting for credit is closed (its generator's ``finally`` runs)."""
        page = self._page
        if job.id not in self._sent or page is None or self._loop is None:
            return
        if job.stream is not None and self._writer is not None and grace > 0:
            self._writer.write(frame(CLOSE, job.id))
        page.cancel(job.id)
        if job.id not in (page.started, page.taken):  # taken: maybe stuck unpickling it
            return  # the worker will skip it when it comes to it
        if grace <= 0:
            self._sigkill()
            return
        if self._pid is not None and self.state is not WorkerState.DEAD:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, _child.INTERRUPT)
        self._overdue[job.id] = self._loop.call_later(grace, self._still_running, job.id, grace)

    def may_have_started(self, job: Job[Any]) -> bool:
        # The child runs its jobs in the order sent and acknowledges each on the shared
        # page; a job sent after the one it began has not begun. (A cancel racing the
        # acknowledgement is settled by the child: see ``cancel``.)
        page = self._page
        return page is None or _began(job, page.started)

    def _still_running(self, job_id: int, grace: float) -> None:
        self._overdue.pop(job_id, None)
        entry = self._sent.get(job_id)
        if entry is not None:
            log.killed_after_cancel(self, entry[0], grace, "killing its process")
            self._sigkill()  # it ignored the interrupt (a C call, blocked signals, a catch)

    async def stop(self) -> None:
        if self.state in (WorkerState.NEW, WorkerState.DEAD):
            return
        assert self._gone is not None
        if self.state is not WorkerState.STOPPING:
            self.state = WorkerState.STOPPING
            self._expected_exit = True
            if self._writer is not None:
                self._writer.close_when_flushed()  # EOF tells the child to exit
        await asyncio.shield(self._gone)

    async def kill(self) -> None:
        if self.state is WorkerState.NEW:
            return
        assert self._gone is not None
        self.kill_now()
        await asyncio.shield(self._gone)

    def kill_now(self) -> None:
        """Send SIGKILL without waiting, as the owner's decision; the death fd reports
        the end."""
        if self.state is not WorkerState.DEAD:
            self._expected_exit = True
            self._sigkill()

    def _sigkill(self) -> None:
        process, pid = self._process, self._pid
        if self.state is WorkerState.DEAD or process is None or pid is None:
            return
        try:
            if process.exitcode is not None:
                return  # reaped: its pid may already name another process
        except ValueError:
            return  # closed, hence reaped
        _kill_tree(pid)

    def rss(self) -> int | None:
        """Resident memory of the process in bytes, or None when it is gone."""
        pid = self.pid
        if pid is None or not self.alive:
            return None
        import psutil  # noqa: PLC0415  # see _kill_tree

        try:
            return int(psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            return None

    # -- events from the loop -------------------------------------------------------------

    def _on_frames(self, frames: list[Frame]) -> None:
        host = self._host
        assert host is not None
        writer = self._writer
        assert writer is not None
        writer.cork()  # jobs sent while these frames are handled go out in one writev
        try:
            self._handle(frames, host)
        finally:
            writer.uncork()

    def _handle(self, frames: list[Frame], host: WorkerHost) -> None:
        sent = self._sent
        for kind, job_id, body in frames:
            k = kind & KIND_MASK
            if k in (RESULT, ERROR):
                entry = sent.pop(job_id, None)
                if entry is None:
                    continue
                job = entry[0]
                if self._overdue and (overdue := self._overdue.pop(job_id, None)):
                    overdue.cancel()
                if kind & SHARED:
                    value, error, job.run_time = self._shared_outcome(kind, body)
                else:
                    value, error, job.run_time = loads_outcome(kind, body)
                host.job_done(self, job, value, error)
            elif k in (ITEMS, REPORT):
                entry = sent.get(job_id)
                if entry is None:
                    continue
                job = entry[0]
                try:
                    obj = loads(kind, body)
                except BaseException as decode_exc:  # see loads_outcome
                    what = "items of the stream" if k == ITEMS else "a report"
                    self._abandon(job, unpickling_failed(what, decode_exc))
                    continue
                if k == ITEMS:
                    host.job_items(self, job, obj)
                else:
                    host.job_report(self, job, obj)
            elif k == ACK:  # asked for by calls with a hard time limit
                entry = sent.get(job_id)
                if entry is not None:
                    host.job_started(self, entry[0])
            elif k == UP:
                if self._up is not None and not self._up.done():
                    self._up.set_result(loads(kind, body))
            elif k == INIT_FAILED:
                _, exc, _ = loads_outcome(kind, body)
                if self._up is not None and not self._up.done():
                    error = WorkerStartupError(
                        1, f"the initializer raised {type(exc).__name__}: {exc}"
                    )
                    error.__cause__ = exc
                    self._up.set_exception(error)

    def _shared_outcome(self, kind: int, body: bytes | bytearray | memoryview) -> Outcome:
        """An outcome whose buffers lie in the results region; once they are copied out
        (or given up), the region is free for the child's next large result."""
        assert self._regions is not None and self._page is not None
        outcome = loads_outcome(kind, body, self._regions[1].view)
        self._page.words[RESULTS_TAKEN] += 1
        return outcome

    def _abandon(self, job: Job[Any], error: BaseException) -> None:
        """Fail job now, though its worker still runs it: stop it there (a stream is closed,
        a running call interrupted) and drop whatever it still sends for it."""
        self.cancel(job)
        del self._sent[job.id]
        assert self._host is not None
        self._host.job_done(self, job, None, error)

    def _on_eof(self) -> None:
        # The child closed its out-pipe: it is exiting, and the death fd will say so. One
        # that closed it and lives on is useless, so it gets a moment, then SIGKILL.
        if self._loop is not None and self.state is not WorkerState.DEAD:
            self._linger = self._loop.call_later(LINGER, self._sigkill)

    def _on_write_error(self, exc: OSError) -> None:
        # EPIPE: the child is gone or going; the death fd brings the verdict.
        pass

    def _on_death(self) -> None:
        process = self._process
        assert process is not None
        if self._reader is not None:
            self._reader.drain()  # results written before the exit still count
        process.join(0 if self._owns_death_fd else None)
        if process.exitcode is None:
            process.join(0.1)  # not reaped yet: a moment, at most, after the pidfd fired
        self._finish(process.exitcode)

    def _finish(self, exitcode: int | None) -> None:
        """The process is gone: release everything, then tell whoever waits."""
        if self.state is WorkerState.DEAD:
            return
        was = self.state
        self.state = WorkerState.DEAD
        _live.discard(self)
        error = _lost(self.name, exitcode)
        self._exitcode = exitcode
        if self._up is not None and not self._up.done():
            if exitcode == UNGUARDED_MAIN:
                failed = WorkerStartupError(1, _unguarded(self.start_method))
            else:
                failed = WorkerStartupError(
                    1, f"{self.name} {_how(exitcode)} before announcing itself"
                )
                failed.__cause__ = _lost(self.name, exitcode)  # how it died, for the pool
            self._up.set_exception(failed)
            self._up.exception()  # retrieved: start() may already have given up on it
        unstarted: list[Job[Any]] = []
        started: list[Job[Any]] = []
        written = self._writer.written if self._writer is not None else 0
        started_id = self._page.started if self._page is not None else 0
        self._release()
        for job, _ in self._sent.values():
            if _began(job, started_id):
                started.append(job)
            else:
                unstarted.append(job)
        if not started and unstarted and unstarted[0].state in _DELIVERED:
            # The child ran nothing it held, so it died idle or unpickling the first job;
            # if that job had arrived whole, it is the likely culprit.
            job, end = next(iter(self._sent.values()))
            if end <= written:
                job.deliveries += 1
        self._sent.clear()
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)
        if (
            self._host is not None
            and was is not WorkerState.STARTING
            and (unstarted or started or not self._expected_exit)
        ):
            self._host.worker_lost(self, error, unstarted, started)

    def _release(self) -> None:
        """Take every fd off the loop, then close it; reap the process. Idempotent."""
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        for overdue in self._overdue.values():
            overdue.cancel()
        self._overdue.clear()
        if self._reader is not None:
            self._reader.close()
        if self._writer is not None:
            self._writer.close()
        fd, self._death_fd = self._death_fd, -1
        if fd >= 0 and self._loop is not None:
            self._loop.remove_reader(fd)
            if self._owns_death_fd:
                os.close(fd)
        if self._page is not None:
            self._page.close()
            self._page = None  # dead, it answers may_have_started: yes, it may have
        for region in self._regions or ():
            region.close()
        process = self._process
        if process is not None and process.exitcode is not None:
            process.close()  # closes multiprocessing's sentinel fd
            self._reaped()

    # -- at interpreter exit --------------------------------------------------------------

    def __del__(self) -> None:
        # Collected alive: its pool was left open and its event loop is gone (while the loop
        # runs, the callbacks on it keep the worker alive), so no death fd will ever report
        # the end. Kill it, and close here what the loop would have closed.
        if self.state in (WorkerState.NEW, WorkerState.DEAD) or sys.is_finalizing():
            return
        self.kill_now()
        self.state = WorkerState.DEAD
        _live.discard(self)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            self._release()  # a loop collected along with it, never closed
            return
        for end in (self._reader, self._writer):
            if end is not None and end.fd >= 0:
                os.close(end.fd)  # the loop that watched it is closed: nothing to take off
                end.fd = -1
        if self._owns_death_fd and self._death_fd >= 0:
            os.close(self._death_fd)
        self._death_fd = -1
        if self._page is not None:
            self._page.close()
        for region in self._regions or ():
            region.close()
        if self._process is not None:
            self._process.join(LINGER)  # SIGKILLed: a moment at most
            if self._process.exitcode is not None:
                self._process.close()
                self._reaped()

    def _reaped(self) -> None:
        """The process is reaped: its pid, and so its group's id, may be reused now."""
        if self._pid is not None:
            undertaker.forget(self._pid)


def _rerun_in_a_worker() -> bool:
    """Whether this process is a corral worker still importing the main module (the time
    multiprocessing calls "bootstrapping", when it refuses to start a process)."""
    current = multiprocessing.current_process()
    return bool(getattr(current, "_inheriting", False)) and current.name.startswith("corral-")


_UNGUARDED = "the main module starts a pool when it is imported"


def _unguarded(start_method: str) -> str:
    """Why a worker whose main module starts a pool at import cannot start, and the fix."""
    return (
        f"{_UNGUARDED}, and with the {start_method!r} start method every worker process "
        "imports it again, which would start workers of its own: put the code that starts "
        'the pool under `if __name__ == "__main__":`'
    )


def unguarded_main(exc: BaseException) -> bool:
    """Whether exc is a worker's failed start because its main module starts a pool at
    import: every worker fails so, and retrying cannot help."""
    return isinstance(exc, WorkerStartupError) and exc.reason.startswith(_UNGUARDED)


def _kill_tree(pid: int) -> None:
    """SIGKILL process pid and every process it started (a task's subprocess, and theirs):
    what a killed worker started goes with it.

    Each is stopped first, so none starts another between the listing and the kill; a
    descendant killed after its parent would otherwise live on, adopted by init, out of
    reach. One that left the worker's tree before (a daemon) is not the worker's to kill.
    """
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        return
    # psutil loads at its first use (some milliseconds, once), not before every program's
    # first worker: most programs never kill one.
    import psutil  # noqa: PLC0415

    frozen: dict[int, psutil.Process] = {}
    for _ in range(TREE_PASSES):  # until no new process turns up among the stopped ones
        try:
            found = psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            break  # the worker is gone (a zombie lists no children)
        fresh = [p for p in found if p.pid not in frozen]
        if not fresh:
            break
        for process in fresh:
            frozen[process.pid] = process
            with contextlib.suppress(psutil.Error):
                process.suspend()
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    for process in frozen.values():
        with contextlib.suppress(psutil.Error):
            process.kill()  # psutil checks the pid still names that process


def _lost(name: str, exitcode: int | None) -> WorkerLostError:
    """The error for a worker that ended with exitcode (None: unknown)."""
    if exitcode is None:
        return WorkerLostError(name)
    if exitcode < 0:
        return WorkerLostError(name, signal=-exitcode)
    return WorkerLostError(name, exitcode=exitcode)


def _how(exitcode: int | None) -> str:
    """How a process ended, from its exit code (None: unknown)."""
    if exitcode is None:
        return "died"
    if exitcode < 0:
        return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


# The fds starting a process takes at once: multiprocessing's fork and forkserver starts
# make two pipes (and the forkserver's a socket and a copy), and a pidfd follows.
START_FDS = 6


def _check_fd_room(fd: int) -> None:
    """Raise EMFILE unless START_FDS more fds can be opened now.

    When multiprocessing's fork or forkserver start cannot make its second pipe, it leaks
    the first; asking first keeps that from happening, except to a thread that takes the
    last fds in between.
    """
    copies: list[int] = []
    try:
        for _ in range(START_FDS):
            copies.append(os.dup(fd))
    finally:
        for copy in copies:
            os.close(copy)


def _reap(process: BaseProcess) -> None:
    """Kill a process whose start could not be completed, wait for it, and close it."""
    process.kill()
    process.join()
    process.close()


# A job the child held, not cancelled and not yet started: RUNNING once it was taken up
# (ACK_WANTED), before it was unpickled.
_DELIVERED = frozenset({JobState.SENT, JobState.RUNNING})


def _began(job: Job[Any], started_id: int) -> bool:
    """Whether the child began job, given the id it acknowledged last: that one, or a
    stream that has sent items (it has started, whatever it did since)."""
    return job.id == started_id or (job.stream is not None and job.stream.released)
