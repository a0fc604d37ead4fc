"""Property tests (Hypothesis) on the header sniffer and the decode wrapper with structure-aware inputs:
segment and chunk soups that pass the framing checks and reach the parsers and OpenCV. Every input gives
an image or our own error type within the deadline, never another exception."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgfeat.metadata.config import DecodeConfig, PreprocessConfig
from imgfeat.metadata.contracts.sniff import parse_header
from imgfeat.preprocess.decode import DECODE_REASONS, DecodeError, decode_image

from helpers import gradient_image

SNIFF_STATUSES = {"ok", "zero_bytes", "not_image", "unsupported_format", "truncated", "undecodable", "too_large"}
CFG = PreprocessConfig()
LIMITS = DecodeConfig(max_pixels=4_000_000)  # a small cap keeps any accepted header cheap to decode
FAST = settings(max_examples=200, deadline=1000, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload) & 0xFFFFFFFF)


_PNG_VALID = [(0, 1), (0, 2), (0, 4), (0, 8), (0, 16), (2, 8), (2, 16), (3, 1), (3, 2), (3, 4), (3, 8), (4, 8),
              (4, 16), (6, 8), (6, 16)]
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


@st.composite
def png_soups(draw: st.DrawFn) -> bytes:
    """PNGs built from chunks with valid CRCs, so they pass the framing checks and reach libpng: IHDR with
    mostly valid fields, IDAT holding a zlib stream of about the right size (or random bytes), a palette,
    extra and reordered chunks, IEND or not."""
    width, height = draw(st.integers(1, 200)), draw(st.integers(1, 200))
    color, depth = draw(st.sampled_from(_PNG_VALID)) if draw(st.integers(0, 9)) else (draw(st.integers(0, 7)), 3)
    interlace = draw(st.sampled_from([0, 0, 0, 1, 2]))
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, interlace))
    row = 1 + (width * _PNG_CHANNELS.get(color, 1) * depth + 7) // 8
    pattern = draw(st.binary(min_size=1, max_size=64))
    line = bytes([draw(st.integers(0, 5))]) + (pattern * row)[: row - 1]  # filter type (5 is invalid), pixels
    raw = line * height
    if draw(st.integers(0, 3)) == 0:
        raw = raw[: len(raw) + draw(st.integers(-8, 8))]
    chunks = [_chunk(b"IDAT", zlib.compress(raw))]
    if color == 3 or draw(st.booleans()):
        chunks.insert(0, _chunk(b"PLTE", draw(st.binary(min_size=3, max_size=60))))
    for _ in range(draw(st.integers(0, 3))):
        chunks.append(_chunk(draw(st.sampled_from([b"IDAT", b"tRNS", b"gAMA", b"zzZz"])), draw(st.binary(max_size=200))))
    if draw(st.integers(0, 4)) == 0:
        chunks = draw(st.permutations(chunks))
    tail = [_chunk(b"IEND", b"")] if draw(st.integers(0, 4)) else []
    head = [ihdr] if draw(st.integers(0, 9)) else []
    return b"\x89PNG\r\n\x1a\n" + b"".join(head + chunks + tail)


def _segments(data: bytes) -> list[bytes]:
    """The marker segments of a baseline JPEG up to its first scan header (entropy data excluded)."""
    out, pos = [], 2
    while data[pos + 1] != 0xDA:
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        out.append(data[pos : pos + 2 + length])
        pos += 2 + length
    (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
    return out + [data[pos : pos + 2 + length]]


@st.composite
def jpeg_soups(draw: st.DrawFn) -> bytes:
    """JPEGs from a real file's tables and scan header, with a random frame size, segments dropped, doubled
    or reordered, random entropy-coded data with restart and fill bytes, and an end marker or not."""
    segments = _segments(SEEDS[0])
    sof = next(i for i, seg in enumerate(segments) if seg[1] == 0xC0)
    frame = bytearray(segments[sof])
    frame[5:9] = struct.pack(">HH", draw(st.integers(0, 400)), draw(st.integers(0, 400)))
    if draw(st.integers(0, 4)) == 0:
        frame[1] = draw(st.sampled_from([0xC1, 0xC2, 0xC3, 0xC9]))
    segments[sof] = bytes(frame)
    if draw(st.integers(0, 3)) == 0:
        segments = draw(st.lists(st.sampled_from(segments), min_size=1, max_size=len(segments) + 2))
    data = draw(st.binary(max_size=400)).replace(b"\xff", b"\xff\x00")
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(data)))
        data = data[:at] + bytes([0xFF, draw(st.sampled_from([0xD0, 0xD1, 0xD9, 0xDA, 0xFF]))]) + data[at:]
    end = b"\xff\xd9" if draw(st.integers(0, 4)) else b""
    return b"\xff\xd8" + b"".join(segments) + data + end


def _pil(fmt: str, **kw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(gradient_image(24, 32, seed=9)).save(buf, fmt, **kw)
    return buf.getvalue()


SEEDS = [_pil("JPEG", quality=85), _pil("JPEG", progressive=True), _pil("PNG"), _pil("WEBP"), _pil("BMP"), _pil("TIFF"),
         _pil("GIF")]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A real file with bytes overwritten, runs inserted or deleted, and an optional cut."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["set", "insert", "delete"]))
        if op == "set":
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif len(data) > 8:
            del data[at : at + draw(st.integers(1, 16))]
    return bytes(data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data)


def _decode_or_our_error(data: bytes) -> None:
    try:
        img = decode_image(data, CFG, target=32, limits=LIMITS)
    except DecodeError as exc:
        assert exc.reason in DECODE_REASONS and exc.detail, exc
        return
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.flags.c_contiguous


@FAST
@given(st.one_of(png_soups(), jpeg_soups(), mutated(), st.binary(max_size=2048)))
def test_sniffer_total_on_structured_inputs(data: bytes) -> None:
    info = parse_header(data)
    assert info.status in SNIFF_STATUSES
    assert info.status == "ok" or info.detail
    if info.status == "ok":
        assert info.width and info.height and info.format


@settings(max_examples=150, deadline=2000, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(png_soups(), jpeg_soups(), mutated()))
def test_decode_wrapper_total_on_structured_inputs(data: bytes) -> None:
    _decode_or_our_error(data)


@settings(max_examples=100, deadline=2000, derandomize=True)
@given(st.binary(max_size=4096))
def test_decode_wrapper_total_on_arbitrary_bytes(data: bytes) -> None:
    _decode_or_our_error(data)


@FAST
@given(st.integers(0, 400), st.integers(0, 400))
def test_scan_count_and_cap(extra: int, cap: int) -> None:
    """A progressive JPEG with its last scan repeated: the sniffer counts every scan and refuses exactly
    those over the cap (0 = no cap)."""
    base = SEEDS[1]
    last = base.rfind(b"\xff\xda")
    data = base[:-2] + base[last:-2] * extra + b"\xff\xd9"
    scans = parse_header(data, max_scans=0).scans
    base_scans = parse_header(base).scans
    assert base_scans is not None
    assert scans == base_scans + extra
    info = parse_header(data, max_scans=cap)
    assert info.status == ("too_large" if cap and scans > cap else "ok"), info
