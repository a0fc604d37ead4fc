"""The organize rules on their own (no Spark): seeded splits, snake-dealt shards, duplicates."""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from imgfeat.metadata.manifest import organize as org

RATIOS = {"train": 0.8, "val": 0.1, "test": 0.1}


def checked(n: int, labels: tuple[str, ...] = ("a", "b"), dup_every: int = 0) -> pa.Table:
    """``n`` ok rows over ``labels``; with ``dup_every``, every k-th row repeats the bytes of row 0."""
    ck = [hashlib.sha256(str(i if not dup_every or i % dup_every else 0).encode()).hexdigest()[:32] for i in range(n)]
    return pa.table({
        "path": [f"file:///d/{labels[i % len(labels)]}/{i:05d}.jpg" for i in range(n)],
        "image_id": [f"{i:032x}" for i in range(n)],
        "status": ["ok"] * n,
        "label": [labels[i % len(labels)] for i in range(n)],
        "folder_split": pa.nulls(n, pa.string()),
        "size_bytes": [1000 + (i * 7919) % 5000 for i in range(n)],
        "content_hash": ck,
        "_pshard": pa.nulls(n, pa.int32()),
        "_kept": [False] * n,
        "_prev": [False] * n,
    })


def test_splits_are_exact_per_label_and_follow_the_seed():
    t = checked(2000)
    plans, summary = org.organize([t.slice(0, 700), t.slice(700)], RATIOS, "s1", 100)
    assert summary["by_label_split"] == {"a": {"test": 100, "train": 800, "val": 100},
                                         "b": {"test": 100, "train": 800, "val": 100}}
    split = pa.concat_tables(plans)["split"].to_pylist()
    again = pa.concat_tables(org.organize([t], RATIOS, "s1", 100)[0])["split"].to_pylist()
    other = pa.concat_tables(org.organize([t], RATIOS, "s2", 100)[0])["split"].to_pylist()
    assert split == again  # the same rows, however they are split into parts
    assert 0 < sum(a != b for a, b in zip(split, other)) < len(split)


def test_shards_are_balanced_and_snake_dealt_by_size():
    t = checked(1003)
    plans, summary = org.organize([t], RATIOS, "s", 100, base=5)
    shard = np.array(plans[0]["shard"].to_pylist())
    assert summary["num_shards"] == 11 and set(shard) == set(range(5, 16))
    rows = np.bincount(shard - 5)
    assert rows.max() - rows.min() <= 1
    size = np.array(t["size_bytes"].to_pylist())
    per_shard = np.bincount(shard - 5, weights=size)
    assert per_shard.max() / per_shard.min() < 1.02  # large and small files spread evenly


def test_duplicates_point_at_the_first_path_and_share_its_split():
    t = checked(300, dup_every=50)
    plan = org.organize([t], RATIOS, "s", 100)[0][0].to_pylist()
    rows = t.to_pylist()
    dups = [i for i, p in enumerate(plan) if p["duplicate_of"] is not None]
    assert dups == [50, 100, 150, 200, 250]
    for i in dups:
        assert plan[i]["duplicate_of"] == rows[0]["image_id"] and plan[i]["first_path"] == rows[0]["path"]
        assert plan[i]["split"] == plan[0]["split"] and plan[i]["shard"] is None
    assert plan[0]["shard"] is not None


def test_kept_rows_keep_their_shard_and_split():
    t = checked(40)
    kept = t.set_column(t.schema.get_field_index("_pshard"), "_pshard", pa.array([3] * 10 + [None] * 30, pa.int32()))
    kept = kept.set_column(kept.schema.get_field_index("folder_split"), "folder_split",
                           pa.array(["val"] * 10 + [None] * 30, pa.string()))
    plan = org.organize([kept], RATIOS, "s", 10, base=4)[0][0].to_pylist()
    assert [p["shard"] for p in plan[:10]] == [3] * 10 and [p["split"] for p in plan[:10]] == ["val"] * 10
    assert {p["shard"] for p in plan[10:]} == {4, 5, 6}


def near_map(t: pa.Table, groups: list[list[int]]) -> pa.Table:
    """The near-duplicate map of ``groups`` (row numbers of ``t``; the first of each is the representative)."""
    rows = t.to_pylist()
    return pa.Table.from_pylist([
        {"content_hash": rows[m]["content_hash"], "rep_hash": rows[g[0]]["content_hash"],
         "rep_id": rows[g[0]]["image_id"], "rep_path": rows[g[0]]["path"]} for g in groups for m in g[1:]],
        schema=org.NEAR_SCHEMA)


def test_a_near_duplicate_group_is_never_split_and_its_exact_duplicates_follow():
    t = checked(400, dup_every=97)  # rows 97, 194, 291, 388 repeat row 0's bytes
    groups = [[0, 5, 17, 333], [1, 2], [40, 41, 42, 43, 44, 45]]
    plan = pa.concat_tables(org.organize([t.slice(0, 150), t.slice(150)], RATIOS, "s", 50, near=near_map(t, groups))[0])
    plan = plan.to_pylist()
    rows = t.to_pylist()
    for g in groups:
        assert len({plan[i]["split"] for i in g}) == 1
        assert plan[g[0]]["near_duplicate_of"] is None
        assert all(plan[i]["near_duplicate_of"] == rows[g[0]]["image_id"] for i in g[1:])
    assert all(plan[i]["split"] == plan[0]["split"] and plan[i]["near_duplicate_of"] is None for i in (97, 194, 291, 388))
    # Without the map the same rows land in 2+ splits: the test would notice a rule that ignored it.
    free = org.organize([t], RATIOS, "s", 50)[0][0].to_pylist()
    assert len({free[i]["split"] for g in groups for i in g}) > 1


def test_drop_mode_takes_members_out_of_the_shards_and_counts_reconcile():
    t = checked(300, dup_every=100)  # rows 100 and 200 repeat row 0
    near = near_map(t, [[3, 0, 7], [10, 11]])  # row 0 is a member: its exact duplicates stay duplicates
    plans, summary = org.organize([t], RATIOS, "s", 40, near=near, drop=True)
    plan = plans[0].to_pylist()
    rows = t.to_pylist()
    assert [i for i, p in enumerate(plan) if p["dropped_for"]] == [0, 7, 11]
    assert all(plan[i]["shard"] is None for i in (0, 7, 11, 100, 200))
    assert plan[0]["dropped_for"] == rows[3]["path"] and plan[100]["near_duplicate_of"] == rows[3]["image_id"]
    assert summary["by_status"] == {"duplicate": 2, "near_duplicate": 3, "ok": 295}
    assert sum(summary["by_split"].values()) == 295 == sum(p["shard"] is not None for p in plan)
    manifest = org.finish(t.append_column("status_detail", pa.array([""] * 300)), plans[0], ["a", "b"],
                          pa.schema([("path", pa.string()), ("status", pa.string()), ("status_detail", pa.string()),
                                     ("near_duplicate_of", pa.string()), ("shard", pa.int32())]))
    dropped = manifest.filter(pa.compute.equal(manifest["status"], "near_duplicate")).to_pylist()
    assert [r["status_detail"] for r in dropped] == ["near duplicate of " + rows[i]["path"] for i in (3, 3, 10)]


def test_label_conflicts_cover_exact_and_near_families_and_crossing_folder_splits_are_reported():
    t = checked(60, dup_every=30)  # row 30 repeats row 0's bytes, under label "a" like row 0
    labels = t["label"].to_pylist()
    labels[30] = "b"  # the same bytes under two labels: an exact-duplicate conflict
    folder: list[str | None] = [None] * 60
    folder[9], folder[12] = "test", "train"
    t = t.set_column(t.schema.get_field_index("label"), "label", pa.array(labels))
    t = t.set_column(t.schema.get_field_index("folder_split"), "folder_split", pa.array(folder, pa.string()))
    near = near_map(t, [[12, 9], [4, 6]])  # 12/9: other folder splits (a crossing pair); 4/6: both label "a"
    plans, summary = org.organize([t], RATIOS, "s", 40, near=near)
    plan = plans[0].to_pylist()
    assert [i for i, p in enumerate(plan) if p["label_conflict"]] == [0, 9, 12, 30]  # 9 is "b", 12 is "a"
    assert summary["label_conflicts"] == {"families": 2, "rows": 4, "examples": sorted([t["path"][0].as_py(),
                                                                                          t["path"][12].as_py()])}
    assert (plan[9]["split"], plan[12]["split"]) == ("test", "train")
    assert summary["leakage"] == {"near_duplicate_members": 2, "crossing_pairs": 1, "crossing_examples": [
        {"path": t["path"][9].as_py(), "split": "test", "near_duplicate_of": t["path"][12].as_py(),
         "representative_split": "train"}]}
