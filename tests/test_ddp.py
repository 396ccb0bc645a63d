"""DDP: the training entry point runs under ``torchrun`` with two CPU processes (gloo) and keeps them in sync."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from trustmae_lib.config import RunSpec, load_profile
from trustmae_lib.data.embedded import ensure_dataset
from trustmae_lib.engine.runs import load_trained, run_dir_for

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")

WORKER = textwrap.dedent(
    """
    import os, sys, torch
    from trustmae_lib.config import RunSpec
    from trustmae_lib.engine.train import fit

    out, reading = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""
    result = fit(RunSpec(method="trustmae", steps=3, reading=reading), out, progress=False)
    rank = int(os.environ["RANK"])
    torch.save({"models": {k: m.state_dict() for k, m in result.models.items()}, "log": result.log},
               os.path.join(out, f"rank{rank}.pt"))
    """
)


def _env(data_dir) -> dict:
    env = dict(os.environ, TRUSTMAE_DATA=str(data_dir), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def _torchrun(args, env, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    os.environ["TRUSTMAE_DATA"] = str(path)
    try:
        ensure_dataset("synthetic", load_profile("smoke"))  # build once, before the ranks start
    finally:
        del os.environ["TRUSTMAE_DATA"]
    return path


@pytest.mark.parametrize("reading", ["", "ema"])  # "ema": moving-average slots, their sums pooled over the ranks
def test_two_gloo_processes_end_with_identical_weights(tmp_path, data_dir, reading):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = _torchrun([str(script), str(tmp_path), reading], _env(data_dir), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for name in r0["models"]:
        for key, value in r0["models"][name].items():
            torch.testing.assert_close(value, r1["models"][name][key], rtol=0, atol=0, equal_nan=True,
                                       msg=f"{name}.{key} differs between ranks")  # fmt: skip
    # Each rank trained on its own shard of the global batch: the per-rank losses differ.
    assert r0["log"][0]["rec"] != r1["log"][0]["rec"]
    # Only rank 0 wrote the run folder; its checkpoint records the world size.
    run_dirs = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(run_dirs) == 1
    info = json.loads((run_dirs[0] / "run.json").read_text())
    assert info["world_size"] == 2 and info["finished"] and info["step"] == 3


def test_cli_train_runs_under_torchrun(tmp_path, data_dir):
    env = _env(data_dir)
    out = tmp_path / "runs"
    args = ["-m", "trustmae_lib", "train", "--profile", "smoke", "--method", "memae", "--category", "widget",
            "--steps", "2", "--out", str(out), "--no-progress"]  # fmt: skip
    proc = _torchrun(args, env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained memae") == 1  # printed by rank 0 only
    os.environ["TRUSTMAE_DATA"] = str(data_dir)
    try:
        spec = RunSpec(method="memae", category="widget", steps=2)
        trained = load_trained(run_dir_for(spec, out), spec=spec)
    finally:
        del os.environ["TRUSTMAE_DATA"]
    assert trained.meta["world_size"] == 2 and trained.meta["step"] == 2
