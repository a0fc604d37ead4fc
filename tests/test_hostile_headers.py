"""Hostile header values and per-file failures: each file still ends as exactly one storable row.

A fuzzed TIFF once claimed a height of 3,036,676,696 and the Arrow row builder failed the whole manifest
job. These tests feed absurd sizes (over 2^31, zero, negative when read as signed), absurd channel
counts, a file name that is not UTF-8 and an exception inside the check through the sniffer, the row
builder and the Spark job.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imgfeat.metadata.contracts.sniff import MAX_SIDE, parse_header
from imgfeat.metadata.manifest.job import CHECKED_SCHEMA
from imgfeat.metadata.manifest.row_guard import to_record_batch

INT32_MAX = 2**31 - 1


def tiff(width: int, height: int, samples: int = 3, long_type: bool = True) -> bytes:
    """A little-endian TIFF whose first IFD declares ``width`` x ``height`` (LONG or SHORT fields)."""
    typ = 4 if long_type else 3

    def entry(tag: int, t: int, value: int) -> bytes:
        if t == 3:
            return struct.pack("<HHIHH", tag, t, 1, value & 0xFFFF, 0)
        return struct.pack("<HHII", tag, t, 1, value & 0xFFFFFFFF)

    entries = [entry(256, typ, width), entry(257, typ, height), entry(273, 4, 8), entry(277, 4, samples)]
    ifd = struct.pack("<H", len(entries)) + b"".join(entries) + b"\0\0\0\0"
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\0" * 200


def png(width: int, height: int) -> bytes:
    """A PNG whose IHDR (valid CRC) declares ``width`` x ``height``, with a tiny IDAT and IEND."""
    def chunk(ctype: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))

    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width & 0xFFFFFFFF, height & 0xFFFFFFFF, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def jpeg(width: int, height: int) -> bytes:
    """A JPEG frame header declaring ``width`` x ``height`` (16-bit fields), a scan and an end marker."""
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height & 0xFFFF, width & 0xFFFF, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    sos = b"\xff\xda" + struct.pack(">H", 12) + b"\x03\x01\x00\x02\x11\x03\x11\x00\x3f\x00"
    return b"\xff\xd8" + sof + sos + b"\x12\x34" * 20 + b"\xff\xd9"


def bmp(width: int, height: int) -> bytes:
    """A BMP whose info header declares signed ``width`` x ``height``."""
    body = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 0, 0, 0, 0) + b"\0" * 64
    return b"BM" + struct.pack("<IHHI", 14 + len(body), 0, 0, 54) + body


HOSTILE = {
    "tiff-height-3036676696.tif": (tiff(100, 3_036_676_696), "too_large"),
    "tiff-width-2pow31.tif": (tiff(2**31, 10), "too_large"),
    "tiff-max-uint32.tif": (tiff(0xFFFFFFFF, 0xFFFFFFFF), "too_large"),
    "tiff-zero.tif": (tiff(0, 0), "undecodable"),
    "tiff-samples-4e9.tif": (tiff(10, 10, samples=4_000_000_000), "undecodable"),
    "png-width-2pow31.png": (png(2**31, 10), "too_large"),
    "png-max-uint32.png": (png(0xFFFFFFFF, 0xFFFFFFFF), "too_large"),
    "png-zero.png": (png(0, 5), "undecodable"),
    "jpeg-zero-height.jpg": (jpeg(640, 0), "undecodable"),
    "jpeg-65535-square.jpg": (jpeg(65535, 65535), "too_large"),  # fits the schema, over the pixel cap
    "bmp-negative-width.bmp": (bmp(-5, 10), "undecodable"),
    "bmp-min-int32.bmp": (bmp(-(2**31), -(2**31)), "undecodable"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_sniffer_keeps_header_values_inside_the_schema(name: str) -> None:
    data, expected = HOSTILE[name]
    info = parse_header(data)
    if name == "jpeg-65535-square.jpg":  # a storable size: the pixel cap, checked after the sniffer, refuses it
        assert (info.status, info.width, info.height) == ("ok", 65535, 65535)
    elif expected == "undecodable":
        assert info.status in ("undecodable", "truncated") and info.detail, info
    else:
        assert info.status == expected and info.detail, info
    for value in (info.width, info.height, info.channels, info.bit_depth):
        assert value is None or 0 <= value <= MAX_SIDE, info


def test_over_int32_side_is_named_in_the_detail() -> None:
    info = parse_header(tiff(100, 3_036_676_696))
    assert (info.status, info.width, info.height) == ("too_large", None, None)
    assert "3036676696" in info.detail


_NAMES = CHECKED_SCHEMA.names
_INT_FIELDS = [f.name for f in CHECKED_SCHEMA if pa.types.is_integer(f.type)]
_INT64_FIELDS = [f.name for f in CHECKED_SCHEMA if pa.types.is_int64(f.type)]  # size_bytes, phash
_huge_ints = st.one_of(st.none(), st.integers(-(2**70), 2**70), st.sampled_from([2**31, 2**32 - 1, -(2**31) - 1, 2**63]))
_texts = st.one_of(st.text(max_size=20), st.just("bad\udcff\udcfename.jpg"))


@st.composite
def raw_rows(draw: st.DrawFn) -> tuple:
    row: dict[str, object] = {n: None for n in _NAMES}
    row.update(image_id="0" * 32, path=draw(_texts) or "x", rel_path=draw(_texts), label=draw(_texts),
               status="ok", status_detail="", _kept=False, _prev=False, mtime=1.0, format="tiff")
    for name in _INT_FIELDS:
        row[name] = draw(_huge_ints)
    return tuple(row[n] for n in _NAMES)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(raw_rows(), min_size=1, max_size=8))
def test_row_builder_never_fails_and_never_drops_a_row(rows: list[tuple]) -> None:
    batch = to_record_batch(rows, CHECKED_SCHEMA)
    assert batch.num_rows == len(rows)
    for before, after in zip(rows, batch.to_pylist()):
        fits = all(v is None or -(2**31) <= v <= INT32_MAX for n, v in zip(_NAMES, before)
                   if n in _INT_FIELDS and n not in _INT64_FIELDS) and all(
            not isinstance(v, str) or "\udcff" not in v for v in before)
        if fits and all(before[_NAMES.index(n)] is None or abs(before[_NAMES.index(n)]) < 2**63 for n in _INT64_FIELDS):
            assert after == dict(zip(_NAMES, before))  # rows that fit are stored as they are
        else:
            assert after["status"] in ("internal_error", "bad_path", "bad_label"), after
            assert after["status_detail"]


def _check_folder(root: Path, monkeypatch: pytest.MonkeyPatch | None = None) -> list[dict]:
    """The check task run in this process (what each Spark task runs) over one folder."""
    from imgfeat.metadata.config import load_config
    from imgfeat.metadata.manifest.discover import LISTED_SCHEMA, listed_row
    from imgfeat.metadata.manifest.job import _make_checker
    from imgfeat.metadata.manifest.listing import Unit, check_source, list_unit

    check = _make_checker(load_config(None, {}))
    src = check_source(str(root))
    listed = [listed_row(e) for e in list_unit(Unit(src, src, True))]
    batch = pa.RecordBatch.from_pylist(listed, schema=LISTED_SCHEMA)
    return [r for out in check(iter([batch])) for r in out.to_pylist()]


def test_an_exception_while_checking_one_file_is_that_files_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    import cv2

    import imgfeat.metadata.manifest.job as job

    from helpers import gradient_image

    (tmp_path / "a").mkdir()
    for name in ("good.png", "boom.png", "also-good.png"):
        cv2.imwrite(str(tmp_path / "a" / name), gradient_image(20, 30))
    real = job.check_entry

    def exploding(entry, *args, **kwargs):
        if entry.path.endswith("boom.png"):
            raise RuntimeError("decoder state corrupted")
        return real(entry, *args, **kwargs)

    monkeypatch.setattr(job, "check_entry", exploding)
    rows = {Path(r["path"]).name: r for r in _check_folder(tmp_path)}
    assert set(rows) == {"good.png", "boom.png", "also-good.png"}
    assert rows["boom.png"]["status"] == "internal_error"
    assert "RuntimeError: decoder state corrupted" in rows["boom.png"]["status_detail"]
    assert rows["good.png"]["status"] == rows["also-good.png"]["status"] == "ok"
    assert sum("boom.png" in r.getMessage() for r in caplog.records) == 1  # logged once, with the path


@pytest.mark.spark
def test_manifest_job_gives_every_hostile_file_one_row(spark, tmp_path: Path) -> None:
    import cv2

    from imgfeat.metadata.config import load_config
    from imgfeat.metadata.contracts.schema import read_manifest
    from imgfeat.metadata.manifest.job import run_manifest

    from helpers import gradient_image

    src = tmp_path / "src" / "hostile"
    src.mkdir(parents=True)
    for name, (data, _) in HOSTILE.items():
        (src / name).write_bytes(data)
    cv2.imwrite(str(src / "fine.png"), gradient_image(40, 50))
    bad_name = os.fsencode(str(src)) + b"/bad\xff\xfename.png"
    with open(bad_name, "wb") as fh:
        fh.write((src / "fine.png").read_bytes()[:-1] + b"\x83")  # not a duplicate of fine.png
    summary = run_manifest(load_config(None, {}), [str(tmp_path / "src")], str(tmp_path / "m"))
    rows = {r["rel_path"]: r for r in read_manifest(str(tmp_path / "m")).to_pylist()}
    assert summary["total"] == len(rows) == len(HOSTILE) + 2
    for name, (_, expected) in HOSTILE.items():
        row = rows[f"hostile/{name}"]
        assert row["status"] == expected or (expected == "undecodable" and row["status"] == "truncated"), row
        assert row["status_detail"]
        for col in ("width", "height", "channels"):
            assert row[col] is None or 0 <= row[col] <= INT32_MAX
    assert rows["hostile/fine.png"]["status"] == "ok"
    odd = rows["hostile/bad\\xff\\xfename.png"]
    assert odd["status"] == "bad_path" and odd["path"].endswith("bad\\xff\\xfename.png")
