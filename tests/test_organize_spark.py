"""The organize step on Spark (``organize_spark``) gives the one-task pyarrow organize's manifest and counts.

Every test builds checked Parquet files (the check tasks' output), runs ``organize.organize`` +
``organize.finish`` (the reference) and ``organize_on_spark``, and compares the manifests as tables
sorted by path, every column, and the counts; plus the Spark path's layout (rows sorted by shard, rows
without a shard last, small row groups).
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgfeat.metadata.config import Config, load_config
from imgfeat.metadata.contracts.schema import MANIFEST_SCHEMA, image_id_for, read_manifest
from imgfeat.metadata.manifest import organize as org
from imgfeat.metadata.manifest.job import CHECKED_SCHEMA
from imgfeat.metadata.manifest.organize_spark import ROW_GROUP_ROWS, organize_on_spark

pytestmark = pytest.mark.spark

LABELS = ["apple", "Zeta", "banana", "cherry", "Élan", "date"]
"""A dominant first label, upper case (sorts first), a non-ASCII one."""


def checked_rows(n: int, seed: int = 0, incremental: bool = False, prev_shards: int = 6) -> pa.Table:
    """``n`` realistic checked rows: one dominant label, unlabelled rows, folder splits, duplicates, failed
    checks, sizes with many ties (and a few ok rows without a size); with ``incremental``, unchanged rows
    (``_kept``, their previous split and shard), changed rows (``_prev``, some with the same bytes) and new ones."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    hashes: list[str] = []
    for i in range(n):
        li = rng.choice(len(LABELS) + 1, p=[0.6, 0.08, 0.08, 0.08, 0.06, 0.05, 0.05])
        label = LABELS[li] if li < len(LABELS) else None
        folder = str(rng.choice(["", "Training/", "Test/"], p=[0.6, 0.3, 0.1]))
        rel = f"{folder}{label + '/' if label else ''}img {i:05d}.jpg"
        path = f"file:///data/src/{rel}"
        if hashes and rng.random() < 0.08:  # the same bytes as an earlier file, anywhere
            ch = hashes[rng.integers(len(hashes))]
        else:
            ch = hashlib.sha256(f"{seed}/{i}".encode()).hexdigest()
            hashes.append(ch)
        row: dict[str, Any] = dict(
            image_id=image_id_for(path), path=path, rel_path=rel, label=label, size_bytes=int(rng.integers(1000, 1040)),
            mtime=float(i), format="jpeg", width=32, height=24, channels=3, content_hash=ch, status="ok",
            status_detail="", folder_split={"": None, "Training/": "train", "Test/": "test"}[folder],
            _kept=False, _pshard=None, _prev=False)
        u = rng.random()
        if u < 0.03:
            row.update(status="zero_bytes", status_detail="file is empty", content_hash=None, size_bytes=0, format=None)
        elif u < 0.05:
            row.update(status="not_image", status_detail="no image signature", format=None)
        elif u < 0.06:
            row.update(status="bad_label", status_detail="label 'a..b' contains '..'", label="a..b")
        elif u < 0.065:
            row.update(status="unreadable", status_detail="gone", content_hash=None, size_bytes=None, format=None)
        elif u < 0.07:
            row.update(size_bytes=None)
        if incremental:
            v = rng.random()
            if v < 0.5:
                row.update(_kept=True, _prev=True)
                if row["status"] == "ok":
                    row.update(_pshard=int(rng.integers(prev_shards)),
                               folder_split=row["folder_split"] or str(rng.choice(["train", "val", "test"])))
            elif v < 0.6:
                row.update(_prev=True, _pshard=int(rng.integers(prev_shards)) if rng.random() < 0.5 else None)
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=CHECKED_SCHEMA)


def write_parts(table: pa.Table, folder: Path, parts: int, seed: int = 1) -> list[str]:
    """``table`` dealt at random over ``parts`` checked files (duplicates land in different files)."""
    folder.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(table.num_rows)
    files = []
    for j, chunk in enumerate(np.array_split(order, parts)):
        path = folder / f"part-{j:05d}.parquet"
        pq.write_table(table.take(pa.array(np.sort(chunk), pa.int64())), path)
        files.append(path.as_uri())
    return files


def reference(files: list[str], cfg: Config, base: int, previous_rows: int = 0,
              near: str | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """The one-task organize (pyarrow): the manifest sorted by path and the counts."""
    mc = cfg.manifest
    parts = [pq.read_table(Path(f.removeprefix("file://"))) for f in files]
    near_table = pq.read_table(near.removeprefix("file://")) if near else None
    plans, counts = org.organize([p.select(org.NARROW_COLUMNS) for p in parts], dict(mc.split_ratios), mc.split_seed,
                                 mc.rows_per_shard, base, previous_rows, near_table, mc.near_duplicates == "drop")
    table = pa.concat_tables([org.finish(p, q, counts["label_names"], MANIFEST_SCHEMA) for p, q in zip(parts, plans)])
    return table.sort_by("path"), counts


@contextmanager
def shuffle_partitions(spark, n: int):
    old = spark.conf.get("spark.sql.shuffle.partitions")
    spark.conf.set("spark.sql.shuffle.partitions", str(n))
    try:
        yield
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", old)


def on_spark(spark, files: list[str], staging: Path, cfg: Config, partitions: int, **kw: Any) -> tuple[pa.Table, dict]:
    with shuffle_partitions(spark, partitions):
        counts = organize_on_spark(spark, files, staging.as_uri(), cfg, partitions=partitions, **kw)
    check_layout(staging)
    table = ds.dataset(str(staging), format="parquet", ignore_prefixes=["_", "."]).to_table()
    return table.sort_by("path"), counts


def check_layout(staging: Path) -> None:
    """Files in name order hold the rows sorted by (shard, path), rows without a shard last, in row groups
    of at most ``ROW_GROUP_ROWS`` whose ``shard`` statistics are written."""
    names = sorted(p for p in staging.iterdir() if p.name.endswith(".parquet"))
    assert (staging / "_SUCCESS").exists() and names
    tables = []
    for path in names:
        pf = pq.ParquetFile(path)
        assert pf.schema_arrow.equals(MANIFEST_SCHEMA)
        shard_col = pf.schema_arrow.get_field_index("shard")
        for i in range(pf.num_row_groups):
            group = pf.metadata.row_group(i)
            assert group.num_rows <= ROW_GROUP_ROWS
            assert group.column(shard_col).is_stats_set or not group.num_rows
        tables.append(pf.read())
    table = pa.concat_tables(tables)
    order = pc.sort_indices(table, [("shard", "ascending", "at_end"), ("path", "ascending", "at_end")])
    assert order.to_pylist() == list(range(table.num_rows))


def assert_same(got: pa.Table, expect: pa.Table) -> None:
    assert got.num_rows == expect.num_rows
    for name in MANIFEST_SCHEMA.names:
        assert got[name].equals(expect[name]), f"column {name} differs"
    assert got.schema.equals(MANIFEST_SCHEMA) and got.equals(expect)


def config(**manifest: Any) -> Config:
    return load_config(None, {"manifest": manifest})


def write_near_map(table: pa.Table, folder: Path, every: int, seed: int = 0) -> str:
    """A near-duplicate map over ``table``'s ok originals (smallest path per content hash): they are dealt at
    random into groups of about ``every``; each group's smallest path is its representative."""
    ok = table.filter(pc.equal(table["status"], "ok")).sort_by([("content_hash", "ascending"), ("path", "ascending")])
    firsts: dict[str, dict] = {}
    for r in ok.to_pylist():
        firsts.setdefault(r["content_hash"], r)
    rng = np.random.default_rng(seed)
    groups: dict[int, list[dict]] = {}
    for r in firsts.values():
        groups.setdefault(int(rng.integers(max(1, len(firsts) // every))), []).append(r)
    rows = []
    for members in groups.values():
        members.sort(key=lambda r: r["path"])
        rep = members[0]
        rows += [{"content_hash": m["content_hash"], "rep_hash": rep["content_hash"], "rep_id": rep["image_id"],
                  "rep_path": rep["path"]} for m in members[1:]]
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=org.NEAR_SCHEMA), folder / "part-00000.parquet")
    return (folder / "part-00000.parquet").as_uri()


def test_same_manifest_and_counts_as_one_task_with_1_or_7_partitions(spark, tmp_path):
    cfg = config(rows_per_shard=97, split_ratios={"train": 0.7, "val": 0.2, "test": 0.1}, split_seed="s1")
    table = checked_rows(4000, seed=3)
    files = write_parts(table, tmp_path / "checked", 5)
    expect, counts = reference(files, cfg, base=0)
    assert counts["by_status"]["duplicate"] > 100 and counts["by_label_split"]["apple"]["val"] > 100
    for partitions in (1, 7):
        got, got_counts = on_spark(spark, files, tmp_path / f"staging{partitions}", cfg, partitions, base=0)
        assert got_counts == counts
        assert_same(got, expect)
    shards = np.array(pc.drop_null(got["shard"]).to_pylist())
    rows = np.bincount(shards)
    assert set(shards) == set(range(counts["num_shards"])) and rows.max() - rows.min() <= 1
    assert counts["shard_rows"]["max"] - counts["shard_rows"]["min"] <= 1


@pytest.mark.parametrize("mode", ["flag", "drop"])
def test_near_duplicate_groups_give_the_same_manifest_and_counts_as_one_task(spark, tmp_path, mode):
    cfg = config(rows_per_shard=61, split_ratios={"train": 0.7, "val": 0.2, "test": 0.1}, near_duplicates=mode)
    table = checked_rows(3000, seed=8, incremental=mode == "drop")
    files = write_parts(table, tmp_path / "checked", 4)
    near = write_near_map(table, tmp_path / "near", every=4)
    expect, counts = reference(files, cfg, base=0, near=near)
    leak, conflicts = counts["leakage"], counts["label_conflicts"]
    assert leak["near_duplicate_members"] > 500 and leak["crossing_pairs"] > 20 and conflicts["families"] > 50
    assert (counts["by_status"].get("near_duplicate", 0) > 500) == (mode == "drop")
    got, got_counts = on_spark(spark, files, tmp_path / "staging", cfg, 3, base=0, near=near)
    assert got_counts == counts
    assert_same(got, expect)
    # A group stays in one split unless a member's own (folder or kept) split says otherwise: that is a crossing pair.
    rows = got.to_pylist()
    split_of = {r["image_id"]: r["split"] for r in rows}
    crossing = [r for r in rows if r["near_duplicate_of"] and r["duplicate_of"] is None
                and r["split"] != split_of[r["near_duplicate_of"]]]
    assert len(crossing) == leak["crossing_pairs"]
    by_path = {r["path"]: r for r in table.to_pylist()}
    assert all(by_path[r["path"]]["folder_split"] == r["split"] for r in crossing)


def test_incremental_run_keeps_shards_and_numbers_new_ones_after_the_previous_manifest(spark, tmp_path):
    cfg = config(rows_per_shard=50)
    table = checked_rows(2500, seed=5, incremental=True, prev_shards=9)
    files = write_parts(table, tmp_path / "checked", 3)
    previous = tmp_path / "previous"  # the previous manifest: its largest shard decides the first new one
    previous.mkdir()
    pq.write_table(pa.table({"path": ["file:///old/a", "file:///old/b"], "shard": pa.array([11, None], pa.int32())}),
                   previous / "part-00000.parquet")
    expect, counts = reference(files, cfg, base=12, previous_rows=2600)
    got, got_counts = on_spark(spark, files, tmp_path / "staging", cfg, 3, previous=previous.as_uri(), previous_rows=2600)
    assert got_counts == counts
    assert_same(got, expect)
    kept = table.filter(pc.is_valid(table["_pshard"]))
    assert counts["incremental"]["unchanged"] == pc.sum(table["_kept"]).as_py() and kept.num_rows > 500
    fresh = set(pc.drop_null(got["shard"]).to_pylist()) - set(kept["_pshard"].to_pylist())
    assert min(fresh) == 12


def test_numbering_is_the_sort_order_and_one_label_spreads_over_every_partition(spark):
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from imgfeat.metadata.manifest.organize_spark import _number, _numbered, _offsets

    rng = np.random.default_rng(0)
    keys = rng.integers(0, 50, 3000).tolist()  # many ties, broken by the id
    df = spark.createDataFrame([("only", k, f"{i:05d}") for i, k in enumerate(keys)], "label string, k long, id string")
    numbered = _numbered(df, [F.col("label"), F.col("k").desc(), F.col("id")], 5).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        counts = [(r["_p"], r["n"]) for r in numbered.groupBy("_p").agg(F.count(F.lit(1)).alias("n")).collect()]
        assert len(counts) == 5 and max(n for _, n in counts) < 1000  # no task holds the whole label
        got = numbered.select("id", _number(_offsets(counts)).alias("i")).collect()
    finally:
        numbered.unpersist()
    expect = sorted(range(len(keys)), key=lambda i: (-keys[i], i))
    assert sorted((r["i"], r["id"]) for r in got) == [(pos, f"{i:05d}") for pos, i in enumerate(expect)]


def _from_manifest(manifest: pa.Table, kept: np.ndarray, changed: np.ndarray) -> pa.Table:
    """Checked rows as the check tasks make them from a published manifest's rows: ``kept`` rows unchanged
    (their split and shard kept, a duplicate back to ok), ``changed`` rows checked again with the same bytes,
    the others as new files (no folder split: the config has ``split_from_folders = false``)."""
    rows = []
    for r, k, c in zip(manifest.to_pylist(), kept, changed):
        row = {n: r.get(n) for n in CHECKED_SCHEMA.names}
        if r["status"] == "duplicate":
            row.update(status="ok", status_detail="")
        row.update(folder_split=r["split"] if k else None, _kept=bool(k), _prev=bool(k or c),
                   _pshard=r["shard"] if (k or c) and r["status"] == "ok" else None)
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=CHECKED_SCHEMA)


def test_real_photos_same_as_the_published_manifest_and_incremental(spark, fruits_dir, tmp_path):
    from imgfeat.metadata.manifest.job import run_manifest

    extra = tmp_path / "extra" / "kiwi"  # copies of real photos (duplicates across sources) and failed files
    extra.mkdir(parents=True)
    photos = sorted((fruits_dir / "Training").rglob("*.jpg"))[:40:4]
    for i, photo in enumerate(photos):
        (extra / f"copy {i}.jpg").write_bytes(photo.read_bytes())
    (extra / "empty.jpg").write_bytes(b"")
    (extra / "notes.txt").write_text("not an image\n")
    cfg = config(validation="header", split_from_folders=False, rows_per_shard=300, split_seed="fruit",
                 near_duplicates="off")  # a near map is not rebuilt from the published rows here
    out = tmp_path / "out"
    summary = run_manifest(cfg, [str(fruits_dir), str(tmp_path / "extra")], str(out))
    published = read_manifest(str(out)).sort_by("path")
    assert summary["by_status"]["duplicate"] == len(photos)

    # A fresh run's checked rows: organizing them on Spark gives the published manifest, row for row.
    none = np.zeros(published.num_rows, bool)
    files = write_parts(_from_manifest(published, none, none), tmp_path / "checked", 4)
    expect, counts = reference(files, cfg, base=0)
    assert_same(expect, published)
    got, got_counts = on_spark(spark, files, tmp_path / "staging", cfg, 4, base=0)
    assert got_counts == counts
    assert {k: got_counts[k] for k in ("by_status", "by_label", "by_split", "num_shards", "shard_rows")} == \
        {k: summary[k] for k in ("by_status", "by_label", "by_split", "num_shards", "shard_rows")}
    assert_same(got, published)

    # An incremental rerun: 70% unchanged, 10% changed with the same bytes, 10% new, 10% removed.
    rng = np.random.default_rng(7)
    u = rng.random(published.num_rows)
    keep = u >= 0.1
    table = _from_manifest(published.filter(pa.array(keep)), (u >= 0.3)[keep], ((u >= 0.2) & (u < 0.3))[keep])
    files = write_parts(table, tmp_path / "checked2", 3)
    expect, counts = reference(files, cfg, base=summary["num_shards"], previous_rows=published.num_rows)
    got, got_counts = on_spark(spark, files, tmp_path / "staging2", cfg, 2, previous=(out / "manifest").as_uri(),
                               previous_rows=published.num_rows)
    assert got_counts == counts
    assert counts["incremental"]["removed"] == published.num_rows - pc.sum(table["_prev"]).as_py()
    assert_same(got, expect)


_row = st.tuples(
    st.sampled_from(["a", "b", "B", None]),                  # label
    st.sampled_from(["ok"] * 5 + ["zero_bytes", "bad_label"]),  # status
    st.integers(0, 12),                                      # which bytes (duplicates)
    st.one_of(st.none(), st.integers(1, 4)),                 # size
    st.sampled_from([None, None, None, "train", "test"]),    # folder split
    st.one_of(st.none(), st.integers(0, 3)),                 # previous shard (unchanged file)
)


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(_row, min_size=1, max_size=60), parts=st.integers(1, 3), per_shard=st.integers(1, 7),
       ratios=st.sampled_from([{"train": 0.8, "val": 0.1, "test": 0.1}, {"train": 0.5, "val": 0.0, "test": 0.5},
                               {"a": 1.0}]), base=st.integers(0, 5), near=st.sampled_from(["off", "flag", "drop"]))
def test_random_small_inputs_match(spark, tmp_path_factory, rows, parts, per_shard, ratios, base, near):
    tmp = tmp_path_factory.mktemp("prop")
    records = []
    for i, (label, status, which, size, split, pshard) in enumerate(rows):
        path = f"file:///s/{label}/{i:03d}.png"
        ok = status == "ok"
        records.append(dict(
            image_id=image_id_for(path), path=path, rel_path=f"{label}/{i:03d}.png", label=label, size_bytes=size,
            mtime=0.0, format="png", width=1, height=1, channels=3, content_hash=f"{which:064x}" if ok else None,
            status=status, status_detail="", folder_split=split if pshard is None else split or "val",
            _kept=pshard is not None, _pshard=pshard if ok else None, _prev=pshard is not None))
    table = pa.Table.from_pylist(records, schema=CHECKED_SCHEMA)
    files = write_parts(table, tmp / "checked", min(parts, len(rows)))
    cfg = config(rows_per_shard=per_shard, split_ratios=ratios, near_duplicates=near)
    near_url = write_near_map(table, tmp / "near", 3) if near != "off" else None
    expect, counts = reference(files, cfg, base=base, previous_rows=len(rows), near=near_url)
    got, got_counts = on_spark(spark, files, tmp / "staging", cfg, parts, base=base, previous_rows=len(rows),
                               near=near_url)
    assert got_counts == counts
    assert_same(got, expect)
