"""corral's errors: each builds its message from structured fields, and survives pickling
(every protocol, and ``copy``) with its type, message and attributes."""

from __future__ import annotations

import copy
import pickle
import signal

import pytest

import corral
from corral import (
    CorralError,
    PoolClosedError,
    RemoteTraceback,
    SerializationError,
    SoftTimeLimitExceeded,
    TimeLimitExceeded,
    WorkerLostError,
    WorkerStartupError,
)

# Each error, built from its fields, with the fields and the message it must show.
CASES: list[tuple[CorralError, dict[str, object], str]] = [
    (
        WorkerLostError("w1", signal=signal.SIGKILL),
        {"worker": "w1", "exitcode": None, "signal": 9, "detail": ""},
        "worker w1 was killed by signal 9 (SIGKILL); the OOM killer, a hard time limit or "
        "someone else sent it",
    ),
    (
        WorkerLostError("w2", signal=signal.SIGSEGV),
        {"worker": "w2", "exitcode": None, "signal": 11},
        "worker w2 was killed by signal 11 (SIGSEGV); a crash in native code is the likely cause",
    ),
    (
        WorkerLostError("w3", signal=signal.SIGTERM),
        {"signal": 15},
        "worker w3 was killed by signal 15 (SIGTERM)",
    ),
    (
        WorkerLostError("w4", signal=200),
        {"signal": 200},
        "worker w4 was killed by signal 200 (unknown signal)",
    ),
    (
        WorkerLostError("w5", exitcode=3),
        {"exitcode": 3, "signal": None},
        "worker w5 exited with code 3 while running the job; the task or a library it uses "
        "called exit()",
    ),
    (
        WorkerLostError("w9", exitcode=75),
        {"exitcode": 75, "signal": None},
        "worker w9 exited with code 75: a task took over the worker's fds (it closed fds it "
        "did not own and a file took their numbers); the worker exited rather than use them",
    ),
    (
        WorkerLostError("w6"),
        {"exitcode": None, "signal": None},
        "worker w6 was lost for an unknown reason",
    ),
    (
        WorkerLostError("w8", detail="its thread ignored a cancellation"),
        {"exitcode": None, "signal": None},
        "worker w8 was lost: its thread ignored a cancellation",
    ),
    (
        WorkerLostError("w7", exitcode=0, detail="it held 2 jobs"),
        {"exitcode": 0, "detail": "it held 2 jobs"},
        "worker w7 exited with code 0 while running the job; the task or a library it uses "
        "called exit() (it held 2 jobs)",
    ),
    (
        TimeLimitExceeded(2.5),
        {"limit": 2.5},
        "the job ran past its hard time limit of 2.5 s; its worker was killed",
    ),
    (
        TimeLimitExceeded(3),
        {"limit": 3},
        "the job ran past its hard time limit of 3 s; its worker was killed",
    ),
    (
        SoftTimeLimitExceeded(0.25),
        {"limit": 0.25},
        "the task ran past its soft time limit of 0.25 s",
    ),
    (
        SerializationError("argument 0 of f (a _thread.lock)", "in the parent", "TypeError: no"),
        {
            "what": "argument 0 of f (a _thread.lock)",
            "where": "in the parent",
            "reason": "TypeError: no",
        },
        "argument 0 of f (a _thread.lock) could not be serialized in the parent: TypeError: no",
    ),
    (
        WorkerStartupError(3, "the initializer raised ValueError: x"),
        {"attempts": 3, "reason": "the initializer raised ValueError: x"},
        "workers failed to start 3 times in a row: the initializer raised ValueError: x",
    ),
    (
        PoolClosedError(),
        {"action": "submit", "state": "closed"},
        "cannot submit: the pool is closed",
    ),
    (
        PoolClosedError("map", "closing"),
        {"action": "map", "state": "closing"},
        "cannot map: the pool is closing",
    ),
]
IDS = [f"{type(error).__name__}-{i}" for i, (error, _, _) in enumerate(CASES)]


@pytest.mark.parametrize(("error", "fields", "message"), CASES, ids=IDS)
def test_message_is_built_from_fields(
    error: CorralError, fields: dict[str, object], message: str
) -> None:
    """Each error sets its structured fields and writes its own message from them."""
    assert str(error) == message
    for name, value in fields.items():
        assert getattr(error, name) == value


@pytest.mark.parametrize(("error", "fields", "message"), CASES, ids=IDS)
@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_survives_pickling(
    error: CorralError, fields: dict[str, object], message: str, protocol: int
) -> None:
    """A pickle round trip, by any protocol, gives the same type, message, args and fields."""
    back = pickle.loads(pickle.dumps(error, protocol))
    assert type(back) is type(error)
    assert str(back) == message
    assert back.args == error.args
    for name, value in fields.items():
        assert getattr(back, name) == value


@pytest.mark.parametrize(("error", "fields", "message"), CASES, ids=IDS)
def test_survives_copy(error: CorralError, fields: dict[str, object], message: str) -> None:
    """``copy.copy`` and ``copy.deepcopy`` (which go through ``__reduce__``) keep the fields."""
    for back in (copy.copy(error), copy.deepcopy(error)):
        assert type(back) is type(error)
        assert str(back) == message
        for name, value in fields.items():
            assert getattr(back, name) == value


@pytest.mark.parametrize(("error", "fields", "message"), CASES, ids=IDS)
def test_pickles_under_the_public_name(
    error: CorralError, fields: dict[str, object], message: str
) -> None:
    """A pickled error names its class as ``corral.X``, the public door, not a private
    module, so a pickle stays valid when the implementation moves."""
    data = pickle.dumps(error, 4)
    assert b"corral._errors" not in data
    assert type(error).__module__ == "corral"
    assert getattr(corral, type(error).__name__) is type(error)


def test_notes_survive_pickling() -> None:
    """Notes added with ``add_note`` survive a pickle round trip, as they do for built-in
    exceptions (a task that annotates a ``SoftTimeLimitExceeded`` keeps its note when the
    error travels back from the worker)."""
    lost = []
    for original, _fields, _message in CASES:
        error = copy.copy(original)
        error.add_note("while resizing image 7")
        back = pickle.loads(pickle.dumps(error))
        if getattr(back, "__notes__", None) != ["while resizing image 7"]:
            lost.append(type(error).__name__)
    builtin = ValueError("v")
    builtin.add_note("n")
    assert pickle.loads(pickle.dumps(builtin)).__notes__ == ["n"]
    assert not lost, f"notes lost in a pickle round trip by {sorted(set(lost))}"


def test_hierarchy() -> None:
    """Every corral error is a ``CorralError``, itself an ``Exception``; a
    ``RemoteTraceback`` is not one of them (it only carries the worker's traceback)."""
    for error_type in (
        WorkerLostError,
        TimeLimitExceeded,
        SoftTimeLimitExceeded,
        SerializationError,
        WorkerStartupError,
        PoolClosedError,
    ):
        assert issubclass(error_type, CorralError)
    assert issubclass(CorralError, Exception)
    assert not issubclass(RemoteTraceback, CorralError)


def test_exitcode_and_signal_are_told_apart() -> None:
    """A worker that exited and one that was killed give different messages: the first
    speaks of an exit code, the second of a signal by number and name."""
    exited = WorkerLostError("w", exitcode=9)
    killed = WorkerLostError("w", signal=9)
    assert "exited with code 9" in str(exited)
    assert "signal" not in str(exited)
    assert "killed by signal 9 (SIGKILL)" in str(killed)
    assert "exit" not in str(killed).split(";")[0]


def test_remote_traceback_shows_the_worker_traceback() -> None:
    """A ``RemoteTraceback`` keeps the text and shows it under a heading, and pickles."""
    tb = 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: v\n'
    remote = RemoteTraceback(tb)
    assert remote.tb == tb
    assert str(remote) == f'\n\nTraceback in the worker:\n"""\n{tb}"""'
    back = pickle.loads(pickle.dumps(remote))
    assert back.tb == tb
    assert str(back) == str(remote)


def test_cause_chain_is_kept_by_the_raiser_not_the_pickle() -> None:
    """Raising an error ``from`` another sets ``__cause__`` in this process, and the error
    itself stays picklable with a cause attached (the cause is simply not carried)."""
    try:
        try:
            raise ValueError("initializer failed")
        except ValueError as inner:
            raise WorkerStartupError(1, "the initializer raised") from inner
    except WorkerStartupError as error:
        assert isinstance(error.__cause__, ValueError)
        back = pickle.loads(pickle.dumps(error))
        assert str(back) == str(error)
        assert back.attempts == 1
