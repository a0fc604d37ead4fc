"""Generate the bundled sample: small procedural photos in class folders, plus broken files on purpose.

Run from the repository root: ``python sample/make_sample.py`` (writes ``sample/shapes/``). The output
is committed, so the demo needs nothing from outside the repository; rerunning gives the same bytes.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

CLASSES = ("circle", "square", "triangle", "stripes", "cross")
SIZE = 96


def draw(kind: str, rng: np.random.Generator) -> np.ndarray:
    """One RGB image of ``kind`` on a noisy coloured background."""
    bg = rng.integers(40, 215, size=3)
    img = np.clip(bg + rng.normal(0, 18, size=(SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    color = tuple(int(c) for c in (255 - bg + rng.integers(-30, 30, size=3)) % 256)
    cx, cy = (int(v) for v in rng.integers(30, SIZE - 30, size=2))
    r = int(rng.integers(14, 26))
    if kind == "circle":
        cv2.circle(img, (cx, cy), r, color, -1, cv2.LINE_AA)
    elif kind == "square":
        cv2.rectangle(img, (cx - r, cy - r), (cx + r, cy + r), color, -1)
    elif kind == "triangle":
        pts = np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], np.int32)
        cv2.fillPoly(img, [pts], color, cv2.LINE_AA)
    elif kind == "stripes":
        step = int(rng.integers(6, 12))
        for x in range(0, SIZE, 2 * step):
            cv2.rectangle(img, (x, 0), (x + step - 1, SIZE), color, -1)
    else:
        t = max(4, r // 3)
        cv2.rectangle(img, (cx - r, cy - t), (cx + r, cy + t), color, -1)
        cv2.rectangle(img, (cx - t, cy - r), (cx + t, cy + r), color, -1)
    return img


def make(out: Path, per_class: int = 24, seed: int = 0) -> dict[str, str]:
    """Write the sample under ``out``; return {relative path: expected manifest status} of the broken ones."""
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        for i in range(per_class):
            path = out / kind / f"{kind}_{i:03d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            ok, buf = cv2.imencode(".jpg", cv2.cvtColor(draw(kind, rng), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
            path.write_bytes(buf.tobytes())
    broken = {
        "circle/empty.jpg": ("zero_bytes", b""),
        "square/notes.jpg": ("not_image", b"this is a text file saved with a .jpg name\n"),
        "cross/cut_in_half.jpg": ("truncated", (out / "cross" / "cross_000.jpg").read_bytes()[:1500]),
        "stripes/stripes_000_copy.jpg": ("duplicate", (out / "stripes" / "stripes_000.jpg").read_bytes()),
        "triangle/page.png": ("not_image", b"<!doctype html><html><body>404 Not Found</body></html>\n"),
    }
    for rel, (_, data) in broken.items():
        (out / rel).write_bytes(data)
    return {rel: status for rel, (status, _) in broken.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(Path(__file__).parent / "shapes"))
    parser.add_argument("--per-class", type=int, default=24)
    args = parser.parse_args()
    print(make(Path(args.out), args.per_class))
