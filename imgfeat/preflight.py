"""Checks that run before any Spark or torch work: a mistake found in seconds, not after the manifest job.

Each check raises ``ValueError`` (an expected error: the CLI prints one ``imgfeat: error: ...`` line)
naming the option or path at fault. Nothing here starts Spark, builds a model or reads image bytes.
"""
from __future__ import annotations

import logging

from imgfeat.metadata.config import Config
from imgfeat.metadata.contracts.schema import read_summary
from imgfeat.metadata.storage import check_writable

log = logging.getLogger(__name__)


def preflight_run(cfg: Config, run_dir: str, sources: list[str]) -> None:
    """Everything ``imgfeat run`` can check before its first stage: sources, the run folder, weights."""
    from imgfeat.metadata.manifest.listing import check_out_outside_sources, check_source

    stages = cfg.run.stages
    if "manifest" in stages:
        check_out_outside_sources(run_dir, [check_source(src) for src in sources])
    else:
        read_summary(run_dir)  # a clear error when there is no manifest to build on
    check_writable(run_dir, "--out")
    if "featurize" in stages:
        from imgfeat.featurize.weights import check_weights

        check_weights(cfg.featurize)
    log.debug("preflight passed for %s", run_dir)
