"""The fit's distributed reduce: matched rows -> one accumulator per task -> one on the driver -> the model.

Each ``mapInArrow`` task reads its rows' features (:func:`~imgfeat.metadata.pca.shard_io.shard_groups`),
folds the finite rows into an accumulator of :mod:`imgfeat.metadata.pca.fit` (moments around one
common shift, or a covariance product), writes it to a file of its own in a scratch folder and
returns only the file's name; the driver adds the files up one at a time. :func:`fit_model` runs
the reduces a method needs (exact: one moments pass, then one ``eigh``; randomized: a diagonal pass,
then one product pass per subspace iteration) and hands their results to the math of ``fit``.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

import fsspec
import numpy as np
import pyarrow as pa

from imgfeat.metadata import storage
from imgfeat.metadata.config import Config
from imgfeat.metadata.contracts.feature_store import read_feature_head
from imgfeat.metadata.pca.fit import (
    CovProduct,
    Moments,
    PcaModel,
    dump_accumulator,
    fit_exact,
    fit_randomized,
    load_accumulator,
    merge_moments,
    merge_products,
)
from imgfeat.metadata.pca.shard_io import Markers, shard_groups, shard_order
from imgfeat.metadata.pca.threads import task_threads

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

WIDE_DIM = 8192
"""With ``method="auto"``, features wider than this use the randomized method."""

Acc = TypeVar("Acc", Moments, CovProduct)


def reduce_rows(df: DataFrame, folder: str, markers: Markers, make: Callable[[], Acc],
                finish: Callable[[Acc], Acc], merge: Callable[[Acc, Acc], Acc], scratch: str) -> Acc:
    """Fold every row's features into one accumulator per task; merge them one by one on the driver.

    ``df`` holds ``image_id, shard_idx, row`` sorted by (shard_idx, row) within its partitions;
    ``make`` builds an empty accumulator, ``finish`` readies a task's for shipping, ``merge`` adds one
    to another. Rows holding NaN or inf are left out. Each task writes its settled accumulator (a
    d x d float64 triangle for the exact method) to a file of its own under ``scratch`` (any fsspec
    URL the driver can read) and returns only the name: sending 17 MB blobs through Spark's rows
    costs several CPU seconds of Arrow and pickle copies per task, a file costs one write and one
    read. Only files named by successful task attempts are read; the driver holds one accumulator
    and one file at a time.
    """

    stems = shard_order(markers)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        acc = make()
        with task_threads():
            for _, x in shard_groups(batches, folder, stems, markers):
                finite = np.isfinite(x).all(axis=1)
                acc.add(x if finite.all() else x[finite])  # a NaN/inf row is left out, never fails the fit
        ctx = TaskContext.get()
        name = f"part-{ctx.partitionId() if ctx else 0:05d}-{ctx.attemptNumber() if ctx else 0}-{uuid.uuid4().hex[:8]}.npz"
        with fsspec.open(storage.join(scratch, name), "wb") as fh:
            fh.write(dump_accumulator(finish(acc)))
        yield pa.RecordBatch.from_arrays([pa.array([name], pa.string())], names=["file"])

    names = [r[0] for r in df.mapInArrow(run, "file string").collect()]
    total = finish(make())
    fs = fsspec.core.url_to_fs(scratch)[0]
    for name in names:
        path = fsspec.core.url_to_fs(storage.join(scratch, name))[1]
        with fs.open(path, "rb") as fh:
            total = merge(total, _load_like(fh.read(), total))
        fs.rm(path)
    return total


def _load_like(data: bytes, like: Acc) -> Acc:
    """The accumulator a task wrote (:func:`~imgfeat.metadata.pca.fit.load_accumulator`), of ``like``'s kind."""
    got = load_accumulator(data)
    if not isinstance(got, type(like)):
        raise RuntimeError(f"a fit task wrote a {type(got).__name__}, the reduce adds {type(like).__name__}s")
    return got


def common_shift(folder: str, markers: Markers, dim: int, rows: int = 1024) -> np.ndarray:
    """The mean of the first ``rows`` feature rows of the first non-empty shard (read by the driver: [rows, d] at most).

    Every fit task accumulates its sums around this one shift, so the driver merges them by plain
    addition. Any vector near the data's mean keeps the float64 sums free of cancellation.
    """
    for stem in sorted(markers):
        if int(markers[stem]["rows"]) > 0:
            head = np.asarray(read_feature_head(folder, stem, markers[stem], rows), dtype=np.float64)
            head = head[np.isfinite(head).all(axis=1)]  # the fit leaves NaN/inf rows out; so does the shift
            if head.shape[0]:
                return head.mean(axis=0)
    return np.zeros(dim)


def _unsettled(acc: Moments) -> Moments:
    """Moments ship as they are: plain sums around the common shift, settled once on the driver."""
    return acc


def fit_model(fit_rows: DataFrame, folder: str, markers: Markers, cfg: Config, dim: int, method: str,
              scratch: str) -> PcaModel:
    """Fit PCA on ``fit_rows`` (see :func:`reduce_rows`) with ``method`` (auto, exact or randomized) and ``cfg.pca``.

    ValueError when no row is left to fit on or the method is unknown.
    """
    pc = cfg.pca
    if method == "auto":
        method = "randomized" if dim > WIDE_DIM else "exact"
    if method == "exact":
        t = time.perf_counter()
        shift = common_shift(folder, markers, dim)
        mom = reduce_rows(fit_rows, folder, markers, lambda: Moments.with_shift(shift, full=True), _unsettled,
                          merge_moments, scratch).settle()
        if mom.n == 0:
            raise ValueError(f"pca.fit_split = {pc.fit_split!r}: no matched rows in that split")
        t_moments = time.perf_counter() - t
        t = time.perf_counter()
        model = fit_exact(mom, pc.k, pc.variance, pc.standardize)
        model.info.update(moments_s=round(t_moments, 3), eigh_s=round(time.perf_counter() - t, 3))
        return model
    if method != "randomized":
        raise ValueError(f"method must be auto, exact or randomized, got {method!r}")
    shift = common_shift(folder, markers, dim)
    diag = reduce_rows(fit_rows, folder, markers, lambda: Moments.with_shift(shift, full=False), _unsettled,
                       merge_moments, scratch).settle()
    if diag.n == 0:
        raise ValueError(f"pca.fit_split = {pc.fit_split!r}: no matched rows in that split")

    def product(mean: np.ndarray, scale: np.ndarray, q: np.ndarray) -> CovProduct:
        return reduce_rows(fit_rows, folder, markers, lambda: CovProduct(mean, scale, q), lambda a: a.light(),
                           merge_products, scratch)

    return fit_randomized(diag, product, pc.k, pc.variance, pc.standardize)
