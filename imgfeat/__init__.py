"""imgfeat: image collections to model features.

A Spark job builds the manifest, PyTorch under torchrun computes features into atomic, resumable shards,
and Spark joins them back and runs PCA. The stages are sub-packages: ``imgfeat.metadata`` (the
contracts, the manifest and PCA jobs), ``imgfeat.preprocess`` (decoding, transforms, DataLoader, prep
export) and ``imgfeat.featurize`` (torchrun featurization). This package is the application on top:
the ``imgfeat`` command (``imgfeat.cli``), ``imgfeat run`` (``imgfeat.run``), the report and
``imgfeat verify``. Importing it loads nothing heavy.
"""
