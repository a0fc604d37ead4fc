"""Build the feature model: a torchvision backbone (or a TorchScript / torch.export file) that maps a
normalized float batch [B, 3, H, W] to features [B, D], made fast for inference without changing its output.

* Default features: the pooled penultimate layer (the classifier's last ``nn.Linear`` becomes Identity).
* ``layer``: any graph node (``torchvision.models.feature_extraction``), globally pooled when spatial.
* Speed-ups: ``eval``, BatchNorm folded into the preceding conv (torch.fx; checked against the unfused
  model, cosine >= 0.9999, else dropped), ``channels_last``, optional ``torch.compile``; callers run it
  under ``torch.inference_mode`` and ``autocast`` (see ``autocast``).
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from imgfeat.featurize.weights import ResolvedWeights, resolve_weights
from imgfeat.metadata.config import FeaturizeConfig
from imgfeat.metadata.storage import file_sha256

log = logging.getLogger(__name__)

FUSE_MIN_COSINE = 0.9999


@dataclass
class ModelInfo:
    """What the run fingerprint and the summary say about the model."""

    model: str
    weights: str
    weights_sha256: str
    layer: str
    pool: str
    dim: int = 0
    fused_bn: bool = False
    channels_last: bool = False
    compiled: bool = False
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)


class GlobalPool(nn.Module):
    """Turn a backbone output (tensor, dict of one tensor, tuple) into [B, D] features."""

    def __init__(self, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max", "none"):
            raise ValueError(f"featurize.pool must be avg, max or none, got {pool!r}")
        self.pool = pool

    def forward(self, y: torch.Tensor | dict[str, torch.Tensor] | tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
        """[B, D] features of the backbone output ``y`` (its first tensor; pooled when spatial)."""
        if isinstance(y, dict):
            y = next(iter(y.values()))
        if isinstance(y, (tuple, list)):
            y = y[0]
        if y.dim() == 4:
            if self.pool == "avg":
                y = torch.nn.functional.adaptive_avg_pool2d(y, 1)
            elif self.pool == "max":
                y = torch.nn.functional.adaptive_max_pool2d(y, 1)
        return torch.flatten(y, 1) if y.dim() != 2 else y


class FeatureModel(nn.Module):
    """``body`` followed by ``GlobalPool``; the module the runner calls."""

    def __init__(self, body: nn.Module, pool: str) -> None:
        super().__init__()
        self.body = body
        self.head = GlobalPool(pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features [B, D] of the normalized batch ``x`` [B, 3, H, W]."""
        return self.head(self.body(x))


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA (this rank's GPU) when present, else CPU; ``cuda`` / ``cuda:N`` checked."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"featurize.device = {spec!r}, but CUDA is not available on this machine")
        if spec == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device(spec)
    raise ValueError(f"featurize.device must be auto, cpu or cuda[:N], got {spec!r}")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[object]:
    """The autocast context for ``precision`` (fp32: none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise ValueError(f"featurize.precision must be fp32, bf16 or fp16, got {precision!r}")
    return torch.autocast(device_type=device.type, dtype=dtype)


def strip_classifier(model: nn.Module) -> nn.Module:
    """Replace the last ``nn.Linear`` (the classifier) with Identity: the output is the pooled penultimate layer."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise ValueError(
            f"featurize.layer: {type(model).__name__} has no final nn.Linear to remove; name a layer with --layer "
            "(a node of torchvision.models.feature_extraction.get_graph_node_names)"
        )
    parent_name, _, child = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Identity())
    return model


def extract_layer(model: nn.Module, layer: str) -> nn.Module:
    """A module returning the output of graph node ``layer`` (torchvision feature_extraction)."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    model.eval()
    _, eval_nodes = get_graph_node_names(model)
    if layer not in eval_nodes and not any(n.startswith(layer + ".") for n in eval_nodes):  # a module = its last node
        tail = ", ".join(eval_nodes[-15:])
        raise ValueError(f"featurize.layer: no node {layer!r} in {type(model).__name__}; last nodes: {tail}")
    return create_feature_extractor(model, return_nodes={layer: "features"})


def load_model_file(path: str, device: torch.device) -> nn.Module:
    """A TorchScript (``torch.jit.save``) or exported (``torch.export.save``) model file, in eval mode."""
    if not os.path.exists(path):
        raise ValueError(f"featurize.model_path: no such file {path!r}")
    try:
        return torch.jit.load(path, map_location="cpu").eval()
    except Exception as jit_exc:  # not TorchScript: try torch.export
        try:
            return torch.export.load(path).module()
        except Exception as exp_exc:
            raise ValueError(
                f"featurize.model_path: {path} is neither TorchScript ({jit_exc}) nor a torch.export file ({exp_exc})"
            ) from None


def _cosine_min(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(1), b.float().flatten(1), dim=1).min())


def fold_batchnorm(body: nn.Module, probe: torch.Tensor) -> tuple[nn.Module, bool]:
    """BatchNorm folded into the preceding conv (torch.fx), kept only when its output matches the original."""
    from torch.fx.experimental.optimization import fuse

    try:
        fused = fuse(body)
    except Exception as exc:  # not symbolically traceable: keep the model as it is
        log.info("BatchNorm folding skipped (%s: %s)", type(exc).__name__, exc)
        return body, False
    with torch.inference_mode():
        ref = GlobalPool("avg")(body(probe))
        out = GlobalPool("avg")(fused(probe))
    cos = _cosine_min(ref, out)
    if cos < FUSE_MIN_COSINE:
        log.warning("BatchNorm folding changed the features (min cosine %.6f): not used", cos)
        return body, False
    return fused, True


def build_model(fcfg: FeaturizeConfig, size: int, device: torch.device) -> tuple[nn.Module, ModelInfo]:
    """The eval-mode feature model on ``device`` and what the fingerprint needs to know about it."""
    torch.manual_seed(0)  # random-init models (weights = none) are the same in every rank and run
    probe = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 4 - 2
    if fcfg.model_path:
        if fcfg.layer:
            raise ValueError("featurize.layer cannot be used with featurize.model_path (export the layer you want)")
        body = load_model_file(fcfg.model_path, device)
        info = ModelInfo(model=f"file:{os.path.basename(fcfg.model_path)}", weights="file",
                         weights_sha256=file_sha256(fcfg.model_path), layer="output", pool=fcfg.pool)
        fused = False
        if isinstance(body, torch.jit.ScriptModule) and device.type == "cpu" and fcfg.precision == "fp32":
            try:
                frozen = torch.jit.freeze(body)
                with torch.inference_mode():
                    cos = _cosine_min(GlobalPool("avg")(body(probe)), GlobalPool("avg")(frozen(probe)))
                if cos >= FUSE_MIN_COSINE:
                    body, fused = frozen, True
            except Exception as exc:
                log.info("torch.jit.freeze skipped (%s)", exc)
        info.fused_bn = fused
    else:
        from torchvision.models import get_model, list_models

        if fcfg.model not in list_models():
            raise ValueError(f"featurize.model: {fcfg.model!r} is not a torchvision model; see torchvision.models.list_models()")
        resolved: ResolvedWeights = resolve_weights(fcfg.model, fcfg.weights, fcfg.weights_path)
        model = get_model(fcfg.model, weights=None)
        if resolved.state_dict is not None:
            try:
                model.load_state_dict(resolved.state_dict)
            except RuntimeError as exc:
                raise ValueError(f"featurize.weights_path: the weights do not fit {fcfg.model}: {exc}") from None
        model.eval()
        body = extract_layer(model, fcfg.layer) if fcfg.layer else strip_classifier(model)
        body.eval()
        body, fused = fold_batchnorm(body, probe)
        info = ModelInfo(model=fcfg.model, weights=resolved.name, weights_sha256=resolved.sha256,
                         layer=fcfg.layer or "penultimate", pool=fcfg.pool, fused_bn=fused)
    model = FeatureModel(body, fcfg.pool).eval()
    with torch.inference_mode():
        info.dim = int(model(probe[:1]).shape[1])
    model = model.to(device)
    if fcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
        info.channels_last = True
    if fcfg.compile:
        model = torch.compile(model)
        info.compiled = True
    info.device = str(device)
    log.info("model %s (%s, layer %s): %d features, BN folded %s, channels_last %s, compile %s, on %s",
             info.model, info.weights, info.layer, info.dim, info.fused_bn, info.channels_last, info.compiled, device)
    return model, info


def reference_model(fcfg: FeaturizeConfig) -> nn.Module:
    """The plain (unoptimised) eval-mode CPU feature model, for checks and benchmarks."""
    from torchvision.models import get_model

    resolved = resolve_weights(fcfg.model, fcfg.weights, fcfg.weights_path)
    model = get_model(fcfg.model, weights=None)
    if resolved.state_dict is not None:
        model.load_state_dict(resolved.state_dict)
    model.eval()
    body = extract_layer(model, fcfg.layer) if fcfg.layer else strip_classifier(model)
    return FeatureModel(body, fcfg.pool).eval()


__all__ = ["ModelInfo", "FeatureModel", "GlobalPool", "build_model", "reference_model", "resolve_device",
           "autocast", "strip_classifier", "extract_layer", "load_model_file", "fold_batchnorm"]
