"""``imgfeat plan``: the sizing math, counted / estimated / given collection figures, the CLI end to end.

No timing thresholds: only that measured figures exist and are labelled.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest

from imgfeat.cli import main
from imgfeat.plan import (
    Figure,
    Level,
    collection_figures,
    extrapolate,
    featurize_cost,
    nodes_needed,
    plan_stages,
    spread_sample,
    stage_seconds,
    walk_sources,
)

from helpers import gradient_image, write_image

FAST = ["--set", "featurize.model=mobilenet_v3_small", "--set", "featurize.weights=none", "-q"]


def make_tree(root: Path, splits: int = 2, classes: int = 6, per_class: int = 30) -> Path:
    """splits x classes folders of ``per_class`` real JPEGs (a few distinct ones, copied), one PNG each."""
    jpegs = [write_image(root / "_src" / f"{i}.jpg", gradient_image(40, 56, seed=i)).read_bytes() for i in range(4)]
    png = write_image(root / "_src" / "p.png", gradient_image(32, 32, seed=9), ext=".png").read_bytes()
    tree = root / "tree"
    for s in range(splits):
        for c in range(classes):
            folder = tree / f"split{s}" / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class - 1):
                (folder / f"{i:03d}.jpg").write_bytes(jpegs[i % len(jpegs)])
            (folder / "z.png").write_bytes(png)
    return tree


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tree(tmp_path_factory.mktemp("plan"))


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(["plan", *args])
    out, err = capsys.readouterr()
    return rc, out, err


# ---- pure math ---------------------------------------------------------------------------------------

def test_sizing_rule() -> None:
    # 1M images x 0.1 s on nodes doing 8 at once within 1 h: 100,000 s / 28,800 s -> 4 nodes.
    assert nodes_needed(1_000_000, 0.1, 3600, 8) == 4
    assert nodes_needed(100, 36, 3600, 1) == 1  # exactly one node's worth: no rounding up to 2
    assert nodes_needed(101, 36, 3600, 1) == 2
    assert nodes_needed(0, 1.0, 3600, 4) == 0
    assert nodes_needed(1, 1e-9, 3600, 4) == 1  # any work needs a node
    assert stage_seconds(1000, 0.5, nodes=2, at_once=5) == pytest.approx(50.0)
    with pytest.raises(ValueError):
        nodes_needed(10, 1.0, 0, 4)


def test_plan_stages_use_the_rule() -> None:
    files, images = Figure(10_000, "counted"), Figure(9_000, "estimated")
    stages = plan_stages(files, images, Figure(0.01, "measured"), featurize_cost(16, 0, None, 0.2, 0.01),
                         Figure(1e-4, "measured"), nodes=2, cores=16, target_s=60)
    by = {s.stage: s for s in stages}
    assert by["manifest"].seconds.value == pytest.approx(10_000 * 0.01 / 32)
    assert by["manifest"].nodes_needed == math.ceil(10_000 * 0.01 / (60 * 16))
    spi = by["featurize"].seconds_per_item
    assert spi.value == pytest.approx(0.21) and spi.label == "measured"
    assert by["featurize"].nodes_needed == math.ceil(9_000 * 0.21 / (60 * 16))
    assert by["pca"].items.label == "estimated" and all(s.seconds.label == "estimated" for s in stages)


def test_featurize_cost_gpu_cpu_and_decode_bound() -> None:
    assert featurize_cost(32, 8, 500.0, None, 0.001) == (Figure(0.002, "given"), "GPU", 8, "")
    # 4 cores decode 400 images/s, less than 8 GPUs x 500: decode sets the pace.
    spi, unit, at_once, note = featurize_cost(4, 8, 500.0, None, 0.01)
    assert (unit, at_once, spi.label) == ("GPU", 8, "estimated") and spi.value == pytest.approx(8 / 400)
    assert "decode-bound" in note
    assert featurize_cost(8, 0, 40.0, None, 0.01)[:3] == (Figure(0.2, "given"), "core", 8)  # 40 images/s per node
    spi = featurize_cost(8, 0, None, 0.3, 0.01)[0]
    assert spi.value == pytest.approx(0.31) and spi.label == "measured"
    with pytest.raises(ValueError, match="--images-per-s"):
        featurize_cost(8, 4, None, 0.3, 0.01)


def test_extrapolate_follows_levels_down() -> None:
    flat = {0: Level(1, 0, 0, 4), 1: Level(2, 100, 1000, 0)}
    assert extrapolate(flat, {1: 2}) == (100.0, 1000.0)
    # One unlisted folder at depth 1 holds (like the listed one) 10 subfolders of 10 files each, plus 5 known ones.
    deep = {0: Level(1, 0, 0, 2), 1: Level(1, 0, 0, 10), 2: Level(5, 50, 500, 0)}
    assert extrapolate(deep, {1: 1, 2: 5}) == (150.0, 1500.0)
    assert extrapolate(deep, {}) == (0.0, 0.0)


def test_spread_sample_round_robin_and_even_spacing() -> None:
    assert spread_sample([["a1", "a2", "a3"], ["b1"], ["c1", "c2"]], 5) == ["a1", "b1", "c1", "a2", "c2"]
    assert spread_sample([[i] for i in range(10)], 3) == [0, 3, 6]
    assert spread_sample([["x"]], 5) == ["x"]


# ---- collection figures on a real tree ---------------------------------------------------------------

def test_whole_tree_is_counted(tree: Path) -> None:
    walk = walk_sources([f"file://{tree}"], max_list=10_000, per_folder=5)
    files, size = collection_figures(walk)
    on_disk = [p for p in tree.rglob("*") if p.is_file()]
    assert files == Figure(len(on_disk), "counted") == Figure(360, "counted")
    assert size == Figure(sum(p.stat().st_size for p in on_disk), "counted")
    assert len(walk.picks) == 15 and all(len(p) == 5 for p in walk.picks if p)


def test_tree_bigger_than_max_list_is_estimated(tree: Path) -> None:
    walk = walk_sources([f"file://{tree}"], max_list=100, per_folder=5)
    assert not walk.complete and walk.entries <= 100
    files, size = collection_figures(walk)
    assert files.label == size.label == "estimated"
    assert files.value == pytest.approx(360, rel=0.1)  # every class folder alike: the estimate lands close
    assert walk.files < 360


def test_files_and_bytes_given(tree: Path) -> None:
    walk = walk_sources([f"file://{tree}"], max_list=100, per_folder=5)
    files, size = collection_figures(walk, files_given=1_000_000)
    assert files == Figure(1_000_000, "given") and size.label == "estimated"
    assert size.value == pytest.approx(1_000_000 * walk.bytes / walk.files, rel=1e-6)
    assert collection_figures(walk, 1_000_000, 5 << 40)[1] == Figure(5 << 40, "given")


# ---- the command -------------------------------------------------------------------------------------

def test_cli_end_to_end_json(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capsys, str(tree), "--images-per-s", "50", "--sample", "40", "--nodes", "3", "--cores", "8",
                         "--target-hours", "0.001", "--json", *FAST)
    assert rc == 0
    plan = json.loads(out)
    assert plan["collection"]["files"] == {"value": 360, "label": "counted"}
    assert plan["sample"]["files"] == 40 and plan["sample"]["ok"] == 40
    assert plan["measured"]["featurize"] is None and plan["measured"]["feature_dim"] == 1024
    assert plan["measured"]["check_full_cpu_s_per_file"] > 0 and plan["measured"]["pca_cpu_s_per_row"] > 0
    stages = {s["stage"]: s for s in plan["stages"]}
    assert stages["featurize"]["seconds_per_item"] == {"value": pytest.approx(8 / 50), "label": "given"}
    assert stages["manifest"]["seconds_per_item"]["label"] == "measured"
    for s in stages.values():
        assert s["seconds"]["value"] == pytest.approx(s["items"]["value"] * s["seconds_per_item"]["value"] / (3 * s["at_once"]))
        assert s["nodes_needed"] == nodes_needed(s["items"]["value"], s["seconds_per_item"]["value"], 3.6, s["at_once"])


def test_cli_table_labels_every_figure(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capsys, str(tree), "--images-per-s", "300", "--gpus-per-node", "4", "--max-list", "100",
                         "--files", "2000000", "--sample", "30", *FAST)
    assert rc == 0
    assert "2,000,000 files (given)" in out and "(estimated)" in out and "(measured)" in out
    assert "300 images/s per GPU (given)" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("stage "))
    assert [line.split()[0] for line in lines[header + 1:header + 4]] == ["manifest", "featurize", "pca"]
    assert "4 GPUs" in lines[header + 2]


def test_cli_reads_fsspec_urls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_image(tmp_path / "a.jpg", gradient_image()).read_bytes()
    fs = fsspec.filesystem("memory")
    for c in ("x", "y"):
        for i in range(3):
            fs.pipe(f"/plan-photos/{c}/{i}.jpg", data)
    try:
        rc, out, _ = run_cli(capsys, "memory://plan-photos", "--images-per-s", "10", "--json", *FAST)
    finally:
        fs.rm("/plan-photos", recursive=True)
    assert rc == 0 and json.loads(out)["collection"]["files"] == {"value": 6, "label": "counted"}


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "SRC '{missing}': no such folder"),
    (["{tree}", "--sample", "0"], "--sample must be >= 1"),
    (["{tree}", "--target-hours", "0"], "--target-hours must be > 0"),
    (["{tree}", "--gpus-per-node", "2"], "--gpus-per-node needs --images-per-s"),
    (["{text}", "--images-per-s", "5"], "no image among the 3 sampled files"),
    (["{folders}", "--max-list", "3"], "found only folders: raise --max-list"),
])
def test_errors_are_one_line(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                             message: str) -> None:
    text = tmp_path / "text"
    text.mkdir()
    for i in range(3):
        (text / f"{i}.txt").write_text("not an image")
    for a in range(5):
        for b in range(5):
            (tmp_path / "folders" / str(a) / str(b)).mkdir(parents=True)
    fill = {"tree": str(tree), "missing": str(tmp_path / "nope"), "text": str(text), "folders": str(tmp_path / "folders")}
    rc, out, err = run_cli(capsys, *[a.format(**fill) for a in args], *FAST)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("imgfeat: error: ") and message.format(**fill) in err


def test_featurize_measured_with_a_tiny_model(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t0 = time.perf_counter()
    rc, out, _ = run_cli(capsys, str(tree), "--sample", "20", "--batches", "1", "--set", "preprocess.batch_size=8",
                         "--set", "preprocess.size=96", "--set", "preprocess.resize_shorter=110", "--json", *FAST)
    assert rc == 0
    plan = json.loads(out)
    feat = plan["measured"]["featurize"]
    assert feat["images"] == 8 and feat["images_per_s"] > 0 and feat["weights"] == "none"
    stages = {s["stage"]: s for s in plan["stages"]}
    assert stages["featurize"]["seconds_per_item"]["label"] == "measured"
    assert np.isfinite(stages["featurize"]["seconds"]["value"])
    print(f"tiny-model plan took {time.perf_counter() - t0:.1f} s")
