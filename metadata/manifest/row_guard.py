"""The manifest check's last line of defence: every file's row can be stored, whatever went wrong.

Two layers, both per file, so one hostile file never fails a task:

- ``failed_row``: the check task runs each file's work (read, sniff, decode, label) inside one
  ``try``; an exception there becomes that file's ``internal_error`` row, logged once with its path.
- ``to_record_batch``: rows become Arrow in one call. Only when that call fails are the rows converted
  one at a time, and a row that does not fit the schema is repaired (a file name that is not UTF-8, a
  number out of range) or reduced to an ``internal_error`` row. The common path costs nothing extra.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from imgfeat.metadata.contracts.schema import SIGNAL_COLUMNS, image_id_for
from imgfeat.metadata.manifest.listing import Entry, rel_path

log = logging.getLogger(__name__)

_INT_LIMITS = {pa.int32(): 2**31 - 1, pa.int64(): 2**63 - 1}


def failed_row(entry: Entry, exc: BaseException) -> dict[str, Any]:
    """The row of a file whose check raised ``exc``: status ``internal_error`` with the exception text."""
    log.warning("internal error while checking %s: %s: %s", storable_text(entry.path), type(exc).__name__, exc)
    log.debug("traceback", exc_info=exc)
    return {
        "image_id": image_id_for(entry.path),
        "path": entry.path,
        "rel_path": rel_path(entry.root, entry.path),
        "size_bytes": entry.size,
        "mtime": entry.mtime,
        **dict.fromkeys(("format", "width", "height", "channels", "tiles", "content_hash", "label", *SIGNAL_COLUMNS)),
        "status": "internal_error",
        "status_detail": f"{type(exc).__name__}: {exc}"[:1000],
    }


def storable_text(text: str) -> str:
    """``text`` with the bytes of a non-UTF-8 file name (Python's surrogate escapes) written as ``\\xNN``."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def to_record_batch(rows: Sequence[tuple], schema: pa.Schema) -> pa.RecordBatch:
    """Rows (tuples in ``schema`` order) as one record batch; rows that do not fit are repaired, never lost."""
    try:
        return _batch(rows, schema)
    except (pa.ArrowException, OverflowError, UnicodeError, TypeError, ValueError):
        pass
    fixed = []
    for row in rows:
        try:
            _batch([row], schema)
            fixed.append(row)
        except (pa.ArrowException, OverflowError, UnicodeError, TypeError, ValueError) as exc:
            fixed.append(_repaired(row, schema, exc))
    return _batch(fixed, schema)


def _batch(rows: Sequence[tuple], schema: pa.Schema) -> pa.RecordBatch:
    columns = zip(*rows) if rows else [[] for _ in schema]
    return pa.RecordBatch.from_arrays([pa.array(col, f.type) for col, f in zip(columns, schema)], schema=schema)


def _repaired(row: tuple, schema: pa.Schema, exc: BaseException) -> tuple:
    """A row that fits ``schema``: text escaped, out-of-range numbers dropped, the reason in the status."""
    values = dict(zip(schema.names, row))
    status, detail = values.get("status"), values.get("status_detail")
    for field in schema:
        value = values[field.name]
        if isinstance(value, str):
            text = storable_text(value)
            if text != value:
                values[field.name] = text
                if field.name in ("path", "rel_path"):
                    status, detail = "bad_path", "the file name is not valid UTF-8 (stored with \\x escapes); rename it"
                elif field.name == "label" and status == "ok":
                    status, detail = "bad_label", "the label is not valid UTF-8"
        elif field.type in _INT_LIMITS and isinstance(value, int) and not -_INT_LIMITS[field.type] - 1 <= value <= _INT_LIMITS[field.type]:
            values[field.name] = None
            status, detail = "internal_error", f"{field.name} = {value} does not fit {field.type}"
    values["status"], values["status_detail"] = status, detail
    candidate = tuple(values[n] for n in schema.names)
    try:
        _batch([candidate], schema)
    except (pa.ArrowException, OverflowError, UnicodeError, TypeError, ValueError) as again:
        keep = ("image_id", "path", "rel_path")
        candidate = tuple(storable_text(str(values[n])) if n in keep and values[n] is not None else None
                          for n in schema.names)
        detail = f"{type(again).__name__}: {again}"[:1000]
        candidate = tuple("internal_error" if f.name == "status" else detail if f.name == "status_detail" else
                          False if f.type == pa.bool_() else v  # the check task's own flags: not kept, not seen
                          for f, v in zip(schema, candidate))
    log.warning("row of %s repaired to fit the manifest (%s): %s", values.get("path"), exc, values["status"])
    return candidate
