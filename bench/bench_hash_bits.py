"""How many bits the perceptual hash sets, on real photos and on synthetic images: the basis of
``near_duplicates.MIN_HASH_BITS``.

    .venv/bin/python bench/bench_hash_bits.py [--fruit-step 5] [--realsize 400] [--write]

The DCT hash sets the bits of the 63 AC coefficients strictly above their median, so with distinct
coefficients exactly 31 are set; fewer means coefficients tied at the median (mostly zeros: an image with
little 2-D structure). Counts the set bits of the hash of every ``--fruit-step``-th Fruits-360 photo
(100x100), of ``--realsize`` real-size photos (``sample.realsize``, sides 130-2,400 px, seed 3) and of every
PngSuite image that decodes. ``--write`` writes bench/RESULTS-hash-bits.md; otherwise the markdown goes to
stdout.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_manifest import FRUITS  # noqa: E402
from bench.bench_reliability import PNGSUITE  # noqa: E402


def bit_counts(paths: list[Path], flag: int) -> Counter[int]:
    """Set bits of the hash of each image of ``paths`` that decodes (grey as ``image_signals`` makes it)."""
    import numpy as np

    from imgfeat.metadata.contracts.cv2_env import decoder_cv2, quiet_decoder
    from imgfeat.metadata.manifest.image_signals import gray_of, hash_to_unsigned, perceptual_hash

    cv2 = decoder_cv2()
    out: Counter[int] = Counter()
    for p in paths:
        with quiet_decoder():
            img = cv2.imdecode(np.fromfile(str(p), np.uint8), flag)
        if img is None:
            continue
        try:
            gray = gray_of(img)
        except ValueError:
            continue
        out[hash_to_unsigned(perceptual_hash(gray)).bit_count()] += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fruit-step", type=int, default=5)
    ap.add_argument("--realsize", type=int, default=400)
    ap.add_argument("--write", action="store_true", help="write bench/RESULTS-hash-bits.md")
    args = ap.parse_args()
    if not FRUITS.exists() or not PNGSUITE.is_dir():
        sys.exit(f"needs the Fruits-360 photos at {FRUITS} and PngSuite at {PNGSUITE}")
    from imgfeat.metadata.manifest.near_duplicates import MIN_HASH_BITS

    from sample.realsize import make_realsize_photos

    with tempfile.TemporaryDirectory(prefix="imgfeat-hash-bits-") as tmp:
        real = [Path(p) for p in make_realsize_photos(FRUITS, tmp, args.realsize, min_side=130, max_side=2400, seed=3)]
        sets = {
            f"Fruits-360 photos (every {args.fruit_step}th)": bit_counts(sorted(FRUITS.rglob("*.jpg"))[::args.fruit_step], 0),
            "real-size photos (sample.realsize)": bit_counts(real, 0),
            "PngSuite images": bit_counts(sorted(PNGSUITE.rglob("*.png")), -1),
        }
    lines = ["# Bits set by the perceptual hash", "", f"## {time.strftime('%Y-%m-%d %H:%M')}", "",
             "Command:", "", f"    .venv/bin/python bench/bench_hash_bits.py --fruit-step {args.fruit_step} "
             f"--realsize {args.realsize} --write", "",
             f"Images per number of set bits; hashes under `MIN_HASH_BITS` = {MIN_HASH_BITS} are left out of the "
             "near-duplicate search.", "",
             "| images | count | 0-15 | 16-23 | 24-29 | 30 | 31 | 32+ | under the limit |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, c in sets.items():
        def span(lo: int, hi: int, c: Counter[int] = c) -> int:
            return sum(n for bits, n in c.items() if lo <= bits <= hi)
        lines.append(f"| {name} | {sum(c.values())} | {span(0, 15)} | {span(16, 23)} | {span(24, 29)} | {span(30, 30)} | "
                     f"{span(31, 31)} | {span(32, 64)} | {span(0, MIN_HASH_BITS - 1)} |")
    text = "\n".join(lines) + "\n"
    if args.write:
        (REPO / "bench" / "RESULTS-hash-bits.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
