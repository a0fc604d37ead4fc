"""GPU benchmark of featurize (issue 17): one prepared script for a CUDA machine.

    bash bench/bench_gpu.sh                                   # installs .venv if needed, then runs this
    .venv/bin/python bench/bench_gpu.py [--images 20000] [--batch-size 256] [--budget-s 420]
    .venv/bin/python bench/bench_gpu.py --dry-run             # CPU only: 200 images, resnet50 eager fp32

Order of work, within a time budget (later measurements are skipped, and said so, when it runs out):

1. CUDA must be present (``--allow-cpu``/``--dry-run``: run the CPU parts on a CPU device instead; nothing is
   written to bench/RESULTS-gpu.md then). torch must be a CUDA build: ``.ci/setup`` installs torch from the
   project's pins (``torch==2.14.1``), which is a CUDA (cu130) wheel on the machines here; check
   ``torch.version.cuda`` below.
2. ``--images`` real-size JPEGs (sides 375..500, like 500x375 web photos): mosaics of the Fruits-360 photos
   under ../shared rescaled at non-integer factors and upscaled single photos, re-encoded at quality 85..95,
   4:2:0 and 4:4:4, some grey (``sample.realsize``), made by one process per core; without ../shared,
   generated photographic-ish frames (gradients, soft blobs, edges, noise).
3. The manifest with the project's CLI (``imgfeat manifest DIR --out M --validation header``); when that cannot
   run (no Java for Spark on this machine), a manifest written with pyarrow (``tests/helpers.write_manifest``),
   said in the results.
4. ``pytest -m gpu`` (the CUDA tests of tests/test_gpu_path.py and any other ``gpu`` test).
5. One run of ``featurize.runner.run_featurize`` per model and decode: resnet50 at 224 in bf16 eager and
   compiled, mobilenet_v2 (bf16, eager), each with ``decode_device`` cpu and gpu. Per run: end-to-end img/s over
   the shard loop, the model-only img/s that the run measures in its warm-up (``model_only_img_s``), setup
   seconds, peak GPU memory, GPU decode fallbacks; min/mean cosine of the run's features against the plain
   torchvision model (``featurize.model.reference_model``, fp32) on PIL + torchvision transforms, on a sample.
   Then, as time allows: ``decode_device = auto`` (its two measurements and its choice) and ``batch_probe``.
6. bench/RESULTS-gpu.md (markdown table, the command beside it) and, when $OUT is set, $OUT/bench_gpu.json
   and a copy of the markdown.

resnet50 runs with random weights (``--weights none``: none are shipped here; the compute is the same);
mobilenet_v2 with its ImageNet weights when they can be found (../shared or the weights package), else random.
Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
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

log = logging.getLogger("bench_gpu")

DEFAULT_MODELS = "resnet50:bf16:eager,resnet50:bf16:compile,mobilenet_v2:bf16:eager"


# ---------------------------------------------------------------- images

def synthetic_photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A photographic-ish RGB uint8 frame: gradients, soft blobs, a few hard-edged patches, sensor noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):
        a, b = rng.uniform(-1, 1, 2)
        img[..., c] = 128 + 60 * (a * x / w + b * y / h)
    for _ in range(8):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.3) * min(h, w)
        img += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None] * rng.uniform(-80, 80, 3)
    for _ in range(4):
        y0, x0 = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
        img[y0 : y0 + int(rng.integers(8, h // 3)), x0 : x0 + int(rng.integers(8, w // 3))] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 5, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _make_chunk(job: tuple[int, int, str, bool]) -> int:
    """Write ``n`` photos into ``out`` (chunk ``k``); from the fruit photos when ``fruits``, else synthetic."""
    k, n, out, fruits = job
    if fruits:
        from sample.realsize import make_realsize_photos

        return len(make_realsize_photos(FRUITS, out, n, min_side=375, max_side=500, seed=1000 + k, quality=90))
    import cv2

    rng = np.random.default_rng(1000 + k)
    Path(out).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = (500, 375) if rng.random() < 0.65 else (375, 500)
        w, h = w + int(rng.integers(-24, 25)), h + int(rng.integers(-24, 25))
        rgb = synthetic_photo(rng, h, w)
        params = [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(85, 96))]
        if rng.random() < 0.4:
            params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
        img = rgb[..., 1] if rng.random() < 0.1 else np.ascontiguousarray(rgb[..., ::-1])
        ok, buf = cv2.imencode(".jpg", img, params)
        assert ok
        (Path(out) / f"{i:05d}_synthetic_{w}x{h}.jpg").write_bytes(buf.tobytes())
    return n


def make_photos(root: Path, n: int, procs: int) -> tuple[Path, str]:
    """``n`` real-size JPEGs under ``root`` (one sub-folder per process); returns (root, what they are)."""
    fruits = FRUITS.is_dir()
    chunks = max(1, min(procs, n // 50 or 1))
    jobs = [(k, n // chunks + (1 if k < n % chunks else 0), str(root / f"c{k:02d}"), fruits) for k in range(chunks)]
    with mp.get_context("fork").Pool(chunks) as pool:
        made = sum(pool.map(_make_chunk, jobs))
    what = ("Fruits-360 photos (../shared) as real-size mosaics and upscales" if fruits
            else "generated photographic-ish frames (../shared absent)")
    return root, f"{made} JPEGs of {what}, sides 375..500"


# ---------------------------------------------------------------- manifest, tests

def build_manifest(photos: Path, out: Path, rows_per_shard: int) -> str:
    """The manifest of ``photos`` under ``out``: with the imgfeat CLI (Spark), else pyarrow; returns how."""
    cmd = [sys.executable, "-m", "imgfeat.cli", "manifest", str(photos), "--out", str(out), "--master",
           f"local[{os.cpu_count() or 1}]", "--validation", "header", "--rows-per-shard", str(rows_per_shard), "-q"]
    shown = "imgfeat manifest " + " ".join(cmd[4:])
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        why = "no Java on this machine (Spark needs it)"
    else:
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
        if proc.returncode == 0:
            return f"`{shown}` ({time.perf_counter() - t:.0f} s)"
        why = f"the CLI failed (exit {proc.returncode}: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]})"
    from helpers import write_manifest

    files = sorted(str(p) for p in photos.rglob("*.jpg"))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    write_manifest(out, [{"path": p} for p in files], rows_per_shard=rows_per_shard)
    return f"pyarrow (`tests/helpers.write_manifest`), because {why}"


def run_gpu_tests() -> dict[str, Any]:
    """``pytest -m gpu``: its exit code, closing line and seconds."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-s"], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    figures = [ln.strip() for ln in lines if ln.startswith(("GPU vs CPU decode", "features: min cosine"))]
    return {"rc": proc.returncode, "summary": lines[-1] if lines else proc.stderr.strip()[-300:],
            "seconds": round(time.perf_counter() - t, 1), "figures": figures,
            "tail": "\n".join(lines[-40:]) if proc.returncode not in (0, 5) else ""}


# ---------------------------------------------------------------- runs

def weights_for(model: str) -> str:
    """ImageNet weights for mobilenet_v2 when they can be had offline, else random (``none``)."""
    if model != "mobilenet_v2":
        return "none"
    from imgfeat.featurize.weights import resolve_weights

    try:
        resolve_weights("mobilenet_v2", "IMAGENET1K_V1", "")
        return "IMAGENET1K_V1"
    except Exception as exc:
        log.warning("mobilenet_v2: no ImageNet weights here (%s): random weights", exc)
        return "none"


def make_config(model: str, precision: str, compiled: bool, decode: str, args: argparse.Namespace) -> Any:
    from imgfeat.metadata.config import Config

    cfg = Config()
    f, p = cfg.featurize, cfg.preprocess
    f.model, f.weights, f.precision, f.compile = model, weights_for(model), precision, compiled
    f.device, f.decode_device, f.format = args.device, decode, "npy"
    p.batch_size, p.size, p.resize_shorter = args.batch_size, args.size, round(args.size * 256 / 224)
    return cfg.validate()


def run_one(cfg: Any, manifest: Path, out: Path) -> dict[str, Any]:
    """One ``run_featurize`` into a fresh ``out``; its figures from the summary."""
    from imgfeat.featurize.runner import run_featurize

    shutil.rmtree(out, ignore_errors=True)
    cuda = cfg.featurize.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    summary = run_featurize(cfg, str(manifest), str(out))
    wall = time.perf_counter() - t
    if summary is None:
        raise RuntimeError("run_featurize returned no summary")
    run, rank = summary["this_run"], summary["this_run"]["per_rank"][0]
    return {
        "images": run["images"], "rejects": summary["rejects"], "wall_s": round(wall, 1), "setup_s": round(rank["setup_s"], 1),
        "loop_s": run["loop_s"], "e2e_img_s": run["loop_images_per_s"], "model_only_img_s": run["model_only_img_s"],
        "efficiency": run["model_efficiency"], "stages": run["stage_seconds"], "slowest": run["slowest_stage"],
        "decode_device": rank["decode_device"], "fallbacks": run["decode_fallbacks"], "gpu_decoded": run["gpu_decoded"],
        "decode_probe": rank.get("decode_probe") or {}, "batch_probe": rank.get("batch_probe") or {},
        "batch_size": rank.get("batch_size"), "workers": rank.get("workers"),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    }


def reference_features(cfg: Any, paths: list[str], device: torch.device) -> np.ndarray:
    """Features of ``paths`` from the plain torchvision model (fp32) on PIL + torchvision transforms."""
    from PIL import Image
    from torchvision import transforms as T

    from imgfeat.featurize.model import reference_model

    torch.manual_seed(0)  # as build_model: random-init models get the same weights
    model = reference_model(cfg.featurize).to(device).eval()
    size = cfg.preprocess.size
    tf = T.Compose([T.Resize(cfg.preprocess.resize_shorter), T.CenterCrop(size), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    out = []
    with torch.inference_mode():
        for i in range(0, len(paths), 64):
            batch = []
            for p in paths[i : i + 64]:
                with Image.open(p) as img:
                    batch.append(tf(img.convert("RGB")))
            out.append(model(torch.stack(batch).to(device)).float().cpu().numpy())
    return np.concatenate(out)


def cosine_vs_reference(out: Path, ref: np.ndarray, ids: list[str]) -> tuple[float, float]:
    from run_helpers import features_by_id

    ours = features_by_id(str(out))
    got = np.stack([ours[i] for i in ids])
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    return float(cos.min()), float(cos.mean())


# ---------------------------------------------------------------- main

def fmt(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--models", default=DEFAULT_MODELS, help="MODEL:PRECISION:eager|compile, comma-separated")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rows-per-shard", type=int, default=2048)
    ap.add_argument("--sample", type=int, default=256, help="images compared with the torchvision reference")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip later measurements past this many seconds")
    ap.add_argument("--allow-cpu", action="store_true", help="run on a CPU device when CUDA is absent (no GPU decode)")
    ap.add_argument("--dry-run", action="store_true", help="= --images 200 --allow-cpu, resnet50 eager fp32, batch 16")
    ap.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu")
    ap.add_argument("--no-extras", action="store_true", help="skip the decode_device=auto and batch_probe runs")
    ap.add_argument("--results", default=None, help="markdown file (default: bench/RESULTS-gpu.md on CUDA, else $OUT or a "
                    "temporary folder)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    t_start = time.perf_counter()
    if args.dry_run:
        args.images, args.allow_cpu, args.batch_size = min(args.images, 200), True, 16
        args.models, args.sample = "resnet50:fp32:eager", min(args.sample, 32)
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print(f"bench_gpu: CUDA is not available (torch {torch.__version__}, built for CUDA {torch.version.cuda}); this "
              "benchmark needs a GPU (--allow-cpu or --dry-run runs its CPU parts)", file=sys.stderr)
        return 2
    args.device = "cuda" if cuda else "cpu"
    device = torch.device(args.device)
    out_env = os.environ.get("OUT")
    # Figures from a CPU device never land in bench/RESULTS-gpu.md.
    fallback_results = Path(out_env) if out_env else Path(tempfile.gettempdir())
    results = Path(args.results) if args.results else (REPO / "bench" / "RESULTS-gpu.md" if cuda else
                                                       fallback_results / "RESULTS-gpu-cpu-dry-run.md")
    tmp = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    home = tmp / "torch_home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    if MOBILENET.exists():
        shutil.copy(MOBILENET, home / "hub" / "checkpoints" / MOBILENET.name)
    os.environ["TORCH_HOME"] = str(home)
    gpu_name = torch.cuda.get_device_name(device) if cuda else "none"
    log.info("device %s (%s), torch %s (CUDA %s), %d CPUs", args.device, gpu_name, torch.__version__, torch.version.cuda,
             os.cpu_count() or 1)

    def left() -> float:
        return args.budget_s - (time.perf_counter() - t_start)

    t = time.perf_counter()
    photos, photos_what = make_photos(tmp / "photos", args.images, os.cpu_count() or 1)
    photos_s = time.perf_counter() - t
    log.info("%s (%.0f s)", photos_what, photos_s)
    manifest_how = build_manifest(photos, tmp / "manifest", args.rows_per_shard)
    log.info("manifest: %s", manifest_how)
    tests = None if args.skip_tests else run_gpu_tests()
    if tests is not None:
        log.info("pytest -m gpu: %s (%.0f s)", tests["summary"], tests["seconds"])

    from imgfeat.metadata.contracts.schema import read_manifest

    table = read_manifest(str(tmp / "manifest"), columns=["image_id", "path", "status"])
    ok_rows = [(i, p) for i, p, s in zip(*(table.column(c).to_pylist() for c in ("image_id", "path", "status"))) if s == "ok"]
    step = max(1, len(ok_rows) // max(1, args.sample))
    sample = ok_rows[::step][: args.sample]
    sample_ids = [i for i, _ in sample]
    sample_paths = [p.removeprefix("file://") for _, p in sample]

    runs: list[dict[str, Any]] = []
    skipped: list[str] = []
    decodes = ["cpu", "gpu"] if cuda else ["cpu"]
    for spec in args.models.split(","):
        model, precision, mode = (spec.split(":") + ["bf16", "eager"])[:3]
        refs: np.ndarray | None = None
        for decode in decodes:
            tag = f"{model} {precision} {mode}, {decode} decode"
            if left() < 30:
                skipped.append(f"{tag} (time budget)")
                continue
            cfg = make_config(model, precision, mode == "compile", decode, args)
            try:
                r = run_one(cfg, tmp / "manifest", tmp / "feat")
                if refs is None and left() > 20:
                    refs = reference_features(cfg, sample_paths, device)
                if refs is not None:
                    r["cos_min"], r["cos_mean"] = cosine_vs_reference(tmp / "feat", refs, sample_ids)
            except Exception as exc:  # one failing configuration is a row, not the end of the benchmark
                log.exception("%s failed", tag)
                r = {"error": f"{type(exc).__name__}: {exc}"}
            r.update(model=model, precision=precision, mode=mode, decode=decode)
            runs.append(r)
            log.info("%s: %s", tag, {k: v for k, v in r.items() if k not in ("stages",)})
    extras: list[dict[str, Any]] = []
    if cuda and not args.no_extras:
        for name, change in (("decode_device = auto", {"decode_device": "auto"}), ("batch_probe", {"batch_probe": True})):
            if left() < 40:
                skipped.append(f"resnet50 bf16 eager, {name} (time budget)")
                continue
            cfg = make_config("resnet50", "bf16", False, "cpu", args)
            for key, value in change.items():
                setattr(cfg.featurize, key, value)
            try:
                r = run_one(cfg, tmp / "manifest", tmp / "feat")
            except Exception as exc:
                log.exception("%s failed", name)
                r = {"error": f"{type(exc).__name__}: {exc}"}
            r["extra"] = name
            extras.append(r)
            log.info("%s: %s", name, r)

    total_s = time.perf_counter() - t_start
    workers = sorted({int(r["workers"]) for r in runs if r.get("workers") is not None})
    cmd = "bench/bench_gpu.py " + " ".join(sys.argv[1:])
    lines = [
        "# GPU featurize benchmark (issue 17)",
        "",
        f"Command: `.venv/bin/python {cmd.strip()}` (or `bash bench/bench_gpu.sh`)  ",
        f"Machine: {gpu_name}, {os.cpu_count()} CPUs, {platform.machine()}, torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}); device {args.device}.  ",
        f"Data: {photos_what} (made in {photos_s:.0f} s); manifest: {manifest_how}.  ",
        f"Runs: batch {args.batch_size}, size {args.size}, decode workers {workers} (`num_workers = -1`: one per core on "
        "CUDA), npy shards of "
        f"{args.rows_per_shard}; end-to-end = images / shard-loop seconds; model-only = the run's own warm-up timing of "
        "the model alone at the batch shape; cosine = against the plain torchvision model (fp32) on PIL + torchvision "
        f"transforms, {len(sample_ids)} images. Whole benchmark: {total_s:.0f} s.",
        "",
    ]
    if tests is not None:
        lines += [f"`pytest -m gpu`: {tests['summary']} ({tests['seconds']:.0f} s)" + ("; " + "; ".join(tests["figures"])
                  if tests["figures"] else ""), ""]
        if tests["tail"]:
            lines += ["```", tests["tail"], "```", ""]
    lines += ["| model | precision | mode | decode | end-to-end img/s | model-only img/s | efficiency | setup s | "
              "peak GPU GiB | cosine min / mean | GPU decoded / CPU fallbacks | slowest stage |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['precision']} | {r['mode']} | {r['decode']} | failed: {r['error'][:120]} "
                         "| | | | | | | |")
            continue
        cos = f"{r['cos_min']:.5f} / {r['cos_mean']:.5f}" if "cos_min" in r else "-"
        fb = f"{r['gpu_decoded']} / {sum(r['fallbacks'].values())} {r['fallbacks'] or ''}" if r["decode"] == "gpu" else "-"
        lines.append(f"| {r['model']} | {r['precision']} | {r['mode']} | {r['decode']} | {fmt(r['e2e_img_s'])} | "
                     f"{fmt(r['model_only_img_s'])} | {fmt(r['efficiency'], '.3f')} | {r['setup_s']:.1f} | "
                     f"{fmt(r['peak_gpu_gib'], '.2f')} | {cos} | {fb} | {r['slowest']} |")
    for r in extras:
        if "error" in r:
            lines += ["", f"{r['extra']}: failed: {r['error']}"]
        elif r["extra"] == "batch_probe":
            lines += ["", f"batch_probe (resnet50 bf16 eager, cpu decode): img/s by batch {r['batch_probe']}; chose "
                      f"{r['batch_size']}; end-to-end {fmt(r['e2e_img_s'])} img/s, peak GPU {fmt(r['peak_gpu_gib'], '.2f')} GiB."]
        else:
            lines += ["", f"decode_device = auto (resnet50 bf16 eager): measured {r['decode_probe']} img/s, chose "
                      f"{r['decode_device']}; end-to-end {fmt(r['e2e_img_s'])} img/s (setup {r['setup_s']:.1f} s)."]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped) + "."]
    text = "\n".join(lines).rstrip() + "\n"
    print("\n" + text)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(text)
    payload = {"command": cmd, "device": args.device, "gpu": gpu_name, "torch": torch.__version__, "photos": photos_what,
               "manifest": manifest_how, "tests": tests, "runs": runs, "extras": extras, "skipped": skipped,
               "seconds": round(total_s, 1)}
    if out_env:
        Path(out_env).mkdir(parents=True, exist_ok=True)
        (Path(out_env) / "bench_gpu.json").write_text(json.dumps(payload, indent=2, default=str))
        if results.parent != Path(out_env):
            shutil.copy(results, Path(out_env) / results.name)
    shutil.rmtree(tmp, ignore_errors=True)
    failed = [r for r in runs + extras if "error" in r]
    return 1 if failed or (tests is not None and tests["rc"] not in (0, 5)) else 0


if __name__ == "__main__":
    sys.exit(main())
