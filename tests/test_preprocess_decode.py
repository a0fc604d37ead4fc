"""decode_image: colour modes, orientation, guards, PngSuite, and agreement with PIL."""
from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageOps

from imgfeat.metadata.config import DecodeConfig, PreprocessConfig
from imgfeat.preprocess import decode as decode_mod
from imgfeat.preprocess.decode import SAFE_MARGIN, DecodeError, decode_image, exif_orientation, reduced_scale

from helpers import gradient_image, write_image


def pil_bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def pil_rgb(data: bytes, transpose: bool = False) -> np.ndarray:
    img: Image.Image = Image.open(io.BytesIO(data))
    if transpose:
        img = ImageOps.exif_transpose(img)
    return np.asarray(img.convert("RGB"))


def mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


CFG = PreprocessConfig()


def check_rgb(out: np.ndarray, h: int, w: int) -> None:
    assert out.dtype == np.uint8 and out.shape == (h, w, 3) and out.flags.c_contiguous


def test_rgb_png_exact_and_channel_order():
    rgb = gradient_image(30, 40)
    rgb[0, 0] = (255, 0, 0)  # pure red must stay in channel 0
    out = decode_image(pil_bytes(Image.fromarray(rgb), "PNG"), CFG)
    check_rgb(out, 30, 40)
    assert np.array_equal(out, rgb)
    assert tuple(out[0, 0]) == (255, 0, 0)


def test_grayscale_png_and_jpeg():
    gray = gradient_image(20, 24)[..., 0]
    out = decode_image(pil_bytes(Image.fromarray(gray, "L"), "PNG"), CFG)
    check_rgb(out, 20, 24)
    assert all(np.array_equal(out[..., c], gray) for c in range(3))
    data = pil_bytes(Image.fromarray(gray, "L"), "JPEG", quality=95)
    out = decode_image(data, CFG)
    check_rgb(out, 20, 24)
    assert mad(out, pil_rgb(data)) < 1.0


def test_rgba_composite_and_drop():
    rgba = np.zeros((8, 10, 4), np.uint8)
    rgba[..., :3] = (200, 100, 0)
    rgba[:, :5, 3] = 0      # transparent half
    rgba[:, 5:, 3] = 255    # opaque half
    rgba[0, 0, 3] = 128
    data = pil_bytes(Image.fromarray(rgba, "RGBA"), "PNG")
    comp = decode_image(data, PreprocessConfig(alpha="composite", background=[10, 20, 30]))
    check_rgb(comp, 8, 10)
    assert tuple(comp[1, 1]) == (10, 20, 30)
    assert tuple(comp[1, 7]) == (200, 100, 0)
    assert np.allclose(comp[0, 0], (np.array([200, 100, 0]) * 128 + np.array([10, 20, 30]) * 127) / 255, atol=1)
    dropped = decode_image(data, PreprocessConfig(alpha="drop"))
    assert np.all(dropped == np.array([200, 100, 0], np.uint8))


def test_gray_alpha_png_composites():
    la = np.zeros((6, 6, 2), np.uint8)
    la[..., 0] = 50
    la[:, 3:, 1] = 255
    out = decode_image(pil_bytes(Image.fromarray(la, "LA"), "PNG"), PreprocessConfig(background=[255, 255, 255]))
    check_rgb(out, 6, 6)
    assert np.all(out[:, :3] == 255) and np.all(out[:, 3:] == 50)


def test_16bit_png_scaled_to_8bit(tmp_path):
    gray16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000 + 7)
    out = decode_image(write_image(tmp_path / "gray16.png", gray16, ".png").read_bytes(), CFG)
    expect = ((gray16.astype(np.uint32) + 128) // 257).astype(np.uint8)
    assert np.array_equal(out[..., 0], expect) and np.array_equal(out[..., 2], expect)
    rgb16 = np.stack([gray16, 65535 - gray16, np.full_like(gray16, 65535)], axis=-1)
    path = write_image(tmp_path / "rgb16.png", rgb16, ".png")
    out = decode_image(path.read_bytes(), CFG)
    assert np.array_equal(out, ((rgb16.astype(np.uint32) + 128) // 257).astype(np.uint8))


def test_palette_png_with_and_without_transparency():
    rgb = gradient_image(16, 16)
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    data = pil_bytes(pal, "PNG")
    assert np.array_equal(decode_image(data, CFG), pil_rgb(data))
    data = pil_bytes(pal, "PNG", transparency=0)
    expect = np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))
    out = decode_image(data, PreprocessConfig(background=[255, 0, 255]))
    transparent = expect[..., 3] == 0
    assert transparent.any()
    assert np.all(out[transparent] == (255, 0, 255))
    assert np.array_equal(out[~transparent], expect[..., :3][~transparent])


def test_cmyk_jpeg():
    rgb = np.zeros((16, 48, 3), np.uint8)
    rgb[:, :16] = (255, 0, 0)
    rgb[:, 16:32] = (0, 255, 0)
    rgb[:, 32:] = (30, 60, 200)
    data = pil_bytes(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data, CFG)
    check_rgb(out, 16, 48)
    assert mad(out, pil_rgb(data)) < 2.0
    assert tuple(int(v) > 200 for v in out[8, 4]) == (True, False, False)


def test_progressive_jpeg_matches_pil():
    rgb = gradient_image(64, 80, seed=3)
    data = pil_bytes(Image.fromarray(rgb), "JPEG", quality=90, progressive=True)
    assert mad(decode_image(data, CFG), pil_rgb(data)) < 1.0


@pytest.mark.parametrize("fmt", ["BMP", "GIF", "TIFF", "WEBP"])
def test_other_formats(fmt):
    rgb = gradient_image(12, 14, seed=5)
    kw = {"lossless": True} if fmt == "WEBP" else {}
    img = Image.fromarray(rgb)
    if fmt == "GIF":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    data = pil_bytes(img, fmt, **kw)
    out = decode_image(data, CFG)
    check_rgb(out, 12, 14)
    assert mad(out, pil_rgb(data)) < 1.0


def _oriented(orientation: int, fmt: str) -> bytes:
    img = np.zeros((30, 50, 3), np.uint8)
    img[:10, :10] = (255, 255, 255)   # a corner marker
    img[20:, 40:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    by_fmt: dict[str, dict[str, Any]] = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}
    kw = by_fmt.get(fmt, {})
    return pil_bytes(Image.fromarray(img), fmt, exif=exif.tobytes(), **kw)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(fmt, orientation):
    data = _oriented(orientation, fmt)
    upright = decode_image(data, CFG)
    expect = pil_rgb(data, transpose=True)
    assert upright.shape == expect.shape
    assert mad(upright, expect) < 2.0
    raw = decode_image(data, PreprocessConfig(exif_orientation=False))
    assert raw.shape == (30, 50, 3)
    assert mad(raw, pil_rgb(data)) < 2.0


def test_exif_orientation_parser():
    exif = Image.Exif()
    exif[0x0112] = 6
    blob = exif.tobytes()
    tiff = blob[6:] if blob.startswith(b"Exif\x00\x00") else blob
    assert exif_orientation(tiff) == 6
    assert exif_orientation(b"Exif\x00\x00" + tiff) == 6
    assert exif_orientation(b"garbage") == 1
    assert exif_orientation(b"MM\x00*\x00\x00\x00\x08\x00\x05") == 1  # cut short


def _png_chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload) & 0xFFFFFFFF)


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


def test_png_bomb_refused_before_decoding(monkeypatch):
    monkeypatch.setattr(decode_mod, "decoder_cv2", lambda *_: pytest.fail("cv2 must not be reached"))
    with pytest.raises(DecodeError) as err:
        decode_image(bomb_png(), CFG)
    assert err.value.reason == "too_large" and "50000x50000" in err.value.detail


def test_jpeg_header_bomb_and_pixel_cap():
    data = bytearray(pil_bytes(Image.fromarray(gradient_image(16, 16)), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60_000, 60_000)
    with pytest.raises(DecodeError) as err:
        decode_image(bytes(data), CFG)
    assert err.value.reason == "too_large"
    small = pil_bytes(Image.fromarray(gradient_image(40, 40)), "PNG")
    with pytest.raises(DecodeError) as err:
        decode_image(small, PreprocessConfig(), limits=DecodeConfig(max_pixels=1000))
    assert err.value.reason == "too_large"


def test_byte_cap():
    data = pil_bytes(Image.fromarray(gradient_image(40, 40)), "PNG")
    with pytest.raises(DecodeError) as err:
        decode_image(data, PreprocessConfig(), limits=DecodeConfig(max_bytes=100))
    assert err.value.reason == "too_large"


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.99])
def test_truncated_jpeg(cut):
    data = pil_bytes(Image.fromarray(gradient_image(64, 64)), "JPEG", quality=90)
    with pytest.raises(DecodeError) as err:
        decode_image(data[: int(len(data) * cut)], CFG)
    assert err.value.reason == "truncated"


def test_truncated_png_and_tiny_files():
    data = pil_bytes(Image.fromarray(gradient_image(32, 32)), "PNG")
    with pytest.raises(DecodeError) as err:
        decode_image(data[: len(data) // 2], CFG)
    assert err.value.reason == "truncated"
    for blob, reason in [(b"", "zero_bytes"), (b"hello world, not an image", "not_image"), (b"\xff\xd8\xff", "truncated")]:
        with pytest.raises(DecodeError) as err:
            decode_image(blob, CFG)
        assert err.value.reason in (reason, "undecodable"), (blob, err.value.reason)


def test_corrupt_scan_data_is_a_reason_not_a_picture():
    """libjpeg decodes past garbage in the entropy-coded data with only a warning on stderr ("Corrupt JPEG
    data: ..."); the decode catches that line and refuses the picture. The next clean decode is clean."""
    clean = pil_bytes(Image.fromarray(gradient_image(96, 128)), "JPEG", quality=90)
    data = bytearray(clean)
    sos = data.find(b"\xff\xda")
    data[sos + 200 : sos + 600] = bytes(400)  # zeroed bytes inside the scan
    with pytest.raises(DecodeError) as err:
        decode_image(bytes(data), CFG)
    assert err.value.reason == "undecodable" and "libjpeg: Corrupt JPEG data" in err.value.detail
    check_rgb(decode_image(clean, CFG), 96, 128)
    data = bytearray(clean)
    for k in range(sos + 20, len(data) - 10, 7):  # garbage all through the scan
        data[k] = 0xFF if k % 2 else 0x00
    with pytest.raises(DecodeError) as err:
        decode_image(bytes(data), CFG)
    assert err.value.reason in ("undecodable", "truncated")


def test_decoder_damage_reads_libjpeg_lines():
    from imgfeat.metadata.contracts.cv2_env import decoder_damage

    assert decoder_damage("") is None
    assert decoder_damage("libpng warning: iCCP: known incorrect sRGB profile\n") is None
    assert decoder_damage("Corrupt JPEG data: bad ICC marker\n") is None
    assert decoder_damage("Corrupt JPEG data: 46 extraneous bytes before marker 0xd9\n") == (
        "undecodable", "libjpeg: Corrupt JPEG data: 46 extraneous bytes before marker 0xd9")
    assert decoder_damage("Warning: unknown JFIF revision number 2.01\nPremature end of JPEG file\n") == (
        "truncated", "libjpeg: Premature end of JPEG file")


def test_format_allowlist():
    data = pil_bytes(Image.fromarray(gradient_image(8, 8)), "BMP")
    with pytest.raises(DecodeError) as err:
        decode_image(data, PreprocessConfig(), limits=DecodeConfig(formats=["jpeg", "png"]))
    assert err.value.reason == "unsupported_format"


def test_decode_error_pickles():
    import pickle

    err = pickle.loads(pickle.dumps(DecodeError("truncated", "cut short")))
    assert (err.reason, err.detail) == ("truncated", "cut short")


def test_reduced_scale_by_mode():
    # fast: the largest scale that keeps the shorter side >= the target (the old default).
    assert reduced_scale(1000, 800, 224, "fast") == 2
    assert reduced_scale(4000, 3000, 224, "fast") == 8
    assert reduced_scale(1000, 800, 500, "fast") == 1
    # safe: the decoded shorter side stays >= SAFE_MARGIN x target, and the scale divides both sides.
    t = 256
    side = SAFE_MARGIN * t
    assert reduced_scale(2 * side, 2 * side + 8, t) == 2
    assert reduced_scale(2 * side - 2, 4 * side, t) == 1  # one scale step short of the margin
    assert reduced_scale(8 * side, 9 * side, t) == 8
    assert reduced_scale(8 * side + 4, 9 * side, t) == 4  # 4 divides both sides, 8 does not
    assert reduced_scale(8 * side + 2, 9 * side, t) == 2
    assert reduced_scale(8 * side + 1, 9 * side, t) == 1  # a ragged side: a reduced decode shifts the grid
    assert reduced_scale(4000, 3000, 224, "safe") == reduced_scale(4000, 3000, 224) < 8
    assert reduced_scale(8 * side, 8 * side, t, "off") == 1
    assert reduced_scale(100, 100, None, "fast") == 1
    with pytest.raises(ValueError, match=r"preprocess\.reduced_decode"):
        reduced_scale(1000, 1000, 100, "yes")


def test_reduced_decode_modes():
    import cv2

    rgb = gradient_image(480, 640, seed=2)
    data = pil_bytes(Image.fromarray(rgb), "JPEG", quality=95)
    full = decode_image(data, PreprocessConfig(reduced_decode="off"), target=60)
    check_rgb(full, 480, 640)
    fast = decode_image(data, PreprocessConfig(reduced_decode="fast"), target=100)
    check_rgb(fast, 120, 160)  # 1/4 scale: 120 >= 100
    assert mad(fast, cv2.resize(full, (160, 120), interpolation=cv2.INTER_AREA)) < 3.0
    assert SAFE_MARGIN * 60 * 2 <= 480 < SAFE_MARGIN * 60 * 4
    safe = decode_image(data, CFG, target=60)
    check_rgb(safe, 240, 320)  # 1/2 scale: 240 >= SAFE_MARGIN x 60, 1/4 would not be
    assert mad(safe, cv2.resize(full, (320, 240), interpolation=cv2.INTER_AREA)) < 3.0
    check_rgb(decode_image(data, CFG, target=100), 480, 640)  # 1/2 scale would be under the margin


def test_reduced_decode_config_values(tmp_path):
    from imgfeat.metadata.config import load_config

    assert PreprocessConfig().reduced_decode == "safe"
    # legacy booleans: accepted at run time (``__post_init__`` maps them), outside the declared ``str``
    assert PreprocessConfig(reduced_decode=True).reduced_decode == "safe"  # type: ignore[arg-type]
    assert PreprocessConfig(reduced_decode=False).reduced_decode == "off"  # type: ignore[arg-type]
    for text, want in (("true", "safe"), ("false", "off"), ('"fast"', "fast"), ('"off"', "off"), ('"safe"', "safe")):
        path = tmp_path / "c.toml"
        path.write_text(f"[preprocess]\nreduced_decode = {text}\n")
        assert load_config(path).preprocess.reduced_decode == want, text
    for text in ('"yes"', '"Safe"', "1"):
        path.write_text(f"[preprocess]\nreduced_decode = {text}\n")
        with pytest.raises(ValueError, match=r"preprocess\.reduced_decode"):
            load_config(path)
    with pytest.raises(ValueError, match=r"preprocess\.reduced_decode"):
        PreprocessConfig(reduced_decode="quick").validate()


def test_baseline_jpegs_match_pil(fruits_dir):
    files = sorted(fruits_dir.glob("Training/*/*.jpg"))[::400]
    assert files
    for f in files:
        data = f.read_bytes()
        assert mad(decode_image(data, CFG), pil_rgb(data)) < 1.0, f


def test_pngsuite(pngsuite_dir):
    files = sorted(pngsuite_dir.glob("*.png"))
    assert len(files) > 150
    decoded = {}
    for f in files:
        data = f.read_bytes()
        if f.name.startswith("x"):
            with pytest.raises(DecodeError) as err:
                decode_image(data, CFG)
            assert err.value.reason in ("undecodable", "truncated", "not_image", "unsupported_format"), f.name
            continue
        out = decode_image(data, CFG)
        w, h = Image.open(f).size
        check_rgb(out, h, w)
        decoded[f.name] = out
    # Interlacing never changes pixels; 8-bit files without alpha match PIL exactly.
    for name, out in decoded.items():
        if name.startswith("basi"):
            assert np.array_equal(out, decoded["basn" + name[4:]]), name
        if name.startswith("basn") and name[5] in "023" and name.endswith("08.png"):
            assert np.array_equal(out, np.asarray(Image.open(pngsuite_dir / name).convert("RGB"))), name


def _mutation_strategy():
    from hypothesis import strategies as st

    return st.lists(st.tuples(st.floats(0, 1, allow_nan=False), st.integers(0, 255)), min_size=1, max_size=8)


_SEEDS = {
    "jpeg": pil_bytes(Image.fromarray(gradient_image(24, 32)), "JPEG", quality=80),
    "png": pil_bytes(Image.fromarray(gradient_image(24, 32)), "PNG"),
    "webp": pil_bytes(Image.fromarray(gradient_image(24, 32)), "WEBP"),
    "gif": pil_bytes(Image.fromarray(gradient_image(24, 32)).convert("P"), "GIF"),
}


def test_mutated_files_never_raise_anything_but_decode_error():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=150, deadline=None, derandomize=True)
    @given(st.sampled_from(sorted(_SEEDS)), _mutation_strategy(), st.floats(0.05, 1.0))
    def run(fmt, edits, keep):
        buf = bytearray(_SEEDS[fmt])
        for where, value in edits:
            buf[min(len(buf) - 1, int(where * len(buf)))] = value
        data = bytes(buf[: max(1, int(len(buf) * keep))])
        try:
            out = decode_image(data, CFG)
        except DecodeError as exc:
            assert exc.reason in ("unreadable", "not_image", "unsupported_format", "truncated", "undecodable",
                                  "too_large", "zero_bytes")
        else:
            assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3

    run()
