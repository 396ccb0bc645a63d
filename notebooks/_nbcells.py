"""Write a source notebook from a list of (kind, text) cells -- a small authoring aid, not part of the library.

Usage from an authoring script::

    sys.path.insert(0, 'notebooks'); from _nbcells import write_notebook, md, code, params, BOOTSTRAP
    write_notebook("notebooks/01_x.ipynb", [md("# Title"), params("profile = 'smoke'"), code("...")])

The result has no outputs and no execution counts (as the tests require).
"""

from __future__ import annotations

from pathlib import Path

import nbformat

BOOTSTRAP = """\
# Make `trustmae_lib` importable. In Colab / JupyterHub inside a checkout this installs it from there.
import importlib.util, pathlib, subprocess, sys
if importlib.util.find_spec("trustmae_lib") is None:
    here = pathlib.Path.cwd().resolve()
    root = next((p for p in (here, *here.parents) if (p / "trustmae_lib" / "__init__.py").is_file()), None)
    if root is None:
        raise ImportError("trustmae_lib is not installed: run `pip install "
                          "git+https://github.com/trustmae-book/trustmae-book` (or `pip install -e .` in a checkout)")
    print(f"installing trustmae_lib from {root} (one time)")
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-e", str(root)])"""


def md(text: str):
    return nbformat.v4.new_markdown_cell(text.strip("\n"))


def code(text: str, tags: tuple[str, ...] = ()):
    cell = nbformat.v4.new_code_cell(text.strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def params(text: str):
    return code(text, tags=("parameters",))


def write_notebook(path: str | Path, cells) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = list(cells)
    for i, cell in enumerate(nb.cells):
        cell.id = f"c{i:02d}"
    nbformat.validate(nb)
    path = Path(path)
    path.write_text(nbformat.writes(nb) + "\n")
    return path
