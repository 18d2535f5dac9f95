"""``ClusterLink``: a pool's one connection to a dask.distributed cluster.

``Pool(cluster=...)`` serves its calls with ``DaskWorker``s that share one asynchronous
``distributed.Client``: one connection to the scheduler, however many workers. This link
holds that client. Given a scheduler address, it connects when the pool starts and closes
the client when the pool has stopped its workers; a client given is the caller's, checked
and shared, never closed here. On connecting it counts the cluster's threads, which is
how many DaskWorkers a pool of unspecified size keeps: under ``strategy="fair"`` each
holds one task on the cluster, so every thread is busy and corral orders every job.

A scheduler that cannot be reached, or a client on another event loop, is reported as
``WorkerStartupError`` (the low-level error as its ``__cause__``), once, here; the pool
then fails the calls waiting for it instead of retrying.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ._errors import WorkerStartupError
from .workers import DaskWorker
from .workers._dask import check_target, open_client
from .workers._dask_remote import distributed_module


class ClusterLink:
    """The client a pool's DaskWorkers share; see the module docstring.

    Args:
        target: a ``distributed.Client`` made with ``asynchronous=True`` on the pool's
            event loop, or a scheduler address (``"tcp://host:8786"``).

    Raises ``ImportError`` (with the command that installs Dask) when Dask is missing,
    ``TypeError`` when target is neither a client nor an address, and ``ValueError`` for a
    client that is not asynchronous here (a synchronous one, or one of another loop).
    """

    def __init__(self, target: Any) -> None:
        check_target(target)  # Dask installed (else ImportError); an address, or a client
        # that is asynchronous (else ValueError)
        self.target = target
        self.owned = isinstance(target, str)
        self._client: Any = None  # set once connecting begins (an address) or succeeded

    def __repr__(self) -> str:
        return f"<corral ClusterLink {self.address}>"

    @property
    def address(self) -> str:
        """The scheduler's address, as given or as the client knows it."""
        if self.owned:
            return str(self.target)
        return str(getattr(self.target.scheduler, "address", None) or self.target)

    async def connect(self, timeout: float) -> int:
        """Connect (or check the client given) and return the cluster's threads (at least 1).

        Raises ``WorkerStartupError`` when the scheduler cannot be reached, or has no
        worker, within timeout seconds, or when the client given is closed or belongs to
        another event loop."""
        try:
            if self.owned:
                distributed = distributed_module()  # installed: __init__ checked
                # Made before it is awaited, so that close() can close what a failed or
                # cancelled connection left open.
                self._client = distributed.Client(
                    self.target, asynchronous=True, timeout=timeout, set_as_default=False
                )
                await self._client
            else:
                await open_client(self.target)  # of this loop, open: else WorkerStartupError
                self._client = self.target
            threads = await asyncio.wait_for(self._threads(), timeout)
        except WorkerStartupError:
            raise
        except TimeoutError as exc:
            raise WorkerStartupError(
                1,
                f"the Dask scheduler at {self.address} did not answer, or had no worker, "
                f"within {timeout} s",
            ) from exc
        except Exception as exc:  # OSError, a client closed meanwhile: one boundary
            raise WorkerStartupError(
                1, f"could not connect to the Dask scheduler at {self.address}: {exc}"
            ) from exc
        return threads

    async def _threads(self) -> int:
        """The cluster's threads; a cluster whose workers have not joined yet (just
        launched, or adaptive) is waited for until its first one has."""
        nthreads: dict[str, int] = await self._client.nthreads()
        if not nthreads:
            await self._client.wait_for_workers(1)
            nthreads = await self._client.nthreads()
        return max(1, sum(nthreads.values()))

    def new_worker(self) -> DaskWorker:
        """A DaskWorker on the shared client (``connect`` has succeeded)."""
        assert self._client is not None, "the cluster is not connected"
        return DaskWorker(self._client)

    async def close(self) -> None:
        """Close the client this link made (none given is closed). Idempotent."""
        client, self._client = self._client, None
        if self.owned and client is not None:
            await client.close()
