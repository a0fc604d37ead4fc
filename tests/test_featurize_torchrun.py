"""featurize under torchrun on CPU: --standalone with 2 processes, two 'nodes' on 127.0.0.1 (c10d), and a
rank killed under --max-restarts; every run must give the same features, byte for byte, as one process."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from imgfeat.featurize.stage_cli import main as featurize_main
from imgfeat.metadata import storage
from imgfeat.metadata.contracts import feature_store, shards

from helpers import write_manifest
from run_helpers import REPO, features_by_id, free_port, pick_images, subprocess_env, torchrun_cmd

pytestmark = pytest.mark.torchrun

BASE = ["--model", "mobilenet_v2", "--weights", "IMAGENET1K_V1", "--size", "64", "--batch-size", "16",
        "--format", "hdf5", "--num-workers", "1", "-q"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, fruits_dir, torch_home) -> Path:
    out = tmp_path_factory.mktemp("manifest")
    # 5 shards (16, 16, 16, 16, 8 rows): uneven over 2 ranks, and a short last shard
    return write_manifest(out, pick_images(fruits_dir, per_class=7, offset=20), rows_per_shard=16)


@pytest.fixture(scope="module")
def single(tmp_path_factory, manifest) -> dict[str, np.ndarray]:
    feat = tmp_path_factory.mktemp("single") / "feat"
    assert featurize_main(["--manifest", str(manifest), "--out", str(feat), *BASE]) == 0
    return features_by_id(str(feat))


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys() and len(a) == 70
    assert all(np.array_equal(a[k], b[k]) for k in a)


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=subprocess_env(env), capture_output=True, text=True, timeout=timeout)


def test_standalone_two_processes_equal_single(tmp_path, manifest, single) -> None:
    feat = tmp_path / "feat"
    res = _run(torchrun_cmd(2, ["--manifest", str(manifest), "--out", str(feat), *BASE], "--standalone"))
    assert res.returncode == 0, res.stderr[-3000:]
    markers = feature_store.committed_shards(str(feat))
    assert sorted({m["rank"] for m in markers.values()}) == [0, 1]  # both ranks wrote shards
    _same(single, features_by_id(str(feat)))
    summary = json.loads((feat / shards.FEATURES_SUMMARY).read_text())
    assert summary["world_size"] == 2 and summary["rows"] == 70 and len(summary["this_run"]["per_rank"]) == 2


def test_two_nodes_c10d_equal_single(tmp_path, manifest, single) -> None:
    feat = tmp_path / "feat"
    port = free_port()
    args = ["--manifest", str(manifest), "--out", str(feat), *BASE]
    procs = [
        subprocess.Popen(torchrun_cmd(1, args, "--nnodes=2", f"--node-rank={rank}", "--rdzv-backend=c10d",
                                      f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=featurize-test"),
                         cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    _same(single, features_by_id(str(feat)))
    assert json.loads((feat / shards.FEATURES_SUMMARY).read_text())["world_size"] == 2


def test_rank_killed_then_torchrun_restarts(tmp_path, manifest, single) -> None:
    """Rank 1 SIGKILLs itself before its first marker; torchrun stops rank 0 (SIGTERM) and restarts both."""
    feat = tmp_path / "feat"
    once = tmp_path / "fired"
    env = {"IMGFEAT_FAULT": f"kill_before_marker:1,rank=1,once={once}"}
    res = _run(torchrun_cmd(2, ["--manifest", str(manifest), "--out", str(feat), *BASE], "--standalone",
                            "--max-restarts=1"), env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert once.exists()  # the fault did fire
    assert not [p for p in feat.iterdir() if storage.TMP_TAG in p.name]
    _same(single, features_by_id(str(feat)))


def test_world_size_change_between_runs(tmp_path, manifest, single) -> None:
    """Killed under 2 ranks, finished by one process: same features, no duplicates."""
    feat = tmp_path / "feat"
    args = ["--manifest", str(manifest), "--out", str(feat), *BASE]
    res = _run(torchrun_cmd(2, args, "--standalone"), {"IMGFEAT_FAULT": "kill_before_marker:2,rank=0"})
    assert res.returncode != 0
    assert 0 < len(feature_store.committed_shards(str(feat))) < 5
    assert featurize_main(args) == 0
    ids, _ = feature_store.read_features(str(feat))
    assert len(ids) == len(set(ids.tolist())) == 70
    _same(single, features_by_id(str(feat)))
