"""The command line for a practitioner's own folder of images.

* a folder with only ``train/good`` trains and scores; ``evaluate`` on such a run, and noise injection without
  defective images, are one-line errors;
* ``--contamination`` (train, evaluate, score) moves the threshold but never the weights or the run's config hash;
* ``score`` on the training folder gives the training scores the threshold was fitted on;
* ``score --threshold`` is applied, printed and written into ``scores.csv``;
* overlays come out at the input image's own size, with a colour bar;
* ``--augment`` is recorded, keyed when not ``auto`` and reaches the training loop; ``auto`` keeps committed hashes;
* memory running out in a training step or in scoring is one line naming what to lower, keeps the last checkpoint
  and the previous outputs, and exits 2 without a traceback.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from trustmae_lib.cli import main
from trustmae_lib.config import RunSpec, load_profile
from trustmae_lib.data.mvtec import scan_category
from trustmae_lib.data.noise import inject_noise
from trustmae_lib.engine import evaluate as ev
from trustmae_lib.engine import train as train_mod
from trustmae_lib.engine.checkpoint import load_checkpoint
from trustmae_lib.engine.prepare import augmentation
from trustmae_lib.engine.runs import CHECKPOINT, load_trained
from trustmae_lib.errors import TrustMAEError
from trustmae_lib.model import losses
from trustmae_lib.utils import is_out_of_memory

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("isolated_data")


def _pictures(folder: Path, n: int, shape: tuple[int, int], seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 200, (*shape, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def _train(out: Path, *more: str, dataset: Path, category: str = "screw") -> list[str]:
    return ["train", "--dataset", str(dataset), "--category", category, "--profile", "smoke", "--steps", "2",
            "--out", str(out), "--no-progress", *more]  # fmt: skip


def _only_run(out: Path) -> Path:
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run


def _one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """A practitioner's folder: ``screw`` has only train/good; ``nut`` also test/good and test/dent (no masks).
    ``new/`` holds two images to score, 90 x 130 (H x W) -- not square, larger than the smoke profile's 64 px."""
    base = tmp_path_factory.mktemp("shop")
    root = base / "parts"
    _pictures(root / "screw" / "train" / "good", 6, (48, 48), seed=0)
    _pictures(root / "nut" / "train" / "good", 6, (48, 48), seed=1)
    _pictures(root / "nut" / "test" / "good", 2, (48, 48), seed=2)
    _pictures(root / "nut" / "test" / "dent", 2, (48, 48), seed=3)
    _pictures(base / "new", 2, (90, 130), seed=4)
    return base


@pytest.fixture(scope="module")
def screw_run(shop):
    """``screw`` trained with the defaults (contamination = noise ratio 0, augment auto)."""
    out = shop / "runs_default"
    assert main(_train(out, dataset=shop / "parts")) == 0
    return _only_run(out)


# ----------------------------------------------------------------------------------------------------------
# 1. train/good is enough
# ----------------------------------------------------------------------------------------------------------


def test_a_folder_with_only_train_good_trains_and_scores(shop, screw_run, tmp_path, capsys):
    info = json.loads((screw_run / "run.json").read_text())
    assert info["finished"] and info["n_train"] == 6 and info["n_test"] == 0
    assert info["assumed_contamination"] == 0.0 and info["contamination_source"] == "noise_ratio"
    out = tmp_path / "scored"
    capsys.readouterr()
    assert main(["score", str(screw_run), str(shop / "new"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fitted on the run's 6 training images at assumed contamination 0.00" in printed
    rows = _rows(out / "scores.csv")
    assert [Path(r["image"]).name for r in rows] == ["000.png", "001.png"]
    assert all(r["threshold_source"] == "fitted" and r["assumed_contamination"] == "0" for r in rows)


def test_evaluate_needs_test_images_and_says_so_in_one_line(screw_run, capsys):
    _one_line_error(capsys, main(["evaluate", str(screw_run)]), "no test images", "trustmae score",
                    str(Path("screw") / "test"))  # fmt: skip
    assert not (screw_run / "result.json").exists()


def test_noise_needs_defective_images_but_ratio_zero_needs_no_test_folder(shop, tmp_path, capsys):
    index = scan_category(shop / "parts", "screw")
    assert index.test == () and not index.has_masks
    for protocol in ("overlap", "disjoint"):
        split = inject_noise(index, 0.0, protocol, seed=0)
        assert split.test == () and split.n_injected == 0 and len(split.train) == 6
    code = main(_train(tmp_path / "runs", "--noise-ratio", "0.2", dataset=shop / "parts"))
    _one_line_error(capsys, code, "no defective test images", "noise ratio 0", "--contamination")
    assert not (tmp_path / "runs").exists()
    # A test folder without images is still a mistake worth naming.
    copy = Path(shutil.copytree(shop / "parts", tmp_path / "parts"))
    (copy / "screw" / "test" / "good").mkdir(parents=True)
    with pytest.raises(TrustMAEError, match="holds no images.*remove the empty folder"):
        scan_category(copy, "screw")


# ----------------------------------------------------------------------------------------------------------
# 2. --contamination
# ----------------------------------------------------------------------------------------------------------


def _threshold_of(run: Path, images: Path, out: Path, *more: str) -> float:
    assert main(["score", str(run), str(images), "--out", str(out), *more]) == 0
    (value,) = {float(r["threshold"]) for r in _rows(out / "scores.csv")}
    return value


def test_contamination_moves_the_threshold_but_not_the_weights_or_the_hash(shop, screw_run, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(_train(out, "--contamination", "0.2", dataset=shop / "parts")) == 0
    run = _only_run(out)
    assert run.name == screw_run.name  # same config hash, same run folder name
    a, b = load_checkpoint(screw_run / CHECKPOINT), load_checkpoint(run / CHECKPOINT)
    assert a["config_hash"] == b["config_hash"] and a["spec"] == b["spec"]
    for name, state in a["models"].items():
        for key, value in state.items():
            torch.testing.assert_close(value, b["models"][name][key], rtol=0, atol=0, equal_nan=True)  # bit-equal
    assert b["assumed_contamination"] == 0.2 and b["contamination_source"] == "given"
    info = json.loads((run / "run.json").read_text())
    assert info["assumed_contamination"] == 0.2 and info["contamination_source"] == "given"

    # The threshold is the 1 - (0.2 + 0.05) quantile of the run's training scores.
    trained = load_trained(run)
    train_scores = ev.score(trained, ev._train_images(trained, trained.score_size)).pred_scores.numpy()
    at_default = _threshold_of(screw_run, shop / "new", tmp_path / "a")
    at_given = _threshold_of(run, shop / "new", tmp_path / "b")
    assert at_given == pytest.approx(np.quantile(train_scores, 0.75), rel=1e-6)
    assert at_default == pytest.approx(np.quantile(train_scores, 0.95), rel=1e-6)
    assert at_given < at_default
    # score --contamination overrides the run's own value: the default run at 0.2 gives the same threshold.
    capsys.readouterr()
    assert _threshold_of(screw_run, shop / "new", tmp_path / "c", "--contamination", "0.2") == at_given
    assert "at assumed contamination 0.20 (given here (--contamination))" in capsys.readouterr().out
    # Out of range or not a number: one line, before anything is trained or written.
    _one_line_error(capsys, main(_train(tmp_path / "bad", "--contamination", "0.95", dataset=shop / "parts")),
                    "contamination 0.95 is outside [0, 0.9]")  # fmt: skip
    _one_line_error(capsys, main(_train(tmp_path / "bad", "--contamination", "lots", dataset=shop / "parts")),
                    "not a number")  # fmt: skip
    assert not (tmp_path / "bad").exists()


def test_scoring_the_training_folder_gives_the_scores_the_threshold_was_fitted_on(shop, screw_run, tmp_path):
    # The screw images are 48 px, resized to the smoke profile's 64: score must decode them as training does (resize,
    # then round to 8 bits), or a training image scores differently from the value its threshold was fitted on.
    out = tmp_path / "train_scored"
    assert main(["score", str(screw_run), str(shop / "parts" / "screw" / "train" / "good"), "--out", str(out)]) == 0
    rows = _rows(out / "scores.csv")
    trained = load_trained(screw_run)
    fitted_on = ev.score(trained, ev._train_images(trained, trained.score_size)).pred_scores.numpy()
    np.testing.assert_allclose([float(r["score"]) for r in rows], fitted_on, rtol=1e-6)
    (threshold,) = {float(r["threshold"]) for r in rows}
    assert threshold == pytest.approx(np.quantile([float(r["score"]) for r in rows], 0.95), rel=1e-6)


def test_evaluate_records_the_assumed_contamination_and_accepts_an_override(shop, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(_train(out, "--method", "ae_l2", dataset=shop / "parts", category="nut")) == 0
    run = _only_run(out)
    assert main(["evaluate", str(run)]) == 0
    default = json.loads((run / "result.json").read_text())
    assert default["threshold"]["assumed_contamination"] == 0.0
    assert default["threshold"]["contamination_source"] == "noise_ratio"
    assert default["metrics"]["residual"]["threshold"]["quantile"] == pytest.approx(0.95)
    capsys.readouterr()
    assert main(["score", str(run), str(shop / "new"), "--out", str(tmp_path / "r")]) == 0
    assert f"from {run / 'result.json'}" in capsys.readouterr().out
    reused = _rows(tmp_path / "r" / "scores.csv")[0]
    assert reused["threshold_source"] == "result.json"
    assert float(reused["threshold"]) == pytest.approx(default["metrics"]["residual"]["threshold"]["value"], rel=1e-7)
    assert main(["evaluate", str(run), "--contamination", "0.3"]) == 0
    assert "assumed contamination 0.30 (given here (--contamination))" in capsys.readouterr().out
    given = json.loads((run / "result.json").read_text())
    assert given["threshold"]["assumed_contamination"] == 0.3 and given["threshold"]["contamination_source"] == "given"
    assert given["metrics"]["residual"]["threshold"]["quantile"] == pytest.approx(0.65)
    assert given["config_hash"] == default["config_hash"] == run.name.rsplit("-", 1)[1]
    assert given["metrics"]["residual"]["image_auroc"] == default["metrics"]["residual"]["image_auroc"]
    # score reuses result.json's threshold only when it was fitted at the contamination score assumes.
    assert main(["score", str(run), str(shop / "new"), "--out", str(tmp_path / "s")]) == 0
    assert _rows(tmp_path / "s" / "scores.csv")[0]["threshold_source"] == "fitted"  # run's own 0.0, not 0.3
    assert main(["score", str(run), str(shop / "new"), "--out", str(tmp_path / "t"), "--contamination", "0.3"]) == 0
    assert float(_rows(tmp_path / "t" / "scores.csv")[0]["threshold"]) == pytest.approx(
        given["metrics"]["residual"]["threshold"]["value"], rel=1e-6
    )


def test_the_default_result_record_keeps_the_committed_metrics_layout():
    """The contamination is recorded beside ``metrics``: a committed result's metrics keep their keys."""
    committed = json.loads(next((REPO / "results" / "cpu").glob("synthetic-widget-n10-*-trustmae-cpu-s0-*.json"))
                           .read_text())  # fmt: skip
    entry = committed["metrics"]["perceptual"]["threshold"]
    fresh = ev.fit_threshold(np.arange(10.0), committed["noise_ratio"])
    assert set(fresh) == set(entry) and fresh["rule"] == entry["rule"]


# ----------------------------------------------------------------------------------------------------------
# 3. score: the threshold, the overlays
# ----------------------------------------------------------------------------------------------------------


def test_score_applies_and_reports_a_given_threshold(shop, screw_run, tmp_path, capsys):
    capsys.readouterr()
    argv = ["score", str(screw_run), str(shop / "new"), "--out"]
    assert main([*argv, str(tmp_path / "low"), "--threshold", "1e-9"]) == 0
    printed = capsys.readouterr().out
    assert "threshold 1e-09: given (--threshold)" in printed
    low = _rows(tmp_path / "low" / "scores.csv")
    assert all(r["anomalous"] == "1" and float(r["threshold"]) == 1e-9 and r["threshold_source"] == "given"
               for r in low)  # fmt: skip
    assert all(r["assumed_contamination"] == "" for r in low)
    assert main([*argv, str(tmp_path / "high"), "--threshold", "1e9"]) == 0
    assert all(r["anomalous"] == "0" for r in _rows(tmp_path / "high" / "scores.csv"))
    assert [r["score"] for r in low] == [r["score"] for r in _rows(tmp_path / "high" / "scores.csv")]
    argv = [*argv, str(tmp_path / "x")]
    _one_line_error(capsys, main([*argv, "--threshold", "nan"]), "not a finite number")
    _one_line_error(capsys, main([*argv, "--threshold", "high"]), "not a number")
    _one_line_error(capsys, main([*argv, "--threshold", "1", "--contamination", "0.1"]), "pass one of them")


def test_overlays_have_the_input_size_and_a_colour_bar(shop, screw_run, tmp_path):
    out = tmp_path / "scored"
    assert main(["score", str(screw_run), str(shop / "new"), "--out", str(out), "--threshold", "0.5"]) == 0
    rows = _rows(out / "scores.csv")
    assert {(r["width"], r["height"]) for r in rows} == {("130", "90")}
    for r in rows:
        with Image.open(out / r["overlay"]) as im:
            picture = np.asarray(im.convert("RGB"))
        assert picture.shape[0] == 90 and picture.shape[1] > 130  # the image's own 90 x 130, then the bar
        bar = picture[:, 130:].reshape(-1, 3).astype(int)
        red = (bar[:, 0] > 100) & (bar[:, 1] < 40) & (bar[:, 2] < 40)  # jet's dark red top ...
        blue = (bar[:, 2] > 100) & (bar[:, 0] < 40) & (bar[:, 1] < 40)  # ... and dark blue bottom
        assert red.any() and blue.any()


def test_overlay_upsamples_the_map_to_the_image_and_keeps_its_pixels():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 90, 130, generator=g) * 2 - 1
    anomaly_map = torch.rand(1, 64, 64, generator=g)
    picture = ev.overlay(image, anomaly_map, vmax=1.0)
    assert picture.shape == (90, 130, 3) and picture.dtype == np.uint8
    up = torch.nn.functional.interpolate(anomaly_map[None], size=(90, 130), mode="bilinear", align_corners=False)[0]
    np.testing.assert_array_equal(picture, ev.overlay(image, up, vmax=1.0))
    framed = ev.overlay_with_colorbar(image, anomaly_map, vmax=1.0, threshold=0.5)
    assert framed.shape[0] == 90 and framed.shape[1] > 130
    np.testing.assert_array_equal(framed[:, :130], picture)
    square = ev.overlay(image[:, :64, :64], anomaly_map, vmax=1.0)  # the book's use: map and image of one size
    assert square.shape == (64, 64, 3)


# ----------------------------------------------------------------------------------------------------------
# 4. --augment
# ----------------------------------------------------------------------------------------------------------


def test_augment_off_is_recorded_keyed_and_reaches_the_loop(shop, screw_run, tmp_path, monkeypatch):
    seen = []
    real = train_mod.training_batch

    def spy(images, masks, idx, crop, fixed_orientation, generator):
        seen.append(fixed_orientation)
        return real(images, masks, idx, crop, fixed_orientation, generator)

    monkeypatch.setattr(train_mod, "training_batch", spy)
    out = tmp_path / "runs"
    assert main(_train(out, "--augment", "off", dataset=shop / "parts")) == 0
    run = _only_run(out)
    assert seen == [True, True]  # screw is not a fixed-orientation category: only --augment off stops the flips
    assert run.name.startswith("parts-screw-n00-overlap-trustmae-smoke-s0-ema-fast-augoff-")  # 0.2.0's defaults
    assert run.name.rsplit("-", 1)[1] != screw_run.name.rsplit("-", 1)[1]  # keyed apart from auto
    info = json.loads((run / "run.json").read_text())
    assert info["spec"]["augment"] == "off"
    assert info["augment"] == {"setting": "off", "applied": False, "reason": "--augment off"}
    auto = json.loads((screw_run / "run.json").read_text())["augment"]
    assert auto["setting"] == "auto" and auto["applied"] and auto["reason"].startswith("auto:")


def test_augment_auto_keeps_committed_hashes():
    # the first study's settings (the defaults up to 0.1.0)
    cell = RunSpec(dataset="synthetic", category="widget", noise_ratio=0.1, method="trustmae", profile="cpu",
                   seed=0, steps=300, reading="", fast=False)  # fmt: skip
    assert cell.augment == "auto"
    (committed,) = (REPO / "results" / "cpu").glob(f"{cell.file_stem()}.json")
    assert json.loads(committed.read_text())["config_hash"] == cell.config_hash()
    on = RunSpec(**{**cell.to_dict(), "augment": "on"})
    assert on.config_hash() != cell.config_hash() and on.run_name().endswith("-augon")
    with pytest.raises(TrustMAEError, match="unknown augment setting 'sometimes'"):
        RunSpec(augment="sometimes")


def test_dataset_json_decides_auto_and_is_checked(shop, tmp_path, capsys):
    root = Path(shutil.copytree(shop / "parts", tmp_path / "parts"))
    index = scan_category(root, "screw")
    assert augmentation(RunSpec(dataset=str(root), category="screw"), index)[0]
    (root / "dataset.json").write_text(json.dumps({"fixed_orientation": ["screw"], "generator": "ignored"}))
    index = scan_category(root, "screw")
    applied, reason = augmentation(RunSpec(dataset=str(root), category="screw"), index)
    assert not applied and "dataset.json" in reason and "fixed_orientation" in reason
    assert augmentation(RunSpec(dataset=str(root), category="screw", augment="on"), index) == (True, "--augment on")
    (root / "dataset.json").write_text(json.dumps({"fixed_orientation": "screw"}))
    _one_line_error(capsys, main(_train(tmp_path / "runs", dataset=root)), "dataset.json",
                    "'fixed_orientation' must be a list of category names")  # fmt: skip
    assert main(["train", "--help"]) == 0
    helptext = capsys.readouterr().out
    assert "dataset.json" in helptext and "fixed_orientation" in helptext and "textures" in helptext


# ----------------------------------------------------------------------------------------------------------
# 5. Out of memory
# ----------------------------------------------------------------------------------------------------------


def test_out_of_memory_is_recognised_in_its_three_forms():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    cpu = "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 B"
    assert is_out_of_memory(RuntimeError(cpu))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))  # only the allocators' error types


def test_out_of_memory_in_a_training_step_keeps_the_last_checkpoint(shop, tmp_path, monkeypatch, capsys):
    values = {k: v for k, v in load_profile("smoke").to_dict().items() if k != "name"}
    profile = tmp_path / "small.yaml"
    profile.write_text(yaml.safe_dump({**values, "steps": 3, "checkpoint_every": 1}))
    argv = _train(tmp_path / "runs", dataset=shop / "parts")
    argv[argv.index("smoke")] = str(profile)
    del argv[argv.index("--steps") : argv.index("--steps") + 2]
    real = losses.reconstruction_loss
    calls = {"n": 0}

    def oom_in_step_three(x, x_hat):
        calls["n"] += 1
        if calls["n"] >= 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(x, x_hat)

    monkeypatch.setattr(losses, "reconstruction_loss", oom_in_step_three)
    capsys.readouterr()
    line = _one_line_error(capsys, main(argv), "out of memory in training step 3", "batch_size 4", "image_size 64",
                           str(profile), CHECKPOINT)  # fmt: skip
    assert "lower batch_size" in line
    run = _only_run(tmp_path / "runs")
    kept = load_checkpoint(run / CHECKPOINT)
    assert kept["step"] == 2 and not kept["finished"]
    assert json.loads((run / "run.json").read_text())["step"] == 2
    # ... and the run continues from that checkpoint once memory allows.
    monkeypatch.setattr(losses, "reconstruction_loss", real)
    assert main([*argv, "--resume"]) == 0
    assert load_checkpoint(run / CHECKPOINT)["finished"]


def test_out_of_memory_while_scoring_names_the_batch_size_and_keeps_earlier_output(shop, screw_run, tmp_path,
                                                                                   monkeypatch, capsys):  # fmt: skip
    out = tmp_path / "scored"
    argv = ["score", str(screw_run), str(shop / "new"), "--out", str(out), "--threshold", "0.5"]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes.")

    monkeypatch.setattr(ev, "perceptual_distance_map", no_memory)
    capsys.readouterr()
    _one_line_error(capsys, main([*argv, "--batch-size", "4"]), "out of memory scoring", "--batch-size",
                    "in batches of 4")  # fmt: skip
    _one_line_error(capsys, main([*argv, "--batch-size", "1"]), "even one image", "image_size")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written is lost
    with pytest.raises(TrustMAEError, match="out of memory scoring 2 image"):  # the library says it too
        ev.score(load_trained(screw_run), torch.zeros(2, 3, 64, 64))


@pytest.mark.parametrize("height", [64, 160, 256, 512])
def test_the_colour_bar_keeps_its_labels_inside_the_picture(height):
    from trustmae_lib.engine.evaluate import colour_bar

    bar = colour_bar(height, vmax=1.034, threshold=0.517)
    assert bar.shape[0] == height and bar.dtype == np.uint8
    ink = (bar < 128).any(axis=2)  # dark pixels: the tick labels and the axis label
    assert ink.any() and not ink[:, -2:].any()  # labels drawn, and the last columns are background: nothing is cut


def test_the_command_line_answers_help_without_importing_torch():
    # `trustmae <command> --help` must not pay torch's import (seconds); the subcommands import it when they run.
    code = "import sys; from trustmae_lib.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
