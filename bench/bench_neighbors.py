"""Benchmark: ``imgfeat neighbors`` (IVF on Spark) against exact brute force in numpy, recall@k and time.

    .venv/bin/python bench/bench_neighbors.py [--rows 100000] [--dim 128] [--k 10] [--nprobe 4,8,16]
        [--master 'local[2]'] [--baseline-queries 0] [--workdir /tmp/bench-neighbors] [--results bench/RESULTS-neighbors.md]

Generates (once, reused when its stamp matches) ``--rows`` float32 feature vectors as npy shards of 1,000
rows plus a matching manifest, with the structure of real image embeddings (see :func:`generate`):
classes of power-law sizes grouped in super-categories, several modes per class, low-rank variation
inside a mode, a common component and ReLU (non-negative, as pooled CNN features), 1 % outliers
and 1 % planted near duplicates (half of them in another split, a tenth with another label).

Then, in one Spark session (warmed up on 2,000 rows first, untimed):

* ours: ``run_neighbors`` once per ``--nprobe`` value, end to end (read and verify the shards, codebook,
  assign, search, merge, write, report), with the peak RSS of every Spark Python worker and of the JVM
  sampled every 0.1 s (psutil);
* baseline: exact top-k of every row by cosine in numpy (:func:`imgfeat.metadata.neighbors.ivf.brute_force`,
  blocked products, BLAS on all cores) in this process; ``--baseline-queries N`` computes N queries only and
  extrapolates the time;
* recall@k of each run against the baseline on every baseline query (at least 1,000).

Writes a markdown report to ``--results``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from imgfeat.metadata.config import Config  # noqa: E402
from imgfeat.metadata.contracts import feature_store  # noqa: E402
from imgfeat.metadata.contracts.schema import MANIFEST_DIR, MANIFEST_SCHEMA, SUMMARY_FILE, image_id_for  # noqa: E402
from imgfeat.metadata.neighbors import ivf  # noqa: E402
from imgfeat.metadata.neighbors.job import NeighborParams, run_neighbors  # noqa: E402

PER_SHARD = 1000


def embeddings(rows: int, dim: int, seed: int, common: float = 0.3, noise: float = 1.5,
               zscale: float = 3.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features [rows, dim] float32, label index per row, source row of a planted near duplicate or -1)."""
    rng = np.random.default_rng(seed)
    n_super, n_class = 20, 200
    shared = np.abs(rng.standard_normal(dim)) * common                      # what every image shares
    supers = rng.standard_normal((n_super, dim)) * 1.0
    class_super = rng.integers(n_super, size=n_class)
    classes = supers[class_super] + rng.standard_normal((n_class, dim)) * 0.8
    class_p = 1.0 / np.arange(1, n_class + 1) ** 0.8                      # power-law class sizes
    class_p /= class_p.sum()
    modes_per = rng.integers(1, 9, size=n_class)                          # poses, backgrounds, ...
    mode_class = np.repeat(np.arange(n_class), modes_per)
    modes = classes[mode_class] + rng.standard_normal((len(mode_class), dim)) * 0.6
    rank = 10
    bases = rng.standard_normal((len(mode_class), rank, dim)) / np.sqrt(dim)  # low-rank variation in a mode
    scales = rng.uniform(0.5, 1.5, size=len(mode_class))
    label = rng.choice(n_class, size=rows, p=class_p)
    mode = np.empty(rows, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(modes_per)[:-1]])
    mode[:] = starts[label] + (rng.random(rows) * modes_per[label]).astype(np.int64)
    x = np.empty((rows, dim), dtype=np.float32)
    for s in range(0, rows, 10_000):
        m = mode[s:s + 10_000]
        z = rng.standard_normal((len(m), rank)) * zscale
        x[s:s + 10_000] = (shared + modes[m] + scales[m, None] * np.einsum("nr,nrd->nd", z, bases[m])
                           + noise * rng.standard_normal((len(m), dim)))
    outliers = rng.random(rows) < 0.01
    x[outliers] = rng.standard_normal((int(outliers.sum()), dim)) * 2.0 + shared
    x = np.maximum(x, 0.0)                                                 # ReLU, as pooled CNN features
    dup_of = np.full(rows, -1, dtype=np.int64)
    planted = np.flatnonzero(rng.random(rows) < 0.01)
    src = rng.integers(rows, size=planted.size)
    keep = src != planted
    planted, src = planted[keep], src[keep]
    x[planted] = x[src] * rng.uniform(0.9, 1.1, size=(planted.size, 1)) + 0.02 * np.abs(rng.standard_normal((planted.size, dim)))
    label[planted] = label[src]
    relabel = rng.random(planted.size) < 0.1
    label[planted[relabel]] = rng.integers(n_class, size=int(relabel.sum()))
    dup_of[planted] = src
    return x.astype(np.float32), label, dup_of


def generate(root: Path, rows: int, dim: int, seed: int = 0) -> dict[str, Any]:
    """Feature shards + manifest under ``root`` (reused when the stamp matches)."""
    stamp = root / "stamp.json"
    want = {"rows": rows, "dim": dim, "seed": seed, "per_shard": PER_SHARD, "version": 2}
    man, feat = root / "out", root / "feat"
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return {"manifest": str(man), "features": str(feat), **json.loads((root / "info.json").read_text())}
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    x, label, dup_of = embeddings(rows, dim, seed)
    rng = np.random.default_rng(seed + 1)
    split = np.where(rng.random(rows) < 0.8, "train", np.where(rng.random(rows) < 0.5, "val", "test"))
    cross = (dup_of >= 0) & (rng.random(rows) < 0.5)  # half the planted copies land in another split
    split[cross] = np.where(split[dup_of[cross]] == "train", "test", "train")
    names = [f"class_{i:03d}" for i in range(label.max() + 1)]
    paths = [f"file:///data/photos/{names[label[i]]}/{i:07d}.jpg" for i in range(rows)]
    ids = [image_id_for(p) for p in paths]
    man_rows = []
    for s, start in enumerate(range(0, rows, PER_SHARD)):
        stop = min(rows, start + PER_SHARD)
        feature_store.write_feature_shard(str(feat), s, ids[start:stop], x[start:stop], [], "npy", "bench")
        for i in range(start, stop):
            man_rows.append({"image_id": ids[i], "path": paths[i], "rel_path": paths[i].rsplit("/", 2)[-2] + "/" + f"{i:07d}.jpg",
                             "label": names[label[i]], "label_index": int(label[i]), "split": str(split[i]),
                             "size_bytes": 5000, "mtime": 0.0, "format": "jpeg", "width": 224, "height": 224, "channels": 3,
                             "content_hash": None, "duplicate_of": None, "status": "ok", "status_detail": "", "shard": s})
    (man / MANIFEST_DIR).mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(man_rows, schema=MANIFEST_SCHEMA), man / MANIFEST_DIR / "part-00000.parquet")
    (man / SUMMARY_FILE).write_text(json.dumps({"total": rows, "by_status": {"ok": rows}, "version": 1,
                                                "num_shards": (rows + PER_SHARD - 1) // PER_SHARD, "fingerprint": "bench"}))
    info = {"planted_pairs": int((dup_of >= 0).sum()), "planted_cross_split": int(cross.sum()),
            "planted_cross_label": int(((dup_of >= 0) & (label != label[np.maximum(dup_of, 0)])).sum())}
    (root / "info.json").write_text(json.dumps(info))
    stamp.write_text(json.dumps(want))
    return {"manifest": str(man), "features": str(feat), **info}


class RssSampler:
    """Peak RSS of the JVM and of each Spark Python worker (children of the JVM), sampled in a thread."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.jvm_mb = 0.0
        self.worker_mb = 0.0
        self.driver_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            try:
                self.driver_mb = max(self.driver_mb, me.memory_info().rss / 2**20)
                for child in me.children(recursive=True):
                    try:
                        rss = child.memory_info().rss / 2**20
                        cmd = " ".join(child.cmdline())
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
                    if "java" in child.name():
                        self.jvm_mb = max(self.jvm_mb, rss)
                    elif "pyspark" in cmd or "python" in child.name():
                        self.worker_mb = max(self.worker_mb, rss)
            except psutil.Error:
                pass
            self._stop.wait(self.interval)


def cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process and every process under it (the JVM, Spark's
    Python daemon and workers, and the reaped workers through their parents' children counters)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    total = own.ru_utime + own.ru_stime
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def load() -> float:
    return os.getloadavg()[0]


def read_neighbors(out: Path, ids: list[str], k: int) -> np.ndarray:
    """The written neighbours as row positions [rows, k] (-1 where a query has fewer)."""
    table = pq.read_table(out / "neighbors", columns=["image_id", "neighbor_id", "rank"])
    pos = {i: j for j, i in enumerate(ids)}
    q = np.array([pos[i] for i in table["image_id"].to_pylist()])
    r = np.asarray(table["rank"].to_numpy())
    grid = np.full((len(ids), k), -1, dtype=np.int64)
    grid[q, r - 1] = [pos[i] for i in table["neighbor_id"].to_pylist()]
    return grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--nprobe", default=f"{ivf.NPROBE}", help="comma-separated nprobe values, one run each")
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--driver-memory", default="4g")
    ap.add_argument("--baseline-queries", type=int, default=0, help="0 = every row (the full baseline)")
    ap.add_argument("--workdir", default="/tmp/bench-neighbors")
    ap.add_argument("--results", default=str(REPO / "bench" / "RESULTS-neighbors.md"))
    args = ap.parse_args()
    load_start = load()
    work = Path(args.workdir)
    t = time.perf_counter()
    data = generate(work / "data", args.rows, args.dim)
    gen_s = time.perf_counter() - t

    from imgfeat.metadata.spark.session import get_spark

    cfg = Config()
    cfg.spark.master = args.master
    cfg.spark.driver_memory = args.driver_memory
    cfg.validate()
    spark = get_spark(cfg.spark)
    warm = generate(work / "warmup", 2000, args.dim, seed=1)
    run_neighbors(cfg, warm["manifest"], warm["features"], str(work / "warm-nb"), NeighborParams(k=args.k), spark=spark)

    runs: list[dict[str, Any]] = []
    for nprobe in [int(v) for v in args.nprobe.split(",")]:
        out = work / f"nb-{nprobe}"
        la = load()
        with RssSampler() as rss:
            t, cpu = time.perf_counter(), cpu_seconds()
            summary = run_neighbors(cfg, data["manifest"], data["features"], str(out), NeighborParams(k=args.k, nprobe=nprobe),
                                    spark=spark)
            wall, cpu = time.perf_counter() - t, cpu_seconds() - cpu
        runs.append({"nprobe": nprobe, "wall_s": wall, "summary": summary, "worker_mb": rss.worker_mb, "jvm_mb": rss.jvm_mb,
                     "driver_mb": rss.driver_mb, "load": (la, load()), "out": out, "cpu_s": cpu})
        print(f"nprobe {nprobe}: {wall:.1f} s, {summary['timings_s']}", flush=True)
    driver_mb = max(r["driver_mb"] for r in runs)
    spark.stop()

    # the baseline: exact top-k by cosine in numpy, in this process
    ids_arr, x = feature_store.read_features(data["features"], verify=False)
    ids = ids_arr.tolist()
    la = load()
    t, cpu = time.perf_counter(), cpu_seconds()
    unit, ok = ivf.normalize_rows(x)
    nq = args.baseline_queries or args.rows
    queries = np.sort(np.random.default_rng(0).choice(args.rows, size=nq, replace=False)) if nq < args.rows else None
    exact, _ = ivf.brute_force(unit, args.k, queries)
    base_s, base_cpu = time.perf_counter() - t, cpu_seconds() - cpu
    base_load = (la, load())
    qidx = np.arange(args.rows) if queries is None else queries
    for r in runs:
        r["grid"] = read_neighbors(r["out"], ids, args.k)
        r["recall"] = ivf.recall_at_k(r["grid"][qidx].tolist(), exact.tolist())
        r["recall_min_q"] = float(np.mean([len(set(a) & set(b)) / args.k >= 0.5 for a, b in zip(r["grid"][qidx], exact)]))
    write_report(args, data, runs, (base_s, base_cpu), nq, base_load, driver_mb, gen_s, load_start)


def write_report(args: argparse.Namespace, data: dict[str, Any], runs: list[dict[str, Any]], base: tuple[float, float], nq: int,
                 base_load: tuple[float, float], driver_mb: float, gen_s: float, load_start: float) -> None:
    full = nq == args.rows
    base_s, base_cpu = base
    base_full = base_s if full else base_s * args.rows / nq
    cpu_full = base_cpu if full else base_cpu * args.rows / nq
    cmd = " ".join(["python", "bench/bench_neighbors.py", *sys.argv[1:]])
    lines = [
        "# Nearest neighbours benchmark (`imgfeat neighbors`)", "",
        f"Command: `.venv/bin/{cmd}`", "",
        f"Machine: {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, Spark master `{args.master}`, "
        f"driver memory {args.driver_memory}. Load average (1 min) at the start: {load_start:.1f}; other jobs share this "
        "machine when it is high, which inflates the seconds.", "",
        f"Data: {args.rows:,} x {args.dim} float32 feature vectors in npy shards of {PER_SHARD:,} rows, with a manifest "
        "(splits 80/10/10), generated in "
        f"{gen_s:.0f} s: 200 classes of power-law sizes in 20 super-categories, 1 to 8 modes per class, rank-10 variation "
        "inside a mode plus isotropic noise (it dominates: the exact first neighbour has the same label for about 91 % of "
        "rows, as a k-NN classifier on real image features), a common component and ReLU (non-negative, like pooled CNN features), "
        f"1 % outliers and {data['planted_pairs']:,} planted near duplicates (copies rescaled by 0.9 to 1.1 plus small "
        f"noise; {data['planted_cross_split']:,} put in another split, {data['planted_cross_label']:,} given another label).", "",
        f"Baseline: exact top-{args.k} by cosine in numpy (`ivf.brute_force`: blocked products, BLAS on all cores, "
        f"argpartition) over all {args.rows:,} rows, for "
        + (f"every row: {base_s:.1f} s, {base_cpu:.0f} CPU s" if full else f"{nq:,} sampled queries in {base_s:.1f} s "
           f"({base_cpu:.0f} CPU s), {base_full:.0f} s and {cpu_full:.0f} CPU s extrapolated to every row")
        + f" (load average {base_load[0]:.1f} / {base_load[1]:.1f} at start / end).", "",
        f"Recall@{args.k}: the share of the exact {args.k} neighbours that `imgfeat neighbors` returned, over "
        f"{nq:,} queries" + (" (every row)" if full else "") + ".", "",
        "CPU s: user + system seconds of every process of the run (driver, JVM, Python workers), which a busy machine "
        "inflates less than the wall time.", "",
        "| nprobe | cells | recall@10 | queries with >= 5 of 10 | end to end (s) | CPU s | baseline / ours (wall) | "
        "baseline / ours (CPU) | peak Python worker RSS (MB) | peak JVM RSS (MB) | load start / end |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        s = r["summary"]
        lines.append(f"| {r['nprobe']} | {s['index']['cells']} | {r['recall']:.4f} | {r['recall_min_q']:.4f} | {r['wall_s']:.1f} | "
                     f"{r['cpu_s']:.0f} | {base_full / r['wall_s']:.2f} | {cpu_full / r['cpu_s']:.2f} | {r['worker_mb']:.0f} | "
                     f"{r['jvm_mb']:.0f} | {r['load'][0]:.1f} / {r['load'][1]:.1f} |")
    lines += ["", "Stage timings (s) and index of each run:", ""]
    for r in runs:
        s = r["summary"]
        lines.append(f"- nprobe {r['nprobe']}: `{json.dumps(s['timings_s'])}`; index `{json.dumps(s['index'])}`")
    s = runs[0]["summary"]
    lines += [
        "", f"Summary of the first run: {s['output_rows']:,} neighbour rows, {s['queries_short']} queries short of "
        f"{s['expected_per_query']}; pairs with cosine >= {s['min_cosine']}: {s['near_duplicates']['pairs']:,}, across splits "
        f"{s['cross_split']['pairs']:,} ({json.dumps(s['cross_split']['by_splits'])}), across labels {s['cross_label']['pairs']:,}; "
        f"top-1 cosine {json.dumps(s['top1_cosine'])}.", "",
        f"Driver: peak RSS of the driver's Python process {driver_mb:.0f} MB during the runs (it holds the codebook sample, "
        "at most 20,000 x d float32, and the centroids); the driver JVM in local mode also runs the executors, so its "
        "peak includes the persisted vectors and the shuffles. Python workers were sampled every 0.1 s (psutil).",
    ]
    Path(args.results).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
