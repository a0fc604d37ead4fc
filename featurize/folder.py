"""Claim the output folder ``FEAT`` for this run (rank 0 only, before any rank computes).

Checks ``FEAT/_run.json`` against this run's fingerprint (refusing another run's shards unless
``featurize.overwrite``), removes what earlier attempts left (per-rank stats, stale temporaries, and
with overwrite the other run's shards and summary), writes ``_run.json`` and ``config.resolved.toml``,
and lists the shards still to compute.
"""
from __future__ import annotations

import logging
from typing import Any

import fsspec

from imgfeat.featurize import assign as assign_mod
from imgfeat.featurize import fingerprint as fp_mod
from imgfeat.featurize.summary import STATS_DIR
from imgfeat.metadata import storage
from imgfeat.metadata.config import Config, dump_toml
from imgfeat.metadata.contracts import shards
from imgfeat.metadata.contracts.schema import CONFIG_FILE

# The folder checks' messages keep the logger name they had before they moved out of ``runner``.
log = logging.getLogger("imgfeat.featurize.runner")


def prepare_folder(cfg: Config, out: str, fields: dict[str, Any], catalog: assign_mod.ShardCatalog) -> list[int]:
    """Rank 0 only: check/write the run file, clean temporaries, return the pending shards.

    ``fields``: the run fingerprint fields (``fingerprint.run_fingerprint``); ``catalog``: the manifest's
    shards (``assign.shard_catalog``). Raises ``ValueError`` when ``out`` holds another run's shards and
    overwrite is off. Costs O(shards): the markers and two listings of ``out``; no data file is read."""
    fs, path = fsspec.core.url_to_fs(out)
    fs.makedirs(path, exist_ok=True)
    digest = fp_mod.digest(fields)
    state = fp_mod.check_run_file(out, fields, cfg.featurize.overwrite)
    markers = {s: m for s, m in shards.list_markers(out).items() if m.get("kind") == "features"}
    foreign = sorted(s for s, m in markers.items() if m.get("fingerprint") != digest)
    if foreign and not cfg.featurize.overwrite:  # e.g. _run.json was deleted, but the old shards were not
        raise ValueError(
            f"{out}: shards {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''} carry another fingerprint "
            f"than this run ({digest}); use another --out, or --overwrite to replace them"
        )
    stats_dir = fsspec.core.url_to_fs(storage.join(out, STATS_DIR))[1]
    if fs.exists(stats_dir):  # per-rank stats of earlier attempts (no rank of this attempt has written yet)
        fs.rm(stats_dir, recursive=True)
    removed = shards.clean_stale_temporaries(out)
    if removed:
        log.info("removed %d stale temporaries: %s", len(removed), ", ".join(removed[:5]))
    if foreign:
        for stem in foreign:
            shards.remove_shard(out, stem)
        log.warning("--overwrite: removed %d shards of another run", len(foreign))
    if state != "same" or foreign:
        summary = storage.join(out, shards.FEATURES_SUMMARY)
        if fs.exists(fsspec.core.url_to_fs(summary)[1]):
            fs.rm(fsspec.core.url_to_fs(summary)[1])
    if state != "same":
        fp_mod.write_run_file(out, fields)
    storage.write_bytes_atomic(storage.join(out, CONFIG_FILE), dump_toml(cfg).encode())
    if foreign:
        gone = set(foreign)
        markers = {s: m for s, m in markers.items() if s not in gone}
    orphans = assign_mod.orphan_shards(out, catalog, markers)
    if orphans:
        log.warning("%s: %d committed shards are not in the manifest (%s...); read_features will include them",
                    out, len(orphans), orphans[0])
    return assign_mod.pending_shards(out, catalog, digest, markers, shards.folder_sizes(out))
