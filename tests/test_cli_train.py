"""Command line: train / evaluate / score, their --help, and one-line errors with exit status 2."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from trustmae_lib.cli import main

pytestmark = pytest.mark.usefixtures("isolated_data")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    argv = ["train", "--profile", "smoke", "--category", "widget", "--noise-ratio", "0.1", "--steps", "2",
            "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run


def _one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("command", ["train", "evaluate", "score"])
def test_help(command, capsys):
    assert main([command, "--help"]) == 0
    assert f"usage: trustmae {command}" in capsys.readouterr().out


def test_train_writes_a_run_folder(run_dir, capsys):
    info = json.loads((run_dir / "run.json").read_text())
    assert info["finished"] and info["step"] == 2 and info["spec"]["noise_ratio"] == 0.1
    assert run_dir.name.startswith("synthetic-widget-n10-overlap-trustmae-smoke-s0-")
    assert main(["train", "--profile", "smoke", "--category", "widget", "--noise-ratio", "0.1", "--steps", "2",
                 "--out", str(run_dir.parent), "--no-progress"]) == 2  # fmt: skip
    _one_line_error(capsys, 2, "already trained", "evaluate")


def test_evaluate_prints_a_table_and_writes_result(run_dir, capsys):
    assert main(["evaluate", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "perceptual" in out and "pixel" in out and "global" in out and "image AUC" in out
    result = json.loads((run_dir / "result.json").read_text())
    assert result["method"] == "trustmae" and result["category"] == "widget"


def test_score_folder_and_single_image(run_dir, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "scored"
    assert main(["score", str(run_dir), str(folder), "--out", str(out)]) == 0
    with open(out / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["overlay"] for r in rows] == ["img0_overlay.png", "img1_overlay.png"]
    for r in rows:
        assert float(r["score"]) >= 0 and r["anomalous"] in ("0", "1")
        with Image.open(out / r["overlay"]) as im:  # the input's own 80 x 80, a colour bar to the right
            assert im.size[1] == 80 and im.size[0] > 80 and im.mode == "RGB"
    single = tmp_path / "single"
    assert main(["score", str(run_dir), str(folder / "img1.png"), "--out", str(single)]) == 0
    with open(single / "scores.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert float(row["score"]) == pytest.approx(float(rows[1]["score"]), rel=1e-5)


def test_errors_are_one_line_with_exit_2(run_dir, tmp_path, capsys):
    base = ["train", "--profile", "smoke", "--steps", "1", "--out", str(tmp_path), "--no-progress"]
    _one_line_error(capsys, main([*base, "--category", "brik"]), "unknown category", "brick")
    _one_line_error(capsys, main([*base, "--noise-ratio", "1.5"]), "noise ratio")
    _one_line_error(capsys, main([*base, "--noise-ratio", "ten"]), "not a number")
    _one_line_error(capsys, main([*base, "--dataset", str(tmp_path / "nowhere")]), "nowhere")
    _one_line_error(capsys, main(["evaluate", str(tmp_path / "missing_run")]), "missing_run", "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(capsys, main(["score", str(run_dir), str(empty)]), "holds no images")
    _one_line_error(capsys, main(["evaluate", str(run_dir), "--variants", "residual"]), "do not apply")


def test_any_mvtec_layout_folder_is_a_dataset(tmp_path, capsys):
    root = tmp_path / "my_data" / "part"
    rng = np.random.default_rng(1)
    for sub, n in (("train/good", 4), ("test/good", 2), ("test/dent", 2)):
        (root / sub).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / sub / f"{i:03d}.png")
    out = tmp_path / "runs"
    argv = ["train", "--dataset", str(tmp_path / "my_data"), "--category", "part", "--method", "ae_l2",
            "--profile", "smoke", "--steps", "1", "--out", str(out), "--no-progress", "--evaluate"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "residual" in printed
    (run,) = list(out.iterdir())
    assert run.name.startswith("my_data-part-n00-overlap-ae_l2-smoke-s0-")
    result = json.loads((run / "result.json").read_text())
    assert result["pixel_auroc"] is None and result["image_auroc"] is not None  # no ground_truth -> image only
