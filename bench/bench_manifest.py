"""Manifest job throughput against the seed approach (Spark binaryFile + a PIL decode UDF), same script.

    .venv/bin/python bench/bench_manifest.py [--copies 8] [--master local[2]]

Replicates ../shared/data/fruits360-100 ``--copies`` times (bytes made unique per copy by a trailer
after the JPEG end marker, so copies are not duplicates), then times in one Spark session:
  * baseline: ``binaryFile`` + a pandas UDF that decodes each file with PIL, written to Parquet;
  * ours: ``imgfeat manifest`` in ``full`` and in ``header`` mode, end to end (listing to Parquet), with
    its two stages: list + check (one Spark job, one Python task per core) and organize + write
    (one Spark job, one task).
Driver memory: the driver Python's RSS and the driver JVM's used heap after each run, at 1 copy and at
``--copies`` copies. Prints a markdown table and writes it to bench/RESULTS-manifest.md.
"""

import argparse
import gc
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FRUITS = REPO.parent / "shared" / "data" / "fruits360-100"


def replicate(dst: Path, copies: int) -> int:
    n = 0
    for c in range(copies):
        for src in FRUITS.rglob("*.jpg"):
            rel = src.relative_to(FRUITS)
            out = dst / rel.parent / f"c{c}_{rel.name}"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(src.read_bytes() + f"copy{c}".encode())
            n += 1
    return n


def baseline(spark, src: Path, out: Path) -> float:
    """The seed pipelines' check: binaryFile + PIL decode in a pandas UDF, results to Parquet."""
    import pandas as pd
    from pyspark.sql import functions as F
    from pyspark.sql.functions import pandas_udf

    @pandas_udf("struct<ok:boolean,width:int,height:int>")
    def pil_check(content: pd.Series) -> pd.DataFrame:
        import io

        from PIL import Image

        rows = []
        for b in content:
            try:
                with Image.open(io.BytesIO(b)) as im:
                    im = im.convert("RGB")
                    rows.append((True, im.width, im.height))
            except Exception:  # noqa: BLE001 - the seed caught everything
                rows.append((False, None, None))
        return pd.DataFrame(rows, columns=["ok", "width", "height"])

    t = time.perf_counter()
    df = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(str(src))
    df.select("path", "length", pil_check("content").alias("c")).select("path", "length", "c.*") \
      .write.mode("overwrite").parquet(str(out))
    return time.perf_counter() - t


def cold_cache() -> str:
    """Drop the page cache (root only) so every pipeline starts from the same cold disk; else warm all."""
    import subprocess

    proc = subprocess.run("sync && echo 3 > /proc/sys/vm/drop_caches", shell=True, capture_output=True)
    return "cold (page cache dropped before each run)" if proc.returncode == 0 else "as found (could not drop the page cache)"


def jvm_used_mb(spark) -> float:
    rt = spark.sparkContext._jvm.java.lang.Runtime.getRuntime()
    spark.sparkContext._jvm.java.lang.System.gc()
    return (rt.totalMemory() - rt.freeMemory()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--keep", help="reuse/keep the replicated tree in this folder")
    args = parser.parse_args()
    if not FRUITS.exists():
        sys.exit(f"skip: {FRUITS} is absent (see shared/README.md)")
    sys.path.insert(0, str(REPO))
    from imgfeat.metadata.config import load_config
    from imgfeat.metadata.manifest.job import run_manifest
    from imgfeat.metadata.spark.session import get_spark

    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-manifest-"))
    small, big = work / "x1", work / f"x{args.copies}"
    n_small = sum(1 for _ in small.rglob("*.jpg")) if small.exists() else replicate(small, 1)
    n_big = sum(1 for _ in big.rglob("*.jpg")) if big.exists() else replicate(big, args.copies)
    cfg = load_config(None, {"spark": {"master": args.master}})
    spark = get_spark(cfg.spark)
    rows = []
    # Warm-up: JVM, Python workers, page cache, for both paths.
    run_manifest(cfg, [str(small)], str(work / "warm"))
    baseline(spark, small, work / "warm_base")

    mem = []
    cache = ""
    for label, src, n in (("x1", small, n_small), (f"x{args.copies}", big, n_big)):
        gc.collect()
        for mode in ("full", "header"):
            cfg_mode = load_config(None, {"spark": {"master": args.master}, "manifest": {"validation": mode}})
            cache = cold_cache()
            summary = run_manifest(cfg_mode, [str(src)], str(work / f"out_{label}_{mode}"))
            assert summary["total"] == n, (summary["total"], n)
            rows.append((f"imgfeat manifest ({mode})", label, n, summary["timings"]["total_s"], summary["timings"]))
        mem.append((label, n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, jvm_used_mb(spark)))
        cache = cold_cache()
        secs = baseline(spark, src, work / f"base_{label}")
        rows.append(("baseline: binaryFile + PIL pandas UDF", label, n, secs, None))

    base = {r[1]: r[3] for r in rows if r[0].startswith("baseline")}
    lines = [
        f"Machine: {os.cpu_count()} cores, Spark master {args.master}, files {cache}. Command: "
        f"`.venv/bin/python bench/bench_manifest.py --copies {args.copies} --master '{args.master}'`",
        "",
        "| pipeline | data | files | seconds (end to end) | files/s | vs baseline | list + check s | organize + write s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, label, n, secs, stages in rows:
        ratio = base[label] / secs
        split = ("| | |" if stages is None else
                 f"| {stages['check_s']:.2f} | {stages['organize_s'] + stages['write_s']:.2f} |")
        lines.append(f"| {name} | {label} | {n} | {secs:.1f} | {n / secs:,.0f} | {ratio:.1f}x {split}")
    goals = {"full": 10, "header": 30}
    lines.append("")
    for name, label, n, secs, _ in rows:
        mode = name[name.find("(") + 1:-1] if name.startswith("imgfeat") else None
        if mode in goals and label != "x1":
            ratio = base[label] / secs
            lines.append(f"Goal for `{mode}` on {label}: at least {goals[mode]}x the baseline; measured "
                         f"{ratio:.1f}x: {'met' if ratio >= goals[mode] else 'NOT met'}.  ")
    lines += ["", "| data | files | driver Python max RSS (MB) | driver JVM used heap after GC (MB) |", "|---|---:|---:|---:|"]
    lines += [f"| {label} | {n} | {rss:.0f} | {heap:.0f} |" for label, n, rss, heap in mem]
    text = "\n".join(lines)
    print(text)
    (REPO / "bench" / "RESULTS-manifest.md").write_text("## Manifest job\n\n" + text + "\n")
    spark.stop()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
