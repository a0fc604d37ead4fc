"""Near-duplicate detection and quality signals on real photos: ``metadata/manifest/image_signals.py``.

    .venv/bin/python bench/bench_near_duplicates.py [--bases 1500] [--realsize 200] [--variants 300] [--seed 0]

* Distinct photos ("bases"): ``--bases`` Fruits-360 photos (../shared, 100x100), each cropped to a random
  aspect (1:1, 4:3 or 3:2) and upscaled (cubic) so its shorter side is 400-800 px, JPEG quality 90; plus
  ``--realsize`` real-size photos (400-2,000 px) made by ``sample.realsize`` from other Fruits-360
  photos (sharp mosaics, single upscaled photos, crops of scikit-learn's two bundled photos).
* Planted near-duplicates: for ``--variants`` of the bases (drawn at random), one file of each kind:
  ``jpeg_q50`` (re-encoded at quality 50), ``resize`` (50-90 %, area), ``crop`` (90-95 % of each side,
  random offset), ``brightness`` (x0.9 or x1.1), ``text`` (a caption drawn with ``cv2.putText``, about 4 %
  of the height), ``png`` (the same pixels as a lossless PNG). All but ``jpeg_q50`` and ``png`` are
  stored as JPEG quality 90.
* Our hash: each file decoded exactly as the manifest check will: header from ``contracts.sniff``,
  ``cv2.imdecode`` with ``reduced_gray_flag``, ``gray_of``, ``image_signals``; one process, cv2 at 1 thread.
* Peer: ``imagededup`` PHash (``encode_image(image_file=...)``: PIL decode, LANCZOS to 32x32, grey, DCT,
  8x8, median of the 63 AC coefficients, bit = coefficient >= median, DC bit included), one process.
  Both use the same rule: two files are a pair when their Hamming distance is <= D (imagededup's
  ``max_distance_threshold`` semantics); groups are the connected components of those pairs.
* The reduced decode's floor: signals and decode time of the `realsize` photos at ``min_side`` 64, 128, 256
  against a full decode (how ``MIN_DECODE_SIDE`` was chosen).
* Quality signals: distributions over the distinct photos, and how often degraded copies of 200 of them
  (blurred, dark, over-exposed, low contrast, blank; each stored as JPEG q90 and decoded as above) and the
  real photos themselves fall outside the proposed thresholds.

Needs ../shared (the Fruits-360 photos); ``imagededup`` is optional (``pip install imagededup``).
Writes the markdown to bench/RESULTS-near-duplicates.md (``--results`` to change).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("IMGFEAT_SHARED", REPO.parent / "shared"))
FRUITS = SHARED / "data" / "fruits360-100"

import numpy as np  # noqa: E402

from imgfeat.metadata.contracts.cv2_env import import_cv2  # noqa: E402
from imgfeat.metadata.contracts.sniff import parse_header  # noqa: E402
from imgfeat.metadata.manifest import image_signals as sig  # noqa: E402

KINDS = ("jpeg_q50", "resize", "crop", "brightness", "text", "png")
DISTANCES = (2, 4, 6, 8, 10, 12, 14)
PERCENTILES = (0.1, 1, 5, 25, 50, 75, 95, 99, 99.9)
SIGNALS = ("blur", "brightness", "contrast", "entropy")

cv2 = import_cv2(threads=1)


# --------------------------------------------------------------------------------------------- data


def _encode(img: np.ndarray, ext: str = ".jpg", quality: int = 90) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext == ".jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    ok, buf = cv2.imencode(ext, img, params)
    if not ok:
        raise RuntimeError(f"could not encode {ext}")
    return buf.tobytes()


def fruit_files() -> list[Path]:
    files = sorted(FRUITS.rglob("*.jpg"))
    seen: set[str] = set()
    out = []
    for f in files:  # distinct bytes only (none repeat today)
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            out.append(f)
    return out


def make_fruit_base(src: Path, rng: np.random.Generator) -> np.ndarray:
    """A Fruits-360 photo cropped to a common aspect and upscaled to a real-photo size (BGR)."""
    img = cv2.imdecode(np.fromfile(str(src), np.uint8), cv2.IMREAD_COLOR)
    h, w = img.shape[:2]
    aspect = (1.0, 4 / 3, 3 / 2)[int(rng.integers(3))]
    ch = int(round(h / aspect))
    top = int(rng.integers(h - ch + 1))
    img = img[top : top + ch]
    if rng.random() < 0.35:
        img = np.ascontiguousarray(np.rot90(img))  # portrait
    short = int(rng.integers(400, 801))
    f = short / min(img.shape[:2])
    size = (int(round(img.shape[1] * f)), int(round(img.shape[0] * f)))
    return cv2.resize(img, size, interpolation=cv2.INTER_CUBIC)


def make_variant(kind: str, img: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str, str]:
    """(bytes, extension, detail) of one planted near-duplicate of ``img`` (BGR uint8)."""
    h, w = img.shape[:2]
    if kind == "jpeg_q50":
        return _encode(img, quality=50), ".jpg", "q50"
    if kind == "png":
        return _encode(img, ".png"), ".png", "lossless"
    if kind == "resize":
        f = float(rng.uniform(0.5, 0.9))
        out = cv2.resize(img, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
        return _encode(out), ".jpg", f"{f:.2f}"
    if kind == "crop":
        f = float(rng.uniform(0.90, 0.95))
        ch, cw = round(h * f), round(w * f)
        top, left = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
        return _encode(np.ascontiguousarray(img[top : top + ch, left : left + cw])), ".jpg", f"{f:.2f}"
    if kind == "brightness":
        f = 1.1 if rng.random() < 0.5 else 0.9
        out = np.clip(img.astype(np.float32) * f + 0.5, 0, 255).astype(np.uint8)
        return _encode(out), ".jpg", f"x{f}"
    if kind == "text":
        out = img.copy()
        text = "(c) 2024 holiday photo"
        scale = 0.04 * h / 22.0  # Hershey simplex is about 22 px tall at scale 1
        thick = max(1, round(scale * 2))
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        org = (int(0.03 * w), int(h - 0.04 * h))
        cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick + 2, cv2.LINE_AA)
        cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA)
        return _encode(out), ".jpg", f"{tw}x{th}px"
    raise ValueError(kind)


def build(work: Path, n_bases: int, n_real: int, n_variants: int, seed: int) -> list[dict[str, Any]]:
    """Write the files; one record per file: path, family (the base it derives from), kind, origin, label."""
    from sample.realsize import make_realsize_photos

    rng = np.random.default_rng(seed)
    files = fruit_files()
    order = rng.permutation(len(files))
    if n_bases + 400 > len(files):
        raise SystemExit(f"need {n_bases + 400} Fruits-360 photos, found {len(files)}")
    base_src = [files[i] for i in order[:n_bases]]
    pool = work / "realsize_src"  # the realsize photos are made from photos that are not bases
    pool.mkdir(parents=True)
    for i in order[n_bases : n_bases + 400]:
        (pool / f"{files[i].parent.parent.name}_{files[i].parent.name}_{files[i].name}").symlink_to(files[i])
    records: list[dict[str, Any]] = []
    (work / "files").mkdir()
    pixels: list[np.ndarray] = []
    for i, src in enumerate(base_src):
        img = make_fruit_base(src, rng)
        path = work / "files" / f"b{i:05d}.jpg"
        path.write_bytes(_encode(img))
        records.append({"path": str(path), "family": i, "kind": "base", "origin": "fruit",
                        "label": src.parent.name, "detail": f"{src.parent.parent.name}/{src.parent.name}/{src.name}"})
        pixels.append(img)
    real = make_realsize_photos(pool, work / "realsize", n_real, min_side=400, max_side=2000, seed=seed)
    for real_path in real:
        fam = len(records)
        kind = Path(real_path).stem.split("_")[1]
        records.append({"path": real_path, "family": fam, "kind": "base", "origin": "realsize", "label": kind,
                        "detail": Path(real_path).name})
        pixels.append(cv2.imdecode(np.fromfile(real_path, np.uint8), cv2.IMREAD_COLOR))
    planted = sorted(rng.choice(len(records), size=min(n_variants, len(records)), replace=False).tolist())
    for fam in planted:
        base = records[fam]
        for kind in KINDS:
            data, ext, detail = make_variant(kind, pixels[fam], rng)
            path = work / "files" / f"v{fam:05d}_{kind}{ext}"
            path.write_bytes(data)
            records.append({"path": str(path), "family": fam, "kind": kind, "origin": base["origin"],
                            "label": base["label"], "detail": detail})
    return records


# --------------------------------------------------------------------------------------------- hashing


def ours(records: list[dict[str, Any]]) -> tuple[np.ndarray, list[sig.ImageSignals], dict[str, Any]]:
    """Every file as the manifest check will do it; (hashes as uint64, signals, timings)."""
    hashes, signals = [], []
    t_decode, t_sig, fmts, pixels = [], [], [], []
    t0, c0 = time.perf_counter(), time.process_time()
    for r in records:
        data = Path(r["path"]).read_bytes()
        info = parse_header(data)
        t1 = time.perf_counter()
        img = cv2.imdecode(np.frombuffer(data, np.uint8), sig.reduced_gray_flag(info.width, info.height, info.format))
        t2 = time.perf_counter()
        s = sig.image_signals(sig.gray_of(img))
        t3 = time.perf_counter()
        t_decode.append(t2 - t1)
        t_sig.append(t3 - t2)
        fmts.append(info.format)
        pixels.append(img.shape[0] * img.shape[1])
        hashes.append(s.phash)
        signals.append(s)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = len(records)
    jpeg = np.array([f == "jpeg" for f in fmts])
    ts = np.array(t_sig) * 1e3
    return (np.array(hashes, dtype=np.int64).view(np.uint64), signals,
            {"total_s": total, "cpu_s": cpu, "per_image_ms": 1e3 * total / n, "cpu_ms": 1e3 * cpu / n,
             "decode_ms": 1e3 * float(np.mean(t_decode)), "signals_ms": float(ts.mean()),
             "signals_jpeg_ms": float(ts[jpeg].mean()), "signals_jpeg_median_ms": float(np.median(ts[jpeg])),
             "signals_png_ms": float(ts[~jpeg].mean()) if (~jpeg).any() else float("nan"),
             "jpeg_decoded_px": int(np.median(np.array(pixels)[jpeg])),
             "png_decoded_px": int(np.median(np.array(pixels)[~jpeg])) if (~jpeg).any() else 0,
             "images_per_s": n / total})


def signals_microbench() -> dict[str, float]:
    """CPU ms of gray_of + image_signals on fixed grey frames (best of repeats, so other jobs count less):
    375x500 is what a 1/8 decode of a 3000x4000 JPEG gives; 128x171 the smallest reduced decode."""
    import timeit

    rng = np.random.default_rng(0)
    out = {}
    for h, w in ((375, 500), (128, 171), (600, 800)):
        g = cv2.GaussianBlur(rng.integers(0, 256, (h, w), dtype=np.uint8), (0, 0), 1.5)

        def run(g: np.ndarray = g) -> None:
            sig.image_signals(sig.gray_of(g))

        run()
        best = min(timeit.repeat(run, number=200, repeat=7, timer=time.process_time))
        out[f"{h}x{w}"] = 1e3 * best / 200
    return out


def current_check_decode_ms(records: list[dict[str, Any]]) -> float:
    """The decode the manifest check does today (JPEG: REDUCED_GRAYSCALE_8, others UNCHANGED), ms/file."""
    t = 0.0
    for r in records:
        data = Path(r["path"]).read_bytes()
        flag = cv2.IMREAD_REDUCED_GRAYSCALE_8 if parse_header(data).format == "jpeg" else cv2.IMREAD_UNCHANGED
        t0 = time.perf_counter()
        cv2.imdecode(np.frombuffer(data, np.uint8), flag)
        t += time.perf_counter() - t0
    return 1e3 * t / len(records)


def peer(records: list[dict[str, Any]]) -> tuple[np.ndarray | None, dict[str, Any]]:
    try:
        import imagededup
        from imagededup.methods import PHash
    except ImportError as exc:
        return None, {"error": f"imagededup is not installed ({exc})"}
    import logging

    logging.getLogger("imagededup").setLevel(logging.WARNING)
    hasher = PHash(verbose=False)
    out = []
    t0, c0 = time.perf_counter(), time.process_time()
    for r in records:
        out.append(int(hasher.encode_image(image_file=r["path"]), 16))
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    return (np.array(out, dtype=np.uint64),
            {"version": getattr(imagededup, "__version__", "?"), "total_s": total, "cpu_ms": 1e3 * cpu / len(records),
             "per_image_ms": 1e3 * total / len(records), "images_per_s": len(records) / total})


# --------------------------------------------------------------------------------------------- evaluation


def distances(hashes: np.ndarray) -> np.ndarray:
    return np.bitwise_count(hashes[:, None] ^ hashes[None, :]).astype(np.uint8)


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected components (union-find) of the pairs (i, j): a label per file."""
    parent = np.arange(n)

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for a, b in zip(i.tolist(), j.tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(x) for x in range(n)])


def _frame(detail: str) -> tuple[str, str, int] | None:
    """(class, video, frame) of a Fruits-360 file name such as ``Training/kiwi/r_131_100.jpg``."""
    m = re.fullmatch(r"(?:Training|Test)/(\w+)/(r_)?(\d+)_100\.jpg", detail)
    return (m.group(1), m.group(2) or "", int(m.group(3))) if m else None


FALSE_KINDS = ("same_class_near_frames", "same_class", "fruit_other_class", "single_fruit", "sklearn_crops", "other")
FALSE_KIND_TITLES = {
    "same_class_near_frames": "same fruit class, frames <= 10 apart",
    "same_class": "same fruit class, other frames",
    "fruit_other_class": "other fruit class",
    "single_fruit": "realsize `single` (one fruit on white) with a fruit photo",
    "sklearn_crops": "two realsize crops of one scikit-learn photo",
    "other": "other",
}


def false_pair_kind(ra: dict[str, Any], rb: dict[str, Any]) -> str:
    """What two different distinct photos are, for the false-pair breakdown (FALSE_KINDS)."""
    if ra["origin"] == rb["origin"] == "fruit":
        if ra["label"] != rb["label"]:
            return "fruit_other_class"
        fa, fb = _frame(ra["detail"]), _frame(rb["detail"])
        if fa and fb and fa[1] == fb[1] and abs(fa[2] - fb[2]) <= 10:
            return "same_class_near_frames"  # one video of one fruit rotating: a few degrees apart
        return "same_class"
    labels = {ra["label"] if ra["origin"] == "realsize" else "fruit", rb["label"] if rb["origin"] == "realsize" else "fruit"}
    if labels in ({"single", "fruit"}, {"single"}):
        return "single_fruit"
    if ra["origin"] == rb["origin"] == "realsize" and ra["label"] == rb["label"] == "photo":
        return "sklearn_crops"  # realsize "photo" files are crops of scikit-learn's two photos
    return "other"


def evaluate(records: list[dict[str, Any]], dist: np.ndarray) -> list[dict[str, Any]]:
    n = len(records)
    family = np.array([r["family"] for r in records])
    kinds = np.array([r["kind"] for r in records])
    base_of = {r["family"]: k for k, r in enumerate(records) if r["kind"] == "base"}
    iu, ju = np.triu_indices(n, 1)
    d = dist[iu, ju]
    rows = []
    for dmax in DISTANCES:
        sel = d <= dmax
        i, j = iu[sel], ju[sel]
        true = family[i] == family[j]
        fk = Counter(false_pair_kind(records[a], records[b]) for a, b in zip(i[~true].tolist(), j[~true].tolist()))
        comp = components(n, i, j)
        same_class = fk.get("same_class", 0) + fk.get("same_class_near_frames", 0)
        row: dict[str, Any] = {"D": dmax, "pairs": int(sel.sum()), "true_pairs": int(true.sum()),
                               "pair_precision": float(true.mean()) if sel.any() else 1.0, "false_pairs": fk,
                               "pair_precision_xc": int(true.sum()) / max(1, int(sel.sum()) - same_class),
                               "pair_precision_xcc": int(true.sum()) / max(1, int(sel.sum()) - same_class
                                                                           - fk.get("sklearn_crops", 0))}
        for kind in KINDS:
            idx = np.nonzero(kinds == kind)[0]
            bases = np.array([base_of[family[k]] for k in idx])
            row[f"recall_{kind}"] = float((comp[idx] == comp[bases]).mean()) if len(idx) else float("nan")
            row[f"pair_recall_{kind}"] = float((dist[idx, bases] <= dmax).mean()) if len(idx) else float("nan")
        # group precision: among all pairs of files in one group, the share from one family
        by_comp = Counter(comp.tolist())
        by_comp_fam = Counter(zip(comp.tolist(), family.tolist()))
        grouped = sum(c * (c - 1) // 2 for c in by_comp.values())
        same = sum(c * (c - 1) // 2 for c in by_comp_fam.values())
        row["group_precision"] = same / grouped if grouped else 1.0
        row["largest_group"] = max(by_comp.values())
        fams_in: dict[int, int] = {}
        for c, f in by_comp_fam:
            fams_in[c] = fams_in.get(c, 0) + 1
        base_idx = np.array(sorted(base_of.values()))
        mixed = {b: fams_in[comp[b]] > 1 for b in base_idx.tolist()}
        row["false_group_rate"] = float(np.mean(list(mixed.values())))
        for origin in ("fruit", "realsize"):
            of = [m for b, m in mixed.items() if records[b]["origin"] == origin]
            row[f"false_group_rate_{origin}"] = float(np.mean(of)) if of else 0.0
        rows.append(row)
    return rows


def variant_distance_stats(records: list[dict[str, Any]], dist: np.ndarray) -> dict[str, list[int]]:
    base_of = {r["family"]: k for k, r in enumerate(records) if r["kind"] == "base"}
    out: dict[str, list[int]] = {}
    for kind in KINDS:
        idx = [k for k, r in enumerate(records) if r["kind"] == kind]
        dd = [int(dist[k, base_of[records[k]["family"]]]) for k in idx]
        out[kind] = [int(np.percentile(dd, p)) for p in (50, 90, 95)] + [max(dd)] if dd else []
    # nearest other distinct photo (any file of another family), per origin of the distinct photo
    family = np.array([r["family"] for r in records])
    for origin in ("fruit", "realsize"):
        nearest = [int(dist[k][family != family[k]].min()) for k in sorted(base_of.values())
                   if records[k]["origin"] == origin]
        if nearest:
            out[f"nearest_{origin}"] = [int(np.percentile(nearest, p)) for p in (1, 5, 50)] + [min(nearest)]
    return out


def decode_floor(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """How the reduced decode's floor (``min_side`` of ``reduced_gray_flag``) moves the signals and the
    decode time, on the `realsize` photos: signals from the reduced decode against those from a full
    grey decode of the same file."""
    files = [r for r in records if r["kind"] == "base" and r["origin"] == "realsize"]
    datas = [Path(r["path"]).read_bytes() for r in files]
    full = [sig.image_signals(cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_GRAYSCALE)) for d in datas]
    t0 = time.perf_counter()
    for d in datas:
        cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_GRAYSCALE)
    rows = [{"min_side": "full decode", "decode_ms": 1e3 * (time.perf_counter() - t0) / len(datas)}]
    for floor in (64, 128, 256):
        t_dec, blur, contrast, entropy, dist = 0.0, [], [], [], []
        for d, f in zip(datas, full):
            info = parse_header(d)
            t0 = time.perf_counter()
            img = cv2.imdecode(np.frombuffer(d, np.uint8), sig.reduced_gray_flag(info.width, info.height, info.format, floor))
            t_dec += time.perf_counter() - t0
            s = sig.image_signals(img)
            blur.append(s.blur / f.blur)
            contrast.append(s.contrast / f.contrast)
            entropy.append(s.entropy - f.entropy)
            dist.append(sig.hamming(s.phash, f.phash))
        rows.append({"min_side": floor, "decode_ms": 1e3 * t_dec / len(datas),
                     "blur": np.percentile(blur, (5, 50, 95)), "contrast": np.percentile(contrast, (5, 50, 95)),
                     "entropy": np.percentile(entropy, (5, 50, 95)), "dist": np.percentile(dist, (50, 95, 100))})
    return rows


# --------------------------------------------------------------------------------------------- signals


DEGRADE = ("blur_1pct", "blur_2pct", "dark", "overexposed", "low_contrast", "blank")


def degrade(kind: str, img: np.ndarray) -> np.ndarray:
    f = img.astype(np.float32)
    short = min(img.shape[:2])
    if kind == "blur_1pct":
        out = cv2.GaussianBlur(f, (0, 0), 0.01 * short)
    elif kind == "blur_2pct":
        out = cv2.GaussianBlur(f, (0, 0), 0.02 * short)
    elif kind == "dark":
        out = f * 0.1
    elif kind == "overexposed":
        out = 255 - (255 - f) * 0.1
    elif kind == "low_contrast":
        out = f.mean() + (f - f.mean()) * 0.1
    elif kind == "blank":
        out = np.full_like(f, float(f.mean()))
    else:
        raise ValueError(kind)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def degraded_signals(records: list[dict[str, Any]], n: int, seed: int) -> dict[str, list[sig.ImageSignals]]:
    rng = np.random.default_rng(seed + 7)
    bases = [r for r in records if r["kind"] == "base"]
    chosen = [bases[k] for k in sorted(rng.choice(len(bases), size=min(n, len(bases)), replace=False).tolist())]
    out: dict[str, list[sig.ImageSignals]] = {k: [] for k in DEGRADE}
    for r in chosen:
        img = cv2.imdecode(np.fromfile(r["path"], np.uint8), cv2.IMREAD_COLOR)
        for kind in DEGRADE:
            data = _encode(degrade(kind, img))
            info = parse_header(data)
            g = cv2.imdecode(np.frombuffer(data, np.uint8), sig.reduced_gray_flag(info.width, info.height, info.format))
            out[kind].append(sig.image_signals(sig.gray_of(g)))
    return out


CANDIDATES: dict[str, tuple[tuple[float, ...], tuple[str, ...]]] = {
    # threshold key: (candidate values, the degraded kinds it is meant to catch)
    "blur_below": ((25, 50, 75, 100, 150), ("blur_2pct", "blur_1pct")),
    "brightness_below": ((15, 20, 30, 40), ("dark",)),
    "brightness_above": ((215, 225, 235, 245), ("overexposed",)),
    "contrast_below": ((5, 10, 15, 20, 30), ("low_contrast", "dark", "overexposed")),
    "entropy_below": ((1, 2, 2.5, 3, 3.5), ("blank", "low_contrast")),
}


def _hit(key: str, value: float, s: sig.ImageSignals) -> bool:
    name, side = key.rsplit("_", 1)
    v = getattr(s, name)
    return v < value if side == "below" else v > value


def fmt_pct(x: Any) -> str:
    return f"{100 * float(x):.1f}"


def _q(values: list[int]) -> str:
    return " / ".join(map(str, values)) if values else "-"


def report(records: list[dict[str, Any]], ours_t: dict[str, Any], micro: dict[str, float], cur_ms: float,
           peer_t: dict[str, Any], ev_ours: list[dict[str, Any]], ev_peer: list[dict[str, Any]] | None,
           vstats: dict[str, dict[str, list[int]]], signals: list[sig.ImageSignals],
           degraded: dict[str, list[sig.ImageSignals]], floor: list[dict[str, Any]], wall: float,
           load: tuple[float, float]) -> str:
    n = len(records)
    n_fruit = sum(r["kind"] == "base" and r["origin"] == "fruit" for r in records)
    n_real = sum(r["kind"] == "base" and r["origin"] == "realsize" for r in records)
    n_var = n - n_fruit - n_real
    n_fam_var = len({r["family"] for r in records if r["kind"] != "base"})
    var_origin = Counter(r["origin"] for r in records if r["kind"] == "jpeg_q50")
    real_kinds = Counter(r["label"] for r in records if r["kind"] == "base" and r["origin"] == "realsize")
    cmd = "python bench/bench_near_duplicates.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    L = [
        "# Near-duplicates and quality signals (image_signals)",
        "",
        f"    .venv/bin/{cmd.strip()}",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs shared with other jobs (load average "
        f"{load[0]:.1f} at the start, {load[1]:.1f} at the end: wall times are inflated, CPU times less so), "
        f"Python {platform.python_version()}, OpenCV {cv2.__version__}, NumPy {np.__version__}, imagededup "
        f"{peer_t.get('version', '-')}. Whole run {wall:.0f} s.",
        "",
        "Data (every figure below is for these files unless its line says otherwise):",
        f"- `fruit`: {n_fruit} distinct Fruits-360 photos from ../shared (10 classes; each class is frames of "
        "a few videos of one fruit rotating on a white background), cropped to 1:1, 4:3 or 3:2 and upscaled "
        "(cubic) to a shorter side of 400-800 px, JPEG q90.",
        f"- `realsize`: {n_real} real-size photos from `sample.realsize` (400-2,000 px; "
        + ", ".join(f"{v} {k}" for k, v in sorted(real_kinds.items()))
        + ") made from 400 other Fruits-360 photos.",
        f"- {n_var} planted near-duplicates: for {n_fam_var} of those {n_fruit + n_real} photos "
        f"({var_origin.get('fruit', 0)} fruit, {var_origin.get('realsize', 0)} realsize) one file each of "
        + ", ".join(f"`{k}`" for k in KINDS) + " (see the script's docstring).",
        f"- {n} files in all. A pair is true when both files come from one distinct photo; every other pair is "
        "false, including two frames of one rotating fruit (broken down below).",
        "",
        "## Cost per file",
        "",
        "Our path per file: read, header (`contracts.sniff`), decode with `reduced_gray_flag`, `gray_of`, "
        "`image_signals` (hash + 4 signals); one process, OpenCV at 1 thread.",
        "",
        "| | ms/file |",
        "|---|---:|",
        f"| ours, whole path: wall (CPU) | {ours_t['per_image_ms']:.2f} ({ours_t['cpu_ms']:.2f}); "
        f"{ours_t['images_per_s']:.0f} files/s |",
        f"| - decode with `reduced_gray_flag` (JPEG decoded to a median {ours_t['jpeg_decoded_px']:,} px) | "
        f"{ours_t['decode_ms']:.2f} |",
        f"| - `gray_of` + `image_signals`, JPEG files: mean (median) | {ours_t['signals_jpeg_ms']:.3f} "
        f"({ours_t['signals_jpeg_median_ms']:.3f}) |",
        f"| - `gray_of` + `image_signals`, PNG files (full-size colour, median {ours_t['png_decoded_px']:,} px) | "
        f"{ours_t['signals_png_ms']:.3f} |",
        f"| the decode the manifest check does today (JPEG `REDUCED_GRAYSCALE_8`, others `UNCHANGED`), same files | "
        f"{cur_ms:.2f} |",
    ]
    L += [f"| `gray_of` + `image_signals` on a {k} grey frame, CPU, best of 7x200 | {v:.3f} |" for k, v in micro.items()]
    if "error" not in peer_t:
        L.append(f"| imagededup PHash `encode_image(image_file=...)` (PIL, full-size decode): wall (CPU) | "
                 f"{peer_t['per_image_ms']:.2f} ({peer_t['cpu_ms']:.2f}); {peer_t['images_per_s']:.0f} files/s |")
    else:
        L.append(f"| imagededup | {peer_t['error']} |")
    L += ["", "## Distance of each planted variant to its original", "",
          "Bits, median / 90th / 95th percentile / max; last rows: distance from each distinct photo to the "
          "nearest file of another distinct photo, 1st / 5th / 50th percentile / min.", "",
          "| variant | ours | imagededup PHash |", "|---|---|---|"]
    for kind in KINDS + ("nearest_fruit", "nearest_realsize"):
        label = {"nearest_fruit": "nearest other photo, from a `fruit` photo",
                 "nearest_realsize": "nearest other photo, from a `realsize` photo"}.get(kind, kind)
        L.append(f"| {label} | {_q(vstats['ours'].get(kind, []))} | {_q(vstats.get('peer', {}).get(kind, []))} |")
    for name, ev in (("ours", ev_ours), ("imagededup PHash", ev_peer)):
        if ev is None:
            continue
        L += ["", f"## Pairs and groups by distance D: {name}", "",
              "A pair: Hamming distance <= D. Groups: connected components of the pairs. Recall: share of the "
              "variants of a kind in the same group as their original (in brackets: directly paired with it). "
              "Precision: of all pairs <= D, the share that are true: strict; then not counting pairs of two "
              "photos of one fruit class; then not counting those nor pairs of two crops of one scikit-learn photo "
              "(near-duplicates by the `crop` variant's own definition). Group precision: of all pairs of files in one group, the "
              "share that are true. False groups: share of the distinct photos whose group holds another one.",
              "",
              "| D | " + " | ".join(KINDS) + " | pairs | precision | same-class fruit aside | and crops aside | "
              "group precision | false groups: fruit / realsize | largest group |",
              "|---:|" + "---:|" * len(KINDS) + "---:|---:|---:|---:|---:|---:|---:|"]
        for row in ev:
            rec = " | ".join(f"{fmt_pct(row[f'recall_{k}'])} ({fmt_pct(row[f'pair_recall_{k}'])})" for k in KINDS)
            L.append(f"| {row['D']} | {rec} | {row['pairs']} | {fmt_pct(row['pair_precision'])} | "
                     f"{fmt_pct(row['pair_precision_xc'])} | {fmt_pct(row['pair_precision_xcc'])} | "
                     f"{fmt_pct(row['group_precision'])} | "
                     f"{fmt_pct(row['false_group_rate_fruit'])} / {fmt_pct(row['false_group_rate_realsize'])} | "
                     f"{row['largest_group']} |")
        L += ["", f"False pairs <= D ({name}) by what the two distinct photos are:", "",
              "| D | " + " | ".join(FALSE_KIND_TITLES[k] for k in FALSE_KINDS) + " |",
              "|---:|" + "---:|" * len(FALSE_KINDS)]
        for row in ev:
            fk = row["false_pairs"]
            L.append(f"| {row['D']} | " + " | ".join(str(fk.get(k, 0)) for k in FALSE_KINDS) + " |")
    n_real_files = sum(r["kind"] == "base" and r["origin"] == "realsize" for r in records)
    L += ["", "## The reduced decode's floor", "",
          f"The {n_real_files} `realsize` photos (400-2,000 px JPEGs) decoded with `reduced_gray_flag(..., min_side)`: "
          "mean decode time, and the signals against those of a full grey decode of the same file (ratio or "
          "difference, 5th / 50th / 95th percentile; hash distance: median / 95th percentile / max). The 64 px "
          "signal copy box-averages the decoded pixels again: the nearer the decode is to 64 px, the more "
          "this second filter blurs.", "",
          "| min_side | decode ms | blur ratio | contrast ratio | entropy difference | hash distance |",
          "|---|---:|---|---|---|---|"]
    for row in floor:
        if "blur" not in row:
            L.append(f"| {row['min_side']} | {row['decode_ms']:.2f} | 1 | 1 | 0 | 0 |")
            continue
        L.append(f"| {row['min_side']}{' (default)' if row['min_side'] == sig.MIN_DECODE_SIDE else ''} | "
                 f"{row['decode_ms']:.2f} | " + " | ".join(" / ".join(f"{v:.2f}" for v in row[k])
                                                         for k in ("blur", "contrast", "entropy"))
                 + " | " + " / ".join(f"{v:.0f}" for v in row["dist"]) + " |")
    # signals
    by_origin: dict[str, list[sig.ImageSignals]] = {"fruit": [], "realsize": []}
    for r, s in zip(records, signals):
        if r["kind"] == "base":
            by_origin[r["origin"]].append(s)
    real = by_origin["fruit"] + by_origin["realsize"]
    variants = [s for r, s in zip(records, signals) if r["kind"] != "base"]
    L += ["", "## Quality signals", "", "Percentiles over the distinct photos (decoded as above):", "",
          "| signal | photos | " + " | ".join(f"p{p:g}" for p in PERCENTILES) + " |",
          "|---|---|" + "---:|" * len(PERCENTILES)]
    for name in SIGNALS:
        for origin, ss in by_origin.items():
            vals = np.array([getattr(s, name) for s in ss])
            digits = 2 if name == "entropy" else 1
            L.append(f"| {name} | {origin} ({len(vals)}) | "
                     + " | ".join(f"{v:.{digits}f}" for v in np.percentile(vals, PERCENTILES)) + " |")
    n_deg = len(next(iter(degraded.values()), []))
    L += ["", f"Degraded copies of {n_deg} distinct photos (blur: Gaussian, sigma 1 % / 2 % of the shorter side; "
          "dark: x0.1; over-exposed: 255 - (255 - v) x 0.1; low contrast: mean + (v - mean) x 0.1; blank: the "
          "mean grey), each stored as JPEG q90 and decoded as above: median signals.", "",
          "| files | blur | brightness | contrast | entropy |", "|---|---:|---:|---:|---:|"]
    for label, ss in [("distinct photos", real)] + list(degraded.items()):
        med = {name: float(np.median([getattr(s, name) for s in ss])) for name in SIGNALS}
        L.append(f"| {label} | {med['blur']:.1f} | {med['brightness']:.1f} | {med['contrast']:.1f} | "
                 f"{med['entropy']:.2f} |")
    L += ["", "Candidate thresholds: share of files flagged (%).", "",
          "| threshold | fruit photos | realsize photos | planted variants | degraded copies it should catch |",
          "|---|---:|---:|---:|---|"]
    for key, (values, targets) in CANDIDATES.items():
        for v in values:
            cells = [fmt_pct(np.mean([_hit(key, v, s) for s in ss])) for ss in (by_origin["fruit"], by_origin["realsize"], variants)]
            tgt = ", ".join(f"{t} {fmt_pct(np.mean([_hit(key, v, s) for s in degraded[t]]))}" for t in targets)
            L.append(f"| {key} {v:g} | " + " | ".join(cells) + f" | {tgt} |")
    thr = sig.OUTLIER_THRESHOLDS
    L += ["", "The proposed thresholds (`image_signals.OUTLIER_THRESHOLDS`: "
          + ", ".join(f"`{k}` {v:g}" for k, v in thr.items()) + "), share flagged by `quality_flags` (%):", "",
          "| files | n | " + " | ".join(sig.QUALITY_FLAGS) + " | any |",
          "|---|---:|" + "---:|" * (len(sig.QUALITY_FLAGS) + 1)]
    groups = [("fruit photos", by_origin["fruit"]), ("realsize photos", by_origin["realsize"]),
              ("planted variants", variants)] + [(f"degraded: {k}", v) for k, v in degraded.items()]
    for label, ss in groups:
        fl = [set(sig.quality_flags(s)) for s in ss]
        L.append(f"| {label} | {len(ss)} | " + " | ".join(fmt_pct(np.mean([f_ in x for x in fl])) for f_ in sig.QUALITY_FLAGS)
                 + f" | {fmt_pct(np.mean([bool(x) for x in fl]))} |")
    return "\n".join(L) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bases", type=int, default=1500, help="distinct Fruits-360 photos (default 1500)")
    ap.add_argument("--realsize", type=int, default=200, help="distinct sample.realsize photos (default 200)")
    ap.add_argument("--variants", type=int, default=300, help="distinct photos that get planted variants (default 300)")
    ap.add_argument("--degraded", type=int, default=200, help="distinct photos degraded for the signal checks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-peer", action="store_true", help="skip imagededup")
    ap.add_argument("--results", default=str(REPO / "bench" / "RESULTS-near-duplicates.md"))
    ap.add_argument("--keep", metavar="DIR", help="write the files under DIR (an empty or new folder) and keep them")
    args = ap.parse_args()
    if not FRUITS.is_dir():
        print(f"error: {FRUITS} is absent (../shared holds the Fruits-360 photos; see shared/README.md)", file=sys.stderr)
        return 2
    t_start, load0 = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="neardup-") as tmp:
        if args.keep:
            tmp = args.keep
            Path(tmp).mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        records = build(Path(tmp), args.bases, args.realsize, args.variants, args.seed)
        print(f"built {len(records)} files in {time.perf_counter() - t0:.0f} s", flush=True)
        cur_ms = current_check_decode_ms(records)
        h_ours, signals, ours_t = ours(records)
        micro = signals_microbench()
        print(f"ours: {ours_t['per_image_ms']:.2f} ms/file; signals {micro}", flush=True)
        if args.no_peer:
            h_peer, peer_t = None, {"error": "skipped (--no-peer)"}
        else:
            h_peer, peer_t = peer(records)
            print(f"peer: {peer_t}", flush=True)
        d_ours = distances(h_ours)
        ev_ours = evaluate(records, d_ours)
        vstats = {"ours": variant_distance_stats(records, d_ours)}
        ev_peer = None
        if h_peer is not None:
            d_peer = distances(h_peer)
            ev_peer = evaluate(records, d_peer)
            vstats["peer"] = variant_distance_stats(records, d_peer)
        degraded = degraded_signals(records, args.degraded, args.seed)
        floor = decode_floor(records)
        text = report(records, ours_t, micro, cur_ms, peer_t, ev_ours, ev_peer, vstats, signals, degraded, floor,
                      time.perf_counter() - t_start, (load0, os.getloadavg()[0]))
        if args.keep:
            import json

            (Path(tmp) / "records.json").write_text(json.dumps(records))
    Path(args.results).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
