"""The run report: ``RUN/report.json`` (machine-readable) and ``RUN/report.html`` (static, no server).

Built from what the stages left in the run folder: ``run.json``, the manifest, featurize, pca and
neighbours summaries, the PCA plots, and thumbnails of flagged files and example pairs (embedded, so the
page is one file).
"""
from __future__ import annotations

import base64
import html
import json
import logging
import platform
import time
from importlib import metadata as importlib_metadata
from typing import Any

import numpy as np

from imgfeat.layout import REPORT_HTML, REPORT_JSON, RUN_STATE, run_paths
from imgfeat.metadata.config import Config
from imgfeat.metadata.contracts.pca_files import PCA_SUMMARY
from imgfeat.metadata.contracts.schema import STATUS_CODES, SUMMARY_FILE, read_manifest
from imgfeat.metadata.contracts.shards import FEATURES_SUMMARY
from imgfeat.metadata.neighbors.files import NEIGHBORS_SUMMARY
from imgfeat.metadata.storage import join, read_json, write_bytes_atomic, write_json_atomic

log = logging.getLogger(__name__)

THUMBS = 24
NEIGHBOUR_PAIRS_PER_KIND = 2
"""Example pairs with thumbnails in the Neighbours section, per kind (across splits, across labels, near duplicates)."""
_PACKAGES = ("imgfeat", "torch", "torchvision", "pyspark", "opencv-python-headless", "numpy", "pyarrow", "h5py")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            pass
    return out


def _read_bytes(url: str) -> bytes:
    import fsspec

    with fsspec.open(url, "rb") as fh:
        return fh.read(8 << 20)


def _png_b64(rgb: np.ndarray) -> str:
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    return base64.b64encode(buf.tobytes()).decode() if ok else ""


def thumbnail(url: str, side: int = 96) -> str:
    """A base64 PNG of the file as far as it decodes, or a grey tile when nothing decodes."""
    from imgfeat.metadata.contracts.cv2_env import import_cv2

    cv2 = import_cv2()
    img = None
    try:
        data = _read_bytes(url)
        if data:
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_COLOR_2 if len(data) > 1 << 20 else cv2.IMREAD_COLOR)
    except Exception:  # noqa: BLE001 - a thumbnail of a broken file is best effort by design
        img = None
    if img is None:
        tile = np.full((side, side, 3), 200, np.uint8)
        cv2.line(tile, (0, 0), (side - 1, side - 1), (150, 150, 150), 2)
        cv2.line(tile, (0, side - 1), (side - 1, 0), (150, 150, 150), 2)
        return _png_b64(tile)
    h, w = img.shape[:2]
    scale = side / max(h, w)
    img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return _png_b64(img[..., ::-1])


def _flagged(run: str, limit: int) -> list[dict[str, Any]]:
    import pyarrow.compute as pc

    try:
        table = read_manifest(run, columns=["image_id", "path", "label", "status", "status_detail"],
                              filters=pc.field("status") != "ok")
    except ValueError:
        return []
    rows = sorted(table.to_pylist(), key=lambda r: (r["status"], r["path"]))
    picked: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for r in rows:  # spread the thumbnails over the reasons
        if seen.get(r["status"], 0) < max(2, limit // 6) and len(picked) < limit:
            seen[r["status"]] = seen.get(r["status"], 0) + 1
            picked.append(dict(r, thumb=thumbnail(r["path"])))
    return picked


def _quality_tiles(manifest: dict | None) -> dict[str, list[dict[str, Any]]]:
    """Thumbnails of the manifest summary's data-quality examples (a few files each: the summary holds at
    most 5 per list): near-duplicate pairs, leaks across splits, label conflicts and quality outliers."""
    if not manifest:
        return {}
    near = manifest.get("near_duplicates") or {}
    quality = manifest.get("quality") or {}
    tiles: dict[str, list[dict[str, Any]]] = {
        "pairs": [dict(x, thumb=thumbnail(x["path"]), rep_thumb=thumbnail(x["near_duplicate_of"]))
                  for x in near.get("examples", [])],
        "leaks": [dict(x, thumb=thumbnail(x["path"]), rep_thumb=thumbnail(x["near_duplicate_of"]))
                  for x in near.get("crossing_examples", [])],
        "conflicts": [{"path": p, "thumb": thumbnail(p)} for p in (manifest.get("label_conflicts") or {}).get("examples", [])],
        "outliers": [{"signal": k, "path": p, "thumb": thumbnail(p)} for k, p in quality.get("examples", {}).items()],
    }
    return {k: v for k, v in tiles.items() if v}


TILED_THUMBS = 4
"""Tiled images shown with their tile grid in the report."""


def _overview(row: dict[str, Any], side: int) -> np.ndarray | None:
    """A small RGB view of a tiled image: a TIFF's smallest pyramid level that is at least ``side`` wide (read
    tile by tile), another format's decode (it fits the decode caps); None when nothing reads."""
    import fsspec

    from imgfeat.metadata.contracts.cv2_env import import_cv2
    from imgfeat.metadata.contracts.tiff_tiles import TiffRegionReader, tiff_levels

    cv2 = import_cv2()
    try:
        if row["format"] == "tiff":
            with fsspec.open(row["path"], "rb") as f:
                levels = tiff_levels(f)
            fitting = [lv for lv in levels if lv.width >= side] or levels[:1]
            small = min(fitting, key=lambda lv: lv.width * lv.height)
            if small.width * small.height > 64_000_000:  # no pyramid: a gigapixel level 0 is not a thumbnail
                return None
            with TiffRegionReader(fsspec.open(row["path"], "rb").open) as reader:
                return reader.read(small.index, 0, 0, small.width, small.height)
        img = cv2.imdecode(np.frombuffer(_read_bytes_all(row["path"]), np.uint8), cv2.IMREAD_REDUCED_COLOR_4)
        return None if img is None else img[..., ::-1]
    except Exception:  # noqa: BLE001 - a thumbnail of a broken file is best effort by design
        return None


def _read_bytes_all(url: str) -> bytes:
    import fsspec

    with fsspec.open(url, "rb") as fh:
        return fh.read()


def tile_grid_thumbnail(row: dict[str, Any], boxes: list[tuple[int, int, int, int]], level_size: tuple[int, int],
                        side: int = 240) -> str:
    """A base64 PNG of the tiled image ``row`` at about ``side`` px with its tile ``boxes`` (in pixels of a level
    of ``level_size``) drawn on it; a grey canvas with the grid when the image does not read."""
    from imgfeat.metadata.contracts.cv2_env import import_cv2

    cv2 = import_cv2()
    lw, lh = level_size
    scale = side / max(lw, lh)
    w, h = max(1, round(lw * scale)), max(1, round(lh * scale))
    view = _overview(row, side)
    canvas = (np.full((h, w, 3), 200, np.uint8) if view is None
              else np.ascontiguousarray(cv2.resize(view, (w, h), interpolation=cv2.INTER_AREA)))
    for x, y, bw, bh in boxes:
        cv2.rectangle(canvas, (round(x * scale), round(y * scale)),
                      (round((x + bw) * scale) - 1, round((y + bh) * scale) - 1), (255, 210, 0), 1)
    return _png_b64(canvas)


def _tiled(run: str, limit: int = TILED_THUMBS) -> list[dict[str, Any]]:
    """A few tiled images of the manifest (smallest paths first) with their tile grid thumbnails."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from imgfeat.metadata.contracts.tiles import tiles_path

    try:
        rows = read_manifest(run, columns=["image_id", "path", "format", "width", "height", "tiles"],
                             filters=pc.field("tiles").is_valid() & (pc.field("status") == "ok")).to_pylist()
        table = pads.dataset(tiles_path(run), format="parquet", ignore_prefixes=["_", "."])
    except (ValueError, KeyError, OSError, pa.ArrowInvalid):  # no tiles column or no tile table: nothing to show
        return []
    out = []
    for row in sorted(rows, key=lambda r: r["path"])[:limit]:
        boxes = table.to_table(columns=["x", "y", "width", "height", "level"],
                               filter=pc.field("image_id") == row["image_id"]).to_pylist()
        if not boxes:
            continue
        right = max(b["x"] for b in boxes) + max(b["width"] for b in boxes)
        bottom = max(b["y"] for b in boxes) + max(b["height"] for b in boxes)
        size = _level_size(row, boxes[0]["level"], right, bottom)
        out.append(dict(row, level=boxes[0]["level"], level_size=size,
                        thumb=tile_grid_thumbnail(row, [(b["x"], b["y"], b["width"], b["height"]) for b in boxes], size)))
    return out


def _level_size(row: dict[str, Any], level: int, right: int, bottom: int) -> tuple[int, int]:
    """The pixel size of the tiled level (level 0: the manifest's; else the TIFF's, or the grid's extent)."""
    if level == 0:
        return int(row["width"]), int(row["height"])
    from imgfeat.metadata.manifest.tiles_table import level_dims

    try:
        return level_dims(row["path"], row["format"], row["width"], row["height"], level)
    except Exception:  # noqa: BLE001 - best effort: the grid's own extent
        return right, bottom


def _neighbour_pairs(nb: dict[str, Any] | None, per_kind: int = NEIGHBOUR_PAIRS_PER_KIND) -> list[dict[str, Any]]:
    """Thumbnails of a few of the neighbours summary's example pairs: ``per_kind`` each of the pairs across
    splits, across labels and the other near duplicates, each pair once, both images with a manifest row."""
    picked: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for kind in ("cross_split", "cross_label", "near_duplicates"):
        fresh = [x for x in ((nb or {}).get(kind) or {}).get("examples", [])
                 if x.get("path") and x.get("neighbor_path") and (x["image_id"], x["neighbor_id"]) not in seen]
        for x in fresh[:per_kind]:
            seen.add((x["image_id"], x["neighbor_id"]))
            picked.append(dict(x, kind=kind, thumb=thumbnail(x["path"]), neighbor_thumb=thumbnail(x["neighbor_path"])))
    return picked


def build_report(run: str, cfg: Config | None = None) -> dict[str, Any]:
    """Collect everything the report shows into one JSON-able dict."""
    state = read_json(join(run, RUN_STATE)) or {}
    manifest = read_json(join(run, SUMMARY_FILE))
    feats = read_json(join(run_paths(run)["features"], FEATURES_SUMMARY))
    pca = read_json(join(run_paths(run)["pca"], PCA_SUMMARY))
    neighbors = read_json(join(run_paths(run)["neighbors"], NEIGHBORS_SUMMARY))
    stage_s = {k: v.get("seconds") for k, v in state.get("stages", {}).items()}
    report: dict[str, Any] = {
        "run": run,
        "created_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "versions": versions(),
        "stages": state.get("stages", {}),
        "total_s": state.get("total_s"),
        "bottleneck_stage": max(stage_s, key=lambda k: stage_s[k] or 0) if stage_s else None,
        "fingerprints": {
            "config": cfg.fingerprint() if cfg else None,
            "manifest": manifest and manifest.get("fingerprint"),
            "features": feats and feats.get("fingerprint"),
            "pca": pca and pca.get("fingerprint"),
        },
        "manifest": manifest,
        "featurize": feats,
        "pca": pca,
        "neighbors": neighbors,
    }
    if feats:
        t = feats.get("this_run", {})
        report["featurize_stages"] = t.get("stage_seconds", {})
        report["featurize_bottleneck"] = t.get("slowest_stage")
    tile_feats = read_json(join(run_paths(run)["tile_features"], FEATURES_SUMMARY))
    report["tile_features"] = tile_feats
    report["accounting"] = _accounting(manifest, feats, pca, tile_feats)
    report["changes"] = changes(manifest, state)
    return report


def changes(manifest: dict | None, state: dict[str, Any]) -> dict[str, Any]:
    """What this run found changed since the previous one and what each stage did about it.

    File counts come from the manifest summary's ``incremental`` field (None on a first or full build:
    every file counts as added); stage outcomes from ``run.json``: ``ran``, ``skipped`` (up to date) or
    ``not run`` (not a stage of this run)."""
    if not manifest:
        return {}
    inc = manifest.get("incremental")
    started = state.get("started_at")
    stages = {}
    for name, rec in (state.get("stages") or {}).items():
        if started is not None and (rec.get("finished_at") or 0) < started:
            stages[name] = "not run"
        else:
            stages[name] = "skipped" if rec.get("skipped") else "ran"
    this_run = {k: v for k, v in (state.get("stages") or {}).items() if stages[k] != "not run"}
    feat, man = this_run.get("featurize", {}), this_run.get("manifest", {})
    return {
        "first_build": inc is None,
        "added": manifest["total"] if inc is None else inc["new"],
        "changed": 0 if inc is None else inc["changed"],
        "removed": 0 if inc is None else inc["removed"],
        "unchanged": 0 if inc is None else inc["unchanged"],
        "manifest_version": manifest.get("version"),
        "manifest_published": manifest.get("published", True),
        "stages": stages,
        "feature_shards_computed": feat.get("shards_computed"),
        "feature_shards_dropped": (feat.get("shards_dropped") or 0) + (man.get("feature_shards_dropped") or 0),
    }


def _accounting(manifest: dict | None, feats: dict | None, pca: dict | None,
                tile_feats: dict | None = None) -> dict[str, Any]:
    """Every manifest row ends as a feature row, a featurize reject, a manifest flag or a tiled image (whose
    tiles end as tile feature rows or tile rejects)."""
    if not manifest:
        return {}
    total = manifest["total"]
    flagged = total - manifest["by_status"].get("ok", 0)
    tiles = manifest.get("tiles") or {}
    tiled = int(tiles.get("images") or 0)
    out: dict[str, Any] = {"manifest_rows": total, "flagged_in_manifest": flagged, "tiled_images": tiled}
    if feats:
        out.update(feature_rows=feats.get("rows"), featurize_rejects=feats.get("rejects"))
        out["reconciles"] = feats.get("rows", 0) + feats.get("rejects", 0) + flagged + tiled == total
    if tiled:
        out["tiles"] = tiles.get("tiles")
        if tile_feats:
            out.update(tile_feature_rows=tile_feats.get("rows"), tile_rejects=tile_feats.get("rejects"))
            out["tiles_reconcile"] = tile_feats.get("rows", 0) + tile_feats.get("rejects", 0) == tiles.get("tiles")
    if pca:
        out["pca_output_rows"] = pca.get("output_rows")
    return out


def plot_url(run: str, name: str) -> str:
    """Where a plot named in the pca summary lies.

    pca records the path it wrote (a URL, or a path relative to the working directory when the run
    folder was given that way); a bare file name is taken as relative to the run's pca folder.
    """
    return name if "/" in name else join(run_paths(run)["pca"], name)


def write_report(run: str, cfg: Config | None = None) -> dict[str, Any]:
    """Write ``RUN/report.json`` and ``RUN/report.html``; return the report dict."""
    report = build_report(run, cfg)
    write_json_atomic(join(run, REPORT_JSON), report)
    flagged = _flagged(run, THUMBS)
    plots = {}
    for name in (report.get("pca") or {}).get("plots", []) or []:
        url = plot_url(run, name)
        try:
            plots[url.rsplit("/", 1)[-1]] = base64.b64encode(_read_bytes(url)).decode()
        except OSError:
            log.warning("report: plot %s is missing", url)
    page = render_html(report, flagged, plots, _quality_tiles(report["manifest"]), _neighbour_pairs(report["neighbors"]),
                       _tiled(run) if (report["manifest"] or {}).get("tiles") else [])
    write_bytes_atomic(join(run, REPORT_HTML), page.encode())
    log.info("report: %s", join(run, REPORT_HTML))
    return report


_CSS = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.25rem .6rem;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}.bar{background:#4a7bd0;height:.8rem;display:inline-block}
.ok{color:#1a7f37}.bad{color:#b42318}.thumbs{display:flex;flex-wrap:wrap;gap:.8rem}
.thumb{width:150px;font-size:.75rem;word-break:break-all}.thumb img{width:96px;height:96px;object-fit:contain;background:#eee}
.plots img{max-width:48%;margin-right:1%}code{background:#f4f4f4;padding:0 .2rem}.muted{color:#666}
.pair{display:flex;gap:.3rem;border:1px solid #ddd;padding:.3rem}
"""


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td class='n'>{c:,}</td>" if isinstance(c, (int, float)) and not isinstance(c, bool)
                         else f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _e(value: Any) -> str:
    return html.escape(str(value))


def _tile(thumb: str, caption: str, muted: str) -> str:
    return (f"<div class='thumb'><img alt='{_e(muted)}' src='data:image/png;base64,{thumb}'>"
            f"<div>{caption}</div><div class='muted'>{_e(muted)}</div></div>")


def _pair(left: tuple[str, str, str], right: tuple[str, str, str]) -> str:
    """Two images side by side in one box: (thumbnail, caption HTML, path) each."""
    return f"<div class='pair'>{_tile(*left)}{_tile(*right)}</div>"


def _quality_section(m: dict[str, Any], tiles: dict[str, list[dict[str, Any]]]) -> str:
    """Near-duplicates, leaks across splits, label conflicts and quality outliers, with thumbnails."""
    near, conflicts, quality = m.get("near_duplicates"), m.get("label_conflicts") or {}, m.get("quality")
    if not near and not conflicts.get("families") and not quality:
        return ""
    out = ["<h2 id='quality'>Data quality</h2>"]
    if near:
        out.append(f"<p>{near['groups']:,} near-duplicate group(s) (perceptual hashes within {near['distance']} bits) "
                   f"holding {near['members']:,} images; each group is in one split, except "
                   f"<b>{near.get('crossing_pairs', 0):,}</b> member(s) whose own folder split differs from their "
                   "representative's (a leak in the folder splits).</p>")
        for key, title in (("leaks", "Leaks across splits"), ("pairs", "Near-duplicate pairs (examples)")):
            pairs = "".join(
                _pair((x["thumb"], f"<b>{_e(x.get('split', 'member'))}</b>", x["path"]),
                      (x["rep_thumb"], f"<b>{_e(x.get('representative_split', 'representative'))}</b>", x["near_duplicate_of"]))
                for x in tiles.get(key, []))
            if pairs:
                out.append(f"<h3>{title}</h3><div class='thumbs'>{pairs}</div>")
    if conflicts.get("families"):
        out.append(f"<p><b>{conflicts['families']:,}</b> picture(s) appear under two or more labels "
                   f"({conflicts['rows']:,} rows, column <code>label_conflict</code>): probable label errors.</p>")
        out.append("<div class='thumbs'>" + "".join(_tile(x["thumb"], "<b>label conflict</b>", x["path"])
                                                    for x in tiles.get("conflicts", [])) + "</div>")
    if quality and quality.get("rows"):
        th = quality["thresholds"]
        out.append(_table(["signal", "outliers", "example"], [[_e(k), n, _e(quality["examples"].get(k, ""))]
                                                             for k, n in quality["outliers"].items()])
                   + "<p class='muted'>thresholds: " + ", ".join(f"{_e(k)} {_e(v)}" for k, v in th.items()) + "</p>")
        out.append("<div class='thumbs'>" + "".join(_tile(x["thumb"], f"<b>{_e(x['signal'])}</b>", x["path"])
                                                    for x in tiles.get("outliers", [])) + "</div>")
    return "".join(out)


def _tiles_section(m: dict[str, Any], acc: dict[str, Any], tiled: list[dict[str, Any]]) -> str:
    """Tiled images: counts, the tile features' accounting, and a few images with their tile grid."""
    tiles = m.get("tiles")
    if not tiles:
        return ""
    out = [f"<h2 id='tiles'>Tiles</h2><p>{tiles['images']:,} image(s) large enough to tile, cut into "
           f"<b>{tiles['tiles']:,}</b> tiles in {tiles['shards']:,} shard(s) (<code>tiles/</code>); each tile is one "
           "feature row keyed by <code>tile_id</code> (<code>tile_features/</code>)."]
    if "tiles_reconcile" in acc:
        verdict = "<span class='ok'>every tile is accounted for</span>" if acc["tiles_reconcile"] else \
            "<span class='bad'>tile counts do not reconcile</span>"
        out.append(f" {acc['tile_feature_rows']:,} tile feature rows, {acc['tile_rejects']:,} tiles rejected while "
                   f"reading: {verdict}.")
    out.append("</p>")
    cells = "".join(
        f"<div class='thumb' style='width:260px'><img style='width:240px;height:auto' alt='tile grid' "
        f"src='data:image/png;base64,{r['thumb']}'><div><b>{r['tiles']:,} tiles</b>, level {r['level']} "
        f"({r['level_size'][0]:,}x{r['level_size'][1]:,})</div><div class='muted'>{_e(r['path'])}</div></div>"
        for r in tiled)
    if cells:
        out.append(f"<div class='thumbs'>{cells}</div>")
    return "".join(out)


_PAIR_KINDS = {"near_duplicates": "near duplicate", "cross_split": "across splits", "cross_label": "across labels"}


def _neighbours_section(nb: dict[str, Any] | None, pairs: list[dict[str, Any]]) -> str:
    """Pair counts of the neighbours summary (near duplicates, across splits, across labels) and example pairs."""
    if not nb:
        return ""
    near, xs, xl = nb["near_duplicates"], nb["cross_split"], nb["cross_label"]
    out = [f"<h2 id='neighbours'>Neighbours</h2><p>Each image's {nb['k']} nearest neighbours by cosine among "
           f"{nb['rows']['vectors']:,} {_e(nb['source'])} vectors ({nb['dim']} dims). Pairs at cosine &ge; "
           f"{near['min_cosine']}: <b>{near['pairs']:,}</b> semantic near duplicate(s), of which "
           f"<b>{xs['pairs']:,}</b> across splits (leaks) and <b>{xl['pairs']:,}</b> across labels "
           "(probable label errors).</p>",
           _table(["pairs", "count"], [["near duplicates", near["pairs"]], ["across splits", xs["pairs"]],
                                       ["across labels", xl["pairs"]]])]
    if xs.get("by_splits"):
        out.append(_table(["splits", "pairs"], [[_e(k), v] for k, v in xs["by_splits"].items()]))
    if xl.get("label_pairs"):
        out.append(_table(["labels", "pairs"], [[_e(" / ".join(map(str, lp["labels"]))), lp["pairs"]]
                                                for lp in xl["label_pairs"]]))
    tiles = "".join(_pair((x["thumb"], f"<b>{_e(_PAIR_KINDS[x['kind']])}</b>, cosine {x['cosine']:.3f}<br>"
                                       f"{_e(x.get('split'))}, {_e(x.get('label'))}", x["path"]),
                          (x["neighbor_thumb"], f"<br>{_e(x.get('neighbor_split'))}, {_e(x.get('neighbor_label'))}",
                           x["neighbor_path"]))
                    for x in pairs)
    if tiles:
        out.append(f"<h3>Example pairs</h3><div class='thumbs'>{tiles}</div>")
    return "".join(out)


def render_html(report: dict[str, Any], flagged: list[dict[str, Any]], plots: dict[str, str],
                quality_tiles: dict[str, list[dict[str, Any]]] | None = None,
                neighbour_pairs: list[dict[str, Any]] | None = None, tiled: list[dict[str, Any]] | None = None) -> str:
    """The static page: every figure is inline, nothing is fetched."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>imgfeat run report</title><style>{_CSS}</style>"
             "</head><body>", f"<h1>imgfeat run report</h1><p class='muted'>{_e(report['run'])} &middot; {_e(report['created_at'])}</p>"]
    m, f, p = report.get("manifest"), report.get("featurize"), report.get("pca")
    acc = report.get("accounting") or {}
    if acc:
        verdict = ("<span class='ok'>every input is accounted for</span>" if acc.get("reconciles")
                   else "<span class='bad'>counts do not reconcile</span>" if "reconciles" in acc else "")
        parts.append("<h2 id='story'>Summary</h2><p>"
                     f"{acc['manifest_rows']:,} files found; {acc['manifest_rows'] - acc['flagged_in_manifest']:,} usable, "
                     f"{acc['flagged_in_manifest']:,} flagged with a reason"
                     + (f"; {acc.get('feature_rows', 0):,} feature rows, "
                        f"{acc.get('featurize_rejects', 0):,} rejected while decoding" if f else "")
                     + (f"; PCA to {p['k']} dimensions kept {p['explained_variance_ratio_total']:.1%} of the variance" if p else "")
                     + f". {verdict}</p>")
    ch = report.get("changes") or {}
    if ch:
        notes = [f"manifest version {_e(ch.get('manifest_version'))} "
                 + ("kept (nothing changed)" if not ch.get("manifest_published", True) else "written")]
        if ch.get("feature_shards_computed") is not None:
            notes.append(f"{ch['feature_shards_computed']:,} feature shard(s) computed")
        if ch.get("feature_shards_dropped"):
            notes.append(f"{ch['feature_shards_dropped']:,} stale feature shard(s) removed")
        notes += [f"{_e(k)} {_e(v)}" for k, v in ch.get("stages", {}).items()]
        parts.append("<h2 id='changes'>Changes since the previous run</h2>"
                     + ("<p>Full build (a first run, <code>--force</code> or a changed [manifest] config): "
                        "every file counts as added.</p>" if ch.get("first_build") else "")
                     + _table(["added", "changed", "removed", "unchanged"],
                              [[ch["added"], ch["changed"], ch["removed"], ch["unchanged"]]])
                     + "<p>" + "; ".join(notes) + ".</p>")
    stages = report.get("stages") or {}
    if stages:
        label = {"ran": "ran", "skipped": "skipped (up to date)", "not run": "not run"}
        outcome = ch.get("stages", {})
        rows = [[_e(k), round(v.get("seconds") or 0, 2), round(v.get("this_run_s") or 0, 2),
                 label[outcome.get(k) or ("skipped" if v.get("skipped") else "ran")]] for k, v in stages.items()]
        parts.append("<h2 id='time'>Time per stage</h2>" + _table(["stage", "seconds (last run)", "this run", ""], rows)
                     + f"<p>Bottleneck stage: <b>{_e(report.get('bottleneck_stage'))}</b></p>")
    if f:
        t = f.get("this_run", {})
        st = t.get("stage_seconds", {})
        total = sum(st.values()) or 1.0
        n_img = t.get("images") or 0
        rows = [[_e(k), round(v, 2), round(n_img / v, 1) if v else "", f"<span class='bar' style='width:{int(200 * v / total)}px'></span>"]
                for k, v in st.items()]
        parts.append("<h2 id='featurize'>Featurize</h2>"
                     f"<p>Model <code>{_e(f['model'].get('model'))}</code>, weights "
                     f"<code>{_e(f['model'].get('weights', ''))}</code>, {f['dim']} dims, {_e(f['precision'])}, "
                     f"{f['world_size']} process(es); this run {t.get('images', 0):,} images in {t.get('wall_s', 0)} s "
                     f"({t.get('images_per_s') or 0} images/s). Slowest stage: <b>{_e(t.get('slowest_stage'))}</b>.</p>"
                     + _table(["stage (summed over ranks)", "seconds", "images/s", ""], rows))
        if f.get("reject_reasons"):
            parts.append(_table(["featurize reject reason", "rows"], [[_e(k), v] for k, v in f["reject_reasons"].items()]))
    if m:
        rows = [[_e(s), n, _e(STATUS_CODES.get(s, ""))] for s, n in m["by_status"].items()]
        parts.append("<h2 id='status'>Manifest: files per status</h2>" + _table(["status", "files", "meaning"], rows))
        splits = sorted(m.get("by_split", {}))
        top = max(m.get("by_label", {}).values() or [1])
        rows = [[_e(label)] + [per.get(s, 0) for s in splits] + [sum(per.values()),
                f"<span class='bar' style='width:{int(160 * sum(per.values()) / top)}px'></span>"]
                for label, per in m.get("by_label_split", {}).items()]
        parts.append("<h2 id='classes'>Per-class counts (usable files)</h2>" + _table(["label", *splits, "total", ""], rows))
        parts.append(_quality_section(m, quality_tiles or {}))
        parts.append(_tiles_section(m, acc, tiled or []))
    if flagged:
        tiles = "".join(f"<div class='thumb'><img alt='{_e(r['status'])}' src='data:image/png;base64,{r['thumb']}'>"
                        f"<div><b>{_e(r['status'])}</b>: {_e(r['status_detail'])}</div><div class='muted'>{_e(r['path'])}</div></div>"
                        for r in flagged)
        parts.append(f"<h2 id='flagged'>Flagged files (sample)</h2><div class='thumbs'>{tiles}</div>")
    if p:
        imgs = "".join(f"<img alt='{_e(n)}' src='data:image/png;base64,{b}'>" for n, b in plots.items())
        parts.append(f"<h2 id='pca'>PCA</h2><p>{p['dim']} &rarr; {p['k']} dimensions, fit on {p['fit_rows']:,} rows "
                     f"(split {_e(p.get('fit_split') or 'all')}), {p['output_rows']:,} rows projected.</p><div class='plots'>{imgs}</div>")
    parts.append(_neighbours_section(report.get("neighbors"), neighbour_pairs or []))
    fp = report.get("fingerprints", {})
    parts.append("<h2 id='versions'>Fingerprints and versions</h2>"
                 + _table(["what", "value"], [[_e(k), f"<code>{_e(v)}</code>"] for k, v in {**fp, **report['versions']}.items()]))
    # Lets a headless browser test tell that the page ran and every embedded figure decoded.
    parts.append("<script>const imgs=[...document.images];document.body.dataset.images=imgs.length;"
                 "document.body.dataset.imagesOk=imgs.filter(i=>i.complete&&i.naturalWidth>0).length;"
                 "document.body.dataset.ready='1'</script></body></html>")
    return "\n".join(parts)


if __name__ == "__main__":
    import sys

    print(json.dumps(write_report(sys.argv[1]), indent=1, default=str)[:2000])
