"""corral's errors: each builds its own message from structured fields and survives pickling.

The hierarchy:

    CorralError
    ├── WorkerLostError          a worker died with the job acknowledged (exitcode | signal)
    ├── TimeLimitExceeded        the hard limit passed; the parent killed the worker
    ├── SoftTimeLimitExceeded    raised inside the task when its soft limit passes
    ├── SerializationError       the function, an argument, a result or an error would not pickle
    ├── WorkerStartupError       workers keep failing to start (the initializer raised, ...)
    └── PoolClosedError          a call on a pool that is closing or closed

A task's own exception is not wrapped: it reaches the caller as the same type, with the
worker's traceback attached as its ``__cause__`` (a ``RemoteTraceback``), as
``concurrent.futures`` does.
"""

from __future__ import annotations

import signal as _signal


class CorralError(Exception):
    """Base class of every error corral raises on its own account."""


# The exit status of a worker that found one of its fds taken over by a task (it closed
# fds it did not own, and a file it opened took their numbers): the worker exits at once
# rather than read or write through them.
FDS_LOST = 75


class WorkerLostError(CorralError):
    """The worker running a job died before the job finished.

    Exactly one of ``exitcode`` (it exited) and ``signal`` (it was killed) is set, except when
    the cause is unknown (both None).
    """

    def __init__(
        self,
        worker: str,
        exitcode: int | None = None,
        signal: int | None = None,
        detail: str = "",
    ) -> None:
        self.worker = worker
        self.exitcode = exitcode
        self.signal = signal
        self.detail = detail
        super().__init__(self._message())

    def _message(self) -> str:
        if self.signal is not None:
            try:
                name = _signal.Signals(self.signal).name
            except ValueError:
                name = "unknown signal"
            how = f"was killed by signal {self.signal} ({name})"
            if self.signal == _signal.SIGKILL:
                how += "; the OOM killer, a hard time limit or someone else sent it"
            elif self.signal in (_signal.SIGSEGV, _signal.SIGBUS, _signal.SIGABRT):
                how += "; a crash in native code is the likely cause"
        elif self.exitcode == FDS_LOST:
            how = (
                f"exited with code {FDS_LOST}: a task took over the worker's fds (it closed "
                "fds it did not own and a file took their numbers); the worker exited rather "
                "than use them"
            )
        elif self.exitcode is not None:
            how = f"exited with code {self.exitcode} while running the job"
            how += "; the task or a library it uses called exit()"
        elif self.detail:
            return f"worker {self.worker} was lost: {self.detail}"
        else:
            how = "was lost for an unknown reason"
        text = f"worker {self.worker} {how}"
        return f"{text} ({self.detail})" if self.detail else text

    def __reduce__(self) -> tuple[object, ...]:  # keeps attributes and notes
        return (type(self), (self.worker, self.exitcode, self.signal, self.detail), self.__dict__)


class TimeLimitExceeded(CorralError):
    """The job ran past its hard time limit; its worker was killed and replaced."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        super().__init__(
            f"the job ran past its hard time limit of {limit:g} s; its worker was killed"
        )

    def __reduce__(self) -> tuple[object, ...]:  # keeps attributes and notes
        return (type(self), (self.limit,), self.__dict__)


class SoftTimeLimitExceeded(CorralError):
    """Raised inside a task when its soft time limit passes; the task may catch it."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        super().__init__(f"the task ran past its soft time limit of {limit:g} s")

    def __reduce__(self) -> tuple[object, ...]:  # keeps attributes and notes
        return (type(self), (self.limit,), self.__dict__)


class SerializationError(CorralError):
    """Something could not be pickled or unpickled on its way between parent and worker.

    ``what`` names the thing ("the function", "an argument", "the result", ...) and
    ``where`` the side ("in the parent", "in the worker").
    """

    def __init__(self, what: str, where: str, reason: str) -> None:
        self.what = what
        self.where = where
        self.reason = reason
        super().__init__(f"{what} could not be serialized {where}: {reason}")

    def __reduce__(self) -> tuple[object, ...]:  # keeps attributes and notes
        return (type(self), (self.what, self.where, self.reason), self.__dict__)


class WorkerStartupError(CorralError):
    """Workers kept failing to start; the pool gave up instead of spinning.

    The initializer's exception, when there was one, is the ``__cause__``.
    """

    def __init__(self, attempts: int, reason: str) -> None:
        self.attempts = attempts
        self.reason = reason
        if attempts == 1:
            super().__init__(f"a worker failed to start: {reason}")
        else:
            super().__init__(f"workers failed to start {attempts} times in a row: {reason}")

    def __reduce__(self) -> tuple[object, ...]:  # keeps attributes and notes
        return (type(self), (self.attempts, self.reason), self.__dict__)


class PoolClosedError(CorralError):
    """A call was made on a pool that is closing or closed."""

    def __init__(self, action: str = "submit", state: str = "closed") -> None:
        self.action = action
        self.state = state
        super().__init__(f"cannot {action}: the pool is {state}")

    def __reduce__(self) -> tuple[object, ...]:  # keeps attributes and notes
        return (type(self), (self.action, self.state), self.__dict__)


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, shown as the ``__cause__``."""

    def __init__(self, tb: str) -> None:
        self.tb = tb
        super().__init__(tb)

    def __str__(self) -> str:
        return f'\n\nTraceback in the worker:\n"""\n{self.tb}"""'
