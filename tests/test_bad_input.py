"""The bad-input corpus: every kind of hostile or broken file ends as exactly one manifest row with the
right status, and the decode wrapper agrees with the manifest within a bounded time.

``build_corpus`` is also what ``bench/bench_reliability.py`` measures, so the corpus has one definition.
"""
from __future__ import annotations

import io
import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from helpers import gradient_image, write_image

DECODE_SECONDS = 5.0
"""The per-image time bound asserted on every corpus file (a clean 2000x2000 JPEG decodes in ~0.05 s)."""


@dataclass(frozen=True)
class Case:
    """One generated input: where it lies under the corpus root, and the manifest status it must get."""

    rel: str
    status: str
    what: str


def _png_chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload) & 0xFFFFFFFF)


def _png(width: int, height: int, idat: bytes, depth: int = 8, color: int = 0) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def inflate_bomb_png(side: int) -> bytes:
    """A grey PNG of side x side black pixels: about 1/1000 of its decoded size on disk."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    parts = [comp.compress(row * min(256, side - i)) for i in range(0, side, 256)]
    return _png(side, side, b"".join(parts) + comp.flush())


def scan_bomb_jpeg(side: int, scans: int) -> bytes:
    """A progressive JPEG whose last (near-empty) scan is repeated: a decoder passes over every block per scan."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((side, side), 128, np.uint8)).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    last = data.rfind(b"\xff\xda")
    return data[:-2] + data[last:-2] * (scans - 1) + b"\xff\xd9"


def jpeg_12bit(width: int, height: int) -> bytes:
    """A valid 12-bit (SOF1) grey JPEG of flat blocks, written by hand: Pillow and OpenCV write 8-bit only."""
    def seg(marker: int, payload: bytes) -> bytes:
        return b"\xff" + bytes([marker]) + struct.pack(">H", len(payload) + 2) + payload

    ac_values = bytes.fromhex(  # the standard luminance AC table of ITU T.81 Annex K
        "01020300041105122131410613516107227114328191a1082342b1c11552d1f02433627282090a161718191a25262728292a"
        "3435363738393a434445464748494a535455565758595a636465666768696a737475767778797a838485868788898a9293"
        "9495969798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae1e2e3e4e5e6"
        "e7e8e9eaf1f2f3f4f5f6f7f8f9fa")
    blocks = ((width + 7) // 8) * ((height + 7) // 8)
    bits = "001010" * blocks  # per block: DC difference 0 ("00"), then end-of-block ("1010")
    bits += "1" * (-len(bits) % 8)
    scan = bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)).replace(b"\xff", b"\xff\x00")
    return (b"\xff\xd8" + seg(0xDB, b"\x00" + bytes([1] * 64))
            + seg(0xC1, struct.pack(">BHHB", 12, height, width, 1) + b"\x01\x11\x00")
            + seg(0xC4, b"\x00" + bytes([0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]) + bytes(range(12)))
            + seg(0xC4, b"\x10" + bytes([0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7D]) + ac_values)
            + seg(0xDA, b"\x01\x01\x00\x00\x3f\x00") + scan + b"\xff\xd9")


def _pil(img, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def build_corpus(root: Path, pngsuite: Path | None = None) -> list[Case]:
    """Write every bad input of the corpus under ``root/<label>/`` and return the cases, in a fixed order."""
    from PIL import Image

    cases: list[Case] = []

    def put(rel: str, data: bytes, status: str, what: str) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        cases.append(Case(rel, status, what))

    jpeg = (write_image(root / "a" / "good.jpg", gradient_image(120, 160, seed=1))).read_bytes()
    cases.append(Case("a/good.jpg", "ok", "a clean JPEG"))
    png = _pil(Image.fromarray(gradient_image(60, 80, seed=2)), "PNG")
    put("a/empty.jpg", b"", "zero_bytes", "zero-byte file")
    for cut in (3, 10, 100, len(jpeg) // 4, len(jpeg) // 2, len(jpeg) * 9 // 10, len(jpeg) - 2):
        put(f"a/cut-{cut}.jpg", jpeg[:cut], "truncated", f"JPEG cut at byte {cut} of {len(jpeg)}")
    for cut in (20, 40, len(png) // 2, len(png) - 12):
        put(f"a/cut-{cut}.png", png[:cut], "truncated", f"PNG cut at byte {cut} of {len(png)}")
    zeroed = bytearray(jpeg)
    sos = zeroed.find(b"\xff\xda")
    zeroed[sos + 200 : sos + 600] = bytes(400)
    put("a/zeroed-scan.jpg", bytes(zeroed), "undecodable",
        "400 zeroed bytes inside the scan (libjpeg warns \"Corrupt JPEG data\" and returns a garbled picture)")
    gif = _pil(Image.fromarray(gradient_image(30, 40)).convert("P"), "GIF")
    put("a/cut.gif", gif[: len(gif) // 2], "truncated", "GIF cut in half")
    put("a/random.jpg", np.random.default_rng(7).bytes(5000), "not_image", "random bytes named .jpg")
    put("a/notes.txt", "plain text, not an image\n".encode() * 20, "not_image", "text file")
    put("a/page.png", b"<!DOCTYPE html><html><head><title>404</title></head><body>Not Found</body></html>",
        "not_image", "HTML saved as .png")
    cmyk = _pil(Image.fromarray(gradient_image(40, 48, seed=3)).convert("CMYK"), "JPEG", quality=90)
    put("a/cmyk.jpg", cmyk, "ok", "CMYK JPEG")
    put("a/12bit.jpg", jpeg_12bit(32, 24), "undecodable", "12-bit JPEG (OpenCV decodes 8-bit JPEG only)")
    put("a/progressive.jpg", _pil(Image.fromarray(gradient_image(64, 64, seed=4)), "JPEG", progressive=True),
        "ok", "progressive JPEG (libjpeg's 10 scans)")
    gray16 = (np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 21)
    write_image(root / "a" / "gray16.png", gray16, ".png")
    cases.append(Case("a/gray16.png", "ok", "16-bit PNG"))
    frames = [Image.fromarray(gradient_image(32, 32, seed=s)).convert("P") for s in range(3)]
    put("a/animated.gif", _pil(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0),
        "ok", "animated GIF (first frame)")
    put("a/header-bomb.png", _png(50_000, 50_000, zlib.compress(b"\x00" * 100)), "too_large",
        "PNG header claiming 50,000 x 50,000")
    sof = bytearray(jpeg)
    at = sof.find(b"\xff\xc0")
    sof[at + 5 : at + 9] = struct.pack(">HH", 50_000, 50_000)
    put("a/header-bomb.jpg", bytes(sof), "too_large", "JPEG header claiming 50,000 x 50,000")
    put("a/inflate-bomb.png", inflate_bomb_png(12_000), "too_large", "small PNG inflating to 144 Mpx (over the cap)")
    put("a/inflate-ok.png", inflate_bomb_png(4_000), "ok", "small PNG inflating to 16 Mpx (under the cap)")
    put("a/scan-bomb.jpg", scan_bomb_jpeg(512, 3000), "too_large", "progressive JPEG with 3,005 scans (CPU bomb)")
    (root / "a" / "self-loop.jpg").symlink_to("self-loop.jpg")
    cases.append(Case("a/self-loop.jpg", "unreadable", "symlink to itself (ELOOP)"))
    (root / "a" / "dangling.jpg").symlink_to(root / "nowhere.jpg")
    cases.append(Case("a/dangling.jpg", "unreadable", "dangling symlink"))
    (root / "b").mkdir(exist_ok=True)
    (root / "b" / "dir-loop").symlink_to(root)
    cases.append(Case("b/dir-loop", "unreadable", "folder symlink loop"))
    for name in ("name with spaces.jpg", "ünïcödé 画像.jpg", "new\nline.jpg", " leading-space.jpg"):
        write_image(root / "b" / name, gradient_image(30, 30, seed=len(name)))
        cases.append(Case(f"b/{name}", "ok", f"file name {name!r}"))
    write_image(root / "bad..label" / "x.jpg", gradient_image(30, 30, seed=11))
    cases.append(Case("bad..label/x.jpg", "bad_label", "label containing '..'"))
    put("b/same-as-a-good.jpg", jpeg, "duplicate", "duplicate of a/good.jpg in another class")
    if pngsuite is not None:
        first: dict[bytes, str] = {}
        for f in sorted(pngsuite.glob("*.png")):
            data = f.read_bytes()
            # x*: the suite's corrupt files (damaged signature, bad CRCs, invalid colour type or depth, no IDAT)
            status = "undecodable" if f.name.startswith("x") else "ok"
            if status == "ok" and data in first:  # the suite holds byte-identical copies: the first by path wins
                status = "duplicate"
            first.setdefault(data, f.name)
            put(f"pngsuite/{f.name}", data, status, f"PngSuite {f.name}")
    return cases


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, pngsuite_dir) -> tuple[Path, list[Case]]:
    root = tmp_path_factory.mktemp("bad") / "src"
    return root, build_corpus(root, pngsuite_dir)


def test_corpus_covers_the_listed_inputs(corpus) -> None:
    _, cases = corpus
    statuses = {c.status for c in cases}
    assert statuses == {"ok", "zero_bytes", "truncated", "not_image", "undecodable", "too_large", "unreadable",
                        "bad_label", "duplicate"}
    assert sum(c.rel.startswith("pngsuite/") for c in cases) > 150
    assert len({c.rel for c in cases}) == len(cases)


@pytest.mark.spark
def test_every_input_is_one_manifest_row_with_the_right_status(spark, corpus, tmp_path) -> None:
    from imgfeat.metadata.config import load_config
    from imgfeat.metadata.contracts.schema import read_manifest
    from imgfeat.metadata.manifest.job import run_manifest

    root, cases = corpus
    summary = run_manifest(load_config(None, {"manifest": {"rows_per_shard": 50}}), [str(root)], str(tmp_path / "m"))
    rows = read_manifest(str(tmp_path / "m")).to_pylist()
    got = {r["rel_path"]: r for r in rows}
    assert len(rows) == len(got) == len(cases) == summary["total"]  # exactly one row per input
    wrong = {c.rel: (got[c.rel]["status"], got[c.rel]["status_detail"], c.status) for c in cases
             if c.rel in got and got[c.rel]["status"] != c.status}
    assert not wrong and set(got) == {c.rel for c in cases}, wrong or set(got) ^ {c.rel for c in cases}
    for r in rows:
        assert r["status"] == "ok" or r["status_detail"], r
    assert "scans > max 100" in got["a/scan-bomb.jpg"]["status_detail"]
    assert got["b/same-as-a-good.jpg"]["duplicate_of"] == got["a/good.jpg"]["image_id"]


def test_decode_wrapper_agrees_within_the_time_bound(corpus) -> None:
    """Every readable input through ``decode_image``: an image for ``ok``, else DecodeError with the manifest
    status; none takes longer than DECODE_SECONDS."""
    from imgfeat.metadata.config import PreprocessConfig
    from imgfeat.preprocess.decode import DecodeError, decode_image

    root, cases = corpus
    cfg = PreprocessConfig()
    slow = {}
    for c in cases:
        if c.status == "unreadable":
            continue  # a listing outcome: no bytes to decode
        expect = "ok" if c.status in ("bad_label", "duplicate") else c.status  # the bytes are a fine image
        data = (root / c.rel).read_bytes()
        t = time.perf_counter()
        try:
            img = decode_image(data, cfg, target=224)
            status = "ok"
            assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, c
        except DecodeError as exc:
            status = exc.reason
        dt = time.perf_counter() - t
        if dt > DECODE_SECONDS:
            slow[c.rel] = dt
        assert status == expect, (c, status)
    assert not slow, slow


def test_scan_cap_is_configurable() -> None:
    from imgfeat.metadata.config import DecodeConfig, PreprocessConfig, load_config
    from imgfeat.preprocess.decode import DecodeError, decode_image

    data = scan_bomb_jpeg(32, 150)
    pre = PreprocessConfig()
    with pytest.raises(DecodeError, match="155 scans > max 100"):
        decode_image(data, pre)
    assert decode_image(data, pre, limits=DecodeConfig(max_jpeg_scans=155)).shape == (32, 32, 3)
    assert decode_image(data, pre, limits=DecodeConfig(max_jpeg_scans=0)).shape == (32, 32, 3)  # 0: no limit
    with pytest.raises(DecodeError, match="too_large"):
        decode_image(data, pre, limits=DecodeConfig(max_jpeg_scans=154))
    with pytest.raises(ValueError, match="decode.max_jpeg_scans"):
        load_config(None, {"decode": {"max_jpeg_scans": -1}})
    with pytest.raises(ValueError, match="decode.max_jpeg_scans"):  # the old spelling is read as the new key
        load_config(None, {"manifest": {"max_jpeg_scans": -1}})


@pytest.mark.spark
def test_unreadable_permissions(spark, tmp_path) -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root: file permissions do not stop root from reading, so nothing to test")
    from imgfeat.metadata.config import load_config
    from imgfeat.metadata.contracts.schema import read_manifest
    from imgfeat.metadata.manifest.job import run_manifest

    src = tmp_path / "src" / "a"
    write_image(src / "ok.jpg", gradient_image(seed=1))
    secret = write_image(src / "secret.jpg", gradient_image(seed=2))
    secret.chmod(0)
    try:
        run_manifest(load_config(None, {}), [str(tmp_path / "src")], str(tmp_path / "m"))
    finally:
        secret.chmod(0o644)
    got = {r["rel_path"]: r for r in read_manifest(str(tmp_path / "m")).to_pylist()}
    assert got["a/secret.jpg"]["status"] == "unreadable" and "ermission" in got["a/secret.jpg"]["status_detail"]
    assert got["a/ok.jpg"]["status"] == "ok"
