"""The wire, without I/O: frames, the decoder's buffered protocol, pickling of calls,
results and errors, and the out-of-band path that keeps large buffers from being copied."""

from __future__ import annotations

import copyreg
import functools
import itertools
import pickle
import random
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral import RemoteTraceback, SerializationError, _functions, _wire
from corral._functions import HELD_MAX, Functions
from corral._wire import (
    ACK_WANTED,
    CALL,
    DROPPED,
    ERROR,
    FUNCTION,
    HEADER,
    INIT_FAILED,
    KIND_MASK,
    OUT_OF_BAND,
    OUT_OF_BAND_MIN,
    RESULT,
    SHARED,
    Encoded,
    Frame,
    FrameDecoder,
    dumps,
    dumps_call,
    dumps_error,
    dumps_result,
    dumps_setup,
    frame,
    framed,
    loads,
    loads_call,
    loads_outcome,
    loads_setup,
    out_of_band,
    shared_frame,
)
from tests import tasks

# The decoder does not interpret kinds: any value below the flag will do for an empty frame.
EMPTY = 0x2A

# Bounded so the whole file runs in seconds; no example database in the work tree.
BOUNDED = settings(max_examples=150, deadline=None, database=None)


def wire(*frames: list[Any]) -> bytes:
    """The bytes a writer would put on the pipe for these frames."""
    return b"".join(bytes(buffer) for buffers in frames for buffer in buffers)


def decode_one(kind: int, job: int, payload: Encoded | None = None) -> Frame:
    """Frame a payload, decode it, and return the one frame that came out."""
    (decoded,) = FrameDecoder().feed(wire(frame(kind, job, payload)))
    return decoded


def round_trip(obj: Any) -> Any:
    """Pickle obj, frame it, decode the frame, and unpickle its body."""
    decoded = decode_one(RESULT, 1, dumps(obj))
    return loads(decoded.kind, decoded.body)


class _Holder:
    """An object that will not pickle: it holds a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def method(self) -> None:
        """A bound method whose instance will not pickle."""


class _NeedsTwo(Exception):
    """Pickles but will not unpickle: ``args`` holds one value, ``__init__`` needs two."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}{b}")


class _BadStr(Exception):
    """An exception whose ``str()`` raises."""

    def __str__(self) -> str:
        raise RuntimeError("str() of this exception fails")


# -- frames ---------------------------------------------------------------------------------


def test_header_layout() -> None:
    """A header is 17 bytes, little-endian: body length u64, job id u64, kind u8."""
    assert HEADER.size == 17
    (header,) = frame(EMPTY, 0x0102, None)
    assert bytes(header) == (0).to_bytes(8, "little") + (0x0102).to_bytes(8, "little") + bytes(
        [EMPTY]
    )


def test_frame_without_payload_is_a_header_alone() -> None:
    """A frame without a payload is one buffer and decodes to an empty body."""
    buffers = frame(EMPTY, 7)
    assert len(buffers) == 1
    assert decode_one(EMPTY, 7) == Frame(EMPTY, 7, b"")


def test_frame_with_in_band_payload_is_header_and_pickle() -> None:
    """A payload without out-of-band buffers goes out as two buffers: header and pickle, the
    pickle itself and not a copy."""
    payload = dumps({"a": 1})
    header, data = frame(RESULT, 3, payload)
    assert data is payload.data
    assert HEADER.unpack(header) == (len(payload.data), 3, RESULT)


def test_out_of_band_frame_lays_out_table_pickle_buffers() -> None:
    """With out-of-band buffers the kind carries the flag and the body is the count, each
    length, the pickle, then the buffers, which are the caller's memory, not copies."""
    big = b"b" * OUT_OF_BAND_MIN
    payload = dumps_call(tasks.identity, (big,))
    assert len(payload.buffers) == 1
    header, table, data, buffer = frame(CALL, 9, payload)
    length, job, kind = HEADER.unpack(header)
    assert (job, kind) == (9, CALL | OUT_OF_BAND)
    assert kind & KIND_MASK == CALL
    assert length == len(table) + len(data) + len(big)
    assert bytes(table) == (1).to_bytes(4, "little") + len(big).to_bytes(8, "little")
    assert data is payload.data
    assert buffer.obj is big  # a view of the argument itself: nothing copied


def test_frame_kind_and_job_id_limits() -> None:
    """Every kind below the flag and every u64 job id travel unchanged."""
    for kind in (0, KIND_MASK):
        for job in (0, 2**64 - 1):
            assert decode_one(kind, job, dumps(None)).job == job
            assert decode_one(kind, job, dumps(None)).kind == kind


# -- the decoder ----------------------------------------------------------------------------


def test_decoder_byte_at_a_time() -> None:
    """Frames fed one byte at a time come out whole, each at the byte that completes it."""
    decoder = FrameDecoder()
    stream = wire(frame(EMPTY, 1), frame(RESULT, 2, dumps("two")), frame(ERROR, 3, dumps(3)))
    out = []
    for i in range(len(stream)):
        got = decoder.feed(stream[i : i + 1])
        out.extend(got)
        if got:
            assert decoder.pending == 0  # nothing of the next frame has arrived yet
    assert [(f.kind, f.job) for f in out] == [(EMPTY, 1), (RESULT, 2), (ERROR, 3)]
    assert loads(out[1].kind, out[1].body) == "two"
    assert decoder.pending == 0


def test_decoder_many_frames_in_one_read() -> None:
    """One read holding hundreds of small frames yields them all, in order."""
    stream = wire(*(frame(RESULT, i, dumps(i)) for i in range(500)))
    frames = FrameDecoder().feed(stream)
    assert [loads(f.kind, f.body) for f in frames] == list(range(500))


def test_big_body_is_read_in_place() -> None:
    """A body larger than half the chunk gets its own allocation and ``get_buffer`` points
    into it, so the reads land in the body the frame is handed out with (no copy)."""
    decoder = FrameDecoder(chunk=1024)
    body = bytes(range(256)) * 8  # 2 KiB: more than half the chunk
    header, _data = frame(RESULT, 5, Encoded(body, []))
    assert decoder.feed(bytes(header) + body[:100]) == []
    assert decoder.pending == HEADER.size + 100
    target = decoder.get_buffer()
    assert len(target) == len(body) - 100  # exactly the rest of the body
    target[:] = body[100:]
    (decoded,) = decoder.buffer_updated(len(target))
    assert decoded == Frame(RESULT, 5, body)
    # The body is its buffer, or a view of a reused bigger one: the read went straight in.
    owner = decoded.body.obj if isinstance(decoded.body, memoryview) else decoded.body
    assert target.obj is owner
    assert decoder.pending == 0


def test_big_buffer_is_reused_only_once_released() -> None:
    """A big body's buffer is reused for the next big body once nothing refers to it,
    and never while something still does (it would be overwritten under its holder)."""

    def big_frame(fill: int) -> tuple[Frame, object]:
        decoder = FrameDecoder(chunk=1024)
        body = bytes([fill]) * 4096
        (decoded,) = decoder.feed(wire(frame(RESULT, 1, Encoded(body, []))))
        assert bytes(decoded.body) == body
        owner = decoded.body.obj if isinstance(decoded.body, memoryview) else decoded.body
        return decoded, owner

    _wire._spare.clear()  # start from no spare, whatever earlier tests left
    first, first_owner = big_frame(1)
    held = first  # still in use
    second, second_owner = big_frame(2)
    assert second_owner is not first_owner
    assert bytes(held.body) == bytes([1]) * 4096  # untouched
    # The spare list keeps the second buffer alive, so its id stays its own.
    second_id = id(second_owner)
    del held, first, first_owner, second, second_owner
    third, third_owner = big_frame(3)
    assert id(third_owner) == second_id  # released, so reused
    assert bytes(third.body) == bytes([3]) * 4096


def test_frames_after_a_big_body_still_decode() -> None:
    """Small frames following a big one in the same stream are not lost or merged."""
    decoder = FrameDecoder(chunk=256)
    big = bytes(1000)
    stream = wire(frame(RESULT, 1, Encoded(big, [])), frame(EMPTY, 2), frame(RESULT, 3, dumps(3)))
    frames = decoder.feed(stream)
    assert [(f.kind, f.job) for f in frames] == [(RESULT, 1), (EMPTY, 2), (RESULT, 3)]
    assert frames[0].body == big


def test_out_of_band_buffers_become_views_of_the_body() -> None:
    """Unpickling an out-of-band frame hands the object a view of the received body rather
    than a copy."""
    payload = dumps(pickle.PickleBuffer(bytearray(b"z" * OUT_OF_BAND_MIN)))
    assert len(payload.buffers) == 1
    decoded = decode_one(RESULT, 1, payload)
    value = loads(decoded.kind, decoded.body)
    assert isinstance(value, memoryview)
    assert value.obj is decoded.body
    assert bytes(value) == b"z" * OUT_OF_BAND_MIN


def test_several_out_of_band_buffers_in_one_body() -> None:
    """A payload with several out-of-band buffers of different sizes and contents decodes
    each into its own place, through a small frame and through a big one."""
    values = (
        b"a" * OUT_OF_BAND_MIN,
        b"tiny",
        bytes(range(256)) * 700,
        b"c" * (3 * OUT_OF_BAND_MIN + 1),
    )
    payload = dumps(tuple(out_of_band(v) for v in values))
    assert len(payload.buffers) == 3
    for chunk in (FrameDecoder.CHUNK, 64 * OUT_OF_BAND_MIN):  # a big body, then a small one
        (decoded,) = FrameDecoder(chunk).feed(wire(frame(RESULT, 4, payload)))
        assert loads(decoded.kind, decoded.body) == values


@st.composite
def payloads(draw: st.DrawFn) -> tuple[Encoded | None, Any]:
    """A payload for one frame and the object it should unpickle to (or its raw body)."""
    shape = draw(st.sampled_from(["none", "raw", "large-raw", "object", "out-of-band"]))
    if shape == "none":
        return None, None
    if shape == "raw":
        data = draw(st.binary(max_size=300))
        return Encoded(data, []), data
    if shape == "large-raw":
        data = random.Random(draw(st.integers(0, 2**32))).randbytes(draw(st.integers(300, 300_000)))
        return Encoded(data, []), data
    if shape == "object":
        obj = draw(
            st.recursive(
                st.none() | st.integers() | st.text(max_size=20) | st.binary(max_size=50),
                lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner),
                max_leaves=10,
            )
        )
        return dumps(obj), obj
    seed = draw(st.integers(0, 2**32))
    rng = random.Random(seed)
    size = st.sampled_from([0, OUT_OF_BAND_MIN - 1, OUT_OF_BAND_MIN, OUT_OF_BAND_MIN + 7])
    sizes = draw(st.lists(size | st.integers(0, 2 * OUT_OF_BAND_MIN), min_size=1, max_size=3))
    obj = tuple(out_of_band(rng.randbytes(size)) for size in sizes)
    expected = tuple(bytes(x.data) if hasattr(x, "data") else x for x in obj)
    return dumps(obj), expected


frames_strategy = st.lists(
    st.tuples(st.integers(0, KIND_MASK), st.integers(0, 2**64 - 1), payloads()),
    min_size=1,
    max_size=8,
)


@BOUNDED
@given(
    sent=frames_strategy,
    chunk=st.sampled_from([64, 256, 4096, FrameDecoder.CHUNK]),
    reads=st.lists(st.integers(1, 200_000), min_size=1, max_size=30),
)
def test_any_frames_in_any_reads_decode_exactly(
    sent: list[tuple[int, int, tuple[Encoded | None, Any]]], chunk: int, reads: list[int]
) -> None:
    """Any sequence of frames (any kind and job id; empty, small, large and out-of-band
    bodies), read in arbitrary short reads through ``get_buffer``/``buffer_updated``,
    decodes to exactly the frames sent, whatever the decoder's chunk size."""
    stream = memoryview(wire(*(frame(kind, job, payload) for kind, job, (payload, _) in sent)))
    decoder = FrameDecoder(chunk)
    got: list[Frame] = []
    floor = max(1, len(stream) // 500)  # short reads, but a bounded number of them
    i = 0
    while stream:
        target = decoder.get_buffer()
        assert len(target) > 0, "get_buffer() must never be empty"
        n = min(len(target), max(floor, reads[i % len(reads)]), len(stream))
        i += 1
        target[:n] = stream[:n]
        stream = stream[n:]
        got.extend(decoder.buffer_updated(n))
    assert decoder.pending == 0
    assert len(got) == len(sent)
    for (kind, job, (payload, expected)), decoded in zip(sent, got, strict=True):
        assert decoded.job == job
        assert decoded.kind & KIND_MASK == kind
        assert bool(decoded.kind & OUT_OF_BAND) == bool(payload and payload.buffers)
        if payload is None:
            assert decoded.body == b""
        elif isinstance(expected, bytes) and payload.data is expected:
            assert decoded.body == expected
        else:
            assert loads(decoded.kind, decoded.body) == expected


@BOUNDED
@given(sent=frames_strategy, cuts=st.lists(st.integers(0, 1_000_000), max_size=10))
def test_feed_splits_anywhere(
    sent: list[tuple[int, int, tuple[Encoded | None, Any]]], cuts: list[int]
) -> None:
    """``feed`` with the stream cut at arbitrary points yields the same frames as one
    ``feed`` of the whole stream."""
    stream = wire(*(frame(kind, job, payload) for kind, job, (payload, _) in sent))
    whole = FrameDecoder().feed(stream)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    decoder = FrameDecoder()
    pieces: list[Frame] = []
    for a, b in itertools.pairwise(points):
        pieces.extend(decoder.feed(stream[a:b]))
    assert [(f.kind, f.job, bytes(f.body)) for f in pieces] == [
        (f.kind, f.job, bytes(f.body)) for f in whole
    ]
    assert len(whole) == len(sent)


# -- dumps and loads ------------------------------------------------------------------------


def test_plain_objects_round_trip() -> None:
    """Ordinary values come back equal through pickle protocol 5 and a frame."""
    value = {"n": 1, "s": "x", "t": (1.5, None), "b": b"\x00" * 10, "l": [1, [2]]}
    assert round_trip(value) == value


def test_lambda_and_closure_fall_back_to_cloudpickle() -> None:
    """Objects plain pickle refuses (a lambda, a closure) travel by value and still work."""
    offset = 10

    def closure(x: int) -> int:
        return x + offset

    assert round_trip(lambda x: x * 2)(4) == 8
    assert round_trip(closure)(1) == 11


def main_function(monkeypatch: pytest.MonkeyPatch, name: str) -> Callable[[int], int]:
    """A function that plain pickle would send by reference to ``__main__.<name>``: it
    claims ``__main__`` as its module and ``__main__`` has it, as a script's function
    does. A worker's ``__main__`` is not the script, so only a copy by value can work."""

    def fn(x: int) -> int:
        return x * 3

    fn.__module__ = "__main__"
    fn.__qualname__ = fn.__name__ = name
    monkeypatch.setattr(sys.modules["__main__"], name, fn, raising=False)
    return fn


class Receiver:
    """A worker's side of the wire, without the process: what a pipe would carry to it
    goes through a decoder into its ``Functions``. It also stands for the worker in the
    sender's tables (as a worker's shared region does)."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder()
        self.functions = Functions()
        self.sent = 0  # the shared region's count, which ``framed`` reads

    def send(self, payload: Encoded, job: int = 1) -> tuple[Any, tuple[Any, ...], int]:
        """Frame the call for this receiver and take it in: the function, the arguments,
        and the bytes it cost on the wire."""
        data = wire(framed(CALL, job, payload, self, 0))  # type: ignore[arg-type]
        call = None
        for f in self.decoder.feed(data):
            if f.kind & KIND_MASK == FUNCTION:
                self.functions.define(f.job, f.body)
            else:
                call = loads_call(f.kind, f.body)
        assert call is not None
        return self.functions.load(call[0]), call[1], len(data)


def unpickled_elsewhere(payload: Encoded, monkeypatch: pytest.MonkeyPatch, name: str) -> Any:
    """Take a call in where ``__main__`` lacks the function, as in a worker."""
    monkeypatch.delattr(sys.modules["__main__"], name)
    return Receiver().send(payload)[:2]


def test_main_module_function_goes_by_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """A function claiming ``__main__`` that the script does not define at import (here:
    pytest's ``__main__`` never defines it) travels by value, so a worker can run it
    although its own ``__main__`` has no such function."""
    fn = main_function(monkeypatch, "corral_test_main_fn")
    payload = dumps_call(fn, (2,))
    assert payload.definition is not None
    called, args = unpickled_elsewhere(payload, monkeypatch, "corral_test_main_fn")
    assert called(*args) == 6


def test_main_module_function_as_an_argument_goes_by_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ``__main__`` function passed as an argument (``map`` passes the user's function to
    its chunk runner) also travels by value."""
    fn = main_function(monkeypatch, "corral_test_main_arg")
    payload = dumps_call(tasks.identity, (fn,))
    called, (arg,) = unpickled_elsewhere(payload, monkeypatch, "corral_test_main_arg")
    assert called is tasks.identity
    assert arg(5) == 15


def test_dumps_call_of_an_importable_function_goes_by_reference() -> None:
    """A module-level function travels as its name, so the pickle stays small."""
    payload = dumps_call(tasks.add, (1, 2))
    assert b"tests.tasks" in payload.data
    reference, args, _soft, _credit = loads_call(0, payload.data)
    assert Functions().load(reference) is tasks.add
    assert args == (1, 2)


@pytest.mark.parametrize("big", [False, True])
def test_a_call_asking_for_its_ack_says_so_in_the_header(big: bool) -> None:
    """``ack=True`` (a hard time limit) is carried in the frame's kind, where the worker
    reads it before it unpickles anything; the kind still decodes to CALL, in-band or out
    of band, and the pickle is the same as without it."""
    args = (b"q" * OUT_OF_BAND_MIN,) if big else (1,)
    plain = dumps_call(tasks.identity, args, soft_time_limit=2.0)
    asked = dumps_call(tasks.identity, args, soft_time_limit=2.0, ack=True)
    assert asked.data == plain.data
    assert (plain.flags, asked.flags) == (0, ACK_WANTED)
    decoded = decode_one(CALL, 7, asked)
    assert decoded.kind & ACK_WANTED
    assert decoded.kind & KIND_MASK == CALL
    assert decode_one(CALL, 7, plain).kind & ACK_WANTED == 0
    assert loads_call(decoded.kind, decoded.body)[1:] == (args, 2.0, 0)


def test_large_bytes_go_out_of_band_at_the_threshold() -> None:
    """A ``bytes`` argument of ``OUT_OF_BAND_MIN`` bytes travels out of band and comes back
    as plain ``bytes``; one byte less travels inside the pickle."""
    big = b"q" * OUT_OF_BAND_MIN
    payload = dumps_call(tasks.identity, (big, b"small"))
    assert len(payload.buffers) == 1
    assert len(payload.data) < 1000
    decoded = decode_one(CALL, 1, payload)
    _fn, args, _soft, _credit = loads_call(decoded.kind, decoded.body)
    assert type(args[0]) is bytes
    assert args == (big, b"small")
    just_below = big[:-1]
    assert dumps_call(tasks.identity, (just_below,)).buffers == []
    assert out_of_band(just_below) is just_below


def test_large_result_goes_out_of_band() -> None:
    """A large ``bytes`` result wrapped with ``out_of_band`` comes back as plain bytes."""
    value = bytes(range(256)) * 1000
    payload = dumps(out_of_band(value))
    assert len(payload.buffers) == 1
    decoded = decode_one(RESULT, 1, payload)
    assert loads(decoded.kind, decoded.body) == value


def test_large_bytearray_argument_goes_out_of_band() -> None:
    """A large ``bytearray`` argument travels out of band, as the module docstring promises
    ("a bytearray, a NumPy array, a large bytes argument"), instead of being copied into the
    pickle."""
    big = bytearray(b"a" * (4 * OUT_OF_BAND_MIN))
    payload = dumps_call(tasks.identity, (big,))
    assert len(payload.data) < OUT_OF_BAND_MIN, "the bytearray was copied into the pickle"
    assert len(payload.buffers) == 1


# -- SerializationError from dumps_call -----------------------------------------------------


def test_unpicklable_argument_is_named() -> None:
    """A call whose argument will not pickle raises ``SerializationError`` naming the
    argument's position, the function and the argument's type, with the pickler's error as
    the cause."""
    with pytest.raises(SerializationError) as info:
        dumps_call(tasks.add, (1, threading.Lock()))
    error = info.value
    assert error.what == "argument 1 of add (a _thread.lock)"
    assert error.where == "in the parent"
    assert error.reason.startswith("TypeError: ")
    assert str(error).startswith("argument 1 of add (a _thread.lock) could not be serialized")
    assert isinstance(error.__cause__, TypeError)


def test_unpicklable_function_is_named() -> None:
    """A function that will not pickle (a method of an object holding a lock) is named."""
    with pytest.raises(SerializationError) as info:
        dumps_call(_Holder().method, ())
    assert info.value.what == "the function _Holder.method"
    assert info.value.where == "in the parent"


def test_unpicklable_partial_is_described_by_its_type() -> None:
    """A callable without a name (a ``functools.partial``) is described by its type."""
    with pytest.raises(SerializationError, match=r"the function a functools\.partial"):
        dumps_call(functools.partial(tasks.add, threading.Lock()), (1,))


def test_argument_defined_locally_is_not_an_error() -> None:
    """A lambda as an argument is not an error: the call falls back to cloudpickle."""
    payload = dumps_call(tasks.identity, (lambda: 42,))
    _fn, (arg,), _soft, _credit = loads_call(0, payload.data)
    assert arg() == 42


# -- dumps_error ----------------------------------------------------------------------------


def raised(exc: BaseException) -> BaseException:
    """exc after being raised, so that it carries a traceback."""
    try:
        raise exc
    except BaseException as caught:
        return caught


def unpickle_error(payload: Encoded) -> tuple[BaseException, str]:
    """Decode an ERROR frame as the parent does: the exception and the worker's traceback
    text, which comes as its cause."""
    decoded = decode_one(ERROR, 1, payload)
    value, exc, _run_time = loads_outcome(decoded.kind, decoded.body)
    assert value is None and exc is not None
    assert isinstance(exc.__cause__, RemoteTraceback)
    return exc, exc.__cause__.tb


def test_error_carries_the_run_time() -> None:
    """How long the call ran before raising travels with the error, for stats."""
    decoded = decode_one(ERROR, 1, dumps_error(raised(ValueError("x")), 0.25))
    assert loads_outcome(decoded.kind, decoded.body)[2] == 0.25


def test_error_carries_exception_and_traceback() -> None:
    """An exception travels with its type and args, and with its traceback as text."""
    exc, tb = unpickle_error(dumps_error(raised(ValueError("bad value", 7))))
    assert type(exc) is ValueError
    assert exc.args == ("bad value", 7)
    assert "Traceback (most recent call last)" in tb
    assert "raise exc" in tb
    assert tb.rstrip().endswith("ValueError: ('bad value', 7)")


def test_error_class_defined_locally_travels_by_value() -> None:
    """An exception class pickle cannot find by name (defined in a function) still arrives,
    by value, with its name and message."""

    class LocalError(Exception):
        pass

    exc, _tb = unpickle_error(dumps_error(raised(LocalError("local"))))
    assert type(exc).__name__ == "LocalError"
    assert exc.args == ("local",)


def test_unpicklable_exception_gets_a_stand_in() -> None:
    """An exception holding an unpicklable attribute is replaced by a
    ``SerializationError`` that names its type and message and keeps the original
    traceback text."""
    original = ValueError("with a lock")
    original.lock = threading.Lock()  # type: ignore[attr-defined]
    original = raised(original)
    expected_tb = "".join(traceback.format_exception(original))
    exc, tb = unpickle_error(dumps_error(original))
    assert isinstance(exc, SerializationError)
    assert exc.what == "the exception ValueError(with a lock)"
    assert exc.where == "in the worker"
    assert "TypeError" in exc.reason
    assert tb == expected_tb


def test_exception_that_will_not_unpickle_gets_a_stand_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An exception that pickles but fails to unpickle (its ``__init__`` needs arguments
    that ``args`` does not hold) is caught on the sending side and replaced."""
    # Importing distributed (another test module) installs tblib's reducer for every
    # exception class defined by then, which rebuilds this one whole: pickle's own way is
    # the one tested here, whatever the collection order.
    monkeypatch.delitem(copyreg.dispatch_table, _NeedsTwo, raising=False)
    exc, tb = unpickle_error(dumps_error(raised(_NeedsTwo("a", "b"))))
    assert isinstance(exc, SerializationError)
    assert exc.what == "the exception _NeedsTwo(ab)"
    assert "_NeedsTwo" in tb


def test_unprintable_unpicklable_exception_still_gets_a_stand_in() -> None:
    """``dumps_error`` never raises: an exception whose ``str()`` raises and which will not
    pickle still becomes a stand-in (otherwise the worker dies reporting it and the caller
    sees ``WorkerLostError`` instead of the task's failure)."""
    original = _BadStr()
    original.lock = threading.Lock()  # type: ignore[attr-defined]
    exc, tb = unpickle_error(dumps_error(raised(original)))
    assert isinstance(exc, SerializationError)
    assert "_BadStr" in exc.what
    assert "_BadStr" in tb


def test_corral_errors_cross_the_wire_as_themselves() -> None:
    """corral's own errors pickle and unpickle whole, so no stand-in replaces them."""
    original = SerializationError("the result of f (a socket)", "in the worker", "TypeError: x")
    exc, _tb = unpickle_error(dumps_error(raised(original)))
    assert type(exc) is SerializationError
    assert (exc.what, exc.where, exc.reason) == (original.what, original.where, original.reason)


# -- the messages: what each encoder makes, its decoder reads ------------------------------

# Values a call or a result may carry: nested containers of plain objects, and large
# ``bytes`` or ``bytearray`` objects, which travel out of band.
_plain = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
_large = st.integers(0, 3).flatmap(
    lambda n: st.sampled_from([bytes([n]) * (OUT_OF_BAND_MIN + n), bytearray(OUT_OF_BAND_MIN)])
)
values = st.recursive(
    _plain | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner),
    max_leaves=8,
)


@BOUNDED
@given(
    fn=st.sampled_from([tasks.add, tasks.identity]),
    args=st.lists(values | _large, max_size=4).map(tuple),
    soft_time_limit=st.none() | st.floats(0.001, 1e6),
    credit=st.integers(0, 2**31),
    ack=st.booleans(),
)
def test_a_call_reads_back_as_it_was_made(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    soft_time_limit: float | None,
    credit: int,
    ack: bool,
) -> None:
    """Framed and decoded as the pipe carries it, any call reads back, through
    ``loads_call``, as the function, arguments (each of its own type), soft limit and
    credit ``dumps_call`` was given, always in the same four places; the ACK request rides
    in the header."""
    payload = dumps_call(fn, args, soft_time_limit=soft_time_limit, ack=ack, credit=credit)
    decoded = decode_one(CALL, 3, payload)
    assert decoded.kind & KIND_MASK == CALL
    assert bool(decoded.kind & ACK_WANTED) is ack
    reference, sent, soft, more = loads_call(decoded.kind, decoded.body)
    assert Functions().load(reference) is fn
    assert sent == args
    assert [type(arg) for arg in sent] == [type(arg) for arg in args]
    assert (soft, more) == (soft_time_limit, credit)


@BOUNDED
@given(value=values | _large, run_time=st.floats(0, 1e6))
def test_a_result_reads_back_as_it_was_made(value: Any, run_time: float) -> None:
    """``dumps_result``'s RESULT reads back, through ``loads_outcome``, as the value (of
    its own type; a large one out of band), no error, and the run time."""
    payload = dumps_result(value, run_time)
    assert payload.copied is (type(value) in (bytes, bytearray) and len(value) >= OUT_OF_BAND_MIN)
    decoded = decode_one(RESULT, 5, payload)
    got, error, got_run_time = loads_outcome(decoded.kind, decoded.body)
    assert error is None
    assert got == value
    assert type(got) is type(value)
    assert got_run_time == run_time


@BOUNDED
@given(
    cls=st.sampled_from([ValueError, KeyError, RuntimeError, ZeroDivisionError]),
    args=st.lists(values, min_size=2, max_size=3).map(tuple),
    run_time=st.none() | st.floats(0, 1e6),
    kind=st.sampled_from([ERROR, INIT_FAILED]),
)
def test_an_error_reads_back_with_the_workers_traceback_as_its_cause(
    cls: type[BaseException], args: tuple[Any, ...], run_time: float | None, kind: int
) -> None:
    """``dumps_error``'s ERROR (or INIT_FAILED) reads back, through ``loads_outcome``, as
    no value, the exception (its type and arguments) with the worker's traceback text as
    its ``RemoteTraceback`` cause, and the run time."""
    original = raised(cls(*args))
    decoded = decode_one(kind, 5, dumps_error(original, run_time))
    value, exc, got_run_time = loads_outcome(decoded.kind, decoded.body)
    assert value is None
    assert type(exc) is cls
    assert exc.args == original.args
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert exc.__cause__.tb == "".join(traceback.format_exception(original))
    assert got_run_time == run_time


def test_an_error_that_came_outside_a_frame_reads_back_alike() -> None:
    """A Dask task sends ``dumps_error``'s pickle and its out-of-band buffers as they are,
    not framed: given as the body and ``buffers``, they read back as from a frame, and the
    Dask worker's ``load_error`` is that same decoding."""
    from corral.workers._dask_outcomes import load_error

    data = b"q" * OUT_OF_BAND_MIN
    original = raised(ValueError(out_of_band(data)))
    payload = dumps_error(original, 0.5)
    assert payload.buffers  # the bytes went out of band
    buffers = [bytes(b) for b in payload.buffers]
    value, exc, run_time = loads_outcome(ERROR, payload.data, buffers=buffers)
    framed_exc, framed_tb = unpickle_error(payload)
    assert (value, run_time) == (None, 0.5)
    for got in (exc, load_error((payload.data, buffers))):
        assert type(got) is ValueError
        assert got.args == framed_exc.args == (data,)
        assert isinstance(got.__cause__, RemoteTraceback)
        assert got.__cause__.tb == framed_tb


def _explode(exc: BaseException) -> None:
    """Raise exc: the target of ``_Explodes.__reduce__``, run by the unpickler."""
    raise exc


class _Explodes:
    """Pickles fine; unpickling it raises the exception it holds."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __reduce__(self) -> tuple[Any, ...]:
        return (_explode, (self.exc,))


@pytest.mark.parametrize(
    ("kind", "what"),
    [(RESULT, "the result"), (ERROR, "the exception"), (INIT_FAILED, "the exception")],
)
@pytest.mark.parametrize("failure", [ValueError("no"), SystemExit(3), KeyboardInterrupt()])
def test_an_outcome_that_will_not_unpickle_is_its_calls_error(
    kind: int, what: str, failure: BaseException
) -> None:
    """``loads_outcome`` never raises: an outcome whose unpickling raises, even
    ``SystemExit`` or ``KeyboardInterrupt`` (which would stop the parent's event loop),
    decodes to that call's ``SerializationError``, naming what failed, the unpickler's
    error as its cause."""
    message = (_Explodes(failure), 0.1) if kind == RESULT else (_Explodes(failure), "tb", 0.1)
    decoded = decode_one(kind, 1, dumps(message))
    value, error, run_time = loads_outcome(decoded.kind, decoded.body)
    assert (value, run_time) == (None, None)
    assert isinstance(error, SerializationError)
    assert (error.what, error.where) == (what, "in the parent")
    assert type(error.__cause__) is type(failure)


def test_an_outcome_dropped_for_want_of_memory_is_its_calls_error() -> None:
    """A body the decoder had no memory for arrives DROPPED (its length for a body): the
    outcome is that call's ``SerializationError``, ``MemoryError`` its cause."""
    value, error, _ = loads_outcome(RESULT | DROPPED, (10**12).to_bytes(8, "little"))
    assert value is None
    assert isinstance(error, SerializationError)
    assert isinstance(error.__cause__, MemoryError)
    assert "1,000,000,000,000 bytes" in str(error.__cause__)


def test_the_setup_reads_back_as_it_was_made() -> None:
    """``dumps_setup``'s bytes give ``loads_setup`` the initializer and its arguments; an
    initializer a worker could not import (a lambda) goes by value."""
    initializer, initargs = loads_setup(dumps_setup(tasks.identity, (1, "a")))
    assert initializer is tasks.identity
    assert initargs == (1, "a")
    initializer, initargs = loads_setup(dumps_setup(lambda x: x + 1, (2,)))
    assert initializer(*initargs) == 3


def test_shared_frame_reads_its_buffers_from_the_region() -> None:
    """A SHARED frame carries only the table and the pickle; the buffers are read from the
    sender's region, and the value comes back whole and of its own type."""
    data = bytes(range(256)) * 1024 * 8  # 2 MiB
    payload = dumps((out_of_band(data), out_of_band(bytearray(data))), wrapped=2)
    assert payload.copied
    region = bytearray(b"".join(payload.buffers))
    (decoded,) = FrameDecoder().feed(wire(shared_frame(RESULT, 9, payload)))
    assert decoded.kind & SHARED
    assert len(decoded.body) < 1024  # the megabytes stayed out of the pipe
    value = loads(decoded.kind, decoded.body, lambda size: memoryview(region)[:size])
    assert value == (data, bytearray(data))
    assert type(value[0]) is bytes
    assert type(value[1]) is bytearray


def test_only_wrapped_buffers_make_a_payload_copied() -> None:
    """A payload is marked copied (safe for a reused region) only when every out-of-band
    buffer comes from an out_of_band wrapper, whose value is copied when unpickled."""
    big = bytearray(OUT_OF_BAND_MIN)
    assert dumps_call(len, (bytes(big),)).copied
    assert not dumps((out_of_band(bytes(big)), pickle.PickleBuffer(big)), wrapped=1).copied
    assert not dumps_call(len, (1,)).copied


def test_module_functions_travel_as_cached_references() -> None:
    """A module-level function is pickled once; later calls carry the same reference bytes,
    and the worker side resolves each reference once into the same function."""
    first = dumps_call(tasks.add, (1, 2))
    second = dumps_call(tasks.add, (3, 4))
    reference, args, _soft, _credit = loads_call(0, first.data)
    assert type(reference) is bytes
    assert args == (1, 2)
    assert loads_call(0, second.data)[0] is not None
    known = Functions()
    assert known.load(reference) is tasks.add
    assert known.load(loads_call(0, second.data)[0]) is tasks.add
    assert len(known) == 1


def test_bound_methods_are_pickled_whole_with_every_call() -> None:
    """A bound method carries its object, whose state may change between calls: it is
    neither a reference nor a definition, and each call carries it whole."""
    items: list[int] = []
    payload = dumps_call(items.append, (1,))
    fn_sent = loads_call(0, payload.data)[0]
    assert payload.definition is None
    assert type(fn_sent) not in (bytes, tuple)


_WIRE_FACTOR = 2


def reads_a_global() -> Callable[[int], int]:
    """A lambda (so by value) that reads this module's ``_WIRE_FACTOR`` when called."""
    return lambda x: x * _WIRE_FACTOR


def test_a_lambda_is_sent_once_per_worker_then_named_by_its_token() -> None:
    """A by-value function is pickled once: its calls carry a token, its definition goes
    to each worker once, ahead of the first call that needs it, and later calls cost the
    wire only their own small frame."""
    fn = reads_a_global()
    first, second = dumps_call(fn, (3,)), dumps_call(fn, (4,))
    assert first.definition is not None and first.definition is second.definition
    assert len(first.data) < 100 < len(first.definition.data)
    worker, other = Receiver(), Receiver()
    called, args, cost_first = worker.send(first, 1)
    assert called(*args) == 6
    called_again, args, cost_second = worker.send(second, 2)
    assert called_again is called and called(*args) == 8
    assert cost_second < 100 < cost_first
    assert cost_first - cost_second >= len(first.definition.data)
    assert other.send(second, 2)[2] == cost_first  # another worker gets it too


def test_a_definition_is_never_reused_once_what_it_copied_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rebinding a global a by-value function reads, or a variable a closure holds, makes
    the next call a new definition: a worker never runs a copy made before the change."""
    fn = reads_a_global()
    worker = Receiver()
    before = dumps_call(fn, (3,))
    monkeypatch.setattr(sys.modules[__name__], "_WIRE_FACTOR", 5)
    after = dumps_call(fn, (3,))
    assert before.definition is not None and after.definition is not None
    assert before.definition.token != after.definition.token
    called, args, _ = worker.send(before, 1)
    assert called(*args) == 6
    called, args, _ = worker.send(after, 2)
    assert called(*args) == 15

    offset = 1

    def closure(x: int) -> int:
        return x + offset

    assert worker.send(dumps_call(closure, (1,)), 3)[0](1) == 2
    offset = 10
    assert worker.send(dumps_call(closure, (1,)), 4)[0](1) == 11


def test_a_function_copying_mutable_state_goes_whole_with_each_call() -> None:
    """A closure over a list may see the list change in place, which no identity check
    notices: it is pickled with every call, so each call carries the list as it is."""
    seen = [1]

    def total() -> int:
        return sum(seen)

    worker = Receiver()
    payload = dumps_call(total, ())
    assert payload.definition is None
    assert worker.send(payload, 1)[0]() == 1
    seen.append(2)
    assert worker.send(dumps_call(total, ()), 2)[0]() == 3


def test_a_function_copying_much_data_goes_whole_with_each_call() -> None:
    """A closure over a large ``bytes`` is not kept as a definition: hundreds of them,
    made per call, would hold their data in the parent and in every worker."""
    data = b"x" * (_functions.DEFINITION_BYTES_MAX + 1)

    def size() -> int:
        return len(data)

    payload = dumps_call(size, ())
    assert payload.definition is None
    assert Receiver().send(payload)[0]() == len(data)
    small = data[:100]

    def small_size() -> int:
        return len(small)

    assert dumps_call(small_size, ()).definition is not None


def adder(k: int) -> Callable[[int], int]:
    """A closure over k: a new by-value function per k."""
    return lambda x: x + k


def test_a_worker_holds_at_most_held_max_definitions() -> None:
    """Past ``HELD_MAX`` definitions the sender has the worker forget the least recently
    used one (a frame ahead of the new one) and sends it again when a call needs it."""
    worker = Receiver()
    fns = [adder(k) for k in range(HELD_MAX + 1)]
    for job, fn in enumerate(fns, 1):
        called, args, _ = worker.send(dumps_call(fn, (0,)), job)
        assert called(*args) == job - 1
    assert len(worker.functions) == HELD_MAX
    called, args, cost = worker.send(dumps_call(fns[0], (0,)), 999)
    assert called(*args) == 0 and cost > 100


def test_unknown_token_is_an_error_in_the_worker() -> None:
    """A call naming a definition the worker never got fails to load, never runs another
    function."""
    with pytest.raises(LookupError, match="never reached"):
        Functions().load((12345,))


SCRIPT = """
import os, sys
from corral import Pool
import json as codec
def helper(): pass
class Shape: pass
try:
    def guarded(): pass
except ImportError:
    fallback = None
def later(): pass
def shadowed(): pass
def rebinds():
    global later
if __name__ == "__main__":
    def in_main(): pass
    shadowed = None
"""


def test_stable_names_are_those_bound_at_import_only() -> None:
    """Names a script binds at import time and nowhere else are what a worker's
    ``__main__`` is sure to hold; those the main block or a ``global`` rebinds are not."""
    import ast

    names, main_only = _functions._stable_names(ast.parse(SCRIPT))
    assert {"helper", "Shape", "guarded", "fallback", "codec", "os", "rebinds"} <= names
    assert not {"later", "in_main", "shadowed"} & names
    assert main_only == {"in_main", "shadowed"}
