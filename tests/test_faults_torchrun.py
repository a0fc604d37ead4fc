"""SIGTERM from torchrun during a restart: a rank terminated between writing a data file and renaming it
leaves a temporary behind; the restarted run cleans it and ends with the same shard files as one process."""
from __future__ import annotations

import re
import subprocess

import pytest
from test_faults_shard import shard_files, tiny_model

from imgfeat.featurize.stage_cli import main as featurize_main
from imgfeat.metadata import storage
from imgfeat.verify import verify_run

from helpers import gradient_image, write_image, write_manifest
from run_helpers import REPO, subprocess_env, torchrun_cmd

pytestmark = [pytest.mark.torchrun,
              pytest.mark.filterwarnings("ignore:.*torch.(jit|export):FutureWarning")]


def test_sigterm_during_torchrun_restart_cleans_stale_temporaries(tmp_path) -> None:
    files = [{"path": write_image(tmp_path / "img" / f"{i:02d}.jpg", gradient_image(40, 48, seed=i)), "label": "a"}
             for i in range(12)]
    manifest = write_manifest(tmp_path / "m", files, rows_per_shard=3)  # 4 shards, 2 per rank
    args = ["--manifest", str(manifest), "--model-path", str(tiny_model(tmp_path / "tiny.pt")), "--size", "32",
            "--batch-size", "3", "--num-workers", "0", "--format", "npy", "-q"]
    single = tmp_path / "single"
    assert featurize_main([*args, "--out", str(single)]) == 0
    feat = tmp_path / "feat"
    once = tmp_path / "fired"
    # Rank 1 is terminated (SIGTERM, as torchrun stops ranks) with its first data file written under its
    # temporary name; torchrun then SIGTERMs rank 0 and restarts both.
    env = subprocess_env({"IMGFEAT_FAULT": f"kill_after_data:1,rank=1,signal=TERM,once={once}"})
    res = subprocess.run(torchrun_cmd(2, [*args, "--out", str(feat)], "--standalone", "--max-restarts=1"),
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    assert once.exists()  # the fault fired in the first attempt
    stale = re.search(r"after writing (\.part-\d+\.features\.npy\.tmp-[0-9a-f-]+), before its rename", res.stderr)
    assert stale, res.stderr[-3000:]
    assert not (feat / stale.group(1)).exists()  # the restarted rank 0 removed it
    assert not [p.name for p in feat.iterdir() if storage.TMP_TAG in p.name]
    assert shard_files(feat) == shard_files(single)
    assert verify_run(str(manifest), str(feat)).ok
