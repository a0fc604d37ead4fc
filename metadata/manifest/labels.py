"""Labels and folder splits from a file's path relative to its SRC. Pure functions, run per row."""
from __future__ import annotations

import re

SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}


def folder_split(rel_path: str) -> str | None:
    """The split named by a folder on the path (``Training/`` -> ``train``), else None."""
    for part in rel_path.split("/")[:-1]:
        split = SPLIT_ALIASES.get(part.lower())
        if split:
            return split
    return None


def parent_label(rel_path: str) -> str | None:
    """The parent folder's name, unless it is the SRC itself or a split folder."""
    parts = rel_path.split("/")
    if len(parts) < 2:
        return None
    parent = parts[-2]
    return None if parent.lower() in SPLIT_ALIASES else parent


def regex_label(rel_path: str, pattern: re.Pattern[str]) -> str | None:
    """The ``label`` group of ``pattern`` searched in the relative path (None when it does not match)."""
    match = pattern.search(rel_path)
    return match.group("label") if match else None


def label_problem(label: str | None) -> str | None:
    """Why ``label`` is a bad label, or None when it is fine (None itself means unlabeled: fine)."""
    if label is None:
        return None
    if not label.strip():
        return "label is empty"
    if ".." in label:
        return f"label {label!r} contains '..'"
    if "/" in label or "\\" in label:
        return f"label {label!r} contains a path separator"
    if any(ord(c) < 32 or ord(c) == 127 for c in label):
        return f"label {label!r} contains control characters"
    return None
