"""Reading a box of a tiled / pyramidal TIFF (contracts/tiff_tiles.py) and the gigapixel mosaic writer (bench)."""
from __future__ import annotations

import io
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile

from bench.make_gigapixel import Mosaic, load_photos, make_small_tiff, synthetic_photos, write_mosaic_tiff
from imgfeat.metadata.contracts.schema import STATUS_CODES
from imgfeat.metadata.contracts.tiff_tiles import TiffTileError, check_tiff, read_region, tiff_levels

W, H, TILE = 300, 230, 64


class CountingFile(io.BytesIO):
    """A file object over bytes that counts what is read through it."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.bytes_read += len(data)
        return data

    def readinto(self, buffer) -> int:
        n = super().readinto(buffer)
        self.bytes_read += n
        return n


def _image(kind: str, h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    """Smooth content plus noise (JPEG-friendly, but no two tiles alike)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (xx * 0.7 + yy * 0.4 + 40 * np.sin(xx / 13.0) * np.cos(yy / 17.0))[..., None] + np.array([0, 60, 120])
    rgb = (base % 256 + rng.normal(0, 4, (h, w, 3))).clip(0, 255)
    if kind == "grey":
        return rgb[..., 0].astype(np.uint8)
    if kind == "rgb":
        return rgb.astype(np.uint8)
    if kind == "rgba":
        alpha = (xx * 255 // w).astype(np.uint8)[..., None]
        return np.concatenate([rgb.astype(np.uint8), alpha], axis=-1)
    if kind == "uint16":
        return (rgb * 257 + rng.integers(0, 256, rgb.shape)).astype(np.uint16)
    raise ValueError(kind)


def _rgb8(a: np.ndarray) -> np.ndarray:
    """The reference conversion read_region documents: grey x3, alpha dropped, uint16 -> top 8 bits."""
    if a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    return a[..., :3]


def _write(path: Path, data: np.ndarray, compression: str | None = None, tile: int | None = TILE, levels: int = 2,
           **kwargs) -> Path:
    """A tiled (or stripped, ``tile=None``) TIFF with ``levels`` SubIFD levels, each half the one before."""
    photometric = "minisblack" if data.ndim == 2 else "rgb"
    args = dict(photometric=photometric, compression=compression, **kwargs)
    if tile:
        args["tile"] = (tile, tile)
    with tifffile.TiffWriter(path) as tw:
        tw.write(data, subifds=levels - 1, **args)
        for _ in range(levels - 1):
            data = data[::2, ::2]
            tw.write(data, subfiletype=1, **args)
    return path


def _read(path: Path, *args, **kwargs) -> np.ndarray:
    with open(path, "rb") as f:
        return read_region(f, *args, **kwargs)


BOXES = [
    (5, 6, 20, 17),          # inside one tile
    (50, 40, 100, 90),       # across tile borders
    (W - 30, H - 20, 100, 100),  # past the right and bottom edges: clipped
    (-10, -7, 40, 30),       # before the top-left corner: clipped
    (0, 0, W, H),            # the whole level
]


def _check_boxes(path: Path, levels: int = 2) -> None:
    for level in range(levels):
        full = _rgb8(tifffile.imread(path, level=level))
        for x, y, w, h in BOXES:
            got = _read(path, level, x, y, w, h)
            want = full[max(y, 0):max(y + h, 0), max(x, 0):max(x + w, 0)]
            assert got.dtype == np.uint8 and got.shape == want.shape, (level, x, y, got.shape, want.shape)
            np.testing.assert_array_equal(got, want, err_msg=f"level {level} box {(x, y, w, h)}")


@pytest.mark.parametrize("kind,compression", [
    ("grey", None), ("rgb", None), ("rgba", None), ("uint16", None),
    ("grey", "zlib"), ("rgb", "zlib"), ("rgba", "zlib"), ("uint16", "zlib"),
    ("grey", "jpeg"), ("rgb", "jpeg"), ("rgb", "lzw"), ("rgb", "zstd"),
])
def test_read_region_equals_crop_of_level(tmp_path, kind, compression):
    path = _write(tmp_path / "t.tif", _image(kind), compression)
    _check_boxes(path)


@pytest.mark.parametrize("compression", [None, "zlib", "jpeg"])
def test_read_region_stripped(tmp_path, compression):
    path = _write(tmp_path / "s.tif", _image("rgb"), compression, tile=None, rowsperstrip=16)
    assert tiff_levels(open(path, "rb"))[0].tile_width is None
    _check_boxes(path)


def test_read_region_planar_palette_miniswhite(tmp_path):
    planar = _image("rgb")
    tifffile.imwrite(tmp_path / "p.tif", np.moveaxis(planar, -1, 0), photometric="rgb", planarconfig="separate",
                     tile=(TILE, TILE), compression="zlib")
    np.testing.assert_array_equal(_read(tmp_path / "p.tif", 0, 10, 20, 150, 100), planar[20:120, 10:160])

    index = _image("grey")
    cmap = np.stack([np.arange(256) * 257, (255 - np.arange(256)) * 257, np.full(256, 128 * 257)]).astype(np.uint16)
    tifffile.imwrite(tmp_path / "pal.tif", index, photometric="palette", colormap=cmap, tile=(TILE, TILE))
    want = (cmap.T >> 8).astype(np.uint8)[index]
    np.testing.assert_array_equal(_read(tmp_path / "pal.tif", 0, 30, 30, 100, 100), want[30:130, 30:130])

    tifffile.imwrite(tmp_path / "w.tif", index, photometric="miniswhite", tile=(TILE, TILE))
    np.testing.assert_array_equal(_read(tmp_path / "w.tif", 0, 0, 0, 70, 70)[..., 1], 255 - index[:70, :70])


def test_levels_and_mosaic_region(tmp_path):
    path = tmp_path / "m.tif"
    shapes = make_small_tiff(path, 1000, 700, tile=128, levels=3)
    levels = tiff_levels(open(path, "rb"))
    assert [(lv.width, lv.height) for lv in levels] == shapes == [(1000, 700), (500, 350), (250, 175)]
    assert all(lv.tile_width == lv.tile_height == 128 and lv.compression == "jpeg" and lv.dtype == "uint8"
               and lv.samples == 3 for lv in levels)
    assert levels[1].segments == 4 * 3 and levels[0].ifd_offset != levels[1].ifd_offset
    full = tifffile.imread(path, level=2)
    np.testing.assert_array_equal(_read(path, 2, 100, 50, 200, 200), full[50:175, 100:250])


def test_reads_only_the_intersecting_tiles(tmp_path):
    data = _image("rgb", 2048, 2048)
    path = _write(tmp_path / "big.tif", data, None, tile=128, levels=1)
    raw = path.read_bytes()
    f = CountingFile(raw)
    tracemalloc.start()
    try:
        got = read_region(f, 0, 260, 270, 100, 100)  # inside one tile (256..384)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(got, data[270:370, 260:360])
    tile_bytes = 128 * 128 * 3
    assert f.bytes_read < tile_bytes + 64 * 1024, f.bytes_read  # one tile plus header, IFD and offset arrays
    assert f.bytes_read < len(raw) / 100
    assert peak < 2 * 1024 * 1024, peak  # the box plus one tile, not the 12 MiB image

    f = CountingFile(raw)
    read_region(f, 0, 100, 100, 200, 200)  # 3 x 3 tiles
    assert 9 * tile_bytes <= f.bytes_read < 9 * tile_bytes + 64 * 1024


def test_check_tiff_ok_and_cheap(tmp_path):
    path = tmp_path / "m.tif"
    make_small_tiff(path, 2000, 1500, tile=128, levels=3)
    raw = path.read_bytes()
    for level in range(3):
        f = CountingFile(raw)
        assert check_tiff(f, len(raw), level) is None
        assert f.bytes_read < 64 * 1024 < len(raw)  # IFDs and offset arrays, no tile data


def _assert_bad(raw: bytes, reason: str, level: int = 0, box=(0, 0, 50, 50), detail: str | None = None) -> None:
    got = check_tiff(io.BytesIO(raw), len(raw), level)
    assert got is not None and got[0] == reason, got
    if detail is not None:
        assert got[1] == detail
    with pytest.raises(TiffTileError) as info:
        read_region(io.BytesIO(raw), level, *box)
    assert info.value.reason == reason and info.value.detail == got[1]


def test_missing_level(tmp_path):
    raw = _write(tmp_path / "t.tif", _image("rgb"), "zlib").read_bytes()
    _assert_bad(raw, "undecodable", level=3, detail="pyramid level 3 does not exist (the file has 2)")
    _assert_bad(raw, "undecodable", level=-1)


def test_offsets_past_the_end(tmp_path):
    path = _write(tmp_path / "t.tif", _image("rgb"), None, levels=1)
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages.first.tags["TileOffsets"]
        where, fmt = tag.valueoffset, tif.byteorder + "I"
    raw = bytearray(path.read_bytes())
    struct.pack_into(fmt, raw, where + 4 * 7, len(raw) + 1000)  # tile 7 starts past the end
    _assert_bad(bytes(raw), "truncated")
    assert "segment 7 " in (check_tiff(io.BytesIO(bytes(raw)), len(raw)) or ("", ""))[1]


def test_truncated_tile(tmp_path):
    path = _write(tmp_path / "t.tif", _image("rgb"), "jpeg", levels=1)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.offset < min(page.dataoffsets)  # IFD first, so a cut leaves the structure readable
        last = int(np.argmax(page.dataoffsets))
        cut = page.dataoffsets[last] + page.databytecounts[last] // 2
    raw = path.read_bytes()[:cut]
    _assert_bad(raw, "truncated")
    # the manifest passes the size it listed: a file shorter than that is caught the same way
    assert check_tiff(io.BytesIO(raw), len(raw))[0] == "truncated"  # type: ignore[index]


def test_corrupt_tile_data_is_undecodable(tmp_path):
    path = _write(tmp_path / "t.tif", _image("rgb"), "jpeg", levels=1)
    with tifffile.TiffFile(path) as tif:
        start, count = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    raw = bytearray(path.read_bytes())
    raw[start:start + count] = np.random.default_rng(1).integers(0, 256, count, dtype=np.uint8).tobytes()
    assert check_tiff(io.BytesIO(bytes(raw)), len(raw)) is None  # the structure is fine: check does not decode
    with pytest.raises(TiffTileError) as info:
        read_region(io.BytesIO(bytes(raw)), 0, 0, 0, 10, 10)
    assert info.value.reason == "undecodable"
    assert read_region(io.BytesIO(bytes(raw)), 0, TILE, TILE, 10, 10).shape == (10, 10, 3)  # other tiles read


def test_not_tiff_empty_unsupported(tmp_path):
    _assert_bad(b"", "zero_bytes")
    _assert_bad(np.random.default_rng(2).integers(0, 256, 5000, dtype=np.uint8).tobytes(), "not_image")
    _assert_bad(b"II*\x00" + b"\xff" * 4 + b"\x00" * 100, "truncated")  # first IFD far past the end
    _assert_bad(b"II*\x00\x08\x00\x00\x00" + b"\xee" * 200, "undecodable")
    for fn in (tiff_levels,):
        with pytest.raises(TiffTileError):
            fn(io.BytesIO(b"MM\x00*"))
    tifffile.imwrite(tmp_path / "f.tif", np.zeros((64, 64), np.float32), tile=(16, 16))
    _assert_bad((tmp_path / "f.tif").read_bytes(), "unsupported_format")
    tifffile.imwrite(tmp_path / "one.tif", _image("rgb"), rowsperstrip=H)  # a single strip
    raw = (tmp_path / "one.tif").read_bytes()
    assert check_tiff(io.BytesIO(raw), len(raw), max_segment_bytes=100_000)[0] == "too_large"  # type: ignore[index]
    with pytest.raises(TiffTileError, match="too_large"):
        read_region(io.BytesIO(raw), 0, 0, 0, 5, 5, max_segment_bytes=100_000)


def test_mutated_files_never_crash(tmp_path):
    """Flipped bytes in the header and IFDs: every outcome is an array or a TiffTileError with a status code."""
    raw = _write(tmp_path / "t.tif", _image("rgb", 120, 100), "zlib", tile=32).read_bytes()
    with tifffile.TiffFile(io.BytesIO(raw)) as tif:
        structure = sorted({tif.pages[0].offset, *(lv.keyframe.offset for lv in tif.series[0].levels)})
    rng = np.random.default_rng(3)
    for _ in range(150):
        bad = bytearray(raw)
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.choice(structure)) + int(rng.integers(0, 200)) if rng.random() < 0.8 else int(rng.integers(0, 16))
            if at < len(bad):
                bad[at] = int(rng.integers(0, 256))
        data = bytes(bad)
        got = check_tiff(io.BytesIO(data), len(data), int(rng.integers(0, 2)))
        assert got is None or got[0] in STATUS_CODES, got
        try:
            out = read_region(io.BytesIO(data), 0, 10, 10, 60, 60)
            assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
        except TiffTileError as exc:
            assert exc.reason in STATUS_CODES


def test_mosaic_is_deterministic_photographic_pyramid(tmp_path, fruits_dir):
    photos = load_photos(fruits_dir, 16)
    assert len(photos) == 16 and photos[0].shape == (100, 100, 3)
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    shapes = write_mosaic_tiff(a, 1100, 800, photos, tile=128, levels=3, quality=90, cell=64)
    write_mosaic_tiff(b, 1100, 800, photos, tile=128, levels=3, quality=90, cell=64)
    assert a.read_bytes() == b.read_bytes()
    assert shapes == [(1100, 800), (550, 400), (275, 200)]
    with tifffile.TiffFile(a) as tif:
        assert tif.is_bigtiff and len(tif.series[0].levels) == 3
        assert all(lv.keyframe.is_tiled and lv.keyframe.tilewidth == 128 for lv in tif.series[0].levels)
        assert len(tif.pages[0].subifds or ()) == 2
    level0 = tifffile.imread(a)
    mosaic = Mosaic(photos, 64)
    assert np.abs(level0.astype(int) - mosaic.render(0, 0, 0, 1100, 800)).mean() < 4  # JPEG noise only
    level1 = tifffile.imread(a, level=1)
    assert np.abs(level1.astype(int) - mosaic.render(1, 0, 0, 550, 400)).mean() < 4
    tiles = [level0[y:y + 128, x:x + 128] for y in range(0, 768, 128) for x in range(0, 1024, 128)]
    assert sum(t.std() > 20 for t in tiles) >= 0.8 * len(tiles)  # photographic, not flat
    assert len({t.tobytes() for t in tiles}) == len(tiles)


def test_small_tiff_without_shared_photos(tmp_path):
    path = tmp_path / "s.tif"
    make_small_tiff(path, 500, 300, photos=synthetic_photos(4), tile=128, levels=2)
    assert [(lv.width, lv.height) for lv in tiff_levels(open(path, "rb"))] == [(500, 300), (250, 150)]
    with pytest.raises(ValueError):
        write_mosaic_tiff(tmp_path / "x.tif", 100, 100, synthetic_photos(2), levels=4, cell=100)


def test_the_region_reader_keeps_the_file_open_and_reads_what_read_region_reads(tmp_path):
    from imgfeat.metadata.contracts.tiff_tiles import TiffRegionReader, TiffTileError, read_region

    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 255, (600, 700, 3), dtype=np.uint8)
    path = tmp_path / "t.tif"
    tifffile.imwrite(path, rgb, tile=(128, 128), compression="zlib", photometric="rgb")
    opened: list[int] = []

    def opener():
        opened.append(1)
        return open(path, "rb")

    with TiffRegionReader(opener) as reader:
        for box in [(0, 0, 100, 100), (120, 90, 300, 200), (650, 550, 100, 100)]:
            with open(path, "rb") as f:
                assert np.array_equal(reader.read(0, *box), read_region(f, 0, *box))
        with pytest.raises(TiffTileError, match="level 2 does not exist"):
            reader.read(2, 0, 0, 10, 10)
    assert len(opened) == 1
