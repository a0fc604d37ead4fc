"""IVF (inverted file) nearest-neighbour search by cosine, in numpy: no Spark here.

The pieces the Spark job (:mod:`.job`) puts together, each testable on its own:

* :func:`normalize_rows`: L2-normalise feature rows (cosine becomes a dot product); a row with NaN, inf
  or zero norm is flagged, never normalised;
* :func:`kmeans`: a spherical k-means codebook (k-means++ start, Lloyd iterations, seeded, so the same
  sample and seed give the same centroids) fitted on a bounded sample;
* :func:`nearest_cells` / :func:`probe_cells`: a vector's primary cell and the cells a query probes
  (its ``nprobe`` nearest, more when those hold too few vectors to fill ``k`` neighbours);
* :func:`blocks_for` / :func:`block_of`: a cell holding more base vectors than ``block_rows`` is split
  into blocks by a hash of the vector's number, so no search task ever holds more than about ``block_rows`` base rows;
* :func:`search`: exact top-k by cosine of queries against base rows, in blocks of
  ``Q_BLOCK x B_BLOCK`` products (bounded memory whatever the sizes), a query's own row left out;
* :func:`recall_at_k`: the measure the tests and the benchmark use.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)

NPROBE = 8
"""Default cells a query probes (recall@10 >= 0.95 at about sqrt(n) cells on clustered data: bench/RESULTS-neighbors.md)."""
SAMPLE_ROWS = 20_000
"""Default bound on the rows collected to the driver to fit the codebook (with ``MAX_SAMPLE_BYTES``)."""
MAX_SAMPLE_BYTES = 256 << 20
"""The codebook sample never exceeds this many bytes of float32 on the driver (rows = bytes / (4 d))."""
MAX_CELLS = 4096
"""Upper bound on the number of cells (k-means centroids)."""
MIN_SAMPLE_PER_CELL = 10
"""Each cell gets at least this many sample rows on average: cells <= sample rows / 10."""
BLOCK_BYTES = 128 << 20
"""Default bound on one search block's base vectors (float32): block_rows = BLOCK_BYTES / (4 d)."""
MAX_BLOCK_ROWS = 65_536
"""Default block_rows never exceeds this (the products per block grow with it)."""
SPLIT_SLACK = 0.8
"""A split cell's blocks aim at ``SPLIT_SLACK * block_rows`` rows, so the hash split's spread stays under the bound."""
Q_BLOCK = 1024
"""Queries per product block in :func:`search`."""
B_BLOCK = 8192
"""Base rows per product block in :func:`search` (a product block is Q_BLOCK x B_BLOCK float32: 32 MiB)."""


def normalize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows scaled to unit L2 norm as float32, mask of the usable rows); unusable rows (NaN, inf, zero) are left zero."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"feature rows must be a 2-d array, got shape {x.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    ok = np.isfinite(norms) & (norms > 0)
    out = np.zeros_like(x)
    out[ok] = x[ok] / norms[ok, None].astype(np.float32)
    return out, ok


def default_cells(n: int, sample_rows: int) -> int:
    """Cells for ``n`` vectors: about sqrt(n), at most :data:`MAX_CELLS` and ``sample_rows / MIN_SAMPLE_PER_CELL``."""
    c = int(round(math.sqrt(max(n, 1))))
    return max(1, min(c, MAX_CELLS, max(1, sample_rows // MIN_SAMPLE_PER_CELL), n))


def default_block_rows(dim: int) -> int:
    """Base rows per search block for dimension ``dim``: :data:`BLOCK_BYTES` of float32, at most :data:`MAX_BLOCK_ROWS`."""
    return max(1, min(MAX_BLOCK_ROWS, BLOCK_BYTES // (4 * max(dim, 1))))


def sample_bound(dim: int, sample_rows: int) -> int:
    """The codebook sample's row bound: ``sample_rows``, and never more than :data:`MAX_SAMPLE_BYTES` of float32."""
    return max(1, min(sample_rows, MAX_SAMPLE_BYTES // (4 * max(dim, 1))))


def _best(x: np.ndarray, centroids: np.ndarray, rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(index, similarity) of each row's most similar centroid, in row blocks (bounded memory)."""
    idx = np.empty(x.shape[0], dtype=np.int64)
    sim = np.empty(x.shape[0], dtype=np.float32)
    for start in range(0, x.shape[0], rows):
        s = x[start:start + rows] @ centroids.T
        idx[start:start + rows] = np.argmax(s, axis=1)
        sim[start:start + rows] = s[np.arange(s.shape[0]), idx[start:start + rows]]
    return idx, sim


def kmeans(x: np.ndarray, cells: int, iters: int = 20, seed: int = 0) -> np.ndarray:
    """Spherical k-means of unit rows ``x`` [s, d] into ``cells`` unit centroids [cells, d] (float32).

    k-means++ seeding on the cosine distance, then Lloyd iterations (assign by largest dot product,
    centroid = normalised mean) until no assignment changes or ``iters`` rounds. An empty cell is
    re-seeded with the row farthest from its centroid. Deterministic for a given ``x`` and ``seed``.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    s, d = x.shape
    if s == 0:
        raise ValueError("kmeans: no sample rows")
    cells = max(1, min(int(cells), s))
    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(s))]
    dist = np.maximum(1.0 - x @ x[chosen[0]], 0.0).astype(np.float64)
    for _ in range(1, cells):
        total = dist.sum()
        nxt = int(rng.choice(s, p=dist / total)) if total > 0 else int(rng.integers(s))
        chosen.append(nxt)
        dist = np.minimum(dist, np.maximum(1.0 - x @ x[nxt], 0.0))
    centroids = x[chosen].copy()
    assign = np.full(s, -1, dtype=np.int64)
    for _ in range(max(1, iters)):
        new, sim = _best(x, centroids)
        if np.array_equal(new, assign):
            break
        assign = new
        order = np.argsort(assign, kind="stable")
        counts = np.bincount(assign, minlength=cells)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        sums = np.zeros((cells, d), dtype=np.float64)
        nonempty = counts > 0
        sums[nonempty] = np.add.reduceat(x[order].astype(np.float64), starts[nonempty], axis=0)
        empty = np.flatnonzero(~nonempty)
        if empty.size:  # re-seed empty cells with the rows farthest from their centroids
            far = np.argsort(sim, kind="stable")[:empty.size]
            sums[empty[:far.size]] = x[far]
        norms = np.linalg.norm(sums, axis=1)
        norms[norms == 0] = 1.0
        centroids = (sums / norms[:, None]).astype(np.float32)
    return centroids


def nearest_cells(x: np.ndarray, centroids: np.ndarray, m: int) -> np.ndarray:
    """The ``m`` most similar centroids of each row, most similar first: [n, m] int32."""
    m = max(1, min(int(m), centroids.shape[0]))
    s = x @ centroids.T
    if m < s.shape[1]:
        top = np.argpartition(-s, m - 1, axis=1)[:, :m]
    else:
        top = np.broadcast_to(np.arange(s.shape[1]), s.shape).copy()
    order = np.argsort(-np.take_along_axis(s, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1).astype(np.int32)


def probe_cells(x: np.ndarray, centroids: np.ndarray, nprobe: int, base_counts: np.ndarray,
                need: int) -> list[np.ndarray]:
    """For each row, the cells it probes, most similar first: its ``nprobe`` nearest, extended in order of
    similarity while they hold fewer than ``need`` base vectors in all (``base_counts[c]``: the vectors
    whose primary cell is ``c``). So a query finds ``need - 1`` neighbours besides itself whenever the
    data holds that many."""
    top = nearest_cells(x, centroids, nprobe)
    covered = base_counts[top].sum(axis=1)
    probes = list(top)
    short = np.flatnonzero(covered < need)
    if short.size and top.shape[1] < centroids.shape[0]:
        full = nearest_cells(x[short], centroids, centroids.shape[0])
        cum = np.cumsum(base_counts[full], axis=1)
        for j, i in enumerate(short):
            reach = int(np.searchsorted(cum[j], need)) + 1  # first prefix holding `need` vectors
            probes[i] = full[j, :max(top.shape[1], min(reach, full.shape[1]))]
    return probes


def blocks_for(base_rows: int, block_rows: int) -> int:
    """Blocks a cell of ``base_rows`` base vectors is split into: 1 up to ``block_rows``, else enough for
    blocks of about ``SPLIT_SLACK * block_rows`` rows (the hash split is not exact)."""
    if base_rows <= block_rows:
        return 1
    return int(math.ceil(base_rows / max(1.0, SPLIT_SLACK * block_rows)))


def block_of(vids: np.ndarray, blocks: np.ndarray | int) -> np.ndarray:
    """The block of each vector (by its 64-bit ``vid``) within a cell split into ``blocks`` (per row or one
    number): a SplitMix64 hash of the vid modulo the blocks, the same on every run and machine."""
    with np.errstate(over="ignore"):
        z = np.asarray(vids, dtype=np.int64).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    n = np.maximum(np.broadcast_to(np.asarray(blocks, dtype=np.int64), z.shape), 1).astype(np.uint64)
    return (z % n).astype(np.int64)


def search(queries: np.ndarray, base: np.ndarray, k: int, self_pos: np.ndarray | None = None,
           q_block: int = Q_BLOCK, b_block: int = B_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of unit ``queries`` [nq, d] among unit ``base`` [nb, d] by dot product (cosine).

    ``self_pos[i]``: the base row that *is* query i (left out), or -1. Returns (indices [nq, k] int64 into
    ``base``, -1 where fewer than k exist; cosines [nq, k] float32), best first, ties by lower index.
    Memory: one ``q_block x b_block`` product and the running top-k, whatever ``nq`` and ``nb``.
    """
    nq, nb = queries.shape[0], base.shape[0]
    out_i = np.full((nq, k), -1, dtype=np.int64)
    out_s = np.full((nq, k), -np.inf, dtype=np.float32)
    if nq == 0 or nb == 0 or k <= 0:
        return out_i, out_s
    for qs in range(0, nq, q_block):
        q = queries[qs:qs + q_block]
        rows = np.arange(q.shape[0])
        best_s = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
        best_i = np.full((q.shape[0], k), -1, dtype=np.int64)
        own = self_pos[qs:qs + q_block] if self_pos is not None else None
        for bs in range(0, nb, b_block):
            s = q @ base[bs:bs + b_block].T
            if own is not None:
                hit = (own >= bs) & (own < bs + s.shape[1])
                s[rows[hit], own[hit] - bs] = -np.inf
            kk = min(k, s.shape[1])
            part = np.argpartition(-s, kk - 1, axis=1)[:, :kk] if kk < s.shape[1] else np.broadcast_to(
                np.arange(s.shape[1]), s.shape)
            cand_s = np.concatenate([best_s, np.take_along_axis(s, part, axis=1)], axis=1)
            cand_i = np.concatenate([best_i, part + bs], axis=1)
            keep = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
            best_s = np.take_along_axis(cand_s, keep, axis=1)
            best_i = np.take_along_axis(cand_i, keep, axis=1)
        # best first; equal cosines by lower index (so the result does not depend on the block sizes)
        order = np.lexsort((np.where(best_i < 0, np.iinfo(np.int64).max, best_i), -best_s), axis=1)
        best_s = np.take_along_axis(best_s, order, axis=1)
        best_i = np.take_along_axis(best_i, order, axis=1)
        best_i[~np.isfinite(best_s)] = -1
        out_i[qs:qs + q.shape[0]] = best_i
        out_s[qs:qs + q.shape[0]] = best_s
    return out_i, out_s


def brute_force(x: np.ndarray, k: int, queries: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by cosine of unit rows ``x`` (or of the rows ``queries`` of ``x``), self excluded."""
    q = np.arange(x.shape[0]) if queries is None else np.asarray(queries, dtype=np.int64)
    return search(x[q], x, k, self_pos=q)


def recall_at_k(found: Sequence[Sequence[object]], exact: Sequence[Sequence[object]]) -> float:
    """The share of the exact neighbours (None or negative: none) that were found, over all queries."""
    hits, total = 0, 0
    for f, e in zip(found, exact):
        e_set = {v for v in e if v is not None and not (isinstance(v, (int, np.integer)) and v < 0)}
        if e_set:
            hits += len(e_set & set(f))
            total += len(e_set)
    return hits / total if total else 1.0
