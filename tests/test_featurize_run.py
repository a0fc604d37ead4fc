"""Single-process featurize runs on real fruit photos: formats, rejects, resume, fingerprint, kill-and-rerun,
and equality with torchvision's own PIL-based transforms."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from imgfeat.featurize.stage_cli import main as featurize_main
from imgfeat.metadata import storage
from imgfeat.metadata.contracts import feature_store, shards
from imgfeat.metadata.contracts.schema import read_manifest

from helpers import write_manifest
from run_helpers import features_by_id, pick_images, run_module

BASE = ["--model", "mobilenet_v2", "--weights", "IMAGENET1K_V1", "--size", "64", "--batch-size", "16", "-q"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, fruits_dir, torch_home) -> Path:
    out = tmp_path_factory.mktemp("manifest")
    return write_manifest(out, pick_images(fruits_dir, per_class=4), rows_per_shard=16)  # shards of 16, 16, 8


@pytest.fixture(scope="module")
def clean(tmp_path_factory, manifest) -> Path:
    feat = tmp_path_factory.mktemp("clean") / "feat"
    assert featurize_main(["--manifest", str(manifest), "--out", str(feat), "--format", "hdf5", *BASE]) == 0
    return feat


def test_hdf5_layout_and_summary(clean, manifest) -> None:
    import h5py

    ids, feats = feature_store.read_features(str(clean))
    table = read_manifest(str(manifest))
    assert sorted(ids.tolist()) == sorted(table.column("image_id").to_pylist())
    assert feats.shape == (40, 1280) and feats.dtype == np.float32 and np.isfinite(feats).all()
    markers = feature_store.committed_shards(str(clean))
    assert sorted(markers) == ["part-00000", "part-00001", "part-00002"]
    assert [m["rows"] for m in markers.values()] == [16, 16, 8]
    with h5py.File(clean / "part-00002.h5", "r") as h5:  # readable with h5py alone
        assert h5["features"].shape == (8, 1280)
        assert h5.attrs["fingerprint"] == markers["part-00002"]["fingerprint"]
        assert len(h5["image_id"][0]) == 32
    summary = json.loads((clean / shards.FEATURES_SUMMARY).read_text())
    assert summary["rows"] + summary["rejects"] == summary["manifest_rows"] == 40
    assert summary["this_run"]["slowest_stage"] in ("read_decode", "transfer", "forward", "write")
    assert set(summary["this_run"]["stage_seconds"]) == {"read_decode", "transfer", "forward", "write"}
    run = json.loads((clean / shards.RUN_FILE).read_text())
    assert run["fields"]["weights_sha256"].startswith("b0353104") and run["fields"]["layer"] == "penultimate"
    assert (clean / "config.resolved.toml").is_file()


def test_npy_roundtrip_matches_hdf5(tmp_path, clean, manifest) -> None:
    feat = tmp_path / "feat"
    assert featurize_main(["--manifest", str(manifest), "--out", str(feat), "--format", "npy", *BASE]) == 0
    ids = np.load(feat / "part-00000.ids.npy")  # numpy alone
    f = np.load(feat / "part-00000.features.npy")
    assert f.shape == (16, 1280) and ids.shape == (16,)
    a, b = features_by_id(str(clean)), features_by_id(str(feat))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_float16_and_rerun_skips(tmp_path, manifest, clean) -> None:
    feat = tmp_path / "feat"
    args = ["--manifest", str(manifest), "--out", str(feat), "--format", "hdf5", "--dtype", "float16", *BASE]
    assert featurize_main(args) == 0
    ids, f16 = feature_store.read_features(str(feat))
    assert f16.dtype == np.float16
    ref = features_by_id(str(clean))
    np.testing.assert_allclose(f16.astype(np.float32), np.stack([ref[i] for i in ids]), rtol=2e-3, atol=2e-3)
    before = {s: m["committed_at"] for s, m in shards.list_markers(str(feat)).items()}
    summary_before = (feat / shards.FEATURES_SUMMARY).read_text()
    assert featurize_main(args) == 0  # everything committed: nothing recomputed, summary kept
    assert {s: m["committed_at"] for s, m in shards.list_markers(str(feat)).items()} == before
    assert (feat / shards.FEATURES_SUMMARY).read_text() == summary_before


def test_fingerprint_refusal_and_overwrite(tmp_path, manifest, clean) -> None:
    feat = tmp_path / "feat"
    shutil.copytree(clean, feat)
    args = ["--manifest", str(manifest), "--out", str(feat), "--format", "hdf5", *BASE]
    (feat / "part-00001.done.json").unlink()  # one shard left to do, but with another precision:
    assert featurize_main([*args, "--precision", "bf16"]) == 2  # refused, nothing touched
    assert not (feat / "part-00001.done.json").exists()
    assert json.loads((feat / shards.RUN_FILE).read_text())["fields"]["precision"] == "fp32"
    assert featurize_main([*args, "--precision", "bf16", "--overwrite"]) == 0
    run = json.loads((feat / shards.RUN_FILE).read_text())
    assert run["fields"]["precision"] == "bf16"
    markers = feature_store.committed_shards(str(feat))
    assert len(markers) == 3 and {m["fingerprint"] for m in markers.values()} == {run["fingerprint"]}
    a, b = features_by_id(str(clean)), features_by_id(str(feat))
    cos = [float(a[k] @ b[k] / np.linalg.norm(a[k]) / np.linalg.norm(b[k])) for k in a]
    assert min(cos) > 0.99  # bf16 autocast: close to fp32, not equal


def test_split_features_are_their_own_folder_and_verify(tmp_path, fruits_dir, torch_home) -> None:
    """`featurize --split val` writes the val rows only, records the split in _run.json (so `verify` accounts
    for the other splits' rows), and refuses to fill the same folder with another split."""
    from imgfeat.verify import verify_run

    files = pick_images(fruits_dir, split="Test", per_class=1) + pick_images(fruits_dir, per_class=1)
    man = write_manifest(tmp_path / "m", files, rows_per_shard=3)
    feat = tmp_path / "feat"
    args = ["--manifest", str(man), "--out", str(feat), *BASE]
    assert featurize_main([*args, "--split", "test"]) == 0
    ids, _ = feature_store.read_features(str(feat))
    table = read_manifest(str(man)).to_pylist()
    assert sorted(ids.tolist()) == sorted(r["image_id"] for r in table if r["split"] == "test")
    assert json.loads((feat / shards.RUN_FILE).read_text())["fields"]["split"] == "test"
    v = verify_run(str(man), str(feat))
    assert v.ok, v.problems
    assert (v.feature_rows, v.other_splits) == (len(ids), len(table) - len(ids)) and v.other_splits > 0
    assert featurize_main([*args, "--split", "training"]) == 2  # another split: another folder
    assert featurize_main(args) == 2  # nor every split into it


def test_rejects_reconcile(tmp_path, fruits_dir, torch_home) -> None:
    src = pick_images(fruits_dir, per_class=2, offset=10)
    files = []
    for i, f in enumerate(src):
        dst = tmp_path / "img" / f"{i:02d}.jpg"
        dst.parent.mkdir(exist_ok=True)
        shutil.copy(f["path"], dst)
        files.append(dict(f, path=str(dst)))
    manifest = write_manifest(tmp_path / "m", files, rows_per_shard=8)
    (tmp_path / "img" / "03.jpg").unlink()  # vanished after the manifest
    data = (tmp_path / "img" / "12.jpg").read_bytes()
    (tmp_path / "img" / "12.jpg").write_bytes(data[: len(data) // 2])  # cut short after the manifest
    feat = tmp_path / "feat"
    assert featurize_main(["--manifest", str(manifest), "--out", str(feat), "--format", "hdf5", *BASE]) == 0
    ids, feats = feature_store.read_features(str(feat))
    markers = feature_store.committed_shards(str(feat))
    rejects = {r["path"].rsplit("/", 1)[-1]: r for s in markers for r in feature_store.read_rejects(str(feat), s)}
    assert set(rejects) == {"03.jpg", "12.jpg"}
    assert rejects["03.jpg"]["reason"] == "unreadable"
    assert rejects["12.jpg"]["reason"] == "truncated"
    for stem, m in markers.items():
        assert m["rows"] + m["rejects"] == m["manifest_rows"]
    assert len(ids) == 18 and not set(ids) & {r["image_id"] for r in rejects.values()}
    summary = json.loads((feat / shards.FEATURES_SUMMARY).read_text())
    assert (summary["rows"], summary["rejects"], summary["manifest_rows"]) == (18, 2, 20)
    assert summary["reject_reasons"] == {"unreadable": 1, "truncated": 1}


@pytest.mark.parametrize("fault", ["kill_before_marker:2", pytest.param("kill_after_batches:2,signal=TERM", marks=pytest.mark.slow)])
def test_kill_and_rerun_equals_clean(tmp_path, manifest, clean, fault) -> None:
    feat = tmp_path / "feat"
    args = ["--manifest", str(manifest), "--out", str(feat), "--format", "hdf5", *BASE]
    killed = run_module(args, env={"IMGFEAT_FAULT": fault})
    assert killed.returncode in (-9, -15), killed.stderr[-2000:]
    committed = feature_store.committed_shards(str(feat))
    assert sorted(committed) == ["part-00000"]  # the shard being written when killed is not committed
    assert not (feat / shards.FEATURES_SUMMARY).exists()
    if fault.startswith("kill_before_marker"):
        assert (feat / "part-00001.h5").exists()  # data renamed, marker missing: not a committed shard
    rerun = run_module(args)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert not [p for p in feat.iterdir() if storage.TMP_TAG in p.name]
    a, b = features_by_id(str(clean)), features_by_id(str(feat))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)  # byte-identical to the uninterrupted run
    summary = json.loads((feat / shards.FEATURES_SUMMARY).read_text())
    assert summary["rows"] == 40 and summary["this_run"]["shards"] == 2


def test_matches_torchvision_pil_reference(tmp_path, fruits_dir, torch_home) -> None:
    """Our OpenCV decode/resize + optimised model vs torchvision's own weights.transforms() on PIL images."""
    import torch
    from PIL import Image
    from torchvision.models import MobileNet_V2_Weights

    from imgfeat.featurize.model import reference_model
    from imgfeat.metadata.config import FeaturizeConfig

    files = pick_images(fruits_dir, split="Test", per_class=1)
    manifest = write_manifest(tmp_path / "m", files, rows_per_shard=16)
    feat = tmp_path / "feat"
    args = ["--manifest", str(manifest), "--out", str(feat), "--model", "mobilenet_v2", "--weights", "IMAGENET1K_V1",
            "--batch-size", "16", "--format", "hdf5", "-q"]  # default size 224, resize 256, bilinear
    assert featurize_main(args) == 0
    ours = features_by_id(str(feat))
    weights = MobileNet_V2_Weights.IMAGENET1K_V1
    tf = weights.transforms()
    net = reference_model(FeaturizeConfig(model="mobilenet_v2", weights="IMAGENET1K_V1"))
    table = read_manifest(str(manifest))
    batch = torch.stack([tf(Image.open(p.removeprefix("file://")).convert("RGB")) for p in table.column("path").to_pylist()])
    with torch.inference_mode():
        ref = net(batch).numpy()
    got = np.stack([ours[i] for i in table.column("image_id").to_pylist()])
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() >= 0.999, cos


@pytest.mark.s3
def test_s3_output_without_rename(s3_bucket, manifest, clean) -> None:
    """On an object store: data objects under final keys, marker last; rerun skips; same features."""
    feat = f"{s3_bucket}/feat"
    args = ["--manifest", str(manifest), "--out", feat, "--format", "hdf5", *BASE]
    assert featurize_main(args) == 0
    a, b = features_by_id(str(clean)), features_by_id(feat)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    before = {s: m["committed_at"] for s, m in shards.list_markers(feat).items()}
    assert len(before) == 3
    assert featurize_main(args) == 0
    assert {s: m["committed_at"] for s, m in shards.list_markers(feat).items()} == before
    assert storage.read_json_required(storage.join(feat, shards.FEATURES_SUMMARY))["rows"] == 40
