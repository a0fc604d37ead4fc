"""Parquet datasets written and read by Spark tasks through fsspec (imgfeat.metadata.spark.parquet)."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgfeat.metadata.spark.parquet import dataset_files, read_parquet_dataset, write_parquet_dataset

pytestmark = pytest.mark.spark


def test_write_then_read_round_trip(spark, tmp_path) -> None:
    target = tmp_path / "ds"
    target.mkdir()
    (target / "part-00009-stale.parquet").write_bytes(b"junk from an earlier run")
    (target / ".part-00001-x.parquet.tmp-1-abc").write_bytes(b"temporary of a killed task")
    rows = [(i, f"id{i}", [float(i), 0.5]) for i in range(50)]
    df = spark.createDataFrame(rows, "n long, image_id string, v array<float>").repartition(3)
    schema = pa.schema([("image_id", pa.string()), ("n", pa.int64()), ("v", pa.list_(pa.float32()))])
    url = "file://" + str(target)
    res = write_parquet_dataset(df, url, schema)
    assert res["rows"] == 50
    names = sorted(p.name for p in target.iterdir())
    assert names == sorted(res["files"] + ["_SUCCESS"])  # stale and temporary files are gone
    assert all(n.startswith("part-") and n.endswith(".parquet") for n in res["files"])
    assert json.loads((target / "_SUCCESS").read_text())["rows"] == 50
    table = pq.read_table(str(target))
    assert table.schema.equals(schema) and table.num_rows == 50
    back = read_parquet_dataset(spark, url)
    assert back.columns == ["image_id", "n", "v"]
    got = sorted((r["n"], r["image_id"], list(r["v"])) for r in back.collect())
    assert got == [(i, f"id{i}", [float(i), 0.5]) for i in range(50)]
    assert read_parquet_dataset(spark, str(target), columns=["n"]).count() == 50
    with pytest.raises(ValueError, match="no column"):
        read_parquet_dataset(spark, str(target), columns=["nope"])


def test_empty_result_keeps_schema(spark, tmp_path) -> None:
    df = spark.createDataFrame([(1, "a")], "n long, s string").filter("n > 5")
    res = write_parquet_dataset(df, str(tmp_path / "empty"))
    assert res["rows"] == 0 and len(res["files"]) == 1
    assert pq.read_table(str(tmp_path / "empty")).schema.names == ["n", "s"]
    assert len(dataset_files(str(tmp_path / "empty"))) == 1


def test_overwrite_refused_when_asked(spark, tmp_path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.parquet").write_bytes(b"x")
    with pytest.raises(ValueError, match="not empty"):
        write_parquet_dataset(spark.range(3), str(tmp_path / "d"), overwrite=False)
