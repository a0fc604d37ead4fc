"""Scratch folders of the pca stage under OUT (``_pca_scratch-*``).

The fit's tasks write their accumulators into one, and the projection writes the reduced dataset
into another before it is published as ``RED/reduced/``. A run removes every scratch folder when it
ends, and at its start those a killed run left behind.
"""
from __future__ import annotations

import uuid

import fsspec

from imgfeat.metadata import storage

SCRATCH_PREFIX = "_pca_scratch-"


def new_scratch(out: str) -> str:
    """A fresh scratch folder's URL under ``out`` (created by its first writer; removed by :func:`drop_scratch`)."""
    return storage.join(out, f"{SCRATCH_PREFIX}{uuid.uuid4().hex[:12]}")


def drop_scratch(out: str) -> None:
    """Remove every scratch folder under ``out`` (this run's and those of killed runs)."""
    fs, root = fsspec.core.url_to_fs(out)
    if not fs.exists(root):
        return
    for entry in fs.ls(root, detail=False):
        if entry.rstrip("/").rsplit("/", 1)[-1].startswith(SCRATCH_PREFIX):
            storage.remove_folder(fs.unstrip_protocol(entry))
