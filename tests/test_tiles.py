"""Very large images as tiles: the grid, the tile rows' pixels, and manifest -> tile table -> tile features."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from helpers import gradient_image, write_image

tifffile = pytest.importorskip("tifffile", reason="tifffile is not installed (pip install -e .)")


def photo_like(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth image with detail at several scales (tiles of it differ; JPEG keeps it close)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        for _ in range(4):
            fx, fy, ph = rng.uniform(0.002, 0.05, 2).tolist() + [rng.uniform(0, 6.3)]
            img[..., c] += np.sin(xx * fx + yy * fy + ph)
    img = (img - img.min()) / (img.max() - img.min()) * 255
    return img.astype(np.uint8)


def write_tiled_tiff(path: Path, rgb: np.ndarray, tile: int = 128, levels: int = 2, compression: str = "zlib") -> Path:
    """A tiled pyramidal TIFF: level 0 and ``levels - 1`` halvings as SubIFDs."""
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(rgb, tile=(tile, tile), subifds=levels - 1, compression=compression, photometric="rgb")
        level = rgb
        for _ in range(levels - 1):
            level = cv2.resize(level, ((level.shape[1] + 1) // 2, (level.shape[0] + 1) // 2), interpolation=cv2.INTER_AREA)
            tw.write(level, tile=(tile, tile), subfiletype=1, compression=compression, photometric="rgb")
    return path


# -- the grid ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("edge", ["clip", "pad"])
def test_the_grid_covers_every_pixel_with_the_overlap_and_stable_unique_ids(edge):
    from imgfeat.metadata.contracts.tiles import Box, stride_of, tile_boxes, tile_count, tile_id_for

    for (w, h), size, overlap in itertools.product([(1, 1), (100, 37), (512, 512), (513, 1000), (2049, 777)],
                                                   [64, 100, 512], [0.0, 0.1, 0.25]):
        boxes = list(tile_boxes(w, h, size, overlap, edge))
        assert len(boxes) == tile_count(w, h, size, overlap)
        covered = np.zeros((h, w), np.int32)
        for b in boxes:
            assert b.x < w and b.y < h
            if edge == "clip":
                assert b.x + b.width <= w and b.y + b.height <= h
            else:
                assert (b.width, b.height) == (size, size)
            covered[b.y:b.y + b.height, b.x:b.x + b.width] += 1
        assert covered.min() >= 1, (w, h, size, overlap)
        xs = sorted({b.x for b in boxes})
        if len(xs) > 1:  # neighbours share at least the overlap, and step by the stride
            assert set(np.diff(xs).tolist()) == {stride_of(size, overlap)}
            assert size - stride_of(size, overlap) >= round(size * overlap)
        ids = [tile_id_for("img", 0, b) for b in boxes]
        assert len(set(ids)) == len(ids)
    assert tile_id_for("a", 0, Box(0, 0, 8, 8)) == tile_id_for("a", 0, Box(0, 0, 8, 8)) != tile_id_for("a", 1, Box(0, 0, 8, 8))


# -- the tile dataset ------------------------------------------------------------------------------------

def _tile_rows(path: Path, fmt: str, boxes: list[tuple[int, int, int, int, int]]) -> list[dict]:
    return [{"image_id": f"t{i}", "tile_of": "img", "path": str(path), "format": fmt, "level": lv, "x": x, "y": y,
             "width": w, "height": h} for i, (lv, x, y, w, h) in enumerate(boxes)]


def test_tile_rows_are_the_crops_of_the_whole_image_on_every_level_and_edge(tmp_path):
    from imgfeat.metadata.config import PreprocessConfig
    from imgfeat.preprocess.tile_dataset import TileDataset

    rgb = photo_like(700, 900, seed=3)
    tif = write_tiled_tiff(tmp_path / "big.tif", rgb, tile=128, levels=2)
    level1 = tifffile.TiffFile(tif).series[0].levels[1].asarray()
    boxes = [(0, 0, 0, 200, 200), (0, 100, 250, 300, 150), (0, 800, 600, 200, 200), (1, 300, 200, 256, 256)]
    cfg = PreprocessConfig(size=64, resize_policy="resize", resize_shorter=64)
    ds = TileDataset(_tile_rows(tif, "tiff", boxes), cfg)
    for i, (lv, x, y, w, h) in enumerate(boxes):
        got = ds.decode(i)
        src = rgb if lv == 0 else level1
        want = np.zeros((h, w, 3), np.uint8)  # padded past the edge
        inside = src[y:y + h, x:x + w]
        want[:inside.shape[0], :inside.shape[1]] = inside
        assert got.shape == (h, w, 3) and np.array_equal(got, want), boxes[i]
    batch = ds.__getitems__(list(range(len(boxes))))
    assert batch.ok.all() and tuple(batch.images.shape) == (4, 3, 64, 64)

    jpg = write_image(tmp_path / "big.jpg", rgb, IMWRITE_JPEG_QUALITY=95)
    jds = TileDataset(_tile_rows(jpg, "jpeg", [(0, 0, 0, 200, 200), (0, 800, 600, 200, 200), (1, 0, 0, 8, 8)]), cfg)
    import cv2

    bgr = cv2.imread(str(jpg))
    assert bgr is not None
    decoded = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    assert np.array_equal(jds.decode(0), decoded[:200, :200])
    corner = jds.decode(1)
    assert np.array_equal(corner[:100, :100], decoded[600:, 800:]) and not corner[100:].any()
    items = jds.__getitems__([0, 1, 2])
    assert items.ok.tolist() == [True, True, False] and items.reasons[2].startswith("undecodable: pyramid level 1")


# -- manifest, tile table, featurize, verify -------------------------------------------------------

def _tiles_cfg(**tiles):
    from imgfeat.metadata.config import load_config

    return load_config(None, {
        "manifest": {"rows_per_shard": 5},
        "tiles": {"enabled": True, "min_side": 600, "tile_size": 256, "overlap": 0.1, **tiles},
        "preprocess": {"size": 64, "resize_shorter": 72, "batch_size": 8, "num_workers": 1},
        "featurize": {"model": "mobilenet_v2", "weights": "IMAGENET1K_V1", "device": "cpu"},
    })


def _bad_tiffs(folder: Path, good: Path) -> dict[str, str]:
    """Broken copies of the tiled TIFF ``good``, by name -> the status the manifest must give."""
    data = good.read_bytes()
    page = tifffile.TiffFile(good).pages[0]
    offsets, counts = page.dataoffsets, page.databytecounts
    folder.mkdir(parents=True, exist_ok=True)
    cut = offsets[len(offsets) // 2] + counts[len(offsets) // 2] // 2
    (folder / "cut_in_a_tile.tif").write_bytes(data[:cut])
    # the last tile's offset pointing past the end of the file (BigTIFF: 8-byte offsets)
    tag = page.tags["TileOffsets"]
    where = tag.valueoffset + 8 * (len(offsets) - 1)
    patched = bytearray(data)
    patched[where:where + 8] = (len(data) + 10_000).to_bytes(8, "little")
    (folder / "offset_past_end.tif").write_bytes(bytes(patched))
    return {"cut_in_a_tile.tif": "truncated", "offset_past_end.tif": "truncated"}


@pytest.mark.spark
def test_manifest_tiles_featurize_and_verify_a_folder_of_large_images_among_photos(spark, torch_home, tmp_path):
    import pyarrow.dataset as pads

    from imgfeat.featurize.runner import run_featurize
    from imgfeat.metadata.contracts.schema import read_manifest
    from imgfeat.metadata.contracts.shard_index import read_dataset_shard_index
    from imgfeat.metadata.contracts.tiles import tile_boxes, tile_id_for
    from imgfeat.metadata.manifest.job import run_manifest
    from imgfeat.verify import verify_run

    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(6):
        write_image(src / "small" / f"{i}.jpg", gradient_image(60 + i, 80, seed=i))
    big = photo_like(900, 1300, seed=7)
    tif = write_tiled_tiff(src / "large" / "scene.tif", big, tile=128, levels=2, compression="jpeg")
    write_image(src / "large" / "photo.jpg", photo_like(640, 700, seed=8), IMWRITE_JPEG_QUALITY=92)
    expected_bad = _bad_tiffs(src / "broken", tif)

    cfg = _tiles_cfg()
    summary = run_manifest(cfg, [str(src)], str(out))
    rows = {r["rel_path"]: r for r in read_manifest(str(out)).to_pylist()}
    assert len(rows) == 6 + 2 + len(expected_bad)  # every file is one row
    scene, photo = rows["large/scene.tif"], rows["large/photo.jpg"]
    n_scene = len(list(tile_boxes(1300, 900, 256, 0.1, "pad")))
    n_photo = len(list(tile_boxes(700, 640, 256, 0.1, "pad")))
    assert (scene["status"], scene["tiles"], scene["shard"], scene["width"]) == ("ok", n_scene, None, 1300)
    assert (photo["status"], photo["tiles"], photo["shard"]) == ("ok", n_photo, None)
    for name, status in expected_bad.items():
        assert rows[f"broken/{name}"]["status"] == status, rows[f"broken/{name}"]
    assert all(rows[f"small/{i}.jpg"]["shard"] is not None and rows[f"small/{i}.jpg"]["tiles"] is None for i in range(6))
    assert summary["tiles"] == {"images": 2, "tiles": n_scene + n_photo, "shards": -(-(n_scene + n_photo) // 5)}
    assert summary["by_label"] == {"large": 2, "small": 6}  # tiled images are counted by label and split too
    assert sum(summary["by_split"].values()) == summary["by_status"]["ok"] == 8
    from imgfeat.metadata.manifest.cli import format_summary

    assert f"tiles: 2 tiled image(s) (ok, no image shard), {n_scene + n_photo} tiles" in format_summary(summary)

    tiles = pads.dataset(str(out / "tiles"), format="parquet", ignore_prefixes=["_", "."]).to_table().to_pylist()
    assert len(tiles) == n_scene + n_photo and len({t["tile_id"] for t in tiles}) == len(tiles)
    mine = sorted((t["x"], t["y"], t["width"], t["height"]) for t in tiles if t["image_id"] == scene["image_id"])
    assert mine == sorted(tuple(b) for b in tile_boxes(1300, 900, 256, 0.1, "pad"))
    assert {t["tile_id"] for t in tiles if t["image_id"] == scene["image_id"]} == {
        tile_id_for(scene["image_id"], 0, b) for b in tile_boxes(1300, 900, 256, 0.1, "pad")}
    sizes = np.bincount([t["shard"] for t in tiles])
    assert sizes.max() - sizes.min() <= 1  # balanced shards
    index = read_dataset_shard_index(str(out / "tiles"))
    assert index is not None and sum(index["rows"].to_pylist()) == len(tiles)

    feats = tmp_path / "tile_feats"
    run_featurize(cfg, str(out), str(feats), tiles=True)
    v = verify_run(str(out), str(feats), tiles=True)
    assert v.ok and v.feature_rows == len(tiles) and v.rejected == 0, v.problems
    from imgfeat.metadata.contracts.feature_store import committed_shards, read_feature_shard, read_tile_boxes

    by_tile = {t["tile_id"]: t for t in tiles}
    for stem, marker in committed_shards(str(feats)).items():  # each shard names its tiles' images and boxes
        ids, _ = read_feature_shard(str(feats), stem, marker)
        boxes = read_tile_boxes(str(feats), stem, marker)
        assert boxes is not None and len(boxes) == len(ids)
        for tid, rec in zip(ids, boxes):
            t = by_tile[str(tid)]
            assert (rec["tile_of"], *(int(rec[c]) for c in ("level", "x", "y", "width", "height"))) == (
                t["image_id"], t["level"], t["x"], t["y"], t["width"], t["height"])
    images = tmp_path / "feats"
    run_featurize(cfg, str(out), str(images))  # the whole-image run leaves the tiled images to their tiles
    v = verify_run(str(out), str(images))
    assert v.ok and v.feature_rows == 6 and v.tiled == 2 and v.flagged == len(expected_bad), v.problems

    from imgfeat.preprocess.export import run_prep
    from imgfeat.preprocess.train_dataset import PrepDataset

    cfg.prep.size, cfg.prep.format = 48, "npy"
    prep = run_prep(cfg, str(out), str(tmp_path / "prep"), tiles=True)
    assert (prep["selected"], prep["written"], prep["rejected"]) == (len(tiles), len(tiles), 0)
    train = PrepDataset(str(tmp_path / "prep"))
    assert len(train) == len(tiles) and tuple(train[0][0].shape) == (3, 48, 48)
    assert {train.image_id(i) for i in range(len(train))} == {t["tile_id"] for t in tiles}

    # A tile's feature is the feature of the same crop of the decoded image.
    from imgfeat.featurize.model import build_model
    from imgfeat.preprocess.dataset import ManifestDataset
    from imgfeat.preprocess.transforms import BatchNormalizer

    from run_helpers import features_by_id

    by_id = features_by_id(str(feats))
    picked = [t for t in tiles if t["image_id"] == scene["image_id"]][:3]
    decoded = tifffile.imread(tif)
    crops = []
    for k, t in enumerate(picked):
        crop = np.zeros((t["height"], t["width"], 3), np.uint8)
        inside = decoded[t["y"]:t["y"] + t["height"], t["x"]:t["x"] + t["width"]]
        crop[:inside.shape[0], :inside.shape[1]] = inside
        crops.append({"image_id": t["tile_id"], "path": str(write_image(tmp_path / "crops" / f"{k}.png", crop, ext=".png"))})
    model, _ = build_model(cfg.featurize, cfg.preprocess.size, __import__("torch").device("cpu"))
    batch = ManifestDataset(crops, cfg.preprocess).__getitems__(list(range(len(crops))))
    import torch

    with torch.no_grad():
        want = model(BatchNormalizer(torch.device("cpu"))(batch.images)).float().numpy()
    for t, w in zip(picked, want):
        got = by_id[t["tile_id"]]
        cos = float(np.dot(got, w) / np.linalg.norm(got) / np.linalg.norm(w))
        assert cos >= 0.999, (t["tile_id"], cos)


@pytest.mark.spark
def test_a_pyramid_level_that_does_not_exist_is_a_reason_and_level_one_tiles_its_own_size(spark, tmp_path):
    from imgfeat.metadata.contracts.schema import read_manifest
    from imgfeat.metadata.contracts.tiles import tile_count
    from imgfeat.metadata.manifest.job import run_manifest

    src, out = tmp_path / "src", tmp_path / "out"
    write_tiled_tiff(src / "two_levels.tif", photo_like(800, 1000, seed=1), tile=128, levels=2)
    write_tiled_tiff(src / "one_level.tif", photo_like(700, 900, seed=2), tile=128, levels=1)
    run_manifest(_tiles_cfg(level=1), [str(src)], str(out))
    rows = {r["rel_path"]: r for r in read_manifest(str(out)).to_pylist()}
    assert rows["two_levels.tif"]["status"] == "ok"
    assert rows["two_levels.tif"]["tiles"] == tile_count(500, 400, 256, 0.1)
    assert rows["one_level.tif"]["status"] == "undecodable" and "level 1" in rows["one_level.tif"]["status_detail"]


@pytest.mark.spark
@pytest.mark.slow
def test_a_run_with_tiles_pools_them_reports_the_grid_and_reconciles(spark, torch_home, tmp_path):
    import pyarrow.dataset as pads

    from imgfeat.metadata.config import load_config
    from imgfeat.run import run_pipeline

    from run_helpers import features_by_id

    src = tmp_path / "src"
    for i in range(4):
        write_image(src / "photos" / f"{i}.jpg", gradient_image(50 + i, 60, seed=i))
    write_tiled_tiff(src / "scans" / "slide.tif", photo_like(700, 800, seed=4), tile=128, levels=3, compression="jpeg")
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "demo.toml", {
        "run": {"sources": [str(src)], "out": str(tmp_path / "run"), "stages": ["manifest", "featurize"]},
        "manifest": {"rows_per_shard": 4},
        "tiles": {"enabled": True, "min_side": 600, "tile_size": 256, "pooled": True},
        "preprocess": {"size": 64, "resize_shorter": 72, "batch_size": 8, "num_workers": 1},
        "neighbors": {"enabled": False},
    })
    report = run_pipeline(cfg)
    acc = report["accounting"]
    assert acc["reconciles"] and acc["tiled_images"] == 1 and acc["feature_rows"] == 4
    from imgfeat.metadata.contracts.tiles import tile_count

    n = tile_count(800, 700, 256, 0.1)
    assert acc["tiles_reconcile"] and acc["tile_feature_rows"] == acc["tiles"] == n == 12
    html = (tmp_path / "run" / "report.html").read_text()
    assert "<h2 id='tiles'>Tiles</h2>" in html and f"{n} tiles</b>, level 0 (800x700)" in html

    pooled = pads.dataset(str(tmp_path / "run" / "tiles_pooled"), format="parquet",
                          ignore_prefixes=["_", "."]).to_table().to_pylist()
    tiles = pads.dataset(str(tmp_path / "run" / "tiles"), format="parquet", ignore_prefixes=["_", "."]).to_table()
    by_id = features_by_id(str(tmp_path / "run" / "tile_features"))
    assert len(pooled) == 1 and pooled[0]["tiles"] == n and pooled[0]["image_id"] == tiles["image_id"][0].as_py()
    want = np.mean([by_id[t] for t in tiles["tile_id"].to_pylist()], axis=0)
    assert np.allclose(pooled[0]["features"], want, atol=1e-5)


@pytest.mark.parametrize("fmt", ["npy", "hdf5"])
def test_a_tile_feature_shard_carries_its_tiles_images_and_boxes_in_both_formats(tmp_path, fmt):
    from imgfeat.metadata.contracts import shards
    from imgfeat.metadata.contracts.feature_store import TILE_DTYPE, read_feature_shard, read_tile_boxes, write_feature_shard

    boxes = np.zeros(3, TILE_DTYPE)
    boxes["tile_of"] = ["a" * 32, "a" * 32, "b" * 32]
    boxes["x"], boxes["width"], boxes["height"], boxes["level"] = [0, 460, 0], 512, 512, [0, 0, 1]
    marker = write_feature_shard(str(tmp_path), 7, ["t1", "t2", "t3"], np.ones((3, 4), np.float32), [], fmt, "fp",
                                 tiles=boxes)
    shards.verify_shard(str(tmp_path), "part-00007", marker)
    ids, _ = read_feature_shard(str(tmp_path), "part-00007", marker)
    got = read_tile_boxes(str(tmp_path), "part-00007", marker)
    assert ids.tolist() == ["t1", "t2", "t3"] and got is not None and got.tolist() == boxes.tolist()
    plain = write_feature_shard(str(tmp_path), 8, ["i1"], np.ones((1, 4), np.float32), [], fmt, "fp")
    assert read_tile_boxes(str(tmp_path), "part-00008", plain) is None
