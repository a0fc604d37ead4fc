"""The manifest job on Spark: every status code, labels, duplicates, splits, shards, incremental."""
from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from imgfeat.metadata.config import load_config
from imgfeat.metadata.contracts.schema import MANIFEST_COLUMNS, image_id_for, read_manifest, read_summary
from imgfeat.metadata.manifest.cli import format_summary

from helpers import gradient_image, write_image

pytestmark = pytest.mark.spark


def _png_chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data) & 0xFFFFFFFF)


def png_with_bad_stream(w: int = 8, h: int = 8) -> bytes:
    """A PNG whose chunks and CRCs are fine but whose IDAT is not a zlib stream: only a decode finds it."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"not zlib data at all") + _png_chunk(b"IEND", b"")


def png_bomb_header(w: int = 50_000, h: int = 50_000) -> bytes:
    """A small PNG whose header claims w x h pixels."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + _png_chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def messy_tree(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A labelled tree with one file per status code; returns (root, {relative path: expected status})."""
    root = tmp_path_factory.mktemp("messy") / "src"
    expect: dict[str, str] = {}
    for label in ("cat", "dog"):
        for i in range(12):
            write_image(root / label / f"{i:02d}.jpg", gradient_image(40, 50, seed=i + (100 if label == "dog" else 0)))
            expect[f"{label}/{i:02d}.jpg"] = "ok"
    write_image(root / "cat" / "p.png", gradient_image(20, 30, seed=7), ".png")
    expect["cat/p.png"] = "ok"
    (root / "cat" / "copy of 00.jpg").write_bytes((root / "cat" / "00.jpg").read_bytes())
    expect["cat/copy of 00.jpg"] = "duplicate"
    (root / "dog" / "from cat.jpg").write_bytes((root / "cat" / "01.jpg").read_bytes())
    expect["dog/from cat.jpg"] = "duplicate"
    (root / "dog" / "empty.jpg").write_bytes(b"")
    expect["dog/empty.jpg"] = "zero_bytes"
    (root / "dog" / "notes.txt").write_text("hello, not an image\n")
    expect["dog/notes.txt"] = "not_image"
    (root / "dog" / "page.png").write_text("<!doctype html><html><body>404</body></html>")
    expect["dog/page.png"] = "not_image"
    (root / "dog" / "random.jpg").write_bytes(np.random.default_rng(1).bytes(3000))
    expect["dog/random.jpg"] = "not_image"
    (root / "dog" / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64)
    expect["dog/photo.heic"] = "unsupported_format"
    full = (root / "cat" / "02.jpg").read_bytes()
    (root / "cat" / "cut.jpg").write_bytes(full[: len(full) // 2])
    expect["cat/cut.jpg"] = "truncated"
    (root / "cat" / "stream.png").write_bytes(png_with_bad_stream())
    expect["cat/stream.png"] = "undecodable"
    (root / "cat" / "bomb.png").write_bytes(png_bomb_header())
    expect["cat/bomb.png"] = "too_large"
    write_image(root / "bad..label" / "x.jpg", gradient_image(seed=99))
    expect["bad..label/x.jpg"] = "bad_label"
    (root / "cat" / "dangling.jpg").symlink_to(root / "nowhere.jpg")
    expect["cat/dangling.jpg"] = "unreadable"
    (root / "dog" / "loop").symlink_to(root)
    expect["dog/loop"] = "unreadable"
    write_image(root / "dog" / "name with spaces ünï.jpg", gradient_image(seed=5))
    expect["dog/name with spaces ünï.jpg"] = "ok"
    return root, expect


@pytest.fixture(scope="module")
def messy_manifest(spark, messy_tree, tmp_path_factory):
    from imgfeat.metadata.manifest.job import run_manifest

    root, _ = messy_tree
    out = tmp_path_factory.mktemp("messy_out")
    cfg = load_config(None, {"manifest": {"rows_per_shard": 5}})
    summary = run_manifest(cfg, [str(root)], str(out))
    return out, summary, read_manifest(str(out)).to_pylist()


def test_every_file_is_one_row_with_the_expected_status(messy_tree, messy_manifest):
    root, expect = messy_tree
    _, summary, rows = messy_manifest
    got = {r["rel_path"]: r["status"] for r in rows}
    assert len(rows) == len(got) == len(expect) == summary["total"]
    assert got == expect
    assert sum(summary["by_status"].values()) == summary["total"]
    for r in rows:
        assert r["status"] == "ok" or r["status_detail"], r
    assert list(read_manifest(str(messy_manifest[0])).schema.names) == list(MANIFEST_COLUMNS)


def test_ids_are_stable_hashes_of_the_uri(messy_manifest):
    _, _, rows = messy_manifest
    for r in rows:
        assert r["image_id"] == image_id_for(r["path"])
        assert r["path"].startswith("file://")
    assert len({r["image_id"] for r in rows}) == len(rows)


def test_metadata_columns(messy_manifest):
    _, _, rows = messy_manifest
    by = {r["rel_path"]: r for r in rows}
    jpg = by["cat/00.jpg"]
    assert (jpg["format"], jpg["width"], jpg["height"], jpg["channels"]) == ("jpeg", 50, 40, 3)
    assert jpg["size_bytes"] == os.path.getsize(jpg["path"][len("file://"):])
    assert by["cat/p.png"]["format"] == "png" and by["cat/p.png"]["channels"] == 3
    assert by["dog/photo.heic"]["format"] == "heif"
    assert by["cat/bomb.png"]["width"] == 50_000
    assert by["cat/00.jpg"]["content_hash"] == by["cat/copy of 00.jpg"]["content_hash"]


def test_duplicates_point_at_the_first_copy_and_share_its_split(messy_manifest):
    _, _, rows = messy_manifest
    by = {r["rel_path"]: r for r in rows}
    dup, orig = by["cat/copy of 00.jpg"], by["cat/00.jpg"]
    assert dup["duplicate_of"] == orig["image_id"] and orig["duplicate_of"] is None
    assert dup["split"] == orig["split"] and dup["shard"] is None
    cross = by["dog/from cat.jpg"]
    assert cross["duplicate_of"] == by["cat/01.jpg"]["image_id"]
    assert cross["split"] == by["cat/01.jpg"]["split"]


def test_labels_and_index(messy_manifest):
    _, summary, rows = messy_manifest
    by = {r["rel_path"]: r for r in rows}
    assert by["cat/00.jpg"]["label"] == "cat" and by["cat/00.jpg"]["label_index"] == 0
    assert by["dog/00.jpg"]["label_index"] == 1
    assert by["bad..label/x.jpg"]["label_index"] is None
    assert summary["by_label"] == {"cat": 13, "dog": 13}


def test_hash_splits_are_stratified(messy_manifest):
    _, summary, rows = messy_manifest
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["split"] in ("train", "val", "test") for r in ok)
    for label in ("cat", "dog"):
        per = summary["by_label_split"][label]
        assert per == {"train": 10, "val": 2, "test": 1} or per == {"train": 10, "val": 1, "test": 2}


def test_shards_cover_ok_rows_balanced(messy_manifest):
    _, summary, rows = messy_manifest
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["shard"] is not None for r in ok)
    assert all(r["shard"] is None for r in rows if r["status"] != "ok")
    sizes = np.bincount([r["shard"] for r in ok])
    assert len(sizes) == summary["num_shards"] == 6  # 26 ok rows, 5 per shard
    assert sizes.max() - sizes.min() <= 1


def test_summary_file_and_show(messy_manifest):
    out, summary, _ = messy_manifest
    on_disk = read_summary(str(out))
    assert on_disk["by_status"] == summary["by_status"]
    assert on_disk["fingerprint"] and on_disk["timings"]["total_s"] > 0
    text = format_summary(on_disk)
    assert "truncated" in text and "cat" in text
    assert (out / "config.resolved.toml").is_file()


def test_rerun_gives_same_rows_and_incremental_rechecks_only_changes(spark, messy_tree, messy_manifest, tmp_path):
    from imgfeat.metadata.manifest.job import run_manifest

    root, _ = messy_tree
    out, first, rows = messy_manifest
    cfg = load_config(None, {"manifest": {"rows_per_shard": 5}})
    write_image(root / "dog" / "new.jpg", gradient_image(seed=1234))
    try:
        summary = run_manifest(cfg, [str(root)], str(out), incremental=True)
        # The dangling link and the loop fail to list for the same reasons as before: unchanged, not changed.
        assert summary["incremental"] == {"unchanged": first["total"], "new": 1, "changed": 0, "removed": 0}
        assert summary["version"] == first["version"] + 1
        assert (out / "manifest_history" / f"v{first['version']:04d}").is_dir()
        new_rows = {r["rel_path"]: r for r in read_manifest(str(out)).to_pylist()}
        old = {r["rel_path"]: r for r in rows}
        for rel, r in old.items():
            assert new_rows[rel]["image_id"] == r["image_id"]
            assert new_rows[rel]["status"] == r["status"]
            assert new_rows[rel]["shard"] == r["shard"] and new_rows[rel]["split"] == r["split"]
        assert new_rows["dog/new.jpg"]["status"] == "ok"
        assert new_rows["dog/new.jpg"]["shard"] == first["num_shards"]
    finally:
        (root / "dog" / "new.jpg").unlink()


def test_header_mode_skips_the_decode(spark, tmp_path):
    from imgfeat.metadata.manifest.job import run_manifest

    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    (src / "stream.png").write_bytes(png_with_bad_stream())
    write_image(src / "fine.jpg", gradient_image())
    cfg = load_config(None, {"manifest": {"validation": "header", "near_duplicates": "off"}})
    run_manifest(cfg, [str(tmp_path / "src")], str(tmp_path / "out"))
    rows = {r["rel_path"]: r for r in read_manifest(str(tmp_path / "out")).to_pylist()}
    assert {rel: r["status"] for rel, r in rows.items()} == {"a/stream.png": "ok", "a/fine.jpg": "ok"}
    assert rows["a/fine.jpg"]["phash"] is None
    # Near-duplicate detection needs each image's hash: with it on, header mode decodes (and so sees the bad
    # stream).
    cfg = load_config(None, {"manifest": {"validation": "header", "near_duplicates": "flag"}})
    run_manifest(cfg, [str(tmp_path / "src")], str(tmp_path / "out2"))
    rows = {r["rel_path"]: r for r in read_manifest(str(tmp_path / "out2")).to_pylist()}
    assert rows["a/stream.png"]["status"] == "undecodable" and rows["a/stream.png"]["phash"] is None
    assert rows["a/fine.jpg"]["status"] == "ok" and rows["a/fine.jpg"]["phash"] is not None
    assert 0 <= rows["a/fine.jpg"]["brightness"] <= 255 and rows["a/fine.jpg"]["entropy"] > 0


def test_caps_from_config(spark, tmp_path):
    from imgfeat.metadata.manifest.job import run_manifest

    src = tmp_path / "src" / "a"
    write_image(src / "big.png", gradient_image(100, 100), ".png")
    write_image(src / "small.png", gradient_image(10, 10), ".png")
    cfg = load_config(None, {"decode": {"max_pixels": 5000}})
    run_manifest(cfg, [str(tmp_path / "src")], str(tmp_path / "out"))
    got = {r["rel_path"]: (r["status"], r["status_detail"]) for r in read_manifest(str(tmp_path / "out")).to_pylist()}
    assert got["a/small.png"][0] == "ok"
    assert got["a/big.png"][0] == "too_large" and "pixel cap" in got["a/big.png"][1]


def test_missing_source_fails_fast_naming_it(spark, tmp_path):
    from imgfeat.metadata.manifest.job import run_manifest

    with pytest.raises(ValueError, match="does-not-exist"):
        run_manifest(load_config(), [str(tmp_path / "does-not-exist")], str(tmp_path / "out"))


def test_real_photos_keep_folder_splits(spark, fruits_dir, tmp_path):
    from imgfeat.metadata.manifest.job import run_manifest

    summary = run_manifest(load_config(), [str(fruits_dir)], str(tmp_path / "out"))
    table = read_manifest(str(tmp_path / "out"))
    images = table.filter(pc.field("format") == "jpeg")
    assert images.num_rows == 7424
    counted = {s: n for s, n in summary["by_split"].items()}
    train = sum(1 for _ in (fruits_dir / "Training").rglob("*.jpg"))
    test = sum(1 for _ in (fruits_dir / "Test").rglob("*.jpg"))
    dups = summary["by_status"].get("duplicate", 0)
    assert counted["train"] + counted["test"] + dups == train + test
    assert summary["labels"] == 10
    assert summary["by_status"]["not_image"] == 1  # provenance.csv


def test_pngsuite_corrupt_files_are_flagged(spark, pngsuite_dir, tmp_path):
    from imgfeat.metadata.manifest.job import run_manifest

    run_manifest(load_config(), [str(pngsuite_dir)], str(tmp_path / "out"))
    rows = read_manifest(str(tmp_path / "out")).to_pylist()
    assert len(rows) == len(list(pngsuite_dir.iterdir()))
    for r in rows:
        name = r["rel_path"]
        if name.startswith("x"):
            assert r["status"] in ("undecodable", "not_image", "truncated"), (name, r["status"])
        else:
            assert r["status"] in ("ok", "duplicate"), (name, r["status"], r["status_detail"])


def test_cli_show(messy_manifest, capsys):
    from imgfeat.cli import main

    out, _, _ = messy_manifest
    assert main(["manifest", "--show", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] > 0
    assert main(["manifest", "--out", str(out)]) == 2
    assert "SRC" in capsys.readouterr().err


def test_labels_from_csv_and_regex(spark, tmp_path):
    from imgfeat.metadata.manifest.job import run_manifest

    src = tmp_path / "src"
    for name in ("a_1.jpg", "b_2.jpg", "c_3.jpg", "d_4.jpg"):
        write_image(src / "flat" / name, gradient_image(seed=ord(name[0])))
    csv = tmp_path / "labels.csv"
    csv.write_text(f"path,label\nflat/a_1.jpg,apple\n{(src / 'flat' / 'b_2.jpg').as_uri()},banana\nflat/c_3.jpg,../up\n")
    cfg = load_config(None, {"manifest": {"label_from": "csv", "labels_csv": str(csv)}})
    run_manifest(cfg, [str(src)], str(tmp_path / "out"))
    got = {r["rel_path"]: (r["label"], r["status"]) for r in read_manifest(str(tmp_path / "out")).to_pylist()}
    assert got == {"flat/a_1.jpg": ("apple", "ok"), "flat/b_2.jpg": ("banana", "ok"),
                   "flat/c_3.jpg": ("../up", "bad_label"), "flat/d_4.jpg": (None, "bad_label")}

    cfg = load_config(None, {"manifest": {"label_from": "regex", "label_regex": r"/(?P<label>[a-c])_\d"}})
    run_manifest(cfg, [str(src)], str(tmp_path / "out2"))
    got = {r["rel_path"]: (r["label"], r["status"]) for r in read_manifest(str(tmp_path / "out2")).to_pylist()}
    assert got["flat/a_1.jpg"] == ("a", "ok") and got["flat/d_4.jpg"] == (None, "bad_label")


def test_spark_listing_gives_the_same_manifest(spark, messy_tree, messy_manifest, tmp_path, monkeypatch):
    """Sources too big for the driver's walk are listed on Spark, a job per folder depth: same rows, same counts."""
    from imgfeat.metadata.manifest import job as manifest_job

    root, _ = messy_tree
    _, summary, rows = messy_manifest
    monkeypatch.setattr(manifest_job, "walk_small_local", lambda roots: None)
    cfg = load_config(None, {"manifest": {"rows_per_shard": 5}})
    again = manifest_job.run_manifest(cfg, [str(root)], str(tmp_path / "out"))
    got = read_manifest(str(tmp_path / "out")).to_pylist()
    assert sorted(got, key=lambda r: r["path"]) == sorted(rows, key=lambda r: r["path"])
    skip = ("timings", "files_per_s", "version", "listing_digest")
    assert {k: v for k, v in again.items() if k not in skip} == {k: v for k, v in summary.items() if k not in skip}


def test_parallel_write_path_gives_the_same_rows(spark, messy_tree, messy_manifest, tmp_path, monkeypatch):
    """Above ONE_TASK_ROWS the manifest is organized and written on Spark: same rows, same summary, same index."""
    from imgfeat.metadata.manifest import job as manifest_job

    root, _ = messy_tree
    _, summary, rows = messy_manifest
    monkeypatch.setattr(manifest_job, "ONE_TASK_ROWS", 0)
    cfg = load_config(None, {"manifest": {"rows_per_shard": 5}})
    again = manifest_job.run_manifest(cfg, [str(root)], str(tmp_path / "out"))
    got = read_manifest(str(tmp_path / "out")).to_pylist()
    assert sorted(got, key=lambda r: r["path"]) == sorted(rows, key=lambda r: r["path"])
    from imgfeat.metadata.contracts.shard_index import read_shard_index, shard_rows

    index = read_shard_index(str(tmp_path / "out"))
    assert index is not None
    index = index.select(["shard", "rows", "members"])
    assert index.to_pylist() == shard_rows(read_manifest(str(tmp_path / "out"))).to_pylist()
    assert index.num_rows == len({r["shard"] for r in rows if r["status"] == "ok"})
    skip = ("timings", "files_per_s", "version")
    assert {k: v for k, v in again.items() if k not in skip} == {k: v for k, v in summary.items() if k not in skip}


@pytest.mark.parametrize("window,budget", [(1024, 64 << 20), (3, 1), (2, 10_000)])
def test_prefetched_reads_every_entry_in_order(messy_tree, window, budget):
    from imgfeat.metadata.contracts.schema import normalize_uri
    from imgfeat.metadata.manifest.checks import prefetched, read_or_error
    from imgfeat.metadata.manifest.listing import Unit, list_unit

    root = normalize_uri(str(messy_tree[0]))
    entries = list(list_unit(Unit(root, root, True)))
    got = list(prefetched(entries, 1 << 20, local_window=window, local_bytes=budget))
    assert [e for e, _ in got] == entries
    for e, data in got:
        expect = read_or_error(e, 1 << 20)
        assert type(data) is type(expect) and (not isinstance(data, bytes) or data == expect)


def _blocks(seed: int, h: int = 60, w: int = 80) -> np.ndarray:
    """A photo-like picture: random coloured blocks, smoothed (stable perceptual hashes, unlike gradients).
    Under 5,000 pixels: a Spark worker reused from ``test_caps_from_config`` keeps OpenCV's cap of 5,000."""
    import cv2

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    return cv2.GaussianBlur(cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST), (0, 0), 2)


def test_summary_reports_near_duplicates_label_conflicts_and_quality_outliers(spark, tmp_path):
    """A re-encoded copy under another label is a near-duplicate group with a label conflict; a dark frame is
    a quality outlier; distinct pictures are in no group. Figures come from Spark aggregates."""
    import cv2

    from imgfeat.metadata.manifest.image_signals import hamming
    from imgfeat.metadata.manifest.job import run_manifest

    src = tmp_path / "src"
    for i in range(6):
        write_image(src / "cat" / f"{i}.jpg", _blocks(i), IMWRITE_JPEG_QUALITY=95)
    write_image(src / "dog" / "copy.jpg", cv2.resize(_blocks(2), (60, 45), interpolation=cv2.INTER_AREA), IMWRITE_JPEG_QUALITY=60)
    write_image(src / "dog" / "night.png", (_blocks(9) // 12).astype(np.uint8), ".png")
    cfg = load_config(None, {"manifest": {"validation": "full", "near_duplicates": "flag"}})
    summary = run_manifest(cfg, [str(src)], str(tmp_path / "out"))
    rows = {r["rel_path"]: r for r in read_manifest(str(tmp_path / "out")).to_pylist()}
    assert hamming(rows["dog/copy.jpg"]["phash"], rows["cat/2.jpg"]["phash"]) <= 4
    near = summary["near_duplicates"]
    assert (near["groups"], near["duplicates"], near["crossing_pairs"]) == (1, 1, 0)
    assert (near["distance"], near["requested_distance"]) == (4, 4) and near["candidate_pairs"] is not None
    assert near["examples"] == [{"path": rows["dog/copy.jpg"]["path"], "near_duplicate_of": rows["cat/2.jpg"]["path"]}]
    assert summary["label_conflicts"] == {"families": 1, "rows": 2, "examples": [rows["cat/2.jpg"]["path"]]}
    copy, rep = rows["dog/copy.jpg"], rows["cat/2.jpg"]
    assert copy["near_duplicate_of"] == rep["image_id"] and rep["near_duplicate_of"] is None
    assert copy["split"] == rep["split"] and copy["label_conflict"] and rep["label_conflict"]
    assert sum(r["label_conflict"] for r in rows.values()) == 2
    text = format_summary(summary)
    assert "label conflicts: 1 group(s)" in text
    assert any(line.split() == ["dark", "1", rows["dog/night.png"]["path"]] for line in text.splitlines())
    quality = summary["quality"]
    assert quality["rows"] == 8 and quality["outliers"]["dark"] == 1
    assert quality["examples"]["dark"] == rows["dog/night.png"]["path"]
    assert rows["dog/night.png"]["brightness"] < 20


def test_near_duplicates_across_folder_splits_are_reported_and_drop_mode_keeps_one_row_per_file(spark, tmp_path):
    """Folder splits put a picture in Training and its re-encode in Test: the folders' splits are kept and
    the pair is reported as a leak; ``drop`` takes the copy out of the shards, and every file is still one row."""
    import cv2

    from imgfeat.metadata.manifest.job import run_manifest

    src = tmp_path / "src"
    for i in range(5):
        write_image(src / "Training" / "cat" / f"{i}.jpg", _blocks(i), IMWRITE_JPEG_QUALITY=95)
    write_image(src / "Test" / "cat" / "leak.jpg", cv2.resize(_blocks(3), (60, 45), interpolation=cv2.INTER_AREA),
                IMWRITE_JPEG_QUALITY=70)
    write_image(src / "Test" / "cat" / "other.jpg", _blocks(7), IMWRITE_JPEG_QUALITY=95)
    (src / "Test" / "cat" / "same.jpg").write_bytes((src / "Training" / "cat" / "1.jpg").read_bytes())
    flagged = run_manifest(load_config(None, {"manifest": {"near_duplicates": "flag"}}), [str(src)], str(tmp_path / "flag"))
    rows = {r["rel_path"]: r for r in read_manifest(str(tmp_path / "flag")).to_pylist()}
    # The representative is the group's smallest path: "Test/..." sorts before "Training/...".
    rep, member = rows["Test/cat/leak.jpg"], rows["Training/cat/3.jpg"]
    assert (member["split"], rep["split"], member["near_duplicate_of"]) == ("train", "test", rep["image_id"])
    assert rep["near_duplicate_of"] is None
    assert flagged["near_duplicates"]["crossing_pairs"] == 1
    assert flagged["near_duplicates"]["crossing_examples"] == [
        {"path": member["path"], "split": "train", "near_duplicate_of": rep["path"], "representative_split": "test"}]
    assert rows["Training/cat/1.jpg"]["split"] == "test"  # an exact duplicate follows its original (Test/cat/same.jpg)
    assert f"leak: {member['path']} (train)" in format_summary(flagged)
    from imgfeat.report import write_report

    write_report(str(tmp_path / "flag"))  # a manifest folder alone makes a report too
    page = (tmp_path / "flag" / "report.html").read_text()
    assert "Leaks across splits" in page and page.count("data:image/png;base64,") >= 4
    assert flagged["by_status"] == {"duplicate": 1, "ok": 7}

    dropped = run_manifest(load_config(None, {"manifest": {"near_duplicates": "drop"}}), [str(src)], str(tmp_path / "drop"))
    rows = {r["rel_path"]: r for r in read_manifest(str(tmp_path / "drop")).to_pylist()}
    assert len(rows) == 8 == dropped["total"] == sum(dropped["by_status"].values())
    assert dropped["by_status"] == {"duplicate": 1, "near_duplicate": 1, "ok": 6}
    member = rows["Training/cat/3.jpg"]
    assert (member["status"], member["shard"]) == ("near_duplicate", None)
    assert member["status_detail"] == "near duplicate of " + rep["path"]
    assert sum(r["shard"] is not None for r in rows.values()) == 6


@pytest.mark.parametrize("mode", ["flag", "drop"])
def test_data_quality_in_the_organize_task_equals_the_spark_path(spark, tmp_path, monkeypatch, mode):
    """Up to ONE_TASK_ROWS the organize task computes the quality and near-duplicate summaries itself (no Spark
    job of their own); above, Spark does before organize: the same rows and the same summary either way."""
    import cv2

    from imgfeat.metadata.manifest import job as manifest_job

    src = tmp_path / "src"
    for i in range(5):
        write_image(src / "Training" / "cat" / f"{i}.jpg", _blocks(i), IMWRITE_JPEG_QUALITY=95)
    write_image(src / "Test" / "dog" / "leak.jpg", cv2.resize(_blocks(3), (60, 45), interpolation=cv2.INTER_AREA),
                IMWRITE_JPEG_QUALITY=70)
    write_image(src / "Test" / "cat" / "night.png", (_blocks(9) // 12).astype(np.uint8), ".png")
    (src / "Test" / "cat" / "same.jpg").write_bytes((src / "Training" / "cat" / "1.jpg").read_bytes())
    (src / "Test" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    cfg = load_config(None, {"manifest": {"near_duplicates": mode, "rows_per_shard": 3}})
    one = manifest_job.run_manifest(cfg, [str(src)], str(tmp_path / "one"))
    assert "quality_s" in one["timings"]
    monkeypatch.setattr(manifest_job, "ONE_TASK_ROWS", 0)
    spread = manifest_job.run_manifest(cfg, [str(src)], str(tmp_path / "spread"))
    key = lambda r: r["path"]  # noqa: E731
    assert sorted(read_manifest(str(tmp_path / "one")).to_pylist(), key=key) == sorted(
        read_manifest(str(tmp_path / "spread")).to_pylist(), key=key)
    skip = ("timings", "files_per_s", "version")
    assert {k: v for k, v in one.items() if k not in skip} == {k: v for k, v in spread.items() if k not in skip}
    assert one["near_duplicates"]["groups"] == 1 and one["near_duplicates"]["crossing_pairs"] == 1
    assert one["quality"]["outliers"]["dark"] == 1 and one["label_conflicts"]["families"] == 1
    assert one["by_status"].get("near_duplicate", 0) == (mode == "drop")


def test_data_quality_with_no_ok_image_on_both_paths(spark, tmp_path, monkeypatch):
    """Nothing decodable: no hash to search, on the one-task path and on Spark's; every file still one row."""
    from imgfeat.metadata.manifest import job as manifest_job

    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (src / "notes.txt").write_text("not an image")
    cfg = load_config(None, {"manifest": {"near_duplicates": "flag"}})
    for limit in (manifest_job.ONE_TASK_ROWS, 0):
        monkeypatch.setattr(manifest_job, "ONE_TASK_ROWS", limit)
        summary = manifest_job.run_manifest(cfg, [str(tmp_path / "src")], str(tmp_path / f"out{limit}"))
        assert summary["total"] == 2 and "ok" not in summary["by_status"]
        assert summary["quality"] is None
        assert {k: summary["near_duplicates"][k] for k in ("groups", "members", "examples")} == {
            "groups": 0, "members": 0, "examples": []}
