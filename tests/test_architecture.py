"""The library's shape: imports point one way (top level <- data, model <- engine <- study), no import circle,
no long functions, no machine paths in committed files, and no citation of a document the repository lacks."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIB = ROOT / "trustmae_lib"
TOP = {"config", "errors", "io", "utils", "__init__", "__main__"}
#: What each layer may import from the library, besides its own package (``cli`` is the entry point: anything).
ALLOWED = {
    "top": set(),
    "data": {"top"},
    "model": {"top"},
    "engine": {"top", "data", "model"},
    "study": {"top", "data", "model", "engine"},
}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else "top"


def _imports() -> dict[str, set[str]]:
    """module -> library modules it imports (module level and inside functions)."""
    graph = {}
    for path in LIB.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                    )
                if base.startswith("trustmae_lib"):
                    for alias in node.names:
                        full = f"{base}.{alias.name}"
                        found.add(full if (LIB.parent / (full.replace(".", "/") + ".py")).exists() else base)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("trustmae_lib")}
        graph[name] = {m for m in found if m not in ("trustmae_lib", name)}
    return graph


def test_imports_point_one_way():
    wrong = []
    for module, targets in _imports().items():
        src = _layer(module)
        if module.endswith((".cli", ".__main__")) or src not in ALLOWED:
            continue
        for target in targets:
            dst = _layer(target)
            if dst != src and dst not in ALLOWED[src]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layering: " + ", ".join(sorted(wrong))


def test_no_import_circle():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_the_layering_check_sees_a_violation(tmp_path):
    # A model module importing the engine would be reported (the checks above are not vacuous).
    assert _layer("trustmae_lib.model.memory") == "model" and "engine" not in ALLOWED["model"]
    assert "trustmae_lib.engine.prepare" in _imports()["trustmae_lib.engine.train"]


def _code_lines(node: ast.FunctionDef, lines: list[str]) -> int:
    skip = set()
    first = node.body[0] if node.body else None
    if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant):
        skip = set(range(first.lineno, first.end_lineno + 1))
    return sum(
        1
        for i in range(node.lineno, node.end_lineno + 1)
        if i not in skip and lines[i - 1].strip() and not lines[i - 1].strip().startswith("#")
    )


def test_no_library_function_over_80_lines_of_code():
    long = []
    for path in LIB.rglob("*.py"):
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(node, lines) > 80:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not long, long


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT / p for p in out.stdout.split()]


def test_committed_files_name_no_machine_path():
    pattern = re.compile(r"(?<![\w.])/(?:work|tmp|home|root|Users)/")
    hits = [p.relative_to(ROOT).as_posix() for p in _tracked("results", "book", "configs") if p.is_file()
            and pattern.search(p.read_text(errors="ignore"))]  # fmt: skip
    assert not hits, f"absolute machine paths in {hits[:5]}"


CITATION = "DESIGN " + "\u00a7"  # written apart so that this file does not cite it


def test_no_citation_of_a_document_the_repository_lacks():
    hits = [p.relative_to(ROOT).as_posix() for p in _tracked("trustmae_lib", "notebooks", "tests", "book", "benchmarks")
            if p.is_file() and p.suffix in (".py", ".ipynb", ".md") and CITATION in p.read_text()]  # fmt: skip
    assert not hits, hits
