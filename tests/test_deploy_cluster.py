"""The Spark stages on a real standalone cluster on 127.0.0.1 (a master and two workers).

The manifest runs as `imgfeat manifest --master spark://...`, pca as README's Databricks/EMR section
says: `spark-submit --master spark://... imgfeat/cli.py pca ...`. Both workers must run tasks of both
applications, the manifest must account for every file, and the reduced output must span the same
subspace as NumPy's PCA of the same features.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import imgfeat.cli
from imgfeat.featurize.stage_cli import main as featurize_main
from imgfeat.metadata.contracts.schema import read_manifest, read_summary

from run_helpers import features_by_id
from spark_cluster import standalone_cluster

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "sample"))

pytestmark = [pytest.mark.spark, pytest.mark.slow]

IMGFEAT = str(Path(sys.executable).parent / "imgfeat")
# Wait for both executors before the first job, so the check that both workers ran tasks is not a race.
CLUSTER_TOML = """
[spark.conf]
"spark.scheduler.minRegisteredResourcesRatio" = "1.0"
"spark.scheduler.maxRegisteredResourcesWaitingTime" = "120s"
"""


def _run(cmd: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", IMGFEAT_NO_PROGRESS="1", PYSPARK_PYTHON=sys.executable)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


def spark_submit() -> str:
    import pyspark

    return str(Path(pyspark.__file__).parent / "bin" / "spark-submit")


def _tasks_per_worker(cluster_dir: Path, app_id: str) -> list[int]:
    """'Running task' lines in the executor logs of ``app_id``, per worker work folder."""
    counts = []
    for work in sorted(cluster_dir.glob("work[0-9]*")):
        logs = list((work / app_id).glob("*/stderr"))
        counts.append(sum(log.read_text(errors="replace").count("Running task") for log in logs))
    return counts


def _app_ids(cluster_dir: Path) -> set[str]:
    return {p.name for p in cluster_dir.glob("work[0-9]*/app-*")}


def test_manifest_and_pca_on_two_worker_cluster(tmp_path):
    from make_sample import make

    broken = make(tmp_path / "shapes", per_class=4)
    cfg = tmp_path / "cluster.toml"
    cfg.write_text(CLUSTER_TOML)
    out, feat, red = tmp_path / "run", tmp_path / "run" / "features", tmp_path / "run" / "pca"
    cluster_dir = tmp_path / "cluster"
    with standalone_cluster(cluster_dir, workers=2) as master:
        proc = _run([IMGFEAT, "manifest", str(tmp_path / "shapes"), "--out", str(out), "--master", master,
                     "--rows-per-shard", "8", "--config", str(cfg)])
        assert proc.returncode == 0, proc.stderr[-4000:]
        manifest_app = _app_ids(cluster_dir)
        assert len(manifest_app) == 1, manifest_app
        assert featurize_main(["--manifest", str(out), "--out", str(feat), "--model", "mobilenet_v2", "--weights",
                               "none", "--size", "32", "--batch-size", "16", "--num-workers", "0", "-q"]) == 0
        # pca as README's "spark-submit with the package" runs it: spark-submit's --master must be the one used
        proc = _run([spark_submit(), "--master", master, "--conf", "spark.scheduler.minRegisteredResourcesRatio=1.0",
                     imgfeat.cli.__file__, "pca", "--manifest", str(out), "--features", str(feat), "--out", str(red),
                     "--k", "3"])
        assert proc.returncode == 0, proc.stderr[-4000:]
        pca_app = _app_ids(cluster_dir) - manifest_app
        assert len(pca_app) == 1, pca_app
    for app in (*manifest_app, *pca_app):
        counts = _tasks_per_worker(cluster_dir, app)
        assert len(counts) == 2 and min(counts) > 0, (app, counts)

    summary = read_summary(str(out))
    assert summary["master"] == master
    assert summary["total"] == 5 * 4 + len(broken) and summary["by_status"]["ok"] == 20
    rows = {r["rel_path"]: r for r in read_manifest(str(out)).to_pylist()}
    flagged = sorted(r["status"] for r in rows.values() if r["status"] != "ok")
    assert flagged == sorted(broken.values())  # which of two equal files is the duplicate is the manifest's rule
    assert summary["num_shards"] == 3  # 20 ok rows in shards of at most 8

    # pca: every feature row comes out once, and spans NumPy's top-k subspace of the train rows
    by_id = features_by_id(str(feat))
    reduced = pq.read_table(red / "reduced").to_pylist()
    assert sorted(r["image_id"] for r in reduced) == sorted(by_id)
    train = sorted(r["image_id"] for r in rows.values() if r["status"] == "ok" and r["split"] == "train")
    x = np.stack([by_id[i] for i in train]).astype(np.float64)
    centred = x - x.mean(0)
    evals, evecs = np.linalg.eigh(centred.T @ centred / (len(x) - 1))
    top = evecs[:, ::-1][:, :3]
    ref = centred @ top
    got = np.stack([next(r["features_pca"] for r in reduced if r["image_id"] == i) for i in train]).astype(np.float64)
    # Gram matrices do not depend on the sign of a component (nor on a rotation inside the top-k subspace)
    np.testing.assert_allclose(got @ got.T, ref @ ref.T, rtol=1e-3, atol=1e-3 * np.abs(ref @ ref.T).max())
    pca = json.loads((red / "pca_summary.json").read_text())
    assert pca["output_rows"] == 20 and pca["k"] == 3
    np.testing.assert_allclose(pca["explained_variance_ratio_total"], evals[::-1][:3].sum() / evals.sum(), rtol=1e-4)
