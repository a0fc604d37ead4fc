"""BLAS threads inside Spark's Python tasks.

Spark runs one task per core, and each Python worker's NumPy would otherwise start a BLAS thread per
core of the machine: the fit's folds and the projection's products run under :func:`task_threads`,
which limits BLAS to the cores Spark gave the task.
"""
from __future__ import annotations

from contextlib import AbstractContextManager


def task_threads() -> AbstractContextManager[object]:
    """Limit BLAS threads to the task's cores (Spark runs one task per core; more threads oversubscribe)."""
    from pyspark import TaskContext
    from threadpoolctl import threadpool_limits

    ctx = TaskContext.get()
    cpus = ctx.cpus() if ctx is not None else 1
    return threadpool_limits(limits=max(1, int(cpus)), user_api="blas")
