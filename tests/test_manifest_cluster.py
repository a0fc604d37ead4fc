"""The manifest job against a real standalone master and worker on 127.0.0.1: nothing assumes local mode."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import gradient_image, write_image
from metadata.schema import read_manifest, read_summary
from spark_cluster import standalone_cluster

pytestmark = [pytest.mark.spark, pytest.mark.slow]


def test_manifest_on_standalone_cluster(tmp_path):
    src = tmp_path / "src"
    for label in ("a", "b"):
        for i in range(6):
            write_image(src / label / f"{i}.jpg", gradient_image(seed=i + (10 if label == "b" else 0)))
    (src / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut")
    out = tmp_path / "out"
    with standalone_cluster(tmp_path / "cluster", workers=1) as master:
        env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1")
        proc = subprocess.run(
            [sys.executable, "-m", "metadata", str(src), "--out", str(out), "--master", master, "--rows-per-shard", "4"],
            capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = read_summary(str(out))
    assert summary["master"] == master
    assert summary["total"] == 13 and summary["by_status"]["ok"] == 12
    rows = read_manifest(str(out)).to_pylist()
    assert {r["status"] for r in rows if r["rel_path"] == "a/broken.jpg"} == {"truncated"}
    assert summary["num_shards"] == 3
