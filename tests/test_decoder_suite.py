"""A fuzzed decoder suite built here: every format the manifest accepts, cut, bit-flipped and with
randomized header fields. The manifest job gives exactly one row per file and never an internal error;
the featurize decoder gives an image or a DecodeError for each."""
from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np
import pytest

from helpers import gradient_image


def _bases(rng: np.random.Generator) -> list[tuple[str, bytes]]:
    """Whole files of every format: colour, grey, alpha, progressive JPEG, 16-bit PNG, a GIF from Pillow."""
    from PIL import Image

    out = []
    for k, (h, w) in enumerate([(37, 53), (120, 80), (9, 300)]):
        rgb = gradient_image(h, w, seed=k)
        noisy = np.clip(rgb.astype(int) + rng.integers(-40, 40, rgb.shape), 0, 255).astype(np.uint8)
        for ext in (".jpg", ".png", ".bmp", ".webp", ".tiff"):
            out.append((ext, cv2.imencode(ext, noisy)[1].tobytes()))
        out.append((".jpg", cv2.imencode(".jpg", noisy, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()))
        out.append((".png", cv2.imencode(".png", cv2.cvtColor(noisy, cv2.COLOR_RGB2BGRA))[1].tobytes()))
        out.append((".png", cv2.imencode(".png", (noisy[..., 0].astype(np.uint16) * 257))[1].tobytes()))
        out.append((".tiff", cv2.imencode(".tiff", noisy[..., 0])[1].tobytes()))
        import io

        buf = io.BytesIO()
        Image.fromarray(noisy).convert("P").save(buf, format="GIF")
        out.append((".gif", buf.getvalue()))
    return out

def _mutants(data: bytes, rnd: random.Random) -> list[bytes]:
    """Cut at random points, a few random bytes flipped (header and body), header bytes set to extremes."""
    n = len(data)
    out = [data[: rnd.randrange(1, n)] for _ in range(2)]
    for _ in range(3):
        b = bytearray(data)
        for _ in range(rnd.randint(1, 6)):
            i = rnd.randrange(min(n, 64)) if rnd.random() < 0.6 else rnd.randrange(n)
            b[i] = rnd.randrange(256)
        out.append(bytes(b))
    b = bytearray(data)
    start = rnd.randrange(2, min(n - 4, 40))
    b[start : start + 4] = rnd.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x80\x00\x00\x00", b"\x7f\xff\xff\xff"])
    out.append(bytes(b))
    return out

@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("suite")
    rng, rnd = np.random.default_rng(7), random.Random(7)
    for k, (ext, data) in enumerate(_bases(rng)):
        folder = root / ext.lstrip(".")
        folder.mkdir(exist_ok=True)
        (folder / f"base-{k}{ext}").write_bytes(data)
        for j, mutant in enumerate(_mutants(data, rnd)):
            (folder / f"mut-{k}-{j}{ext}").write_bytes(mutant)
    return root

def test_decoder_gives_an_image_or_a_reason_for_every_file(suite: Path) -> None:
    from imgfeat.metadata.config import PreprocessConfig
    from imgfeat.preprocess.decode import DECODE_REASONS, DecodeError, decode_image

    cfg = PreprocessConfig()
    files = sorted(p for p in suite.rglob("*") if p.is_file())
    assert len(files) > 200
    for path in files:
        try:
            img = decode_image(path.read_bytes(), cfg, target=256)
            assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        except DecodeError as exc:
            assert exc.reason in DECODE_REASONS, (path, exc)

@pytest.mark.spark
@pytest.mark.parametrize("validation", ["full", "header"])
def test_manifest_gives_one_row_per_fuzzed_file(spark, suite: Path, tmp_path: Path, validation: str) -> None:
    from imgfeat.metadata.config import load_config
    from imgfeat.metadata.contracts.schema import read_manifest
    from imgfeat.metadata.manifest.job import run_manifest

    files = {p.relative_to(suite).as_posix() for p in suite.rglob("*") if p.is_file()}
    summary = run_manifest(load_config(None, {"manifest": {"validation": validation}}), [str(suite)], str(tmp_path / "m"))
    rows = read_manifest(str(tmp_path / "m")).to_pylist()
    assert summary["total"] == len(rows) == len(files)
    assert {r["rel_path"] for r in rows} == files
    assert not [r for r in rows if r["status"] == "internal_error"]
    assert all(r["status"] == "ok" or r["status_detail"] for r in rows)
    assert {r["rel_path"] for r in rows if r["rel_path"].split("/")[1].startswith("base-") and r["status"] != "ok"} == set()
