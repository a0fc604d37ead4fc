"""The pca stage on Spark: join accounting, shard verification, Spark ML / scikit-learn equality, k selection, apply."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from imgfeat.metadata.config import Config
from imgfeat.metadata.contracts import feature_store
from imgfeat.metadata.contracts.schema import image_id_for, normalize_uri
from imgfeat.metadata.pca.fit import PcaModel, principal_angles

from helpers import write_manifest

pytestmark = pytest.mark.spark

SPECTRUM = [9.0, 6.0, 4.0, 2.5, 1.5]


def low_rank(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((d, len(SPECTRUM))))
    z = rng.standard_normal((n, len(SPECTRUM))) * np.asarray(SPECTRUM)
    return (z @ basis.T + 0.05 * rng.standard_normal((n, d)) + 2.0 + rng.standard_normal(d)).astype(np.float32)


def make_data(root: Path, n: int = 120, d: int = 16, per_shard: int = 25, fmt: str = "npy", seed: int = 0,
              extra_manifest: list[dict] | None = None) -> dict:
    """A manifest of n ok rows (labels a/b/c, splits train/test) and feature shards holding them all."""
    files = [{"path": f"/data/img/{'abc'[i % 3]}/{i:04d}.jpg", "label": "abc"[i % 3],
              "split": "train" if i % 5 else "test"} for i in range(n)]
    man = root / "out"
    write_manifest(man, files + (extra_manifest or []))
    ids = [image_id_for(normalize_uri(f["path"])) for f in files]
    x = low_rank(n, d, seed)
    feat = root / "feat"
    for s, start in enumerate(range(0, n, per_shard)):
        feature_store.write_feature_shard(str(feat), s, ids[start:start + per_shard], x[start:start + per_shard], [], fmt, "test")
    return {"manifest": str(man), "features": str(feat), "ids": ids, "x": x, "files": files}


def cfg(**pca) -> Config:
    c = Config()
    c.spark.master = "local[2,3]"
    c.spark.partitions = 4
    for k, v in pca.items():
        setattr(c.pca, k, v)
    return c.validate()


def read_reduced(out: Path) -> dict[str, np.ndarray]:
    table = pq.read_table(out / "reduced")
    return {i: np.asarray(v, dtype=np.float32) for i, v in zip(table["image_id"].to_pylist(), table["features_pca"].to_pylist())}


def test_end_to_end_outputs_and_projection(spark, tmp_path) -> None:
    from imgfeat.metadata.pca.job import run_pca

    data = make_data(tmp_path)
    out = tmp_path / "red"
    summary = run_pca(cfg(k=3), data["manifest"], data["features"], str(out), spark=spark)
    assert summary["rows"]["with_features"] == 120 and summary["output_rows"] == 120
    assert summary["fit_rows"] == 96 and summary["k"] == 3
    for name in ("pca_model.npz", "pca_summary.json", "config.resolved.toml", "pca_explained_variance.png",
                 "pca_scatter.png", "reduced/_SUCCESS"):
        assert (out / name).exists(), name
    table = pq.read_table(out / "reduced")
    assert table.column_names == ["image_id", "path", "label", "label_index", "split", "features_pca"]
    assert str(table.schema.field("features_pca").type) == "list<element: float>"
    assert sorted(table["image_id"].to_pylist()) == sorted(data["ids"])
    model = PcaModel.load(str(out / "pca_model.npz"))
    got = read_reduced(out)
    want = model.transform(data["x"])
    for i, image_id in enumerate(data["ids"]):
        np.testing.assert_allclose(got[image_id], want[i], rtol=1e-6, atol=1e-6)
    # readable without our code: pandas and Spark's own Parquet reader
    import pandas as pd

    pdf = pd.read_parquet(out / "reduced")
    assert len(pdf) == 120 and len(pdf["features_pca"].iloc[0]) == 3
    sdf = spark.read.parquet(str(out / "reduced"))
    assert sdf.count() == 120 and dict(sdf.dtypes)["features_pca"] == "array<float>"
    # a second run replaces the output, no leftovers
    run_pca(cfg(k=2), data["manifest"], data["features"], str(out), spark=spark, plots=False)
    assert len(pq.read_table(out / "reduced")) == 120
    assert json.loads((out / "pca_summary.json").read_text())["k"] == 2


def test_join_accounting_missing_rejected_and_extra(spark, tmp_path) -> None:
    from imgfeat.metadata.pca.job import run_pca

    data = make_data(tmp_path, n=60, per_shard=20, extra_manifest=[
        {"path": "/data/img/a/missing.jpg", "label": "a", "split": "train"},
        {"path": "/data/img/a/broken.jpg", "label": "a", "split": "train", "status": "truncated"},
        {"path": "/data/img/b/rejected.jpg", "label": "b", "split": "train"},
    ])
    feat = data["features"]
    rng = np.random.default_rng(9)
    rejected = image_id_for(normalize_uri("/data/img/b/rejected.jpg"))
    stray = [image_id_for(f"/elsewhere/{i}.jpg") for i in range(3)]
    feature_store.write_feature_shard(feat, 3, stray, rng.standard_normal((3, 16)).astype(np.float32),
                        [{"image_id": rejected, "path": "/data/img/b/rejected.jpg", "reason": "undecodable", "detail": "x"}],
                        "npy", "test")
    with pytest.raises(ValueError, match="3 feature row"):
        run_pca(cfg(k=2), data["manifest"], feat, str(tmp_path / "red"), spark=spark, plots=False)
    summary = run_pca(cfg(k=2, allow_extra=True), data["manifest"], feat, str(tmp_path / "red"), spark=spark, plots=False)
    rows = summary["rows"]
    assert rows["manifest_rows"] == 63
    assert rows["with_features"] == 60 and summary["output_rows"] == 60
    assert rows["without_features"] == 3
    assert rows["without_features_by_reason"] == {"not_featurized": 1, "manifest:truncated": 1, "featurize:undecodable": 1}
    assert rows["extra_feature_rows"] == 3 and rows["feature_rows"] == 63
    assert sorted(rows["extra_examples"]) == sorted(stray)
    assert rows["by_split"] == {"train": 48, "test": 12}
    assert rows["manifest_rows"] == rows["with_features"] + rows["without_features"]


def test_duplicate_feature_rows_detected(spark, tmp_path) -> None:
    from imgfeat.metadata.pca.job import run_pca

    data = make_data(tmp_path, n=40, per_shard=20)
    feature_store.write_feature_shard(data["features"], 2, data["ids"][:5], data["x"][:5], [], "npy", "test")  # ids already in shard 0
    with pytest.raises(ValueError, match="5 image id"):
        run_pca(cfg(k=2), data["manifest"], data["features"], str(tmp_path / "red"), spark=spark, plots=False)
    summary = run_pca(cfg(k=2, allow_extra=True), data["manifest"], data["features"], str(tmp_path / "red"), spark=spark,
                      plots=False)
    assert summary["rows"]["duplicate_feature_rows"] == 5 and summary["output_rows"] == 40
    assert summary["rows"]["feature_rows"] == 45


def test_corrupted_shard_is_refused_by_name(spark, tmp_path) -> None:
    from imgfeat.metadata.contracts.shards import ShardVerificationError
    from imgfeat.metadata.pca.job import run_pca

    data = make_data(tmp_path, n=40, per_shard=20)
    victim = Path(data["features"]) / "part-00001.features.npy"
    raw = bytearray(victim.read_bytes())
    raw[-3] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(ShardVerificationError, match="part-00001.features.npy"):
        run_pca(cfg(k=2), data["manifest"], data["features"], str(tmp_path / "red"), spark=spark, plots=False)


@pytest.mark.parametrize("standardize", [False, True])
def test_equals_spark_ml_and_sklearn(spark, tmp_path, standardize: bool) -> None:
    from pyspark.ml.feature import PCA, StandardScaler
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F
    from sklearn.decomposition import PCA as SkPCA

    from imgfeat.metadata.pca.job import run_pca
    from imgfeat.metadata.pca.shard_io import features_dataframe

    data = make_data(tmp_path, n=200, d=12, per_shard=50, fmt="hdf5", seed=5)
    summary = run_pca(cfg(k=4, standardize=standardize, fit_split=""), data["manifest"], data["features"],
                      str(tmp_path / "red"), spark=spark, plots=False)
    ours = PcaModel.load(str(tmp_path / "red" / "pca_model.npz"))
    assert summary["fit_rows"] == 200

    df = features_dataframe(spark, data["features"]).select(array_to_vector(F.col("features")).alias("v"))
    col = "v"
    if standardize:  # the seed's StandardScaler (withStd, no centering; PCA centers anyway)
        df = StandardScaler(inputCol="v", outputCol="s", withStd=True, withMean=False).fit(df).transform(df)
        col = "s"
    sm = PCA(k=4, inputCol=col, outputCol="p").fit(df)
    spark_pc = sm.pc.toArray().T  # [k, d]
    assert principal_angles(ours.components, spark_pc).max() < 1e-3
    np.testing.assert_allclose(ours.explained_variance_ratio, sm.explainedVariance.toArray(), rtol=1e-6)

    x = data["x"].astype(np.float64)
    if standardize:
        x = x / x.std(axis=0, ddof=1)
    sk = SkPCA(n_components=4, svd_solver="full").fit(x)
    assert principal_angles(ours.components, sk.components_).max() < 1e-6
    np.testing.assert_allclose(ours.explained_variance_ratio, sk.explained_variance_ratio_, rtol=1e-6)
    np.testing.assert_allclose(np.abs(np.sum(ours.components * sk.components_, axis=1)), 1.0, atol=1e-8)
    # Spark ML's transform does not subtract the mean: its output differs from ours by a constant row
    spark_out = np.array([r["p"].toArray() for r in sm.transform(df).select("p").collect()])
    if not standardize:
        signs = np.sign(np.sum(ours.components * spark_pc, axis=1))
        shifted = (spark_out - ours.mean @ spark_pc.T) * signs
        ref = ours.transform(data["x"])
        np.testing.assert_allclose(np.sort(shifted[:, 0]), np.sort(ref[:, 0]), rtol=1e-4, atol=1e-4)


def test_k_versus_variance_selection(spark, tmp_path) -> None:
    from imgfeat.metadata.pca.job import run_pca

    data = make_data(tmp_path, n=100, per_shard=50)
    s1 = run_pca(cfg(k=4), data["manifest"], data["features"], str(tmp_path / "r1"), spark=spark, plots=False)
    assert s1["k"] == 4
    s2 = run_pca(cfg(variance=0.9), data["manifest"], data["features"], str(tmp_path / "r2"), spark=spark, plots=False)
    model = PcaModel.load(str(tmp_path / "r2" / "pca_model.npz"))
    cum = np.cumsum(model.spectrum_ratio)
    assert cum[s2["k"] - 1] >= 0.9 and (s2["k"] == 1 or cum[s2["k"] - 2] < 0.9)
    assert len(next(iter(read_reduced(tmp_path / "r2").values()))) == s2["k"]
    with pytest.raises(ValueError, match="pca.k"):
        run_pca(cfg(k=17), data["manifest"], data["features"], str(tmp_path / "r3"), spark=spark, plots=False)
    with pytest.raises(ValueError, match="pca.fit_split"):
        run_pca(cfg(k=2, fit_split="nope"), data["manifest"], data["features"], str(tmp_path / "r4"), spark=spark,
                plots=False)


def test_apply_round_trip(spark, tmp_path) -> None:
    from imgfeat.metadata.pca.job import apply_pca, run_pca

    data = make_data(tmp_path, n=80, per_shard=30)
    run_pca(cfg(k=3, standardize=True), data["manifest"], data["features"], str(tmp_path / "red"), spark=spark, plots=False)
    fitted = read_reduced(tmp_path / "red")
    # the same shards through --apply, and brand-new shards in hdf5
    s = apply_pca(str(tmp_path / "red" / "pca_model.npz"), data["features"], str(tmp_path / "app"), spark)
    assert s["output_rows"] == 80
    applied = read_reduced(tmp_path / "app")
    assert applied.keys() == fitted.keys()
    for image_id in fitted:
        np.testing.assert_array_equal(applied[image_id], fitted[image_id])
    new = low_rank(10, 16, seed=11)
    new_ids = [image_id_for(f"/new/{i}.jpg") for i in range(10)]
    feature_store.write_feature_shard(str(tmp_path / "newfeat"), 0, new_ids, new, [], "hdf5", "test")
    apply_pca(str(tmp_path / "red" / "pca_model.npz"), str(tmp_path / "newfeat"), str(tmp_path / "app2"), spark)
    model = PcaModel.load(str(tmp_path / "red" / "pca_model.npz"))
    got = read_reduced(tmp_path / "app2")
    for i, image_id in enumerate(new_ids):
        np.testing.assert_allclose(got[image_id], model.transform(new[i:i + 1])[0], rtol=1e-6, atol=1e-6)
    bad = tmp_path / "wide"
    feature_store.write_feature_shard(str(bad), 0, new_ids[:2], np.ones((2, 5), np.float32), [], "npy", "test")
    with pytest.raises(ValueError, match="expects 16 features"):
        apply_pca(str(tmp_path / "red" / "pca_model.npz"), str(bad), str(tmp_path / "app3"), spark)


def test_randomized_method_matches_exact_through_spark(spark, tmp_path) -> None:
    from imgfeat.metadata.pca.job import run_pca

    data = make_data(tmp_path, n=150, d=300, per_shard=50)
    run_pca(cfg(k=4), data["manifest"], data["features"], str(tmp_path / "ex"), spark=spark, plots=False, method="exact")
    s = run_pca(cfg(k=4), data["manifest"], data["features"], str(tmp_path / "rn"), spark=spark, plots=False,
                method="randomized")
    assert s["method"] == "randomized"
    ex = PcaModel.load(str(tmp_path / "ex" / "pca_model.npz"))
    rn = PcaModel.load(str(tmp_path / "rn" / "pca_model.npz"))
    assert principal_angles(ex.components, rn.components).max() < 1e-3
    np.testing.assert_allclose(rn.explained_variance, ex.explained_variance, rtol=1e-6)


def test_cli(spark, tmp_path) -> None:
    from imgfeat.cli import main

    data = make_data(tmp_path, n=50, per_shard=25)
    out = tmp_path / "red"
    assert main(["pca", "--manifest", data["manifest"], "--features", data["features"], "--out", str(out),
                 "--variance", "0.8", "--standardize", "--no-plots", "--master", "local[2,3]"]) == 0
    summary = json.loads((out / "pca_summary.json").read_text())
    assert summary["standardize"] and summary["explained_variance_ratio_total"] >= 0.8
    assert "variance = 0.8" in (out / "config.resolved.toml").read_text()
    assert main(["pca", "--apply", str(out / "pca_model.npz"), "--features", data["features"],
                 "--out", str(tmp_path / "app")]) == 0
    assert main(["pca", "--features", data["features"], "--out", str(tmp_path / "x"), "--k", "0",
                 "--manifest", data["manifest"]]) == 2


def test_rows_with_nan_or_inf_features_are_left_out_and_counted(spark, tmp_path) -> None:
    """A feature row that cannot be used (NaN, inf) is counted and left out; it never fails the fit."""
    from imgfeat.metadata.pca.job import run_pca

    clean = make_data(tmp_path / "clean", n=80, per_shard=20)
    bad = make_data(tmp_path / "bad", n=80, per_shard=20)
    x = bad["x"].copy()
    poisoned = [3, 41, 77]
    x[3, 0], x[41, 5], x[77, :] = np.nan, np.inf, -np.inf
    for s, start in enumerate(range(0, 80, 20)):
        feature_store.write_feature_shard(bad["features"], s, bad["ids"][start:start + 20], x[start:start + 20], [], "npy", "test")
    summary = run_pca(cfg(k=3, fit_split=""), bad["manifest"], bad["features"], str(tmp_path / "red"), spark=spark,
                      plots=False)
    assert summary["nonfinite_feature_rows"] == 3 and summary["output_rows"] == 77
    reduced = read_reduced(tmp_path / "red")
    assert set(reduced) == set(bad["ids"]) - {bad["ids"][i] for i in poisoned}
    assert all(np.isfinite(v).all() for v in reduced.values())
    # The fit equals a fit on the finite rows alone.
    keep = [i for i in range(80) if i not in poisoned]
    model = PcaModel.load(str(tmp_path / "red" / "pca_model.npz"))
    centred = clean["x"][keep] - clean["x"][keep].mean(axis=0)
    _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    assert np.max(principal_angles(model.components, vt[:3])) < 1e-3


def test_plot_labels_in_a_script_the_font_lacks_warn_nothing(tmp_path) -> None:
    """Labels in CJK (folder names) draw as boxes with the bundled font; no warning per glyph."""
    import warnings

    from imgfeat.metadata.pca import plots

    plt = plots._figure()
    fig, ax = plt.subplots()
    ax.set_title("樱桃 cherry")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plots._save(fig, str(tmp_path / "p.png"))
    plt.close(fig)
    assert (tmp_path / "p.png").stat().st_size > 0
