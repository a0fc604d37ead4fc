"""`imgfeat run` with the images and every output on an S3-protocol server (moto, 127.0.0.1) through s3fs:
the same manifest, features and reduced output as the same run on local paths; `imgfeat verify` passes;
a rerun (under torchrun) finds its stage digests in ``run.json`` on the bucket and skips what is up to date."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest

from imgfeat.cli import main as imgfeat
from imgfeat.metadata.contracts.schema import read_manifest

from run_helpers import features_by_id

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "sample"))

pytestmark = [pytest.mark.spark, pytest.mark.s3, pytest.mark.slow]

CONFIG = """
[manifest]
rows_per_shard = 8
[preprocess]
size = 32
resize_shorter = 36
batch_size = 16
num_workers = 0
[featurize]
model = "mobilenet_v2"
weights = "none"
[pca]
k = 3
"""


def _reduced(run: str) -> dict[str, np.ndarray]:
    fs, path = fsspec.core.url_to_fs(f"{run}/pca/reduced")
    table = pq.read_table(path, filesystem=fs)
    return {i: np.asarray(v, np.float64) for i, v in zip(table.column("image_id").to_pylist(),
                                                        table.column("features_pca").to_pylist())}


def test_run_on_s3_matches_local(spark, s3_bucket, tmp_path, capsys):
    from make_sample import make

    make(tmp_path / "shapes", per_class=4)
    fs = fsspec.filesystem("s3")
    fs.put(str(tmp_path / "shapes"), f"{s3_bucket}/src", recursive=True)
    fs.invalidate_cache()
    cfg = tmp_path / "run.toml"
    cfg.write_text(CONFIG)
    local, remote = str(tmp_path / "run"), f"{s3_bucket}/run"
    assert imgfeat(["run", str(tmp_path / "shapes"), "--out", local, "--config", str(cfg), "-q"]) == 0
    assert imgfeat(["run", f"{s3_bucket}/src", "--out", remote, "--config", str(cfg), "-q"]) == 0
    assert f"report: {remote}/report.html" in capsys.readouterr().out

    # manifest: the same rows, statuses, labels, splits and shards; ids follow the s3:// paths
    here = {r["rel_path"]: r for r in read_manifest(local).to_pylist()}
    there = {r["rel_path"]: r for r in read_manifest(remote).to_pylist()}
    assert here.keys() == there.keys() and len(here) == 25
    here_src = (tmp_path / "shapes").as_uri()
    for rel, r in here.items():
        s = there[rel]
        assert s["path"] == f"{s3_bucket}/src/{rel}"
        assert s["status_detail"] == r["status_detail"].replace(here_src, f"{s3_bucket}/src")
        for col in ("status", "label", "split", "shard", "width", "height", "content_hash"):
            assert s[col] == r[col], (rel, col)
    rel_of = {r["image_id"]: rel for rows in (here, there) for rel, r in rows.items()}

    # features: the same vectors for the same files, and exactly the manifest's ok rows
    f_here, f_there = features_by_id(f"{local}/features"), features_by_id(f"{remote}/features")
    assert sorted(f_there) == sorted(r["image_id"] for r in there.values() if r["status"] == "ok")
    assert {rel_of[i] for i in f_here} == {rel_of[i] for i in f_there}
    by_rel = {rel_of[i]: v for i, v in f_here.items()}
    assert all(np.array_equal(v, by_rel[rel_of[i]]) for i, v in f_there.items())

    # pca: the same projection up to the sign of each component
    r_here, r_there = _reduced(local), _reduced(remote)
    assert sorted(r_there) == sorted(f_there)
    a_rel, b_rel = ({rel_of[i]: v for i, v in r.items()} for r in (r_here, r_there))
    assert a_rel.keys() == b_rel.keys()
    a, b = (np.stack([x[rel] for rel in sorted(a_rel)]) for x in (a_rel, b_rel))
    signs = np.sign((a * b).sum(0))
    np.testing.assert_allclose(b * signs, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())

    # the report and run state live on the bucket; verify reconciles the s3 run
    report = json.loads(fs.cat(f"{remote}/report.json"))
    assert report["accounting"]["reconciles"] and report["accounting"]["pca_output_rows"] == 20
    page = fs.cat(f"{remote}/report.html").decode()
    assert "Flagged files" in page and page.count("data:image/png;base64,") >= 2 + 5
    assert imgfeat(["verify", remote]) == 0
    assert "verify: OK" in capsys.readouterr().out

    # rerun under torchrun (two local processes): nothing left to compute, and the stage digests match
    assert imgfeat(["run", f"{s3_bucket}/src", "--out", remote, "--config", str(cfg), "--nproc", "2", "-q"]) == 0
    stages = json.loads(fs.cat(f"{remote}/run.json"))["stages"]
    assert stages["manifest"]["skipped"] and stages["pca"]["skipped"]
    assert features_by_id(f"{remote}/features").keys() == f_there.keys()
