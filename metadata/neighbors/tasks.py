"""The neighbours job's Spark tasks (``mapInArrow`` bodies) and the Arrow <-> numpy vector column.

A vector travels through Spark as ``vec binary``: its float32 values, little-endian, ``4 d`` bytes.
A binary column costs one copy each way, where an ``array<float>`` costs a JVM object per value
(FACTS: about 0.2 ms of CPU per 2048-float row). Inside the search a vector is named by ``vid``, a
64-bit number fixed by where it was read (shard and row, or file and row), not by its 32-character
``image_id``: the candidates' shuffle and the merge's sort move and compare two longs instead of two
strings, and the ids are joined back only to the k best.

* :func:`shard_vectors_task`: ``(image_id, shard_idx, row)`` rows sorted by shard -> ``(vid, image_id, vec)``,
  reading the shards with :func:`~imgfeat.metadata.pca.shard_io.shard_groups`;
* :func:`parquet_vectors_task`: ``(file_idx, file)`` of a pca ``reduced/`` dataset -> ``(vid, image_id, vec)``;
* :func:`assign_task`: ``(vid, image_id, vec)`` -> ``(vid, image_id, vec, cell)``, the primary cell;
* :func:`expand_task`: one row per (vector, probed cell, block): the search's input;
* :func:`search_task`: rows sorted by (cell, block, base first) -> per-unit top-k candidates ``(qvid, nvid, cosine)``.

Vectors are L2-normalised when read; a row with NaN, inf or zero norm gets a null ``vec``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imgfeat.metadata.neighbors import ivf
from imgfeat.metadata.pca.shard_io import Markers, shard_groups, shard_order
from imgfeat.metadata.pca.threads import task_threads

if TYPE_CHECKING:
    from pyspark import Broadcast

log = logging.getLogger(__name__)

Task = Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]

VECTORS_DDL = "vid long, image_id string, vec binary"
ASSIGNED_DDL = "vid long, image_id string, vec binary, cell int"
EXPANDED_DDL = "cell int, block int, is_base boolean, vid long, vec binary"
CANDIDATES_DDL = "qvid long, nvid long, cosine float"

_VECTORS = pa.schema([("vid", pa.int64()), ("image_id", pa.string()), ("vec", pa.binary())])
_ASSIGNED = pa.schema([("vid", pa.int64()), ("image_id", pa.string()), ("vec", pa.binary()), ("cell", pa.int32())])
_EXPANDED = pa.schema([("cell", pa.int32()), ("block", pa.int32()), ("is_base", pa.bool_()),
                       ("vid", pa.int64()), ("vec", pa.binary())])
_CANDIDATES = pa.schema([("qvid", pa.int64()), ("nvid", pa.int64()), ("cosine", pa.float32())])
OUT_ROWS = 65_536
"""Candidate rows per output batch of a search task."""
ROW_BITS = 32
"""vid = source index (shard or file) << ROW_BITS | row within it."""


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
    """Rows ``(image_id, shard_idx, row)`` sorted by (shard_idx, row) -> ``(vid, image_id, vec)``: each shard read
    once (checked against its marker and the ids the ids pass read), rows normalised."""
    stems = shard_order(markers)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        with task_threads():
            for table, x in shard_groups(batches, folder, stems, markers):
                unit, ok = ivf.normalize_rows(x)
                vid = ((table.column("shard_idx").to_numpy().astype(np.int64) << ROW_BITS)
                       | table.column("row").to_numpy().astype(np.int64))
                ids = table.column("image_id").combine_chunks().cast(pa.string())
                yield pa.RecordBatch.from_arrays([pa.array(vid), ids, vectors_to_binary(unit, ok)], schema=_VECTORS)

    return run


def parquet_vectors_task(column: str, dim: int) -> Task:
    """Rows ``(file_idx, file)`` naming files of a Parquet dataset with ``image_id`` and a ``list<float>``
    ``column`` -> ``(vid, image_id, vec)``."""

    def run(names: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        with task_threads():
            for names_batch in names:
                for idx, url in zip(names_batch.column(0).to_pylist(), names_batch.column(1).to_pylist()):
                    yield from read(int(idx), url)

    def read(file_idx: int, url: str) -> Iterator[pa.RecordBatch]:
        fs, path = fsspec.core.url_to_fs(url)
        first = 0
        with fs.open(path, "rb") as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=8192, columns=["image_id", column]):
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
                vid = (np.int64(file_idx) << ROW_BITS) | np.arange(first, first + n, dtype=np.int64)
                first += n
                yield pa.RecordBatch.from_arrays([pa.array(vid), batch.column(0).cast(pa.string()),
                                                  vectors_to_binary(unit, ok)], schema=_VECTORS)

    return run


def assign_task(centroids: Broadcast[np.ndarray], dim: int) -> Task:
    """``(vid, image_id, vec)`` -> ``(vid, image_id, vec, cell)``: each vector's most similar centroid."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        c = centroids.value
        with task_threads():
            for batch in batches:
                if batch.num_rows == 0:
                    continue
                vec = _column(batch, "vec").cast(pa.binary())
                cell = ivf.nearest_cells(binary_to_vectors(vec, dim), c, 1)[:, 0]
                yield pa.RecordBatch.from_arrays(
                    [_column(batch, "vid"), _column(batch, "image_id").cast(pa.string()), vec, pa.array(cell, pa.int32())],
                    schema=_ASSIGNED)

    return run


def expand_task(centroids: Broadcast[np.ndarray], dim: int, base_counts: np.ndarray, blocks: np.ndarray,
                nprobe: int, need: int) -> Task:
    """``(vid, vec, cell)`` -> the search's rows ``(cell, block, is_base, vid, vec)``.

    Each vector is a *query* in every cell it probes (:func:`~.ivf.probe_cells`) and the *base* of its
    primary cell only. A cell split into ``blocks[c]`` blocks holds each base row in one block (by a hash
    of the vid) and each query in all of them. A vector's row in its own (cell, block) carries
    ``is_base``; every other row of it is a query only.
    """

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        c = centroids.value
        with task_threads():
            for batch in batches:
                if batch.num_rows == 0:
                    continue
                vec = _column(batch, "vec").cast(pa.binary())
                vid = _column(batch, "vid").to_numpy(zero_copy_only=False).astype(np.int64)
                primary = _column(batch, "cell").to_numpy(zero_copy_only=False).astype(np.int64)
                probes = ivf.probe_cells(binary_to_vectors(vec, dim), c, nprobe, base_counts, need)
                lengths = np.fromiter((len(p) for p in probes), dtype=np.int64, count=len(probes))
                probed = np.concatenate(probes).astype(np.int64)
                src = np.repeat(np.arange(len(probes)), lengths)
                own = ivf.block_of(vid, blocks[primary])  # the block of a vector's base row in its primary cell
                nb = blocks[probed]  # a query goes to every block of each cell it probes
                src = np.repeat(src, nb)
                cells = np.repeat(probed, nb)
                blk = np.arange(len(cells)) - np.repeat(np.cumsum(nb) - nb, nb)
                base = (cells == primary[src]) & (blk == own[src])
                yield pa.RecordBatch.from_arrays(
                    [pa.array(cells, pa.int32()), pa.array(blk, pa.int32()), pa.array(base),
                     pa.array(vid[src]), vec.take(pa.array(src))], schema=_EXPANDED)

    return run


class _Unit:
    """One (cell, block) of a search task: its base rows, then its query-only rows streamed against them."""

    def __init__(self, key: tuple[int, int], dim: int, k: int) -> None:
        self.key, self.dim, self.k = key, dim, k
        self.base_vids: list[np.ndarray] = []
        self.base_vecs: list[pa.Array] = []
        self.vids: np.ndarray | None = None
        self.x: np.ndarray | None = None

    def add_base(self, vids: np.ndarray, vecs: pa.Array) -> None:
        if self.x is not None:
            raise RuntimeError(f"cell {self.key}: a base row arrived after its queries (rows not sorted base first)")
        self.base_vids.append(vids)
        self.base_vecs.append(vecs)

    def close_base(self) -> Iterator[pa.RecordBatch]:
        """Fix the base rows and search them as queries (each leaves itself out)."""
        if self.x is not None:
            return
        self.vids = np.concatenate(self.base_vids) if self.base_vids else np.zeros(0, np.int64)
        self.x = (np.concatenate([binary_to_vectors(v, self.dim) for v in self.base_vecs])
                  if self.base_vecs else np.zeros((0, self.dim), np.float32))
        self.base_vids, self.base_vecs = [], []
        yield from self._candidates(self.vids, self.x, np.arange(self.x.shape[0]))

    def queries(self, vids: np.ndarray, vecs: pa.Array) -> Iterator[pa.RecordBatch]:
        yield from self.close_base()
        yield from self._candidates(vids, binary_to_vectors(vecs, self.dim), None)

    def _candidates(self, qvids: np.ndarray, q: np.ndarray, self_pos: np.ndarray | None) -> Iterator[pa.RecordBatch]:
        assert self.x is not None and self.vids is not None
        if q.shape[0] == 0 or self.x.shape[0] == 0:
            return
        step = max(1, OUT_ROWS // self.k)
        for start in range(0, q.shape[0], step):
            stop = min(q.shape[0], start + step)
            idx, sim = ivf.search(q[start:stop], self.x, self.k,
                                  None if self_pos is None else self_pos[start:stop])
            qi, j = np.nonzero(idx >= 0)
            if qi.size:
                yield pa.RecordBatch.from_arrays(
                    [pa.array(qvids[qi + start]), pa.array(self.vids[idx[qi, j]]), pa.array(sim[qi, j], pa.float32())],
                    schema=_CANDIDATES)


def search_task(dim: int, k: int) -> Task:
    """Rows ``(cell, block, is_base, vid, vec)`` sorted by (cell, block, is_base desc) -> candidates
    ``(qvid, nvid, cosine)``: each query's top ``k`` among the base rows of each unit it is in.

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
                vids = _column(batch, "vid").to_numpy(zero_copy_only=False).astype(np.int64)
                vecs = _column(batch, "vec").cast(pa.binary())
                cuts = np.flatnonzero((np.diff(cell) != 0) | (np.diff(blk) != 0) | (np.diff(is_base.astype(np.int8)) != 0)) + 1
                for start, stop in zip([0, *cuts.tolist()], [*cuts.tolist(), batch.num_rows]):
                    key = (int(cell[start]), int(blk[start]))
                    if unit is None or unit.key != key:
                        if unit is not None:
                            yield from unit.close_base()
                        unit = _Unit(key, dim, k)
                    if is_base[start]:
                        unit.add_base(vids[start:stop], vecs.slice(start, stop - start))
                    else:
                        yield from unit.queries(vids[start:stop], vecs.slice(start, stop - start))
            if unit is not None:
                yield from unit.close_base()

    return run
