"""Test harness: every ``async def`` test runs on asyncio's loop and on uvloop, and no test
may leave a child process or an open fd behind."""

from __future__ import annotations

import asyncio
import inspect
import multiprocessing
import time
from collections.abc import Callable, Iterator

import pytest
import uvloop

from tests import processes

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


# Long-lived helpers multiprocessing and corral start once per session; they are not leaks.
@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if inspect.iscoroutinefunction(metafunc.function):
        loops = list(LOOPS)
        marker = metafunc.definition.get_closest_marker("loops")
        if marker is not None:
            loops = list(marker.args)
        if "loop_kind" not in metafunc.fixturenames:
            metafunc.fixturenames.append("loop_kind")
        metafunc.parametrize("loop_kind", loops, indirect=True)


@pytest.fixture
def loop_kind(request: pytest.FixtureRequest) -> str:
    """The event loop an async test runs on: "asyncio" or "uvloop"."""
    return str(request.param)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    factory = LOOPS[pyfuncitem.callspec.params["loop_kind"]]
    names = inspect.signature(pyfuncitem.obj).parameters
    kwargs = {name: pyfuncitem.funcargs[name] for name in names}
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(pyfuncitem.obj(**kwargs))
    return True


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "loops(*names): run an async test only on these loops")


@pytest.fixture(scope="session", autouse=True)
def _warm_up() -> None:
    """Start the session-long helpers (multiprocessing's forkserver and resource tracker,
    libuv's global signal pipe) before any test counts processes and fds."""
    import corral
    from tests import tasks

    async def use_a_pool() -> None:
        async with corral.Pool(1) as pool:
            await pool.run(tasks.add, 1, 1)

    for factory in LOOPS.values():
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(use_a_pool())
    ctx = multiprocessing.get_context("spawn")
    process = ctx.Process(target=time.sleep, args=(0,))
    process.start()
    process.join()
    process.close()


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves a child process or an fd open (``tests.processes.no_leaks``)."""
    with processes.no_leaks():
        yield
