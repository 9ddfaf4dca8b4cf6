"""Writes the lesson notebooks, English and Italian, from their one source: ``cells.txt`` beside this file.

    python notebooks/lesson/build.py          # writes notebooks/lesson.ipynb and notebooks/lesson_it.ipynb
    python notebooks/lesson/build.py --check  # exits 1 if either differs from what the source makes

The source is a list of cells, each opened by a marker line:

- ``%% markdown`` opens a text cell: its English text, then a line ``%% it``, then its Italian text;
- ``%% code`` opens a code cell, written once: both notebooks get it as it is
  (``%% code parameters`` also tags it ``parameters``, the cell papermill and the tests replace).

Lines before the first marker describe the file and are left out. The notebooks come out without
outputs, with fixed cell ids, so that building twice gives the same bytes.
Tests: ``pytest tests/notebook/test_lesson.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "cells.txt"
NOTEBOOKS = {"en": HERE.parent / "lesson.ipynb", "it": HERE.parent / "lesson_it.ipynb"}
KERNEL = {"display_name": "Python 3", "language": "python", "name": "python3"}


def parse(text: str) -> list[dict[str, object]]:
    """The cells of the source: ``{"kind": "markdown", "en": ..., "it": ...}`` or
    ``{"kind": "code", "code": ..., "tags": [...]}``."""
    cells: list[dict[str, object]] = []
    lines: list[str] = []
    cell: dict[str, object] | None = None
    part = ""  # which text the lines being read belong to: "en", "it" or "code"

    def close() -> None:
        if cell is not None:
            cell[part] = "\n".join(lines).strip("\n")

    for number, line in enumerate(text.splitlines(), start=1):
        if not line.startswith("%%"):
            lines.append(line)
            continue
        words = line[2:].split()
        if words == ["it"]:
            if cell is None or cell["kind"] != "markdown" or part != "en":
                raise ValueError(
                    f"{SOURCE.name}:{number}: '%% it' belongs after a markdown cell's English text"
                )
            close()
            part, lines = "it", []
            continue
        close()
        if cell is not None:
            cells.append(cell)
        if words == ["markdown"]:
            cell, part = {"kind": "markdown"}, "en"
        elif words and words[0] == "code":
            cell, part = {"kind": "code", "tags": words[1:]}, "code"
        else:
            raise ValueError(f"{SOURCE.name}:{number}: unknown marker {line!r}")
        lines = []
    close()
    if cell is not None:
        cells.append(cell)
    for index, c in enumerate(cells):
        texts = ["en", "it"] if c["kind"] == "markdown" else ["code"]
        missing = [t for t in texts if not c.get(t)]
        if missing:
            raise ValueError(f"{SOURCE.name}: cell {index} ({c['kind']}) has no {' or '.join(missing)} text")
    return cells


def notebook(cells: list[dict[str, object]], lang: str) -> nbformat.NotebookNode:
    """The notebook in ``lang`` ("en" or "it"): the markdown in that language, the code as it is."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": KERNEL, "language_info": {"name": "python"}}
    for index, c in enumerate(cells):
        if c["kind"] == "markdown":
            new = nbformat.v4.new_markdown_cell(str(c[lang]))
        else:
            new = nbformat.v4.new_code_cell(str(c["code"]))
            if c["tags"]:
                new.metadata["tags"] = list(c["tags"])  # type: ignore[call-overload]
        new.id = f"cell-{index:03d}"
        nb.cells.append(new)
    nbformat.validate(nb)
    return nb


def render(lang: str, source: Path = SOURCE) -> str:
    """The text of the notebook in ``lang``, exactly as it is written to disk."""
    text = nbformat.writes(notebook(parse(source.read_text(encoding="utf-8")), lang))
    return text if text.endswith("\n") else text + "\n"


def main(argv: list[str]) -> int:
    check = argv == ["--check"]
    if argv and not check:
        print("usage: python notebooks/lesson/build.py [--check]", file=sys.stderr)
        return 2
    stale = []
    for lang, path in NOTEBOOKS.items():
        text = render(lang)
        if check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(path)
        else:
            path.write_text(text, encoding="utf-8", newline="\n")
            print(f"wrote {path}")
    for path in stale:
        print(f"{path} differs from {SOURCE}: run python notebooks/lesson/build.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
