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
