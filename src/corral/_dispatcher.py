"""Which job goes to which worker, and when. Pure decisions: no I/O, no event loop.

The rules (DESIGN.md):

- priority: a lower number runs sooner; equal priorities run first in, first out;
- series: a job of series ``s`` goes only to a worker serving ``s`` (or every series); a job
  of no series goes to any worker;
- strategy: a worker holds at most ``capacity`` jobs in flight: 1 is "fair" (a job goes only
  to an idle worker), more is "prefetch" (jobs wait in the worker's pipe, saving a round
  trip each); the caller may change a worker's capacity as each job ends ("auto");
- a job handed back by a dead worker before it started goes to the front of its priority;
- a job pinned to one worker (a broadcast) runs only there, before that worker's next
  queued job, and counts against no quota.

Every call that may free a slot or add a job returns the assignments it made, as
``(worker, job)`` pairs, for the caller to carry out.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Hashable
from typing import Any, Generic, Protocol, TypeVar


class Queueable(Protocol):
    """What the dispatcher reads of a job."""

    priority: float
    series: str | None


W = TypeVar("W", bound=Hashable)
J = TypeVar("J", bound=Queueable)

# A heap entry: [priority, sequence, job or None once withdrawn]. Entries are lists so a
# withdrawn job can be blanked in place (heapq has no delete).
_Entry = list[Any]


class Dispatcher(Generic[W, J]):
    """Holds pending jobs and the load of each worker; decides assignments."""

    def __init__(self) -> None:
        self._heaps: dict[str | None, list[_Entry]] = {}
        self._entries: dict[J, _Entry] = {}
        self._order = itertools.count()
        self._front = itertools.count(-1, -1)
        self._load: dict[W, int] = {}
        self._capacity: dict[W, int] = {}
        self._serves: dict[W, frozenset[str] | None] = {}
        self._free: dict[W, None] = {}  # workers below capacity, oldest first
        self._quota: dict[W, int] = {}  # jobs a worker may still be assigned, if capped
        self._pinned: dict[W, deque[J]] = {}  # jobs for one worker only, in order

    def __len__(self) -> int:
        """Jobs waiting for a worker."""
        if self._pinned:
            return len(self._entries) + sum(map(len, self._pinned.values()))
        return len(self._entries)

    def __contains__(self, job: J) -> bool:
        return job in self._entries or any(job in q for q in self._pinned.values())

    def quota_left(self, worker: W) -> int | None:
        """Jobs worker may still be assigned, or None when it has no cap."""
        return self._quota.get(worker)

    @property
    def workers(self) -> list[W]:
        """Every worker known, in the order added."""
        return list(self._load)

    def load(self, worker: W) -> int:
        """Jobs in flight on worker (0 for a worker not known)."""
        return self._load.get(worker, 0)

    @property
    def in_flight(self) -> int:
        """Jobs in flight on all workers."""
        return sum(self._load.values())

    def serves(self, series: str | None) -> bool:
        """Whether some worker may take jobs of series."""
        return any(_qualified(s, series) for s in self._serves.values())

    def pending(self) -> list[J]:
        """The waiting jobs, in the order they would run (pinned ones first)."""
        entries = sorted(e for heap in self._heaps.values() for e in heap if e[2] is not None)
        return [job for q in self._pinned.values() for job in q] + [e[2] for e in entries]

    def pending_series(self) -> set[str | None]:
        """The series of the jobs waiting in the shared queue."""
        return {e[2].series for heap in self._heaps.values() for e in heap if e[2] is not None}

    def add_worker(
        self,
        worker: W,
        capacity: int,
        series: frozenset[str] | None,
        quota: int | None = None,
    ) -> list[tuple[W, J]]:
        """A worker is ready; returns the jobs it should take at once.

        ``quota`` caps the jobs it is ever assigned (recycling); None means no cap.
        """
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        if quota is not None:
            self._quota[worker] = quota
        self._load[worker] = 0
        self._capacity[worker] = capacity
        self._serves[worker] = series
        self._free[worker] = None
        return self._fill(worker)

    def retire(self, worker: W) -> None:
        """Give worker no more jobs; it keeps those in flight (see ``load``)."""
        if worker in self._capacity:
            self._capacity[worker] = 0
            self._free.pop(worker, None)

    def remove_worker(self, worker: W) -> list[J]:
        """Forget worker; whatever it held is the caller's to requeue or fail. Returns the
        jobs pinned to it that it never took."""
        pinned = self._pinned.pop(worker, None)
        self._load.pop(worker, None)
        self._quota.pop(worker, None)
        self._capacity.pop(worker, None)
        self._serves.pop(worker, None)
        self._free.pop(worker, None)
        return list(pinned or ())

    def pin(self, worker: W, job: J) -> list[tuple[W, J]]:
        """Queue job for worker alone, ahead of the shared queue."""
        if worker not in self._load:
            raise KeyError(f"{worker!r} is not a known worker")
        self._pinned.setdefault(worker, deque()).append(job)
        return self._fill(worker)

    def push(self, job: J) -> list[tuple[W, J]]:
        """Queue a new job behind others of its priority."""
        if not self._entries and not self._pinned:  # fast path: a free worker takes it now
            for worker in self._free:
                if _qualified(self._serves[worker], job.series):
                    self._took(worker)
                    return [(worker, job)]
        self._insert(job, next(self._order))
        return self._place(job.series)

    def requeue(self, job: J) -> list[tuple[W, J]]:
        """Queue a job again, ahead of the others of its priority."""
        self._insert(job, next(self._front))
        return self._place(job.series)

    def finished(self, worker: W, capacity: int | None = None) -> list[tuple[W, J]]:
        """One job in flight on worker ended; returns what it should take next.

        ``capacity``, when given, is how many jobs worker may hold from now on (a retired
        worker stays retired)."""
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        if not self._load.get(worker):
            return []  # unknown, or nothing in flight: nothing was freed
        load = self._load[worker] = self._load[worker] - 1
        if capacity is not None and self._capacity[worker]:
            self._capacity[worker] = capacity
        if load >= self._capacity[worker]:
            self._free.pop(worker, None)  # retired, or its capacity shrank
            return []
        self._free[worker] = None
        return self._fill(worker)

    def discard(self, job: J) -> bool:
        """Withdraw a pending job; False when it was not pending."""
        entry = self._entries.pop(job, None)
        if entry is None:
            for worker, q in self._pinned.items():
                if job in q:
                    q.remove(job)
                    if not q:
                        del self._pinned[worker]
                    return True
            return False
        entry[2] = None
        return True

    def withdraw_series(self, series: str | None) -> list[J]:
        """Withdraw and return the pending jobs of series, in order."""
        heap = self._heaps.pop(series, [])
        jobs = [e[2] for e in sorted(heap) if e[2] is not None]
        for job in jobs:
            del self._entries[job]
        return jobs

    def drain(self) -> list[J]:
        """Withdraw and return every pending job, in order."""
        jobs = self.pending()
        self._heaps.clear()
        self._entries.clear()
        self._pinned.clear()
        return jobs

    # -- internals ------------------------------------------------------------------------

    def _insert(self, job: J, order: int) -> None:
        entry: _Entry = [job.priority, order, job]
        self._entries[job] = entry
        heapq.heappush(self._heaps.setdefault(job.series, []), entry)

    def _place(self, series: str | None) -> list[tuple[W, J]]:
        assignments: list[tuple[W, J]] = []
        for worker in list(self._free):
            if _qualified(self._serves[worker], series):
                assignments.extend(self._fill(worker))
                if not self._entries:
                    break
        return assignments

    def _took(self, worker: W, counted: bool = True) -> None:
        load = self._load[worker] = self._load[worker] + 1
        if self._quota and counted:
            left = self._quota.get(worker)
            if left is not None:
                self._quota[worker] = left - 1
                if left == 1:
                    self.retire(worker)  # its quota is used up
                    return
        if load >= self._capacity[worker]:
            del self._free[worker]

    def _fill(self, worker: W) -> list[tuple[W, J]]:
        assignments: list[tuple[W, J]] = []
        pinned = self._pinned.get(worker) if self._pinned else None
        while pinned and worker in self._free:
            self._took(worker, counted=False)
            assignments.append((worker, pinned.popleft()))
            if not pinned:
                del self._pinned[worker]
        while worker in self._free and self._entries:
            job = self._pop_for(self._serves[worker])
            if job is None:
                break
            self._took(worker)
            assignments.append((worker, job))
        return assignments

    def _pop_for(self, serves: frozenset[str] | None) -> J | None:
        best: list[_Entry] | None = None
        names = list(self._heaps) if serves is None else [None, *serves]
        for name in names:
            heap = self._heaps.get(name)
            if heap is None:
                continue
            while heap and heap[0][2] is None:
                heapq.heappop(heap)  # withdrawn
            if not heap:
                del self._heaps[name]  # series come and go; keep the scan short
            elif best is None or heap[0] < best[0]:
                best = heap
        if best is None:
            return None
        entry = heapq.heappop(best)
        job: J = entry[2]
        del self._entries[job]
        return job


def _qualified(serves: frozenset[str] | None, series: str | None) -> bool:
    return series is None or serves is None or series in serves
