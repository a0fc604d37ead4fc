"""PCA math without Spark: moments merging, exact fit vs scikit-learn, k selection, randomized vs exact, model file."""
from __future__ import annotations

import numpy as np
import pytest

from imgfeat.metadata.pca.fit import (
    CovProduct,
    Moments,
    PcaModel,
    choose_k,
    dump_accumulator,
    fit_exact,
    fit_randomized,
    load_accumulator,
    pack_upper,
    principal_angles,
    unpack_upper,
)


def low_rank(n: int, d: int, spectrum: list[float], seed: int = 0, noise: float = 0.05, offset: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((d, len(spectrum))))
    z = rng.standard_normal((n, len(spectrum))) * np.asarray(spectrum)
    x = z @ basis.T + noise * rng.standard_normal((n, d)) + offset + rng.standard_normal(d)
    return x.astype(np.float32)


def load_moments(data: bytes) -> Moments:
    """``load_accumulator`` for bytes that must hold Moments (not a CovProduct)."""
    acc = load_accumulator(data)
    assert isinstance(acc, Moments)
    return acc


def test_moments_merge_matches_direct() -> None:
    x = low_rank(500, 12, [5, 3, 1]).astype(np.float64)
    m = Moments()
    for part in np.array_split(x, 7):
        m.merge(Moments().add(part))
    xc = x - x.mean(0)
    assert m.n == 500
    np.testing.assert_allclose(m.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.m2, xc.T @ xc, rtol=1e-10, atol=1e-9)
    diag = Moments(full=False)
    for part in np.array_split(x, 3):
        diag.merge(Moments(full=False).add(part))
    np.testing.assert_allclose(diag.variance, x.var(0, ddof=1), rtol=1e-10)


@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_common_shift_sums_merge_through_files(full: bool, dtype: type) -> None:
    """Task accumulators around one shift, written and read back as files, add up to the direct moments."""
    x: np.ndarray = low_rank(3000, 700, [9, 4, 2, 1], offset=50.0).astype(dtype)  # wide: the float32 product path
    shift = x[:100].astype(np.float64).mean(0)
    total = Moments.with_shift(shift, full=full)
    parts = np.array_split(x, 5)
    for part in [*parts, x[:0]]:  # an empty task too
        acc = Moments.with_shift(shift, full=full).add(part)
        total.merge(load_moments(dump_accumulator(acc)))
    assert total.n == 0 and total._n == 3000  # still plain sums: nothing settled before the end
    total.settle()
    x64 = x.astype(np.float64)
    xc = x64 - x64.mean(0)
    assert total.n == 3000
    tol = 1e-10 if dtype is np.float64 else 1e-5  # float32 rows: centered values are rounded once to float32
    np.testing.assert_allclose(total.mean, x64.mean(0), rtol=tol * 1e-3)
    want = xc.T @ xc if full else np.einsum("ij,ij->j", xc, xc)
    np.testing.assert_allclose(total.m2, want, rtol=tol, atol=tol * float(np.abs(want).max()))
    # more rows after a merge keep accumulating around the same shift
    more = Moments.with_shift(shift, full=full).add(parts[0])
    more.merge(load_moments(dump_accumulator(Moments.with_shift(shift, full=full).add(parts[1]))))
    more.add(parts[2]).settle()
    np.testing.assert_allclose(more.mean, np.concatenate(parts[:3]).astype(np.float64).mean(0), rtol=1e-9)


def test_sums_with_other_shifts_fall_back_to_chan() -> None:
    x = low_rank(400, 10, [3, 1]).astype(np.float64)
    a = Moments.with_shift(np.zeros(10)).add(x[:200])
    b = Moments.with_shift(np.ones(10)).add(x[200:])
    a.merge(b)
    xc = x - x.mean(0)
    np.testing.assert_allclose(a.m2, xc.T @ xc, rtol=1e-10, atol=1e-9)


def test_pack_upper_round_trip() -> None:
    rng = np.random.default_rng(3)
    acc = rng.standard_normal((1100, 1100))
    got = unpack_upper(pack_upper(acc, 512), 1100, 512)
    np.testing.assert_array_equal(np.triu(got), np.triu(acc))
    with pytest.raises(ValueError, match="packed moments"):
        unpack_upper(pack_upper(acc, 512)[:-1], 1100, 512)


@pytest.mark.parametrize("standardize", [False, True])
def test_exact_fit_matches_sklearn(standardize: bool) -> None:
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    x = low_rank(400, 20, [9, 6, 4, 2.5, 1.5], seed=1)
    model = fit_exact(Moments().add(x), k=5, variance=0.0, standardize=standardize)
    x64 = x.astype(np.float64)
    ref_in = StandardScaler().fit_transform(x64) * np.sqrt(399 / 400) if standardize else x64
    # StandardScaler divides by the ddof=0 std; rescale to ddof=1 like Spark's StandardScaler (same subspace anyway).
    ref = PCA(n_components=5, svd_solver="full").fit(ref_in)
    assert principal_angles(model.components, ref.components_).max() < 1e-6
    np.testing.assert_allclose(np.abs(np.sum(model.components * ref.components_, axis=1)), 1.0, atol=1e-8)
    np.testing.assert_allclose(model.explained_variance_ratio, ref.explained_variance_ratio_, rtol=1e-6)
    if not standardize:
        np.testing.assert_allclose(model.explained_variance, ref.explained_variance_, rtol=1e-6)
        np.testing.assert_allclose(model.transform(x), ref.transform(x64), rtol=1e-4, atol=1e-4)


def test_choose_k_by_variance() -> None:
    ratio = np.array([0.5, 0.3, 0.1, 0.05, 0.05])
    assert choose_k(ratio, 64, 0.8, 5) == 2
    assert choose_k(ratio, 64, 0.80000000001, 5) == 2  # float noise does not add a component
    assert choose_k(ratio, 64, 0.81, 5) == 3
    assert choose_k(ratio, 64, 1.0, 5) == 5
    assert choose_k(ratio, 3, 0.0, 5) == 3
    with pytest.raises(ValueError, match="pca.k"):
        choose_k(ratio, 6, 0.0, 5)


def test_variance_selection_in_fit() -> None:
    x = low_rank(300, 10, [10, 5, 1], seed=2, noise=0.01)
    model = fit_exact(Moments().add(x), k=64, variance=0.95, standardize=False)
    cum = np.cumsum(model.spectrum_ratio)
    assert cum[model.k - 1] >= 0.95 and (model.k == 1 or cum[model.k - 2] < 0.95)
    assert model.k == 2


def test_randomized_matches_exact_on_wide_data() -> None:
    x = low_rank(300, 600, [20, 15, 11, 8, 6, 4], seed=3, noise=0.05)
    mom = Moments().add(x)
    exact = fit_exact(mom, k=6, variance=0.0, standardize=True)
    diag = Moments(full=False).add(x)

    def product(mean, scale, q):
        acc = CovProduct(mean, scale, q)
        for part in np.array_split(x, 4):  # as tasks would
            acc.merge(CovProduct(mean, scale, q).add(part).light())
        return acc

    rnd = fit_randomized(diag, product, k=6, variance=0.0, standardize=True)
    assert rnd.method == "randomized"
    assert principal_angles(rnd.components, exact.components).max() < 1e-3
    np.testing.assert_allclose(rnd.explained_variance, exact.explained_variance, rtol=1e-6)
    np.testing.assert_allclose(rnd.explained_variance_ratio, exact.explained_variance_ratio, rtol=1e-6)
    np.testing.assert_allclose(np.abs(np.sum(rnd.components * exact.components, axis=1)), 1.0, atol=1e-6)


def test_model_roundtrip(tmp_path) -> None:
    x = low_rank(100, 8, [4, 2], seed=4)
    model = fit_exact(Moments().add(x), k=3, variance=0.0, standardize=True)
    path = str(tmp_path / "m.npz")
    model.save(path)
    back = PcaModel.load(path)
    assert back.k == 3 and back.standardize and back.method == "exact" and back.n_fit == 100
    np.testing.assert_array_equal(back.transform(x), model.transform(x))
    raw = np.load(path)  # plain numpy can read it
    assert raw["components"].shape == (3, 8)
    with pytest.raises(ValueError, match="no such model"):
        PcaModel.load(str(tmp_path / "absent.npz"))


def test_too_few_rows() -> None:
    with pytest.raises(ValueError, match="pca.fit_split"):
        fit_exact(Moments().add(np.ones((1, 4), np.float32)), k=1, variance=0.0, standardize=False)


def test_wide_float32_products_match_float64() -> None:
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(3000, 8)) @ rng.normal(size=(8, 600)) + rng.normal(scale=0.3, size=(3000, 600)) + 5).astype(np.float32)
    single = fit_exact(Moments().add(x), k=8, variance=0.0, standardize=False)
    double = fit_exact(Moments().add(x.astype(np.float64)), k=8, variance=0.0, standardize=False)
    assert principal_angles(single.components, double.components).max() < 1e-6
    np.testing.assert_allclose(single.explained_variance, double.explained_variance, rtol=1e-7)


@pytest.mark.parametrize("fmt", ["npy", "hdf5"])
def test_feature_head_reads_only_the_first_rows(tmp_path, fmt: str) -> None:
    from imgfeat.metadata.contracts.feature_store import read_feature_head, read_feature_shard, write_feature_shard

    x = np.arange(50 * 6, dtype=np.float32).reshape(50, 6)
    marker = write_feature_shard(str(tmp_path), 3, [f"id{i}" for i in range(50)], x, [], fmt, "fp")
    stem = "part-00003"
    np.testing.assert_array_equal(read_feature_head(str(tmp_path), stem, marker, 7), x[:7])
    np.testing.assert_array_equal(read_feature_head(str(tmp_path), stem, marker, 500), read_feature_shard(str(tmp_path), stem, marker)[1])


def test_idle_cores_is_within_the_cpus_this_process_may_use() -> None:
    import os

    from imgfeat.metadata.pca.fit import idle_cores

    got = idle_cores(0.02)
    assert 1 <= got <= len(os.sched_getaffinity(0))
