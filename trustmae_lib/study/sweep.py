"""Noise-study sweeps: dataset x category x noise ratio x method x seed (supplement Tables 3 and 4).

A sweep is defined by a YAML file in ``configs/`` (``sweep_cpu.yaml``, ``sweep_paper.yaml``). Every cell of its grid
is one :class:`~trustmae_lib.config.RunSpec`; it is trained (or its finished checkpoint reused) and evaluated with
every scoring variant of its method (w/o PD and w/o SP come from the same trained model, no retraining), and its
result is written to its own JSON file ``<results>/<run name>-<config hash>.json`` through a temporary file and a
rename. So:

* a re-run skips every cell whose result file exists (the config hash is in the name *and* checked inside), and
  recomputes only missing or stale ones;
* a failed cell is recorded under ``<results>/failed/`` and never stops the others; the next run retries it;
* ``jobs`` runs cells in parallel processes on one machine, ``shard=(i, n)`` takes every n-th cell for a batch
  scheduler (one SLURM array task per shard), and a killed worker loses only the cell it was computing.

Example:
    >>> grid = load_sweep("sweep_cpu").grid()
    >>> len(grid) > 0
    True
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from trustmae_lib.config import (
    ALL_METHODS,
    CONFIG_DIR,
    METHODS,
    PROTOCOLS,
    READINGS,
    REFERENCE_METHODS,
    REPO_ROOT,
    RunSpec,
    is_trustmae,
    read_config_file,
    require_checkout,
)
from trustmae_lib.errors import TrustMAEError
from trustmae_lib.io import read_json, write_json

#: The checkout's root: sweep files name their folders relative to it (``None`` for an installed wheel).
REPO = REPO_ROOT


@dataclass(frozen=True)
class SweepConfig:
    """A grid of runs. ``datasets`` maps a dataset (embedded name or MVTec-layout path) to its categories."""

    name: str
    profile: str
    datasets: dict = field(default_factory=dict)
    methods: tuple = METHODS
    noise_ratios: tuple = (0.0, 0.1, 0.2, 0.4)
    seeds: tuple = (0, 1, 2)
    protocol: str = "overlap"
    steps: int | dict = 0  # training steps: one number for every method, or {method: steps}; 0 = the profile's
    # Readings (config.READINGS) of the TrustMAE cells, or {method: [...]}; a method given none runs its default
    # reading (config.DEFAULT_READINGS; "" in a list is the supplement-literal construction, the default up to 0.1.0).
    readings: tuple | dict | None = None
    channels_last: bool = False  # train every trained cell channels-last on the CPU too (RunSpec.channels_last)
    # Train and score every trained cell on the speed path (RunSpec.fast); None = the library default (on since 0.2.0).
    fast: bool | None = None
    results: str = ""  # folder of result files; default results/<profile>
    runs: str = ""  # folder of run folders (checkpoints); default runs/<profile>

    def grid(self) -> list[RunSpec]:
        """Every cell, in a stable order (the order shards are cut from)."""
        return [
            RunSpec(
                dataset=str(d),
                category=c,
                noise_ratio=float(r),
                protocol=self.protocol,
                method=m,
                profile=self.profile,
                seed=int(s),
                steps=self.steps_for(m),
                reading=v,
                channels_last=self.channels_last and m not in REFERENCE_METHODS,
                fast=None if self.fast is None else self.fast and m not in REFERENCE_METHODS,
            )
            for d, categories in self.datasets.items()
            for c in categories
            for r in self.noise_ratios
            for m in self.methods
            for v in self.readings_for(m)
            for s in self.seeds
        ]

    def steps_for(self, method: str) -> int:
        """Training steps of ``method``'s cells (0 = the profile's; always 0 for methods with nothing to train)."""
        if method in REFERENCE_METHODS:
            return 0
        if isinstance(self.steps, dict):
            return int(self.steps.get(method, 0))
        return int(self.steps)

    def readings_for(self, method: str) -> tuple:
        """Readings of ``method``'s cells (``None``: the method's default reading, config.DEFAULT_READINGS)."""
        if isinstance(self.readings, dict):
            return tuple(self.readings.get(method, (None,)))
        if self.readings is None or not is_trustmae(method):  # a plain list is for the TrustMAE methods only
            return (None,)
        return tuple(self.readings)

    @property
    def _folder(self) -> str:
        """The default folder name under ``results/`` and ``runs/``; a channels-last or fast sweep is kept apart."""
        return self.profile + ("-cl" if self.channels_last else "") + ("-fast" if self.fast else "")

    @property
    def results_dir(self) -> Path:
        return _resolve(self.results or f"results/{self._folder}")

    @property
    def runs_dir(self) -> Path:
        return _resolve(self.runs or f"runs/{self._folder}")


def _resolve(path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    if REPO is None:  # an installed wheel: relative folders would land in site-packages
        require_checkout(f"the sweep folder '{path}'", "give absolute `results:` and `runs:` in the sweep file")
    return REPO / p


def load_sweep(name_or_path: str | Path) -> SweepConfig:
    """Read a sweep file (``configs/<name>.yaml`` or a path) with ``yaml.safe_load`` and check every key."""

    def missing(path: Path) -> str:
        choices = sorted(p.stem for p in CONFIG_DIR.glob("sweep_*.yaml"))
        return f"sweep file {path} does not exist; use one of {', '.join(choices)} or a YAML path"

    path, raw = read_config_file(name_or_path, missing)
    known = {f.name for f in dataclasses.fields(SweepConfig)}
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise TrustMAEError(f"{path}: unknown key '{key}'{hint}; allowed keys: {', '.join(sorted(known))}")
    raw.setdefault("name", path.stem)
    if not isinstance(raw.get("datasets"), dict) or not raw["datasets"]:
        raise TrustMAEError(f"{path}: 'datasets' must map each dataset to a list of categories")
    for key in ("methods", "noise_ratios", "seeds"):
        if key in raw:
            if not isinstance(raw[key], list) or not raw[key]:
                raise TrustMAEError(f"{path}: '{key}' must be a non-empty list")
            raw[key] = tuple(raw[key])
    unknown = [m for m in raw.get("methods", ()) if m not in ALL_METHODS]
    if unknown:
        raise TrustMAEError(f"{path}: unknown method(s) {unknown}; choose from {', '.join(ALL_METHODS)}")
    readings = raw.get("readings", [None])
    lists = list(readings.values()) if isinstance(readings, dict) else [readings]
    if not all(isinstance(v, list) and v for v in lists) or (
        isinstance(readings, dict) and any(m not in METHODS for m in readings)
    ):
        raise TrustMAEError(f"{path}: 'readings' must be a non-empty list or a mapping method: list, got {readings!r}")
    unknown = sorted({str(v) for v in sum(lists, []) if v not in READINGS and v not in ("", None)})
    if unknown:
        raise TrustMAEError(f"{path}: unknown reading(s) {unknown}; choose from {', '.join(READINGS)} or ''")
    if "readings" in raw:
        raw["readings"] = {m: tuple(v) for m, v in readings.items()} if isinstance(readings, dict) else tuple(readings)
    steps = raw.get("steps", 0)
    values = list(steps.values()) if isinstance(steps, dict) else [steps]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values) or (
        isinstance(steps, dict) and any(m not in ALL_METHODS for m in steps)
    ):
        raise TrustMAEError(
            f"{path}: 'steps' must be a whole number >= 0 (0 = the profile's) or a mapping method: steps, got {steps!r}"
        )
    for key in ("channels_last", "fast"):
        if key in raw and not isinstance(raw[key], bool):
            raise TrustMAEError(f"{path}: '{key}' must be true or false, got {raw[key]!r}")
    if raw.get("protocol", "overlap") not in PROTOCOLS:
        raise TrustMAEError(f"{path}: protocol must be one of {', '.join(PROTOCOLS)}")
    config = SweepConfig(**raw)
    config.grid()  # validates every cell (noise ratio range, ...)
    return config


def result_path(spec: RunSpec, results_dir: Path) -> Path:
    return results_dir / f"{spec.file_stem()}.json"


def failure_path(spec: RunSpec, results_dir: Path) -> Path:
    return results_dir / "failed" / f"{spec.file_stem()}.json"


def current_result(spec: RunSpec, results_dir: Path) -> dict | None:
    """The cell's result if its file exists, parses, and carries the cell's config hash; else ``None``."""
    path = result_path(spec, results_dir)
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None
    return data if data.get("config_hash") == spec.config_hash() else None


def is_done(spec: RunSpec, results_dir: Path) -> bool:
    """A cell is done when it has a current result (:func:`current_result`)."""
    return current_result(spec, results_dir) is not None


def run_cell(spec: RunSpec, results_dir: Path, runs_dir: Path, threads: int = 0, device: str | None = None) -> dict:
    """Train (or reuse) and evaluate one cell; write its result file. Never raises: failures are recorded."""
    import torch

    from trustmae_lib.engine.evaluate import evaluate
    from trustmae_lib.engine.train import load_or_train

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    fail = failure_path(spec, results_dir)
    try:
        if spec.method == "patchcore":  # nothing to train: the bank is built from the training split
            from trustmae_lib.engine.evaluate import evaluate_patchcore

            result = evaluate_patchcore(spec, device=device)
        else:
            run_dir = load_or_train(spec, runs_dir, progress=False)
            result = evaluate(run_dir, device=device, spec=spec)
        result = {**result, "sweep_wall_time_s": round(time.perf_counter() - t0, 2)}
        write_json(result_path(spec, results_dir), result)
        fail.unlink(missing_ok=True)
        return {"spec": spec, "ok": True, "result": result}
    except Exception as exc:  # noqa: BLE001 -- a failed cell is recorded and never stops the sweep
        message = " ".join(str(exc).split()) or type(exc).__name__
        write_json(fail, {"spec": spec.to_dict(), "config_hash": spec.config_hash(), "error": message,
                          "type": type(exc).__name__, "traceback": traceback.format_exc(limit=8)})  # fmt: skip
        return {"spec": spec, "ok": False, "error": message}


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` (0 <= i < n) -> ``(i, n)``."""
    if not text:
        return None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise TrustMAEError(f"--shard {text!r} must look like i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise TrustMAEError(f"--shard {text!r}: need 0 <= i < n")
    return i, n


def select(grid: Sequence[RunSpec], shard: tuple[int, int] | None) -> list[RunSpec]:
    return list(grid) if shard is None else list(grid[shard[0] :: shard[1]])


def run_sweep(
    config: SweepConfig,
    jobs: int = 1,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    device: str | None = None,
    limit: int = 0,
) -> dict:
    """Run every missing cell of ``config`` (or of one shard of it).

    Args:
        config: the grid.
        jobs: parallel worker processes on this machine (each run trains and scores with its own
            ``RunSpec.threads``, default 1, whatever the worker count).
        shard: ``(i, n)``: only every n-th cell starting at i.
        progress: a tqdm bar over the cells with the estimated time left.
        device: ``None`` -> CUDA if available.
        limit: run at most this many missing cells (0 = all); for trying a sweep out.

    Returns:
        ``{"total", "skipped", "done", "failed": [(run name, error), ...]}``.
    """
    cells = select(config.grid(), shard)
    todo = [s for s in cells if not is_done(s, config.results_dir)]
    if limit:
        todo = todo[:limit]
    summary = {"total": len(cells), "skipped": len(cells) - len(todo), "done": 0, "failed": []}
    bar = tqdm(total=len(todo), desc=f"sweep {config.name}", unit="run", disable=not progress)

    def record(outcome: dict) -> None:
        if outcome["ok"]:
            summary["done"] += 1
        else:
            summary["failed"].append((outcome["spec"].run_name(), outcome["error"]))
        bar.update(1)
        bar.set_postfix(done=summary["done"], failed=len(summary["failed"]))

    if jobs <= 1:
        for spec in todo:
            record(run_cell(spec, config.results_dir, config.runs_dir, device=device))
    else:
        import multiprocessing as mp

        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            args = (config.results_dir, config.runs_dir, threads, device)
            futures = {pool.submit(run_cell, s, *args): s for s in todo}
            for future in as_completed(futures):
                try:
                    record(future.result())
                except BrokenProcessPool:  # a worker was killed (SIGKILL, out of memory): the pool stops
                    error = "a worker process died (killed or out of memory); run the sweep again"
                    record({"spec": futures[future], "ok": False, "error": error})
    bar.close()
    return summary


def collect(config: SweepConfig) -> tuple[list[dict], list[RunSpec]]:
    """The current results of ``config``'s grid and the cells still missing.

    A result counts only when its file exists and carries the cell's config hash (a stale file from older code
    or another profile is treated as missing). Each result gets its file name under ``file``.
    """
    found, missing = [], []
    for spec in config.grid():
        data = current_result(spec, config.results_dir)
        if data is None:
            missing.append(spec)
        else:
            found.append({**data, "file": result_path(spec, config.results_dir).name})
    return found, missing


def gather(names: Sequence[str], compute: bool = False, jobs: int = 1) -> tuple[list[dict], dict]:
    """The current results of several sweeps, each cell once (sweeps that share cells, like the core study and the
    learned-memory study, share their files), and per sweep ``(found, cells)`` counts.

    With ``compute`` the missing cells of each sweep are computed first (:func:`run_sweep`, ``jobs`` workers).
    """
    found, counts, seen = [], {}, set()
    for name in names:
        config = load_sweep(name)
        done, missing = collect(config)
        if missing and compute:
            run_sweep(config, jobs=jobs)
            done, missing = collect(config)
        counts[config.name] = (len(done), len(config.grid()))
        for res in done:
            key = (str(config.results_dir), res["file"])
            if key not in seen:
                seen.add(key)
                found.append(res)
    return found, counts


def forget(config: SweepConfig) -> int:
    """Delete the result file, failure record and run folder of every cell of ``config`` (``--fresh``).

    Other files in the same folders -- another sweep's cells -- are left alone. Returns the number of cells that
    had anything to delete.
    """
    import shutil

    from trustmae_lib.engine.runs import run_dir_for

    count = 0
    for spec in config.grid():
        paths = [result_path(spec, config.results_dir), failure_path(spec, config.results_dir)]
        run = run_dir_for(spec, config.runs_dir)
        hit = any(p.is_file() for p in paths) or run.is_dir()
        for p in paths:
            p.unlink(missing_ok=True)
        if run.is_dir():
            shutil.rmtree(run)
        count += hit
    return count
