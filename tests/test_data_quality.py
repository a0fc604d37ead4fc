"""The near-duplicate search's candidate budget (``near_duplicates.fitting_distance``, used by
``data_quality.near_duplicate_summary``): Spark's count and numpy's against a plain count of the buckets."""
from __future__ import annotations

from collections import Counter

import numpy as np
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
