"""`imgfeat run` reruns over a growing folder: new, changed (same size and not) and removed files reach the
manifest, the features and the PCA rows; a rerun with nothing changed recomputes and republishes nothing."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as ds
import pytest

from helpers import gradient_image, write_image, write_manifest

pytestmark = [pytest.mark.spark, pytest.mark.slow]

PER_SHARD = 4


def _snapshot(run: Path) -> dict[str, Any]:
    """What a rerun may or may not touch: manifest rows and version, feature files, PCA rows and model."""
    from imgfeat.featurize import read_features
    from imgfeat.metadata.contracts.schema import read_manifest

    rows = read_manifest(str(run)).to_pylist()
    ids, matrix = read_features(str(run / "features"))
    reduced = ds.dataset(str(run / "pca" / "reduced"), format="parquet", ignore_prefixes=["_", "."])
    return {
        "summary": json.loads((run / "manifest_summary.json").read_text()),
        "state": json.loads((run / "run.json").read_text()),
        "report": json.loads((run / "report.json").read_text()),
        "rows": {r["path"]: r for r in rows},
        "manifest_files": {p.name: p.stat().st_mtime_ns for p in (run / "manifest").iterdir()},
        "feature_files": {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (run / "features").glob("part-*")},
        "features": {str(i): matrix[k] for k, i in enumerate(ids)},
        "reduced_ids": sorted(reduced.to_table(columns=["image_id"])["image_id"].to_pylist()),
        "pca_model_mtime": (run / "pca" / "pca_model.npz").stat().st_mtime_ns,
    }


def _members(rows: dict[str, dict]) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for r in rows.values():
        if r["status"] == "ok":
            out.setdefault(r["shard"], set()).add(r["image_id"])
    return out


def _bump_mtime(path: Path) -> None:
    """The incremental listing compares size and mtime: make sure a rewrite is seen even on a coarse clock."""
    t = path.stat().st_mtime + 10
    os.utime(path, (t, t))


@pytest.fixture(scope="module")
def history(spark, torch_home, tmp_path_factory) -> dict[str, Any]:
    """A first run, a rerun with nothing changed, then files added, changed in place and removed, and a rerun."""
    from imgfeat.metadata.config import load_config
    from imgfeat.run import run_pipeline

    root = tmp_path_factory.mktemp("incremental")
    src = root / "src"
    for label, seed0 in (("a", 0), ("b", 100)):
        for i in range(10):
            write_image(src / label / f"{i:02d}.jpg", gradient_image(40 + i, 48, seed=seed0 + i))
        for i in range(2):
            write_image(src / label / f"p{i}.bmp", gradient_image(32, 40, seed=seed0 + 50 + i), ".bmp")
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "demo.toml", {
        "run": {"sources": [str(src)], "out": str(root / "run")},
        "manifest": {"rows_per_shard": PER_SHARD, "split_ratios": {"train": 0.75, "val": 0.25}},
        "preprocess": {"size": 64, "resize_shorter": 72, "batch_size": 4, "num_workers": 1},
        "pca": {"k": 3},
    })
    run = root / "run"
    run_pipeline(cfg)
    first = _snapshot(run)
    run_pipeline(cfg)
    same = _snapshot(run)

    by_rel = {r["rel_path"]: r for r in first["rows"].values()}
    bmp = next(rel for rel in sorted(by_rel) if rel.endswith(".bmp"))
    jpg = next(rel for rel in sorted(by_rel) if rel.endswith(".jpg") and by_rel[rel]["shard"] != by_rel[bmp]["shard"])
    touched = {by_rel[bmp]["shard"], by_rel[jpg]["shard"]}
    gone_shard = next(s for s in sorted(_members(first["rows"])) if s not in touched)
    removed = sorted(rel for rel, r in by_rel.items() if r["shard"] == gone_shard)
    removed.append(next(rel for rel in sorted(by_rel) if rel not in removed and rel not in (bmp, jpg)))
    size_before = (src / bmp).stat().st_size
    write_image(src / bmp, gradient_image(32, 40, seed=999), ".bmp")  # same size, other pixels
    assert (src / bmp).stat().st_size == size_before
    jpg_size_before = (src / jpg).stat().st_size
    write_image(src / jpg, gradient_image(60, 44, seed=998))
    assert (src / jpg).stat().st_size != jpg_size_before
    for path in (src / bmp, src / jpg):
        _bump_mtime(path)
    for rel in removed:
        (src / rel).unlink()
    added = [f"a/new{i}.jpg" for i in range(3)]
    for i, rel in enumerate(added):
        write_image(src / rel, gradient_image(44, 52, seed=500 + i))
    run_pipeline(cfg)
    after = _snapshot(run)
    return {"root": root, "src": src, "run": run, "cfg": cfg, "first": first, "same": same, "after": after,
            "changed": [bmp, jpg], "removed": removed, "added": added, "gone_shard": gone_shard}


def test_no_change_rerun_recomputes_and_republishes_nothing(history):
    first, same = history["first"], history["same"]
    assert same["summary"]["version"] == first["summary"]["version"]
    assert same["summary"]["published"] is False
    assert same["summary"]["incremental"] == {"unchanged": first["summary"]["total"], "new": 0, "changed": 0, "removed": 0}
    assert "check_s" not in same["summary"]["timings"]  # the sources listed as before: no file was read again
    assert same["manifest_files"] == first["manifest_files"]
    assert same["feature_files"] == first["feature_files"]  # not one shard rewritten (bytes and mtimes)
    assert same["pca_model_mtime"] == first["pca_model_mtime"]
    stages = same["state"]["stages"]
    assert stages["manifest"]["skipped"] and stages["manifest"]["published"] is False
    assert stages["featurize"]["skipped"] and stages["pca"]["skipped"]
    changes = same["report"]["changes"]
    assert (changes["added"], changes["changed"], changes["removed"]) == (0, 0, 0)
    assert changes["stages"] == {"manifest": "skipped", "featurize": "skipped", "pca": "skipped",
                                 "neighbors": "skipped"}  # configs/demo.toml turns neighbours on


def test_rerun_accounts_for_exactly_the_current_files(history):
    from imgfeat.verify import verify_run

    src, after = history["src"], history["after"]
    current = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}
    rows = after["rows"]
    assert {r["rel_path"] for r in rows.values()} == current
    ok_ids = sorted(r["image_id"] for r in rows.values() if r["status"] == "ok")
    assert len(ok_ids) == len(current)  # every generated file is a valid, distinct image
    assert sorted(after["features"]) == ok_ids
    assert after["reduced_ids"] == ok_ids
    assert after["summary"]["version"] == history["first"]["summary"]["version"] + 1
    v = verify_run(str(history["run"]), str(history["run"] / "features"))
    assert v.ok, v.problems
    assert v.feature_rows == len(ok_ids)


def test_rerun_recomputes_only_new_and_changed_shards(history):
    first, after = history["first"], history["after"]
    old, new = _members(first["rows"]), _members(after["rows"])
    by_rel = {r["rel_path"]: r for r in after["rows"].values()}
    first_by_rel = {r["rel_path"]: r for r in first["rows"].values()}
    for rel in history["changed"]:  # a changed file leaves its shard, so that shard is recomputed
        assert by_rel[rel]["shard"] not in old, rel
    assert history["gone_shard"] not in new
    assert not any(n.startswith(f"part-{history['gone_shard']:05d}.") for n in after["feature_files"])
    kept = {s for s in new if old.get(s) == new[s]}
    redone = set(new) - kept
    assert kept and redone
    for s in new:
        marker = f"part-{s:05d}.done.json"
        if s in kept:
            assert after["feature_files"][marker] == first["feature_files"][marker], s
        else:
            assert after["feature_files"][marker] != first["feature_files"].get(marker), s
    for rel, r in by_rel.items():  # untouched files keep their shard and split
        if rel in first_by_rel and rel not in history["changed"]:
            assert (r["shard"], r["split"]) == (first_by_rel[rel]["shard"], first_by_rel[rel]["split"])
    stages = after["state"]["stages"]
    assert not stages["manifest"]["skipped"] and not stages["featurize"]["skipped"] and not stages["pca"]["skipped"]
    assert stages["featurize"]["shards_computed"] == len(redone)


def test_changed_files_get_fresh_features(history, tmp_path):
    from imgfeat.featurize.stage_cli import main as featurize_main
    from imgfeat.metadata.contracts.feature_store import read_features
    from imgfeat.metadata.contracts.schema import image_id_for, normalize_uri

    src, run, first, after = history["src"], history["run"], history["first"], history["after"]
    paths = [src / rel for rel in history["changed"]]
    manifest = write_manifest(tmp_path / "m", [{"path": p, "label": "a"} for p in paths], rows_per_shard=PER_SHARD)
    assert featurize_main(["--manifest", str(manifest), "--out", str(tmp_path / "f"),
                           "--config", str(run / "config.resolved.toml"), "-q"]) == 0
    ids, matrix = read_features(str(tmp_path / "f"))
    fresh = {str(i): matrix[k] for k, i in enumerate(ids)}
    for p in paths:
        image_id = image_id_for(normalize_uri(str(p)))
        now, stale = after["features"][image_id], first["features"][image_id]
        np.testing.assert_allclose(now, fresh[image_id], rtol=1e-4, atol=1e-4)
        assert np.abs(now - stale).max() > 100 * np.abs(now - fresh[image_id]).max() + 1e-3, p


def test_report_shows_the_changes(history):
    after = history["after"]
    changes = after["report"]["changes"]
    unchanged = history["first"]["summary"]["total"] - len(history["removed"]) - len(history["changed"])
    assert (changes["added"], changes["changed"], changes["removed"], changes["unchanged"]) == (
        len(history["added"]), len(history["changed"]), len(history["removed"]), unchanged)
    assert after["summary"]["incremental"] == {"unchanged": unchanged, "new": len(history["added"]),
                                               "changed": len(history["changed"]), "removed": len(history["removed"])}
    assert changes["stages"] == {"manifest": "ran", "featurize": "ran", "pca": "ran", "neighbors": "ran"}
    assert changes["manifest_published"] is True
    assert changes["feature_shards_dropped"] >= 1  # the shard whose every file was removed
    page = (history["run"] / "report.html").read_text()
    section = page[page.index("<h2 id='changes'>"):]
    section = section[:section.index("<h2", 4)]
    cells = "".join(f"<td class='n'>{n}</td>" for n in (changes["added"], changes["changed"], changes["removed"], unchanged))
    assert cells in section


def test_manifest_rechecks_without_a_new_version_when_outcomes_repeat(spark, tmp_path):
    """Sources that list as before need no check job. Without that record (object stores, older run folders)
    the check job runs, and a broken link that fails to list for the same reason as before is unchanged: the
    same version. A file rewritten with the same bytes keeps its shard, so its features are kept."""
    from imgfeat.metadata.config import load_config
    from imgfeat.metadata.contracts.schema import read_manifest
    from imgfeat.metadata.manifest.job import run_manifest

    src = tmp_path / "src"
    for i in range(6):
        write_image(src / "a" / f"{i}.jpg", gradient_image(40, 48, seed=300 + i))
    (src / "a" / "dangling.jpg").symlink_to(src / "nowhere.jpg")
    cfg = load_config(None, {"manifest": {"rows_per_shard": 2}})
    out = tmp_path / "out"
    first = run_manifest(cfg, [str(src)], str(out))
    listed = run_manifest(cfg, [str(src)], str(out), incremental=True)
    assert listed["incremental"] == {"unchanged": 7, "new": 0, "changed": 0, "removed": 0}
    assert (listed["version"], listed["published"], "check_s" in listed["timings"]) == (first["version"], False, False)
    summary = json.loads((out / "manifest_summary.json").read_text())
    (out / "manifest_summary.json").write_text(json.dumps(dict(summary, listing_digest=None)))
    again = run_manifest(cfg, [str(src)], str(out), incremental=True)
    assert again["incremental"] == {"unchanged": 7, "new": 0, "changed": 0, "removed": 0}
    assert (again["version"], again["published"], "check_s" in again["timings"]) == (first["version"], False, True)
    assert not (out / "manifest_history").exists()

    before = {r["rel_path"]: r for r in read_manifest(str(out)).to_pylist()}
    touched = src / "a" / "3.jpg"
    touched.write_bytes(touched.read_bytes())
    _bump_mtime(touched)
    third = run_manifest(cfg, [str(src)], str(out), incremental=True)
    assert (third["version"], third["published"]) == (first["version"] + 1, True)
    after = {r["rel_path"]: r for r in read_manifest(str(out)).to_pylist()}
    assert after["a/3.jpg"]["mtime"] != before["a/3.jpg"]["mtime"]
    assert {rel: r["shard"] for rel, r in after.items()} == {rel: r["shard"] for rel, r in before.items()}


def test_driver_listing_is_bounded(tmp_path) -> None:
    """Over DRIVER_LISTING_MAX files the driver gives up its own listing: the check tasks list at scale."""
    from imgfeat.metadata.manifest.listing import check_source
    from imgfeat.metadata.manifest.store import listing_digest

    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(b"x" * i)
    root = check_source(str(tmp_path))
    assert listing_digest([root], limit=3) is not None
    assert listing_digest([root], limit=2) is None
    assert listing_digest([root]) == listing_digest([root])


def test_full_rebuild_keeps_the_features_of_unchanged_files(spark, torch_home, tmp_path) -> None:
    """A [manifest] config change rebuilds the manifest; the feature shards whose files kept their bytes stay
    (compared on Spark, by content hash), the one holding a rewritten file is recomputed."""
    from imgfeat.metadata.config import load_config
    from imgfeat.run import run_pipeline
    from imgfeat.stale_features import SNAPSHOT_DIR

    src = tmp_path / "src"
    for i in range(8):
        write_image(src / "a" / f"{i}.bmp", gradient_image(32, 40, seed=700 + i), ".bmp")
    overrides: dict[str, Any] = {
        "run": {"sources": [str(src)], "out": str(tmp_path / "run")},
        "manifest": {"rows_per_shard": PER_SHARD, "validation": "full"},
        "preprocess": {"size": 64, "resize_shorter": 72, "batch_size": 4, "num_workers": 1},
        "pca": {"k": 2},
    }
    demo = Path(__file__).resolve().parent.parent / "configs" / "demo.toml"
    run = tmp_path / "run"
    run_pipeline(load_config(demo, overrides))
    first = _snapshot(run)
    changed = src / "a" / "5.bmp"
    size = changed.stat().st_size
    write_image(changed, gradient_image(32, 40, seed=999), ".bmp")  # same size, other bytes
    assert changed.stat().st_size == size
    overrides["manifest"] = dict(overrides["manifest"], validation="header")  # a full rebuild
    run_pipeline(load_config(demo, overrides))
    after = _snapshot(run)
    stages = after["state"]["stages"]
    assert stages["manifest"]["mode"] == "full" and stages["manifest"]["feature_shards_dropped"] == 1
    assert stages["featurize"]["shards_computed"] == 1
    shard_of = {r["path"]: r["shard"] for r in after["rows"].values()}
    redone = f"part-{shard_of['file://' + str(changed)]:05d}"
    for name, (mtime, data) in first["feature_files"].items():
        if not name.startswith(redone):
            assert after["feature_files"][name] == (mtime, data), name
    assert not (run / SNAPSHOT_DIR).exists()
