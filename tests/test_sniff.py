"""The header sniffer: formats, dimensions, end markers, and no exception on any bytes."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgfeat.metadata.contracts.sniff import parse_header

from helpers import gradient_image

STATUSES = {"ok", "zero_bytes", "not_image", "unsupported_format", "truncated", "undecodable", "too_large"}


def encode(ext: str, img: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("ext, fmt", [(".jpg", "jpeg"), (".png", "png"), (".bmp", "bmp"), (".webp", "webp"), (".tiff", "tiff")])
def test_formats_and_dimensions(ext, fmt):
    data = encode(ext, gradient_image(37, 53))
    info = parse_header(data)
    assert (info.status, info.format, info.width, info.height) == ("ok", fmt, 53, 37)


@pytest.mark.parametrize("ext", [".jpg", ".png", ".bmp", ".webp"])
@pytest.mark.parametrize("frac", [0.2, 0.5, 0.9])
def test_cut_files_are_truncated(ext, frac):
    data = encode(ext, gradient_image(64, 64))
    info = parse_header(data[: int(len(data) * frac)])
    assert info.status in ("truncated", "undecodable"), info


def test_grayscale_png_channels():
    assert parse_header(encode(".png", gradient_image()[..., 0])).channels == 1


def test_text_and_html_are_not_images():
    assert parse_header(b"hello world\n").status == "not_image"
    assert parse_header(b"<!doctype html><html></html>").status == "not_image"
    assert parse_header(b"").status == "zero_bytes"


def test_damaged_signatures_are_undecodable_not_text():
    """A photo whose first bytes were hit is a damaged image of its format, as for PNG, not 'not_image'."""
    jpg = encode(".jpg", gradient_image(32, 32))
    for damaged in (jpg[:2] + b"\x00" + jpg[3:], b"\x00" + jpg[1:]):
        info = parse_header(damaged)
        assert (info.status, info.format) == ("undecodable", "jpeg"), damaged[:12]
        assert "jpeg: damaged signature" in info.detail
    png = encode(".png", gradient_image(8, 8))
    assert (parse_header(b"\x00" + png[1:]).status, parse_header(b"\x00" + png[1:]).format) == ("undecodable", "png")


def test_jpeg_scans_are_counted():
    import io

    from PIL import Image

    assert parse_header(encode(".jpg", gradient_image(32, 32))).scans == 1
    buf = io.BytesIO()
    Image.fromarray(gradient_image(32, 32)).save(buf, "JPEG", progressive=True)
    assert parse_header(buf.getvalue()).scans == 10  # libjpeg's default progression for colour
    assert parse_header(encode(".png", gradient_image(8, 8))).scans is None


def test_format_allowlist():
    data = encode(".bmp", gradient_image())
    assert parse_header(data, formats=("jpeg", "png")).status == "unsupported_format"


@settings(max_examples=400, deadline=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_never_raise(data):
    assert parse_header(data).status in STATUSES


@settings(max_examples=300, deadline=200)
@given(st.data())
def test_mutated_images_never_raise(data):
    base = encode(data.draw(st.sampled_from([".jpg", ".png", ".bmp", ".webp", ".tiff"])), gradient_image(16, 16))
    buf = bytearray(base)
    for _ in range(data.draw(st.integers(1, 8))):
        buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    assert parse_header(bytes(buf[:cut])).status in STATUSES
