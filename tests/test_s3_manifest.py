"""The manifest job with images and outputs on an S3-protocol server (moto, 127.0.0.1) through s3fs."""
from __future__ import annotations

import fsspec
import pytest

from imgfeat.metadata.config import load_config
from imgfeat.metadata.contracts.schema import read_manifest, read_summary

from helpers import gradient_image, write_image

pytestmark = [pytest.mark.spark, pytest.mark.s3]


def test_manifest_from_and_to_s3_matches_local(spark, s3_bucket, tmp_path):
    from imgfeat.metadata.manifest.job import run_manifest

    local = tmp_path / "src"
    for label in ("a", "b"):
        for i in range(5):
            write_image(local / label / f"{i}.jpg", gradient_image(seed=i + (10 if label == "b" else 0)))
    (local / "a" / "cut.jpg").write_bytes((local / "a" / "0.jpg").read_bytes()[:300])
    (local / "b" / "empty.png").write_bytes(b"")
    fs = fsspec.filesystem("s3")
    fs.put(str(local), f"{s3_bucket}/src", recursive=True)
    fs.invalidate_cache()
    cfg = load_config(None, {"manifest": {"rows_per_shard": 3}})
    run_manifest(cfg, [str(local)], str(tmp_path / "out"))
    summary = run_manifest(cfg, [f"{s3_bucket}/src"], f"{s3_bucket}/run")
    assert read_summary(f"{s3_bucket}/run")["total"] == summary["total"] == 12
    remote = {r["rel_path"]: r for r in read_manifest(f"{s3_bucket}/run").to_pylist()}
    here = {r["rel_path"]: r for r in read_manifest(str(tmp_path / "out")).to_pylist()}
    assert remote.keys() == here.keys()
    for rel, r in here.items():
        s = remote[rel]
        assert s["path"] == f"{s3_bucket}/src/{rel}"
        for col in ("status", "label", "split", "format", "width", "height", "content_hash", "shard", "size_bytes"):
            assert s[col] == r[col], (rel, col)
    assert fs.exists(f"{s3_bucket}/run/manifest/_SUCCESS")
