"""The near-duplicate search's candidate budget (``data_quality.fitting_distance``)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from imgfeat.metadata.manifest.data_quality import candidate_pairs_at, fitting_distance
from imgfeat.metadata.manifest.near_duplicates import band_values

pytestmark = pytest.mark.spark


def clustered_hashes(n: int = 300, seed: int = 0) -> np.ndarray:
    """Distinct hashes whose lowest 13 bits are all equal: one band bucket of every hash at distance 4."""
    rng = np.random.default_rng(seed)
    high = rng.integers(0, 1 << 62, n, dtype=np.int64) << np.int64(13)
    return np.unique(high | np.int64(0x155))


def pairs_by_numpy(hashes: np.ndarray, distance: int) -> int:
    keys = band_values(hashes, distance)
    return sum(k * (k - 1) // 2 for band in range(keys.shape[1]) for k in Counter(keys[:, band].tolist()).values())


def test_the_count_is_the_band_join_size_and_the_distance_falls_until_it_fits(spark):
    hashes = clustered_hashes()
    frame = spark.createDataFrame([(int(h),) for h in hashes], "phash long")
    expect = {d: pairs_by_numpy(hashes, d) for d in range(5)}
    assert expect[4] >= len(hashes) * (len(hashes) - 1) // 2 > 5 * expect[3]
    for d in (4, 3, 1):
        assert candidate_pairs_at(frame, d) == expect[d]
    assert fitting_distance(frame, 4, max_pairs=expect[4]) == (4, expect[4])
    assert fitting_distance(frame, 4, max_pairs=expect[4] - 1) == (3, expect[3])
    assert fitting_distance(frame, 4, max_pairs=0)[0] <= 1
