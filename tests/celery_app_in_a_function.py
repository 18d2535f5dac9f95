"""A Celery worker whose app is made inside a function, where no import reaches it:
``python -m tests.celery_app_in_a_function worker [options]``.

A worker's forkserver cannot import such an app, so ``corral.celery`` forks the children
from its pool's thread, with the app (tests/test_celery.py runs it). Broker and result
backend: the Redis server named by ``CORRAL_CELERY_REDIS``.
"""

from __future__ import annotations

import os
import signal
import sys

from celery import Celery


def main(argv: list[str]) -> None:
    redis = os.environ["CORRAL_CELERY_REDIS"]
    app = Celery("made-in-a-function", broker=redis, backend=redis)
    app.conf.update(task_track_started=True, broker_connection_retry_on_startup=True)
    parent_pid = os.getpid()

    @app.task(name="in_a_function.whoami")
    def whoami() -> dict[str, int]:
        """Where the task runs; the pid of the worker the app was made in."""
        return {"pid": os.getpid(), "app_made_in": parent_pid}

    @app.task(name="in_a_function.die")
    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    app.worker_main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
