"""Quality: MobileNetV2 ImageNet features of fruits360-100 separate the classes (linear probe >= 95% on Test)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from imgfeat.featurize.stage_cli import main as featurize_main
from imgfeat.metadata.contracts.feature_store import read_features
from imgfeat.metadata.contracts.schema import read_manifest

from helpers import write_manifest
from run_helpers import pick_images

PROBE_SIZE = int(os.environ.get("IMGFEAT_PROBE_SIZE", "128"))


@pytest.mark.slow
def test_linear_probe_on_fruits(tmp_path, fruits_dir, torch_home) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    files = pick_images(fruits_dir, "Training", per_class=10**6) + pick_images(fruits_dir, "Test", per_class=10**6)
    manifest = write_manifest(tmp_path / "m", files, rows_per_shard=1024)
    feat = tmp_path / "feat"
    assert featurize_main(["--manifest", str(manifest), "--out", str(feat), "--model", "mobilenet_v2",
                           "--weights", "IMAGENET1K_V1", "--size", str(PROBE_SIZE), "--format", "hdf5", "-q"]) == 0
    ids, x = read_features(str(feat))
    table = read_manifest(str(manifest), columns=["image_id", "label", "split"]).to_pylist()
    meta = {r["image_id"]: r for r in table}
    assert len(ids) == len(meta) == len(files)
    labels = np.array([meta[i]["label"] for i in ids])
    train = np.array([meta[i]["split"] == "training" for i in ids])
    scaler = StandardScaler().fit(x[train])
    clf = LogisticRegression(max_iter=2000, C=0.5).fit(scaler.transform(x[train]), labels[train])
    acc = float((clf.predict(scaler.transform(x[~train])) == labels[~train]).mean())
    print(f"linear probe: {acc:.4f} on {int((~train).sum())} Test images ({PROBE_SIZE} px)")
    assert acc >= 0.95, acc
