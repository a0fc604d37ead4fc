"""Assemble bench/RESULTS.md from the per-stage result files each benchmark script writes.

    .venv/bin/python bench/collect_results.py
"""
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ("manifest", "manifest-realsize", "listing", "preprocess", "decode", "featurize", "featurize-scale", "incremental",
         "near-duplicates", "hash-bits", "quality-cost", "signal-budget", "pca", "neighbors", "tiles", "reliability", "scale-run", "scale")


def main() -> None:
    parts = [(HERE / "RESULTS-header.md").read_text().rstrip() + "\n"]
    for stage in ORDER:
        path = HERE / f"RESULTS-{stage}.md"
        if path.exists():
            text = path.read_text().strip()
            # Each stage's own title becomes a second-level heading here.
            lines = text.splitlines()
            if lines and lines[0].startswith("# "):
                lines[0] = "#" + lines[0]
            parts.append("\n".join(lines) + "\n")
    (HERE / "RESULTS.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
