"""Batch execution: a local process pool by default, a Dask cluster when configured.

Both expose the same small interface, so batch work (tiles of many slides, candidate
evaluations, optimisation rollouts) is written once::

    with get_executor() as ex:
        results = ex.map(fn, items, progress=progress)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import as_completed as _cf_as_completed
from typing import Any

from servers.common.config import Config, get_config
from servers.common.errors import ToolError
from servers.common.progress import ProgressFn


class Executor:
    """Interface shared by the local and Dask executors."""

    kind = "base"

    def submit(self, fn: Callable, *args, **kwargs) -> Any:  # returns a future
        raise NotImplementedError

    def map(self, fn: Callable, items: Iterable, *, progress: ProgressFn | None = None, message: str = "") -> list:
        """Apply ``fn`` to every item in parallel; results keep the input order."""
        items = list(items)
        futures = {self.submit(fn, it): i for i, it in enumerate(items)}
        results: list = [None] * len(items)
        done = 0
        if progress:
            progress(0, len(items), message or None)
        for fut in self.as_completed(list(futures)):
            results[futures[fut]] = fut.result()
            done += 1
            if progress:
                progress(done, len(items), message or None)
        return results

    def as_completed(self, futures: list) -> Iterable:
        """Yield futures from ``submit`` as they finish (to save each result as it arrives)."""
        return _cf_as_completed(futures)

    def close(self) -> None:
        pass

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalExecutor(Executor):
    """A ``ProcessPoolExecutor`` (``workers=1`` runs inline, which is easiest to debug)."""

    kind = "local"

    def __init__(self, workers: int = 2):
        self.workers = max(1, int(workers))
        self._pool: ProcessPoolExecutor | None = None

    def submit(self, fn: Callable, *args, **kwargs) -> Future:
        if self.workers == 1:
            fut: Future = Future()
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - delivered through the future
                fut.set_exception(e)
            return fut
        if self._pool is None:
            import multiprocessing as mp

            self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
        return self._pool.submit(fn, *args, **kwargs)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class DaskExecutor(Executor):
    """``dask.distributed.Client`` behind the same interface (``address=None`` starts a local cluster)."""

    kind = "dask"

    def __init__(self, address: str | None = None, workers: int = 2):
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError as e:  # pragma: no cover - depends on extras
            raise ToolError("The Dask executor needs dask.distributed.", hint="pip install 'cytoagent[dask]'.") from e
        if address:
            self._cluster = None
            self.client = Client(address)
        else:
            self._cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                         dashboard_address=None)
            self.client = Client(self._cluster)

    def submit(self, fn: Callable, *args, **kwargs):
        return self.client.submit(fn, *args, pure=False, **kwargs)

    def as_completed(self, futures: list) -> Iterable:
        from dask.distributed import as_completed as das_completed

        return das_completed(futures)

    def close(self) -> None:
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()


def get_executor(config: Config | None = None, *, workers: int | None = None) -> Executor:
    """The executor the config asks for (``local`` process pool or ``dask``)."""
    cfg = config or get_config()
    n = workers or cfg.workers
    if cfg.executor == "dask":
        return DaskExecutor(cfg.dask_address, n)
    return LocalExecutor(n)
