"""Featurize stage: model features for every manifest row, written as resumable shards keyed by image_id.

Library use::

    from imgfeat.featurize import read_features
    image_ids, matrix = read_features("FEAT")   # numpy arrays, shard order

Run it with ``imgfeat featurize`` (one process) or ``torchrun ... -m imgfeat.featurize`` (every rank).
"""
from imgfeat.metadata.contracts.feature_store import read_features

__all__ = ["read_features", "run_featurize"]


def run_featurize(*args, **kwargs):  # noqa: ANN002, ANN003 - thin lazy wrapper (keeps torch out of `import featurize`)
    """See ``featurize.runner.run_featurize``."""
    from imgfeat.featurize.runner import run_featurize as _run

    return _run(*args, **kwargs)
