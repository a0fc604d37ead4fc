"""Faults while writing feature shards: kill -9 at every point of a shard's life (``tests/faults_driver.py``), a full
disk, and configuration drift. No reader ever sees a partial shard, and a rerun leaves shard files
byte-identical to an uninterrupted run (CPU, fp32)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from imgfeat.featurize.stage_cli import main as featurize_main
from imgfeat.metadata import storage
from imgfeat.metadata.contracts import feature_store, hooks, shards
from imgfeat.verify import verify_run

from faults_driver import SHARD_POINTS
from helpers import gradient_image, write_image, write_manifest
from run_helpers import run_module

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.(jit|export):FutureWarning")

ROWS, PER_SHARD = 10, 4  # shards of 4, 4, 2 rows


def tiny_model(path: Path) -> Path:
    """A TorchScript conv net: the fault paths do not need a real backbone, and it loads in milliseconds."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU()).eval()
    torch.jit.save(torch.jit.script(net), str(path))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, list[str]]:
    """(manifest folder, base args): 10 images, one of which is cut short after the manifest (a reject)."""
    root = tmp_path_factory.mktemp("faults")
    files = [{"path": write_image(root / "img" / f"{i:02d}.jpg", gradient_image(40, 48, seed=i)), "label": "a"}
             for i in range(ROWS)]
    manifest = write_manifest(root / "m", files, rows_per_shard=PER_SHARD)
    cut = root / "img" / "05.jpg"
    cut.write_bytes(cut.read_bytes()[:200])
    args = ["--manifest", str(manifest), "--model-path", str(tiny_model(root / "tiny.pt")), "--size", "32",
            "--batch-size", "4", "--num-workers", "0", "--format", "npy", "-q"]
    return manifest, args


@pytest.fixture(scope="module")
def clean(setup, tmp_path_factory) -> Path:
    manifest, args = setup
    feat = tmp_path_factory.mktemp("clean") / "feat"
    assert featurize_main([*args, "--out", str(feat)]) == 0
    return feat


def shard_files(folder: Path) -> dict[str, bytes]:
    """Every committed shard file's bytes; markers without the fields that name the run rather than the data."""
    out = {}
    for p in sorted(folder.glob("part-*")):
        if p.name.endswith(shards.MARKER_SUFFIX):
            marker = json.loads(p.read_text())
            for key in ("committed_at", "rank"):
                marker.pop(key)
            out[p.name] = json.dumps(marker, sort_keys=True).encode()
        else:
            out[p.name] = p.read_bytes()
    return out


@pytest.mark.parametrize("point", SHARD_POINTS)
def test_kill9_at_each_point_then_rerun_is_byte_identical(setup, clean, tmp_path, point) -> None:
    manifest, args = setup
    feat = tmp_path / "feat"
    killed = run_module([*args, "--out", str(feat)], env={"IMGFEAT_FAULT": f"kill_{point}:2"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert "fault injection, SIGKILL" in killed.stderr
    names = {p.name for p in feat.iterdir()}
    committed = sorted(feature_store.committed_shards(str(feat)))
    # The second shard dies at `point`: committed only once its marker is written.
    assert committed == (["part-00000", "part-00001"] if point == "after_marker" else ["part-00000"])
    temps = [(feat / n).stat().st_size for n in names if storage.TMP_TAG in n and "part-00001.features" in n]
    full = (clean / "part-00001.features.npy").stat().st_size
    on_disk = {
        "before_write": not any("part-00001" in n for n in names),
        "mid_data": temps == [full // 2],
        "after_data": temps == [full],
        "after_rename": "part-00001.features.npy" in names and "part-00001.done.json" not in names,
        "after_marker": "part-00001.done.json" in names,
    }
    assert on_disk[point], sorted(names)  # the process died where the fault says
    ids, feats = feature_store.read_features(str(feat))  # readers see whole shards only
    assert len(ids) == len(feats) == sum(m["rows"] for m in feature_store.committed_shards(str(feat)).values())
    v = verify_run(str(manifest), str(feat))
    assert not v.ok and all("has no committed feature shard" in p for p in v.problems), v.problems
    assert not (feat / shards.FEATURES_SUMMARY).exists()

    assert featurize_main([*args, "--out", str(feat)]) == 0
    assert not [n for n in (p.name for p in feat.iterdir()) if storage.TMP_TAG in n]  # stale temporaries cleaned
    assert shard_files(feat) == shard_files(clean)  # byte-identical to the uninterrupted run
    v = verify_run(str(manifest), str(feat))
    assert v.ok and (v.feature_rows, v.rejected) == (ROWS - 1, 1), v.problems
    summary = json.loads((feat / shards.FEATURES_SUMMARY).read_text())
    assert summary["rows"] + summary["rejects"] == summary["manifest_rows"] == ROWS


def test_native_decoder_crash_is_recorded_and_the_run_completes(setup, clean, tmp_path) -> None:
    """A decode worker dies of SIGSEGV on one file: that row is a reject naming the crash, the run finishes,
    every other row has the features of the clean run."""
    manifest, args = setup
    feat = tmp_path / "feat"
    victim = Path(str(manifest).rsplit("/", 1)[0]) / "img" / "02.jpg"
    res = run_module([*args, "--out", str(feat), "--num-workers", "1"],
                     env={"IMGFEAT_FAULT": f"segv_decode,file={victim}"})
    assert res.returncode == 0, res.stderr[-2000:]
    rejects = {r["path"].rsplit("/", 1)[-1]: r for s in feature_store.committed_shards(str(feat))
               for r in feature_store.read_rejects(str(feat), s)}
    assert set(rejects) == {"02.jpg", "05.jpg"}
    assert rejects["02.jpg"]["reason"] == "undecodable" and "SIGSEGV" in rejects["02.jpg"]["detail"]
    v = verify_run(str(manifest), str(feat))
    assert v.ok and (v.feature_rows, v.rejected) == (ROWS - 2, 2), v.problems
    ids, feats = feature_store.read_features(str(feat))
    ref_ids, ref = feature_store.read_features(str(clean))
    ref_by_id = dict(zip(ref_ids.tolist(), ref))
    assert all(np.array_equal(f, ref_by_id[i]) for i, f in zip(ids.tolist(), feats))


def test_unknown_fault_is_refused() -> None:
    from faults_driver import Faults

    with pytest.raises(ValueError, match="IMGFEAT_FAULT"):
        Faults(0, "kill_somewhere:1")
    with pytest.raises(ValueError, match="file=PATH"):
        Faults(0, "segv_decode")
    assert Faults(0, "kill_mid_data:1,rank=1").observer is None  # armed on another rank only
    assert Faults(0, "kill_before_marker:3").point == "after_rename"  # the older name
    assert Faults(0, "kill_before_marker:3").observer is not None
    assert Faults(0, "").observer is None


def test_the_hook_is_installed_from_the_environment(monkeypatch) -> None:
    from imgfeat.metadata.contracts import hooks

    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(sys.modules[__name__], "make_observer", lambda rank: lambda e, s: seen.append((e, s)),
                        raising=False)
    monkeypatch.setenv(hooks.HOOK_ENV, f"{__name__}:make_observer")
    try:
        hooks.install_from_env(0)
        hooks.fault_point("decode", "file:///x.jpg")
    finally:
        hooks.set_observer(None)
    assert seen == [("decode", "file:///x.jpg")]
    monkeypatch.setenv(hooks.HOOK_ENV, "no_function_named")
    with pytest.raises(ValueError, match="module:function"):
        hooks.install_from_env(0)


@pytest.mark.parametrize("victim", ["features.npy", "done.json"])
def test_disk_full_fails_the_shard_cleanly_and_rerun_succeeds(setup, clean, tmp_path, monkeypatch, victim) -> None:
    """The kernel's own ENOSPC: the second shard's temporary for ``victim`` is a link to /dev/full."""
    import errno
    import os
    import uuid

    if not os.path.exists("/dev/full"):
        pytest.skip("/dev/full is absent on this system")
    manifest, args = setup
    feat = tmp_path / "feat"
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=0xDEADBEEF))  # predictable temporary names

    def disk_full(event: str, path: str) -> None:
        if event == "shard_start" and path.endswith("part-00001"):
            os.symlink("/dev/full", feat / f".part-00001.{victim}{storage.TMP_TAG}{os.getpid()}-00000000")

    hooks.set_observer(disk_full)
    try:
        with pytest.raises(RuntimeError, match="part-00001: failed 3 times") as err:  # each attempt hits it
            featurize_main([*args, "--out", str(feat)])
    finally:
        hooks.set_observer(None)
    cause = err.value.__cause__
    assert isinstance(cause, OSError) and cause.errno == errno.ENOSPC, repr(cause)
    assert not (feat / "part-00001.done.json").exists()  # no marker: the shard does not exist for readers
    assert not [p.name for p in feat.iterdir() if storage.TMP_TAG in p.name]  # failed writes left nothing
    assert sorted(feature_store.committed_shards(str(feat))) == ["part-00000"]
    monkeypatch.undo()
    assert featurize_main([*args, "--out", str(feat)]) == 0  # space again: the rerun finishes the job
    assert shard_files(feat) == shard_files(clean)
    assert verify_run(str(manifest), str(feat)).ok


def test_config_drift_is_refused_until_overwrite_or_new_folder(setup, clean, tmp_path, capsys) -> None:
    """Rerunning into a folder of another model, size or precision is refused with a message naming it."""
    import shutil

    _, args = setup
    feat = tmp_path / "feat"
    shutil.copytree(clean, feat)
    (feat / "part-00002.done.json").unlink()  # work left to do, so the rerun must decide
    other = tiny_model(tmp_path / "other.pt")
    import torch

    net = torch.jit.load(str(other))
    with torch.no_grad():
        net.state_dict()["0.weight"].add_(1.0)
    torch.jit.save(net, str(other))
    drifts = {"preprocess.size": ["--size", "40"], "precision": ["--precision", "bf16"],
              "weights_sha256": ["--model-path", str(other)]}
    for key, flags in drifts.items():
        capsys.readouterr()
        assert featurize_main([*args, "--out", str(feat), *flags]) == 2, key
        err = capsys.readouterr().err
        assert err.startswith("imgfeat: error: ") and "--overwrite" in err and key in err, (key, err[-800:])
        assert not (feat / "part-00002.done.json").exists()  # refused before touching anything
        assert featurize_main([*args, "--out", str(tmp_path / f"new-{key}"), *flags]) == 0  # a new folder works
    assert featurize_main([*args, "--out", str(feat), "--size", "40", "--overwrite"]) == 0
    markers = feature_store.committed_shards(str(feat))
    assert len(markers) == 3 and len({m["fingerprint"] for m in markers.values()}) == 1
    assert json.loads((feat / shards.RUN_FILE).read_text())["fields"]["preprocess"]["size"] == 40
