"""The one install path: `make dist`'s wheel works without the checkout, the notebooks' setup cell installs from a
checkout (importable at once) or says in one line what to do, glue works without myst-nb, and no file names an
address the project is not published at."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from trustmae_lib import utils

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
#: The one-line error of the setup cell outside a checkout (README: "Installing").
NOT_INSTALLED = (
    "ModuleNotFoundError: trustmae_lib is not installed: upload the wheel that `make dist` builds "
    "(dist/trustmae_lib-*.whl) and `pip install` it, or clone your copy of the repository and `pip install -e .` in it"
)


def _run(args, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _env(**extra: str) -> dict:
    """The environment without the checkout on ``PYTHONPATH`` and without ``TRUSTMAE_DATA``, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRUSTMAE_DATA", "XDG_CACHE_HOME")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


# --- make dist ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """`make dist` once per module, with this interpreter and without build isolation (no network needed)."""
    if shutil.which("make") is None:
        pytest.fail("`make dist` needs make")
    out = tmp_path_factory.mktemp("dist")
    proc = _run(
        ["make", "-s", "dist", f"PY={sys.executable}", "STAMP=", f"DIST={out}", "BUILD_FLAGS=--no-isolation"],
        cwd=ROOT,
        env=_env(),
    )
    assert proc.returncode == 0, f"make dist failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    wheels, sdists = list(out.glob("trustmae_lib-*.whl")), list(out.glob("trustmae_lib-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    return {"wheel": wheels[0], "sdist": sdists[0]}


def _tracked(pattern: str) -> list[str]:
    proc = _run(["git", "ls-files", "--", pattern], cwd=ROOT)
    if proc.returncode != 0:
        pytest.skip("not a git checkout")
    return proc.stdout.split()


def test_wheel_carries_every_module_profile_and_paper_table(dist):
    names = set(zipfile.ZipFile(dist["wheel"]).namelist())
    modules = [p for p in _tracked("trustmae_lib") if p.endswith(".py")]
    assert modules and not [m for m in modules if m not in names], "pyproject.toml's `packages` lacks a sub-package"
    profiles = [f"trustmae_lib/_configs/{Path(p).name}" for p in _tracked("configs/*.yaml")]
    assert "trustmae_lib/_configs/smoke.yaml" in profiles and set(profiles) <= names
    assert {"trustmae_lib/_paper/table3_ablation.csv", "trustmae_lib/_paper/table4_baselines.csv"} <= names
    assert not [n for n in names if n.endswith(".json")], "the wheel carries result files"


def test_sdist_carries_configs_and_paper_tables(dist):
    with tarfile.open(dist["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = {"pyproject.toml", "results/paper/table3_ablation.csv", "results/paper/table4_baselines.csv"}
    needed |= set(_tracked("configs/*.yaml"))
    assert needed <= names, f"the sdist lacks {sorted(needed - names)}"


@pytest.fixture(scope="module")
def installed(dist, tmp_path_factory) -> Path:
    """The wheel installed with `pip install --no-deps --target` (the venv supplies torch etc.)."""
    target = tmp_path_factory.mktemp("site")
    proc = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--target",
            str(target),
            dist["wheel"],
        ],
        cwd=target,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return target


INSPECT = """
import json, trustmae_lib
from trustmae_lib.config import CONFIG_DIR, REPO_ROOT, load_profile
from trustmae_lib.data.embedded import data_dir
from trustmae_lib.study.paper import PAPER_DIR, load_paper_table, paper_mean
print(json.dumps({"file": trustmae_lib.__file__, "repo": REPO_ROOT and str(REPO_ROOT), "configs": str(CONFIG_DIR),
                  "paper": str(PAPER_DIR), "data": str(data_dir()), "smoke": load_profile("smoke").name,
                  "cpu_steps": load_profile("cpu").steps, "table3": len(load_paper_table("table3")),
                  "table4": len(load_paper_table("table4")), "ours40": paper_mean("ours", 0.40)}, default=str))
"""


def test_wheel_loads_profiles_and_paper_tables_without_checkout(installed, tmp_path):
    cache = tmp_path / "cache"
    proc = _run(
        [sys.executable, "-c", INSPECT], cwd=tmp_path, env=_env(PYTHONPATH=str(installed), XDG_CACHE_HOME=str(cache))
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(got["file"]).is_relative_to(installed), f"imported {got['file']}, not the installed wheel"
    assert got["repo"] is None
    assert Path(got["configs"]) == installed / "trustmae_lib" / "_configs"
    assert Path(got["paper"]) == installed / "trustmae_lib" / "_paper"
    assert Path(got["data"]) == cache / "trustmae" / "data", "an installed wheel's data folder is the user cache"
    assert got["smoke"] == "smoke" and got["cpu_steps"] > 0
    assert got["table3"] > 0 and got["table4"] > 0 and got["ours40"] == 89.87  # supplement Table 4


@pytest.mark.slow
def test_wheel_trains_a_smoke_run_without_checkout(installed, tmp_path):
    data, runs = tmp_path / "data", tmp_path / "runs"
    env = _env(PYTHONPATH=str(installed), TRUSTMAE_DATA=str(data))
    args = ["train", "--dataset", "synthetic", "--category", "widget", "--method", "ae_l2", "--profile", "smoke",
            "--steps", "2", "--out", str(runs), "--no-progress"]  # fmt: skip
    proc = _run([sys.executable, "-m", "trustmae_lib", *args], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = runs.iterdir()
    assert (run / "checkpoint.pt").is_file() and (run / "manifest.json").is_file()
    assert (data / "smoke" / "synthetic" / "widget").is_dir(), "the dataset is built under TRUSTMAE_DATA"


def test_wheel_sweep_without_checkout_is_one_line(installed, tmp_path):
    sweep = tmp_path / "tiny.yaml"
    sweep.write_text("profile: smoke\ndatasets:\n  synthetic: [widget]\nmethods: [ae_l2]\nnoise_ratios: [0.0]\n"
                     "seeds: [0]\nsteps: 1\n")  # fmt: skip
    env = _env(PYTHONPATH=str(installed), TRUSTMAE_DATA=str(tmp_path / "data"))
    proc = _run([sys.executable, "-m", "trustmae_lib", "sweep", str(sweep)], cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "needs the repository checkout" in lines[0] and "results/smoke" in lines[0]
    assert not (installed / "trustmae_lib" / "results").exists(), "a sweep wrote into the installed package"


def test_checkout_resolves_its_own_folders():
    from trustmae_lib.config import CONFIG_DIR, REPO_ROOT
    from trustmae_lib.data.embedded import _default_data_dir
    from trustmae_lib.study import paper, sweep

    assert REPO_ROOT == ROOT and sweep.REPO == ROOT
    assert CONFIG_DIR == ROOT / "configs" and paper.PAPER_DIR == ROOT / "results" / "paper"
    assert _default_data_dir() == ROOT / "data"
    assert sweep.load_sweep("sweep_cpu").results_dir == ROOT / "results" / "cpu"


# --- the notebooks' setup cell -----------------------------------------------------------------------------------


def _setup_cell(path: Path) -> str:
    """The first code cell after the ``parameters`` cell."""
    cells = json.loads(path.read_text())["cells"]
    i = next(k for k, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    return "".join(next(c for c in cells[i + 1 :] if c["cell_type"] == "code")["source"])


def test_setup_cell_is_the_same_in_every_notebook():
    cells = {p.name: _setup_cell(p) for p in NOTEBOOKS}
    assert len(cells) == 15 and len(set(cells.values())) == 1, "the setup cells differ"


def test_setup_cell_outside_a_checkout_says_what_to_do(tmp_path):
    # -I: no PYTHONPATH, no current folder on sys.path; -S: no site-packages (where an editable install would be)
    proc = _run([sys.executable, "-I", "-S", "-c", _setup_cell(NOTEBOOKS[0])], cwd=tmp_path, env=_env())
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == NOT_INSTALLED


FAKE_PIP = """
import subprocess
calls = []
subprocess.check_call = lambda args, **kw: calls.append([str(a) for a in args]) or 0  # the pip install, skipped
"""
AFTER = """
import json, trustmae_lib
print(json.dumps({"calls": calls, "file": trustmae_lib.__file__}))
"""


def test_setup_cell_in_a_checkout_installs_and_imports_at_once(tmp_path):
    checkout = tmp_path / "copy"
    shutil.copytree(ROOT / "trustmae_lib", checkout / "trustmae_lib", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", checkout)
    (checkout / "notebooks").mkdir()
    code = FAKE_PIP + _setup_cell(NOTEBOOKS[0]) + AFTER
    proc = _run([sys.executable, "-I", "-S", "-c", code], cwd=checkout / "notebooks", env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["calls"] == [[sys.executable, "-m", "pip", "install", "-q", "-e", str(checkout.resolve())]]
    assert Path(got["file"]) == checkout.resolve() / "trustmae_lib" / "__init__.py"


# --- glue without myst-nb ----------------------------------------------------------------------------------------


def test_notebooks_glue_through_the_library():
    for path in NOTEBOOKS:
        text = "".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"])
        assert "myst_nb" not in text, f"{path.name} imports myst_nb (only the [dev] extra installs it)"
        assert "from trustmae_lib.utils import glue" in text, path.name


def test_glue_without_myst_nb_shows_or_drops(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "myst_nb", None)  # `from myst_nb import glue` raises ImportError
    utils._myst_glue.cache_clear()
    try:
        assert utils.glue("hidden", 12345, display=False) is None
        assert "12345" not in capsys.readouterr().out
        utils.glue("shown", 67890)
        assert "67890" in capsys.readouterr().out
    finally:
        utils._myst_glue.cache_clear()


def test_glue_uses_myst_nb_where_installed(monkeypatch):
    myst_nb = pytest.importorskip("myst_nb")
    calls = []
    monkeypatch.setattr(myst_nb, "glue", lambda *args: calls.append(args))
    utils._myst_glue.cache_clear()
    try:
        utils.glue("name", 1.5, display=False)
    finally:
        utils._myst_glue.cache_clear()
    assert calls == [("name", 1.5, False)]


# --- no pretended address ----------------------------------------------------------------------------------------


def test_no_file_names_an_address_the_project_is_not_at():
    fake = "trustmae-book/" + "trustmae-book"  # split so that this file does not name it either
    vcs = "git+" + "http"  # a pip install from a repository address (none exists for this project)
    found = []
    for name in _tracked("."):
        path = ROOT / name
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if fake in text or vcs in text:
            found.append(name)
    assert not found, f"files that name an address the project is not published at: {found}"
