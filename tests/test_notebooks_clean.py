"""Source notebooks are committed without outputs and follow the chapter anatomy (STYLE.md)."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks/NN_topic.ipynb found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_no_outputs(path):
    nb = json.loads(path.read_text())
    dirty = [
        i
        for i, c in enumerate(nb["cells"])
        if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))
    ]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; strip them (jupyter nbconvert --clear-output)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_anatomy(path):
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    assert cells[0]["cell_type"] == "markdown" and "".join(cells[0]["source"]).lstrip().startswith("# ")
    params = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, "exactly one cell tagged 'parameters'"
    assert 'profile = "smoke"' in "".join(params[0]["source"]), "notebooks default to the smoke profile"
    headings = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    # a chapter that reproduces nothing of the paper (15, your own images) closes with "What we did" instead
    closing = ("## What we reproduced", "## What we did")
    assert any(c in headings for c in closing), f"{path.name} lacks the section '{closing[0]}'"
    for section in ("## Deviations and readings", "## Summary"):
        assert section in headings, f"{path.name} lacks the section '{section}'"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_prose_line_is_a_myst_comment(path):
    """MyST drops a Markdown line that starts with ``%`` (a comment): a rewrapped "... 84.3 ± 8.3\n% after ..." loses
    the rest of its line from the page without a warning."""
    nb = json.loads(path.read_text())
    lost = [
        (c.get("id"), line.strip()[:80])
        for c in nb["cells"]
        if c["cell_type"] == "markdown"
        for line in "".join(c["source"]).splitlines()
        if line.lstrip().startswith("%")
    ]
    assert not lost, f"{path.name}: Markdown lines starting with % are MyST comments and vanish: {lost}"
