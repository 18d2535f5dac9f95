"""``Roster``: the workers of one queue, one record each.

A worker's place in a queue is where it stands (starting, serving, retiring) and whether
the queue keeps it alive: *owned* workers are made by the queue's worker source and
replaced when lost; *attached* ones are the caller's. Everything that asks about the
queue's workers (``stats()``, the strategy's new slots, broadcasts, shutdown, the handling
of a loss) reads these records, and only the queue writes them. Pure bookkeeping: no I/O.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .workers._base import Worker


class Standing(enum.Enum):
    """Where a worker stands in its queue."""

    STARTING = "starting"  # attached; starting or replaying the broadcasts
    SERVING = "serving"  # takes jobs
    RETIRING = "retiring"  # takes no new job; stopped once it holds none


class WorkerRecord:
    """What the queue knows of one worker."""

    __slots__ = ("owned", "standing")

    def __init__(self, owned: bool) -> None:
        self.standing = Standing.STARTING
        self.owned = owned  # replaced when lost (made by the queue's source)


class Roster:
    """The records of a queue's workers, in the order they joined."""

    def __init__(self) -> None:
        self._records: dict[Worker, WorkerRecord] = {}
        self.retiring = 0  # how many stand RETIRING: the hot path asks only this

    def __contains__(self, worker: object) -> bool:
        return worker in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, worker: Worker) -> WorkerRecord | None:
        return self._records.get(worker)

    def join(self, worker: Worker, *, owned: bool) -> None:
        """worker begins starting."""
        if worker in self._records:
            raise ValueError(f"{worker!r} is already attached to this queue")
        self._records[worker] = WorkerRecord(owned)

    def serve(self, worker: Worker) -> None:
        """worker has started (and replayed the broadcasts): it takes jobs."""
        self._records[worker].standing = Standing.SERVING

    def retire(self, worker: Worker) -> bool:
        """worker takes no new job; the queue keeps it alive no longer (its replacement,
        if any, is a new record). Returns whether it was owned."""
        record = self._records[worker]
        if record.standing is not Standing.RETIRING:
            record.standing = Standing.RETIRING
            self.retiring += 1
        owned, record.owned = record.owned, False
        return owned

    def disown(self, worker: Worker) -> bool:
        """The queue stops keeping worker alive; returns whether it did."""
        record = self._records.get(worker)
        if record is None or not record.owned:
            return False
        record.owned = False
        return True

    def remove(self, worker: Worker) -> WorkerRecord | None:
        """worker leaves the queue; its last record, or None if it had left already."""
        record = self._records.pop(worker, None)
        if record is not None and record.standing is Standing.RETIRING:
            self.retiring -= 1
        return record

    def standing(self, worker: Worker) -> Standing | None:
        record = self._records.get(worker)
        return None if record is None else record.standing

    def all(self) -> list[Worker]:
        """Every worker of the queue, starting ones included."""
        return list(self._records)

    def started(self) -> list[Worker]:
        """The workers that have started: serving or retiring."""
        return [w for w, r in self._records.items() if r.standing is not Standing.STARTING]

    def starting(self) -> list[Worker]:
        return [w for w, r in self._records.items() if r.standing is Standing.STARTING]

    def kept(self, standing: Standing) -> list[Worker]:
        """The owned workers that stand so."""
        return [w for w, r in self._records.items() if r.owned and r.standing is standing]
