"""Checks that run before any Spark or torch work: a mistake found in seconds, not after the manifest job.

Each check raises ``ValueError`` (an expected error: the CLI prints one ``imgfeat: error: ...`` line)
naming the option or path at fault. Nothing here starts Spark, builds a model or reads image bytes.
"""
from __future__ import annotations

import logging
import os
import uuid

import fsspec

from imgfeat.metadata.config import Config, FeaturizeConfig
from imgfeat.metadata.contracts.schema import read_summary
from imgfeat.metadata.storage import join

log = logging.getLogger(__name__)


def check_writable(url: str, option: str) -> None:
    """Create ``url`` as a folder if needed and prove it takes a file (written and removed again)."""
    try:
        fs, root = fsspec.core.url_to_fs(url)
        fs.makedirs(root, exist_ok=True)
        probe = join(root, f".imgfeat-write-probe-{uuid.uuid4().hex[:8]}")
        with fs.open(probe, "wb") as fh:
            fh.write(b"ok")
        fs.rm(probe)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{option} {url}: cannot write there ({type(exc).__name__}: {exc})") from None


def check_weights(fcfg: FeaturizeConfig) -> None:
    """The model and its weights can be had on this machine without loading them.

    torchvision weights must be in the torch cache or in an installed offline-weights package;
    otherwise torchvision's own download into the cache is tried now, once (offline it fails at once)."""
    if fcfg.model_path:
        _check_file(fcfg.model_path, "featurize.model_path")
        return
    from torchvision.models import list_models

    if fcfg.model not in list_models():
        raise ValueError(f"featurize.model: {fcfg.model!r} is not a torchvision model (see torchvision.models.list_models())")
    if fcfg.weights_path:
        _check_file(fcfg.weights_path, "featurize.weights_path")
        return
    from imgfeat.featurize.weights import NO_WEIGHTS, cached_checkpoint, seed_cache_from_packages, weights_enum

    if fcfg.weights in NO_WEIGHTS:
        return
    enum = weights_enum(fcfg.model, fcfg.weights)
    target = cached_checkpoint(enum)
    if os.path.exists(target) or seed_cache_from_packages(enum, target):
        return
    name = os.path.basename(enum.url)
    try:
        import torch

        os.makedirs(os.path.dirname(target), exist_ok=True)
        torch.hub.download_url_to_file(enum.url, target, progress=False)
        return
    except Exception as exc:  # offline: URLError, timeouts, proxies refusing
        reason = f"{type(exc).__name__}: {exc}"
    raise ValueError(
        f"featurize.weights: {fcfg.model} weights {enum} are not in the torch cache ({target}) and could not be "
        f"downloaded ({reason}). Pass --weights-path FILE (a local state_dict), copy {name} to {target} "
        f"($TORCH_HOME chooses the cache), or --weights none for random weights."
    )


def _check_file(url: str, key: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.isfile(path):
        raise ValueError(f"{key}: no such file {url!r}")


def preflight_run(cfg: Config, run_dir: str, sources: list[str]) -> None:
    """Everything ``imgfeat run`` can check before its first stage: sources, the run folder, weights."""
    from imgfeat.metadata.manifest.listing import check_source

    stages = cfg.run.stages
    if "manifest" in stages:
        for src in sources:
            check_source(src)
    else:
        read_summary(run_dir)  # a clear error when there is no manifest to build on
    check_writable(run_dir, "--out")
    if "featurize" in stages:
        check_weights(cfg.featurize)
    log.debug("preflight passed for %s", run_dir)
