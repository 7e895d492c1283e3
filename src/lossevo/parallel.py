"""Local parallelism: a spawn pool of worker processes with a fixed number of torch threads each.

For the tiny models of the embedded default, two 1-thread workers beat one 2-thread process
(benchmarks/bench_training.py measures it), so stages fan independent jobs out over workers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

#: Why this worker must not compute (its determinism check failed), raised by every job.
_worker_error: list[Exception] = []


def _init_worker(threads: int) -> None:
    """Set the worker's torch threads and check that it runs the parent's determinism settings.

    A spawned worker inherits the parent's environment, so the settings of
    :func:`lossevo.determinism.apply` reach torch before it loads here; the check makes a
    worker that somehow runs other kernels an error rather than other numbers. The error is
    raised by the worker's jobs, in the parent: a pool whose initializer raises respawns its
    workers forever.
    """
    import torch

    from lossevo import determinism

    torch.set_num_threads(threads)
    try:
        determinism.verify()
    except determinism.DeterminismError as exc:
        _worker_error.append(exc)


def _call(job: tuple) -> object:
    if _worker_error:
        raise _worker_error[0]
    func, args = job
    return func(*args)


class Runner:
    """Maps ``func(*args)`` over jobs, in this process or in a pool started once."""

    def __init__(self, pool=None):
        self.pool = pool

    def map(self, func: Callable, jobs: Iterable[tuple]) -> list:
        jobs = list(jobs)
        if self.pool is None or len(jobs) <= 1:
            return [func(*args) for args in jobs]
        return self.pool.map(_call, [(func, args) for args in jobs], chunksize=1)


@contextlib.contextmanager
def runner(workers: int, threads: int) -> Iterator[Runner]:
    """A :class:`Runner` over ``workers`` spawned processes (in-process when ``workers`` <= 1)."""
    if workers <= 1:
        yield Runner()
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(threads,)) as pool:
        yield Runner(pool)
