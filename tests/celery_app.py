"""The Celery app that tests/test_celery.py and benchmarks/celery_pool.py run workers of.

Broker and result backend: the Redis server named by ``CORRAL_CELERY_REDIS`` (the tests
start one). ``worker_pool`` is left to the command line unless ``CORRAL_CELERY_WORKER_POOL``
names one, so the same app runs on corral's pool and on prefork.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import time

from celery import Celery, signals
from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.log import get_task_logger

REDIS = os.environ.get("CORRAL_CELERY_REDIS", "redis://127.0.0.1:6379/0")

app = Celery("tests.celery_app", broker=REDIS, backend=REDIS)
app.conf.update(
    task_track_started=True,  # the tests wait for STARTED before they act on a running task
    result_extended=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=True,
)

# The other way to choose the pool: the app's configuration (no --pool on the command line).
if os.environ.get("CORRAL_CELERY_WORKER_POOL"):
    app.conf.worker_pool = os.environ["CORRAL_CELERY_WORKER_POOL"]

logger = get_task_logger(__name__)

# Set in each child by the worker_process_init signal: proof the child was set up as
# prefork sets up its children.
process_init: dict[str, object] = {}
# Memory a task holds on purpose (max_memory_per_child).
_ballast: list[bytes] = []


@signals.worker_process_init.connect
def _mark_init(sender: object = None, **kwargs: object) -> None:
    process_init.update(pid=os.getpid(), sender=str(sender))


# Where each child notes its worker_process_shutdown signal ("pid exitcode" lines), if set.
SHUTDOWNS = os.environ.get("CORRAL_CELERY_SHUTDOWNS")


@signals.worker_process_shutdown.connect
def _mark_shutdown(pid: int = 0, exitcode: int = 0, **kwargs: object) -> None:
    if SHUTDOWNS:
        fd = os.open(SHUTDOWNS, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            os.write(fd, f"{pid} {exitcode}\n".encode())
        finally:
            os.close(fd)


# Whether the result backend was loaded when each task was called, by task id: set before
# the tracer first touches the backend (Celery's task_prerun comes first).
backend_at_call: dict[str, bool] = {}


@signals.task_prerun.connect
def _note_backend(task_id: str = "", **kwargs: object) -> None:
    backend_at_call[task_id] = getattr(app._local, "backend", None) is not None


@app.task(bind=True)
def backend_loaded_at_call(self: object) -> bool:
    """Whether the child had loaded the result backend before this task was called."""
    return backend_at_call.pop(self.request.id)  # type: ignore[attr-defined]


@app.task
def noop() -> None:
    """Nothing: the benchmark's unit of overhead."""


@app.task
def pause(seconds: float) -> float:
    """Sleep seconds; returns them (the benchmark's 10 ms task, a task to stop or outlive)."""
    time.sleep(seconds)
    return seconds


@app.task
def whoami() -> dict[str, object]:
    """Where the task runs, and whether that process was set up as prefork's children are."""
    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "init": dict(process_init),
        "root_handlers": len(logging.getLogger().handlers),
    }


@app.task
def log_line(text: str) -> int:
    """Log text through the task logger Celery configures in the child."""
    logger.warning(text)
    return os.getpid()


@app.task(bind=True)
def catch_soft_limit(self: object, seconds: float) -> str:
    """Sleep, catching the soft limit as Celery tasks do: says how it ended."""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            time.sleep(0.01)
    except SoftTimeLimitExceeded as exc:
        return f"caught {type(exc).__module__}.{type(exc).__name__}"
    return "not interrupted"


@app.task
def ignore_soft_limit(seconds: float) -> str:
    """Catch the soft limit and keep going: only the hard limit ends it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(SoftTimeLimitExceeded):
            time.sleep(0.05)
    return "outlived the hard limit"


@app.task
def die() -> None:
    """Kill the child running it."""
    os.kill(os.getpid(), signal.SIGKILL)


@app.task(acks_late=True, reject_on_worker_lost=True)
def die_once(key: str) -> str:
    """Kill its child the first time it runs; the redelivered copy returns."""
    runs = app.backend.client.incr(key)
    if runs == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return f"run {runs}"


def _square(x: int) -> int:
    return x * x


@app.task
def start_processes() -> list[int]:
    """Start processes of its own (prefork's daemonic children may not)."""
    with multiprocessing.get_context("fork").Pool(2) as pool:
        return pool.map(_square, [1, 2, 3])


@app.task
def hold_memory(mib: int) -> int:
    """Hold mib MiB in this child after returning; returns its pid."""
    _ballast.append(b"x" * (mib << 20))
    return os.getpid()
