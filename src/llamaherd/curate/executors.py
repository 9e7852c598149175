"""Executors: run the pipeline's tasks (top-level functions over small picklable arguments, reading and writing files
in the run's directory) on a local process pool or on Ray.

Tasks are deterministic functions of their argument and the files they read, so the engine and the number of
workers change only the speed, never the output. Each worker process runs with one thread per native library
(OMP, MKL, OpenBLAS, Rayon), so N workers use N cores; workers never import torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from llamaherd.errors import InputError

THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "LLAMAHERD_SHARE_CORES": "0"}


class Executor(Protocol):
    """Runs `fn(item)` for every item on some workers; yields (index, result) as tasks finish."""

    workers: int

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]: ...

    def close(self) -> None: ...


def _init_worker() -> None:
    """Pool initializer: runs before a task imports anything native, so the thread settings take effect."""
    os.environ.update(THREAD_ENV)


class LocalExecutor:
    """A pool of `workers` fresh processes (spawned: they import only what the tasks need, never the parent's
    torch); workers=1 still uses one worker process, so both paths run the same code."""

    def __init__(self, workers: int = 1):
        check_engine("local", workers)
        self.workers = workers
        self._pool = None

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        if not items:
            return
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker)
        futures = {self._pool.submit(fn, item): i for i, item in enumerate(items)}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        finally:
            for future in futures:
                future.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


class RayExecutor:
    """Ray tasks of one CPU each. Without an address a local Ray instance of `workers` CPUs is started (and stopped
    on close); with one, the driver joins that cluster, whose nodes must see the inputs and the output directory at
    the same paths (a shared filesystem) and have llamaherd installed."""

    def __init__(self, workers: int = 1, address: str | None = None):
        check_engine("ray", workers, address)
        import ray

        self.workers = workers
        self._started = not ray.is_initialized()
        if self._started:
            runtime_env = {"env_vars": dict(THREAD_ENV)}
            if address is None:
                ray.init(num_cpus=workers, include_dashboard=False, runtime_env=runtime_env,
                         object_store_memory=200 * 2**20, log_to_driver=True)
            else:
                ray.init(address=address, runtime_env=runtime_env)
        self._ray = ray

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        ray = self._ray
        remote = ray.remote(num_cpus=1)(fn)  # a task lost with its node is retried: tasks are idempotent
        pending = {remote.remote(item): i for i, item in enumerate(items)}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    yield pending.pop(ref), ray.get(ref)
        finally:
            for ref in pending:
                ray.cancel(ref)

    def close(self) -> None:
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()


def check_engine(engine: str, workers: int, address: str | None = None) -> None:
    """The engine settings checked before anything is loaded or started: InputError for workers < 1, an unknown
    engine, an address without Ray, or Ray not installed."""
    if engine not in ("local", "ray"):
        raise InputError(f"--engine {engine!r}: choose local or ray")
    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    if engine == "local" and address is not None:
        raise InputError("--ray-address needs --engine ray")
    if engine == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise InputError("--engine ray needs Ray: pip install 'llamaherd[ray]'") from None


def make_executor(engine: str, workers: int, address: str | None = None) -> Executor:
    """The executor for `--engine local|ray`."""
    check_engine(engine, workers, address)
    return LocalExecutor(workers) if engine == "local" else RayExecutor(workers, address)
