"""imgfeat prep: round trips (npy, hdf5), reruns, rejects, the CLI, --show and the training Dataset."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from imgfeat.metadata.config import Config, load_config
from imgfeat.metadata.contracts.shards import PREP_SUMMARY, list_markers, verify_shard
from imgfeat.preprocess.dataset import ManifestDataset
from imgfeat.preprocess.export import prep_preprocess_config, run_prep
from imgfeat.preprocess.show import show_prep
from imgfeat.preprocess.train_dataset import PrepDataset

from helpers import gradient_image, write_image, write_manifest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def manifest(tmp_path):
    files = []
    for i in range(11):
        label = ("apple", "kiwi", "lemon")[i % 3]
        path = write_image(tmp_path / "src" / label / f"{i}.jpg", gradient_image(40 + i, 60, seed=i), ".jpg")
        files.append({"path": path, "label": label, "split": "train" if i < 9 else "val"})
    files.append({"path": tmp_path / "src" / "gone.jpg", "status": "unreadable"})
    return write_manifest(tmp_path / "out", files)


def cfg_for(fmt: str, size: int = 24, rows: int = 4, split: str = "") -> Config:
    cfg = Config()
    cfg.prep.format, cfg.prep.size, cfg.prep.rows_per_shard, cfg.prep.split = fmt, size, rows, split
    cfg.preprocess.num_workers = 0
    return cfg


def expected_images(manifest_dir: Path, cfg: Config) -> dict[str, tuple[np.ndarray, int]]:
    pre = prep_preprocess_config(cfg)
    ds = ManifestDataset.from_manifest(str(manifest_dir), pre, size=cfg.prep.size, resize_shorter=cfg.prep.size)
    out = {}
    for i in range(len(ds)):
        image, _, ok, _ = ds[i]
        if ok:
            out[ds.image_ids[i]] = (image.permute(1, 2, 0).numpy(), ds.labels[i])
    return out


@pytest.mark.parametrize("fmt", ["npy", "hdf5"])
def test_round_trip(tmp_path, manifest, fmt):
    cfg = cfg_for(fmt)
    prep = tmp_path / "prep"
    summary = run_prep(cfg, str(manifest), str(prep))
    assert (summary["selected"], summary["written"], summary["rejected"], summary["shards"]) == (11, 11, 0, 3)
    assert summary["classes"] == ["apple", "kiwi", "lemon"]
    assert json.loads((prep / PREP_SUMMARY).read_text())["written"] == 11
    assert load_config(prep / "config.resolved.toml").prep.format == fmt
    markers = list_markers(str(prep))
    assert sorted(markers) == ["part-00000", "part-00001", "part-00002"]
    for stem, marker in markers.items():
        verify_shard(str(prep), stem, marker)
        assert marker["kind"] == "prep" and marker["fingerprint"] == summary["fingerprint"]
    expect = expected_images(manifest, cfg)
    ds = PrepDataset(str(prep))
    assert len(ds) == 11
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 24, 24)
        ref, ref_label = expect[ds.image_id(i)]
        assert np.array_equal(image.permute(1, 2, 0).numpy(), ref) and label == ref_label
    hwc = PrepDataset(str(prep), channels_first=False, checksums=True)
    assert hwc[0][0].shape == (24, 24, 3)
    # Random access from worker processes (each opens its own handles).
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, shuffle=True)
    assert sum(len(y) for _, y in loader) == 11


def test_hdf5_layout(tmp_path, manifest):
    import h5py

    run_prep(cfg_for("hdf5"), str(manifest), str(tmp_path / "prep"))
    with h5py.File(tmp_path / "prep" / "part-00000.h5", "r") as h5:
        images = h5["images"]
        assert images.dtype == np.uint8 and images.shape == (4, 24, 24, 3)
        assert images.chunks is not None and images.compression == "lzf"
        assert h5["labels"].dtype == np.int32 and h5["image_id"].dtype == np.dtype("S32")
        assert json.loads(h5.attrs["config"])["prep"]["size"] == 24
        assert json.loads(h5.attrs["classes"]) == ["apple", "kiwi", "lemon"]


def test_npy_layout(tmp_path, manifest):
    run_prep(cfg_for("npy"), str(manifest), str(tmp_path / "prep"))
    names = sorted(p.name for p in (tmp_path / "prep").iterdir())
    assert "part-00000.images.npy" in names and "part-00000.labels.npy" in names and "part-00000.ids.npy" in names
    assert not [n for n in names if n.startswith(".")]
    assert np.load(tmp_path / "prep" / "part-00002.images.npy").shape == (3, 24, 24, 3)


def test_split_and_rejects_reconcile(tmp_path, manifest):
    os.remove(tmp_path / "src" / "kiwi" / "4.jpg")
    (tmp_path / "src" / "apple" / "3.jpg").write_bytes(b"\xff\xd8\xff garbage")
    summary = run_prep(cfg_for("npy", split="train"), str(manifest), str(tmp_path / "prep"))
    assert summary["selected"] == 9
    assert summary["written"] == 7 and summary["rejected"] == 2
    assert summary["written"] + summary["rejected"] == summary["selected"]
    rejects = [r for m in list_markers(str(tmp_path / "prep")).values() for r in m["rejects"]]
    assert sorted(r["path"].rsplit("/", 1)[-1] for r in rejects) == ["3.jpg", "4.jpg"]
    assert {r["reason"] for r in rejects} <= {"unreadable", "truncated", "undecodable"}
    assert all(r["detail"] for r in rejects)  # the record featurize writes: code and detail apart
    assert len(PrepDataset(str(tmp_path / "prep"))) == 7
    with pytest.raises(ValueError, match="prep.split"):
        run_prep(cfg_for("npy", split="nope"), str(manifest), str(tmp_path / "prep2"))


def test_rerun_skips_completed_shards(tmp_path, manifest):
    prep = tmp_path / "prep"
    cfg = cfg_for("hdf5")
    run_prep(cfg, str(manifest), str(prep))
    before = {s: m["committed_at"] for s, m in list_markers(str(prep)).items()}
    again = run_prep(cfg, str(manifest), str(prep))
    assert again["shards_skipped"] == 3 and again["shards_written"] == 0 and again["written"] == 11
    assert {s: m["committed_at"] for s, m in list_markers(str(prep)).items()} == before
    # A shard killed before its marker (data file left, no marker) and a stale temporary are redone/cleaned.
    (prep / "part-00001.done.json").unlink()
    (prep / ".part-00001.h5.tmp-1-deadbeef").write_bytes(b"partial")
    third = run_prep(cfg, str(manifest), str(prep))
    assert third["shards_written"] == 1 and third["shards_skipped"] == 2 and third["written"] == 11
    assert not list(prep.glob(".*tmp-*"))
    after = {s: m["committed_at"] for s, m in list_markers(str(prep)).items()}
    assert after["part-00000"] == before["part-00000"] and after["part-00001"] != before["part-00001"]


def test_config_change_needs_overwrite(tmp_path, manifest):
    prep = tmp_path / "prep"
    run_prep(cfg_for("npy"), str(manifest), str(prep))
    with pytest.raises(ValueError, match="overwrite"):
        run_prep(cfg_for("npy", size=16), str(manifest), str(prep))
    summary = run_prep(cfg_for("npy", size=16), str(manifest), str(prep), overwrite=True)
    assert summary["shards_written"] == 3 and PrepDataset(str(prep))[0][0].shape == (3, 16, 16)


def test_show_and_contact_sheet(tmp_path, manifest):
    import cv2

    prep = tmp_path / "prep"
    run_prep(cfg_for("hdf5"), str(manifest), str(prep))
    sheet = tmp_path / "sheet.png"
    text = show_prep(str(prep), str(sheet))
    assert "apple" in text and "kiwi" in text and "rejected      0" in text
    img = cv2.imread(str(sheet))
    assert img is not None and img.shape[0] >= 3 * 64
    with pytest.raises(ValueError, match="no committed prep shards"):
        show_prep(str(tmp_path / "empty"))


def test_register_adds_prep_subcommand(tmp_path, manifest):
    from imgfeat.preprocess.cli import register

    parser = argparse.ArgumentParser(prog="imgfeat")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prep", "--manifest", str(manifest), "--out", str(tmp_path / "prep"), "--size", "16",
                              "--format", "npy", "--rows-per-shard", "5", "--num-workers", "0"])
    assert args.func(args) == 0
    assert len(list_markers(str(tmp_path / "prep"))) == 3
    args = parser.parse_args(["prep", "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="--manifest"):
        args.func(args)
    args = parser.parse_args(["prep", "--manifest", str(manifest), "--out", str(tmp_path / "y"), "--size", "0"])
    with pytest.raises(ValueError, match="prep.size"):
        args.func(args)


@pytest.mark.slow
def test_python_m_preprocess(tmp_path, manifest):
    env = dict(os.environ, PYTHONPATH=str(REPO), TQDM_DISABLE="1")
    prep = tmp_path / "prep"
    run = subprocess.run([sys.executable, "-m", "imgfeat.preprocess", "--manifest", str(manifest), "--out", str(prep),
                          "--size", "16", "--format", "hdf5", "--split", "train", "-q"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1])["written"] == 9
    show = subprocess.run([sys.executable, "-m", "imgfeat.preprocess", "--show", str(prep), "--contact-sheet",
                           str(tmp_path / "s.png")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert show.returncode == 0 and "lemon" in show.stdout and (tmp_path / "s.png").exists()
    bad = subprocess.run([sys.executable, "-m", "imgfeat.preprocess", "--manifest", str(manifest)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr


def test_prep_fruits(tmp_path, fruits_dir):
    files = sorted(fruits_dir.glob("Test/*/*.jpg"))[::10]
    manifest = write_manifest(tmp_path / "out", [{"path": p, "label": p.parent.name, "split": "test"} for p in files])
    cfg = cfg_for("hdf5", size=64, rows=64)
    cfg.preprocess.num_workers = 2
    summary = run_prep(cfg, str(manifest), str(tmp_path / "prep"))
    assert summary["written"] == len(files) and summary["rejected"] == 0
    assert len(summary["classes"]) == 10
