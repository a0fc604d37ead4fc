"""One torchrun rank of ``bench_featurize_scale.py --torchrun``: featurize's own start-up reads, no model.

    torchrun --standalone --nproc-per-node W bench/featurize_scale_rank.py MANIFEST_DIR RESULTS_DIR

As ``featurize.runner.run_featurize`` does: rank 0 reads the shard index (``assign.shard_catalog``) and
broadcasts it with the pending shards (all of them: nothing is committed here); each rank takes its
block (``assign.assign``) and reads its shards' rows (``assign.read_shard_rows``) through a filesystem
that counts every byte read, then writes ``rank-R.json`` (bytes, rows, seconds) to RESULTS_DIR.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.countfs import CountingFS  # noqa: E402  (registers countfile://)
from imgfeat.featurize import assign as assign_mod  # noqa: E402
from imgfeat.featurize.distributed import init_distributed, shutdown  # noqa: E402


def main() -> None:
    manifest, results = sys.argv[1], Path(sys.argv[2])
    url = "countfile://" + manifest
    ctx = init_distributed()
    try:
        CountingFS.bytes_read = 0
        t0 = time.perf_counter()
        catalog = assign_mod.shard_catalog(url) if ctx.is_main else None
        catalog = ctx.broadcast(catalog)
        if catalog is None:
            raise SystemExit(f"{manifest}: no shard index")
        mine = assign_mod.assign(sorted(catalog), ctx.rank, ctx.world_size)
        work = assign_mod.read_shard_rows(url, mine, catalog=catalog)
        seconds = time.perf_counter() - t0
        (results / f"rank-{ctx.rank}.json").write_text(json.dumps({
            "rank": ctx.rank, "world": ctx.world_size, "bytes": CountingFS.bytes_read, "seconds": seconds,
            "rows": sum(len(w) for w in work.values()), "shards": len(mine)}))
        ctx.barrier()
    finally:
        shutdown(ctx)


if __name__ == "__main__":
    main()
