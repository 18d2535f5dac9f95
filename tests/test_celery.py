"""corral as Celery's worker pool (``corral.celery:TaskPool``), end to end.

Every test talks to a real ``celery worker`` process on corral's pool (``--pool custom``
with ``CELERY_CUSTOM_WORKER_POOL``), through a real Redis server (broker and result
backend) that this module starts, from a Celery client in the test process. The tasks are
in ``tests/celery_app.py`` (an app made inside a function: ``tests/celery_app_in_a_function.py``).

One worker serves each group of tests whose behaviour allows sharing it; each group has a
queue of its own. A worker replaces its children by design (a time limit, a death, a
recycle), so the suite's per-test leak check would count every replacement: here the check
runs around the whole module instead (``redis_url``), once every worker and the server
have stopped.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests import processes
from tests.waits import BOUND, wait_until

celery = pytest.importorskip("celery")
import kombu.pools  # noqa: E402
import kombu.transport.redis  # noqa: E402
from celery import Celery  # noqa: E402
from celery.exceptions import TimeLimitExceeded, WorkerLostError  # noqa: E402

REDIS_SERVER = "/usr/bin/redis-server"
ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not os.path.exists(REDIS_SERVER), reason="needs Debian's redis-server"),
]


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Overrides the suite's per-test leak check: this module's is ``redis_url``'s."""
    yield


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis server on a free loopback port, for the module; nothing of it, of the
    workers or of the client may be left once the module is done."""
    with processes.no_leaks():
        directory = tmp_path_factory.mktemp("redis")
        port = _free_port()
        server = subprocess.Popen(
            [
                *(REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", ""),
                *("--appendonly", "no", "--dir", str(directory)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        try:

            def accepting() -> bool:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        return True
                except OSError:
                    assert server.poll() is None, "redis-server exited"
                    return False

            wait_until(accepting)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            server.terminate()
            server.wait(BOUND)


@pytest.fixture(scope="module")
def client(redis_url: str) -> Iterator[Celery]:
    """A Celery client of the test app's broker and backend, closed with the module."""
    app = Celery("client", broker=redis_url, backend=redis_url)
    app.conf.broker_connection_retry_on_startup = True
    try:
        yield app
    finally:
        gc.collect()  # the tests' results unsubscribe while the server is up
        app.backend.result_consumer.stop()  # its pubsub connection
        app.backend.client.connection_pool.disconnect()
        app.close()
        kombu.pools.reset()  # the broker connections of sends and remote control
        gc.collect()
        # kombu's MultiChannelPoller.close() leaves its epoll fd open until the poller is
        # collected, and a transport keeps one alive: closed here.
        for obj in gc.get_objects():
            if isinstance(obj, kombu.transport.redis.MultiChannelPoller):
                obj.poller.close()


class Worker:
    """A ``celery worker`` process on corral's pool, consuming one queue of its own.

    The pool is chosen as the command line does (``--pool custom`` with
    ``CELERY_CUSTOM_WORKER_POOL``), or with ``configured`` as the app's configuration
    does (``worker_pool``). ``app``: the module of the app (``celery -A``), or a module
    that makes its app in a function and runs the worker itself (``python -m``).
    """

    def __init__(
        self,
        redis_url: str,
        directory: Path,
        *options: str,
        env: dict[str, str] | None = None,
        configured: bool = False,
        app: str = "tests.celery_app",
    ) -> None:
        self.queue = f"q-{uuid.uuid4().hex[:8]}"
        self.name = f"{self.queue}@corral-tests"
        self.log = directory / f"{self.queue}.log"
        self.env = env or {}
        environment = {**os.environ, "CORRAL_CELERY_REDIS": redis_url, **self.env}
        if configured:
            environment["CORRAL_CELERY_WORKER_POOL"] = "corral.celery:TaskPool"
            choice: tuple[str, ...] = ()
        else:
            environment["CELERY_CUSTOM_WORKER_POOL"] = "corral.celery:TaskPool"
            choice = ("--pool", "custom")
        if app == "tests.celery_app":
            command: tuple[str, ...] = (sys.executable, "-m", "celery", "-A", app, "worker")
        else:
            command = (sys.executable, "-m", app, "worker")
        self.process = subprocess.Popen(
            [
                *command,
                *(*choice, "-Q", self.queue, "-n", self.name, "-l", "info"),
                *("--logfile", str(self.log), "--without-gossip", "--without-mingle"),
                *("--without-heartbeat", *options),
            ],
            cwd=ROOT,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.pid = self.process.pid
        try:
            wait_until(lambda: "ready." in self.text() or self.process.poll() is not None)
            assert self.process.poll() is None, f"the worker exited:\n{self.text()}"
        except BaseException:
            self.stop()
            raise

    def text(self) -> str:
        """The worker's log so far."""
        return self.log.read_text() if self.log.exists() else ""

    def shutdowns(self) -> list[tuple[int, int]]:
        """The (pid, exitcode) of each worker_process_shutdown signal the children sent, where
        the worker was started with ``CORRAL_CELERY_SHUTDOWNS`` naming a file."""
        path = Path(self.env["CORRAL_CELERY_SHUTDOWNS"])
        lines = path.read_text().splitlines() if path.exists() else []
        return [(int(pid), int(code)) for pid, code in (line.split() for line in lines)]

    def logged(self, fragment: str) -> bool:
        return fragment in self.text()

    def send(self, client: Celery, task: str, *args: Any, **options: Any) -> Any:
        name = task if "." in task else f"tests.celery_app.{task}"
        return client.send_task(name, args, queue=self.queue, **options)

    def run(self, client: Celery, task: str, *args: Any, **options: Any) -> Any:
        """Send a task and wait for its value."""
        return self.send(client, task, *args, **options).get(timeout=BOUND)

    def pool(self, client: Celery) -> dict[str, Any]:
        """The pool's figures, as ``celery inspect stats`` shows them."""
        replies = client.control.inspect(destination=[self.name], timeout=BOUND).stats()
        assert replies, "the worker did not answer inspect stats"
        return dict(replies[self.name]["pool"])

    def processes(self, client: Celery) -> set[int]:
        return set(self.pool(client)["processes"])

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stop the worker with sig and wait for it (SIGKILL if it hangs)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(BOUND)
        except subprocess.TimeoutExpired:
            # Celery's SIGUSR1 handler logs every thread's stack: the report says where.
            self.process.send_signal(signal.SIGUSR1)
            with contextlib.suppress(AssertionError):
                wait_until(lambda: "MainThread" in self.text(), timeout=10)
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the worker hung stopping; its log:\n{self.text()}") from None


def _started(result: Any) -> bool:
    return bool(result.state == "STARTED")


@pytest.fixture(scope="module")
def worker(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """Two children, no limits of the worker's own."""
    w = Worker(redis_url, tmp_path_factory.mktemp("worker"), "-c", "2")
    yield w
    assert w.stop() == 0


@pytest.fixture(scope="module")
def limited(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """One child, recycled after two tasks, with the worker's own time limits; the pool
    chosen in the app's configuration."""
    directory = tmp_path_factory.mktemp("limited")
    w = Worker(
        redis_url,
        directory,
        "-c",
        "1",
        "--max-tasks-per-child",
        "2",
        "--soft-time-limit",
        "1",
        "--time-limit",
        "3",
        env={"CORRAL_CELERY_SHUTDOWNS": str(directory / "shutdowns")},
        configured=True,
    )
    yield w
    assert w.stop() == 0


@pytest.fixture(scope="module")
def scaling(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """Autoscaled between one and three children, each recycled past 50 MiB."""
    w = Worker(
        redis_url,
        tmp_path_factory.mktemp("scaling"),
        "--autoscale",
        "3,1",
        "--max-memory-per-child",
        str(50 * 1024),  # KiB, as Celery counts it
        env={"AUTOSCALE_KEEPALIVE": "1"},
    )
    yield w
    assert w.stop() == 0


def test_tasks_run_in_children_set_up_as_preforks(worker: Worker, client: Celery) -> None:
    """Tasks run in the pool's children, never in the worker's main process; each child is
    the worker's (forked by its forkserver, the app imported there) and was set up as
    prefork sets up its children (worker_process_init sent there, Celery's task logging),
    and ``inspect stats`` shows the pool's figures."""
    seen = [worker.run(client, "whoami") for _ in range(6)]
    children = worker.processes(client)
    assert len(children) == 2
    for info in seen:
        assert info["pid"] != worker.pid
        assert worker.pid in [p.pid for p in psutil.Process(info["pid"]).parents()]
        assert info["init"] == {"pid": info["pid"], "sender": worker.name}
    assert {info["pid"] for info in seen} <= children
    result = worker.send(client, "log_line", "hello from a corral child")
    assert result.get(timeout=BOUND) in children
    # Celery's task log format: the task's name and id, from the child's own logging.
    wait_until(lambda: worker.logged(f"tests.celery_app.log_line[{result.id}]: hello from"))
    figures = worker.pool(client)
    assert figures["implementation"] == "corral.celery:TaskPool"
    assert figures["max-concurrency"] == 2
    assert figures["timeouts"] == [0, 0]
    assert figures["start-method"] == "forkserver"
    assert figures["calls"] >= 7


def test_soft_time_limit_is_celerys_exception_inside_the_task(
    worker: Worker, client: Celery
) -> None:
    """A task's soft_time_limit raises Celery's SoftTimeLimitExceeded inside it, where the
    task's own ``except`` catches it, and the worker logs it as prefork's does."""
    result = worker.send(client, "catch_soft_limit", 30, soft_time_limit=0.5)
    assert result.get(timeout=BOUND) == "caught billiard.exceptions.SoftTimeLimitExceeded"
    wait_until(
        lambda: worker.logged(
            f"Soft time limit (0.5s) exceeded for tests.celery_app.catch_soft_limit[{result.id}]"
        )
    )


def test_hard_time_limit_replaces_the_child(worker: Worker, client: Celery) -> None:
    """Past a task's time_limit its child is killed and replaced, and the task fails with
    Celery's TimeLimitExceeded, recorded and logged as prefork records it; the pool serves
    on."""
    before = worker.processes(client)
    result = worker.send(client, "pause", 60, time_limit=1)
    with pytest.raises(TimeLimitExceeded):
        result.get(timeout=BOUND)
    assert result.state == "FAILURE"
    wait_until(
        lambda: worker.logged(
            f"Hard time limit (1s) exceeded for tests.celery_app.pause[{result.id}]"
        )
    )
    wait_until(lambda: len(worker.processes(client) - before) == 1)
    assert worker.run(client, "pause", 0) == 0


def test_a_childs_death_fails_its_task_with_worker_lost_error(
    worker: Worker, client: Celery
) -> None:
    """A child that dies mid-task fails the task with Celery's WorkerLostError, logged as
    prefork logs it; with acks_late and reject_on_worker_lost the task is redelivered and
    runs again. The pool serves on."""
    result = worker.send(client, "die")
    with pytest.raises(WorkerLostError, match=r"signal 9 \(SIGKILL\)"):
        result.get(timeout=BOUND)
    wait_until(lambda: worker.logged("exited with 'signal 9 (SIGKILL)'"))
    key = f"runs-{uuid.uuid4().hex}"
    assert worker.run(client, "die_once", key) == "run 2"
    assert len(worker.processes(client)) == 2


def test_revoke_terminate_stops_the_running_task(worker: Worker, client: Celery) -> None:
    """``revoke(terminate=True)`` kills the child running the task, which is recorded as
    revoked; the pool replaces the child and serves on."""
    result = worker.send(client, "pause", 60)
    wait_until(lambda: _started(result))
    started = time.monotonic()
    client.control.revoke(result.id, terminate=True, destination=[worker.name])
    wait_until(lambda: result.state == "REVOKED")
    assert time.monotonic() - started < 30
    wait_until(lambda: len(worker.processes(client)) == 2)
    assert worker.run(client, "pause", 0) == 0


def test_a_task_may_start_processes(worker: Worker, client: Celery) -> None:
    """A task may start processes of its own (prefork's daemonic children may not)."""
    assert worker.run(client, "start_processes") == [1, 4, 9]


def test_max_tasks_per_child_and_the_workers_time_limits(limited: Worker, client: Celery) -> None:
    """``--max-tasks-per-child 2`` gives each child two tasks; ``--soft-time-limit`` and
    ``--time-limit`` apply to tasks that set none. (This worker found its pool in the app's
    ``worker_pool``.)"""
    pids = [limited.run(client, "whoami")["pid"] for _ in range(6)]
    runs = [pids.count(pid) for pid in dict.fromkeys(pids)]
    assert max(runs) <= 2 and len(runs) >= 3, pids
    # each recycled child sent worker_process_shutdown as it left, as prefork's do
    recycled = {pid for pid in pids if pids.count(pid) == 2}
    wait_until(lambda: recycled <= {pid for pid, _ in limited.shutdowns()})
    assert limited.pool(client)["implementation"] == "corral.celery:TaskPool"
    assert limited.pool(client)["max-tasks-per-child"] == 2
    assert limited.pool(client)["timeouts"] == [1, 3]
    soft = limited.send(client, "catch_soft_limit", 30)
    assert soft.get(timeout=BOUND) == "caught billiard.exceptions.SoftTimeLimitExceeded"
    hard = limited.send(client, "ignore_soft_limit", 60)
    with pytest.raises(TimeLimitExceeded):
        hard.get(timeout=BOUND)
    wait_until(
        lambda: limited.logged(
            f"Hard time limit (3.0s) exceeded for tests.celery_app.ignore_soft_limit[{hard.id}]"
        )
    )


def test_children_load_the_result_backend_before_their_first_task(
    limited: Worker, client: Celery
) -> None:
    """A child loads the app's result backend as it starts, as prefork's inherit it: left to
    Celery's tracer, a child's first task imported it (redis-py, 0.1 s here, more on a busy
    machine) inside the call, where a short soft limit fell before the task's ``try``.
    One child, recycled after two tasks: of two tasks in a row, one is a child's first."""
    assert [limited.run(client, "backend_loaded_at_call") for _ in range(2)] == [True, True]


def test_autoscale_grows_and_shrinks(scaling: Worker, client: Celery) -> None:
    """``--autoscale 3,1`` starts one child, grows to three under load and shrinks back."""
    assert len(scaling.processes(client)) == 1
    results = [scaling.send(client, "pause", 3) for _ in range(3)]
    wait_until(lambda: len(scaling.processes(client)) == 3)
    assert [r.get(timeout=BOUND) for r in results] == [3, 3, 3]
    wait_until(lambda: len(scaling.processes(client)) == 1)
    assert scaling.run(client, "pause", 0) == 0


def test_max_memory_per_child(scaling: Worker, client: Celery) -> None:
    """``--max-memory-per-child``: a child past the limit after a task is replaced."""
    pid = scaling.run(client, "hold_memory", 100)
    wait_until(lambda: pid not in scaling.processes(client))
    assert scaling.run(client, "whoami")["pid"] != pid


def test_an_app_no_import_reaches_has_its_children_forked_from_the_pool(
    redis_url: str, client: Celery, tmp_path: Path
) -> None:
    """An app made inside a function (the worker started by ``app.worker_main``) cannot be
    imported by a forkserver: its children are forked from the pool's thread, with the app,
    run its tasks, and a child that dies is replaced."""
    w = Worker(redis_url, tmp_path, "-c", "2", app="tests.celery_app_in_a_function")
    try:
        assert w.pool(client)["start-method"] == "fork"
        children = w.processes(client)
        assert len(children) == 2
        seen = [w.run(client, "in_a_function.whoami") for _ in range(4)]
        assert {info["pid"] for info in seen} <= children
        assert all(info["app_made_in"] == w.pid for info in seen)
        dying = w.send(client, "in_a_function.die")
        with pytest.raises(WorkerLostError):
            dying.get(timeout=BOUND)
        wait_until(lambda: len(w.processes(client)) == 2 and w.processes(client) != children)
        assert w.run(client, "in_a_function.whoami")["pid"] in w.processes(client)
        assert w.stop() == 0
    finally:
        w.stop(signal.SIGKILL)


@pytest.mark.parametrize("how", ["warm", "cold"])
def test_shutdown(how: str, redis_url: str, client: Celery, tmp_path: Path) -> None:
    """SIGTERM (warm shutdown) lets the running task finish; SIGQUIT (cold) does not wait
    for it, and leaves no child behind either way."""
    shutdowns = {"CORRAL_CELERY_SHUTDOWNS": str(tmp_path / "shutdowns")}
    w = Worker(redis_url, tmp_path, "-c", "1", env=shutdowns)
    try:
        (child,) = w.processes(client)
        result = w.send(client, "pause", 2 if how == "warm" else 60)
        wait_until(lambda: _started(result))
        started = time.monotonic()
        code = w.stop(signal.SIGTERM if how == "warm" else signal.SIGQUIT)
        took = time.monotonic() - started
        wait_until(lambda: processes.dead(child))
        if how == "warm":
            assert code == 0
            assert result.get(timeout=BOUND) == 2
            assert took >= 1
            # the child left by itself: worker_process_shutdown was sent, as by prefork's
            assert w.shutdowns() == [(child, 0)]
        else:
            assert took < 30
            # Celery's cold shutdown marks the task it cancels for retry, as under prefork
            assert result.state in ("STARTED", "RETRY"), result.state
    finally:
        w.stop(signal.SIGKILL)
