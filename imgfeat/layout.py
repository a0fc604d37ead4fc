"""The run folder of ``imgfeat run``: where each stage writes, and the files the application adds.

RUN/ holds the manifest (``manifest/``, ``manifest_summary.json``), ``prep/``, ``features/``, ``pca/``,
``neighbors/`` (with ``[neighbors] enabled``), ``tile_features/`` and ``tiles_pooled/`` (with ``[tiles] enabled``
and ``pooled``), ``config.resolved.toml``, ``run.json`` (what each stage ran
on and how long it took) and the report.
"""
from __future__ import annotations

from imgfeat.metadata.storage import join

RUN_STATE = "run.json"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
PREP_DIR = "prep"
FEATURES_DIR = "features"
PCA_DIR = "pca"
NEIGHBORS_DIR = "neighbors"
TILE_FEATURES_DIR = "tile_features"
TILES_POOLED_DIR = "tiles_pooled"


def run_paths(run: str) -> dict[str, str]:
    """Where each stage writes inside the run folder ``run``."""
    return {"manifest": run, "prep": join(run, PREP_DIR), "features": join(run, FEATURES_DIR), "pca": join(run, PCA_DIR),
            "neighbors": join(run, NEIGHBORS_DIR), "tile_features": join(run, TILE_FEATURES_DIR),
            "tiles_pooled": join(run, TILES_POOLED_DIR)}
