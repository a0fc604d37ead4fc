"""The near-duplicate search's candidate budget (``near_duplicates.fitting_distance``, used by
``data_quality.near_duplicate_summary``): Spark's count and numpy's against a plain count of the buckets."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
import pyarrow.parquet as pq
import pytest

from imgfeat.metadata.manifest.near_duplicates import band_join_size, band_values, candidate_pairs_at, fitting_distance


def clustered_hashes(n: int = 300, seed: int = 0) -> np.ndarray:
    """Distinct hashes whose lowest 13 bits are all equal: one band bucket of every hash at distance 4."""
    rng = np.random.default_rng(seed)
    high = rng.integers(0, 1 << 62, n, dtype=np.int64) << np.int64(13)
    return np.unique(high | np.int64(0x155))


def pairs_by_counter(hashes: np.ndarray, distance: int) -> int:
    if distance == 0:
        return 0
    keys = band_values(hashes, distance)
    return sum(k * (k - 1) // 2 for band in range(keys.shape[1]) for k in Counter(keys[:, band].tolist()).values())


@pytest.mark.spark
def test_the_count_is_the_band_join_size_and_the_distance_falls_until_it_fits(spark):
    hashes = clustered_hashes()
    frame = spark.createDataFrame([(int(h),) for h in hashes], "phash long")
    expect = {d: pairs_by_counter(hashes, d) for d in range(5)}
    assert expect[4] >= len(hashes) * (len(hashes) - 1) // 2 > 5 * expect[3]
    for d in (4, 3, 1):
        assert candidate_pairs_at(frame, d) == expect[d]
    for src in (frame, hashes):  # Spark's count (the big search) and numpy's (the one-task search)
        assert fitting_distance(src, 4, max_pairs=expect[4]) == (4, expect[4])
        assert fitting_distance(src, 4, max_pairs=expect[4] - 1) == (3, expect[3])
        assert fitting_distance(src, 4, max_pairs=0)[0] <= 1


@pytest.mark.parametrize("d", [0, 1, 2, 3, 4, 7, 63])
def test_band_join_size_counts_every_bucket_pair(d: int) -> None:
    rng = np.random.default_rng(d)
    hashes = np.unique(np.concatenate([clustered_hashes(200, d), rng.integers(-(1 << 63), (1 << 63) - 1, 300,
                                                                              dtype=np.int64, endpoint=True)]))
    assert band_join_size(hashes, d) == pairs_by_counter(hashes, d)
    assert band_join_size(hashes.view(np.uint64), d) == pairs_by_counter(hashes, d)
    assert band_join_size(np.zeros(0, np.int64), d) == band_join_size(hashes[:1], d) == 0


def checked_rows(n: int = 400, seed: int = 1) -> pa.Table:
    """Checked rows with signals: exact duplicates, near hashes, outliers, failed and signal-less rows."""
    rng = np.random.default_rng(seed)
    base = rng.integers(-(1 << 63), (1 << 63) - 1, 60, dtype=np.int64, endpoint=True)
    rows = []
    for k in range(n):
        h = int(base[k % 60] ^ (np.int64(1) << np.int64(int(rng.integers(0, 64)))) if k % 3 else base[k % 60])
        status = "ok" if k % 17 else "undecodable"
        content = f"c{k % 350:04d}"  # rows k and k + 350 are exact duplicates
        # Exact duplicates have the same bytes, so both have signals or neither (e.g. a too-small image).
        signals = None if (k % 350) % 41 == 0 else (float(rng.gamma(2, 400)), float(rng.uniform(0, 255)),
                                            float(rng.uniform(0, 90)), float(rng.uniform(0, 8)))
        rows.append({"path": f"file:///d/{rng.integers(0, 1 << 20):06x}-{k}.jpg", "image_id": f"id{k:05d}",
                     "status": status, "content_hash": content, "phash": None if signals is None else h,
                     **dict(zip(("blur", "brightness", "contrast", "entropy"), signals or (None,) * 4))})
    return pa.Table.from_pylist(rows, schema=pa.schema(
        [("path", pa.string()), ("image_id", pa.string()), ("status", pa.string()), ("content_hash", pa.string()),
         ("phash", pa.int64()), ("blur", pa.float64()), ("brightness", pa.float64()), ("contrast", pa.float64()),
         ("entropy", pa.float64())]))


@pytest.mark.spark
def test_the_one_task_summaries_equal_sparks(spark, tmp_path):
    """``quality_summary_table`` and ``near_duplicate_summary_table`` (the manifest's one-task organize) give
    ``quality_summary``'s and ``near_duplicate_summary``'s keys and values, and the same near-duplicate map;
    percentiles exact in the task, within Spark's 1 % of rank there."""
    from imgfeat.metadata.manifest.data_quality import (
        near_duplicate_summary,
        near_duplicate_summary_table,
        originals,
        quality_summary,
        quality_summary_table,
    )

    table = checked_rows()
    schema = ("path string, image_id string, status string, content_hash string, phash long, blur double, "
              "brightness double, contrast double, entropy double")
    frame = spark.createDataFrame([tuple(r.values()) for r in table.to_pylist()], schema=schema)
    firsts = originals(frame, str(tmp_path / "orig"))
    got, want = quality_summary_table(table), quality_summary(firsts)
    assert got["outliers"] == want["outliers"] and got["examples"] == want["examples"] and got["rows"] == want["rows"]
    assert sum(got["outliers"].values()) > 0 and got["rows"] > 300
    ok = table.filter(pa.compute.and_(pa.compute.equal(table["status"], "ok"), pa.compute.is_valid(table["phash"])))
    first: dict[str, dict] = {}  # exact duplicates count once: each content hash at its smallest path
    for r in ok.to_pylist():
        if r["content_hash"] not in first or r["path"] < first[r["content_hash"]]["path"]:
            first[r["content_hash"]] = r
    assert got["rows"] == len(first) < ok.num_rows
    ok = pa.Table.from_pylist(list(first.values()), schema=ok.schema)
    for col, ps in got["percentiles"].items():
        values = np.sort(ok[col].to_numpy())
        n = len(values)
        for name, q in (("p1", 0.01), ("p50", 0.5), ("p99", 0.99)):
            rank = max(int(np.ceil(q * n)) - 1, 0)
            assert ps[name] == round(float(values[rank]), 3)
            near = values[max(rank - int(0.01 * n) - 1, 0): rank + int(0.01 * n) + 2]
            assert near.min() - 1e-3 <= want["percentiles"][col][name] <= near.max() + 1e-3, (col, name)
    for max_pairs in (None, 0):
        summary, near_map = near_duplicate_summary_table(table, 3, max_pairs)
        spark_summary, url = near_duplicate_summary(spark, firsts, 3, str(tmp_path / f"s{max_pairs}"), max_pairs)
        assert summary == spark_summary
        spark_map = pa.concat_tables(pq.read_table(str(tmp_path / f"s{max_pairs}" / "near_map" / f.name))
                                     for f in (tmp_path / f"s{max_pairs}" / "near_map").glob("*.parquet"))
        key = [("content_hash", "ascending")]
        assert near_map.sort_by(key).to_pylist() == spark_map.sort_by(key).to_pylist()
    assert summary["distance"] < 3 and spark_summary["groups"] >= 0
    summary, near_map = near_duplicate_summary_table(table, 3)
    assert summary["groups"] >= 20 and near_map.num_rows == summary["duplicates"]
    assert quality_summary_table(table.slice(0, 0)) == quality_summary(originals(frame.limit(0), None))
