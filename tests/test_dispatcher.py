"""The dispatcher's decisions, free of I/O: priorities, FIFO, requeues, series, capacity,
discard and drain, and (by a state machine) that no interleaving of calls breaks them."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from corral._dispatcher import Dispatcher

_names = itertools.count()


@dataclass(eq=False)
class J:
    """A job as the dispatcher sees it: a priority, a series, hashed by identity."""

    priority: float = 0
    series: str | None = None
    name: str = field(default_factory=lambda: f"j{next(_names)}")

    def __repr__(self) -> str:
        return self.name


def names(jobs: list[J]) -> list[str]:
    return [job.name for job in jobs]


def assigned(assignments: list[tuple[str, J]]) -> list[tuple[str, str]]:
    return [(worker, job.name) for worker, job in assignments]


def make(*workers: tuple[str, int, frozenset[str] | None]) -> Dispatcher[str, J]:
    d: Dispatcher[str, J] = Dispatcher()
    for worker, capacity, series in workers:
        assert d.add_worker(worker, capacity, series) == []
    return d


# -- priority and order ---------------------------------------------------------------------


def test_lower_priority_number_runs_first() -> None:
    """Pending jobs run by ascending priority, including negative and fractional ones."""
    d: Dispatcher[str, J] = Dispatcher()
    jobs = [J(2, name="two"), J(-1, name="minus"), J(0.5, name="half"), J(0, name="zero")]
    for job in jobs:
        assert d.push(job) == []
    assert names(d.pending()) == ["minus", "zero", "half", "two"]
    out = d.add_worker("w", 4, None)
    assert assigned(out) == [("w", "minus"), ("w", "zero"), ("w", "half"), ("w", "two")]


def test_equal_priorities_are_first_in_first_out() -> None:
    """Among jobs of one priority, the first pushed runs first."""
    d = make(("w", 1, None))
    first, *rest = [J(name=f"n{i}") for i in range(5)]
    assert assigned(d.push(first)) == [("w", "n0")]
    for job in rest:
        assert d.push(job) == []
    order = []
    for _ in rest:
        ((_w, job),) = d.finished("w")
        order.append(job.name)
    assert order == ["n1", "n2", "n3", "n4"]


def test_requeue_goes_ahead_of_equals_but_not_of_lower_numbers() -> None:
    """A requeued job runs before every pending job of its priority, after those of a lower
    number; of two requeues, the later goes first (a dead worker's jobs are requeued in
    reverse so they keep their order)."""
    d: Dispatcher[str, J] = Dispatcher()
    urgent, a, b = J(-1, name="urgent"), J(0, name="a"), J(0, name="b")
    late = J(1, name="late")
    for job in (a, late, urgent, b):
        d.push(job)
    back1, back2 = J(0, name="back1"), J(0, name="back2")
    d.requeue(back2)
    d.requeue(back1)
    assert names(d.pending()) == ["urgent", "back1", "back2", "a", "b", "late"]
    assert names(d.drain()) == ["urgent", "back1", "back2", "a", "b", "late"]


# -- series ---------------------------------------------------------------------------------


def test_series_job_goes_only_to_a_worker_serving_it() -> None:
    """A job of series "a" skips a free worker serving only "b" and waits for one serving
    "a"; a worker serving every series (None) also takes it."""
    d = make(("b-only", 1, frozenset({"b"})))
    job = J(series="a", name="job-a")
    assert d.push(job) == []
    assert names(d.pending()) == ["job-a"]
    assert assigned(d.add_worker("a-and-c", 1, frozenset({"a", "c"}))) == [("a-and-c", "job-a")]
    other = J(series="a", name="other-a")
    assert d.push(other) == []
    assert assigned(d.add_worker("any", 1, None)) == [("any", "other-a")]


def test_job_of_no_series_goes_to_any_worker() -> None:
    """A job without a series may run on a worker restricted to some series."""
    d = make(("b-only", 1, frozenset({"b"})))
    assert assigned(d.push(J(name="plain"))) == [("b-only", "plain")]


def test_restricted_worker_takes_its_best_job_across_series() -> None:
    """A worker serving "a" picks the best of the jobs of "a" and of no series, by priority
    then FIFO, and leaves other series' jobs alone."""
    d: Dispatcher[str, J] = Dispatcher()
    for job in (J(1, "a", "a1"), J(0, "b", "b0"), J(0, None, "n0"), J(0, "a", "a0")):
        d.push(job)
    out = d.add_worker("w", 10, frozenset({"a"}))
    assert assigned(out) == [("w", "n0"), ("w", "a0"), ("w", "a1")]
    assert names(d.pending()) == ["b0"]


def test_serves() -> None:
    """``serves`` says whether some worker may take a series' jobs."""
    d: Dispatcher[str, J] = Dispatcher()
    assert not d.serves("a")
    d.add_worker("a", 1, frozenset({"a"}))
    assert d.serves("a")
    assert d.serves(None)
    assert not d.serves("b")
    d.add_worker("all", 1, None)
    assert d.serves("b")
    d.remove_worker("all")
    assert not d.serves("b")


# -- capacity -------------------------------------------------------------------------------


def test_fair_capacity_spreads_jobs_over_idle_workers() -> None:
    """With capacity 1 a job goes only to an idle worker: two jobs, two workers, one each;
    the third waits for a slot."""
    d = make(("w1", 1, None), ("w2", 1, None))
    assert assigned(d.push(J(name="x"))) == [("w1", "x")]
    assert assigned(d.push(J(name="y"))) == [("w2", "y")]
    assert d.push(J(name="z")) == []
    assert (d.load("w1"), d.load("w2"), d.in_flight, len(d)) == (1, 1, 2, 1)
    assert assigned(d.finished("w2")) == [("w2", "z")]


def test_prefetch_capacity_fills_a_worker_up_to_it() -> None:
    """With capacity 3 a new worker takes three pending jobs at once, and one more each time
    one finishes."""
    d: Dispatcher[str, J] = Dispatcher()
    for i in range(5):
        d.push(J(name=f"n{i}"))
    assert assigned(d.add_worker("w", 3, None)) == [("w", "n0"), ("w", "n1"), ("w", "n2")]
    assert d.load("w") == 3
    assert assigned(d.finished("w")) == [("w", "n3")]
    assert d.load("w") == 3


def test_finished_may_change_a_workers_capacity() -> None:
    """A capacity given with ``finished`` holds from then on: raised, the worker takes
    more at once; lowered, it takes nothing until its load is below the new capacity; a
    retired worker stays retired."""
    d: Dispatcher[str, J] = Dispatcher()
    for i in range(8):
        d.push(J(name=f"n{i}"))
    assert assigned(d.add_worker("w", 1, None)) == [("w", "n0")]
    assert assigned(d.finished("w", 3)) == [("w", "n1"), ("w", "n2"), ("w", "n3")]
    assert d.finished("w", 1) == []  # load 2 of capacity 1
    assert d.push(J(name="late")) == []  # no room: it waits behind the others
    assert d.finished("w") == []  # load 1 of 1
    assert assigned(d.finished("w")) == [("w", "n4")]
    d.retire("w")
    assert d.finished("w", 4) == []
    d.drain()
    d.add_worker("u", 3, None)  # room for 3, holding 2: free
    d.push(J(name="a"))
    d.push(J(name="b"))
    assert d.finished("u", 1) == []  # holding 1 of 1 now: no longer free
    assert d.push(J(name="c")) == []
    assert (d.load("w"), d.load("u"), len(d)) == (0, 1, 1)
    with pytest.raises(ValueError, match="capacity must be at least 1, not 0"):
        d.finished("u", 0)
    assert d.load("u") == 1  # refused before anything changed


def test_capacity_below_one_is_refused() -> None:
    """A worker with capacity 0 could never run anything; the error names the value."""
    d: Dispatcher[str, J] = Dispatcher()
    with pytest.raises(ValueError, match="capacity must be at least 1, not 0"):
        d.add_worker("w", 0, None)


def test_removed_worker_gets_nothing() -> None:
    """After ``remove_worker`` no job goes to that worker and its late ``finished`` is
    ignored."""
    d = make(("w", 1, None))
    d.push(J(name="x"))
    d.remove_worker("w")
    assert d.push(J(name="y")) == []
    assert d.finished("w") == []
    assert d.workers == []
    assert names(d.pending()) == ["y"]


# -- discard and drain ----------------------------------------------------------------------


def test_discarded_job_never_runs() -> None:
    """A discarded pending job is gone: not pending, not assigned later; discarding it
    again, or a job that was never pending, says False."""
    d: Dispatcher[str, J] = Dispatcher()
    keep, drop = J(name="keep"), J(name="drop")
    d.push(drop)
    d.push(keep)
    assert d.discard(drop) is True
    assert drop not in d
    assert d.discard(drop) is False
    assert d.discard(J()) is False
    assert len(d) == 1
    assert assigned(d.add_worker("w", 5, None)) == [("w", "keep")]


def test_discard_of_an_assigned_job_is_false() -> None:
    """A job already handed to a worker is not pending, so ``discard`` leaves it alone."""
    d = make(("w", 1, None))
    job = J()
    d.push(job)
    assert d.discard(job) is False
    assert d.load("w") == 1


def test_drain_returns_pending_in_order_and_empties() -> None:
    """``drain`` withdraws every pending job, in run order, and leaves none to assign."""
    d: Dispatcher[str, J] = Dispatcher()
    jobs = [J(1, name="b"), J(0, "s", name="a"), J(2, name="c")]
    for job in jobs:
        d.push(job)
    d.discard(jobs[2])
    assert names(d.drain()) == ["a", "b"]
    assert len(d) == 0
    assert d.pending() == []
    assert d.add_worker("w", 3, None) == []


def test_requeue_after_discard_runs_once() -> None:
    """A job discarded and then requeued (the same object) is pending once and assigned
    once."""
    d: Dispatcher[str, J] = Dispatcher()
    job = J()
    d.push(job)
    d.discard(job)
    d.requeue(job)
    assert d.pending() == [job]
    assert d.add_worker("w", 5, None) == [("w", job)]
    assert d.finished("w") == []


# -- any interleaving -----------------------------------------------------------------------

SERIES = [None, "a", "b", "c"]
SERVES = [None, frozenset({"a"}), frozenset({"b"}), frozenset({"a", "b"})]


class DispatcherMachine(RuleBasedStateMachine):
    """Drives a ``Dispatcher`` with random calls and checks every assignment against a
    simple model: a pending job is kept as (priority, sequence), where a push takes the next
    positive sequence and a requeue the next negative one."""

    workers = Bundle("workers")

    def __init__(self) -> None:
        super().__init__()
        self.d: Dispatcher[int, J] = Dispatcher()
        self.next_worker = itertools.count()
        self.capacity: dict[int, int] = {}
        self.room: dict[int, int] = {}  # the most a worker may hold: its capacity, or more
        # after a shrink, until what it held beyond the new capacity has finished
        self.serves: dict[int, frozenset[str] | None] = {}
        self.running: dict[int, list[J]] = {}  # worker -> jobs in flight, oldest first
        self.pending: dict[J, tuple[float, int]] = {}
        self.back = itertools.count(-1, -1)
        self.forward = itertools.count()

    def qualifies(self, worker: int, job: J) -> bool:
        serves = self.serves[worker]
        return job.series is None or serves is None or job.series in serves

    def apply(self, assignments: list[tuple[int, J]]) -> None:
        """Check each assignment, in the order made, against the model, then record it."""
        for worker, job in assignments:
            assert worker in self.capacity, "job given to an unknown worker"
            assert job in self.pending, f"{job} assigned but not pending"
            assert job not in self.in_flight(), f"{job} assigned while already in flight"
            assert self.qualifies(worker, job), f"{job} ({job.series}) given to {worker}"
            best = min((key, j) for j, key in self.pending.items() if self.qualifies(worker, j))[1]
            assert job is best, f"{worker} got {job}, but {best} was first in line"
            del self.pending[job]
            self.running[worker].append(job)
            assert len(self.running[worker]) <= self.capacity[worker], "over capacity"

    def in_flight(self) -> list[J]:
        return [job for jobs in self.running.values() for job in jobs]

    @rule(
        target=workers,
        capacity=st.integers(1, 3),
        serves=st.sampled_from(SERVES),
    )
    def add_worker(self, capacity: int, serves: frozenset[str] | None) -> int:
        worker = next(self.next_worker)
        self.capacity[worker] = self.room[worker] = capacity
        self.serves[worker] = serves
        self.running[worker] = []
        self.apply(self.d.add_worker(worker, capacity, serves))
        return worker

    @rule(priority=st.sampled_from([0, 1, -1, 0.5]), series=st.sampled_from(SERIES))
    def push(self, priority: float, series: str | None) -> None:
        job = J(priority, series)
        self.pending[job] = (priority, next(self.forward))
        self.apply(self.d.push(job))

    @rule(priority=st.sampled_from([0, 1, -1, 0.5]), series=st.sampled_from(SERIES))
    def requeue(self, priority: float, series: str | None) -> None:
        """A job handed back (by a worker lost elsewhere) goes ahead of its equals."""
        job = J(priority, series)
        self.pending[job] = (priority, next(self.back))
        self.apply(self.d.requeue(job))

    @rule(worker=workers, data=st.data(), capacity=st.none() | st.integers(1, 4))
    def finish(self, worker: int, data: st.DataObject, capacity: int | None) -> None:
        """A job ends; maybe the worker's capacity changes with it (strategy "auto")."""
        jobs = self.running.get(worker)
        if not jobs:
            return
        jobs.remove(data.draw(st.sampled_from(jobs)))
        if capacity is not None:
            self.capacity[worker] = capacity
        self.room[worker] = max(self.capacity[worker], len(jobs))
        self.apply(self.d.finished(worker, capacity))

    @rule(worker=consumes(workers), data=st.data())
    def lose_worker(self, worker: int, data: st.DataObject) -> None:
        """A worker dies: some of its jobs go back to the queue (in reverse, as the task
        queue does, so they keep their order), the rest are failed."""
        jobs = self.running.pop(worker)
        del self.capacity[worker], self.room[worker], self.serves[worker]
        self.d.remove_worker(worker)
        back = [job for job in jobs if data.draw(st.booleans())]
        for job in reversed(back):
            self.pending[job] = (job.priority, next(self.back))
            self.apply(self.d.requeue(job))

    @precondition(lambda self: bool(self.pending))
    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        job = data.draw(st.sampled_from(sorted(self.pending, key=self.pending.__getitem__)))
        assert self.d.discard(job) is True
        del self.pending[job]
        assert self.d.discard(job) is False

    @rule()
    def discard_in_flight(self) -> None:
        for job in self.in_flight()[:1]:
            assert self.d.discard(job) is False

    @precondition(lambda self: len(self.pending) > 3)
    @rule()
    def drain(self) -> None:
        expected = sorted(self.pending, key=self.pending.__getitem__)
        assert self.d.drain() == expected
        self.pending.clear()

    @invariant()
    def pending_in_order(self) -> None:
        assert self.d.pending() == sorted(self.pending, key=self.pending.__getitem__)
        assert len(self.d) == len(self.pending)
        assert all(job in self.d for job in self.pending)

    @invariant()
    def loads_match(self) -> None:
        for worker, jobs in self.running.items():
            assert self.d.load(worker) == len(jobs) <= self.room[worker]
        assert self.d.in_flight == len(self.in_flight())
        assert sorted(self.d.workers) == sorted(self.running)

    @invariant()
    def no_free_worker_left_idle(self) -> None:
        """Work-conserving: no worker with a free slot could take a pending job."""
        for worker, jobs in self.running.items():
            if len(jobs) < self.capacity[worker]:
                assert not any(self.qualifies(worker, job) for job in self.pending), (
                    f"worker {worker} has room but a job it may run waits"
                )

    @invariant()
    def serves_matches(self) -> None:
        for series in SERIES:
            expected = any(series is None or s is None or series in s for s in self.serves.values())
            assert self.d.serves(series) == expected


DispatcherMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=50, deadline=None, database=None
)
TestDispatcherMachine = DispatcherMachine.TestCase
TestDispatcherMachine.__doc__ = (
    "Any interleaving of add/remove worker, push, requeue, finished (changing capacity or "
    "not), discard and drain keeps "
    "the invariants: no job assigned twice or while not pending, no worker over capacity or "
    "given another series' job, each worker given the first job in line for it, pending "
    "order = (priority, requeues first, then FIFO), and no free worker left idle beside a "
    "job it may run."
)


def test_a_worker_is_never_assigned_more_than_its_quota() -> None:
    """A worker added with a quota of 3 gets at most 3 jobs ever, even when its capacity
    would take more at once; then it is retired and the rest wait for another worker."""
    d: Dispatcher[str, J] = Dispatcher()
    jobs = [J() for _ in range(6)]
    for job in jobs:
        assert d.push(job) == []
    assert names([job for _, job in d.add_worker("w", 4, None, quota=3)]) == names(jobs[:3])
    assert d.load("w") == 3
    for _ in range(3):
        assert d.finished("w") == []
    assert d.load("w") == 0
    assert assigned(d.add_worker("v", 4, None)) == [("v", job.name) for job in jobs[3:]]


# -- pinned jobs (broadcasts) and series withdrawal -----------------------------------------


def test_pinned_job_goes_to_its_worker_before_the_shared_queue() -> None:
    """A job pinned to a busy worker waits for that worker alone, and runs there before the
    shared queue's jobs, even more urgent ones."""
    d = make(("a", 1, None), ("b", 1, None))
    first, second = J(name="first"), J(name="second")
    assert assigned(d.push(first)) == [("a", "first")]
    assert assigned(d.push(second)) == [("b", "second")]
    urgent, pinned = J(-10, name="urgent"), J(name="pinned")
    assert d.push(urgent) == []
    assert d.pin("a", pinned) == []  # a is busy
    assert len(d) == 2
    assert pinned in d
    assert names(d.pending()) == ["pinned", "urgent"]
    assert assigned(d.finished("b")) == [("b", "urgent")]  # b never takes a's pinned job
    assert assigned(d.finished("a")) == [("a", "pinned")]


def test_pinned_job_to_an_idle_worker_is_assigned_at_once() -> None:
    d = make(("a", 1, None))
    job = J(name="p")
    assert assigned(d.pin("a", job)) == [("a", "p")]
    assert len(d) == 0


def test_pin_to_an_unknown_worker_raises() -> None:
    d = make(("a", 1, None))
    with pytest.raises(KeyError, match="not a known worker"):
        d.pin("zz", J())


def test_pinned_jobs_count_against_no_quota() -> None:
    """A worker recycled after one job still takes its pinned jobs, then one counted job."""
    d: Dispatcher[str, J] = Dispatcher()
    d.add_worker("a", 1, None, quota=1)
    pinned = J(name="p")
    assert assigned(d.pin("a", pinned)) == [("a", "p")]
    assert d.quota_left("a") == 1
    job = J(name="j")
    assert d.push(job) == []
    assert assigned(d.finished("a")) == [("a", "j")]
    assert d.quota_left("a") == 0
    assert d.push(J()) == []  # used up: retired
    assert d.quota_left("b") is None


def test_removing_a_worker_returns_its_untaken_pinned_jobs() -> None:
    d = make(("a", 1, None))
    d.push(J(name="busy"))
    p1, p2 = J(name="p1"), J(name="p2")
    d.pin("a", p1)
    d.pin("a", p2)
    assert names(d.remove_worker("a")) == ["p1", "p2"]
    assert len(d) == 0


def test_discard_and_drain_reach_pinned_jobs() -> None:
    d = make(("a", 1, None))
    d.push(J(name="busy"))
    p1, p2 = J(name="p1"), J(name="p2")
    d.pin("a", p1)
    d.pin("a", p2)
    assert d.discard(p1)
    assert not d.discard(p1)
    assert names(d.drain()) == ["p2"]
    assert len(d) == 0


def test_withdraw_series_takes_only_that_series_in_order() -> None:
    d: Dispatcher[str, J] = Dispatcher()
    jobs = [J(1, "io", "io1"), J(0, None, "n"), J(0, "io", "io0"), J(0, "cpu", "c")]
    for job in jobs:
        d.push(job)
    assert d.pending_series() == {"io", None, "cpu"}
    assert names(d.withdraw_series("io")) == ["io0", "io1"]
    assert names(d.pending()) == ["n", "c"]
    assert d.withdraw_series("io") == []
