"""Real-size JPEG photos (hundreds to thousands of pixels) made from small real photos.

The shared Fruits-360 photos are 100x100: too small to exercise what happens to real camera-size
files (reduced-size JPEG decode, big resizes). This module builds real-size photos from them
without making everything smooth:

- ``mosaic`` (most files): native-resolution 100x100 photos (flipped or turned at random) laid on a
  grid with a random offset, then rescaled by a random non-integer factor (0.75 to 1.75, never close
  to 1 or 1.5), so tile edges do not line up with the 8x8 JPEG DCT grid and detail stays sharp;
  pieces of scikit-learn's two bundled photos join the tiles when scikit-learn is installed.
- ``single``: one photo upscaled to the whole frame (cubic): the smooth case.
- ``photo`` (when scikit-learn is installed): ``china.jpg`` or ``flower.jpg`` (427x640 real
  photos with fine detail), cropped at native size where the frame fits, upscaled where it does not.

Every file is re-encoded as JPEG: quality drawn from ``quality - 5 .. quality + 5``, 4:2:0 chroma
for about 60 % of the files and 4:4:4 for the rest, about 12 % grey (one-component JPEGs); aspect
ratios 1:1 to 2:1, about a third portrait; about half the frames have both sides a multiple of 16 (as
camera files do), the rest any size (as resized web photos). The same inputs and ``seed`` give the
same bytes.

CLI: ``python -m sample.realsize SRC OUT --n N [--min-side 400 --max-side 3000 --seed 0 --quality 90]``.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from imgfeat.metadata.contracts.cv2_env import import_cv2

SOURCE_SUFFIXES = (".jpg", ".jpeg", ".png")
ASPECTS = (1.0, 5 / 4, 4 / 3, 3 / 2, 16 / 9, 2.0)
POOL_SIZE = 400
"""Source photos kept decoded in memory (drawn at random from SRC): enough variety, bounded memory."""


def _sklearn_photos() -> list[np.ndarray]:
    """scikit-learn's bundled real photos as RGB uint8 (427x640), or none when it is not installed."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        return []
    return [np.ascontiguousarray(img, dtype=np.uint8) for img in load_sample_images().images]


def _frame_dims(rng: np.random.Generator, min_side: int, max_side: int) -> tuple[int, int]:
    """(width, height) with both sides in [min_side, max_side]: longer side log-uniform, a common aspect."""
    longer = int(round(math.exp(rng.uniform(math.log(min_side), math.log(max_side)))))
    longer = min(max(longer, min_side), max_side)
    shorter = min(max(int(round(longer / ASPECTS[rng.integers(len(ASPECTS))])), min_side), longer)
    if rng.random() < 0.5:  # camera-like: both sides multiples of 16 (where that stays >= min_side)
        longer, shorter = (v - v % 16 if v - v % 16 >= min_side else v for v in (longer, shorter))
    return (shorter, longer) if rng.random() < 0.35 else (longer, shorter)


def _scale_factor(rng: np.random.Generator) -> float:
    """A rescale factor in [0.75, 1.75] that is not close to 1 or 1.5 (so tile edges leave the DCT grid)."""
    while True:
        f = float(rng.uniform(0.75, 1.75))
        if abs(f - 1.0) > 0.05 and abs(f - 1.5) > 0.03:
            return f


def _resize(cv2: Any, img: np.ndarray, width: int, height: int) -> np.ndarray:
    h, w = img.shape[:2]
    if (w, h) == (width, height):
        return img
    flag = cv2.INTER_AREA if width < w and height < h else cv2.INTER_CUBIC
    return cv2.resize(img, (width, height), interpolation=flag)


def _cover(cv2: Any, rng: np.random.Generator, img: np.ndarray, width: int, height: int) -> np.ndarray:
    """``img`` scaled (if needed) to cover width x height, then a random crop of exactly that size."""
    h, w = img.shape[:2]
    f = max(width / w, height / h, 1.0)
    if f > 1.0:
        img = _resize(cv2, img, max(width, int(math.ceil(w * f))), max(height, int(math.ceil(h * f))))
    h, w = img.shape[:2]
    top, left = int(rng.integers(h - height + 1)), int(rng.integers(w - width + 1))
    return img[top : top + height, left : left + width]


def _tile(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """A random flip / quarter turn of a tile (more variety from the same photos)."""
    img = np.rot90(img, int(rng.integers(4)))
    return img[:, ::-1] if rng.random() < 0.5 else img


def _mosaic(cv2: Any, rng: np.random.Generator, pool: list[np.ndarray], extra: list[np.ndarray],
            width: int, height: int) -> np.ndarray:
    """Native-resolution tiles on a randomly offset grid, rescaled by a non-integer factor to width x height."""
    f = _scale_factor(rng)
    cw, ch = int(math.ceil(width / f)) + 1, int(math.ceil(height / f)) + 1
    cell = 100
    canvas = np.empty((ch, cw, 3), np.uint8)
    oy, ox = int(rng.integers(cell)), int(rng.integers(cell))
    for y in range(-oy, ch, cell):
        for x in range(-ox, cw, cell):
            if extra and rng.random() < 0.15:
                src = extra[int(rng.integers(len(extra)))]
                tile = _cover(cv2, rng, src, cell, cell)
            else:
                tile = _tile(rng, _cover(cv2, rng, pool[int(rng.integers(len(pool)))], cell, cell))
            y0, x0 = max(y, 0), max(x, 0)
            y1, x1 = min(y + cell, ch), min(x + cell, cw)
            canvas[y0:y1, x0:x1] = tile[y0 - y : y1 - y, x0 - x : x1 - x]
    return _resize(cv2, canvas, width, height)


def _encode(cv2: Any, rgb: np.ndarray, grey: bool, quality: int, subsampling_444: bool) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality), cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
              cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444 if subsampling_444 else cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420]
    img = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if grey else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", img, params)
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG")
    return buf.tobytes()


def _source_pool(cv2: Any, src_dir: Path, rng: np.random.Generator) -> list[np.ndarray]:
    files = sorted(p for p in src_dir.rglob("*") if p.suffix.lower() in SOURCE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"no .jpg/.jpeg/.png photos under {src_dir}")
    chosen = [files[i] for i in sorted(rng.choice(len(files), size=min(POOL_SIZE, len(files)), replace=False))]
    pool = []
    for path in chosen:
        bgr = cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_COLOR)
        if bgr is not None and min(bgr.shape[:2]) >= 16:
            pool.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    if not pool:
        raise ValueError(f"no decodable photos under {src_dir}")
    return pool


def make_realsize_photos(src_dir: str | Path, out_dir: str | Path, n: int, min_side: int = 400,
                         max_side: int = 3000, seed: int = 0, quality: int = 90) -> list[str]:
    """Write ``n`` real-size JPEG photos made from the photos under ``src_dir`` into ``out_dir``.

    Both sides of every file lie in ``[min_side, max_side]``; per-file JPEG quality is drawn from
    ``quality - 5 .. quality + 5`` (clipped to 1..100). Files are named
    ``NNNNN_<kind>_<W>x<H>.jpg`` (kind: mosaic, single or photo; see the module docstring).
    Returns the written paths in order. Deterministic for the same source files and ``seed``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 1 <= min_side <= max_side:
        raise ValueError(f"need 1 <= min_side <= max_side, got {min_side}, {max_side}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    cv2 = import_cv2()
    rng = np.random.default_rng(seed)
    pool = _source_pool(cv2, Path(src_dir), rng)
    photos = _sklearn_photos()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    for i in range(n):
        width, height = _frame_dims(rng, min_side, max_side)
        r = rng.random()
        if r < 0.6 or (r >= 0.8 and not photos):
            kind, rgb = "mosaic", _mosaic(cv2, rng, pool, photos, width, height)
        elif r < 0.8:
            kind = "single"
            rgb = _cover(cv2, rng, _tile(rng, pool[int(rng.integers(len(pool)))]), width, height)
        else:
            kind, rgb = "photo", _cover(cv2, rng, photos[int(rng.integers(len(photos)))], width, height)
        grey = bool(rng.random() < 0.12)
        q = int(np.clip(quality + int(rng.integers(-5, 6)), 1, 100))
        data = _encode(cv2, np.ascontiguousarray(rgb), grey, q, subsampling_444=bool(rng.random() < 0.4))
        path = out / f"{i:05d}_{kind}_{width}x{height}.jpg"
        path.write_bytes(data)
        written.append(str(path))
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m sample.realsize SRC OUT --n N``: write the photos, print a one-line summary."""
    ap = argparse.ArgumentParser(prog="python -m sample.realsize", description=__doc__.split("\n")[0])
    ap.add_argument("src", help="folder of source photos (searched recursively), e.g. ../shared/data/fruits360-100")
    ap.add_argument("out", help="output folder (created)")
    ap.add_argument("--n", type=int, default=100, help="number of photos (default 100)")
    ap.add_argument("--min-side", type=int, default=400, help="smallest side in pixels (default 400)")
    ap.add_argument("--max-side", type=int, default=3000, help="largest side in pixels (default 3000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality centre; each file +-5 (default 90)")
    args = ap.parse_args(argv)
    try:
        paths = make_realsize_photos(args.src, args.out, args.n, args.min_side, args.max_side, args.seed,
                                     args.quality)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    total = sum(Path(p).stat().st_size for p in paths)
    print(f"wrote {len(paths)} photos ({total / 1e6:.1f} MB) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
