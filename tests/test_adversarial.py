"""What crosses between parent and worker survives hostile tasks and a hostile OS: tasks
that close fds they do not own, fds and memory running out, unpickling that blocks or
raises, a fork that fails, and objects only inheritance may carry."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import corral
from tests import tasks
from tests.hosts import Host
from tests.processes import open_fds
from tests.waits import BOUND, bounded, until

START_METHODS = ["fork", "forkserver", "spawn"]

# What an initializer received, kept in the worker for the tasks below.
_shared: dict[str, Any] = {}


def keep_primitives(lock: Any, queue: Any, event: Any, value: Any) -> None:
    """Initializer: keep the multiprocessing primitives every worker was handed."""
    _shared.update(lock=lock, queue=queue, event=event, value=value)


def use_primitives(n: int) -> int:
    """Count n in the shared value under the shared lock, announce it on the queue and set
    the event: every primitive works in the worker."""
    with _shared["lock"]:
        _shared["value"].value += n
        total = int(_shared["value"].value)
    _shared["queue"].put(n)
    _shared["event"].set()
    return total


@pytest.fixture(scope="module")
def shared_heap() -> Any:
    """multiprocessing's shared heap, opened before the leak check counts fds: its first
    ``Value`` opens a file the heap keeps for the rest of the process."""
    return multiprocessing.RawValue("i", 0)


@pytest.mark.timeout(90)
@pytest.mark.usefixtures("shared_heap")
@pytest.mark.parametrize("start_method", START_METHODS)
async def test_multiprocessing_primitives_in_initargs(start_method: str) -> None:
    """A Lock, Queue, Event and Value of the pool's start method, passed in initargs (the
    standard way to share one with every worker), reach each worker as the same objects,
    as with multiprocessing.Pool: they are handed over as the process starts, not refused
    at construction."""
    ctx = multiprocessing.get_context(start_method)
    lock, queue, event, value = ctx.Lock(), ctx.Queue(), ctx.Event(), ctx.Value("i", 0)
    pool = None
    try:
        async with corral.Pool(
            2,
            start_method=start_method,
            initializer=keep_primitives,
            initargs=(lock, queue, event, value),
        ) as pool:
            await bounded(pool.map(use_primitives, [1, 2, 3, 4]))
        assert value.value == 10
        assert event.is_set()
        assert sorted(queue.get(timeout=30) for _ in range(4)) == [1, 2, 3, 4]
    finally:
        queue.close()
        queue.join_thread()
        del queue, pool
        gc.collect()  # the pool's reference cycles hold the queue, and with it its pipe


def test_unpicklable_initializer_still_fails_at_the_call() -> None:
    """An initializer argument that no pickler can carry (a thread lock) is still refused
    when the pool is made, naming what failed, not when a worker starts."""
    import threading

    with pytest.raises(corral.SerializationError, match="initializer"):
        corral.Pool(1, initializer=keep_primitives, initargs=(threading.Lock(), 0, 0, 0))


def _raise(name: str) -> None:
    """Raise the named BaseException (the parent calls it, unpickling a result)."""
    raise {"SystemExit": SystemExit, "KeyboardInterrupt": KeyboardInterrupt}[name]()


class RaisesInTheParent:
    """A result that pickles fine in the worker and raises name when unpickled."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self) -> tuple[Any, ...]:
        return (_raise, (self.name,))


def make_raising_result(name: str) -> RaisesInTheParent:
    """Return a result whose unpickling raises the BaseException name."""
    return RaisesInTheParent(name)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["SystemExit", "KeyboardInterrupt"])
async def test_base_exception_unpickling_a_result_fails_only_that_call(name: str) -> None:
    """SystemExit or KeyboardInterrupt raised while the parent unpickles a result becomes
    that call's SerializationError, with the exception as its cause; the event loop and the
    worker go on (the same process answers the next call)."""
    async with corral.Pool(1) as pool:
        before = await bounded(pool.run(tasks.pid))
        with pytest.raises(corral.SerializationError, match=name) as caught:
            await bounded(pool.run(make_raising_result, name))
        assert type(caught.value.__cause__).__name__ == name
        assert await bounded(pool.run(tasks.pid)) == before


OUT_OF_MEMORY_SCRIPT = """
import asyncio, resource, sys
import corral, psutil, uvloop

def big_list(n):
    return [b"x" * n]  # in band: the whole body comes through the pipe

def pid():
    import os
    return os.getpid()

async def main():
    async with corral.Pool(1) as pool:
        before = await pool.run(pid)
        # From here the parent cannot allocate 256 MiB more (the worker can).
        vms = psutil.Process().memory_info().vms
        resource.setrlimit(resource.RLIMIT_AS, (vms + 128 * 2**20, resource.RLIM_INFINITY))
        try:
            await pool.run(big_list, 256 * 2**20)
        except corral.SerializationError as exc:
            assert "MemoryError" in str(exc), exc
        else:
            raise AssertionError("the result arrived")
        after = await pool.run(pid)
        assert after == before, (before, after)
        assert await pool.run(big_list, 10) == [b"x" * 10]
    print("ok")

if __name__ == "__main__":
    factory = uvloop.new_event_loop if sys.argv[1] == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_parent_out_of_memory_for_a_result_fails_only_that_call(loop: str, tmp_path: Path) -> None:
    """When the parent has no memory for a large result's body (a real MemoryError, under
    RLIMIT_AS in a process of its own), that call fails with SerializationError naming the
    MemoryError; the worker is not taken for killed, and the same process serves on (the
    body is skipped as it arrives, so the frames after it still decode)."""
    script = tmp_path / "oom.py"
    script.write_text(OUT_OF_MEMORY_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), loop],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def corral_memory() -> set[int]:
    """The inodes of the corral memfds this process maps or holds an fd of."""
    found = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "memfd:corral" in line:
                found.add(int(line.split()[4]))
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:corral"):
                found.add(os.fstat(int(fd)).st_ino)
        except OSError:
            continue  # the fd listing's own fd, closed by now
    return found


@pytest.mark.timeout(60)
async def test_forked_worker_holds_no_sibling_memory() -> None:
    """Under fork, each worker maps and holds only its own shared page and payload regions:
    none of a sibling's (which it would otherwise inherit from the parent), so it can
    neither touch a sibling's acknowledgements and payloads nor keep a dead sibling's
    memory allocated."""
    async with corral.Pool(3, start_method="fork") as pool:
        await bounded(pool.run(tasks.make_bytes, 4 << 20))  # a region grown and in use
        held = await bounded(pool.broadcast(corral_memory))
    assert len(held) == 3
    assert all(held), held  # each maps its own
    for i, mine in enumerate(held):
        for other in held[i + 1 :]:
            assert not mine & other, (mine, other)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
async def test_running_out_of_fds_while_starting_a_worker(start_method: str) -> None:
    """With the fd limit set so that creating a worker runs out of fds (EMFILE) at each
    step in turn, the start fails with WorkerStartupError and leaves nothing behind: no fd
    (no memfd either), no process, and no fd number closed twice, which would close files
    the program opened in the meantime once the stray owner is collected."""
    from corral.workers import ProcessWorker

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    failures = 0
    for spare in range(40):
        before = open_fds()
        lowest = min(set(range(max(before) + 2)) - before)
        worker = ProcessWorker(start_method=start_method)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest + spare, hard))
        try:
            await bounded(worker.start(Host()))
        except corral.WorkerStartupError:
            failures += 1
            started = False
        else:
            started = True
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        if started:
            await bounded(worker.stop())
        # The program opens files; a stray owner of a number closed already closes them.
        files = [os.open(os.devnull, os.O_RDONLY) for _ in range(12)]
        identities = [os.fstat(fd).st_ino for fd in files]
        del worker
        gc.collect()
        assert [os.fstat(fd).st_ino for fd in files] == identities
        for fd in files:
            os.close(fd)
        assert open_fds() == before, f"with {spare} fds to spare"
        if started:
            break
    assert failures >= 5  # it ran out at several different steps before it could start


def _block_when_unpickled(marker: str) -> None:
    """Unpickled in the worker: say so in marker, then block (bounded, so a lost kill
    cannot leave a process behind for ever)."""
    Path(marker).touch()
    time.sleep(BOUND)


class BlocksWhenUnpickled:
    """An argument whose unpickling in the worker blocks."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (_block_when_unpickled, (self.marker,))


@pytest.mark.timeout(90)
async def test_blocking_unpickling_is_under_the_hard_time_limit(tmp_path: Path) -> None:
    """An argument whose unpickling blocks cannot escape ``time_limit``: the limit counts
    from when the worker takes the call up, so the call fails with TimeLimitExceeded, the
    worker is replaced, the pool serves on and close() returns."""
    marker = str(tmp_path / "unpickling")
    async with corral.Pool(1) as pool:
        with pytest.raises(corral.TimeLimitExceeded):
            await bounded(pool.run(tasks.identity, BlocksWhenUnpickled(marker), time_limit=0.5))
        assert os.path.exists(marker)
        assert await bounded(pool.run(tasks.add, 1, 2)) == 3
        await bounded(pool.close())


@pytest.mark.timeout(90)
async def test_cancel_interrupts_blocking_unpickling(tmp_path: Path) -> None:
    """Cancelling a call whose arguments are still being unpickled in the worker stops it
    there: the caller gets CancelledError, the pool serves on and close() returns."""
    marker = tmp_path / "unpickling"
    async with corral.Pool(1) as pool:
        job = pool.submit(tasks.identity, BlocksWhenUnpickled(str(marker)))
        await until(marker.exists)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await bounded(job)
        assert await bounded(pool.run(tasks.add, 1, 2)) == 3
        await bounded(pool.close())


MiB = 1 << 20
USER_FILE = b"the task's own file. " * (8 * MiB // 21)


def take_over(path: str, prefix: str) -> int:
    """As a task that closes fds it does not own: have a file of the task's take the number
    of every fd whose target starts with prefix (all of them for ""). Returns how many."""
    fd = os.open(path, os.O_RDWR)
    taken = 0
    for name in os.listdir("/proc/self/fd"):
        number = int(name)
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the listing's own fd
        if number > 2 and number != fd and target.startswith(prefix):
            os.dup2(fd, number)  # the old fd is closed, the number is now the file's
            taken += 1
    os.close(fd)
    return taken


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    """A file of the task's, larger than the payloads below."""
    path = tmp_path / "mine"
    path.write_bytes(USER_FILE)
    return path


@pytest.mark.timeout(90)
async def test_payload_fd_taken_over_never_misdelivers_an_argument(user_file: Path) -> None:
    """After a task has its own file take the numbers of the worker's payload-region fds,
    a later caller's 4 MiB argument still arrives intact (the worker, finding the fd not
    its own, exits before mapping it, and the call runs on a new worker), and the task's
    file is untouched."""
    data = bytes(range(256)) * (4 * MiB // 256)
    async with corral.Pool(1) as pool:
        assert await bounded(pool.run(take_over, str(user_file), "/memfd:corral-payload")) > 0
        assert await bounded(pool.run(tasks.checksum, data)) == tasks.checksum(data)
        assert await bounded(pool.run(tasks.checksum, data)) == tasks.checksum(data)
    assert user_file.read_bytes() == USER_FILE


@pytest.mark.timeout(90)
async def test_payload_fd_taken_over_never_truncates_the_file(user_file: Path) -> None:
    """After a task has its own file take the numbers of the worker's payload-region fds,
    a 4 MiB result never grows the region through them (which would truncate the task's
    file): the call gets the right bytes or, the worker having exited rather than touch
    the fd, WorkerLostError; the file is untouched and the pool serves on."""
    async with corral.Pool(1) as pool:
        assert await bounded(pool.run(take_over, str(user_file), "/memfd:corral-payload")) > 0
        try:
            result = await bounded(pool.run(tasks.make_bytes, 4 * MiB))
        except corral.WorkerLostError:
            pass
        else:
            assert result == tasks.make_bytes(4 * MiB)
        assert await bounded(pool.run(tasks.make_bytes, 4 * MiB)) == tasks.make_bytes(4 * MiB)
    assert user_file.read_bytes() == USER_FILE


@pytest.mark.timeout(90)
async def test_pipes_taken_over_cost_only_the_worker(user_file: Path) -> None:
    """A task that has its own file take every fd number of the worker (a daemonising
    helper's close-everything, then opens) costs that worker, WorkerLostError for its call:
    no result is written into the task's file and no call read from it; the pool serves
    on with a new worker."""
    async with corral.Pool(1) as pool:
        with pytest.raises(corral.WorkerLostError):
            await bounded(pool.run(take_over, str(user_file), ""))
        assert await bounded(pool.run(tasks.add, 1, 2)) == 3
    assert user_file.read_bytes() == USER_FILE


def wait_for_gate(started: str, gate: str) -> int:
    """Say it started, then wait (bounded) until gate exists; return this process's pid."""
    Path(started).touch()
    return tasks.wait_for_file(gate, BOUND)


def _forkserver() -> psutil.Process:
    """multiprocessing's forkserver, a child of this process."""
    (server,) = [
        child for child in psutil.Process().children() if "forkserver" in " ".join(child.cmdline())
    ]
    return server


@contextlib.contextmanager
def forks_refused(pid: int) -> Iterator[None]:
    """Make every fork by process pid fail with EAGAIN, as a process limit does: its
    RLIMIT_NPROC lowered to 1, or, for root (whom that limit spares), a pids cgroup of its
    own allowing it alone."""
    if os.geteuid() != 0:
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NPROC)
        resource.prlimit(pid, resource.RLIMIT_NPROC, (1, hard))
        try:
            yield
        finally:
            resource.prlimit(pid, resource.RLIMIT_NPROC, (soft, hard))
        return
    pids = Path("/sys/fs/cgroup/pids")
    if not os.access(pids, os.W_OK):
        pytest.skip("no way to refuse forks here: root, without a writable pids cgroup")
    (home,) = [
        line.split(":")[2]
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        if line.split(":")[1] == "pids"
    ]
    group = pids / f"corral-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "pids.max").write_text("1")
        (group / "cgroup.procs").write_text(str(pid))
        try:
            yield
        finally:
            (pids / home.lstrip("/") / "cgroup.procs").write_text(str(pid))
    finally:
        group.rmdir()


@pytest.mark.timeout(90)
async def test_a_failed_fork_costs_only_that_start(tmp_path: Path) -> None:
    """When the forkserver cannot fork (a process limit), only that worker's start fails
    (WorkerStartupError): the forkserver lives, and a healthy worker's running job ends
    normally on the same process, which serves on."""
    from corral.workers import ProcessWorker

    started, gate = tmp_path / "started", tmp_path / "gate"
    async with corral.Pool(1, start_method="forkserver") as pool:
        healthy = await bounded(pool.run(tasks.pid))
        job = pool.submit(wait_for_gate, str(started), str(gate))
        await until(started.exists)
        server = _forkserver()
        with forks_refused(server.pid):
            extra = ProcessWorker(start_method="forkserver")
            with pytest.raises(corral.WorkerStartupError):
                await bounded(extra.start(Host()))
        gate.touch()
        assert await bounded(job) == healthy
        assert await bounded(pool.run(tasks.pid)) == healthy
        assert server.is_running()
    del extra
    gc.collect()  # multiprocessing closes a failed start's fds when its Popen is collected


def stream_raising_items(name: str) -> Any:
    """A generator whose second item raises name when the parent unpickles it."""
    yield 1
    yield RaisesInTheParent(name)
    yield 3


def report_raising(name: str) -> int:
    """Report an object whose unpickling in the parent raises name, then return."""
    corral.report(RaisesInTheParent(name))
    return os.getpid()


@pytest.mark.timeout(60)
async def test_base_exception_unpickling_items_or_a_report_fails_only_that_call() -> None:
    """SystemExit raised while the parent unpickles a stream's items, or a report, fails
    that call with SerializationError (its cause the SystemExit); the loop and the worker
    go on serving."""
    async with corral.Pool(1) as pool:
        before = await bounded(pool.run(tasks.pid))
        with pytest.raises(corral.SerializationError, match="items of the stream") as caught:
            async for _ in pool.iterate(stream_raising_items, "SystemExit"):
                pass
        assert type(caught.value.__cause__) is SystemExit
        with pytest.raises(corral.SerializationError, match="a report") as caught:
            await bounded(pool.run(report_raising, "SystemExit"))
        assert type(caught.value.__cause__) is SystemExit
        assert await bounded(pool.run(tasks.pid)) == before
