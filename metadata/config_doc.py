"""The configuration reference, generated from the dataclasses in ``metadata/config.py``.

Each field's help is the string literal written under it (read with ``ast``, so the docs live next
to the code). ``python -m imgfeat.metadata.config_doc`` prints the Markdown; a test keeps README.md in sync.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import json

from imgfeat.metadata import config as config_mod

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"


def field_docs(cls: type) -> dict[str, str]:
    """{field name: the docstring literal that follows it in the class body}."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _default(value: object) -> str:
    return f"`{json.dumps(value)}`"


def reference_markdown() -> str:
    """One table per config section: key, type, default, meaning."""
    root = config_mod.Config()
    out = []
    for section in dataclasses.fields(root):
        obj = getattr(root, section.name)
        cls = type(obj)
        out.append(f"#### `[{section.name}]`: {(cls.__doc__ or '').strip()}")
        out.append("")
        out.append("| key | type | default | meaning |")
        out.append("|---|---|---|---|")
        docs = field_docs(cls)
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
        for f in dataclasses.fields(cls):
            typ = str(hints[f.name]).replace("|", "\\|")
            out.append(f"| `{f.name}` | `{typ}` | {_default(getattr(obj, f.name))} | {docs.get(f.name, '').replace('|', '/')} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def write_readme(path: str = "README.md") -> None:
    """Replace the text between the reference markers in ``path``."""
    from pathlib import Path

    readme = Path(path)
    text = readme.read_text(encoding="utf-8")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{reference_markdown()}{END}{tail}", encoding="utf-8")


if __name__ == "__main__":
    import sys

    if "--write-readme" in sys.argv:
        write_readme()
    else:
        print(reference_markdown())
