"""File names and the Parquet schema of the neighbours stage's output folder (NB/).

NB/ holds ``neighbors/`` (Parquet, committed with ``_SUCCESS``: one row per (image, neighbour), best
first) and ``neighbors_summary.json`` (counts, near-duplicate, cross-split and cross-label pairs).
"""
from __future__ import annotations

import pyarrow as pa

NEIGHBORS_DIR = "neighbors"
NEIGHBORS_SUMMARY = "neighbors_summary.json"
STAGING_PREFIX = "_neighbors_staging-"
"""A dataset being written; published as ``neighbors/`` only when complete (removed by the next run if left)."""

NEIGHBORS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("neighbor_id", pa.string(), nullable=False),
        pa.field("cosine", pa.float32(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
    ]
)
"""``rank`` 1 is the most similar other image; an image is never its own neighbour."""

REDUCED_VECTOR = "features_pca"
"""The vector column of a pca ``reduced/`` dataset (``list<float>``, see ``metadata/pca/project.py``)."""
