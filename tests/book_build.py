"""Build and serve the HTML book for the browser tests (``tests/test_book_browser.py``); not a test module.

Two ways to get a book:

* ``TRUSTMAE_BOOK_HTML=/path/to/_build/html``: use a book that is already built (``make book``).
* otherwise :func:`build_smoke_book` renders a *smoke* book into a scratch folder, leaving the repository's
  ``book/`` and ``_build/`` alone: it copies the config, the toc and the prose pages, runs each chapter of the
  toc through papermill under the ``smoke`` profile and calls ``jupyter-book build`` on the copy. Toc entries
  whose source does not exist yet are left out of the copied toc (and reported).

It also runs as a script, to build a smoke book by hand::

    .venv/bin/python tests/book_build.py /tmp/smoke-book
    TRUSTMAE_BOOK_HTML=/tmp/smoke-book/_build/html .venv/bin/pytest -m browser tests
"""

from __future__ import annotations

import functools
import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
#: What a build needs besides the executed chapters (copied when present): the config, the prose folder
#: ``book/`` (pages, bibliography, figures, local extensions) and the Sphinx folders at the root.
BOOK_ASSETS = ("_config.yml", "book", "_static", "_templates", "_ext")
#: Never copied from ``book/``: executed chapters (the smoke build writes its own) and build leftovers.
IGNORED = shutil.ignore_patterns("[0-9][0-9]_*.ipynb", "*.partial.ipynb", ".ipynb_checkpoints", "__pycache__", "_build")
#: Sphinx log lines, e.g. ``/tmp/x/book/intro.md:12: WARNING: undefined label: 'fig-x' [ref.ref]``.
WARNING_LINE = re.compile(r"\bWARNING:")
ERROR_LINE = re.compile(r"\b(ERROR|SEVERE|CRITICAL):")


#: Warning text in a notebook output: ``UserWarning: ...``, ``/path/tqdm/auto.py:21: TqdmWarning: ...``, ...
WARNING_TEXT = re.compile(r"\w*Warning\b")


def notebook_warnings(path: Path) -> list[str]:
    """What an executed notebook would show a reader as warnings: every output line that names a warning class
    (``UserWarning``, ``TqdmWarning``, ``Pandas4Warning``, ...) and every other ``stderr`` output.

    Args:
        path: an executed ``.ipynb`` (papermill's output, or the copy Sphinx keeps under ``_sources/``).

    Returns:
        ``"cell <n>: <line>"`` entries, empty for a clean notebook.
    """
    found = []
    for n, cell in enumerate(json.loads(path.read_text(encoding="utf-8"))["cells"]):
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            text = "".join(output.get("text", "")) + "".join(data.get("text/plain", ""))
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            flagged = [line for line in lines if WARNING_TEXT.search(line)]
            if output.get("output_type") == "stream" and output.get("name") == "stderr" and not flagged:
                flagged = lines[:1]  # any other text on stderr is noise on the page too
            found += [f"cell {n}: {line[:300]}" for line in flagged]
    return found


@dataclass
class Book:
    """A built HTML book.

    Attributes:
        html: the ``_build/html`` folder.
        toc: docnames of the repository's toc in reading order (``book/intro`` first).
        built: the docnames that this book renders (a smoke build leaves out toc pages without a source).
        missing: toc docnames left out of a smoke build, with the reason.
        warnings: Sphinx warning lines of the build (empty for a given ``TRUSTMAE_BOOK_HTML``).
        timings: seconds spent per step (``papermill <name>``, ``jupyter-book build``, ``total``).
    """

    html: Path
    toc: list[str]
    built: list[str]
    missing: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def page(self, docname: str) -> Path:
        """The HTML file of ``docname`` (``book/intro`` -> ``<html>/book/intro.html``)."""
        return self.html / f"{docname}.html"


def toc_docnames(toc_file: Path = REPO / "_toc.yml") -> list[str]:
    """Docnames of a Jupyter Book toc in reading order: the root, then every ``file`` entry (depth first).

    Args:
        toc_file: a ``jb-book`` or ``jb-article`` ``_toc.yml``.

    Returns:
        e.g. ``["book/intro", "book/notation", "book/01_data_and_noise", ...]`` (no file suffixes).
    """
    toc = yaml.safe_load(toc_file.read_text())
    names = [_strip_suffix(toc["root"])]

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "file" in node:
                names.append(_strip_suffix(node["file"]))
            for key in ("parts", "chapters", "sections"):
                walk(node.get(key, []))
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk({k: v for k, v in toc.items() if k != "root"})
    return names


def _strip_suffix(name: str) -> str:
    return re.sub(r"\.(md|ipynb|rst)$", "", name)


def source_of(docname: str, repo: Path = REPO) -> Path | None:
    """The source a docname is rendered from: ``notebooks/<name>.ipynb`` for a chapter, else the page itself.

    Chapters (``book/NN_topic``) are executed copies of ``notebooks/NN_topic.ipynb``; prose pages are
    ``book/<name>.md``. Returns None where the source does not exist (yet).
    """
    stem = docname.rsplit("/", 1)[-1]
    candidates = [repo / "notebooks" / f"{stem}.ipynb"] if re.match(r"\d\d_", stem) else []
    candidates += [repo / f"{docname}.md", repo / f"{docname}.ipynb"]
    return next((p for p in candidates if p.is_file()), None)


def _filtered_toc(toc: dict, keep: set[str]) -> dict:
    """A copy of a toc dict without ``file`` entries outside ``keep`` (empty parts and lists dropped too)."""

    def prune(node: object) -> object:
        if isinstance(node, list):
            items = [prune(item) for item in node]
            return [item for item in items if item is not None]
        if isinstance(node, dict):
            if "file" in node and _strip_suffix(node["file"]) not in keep:
                return None
            out = {}
            for key, value in node.items():
                value = prune(value) if key in ("parts", "chapters", "sections") else value
                if value != []:
                    out[key] = value
            if "file" not in out and not any(k in out for k in ("chapters", "sections")):
                return None  # a part (caption only) with no chapter left
            return out
        return node

    out = {k: (prune(v) if k in ("parts", "chapters", "sections") else v) for k, v in toc.items()}
    return {k: v for k, v in out.items() if v not in ([], None)}


def _run(cmd: list[str], what: str, timeout: float) -> str:
    """Run ``cmd``; return its output, or raise RuntimeError with the output's tail when it fails."""
    proc = subprocess.run(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-60:])
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc.stdout


def _tool(name: str) -> str:
    """The console script ``name`` of this interpreter's environment (the venv), else the one on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise RuntimeError(f"`{name}` is not installed: run `make install` (it is in the dev extra)")
    return found


def build_smoke_book(dest: Path, repo: Path = REPO, profile: str = "smoke", timeout: float = 1800) -> Book:
    """Render the book into ``dest`` with every chapter executed under ``profile``.

    Args:
        dest: an empty or new folder; receives the copied sources, ``book/NN_*.ipynb`` and ``_build/html``.
        repo: the repository (its ``book/`` and ``_build/`` are only read).
        profile: the papermill ``profile`` parameter of every chapter.
        timeout: seconds allowed to each papermill run and to the Sphinx build.

    Returns:
        The built :class:`Book`; its ``warnings`` hold the Sphinx warnings.

    Raises:
        RuntimeError: a chapter failed under papermill, or ``jupyter-book build`` exited non-zero or logged an
            error.
    """
    start = time.perf_counter()
    dest.mkdir(parents=True, exist_ok=True)
    toc = toc_docnames(repo / "_toc.yml")
    missing = {name: "no source yet" for name in toc if source_of(name, repo) is None}
    built = [name for name in toc if name not in missing]
    if toc[0] in missing:
        raise RuntimeError(f"the toc's root page {toc[0]} has no source")

    config = yaml.safe_load((repo / "_config.yml").read_text()) or {}
    local_extensions = ((config.get("sphinx") or {}).get("local_extensions") or {}).values()
    for rel in (*BOOK_ASSETS, *local_extensions):
        src = repo / rel
        if src.is_dir():
            shutil.copytree(src, dest / rel, ignore=IGNORED, dirs_exist_ok=True)
        elif src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    raw_toc = yaml.safe_load((repo / "_toc.yml").read_text())
    (dest / "_toc.yml").write_text(yaml.safe_dump(_filtered_toc(raw_toc, set(built)), sort_keys=False))

    timings: dict[str, float] = {}
    for name in built:
        src = source_of(name, repo)
        out = dest / f"{name}{src.suffix}"
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.suffix != ".ipynb" or src.parent != repo / "notebooks":
            shutil.copy2(src, out)
            continue
        t0 = time.perf_counter()
        cmd = [_tool("papermill"), "--cwd", str(repo / "notebooks"), "-k", "python3", "--no-progress-bar"]
        _run([*cmd, str(src), str(out), "-p", "profile", profile], f"papermill {src.name}", timeout)
        timings[f"papermill {src.name}"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log = _run([_tool("jupyter-book"), "build", str(dest)], "jupyter-book build", timeout)
    timings["jupyter-book build"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start
    errors = [line.strip() for line in log.splitlines() if ERROR_LINE.search(line)]
    if errors:  # docutils errors (a broken directive, a bad role) leave Sphinx's exit status at 0
        raise RuntimeError("jupyter-book build reported errors:\n" + "\n".join(errors))
    warnings = [line.strip() for line in log.splitlines() if WARNING_LINE.search(line)]
    return Book(dest / "_build" / "html", toc, built, missing, warnings, timings)


def given_book(html: Path, repo: Path = REPO) -> Book:
    """A :class:`Book` for an already built ``_build/html`` folder (every toc page is expected in it)."""
    if not (html / "index.html").is_file():
        raise RuntimeError(f"TRUSTMAE_BOOK_HTML={html} holds no index.html: point it at a built _build/html")
    toc = toc_docnames(repo / "_toc.yml")
    return Book(html, toc, list(toc))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


@contextmanager
def serve(root: Path) -> Iterator[str]:
    """Serve ``root`` over HTTP on 127.0.0.1 (a free port) from a thread; yields the base URL (``.../``)."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="book-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: book_build.py DEST   (renders the smoke book into DEST/_build/html)")
    book = build_smoke_book(Path(sys.argv[1]).resolve())
    for line in book.warnings:
        print(line)
    for name, reason in book.missing.items():
        print(f"left out {name}: {reason}")
    for executed in sorted((book.html.parent.parent / "book").glob("[0-9][0-9]_*.ipynb")):
        for line in notebook_warnings(executed):
            print(f"{executed.name}: {line}")
    for step, seconds in book.timings.items():
        print(f"{step}: {seconds:.1f} s")
    print(f"TRUSTMAE_BOOK_HTML={book.html}")
