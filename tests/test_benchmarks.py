"""benchmarks/: a CPU dry run of every script at tiny sizes -- the result files' schema and invariants, not speed."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
TINY = ["--threads", "1", "--matmul-size", "128", "--repeats", "1", "--warmup", "0", "--wait-idle", "0"]


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def keep_threads():
    """The scripts set the torch thread count of the process; restore it for the other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _check_header(data: dict, kind: str) -> None:
    assert data["schema"] == 1 and data["kind"] == kind
    machine = data["machine"]
    for key in ("cpu", "logical_cpus", "torch_threads", "torch", "trustmae_lib", "load_average", "load_average_end"):
        assert key in machine, key
    assert machine["torch_threads"] == 1
    assert len(machine["load_average"]) == 3
    assert data["limits"]["float32"]["gflops"] > 0 and data["limits"]["float32"]["size"] == 128
    assert data["reference_limit_gflops"] == data["limits"]["float32"]["gflops"]
    assert data["results"]


def test_count_flops_matches_flop_counter_mode_and_works_in_inference_mode():
    common = _load("common")
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ConvTranspose2d(8, 4, 4, 2, 1), nn.Flatten(), nn.Linear(4 * 28 * 28, 5))
    x = torch.randn(2, 3, 16, 16, requires_grad=True)

    def train_step():
        net(x).sum().backward()

    with FlopCounterMode(display=False) as ref:
        train_step()
    assert common.count_flops(train_step) == ref.get_total_flops() > 0
    with torch.no_grad(), FlopCounterMode(display=False) as fwd:
        net(x)
    with torch.inference_mode():
        assert common.count_flops(lambda: net(x)) == fwd.get_total_flops()


def test_result_files_name_no_machine_path(tmp_path):
    common = _load("common")
    inside, outside = str(ROOT / "results" / "bench" / "x.json"), str(tmp_path / "elsewhere" / "y.json")
    args = {"out": inside, "runs": [outside, "relative/z"], "threads": 1}
    assert common.portable(args) == {"out": "results/bench/x.json", "runs": ["y.json", "relative/z"], "threads": 1}
    path = common.write_result(tmp_path / "r.json", "demo", {}, {"args": args, "results": []})
    assert str(tmp_path) not in path.read_text() and str(ROOT) not in path.read_text()


def test_bench_train_schema(tmp_path, keep_threads):
    out = tmp_path / "train.json"
    args = ["--profiles", "smoke", "--methods", "trustmae", "memae", "--out", str(out)]
    assert _load("bench_train").main(args + TINY) == 0
    data = json.loads(out.read_text())
    _check_header(data, "train")
    rows = data["results"]
    assert {(r["method"], r["layout"]) for r in rows} == {
        (m, lay) for m in ("trustmae", "memae") for lay in ("nchw", "channels_last")
    }
    for r in rows:
        assert "error" not in r
        assert r["profile"] == "smoke" and r["batch"] == 4 and r["input_size"] == 64
        assert r["step_ms"] > 0 and r["images_per_s"] > 0 and 0 <= r["data_share"] < 1
        assert len(r["step"]["runs_s"]) == 1
        # achieved_gflops is rounded to 0.01: on a slow (shared) machine that rounding alone can exceed 2 %
        achieved = r["gflop_per_step"] / (r["step_ms"] / 1e3)
        assert math.isclose(r["achieved_gflops"], achieved, rel_tol=0.02, abs_tol=0.006)
        # The ratio is to the matmul limit measured just before this configuration.
        assert math.isclose(r["ratio_to_matmul"], r["achieved_gflops"] / r["limit_gflops"], rel_tol=0.02, abs_tol=1e-4)
        assert 0 < r["cpu_utilisation"] and "busy_before" in r and r["waited_s"] >= 0
        # The high-water mark is reset just before the run; RSS may shrink by a page or so meanwhile.
        assert r["memory"]["peak_mib"] >= r["memory"]["start_mib"] - 1.0 and r["memory"]["start_mib"] > 0
    # The memory layout changes the speed, never the arithmetic.
    for method in ("trustmae", "memae"):
        flops = {r["gflop_per_step"] for r in rows if r["method"] == method}
        assert len(flops) == 1, flops
    trustmae = next(r for r in rows if r["method"] == "trustmae")
    assert trustmae["backbone"] == "efficientnet_lite0" and trustmae["backbone_weights"]


def test_bench_score_schema(tmp_path, keep_threads):
    out = tmp_path / "score.json"
    args = ["--profiles", "smoke", "--methods", "trustmae", "ae_l2", "--layouts", "nchw", "--images", "2"]
    assert _load("bench_score").main(args + ["--out", str(out)] + TINY) == 0
    data = json.loads(out.read_text())
    _check_header(data, "score")
    rows = {(r["method"], r["variant"], r["category"]): r for r in data["results"]}
    assert set(rows) == {
        ("trustmae", "perceptual", "brick"),
        ("trustmae", "pixel", "brick"),
        ("ae_l2", "residual", "brick"),
        ("ae_l2", "residual", "widget"),
    }
    for r in rows.values():
        assert "error" not in r and r["images_per_s"] > 0 and r["gflop_per_image"] > 0
    # The perceptual map adds the backbone to the reconstruction: more work than the pixel map.
    assert (
        rows["trustmae", "perceptual", "brick"]["gflop_per_image"]
        > rows["trustmae", "pixel", "brick"]["gflop_per_image"]
    )
    # AE-L2 scores a texture at 4x its window size with sliding windows, an object with one window.
    texture, obj = rows["ae_l2", "residual", "brick"], rows["ae_l2", "residual", "widget"]
    assert texture["score_size"] == 4 * texture["model_input"] and obj["score_size"] == obj["model_input"]
    assert texture["gflop_per_image"] > 16 * obj["gflop_per_image"]


def test_bench_memory_schema_and_no_loops_over_locations_or_slots(tmp_path, keep_threads):
    out = tmp_path / "memory.json"
    args = ["--slots", "8", "32", "--locations", "32", "128", "--dim", "16", "--topk", "4", "--out", str(out)]
    assert _load("bench_memory").main(args + TINY) == 0
    data = json.loads(out.read_text())
    _check_header(data, "memory")
    rows = data["results"]
    assert {(r["locations"], r["slots"]) for r in rows} == {(n, m) for n in (32, 128) for m in (8, 32)}
    for part in ("memory", "trust_region"):
        # The same number of operators for every N and M: nothing loops over locations or slots in Python.
        assert len({r[part]["aten_ops"] for r in rows}) == 1
        assert all(r[part]["ms"] > 0 for r in rows)
    by = {(r["locations"], r["slots"]): r for r in rows}
    # The similarity matmul grows with N * M and so do the tensors saved for backward.
    assert by[128, 32]["memory"]["gflop"] > by[32, 32]["memory"]["gflop"] > by[32, 8]["memory"]["gflop"]
    assert by[128, 32]["memory"]["saved_mib"] > by[32, 8]["memory"]["saved_mib"]


def test_profile_step_schema(tmp_path, keep_threads):
    out = tmp_path / "profile.json"
    assert _load("profile_step").main(["--profiles", "smoke", "--out", str(out)] + TINY) == 0
    data = json.loads(out.read_text())
    _check_header(data, "profile")
    (row,) = data["results"]
    assert math.isclose(sum(c["share"] for c in row["categories"]), 1.0, abs_tol=0.01)
    cats = {c["category"] for c in row["categories"]}
    assert {"conv forward", "conv backward", "optimizer (Adam)"} <= cats
    assert {p["part"] for p in row["parts"]} >= {"encoder", "memory", "decoder", "discriminator", "backbone"}
    names = [layer["layer"] for layer in row["layers"]]
    assert "TrustMAE.encoder.layers.conv_in.conv" in names and any(n.startswith("Discriminator.") for n in names)
    # Every convolution ran forward; the generator's also ran backward (they are trained).
    for layer in row["layers"]:
        assert layer["fwd_ms"] > 0, layer["layer"]
        if layer["network"] == "generator":
            assert layer["bwd_ms"] > 0 and layer["gflop"] > 0, layer["layer"]
    # Layer FLOPs (FlopCounterMode, per module) add up to at most the step's total.
    assert 0 < sum(layer["gflop"] for layer in row["layers"]) <= row["step_gflop"] * 1.0001


def test_bench_speedup_schema_interleaves_the_arms_and_profiles_both(tmp_path, keep_threads):
    out = tmp_path / "speedup.json"
    args = ["--profile", "smoke", "--thread-counts", "1", "--out", str(out), "--matmul-size", "128", "--no-compile"]
    args += ["--runs", "2"]
    assert _load("bench_speedup").main(args + ["--repeats", "2", "--warmup", "0", "--wait-idle", "0"]) == 0
    data = json.loads(out.read_text())
    assert data["kind"] == "speedup" and data["profile"] == "smoke" and data["threads"] == 1
    assert {"cpu", "cpu_capability", "native_bf16", "torch"} <= set(data["machine"])
    (row,) = data["by_threads"]
    assert set(row["arms"]) == {"before", "default", "default-nokeep", "after"} | (
        {"after+bf16"} if data["machine"]["native_bf16"] else set()
    )
    assert data["default_ms"] == row["arms"]["default"]["step_ms"]
    assert data["default_nokeep_ms"] == row["arms"]["default-nokeep"]["step_ms"]
    # Kept targets (change 7): the default step skips the backbone's forward pass on x, and only that.
    flop = {k: row["arms"][k]["gflop_per_step"] for k in ("default", "default-nokeep")}
    assert 0 < flop["default"] < flop["default-nokeep"]
    assert set(data["parts"]) == {"before", "after", "default"}
    assert math.isclose(data["speedup_default"], data["before_ms"] / data["default_ms"], rel_tol=1e-2)
    assert all(len(arm["step"]["runs_s"]) == 2 for arm in row["arms"].values())
    assert data["before_ms"] == row["arms"]["before"]["step_ms"] and data["after_ms"] == row["arms"]["after"]["step_ms"]
    assert math.isclose(data["speedup"], data["before_ms"] / data["after_ms"], rel_tol=1e-2)
    assert data["float32_limit_gflops"] > 0 and 0 < data["ratio_to_matmul"]
    # The first thread count is measured twice (--runs 2): the first run is the headline, the median is of both.
    first, second = data["runs"]
    assert (first["before_ms"], first["default_ms"]) == (data["before_ms"], data["default_ms"])
    assert second["before_ms"] > 0 and second["default_ms"] > 0
    low, high = sorted(r["speedup_default"] for r in data["runs"])
    assert low <= data["speedup_default_median"] <= high
    # Folding BatchNorm removes no convolution: both arms count the same conv FLOPs (BatchNorm is not counted).
    assert math.isclose(row["arms"]["after"]["gflop_per_step"], row["arms"]["before"]["gflop_per_step"], rel_tol=1e-3)
    before, after = ({p["part"]: p for p in data["parts"][k]["parts"]} for k in ("before", "after"))
    assert set(before) == set(after) >= {"encoder", "decoder", "discriminator", "backbone"}
    # The folded backbone runs no BatchNorm; the generator still does (CBN, trained): fewer BatchNorm calls.
    calls = {k: {o["op"]: o["calls"] for o in data["parts"][k]["top_ops"]} for k in ("before", "after")}
    assert calls["after"].get("aten::native_batch_norm", 0) < calls["before"]["aten::native_batch_norm"]


def test_bench_changes_compares_identical_outputs(tmp_path, keep_threads):
    out = tmp_path / "changes.json"
    args = ["--sizes", "16", "24", "--batch", "8", "--texture", "32", "8", "--out", str(out), "--wait-idle", "0"]
    args += ["--scoring-profile", "smoke", "--scoring-repeats", "1"]
    args += ["--step-profile", "smoke", "--step-steps", "2", "--perceptual-size", "32"]
    assert _load("bench_changes").main(args + ["--threads", "1", "--repeats", "2", "--prefetch-steps", "4"]) == 0
    data = json.loads(out.read_text())
    assert data["kind"] == "changes" and data["machine"]["torch_threads"] == 1
    rows, results = data["results"][:3], data["results"]
    prefetch = [r for r in results if "helper_threads" in r]
    (scoring,) = [r for r in results if "variants" in r]
    padding = [r for r in results if r["where"].endswith("(_pad_statically)")]
    ssim = [r for r in results if r["where"].endswith("(ssim)")]
    steps = [r for r in results if r["change"].startswith("whole TrustMAE step")]
    # The backbone's static padding, the two-stack SSIM and both in a real training step change no number: the
    # features, the gradients and, after the steps, every weight are bit for bit the ones before the change.
    assert len(padding) == len(ssim) == len(steps) == 2
    assert all(r["identical_output"] is True and r["applied"] for r in padding + ssim + steps)
    assert all(r["replaced_convolutions"] > 16 for r in padding) and {r["steps"] for r in steps} == {4}
    # Scoring every variant in one pass gives exactly what scoring them one at a time gives.
    assert scoring["variants"] == ["perceptual", "pixel", "global"] and scoring["identical_output"] is True
    assert scoring["applied"] and scoring["before_ms"] > 0 and scoring["after_ms"] > 0
    # The (rejected) prefetcher trains exactly the same weights as drawing in the loop, with either helper.
    assert [(r["method"], r["helper_threads"], r["identical_output"], r["applied"]) for r in prefetch] == [
        (m, h, True, False) for m in ("ae_l2", "ae_ssim", "memae") for h in (1, 1)
    ]  # 1 torch thread here anyway
    assert all(r["step_wall_before_ms"] > 0 and r["step_wall_after_ms"] > 0 for r in prefetch)
    assert [(r["shape"], r["applied"]) for r in rows] == [
        ([8, 3, 16, 16], True),
        ([8, 3, 24, 24], True),
        ([8, 3, 32, 32], True),
    ]
    for r in rows + padding + ssim + steps:
        # An applied change must leave the output bit for bit the same -- unless it only keeps the distribution
        # (the texture crop-first draw, checked in test_train.py).
        assert r["identical_output"] is r.get("must_be_identical", True) and r["before_ms"] > 0 and r["after_ms"] > 0
        assert math.isclose(r["speedup"], r["before_ms"] / r["after_ms"], rel_tol=0.01)


def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh"), "--device", "cpu", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    files = sorted(p.name for p in out.glob("*.json"))
    assert files == ["score_bf16_cl.json", "train_bf16_cl.json", "train_bf16_cl_b8.json"]
    train = json.loads((out / "train_bf16_cl.json").read_text())
    assert train["limits"]["bfloat16"]["gflops"] > 0
    assert train["reference_limit_gflops"] == train["limits"]["bfloat16"]["gflops"]
    assert all(r["amp"] == "bf16" and r["layout"] == "channels_last" and "error" not in r for r in train["results"])
    assert "== targets" in proc.stdout


def test_gpu_check_rejects_unknown_arguments():
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--bogus"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown argument" in proc.stderr


def test_sweep_data_reads_the_waits_the_runs_logged(tmp_path):
    runs = tmp_path / "runs"
    for name, method, data_s, finished in (("a", "memae", 0.02, True), ("b", "memae", 0.04, True),
                                           ("c", "trustmae", 0.01, True), ("d", "ae_l2", 0.5, False)):  # fmt: skip
        run = runs / name
        run.mkdir(parents=True)
        spec = {"method": method, "dataset": "synthetic", "category": "widget"}
        (run / "run.json").write_text(json.dumps({"spec": spec, "finished": finished, "train_wall_s": 10.0,
                                                  "data_wait_s": 10 * data_s}))  # fmt: skip
        (run / "log.csv").write_text(f"step,step_s,data_s\n10,1.0,{data_s}\n20,1.0,{data_s}\n")
    out = tmp_path / "sweep_data.json"
    assert _load("sweep_data").main(["--runs", str(runs), "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"memae", "trustmae"}  # the unfinished run is left out
    assert rows["memae"]["runs"] == 2 and math.isclose(rows["memae"]["median_step_share"], 0.03)
    assert math.isclose(rows["memae"]["max_step_share"], 0.04)
    assert math.isclose(rows["trustmae"]["median_total_share"], 0.01)
    assert _load("sweep_data").main(["--runs", str(tmp_path / "none"), "--out", str(out)]) == 2


@pytest.mark.usefixtures("isolated_data")
def test_sweep_time_runs_the_cells_through_the_command_line_of_each_arm(tmp_path):
    out = tmp_path / "sweep_time.json"
    args = ["--arms", "after", "after-cl", "--profile", "smoke", "--methods", "ae_l2", "trustmae", "--steps", "2"]
    args += ["--out", str(out)]
    assert _load("sweep_time").main(args) == 0
    data = json.loads(out.read_text())
    assert data["schema"] == 1 and data["kind"] == "sweep_time" and data["machine"]["cpu"]
    tm = [r for r in data["results"] if r["method"] == "trustmae"]
    assert len(tm) == 2 and all(r["variant"] == "perceptual" for r in tm)  # TrustMAE's own scoring, not "global"
    assert all(r["image_auroc"] == r["image_auroc_by_variant"]["perceptual"] for r in tm)
    rows = {r["arm"]: r for r in data["results"] if r["method"] == "ae_l2"}
    assert set(rows) == {"after", "after-cl"} and all(r["returncode"] == 0 for r in rows.values())
    assert rows["after"]["train_channels_last"] is False and rows["after-cl"]["train_channels_last"] is True
    assert all(r["steps"] == 2 and 0 <= r["image_auroc"] <= 1 and r["wall_s"] > r["train_wall_s"] > 0
               for r in rows.values())  # fmt: skip
    after = sum(r["wall_s"] for r in data["results"] if r["arm"] == "after")
    assert data["total_wall_s"]["after"] == pytest.approx(after, abs=0.11)


def test_sweep_time_names_a_commit_it_cannot_check_out(tmp_path):
    with pytest.raises(SystemExit, match="cannot check out commit 0000000"):
        _load("sweep_time").main(["--arms", "before", "--before-ref", "0000000", "--out", str(tmp_path / "t.json")])
    assert not (tmp_path / "t.json").exists()


@pytest.mark.usefixtures("isolated_data", "keep_threads")
def test_bench_reproduce_times_the_sweeps_in_a_worktree_and_leaves_the_checkout_alone(tmp_path):
    import subprocess

    tiny = tmp_path / "sweep_tiny.yaml"  # results and runs relative: inside the worktree, never this checkout
    tiny.write_text("profile: smoke\ndatasets: {synthetic: [widget]}\nmethods: [ae_l2, patchcore]\n"
                    "noise_ratios: [0.0]\nseeds: [0]\nsteps: 2\nresults: results/tiny\nruns: runs/tiny\n")  # fmt: skip
    out = tmp_path / "reproduce.json"

    def git(*args):
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout

    before, trees = git("status", "--porcelain"), git("worktree", "list")
    args = ["--sweeps", str(tiny), "--profile", "smoke", "--matmul-size", "128", "--out", str(out)]
    assert _load("bench_reproduce").main(args) == 0
    data = json.loads(out.read_text())
    assert data["kind"] == "reproduce" and data["machine"]["cpu"] and data["float32_limit_gflops_per_thread"] > 0
    assert data["cells"] == 2 and data["sweeps"][0]["returncode"] == 0 and data["total_wall_s"] > 0
    assert data["min_per_144_cells"] == pytest.approx(data["total_wall_s"] / 60 * 72, abs=0.1)  # 144 / 2 cells
    # Nothing committed for the tiny sweep: both cells are reported missing, none compared.
    assert len(data["agreement_with_committed"]["missing"]) == 2
    assert not (ROOT / "results" / "tiny").exists()
    assert git("status", "--porcelain") == before and git("worktree", "list") == trees  # the worktree is gone
