"""The committed noise-study results (`results/cpu/`, `results/cpu_readings/`) are current and reproducible.

* every cell of the committed sweeps has a result file whose config hash matches today's code -- a change to the
  library version, a profile, the loss weights or a run's spec makes this fail until the results are recomputed;
* one cell, recomputed from scratch here (same seed, one thread, CPU), gives exactly the committed numbers.
"""

from __future__ import annotations

import pytest
import torch

from trustmae_lib import sweep
from trustmae_lib.config import RunSpec
from trustmae_lib.io import read_json

COMMITTED = ("sweep_cpu", "sweep_cpu_textures", "sweep_cpu_bar", "sweep_cpu_readings")
#: The cell recomputed from scratch: TrustMAE with the trust region at 10 % noise (re-drawn defects included).
CELL = RunSpec(dataset="synthetic", category="widget", noise_ratio=0.1, method="trustmae", profile="cpu", seed=0,
               steps=300)  # fmt: skip


@pytest.mark.parametrize("name", COMMITTED)
def test_every_committed_cell_is_current(name):
    config = sweep.load_sweep(name)
    found, missing = sweep.collect(config)
    assert not missing, (
        f"{len(missing)} cell(s) of {name} have no current result, e.g. {missing[0].run_name()}; "
        f"run `make sweep` and commit results/{config.profile}"
    )
    assert all(r["profile"] == config.profile for r in found)


def test_the_cell_is_part_of_the_committed_grid():
    assert CELL in sweep.load_sweep("sweep_cpu").grid()


def test_one_cell_recomputed_from_scratch_equals_the_committed_result(tmp_path):
    config = sweep.load_sweep("sweep_cpu")
    committed = read_json(sweep.result_path(CELL, config.results_dir))
    threads = torch.get_num_threads()
    try:
        outcome = sweep.run_cell(CELL, tmp_path / "results", tmp_path / "runs", threads=1, device="cpu")
    finally:
        torch.set_num_threads(threads)
    assert outcome["ok"], outcome.get("error")
    fresh = outcome["result"]
    assert fresh["config_hash"] == committed["config_hash"] == CELL.config_hash()
    assert fresh["manifest_hash"] == committed["manifest_hash"]
    assert fresh["metrics"] == committed["metrics"]  # exactly: same seed, one thread, CPU
