"""Benchmark: our pca stage vs Spark ML's PCA on the same feature shards, in one local Spark session.

    .venv/bin/python bench/bench_pca.py [--rows 90000] [--dim 2048] [--k 64] [--skip-sparkml] [--scale 3]
        [--repeats 3] [--native-blas DIR]   # also run the Spark ML baseline with a native OpenBLAS (child process)

``--native-blas DIR``: Debian's OpenBLAS unpacked (no root needed), e.g.
``apt-get download libopenblas0-pthread libgfortran5 && for d in *.deb; do dpkg-deb -x $d DIR; done``.

Generates float32 feature shards (``--rows-per-shard`` rows each, low-rank signal + noise) and a matching
manifest under ``--workdir`` (reused when present), then times, end to end (read the shards, join the
manifest, fit, transform, write Parquet) and for the fit alone:

* ours: ``imgfeat.metadata.pca.job.run_pca`` (moments on executors, one eigh on the driver), plots off;
* Spark ML: the same shard reader (``features_dataframe``), join, ``array_to_vector``, cache,
  ``PCA.fit`` on the training split, ``transform``, ``vector_to_array``, Parquet written by our writer;
* ours again at ``--scale`` times the rows.

Writes a markdown table to ``--results`` (bench/RESULTS-pca.md). Spark ML runs once (it takes minutes);
ours runs ``--repeats`` times in a row: the speed-up is given for its first run (the one a user gets
after the same tiny warm-up as Spark ML) and for the median.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from imgfeat.metadata.contracts import feature_store  # noqa: E402
from imgfeat.metadata.contracts.schema import MANIFEST_DIR, MANIFEST_SCHEMA, SUMMARY_FILE, image_id_for  # noqa: E402


def generate(root: Path, rows: int, dim: int, per_shard: int, seed: int = 0) -> tuple[str, str]:
    """Feature shards + manifest for ``rows`` images; reused when a matching stamp exists."""
    stamp = root / "stamp.json"
    want = {"rows": rows, "dim": dim, "per_shard": per_shard, "seed": seed, "version": 1}
    man, feat = root / "out", root / "feat"
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return str(man), str(feat)
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rank = min(100, dim)
    basis = np.linalg.qr(rng.standard_normal((dim, rank)))[0].T.astype(np.float32)  # [rank, dim]
    sig = (30.0 * 0.93 ** np.arange(rank)).astype(np.float32)
    offset = rng.uniform(0.0, 1.0, dim).astype(np.float32)
    labels = [f"class_{i:03d}" for i in range(131)]
    t = time.perf_counter()
    man_rows = []
    for s, start in enumerate(range(0, rows, per_shard)):
        n = min(per_shard, rows - start)
        paths = [f"file:///data/fruits/{labels[(start + i) % len(labels)]}/{start + i:07d}.jpg" for i in range(n)]
        ids = [image_id_for(p) for p in paths]
        z = rng.standard_normal((n, rank), dtype=np.float32) * sig
        x = np.abs(z @ basis + offset + 0.3 * rng.standard_normal((n, dim), dtype=np.float32))
        feature_store.write_feature_shard(str(feat), s, ids, x.astype(np.float32), [], "npy", "bench")
        for i, (p, image_id) in enumerate(zip(paths, ids)):
            li = (start + i) % len(labels)
            h = (start + i) % 10
            man_rows.append({"image_id": image_id, "path": p, "rel_path": p.rsplit("/", 2)[-2] + "/" + p.rsplit("/", 1)[-1],
                             "label": labels[li], "label_index": li, "split": "train" if h < 8 else ("val" if h == 8 else "test"),
                             "size_bytes": 5000, "mtime": 0.0, "format": "jpeg", "width": 100, "height": 100, "channels": 3,
                             "content_hash": None, "duplicate_of": None, "status": "ok", "status_detail": "", "shard": s})
    (man / MANIFEST_DIR).mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(man_rows, schema=MANIFEST_SCHEMA), man / MANIFEST_DIR / "part-00000.parquet")
    (man / SUMMARY_FILE).write_text(json.dumps({"total": rows, "by_status": {"ok": rows}, "version": 1,
                                                "num_shards": (rows + per_shard - 1) // per_shard, "fingerprint": "bench"}))
    stamp.write_text(json.dumps(want))
    print(f"generated {rows} x {dim} in {time.perf_counter() - t:.1f} s under {root}", flush=True)
    return str(man), str(feat)


def driver_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def jvm_peak_mb(spark) -> float:
    pid = spark._jvm.java.lang.ProcessHandle.current().pid()
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def ours(spark, cfg, man: str, feat: str, out: str) -> dict:
    from imgfeat.metadata.pca.job import run_pca

    t = time.perf_counter()
    s = run_pca(cfg, man, feat, out, spark=spark, plots=False)
    total = time.perf_counter() - t
    return {"total_s": total, "fit_s": s["timings_s"]["fit"], "timings": s["timings_s"], "rows": s["output_rows"],
            "k": s["k"], "evr": s["explained_variance_ratio_total"], "fit_parts": s["model_info"]}


def sparkml(spark, man: str, feat: str, out: str, k: int) -> dict:
    from pyspark import StorageLevel
    from pyspark.ml.feature import PCA
    from pyspark.ml.functions import array_to_vector, vector_to_array
    from pyspark.sql import functions as F

    from imgfeat.metadata.contracts.schema import manifest_path
    from imgfeat.metadata.pca.project import REDUCED_SCHEMA
    from imgfeat.metadata.pca.shard_io import features_dataframe
    from imgfeat.metadata.spark.parquet import read_parquet_dataset, write_parquet_dataset

    t0 = time.perf_counter()
    feats = features_dataframe(spark, feat)
    mdf = read_parquet_dataset(spark, manifest_path(man), columns=["image_id", "path", "label", "label_index", "split"])
    vec = (feats.join(mdf, "image_id")
           .select("image_id", "path", "label", "label_index", "split", array_to_vector(F.col("features")).alias("v"))
           .persist(StorageLevel.MEMORY_AND_DISK))
    n = vec.count()
    read_s = time.perf_counter() - t0
    t = time.perf_counter()
    model = PCA(k=k, inputCol="v", outputCol="p").fit(vec.filter(F.col("split") == "train"))
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    res = model.transform(vec).select("image_id", "path", "label", "label_index", "split",
                                      vector_to_array(F.col("p"), "float32").alias("features_pca"))
    w = write_parquet_dataset(res, out, REDUCED_SCHEMA)
    write_s = time.perf_counter() - t
    vec.unpersist()
    return {"total_s": time.perf_counter() - t0, "fit_s": fit_s, "read_join_cache_s": read_s,
            "transform_write_s": write_s, "rows": w["rows"], "joined": n,
            "evr": float(np.sum(model.explainedVariance.toArray()))}


def make_session(master: str, driver_memory: str, native_blas: str | None):
    from imgfeat.metadata.config import SparkConfig
    from imgfeat.metadata.spark.session import get_spark

    conf = {}
    if native_blas:
        lib = Path(native_blas) / "usr/lib/x86_64-linux-gnu"
        os.environ["LD_LIBRARY_PATH"] = f"{lib}:{lib / 'openblas-pthread'}:" + os.environ.get("LD_LIBRARY_PATH", "")
        conf["spark.driver.extraJavaOptions"] = (
            f"-Ddev.ludovic.netlib.blas.nativeLibPath={lib / 'openblas-pthread/libblas.so.3'} "
            f"-Ddev.ludovic.netlib.lapack.nativeLibPath={lib / 'openblas-pthread/liblapack.so.3'}")
    return get_spark(SparkConfig(master=master, driver_memory=driver_memory, conf=conf))


def blas_impl(spark) -> str:
    jvm = spark._jvm
    return (f"{jvm.dev.ludovic.netlib.blas.BLAS.getInstance().getClass().getSimpleName()} / "
            f"{jvm.dev.ludovic.netlib.lapack.LAPACK.getInstance().getClass().getSimpleName()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=90_000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--rows-per-shard", type=int, default=1000)
    ap.add_argument("--scale", type=int, default=3, help="also run ours at this many times the rows (0: skip)")
    ap.add_argument("--skip-sparkml", action="store_true")
    ap.add_argument("--repeats", type=int, default=3, help="runs of ours at 1x (first and median reported)")
    ap.add_argument("--native-blas", metavar="DIR", help="root of an extracted libopenblas0-pthread (+ libgfortran5) .deb")
    ap.add_argument("--sparkml-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--driver-memory", default="8g")
    ap.add_argument("--workdir", default="/tmp/imgfeat-bench-pca")
    ap.add_argument("--results", default=str(REPO / "bench" / "RESULTS-pca.md"))
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    work = Path(args.workdir)
    man, feat = generate(work / f"d{args.rows}x{args.dim}", args.rows, args.dim, args.rows_per_shard)
    spark = make_session(args.master, args.driver_memory, args.native_blas if args.sparkml_only else None)
    if args.sparkml_only:
        wman, wfeat = generate(work / "warmup", 2000, 64, 500)
        sparkml(spark, wman, wfeat, str(work / "warm-sparkml"), 4)
        r = sparkml(spark, man, feat, str(work / "red-sparkml-native"), args.k)
        r["blas"] = blas_impl(spark)
        print("RESULT " + json.dumps(r), flush=True)
        return 0

    from imgfeat.metadata.config import Config

    cfg = Config()
    cfg.spark.master = args.master
    cfg.pca.k = args.k
    cfg.validate()
    # Warm up the JVM (JIT, codegen) and the Python workers on a tiny data set, for both paths; not timed.
    wman, wfeat = generate(work / "warmup", 2000, 64, 500)
    wcfg = Config()
    wcfg.pca.k = 4
    ours(spark, wcfg, wman, wfeat, str(work / "warm-ours"))
    if not args.skip_sparkml:
        sparkml(spark, wman, wfeat, str(work / "warm-sparkml"), 4)
    results: dict[str, Any] = {}  # a dict of figures per contender, and "load": (start, end)
    load0 = os.getloadavg()[0]
    print("ours ...", flush=True)
    runs = [ours(spark, cfg, man, feat, str(work / "red-ours")) for _ in range(max(1, args.repeats))]
    results["ours"] = dict(runs[0], repeats=[round(r["total_s"], 2) for r in runs],
                           median_s=float(np.median([r["total_s"] for r in runs])))
    results["ours"]["driver_py_peak_mb"] = driver_rss_mb()
    results["ours"]["jvm_peak_mb"] = jvm_peak_mb(spark)
    print(json.dumps(results["ours"]), flush=True)
    if args.scale > 1:
        rows3 = args.rows * args.scale
        man3, feat3 = generate(work / f"d{rows3}x{args.dim}", rows3, args.dim, args.rows_per_shard, seed=1)
        print(f"ours x{args.scale} ...", flush=True)
        results["ours_x"] = ours(spark, cfg, man3, feat3, str(work / "red-ours-x"))
        results["ours_x"]["driver_py_peak_mb"] = driver_rss_mb()
        results["ours_x"]["jvm_peak_mb"] = jvm_peak_mb(spark)
        print(json.dumps(results["ours_x"]), flush=True)
    if not args.skip_sparkml:
        print("Spark ML (pure-JVM BLAS) ...", flush=True)
        results["sparkml"] = sparkml(spark, man, feat, str(work / "red-sparkml"), args.k)
        results["sparkml"]["blas"] = blas_impl(spark)
        print(json.dumps(results["sparkml"]), flush=True)
    spark.stop()
    if args.native_blas and not args.skip_sparkml:
        print("Spark ML (native OpenBLAS, child process) ...", flush=True)
        cmd = [sys.executable, __file__, "--sparkml-only", "--native-blas", args.native_blas, "--rows", str(args.rows),
               "--dim", str(args.dim), "--k", str(args.k), "--rows-per-shard", str(args.rows_per_shard),
               "--master", args.master, "--driver-memory", args.driver_memory, "--workdir", args.workdir]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if line:
            results["sparkml_native"] = json.loads(line[-1][7:])
            print(json.dumps(results["sparkml_native"]), flush=True)
        else:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
    results["load"] = (load0, os.getloadavg()[0])
    report(args, results, argv if argv is not None else sys.argv[1:])
    return 0


def report(args: argparse.Namespace, r: dict[str, Any], argv: list[str]) -> None:
    o = r["ours"]
    lines = [
        "# PCA stage benchmark",
        "",
        f"Command: `.venv/bin/python bench/bench_pca.py {' '.join(argv)}`",
        "",
        f"Data: {args.rows:,} x {args.dim} float32 feature shards ({args.rows_per_shard} rows/shard, npy), "
        f"k = {args.k}, fit on the train split (80 %), master `{args.master}`, driver memory {args.driver_memory}, "
        f"{os.cpu_count()} cores. Each configuration ran once, in one Spark session (Spark ML with native BLAS in a "
        "child process, since JVM options are fixed at launch). Both paths were warmed up first on a tiny "
        "data set (2,000 x 64), untimed.",
        "",
        "End to end = read + verify the shards, join the manifest, fit, transform, write `reduced/` Parquet "
        "(plots off). Ours' fit includes reading the shards; Spark ML's fit runs on a cached, already joined "
        "vector DataFrame (so its fit time excludes reading).",
        "",
        "| configuration | rows | end to end (s) | fit (s) | explained var. | speed-up end to end |",
        "|---|---:|---:|---:|---:|---:|",
        f"| ours (moments + eigh), first run | {o['rows']:,} | {o['total_s']:.1f} | {o['fit_s']:.1f} | {o['evr']:.4f} | |",
        f"| ours, median of {len(o['repeats'])} runs {o['repeats']} | {o['rows']:,} | {o['median_s']:.1f} | | | |",
    ]
    for key, name in (("sparkml", "Spark ML PCA, pure-JVM BLAS (pip pyspark)"),
                      ("sparkml_native", "Spark ML PCA, native OpenBLAS")):
        if key in r:
            s = r[key]
            lines.append(f"| {name} [{s.get('blas', '')}] | {s['rows']:,} | {s['total_s']:.1f} | {s['fit_s']:.1f} | "
                         f"{s['evr']:.4f} | ours {s['total_s'] / o['total_s']:.1f}x faster on its first run, "
                         f"{s['total_s'] / o['median_s']:.1f}x on the median (fit {s['fit_s'] / o['fit_s']:.1f}x) |")
    if "ours_x" in r:
        x = r["ours_x"]
        lines.append(f"| ours, {args.scale}x rows | {x['rows']:,} | {x['total_s']:.1f} | {x['fit_s']:.1f} | {x['evr']:.4f} | "
                     f"time ratio to the 1x median: {x['total_s'] / o['median_s']:.2f} |")
    lines += ["", "Stage timings of ours (s):", ""]
    for key in ("ours", "ours_x"):
        if key in r:
            lines.append(f"- {key}: `{json.dumps(r[key]['timings'])}`, fit = `{json.dumps(r[key]['fit_parts'])}` + Spark scheduling")
    if "sparkml" in r:
        s = r["sparkml"]
        lines.append(f"- Spark ML: read+join+assemble+cache {s['read_join_cache_s']:.1f}, fit {s['fit_s']:.1f}, "
                     f"transform+write {s['transform_write_s']:.1f}")
    if "sparkml_native" in r:
        s = r["sparkml_native"]
        lines.append(f"- Spark ML native: read+join+assemble+cache {s['read_join_cache_s']:.1f}, fit {s['fit_s']:.1f}, "
                     f"transform+write {s['transform_write_s']:.1f}")
    lines += ["", f"Load average (1 min) at start / end: {r['load'][0]:.1f} / {r['load'][1]:.1f} "
              "(other jobs shared this 2-core machine when it is high: then the absolute seconds are inflated).", ""]
    lines += ["", "Driver memory: ours collects no rows to the driver (shard names, counts, and the per-task d x d "
              "sums, read and added one file at a time). Peak RSS of the driver's Python process after the 1x run: "
              f"{o['driver_py_peak_mb']:.0f} MB" + (f", after the {args.scale}x run: {r['ours_x']['driver_py_peak_mb']:.0f} MB"
                                                    if "ours_x" in r else "")
              + f"; the driver JVM (which in local mode also runs the executors) peaked at {o['jvm_peak_mb']:.0f} MB "
              f"(heap limit {args.driver_memory}) before the Spark ML run.", ""]
    Path(args.results).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
