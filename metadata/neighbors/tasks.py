"""The neighbours job's Spark tasks (``mapInArrow`` bodies) and the Arrow <-> numpy vector column.

A vector travels through Spark as ``vec binary``: its float32 values, little-endian, ``4 d`` bytes.
A binary column costs one copy each way, where an ``array<float>`` costs a JVM object per value
(FACTS: about 0.2 ms of CPU per 2048-float row).

* :func:`shard_vectors_task`: ``(image_id, shard_idx, row)`` rows sorted by shard -> ``(image_id, vec)``,
  reading the shards with :func:`~imgfeat.metadata.pca.shard_io.shard_groups`;
* :func:`parquet_vectors_task`: file names of a pca ``reduced/`` dataset -> ``(image_id, vec)``;
* :func:`assign_task`: ``(image_id, vec)`` -> ``(image_id, vec, cell)``, the primary cell;
* :func:`expand_task`: one row per (vector, probed cell, block): the search's input;
* :func:`search_task`: rows sorted by (cell, block, base first) -> per-unit top-k candidates.

Vectors are L2-normalised when read; a row with NaN, inf or zero norm gets a null ``vec``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from imgfeat.metadata.neighbors import ivf
from imgfeat.metadata.pca.shard_io import Markers, shard_groups, shard_order
from imgfeat.metadata.pca.threads import task_threads
from imgfeat.metadata.spark.parquet import file_batches

if TYPE_CHECKING:
    from pyspark import Broadcast

log = logging.getLogger(__name__)

Task = Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]

VECTORS_DDL = "image_id string, vec binary"
ASSIGNED_DDL = "image_id string, vec binary, cell int"
EXPANDED_DDL = "cell int, block int, is_base boolean, image_id string, vec binary"
CANDIDATES_DDL = "image_id string, neighbor_id string, cosine float"

_VECTORS = pa.schema([("image_id", pa.string()), ("vec", pa.binary())])
_ASSIGNED = pa.schema([("image_id", pa.string()), ("vec", pa.binary()), ("cell", pa.int32())])
_EXPANDED = pa.schema([("cell", pa.int32()), ("block", pa.int32()), ("is_base", pa.bool_()),
                       ("image_id", pa.string()), ("vec", pa.binary())])
_CANDIDATES = pa.schema([("image_id", pa.string()), ("neighbor_id", pa.string()), ("cosine", pa.float32())])
OUT_ROWS = 65_536
"""Candidate rows per output batch of a search task."""


def vectors_to_binary(x: np.ndarray, ok: np.ndarray | None = None) -> pa.Array:
    """Rows of ``x`` [n, d] as a binary array of float32 bytes (null where ``ok`` is False)."""
    x = np.ascontiguousarray(x, dtype="<f4")
    n, d = x.shape
    offsets = pa.py_buffer(np.arange(0, (n + 1) * 4 * d, 4 * d, dtype=np.int32).tobytes())
    validity = None
    if ok is not None and not ok.all():
        validity = pa.array(ok).buffers()[1]
    return pa.Array.from_buffers(pa.binary(), n, [validity, offsets, pa.py_buffer(x.tobytes())],
                                 null_count=-1 if validity is not None else 0)


def binary_to_vectors(arr: pa.Array | pa.ChunkedArray, dim: int) -> np.ndarray:
    """A non-null binary column of ``4 dim``-byte float32 rows as a float32 matrix [n, dim] (copied, aligned)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    if n == 0:
        return np.zeros((0, dim), dtype=np.float32)
    if arr.null_count:
        raise ValueError("a null vector reached the search (it should have been filtered out)")
    off_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], dtype=off_type)[arr.offset:arr.offset + n + 1]
    if not np.all(np.diff(offsets) == 4 * dim):
        raise ValueError(f"vectors of different lengths in one column (expected {dim} float32 values each)")
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
    return data.copy().view("<f4").reshape(n, dim).astype(np.float32, copy=False)


def _column(batch: pa.RecordBatch, name: str) -> pa.Array:
    return batch.column(batch.schema.get_field_index(name))


def shard_vectors_task(folder: str, markers: Markers) -> Task:
    """Rows ``(image_id, shard_idx, row)`` sorted by (shard_idx, row) -> ``(image_id, vec)``: each shard read
    once (checked against its marker and the ids the ids pass read), rows normalised."""
    stems = shard_order(markers)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        with task_threads():
            for table, x in shard_groups(batches, folder, stems, markers):
                unit, ok = ivf.normalize_rows(x)
                ids = table.column("image_id").combine_chunks().cast(pa.string())
                yield pa.RecordBatch.from_arrays([ids, vectors_to_binary(unit, ok)], schema=_VECTORS)

    return run


def parquet_vectors_task(column: str, dim: int) -> Task:
    """File URLs of a Parquet dataset with ``image_id`` and a ``list<float>`` ``column`` -> ``(image_id, vec)``."""

    def run(names: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        with task_threads():
            for url, batch in file_batches(names, ["image_id", column]):
                lists = batch.column(1)
                n = batch.num_rows
                present = np.asarray(lists.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
                lengths = np.asarray(lists.value_lengths().fill_null(0).to_numpy(zero_copy_only=False))
                bad = present & (lengths != dim)
                if bad.any():
                    raise ValueError(f"{url}: {column} has {int(lengths[bad][0])} values in a row, "
                                     f"{dim} in the dataset's first row")
                x = np.zeros((n, dim), dtype=np.float32)
                if present.any():
                    flat = lists.filter(pa.array(present)).flatten().to_numpy(zero_copy_only=False)
                    x[present] = np.asarray(flat, dtype=np.float32).reshape(-1, dim)
                unit, ok = ivf.normalize_rows(x)
                ok &= present
                ids = batch.column(0).cast(pa.string())
                yield pa.RecordBatch.from_arrays([ids, vectors_to_binary(unit, ok)], schema=_VECTORS)

    return run


def assign_task(centroids: Broadcast[np.ndarray], dim: int) -> Task:
    """``(image_id, vec)`` -> ``(image_id, vec, cell)``: each vector's most similar centroid."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        c = centroids.value
        with task_threads():
            for batch in batches:
                if batch.num_rows == 0:
                    continue
                vec = _column(batch, "vec")
                cell = ivf.nearest_cells(binary_to_vectors(vec, dim), c, 1)[:, 0]
                yield pa.RecordBatch.from_arrays(
                    [_column(batch, "image_id").cast(pa.string()), vec.cast(pa.binary()), pa.array(cell, pa.int32())],
                    schema=_ASSIGNED)

    return run


def expand_task(centroids: Broadcast[np.ndarray], dim: int, base_counts: np.ndarray, blocks: np.ndarray,
                nprobe: int, need: int) -> Task:
    """``(image_id, vec, cell)`` -> the search's rows ``(cell, block, is_base, image_id, vec)``.

    Each vector is a *query* in every cell it probes (:func:`~.ivf.probe_cells`) and the *base* of its
    primary cell only. A cell split into ``blocks[c]`` blocks holds each base row in one block (by a hash
    of the id) and each query in all of them. A vector's row in its own (cell, block) carries
    ``is_base``; every other row of it is a query only.
    """

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        c = centroids.value
        with task_threads():
            for batch in batches:
                if batch.num_rows == 0:
                    continue
                vec = _column(batch, "vec").cast(pa.binary())
                ids = _column(batch, "image_id").cast(pa.string())
                primary = _column(batch, "cell").to_numpy(zero_copy_only=False)
                probes = ivf.probe_cells(binary_to_vectors(vec, dim), c, nprobe, base_counts, need)
                lengths = np.fromiter((len(p) for p in probes), dtype=np.int64, count=len(probes))
                probed = np.concatenate(probes).astype(np.int64)
                src = np.repeat(np.arange(len(probes)), lengths)
                own = np.zeros(len(primary), dtype=np.int64)  # the block of a vector's base row in its primary cell
                split = np.flatnonzero(blocks[primary] > 1)
                if split.size:
                    id_list = ids.to_pylist()
                    for i in split:
                        own[i] = ivf.block_of([id_list[i]], int(blocks[primary[i]]))[0]
                nb = blocks[probed]  # a query goes to every block of each cell it probes
                src = np.repeat(src, nb)
                cells = np.repeat(probed, nb)
                blk = np.arange(len(cells)) - np.repeat(np.cumsum(nb) - nb, nb)
                base = (cells == primary[src]) & (blk == own[src])
                take = pa.array(src)
                yield pa.RecordBatch.from_arrays(
                    [pa.array(cells, pa.int32()), pa.array(blk, pa.int32()), pa.array(base),
                     ids.take(take), vec.take(take)], schema=_EXPANDED)

    return run


class _Unit:
    """One (cell, block) of a search task: its base rows, then its query-only rows streamed against them."""

    def __init__(self, key: tuple[int, int], dim: int, k: int) -> None:
        self.key, self.dim, self.k = key, dim, k
        self.base_ids: list[pa.Array] = []
        self.base_vecs: list[pa.Array] = []
        self.ids: pa.Array | None = None
        self.x: np.ndarray | None = None
        self.rows = 0

    def add_base(self, ids: pa.Array, vecs: pa.Array) -> None:
        if self.x is not None:
            raise RuntimeError(f"cell {self.key}: a base row arrived after its queries (rows not sorted base first)")
        self.base_ids.append(ids)
        self.base_vecs.append(vecs)

    def close_base(self) -> Iterator[pa.RecordBatch]:
        """Fix the base rows and search them as queries (each leaves itself out)."""
        if self.x is not None:
            return
        self.ids = pa.concat_arrays(self.base_ids) if self.base_ids else pa.array([], pa.string())
        self.x = (np.concatenate([binary_to_vectors(v, self.dim) for v in self.base_vecs])
                  if self.base_vecs else np.zeros((0, self.dim), np.float32))
        self.base_ids, self.base_vecs = [], []
        self.rows = self.x.shape[0]
        yield from self._candidates(self.ids, self.x, np.arange(self.rows))

    def queries(self, ids: pa.Array, vecs: pa.Array) -> Iterator[pa.RecordBatch]:
        yield from self.close_base()
        yield from self._candidates(ids, binary_to_vectors(vecs, self.dim), None)

    def _candidates(self, qids: pa.Array, q: np.ndarray, self_pos: np.ndarray | None) -> Iterator[pa.RecordBatch]:
        assert self.x is not None and self.ids is not None
        if q.shape[0] == 0 or self.rows == 0:
            return
        step = max(1, OUT_ROWS // self.k)
        for start in range(0, q.shape[0], step):
            stop = min(q.shape[0], start + step)
            idx, sim = ivf.search(q[start:stop], self.x, self.k,
                                  None if self_pos is None else self_pos[start:stop])
            qi, j = np.nonzero(idx >= 0)
            if qi.size == 0:
                continue
            yield pa.RecordBatch.from_arrays(
                [qids.take(pa.array(qi + start)), self.ids.take(pa.array(idx[qi, j])), pa.array(sim[qi, j], pa.float32())],
                schema=_CANDIDATES)


def search_task(dim: int, k: int) -> Task:
    """Rows ``(cell, block, is_base, image_id, vec)`` sorted by (cell, block, is_base desc) -> candidates
    ``(image_id, neighbor_id, cosine)``: each query's top ``k`` among the base rows of each unit it is in.

    A task holds one unit's base rows at a time (at most about ``block_rows``, see :func:`~.ivf.blocks_for`)
    plus one input batch of queries and one product block of :func:`~.ivf.search`.
    """

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        unit: _Unit | None = None
        with task_threads():
            for batch in batches:
                if batch.num_rows == 0:
                    continue
                cell = _column(batch, "cell").to_numpy(zero_copy_only=False)
                blk = _column(batch, "block").to_numpy(zero_copy_only=False)
                is_base = np.asarray(_column(batch, "is_base").to_numpy(zero_copy_only=False), dtype=bool)
                ids = _column(batch, "image_id").cast(pa.string())
                vecs = _column(batch, "vec").cast(pa.binary())
                cuts = np.flatnonzero((np.diff(cell) != 0) | (np.diff(blk) != 0) | (np.diff(is_base.astype(np.int8)) != 0)) + 1
                for start, stop in zip([0, *cuts.tolist()], [*cuts.tolist(), batch.num_rows]):
                    key = (int(cell[start]), int(blk[start]))
                    if unit is None or unit.key != key:
                        if unit is not None:
                            yield from unit.close_base()
                        unit = _Unit(key, dim, k)
                    if is_base[start]:
                        unit.add_base(ids.slice(start, stop - start), vecs.slice(start, stop - start))
                    else:
                        yield from unit.queries(ids.slice(start, stop - start), vecs.slice(start, stop - start))
            if unit is not None:
                yield from unit.close_base()

    return run

