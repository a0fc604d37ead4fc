"""Featurize benchmark: efficiency (end-to-end vs model-only) and the seed baseline (Spark binaryFile + PIL UDF).

    .venv/bin/python bench/bench_featurize.py [--quick] [--device cpu|cuda] [--models resnet50,mobilenet_v2]
        [--images 512] [--size 224] [--precision fp32] [--batch-size 64] [--no-baseline]

* Efficiency = end-to-end images/s (``featurize.runner.run_featurize`` on real fruit photos: read, decode,
  resize, normalize on the device, forward, write shards) / model-only images/s (the same optimised model,
  batch, precision and device on synthetic normalized tensors already in memory). End-to-end is timed over
  the shard loop (``loop_s``); one-time setup (model build, warm-up) is reported apart.
* Seed baseline: ``spark.read.format("binaryFile")`` + a pandas UDF that decodes with PIL, applies
  torchvision's transforms and runs the plain model rebuilt from a ``sc.broadcast`` state dict (fp32, NCHW),
  on the same images and weights; ratio of images/s and per-image cosine against our features.
* Decode-worker policy (``--compare-workers``, first model only): end-to-end under the automatic plan
  (``featurize.runner.loader_workers``; ``preprocess.num_workers = -1``) against explicit worker counts
  (0 = decode in the main process), passes interleaved with the main measurement.

Needs ../shared (fruit photos, MobileNetV2 weights, seeded into a temporary TORCH_HOME). resnet50 has no
weights here: it runs with random weights (``--weights none``), which costs the same compute.
Writes the markdown table to bench/RESULTS-featurize.md (``--results`` to change).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import threading
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

from collections.abc import Iterator  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402


def weights_for(model: str) -> str:
    return "IMAGENET1K_V1" if model == "mobilenet_v2" else "none"


def make_manifest(tmp: Path, n: int, rows_per_shard: int) -> Path:
    from helpers import write_manifest
    from run_helpers import pick_images

    files = pick_images(FRUITS, "Training", per_class=10**6)
    step = max(1, len(files) // n)
    files = files[::step][:n]
    if len(files) < n:
        raise SystemExit(f"only {len(files)} images under {FRUITS}")
    return write_manifest(tmp / "manifest", files, rows_per_shard=rows_per_shard)


def config(model: str, args: argparse.Namespace) -> Any:
    from imgfeat.metadata.config import Config

    cfg = Config()
    f, p = cfg.featurize, cfg.preprocess
    f.model, f.weights, f.precision, f.device, f.format = model, weights_for(model), args.precision, args.device, "npy"
    f.compile = args.compile
    p.batch_size, p.size, p.resize_shorter = args.batch_size, args.size, round(args.size * 256 / 224)
    if args.num_workers is not None:
        p.num_workers = args.num_workers
    return cfg.validate()


class GpuSampler:
    """Mean GPU utilization (%) while running, from torch.cuda.utilization (NVML); None when unavailable."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stop = device, threading.Event()
        self.samples: list[float] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.samples.append(float(torch.cuda.utilization(self.device)))
            except Exception:
                return
            time.sleep(0.2)

    def __enter__(self) -> "GpuSampler":
        if self.device.type == "cuda":
            self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def end_to_end(cfg: Any, manifest: Path, tmp: Path, tag: str) -> dict[str, Any]:
    from imgfeat.featurize.model import resolve_device
    from imgfeat.featurize.runner import run_featurize

    out = tmp / f"feat-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    with GpuSampler(resolve_device(cfg.featurize.device)) as gpu:
        summary = run_featurize(cfg, str(manifest), str(out))
    if summary is None:
        raise RuntimeError("run_featurize returned no summary (not rank 0?)")
    t = summary["this_run"]
    rank = t["per_rank"][0]
    return {"images": t["images"], "loop_s": t["loop_s"], "setup_s": rank["setup_s"], "ips": t["images"] / t["loop_s"],
            "stages": t["stage_seconds"], "slowest": t["slowest_stage"], "gpu_util": gpu.mean, "out": out,
            "workers": rank.get("workers")}


def model_only(cfg: Any, n_images: int) -> dict[str, Any]:
    """The same optimised model on synthetic normalized batches already in memory (on the device)."""
    from imgfeat.featurize.distributed import DistContext, set_threads
    from imgfeat.featurize.model import autocast, build_model, resolve_device

    device = resolve_device(cfg.featurize.device)
    set_threads(DistContext(), device)
    model, _ = build_model(cfg.featurize, cfg.preprocess.size, device)
    bs, size = cfg.preprocess.batch_size, cfg.preprocess.size
    x = torch.randn(bs, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    if cfg.featurize.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    batches = max(1, round(n_images / bs))

    def step() -> None:
        with torch.inference_mode(), autocast(device, cfg.featurize.precision):
            model(x).float().cpu()

    step()  # warm-up, as the runner does
    with GpuSampler(device) as gpu:
        t = time.perf_counter()
        for _ in range(batches):
            step()
        dt = time.perf_counter() - t
    return {"images": batches * bs, "seconds": dt, "ips": batches * bs / dt, "gpu_util": gpu.mean}


def spark_baseline(manifest: Path, size: int, batch: int) -> dict[str, Any]:
    """The seed approach: binaryFile + a pandas UDF (PIL decode, torchvision transforms, broadcast model)."""
    from pyspark.sql import SparkSession
    from pyspark.sql.functions import col, pandas_udf
    from pyspark.sql.types import ArrayType, FloatType

    from imgfeat.metadata.contracts.schema import read_manifest

    paths = [p.removeprefix("file://") for p in read_manifest(str(manifest)).column("path").to_pylist()]
    os.environ["PYSPARK_PYTHON"] = os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    spark = (SparkSession.builder.master("local[2]").appName("bench-seed")
             .config("spark.driver.memory", "2g")
             .config("spark.sql.execution.arrow.pyspark.enabled", "true")
             .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch))
             .config("spark.python.worker.reuse", "true")
             .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
             .config("spark.executorEnv.PYTHONPATH", str(REPO))
             .getOrCreate())
    sc = spark.sparkContext
    from torchvision.models import mobilenet_v2

    state = torch.load(str(MOBILENET), map_location="cpu", weights_only=True)
    bc_state = sc.broadcast(state)  # the seeds broadcast the weights from the driver
    resize_shorter = round(size * 256 / 224)

    # pyspark's stubs lack the type-hint form (no functionType), which its docs recommend
    @pandas_udf(ArrayType(FloatType()))  # type: ignore[call-overload]
    def featurize_udf(content_iter: Iterator[pd.Series]) -> Iterator[pd.Series]:
        import io

        import torch as t
        from PIL import Image
        from torchvision import transforms

        t.set_num_threads(1)  # one task per core (local[2]); default threads would oversubscribe
        net = mobilenet_v2()
        net.load_state_dict(bc_state.value)
        net.classifier = t.nn.Identity()
        net.eval()
        tf = transforms.Compose([transforms.Resize(resize_shorter), transforms.CenterCrop(size), transforms.ToTensor(),
                                 transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
        for content in content_iter:
            x = t.stack([tf(Image.open(io.BytesIO(b)).convert("RGB")) for b in content])
            with t.no_grad():
                y = net(x)
            yield pd.Series(list(y.numpy()))

    def job(files: list[str]) -> tuple[list[Any], float]:
        t0 = time.perf_counter()
        df = spark.read.format("binaryFile").load(files)
        rows = df.select(col("path"), featurize_udf(col("content")).alias("f")).collect()
        return rows, time.perf_counter() - t0

    job(paths[:16])  # warm-up: JVM, Python workers
    rows, dt = job(paths)
    spark.stop()
    return {"images": len(rows), "seconds": dt, "ips": len(rows) / dt,
            "features": {r["path"]: np.asarray(r["f"], np.float32) for r in rows}}


def cosine_vs_ours(baseline: dict[str, np.ndarray], out: Path) -> tuple[float, float]:
    from imgfeat.metadata.contracts.feature_store import read_features
    from imgfeat.metadata.contracts.schema import image_id_for

    ids, feats = read_features(str(out))
    ours = dict(zip(ids.tolist(), feats))
    cos = []
    for path, ref in baseline.items():
        if path.startswith("file:") and not path.startswith("file://"):  # Spark writes file:/abs/path
            path = "file://" + path[len("file:"):]
        got = ours[image_id_for(path)]
        cos.append(float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got)))
    return min(cos), float(np.mean(cos))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="128 images, one repeat")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="mobilenet_v2,resnet50")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--rows-per-shard", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-workers", type=int, default=None)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--repeats", type=int, default=2, help="best of N for each measurement")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--compare-workers", default="2,1,0",
                    help="explicit worker counts to compare with the automatic plan on the first model ('' = none)")
    ap.add_argument("--results", default=str(REPO / "bench" / "RESULTS-featurize.md"))
    args = ap.parse_args()
    if args.quick:
        args.images, args.repeats, args.rows_per_shard = 128, 1, 128
    if not FRUITS.exists() or not MOBILENET.exists():
        print(f"skipped: {SHARED} is absent (fruit photos and MobileNetV2 weights)")
        return 0
    import logging

    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="bench-featurize-"))
    home = tmp / "torch_home" / "hub" / "checkpoints"
    home.mkdir(parents=True)
    shutil.copy(MOBILENET, home / MOBILENET.name)
    os.environ["TORCH_HOME"] = str(tmp / "torch_home")
    manifest = make_manifest(tmp, args.images, args.rows_per_shard)
    load_before = os.getloadavg()
    rows = []
    notes: list[str] = []
    e2e_out = {}
    compare = [int(w) for w in args.compare_workers.split(",") if w.strip()] if args.num_workers is None else []
    policy_rows: list[tuple[str, dict[str, Any]]] = []
    for m, model in enumerate(args.models.split(",")):
        cfg = config(model, args)
        e2es, mos = [], []
        alt: dict[int, list[dict[str, Any]]] = {w: [] for w in (compare if m == 0 else [])}
        for i in range(args.repeats):  # alternate, so drifting load on a shared machine hits both alike
            e2es.append(end_to_end(cfg, manifest, tmp, f"{model}-{i}"))
            mos.append(model_only(cfg, args.images))
            for w in alt:
                wcfg = config(model, args)
                wcfg.preprocess.num_workers = w
                alt[w].append(end_to_end(wcfg, manifest, tmp, f"{model}-w{w}-{i}"))
        e2e, mo = max(e2es, key=lambda r: r["ips"]), max(mos, key=lambda r: r["ips"])
        if alt:
            policy_rows.append((f"auto (num_workers = -1): {e2e['workers']} worker(s)", e2e))
            policy_rows += [(f"{w} worker(s)" if w else "0: decode in the main process (no crash "
                             "containment)", max(alt[w], key=lambda r: r["ips"])) for w in alt]
            policy_rows = [(name, dict(r, eff=r["ips"] / mo["ips"], model=model)) for name, r in policy_rows]
        e2e_out[model] = e2e["out"]
        rows.append((model, e2e, mo))
        print(f"{model}: end-to-end {e2e['ips']:.1f} img/s, model-only {mo['ips']:.1f} img/s, "
              f"efficiency {e2e['ips'] / mo['ips']:.3f}; stages {e2e['stages']}", flush=True)
    base = None
    if not args.no_baseline and "mobilenet_v2" in e2e_out and args.precision == "fp32":
        base = max((spark_baseline(manifest, args.size, args.batch_size) for _ in range(args.repeats)),
                   key=lambda r: r["ips"])
        cmin, cmean = cosine_vs_ours(base["features"], e2e_out["mobilenet_v2"])
        base.update(cos_min=cmin, cos_mean=cmean)
        ours = next(r[1]["ips"] for r in rows if r[0] == "mobilenet_v2")
        print(f"seed baseline: {base['ips']:.1f} img/s; ours {ours:.1f} img/s = {ours / base['ips']:.2f}x; "
              f"cosine min {cmin:.5f} mean {cmean:.5f}", flush=True)
    load_after = os.getloadavg()
    cmd = "bench/bench_featurize.py " + " ".join(sys.argv[1:])
    lines = [
        "# Featurize benchmark results",
        "",
        f"Command: `.venv/bin/python {cmd.strip()}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, device {args.device}; "
        f"{args.images} fruit photos (100x100 JPEG) at {args.size} px, batch {args.batch_size}, {args.precision}, "
        f"shards of {args.rows_per_shard}, best of {args.repeats}.  ",
        f"Load average (1 min) before/after: {load_before[0]:.1f} / {load_after[0]:.1f} "
        "(other jobs share this machine: absolute numbers are noisy, ratios less so).",
        "",
        "| model | end-to-end img/s | model-only img/s | efficiency | setup s | slowest stage | stage seconds |"
        + (" GPU util % (e2e / model) |" if args.device.startswith("cuda") else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if args.device.startswith("cuda") else ""),
    ]
    for model, e2e, mo in rows:
        st = ", ".join(f"{k} {v:.2f}" for k, v in e2e["stages"].items())
        line = (f"| {model} | {e2e['ips']:.1f} | {mo['ips']:.1f} | {e2e['ips'] / mo['ips']:.3f} | {e2e['setup_s']:.1f} | "
                f"{e2e['slowest']} | {st} |")
        if args.device.startswith("cuda"):
            line += f" {e2e['gpu_util'] or 0:.0f} / {mo['gpu_util'] or 0:.0f} |"
        lines.append(line)
    if policy_rows:
        lines += ["", f"Decode workers on this device ({policy_rows[0][1]['model']}, same model-only figure, best of "
                  f"{args.repeats}):", "", "| decode workers | end-to-end img/s | efficiency | forward s | transfer s |",
                  "|---|---|---|---|---|"]
        lines += [f"| {name} | {r['ips']:.1f} | {r['eff']:.3f} | {r['stages']['forward']:.2f} | "
                  f"{r['stages']['transfer']:.2f} |" for name, r in policy_rows]
    if base is not None:
        ours = next(r[1]["ips"] for r in rows if r[0] == "mobilenet_v2")
        lines += [
            "",
            "Seed approach (Spark `binaryFile` + pandas UDF, PIL decode + torchvision transforms, model rebuilt from a "
            "`sc.broadcast` state dict, fp32 NCHW, local[2], 1 torch thread per task) on the same images and weights:",
            "",
            "| pipeline | img/s | speed-up | cosine vs ours (min / mean) |",
            "|---|---|---|---|",
            f"| seed: Spark binaryFile + PIL pandas UDF | {base['ips']:.1f} | 1.00x | - |",
            f"| imgfeat featurize (mobilenet_v2, fp32) | {ours:.1f} | {ours / base['ips']:.2f}x | "
            f"{base['cos_min']:.5f} / {base['cos_mean']:.5f} |",
        ]
    lines += ["", *notes]
    text = "\n".join(lines).rstrip() + "\n"
    print("\n" + text)
    Path(args.results).write_text(text)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
