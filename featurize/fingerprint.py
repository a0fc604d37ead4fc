"""The run fingerprint: everything that changes the features, kept in ``FEAT/_run.json``.

Shards whose marker carries another fingerprint are never mixed with this run's: a rerun with a
different model, weights, layer, preprocessing, precision, dtype, format or code version stops with a
``ValueError`` naming the differing keys, unless ``overwrite`` is set. Runtime knobs that do not
change the features (device, batch size, workers, channels_last, compile) are left out, and so are the
decode device (``featurize.decode_device``: the GPU decode matches the CPU one at cosine >= 0.999, the policy
for ``device``) and the batch-size probe (``featurize.batch_probe``): ``run_fingerprint`` names the
``[featurize]`` keys it hashes, so a new key stays out unless it is added there.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from imgfeat.metadata import storage
from imgfeat.metadata.config import Config
from imgfeat.metadata.contracts import shards
from imgfeat.metadata.storage import canonical_digest

if TYPE_CHECKING:
    from imgfeat.featurize.model import ModelInfo

log = logging.getLogger(__name__)

CODE_VERSION = "featurize-2"
"""Bump when a code change alters the features written for the same inputs."""

_RUNTIME_PREPROCESS_KEYS = ("num_workers", "batch_size", "prefetch_factor")


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("imgfeat")
    except Exception:
        return "0+unknown"


def run_fingerprint(cfg: Config, info: ModelInfo) -> dict[str, Any]:
    """The fingerprint fields of this run."""
    pre = {k: v for k, v in dataclasses.asdict(cfg.preprocess).items() if k not in _RUNTIME_PREPROCESS_KEYS}
    pre.update(dataclasses.asdict(cfg.decode))  # hashed as preprocess keys, where they were before [decode]
    f = cfg.featurize
    return {
        "model": info.model,
        "weights": info.weights,
        "weights_sha256": info.weights_sha256,
        "layer": info.layer,
        "pool": f.pool,
        "dim": info.dim,
        "preprocess": pre,
        "precision": f.precision,
        "dtype": f.dtype,
        "format": f.format,
        "code_version": CODE_VERSION,
    }


def digest(fields: dict[str, Any]) -> str:
    """A short sha256 of the canonical JSON of the fingerprint fields."""
    return canonical_digest(fields)


def differing_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two fingerprints."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(differing_keys(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def read_run_file(folder: str) -> dict[str, Any] | None:
    return storage.read_json(storage.join(folder, shards.RUN_FILE))


def check_run_file(folder: str, fields: dict[str, Any], overwrite: bool) -> str:
    """Compare with ``FEAT/_run.json``: ``new`` (none there), ``same``, or ``overwrite``; else raise ValueError."""
    existing = read_run_file(folder)
    if existing is None:
        return "new"
    old_fields = existing.get("fields", {})
    if existing.get("fingerprint") == digest(fields):
        return "same"
    keys = differing_keys(old_fields, fields)
    if not overwrite:
        detail = "; ".join(f"{k}: {_get(old_fields, k)!r} -> {_get(fields, k)!r}" for k in keys[:8])
        raise ValueError(
            f"{folder} holds features from another run (fingerprint {existing.get('fingerprint')}, this run "
            f"{digest(fields)}); differing keys: {', '.join(keys) or '?'} ({detail}). "
            "Use another --out, or --overwrite to replace them (featurize.overwrite = true)."
        )
    log.warning("--overwrite: replacing features of fingerprint %s (differing keys: %s)",
                existing.get("fingerprint"), ", ".join(keys))
    return "overwrite"


def _get(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def write_run_file(folder: str, fields: dict[str, Any]) -> None:
    """Write ``FEAT/_run.json`` atomically (identical content from any rank)."""
    storage.write_json_atomic(storage.join(folder, shards.RUN_FILE),
                             {"fingerprint": digest(fields), "fields": fields, "imgfeat_version": package_version()})
