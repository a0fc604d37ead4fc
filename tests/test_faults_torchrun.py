"""SIGTERM from torchrun during a restart: a rank terminated between writing a data file and renaming it
leaves a temporary behind; the restarted run cleans it and ends with the same shard files as one process."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) is gone as far as the test cares
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux (prctl and /proc)")
def test_ranks_stop_when_torchrun_is_killed(tmp_path) -> None:
    """torchrun starts each rank in its own session, so a SIGKILL of torchrun alone (a scheduler, the OOM
    killer) reaches no rank. The ranks must stop by themselves, not run on beside a rerun."""
    files = [{"path": write_image(tmp_path / "img" / f"{i:02d}.jpg", gradient_image(40, 48, seed=i)), "label": "a"}
             for i in range(8)]
    manifest = write_manifest(tmp_path / "m", files, rows_per_shard=2)  # 4 shards, 2 per rank
    args = ["--manifest", str(manifest), "--model-path", str(tiny_model(tmp_path / "tiny.pt")), "--size", "32",
            "--batch-size", "2", "--num-workers", "0", "--format", "npy", "-q", "--out", str(tmp_path / "feat")]
    hang = tmp_path / "hang"
    hang.mkdir()
    env = subprocess_env({"IMGFEAT_HOOK": "hang_driver:install", "IMGFEAT_HANG_DIR": str(hang)})
    launcher = subprocess.Popen(torchrun_cmd(2, args, "--standalone"), cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while len(list(hang.glob("rank*.pid"))) < 2 and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        pids = [int(p.read_text()) for p in hang.glob("rank*.pid")]
        assert len(pids) == 2, f"the ranks did not reach their first shard (torchrun exit {launcher.poll()})"
        launcher.send_signal(signal.SIGKILL)  # torchrun alone: the ranks are in other sessions
        launcher.wait(30)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in pids if _alive(p)], "ranks outlived their torchrun"
    finally:
        launcher.kill()
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
