"""Featurize stage: model features for every manifest row, written as resumable shards keyed by image_id.

Library use::

    from imgfeat.featurize import read_features
    image_ids, matrix = read_features("FEAT")   # numpy arrays, shard order

Run it with ``imgfeat featurize`` (one process) or ``torchrun ... -m imgfeat.featurize`` (every rank).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from imgfeat.metadata.contracts.feature_store import read_features

if TYPE_CHECKING:
    from imgfeat.metadata.config import Config

__all__ = ["read_features", "run_featurize"]


def run_featurize(cfg: Config, manifest: str, out: str, split: str | None = None) -> dict[str, Any] | None:
    """See ``featurize.runner.run_featurize`` (imported on first call: keeps torch out of ``import imgfeat.featurize``)."""
    from imgfeat.featurize.runner import run_featurize as _run

    return _run(cfg, manifest, out, split=split)
