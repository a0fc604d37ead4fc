"""Write a gigapixel tiled, pyramidal BigTIFF of real photos, tile by tile, in bounded memory.

The image is a mosaic: square cells of ``cell`` pixels, each one of ``photos`` (for example the shared
Fruits-360 photos, 100x100) resized to the cell and turned by one of the 8 rotations/flips, both picked
by a hash of the cell's position, so the same arguments give the same bytes and no tile is flat. Level
``l`` of the pyramid (SubIFDs, halving each time) is the same mosaic rendered with cells of
``cell / 2**l`` pixels. Every tile is rendered when tifffile asks for it: memory holds the resized
photos of one level and a few tiles, never the image.

    python bench/make_gigapixel.py /tmp/giga.tif --width 32768 --height 32768

prints the file size, the time and the peak RSS. ``make_small_tiff`` makes small files for tests.
"""
from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

DEFAULT_PHOTOS = Path(os.environ.get("IMGFEAT_SHARED", Path(__file__).resolve().parent.parent.parent / "shared")) \
    / "data" / "fruits360-100"
LOSSY = {"jpeg", "webp"}


def load_photos(folder: str | Path, limit: int = 64) -> list[np.ndarray]:
    """Up to ``limit`` photos (HxWx3 uint8 RGB) under ``folder``: evenly spaced over the sorted *.jpg/*.png files."""
    from imgfeat.metadata.contracts.cv2_env import import_cv2

    cv2 = import_cv2()
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise FileNotFoundError(f"no photos under {folder}")
    step = max(len(files) / limit, 1.0)
    photos = []
    for i in range(min(limit, len(files))):
        bgr = cv2.imread(str(files[int(i * step)]), cv2.IMREAD_COLOR)
        if bgr is not None:
            photos.append(np.ascontiguousarray(bgr[:, :, ::-1]))
    return photos


def synthetic_photos(n: int = 8, size: int = 100, seed: int = 0) -> list[np.ndarray]:
    """``n`` photo-like RGB images (smooth colour fields, discs and a little noise) for when no real photos exist."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    photos = []
    for _ in range(n):
        a, b, c = rng.uniform(0, 1, (3, 3))
        img = np.stack([80 + 120 * (a[k] * xx + b[k] * yy + c[k] * xx * yy) / 2 for k in range(3)], axis=-1)
        for _ in range(3):
            cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.3)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 6, img.shape)
        photos.append(np.clip(img, 0, 255).astype(np.uint8))
    return photos


def _mix(i: int, j: int) -> int:
    """A fixed 64-bit hash of a cell position (splitmix64 finaliser): the same on every machine."""
    z = (i * 0x9E3779B97F4A7C15 + j * 0xC2B2AE3D27D4EB4F + 0x165667B19E3779F9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


class Mosaic:
    """The mosaic of ``photos`` in cells of ``cell`` pixels at level 0; ``render`` draws a box of any level."""

    def __init__(self, photos: Sequence[np.ndarray], cell: int = 256) -> None:
        if not photos:
            raise ValueError("no photos")
        self.photos = [np.ascontiguousarray(p[..., :3], dtype=np.uint8) for p in photos]
        self.cell = cell
        self._level = -1
        self._cache: list[np.ndarray] = []

    def _resized(self, level: int) -> list[np.ndarray]:
        if level != self._level:  # one level's photos in memory at a time
            from imgfeat.metadata.contracts.cv2_env import import_cv2

            cv2 = import_cv2()
            side = self.cell >> level
            self._cache = [cv2.resize(p, (side, side), interpolation=cv2.INTER_CUBIC if side > p.shape[0] else cv2.INTER_AREA)
                           for p in self.photos]
            self._level = level
        return self._cache

    def render(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """The box ``(x, y, width, height)`` of the mosaic at ``level`` (HxWx3 uint8), unbounded in extent."""
        if self.cell % (1 << level):
            raise ValueError(f"cell {self.cell} does not halve {level} times")
        side = self.cell >> level
        cache = self._resized(level)
        out = np.empty((height, width, 3), dtype=np.uint8)
        for ci in range(y // side, (y + height - 1) // side + 1):
            for cj in range(x // side, (x + width - 1) // side + 1):
                h = _mix(ci, cj)
                photo = cache[h % len(cache)]
                turn = (h >> 32) % 8
                photo = np.rot90(photo, turn % 4)
                if turn >= 4:
                    photo = photo[:, ::-1]
                y0, y1 = max(y, ci * side), min(y + height, (ci + 1) * side)
                x0, x1 = max(x, cj * side), min(x + width, (cj + 1) * side)
                out[y0 - y:y1 - y, x0 - x:x1 - x] = photo[y0 - ci * side:y1 - ci * side, x0 - cj * side:x1 - cj * side]
        return out


def default_levels(width: int, height: int, tile: int) -> int:
    """Levels halving until the image fits one tile."""
    return 1 + max(0, math.ceil(math.log2(max(width, height) / tile))) if max(width, height) > tile else 1


def level_shape(width: int, height: int, level: int) -> tuple[int, int]:
    """(width, height) of pyramid ``level``: each side halved ``level`` times, rounding up."""
    s = 1 << level
    return (width + s - 1) // s, (height + s - 1) // s


def _tiles(mosaic: Mosaic, level: int, width: int, height: int, tile: int) -> Iterator[np.ndarray]:
    for ty in range(0, height, tile):
        for tx in range(0, width, tile):
            t = mosaic.render(level, tx, ty, tile, tile)
            # the part past the image edge is padding nobody reads: keep it black (compresses to nothing)
            t[max(height - ty, 0):] = 0
            t[:, max(width - tx, 0):] = 0
            yield t


def write_mosaic_tiff(path: str | Path, width: int, height: int, photos: Sequence[np.ndarray], tile: int = 512,
                      levels: int | None = None, compression: str | None = "jpeg", quality: int = 85,
                      cell: int = 256) -> list[tuple[int, int]]:
    """Write the mosaic of ``photos`` as a tiled BigTIFF with ``levels`` SubIFD levels; returns each level's (width, height).

    ``levels`` defaults to halving until the image fits one tile; ``cell`` (level-0 pixels per photo) must
    halve ``levels - 1`` times. ``quality`` is the JPEG/WebP quality (ignored by lossless codecs).
    Tiles are generated as tifffile writes them: memory is one level's resized photos and a few tiles.
    """
    if levels is None:
        levels = default_levels(width, height, tile)
    if levels < 1 or cell % (1 << (levels - 1)):
        raise ValueError(f"cell {cell} must halve {levels - 1} times (levels={levels})")
    mosaic = Mosaic(photos, cell)
    args: dict[str, Any] = {"tile": (tile, tile), "dtype": np.uint8, "photometric": "rgb",
                  "compression": None if compression in (None, "none") else compression}
    if compression in LOSSY:
        args["compressionargs"] = {"level": quality}
    shapes = [level_shape(width, height, lvl) for lvl in range(levels)]
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for lvl, (w, h) in enumerate(shapes):
            extra: dict[str, Any] = {"subifds": levels - 1, "metadata": None} if lvl == 0 else {"subfiletype": 1, "metadata": None}
            tw.write(_tiles(mosaic, lvl, w, h, tile), shape=(h, w, 3), **args, **extra)
    return shapes


def make_small_tiff(path: str | Path, width: int = 1200, height: int = 900, photos: Sequence[np.ndarray] | None = None,
                    tile: int = 256, levels: int = 3, compression: str | None = "jpeg", cell: int = 128) -> list[tuple[int, int]]:
    """A small pyramidal mosaic TIFF for tests (synthetic photos unless ``photos`` are given)."""
    return write_mosaic_tiff(path, width, height, photos if photos is not None else synthetic_photos(),
                             tile=tile, levels=levels, compression=compression, cell=cell)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("out")
    ap.add_argument("--width", type=int, default=32768)
    ap.add_argument("--height", type=int, default=32768)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--levels", type=int, default=None)
    ap.add_argument("--cell", type=int, default=256)
    ap.add_argument("--compression", default="jpeg")
    ap.add_argument("--quality", type=int, default=85)
    ap.add_argument("--photos", default=str(DEFAULT_PHOTOS), help="folder of photos (default: the shared Fruits-360)")
    ap.add_argument("--limit", type=int, default=64, help="how many photos to use")
    ap.add_argument("--synthetic", action="store_true", help="synthetic photos instead of --photos")
    args = ap.parse_args(argv)
    if args.synthetic:
        photos = synthetic_photos(args.limit)
    elif not Path(args.photos).is_dir():
        print(f"{args.photos} is absent (the ../shared folder holds the photos); use --photos DIR or --synthetic",
              file=sys.stderr)
        return 2
    else:
        photos = load_photos(args.photos, args.limit)
    start = time.perf_counter()
    shapes = write_mosaic_tiff(args.out, args.width, args.height, photos, tile=args.tile, levels=args.levels,
                               compression=args.compression, quality=args.quality, cell=args.cell)
    seconds = time.perf_counter() - start
    size = os.path.getsize(args.out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"{args.out}: {args.width}x{args.height} ({args.width * args.height / 1e9:.2f} gigapixels), "
          f"{len(shapes)} levels, tile {args.tile}, {args.compression}; {size / 2**20:.1f} MiB, "
          f"{seconds:.1f} s, peak RSS {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
