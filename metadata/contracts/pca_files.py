"""File names of the pca stage's output folder (RED/), read by ``imgfeat run``, the report and ``verify``.

RED/ holds ``reduced/`` (Parquet: image_id, manifest columns, the k components), ``pca_model.npz``
(mean, scale, components, explained variance: numpy alone reads it), ``pca_summary.json`` (or
``pca_apply_summary.json`` for ``--apply``), ``config.resolved.toml`` and the plots.
"""
from __future__ import annotations

REDUCED_DIR = "reduced"
MODEL_FILE = "pca_model.npz"
PCA_SUMMARY = "pca_summary.json"
APPLY_SUMMARY = "pca_apply_summary.json"
