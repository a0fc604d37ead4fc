"""The ``manifest`` subcommand: build a manifest, or ``--show`` one as a table."""
from __future__ import annotations

import argparse
import json
from typing import Any

from imgfeat.metadata.cli_common import add_common_args, build_config
from imgfeat.metadata.config_flags import add_config_flags, config_overrides
from imgfeat.metadata.contracts.schema import STATUS_CODES, read_summary

MANIFEST_FLAGS = ("spark.master", "spark.partitions", "manifest.validation", "manifest.label_from",
                  "manifest.rows_per_shard")
"""Config keys offered as flags (every other key: ``--set``)."""


def add_manifest_arguments(parser: argparse.ArgumentParser) -> None:
    """The manifest job's flags (shared by ``imgfeat manifest`` and ``python -m imgfeat.metadata``)."""
    parser.add_argument("sources", nargs="*", metavar="SRC", help="folders or fsspec URLs (s3://bucket/prefix, file://...)")
    parser.add_argument("--out", help="output folder or URL; the manifest goes to OUT/manifest/")
    add_config_flags(parser, MANIFEST_FLAGS)
    parser.add_argument("--incremental", action="store_true", help="re-check only new or changed files of the manifest at OUT")
    parser.add_argument("--show", metavar="OUT", help="print the summary of the manifest at OUT and exit")
    parser.add_argument("--json", action="store_true", help="with --show: print the summary JSON as it is")
    add_common_args(parser)


def manifest_command(args: argparse.Namespace) -> int:
    """Run the manifest job (or show a summary); returns the exit code."""
    if args.show:
        summary = read_summary(args.show, "--show")
        print(json.dumps(summary, indent=1) if args.json else format_summary(summary) + _delta_lines(args.show))
        return 0
    if not args.out:
        raise ValueError("--out is required (the folder the manifest is written to)")
    if not args.sources:
        raise ValueError("SRC: give at least one source folder or URL")
    cfg = build_config(args, config_overrides(args))
    from imgfeat.metadata.manifest.job import run_manifest

    summary = run_manifest(cfg, args.sources, args.out, incremental=args.incremental)
    print(format_summary(summary))
    return 0


def format_summary(s: dict[str, Any]) -> str:
    """The manifest summary as a plain-text table."""
    lines = [f"manifest v{s.get('version')}  files {s['total']}  bytes {s.get('total_bytes', 0):,}  "
             f"shards {s['num_shards']}  validation {s.get('validation')}  fingerprint {s['fingerprint']}"]
    lines.append("")
    lines.append(f"{'status':<20}{'files':>10}  example / meaning")
    examples = s.get("example_by_status", {})
    for status, n in sorted(s["by_status"].items(), key=lambda kv: (kv[0] != "ok", kv[0])):
        lines.append(f"{status:<20}{n:>10}  {examples.get(status) or STATUS_CODES.get(status, '')}")
    splits = sorted(s.get("by_split", {}))
    if s.get("by_label_split"):
        lines.append("")
        lines.append(f"{'label (ok rows)':<24}" + "".join(f"{sp:>10}" for sp in splits) + f"{'total':>10}")
        for label, per in s["by_label_split"].items():
            lines.append(f"{label[:23]:<24}" + "".join(f"{per.get(sp, 0):>10}" for sp in splits)
                         + f"{sum(per.values()):>10}")
    lines += _data_quality_lines(s)
    if s.get("tiles"):
        t = s["tiles"]
        lines += ["", f"tiles: {t['images']} tiled image(s) (ok, no image shard), {t['tiles']} tiles in {t['shards']} "
                  "shard(s) in tiles/ (imgfeat featurize --tiles)"]
    if s.get("incremental"):
        lines.append("")
        lines.append("incremental: " + ", ".join(f"{k} {v}" for k, v in s["incremental"].items()))
    t = s.get("timings", {})
    if t:
        lines.append("")
        lines.append("timings: " + ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in t.items()) +
                     (f"  ({s['files_per_s']:.0f} files/s)" if s.get("files_per_s") else ""))
    return "\n".join(lines)


def _delta_lines(out: str) -> str:
    """The Delta table's versions, newest first, when the manifest at ``out`` is one (else nothing)."""
    from imgfeat.metadata.contracts import delta
    from imgfeat.metadata.contracts.schema import manifest_path

    table = manifest_path(out)
    if not delta.is_delta(table):
        return ""
    lines = ["", f"Delta table {table}: version {delta.table_version(table)}"]
    for h in delta.history(table)[:10]:
        note = json.loads(h["imgfeat"]) if h.get("imgfeat") else {}
        lines.append(f"  v{h['version']:<5}{h['operation'] or '':<14}rows {note.get('total', '?')}  "
                     f"changes {note.get('incremental', {})}")
    return "\n".join(lines)


def _data_quality_lines(s: dict[str, Any]) -> list[str]:
    """The summary's near-duplicates, leaks across splits, label conflicts and quality outliers, as text."""
    lines: list[str] = []
    near, conflicts, quality = s.get("near_duplicates"), s.get("label_conflicts"), s.get("quality")
    if near:
        lines += ["", f"near-duplicates (distance <= {near['distance']}): {near['groups']} groups, {near['members']} "
                  f"images; {near.get('crossing_pairs', 0)} member(s) in another split than their representative"]
        shown = near.get("examples", [])
        if shown and len(shown) < near.get("duplicates", 0):
            lines.append(f"  the first {len(shown)} of {near['duplicates']} members by path (all: column near_duplicate_of):")
        lines += [f"  {x['path']}\n    ~ {x['near_duplicate_of']}" for x in shown]
        for x in near.get("crossing_examples", []):
            lines.append(f"  leak: {x['path']} ({x['split']})\n    ~ {x['near_duplicate_of']} ({x['representative_split']})")
    if conflicts and conflicts.get("families"):
        lines += ["", f"label conflicts: {conflicts['families']} group(s) of the same picture under 2+ labels "
                  f"({conflicts['rows']} rows, column label_conflict)"]
        lines += [f"  {p}" for p in conflicts.get("examples", [])]
    if quality and quality.get("rows"):
        th = quality["thresholds"]
        lines += ["", f"quality outliers among {quality['rows']} images (thresholds: "
                  + ", ".join(f"{k} {v}" for k, v in th.items()) + ")"]
        for name, n in quality["outliers"].items():
            lines.append(f"  {name:<14}{n:>8}  {quality['examples'].get(name, '')}")
    return lines


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("manifest", help="build the manifest of image folders on Spark",
                              description="Build the manifest: one row per file, checked on Spark executors.")
    add_manifest_arguments(p)
    p.set_defaults(func=manifest_command)
