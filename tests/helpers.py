"""Test helpers: generated images and manifests written without Spark."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imgfeat.metadata.contracts.schema import MANIFEST_DIR, MANIFEST_SCHEMA, SUMMARY_FILE, image_id_for, normalize_uri


def write_image(path: Path, rgb: np.ndarray, ext: str = ".jpg", **params: int) -> Path:
    """Write an RGB uint8 array with OpenCV (which wants BGR)."""
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    bgr = rgb[..., ::-1] if rgb.ndim == 3 and rgb.shape[2] == 3 else rgb
    flags = [k for kv in params.items() for k in (getattr(cv2, kv[0]), kv[1])]
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(bgr), flags)
    assert ok, path
    path.write_bytes(buf.tobytes())
    return path


def gradient_image(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth RGB test image that survives JPEG well."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 255, size=3)
    img = np.stack([(x * 255 // max(w - 1, 1) + base[0]) % 256, (y * 255 // max(h - 1, 1) + base[1]) % 256,
                    ((x + y) * 127 // max(w + h, 1) + base[2]) % 256], axis=-1)
    return img.astype(np.uint8)


def write_manifest(out: Path, files: list[dict[str, Any]], rows_per_shard: int = 4) -> Path:
    """Write a minimal valid manifest (all given files ok) with pyarrow, for stages after the manifest.

    Each dict needs ``path`` and may give ``label``, ``split``, ``status``, ``shard``, ``width``, ``height``.
    """
    rows = []
    labels = sorted({f["label"] for f in files if f.get("label")})
    ok_i = 0
    for f in files:
        uri = normalize_uri(str(f["path"]))
        status = f.get("status", "ok")
        shard = f.get("shard")
        if shard is None and status == "ok":
            shard = ok_i // rows_per_shard
        if status == "ok":
            ok_i += 1
        p = Path(str(f["path"]))
        size = p.stat().st_size if p.exists() else 0
        rows.append({
            "image_id": image_id_for(uri), "path": uri, "rel_path": p.name,
            "label": f.get("label"), "label_index": labels.index(f["label"]) if f.get("label") else None,
            "split": f.get("split", "train"), "size_bytes": size, "mtime": 0.0, "format": f.get("format", "jpeg"),
            "width": f.get("width"), "height": f.get("height"), "channels": 3, "content_hash": None,
            "duplicate_of": None, "status": status, "status_detail": f.get("status_detail", ""),
            "shard": shard if status == "ok" else None,
        })
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    (out / MANIFEST_DIR).mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / MANIFEST_DIR / "part-00000.parquet")
    by_status: dict[str, int] = {}
    for r in rows:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    num_shards = max((r["shard"] for r in rows if r["shard"] is not None), default=-1) + 1
    import json

    (out / SUMMARY_FILE).write_text(json.dumps({"total": len(rows), "by_status": by_status, "num_shards": num_shards,
                                                "version": 1, "fingerprint": "test"}))
    return out
