"""Near-duplicate groups of ok images by perceptual hash, with Spark's distributed operations.

Each ok row may carry ``phash``: a 64-bit perceptual hash held as a Spark ``long`` (int64), the two's
complement of the 64 bits, so hashes with the top bit set are negative. Bit ``k`` of the hash is bit ``k``
of that int64 (bit 63 is the sign bit); a null ``phash`` means "not computed" and such a row is never in
a group, nor is a row whose hash has fewer than ``MIN_HASH_BITS`` bits set (``searchable``: an image with
too little 2-D structure for a perceptual hash: flat, a gradient, a tiny image). Two rows are
near-duplicates when their hashes differ in at most ``distance`` bits (Hamming distance); a group is a
connected component of that pair graph (so two members of one group may be further apart than
``distance``, linked through others). Rows with equal hashes are one group at any
distance. ``image_id`` is taken to be unique per row (the manifest's id).

The steps and what each costs as the data grows (``N`` rows with a hash, ``U`` distinct hashes, ``B`` =
``distance + 1`` bands of ``w`` ≈ ``64 / B`` bits, ``P`` candidate pairs, ``E`` near edges):

1. equal hashes (``_hash_table``): ``groupBy(phash)`` with ``min`` aggregates, one shuffle of ``N`` rows
   with partial aggregation (a hash shared by a million blank images costs one partial row per task,
   not a million rows in one task). The table has one row per distinct hash: ``U`` rows. Equal hashes are
   joined as a *star* to their smallest ``image_id`` (``n - 1`` edges for ``n`` rows), never as all
   ``n²`` pairs, and only the ``U`` distinct hashes go on to the pair search.
2. band keys (``band_keys``, multi-index hashing): ``B·U`` rows, made by Spark SQL expressions
   (``shiftrightunsigned``, bitwise and, ``inline``), no Python in the tasks.
3. candidate pairs: a self-join of the band keys on ``(band, value)``, one shuffle of ``B·U`` rows; its
   output is ``P = Σ_buckets C(n_b, 2)``, for uniform hashes about ``B·U²/2^(w+1)``. That term decides
   the feasible distance at scale: at ``U = 10^8`` it is about ``2·10^6`` at distance 1 (32-bit bands),
   ``6·10^9`` at distance 2 (21/22-bit bands: heavy but spread over the tasks) and ``3·10^11`` at
   distance 3 (16-bit bands: too many), and real perceptual hashes cluster, which makes buckets bigger.
   ``max_candidates`` turns a runaway into a ``ValueError`` before the join (one more aggregate over the
   band keys; the driver gets one number). Each candidate is checked exactly, the xor's ``bit_count``
   against ``distance``, and kept only at the *lowest* band where the two hashes agree, so every pair comes
   out once with no shuffle to dedupe it (O(B) column arithmetic per candidate). A big bucket makes
   ``n_b²`` candidates whatever the plan; AQE's skew join can split its partition over several tasks.
4. connected components (``connected_components``): up to ``ONE_TASK_EDGES`` edges a union-find in one
   task; above, alternating large-star / small-star (Kiveris et al.
   2014, "Connected Components in MapReduce and Beyond") on the ``E`` near edges between distinct hashes
   (the equal-hash stars of step 1 are already in their final form and never enter it). A round shuffles
   ``O(E)`` rows four times (a partial ``min`` by node, the join by neighbour, the two steps' outputs by
   node; ``distinct`` reuses the last), materializes the edges and counts once; no step gathers a node's
   neighbours in one row, so a high-degree node costs partial aggregates, not a big task. ``O(log² n)``
   rounds are proven; measured here: chains of 50 nodes 5 (random ids) or 6 (ids in chain order), of
   1,000 nodes 8 or 10, random graphs and trees of 2,000 nodes 4 to 6, a star 0 or 1.
5. the answer (``near_duplicate_groups``): the components joined to the ``U``-row hash table, a
   ``groupBy`` per component with ``min(struct(path, image_id))`` (the representative) and ``sum(n)``
   (the size), that joined back per hash: a per-hash map (``phash``, its ``n``, whether it holds the
   representative, the representative's id), one row per grouped hash, materialized (its row count comes
   with it), then one join of the ``N`` rows with it on ``phash``, a broadcast join up to
   ``BROADCAST_ROWS`` rows of the map (no shuffle of the rows).

Small inputs, one task (``near_duplicate_groups`` up to ``ONE_TASK_HASHES`` distinct hashes: the hash
table's row count decides): steps 2-5 are the same algorithm in numpy in one task (``_search_task``:
``near_pairs`` for the band join, exact check and lowest-band rule; ``components_of`` for the components;
a sort for the representatives), reading the materialized hash table once and writing the per-hash map;
a candidate count (``max_candidates``, or ``near_duplicate_search``'s ``max_pairs``) is one more job in one
task over it (``band_join_size``), not an aggregation per distance.
Spark's per-job and per-stage costs, not the arithmetic, were what the Spark plan spent at this size:
on the Fruits-360 hashes x8 (59,392 rows, 4,450 distinct hashes, 396,287 candidate pairs at distance 4,
195 groups) the search took 9 Spark jobs and its lazy answer 10 more to materialize; now 3 and 2, and
the manifest's whole near-duplicate summary (``near_duplicate_search``: distance fitted, groups
materialized and counted) 11 where it took 26 (bench/RESULTS-quality-cost.md). The Spark plan stays for
larger inputs, and the tests hold both to the same brute force.

``near_duplicate_search`` materializes the answer and counts it from the per-hash map (members: the sum of
``n``; groups: the hashes holding a representative), one aggregation, in one task below the limit.

The driver sees counts only: the optional candidate counts, the hash table's and the map's row counts,
one count per round of step 4 and, from ``near_duplicate_counts`` or ``near_duplicate_search``, three
numbers (and a broadcast map of at most ``BROADCAST_ROWS`` rows goes through it, as Spark's own broadcast
joins do). Materialized intermediates (the hash table, each round's edges, the per-hash map) are local
checkpoints (``DataFrame.localCheckpoint``), or with ``scratch`` Parquet datasets written and read by the
tasks through fsspec (``metadata/spark/parquet.py``): local checkpoints live on the executors (a lost
executor fails the job; Spark's cleaner frees them), Parquet survives that, and the caller removes
``scratch`` once it has consumed the result.
"""
from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pyarrow as pa

from imgfeat.metadata import storage
from imgfeat.metadata.spark.parquet import read_parquet_dataset, write_parquet_dataset

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

log = logging.getLogger(__name__)

HASH_BITS = 64
MAX_DISTANCE = HASH_BITS - 1
"""The largest distance with bands of at least one bit (``distance + 1`` bands)."""
MIN_HASH_BITS = 24
"""A hash with fewer bits set is left out of the search (``searchable``). The DCT hash sets the bits of the AC
coefficients strictly above their median, so with 63 distinct coefficients exactly 31 are set: every one of
1,885 real photos measured (Fruits-360 and real-size ones; bench/bench_hash_bits.py) had 31. Fewer means coefficients tied at the
median, in exact arithmetic: mostly zeros, from an image with too little 2-D structure (a flat image hashes
to 0, a horizontal gradient to 3 bits, 38 of 161 PngSuite images had 0-23 bits, 36 of them under 16). Such hashes lie within a
few bits of each other whatever the pictures, so they would chain unrelated images (a 1x1 pixel, a
gradient, colour test charts) into one group through the hash 0; those images still group as exact
duplicates."""

_MASK64 = (1 << HASH_BITS) - 1


def band_layout(distance: int) -> list[tuple[int, int]]:
    """``(start, width)`` of each of the ``distance + 1`` bands: contiguous bit ranges from bit 0 (the least
    significant) up, widths as equal as possible (the first ``64 % B`` bands one bit wider)."""
    if not isinstance(distance, int) or isinstance(distance, bool) or not 0 <= distance <= MAX_DISTANCE:
        raise ValueError(f"distance must be an int in 0..{MAX_DISTANCE}, got {distance!r}")
    n_bands = distance + 1
    base, extra = divmod(HASH_BITS, n_bands)
    layout, start = [], 0
    for i in range(n_bands):
        width = base + (1 if i < extra else 0)
        layout.append((start, width))
        start += width
    return layout


def _signed(value: int) -> int:
    """The int64 whose two's complement bits are the unsigned 64-bit ``value``."""
    return value - (1 << HASH_BITS) if value >> (HASH_BITS - 1) else value


def band_keys(phash: int, distance: int) -> list[tuple[int, int]]:
    """The ``(band_index, band_value)`` keys of ``phash`` for pairs within Hamming distance ``distance``.

    Multi-index hashing: the 64 bits are cut into ``B = distance + 1`` contiguous bands (``band_layout``);
    two hashes that differ in at most ``distance`` bits leave at least one band untouched (pigeonhole:
    ``distance`` flipped bits fall into at most ``distance`` bands), so they share at least one key, and
    an exact join on the keys finds every such pair. More bands would need a search around each band
    value (the general form of the method); ``B = distance + 1`` keeps each lookup an exact equality.

    ``phash``: the int64 column value (negative when bit 63 is set) or the same bits as an unsigned int.
    A band value is its bits shifted down, a non-negative int, except the single 64-bit band of distance 0,
    which is the signed int64 itself: the values are what Spark computes (``_band_value``).
    """
    if not -(1 << (HASH_BITS - 1)) <= phash <= _MASK64:
        raise ValueError(f"phash {phash!r} is not a 64-bit value")
    bits = phash & _MASK64
    return [(i, _signed((bits >> start) & ((1 << width) - 1))) for i, (start, width) in enumerate(band_layout(distance))]


def band_values(phashes: np.ndarray, distance: int) -> np.ndarray:
    """``band_keys`` for a 1-D array of hashes (int64, or uint64 with the same bits), vectorized (for code in
    a task, e.g. under ``mapInArrow``): an int64 array of shape ``(n, distance + 1)`` whose column ``i`` is
    the value of band ``i``."""
    arr = np.asarray(phashes)
    if arr.dtype not in (np.int64, np.uint64) or arr.ndim != 1:
        raise ValueError(f"phashes must be a 1-D int64 or uint64 array, got {arr.dtype} with shape {arr.shape}")
    bits = np.ascontiguousarray(arr).view(np.uint64)
    layout = band_layout(distance)
    out = np.empty((bits.shape[0], len(layout)), np.uint64)
    for i, (start, width) in enumerate(layout):
        mask = np.uint64(_MASK64 if width == HASH_BITS else (1 << width) - 1)
        out[:, i] = (bits >> np.uint64(start)) & mask
    return out.view(np.int64)


def _band_value(phash: Column, start: int, width: int) -> Column:
    """Spark: the value of the band at ``(start, width)`` of the ``long`` column ``phash`` (as ``band_keys``)."""
    from pyspark.sql import functions as F

    if width == HASH_BITS:
        return phash
    return F.shiftrightunsigned(phash, start).bitwiseAND(F.lit((1 << width) - 1).cast("long"))


def band_key_rows(df: DataFrame, distance: int, column: str = "phash") -> DataFrame:
    """``df``'s columns plus ``band`` (int) and ``value`` (long): ``distance + 1`` rows per input row, the
    keys of ``band_keys`` made with Spark SQL expressions (no Python in the tasks). A null hash gives
    null values."""
    from pyspark.sql import functions as F

    keys = F.array(*[F.struct(F.lit(i).alias("band"), _band_value(F.col(column), s, w).alias("value"))
                     for i, (s, w) in enumerate(band_layout(distance))])
    return df.select("*", F.inline(keys))


def _lowest_equal_band(xor: Column, distance: int) -> Column:
    """Spark: the lowest band where two hashes agree, from their xor (null when none does)."""
    from pyspark.sql import functions as F

    return F.coalesce(*[F.when(_band_value(xor, s, w) == 0, F.lit(i)) for i, (s, w) in enumerate(band_layout(distance))])


def _hash_table(rows: DataFrame, with_first: bool = False, carry: tuple[str, ...] = ()) -> DataFrame:
    """One row per distinct hash of ``rows`` (nulls dropped): ``phash``, ``rep`` (its smallest image_id),
    ``n`` (its rows) and with ``with_first`` ``first``, the struct ``(path, image_id, *carry)`` of its
    smallest path (``carry``: more columns of that row; image_id is unique, so they never decide the order)."""
    from pyspark.sql import functions as F

    aggs = [F.min("image_id").alias("rep"), F.count(F.lit(1)).alias("n")]
    if with_first:
        aggs.append(F.min(F.struct("path", "image_id", *_extra(carry))).alias("first"))
    return rows.groupBy("phash").agg(*aggs)


def _extra(carry: tuple[str, ...]) -> list[str]:
    """The ``carry`` columns that ``first`` holds besides path and image_id."""
    return [c for c in dict.fromkeys(carry) if c not in ("path", "image_id")]


def searchable(phashes: np.ndarray) -> np.ndarray:
    """Which of the 1-D int64 (or uint64) ``phashes`` take part in the search: ``MIN_HASH_BITS`` bits or more."""
    return _popcount(np.ascontiguousarray(phashes).view(np.uint64)) >= MIN_HASH_BITS


def _valid(rows: DataFrame, *columns: str) -> DataFrame:
    """The rows that take part in the search (a hash, ``searchable``, and an id), with ``columns``."""
    from pyspark.sql import functions as F

    return rows.filter(F.col("phash").isNotNull() & F.col("image_id").isNotNull()
                       & (F.bit_count("phash") >= MIN_HASH_BITS)).select(*columns)


def candidate_pairs_at(hashes: DataFrame, distance: int) -> int:
    """How many candidate pairs the band join of the distinct ``phash`` values of ``hashes`` makes at
    ``distance``: the sum of n(n-1)/2 over its (band, value) buckets, one aggregation (``B·U`` rows shuffled
    with partial counts; one number to the driver). ``band_join_size`` is the same count in numpy."""
    from pyspark.sql import functions as F

    if distance == 0:
        return 0
    sizes = band_key_rows(hashes.select("phash"), distance).groupBy("band", "value").agg(F.count(F.lit(1)).alias("n"))
    row = sizes.agg(F.sum(F.col("n") * (F.col("n") - 1) / 2).alias("p")).first()
    return int(row["p"] or 0) if row is not None else 0


def band_join_size(phashes: np.ndarray, distance: int) -> int:
    """``candidate_pairs_at`` for a 1-D array of distinct hashes (int64, or uint64 with the same bits), in
    numpy (for one task): per band a sort and the sizes of its runs of equal values."""
    if distance == 0:
        return 0
    bands = band_values(phashes, distance)
    total = 0
    for t in range(bands.shape[1]):
        values = np.sort(bands[:, t])
        if values.size < 2:
            continue
        starts = np.flatnonzero(np.concatenate([[True], values[1:] != values[:-1]]))
        sizes = np.diff(np.append(starts, values.size))
        total += int((sizes * (sizes - 1) // 2).sum())
    return total


def fitting_distance(hashes: DataFrame | np.ndarray, requested: int, max_pairs: int) -> tuple[int, int]:
    """The largest distance up to ``requested`` whose band join makes at most ``max_pairs`` candidate
    pairs, and that count (``hashes``: distinct ``phash`` values, a Spark frame (``candidate_pairs_at``,
    one aggregation per distance tried) or an array (``band_join_size``)). Fewer bits of distance mean
    fewer, wider bands, so the count falls steeply (for U uniform hashes about (d+1)·U²/2^(64/(d+1)+1))."""
    for distance in range(requested, -1, -1):
        if isinstance(hashes, np.ndarray):
            pairs = band_join_size(hashes, distance)
        else:
            pairs = candidate_pairs_at(hashes, distance)
        if pairs <= max_pairs:
            return distance, pairs
    return 0, 0


def _check_pairs(pairs: int, distance: int, max_candidates: int) -> None:
    """Log the band join's candidate count ``pairs`` and raise ``ValueError`` when over ``max_candidates``."""
    log.info("near duplicates at distance %d: %d candidate pairs from the band join", distance, pairs)
    if pairs > max_candidates:
        raise ValueError(f"near duplicates at distance {distance}: the band join would make {pairs} candidate pairs, "
                         f"more than max_candidates={max_candidates} (use a smaller distance)")


def _near_edges(table: DataFrame, distance: int, max_candidates: int | None = None) -> DataFrame:
    """Edges ``(a, b)`` (``a < b``) between the representatives of the distinct hashes of ``table``
    (``phash``, ``rep``) that differ in 1..``distance`` bits, each pair once."""
    from pyspark.sql import functions as F

    if distance == 0:  # one band, the whole hash: distinct hashes never share it
        return table.sparkSession.createDataFrame([], "a string, b string")
    if max_candidates is not None:
        _check_pairs(candidate_pairs_at(table, distance), distance, max_candidates)
    keys = band_key_rows(table.select("phash", "rep"), distance)
    left, right = keys.alias("l"), keys.alias("r")
    joined = left.join(right, (F.col("l.band") == F.col("r.band")) & (F.col("l.value") == F.col("r.value"))
                       & (F.col("l.phash") < F.col("r.phash")))
    xor = F.col("l.phash").bitwiseXOR(F.col("r.phash"))
    near = joined.filter((F.bit_count(xor) <= distance) & (_lowest_equal_band(xor, distance) == F.col("l.band")))
    return near.select(F.least("l.rep", "r.rep").alias("a"), F.greatest("l.rep", "r.rep").alias("b"))


def candidate_pairs(df: DataFrame, distance: int, *, max_candidates: int | None = None) -> DataFrame:
    """Edges ``(a, b)`` of image_ids (``a < b``, strings) whose connected components are the near-duplicate
    groups of ``df`` (``image_id`` string, ``phash`` long; rows with a null hash are left out):

    * rows with an equal hash: a star from the smallest image_id of that hash to each other one
      (``n - 1`` edges, not the ``n²`` pairs; a hash of a million blank images costs no pair search);
    * distinct hashes within Hamming distance ``distance``: one edge between their smallest image_ids,
      found by the band join of ``band_keys`` and checked exactly (``bit_count`` of the xor), each once.

    So a pair of rows is within ``distance`` iff it is an edge here or is linked through its hashes'
    stars. ``max_candidates``: raise ``ValueError`` when the band join would make more candidate pairs.
    """
    from pyspark.sql import functions as F

    band_layout(distance)
    valid = _valid(df, "image_id", "phash")
    table = _hash_table(valid)
    star = valid.join(table.select("phash", "rep"), "phash").filter(F.col("image_id") != F.col("rep"))
    return star.select(F.col("rep").alias("a"), F.col("image_id").alias("b")).unionByName(
        _near_edges(table, distance, max_candidates))


def materialize(df: DataFrame, scratch: str | None, name: str) -> DataFrame:
    """``df`` computed once: a local checkpoint, or with ``scratch`` a Parquet dataset ``scratch/name``
    (for a frame that several jobs read)."""
    return _materialize_counted(df, scratch, name, count=False)[0]


def _materialize_counted(df: DataFrame, scratch: str | None, name: str, count: bool = True) -> tuple[DataFrame, int]:
    """``materialize`` and, with ``count``, its number of rows: free with ``scratch`` (the writing tasks
    report their rows), one count job over the local checkpoint otherwise; -1 without ``count``."""
    if scratch is None:
        done = df.localCheckpoint(eager=True)
        return done, done.count() if count else -1
    url = storage.join(scratch, name)
    rows = write_parquet_dataset(df, url)["rows"]
    return read_parquet_dataset(df.sparkSession, url), rows


def _large_star(edges: DataFrame) -> DataFrame:
    """Large-star: each node links its larger neighbours to the smallest of itself and its neighbours.

    ``edges`` (``hi > lo``) become ``(hi, lo, moved)``, hash-partitioned by ``hi``, with duplicates;
    ``moved``: the edge's ``lo`` has a smaller neighbour, so the edge now goes to that node's smallest."""
    from pyspark.sql import functions as F

    mins = edges.groupBy("hi").agg(F.min("lo").alias("m")).withColumnRenamed("hi", "lo")
    return edges.join(mins, "lo", "left").select(
        "hi", F.coalesce("m", "lo").alias("lo"), F.col("m").isNotNull().alias("moved")).repartition("hi")


def _small_star(edges: DataFrame) -> DataFrame:
    """Small-star: each node links itself and its smaller neighbours to the smallest of them (``edges``:
    ``hi > lo``, partitioned by ``hi``, duplicates allowed; the result is deduplicated, partitioned by ``hi``)."""
    from pyspark.sql import functions as F

    smallest = edges.groupBy("hi").agg(F.min("lo").alias("m"))  # no shuffle: the edges are partitioned by hi
    moved = edges.join(smallest, "hi").filter(F.col("lo") != F.col("m")).select(F.col("lo").alias("hi"), F.col("m").alias("lo"))
    return moved.unionByName(smallest.select("hi", F.col("m").alias("lo"))).repartition("hi").distinct()


def _branching(edges: DataFrame) -> int:
    """How many nodes of ``edges`` (``hi > lo``) have two or more smaller neighbours (a count on the cluster)."""
    from pyspark.sql import functions as F

    return edges.groupBy("hi").agg(F.count(F.lit(1)).alias("n")).filter(F.col("n") > 1).count()


ONE_TASK_EDGES = 1_000_000
"""Up to this many distinct edges, the components are computed by a union-find in one task (about
100 MB and a few seconds there) instead of Spark rounds, each of which costs several jobs."""


def _union_find_task(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """In one task: every ``(hi, lo)`` edge into a union-find whose roots are the smallest ids (a larger
    root always goes under a smaller one), then ``(id, component)`` for every node."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for batch in batches:
        for hi, lo in zip(batch.column("hi").to_pylist(), batch.column("lo").to_pylist()):
            parent.setdefault(hi, hi)
            parent.setdefault(lo, lo)
            a, b = find(hi), find(lo)
            if a != b:
                parent[max(a, b)] = min(a, b)
    ids = list(parent)
    for start in range(0, len(ids), 65536):
        chunk = ids[start:start + 65536]
        yield pa.RecordBatch.from_arrays([pa.array(chunk, pa.string()), pa.array([find(x) for x in chunk], pa.string())],
                                         names=["id", "component"])


def connected_components(spark: SparkSession, edges: DataFrame, max_iterations: int = 50, *,
                         scratch: str | None = None, one_task_edges: int = ONE_TASK_EDGES) -> DataFrame:
    """``(id, component)`` for every node of ``edges`` (columns ``a``, ``b``: string ids, undirected):
    ``component`` is the smallest id of the node's connected component (string order), and the smallest
    node maps to itself. Only nodes of some edge appear: an isolated node has no row (a self-loop ``(x, x)``
    and an edge with a null end are dropped first, so a node seen only there has none either).

    Alternating large-star / small-star rounds (Kiveris et al. 2014) on the edges held as ``(hi, lo)``,
    ``hi > lo``, deduplicated; both steps keep the components, and a round shuffles the edges four times.
    It stops when the edges are stars centered at their smallest node, where a further round changes
    nothing: the large-star moved no edge (a count on the cluster, part of the round) and no node has two
    smaller neighbours (one more count, only then). After ``max_iterations`` rounds without that it
    raises ``RuntimeError``. Each round's edges are materialized (``localCheckpoint``, or Parquet under
    ``scratch``), so the lineage does not grow. Up to ``one_task_edges`` distinct edges (one count tells),
    a union-find in one task gives the same answer without rounds.
    """
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    tag = uuid.uuid4().hex[:12]
    a, b = F.col("a"), F.col("b")
    current = edges.filter(a.isNotNull() & b.isNotNull() & (a != b)).select(
        F.greatest(a, b).alias("hi"), F.least(a, b).alias("lo")).distinct()
    current, n_edges = _materialize_counted(current, scratch, f"cc-{tag}-000")
    if n_edges <= one_task_edges:
        log.info("connected components: %d edges, a union-find in one task", n_edges)
        found = materialize(current.coalesce(1).mapInArrow(_union_find_task, "id string, component string"),
                             scratch, f"cc-{tag}-uf")
        if scratch is not None:
            storage.remove_folder(storage.join(scratch, f"cc-{tag}-000"))
        return found
    rounds = 0
    while True:
        large = _large_star(current).persist(StorageLevel.MEMORY_AND_DISK)
        try:
            moved = large.filter("moved").count()
            if moved == 0 and _branching(current) == 0:
                break
            if rounds >= max_iterations:
                raise RuntimeError(f"connected_components: not converged after max_iterations={max_iterations} rounds")
            rounds += 1
            log.debug("connected components round %d: the large-star moved %d edges", rounds, moved)
            current = materialize(_small_star(large.select("hi", "lo")), scratch, f"cc-{tag}-{rounds:03d}")
        finally:
            large.unpersist()
        if scratch is not None:
            storage.remove_folder(storage.join(scratch, f"cc-{tag}-{rounds - 1:03d}"))
    log.info("connected components: stars after %d round(s)", rounds)
    return current.select(F.col("hi").alias("id"), F.col("lo").alias("component")).unionByName(
        current.select(F.col("lo").alias("id"), F.col("lo").alias("component")).distinct())


ONE_TASK_HASHES = 1_000_000
"""Up to this many distinct hashes, the whole search after the hash table (band buckets, the exact check,
the components and each group's representative) runs in one task with numpy (``_search_task``), instead of
the band self-join, the components' jobs and the joins back, each of which costs Spark jobs and shuffles.
At the limit: 1,000,000 random hashes (a tenth of them 1-3 bits from another) at distance 4, whose band
join makes 3.7·10^8 candidate pairs, took 4.1 s of CPU and 212 MB in ``near_pairs`` (the Spark join
would produce those 3.7·10^8 rows); the task also holds the hash table's rows (paths and ids) in Arrow."""

BROADCAST_ROWS = 100_000
"""A per-hash map (``phash``, representative id) of at most this many rows (a few MB) is broadcast to the
join with the rows, so the rows are not shuffled for it (Spark's own default broadcasts below 10 MB, but
it cannot size the frames ``read_parquet_dataset`` makes)."""

_POP8 = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def _popcount(x: np.ndarray) -> np.ndarray:
    """Number of set bits of each element of a 1-D uint64 array."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(x)
    return _POP8[x.view(np.uint8).reshape(-1, 8)].sum(axis=1)


def near_pairs(phashes: np.ndarray, distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)`` of the 1-D array of distinct hashes ``phashes`` (int64, or uint64 with the same
    bits) that differ in 1..``distance`` bits, each pair once (in either order): the band join of
    ``band_keys`` in numpy, for one task.

    Per band the hashes are sorted by band value; within a bucket of equal values every pair is a
    candidate, made by offsets (sorted position ``p`` with ``p + k`` for k = 1, 2, ...: one vectorized step
    per offset, over the buckets still longer than it, so the work is the number of candidates plus the
    largest bucket's size in numpy calls, on sorted copies: no random access), checked exactly
    (``bit_count`` of the xor) and kept only at the lowest band where the two agree (no lower band of the
    xor is zero), as the Spark join does."""
    arr = np.ascontiguousarray(phashes)
    bits = arr.view(np.uint64)
    n = arr.shape[0]
    empty = np.zeros(0, np.int64)
    if distance == 0 or n < 2:  # one band, the whole hash: distinct hashes never share it
        return empty, empty
    layout = band_layout(distance)
    bands = band_values(arr, distance)
    pos = np.arange(n)
    found_a, found_b = [empty], [empty]
    for t in range(len(layout)):
        order = np.argsort(bands[:, t], kind="stable")
        values = bands[order, t]
        starts = np.flatnonzero(np.concatenate([[True], values[1:] != values[:-1]]))
        sizes = np.diff(np.append(starts, n))
        left = np.repeat(starts + sizes, sizes) - pos  # per sorted position: the positions left in its bucket
        near = bits[order]
        active = pos[left > 1]
        k = 1
        while active.size:
            hit = active[_popcount(near[active] ^ near[active + k]) <= distance]
            if hit.size and t:
                x = near[hit] ^ near[hit + k]
                lowest = np.ones(hit.size, bool)
                for start, width in layout[:t]:  # each pair once: at the lowest band where the two agree
                    lowest &= (x >> np.uint64(start)) & np.uint64((1 << width) - 1) != 0
                hit = hit[lowest]
            found_a.append(order[hit])
            found_b.append(order[hit + k])
            k += 1
            active = active[left[active] > k]
    return np.concatenate(found_a), np.concatenate(found_b)


def components_of(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For nodes ``0..n-1`` and the undirected edges ``(a[k], b[k])``: each node's component, labelled by
    its smallest node. Vectorized union-find: every root with an edge to a smaller root is hooked under the
    smallest such root (``np.minimum.at``), then every node is pointed at its root (pointer jumping);
    repeated until no edge joins two roots. A node's parent is never larger than itself, so the roots are
    the components' smallest nodes, whatever the edges' order."""
    parent = np.arange(n)
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    while a.size:
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            break
        a, b, ra, rb = a[differ], b[differ], ra[differ], rb[differ]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        while True:
            up = parent[parent]
            if np.array_equal(up, parent):
                break
            parent = up
    return parent


def _fit_task(requested: int, max_pairs: int | None) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The one-task candidate count: the hash table's ``phash`` in, one row ``(distance, pairs)`` out: with
    ``max_pairs`` the ``fitting_distance`` of those hashes, else ``requested`` and its ``band_join_size``."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        phash = np.concatenate([np.zeros(0, np.int64)]
                               + [b.column(0).to_numpy(zero_copy_only=False).astype(np.int64) for b in batches])
        if max_pairs is None:
            distance, pairs = requested, band_join_size(phash, requested)
        else:
            distance, pairs = fitting_distance(phash, requested, max_pairs)
        yield pa.RecordBatch.from_arrays([pa.array([distance], pa.int32()), pa.array([pairs], pa.int64())],
                                         names=["distance", "pairs"])

    return run


def search_hash_table(table: pa.Table, distance: int, carry: tuple[str, ...] = ()) -> pa.Table:
    """The one-task search (``ONE_TASK_HASHES``) over a hash table's rows (``phash``, ``n``, ``first``: the
    struct ``(path, image_id, *carry)`` of its smallest path): ``(phash, n, holds_rep, rep_id, rep_<c> for c in
    carry)`` for every hash in a group of two or more rows, ``rep_id`` being the image_id of the group's
    representative (the smallest ``first``: path, then image_id; null paths first, as Spark orders structs)
    and ``holds_rep`` whether this hash is its."""
    import pyarrow.compute as pc

    carry = tuple(dict.fromkeys(carry))
    phash = table.column("phash").to_numpy()
    size = table.column("n").to_numpy()
    first = table.column("first").combine_chunks()
    paths, ids = first.field("path"), first.field("image_id")
    comp = components_of(len(phash), *near_pairs(phash, distance))
    members = np.bincount(comp, weights=size, minlength=len(phash))  # rows per component (at its root)
    keys = pa.table({"has_path": pc.is_valid(paths), "p": paths, "i": ids})  # False (a null path) first
    order = pc.sort_indices(keys, sort_keys=[("has_path", "ascending"), ("p", "ascending"),
                                             ("i", "ascending")]).to_numpy()
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    best = np.full(len(order), len(order), np.int64)
    np.minimum.at(best, comp, rank)
    keep = np.flatnonzero(members[comp] >= 2)
    rep = order[best[comp[keep]]]
    take = pa.array(rep, pa.int64())
    return pa.Table.from_arrays(
        [pa.array(phash[keep], pa.int64()), pa.array(size[keep], pa.int64()), pa.array(rep == keep),
         ids.take(take)] + [first.field(c).take(take) for c in carry],
        names=["phash", "n", "holds_rep", "rep_id", *(f"rep_{c}" for c in carry)])


def _search_task(distance: int, carry: tuple[str, ...] = ()) -> Callable[[Iterator[pa.RecordBatch]],
                                                                          Iterator[pa.RecordBatch]]:
    """``search_hash_table`` as a Spark task: the hash table's rows in, the per-hash map out."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        chunks = list(batches)  # none at all when there is no hash
        if chunks and sum(b.num_rows for b in chunks):
            yield from search_hash_table(pa.Table.from_batches(chunks), distance, carry).to_batches()

    return run


class _Map(NamedTuple):
    """The per-hash map of ``_per_hash_map``, materialized, and what it was made from."""

    valid: DataFrame
    per_hash: DataFrame
    rows: int
    one_task: bool
    distance: int
    candidate_pairs: int | None


def _per_hash_map(spark: SparkSession, rows: DataFrame, distance: int, scratch: str | None, *,
                  max_pairs: int | None, max_candidates: int | None, max_iterations: int,
                  one_task_hashes: int, carry: tuple[str, ...]) -> _Map:
    """The search of ``near_duplicate_groups`` up to its per-hash map (``phash``, ``n``, ``holds_rep``,
    ``rep_id``, ``rep_<c>``: one row per grouped hash), materialized, with its row count; ``max_pairs``: search
    at ``fitting_distance`` (one job in one task below ``one_task_hashes``, else Spark's count per distance)."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import BooleanType, LongType, StringType, StructField, StructType

    tag = uuid.uuid4().hex[:12]
    valid = _valid(rows, *dict.fromkeys(("image_id", "path", "phash", *carry)))
    table, n_hashes = _materialize_counted(_hash_table(valid, with_first=True, carry=carry), scratch, f"hashes-{tag}")
    one_task = n_hashes <= one_task_hashes
    requested, pairs = distance, None
    if max_pairs is not None or max_candidates is not None:
        if n_hashes < 2 or distance == 0:
            pairs = 0  # no two distinct hashes, or one band (the whole hash): no candidate at any distance
        elif one_task:
            row = table.select("phash").coalesce(1).mapInArrow(_fit_task(distance, max_pairs),
                                                               "distance int, pairs long").first()
            distance, pairs = (int(row["distance"]), int(row["pairs"])) if row is not None else (distance, 0)
        elif max_pairs is not None:
            distance, pairs = fitting_distance(table.select("phash"), distance, max_pairs)
        else:
            pairs = candidate_pairs_at(table, distance)
        if max_pairs is not None and distance < requested:
            log.info("near duplicates: distance %d would make more than %d candidate pairs; distance %d makes %d",
                     requested, max_pairs, distance, pairs)
        if max_candidates is not None:
            _check_pairs(pairs, distance, max_candidates)
    rep_carry = [F.col(f"rep_first.{c}").alias(f"rep_{c}") for c in carry]
    if one_task:
        log.info("near duplicates: %d distinct hashes, searched in one task", n_hashes)
        types = {f.name: f.dataType for f in valid.schema.fields}
        schema = StructType([StructField("phash", LongType()), StructField("n", LongType()),
                             StructField("holds_rep", BooleanType()), StructField("rep_id", StringType()),
                             *(StructField(f"rep_{c}", types[c]) for c in carry)])
        per_hash = table.select("phash", "n", "first").coalesce(1).mapInArrow(_search_task(distance, carry), schema)
    else:
        comps = connected_components(spark, _near_edges(table, distance), max_iterations, scratch=scratch)
        hashes = table.join(comps, F.col("rep") == F.col("id"), "left").select(
            "phash", "first", "n", F.coalesce("component", "rep").alias("group"))
        groups = hashes.groupBy("group").agg(F.sum("n").alias("size"), F.min("first").alias("rep_first")).filter(
            F.col("size") >= 2)
        per_hash = hashes.join(groups.select("group", F.col("rep_first.image_id").alias("rep_id"), *rep_carry),
                               "group").select("phash", F.col("n").cast("long").alias("n"),
                                               (F.col("first.image_id") == F.col("rep_id")).alias("holds_rep"),
                                               "rep_id", *(f"rep_{c}" for c in carry))
    tagged, n_tagged = _materialize_counted(per_hash, scratch, f"tagged-{tag}")
    return _Map(valid, tagged, n_tagged, one_task, distance, pairs)


def _members(found: _Map, carry: tuple[str, ...]) -> DataFrame:
    """The rows of ``found.valid`` in a group, but its representative, joined to their representative."""
    from pyspark.sql import functions as F

    tagged = F.broadcast(found.per_hash) if found.rows <= BROADCAST_ROWS else found.per_hash
    # image_id is unique and not null (``_valid``): the representative's own row is the one with its id.
    return found.valid.join(tagged, "phash").filter(F.col("image_id") != F.col("rep_id")).select(
        "image_id", F.col("rep_id").alias("near_duplicate_of"), *carry, *(f"rep_{c}" for c in carry))


def near_duplicate_groups(spark: SparkSession, rows: DataFrame, distance: int, scratch: str | None = None, *,
                          max_candidates: int | None = None, max_iterations: int = 50,
                          one_task_hashes: int = ONE_TASK_HASHES, carry: tuple[str, ...] = ()) -> DataFrame:
    """``(image_id, near_duplicate_of)`` for every member of a near-duplicate group of two or more rows
    that is not the group's representative; ``near_duplicate_of`` is the representative's image_id.

    ``rows``: ``image_id`` (string, unique), ``path`` (string), ``phash`` (long, may be null). A group is a
    connected component of the rows whose hashes are within Hamming ``distance`` (equal hashes always
    are); rows with a null hash (or image_id) are never in a group. The representative is the member with
    the smallest ``path`` (string order; ties by image_id), like the original of exact duplicates.
    Representatives and rows of no group have no output row. ``carry``: columns of ``rows`` to bring along,
    the member's as ``c`` and its representative's as ``rep_c`` (e.g. ``("path", "content_hash")``: no join
    back to the rows is needed for them).

    Up to ``one_task_hashes`` distinct hashes (the hash table's row count tells), the search after the hash
    table runs in one task (``_search_task``: the same band join, exact check and components in numpy);
    above, on Spark (``candidate_pairs``' band join, ``connected_components``, the joins back). Either way
    the result is a per-hash map (``phash``, the representative's id and ``carry``) of the grouped hashes,
    materialized, and the lazy join of the rows with it (broadcast up to ``BROADCAST_ROWS`` rows: the rows
    are not shuffled). The driver gets counts; the materialized parts are local checkpoints, or with
    ``scratch`` (a URL) Parquet datasets under it, which must outlive the result's use. ``max_candidates``:
    see ``candidate_pairs`` (counted in the search's task below ``one_task_hashes``); ``max_iterations``: see
    ``connected_components``. ``near_duplicate_search`` is this materialized, with its counts.
    """
    band_layout(distance)
    carry = tuple(dict.fromkeys(carry))
    found = _per_hash_map(spark, rows, distance, scratch, max_pairs=None, max_candidates=max_candidates,
                          max_iterations=max_iterations, one_task_hashes=one_task_hashes, carry=carry)
    return _members(found, carry)


@dataclass(frozen=True)
class NearDuplicates:
    """What ``near_duplicate_search`` found."""

    groups: DataFrame
    """The rows of ``near_duplicate_groups``, materialized."""
    distance: int
    """The distance searched: the one asked for or, with ``max_pairs``, the largest that fits."""
    candidate_pairs: int | None
    """The band join's candidate pairs at ``distance``, where counted (``max_pairs`` or ``max_candidates``)."""
    counts: dict[str, int]
    """``near_duplicate_counts`` of ``groups``."""


def near_duplicate_search(spark: SparkSession, rows: DataFrame, distance: int, scratch: str | None = None, *,
                          max_pairs: int | None = None, max_candidates: int | None = None, max_iterations: int = 50,
                          one_task_hashes: int = ONE_TASK_HASHES, carry: tuple[str, ...] = ()) -> NearDuplicates:
    """``near_duplicate_groups`` (same arguments), materialized (``scratch/groups-*``, or a local checkpoint),
    with its counts and, with ``max_pairs``, at the largest distance up to ``distance`` whose band join makes
    at most ``max_pairs`` candidate pairs (``fitting_distance``).

    Below ``one_task_hashes`` distinct hashes the candidate count is one job in one task (numpy, on the
    materialized hash table), above it Spark's aggregation per distance tried; the counts are one aggregation
    of the per-hash map (its ``n`` and ``holds_rep``: members and groups), in one task below the same limit."""
    from pyspark.sql import functions as F

    band_layout(distance)
    if max_pairs is not None and max_pairs < 0:
        raise ValueError(f"max_pairs must be >= 0, got {max_pairs!r}")
    carry = tuple(dict.fromkeys(carry))
    found = _per_hash_map(spark, rows, distance, scratch, max_pairs=max_pairs, max_candidates=max_candidates,
                          max_iterations=max_iterations, one_task_hashes=one_task_hashes, carry=carry)
    n_groups = members = 0
    if found.rows:
        per_hash = found.per_hash.coalesce(1) if found.one_task else found.per_hash  # one task: no shuffle
        row = per_hash.agg(F.count(F.when(F.col("holds_rep"), 1)).alias("g"), F.sum("n").alias("m")).first()
        n_groups, members = (int(row["g"]), int(row["m"] or 0)) if row is not None else (0, 0)
    groups = materialize(_members(found, carry), scratch, f"groups-{uuid.uuid4().hex[:12]}")
    return NearDuplicates(groups, found.distance, found.candidate_pairs,
                          {"groups": n_groups, "duplicates": members - n_groups, "members": members})


def near_duplicate_counts(groups: DataFrame) -> dict[str, int]:
    """Counts of a ``near_duplicate_groups`` result (one job, three numbers to the driver): ``groups``
    (groups of 2+ rows), ``duplicates`` (members that are not the representative) and ``members`` (all
    rows in those groups, representatives included)."""
    from pyspark.sql import functions as F

    row = groups.agg(F.count(F.lit(1)).alias("d"), F.countDistinct("near_duplicate_of").alias("g")).first()
    dups, n_groups = (int(row["d"]), int(row["g"])) if row is not None else (0, 0)
    return {"groups": n_groups, "duplicates": dups, "members": dups + n_groups}


@dataclass(frozen=True)
class NearDuplicateTable:
    """What ``near_duplicate_search_table`` found (the Arrow form of ``NearDuplicates``)."""

    groups: pa.Table
    """``near_duplicate_groups``' rows: ``image_id``, ``near_duplicate_of``, ``carry``, ``rep_<c>``."""
    distance: int
    candidate_pairs: int | None
    counts: dict[str, int]


def hash_table_rows(valid: pa.Table, carry: tuple[str, ...] = ()) -> pa.Table:
    """``_hash_table(with_first=True)`` in Arrow, for one task: one row per distinct ``phash`` of ``valid``
    (no null hash or id), with ``n`` (its rows) and ``first`` (the struct ``(path, image_id, *carry)`` of its
    smallest path, then image_id; null paths first, as Spark orders structs)."""
    import pyarrow.compute as pc

    order = pc.sort_indices(valid, sort_keys=[("phash", "ascending", "at_start"), ("path", "ascending", "at_start"),
                                              ("image_id", "ascending", "at_start")])
    table = valid.take(order)
    phash = table.column("phash").to_numpy()
    starts = np.flatnonzero(np.concatenate([[True], phash[1:] != phash[:-1]])) if len(phash) else np.zeros(0, np.int64)
    sizes = np.diff(np.append(starts, len(phash)))
    heads = table.take(pa.array(starts, pa.int64()))
    fields = ["path", "image_id", *_extra(carry)]
    first = pa.StructArray.from_arrays([heads.column(f).combine_chunks() for f in fields], names=fields)
    return pa.table({"phash": pa.array(phash[starts], pa.int64()), "n": pa.array(sizes, pa.int64()), "first": first})


def near_duplicate_search_table(rows: pa.Table, distance: int, *, max_pairs: int | None = None,
                                carry: tuple[str, ...] = ()) -> NearDuplicateTable:
    """``near_duplicate_search`` in one task, on an Arrow table of rows (``image_id``, ``path``, ``phash`` and
    ``carry``), for a caller that holds them all anyway (the manifest's one-task organize): the same hash
    table, fitted distance, search (``search_hash_table``), members and counts, with no Spark job. Memory:
    the rows, their hash table and the band join's candidates (``ONE_TASK_HASHES`` says what that costs)."""
    import pyarrow.compute as pc

    band_layout(distance)
    if max_pairs is not None and max_pairs < 0:
        raise ValueError(f"max_pairs must be >= 0, got {max_pairs!r}")
    carry = tuple(dict.fromkeys(carry))
    cols = list(dict.fromkeys(("image_id", "path", "phash", *carry)))
    valid = rows.select(cols).filter(pc.and_(pc.is_valid(rows["phash"]), pc.is_valid(rows["image_id"])))
    valid = valid.filter(pa.array(searchable(valid.column("phash").to_numpy(zero_copy_only=False))))
    table = hash_table_rows(valid, carry)
    pairs = None
    if max_pairs is not None:
        if table.num_rows < 2 or distance == 0:
            pairs = 0
        else:
            distance, pairs = fitting_distance(table.column("phash").to_numpy(), distance, max_pairs)
    per_hash = search_hash_table(table, distance, carry) if table.num_rows else None
    groups_n = members_n = 0
    names = ["image_id", "near_duplicate_of", *carry, *(f"rep_{c}" for c in carry)]
    if per_hash is None or not per_hash.num_rows:
        types = [valid.schema.field("image_id").type, pa.string(), *(valid.schema.field(c).type for c in carry),
                 *(valid.schema.field(c).type for c in carry)]
        groups = pa.Table.from_arrays([pa.array([], t) for t in types], names=names)
    else:
        groups_n = int(pc.sum(per_hash["holds_rep"].cast(pa.int64())).as_py() or 0)
        members_n = int(pc.sum(per_hash["n"]).as_py() or 0)
        joined = valid.join(per_hash.drop_columns(["n", "holds_rep"]), "phash")
        joined = joined.filter(pc.not_equal(joined["image_id"], joined["rep_id"]))
        groups = pa.Table.from_arrays([joined[c] for c in ("image_id", "rep_id", *carry, *(f"rep_{c}" for c in carry))],
                                      names=names)
    return NearDuplicateTable(groups, distance, pairs,
                              {"groups": groups_n, "duplicates": members_n - groups_n, "members": members_n})
