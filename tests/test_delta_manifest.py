"""The manifest as a Delta table (``[manifest] table_format = "delta"``): versions, time travel, readers."""
from __future__ import annotations

import pytest

from helpers import gradient_image, write_image

pytestmark = pytest.mark.spark

deltalake = pytest.importorskip("deltalake", reason="the deltalake package is not installed (pip install -e .[test])")


def test_two_incremental_runs_are_two_versions_and_every_reader_sees_the_current_one(spark, tmp_path, capsys):
    import duckdb
    import polars

    from imgfeat.metadata.config import load_config
    from imgfeat.metadata.contracts import delta
    from imgfeat.metadata.contracts.schema import read_manifest
    from imgfeat.metadata.contracts.shard_index import read_shard_index
    from imgfeat.metadata.manifest.job import run_manifest
    from imgfeat.metadata.spark.parquet import read_parquet_dataset

    src, out = tmp_path / "src", tmp_path / "out"
    for label in ("a", "b"):
        for i in range(4):
            write_image(src / label / f"{i}.jpg", gradient_image(40 + i, 48, seed=i + (10 if label == "b" else 0)))
    cfg = load_config(None, {"manifest": {"table_format": "delta", "rows_per_shard": 3}})
    first = run_manifest(cfg, [str(src)], str(out))
    table = out / "manifest"
    assert (table / "_delta_log").is_dir() and first["total"] == 8 and delta.table_version(str(table)) == 0

    (src / "a" / "0.jpg").unlink()
    for i in range(3):
        write_image(src / "b" / f"new{i}.jpg", gradient_image(50, 44, seed=90 + i))
    second = run_manifest(cfg, [str(src)], str(out), incremental=True)
    assert second["incremental"] == {"unchanged": 7, "new": 3, "changed": 0, "removed": 1}
    assert delta.table_version(str(table)) == 1
    assert [h["version"] for h in delta.history(str(table))] == [1, 0]

    paths = sorted(r["rel_path"] for r in read_manifest(str(out)).to_pylist())
    assert len(paths) == 10 and "a/0.jpg" not in paths and "b/new2.jpg" in paths
    v0 = delta.open_dataset(str(table), version=0).to_table()
    assert v0.num_rows == 8 and "a/0.jpg" in v0["rel_path"].to_pylist()  # time travel
    assert polars.read_delta(str(table)).height == 10
    assert duckdb.from_arrow(delta.open_dataset(str(table))).aggregate("count(*)").fetchall()[0][0] == 10
    assert read_parquet_dataset(spark, str(table)).count() == 10  # Spark through the log, not the folder
    assert len(list(table.glob("*.parquet"))) > len(delta.current_files(str(table)))  # v0's files stay
    from imgfeat.cli import main

    assert main(["manifest", "--show", str(out)]) == 0
    assert "Delta table" in capsys.readouterr().out
    index = read_shard_index(str(out))
    assert index is not None and sum(index["rows"].to_pylist()) == second["by_status"]["ok"]


def test_delta_on_an_object_store_is_refused_before_any_work(spark, tmp_path):
    from imgfeat.metadata.config import load_config
    from imgfeat.metadata.manifest.job import run_manifest

    write_image(tmp_path / "src" / "a" / "0.jpg", gradient_image(40, 48, seed=1))
    cfg = load_config(None, {"manifest": {"table_format": "delta"}})
    with pytest.raises(ValueError, match="table_format = 'delta'"):
        run_manifest(cfg, [str(tmp_path / "src")], "memory://bucket/out")


@pytest.mark.slow
def test_a_run_on_a_delta_manifest_featurizes_and_verifies_and_reduces_into_a_delta_table(spark, torch_home, tmp_path):
    from pathlib import Path

    from imgfeat.metadata.config import load_config
    from imgfeat.run import run_pipeline
    from imgfeat.verify import verify_run

    src = tmp_path / "src"
    for label in ("a", "b"):
        for i in range(5):
            write_image(src / label / f"{i}.jpg", gradient_image(48 + i, 40, seed=i + (10 if label == "b" else 0)))
    (src / "a" / "cut.jpg").write_bytes((src / "a" / "0.jpg").read_bytes()[:150])
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "demo.toml", {
        "run": {"sources": [str(src)], "out": str(tmp_path / "run")},
        "manifest": {"rows_per_shard": 4, "table_format": "delta"},
        "preprocess": {"size": 64, "resize_shorter": 72, "batch_size": 4, "num_workers": 1},
        "pca": {"k": 3, "table_format": "delta"},
    })
    report = run_pipeline(cfg)
    acc = report["accounting"]
    assert acc["reconciles"] and acc["manifest_rows"] == 11 and acc["feature_rows"] == 10
    v = verify_run(str(tmp_path / "run"), str(tmp_path / "run" / "features"))
    assert v.ok, v.problems
    reduced = deltalake.DeltaTable(str(tmp_path / "run" / "pca" / "reduced")).to_pyarrow_table()
    assert reduced.num_rows == 10 and len(reduced["features_pca"][0].as_py()) == 3
