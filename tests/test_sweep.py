"""Sweep bookkeeping: grid, skip-finished, failures recorded and retried, shards, atomic result files."""

import json

import pytest

from trustmae_lib.engine import evaluate as evaluate_mod
from trustmae_lib.engine import train as train_mod
from trustmae_lib.errors import TrustMAEError
from trustmae_lib.study import sweep


@pytest.fixture()
def config(tmp_path):
    path = tmp_path / "sweep_test.yaml"
    path.write_text(
        "profile: smoke\n"
        "datasets:\n  synthetic: [brick, widget]\n"
        "methods: [ae_l2, trustmae]\n"
        "noise_ratios: [0.0, 0.2]\n"
        "seeds: [0]\n"
        f"results: {tmp_path / 'results'}\n"
        f"runs: {tmp_path / 'runs'}\n"
    )
    return sweep.load_sweep(path)


@pytest.fixture()
def fake_runs(monkeypatch):
    """Replace training and evaluation by instant fakes that record which cells ran."""
    calls = []

    def fake_train(spec, out_dir, progress=True):
        calls.append(spec)
        if spec.category == "widget" and spec.method == "trustmae" and spec.noise_ratio == 0.2:
            raise TrustMAEError("loss term 'vgg' is nan at step 3")
        return out_dir / spec.run_name()

    def fake_evaluate(run_dir, device=None, spec=None):
        return {"config_hash": spec.config_hash(), "method": spec.method, "metrics": {"auc": 0.5}}

    monkeypatch.setattr(train_mod, "load_or_train", fake_train)
    monkeypatch.setattr(evaluate_mod, "evaluate", fake_evaluate)
    return calls


def test_grid_is_the_full_product_in_stable_order(config):
    grid = config.grid()
    assert len(grid) == 2 * 2 * 2 * 1
    assert len({s.config_hash() for s in grid}) == len(grid)
    assert grid == sweep.load_sweep(config.results_dir.parent / "sweep_test.yaml").grid()


def test_failure_is_recorded_and_does_not_stop_the_others(config, fake_runs):
    summary = sweep.run_sweep(config, progress=False)
    assert summary["total"] == 8 and summary["done"] == 7 and len(summary["failed"]) == 1
    assert len(list(config.results_dir.glob("*.json"))) == 7
    failed = list((config.results_dir / "failed").glob("*.json"))
    assert len(failed) == 1 and "nan" in json.loads(failed[0].read_text())["error"]


def test_rerun_skips_finished_cells_and_retries_failed_ones(config, fake_runs):
    sweep.run_sweep(config, progress=False)
    fake_runs.clear()
    summary = sweep.run_sweep(config, progress=False)
    assert summary["skipped"] == 7 and len(fake_runs) == 1  # only the failed cell is tried again
    assert fake_runs[0].category == "widget" and fake_runs[0].noise_ratio == 0.2


def test_stale_result_is_recomputed(config, fake_runs):
    sweep.run_sweep(config, progress=False)
    path = sorted(config.results_dir.glob("*.json"))[0]
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "config_hash": "000000000000"}))
    fake_runs.clear()
    sweep.run_sweep(config, progress=False)
    assert len(fake_runs) == 2  # the stale cell and the failing one


def test_shards_partition_the_grid(config):
    grid = config.grid()
    shards = [sweep.select(grid, (i, 3)) for i in range(3)]
    assert sorted(s.config_hash() for part in shards for s in part) == sorted(s.config_hash() for s in grid)
    assert not set(map(id, shards[0])) & set(map(id, shards[1]))


@pytest.mark.parametrize("text", ["1", "3/3", "a/b", "-1/2"])
def test_bad_shard_is_a_one_line_error(text):
    with pytest.raises(TrustMAEError, match="shard"):
        sweep.parse_shard(text)


def test_unknown_key_and_method_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("profile: smoke\ndatasets: {synthetic: [brick]}\nseedz: [0]\n")
    with pytest.raises(TrustMAEError, match="unknown key 'seedz'.*did you mean 'seeds'"):
        sweep.load_sweep(bad)
    bad.write_text("profile: smoke\ndatasets: {synthetic: [brick]}\nmethods: [patchcore9]\n")
    with pytest.raises(TrustMAEError, match="patchcore9"):
        sweep.load_sweep(bad)
    bad.write_text("profile: smoke\ndatasets: {synthetic: [brick]}\nnoise_ratios: [0.95]\n")
    with pytest.raises(TrustMAEError, match="outside"):
        sweep.load_sweep(bad)


def test_shipped_sweep_files_load():
    from trustmae_lib.config import CONFIG_DIR

    shipped = sorted(p.stem for p in CONFIG_DIR.glob("sweep_*.yaml"))
    assert {"sweep_cpu", "sweep_paper", "sweep_cpu_memory", "sweep_cpu_memae"} <= set(shipped)
    for name in shipped:
        assert sweep.load_sweep(name).grid()
    makefile = (CONFIG_DIR.parent / "Makefile").read_text()
    missing = [name for name in shipped if name not in ("sweep_paper", "sweep_cpu_full") and name not in makefile]
    assert not missing, f"sweep files no make target runs: {missing}"


def test_steps_per_method_reach_the_cells_and_patchcore_is_scored_not_trained(tmp_path, fake_runs, monkeypatch):
    path = tmp_path / "s.yaml"
    path.write_text(
        "profile: smoke\ndatasets: {synthetic: [widget]}\nmethods: [ae_l2, trustmae, patchcore]\n"
        "noise_ratios: [0.0]\nseeds: [0]\nsteps: {trustmae: 3}\n"
        f"results: {tmp_path / 'results'}\nruns: {tmp_path / 'runs'}\n"
    )
    config = sweep.load_sweep(path)
    assert {s.method: s.steps for s in config.grid()} == {"ae_l2": 0, "trustmae": 3, "patchcore": 0}
    from trustmae_lib.engine import evaluate

    scored = []
    monkeypatch.setattr(
        evaluate,
        "evaluate_patchcore",
        lambda spec, device=None: scored.append(spec) or {"config_hash": spec.config_hash(), "metrics": {}},
    )
    summary = sweep.run_sweep(config, progress=False)
    assert summary["done"] == 3
    assert [s.method for s in fake_runs] == ["ae_l2", "trustmae"] and [s.method for s in scored] == ["patchcore"]
    found, missing = sweep.collect(config)
    assert len(found) == 3 and not missing and all(r["file"].endswith(".json") for r in found)


@pytest.mark.parametrize("steps", ["-1", "1.5", "{trustmae: x}", "{trustmea: 3}"])
def test_bad_steps_are_a_one_line_error(tmp_path, steps):
    path = tmp_path / "s.yaml"
    path.write_text(f"profile: smoke\ndatasets: {{synthetic: [brick]}}\nsteps: {steps}\n")
    with pytest.raises(TrustMAEError, match="'steps'"):
        sweep.load_sweep(path)


def test_collect_treats_a_stale_file_as_missing(config, fake_runs):
    sweep.run_sweep(config, progress=False)
    found, missing = sweep.collect(config)
    assert len(found) == 7 and len(missing) == 1  # the failing cell
    path = sweep.result_path(config.grid()[0], config.results_dir)
    path.write_text(json.dumps({**json.loads(path.read_text()), "config_hash": "000000000000"}))
    found, missing = sweep.collect(config)
    assert len(found) == 6 and len(missing) == 2


def test_forget_deletes_only_this_sweeps_cells(config, fake_runs):
    sweep.run_sweep(config, progress=False)
    other = config.results_dir / "another-sweep-cell.json"
    other.write_text("{}")
    run = train_mod.run_dir_for(config.grid()[0], config.runs_dir)
    run.mkdir(parents=True)
    assert sweep.forget(config) == 8  # 7 results + 1 failure record (+ the run folder of the first cell)
    assert other.is_file() and not run.exists()
    assert not list(config.results_dir.glob("synthetic-*.json")) and not list(config.results_dir.glob("failed/*"))


def test_readings_multiply_only_the_trustmae_cells(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "profile: smoke\ndatasets: {synthetic: [widget]}\nmethods: [ae_l2, trustmae_no_tr, trustmae]\n"
        "noise_ratios: [0.4]\nseeds: [0, 1]\nreadings: {trustmae: ['', inner60, nopush], trustmae_no_tr: ['']}\n"
    )
    grid = sweep.load_sweep(path).grid()
    count = {}
    for s in grid:
        count[(s.method, s.reading)] = count.get((s.method, s.reading), 0) + 1
    assert count == {("ae_l2", ""): 2, ("trustmae_no_tr", ""): 2, ("trustmae", ""): 2, ("trustmae", "inner60"): 2,
                     ("trustmae", "nopush"): 2}  # fmt: skip
    assert len({s.config_hash() for s in grid}) == len(grid)
    path.write_text(path.read_text().replace("readings: {trustmae: ['', inner60, nopush], trustmae_no_tr: ['']}",
                                             "readings: ['', m512]"))  # fmt: skip
    assert {(s.method, s.reading) for s in sweep.load_sweep(path).grid()} == {
        ("ae_l2", ""),
        ("trustmae_no_tr", ""),
        ("trustmae_no_tr", "m512"),
        ("trustmae", ""),
        ("trustmae", "m512"),
    }


@pytest.mark.parametrize("readings", ["[inner6]", "{ae_l3: [inner60]}", "[]", "inner60"])
def test_bad_readings_in_a_sweep_file_are_a_one_line_error(tmp_path, readings):
    path = tmp_path / "s.yaml"
    path.write_text(f"profile: smoke\ndatasets: {{synthetic: [brick]}}\nmethods: [trustmae]\nreadings: {readings}\n")
    with pytest.raises(TrustMAEError, match="reading"):
        sweep.load_sweep(path)


def test_a_channels_last_sweep_keys_only_trained_cells_and_keeps_its_results_apart(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("profile: smoke\ndatasets: {synthetic: [widget]}\nmethods: [ae_l2, trustmae, patchcore]\n"
                    "noise_ratios: [0.0]\nseeds: [0]\nchannels_last: true\n")  # fmt: skip
    config = sweep.load_sweep(path)
    assert {(s.method, s.channels_last) for s in config.grid()} == {("ae_l2", True), ("trustmae", True),
                                                                    ("patchcore", False)}  # fmt: skip
    assert config.results_dir.name == "smoke-cl" and config.runs_dir.name == "smoke-cl"
    path.write_text(path.read_text().replace("channels_last: true", "channels_last: yes please"))
    with pytest.raises(TrustMAEError, match="'channels_last' must be true or false"):
        sweep.load_sweep(path)


def test_a_fast_sweep_keys_only_trained_cells_and_keeps_its_results_apart(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("profile: smoke\ndatasets: {synthetic: [widget]}\nmethods: [trustmae, patchcore]\n"
                    "noise_ratios: [0.0]\nseeds: [0]\nfast: true\n")  # fmt: skip
    config = sweep.load_sweep(path)
    assert {(s.method, s.fast) for s in config.grid()} == {("trustmae", True), ("patchcore", False)}
    assert config.results_dir.name == "smoke-fast" and config.runs_dir.name == "smoke-fast"
    path.write_text(path.read_text().replace("fast: true", "fast: 1"))
    with pytest.raises(TrustMAEError, match="'fast' must be true or false"):
        sweep.load_sweep(path)


def test_gather_counts_a_shared_cell_once_and_computes_only_when_asked(config, fake_runs, tmp_path):
    # A second sweep over the same folders whose grid is a part of the first (like the core study and the
    # learned-memory study): its cells are the first's files, gathered once.
    part = tmp_path / "sweep_part.yaml"
    part.write_text(config.results_dir.parent.joinpath("sweep_test.yaml").read_text().replace("[0.0, 0.2]", "[0.0]"))
    found, counts = sweep.gather([config.results_dir.parent / "sweep_test.yaml", part])
    assert found == [] and counts == {"sweep_test": (0, 8), "sweep_part": (0, 4)} and fake_runs == []
    found, counts = sweep.gather([config.results_dir.parent / "sweep_test.yaml", part], compute=True)
    assert counts == {"sweep_test": (7, 8), "sweep_part": (4, 4)}  # the failing cell is at 20 %
    assert len(found) == 7 and len({r["file"] for r in found}) == 7
