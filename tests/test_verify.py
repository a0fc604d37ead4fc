"""`imgfeat verify`: accounting holds on a good run and each kind of discrepancy is named."""
from __future__ import annotations

import numpy as np
import pytest

from imgfeat.cli import main
from imgfeat.metadata.contracts.feature_store import write_feature_shard
from imgfeat.metadata.contracts.schema import read_manifest
from imgfeat.verify import verify_run

from helpers import gradient_image, write_image, write_manifest


@pytest.fixture()
def run(tmp_path):
    files = [{"path": write_image(tmp_path / "img" / f"{i}.jpg", gradient_image(seed=i)), "label": "a"} for i in range(7)]
    files.append({"path": tmp_path / "img" / "bad.jpg", "status": "truncated", "status_detail": "cut"})
    write_manifest(tmp_path, files, rows_per_shard=3)
    rows = read_manifest(str(tmp_path)).to_pylist()
    feats = tmp_path / "features"
    for shard in (0, 1, 2):
        ids = [r["image_id"] for r in rows if r["shard"] == shard]
        rejects = [{"image_id": ids[-1], "path": "x", "reason": "unreadable", "detail": "gone"}] if shard == 1 else []
        kept = ids[:-1] if shard == 1 else ids
        write_feature_shard(str(feats), shard, kept, np.ones((len(kept), 4), np.float32), rejects, "npy", "fp")
    return tmp_path, rows


def test_good_run_reconciles(run, capsys):
    root, rows = run
    v = verify_run(str(root), str(root / "features"))
    assert v.ok, v.problems
    assert (v.manifest_rows, v.feature_rows, v.rejected, v.flagged) == (8, 6, 1, 1)
    assert main(["verify", str(root)]) == 0
    assert "verify: OK" in capsys.readouterr().out


def test_missing_shard_is_named(run, capsys):
    root, _ = run
    (root / "features" / "part-00002.done.json").unlink()
    assert main(["verify", str(root)]) == 1
    out = capsys.readouterr().out
    assert "part-00002" in out
    # the count line still adds up: the missing shard's rows are named as such
    assert "manifest rows 8 = feature rows 5 + rejected 1 + flagged 1 + in missing or damaged shards 1" in out


def test_corrupted_shard_is_named(run):
    root, _ = run
    path = root / "features" / "part-00000.features.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    v = verify_run(str(root), str(root / "features"))
    assert not v.ok and "part-00000.features.npy" in v.problems[0]
    assert "delete part-00000.done.json and rerun" in v.problems[0]  # the fix: a rerun skips committed shards


def test_lost_row_is_named(run):
    root, rows = run
    ids = [r["image_id"] for r in rows if r["shard"] == 0][:-1]
    write_feature_shard(str(root / "features"), 0, ids, np.ones((len(ids), 4), np.float32), [], "npy", "fp")
    v = verify_run(str(root), str(root / "features"))
    assert not v.ok and "part-00000" in v.problems[0]


def test_tile_features_need_tiles(run, capsys):
    """A folder of tile features checked as image features (or the reverse) is told in one line, not as a
    list of mismatches."""
    import json

    root, _ = run
    run_file = root / "features" / "_run.json"
    run_file.write_text(json.dumps({"fingerprint": "x", "fields": {"rows": "tiles"}}))
    with pytest.raises(ValueError, match="holds tile features .*add --tiles"):
        verify_run(str(root), str(root / "features"))
    run_file.write_text(json.dumps({"fingerprint": "x", "fields": {"model": "m"}}))
    with pytest.raises(ValueError, match="holds image features, not tile features"):
        verify_run(str(root), str(root / "features"), tiles=True)
