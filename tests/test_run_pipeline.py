"""`imgfeat run` end to end on the bundled sample's generator: stages, resume, accounting, the report in Chromium."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "sample"))

pytestmark = [pytest.mark.spark, pytest.mark.slow]


@pytest.fixture(scope="module")
def demo_run(spark, torch_home, tmp_path_factory):
    from make_sample import make

    from imgfeat.metadata.config import load_config
    from imgfeat.run import run_pipeline

    root = tmp_path_factory.mktemp("demo")
    broken = make(root / "shapes", per_class=6)
    cfg = load_config(REPO / "configs" / "demo.toml", {
        "run": {"sources": [str(root / "shapes")], "out": str(root / "run")},
        "manifest": {"rows_per_shard": 8},
        "preprocess": {"size": 96, "resize_shorter": 110, "batch_size": 8, "num_workers": 1},
        "pca": {"k": 4},
    })
    report = run_pipeline(cfg)
    return root / "run", cfg, report, broken


def test_every_input_is_accounted_for(demo_run):
    run, _, report, broken = demo_run
    acc = report["accounting"]
    assert acc["manifest_rows"] == 5 * 6 + len(broken)
    assert acc["flagged_in_manifest"] == len(broken)
    assert acc["feature_rows"] + acc["featurize_rejects"] + acc["flagged_in_manifest"] == acc["manifest_rows"]
    assert acc["reconciles"] is True
    assert acc["pca_output_rows"] == acc["feature_rows"]
    for name in ("report.html", "report.json", "run.json", "config.resolved.toml", "manifest_summary.json",
                 "features/featurize_summary.json", "pca/pca_summary.json", "pca/pca_model.npz"):
        assert (run / name).is_file(), name
    assert report["featurize"]["model"]["weights"] == "IMAGENET1K_V1"


def test_rerun_resumes_instead_of_redoing(demo_run):
    from imgfeat.run import run_pipeline

    run, cfg, _, _ = demo_run
    run_pipeline(cfg)
    state = json.loads((run / "run.json").read_text())["stages"]
    assert state["manifest"]["skipped"] and state["pca"]["skipped"]
    feats = json.loads((run / "features" / "featurize_summary.json").read_text())
    assert feats["rows"] == 30


def test_report_opens_in_chromium_without_errors(demo_run, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (.ci/setup installs Debian's chromium package)")
    run = demo_run[0]
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=5000", "--dump-dom", (run / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    console_errors = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console_errors == []
    assert 'data-ready="1"' in dom
    counts = {}
    for name in ("images", "images-ok"):
        m = re.search(rf'data-{name}="(\d+)"', dom)
        assert m is not None, f"no data-{name} in the report"
        counts[name] = int(m.group(1))
    images, ok = counts["images"], counts["images-ok"]
    assert images >= 2 + 5 and ok == images  # two PCA plots and a thumbnail per flagged file
    for section in ("Per-class counts", "Flagged files", "PCA", "Neighbours", "Time per stage", "Bottleneck stage"):
        assert section in dom


def test_plot_paths_from_a_relative_run_folder_are_not_joined_twice():
    from imgfeat.report import plot_url

    assert plot_url("runs/demo", "runs/demo/pca/pca_scatter.png") == "runs/demo/pca/pca_scatter.png"
    assert plot_url("s3://b/run", "s3://b/run/pca/pca_scatter.png") == "s3://b/run/pca/pca_scatter.png"
    assert plot_url("runs/demo", "pca_scatter.png") == "runs/demo/pca/pca_scatter.png"
