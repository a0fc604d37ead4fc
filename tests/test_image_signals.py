"""Perceptual hash and quality signals (metadata/manifest/image_signals.py).

Generated images (integer formulas, no RNG stream or libm involved) always run, with their hashes pinned
to exact values; real photos: Fruits-360 from ../shared (skipped with a reason when absent) and
scikit-learn's two bundled photos (skipped when scikit-learn is not installed).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from imgfeat.metadata.contracts.cv2_env import decoder_cv2
from imgfeat.metadata.manifest import image_signals as sig

cv2 = decoder_cv2()


# ----------------------------------------------------------------------------------------- generated images


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:h, 0:w]
    return y.astype(np.int64), x.astype(np.int64)


def noise(h: int, w: int, k: int = 0) -> np.ndarray:
    """Hash-like noise from an integer formula (exact everywhere)."""
    y, x = _grid(h, w)
    v = ((x * x * 31 + y * 17 + x * y * 7 + k * 101) * 2654435761) % 4294967296
    return (v >> 24).astype(np.uint8)


def smooth_noise(h: int, w: int, k: int = 0, box: int = 9) -> np.ndarray:
    """``noise`` box-averaged (integer floor mean over box x box, edges clamped): photo-like blobs."""
    n = np.pad(noise(h, w, k).astype(np.int64), box // 2, mode="edge")
    c = np.zeros((n.shape[0] + 1, n.shape[1] + 1), np.int64)
    c[1:, 1:] = n.cumsum(0).cumsum(1)
    s = c[box:, box:] - c[:-box, box:] - c[box:, :-box] + c[:-box, :-box]
    return (s // (box * box)).astype(np.uint8)


def blob_scene(h: int, w: int) -> np.ndarray:
    """A bright ellipse off centre on a ramp, plus a dark bar: no symmetry."""
    y, x = _grid(h, w)
    ramp = 40 + (x * 90) // w + (y * 30) // h
    ell = ((x - w // 3) ** 2) * 4 + ((y - h // 2) ** 2) * 9 < (min(h, w) ** 2)
    bar = (x > (2 * w) // 3) & (x < (2 * w) // 3 + w // 10) & (y > h // 5)
    v = np.where(ell, 220, ramp)
    v = np.where(bar, 25, v)
    return v.astype(np.uint8)


PINNED = {
    "noise_97x131": (lambda: noise(97, 131), -0x5670641BD8DF079C),
    "smooth_480x640": (lambda: smooth_noise(480, 640, 3), 0x2B45465E036B72AE),
    "blob_200x150": (lambda: blob_scene(200, 150), -0x6D6CEC009793976E),
    "tiny_13x20": (lambda: smooth_noise(13, 20, 5, box=3), -0x9935CDED30985F8),
    "flat_50x70": (lambda: np.full((50, 70), 123, np.uint8), 0),
}
"""Exact hashes: any change to the algorithm, the resize or the bit order shows here (and means every
stored hash must be recomputed)."""


def encode(img: np.ndarray, ext: str = ".jpg", quality: int = 90) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext == ".jpg" else []
    ok, buf = cv2.imencode(ext, img, params)
    assert ok
    return buf.tobytes()


def decode_as_manifest(data: bytes) -> np.ndarray:
    """What the manifest check does: header, ``reduced_gray_flag``, imdecode, ``gray_of``."""
    from imgfeat.metadata.contracts.sniff import parse_header

    info = parse_header(data)
    assert info.status == "ok", info.detail
    img = cv2.imdecode(np.frombuffer(data, np.uint8), sig.reduced_gray_flag(info.width, info.height, info.format))
    assert img is not None
    return sig.gray_of(img)


def signals_of(data: bytes) -> sig.ImageSignals:
    return sig.image_signals(decode_as_manifest(data))


def variants(bgr: np.ndarray) -> dict[str, bytes]:
    """The same picture: JPEG q60, PNG, resized to 50 %, brightness +10 % (all but PNG as JPEG q90)."""
    h, w = bgr.shape[:2]
    half = cv2.resize(bgr, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    brighter = np.clip(bgr.astype(np.float32) * 1.1 + 0.5, 0, 255).astype(np.uint8)
    return {"jpeg_q60": encode(bgr, quality=60), "png": encode(bgr, ".png"), "resize_50": encode(half),
            "brightness_+10": encode(brighter)}


# ----------------------------------------------------------------------------------------- the hash


@pytest.mark.parametrize("name", sorted(PINNED))
def test_pinned_hashes(name):
    make, expected = PINNED[name]
    gray = make()
    assert sig.perceptual_hash(gray) == expected
    assert sig.image_signals(gray).phash == expected


def test_hash_does_not_depend_on_opencv_threads():
    before = cv2.getNumThreads()
    try:
        cv2.setNumThreads(4)
        got = {name: sig.perceptual_hash(make()) for name, (make, _) in PINNED.items()}
    finally:
        cv2.setNumThreads(before)
    assert got == {name: expected for name, (_, expected) in PINNED.items()}


def test_hash_layout():
    for make, h in PINNED.values():
        assert -(2**63) <= h < 2**63
        assert h & 1 == 0  # bit 0 (DC) is always 0
        assert np.array([h], dtype=np.int64)[0] == h  # fits a Parquet int64 column
    # A pure horizontal falling ramp: only the horizontal frequencies (u = 0, v odd) are positive, so
    # exactly bits 1, 3, 5 and 7 are set (bit i = 8*u + v).
    _, x = _grid(64, 64)
    ramp = (255 - 4 * x).astype(np.uint8)
    assert sig.perceptual_hash(ramp) == 0b10101010
    # The same ramp running down the image: bits 8, 24, 40, 56 (u odd, v = 0).
    assert sig.perceptual_hash(np.ascontiguousarray(ramp.T)) == (1 << 8) | (1 << 24) | (1 << 40) | (1 << 56)
    # A falling ramp has its coefficients positive; a rising one negative: the top bit set means a negative int64.
    assert sig.hash_to_unsigned(-1) == 2**64 - 1


def test_dct_table_is_exact_and_far_from_rounding_ties():
    one = 1 << 12
    for u in range(8):
        for x in range(32):
            c = math.sqrt(0.5) if u == 0 else math.cos(math.pi * (2 * x + 1) * u / 64)
            v = c * one
            assert sig._DCT[u, x] == round(v)
            assert abs(abs(v - math.floor(v)) - 0.5) > 1e-3
    assert (sig._DCT[1:].sum(axis=1) == 0).all()  # a flat image has no AC energy at all


def test_hash_matches_the_float_reference():
    """The integer pipeline computes the documented algorithm: cv2.resize(INTER_AREA) to 32x32, cv2.dct,
    8x8, bits above the median of the 63 AC coefficients (uint8 rounding of cv2's resize aside)."""
    for k in range(6):
        gray = smooth_noise(150 + 37 * k, 230 - 11 * k, k, box=7)
        block = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
        coeffs = cv2.dct(block)[:8, :8].ravel()
        bits = coeffs > np.median(coeffs[1:])
        bits[0] = False
        ref = int.from_bytes(np.packbits(bits, bitorder="little").tobytes(), "little", signed=True)
        assert sig.hamming(ref, sig.perceptual_hash(gray)) <= 2


def test_box_average_is_inter_area():
    for h, w in ((32, 32), (33, 47), (97, 131), (480, 640), (40, 1000)):
        gray = smooth_noise(h, w, 1, box=3)
        ours = sig._hash_block(gray) / 256.0
        ref = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA)
        assert np.abs(ours - ref).max() <= 0.5 + 1e-9  # cv2 rounds its result to uint8
    for h, w in ((13, 20), (5, 7), (31, 31), (1, 1)):
        gray = smooth_noise(h, w, 2, box=1)
        ours = sig._hash_block(gray) / 256.0
        ref = cv2.resize(gray.astype(np.float32), (32, 32), interpolation=cv2.INTER_LINEAR)
        assert np.abs(ours - ref).max() < 0.01


def test_hamming():
    assert sig.hamming(0, 0) == 0
    assert sig.hamming(0, -1) == 64
    assert sig.hamming(-(2**63), 0) == 1
    assert sig.hamming(2**63 - 1, -(2**63)) == 64
    a, b = PINNED["noise_97x131"][1], PINNED["blob_200x150"][1]
    assert sig.hamming(a, b) == sig.hamming(b, a) == bin((a ^ b) & (2**64 - 1)).count("1")
    assert sig.hamming(a, sig.hash_to_unsigned(a)) == 0


def test_rejects_what_is_not_a_grey_uint8_image():
    with pytest.raises(ValueError):
        sig.perceptual_hash(np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(ValueError):
        sig.perceptual_hash(np.zeros((10, 10), np.uint16))
    with pytest.raises(ValueError):
        sig.image_signals(np.zeros((0, 10), np.uint8))


def test_generated_variants_stay_close_and_distinct_images_are_far():
    scenes = [cv2.cvtColor(smooth_noise(360, 480, k, box=25), cv2.COLOR_GRAY2BGR) for k in range(6)]
    hashes = []
    for bgr in scenes:
        h0 = signals_of(encode(bgr)).phash
        hashes.append(h0)
        for kind, data in variants(bgr).items():
            assert sig.hamming(h0, signals_of(data).phash) <= 4, kind
    far = [sig.hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1 :]]
    assert min(far) >= 16


# ----------------------------------------------------------------------------------------- real photos


def _fruit_photos(fruits_dir, per_class: int) -> list[tuple[str, np.ndarray]]:
    """(class, photo upscaled to 400 px as BGR) for ``per_class`` photos of each class, spread over frames."""
    out = []
    for cls_dir in sorted((fruits_dir / "Training").iterdir()):
        files = sorted(cls_dir.glob("*.jpg"))
        for f in files[:: max(1, len(files) // per_class)][:per_class]:
            img = cv2.imdecode(np.fromfile(str(f), np.uint8), cv2.IMREAD_COLOR)
            out.append((cls_dir.name, cv2.resize(img, (400, 400), interpolation=cv2.INTER_CUBIC)))
    return out


def test_fruit_photo_variants_stay_close(fruits_dir):
    dists: dict[str, list[int]] = {}
    for _, bgr in _fruit_photos(fruits_dir, 2):
        h0 = signals_of(encode(bgr)).phash
        for kind, data in variants(bgr).items():
            dists.setdefault(kind, []).append(sig.hamming(h0, signals_of(data).phash))
    for kind, d in dists.items():
        assert np.median(d) <= 2 and max(d) <= sig.DEFAULT_NEAR_DUPLICATE_DISTANCE, (kind, d)


def test_distinct_fruit_photos_are_far(fruits_dir):
    photos = _fruit_photos(fruits_dir, 3)
    hashes = [(cls, signals_of(encode(bgr)).phash) for cls, bgr in photos]
    other_class = [sig.hamming(a, b) for i, (ca, a) in enumerate(hashes) for cb, b in hashes[i + 1 :] if ca != cb]
    # Fruits-360 photos share one layout (a fruit in the middle of a white frame), so some pairs of
    # different fruits come close; most are far.
    assert np.median(other_class) >= 20
    assert np.mean([d > sig.DEFAULT_NEAR_DUPLICATE_DISTANCE for d in other_class]) >= 0.95


@pytest.fixture(scope="module")
def sklearn_photos() -> list[np.ndarray]:
    datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn's bundled photos need scikit-learn")
    return [cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2BGR) for img in datasets.load_sample_images().images]


def test_real_photo_variants_and_formats(sklearn_photos):
    hashes = []
    for bgr in sklearn_photos:
        big = cv2.resize(bgr, (1280, 854), interpolation=cv2.INTER_CUBIC)  # a real-size frame: reduced decode
        h0 = signals_of(encode(big)).phash
        hashes.append(h0)
        for kind, data in variants(big).items():
            assert sig.hamming(h0, signals_of(data).phash) <= 4, kind
    assert sig.hamming(*hashes) > 3 * sig.DEFAULT_NEAR_DUPLICATE_DISTANCE


def test_signals_do_not_depend_on_the_decode_reduction(sklearn_photos):
    for bgr in sklearn_photos:
        for size in ((1280, 854), (2048, 1366)):
            data = encode(cv2.resize(bgr, size, interpolation=cv2.INTER_CUBIC))
            full = sig.image_signals(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE))
            reduced = signals_of(data)
            assert 0.7 < reduced.blur / full.blur <= 1.05
            assert abs(reduced.contrast / full.contrast - 1) < 0.05
            assert abs(reduced.brightness - full.brightness) < 1.0
            assert abs(reduced.entropy - full.entropy) < 0.25
            assert sig.hamming(reduced.phash, full.phash) <= 2


# ----------------------------------------------------------------------------------------- quality signals


def test_signal_sanity():
    gray = smooth_noise(300, 400, 7, box=5)
    s = sig.image_signals(gray)
    assert s.brightness == pytest.approx(float(gray.mean()), abs=1e-9)
    blurred = sig.image_signals(cv2.GaussianBlur(gray, (0, 0), 6))
    assert blurred.blur < s.blur / 4
    darker = sig.image_signals((gray // 2).astype(np.uint8))
    assert darker.brightness < s.brightness and darker.contrast < s.contrast
    flat = sig.image_signals(np.full((200, 300), 90, np.uint8))
    assert (flat.blur, flat.contrast, flat.entropy, flat.brightness, flat.phash) == (0.0, 0.0, 0.0, 90.0, 0)
    # Two equal halves, aligned with the 2x box of the 64 px copy: exactly 1 bit of entropy.
    halves = np.zeros((128, 128), np.uint8)
    halves[:, 64:] = 255
    h = sig.image_signals(halves)
    assert h.entropy == pytest.approx(1.0) and h.contrast == pytest.approx(127.5)
    assert 0 <= s.entropy <= 8
    tiny = sig.image_signals(noise(5, 9))  # upsampled for the signals: still finite
    assert all(math.isfinite(v) for v in (tiny.blur, tiny.contrast, tiny.entropy))


def test_signals_are_frozen_and_flagged():
    s = sig.image_signals(np.full((80, 80), 5, np.uint8))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.blur = 1.0  # type: ignore[misc]
    assert sig.quality_flags(s) == ("blurry", "dark", "low_contrast", "low_entropy")
    ok = sig.image_signals(blob_scene(300, 400))
    assert sig.quality_flags(ok) == ()
    assert sig.quality_flags(ok, {"blur_below": 1e12}) == ("blurry",)
    assert set(sig.QUALITY_FLAGS) >= set(sig.quality_flags(sig.image_signals(np.full((80, 80), 250, np.uint8))))


def test_signal_size():
    assert sig.signal_size(480, 640) == (64, 85)
    assert sig.signal_size(640, 480) == (85, 64)
    assert sig.signal_size(10, 100_000) == (64, 64 * sig.MAX_SIGNAL_ASPECT)


# ----------------------------------------------------------------------------------------- decode


def test_imread_flag_constants_are_opencvs():
    assert sig.IMREAD_UNCHANGED == cv2.IMREAD_UNCHANGED
    assert sig.IMREAD_GRAYSCALE == cv2.IMREAD_GRAYSCALE
    assert sig.IMREAD_REDUCED_GRAYSCALE_2 == cv2.IMREAD_REDUCED_GRAYSCALE_2
    assert sig.IMREAD_REDUCED_GRAYSCALE_4 == cv2.IMREAD_REDUCED_GRAYSCALE_4
    assert sig.IMREAD_REDUCED_GRAYSCALE_8 == cv2.IMREAD_REDUCED_GRAYSCALE_8


@pytest.mark.parametrize("w,h,fmt,expected", [
    (4000, 3000, "jpeg", sig.IMREAD_REDUCED_GRAYSCALE_8),
    (1024, 2000, "jpeg", sig.IMREAD_REDUCED_GRAYSCALE_8),
    (1017, 1100, "jpeg", sig.IMREAD_REDUCED_GRAYSCALE_8),  # libjpeg rounds up: ceil(1017 / 8) = 128
    (1016, 1100, "jpeg", sig.IMREAD_REDUCED_GRAYSCALE_4),
    (600, 800, "jpeg", sig.IMREAD_REDUCED_GRAYSCALE_4),
    (509, 800, "jpeg", sig.IMREAD_REDUCED_GRAYSCALE_4),
    (508, 800, "jpeg", sig.IMREAD_REDUCED_GRAYSCALE_2),
    (255, 300, "jpeg", sig.IMREAD_REDUCED_GRAYSCALE_2),
    (254, 300, "jpeg", sig.IMREAD_GRAYSCALE),
    (100, 100, "jpeg", sig.IMREAD_GRAYSCALE),
    (None, None, "jpeg", sig.IMREAD_GRAYSCALE),
    (4000, 3000, "png", sig.IMREAD_UNCHANGED),
    (4000, 3000, "webp", sig.IMREAD_UNCHANGED),
    (4000, 3000, None, sig.IMREAD_UNCHANGED),
])
def test_reduced_gray_flag(w, h, fmt, expected):
    assert sig.reduced_gray_flag(w, h, fmt) == expected


@pytest.mark.parametrize("w,h", [(1017, 1100), (1016, 1100), (509, 700), (508, 700), (255, 300), (1200, 130)])
def test_reduced_decode_keeps_the_minimum_side(w, h):
    data = encode(cv2.cvtColor(smooth_noise(h, w, 1), cv2.COLOR_GRAY2BGR))
    gray = decode_as_manifest(data)
    assert gray.ndim == 2 and gray.dtype == np.uint8
    assert min(gray.shape) >= min(sig.MIN_DECODE_SIDE, w, h)
    assert min(gray.shape) < 2 * sig.MIN_DECODE_SIDE or sig.reduced_gray_flag(w, h, "jpeg") == sig.IMREAD_GRAYSCALE


def test_gray_of_layouts():
    g = smooth_noise(60, 80, 4)
    bgr = cv2.cvtColor(g, cv2.COLOR_GRAY2BGR)
    assert np.array_equal(sig.gray_of(g), g)
    assert np.array_equal(sig.gray_of(g[..., None]), g)
    assert np.array_equal(sig.gray_of(bgr), g)
    assert np.array_equal(sig.gray_of(bgr.astype(np.uint16) * 257), g)  # 16-bit
    assert np.array_equal(sig.gray_of(g.astype(np.float32) / 255.0), g)  # float 0..1
    alpha = np.full((60, 80, 1), 255, np.uint8)
    assert np.array_equal(sig.gray_of(np.concatenate([bgr, alpha], axis=2)), g)  # opaque
    assert (sig.gray_of(np.concatenate([bgr, 0 * alpha], axis=2)) == 255).all()  # transparent: white
    assert (sig.gray_of(np.dstack([g, np.zeros_like(g)]), background=0) == 0).all()  # grey + alpha
    with pytest.raises(ValueError):
        sig.gray_of(np.zeros((4, 4, 5), np.uint8))


def test_png_and_jpeg_of_one_picture_hash_alike():
    bgr = cv2.cvtColor(smooth_noise(300, 400, 9, box=15), cv2.COLOR_GRAY2BGR)
    bgr[..., 0] = np.roll(bgr[..., 0], 7, axis=1)  # some colour
    rgba16 = cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA).astype(np.uint16) * 257
    a = signals_of(encode(bgr, quality=85))
    for data in (encode(bgr, ".png"), encode(rgba16, ".png")):
        b = signals_of(data)
        assert sig.hamming(a.phash, b.phash) <= 2
        assert abs(a.brightness - b.brightness) < 1.0


def test_pngsuite_decodes_to_grey(pngsuite_dir):
    """Every decodable PngSuite file (all colour types, bit depths, palettes, alpha) goes through gray_of."""
    n = 0
    for f in sorted(pngsuite_dir.glob("*.png")):
        if f.name.startswith("x"):
            continue  # the deliberately corrupt ones
        data = f.read_bytes()
        try:
            gray = decode_as_manifest(data)
        except AssertionError:
            continue  # a header the sniffer refuses
        s = sig.image_signals(gray)
        assert gray.ndim == 2 and gray.dtype == np.uint8
        assert 0 <= s.brightness <= 255 and 0 <= s.entropy <= 8
        n += 1
    assert n > 100


def test_jpeg_exif_orientation_is_applied():
    """The grey and reduced-grey JPEG decodes turn the picture upright (OpenCV applies the EXIF
    orientation for every flag but IMREAD_UNCHANGED), so a rotated-by-EXIF copy hashes as the upright one."""
    pil = pytest.importorskip("PIL.Image", reason="writing an EXIF orientation needs Pillow")
    import io

    upright = cv2.cvtColor(blob_scene(300, 400), cv2.COLOR_GRAY2RGB)
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # what a camera held sideways stores
    exif = pil.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    for size in (1, 4):  # a full decode and a reduced one
        img = pil.fromarray(cv2.resize(stored, (stored.shape[1] * size, stored.shape[0] * size)))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
        up = cv2.resize(upright, (upright.shape[1] * size, upright.shape[0] * size))
        expected = signals_of(encode(cv2.cvtColor(up, cv2.COLOR_RGB2BGR))).phash
        assert sig.hamming(signals_of(buf.getvalue()).phash, expected) <= 2


# ----------------------------------------------------------------------------------------- the fast path
# ``image_signals`` and ``perceptual_hash`` compute the hash's box averages in float64 from one integral
# image (``_grid_sums``) and the DCT in float64 without the mean's removal, and the signal copy with
# OpenCV's area resize; the references below are the integer implementations they replaced (and
# ``_box_sums``/``_hash_block``, kept as the fallback), with the copy as the exact box average.


def _reference_hash_from_block(block: np.ndarray) -> int:
    """The mean-free int64 DCT of the first implementation (``block * 1024 - sum``)."""
    block = np.asarray(block, np.int64)
    centred = block * (sig.HASH_SIDE * sig.HASH_SIDE) - int(block.sum())
    coeffs = (sig._DCT @ centred @ sig._DCT_T).ravel()
    median = np.partition(coeffs[1:], 31)[31]
    bits = coeffs > median
    bits[0] = False
    return int.from_bytes(np.packbits(bits, bitorder="little").tobytes(), "little", signed=True)


def _reference_signals(gray: np.ndarray) -> sig.ImageSignals:
    """The first implementation of ``image_signals``: int64 box sums, the mean-free int64 DCT, and the quality
    signals from the exact box average in float64 (not rounded to 1/256)."""
    h, w = gray.shape
    integral = sig._integral(gray)
    phash = _reference_hash_from_block(sig._hash_block(gray, integral if min(h, w) >= sig.HASH_SIDE else None))
    copy = _exact_copy(gray, integral)
    lap = cv2.Laplacian(copy, cv2.CV_64F, ksize=1)[1:-1, 1:-1]
    blur = float(cv2.meanStdDev(lap)[1][0, 0] ** 2) if lap.size else 0.0
    contrast = float(cv2.meanStdDev(copy)[1][0, 0])
    hist = np.bincount((copy + 0.5).astype(np.uint8).ravel(), minlength=256)
    p = hist[hist > 0] / copy.size
    entropy = float(-(p * np.log2(p)).sum()) + 0.0
    return sig.ImageSignals(phash, blur, float(integral[h, w]) / (h * w), contrast, entropy)


def _exact_copy(gray: np.ndarray, integral: np.ndarray | None = None) -> np.ndarray:
    """The signal copy as the exact box average (float64), or the uint8 linear upsampling below its size."""
    h, w = gray.shape
    oh, ow = sig.signal_size(h, w)
    if h < oh or w < ow:
        return cv2.resize(gray, (ow, oh), interpolation=cv2.INTER_LINEAR).astype(np.float64)
    return sig._box_sums(sig._integral(gray) if integral is None else integral, oh, ow) / float(h * w)


def assert_matches_reference(got: sig.ImageSignals, ref: sig.ImageSignals) -> None:
    """The hash and brightness bit for bit; the copy's signals within its 1/256 grey-level rounding."""
    assert (got.phash, got.brightness) == (ref.phash, ref.brightness)
    assert got.blur == pytest.approx(ref.blur, rel=2e-3, abs=2e-3)
    assert got.contrast == pytest.approx(ref.contrast, rel=1e-4, abs=2e-3)
    assert got.entropy == pytest.approx(ref.entropy, abs=0.05)


def _random_images(seed: int, n: int):
    """Noise, smooth noise and flat images of random sizes, tiny to panorama (1..700 px a side)."""
    rng = np.random.default_rng(seed)
    for k in range(n):
        h, w = (int(v) for v in rng.integers(1, 700, 2))
        if k % 7 == 0:
            w = min(5000, w * 12)  # a panorama: the signal copy's aspect cap
        g = rng.integers(0, 256, (h, w), dtype=np.uint8)
        if k % 3 == 1:
            g = cv2.GaussianBlur(g, (0, 0), 1 + k % 5)
        elif k % 11 == 2:
            g = np.full((h, w), int(rng.integers(0, 256)), np.uint8)
        yield g


def test_grid_sums_equal_the_int64_box_sums():
    for gray in _random_images(3, 60):
        h, w = gray.shape
        grids = tuple(g for g in ((32, 32), sig.signal_size(h, w), (7, 13), (h, w)) if g[0] <= h and g[1] <= w)
        total, sums = sig._grid_sums(gray, grids)
        integral = sig._integral(gray)
        assert total == int(gray.sum(dtype=np.int64))
        for (oh, ow), got in zip(grids, sums):
            want = sig._box_sums(integral, oh, ow)
            assert got.dtype == np.float64 and got.shape == (oh, ow)
            assert np.array_equal(got, want.astype(np.float64)), (h, w, oh, ow)


def test_fast_signals_equal_the_reference_implementation():
    n = 0
    for gray in _random_images(5, 120):
        ref, got = _reference_signals(gray), sig.image_signals(gray)
        assert got.phash == sig.perceptual_hash(gray), gray.shape
        assert_matches_reference(got, ref)
        n += min(gray.shape) >= 64
    assert n > 60  # most of them on the fast path


def test_fast_signals_on_real_photos_equal_the_reference(fruits_dir):
    files = sorted(fruits_dir.rglob("*.jpg"))[::97]
    for f in files:
        data = f.read_bytes()
        for gray in (decode_as_manifest(data),  # 100 x 100: a full-size grey decode
                     decode_as_manifest(encode(cv2.resize(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR),
                                                          (500, 375), interpolation=cv2.INTER_CUBIC)))):  # 1/2 decode
            assert_matches_reference(sig.image_signals(gray), _reference_signals(gray))


def test_hash_from_block_equals_the_mean_free_int64_dct():
    rng = np.random.default_rng(9)
    blocks = [rng.integers(0, 255 * 256 + 1, (32, 32)) for _ in range(300)]
    blocks += [np.full((32, 32), 255 * 256), np.zeros((32, 32), np.int64), np.tile(np.arange(32) * 2000, (32, 1))]
    blocks += [np.fliplr(b) + b for b in blocks[:20]]  # mirror-symmetric: many coefficients exactly 0
    for b in blocks:
        b = np.asarray(b, np.int64)
        assert sig._hash_from_block(b) == sig._hash_from_block(b.astype(np.float64)) == _reference_hash_from_block(b)


def test_the_int64_fallback_gives_the_same_values(monkeypatch):
    images = list(_random_images(7, 20))
    fast = [sig.image_signals(g, side) for g in images for side in (64, 96)]
    monkeypatch.setattr(sig, "_float_exact", lambda *args: False)
    slow = [sig.image_signals(g, side) for g in images for side in (64, 96)]
    assert fast == slow
    for g, a in zip(images, fast[::2]):
        assert sig.perceptual_hash(g) == a.phash


def test_float_exact_bound():
    assert sig._float_exact(10_000, 10_000)  # the default decode.max_pixels (1e8)
    assert not sig._float_exact(20_000, 20_000)
    # The bound: 255 * pixels * 2**18 (the hash block in 1/256 units) must stay below 2**53.
    assert 255 * 10_000 * 10_000 * 2**18 < 2**53 <= 255 * 20_000 * 20_000 * 2**18


def test_workspace_is_per_thread():
    from concurrent.futures import ThreadPoolExecutor

    images = list(_random_images(11, 24))
    want = [sig.image_signals(g) for g in images]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            assert list(pool.map(sig.image_signals, images)) == want


def test_signals_row_has_the_signal_columns():
    from imgfeat.metadata.contracts.schema import SIGNAL_COLUMNS

    s = sig.image_signals(blob_scene(120, 160))
    assert s.as_row() == dataclasses.asdict(s)
    assert tuple(s.as_row()) == SIGNAL_COLUMNS


@pytest.mark.parametrize("size", [(100, 100), (500, 375), (1200, 900)])
def test_check_entry_fills_the_signals_of_its_reduced_decode(tmp_path, size):
    """The manifest check's row carries exactly what the documented decode (``reduced_gray_flag``, then
    ``gray_of``) and ``image_signals`` give, for a small JPEG (full grey decode), a real-size one (1/2)
    and a bigger one (1/4); a PNG through ``IMREAD_UNCHANGED``."""
    from imgfeat.metadata.manifest.checks import check_entry
    from imgfeat.metadata.manifest.listing import Entry

    bgr = cv2.resize(cv2.cvtColor(blob_scene(150, 200), cv2.COLOR_GRAY2BGR), size, interpolation=cv2.INTER_CUBIC)
    bgr[..., 2] = np.roll(bgr[..., 2], 5, axis=0)
    for ext in (".jpg", ".png"):
        data = encode(bgr, ext)
        path = tmp_path / f"x{ext}"
        path.write_bytes(data)
        entry = Entry(root=f"file://{tmp_path}", path=f"file://{path}", size=len(data), mtime=0.0)
        row = check_entry(entry, "header", 1 << 26, 1 << 28, ("jpeg", "png"), data, signals=True)
        assert row["status"] == "ok", row
        assert {k: row[k] for k in sig.ImageSignals.__dataclass_fields__} == signals_of(data).as_row()


@pytest.mark.parametrize("h,w", [(100, 100), (64, 64), (300, 300), (96, 144), (144, 96), (64, 1100), (255, 256),
                                 (128, 170), (375, 500)])
def test_signal_copy_is_the_box_average_at_1_256_grey_level(h, w):
    """``_signal_copy``: OpenCV's area resize in float32, rounded to 1/256: within half a step of the exact box
    average (``_box_sums``), and exactly flat for a flat image."""
    for k, gray in enumerate((noise(h, w), smooth_noise(h, w, 3), blob_scene(h, w))):
        got, want = sig._signal_copy(gray, sig.SIGNAL_SIDE), _exact_copy(gray)
        assert got.dtype == np.float32 and got.shape == want.shape == sig.signal_size(h, w)
        assert np.array_equal(got * 256, np.rint(got * 256)), k
        assert np.abs(got - want).max() <= 0.5 / 256 + 1e-4, k
        assert_matches_reference(sig.image_signals(gray), _reference_signals(gray))
    flat = sig._signal_copy(np.full((h, w), 77, np.uint8), sig.SIGNAL_SIDE)
    assert np.array_equal(flat, np.full(flat.shape, 77, np.float32))


def test_block_of_is_the_exact_floor():
    rng = np.random.default_rng(13)
    for scale in (1, 3, 10_000, 47_000, 99_991, 12_000_000, 100_000_000, 130_000_000):
        sums = rng.integers(0, 255 * scale * 1024 + 1, 4096, dtype=np.int64)
        sums[:64] = (np.arange(64) * scale * 4)  # exact multiples: quotients that are integers
        sums[64:128] = np.maximum(np.arange(64) * scale * 4 - 1, 0)  # just below them
        want = (sums * 256) // scale
        assert np.array_equal(sig._block_of(sums.astype(np.float64), float(scale)), want.astype(np.float64)), scale
