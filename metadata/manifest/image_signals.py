"""Per-image signals for data quality: a 64-bit perceptual hash and four quality numbers, from one grey image.

Meant for the manifest check, from the decode it does anyway (a reduced-size greyscale JPEG decode, see
``reduced_gray_flag``; other formats as ``cv2.IMREAD_UNCHANGED`` turned grey by ``gray_of``). What hash
and signals cost per image, beside the decode and the whole check: bench/RESULTS-quality-cost.md (its CPU
per file tables). About 20 numpy and cv2 calls per image, whose fixed cost (1-3 µs each here) and cache
misses after the decode, not the arithmetic, are most of it: hence one integral image and one small gather
for the hash's grid (``_grid_sums``), reused scratch memory (``_Workspace``), float64 arithmetic that stays
exact for the hash, and one OpenCV resize for the signals' copy. Pure numpy + cv2 (imported through
``contracts.cv2_env``); no Spark, no torch.

Perceptual hash (``perceptual_hash``; DCT pHash)
    1. The grey image is box-averaged to 32x32 (exactly what ``cv2.INTER_AREA`` computes, including
       fractional pixel weights; an axis shorter than 32 px is upsampled as ``cv2.INTER_LINEAR`` with
       half-pixel centres), in exact integer arithmetic from an integral image, and kept at 1/256 grey
       level instead of being rounded to uint8 (float64 holding integers below 2**53 up to ~1.3e8
       pixels, ``_float_exact``; int64 above).
    2. The 2-D DCT-II of that 32x32 block (orthonormal scaling, as ``cv2.dct``: row/column 0 weighted
       1/sqrt(2) against the others), only its top-left 8x8 low frequencies, computed with an integer
       cosine table (cos * 4096, rounded; every entry is >= 0.0016 away from a rounding tie, so any
       libm gives the same table) in exact arithmetic (float64 products and sums of integers below 2**53;
       ``_hash_from_block`` says why the block's mean need not be removed first).
    3. Bit ``i = 8*u + v`` (``u`` = vertical frequency = row of the 8x8 block, ``v`` = horizontal
       frequency = column; bit 0 is the least significant bit of the 64-bit value) is 1 when
       coefficient (u, v) is strictly greater than the median of the 63 AC coefficients. The DC
       coefficient (u = v = 0, the mean brightness) is excluded from the median and its bit 0 is always
       0: brightness says nothing about the layout and would only shift the median by half a rank
       (pHash's own variants disagree here; ``imagededup`` includes a DC bit that is almost always 1).
       So a hash has 63 informative bits, about half of them set, and ``hash & 1 == 0``; a flat image
       hashes to 0.
    4. The unsigned 64-bit value is returned as a signed int64 (two's complement: bit 63 set means
       negative), so it fits a Parquet int64 column; ``hamming`` works on those signed values.

    Deterministic across machines, thread counts and SIMD paths: every step up to the comparison is
    exact integer arithmetic (sums of integers in int64 or below 2**53 in float64, which no summation
    order changes), and no ``cv2.resize``/``cv2.dct`` result feeds the hash. A mirror-symmetric image
    gets exactly zero odd coefficients, so even ties resolve the same everywhere. (The decoded pixels
    themselves are the decoder's: another libjpeg build may differ by a grey level here and there.)
    Limits: crops move the hash a lot (a 90-95 % crop: median 14 bits), and smooth synthetic images
    (pure gradients, as in PngSuite) have many near-zero coefficients, so one grey level of rounding can
    move many of their bits; photos do not behave so.

Quality signals (``image_signals``), all from one normalized box-averaged copy whose shorter side is
``SIGNAL_SIDE`` px (aspect kept, longer side capped at ``MAX_SIGNAL_ASPECT`` x that; ``_signal_copy``:
OpenCV's area resize in float32, kept at 1/256 grey level, within 1/512 of the exact box average), so they
hardly depend on how much the decode was reduced:
    ``blur``       variance of the 4-neighbour Laplacian over the interior pixels (grey levels squared;
                   low = little detail at that scale: blurred or featureless);
    ``brightness`` the mean grey level, 0..255 (exact, from the integral image at decode size);
    ``contrast``   the standard deviation of the grey levels, 0..~128;
    ``entropy``    Shannon entropy of the 256-bin histogram of the copy rounded to integers, bits (0..8).
An image whose shorter side is under ``SIGNAL_SIDE`` is upsampled (``cv2.INTER_LINEAR``) for these,
so tiny images read as smooth (low blur).

Decode (``reduced_gray_flag``, ``gray_of``): a JPEG is decoded grey at 1/8, 1/4 or 1/2 scale, the most
reduced whose shorter side stays >= ``MIN_DECODE_SIDE`` (128) px, i.e. at least twice the signal copy.
The trade-off, measured on 200 real-size photos of 400-2,000 px (bench/RESULTS-near-duplicates.md, "The
reduced decode's floor"): the more reduced, the cheaper (mean decode 3.27 ms full, 2.38 ms with a 64 px
floor, 2.40 ms with 128, 2.55 ms with 256), and the hash hardly cares (distance to the full decode's hash:
median 0, 95th percentile 2 bits); but the 64 px signal copy box-averages the decoded pixels a second
time, which blurs when the decode is near 64 px: blur from the reduced decode / blur from the full
decode was 0.55-0.93 (5th-95th percentile) with a 64 px floor, 0.79-0.97 with 128 and 0.94-1.00 with
256. 128 px keeps the blur within about 20 % of the full decode's for 1-4 % more decode time than 64
(two runs).
The grey and reduced JPEG decodes apply the EXIF orientation (OpenCV does for every flag but
``IMREAD_UNCHANGED``), so the hash is of the picture as shown. Other formats are decoded with
``IMREAD_UNCHANGED`` (no reduced decode exists for them; it is the decode the manifest check already
does to count channels; EXIF orientation is not applied) and made grey by ``gray_of``: 16-bit to 8-bit
by rounding (v + 128) // 257, colour by ``cv2.COLOR_BGR2GRAY`` (the BT.601 weights of a JPEG's luma, so
a PNG and a JPEG of one picture hash alike), alpha composited over white (the featurizer's default,
``[preprocess] alpha = "composite"``).

Measured figures and the choice of a default near-duplicate distance and outlier thresholds:
``bench/RESULTS-near-duplicates.md`` (``bench/bench_near_duplicates.py``).
"""
from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from imgfeat.metadata.contracts.samples import to_uint8

HASH_SIDE = 32
"""The pHash's box-averaged block: HASH_SIDE x HASH_SIDE."""
HASH_FREQS = 8
"""Low frequencies kept per axis: HASH_FREQS x HASH_FREQS = 64 bits."""
HASH_BITS = HASH_FREQS * HASH_FREQS
SIGNAL_SIDE = 64
"""Shorter side, in px, of the normalized copy the quality signals are computed from."""
MAX_SIGNAL_ASPECT = 16
"""The signal copy's longer side is at most this many times its shorter side (bounds the cost of panoramas)."""
MIN_DECODE_SIDE = 2 * SIGNAL_SIDE
"""``reduced_gray_flag`` keeps a reduced JPEG decode's shorter side at or above this (see the module docstring)."""

# cv2's imread flags (stable public values; a test checks them against cv2), so choosing a flag does not
# import cv2: the first import fixes OpenCV's pixel limit (see contracts/cv2_env.py).
IMREAD_UNCHANGED = -1
IMREAD_GRAYSCALE = 0
IMREAD_REDUCED_GRAYSCALE_2 = 16
IMREAD_REDUCED_GRAYSCALE_4 = 32
IMREAD_REDUCED_GRAYSCALE_8 = 64
_REDUCED = ((8, IMREAD_REDUCED_GRAYSCALE_8), (4, IMREAD_REDUCED_GRAYSCALE_4), (2, IMREAD_REDUCED_GRAYSCALE_2))

_MASK64 = (1 << 64) - 1
_MEAN_UNITS = 256  # the 32x32 block is kept at 1/256 grey level
_COS_BITS = 12


def _dct_table() -> np.ndarray:
    """The first HASH_FREQS rows of the orthonormal 32-point DCT-II basis, times 2**12, rounded (int64).

    The global factor sqrt(2/32) is left out (a positive scale changes no comparison); row 0 keeps its
    relative 1/sqrt(2). Every value lies at least 0.0016 from a rounding tie, so the table is the same
    with any correctly-working libm."""
    one = 1 << _COS_BITS
    rows = [[round(one * (math.sqrt(0.5) if u == 0 else math.cos(math.pi * (2 * x + 1) * u / (2 * HASH_SIDE))))
             for x in range(HASH_SIDE)] for u in range(HASH_FREQS)]
    return np.array(rows, dtype=np.int64)


_DCT = _dct_table()
_DCT_T = np.ascontiguousarray(_DCT.T)
_DCT_F = _DCT.astype(np.float64)
"""``_DCT`` as float64 (the same integers): ``_hash_from_block`` multiplies in float64, exactly."""
_DCT_FT = np.ascontiguousarray(_DCT_F.T)
_EXACT = 2.0**53
"""float64 holds every integer below this exactly: sums and products of such integers need no rounding."""
_CELL_BOUND = _MEAN_UNITS * HASH_SIDE * HASH_SIDE
"""The hash block's sums are up to 255 * h * w * this (``_hash_block``): ``_float_exact`` bounds with it."""


@dataclass(frozen=True)
class ImageSignals:
    """What ``image_signals`` returns for one image (see the module docstring for each field)."""

    phash: int
    """64-bit DCT perceptual hash as a signed int64."""
    blur: float
    """Variance of the Laplacian at SIGNAL_SIDE px (grey levels squared); low = blurred or featureless."""
    brightness: float
    """Mean grey level, 0..255."""
    contrast: float
    """Standard deviation of the grey levels at SIGNAL_SIDE px."""
    entropy: float
    """Shannon entropy of the 256-bin grey histogram at SIGNAL_SIDE px, bits (0..8)."""

    def as_row(self) -> dict[str, Any]:
        """The fields as a dict (``dataclasses.asdict`` without its deep copy: ~20x cheaper)."""
        return {"phash": self.phash, "blur": self.blur, "brightness": self.brightness, "contrast": self.contrast,
                "entropy": self.entropy}


_CV2: Any = None


def _cv2() -> Any:
    global _CV2
    if _CV2 is None:
        from imgfeat.metadata.contracts.cv2_env import decoder_cv2

        _CV2 = decoder_cv2()
    return _CV2


def _check_gray(gray: np.ndarray) -> np.ndarray:
    if not isinstance(gray, np.ndarray) or gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 grey image, got {getattr(gray, 'dtype', type(gray))} "
                         f"{getattr(gray, 'shape', '')}")
    if gray.size == 0:
        raise ValueError("empty image")
    return gray if gray.flags.c_contiguous else np.ascontiguousarray(gray)


def _float_exact(h: int, w: int) -> bool:
    """Whether every value of the float64 path (``_grid_sums``, the hash block in 1/256 units) of an h x w
    image is an integer below 2**53: 255 * h * w * 256 * 32 * 32 (the hash block's scaling) must be. True up
    to about 1.3e8 pixels."""
    return 255.0 * h * w * _CELL_BOUND < _EXACT


def _integral(gray: np.ndarray) -> np.ndarray:
    """(h+1) x (w+1) integral image, exact: int32 sums where they cannot overflow, else float64 sums of
    integers below 2**53 (which no summation order changes)."""
    cv2 = _cv2()
    h, w = gray.shape
    depth = cv2.CV_32S if 255 * h * w < 2**31 else cv2.CV_64F
    return cv2.integral(gray, sdepth=depth)


@functools.lru_cache(maxsize=1024)
def _axis_plan(n: int, out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For ``_box_sums`` along one axis of n px cut into ``out`` cells. The grid points k*n/out are whole
    pixels q plus remainders r in 1/out px; returns (the integral-image indices q and q + 1 (clamped to n)
    concatenated, the weights out - r of q, the weights r of q + 1). Cached per (n, out)."""
    t = np.arange(out + 1, dtype=np.int64) * n
    q, r = t // out, t % out
    plan = (np.concatenate([q, np.minimum(q + 1, n)]).astype(np.intp), out - r, r)
    for a in plan:
        a.setflags(write=False)
    return plan


def _box_sums(integral: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """Exact area (INTER_AREA) box sums on an oh x ow grid over the image of ``integral``.

    Returns int64 (oh, ow): each cell's pixel sum with fractional edge pixels weighted by their covered
    part, times oh*ow (so every value is an integer); divide by h*w for the cell's mean. Needs h >= oh
    and w >= ow (a cell covers at least one pixel). The integral of a piecewise-constant image is
    bilinear inside each pixel, so its value at the grid point (k*h/oh, j*w/ow) is an exact integer
    combination of the four integral-image values around it. Only those are read (one small gather):
    arrays as wide as the image would cost more in allocation than in arithmetic.

    The reference, in int64 (any size); ``_grid_sums`` computes the same values in float64, faster."""
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    iy, wy0, wy1 = _axis_plan(h, oh)
    ix, wx0, wx1 = _axis_plan(w, ow)
    corners = integral[np.ix_(iy, ix)].astype(np.int64)  # float64 sums of integers convert exactly
    rows = wy0[:, None] * corners[: oh + 1] + wy1[:, None] * corners[oh + 1 :]
    grid = rows[:, : ow + 1] * wx0 + rows[:, ow + 1 :] * wx1
    return np.diff(np.diff(grid, axis=0), axis=1)


@functools.lru_cache(maxsize=32)
def _grid_plan(h: int, w: int, grids: tuple[tuple[int, int], ...]) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """For ``_grid_sums``: per (oh, ow) of ``grids``, the flat indices into an (h+1) x (w+1) integral image of
    the 2(oh+1) x 2(ow+1) values that ``_box_sums`` reads (rows q then q + 1, columns likewise, as
    ``_axis_plan``) and the weight of each (its row's weight times its column's), float64; all grids'
    concatenated, with each grid's start offset. Cached per (h, w, grids): photos mostly repeat a few sizes."""
    flats, weights, offsets, at = [], [], [], 0
    for oh, ow in grids:
        iy, wy0, wy1 = _axis_plan(h, oh)
        ix, wx0, wx1 = _axis_plan(w, ow)
        flats.append((iy[:, None] * (w + 1) + ix[None, :]).ravel())
        weights.append(np.outer(np.concatenate([wy0, wy1]), np.concatenate([wx0, wx1])).ravel())
        offsets.append(at)
        at += flats[-1].shape[0]
    flat = np.concatenate(flats).astype(np.intp)
    weight = np.concatenate(weights).astype(np.float64)
    for arr in (flat, weight):
        arr.setflags(write=False)
    return flat, weight, tuple(offsets)


class _Workspace(threading.local):
    """Per-thread scratch memory for ``_grid_sums``: one buffer per slot and dtype, grown when an image needs
    more, never shrunk. Fresh temporaries of 100-400 KB per image made glibc give the heap's top back to
    the kernel after every call and fault it in again on the next (130-240 page faults per image, more
    system than user time in a loop over images); reused memory costs none of that."""

    def __init__(self) -> None:
        self.slots: dict[tuple[int, Any], np.ndarray] = {}

    def view(self, slot: int, shape: tuple[int, ...], dtype: Any = np.float64) -> np.ndarray:
        """An array of ``shape`` and ``dtype`` over that slot's buffer, valid until the slot is used again."""
        n = math.prod(shape)
        buf = self.slots.get((slot, dtype))
        if buf is None or buf.shape[0] < n:
            buf = self.slots[(slot, dtype)] = np.empty(max(n, 0 if buf is None else 2 * buf.shape[0]), dtype)
        return buf[:n].reshape(shape)


_WORK = _Workspace()


def _grid_sums(gray: np.ndarray, grids: tuple[tuple[int, int], ...]) -> tuple[float, list[np.ndarray]]:
    """The pixel sum of ``gray`` and ``_box_sums`` of every (oh, ow) of ``grids`` (each needs h >= oh and
    w >= ow), as float64, from one integral image: one gather of the values ``_box_sums`` reads for all
    grids, one multiplication by their weights, then per grid three additions and a 2-D difference (at
    these sizes the per-call overhead of numpy, not the arithmetic, is what costs). The equal of
    ``_box_sums`` value for value when ``_float_exact`` holds: every intermediate is an integer below 2**53,
    and float64 adds and multiplies such integers exactly, in any order. The integral image and the
    gathers live in the thread's ``_Workspace``; the returned grids are fresh arrays."""
    cv2 = _cv2()
    h, w = gray.shape
    # int32 where no sum can overflow it (~8.4 million pixels): half the integral's cost of float64 there.
    small = 255 * h * w < 2**31
    integral = _WORK.view(0, (h + 1, w + 1), np.int32 if small else np.float64)
    cv2.integral(gray, sum=integral, sdepth=cv2.CV_32S if small else cv2.CV_64F)  # exact either way
    values = integral.reshape(-1)
    flat, weight, offsets = _grid_plan(h, w, grids)
    p = _WORK.view(1, flat.shape)
    if small:  # gather as int32, convert, multiply: cheaper than a mixed-type multiplication
        np.copyto(p, np.take(values, flat, out=_WORK.view(2, flat.shape, np.int32), mode="clip"))
    else:
        np.take(values, flat, out=p, mode="clip")  # mode clip: unbuffered; every index is in range
    p *= weight
    out = []
    for (oh, ow), at in zip(grids, offsets):
        g = p[at : at + 4 * (oh + 1) * (ow + 1)].reshape(2 * (oh + 1), 2 * (ow + 1))
        grid = g[: oh + 1, : ow + 1] + g[oh + 1 :, : ow + 1]
        grid += g[: oh + 1, ow + 1 :]
        grid += g[oh + 1 :, ow + 1 :]
        d = grid[1:] - grid[:-1]
        out.append(d[:, 1:] - d[:, :-1])
    return float(integral[h, w]), out


def _block_of(sums: np.ndarray, scale: float) -> np.ndarray:
    """The hash block in 1/256 grey levels, ``floor(sums * 256 / scale)``, from float64 integer sums (each a
    cell's sum times 1024) and ``scale`` = h * w. Exact under ``_float_exact``: ``sums * 256`` is an integer
    below 2**53, and a quotient x / scale of integers that is not itself an integer lies at least 1 / scale
    (>= 7e-9 up to 1.3e8 pixels) from the next integer, while the correctly rounded division is off by at
    most 65280 * 2**-53 (< 1e-11): the floor of the rounded quotient is the exact floor. (``np.floor_divide``
    on floats gives the same, at several times the cost.)"""
    return np.floor((sums * _MEAN_UNITS) / scale)


def _axis_weights(n: int, out: int) -> tuple[np.ndarray, int]:
    """Integer resampling weights (out x n) for one axis and their per-row sum: box (INTER_AREA) when
    n >= out (in 1/out px), else OpenCV's INTER_LINEAR (half-pixel centres, edge clamped) in 1/(2*out) px."""
    weights = np.zeros((out, n), dtype=np.int64)
    if n >= out:
        for k in range(out):
            lo, hi = k * n, (k + 1) * n  # in 1/out px
            for p in range(lo // out, min(-(-hi // out), n)):
                weights[k, p] = min(hi, (p + 1) * out) - max(lo, p * out)
        return weights, n
    for k in range(out):
        s = (2 * k + 1) * n - out  # source position (k + 0.5) * n / out - 0.5, in 1/(2*out) px
        x0, f = (0, 0) if s < 0 else divmod(s, 2 * out)
        if x0 >= n - 1:
            x0, f = n - 1, 0
        weights[k, x0] += 2 * out - f
        if f:
            weights[k, x0 + 1] += f
    return weights, 2 * out


def _hash_block(gray: np.ndarray, integral: np.ndarray | None = None) -> np.ndarray:
    """The 32x32 block of mean grey levels in 1/256 units (int64), exact (the reference path: any size)."""
    h, w = gray.shape
    if h >= HASH_SIDE and w >= HASH_SIDE:
        sums = _box_sums(_integral(gray) if integral is None else integral, HASH_SIDE, HASH_SIDE)
        scale = h * w
    else:  # a tiny image: separable integer weights (box on a long axis, linear on a short one)
        wy, sy = _axis_weights(h, HASH_SIDE)
        wx, sx = _axis_weights(w, HASH_SIDE)
        sums = wy @ gray.astype(np.int64) @ wx.T
        scale = sy * sx
    return (sums * _MEAN_UNITS) // scale


def _hash_from_block(block: np.ndarray) -> int:
    """The hash of a 32x32 block of integers (in 1/256 grey levels; int64, or float64 holding integers).

    The DCT runs on the block as it is, not on the block less its mean: every AC basis row of ``_DCT`` sums
    to exactly 0, so subtracting a constant changes only the DC coefficient (whose bit is always 0 and which
    is not in the median), and the AC coefficients of ``block * 1024 - sum`` (the mean-free form) are those
    of ``block`` times 1024, which no comparison with their median can tell apart. Without that scaling the
    products fit float64 exactly: |block| <= 255 * 256, |a coefficient| <= 32 * 4096 * 32 * 4096 * 65280 <
    1.2e15 < 2**53, so BLAS's float64 matmul (any order, FMA or not) gives the exact integers."""
    coeffs = (_DCT_F @ np.asarray(block, dtype=np.float64) @ _DCT_FT).ravel()
    median = np.partition(coeffs[1:], (HASH_BITS - 1) // 2)[(HASH_BITS - 1) // 2]
    bits = coeffs > median
    bits[0] = False
    return int.from_bytes(np.packbits(bits, bitorder="little").tobytes(), "little", signed=True)


def _hash_and_sum(gray: np.ndarray) -> tuple[int, float]:
    """The perceptual hash of a checked grey image and its pixel sum, from one integral image."""
    h, w = gray.shape
    if h >= HASH_SIDE and w >= HASH_SIDE and _float_exact(h, w):
        total, (sums,) = _grid_sums(gray, ((HASH_SIDE, HASH_SIDE),))
        return _hash_from_block(_block_of(sums, float(h * w))), total
    integral = _integral(gray)
    block = _hash_block(gray, integral if h >= HASH_SIDE and w >= HASH_SIDE else None)
    return _hash_from_block(block), float(integral[h, w])


def perceptual_hash(gray: np.ndarray) -> int:
    """64-bit DCT perceptual hash of a 2-D uint8 grey image, as a signed int64 (see the module docstring)."""
    return _hash_and_sum(_check_gray(gray))[0]


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two 64-bit hashes given as signed (or unsigned) integers (0..64)."""
    return ((a ^ b) & _MASK64).bit_count()


def hash_to_unsigned(h: int) -> int:
    """The unsigned 64-bit value of a signed int64 hash (e.g. to print it as 16 hex digits)."""
    return h & _MASK64


def signal_size(h: int, w: int, side: int = SIGNAL_SIDE) -> tuple[int, int]:
    """(height, width) of the normalized copy: shorter side ``side``, aspect kept, longer side capped."""
    if h <= w:
        return side, min(max(side, round(w * side / h)), side * MAX_SIGNAL_ASPECT)
    return min(max(side, round(h * side / w)), side * MAX_SIGNAL_ASPECT), side


def _signal_copy(gray: np.ndarray, side: int) -> np.ndarray:
    """The normalized copy the quality signals are computed from (``signal_size``), float32 at 1/256 grey
    level: the box average (``cv2.INTER_AREA`` of the image as float32) when both sides shrink, else
    ``cv2.INTER_LINEAR`` of the uint8 image. Rounding the area average to 1/256 (far coarser than float32's
    weights' error, ~1e-5 grey levels) makes a flat image's copy exactly flat and the values the same on
    every SIMD path; every Laplacian of such values is exact in float32."""
    cv2 = _cv2()
    h, w = gray.shape
    oh, ow = signal_size(h, w, side)
    if h < oh or w < ow:
        return cv2.resize(gray, (ow, oh), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    copy = cv2.resize(gray.astype(np.float32), (ow, oh), interpolation=cv2.INTER_AREA)
    copy *= _MEAN_UNITS
    np.rint(copy, out=copy)
    copy *= 1.0 / _MEAN_UNITS  # a power of two: exact
    return copy


def _quality(copy: np.ndarray) -> tuple[float, float, float]:
    """(blur, contrast, entropy) of a float32 grey copy."""
    cv2 = _cv2()
    lap = cv2.Laplacian(copy, cv2.CV_32F, ksize=1)[1:-1, 1:-1]  # 4-neighbour kernel; interior only
    blur = float(cv2.meanStdDev(lap)[1][0, 0] ** 2) if lap.size else 0.0
    contrast = float(cv2.meanStdDev(copy)[1][0, 0])
    hist = np.bincount((copy + 0.5).astype(np.uint8).ravel(), minlength=256)  # copy is within 0..255
    p = hist[hist > 0] / copy.size
    entropy = float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0: no -0.0 for a flat image
    return blur, contrast, entropy


def image_signals(gray: np.ndarray, side: int = SIGNAL_SIDE) -> ImageSignals:
    """The hash and the quality signals of a 2-D uint8 grey image.

    ``side``: the shorter side of the signal copy; keep the default (thresholds are chosen for it).

    The hash's 32x32 box averages and the brightness come from one integral image (``_grid_sums``, exact,
    where ``_float_exact`` holds: every image up to ~1.3e8 pixels whose sides are both >= 32; the int64
    reference path otherwise, with identical values); the other signals from ``_signal_copy``, one OpenCV
    resize (it replaced a second, larger gather from the integral image, exact to the last bit but 2-3x the
    cost at these sizes: bench/RESULTS-quality-cost.md)."""
    gray = _check_gray(gray)
    h, w = gray.shape
    phash, total = _hash_and_sum(gray)
    blur, contrast, entropy = _quality(_signal_copy(gray, side))
    return ImageSignals(phash=phash, blur=blur, brightness=total / (h * w), contrast=contrast, entropy=entropy)


def reduced_gray_flag(width: int | None, height: int | None, fmt: str | None,
                      min_side: int = MIN_DECODE_SIDE) -> int:
    """The ``cv2.imdecode`` flag for the signals' decode of a file with these header values.

    JPEG: ``IMREAD_REDUCED_GRAYSCALE_8``, ``_4`` or ``_2``, the most reduced whose shorter side
    (libjpeg rounds a scaled side up) stays >= ``min_side``; ``IMREAD_GRAYSCALE`` when even 1/2 is too
    small or the size is unknown. Any other format: ``IMREAD_UNCHANGED`` (no reduced decode exists for
    them, and it is the decode the manifest check does anyway; ``gray_of`` makes it grey).
    """
    if (fmt or "").lower() not in ("jpeg", "jpg"):
        return IMREAD_UNCHANGED
    if not width or not height or width < 0 or height < 0:
        return IMREAD_GRAYSCALE
    shorter = min(int(width), int(height))
    for scale, flag in _REDUCED:
        if -(-shorter // scale) >= min_side:
            return flag
    return IMREAD_GRAYSCALE


def gray_of(img: np.ndarray, background: int = 255) -> np.ndarray:
    """Whatever ``cv2.imdecode`` returned (grey, grey+alpha, BGR, BGRA; 8/16-bit or float) as 2-D uint8 grey.

    Samples to 8 bits first (16-bit: (v + 128) // 257); colour with ``cv2.COLOR_BGR2GRAY`` (BT.601, as a
    JPEG's luma); alpha composited over ``background`` (white by default, as the featurizer does)."""
    if not isinstance(img, np.ndarray) or img.ndim not in (2, 3) or img.size == 0:
        raise ValueError(f"not a decoded image: {getattr(img, 'shape', type(img))}")
    img = to_uint8(img)
    if img.ndim == 2:
        return np.ascontiguousarray(img)
    channels = img.shape[2]
    if channels == 1:
        return np.ascontiguousarray(img[..., 0])
    if channels == 3:
        return _cv2().cvtColor(img, _cv2().COLOR_BGR2GRAY)
    if channels == 4:
        grey, alpha = _cv2().cvtColor(img, _cv2().COLOR_BGRA2GRAY), img[..., 3]
    elif channels == 2:
        grey, alpha = img[..., 0], img[..., 1]
    else:
        raise ValueError(f"unexpected channel count {channels}")
    a = alpha.astype(np.uint16)
    out = (grey.astype(np.uint16) * a + np.uint16(background) * (255 - a) + 127) // 255
    return out.astype(np.uint8)


DEFAULT_NEAR_DUPLICATE_DISTANCE = 4
"""Two images are near-duplicates when ``hamming(a.phash, b.phash) <= this``.

Measured (bench/RESULTS-near-duplicates.md; 1,700 distinct photos, 1,800 planted variants): at 4, 100 %
of JPEG q50 re-encodes, 99.7 % of 50-90 % resizes, 100 % of +-10 % brightness changes, 99.3 % of PNG
copies and 92 % of small captions are grouped with their original; 97.7 % of the pairs are true when
two frames of one Fruits-360 fruit do not count as false (98.7 % when two overlapping crops of one photo
do not either); strictly, 84 %, since Fruits-360 holds many near-identical frames of one rotating fruit.
2 is stricter (99.7 % / 99.7 %; resizes 98.7 %, captions 76 %); 6 and above let photos that share a
layout (one fruit centred on white) chain into large groups (8: one group of 939 files). Crops of
90-95 % are not near-duplicates for any DCT hash (median 14 bits): 2 % at 4. imagededup's PHash scored
the same within a point at every distance, at 3.4x our CPU per file (PIL decodes at full size)."""

OUTLIER_THRESHOLDS: dict[str, float] = {
    "blur_below": 100.0,
    "brightness_below": 20.0,
    "brightness_above": 235.0,
    "contrast_below": 15.0,
    "entropy_below": 2.0,
}
"""Proposed quality-outlier thresholds for ``quality_flags``, chosen from measurements on 1,700 real photos
and degraded copies of 200 of them (bench/RESULTS-near-duplicates.md); none flags any of the real photos:

* ``blur_below`` 100: under the 0.1th percentile of both photo sets (106 and 112; 1st percentile ~150);
  catches 82 % of copies blurred with sigma = 2 % of the shorter side, only 13 % at 1 % (finer blur
  does not show at the 64 px scale); flags 0.7 % of the planted variants (crops and darker copies of
  the smoothest photos, whose originals sit just above 100). Blur scales with contrast squared, so dark,
  over-exposed and low-contrast images read as blurry too (96 % of those copies): read it with
  ``contrast`` (``blurry`` without ``low_contrast`` is the blurred case).
* ``brightness_below`` 20 / ``brightness_above`` 235: photos span 46-229 (0.1th-99.9th percentiles;
  white-background product shots reach 229); 10x under-exposed copies have a mean of ~14 (95 % caught),
  10x over-exposed ~244 (100 %). 20 leaves room for low-key photos, which the measured data lacks.
* ``contrast_below`` 15: photos >= 37 (0.1th percentile); copies at 1/10 contrast ~8 (100 % caught).
* ``entropy_below`` 2 bits: blank and near-blank frames (0 bits); photos >= 2.55 (0.1th percentile;
  white-background photos are the low ones: 3 would flag 1.1 % of them)."""

QUALITY_FLAGS = ("blurry", "dark", "bright", "low_contrast", "low_entropy")
"""The names ``quality_flags`` can return, in this order."""


def quality_flags(s: ImageSignals, thresholds: dict[str, float] | None = None) -> tuple[str, ...]:
    """The quality outliers ``s`` is (a subset of QUALITY_FLAGS, in that order; empty when none)."""
    t = OUTLIER_THRESHOLDS if thresholds is None else {**OUTLIER_THRESHOLDS, **thresholds}
    hits = (s.blur < t["blur_below"], s.brightness < t["brightness_below"], s.brightness > t["brightness_above"],
            s.contrast < t["contrast_below"], s.entropy < t["entropy_below"])
    return tuple(name for name, hit in zip(QUALITY_FLAGS, hits) if hit)
