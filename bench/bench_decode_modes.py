"""Decode modes on real-size photos: fidelity against torchvision and speed, for ``preprocess.reduced_decode``.

    .venv/bin/python bench/bench_decode_modes.py [--images 240] [--large 60] [--repeats 2] [--margins 1,2,2.5,3,4,2r,4r]

* Photos: ``sample.realsize.make_realsize_photos`` from the shared 100x100 fruit photos (sharp mosaics at
  non-integer scales, upscaled single photos, scikit-learn's two real photos; 4:2:0 and 4:4:4 JPEG,
  quality 85-95, some grey, about a third portrait, half with camera-like sides (multiples of 16)):
  ``--images`` of 400 to 3,000 px plus ``--large`` of 3,000 to 4,000 px and one of 100 px.
* Reference (the baseline, run in the same script): torchvision's own pipeline, PIL open +
  ``convert("RGB")``, ``Resize(256)``, ``CenterCrop(224)``, ``ToTensor``, ``Normalize``, then the plain
  torchvision mobilenet_v2 with the shared ImageNet weights, one image at a time.
* For each mode (off / safe / fast):
  - cosine of each photo's features (``featurize.runner.run_featurize``: the real featurize path, fp32,
    CPU) against the reference: min and mean, overall and by the photo's shorter side;
  - decode+resize alone: ``ManifestDataset.__getitems__`` (the DataLoader batch path) in this process,
    torch and OpenCV at 1 thread, i.e. images/s per core;
  - end to end: the ``run_featurize`` images/s over its shard loop (read, decode, resize, forward, write).
  Modes alternate within each repeat (best of ``--repeats``), so drifting load hits them alike.

Needs ../shared (fruit photos, MobileNetV2 weights seeded into a temporary TORCH_HOME).
Writes the markdown to bench/RESULTS-decode.md (``--results`` to change).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
SHARED = Path(os.environ.get("IMGFEAT_SHARED", REPO.parent / "shared"))
FRUITS = SHARED / "data" / "fruits360-100"
MOBILENET = SHARED / "weights" / "mobilenet_v2-b0353104.pth"
os.environ.setdefault("IMGFEAT_NO_PROGRESS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

MODES = ("off", "safe", "fast")
SHORTER_BINS = ((0, 512), (512, 1024), (1024, 2048), (2048, 10**6))


def make_photos(tmp: Path, n_mid: int, n_large: int, seed: int) -> list[str]:
    from sample.realsize import make_realsize_photos

    files = make_realsize_photos(FRUITS, tmp / "photos" / "mid", n_mid, min_side=400, max_side=3000, seed=seed)
    files += make_realsize_photos(FRUITS, tmp / "photos" / "large", n_large, min_side=3000, max_side=4000,
                                  seed=seed + 1)
    files += make_realsize_photos(FRUITS, tmp / "photos" / "small", 1, min_side=100, max_side=100, seed=seed + 2)
    return files


def plain_model() -> torch.nn.Module:
    from torchvision.models import mobilenet_v2

    net = mobilenet_v2(weights="IMAGENET1K_V1")
    net.classifier = torch.nn.Identity()
    return net.eval()


def reference(files: list[str], batch: int) -> dict[str, Any]:
    """torchvision's pipeline: features [N, 1280] and its own timings (decode+resize alone, end to end with
    the plain model on batches of ``batch``, in this process)."""
    from PIL import Image
    from torchvision import transforms as T

    resize = T.Compose([T.Resize(256), T.CenterCrop(224)])
    tensor = T.Compose([T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    t0 = time.perf_counter()
    for path in files:  # decode + resize alone, as ours is timed
        with Image.open(path) as img:
            resize(img.convert("RGB"))
    decode_s = time.perf_counter() - t0
    net = plain_model()
    feats = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(files), batch):
            xs = []
            for path in files[start : start + batch]:
                with Image.open(path) as img:
                    xs.append(tensor(resize(img.convert("RGB"))))
            feats.append(net(torch.stack(xs)))
    return {"features": torch.cat(feats).numpy(), "decode_ips": len(files) / decode_s,
            "e2e_ips": len(files) / (time.perf_counter() - t0)}


def decode_only(files: list[str], mode: str, batch: int) -> float:
    """Images/s of ManifestDataset.__getitems__ (decode + resize to 224) in this process, 1 thread."""
    from imgfeat.metadata.config import PreprocessConfig
    from imgfeat.preprocess.dataset import ManifestDataset

    ds = ManifestDataset([{"image_id": str(i), "path": p} for i, p in enumerate(files)],
                         PreprocessConfig(reduced_decode=mode))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        for start in range(0, len(ds), batch):
            out = ds.__getitems__(list(range(start, min(start + batch, len(ds)))))
            if not bool(out.ok.all()):
                raise SystemExit(f"decode failed: {[r for r in out.reasons if r]}")
        return len(ds) / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def end_to_end(files: list[str], manifest: Path, tmp: Path, mode: str, tag: str) -> dict[str, Any]:
    """run_featurize with mobilenet_v2 fp32 on the CPU: images/s over the shard loop, features by path."""
    from imgfeat.featurize.runner import run_featurize
    from imgfeat.metadata.config import Config
    from imgfeat.metadata.contracts.feature_store import read_features
    from imgfeat.metadata.contracts.schema import image_id_for, normalize_uri

    cfg = Config()
    cfg.featurize.model, cfg.featurize.weights, cfg.featurize.device = "mobilenet_v2", "IMAGENET1K_V1", "cpu"
    cfg.featurize.precision, cfg.featurize.format = "fp32", "npy"
    cfg.preprocess.reduced_decode = mode
    cfg.validate()
    out = tmp / f"feat-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    summary = run_featurize(cfg, str(manifest), str(out))
    if summary is None:
        raise RuntimeError("run_featurize returned no summary (not rank 0?)")
    t = summary["this_run"]
    ids, feats = read_features(str(out))
    by_id = dict(zip(ids.tolist(), feats))
    features = np.stack([by_id[image_id_for(normalize_uri(p))] for p in files])
    shutil.rmtree(out, ignore_errors=True)
    return {"ips": t["images"] / t["loop_s"], "features": features}


def plain_features(files: list[str], net: torch.nn.Module, batch: int) -> np.ndarray:
    """Features of ``files`` through ManifestDataset with the default config (as patched by the caller)."""
    from imgfeat.metadata.config import PreprocessConfig
    from imgfeat.preprocess.dataset import ManifestDataset
    from imgfeat.preprocess.transforms import normalize_batch

    ds = ManifestDataset([{"image_id": str(i), "path": p} for i, p in enumerate(files)], PreprocessConfig())
    out = []
    with torch.inference_mode():
        for start in range(0, len(ds), batch):
            b = ds.__getitems__(list(range(start, min(start + batch, len(ds)))))
            out.append(net(normalize_batch(b.images)).numpy())
    return np.concatenate(out) if out else np.zeros((0, 1280), np.float32)


def margin_study(files: list[str], dims: list[tuple[int, int]], ref: np.ndarray, specs: list[str],
                 batch: int) -> list[dict[str, Any]]:
    """``safe`` decode under other margins: per margin, cosine (plain model on both sides) over all photos.

    A spec is a margin (``"2.5"``), or a margin with ``r`` (``"4r"``): the same rule without the
    condition that the scale divide both sides. Each (photo, scale) is decoded once through
    ManifestDataset with ``preprocess.decode.reduced_scale`` patched to the spec's rule, so the
    figures come from the same decode + resize path as the default.
    """
    import imgfeat.preprocess.decode as dec

    def rule(margin: float, ragged: bool) -> Any:
        def scale(width: int, height: int, target: int | None, mode: str = "safe") -> int:
            for s in (8, 4, 2):
                if (ragged or (width % s == 0 and height % s == 0)) and min(width, height) >= margin * (target or 0) * s:
                    return s
            return 1
        return scale

    net = plain_model()
    saved, cache, rows = dec.reduced_scale, {}, []
    try:
        for spec in specs:
            ragged = spec.endswith("r")
            dec.reduced_scale = rule(float(spec.rstrip("r")), ragged)
            scales = [dec.reduced_scale(w, h, 256) for w, h in dims]
            todo = [i for i, s in enumerate(scales) if (i, s) not in cache]
            feats = plain_features([files[i] for i in todo], net, batch)
            for i, f in zip(todo, feats):
                cache[(i, scales[i])] = float(cosines(f[None], ref[i][None])[0])
            cos = np.array([cache[(i, s)] for i, s in enumerate(scales)])
            reduced = np.array(scales) > 1
            rows.append({"spec": spec, "margin": float(spec.rstrip("r")), "ragged": ragged,
                         "by_scale": np.bincount(scales, minlength=9), "min": cos.min(), "mean": cos.mean(),
                         "under": int((cos < 0.999).sum()),
                         "min_reduced": cos[reduced].min() if reduced.any() else float("nan")})
            print(f"margin {spec}: {int(reduced.sum())} reduced, cosine min {cos.min():.5f}", flush=True)
    finally:
        dec.reduced_scale = saved
    return rows


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=240, help="photos of 400 to 3,000 px")
    ap.add_argument("--large", type=int, default=60, help="photos of 3,000 to 4,000 px")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--repeats", type=int, default=2, help="best of N for the speeds")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--margins", default="1,2,2.5,3,4,2r,4r",
                    help="safe-mode margins to compare (plain model both sides); 'Nr' = margin N with ragged "
                         "sides allowed; '' = skip")
    ap.add_argument("--quick", action="store_true", help="40 + 4 photos, one repeat")
    ap.add_argument("--results", default=str(REPO / "bench" / "RESULTS-decode.md"))
    args = ap.parse_args()
    if args.quick:
        args.images, args.large, args.repeats = 40, 4, 1
    if not FRUITS.exists() or not MOBILENET.exists():
        print(f"skipped: {SHARED} is absent (fruit photos and MobileNetV2 weights)")
        return 0
    import logging

    logging.basicConfig(level=logging.WARNING)
    from imgfeat.metadata.contracts.cv2_env import import_cv2
    from imgfeat.preprocess.decode import SAFE_MARGIN, reduced_scale

    from helpers import write_manifest

    import_cv2(threads=1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-decode-modes-"))
    home = tmp / "torch_home" / "hub" / "checkpoints"
    home.mkdir(parents=True)
    shutil.copy(MOBILENET, home / MOBILENET.name)
    os.environ["TORCH_HOME"] = str(tmp / "torch_home")
    load_before = os.getloadavg()
    files = make_photos(tmp, args.images, args.large, args.seed)
    from PIL import Image

    dims = []
    for p in files:
        with Image.open(p) as img:
            dims.append(img.size)
    shorter = np.array([min(d) for d in dims])
    manifest = write_manifest(tmp / "manifest", [{"path": p} for p in files], rows_per_shard=10**6)
    mb = sum(Path(p).stat().st_size for p in files) / 1e6
    print(f"{len(files)} photos, {mb:.0f} MB, shorter side {shorter.min()}..{shorter.max()}", flush=True)

    refs = []
    speeds: dict[str, dict[str, list[float]]] = {m: {"decode": [], "e2e": []} for m in MODES}
    feats: dict[str, np.ndarray] = {}
    for rep in range(args.repeats):
        refs.append(reference(files, args.batch_size))
        for mode in MODES:
            speeds[mode]["decode"].append(decode_only(files, mode, args.batch_size))
            e2e = end_to_end(files, manifest, tmp, mode, f"{mode}-{rep}")
            speeds[mode]["e2e"].append(e2e["ips"])
            feats[mode] = e2e["features"]
            print(f"repeat {rep} {mode}: decode+resize {speeds[mode]['decode'][-1]:.1f} img/s, "
                  f"end to end {e2e['ips']:.1f} img/s", flush=True)
    ref = refs[0]["features"]
    ref_decode = max(r["decode_ips"] for r in refs)
    ref_e2e = max(r["e2e_ips"] for r in refs)
    load_after = os.getloadavg()

    cmd = "bench/bench_decode_modes.py " + " ".join(sys.argv[1:])
    target = 256
    scale_counts = {m: np.bincount([reduced_scale(w, h, target, m) for w, h in dims], minlength=9) for m in MODES}
    off_decode, off_e2e = max(speeds["off"]["decode"]), max(speeds["off"]["e2e"])
    lines = [
        "# Decode modes on real-size photos",
        "",
        f"Command: `.venv/bin/python {cmd.strip()}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; load average (1 min) "
        f"before/after: {load_before[0]:.1f} / {load_after[0]:.1f} (other jobs share the cores: absolute figures "
        "are noisy, the ratios within this run less so).  ",
        f"Photos: {len(files)} JPEGs ({mb:.0f} MB) made by `sample.realsize` (seed {args.seed}) from the shared "
        f"100x100 fruit photos: {args.images} of 400 to 3,000 px, {args.large} of 3,000 to 4,000 px and one of "
        f"100 px; shorter side {shorter.min()} to {shorter.max()} px (median {int(np.median(shorter))}). Sharp "
        "mosaics of native tiles at non-integer scales, upscaled single photos, scikit-learn's china/flower; "
        "4:2:0 and 4:4:4, quality 85-95, some grey, half with camera-like sides (multiples of 16).  ",
        "Reference: torchvision's pipeline (PIL, `Resize(256)`, `CenterCrop(224)`, `ToTensor`, `Normalize`) and "
        "the plain mobilenet_v2 with the same ImageNet weights. Ours: `run_featurize` (mobilenet_v2, fp32, CPU, "
        "batch 64, BN folded, channels_last) with the default config but for `preprocess.reduced_decode`. "
        f"Decode+resize alone: `ManifestDataset.__getitems__` in one process, 1 thread (images/s per core). "
        f"Speeds: best of {args.repeats}, modes interleaved. `safe` margin: {SAFE_MARGIN} x the resize target.",
        "",
        "| decode | cosine min | cosine mean | photos < 0.999 | decode+resize img/s | vs off | end to end img/s "
        "| vs off | photos at 1/1, 1/2, 1/4, 1/8 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for mode in MODES:
        cos = cosines(feats[mode], ref)
        dec, e2e_ips = max(speeds[mode]["decode"]), max(speeds[mode]["e2e"])
        sc = scale_counts[mode]
        lines.append(f"| `{mode}`{' (default)' if mode == 'safe' else ''} | {cos.min():.5f} | {cos.mean():.6f} | "
                     f"{int((cos < 0.999).sum())} | {dec:.1f} | {dec / off_decode:.2f}x | {e2e_ips:.1f} | "
                     f"{e2e_ips / off_e2e:.2f}x | {sc[1]}, {sc[2]}, {sc[4]}, {sc[8]} |")
        print(f"{mode}: cosine min {cos.min():.5f} mean {cos.mean():.6f}", flush=True)
    lines.append(f"| torchvision's pipeline (PIL), the baseline | reference | | | {ref_decode:.1f} | "
                 f"{ref_decode / off_decode:.2f}x | {ref_e2e:.1f} (plain model, batches of {args.batch_size}, "
                 f"one process) | {ref_e2e / off_e2e:.2f}x | 1/1 |")
    lines += ["", "Cosine against the reference by the photo's shorter side (min / mean):", "",
              "| shorter side | photos | " + " | ".join(f"`{m}`" for m in MODES) + " |",
              "|---|---:|" + "---|" * len(MODES)]
    for lo, hi in SHORTER_BINS:
        sel = (shorter >= lo) & (shorter < hi)
        if not sel.any():
            continue
        cells = []
        for mode in MODES:
            cos = cosines(feats[mode][sel], ref[sel])
            cells.append(f"{cos.min():.5f} / {cos.mean():.5f}")
        label = f"{lo} to {hi - 1} px" if hi < 10**6 else f">= {lo} px"
        lines.append(f"| {label} | {int(sel.sum())} | " + " | ".join(cells) + " |")
    specs = [m.strip() for m in args.margins.split(",") if m.strip()]
    if specs:
        study = margin_study(files, dims, ref, specs, args.batch_size)
        lines += ["", "Margin of `safe`: decode at 1/s only while the decoded shorter side stays >= margin x 256 "
                  "and s divides both sides (\"ragged sides allowed\": without that condition). Same photos; the "
                  "plain model on both sides, so the figures isolate the decode:", "",
                  "| margin | photos at 1/2, 1/4, 1/8 | cosine min | cosine mean | photos < 0.999 |",
                  "|---|---|---:|---:|---:|"]
        for r in study:
            bs = r["by_scale"]
            name = f"{r['margin']:g}" + (", ragged sides allowed" if r["ragged"] else "")
            name += " (chosen)" if r["margin"] == SAFE_MARGIN and not r["ragged"] else ""
            lines.append(f"| {name} | {bs[2]}, {bs[4]}, {bs[8]} | {r['min']:.5f} | {r['mean']:.6f} | {r['under']} |")
        by = {r["spec"]: r for r in study}
        notes = []
        if "2" in by:
            under = by["2"]["under"]
            notes.append(f"a 2x margin gave min cosine {by['2']['min']:.5f} ({under} photo{'s' if under != 1 else ''} under 0.999)")
        chosen = next((r for r in study if r["margin"] == SAFE_MARGIN and not r["ragged"]), None)
        if chosen:
            notes.append(f"the chosen {SAFE_MARGIN:g}x gave {chosen['min']:.5f}")
        ragged = next((r for r in study if r["margin"] == SAFE_MARGIN and r["ragged"]), None)
        if ragged:
            notes.append(f"the same {SAFE_MARGIN:g}x with ragged sides allowed gave {ragged['min']:.5f}")
        lines += ["", "Why two conditions: the DCT-scaled decode is not the antialiased resize, and the exact resize "
                  "that follows (`preprocess/transforms.py`) averages the difference out only with enough margin; "
                  "and a side that s does not divide decodes to ceil(side/s) pixels that cover s x ceil(side/s) "
                  "source pixels, so the resize maps a slightly larger extent (sometimes rounding the longer side "
                  "differently): a sub-pixel shift of the crop that sharp photos turn into feature changes. "
                  "In this run " + "; ".join(notes) + "."]
    text = "\n".join(lines).rstrip() + "\n"
    print("\n" + text)
    Path(args.results).write_text(text)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
