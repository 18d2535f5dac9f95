"""The wire between parent and worker: frames and what travels in them. No I/O here.

A frame is a fixed header followed by a body:

    +----------------+----------------+------+------------------------------------+
    | body length u64| job id u64     | kind | body                               |
    +----------------+----------------+------+------------------------------------+

The body is a pickle (protocol 5). When the pickle has out-of-band buffers (a bytearray, a
NumPy array, a large ``bytes`` argument or result) the kind carries the ``OUT_OF_BAND`` flag
and the body is: buffer count u32, each buffer's length u64, the pickle, then the buffers
themselves. The sender writes those buffers straight from their memory with ``writev`` and
the receiver reads a large body straight into one allocation, so a 64 MiB argument is never
copied on its way into or out of the pipe.

``FrameDecoder`` follows the buffered-protocol shape: ``get_buffer()`` says where the next
read should land and ``buffer_updated(n)`` returns the frames completed. ``feed`` wraps both
for callers (and tests) that hold bytes already.

The messages, each a plain tuple in a fixed order that one pair of functions here makes
and reads (no other module builds or parses them):

    CALL         (function, args, soft time limit, credit)   dumps_call   / loads_call
    RESULT       (value, run time)                           dumps_result / loads_outcome
    ERROR        (exception, traceback text, run time)       dumps_error  / loads_outcome
    INIT_FAILED  as ERROR                                    dumps_error  / loads_outcome
    the setup    (initializer, initargs), a CALL frame       dumps_setup  / loads_setup

Plain tuples: a NamedTuple's pickle names its class, for the receiver to look up in every
frame (about 2 us more per call, a few percent of a no-op round trip).
"""

from __future__ import annotations

import pickle
import struct
import sys
import traceback
from collections.abc import Callable, Sequence
from types import FunctionType
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

from ._errors import RemoteTraceback, SerializationError
from ._functions import Definition, by_value, definition, hold, reference

if TYPE_CHECKING:
    from ._shared import SharedRegion

# Message kinds. Parent to worker:
CALL = 1  # body: pickle of (function, args, soft limit, credit); see dumps_call
CREDIT = 2  # a stream's consumer took items: body: pickle of how many more may be sent
CLOSE = 3  # close a stream (its consumer left); no body
# A function by value, before the first call that needs it; job id: its token; body: its
# pickle, or nothing to say "forget it" (see _functions).
FUNCTION = 4
# Worker to parent (acknowledgements go through shared memory, see _shared.py):
UP = 10  # the worker is ready (its initializer ran); body: pickle of its pid
ACK = 11  # the worker took the call up, before unpickling it; only when the call asks
RESULT = 12  # body: pickle of (return value, seconds the call ran); see dumps_result
ERROR = 13  # body: pickle of (exception, traceback text, seconds the call ran or None)
INIT_FAILED = 14  # the initializer raised; body as ERROR; the worker then exits
ITEMS = 15  # the next items of a stream; body: pickle of a list; RESULT or ERROR ends it
REPORT = 16  # corral.report(obj) in a running call; body: pickle of obj

OUT_OF_BAND = 0x80  # flag on kind: the body starts with a table of out-of-band buffers
SHARED = 0x40  # flag on kind: those buffers lie in the sender's shared region, not the body
# Flag on a CALL: answer ACK when you take it up. A hard time limit counts from that ACK,
# so it covers unpickling too: arguments whose unpickling blocks cannot escape it.
ACK_WANTED = 0x20
KIND_MASK = 0x1F
# Set by the receiving decoder, never sent: there was no memory for the body, so it was
# read and thrown away; ``loads`` raises MemoryError for it. With OUT_OF_BAND, so that the
# common small frame's path in ``loads`` tests nothing more.
DROPPED = 0x100 | OUT_OF_BAND

HEADER = struct.Struct("<QQB")
_COUNT = struct.Struct("<I")
_LENGTH = struct.Struct("<Q")

# Buffers smaller than this travel inside the pickle: a separate iovec and table entry cost
# more than copying a few KiB, while above it skipping the copy wins.
OUT_OF_BAND_MIN = 64 * 1024

Buffer: TypeAlias = bytes | bytearray | memoryview


class Frame(NamedTuple):
    """One decoded frame; ``body`` still holds the encoded payload."""

    kind: int
    job: int
    body: bytes | bytearray | memoryview


class Encoded(NamedTuple):
    """A pickled payload: the pickle and its out-of-band buffers, not yet framed.

    ``copied`` says every buffer is copied when unpickled (they are all large ``bytes`` or
    ``bytearray`` objects wrapped by ``out_of_band``), so no object will keep pointing
    into the memory they arrive in: they may travel through a reused shared region.
    ``flags`` go on the kind of the frame that carries it (``ACK_WANTED``).
    ``definition``: the by-value function a call names by its token; ``framed`` sends it
    ahead to each worker that lacks it.
    """

    data: bytes
    buffers: list[memoryview]
    copied: bool = False
    flags: int = 0
    definition: Definition | None = None


class _OutOfBand:
    """Carries a large ``bytes`` or ``bytearray`` out of band.

    Pickle copies exact ``bytes`` and ``bytearray`` objects into the pickle and offers no
    hook for them, so top-level arguments and results above the threshold are wrapped in
    this before pickling; they unpickle as their own type.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return (type(self.data), (pickle.PickleBuffer(self.data),))


def out_of_band(obj: Any) -> Any:
    """Return obj wrapped for out-of-band transfer when it is a large bytes or bytearray."""
    if type(obj) in _BYTES_TYPES and len(obj) >= OUT_OF_BAND_MIN:
        return _OutOfBand(obj)
    return obj


_BYTES_TYPES = (bytes, bytearray)


class _ByName:
    """A script's function passed as an argument (``map`` passes the user's function to
    its chunk runner), pickled as the worker resolves the called function: by its name,
    pickled apart, so that the call's own pickle names ``__main__`` only inside it."""

    __slots__ = ("named",)

    def __init__(self, named: bytes) -> None:
        self.named = named

    def __reduce__(self) -> tuple[Any, ...]:
        return (pickle.loads, (self.named,))


# How a pickle names __main__: a call whose pickle says it (beyond the function's own
# name) has a __main__ object in its arguments, which may need to go by value.
_MAIN = b"__main__"


def dumps(obj: Any, wrapped: int = 0, main: int = -1) -> Encoded:
    """Pickle obj with protocol 5, falling back to cloudpickle for what pickle refuses.

    ``main`` >= 0: how often the pickle may name ``__main__`` by itself; naming it more,
    it is pickled again, so that only what a worker's ``__main__`` holds goes by name
    (``_functions.main_pickler``): a class defined in a script's main block must go by
    value, or the worker could not unpickle its instances.

    ``wrapped`` counts the ``out_of_band`` wrappers in obj; each gives exactly one buffer,
    so when they account for every buffer, the payload is ``copied``. Raises whatever the
    pickler raised when neither can do it; callers turn that into a ``SerializationError``
    that names the thing. (Not keyword-only: CPython calls a function whose keyword-only
    parameters have defaults the slow way, and every call and result is pickled here.)
    """
    buffers: list[memoryview] = []

    def keep(buffer: pickle.PickleBuffer) -> bool:
        raw = buffer.raw()  # contiguous by construction for the types that offer buffers
        if raw.nbytes < OUT_OF_BAND_MIN:
            return True  # in band
        buffers.append(raw)
        return False

    try:
        data = pickle.dumps(obj, 5, buffer_callback=keep)
        if main < 0 or data.count(_MAIN) <= main:
            return Encoded(data, buffers, 0 < wrapped == len(buffers))
    except (pickle.PicklingError, AttributeError, TypeError):
        pass
    buffers.clear()
    data = by_value(obj, keep)
    return Encoded(data, buffers, 0 < wrapped == len(buffers))


def loads(
    kind: int,
    body: bytes | bytearray | memoryview,
    region: Callable[[int], memoryview] | None = None,
) -> Any:
    """Unpickle a frame's body; out-of-band buffers become views of the body (no copy),
    or of the sender's shared region, which ``region(size)`` returns, for a SHARED frame."""
    if not kind & OUT_OF_BAND:
        return pickle.loads(body)
    if kind & DROPPED == DROPPED:
        (length,) = _LENGTH.unpack(body)
        raise MemoryError(f"there was no memory to receive its {length:,} bytes")
    view = memoryview(body)
    (count,) = _COUNT.unpack_from(view, 0)
    lengths = struct.unpack_from(f"<{count}Q", view, _COUNT.size)
    start = _COUNT.size + 8 * count
    if kind & SHARED:
        if region is None:
            raise ValueError("a SHARED frame needs the sender's region")
        end = len(view)
        source = region(sum(lengths))
        offset = 0
    else:
        end = len(view) - sum(lengths)
        source = view
        offset = end
    buffers = []
    for length in lengths:
        buffers.append(source[offset : offset + length])
        offset += length
    return pickle.loads(view[start:end], buffers=buffers)


def frame(kind: int, job: int, payload: Encoded | None = None) -> list[Buffer]:
    """Return the buffers of one frame, ready for ``writev``; nothing is copied."""
    if payload is None:
        return [HEADER.pack(0, job, kind)]
    data, buffers = payload.data, payload.buffers
    kind |= payload.flags
    if not buffers:
        return [HEADER.pack(len(data), job, kind), data]
    lengths = [b.nbytes for b in buffers]
    table = struct.pack(f"<I{len(lengths)}Q", len(lengths), *lengths)
    size = len(table) + len(data) + sum(lengths)
    return [HEADER.pack(size, job, kind | OUT_OF_BAND), table, data, *buffers]


def shared_frame(kind: int, job: int, payload: Encoded) -> list[Buffer]:
    """A frame whose buffers the sender has already copied into its shared region."""
    data, buffers = payload.data, payload.buffers
    lengths = [b.nbytes for b in buffers]
    table = struct.pack(f"<I{len(lengths)}Q", len(lengths), *lengths)
    size = len(table) + len(data)
    return [HEADER.pack(size, job, kind | payload.flags | OUT_OF_BAND | SHARED), table, data]


# Payloads at least this large go through a shared region when they may: below it the
# pipe is as fast (a few pipe-fulls) and the region's bookkeeping is not worth it.
SHARED_MIN = 1024 * 1024


def framed(kind: int, job: int, payload: Encoded, region: SharedRegion, taken: int) -> list[Buffer]:
    """The frame for payload: through the sender's shared region when the payload may go
    there and is worth it, and the receiver has taken (``taken``) all it was sent before;
    else, whole, through the pipe. A call of a by-value function the receiver does not
    hold yet is preceded by its definition (the region stands for the receiver: it lives
    as long as the worker's channel)."""
    if (
        payload.copied
        and taken == region.sent
        and sum(b.nbytes for b in payload.buffers) >= SHARED_MIN
        and region.write(payload.buffers)
    ):
        region.sent += 1
        buffers = shared_frame(kind, job, payload)
    else:
        buffers = frame(kind, job, payload)
    made = payload.definition
    if made is None:
        return buffers
    send, forget = hold(region, made.token)
    if not send:
        return buffers
    # Frames arrive in order: the worker drops what it forgets, then holds the definition,
    # before it reads this call; calls sent earlier that name the forgotten one come first.
    head = frame(FUNCTION, forget) if forget else []
    return [*head, HEADER.pack(len(made.data), made.token, FUNCTION), made.data, *buffers]


def describe(obj: object) -> str:
    """A short name for obj in error messages: ``f``, ``a _thread.lock``, ..."""
    name = getattr(obj, "__qualname__", None)
    if callable(obj) and isinstance(name, str):
        return name
    cls = type(obj)
    return (
        f"a {cls.__module__}.{cls.__qualname__}"
        if cls.__module__ != "builtins"
        else (f"a {cls.__qualname__}")
    )


# A CALL's message: the function as ``dumps_call`` sent it (its pickled name, ``(token,)``
# of a definition, or itself), which the worker's ``Functions.load`` resolves; the
# arguments; the soft time limit or None; the stream's credit (0: not a stream).
CallMessage: TypeAlias = tuple[Any, tuple[Any, ...], float | None, int]


def dumps_call(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    *,
    soft_time_limit: float | None = None,
    ack: bool = False,
    credit: int = 0,
) -> Encoded:
    """Pickle a call, raising ``SerializationError`` that names the part that failed.

    ``soft_time_limit`` is armed in the worker; ``ack`` asks the worker to say when it takes
    the call up (for a hard time limit, which the parent keeps); ``credit`` > 0 makes it a
    stream: the worker iterates what fn returns and may send that many items before the
    parent grants more.

    The function goes by name when the worker can import it, a script's own included;
    else as a definition, pickled once, which the call names by its token; else (one
    that copies mutable state) whole with the call (see ``_functions``). Arguments go by
    plain pickle, or through cloudpickle where they hold a lambda, a closure or what a
    worker's ``__main__`` lacks (``map`` passes the user's function as one).
    """
    wrapped = by_name = 0
    for arg in args:  # one cheap pass; most calls have no large bytes and no function
        kind = type(arg)
        if kind in _BYTES_TYPES and len(arg) >= OUT_OF_BAND_MIN:
            wrapped += 1
        elif kind is FunctionType and arg.__module__ == "__main__":
            by_name += 1
    sent = tuple(map(out_of_band, args)) if wrapped else args
    made = None
    try:
        named = reference(fn)
        if named is None:
            made = definition(fn)
        head: Any = (named or fn) if made is None else (made.token,)
        main = named.count(_MAIN) if named else 0
        if by_name:
            sent, main = _main_functions_by_name(sent, main)
        call: CallMessage = (head, sent, soft_time_limit, credit)
        encoded = dumps(call, wrapped, main)
    except KeyboardInterrupt:
        raise  # the user's Ctrl-C, not the call's fault
    except BaseException as exc:  # a __reduce__ may raise anything, SystemExit included
        raise call_error(fn, args, exc) from exc
    if not ack and made is None:
        return encoded
    # The worker must see the request before it unpickles anything: it goes in the header.
    return encoded._replace(flags=ACK_WANTED if ack else 0, definition=made)


def _main_functions_by_name(args: tuple[Any, ...], main: int) -> tuple[tuple[Any, ...], int]:
    """args with each script function a worker can import sent by name (``_ByName``), and
    main raised by the ``__main__`` those names say, which ``dumps`` allows the call."""
    sent = []
    for arg in args:
        named = reference(arg) if type(arg) is FunctionType else None
        if named is not None and arg.__module__ == "__main__":
            sent.append(_ByName(named))
            main += named.count(_MAIN)
        else:
            sent.append(arg)
    return tuple(sent), main


# Unpickles a CALL frame's body into ``dumps_call``'s message, raising what unpickling
# raised: ``loads`` itself under the message's type, since a function of its own would
# cost every call a layer in the worker.
loads_call: Callable[
    [int, bytes | bytearray | memoryview, Callable[[int], memoryview] | None], CallMessage
] = loads


def dumps_result(value: Any, run_time: float | None) -> Encoded:
    """Pickle a RESULT: a call's value and the seconds it ran (``loads_outcome`` reads it).

    A large ``bytes`` or ``bytearray`` value goes out of band (``out_of_band``, inlined: this
    is every call's way back). Raises what the pickler raised; the caller names the value.
    """
    if type(value) in _BYTES_TYPES and len(value) >= OUT_OF_BAND_MIN:
        return dumps((_OutOfBand(value), run_time), 1)
    return dumps((value, run_time))


def dumps_report(obj: Any) -> Encoded:
    """Pickle what a task passed to ``corral.report``; raises ``SerializationError`` naming
    it, in the task that reported it."""
    try:
        return dumps(obj)
    except Exception as exc:
        raise SerializationError(
            f"the report {describe(obj)}", "in the worker", f"{type(exc).__name__}: {exc}"
        ) from exc


def call_error(
    fn: Callable[..., Any], args: Sequence[Any], exc: BaseException
) -> SerializationError:
    """Find which part of a call would not pickle, to name it in the error."""
    for what, obj in [("the function " + describe(fn), fn)] + [
        (f"argument {i} of {describe(fn)} ({describe(a)})", a) for i, a in enumerate(args)
    ]:
        try:
            by_value(obj)
        except KeyboardInterrupt:
            raise
        except BaseException as part_exc:
            return SerializationError(
                what, "in the parent", f"{type(part_exc).__name__}: {part_exc}"
            )
    return SerializationError(
        f"the call of {describe(fn)}", "in the parent", f"{type(exc).__name__}: {exc}"
    )


def dumps_error(exc: BaseException, run_time: float | None = None) -> Encoded:
    """Pickle an exception with its formatted traceback (and how long the call ran before
    it raised); substitute one when it won't pickle.

    The substitute is a ``SerializationError`` that still carries the original's type,
    message and traceback text, so the caller learns what happened in the worker.
    """
    tb = "".join(traceback.format_exception(exc))
    try:
        encoded = dumps((exc, tb, run_time))
        pickle.loads(encoded.data, buffers=encoded.buffers)  # it must also come back whole
    except Exception as pickle_exc:
        stand_in = SerializationError(
            f"the exception {type(exc).__qualname__}({_safe_str(exc)})",
            "in the worker",
            f"{type(pickle_exc).__name__}: {_safe_str(pickle_exc)}",
        )
        return dumps((stand_in, tb, run_time))
    return encoded


# A decoded outcome: (value, None, run time) for a RESULT; (None, exception, run time) for
# an ERROR, the exception carrying the worker's traceback as its ``__cause__``.
Outcome: TypeAlias = tuple[Any, BaseException | None, float | None]


def loads_outcome(
    kind: int,
    body: bytes | bytearray | memoryview,
    region: Callable[[int], memoryview] | None = None,
    buffers: Sequence[Buffer] | None = None,
) -> Outcome:
    """Decode a RESULT, ERROR or INIT_FAILED body (``kind``: the frame's, flags and all).

    Never raises: an outcome that will not unpickle here is the call's failure, a
    ``SerializationError`` with the unpickler's error as its cause, and not its receiver's:
    that covers ``MemoryError`` (no room for the body: the decoder skipped it) and the
    ``SystemExit`` or ``KeyboardInterrupt`` a ``__reduce__`` target may raise, which would
    otherwise stop the event loop and every other call with it.

    ``region`` as for ``loads``. ``buffers``: the out-of-band buffers of an ERROR pickle
    that came outside a frame (a Dask task's), ``body`` being the pickle itself (not
    keyword-only, for the reason ``dumps`` gives).
    """
    try:
        if kind & KIND_MASK == RESULT:
            value, run_time = loads(kind, body, region)
            return value, None, run_time
        if buffers is None:
            exc, tb, run_time = loads(kind, body, region)
        else:
            exc, tb, run_time = pickle.loads(body, buffers=buffers)
    except BaseException as decode_exc:
        what = "the result" if kind & KIND_MASK == RESULT else "the exception"
        return None, unpickling_failed(what, decode_exc), None
    exc.__cause__ = RemoteTraceback(tb)
    return None, exc, run_time


def unpickling_failed(what: str, exc: BaseException) -> SerializationError:
    """The error of a call whose outcome, items or report (what) will not unpickle in the
    parent; exc, the unpickler's error, is its cause."""
    error = SerializationError(
        what, "in the parent", f"unpickling failed: {type(exc).__name__}: {exc}"
    )
    error.__cause__ = exc
    return error


def dumps_setup(initializer: Any, initargs: tuple[Any, ...]) -> bytes:
    """The setup a new worker is given: the initializer and its arguments as one CALL frame
    (job 0), whole. What the worker's ``__main__`` lacks (an initializer defined in the
    script's main block) goes by value. Raises what the pickler raised."""
    return b"".join(frame(CALL, 0, dumps((initializer, initargs), main=0)))


def loads_setup(data: bytes) -> tuple[Any, tuple[Any, ...]]:
    """The initializer and its arguments from ``dumps_setup``'s bytes."""
    (setup,) = FrameDecoder().feed(data)
    initializer, initargs = loads(setup.kind, setup.body)
    return initializer, initargs


def _safe_str(obj: object) -> str:
    """str(obj), or a placeholder when its __str__ raises (an error path must not fail)."""
    try:
        return str(obj)
    except Exception:
        return f"<{type(obj).__qualname__}: str() failed>"


# A big body needs a buffer of its own, and glibc hands every allocation above 32 MiB a fresh
# mapping whose pages fault in one by one as the pipe fills them: that, not the pipe, capped
# large transfers at a third of their speed. So the process keeps its last big buffer and
# reuses it for the next big body, but only once nothing refers to it any more (a NumPy
# array unpickled in place keeps it busy, and then a new buffer is made). The kept buffer
# costs up to SPARE_MAX of memory, once per process, not once per worker.
SPARE_MAX = 256 * 1024 * 1024
_spare: list[bytearray] = []  # at most one; list.pop is atomic, so threads cannot share it


def _take_spare(length: int) -> bytearray:
    """A buffer of at least length bytes: the spare when it is free and large enough."""
    try:
        spare = _spare.pop()
    except IndexError:
        return bytearray(length)
    # Two references: `spare` and getrefcount's argument. More means someone still uses it.
    if len(spare) >= length and sys.getrefcount(spare) == 2:
        return spare
    return bytearray(length)


def _keep_spare(buffer: bytearray) -> None:
    """Offer a big buffer for reuse once its body has been consumed."""
    if len(buffer) <= SPARE_MAX and (not _spare or len(_spare[0]) < len(buffer)):
        _spare[:] = [buffer]


class FrameDecoder:
    """Cuts a byte stream into frames. Sans-I/O: the caller reads, the decoder parses.

    Small frames are parsed out of one reusable chunk; a body larger than half the chunk gets
    its own allocation, and reads go straight into it until it is whole.
    """

    # 256 KiB holds hundreds of small frames, so one read drains a busy pipe; larger chunks
    # only cost memory per worker.
    CHUNK = 256 * 1024

    def __init__(self, chunk: int = CHUNK) -> None:
        self._buf = bytearray(chunk)
        self._view = memoryview(self._buf)
        self._start = 0  # first byte not yet parsed
        self._end = 0  # one past the last byte read
        self._big: bytearray | None = None  # the buffer a big body is read into
        self._big_view = memoryview(b"")  # the part of it the body fills
        self._big_filled = 0
        self._big_head = (0, 0)  # kind, job of the big frame
        self._skip = 0  # bytes still to throw away of a body there was no memory for

    def get_buffer(self) -> memoryview:
        """Where the next read should go (never empty)."""
        if self._big is not None:
            return self._big_view[self._big_filled :]
        free = len(self._buf) - self._end
        if free < len(self._buf) // 4 and self._start:
            pending = self._end - self._start
            self._buf[:pending] = self._view[self._start : self._end]
            self._start, self._end = 0, pending
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> list[Frame]:
        """Account for nbytes just read into ``get_buffer()``; return the frames completed."""
        if self._big is not None:
            self._big_filled += nbytes
            if self._big_filled < len(self._big_view):
                return []
            kind, job = self._big_head
            body: bytearray | memoryview = self._big_view
            if len(body) == len(self._big):
                body = self._big
            _keep_spare(self._big)
            self._big, self._big_view = None, memoryview(b"")
            return [Frame(kind, job, body), *self._parse()]
        self._end += nbytes
        if self._skip:
            dropped = min(self._skip, self._end - self._start)
            self._skip -= dropped
            self._start += dropped
        return self._parse()

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Decode bytes the caller already holds."""
        frames: list[Frame] = []
        view = memoryview(data)
        while view:
            target = self.get_buffer()
            n = min(len(target), len(view))
            target[:n] = view[:n]
            view = view[n:]
            frames.extend(self.buffer_updated(n))
        return frames

    @property
    def pending(self) -> int:
        """Bytes received that belong to a frame not yet complete."""
        if self._big is not None:
            return HEADER.size + self._big_filled
        return self._end - self._start

    def _parse(self) -> list[Frame]:
        frames: list[Frame] = []
        buf, view = self._buf, self._view
        start, end = self._start, self._end
        while end - start >= HEADER.size:
            length, job, kind = HEADER.unpack_from(buf, start)
            body = start + HEADER.size
            if end - body >= length:
                frames.append(Frame(kind, job, bytes(view[body : body + length])))
                start = body + length
            elif length > len(buf) // 2:
                have = end - body
                try:
                    big = _take_spare(length)
                except MemoryError:
                    # Only this frame is lost: its body is skipped as it arrives, the
                    # frames after it still decode, and its receiver learns why.
                    frames.append(Frame(kind | DROPPED, job, _LENGTH.pack(length)))
                    self._skip = length - have
                    start = end
                    break
                big_view = memoryview(big)[:length]
                big_view[:have] = view[body:end]
                self._big, self._big_view = big, big_view
                self._big_filled, self._big_head = have, (kind, job)
                start = end
                break
            else:
                break
        if start == end:
            start = end = 0
        self._start, self._end = start, end
        return frames
