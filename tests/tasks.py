"""Functions the tests run in workers. They live in an importable module so that workers
started by any method can find them by reference."""

from __future__ import annotations

import os
import signal
import time
from typing import Any


def write_atomically(path: str, text: str) -> None:
    """Write a small file whole: a test that waits for it to exist never reads it half
    written (``Path.write_text`` creates the file empty, then writes)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def add(a: int, b: int) -> int:
    return a + b


def identity(x: Any) -> Any:
    return x


def square(x: int) -> int:
    return x * x


def pid() -> int:
    return os.getpid()


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def fail(message: str) -> None:
    raise ValueError(message)


def exit_now(code: int) -> None:
    os._exit(code)


def kill_self(sig: int = signal.SIGKILL) -> None:
    os.kill(os.getpid(), sig)


# -- added for tests/test_pool.py and tests/test_process_worker.py ---------------------------


class TaskError(Exception):
    """An exception type of the tests' own, to prove a task's error keeps its type."""


def raise_task_error(message: str) -> None:
    raise TaskError(message)


def append_line(path: str, text: str) -> str:
    """Append one line to path with a single O_APPEND write (atomic for short lines), so
    a test can count how many times each call ran, whichever process ran it."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{text} {os.getpid()}\n".encode())
    finally:
        os.close(fd)
    return text


def segfault() -> None:
    import ctypes

    ctypes.string_at(0)


def beacon_then_sleep(port: int, seconds: float) -> float:
    """Tell the test on 127.0.0.1:port that this call is running (and in which process),
    then sleep: the test can act on a job known to be running, without guessing."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"{os.getpid()}\n".encode())
    time.sleep(seconds)
    return seconds


def make_lock() -> Any:
    import threading

    return threading.Lock()


def make_generator() -> Any:
    return (i for i in range(3))


_initialized: list[Any] = []


def remember(value: Any) -> None:
    """An initializer: keeps value in the worker for ``remembered`` to return."""
    _initialized.append(value)


def remembered() -> list[Any]:
    return list(_initialized)


def raise_in_initializer(message: str) -> None:
    raise RuntimeError(message)


def raise_leaving_a_thread(message: str, seconds: float) -> None:
    """An initializer that starts a non-daemon thread and raises: the process then takes
    about ``seconds`` to exit after reporting the failure (as with a library that left a
    thread running)."""
    import threading

    threading.Thread(target=time.sleep, args=(seconds,)).start()
    raise RuntimeError(message)


class RaisesWhenUnpickled:
    """Pickles fine; unpickling it raises ValueError (on whichever side loads it)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (fail, ("cannot be unpickled",))


def make_unloadable() -> RaisesWhenUnpickled:
    return RaisesWhenUnpickled()


def length(data: bytes | bytearray) -> int:
    return len(data)


def make_bytes(n: int) -> bytes:
    return b"\x5a" * n


def make_bytearray(n: int) -> bytearray:
    return bytearray(b"\xa5" * n)


def checksum(data: bytes | bytearray) -> int:
    return sum(data[:: 1 << 16]) + len(data)


def beacon_then(port: int, action: str, arg: int = 0) -> None:
    """Tell the test on 127.0.0.1:port that this call is running (and in which process),
    wait for its go-ahead, then end the process: ``"exit"`` calls os._exit(arg),
    ``"segfault"`` crashes in native code. The test can fill the worker's pipe first."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"{os.getpid()}\n".encode())
        sock.recv(16)
        if action == "exit":
            os._exit(arg)
        if action == "segfault":
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file in the tree
            segfault()
    raise ValueError(f"unknown action {action!r}")


def sleep_catching_soft_limit(seconds: float) -> str:
    """Sleep; if the soft time limit interrupts, clean up and say so."""
    import corral

    try:
        time.sleep(seconds)
    except corral.SoftTimeLimitExceeded as exc:
        return f"cleaned up after {exc.limit}"
    return "slept"


def sleep_with_signals_blocked(seconds: float) -> None:
    """Sleep with every blockable signal blocked: only SIGKILL can stop it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP})
    time.sleep(seconds)


def sleep_then_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


_hoard: list[bytes] = []


def leak(megabytes: int) -> int:
    """Keep megabytes of touched memory alive in this worker; return its pid."""
    _hoard.append(b"\x01" * (megabytes << 20))
    return os.getpid()


def rss() -> int:
    """This worker's resident memory, in bytes."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def nap_randomly(max_seconds: float) -> None:
    """An initializer that takes a random while (a slow start-up)."""
    import random

    time.sleep(random.uniform(0, max_seconds))


def record(path: str, job: int) -> int:
    """Append 'job' to path in one O_APPEND write (atomic for short lines); return it."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{job}\n".encode())
    finally:
        os.close(fd)
    return job


def sleep_and_clean_up(path: str, seconds: float) -> str:
    """Sleep; if the job is cancelled, write 'cleaned' to path and re-raise."""
    import asyncio

    try:
        time.sleep(seconds)
    except asyncio.CancelledError:
        with open(path, "w") as marker:
            marker.write("cleaned")
        raise
    return "slept"


def wait_for_file(path: str, seconds: float) -> int:
    """Block until path exists (or seconds pass); return this worker's pid."""
    deadline = time.monotonic() + seconds
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)
    return os.getpid()


def ignore_sigterm_and_sleep(seconds: float) -> None:
    """Ignore SIGTERM (as some native libraries do), then sleep."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(seconds)


def kill_self_once(path: str) -> str:
    """Die by SIGKILL the first time (marking path), succeed on a retry."""
    if not os.path.exists(path):
        with open(path, "w") as marker:
            marker.write("died once")
        os.kill(os.getpid(), signal.SIGKILL)
    return "second time lucky"


# -- added for the task queue: broadcast state, worker identity ------------------------------

_state: dict[str, Any] = {}


def set_state(key: str, value: Any) -> int:
    """Keep value in this worker (process or thread) under key; returns the pid."""
    _state[key] = value
    return os.getpid()


def get_state(key: str) -> tuple[int, Any]:
    """This worker's pid and the value kept under key (None when unset)."""
    return os.getpid(), _state.get(key)


def where() -> tuple[int, str]:
    """The process and thread running the call."""
    import threading

    return os.getpid(), threading.current_thread().name


async def async_square(x: int) -> int:
    import asyncio

    await asyncio.sleep(0)
    return x * x


_calls: dict[str, int] = {}


def fail_after_first(tag: str) -> None:
    """Succeeds the first time it runs with tag in this process, raises every time after."""
    _calls[tag] = _calls.get(tag, 0) + 1
    if _calls[tag] > 1:
        raise RuntimeError(f"{tag}: can only be set up once")


async def async_sleep(seconds: float) -> float:
    import asyncio

    await asyncio.sleep(seconds)
    return seconds


# -- added for streams and reports -------------------------------------------------------------


def count_up(n: int | None = None, marker: str | None = None) -> Any:
    """Yield 0, 1, 2, ... (n items, or forever); write 'closed' to marker when it ends."""
    import itertools

    try:
        yield from (range(n) if n is not None else itertools.count())
    finally:
        if marker is not None:
            with open(marker, "a") as f:
                f.write(f"closed {os.getpid()}\n")


def count_then_fail(n: int) -> Any:
    yield from range(n)
    raise TaskError(f"failed after {n} items")


def count_then_die(n: int) -> Any:
    yield from range(n)
    os._exit(3)


def not_iterable() -> int:
    return 42


def report_each(n: int) -> str:
    from corral import report

    for i in range(n):
        report({"step": i})
    return "finished"


def report_unpicklable() -> str:
    import threading

    from corral import report

    try:
        report(threading.Lock())
    except Exception as exc:
        return type(exc).__name__
    return "no error"


def report_numbers(n: int) -> str:
    """Report 0 .. n-1, then return."""
    from corral import report

    for i in range(n):
        report(i)
    return "finished"


def report_then_yield(n: int) -> Any:
    """A stream whose every item is preceded by a report."""
    from corral import report

    for i in range(n):
        report(f"before {i}")
        yield i
