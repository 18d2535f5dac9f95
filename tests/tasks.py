"""Functions the tests run in workers. They live in an importable module so that workers
started by any method can find them by reference."""

from __future__ import annotations

import os
import signal
import time
from typing import Any


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
