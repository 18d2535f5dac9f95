"""Raise an exception inside another thread, at its next instruction.

How a thread worker interrupts the call it runs (a soft time limit, a cancel): the call
sees the exception where it is, and its own ``try``/``except``/``finally`` handle it.

Up to Python 3.12 ``PyThreadState_SetAsyncExc`` does exactly that. On 3.13 it may raise the
exception at an instruction the frame's handlers do not cover (CPython gh-139622; seen in 17
runs of 20 of a busy loop calling ``time.monotonic()``), so the call's ``except`` and
``finally`` are skipped. There the exception comes from a ``sys.monitoring`` callback
instead: the code objects on the thread's stack get ``INSTRUCTION`` events until it lands,
and a callback that raises is handled like a raise at that instruction. Only those code
objects are instrumented, only while an exception is pending, so other code runs at full
speed; while one is pending, other threads running the same functions pay a callback per
instruction.

Either way the exception lands between instructions, never inside a call into C
(``time.sleep``, a socket read); on 3.13 it lands in a function that was running when it
was sent (a function called after that is interrupted once it returns).
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections import Counter
from types import CodeType, FrameType
from typing import Any

from ._errors import SoftTimeLimitExceeded

# Our own prototype, so the argument types of ctypes.pythonapi's shared one stay untouched.
_set_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
)


# In a thread that runs calls (a thread worker's, a Dask worker's): the soft time limit of
# the call running now, read by ``SoftLimitInterrupt`` where it is raised.
soft_limits = threading.local()


class SoftLimitInterrupt(SoftTimeLimitExceeded):
    """``SoftTimeLimitExceeded`` raised in another thread by ``raise_in``: that path raises
    a class, instantiated without arguments in the target thread, so the limit is read
    from there (``soft_limits``). It pickles as a plain ``SoftTimeLimitExceeded``."""

    def __init__(self) -> None:
        super().__init__(getattr(soft_limits, "soft_time_limit", 0.0))

    def __reduce__(self) -> tuple[object, ...]:
        return (SoftTimeLimitExceeded, (self.limit,), self.__dict__)


def raise_in(ident: int, exc_type: type[BaseException] | None) -> None:
    """Have thread ident raise exc_type at its next instruction; None withdraws one not
    raised yet. Call with exc_type None from the thread itself, after the code that may be
    interrupted, so that none lands later."""
    if exc_type is None and _made is None:
        return  # no interrupt was ever sent: none to withdraw (after each call: cheap)
    monitor = _monitor()
    if monitor is not None:
        monitor.raise_in(ident, exc_type)
    else:
        _set_async_exc(
            ident, ctypes.py_object() if exc_type is None else ctypes.py_object(exc_type)
        )


def arm(frame: FrameType | None, exc: BaseException | type[BaseException]) -> bool:
    """From a signal handler: have this thread raise exc at its next instruction in
    frame (the one the signal interrupted) or a function that called it.

    Returns False where raising from the handler itself is safe (before Python 3.13): the
    handler raises exc then. Where it is not, an exception raised by the handler may skip the
    interrupted frame's handlers, exactly as an asynchronous one does; but a handler run
    while a call into C waits (``time.sleep`` retrying after EINTR) must raise itself, or
    the call waits on: see ``armed``.
    """
    monitor = _monitor()
    if monitor is None or frame is None:
        return False
    monitor.arm(threading.get_ident(), frame, exc)
    return True


def armed() -> bool:
    """Whether this thread has an exception armed that has not been raised yet: when a
    later signal finds one, the thread has run no instruction since, so it waits in C,
    and the handler raises it itself (a call into C that fails places it right)."""
    monitor = _monitor()
    return monitor is not None and monitor.armed(threading.get_ident())


def disarm() -> None:
    """Withdraw this thread's armed exception, if any."""
    monitor = _monitor()
    if monitor is not None:
        monitor.raise_in(threading.get_ident(), None)


class _Monitor:
    """Pending exceptions raised from ``sys.monitoring`` callbacks (Python 3.13+)."""

    def __init__(self, tool: int) -> None:
        self._tool = tool
        # Re-entrant: a signal handler may arm while its thread holds the lock.
        self._lock = threading.RLock()
        self._pending: dict[int, BaseException | type[BaseException]] = {}  # ident -> to raise
        self._codes: dict[int, list[CodeType]] = {}  # thread ident -> instrumented for it
        self._users: Counter[CodeType] = Counter()  # code -> threads it is instrumented for
        monitoring: Any = getattr(sys, "monitoring")  # noqa: B009 (absent before 3.12)
        self._monitoring = monitoring
        self._event = monitoring.events.INSTRUCTION
        monitoring.register_callback(tool, self._event, self._on_instruction)

    def raise_in(self, ident: int, exc_type: type[BaseException] | None) -> None:
        if exc_type is None:
            if ident in self._codes:  # else nothing is armed for it (the common case)
                with self._lock:
                    self._withdraw(ident)
        else:
            self.arm(ident, sys._current_frames().get(ident), exc_type)

    def armed(self, ident: int) -> bool:
        return ident in self._pending

    def arm(
        self, ident: int, frame: FrameType | None, exc: BaseException | type[BaseException]
    ) -> None:
        """Instrument the code of frame and of its callers until ident raises exc."""
        with self._lock:
            self._withdraw(ident)
            codes = []
            while frame is not None:
                codes.append(frame.f_code)
                frame = frame.f_back
            if not codes:
                return  # the thread has ended
            self._pending[ident] = exc
            self._codes[ident] = codes
            for code in codes:
                self._users[code] += 1
                if self._users[code] == 1:
                    self._monitoring.set_local_events(self._tool, code, self._event)

    def _withdraw(self, ident: int) -> None:
        """Forget ident's pending exception; holds _lock."""
        self._pending.pop(ident, None)
        for code in self._codes.pop(ident, ()):
            self._users[code] -= 1
            if not self._users[code]:
                del self._users[code]
                self._monitoring.set_local_events(self._tool, code, 0)

    def _on_instruction(self, code: CodeType, offset: int) -> None:
        ident = threading.get_ident()
        if ident not in self._pending:
            return  # another thread running an instrumented function
        with self._lock:
            exc = self._pending.get(ident)
            self._withdraw(ident)
        if exc is not None:
            raise exc


def _monitor() -> _Monitor | None:
    """A monitor where SetAsyncExc misplaces exceptions and a tool id is free, else None;
    made at the first interrupt, so importing corral claims no tool id."""
    global _made
    if _made is None:
        with _making:
            if _made is None:
                _made = (_new_monitor(),)
    return _made[0]


def _new_monitor() -> _Monitor | None:
    if not _MISPLACES:
        return None
    monitoring: Any = getattr(sys, "monitoring")  # noqa: B009 (mypy checks as for 3.11)
    for tool in (3, 4):  # the ids that sys.monitoring leaves unnamed
        if monitoring.get_tool(tool) is None:
            monitoring.use_tool_id(tool, "corral")
            return _Monitor(tool)
    return None


# Whether SetAsyncExc may misplace its exception (gh-139622): a bool, not an inline version
# check, so that mypy, checking as for 3.11, still checks the code that runs on 3.13.
_MISPLACES: bool = sys.version_info >= (3, 13)
_making = threading.Lock()
_made: tuple[_Monitor | None] | None = None
