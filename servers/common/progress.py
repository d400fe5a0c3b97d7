"""Progress reporting and cancellation for long-running library functions.

Library code takes an optional ``progress`` callable ``progress(done, total, message)``. It is
plain and synchronous, so the same function runs in a test, a CLI (tqdm/Rich) or an MCP tool
(where ``cytoagent.mcpkit`` forwards it as MCP progress notifications). Calling it also checks a
cancellation token: when the request was cancelled it raises ``Cancelled``, so loops stop at the
next step without any extra code.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, TypeVar

from servers.common.errors import Cancelled

T = TypeVar("T")


class ProgressFn(Protocol):
    def __call__(self, done: float, total: float | None = None, message: str | None = None) -> None: ...


class CancelToken:
    """A thread-safe flag set when the caller cancels."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("The request was cancelled.")


def noop_progress(done: float, total: float | None = None, message: str | None = None) -> None:
    return None


def make_progress(
    sink: Callable[[float, float | None, str | None], None] | None = None,
    token: CancelToken | None = None,
    min_interval_s: float = 0.1,
) -> ProgressFn:
    """A progress function that checks ``token`` and forwards (rate-limited) to ``sink``."""
    import time

    last = [0.0]

    def progress(done: float, total: float | None = None, message: str | None = None) -> None:
        if token is not None:
            token.check()
        if sink is None:
            return
        now = time.monotonic()
        final = total is not None and done >= total
        if final or now - last[0] >= min_interval_s:
            last[0] = now
            sink(done, total, message)

    return progress


def track(items: Iterable[T], progress: ProgressFn | None, total: int | None = None, message: str = "") -> Iterator[T]:
    """Iterate ``items`` reporting progress after each one."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    progress = progress or noop_progress
    progress(0, total, message or None)
    for i, item in enumerate(items, 1):
        yield item
        progress(i, total, message or None)
