"""The manifest contract: columns, status codes, where it lives, and a reader without Spark.

The manifest is a Parquet dataset at ``OUT/manifest/``; every later stage reads it through
``read_manifest`` (pyarrow) or Spark. Nothing here imports Spark.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from imgfeat.metadata.storage import join

MANIFEST_DIR = "manifest"
SUMMARY_FILE = "manifest_summary.json"
CONFIG_FILE = "config.resolved.toml"
HISTORY_DIR = "manifest_history"

STATUS_OK = "ok"
STATUS_CODES: dict[str, str] = {
    "ok": "checked and usable",
    "zero_bytes": "the file is empty",
    "unreadable": "the file could not be read (permissions, vanished, I/O error, symlink loop)",
    "not_image": "no image signature (text, HTML, random bytes, ...)",
    "unsupported_format": "an image format that is not accepted",
    "truncated": "the file is cut short (no end marker, or shorter than its header says)",
    "undecodable": "the decoder rejected the data, or the file's first bytes are a damaged JPEG or PNG signature",
    "too_large": "over the byte cap or the pixel cap",
    "duplicate": "the same bytes as an earlier file (see duplicate_of)",
    "near_duplicate": "a near-duplicate of another image (manifest.near_duplicates = \"drop\"; see near_duplicate_of)",
    "bad_label": "the label is empty, contains '..', a path separator or control characters",
    "bad_path": "the file name is not valid UTF-8 (the path is stored with \\x escapes); rename the file",
    "internal_error": "checking the file raised an unexpected error (the detail has it; please report it)",
}

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("rel_path", pa.string()),
        pa.field("label", pa.string()),
        pa.field("label_index", pa.int32()),
        pa.field("split", pa.string()),
        pa.field("size_bytes", pa.int64()),
        pa.field("mtime", pa.float64()),
        pa.field("format", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("channels", pa.int32()),
        pa.field("tiles", pa.int32()),
        pa.field("content_hash", pa.string()),
        pa.field("phash", pa.int64()),
        pa.field("blur", pa.float32()),
        pa.field("brightness", pa.float32()),
        pa.field("contrast", pa.float32()),
        pa.field("entropy", pa.float32()),
        pa.field("duplicate_of", pa.string()),
        pa.field("near_duplicate_of", pa.string()),
        pa.field("label_conflict", pa.bool_()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("status_detail", pa.string()),
        pa.field("shard", pa.int32()),
    ]
)
MANIFEST_COLUMNS = tuple(MANIFEST_SCHEMA.names)
SIGNAL_COLUMNS = ("phash", "blur", "brightness", "contrast", "entropy")
"""The per-image data-quality columns (``manifest.image_signals``): null where the image was not decoded."""


def conform_to_manifest(table: pa.Table) -> pa.Table:
    """``table`` in ``MANIFEST_SCHEMA``'s column order and types, a column it lacks added as nulls
    (rows made by other tools, or by a release before that column existed)."""
    n = table.num_rows
    return pa.table({f.name: table[f.name] if f.name in table.column_names else pa.nulls(n, f.type)
                     for f in MANIFEST_SCHEMA}).cast(MANIFEST_SCHEMA)


def normalize_uri(path: str) -> str:
    """A canonical URI: ``file:///abs/path`` for local paths, ``scheme://bucket/key`` otherwise."""
    if "://" in path:
        scheme, rest = path.split("://", 1)
        scheme = scheme.lower()
        if scheme in ("file", "local"):
            return "file://" + posixpath.normpath("/" + rest.lstrip("/"))
        if scheme in ("s3a", "s3n"):
            scheme = "s3"
        return f"{scheme}://{posixpath.normpath(rest)}"
    import os

    return "file://" + os.path.abspath(path).replace(os.sep, "/")


def image_id_for(uri: str) -> str:
    """The stable id of a file: 32 hex chars of sha256 over its normalized URI."""
    return hashlib.sha256(normalize_uri(uri).encode("utf-8", "surrogateescape")).hexdigest()[:32]


def manifest_path(out: str) -> str:
    return join(out, MANIFEST_DIR)


@dataclass(frozen=True)
class ManifestSummary:
    """The parts of ``manifest_summary.json`` later stages rely on."""

    total: int
    by_status: dict[str, int]
    num_shards: int
    version: int
    fingerprint: str

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ManifestSummary":
        return cls(
            total=int(data["total"]),
            by_status=dict(data["by_status"]),
            num_shards=int(data["num_shards"]),
            version=int(data.get("version", 1)),
            fingerprint=str(data["fingerprint"]),
        )


def read_summary(out: str, option: str = "--manifest") -> dict[str, Any]:
    """The manifest summary JSON of the manifest at ``out`` (a local path or fsspec URL); a missing one raises
    ``ValueError`` naming ``option``, the flag that gave ``out``."""
    import fsspec

    path = join(out, SUMMARY_FILE)
    try:
        with fsspec.open(path, "rt", encoding="utf-8") as fh:
            return json.load(fh)
    except (FileNotFoundError, NotADirectoryError):
        raise ValueError(f"{option} {out}: no {SUMMARY_FILE} there; run `imgfeat manifest` first") from None


def read_manifest(out: str, columns: list[str] | None = None, filters: Any = None) -> pa.Table:
    """Read the manifest Parquet dataset under ``out`` with pyarrow (no Spark)."""
    import fsspec
    import pyarrow.dataset as ds

    from imgfeat.metadata.contracts import delta

    path = manifest_path(out)
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(root):
        raise ValueError(f"--manifest {out}: no manifest at {path}; run `imgfeat manifest` first")
    if delta.is_delta(path):
        return delta.open_dataset(path).to_table(columns=columns, filter=filters)
    dataset = ds.dataset(root, filesystem=fs, format="parquet", exclude_invalid_files=True,
                         ignore_prefixes=["_", "."])
    return dataset.to_table(columns=columns, filter=filters)
