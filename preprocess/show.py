"""``imgfeat prep --show``: counts of a prep export and a contact sheet (sample images per class)."""
from __future__ import annotations

from collections import Counter

import numpy as np

from imgfeat.metadata.contracts.shards import PREP_SUMMARY, list_markers
from imgfeat.metadata.storage import join, read_json, write_bytes_atomic
from imgfeat.preprocess.train_dataset import PrepDataset

MIN_CELL = 64
LABEL_WIDTH = 140


def show_prep(prep: str, contact_sheet: str | None = None, per_class: int = 8) -> str:
    """A text table of a prep folder (shards, rows, rejects, rows per class); optionally a contact sheet PNG."""
    summary = read_json(join(prep, PREP_SUMMARY)) or {}
    markers = {s: m for s, m in list_markers(prep).items() if m.get("kind") == "prep"}
    if not markers:
        raise ValueError(f"--show {prep}: no committed prep shards there")
    dataset = PrepDataset(prep)
    classes: list[str] = list(summary.get("classes", []))
    rejects = [r for m in markers.values() for r in m.get("rejects", [])]
    lines = [
        f"prep folder   {prep}",
        f"format        {summary.get('format', '?')}, {summary.get('size', '?')} px, policy {summary.get('resize_policy', '?')}",
        f"split         {summary.get('split') or 'all'}",
        f"shards        {len(markers)} committed" + (f" of {summary['shards']}" if "shards" in summary else ""),
        f"rows          {len(dataset)} readable, {sum(int(m['rows']) for m in markers.values())} in markers",
        f"rejected      {len(rejects)}",
    ]
    for reason, count in sorted(Counter(r["reason"].split(":", 1)[0] for r in rejects).items()):
        lines.append(f"  {reason:<20} {count}")
    counts = Counter(int(v) for v in dataset.labels)
    lines.append("")
    lines.append(f"{'label':>6}  {'class':<24} {'rows':>8}")
    for label in sorted(counts):
        lines.append(f"{label:>6}  {_name(classes, label):<24} {counts[label]:>8}")
    if contact_sheet:
        write_bytes_atomic(contact_sheet, contact_sheet_png(dataset, classes, per_class))
        lines.append("")
        lines.append(f"contact sheet written to {contact_sheet}")
    return "\n".join(lines)


def _name(classes: list[str], label: int) -> str:
    if label < 0:
        return "(no label)"
    return classes[label] if label < len(classes) and classes[label] else f"#{label}"


def contact_sheet_png(dataset: PrepDataset, classes: list[str], per_class: int = 8) -> bytes:
    """PNG bytes of a grid: one row per class, the first ``per_class`` images of that class."""
    from imgfeat.metadata.contracts.cv2_env import decoder_cv2

    cv2 = decoder_cv2()
    labels = sorted(set(int(v) for v in dataset.labels))
    if not labels:
        raise ValueError("contact sheet: the prep folder has no rows")
    first = dataset[0][0]
    size = int(first.shape[-1])
    cell = max(size, MIN_CELL)
    sheet = np.full((len(labels) * (cell + 4) + 4, LABEL_WIDTH + per_class * (cell + 4) + 4, 3), 255, np.uint8)
    for row, label in enumerate(labels):
        y = 4 + row * (cell + 4)
        cv2.putText(sheet, _name(classes, label)[:14], (6, y + cell // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (0, 0, 0), 1, cv2.LINE_AA)
        picks = np.flatnonzero(dataset.labels == label)[:per_class]
        for col, i in enumerate(picks):
            img = dataset[int(i)][0].permute(1, 2, 0).numpy()
            if cell != size:
                img = cv2.resize(img, (cell, cell), interpolation=cv2.INTER_NEAREST)
            x = LABEL_WIDTH + 4 + col * (cell + 4)
            sheet[y : y + cell, x : x + cell] = img
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(sheet[..., ::-1]))
    if not ok:
        raise RuntimeError("contact sheet: PNG encoding failed")
    return buf.tobytes()
