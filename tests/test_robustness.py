"""Bad input and faults, end to end through the command line (``trustmae_lib.cli``, ``trustmae_lib.errors``: every
user error is one line, no traceback).

Every user mistake below reaches ``trustmae`` as a user would make it and must give exactly one line on stderr
that starts with ``error:`` and names the problem (exit status 2, no traceback), and must leave nothing
half-written: no temporary files, and no checkpoint, log or result that the failed command should not have
produced.

Faults: Ctrl-C during ``trustmae train`` (a real SIGINT to a real process) saves and ``--resume`` ends
bit-identical to an uninterrupted run; a sweep killed with SIGKILL keeps every finished result and a re-run
computes only the missing cells; results and checkpoints are replaced through a temporary file and a rename,
so a failing or killed writer leaves the previous file intact; written files get the usual permissions
(``0o666`` less the umask).

Covered elsewhere, not repeated here: the API-level checks of the data layer (``tests/test_data.py``) and of
the noise protocol (``tests/test_noise.py``); a NaN loss stops training with one line and keeps the last good
checkpoint (``tests/test_train.py::test_nan_loss_stops_and_keeps_the_last_good_checkpoint``); an in-process
Ctrl-C and resume (``tests/test_train.py::test_interrupt_then_resume_equals_uninterrupted``); a missing
``--dataset`` folder, a non-numeric ``--noise-ratio`` and unknown scoring variants
(``tests/test_cli_train.py``); a folder with only ``train/good`` (``evaluate`` and noise injection without test
images), a bad ``--contamination``, ``--threshold`` or ``dataset.json``, and memory running out in a training step
or in scoring (``tests/test_cli_practitioner.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from PIL import Image

from trustmae_lib import io as io_mod
from trustmae_lib.cli import main
from trustmae_lib.config import RunSpec, load_profile
from trustmae_lib.engine import evaluate as evaluate_mod
from trustmae_lib.engine.checkpoint import load_checkpoint, save_checkpoint
from trustmae_lib.engine.methods import build_models
from trustmae_lib.engine.runs import CHECKPOINT
from trustmae_lib.engine.train import train
from trustmae_lib.io import atomic_write, read_json, write_json
from trustmae_lib.study import sweep

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("isolated_data")


def _train_args(out: Path, *more: str) -> list[str]:
    """``trustmae train`` with the fastest method and one step of the smoke profile."""
    return [
        "train",
        "--profile",
        "smoke",
        "--method",
        "ae_l2",
        "--steps",
        "1",
        "--no-progress",
        "--out",
        str(out),
        *more,
    ]


@dataclass(frozen=True)
class Trained:
    """A finished ae_l2 run on the shared tiny tree (module-scoped; cases corrupt copies of it, never it)."""

    tree: Path
    run: Path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_mvtec_tree) -> Trained:
    base = tmp_path_factory.mktemp("trained")
    tree = make_mvtec_tree(base / "mvtec")
    assert main(_train_args(base / "runs", "--dataset", str(tree), "--category", "bottle")) == 0
    (run,) = (base / "runs").iterdir()
    return Trained(tree, run)


def _copy_run(trained: Trained, tmp: Path) -> Path:
    """A copy of the trained run under ``tmp/runs`` (same folder name, so ``--resume`` finds it)."""
    return Path(shutil.copytree(trained.run, tmp / "runs" / trained.run.name))


def _snapshot(*roots: Path) -> dict[Path, tuple[int, int]]:
    """``path -> (size, mtime)`` of every file under ``roots``."""
    files = [p for r in roots if r.exists() for p in r.rglob("*") if p.is_file()]
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


def _one_error_line(capsys, code: int) -> str:
    """The command failed as a user error: exit 2 and exactly one ``error:`` line on stderr, no traceback."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ----------------------------------------------------------------------------------------------------------
# Bad input: one table, each case through the command line
# ----------------------------------------------------------------------------------------------------------

#: Files a train command writes before it reads the training images (a decode error leaves this manifest).
MANIFEST_ONLY = frozenset({"manifest.json"})
#: Files a finished training writes (``train --evaluate`` that fails in the evaluation keeps the trained run).
TRAINED = frozenset({"manifest.json", "checkpoint.pt", "log.csv", "run.json"})


@dataclass(frozen=True)
class Case:
    """``setup(tree, trained, tmp) -> (argv, needles)``; ``may_write``: names the failed command may write."""

    setup: Callable[[Path, Trained, Path], tuple[list[str], list[str]]]
    may_write: frozenset = field(default_factory=frozenset)


def _root_missing(tree, trained, tmp):
    return ["data", "info", str(tmp / "nowhere")], [str(tmp / "nowhere"), "does not exist"]


def _not_mvtec_layout(tree, trained, tmp):
    (tmp / "photos" / "holiday").mkdir(parents=True)
    first_missing = tmp / "photos" / "holiday" / "train" / "good"
    return ["data", "info", str(tmp / "photos")], ["not in MVTec AD layout", str(first_missing)]


def _category_folder_as_root(tree, trained, tmp):
    return ["data", "info", str(tree / "bottle")], [str(tree / "bottle"), "category folder", str(tree)]


def _category_without_train(tree, trained, tmp):
    shutil.rmtree(tree / "cable" / "train")
    argv = _train_args(tmp / "runs", "--dataset", str(tree), "--category", "cable")
    return argv, ["not in MVTec AD layout", str(tree / "cable" / "train" / "good")]


def _unknown_category(tree, trained, tmp):
    argv = _train_args(tmp / "runs", "--dataset", str(tree), "--category", "botle")
    return argv, ["unknown category 'botle'", "did you mean 'bottle'"]


def _empty_train_good(tree, trained, tmp):
    for p in (tree / "cable" / "train" / "good").iterdir():
        p.unlink()
    argv = _train_args(tmp / "runs", "--dataset", str(tree), "--category", "cable")
    return argv, [str(tree / "cable" / "train" / "good"), "holds no images"]


def _corrupt_png(tree, trained, tmp):
    bad = tree / "bottle" / "train" / "good" / "001.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"definitely not image data" * 4)
    return _train_args(tmp / "runs", "--dataset", str(tree), "--category", "bottle"), [
        "cannot read image",
        str(bad),
    ]


def _truncated_png(tree, trained, tmp):
    cut = tree / "grid" / "train" / "good" / "001.png"  # the 16-bit one
    cut.write_bytes(cut.read_bytes()[:120])
    return _train_args(tmp / "runs", "--dataset", str(tree), "--category", "grid"), [
        "cannot read image",
        str(cut),
    ]


def _truncated_test_png(tree, trained, tmp):
    cut = tree / "bottle" / "test" / "good" / "001.png"
    cut.write_bytes(cut.read_bytes()[:150])
    argv = _train_args(tmp / "runs", "--dataset", str(tree), "--category", "bottle", "--evaluate")
    return argv, ["cannot read image", str(cut)]


def _mask_size_differs(tree, trained, tmp):
    mask = tree / "bottle" / "ground_truth" / "broken_large" / "000_mask.png"
    Image.new("L", (16, 16), 255).save(mask)
    argv = _train_args(tmp / "runs", "--dataset", str(tree), "--category", "bottle", "--evaluate")
    return argv, [str(mask), "16x16", "32x32"]


def _mask_without_image(tree, trained, tmp):
    gt = tree / "bottle" / "ground_truth" / "broken_large"
    shutil.copy(gt / "000_mask.png", gt / "005_mask.png")
    argv = _train_args(tmp / "runs", "--dataset", str(tree), "--category", "bottle")
    return argv, [str(gt / "005_mask.png"), "has no image"]


def _image_without_mask(tree, trained, tmp):
    mask = tree / "bottle" / "ground_truth" / "contamination" / "000_mask.png"
    mask.unlink()
    argv = _train_args(tmp / "runs", "--dataset", str(tree), "--category", "bottle")
    return argv, ["has no mask", str(mask)]


def _noise_ratio(text: str):
    def setup(tree, trained, tmp):
        argv = _train_args(
            tmp / "runs",
            "--dataset",
            str(tree),
            "--category",
            "bottle",
            "--noise-ratio",
            text,
        )
        return argv, ["noise ratio", "outside [0, 0.9]"]

    return setup


def _disjoint_without_defects(tree, trained, tmp):
    # cable has a single defective test image (cut): nothing to split off into a disjoint pool.
    argv = _train_args(
        tmp / "runs",
        "--dataset",
        str(tree),
        "--category",
        "cable",
        "--protocol",
        "disjoint",
        "--noise-ratio",
        "0.4",
    )
    return argv, ["disjoint", "no defective images to inject", "overlap"]


def _profile(text: str, *needles: str):
    def setup(tree, trained, tmp):
        path = tmp / "my_profile.yaml"
        path.write_text(text)
        argv = _train_args(tmp / "runs", "--dataset", str(tree), "--category", "bottle")
        argv[argv.index("smoke")] = str(path)
        at = argv.index("--steps")  # the file's steps, not the command line's
        del argv[at : at + 2]
        return argv, [str(path), *needles]

    return setup


def _steps_negative(tree, trained, tmp):
    argv = _train_args(tmp / "runs", "--dataset", str(tree), "--category", "bottle")
    argv[argv.index("--steps") + 1] = "-1"
    return argv, ["--steps -1"]


def _device(name: str):
    def setup(tree, trained, tmp):
        argv = _train_args(tmp / "runs", "--dataset", str(tree), "--category", "bottle", "--device", name)
        return argv, [name]

    return setup


def _batch_size_zero(tree, trained, tmp):
    return ["evaluate", str(_copy_run(trained, tmp)), "--batch-size", "0"], ["--batch-size 0"]


def _checkpoint_other_architecture(tree, trained, tmp):
    run = _copy_run(trained, tmp)
    payload = load_checkpoint(run / CHECKPOINT)
    # The weights of another network (MemAE) under the run's own spec and profile.
    memae = build_models(RunSpec(method="memae"), load_profile("smoke"))["model"]
    payload["models"]["model"] = memae.state_dict()
    save_checkpoint(run / CHECKPOINT, payload)
    return ["evaluate", str(run)], [str(run / CHECKPOINT), "do not fit the architecture"]


def _checkpoint_truncated(tree, trained, tmp):
    run = _copy_run(trained, tmp)
    blob = (run / CHECKPOINT).read_bytes()
    (run / CHECKPOINT).write_bytes(blob[: len(blob) // 2])
    return ["evaluate", str(run)], [str(run / CHECKPOINT), "truncated or corrupt"]


def _checkpoint_empty_on_resume(tree, trained, tmp):
    run = _copy_run(trained, tmp)
    (run / CHECKPOINT).write_bytes(b"")
    argv = _train_args(tmp / "runs", "--dataset", str(trained.tree), "--category", "bottle", "--resume")
    return argv, [str(run / CHECKPOINT), "truncated or corrupt"]


def _checkpoint_unfinished(tree, trained, tmp):
    run = _copy_run(trained, tmp)
    payload = load_checkpoint(run / CHECKPOINT)
    save_checkpoint(run / CHECKPOINT, {**payload, "finished": False})
    return ["evaluate", str(run)], ["unfinished", "--resume"]


def _evaluate_not_a_run(tree, trained, tmp):
    (tmp / "folder").mkdir()
    return ["evaluate", str(tmp / "folder")], [str(tmp / "folder" / CHECKPOINT), "does not exist"]


def _score_folder_without_images(tree, trained, tmp):
    (tmp / "docs").mkdir()
    (tmp / "docs" / "notes.txt").write_text("no pictures here")
    return ["score", str(trained.run), str(tmp / "docs"), "--out", str(tmp / "scored")], ["holds no images"]


def _score_corrupt_image(tree, trained, tmp):
    (tmp / "imgs").mkdir()
    Image.new("RGB", (40, 40)).save(tmp / "imgs" / "a.png")
    (tmp / "imgs" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    argv = ["score", str(trained.run), str(tmp / "imgs"), "--out", str(tmp / "scored")]
    return argv, ["cannot read image", str(tmp / "imgs" / "b.png")]


def _score_with_a_broken_result_file(tree, trained, tmp):
    run = _copy_run(trained, tmp)
    (run / "result.json").write_text('{"metrics": {"residual": ')
    (tmp / "imgs").mkdir()
    Image.new("RGB", (40, 40)).save(tmp / "imgs" / "a.png")
    argv = ["score", str(run), str(tmp / "imgs"), "--out", str(tmp / "scored")]
    return argv, [str(run / "result.json"), "not a result file"]


def _out_is_a_file(tree, trained, tmp):
    (tmp / "runs").write_text("a file where the runs folder should be")
    argv = _train_args(tmp / "runs", "--dataset", str(tree), "--category", "bottle")
    return argv, ["Not a directory", str(tmp / "runs")]


def _score_out_is_a_file(tree, trained, tmp):
    (tmp / "scored").write_text("a file where the output folder should be")
    image = tree / "bottle" / "test" / "good" / "000.png"
    return ["score", str(trained.run), str(image), "--out", str(tmp / "scored")], [
        "File exists",
        str(tmp / "scored"),
    ]


CASES = {
    "root-missing": Case(_root_missing),
    "not-mvtec-layout": Case(_not_mvtec_layout),
    "category-folder-given-as-root": Case(_category_folder_as_root),
    "category-without-train-good": Case(_category_without_train),
    "unknown-category": Case(_unknown_category),
    "empty-train-good": Case(_empty_train_good),
    "corrupt-png": Case(_corrupt_png, MANIFEST_ONLY),
    "truncated-16bit-png": Case(_truncated_png, MANIFEST_ONLY),
    "truncated-test-png": Case(_truncated_test_png, TRAINED),
    "mask-size-differs": Case(_mask_size_differs, TRAINED),
    "mask-without-image": Case(_mask_without_image),
    "image-without-mask": Case(_image_without_mask),
    "noise-ratio-too-high": Case(_noise_ratio("0.95")),
    "noise-ratio-negative": Case(_noise_ratio("-0.1")),
    "noise-ratio-nan": Case(_noise_ratio("nan")),
    "noise-ratio-inf": Case(_noise_ratio("inf")),
    "disjoint-without-a-pool": Case(_disjoint_without_defects),
    "profile-unknown-key": Case(_profile("stepz: 3\n", "unknown key 'stepz'", "did you mean 'steps'")),
    "profile-wrong-type": Case(_profile("batch_size: four\n", "key 'batch_size' must be int", "'four'")),
    "profile-float-for-int": Case(_profile("memory_slots: 2.5\n", "key 'memory_slots' must be int")),
    "profile-zero-batch": Case(_profile("batch_size: 0\n", "key 'batch_size' must be at least 1")),
    "profile-negative-steps": Case(_profile("steps: -2\n", "key 'steps' must be at least 1")),
    "profile-negative-lr": Case(_profile("lr: -1.0\n", "key 'lr' must be a positive number")),
    "profile-nan-lr": Case(_profile("lr: .nan\n", "key 'lr' must be a positive number")),
    "profile-not-a-mapping": Case(_profile("- steps\n- 3\n", "expected a mapping")),
    "profile-not-yaml": Case(_profile("steps: [1\n", "not valid YAML")),
    "steps-negative": Case(_steps_negative),
    "device-unknown": Case(_device("bogus")),
    "device-unavailable": Case(_device("cuda:7")),
    "batch-size-zero": Case(_batch_size_zero),
    "checkpoint-other-architecture": Case(_checkpoint_other_architecture),
    "checkpoint-truncated": Case(_checkpoint_truncated),
    "checkpoint-empty-on-resume": Case(_checkpoint_empty_on_resume),
    "checkpoint-unfinished": Case(_checkpoint_unfinished),
    "evaluate-not-a-run": Case(_evaluate_not_a_run),
    "score-folder-without-images": Case(_score_folder_without_images),
    "score-corrupt-image": Case(_score_corrupt_image),
    "score-broken-result-file": Case(_score_with_a_broken_result_file),
    "out-is-a-file": Case(_out_is_a_file),
    "score-out-is-a-file": Case(_score_out_is_a_file),
}


@pytest.mark.filterwarnings("error::ResourceWarning")  # e.g. an image file left open after a decode error
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_error_line_and_leaves_nothing_behind(name, mvtec_tree, trained, tmp_path, capsys):
    case = CASES[name]
    work = tmp_path / "work"
    work.mkdir()
    argv, needles = case.setup(mvtec_tree, trained, work)
    before = _snapshot(tmp_path, trained.run)
    capsys.readouterr()
    line = _one_error_line(capsys, main(argv))
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    after = _snapshot(tmp_path, trained.run)
    written = sorted(p for p in after if before.get(p) != after[p])
    debris = [p for p in written if p.name not in case.may_write]
    assert not debris, f"the failed command wrote {debris}"
    assert not [p for p in after if p.suffix in (".tmp", ".partial")]


@pytest.mark.parametrize("category", ["grid", "bottle"])
def test_grey_16bit_palette_rgba_images_are_accepted_end_to_end(category, mvtec_tree, tmp_path, capsys):
    """grid: 8-bit L, 16-bit I;16 and palette training images, LA test images, palette masks; bottle: RGBA."""
    modes = set()
    for path in (mvtec_tree / category).rglob("*.png"):
        with Image.open(path) as image:
            modes.add(image.mode)
    assert modes >= ({"L", "I;16", "P", "LA"} if category == "grid" else {"RGB", "RGBA", "L"}), modes
    argv = _train_args(
        tmp_path / "runs",
        "--dataset",
        str(mvtec_tree),
        "--category",
        category,
        "--noise-ratio",
        "0.2",
        "--evaluate",
    )
    assert main(argv) == 0, capsys.readouterr().err
    (run,) = (tmp_path / "runs").iterdir()
    result = read_json(run / "result.json")
    n_defective = {"grid": 2, "bottle": 3}[category]
    # 4 normal training images + 1 injected defect.
    assert result["n_test_defective"] == n_defective and result["n_train"] == 5
    assert result["image_auroc"] is not None and result["pixel_auroc"] is not None  # every mask was decoded


# ----------------------------------------------------------------------------------------------------------
# Faults: Ctrl-C, SIGKILL, failing writers
# ----------------------------------------------------------------------------------------------------------


def _child_env() -> dict:
    """The test's environment for a child process: one thread, this checkout importable."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": path}


def _wait_for(
    predicate: Callable[[], bool],
    proc: subprocess.Popen,
    what: str,
    timeout: float = 300.0,
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"child exited ({proc.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_ctrl_c_in_the_cli_saves_and_resume_matches_an_uninterrupted_run(mvtec_tree, tmp_path, capsys):
    """A real SIGINT to ``python -m trustmae_lib train``: exit 130 and a checkpoint; ``--resume`` (in another
    process than the interrupted one) ends with exactly the weights of an uninterrupted run."""
    steps = 15  # ~0.1 s a step: the signal (sent ~20 ms after step 1) lands well before the end
    args = [
        "train",
        "--profile",
        "smoke",
        "--dataset",
        str(mvtec_tree),
        "--category",
        "bottle",
        "--noise-ratio",
        "0.2",
        "--steps",
        str(steps),
        "--no-progress",
        "--device",
        "cpu",
    ]
    child = subprocess.Popen(
        [sys.executable, "-m", "trustmae_lib", *args, "--out", str(tmp_path / "split")],
        env=_child_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # log.csv is written after every step (smoke: log_every 1), so once it exists the loop is running.
    _wait_for(lambda: any((tmp_path / "split").glob("*/log.csv")), child, "the first training step")
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=300)
    assert child.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err and "--resume" in err
    (run,) = (tmp_path / "split").iterdir()
    saved = load_checkpoint(run / CHECKPOINT)
    assert 1 <= saved["step"] < steps and not saved["finished"]
    assert not [p for p in run.iterdir() if p.suffix == ".tmp"]

    assert main([*args, "--out", str(tmp_path / "split"), "--resume"]) == 0, capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "full")]) == 0, capsys.readouterr().err
    (full_run,) = (tmp_path / "full").iterdir()
    a, b = load_checkpoint(full_run / CHECKPOINT), load_checkpoint(run / CHECKPOINT)
    assert a["step"] == b["step"] == steps and a["finished"] and b["finished"]
    for net in ("model", "discriminator"):
        assert a["models"][net].keys() == b["models"][net].keys()
        for key, value in a["models"][net].items():
            torch.testing.assert_close(b["models"][net][key], value, rtol=0, atol=0, equal_nan=True, msg=key)
    assert [r["step"] for r in b["log"]] == list(range(1, steps + 1))


SWEEP_CHILD = textwrap.dedent(
    """
    import sys
    from trustmae_lib.study.sweep import load_sweep, run_sweep
    summary = run_sweep(load_sweep(sys.argv[1]), jobs=int(sys.argv[2]), progress=False, device="cpu")
    print(len(summary["failed"]), "failed")
    """
)


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (Linux ``/proc``)."""
    out = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid:
            out.append(int(stat_file.parent.name))
    return out


def _pool_worker(pid: int) -> int | None:
    """A ``ProcessPoolExecutor`` worker (spawned) among the children of ``pid``, or ``None`` yet."""
    for child in _children(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            return child
    return None


@pytest.mark.parametrize(
    "jobs",
    [
        pytest.param(1, id="sweep-process-killed"),
        pytest.param(
            2,
            id="pool-worker-killed",
            marks=[
                pytest.mark.slow,
                pytest.mark.skipif(
                    not Path("/proc/self/stat").exists(),
                    reason="finds the worker through /proc",
                ),
            ],
        ),
    ],
)
def test_sigkill_during_a_sweep_keeps_finished_results_and_a_rerun_does_only_the_rest(
    jobs, mvtec_tree, tmp_path, monkeypatch
):
    """jobs=1: the sweep process itself is killed. jobs=2: one pool worker is killed; the sweep reports its
    cells as failed (no traceback) and exits normally."""
    results, runs = tmp_path / "results", tmp_path / "runs"
    config_file = tmp_path / "sweep_kill.yaml"
    config_file.write_text(
        "profile: smoke\n"
        f"datasets: {{{json.dumps(str(mvtec_tree))}: [bottle, grid]}}\n"
        "methods: [ae_l2]\n"
        "noise_ratios: [0.0, 0.2]\n"
        "seeds: [0]\n"
        f"results: {json.dumps(str(results))}\n"
        f"runs: {json.dumps(str(runs))}\n"
    )
    config = sweep.load_sweep(config_file)
    grid = config.grid()
    assert len(grid) == 4
    assert {sweep.result_path(s, results).parent for s in grid} == {results}  # a dataset path is shortened
    child = subprocess.Popen(
        [sys.executable, "-c", SWEEP_CHILD, str(config_file), str(jobs)],
        env=_child_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _wait_for(lambda: any(results.glob("*.json")), child, "the first result file")
    if jobs == 1:
        os.kill(child.pid, signal.SIGKILL)  # mid-way through the next cell (training, scoring or writing)
        child.communicate(timeout=60)
        assert child.returncode == -signal.SIGKILL
    else:
        worker = _pool_worker(child.pid)
        assert worker is not None
        os.kill(worker, signal.SIGKILL)
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0 and "Traceback" not in err, err
        assert int(out.split()[0]) >= 1  # the killed worker's cell (and those not started) reported as failed

    finished = sorted(results.glob("*.json"))
    assert 1 <= len(finished) < len(grid)
    by_name = {sweep.result_path(s, results).name: s for s in grid}
    for path in finished:  # every finished result is complete and belongs to its cell
        assert read_json(path)["config_hash"] == by_name[path.name].config_hash()
    leftovers = [p for p in results.rglob("*") if p.is_file() and p.suffix != ".json"]
    assert all(p.name.startswith(".") and p.suffix == ".tmp" for p in leftovers), leftovers  # never read back
    for ckpt in runs.rglob(CHECKPOINT):  # a checkpoint on disk is whole, whether or not its cell finished
        load_checkpoint(ckpt)

    ran = []
    real = sweep.run_cell
    monkeypatch.setattr(sweep, "run_cell", lambda spec, *a, **k: ran.append(spec) or real(spec, *a, **k))
    summary = sweep.run_sweep(config, progress=False, device="cpu")
    assert summary["failed"] == [] and summary["skipped"] == len(finished)
    assert {s.config_hash() for s in ran} == {s.config_hash() for s in grid} - {
        by_name[p.name].config_hash() for p in finished
    }
    assert sorted(p.name for p in results.glob("*.json")) == sorted(by_name)
    for path in finished:  # untouched by the re-run
        assert read_json(path)["config_hash"] == by_name[path.name].config_hash()


class _HalfWriter:
    """A file whose ``write`` stores half of the bytes and then fails, like a full disk."""

    def __init__(self, handle):
        self._handle = handle

    def write(self, data):
        self._handle.write(data[: len(data) // 2])
        self._handle.flush()
        raise OSError(28, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()
        return False


@pytest.fixture
def disk_full(monkeypatch):
    """Make every :func:`atomic_write` fail half-way through writing (after the temporary file has data)."""

    def install():
        real = os.fdopen

        def fdopen(fd, mode="r", *args, **kwargs):
            return _HalfWriter(real(fd, mode, *args, **kwargs))

        monkeypatch.setattr(io_mod.os, "fdopen", fdopen)

    return install


def test_a_writer_failing_mid_write_leaves_results_and_checkpoints_intact(tmp_path, disk_full):
    result = write_json(tmp_path / "result.json", {"config_hash": "abc", "image_auroc": 0.75})
    ckpt = save_checkpoint(tmp_path / CHECKPOINT, {"step": 3, "models": {"w": torch.arange(1000.0)}})
    before = {p: p.read_bytes() for p in (result, ckpt)}
    disk_full()
    with pytest.raises(OSError, match="No space"):
        write_json(result, {"config_hash": "abc", "image_auroc": 0.99, "padding": "x" * 10_000})
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(ckpt, {"step": 4, "models": {"w": torch.zeros(1000)}})
    assert {p: p.read_bytes() for p in (result, ckpt)} == before
    # ... and no temporary file is left.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT, "result.json"])
    assert load_checkpoint(ckpt)["step"] == 3


def test_training_saves_its_checkpoint_atomically(trained, tmp_path, disk_full):
    """``train --resume`` of a finished run rewrites the checkpoint; a failing write keeps the old one."""
    run = _copy_run(trained, tmp_path)
    before = (run / CHECKPOINT).read_bytes()
    spec = RunSpec(**load_checkpoint(run / CHECKPOINT)["spec"])
    disk_full()
    with pytest.raises(OSError, match="No space"):
        train(spec, tmp_path / "runs", resume=True, progress=False)
    assert (run / CHECKPOINT).read_bytes() == before
    assert not [p for p in run.iterdir() if p.suffix == ".tmp"]


def test_full_disk_during_evaluate_is_one_error_line_without_result(trained, tmp_path, disk_full, capsys):
    run = _copy_run(trained, tmp_path)
    disk_full()
    assert "No space left on device" in _one_error_line(capsys, main(["evaluate", str(run)]))
    assert not (run / "result.json").exists() and not (run / "scores.csv").exists()
    assert not [p for p in run.iterdir() if p.suffix == ".tmp"]


def test_ctrl_c_outside_the_training_loop_is_one_line(trained, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate_mod, "evaluate", interrupted)
    assert main(["evaluate", str(trained.run)]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from trustmae_lib.io import atomic_write
    target, ready = Path(sys.argv[1]), Path(sys.argv[2])
    with atomic_write(target, "w") as handle:
        handle.write('{"config_hash": "new", "image_auroc": 0.')
        handle.flush()
        ready.touch()
        time.sleep(120)  # killed here, half-way through the JSON
        handle.write('99}')
    """
)


def test_a_writer_killed_mid_write_leaves_the_old_result(tmp_path):
    results = tmp_path / "results"
    target = write_json(results / "cell.json", {"config_hash": "old", "image_auroc": 0.5})
    before = target.read_bytes()
    ready = tmp_path / "ready"
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(target), str(ready)],
        env=_child_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _wait_for(ready.exists, child, "the half-written file")
    os.kill(child.pid, signal.SIGKILL)
    child.communicate(timeout=60)
    assert target.read_bytes() == before
    (tmp,) = [p for p in results.iterdir() if p != target]  # the killed writer's temporary file ...
    assert tmp.name.startswith(".cell.json.") and tmp.suffix == ".tmp"
    # ... is hidden (a dot file) and never matches a result file name (``<stem>.json``)
    assert [p.name for p in results.glob("*.json")] == ["cell.json"] and read_json(target)["config_hash"] == "old"


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077], ids=oct)
def test_written_files_get_the_usual_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        paths = [
            write_json(tmp_path / "result.json", {"a": 1}),
            save_checkpoint(tmp_path / CHECKPOINT, {"step": 1}),
        ]
        with atomic_write(tmp_path / "scores.csv", "w") as handle:
            handle.write("image,score\n")
        paths.append(tmp_path / "scores.csv")
        with open(tmp_path / "plain.txt", "w") as handle:  # what a plain open gives, for comparison
            handle.write("x")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == want
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == want, path
    assert os.umask(old) == old  # reading the umask did not change it
