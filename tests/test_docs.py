"""Docs that must stay true: the README's config reference is the one generated from the dataclasses."""
from __future__ import annotations

from pathlib import Path

from imgfeat.metadata.config_doc import END, START, reference_markdown

REPO = Path(__file__).resolve().parent.parent


def test_readme_config_reference_is_in_sync():
    text = (REPO / "README.md").read_text()
    inside = text.split(START, 1)[1].split(END, 1)[0]
    assert inside.strip() == reference_markdown().strip(), "run: python -m imgfeat.metadata.config_doc --write-readme"


def test_readme_commands_exist():
    text = (REPO / "README.md").read_text()
    assert "bash .ci/setup && .venv/bin/imgfeat run --config configs/demo.toml" in text
    test_command = "bash .ci/setup && .venv/bin/ruff check . && bash .ci/typecheck && .venv/bin/python -m pytest"
    assert test_command in text and test_command in (REPO / ".ci" / "run").read_text()  # CI runs what the README says
