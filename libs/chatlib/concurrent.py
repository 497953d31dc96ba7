"""Independent I/O calls made at the same time.

Under the services' runner (gevent, monkey-patched) a thread is a greenlet:
two database round trips that do not depend on each other then cost the
time of the slower one, not their sum. Without gevent (unit tests, tools)
the same code runs on real threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def run_together(*calls: Callable[[], Any]) -> list[Any]:
    """Run ``calls`` concurrently; their results in order. If any raised, the first
    failure (in call order) is raised once every call has finished."""
    if len(calls) <= 1:
        return [call() for call in calls]
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException | None] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            errors[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(1, len(calls))]
    for t in threads:
        t.start()
    run(0)
    for t in threads:
        t.join()
    for exc in errors:
        if exc is not None:
            raise exc
    return results
