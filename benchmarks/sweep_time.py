"""The noise study's cells, timed end to end under different versions of the code ("before / after").

``make reproduce`` is 144 cells of ``trustmae train --evaluate`` (two workers of one thread each on a 2-core
machine). This script runs a subset of those cells -- one per trained method, by default ``synthetic/widget`` at
10 % noise, seed 0, with the sweep's step counts -- through the command line of each *arm*:

* ``before``: the library at ``--before-ref`` (a git commit, checked out into a temporary worktree), i.e. the code
  before the performance work of chapter 14;
* ``after``: this checkout, with the settings the first study's cells were trained with (``--reading literal
  --no-fast``: the library's defaults up to 0.1.0, which the before arm's code has as its own);
* ``after-cl``: this checkout with ``--channels-last`` (training in the channels-last layout on the CPU too).

Every cell runs as its own process with one thread (``OMP_NUM_THREADS=1``), two at a time, arms interleaved so that
each arm shares the machine with the same kind of work. Reported per cell: process wall time and the run's own
``train_wall_s`` / ``eval_wall_s``, and the image AUROC of the method's own scoring (``perceptual`` for TrustMAE; all
variants are kept), so that a change of speed that changed the result shows.
Data sets are built before the clock starts.

Usage::

    python benchmarks/sweep_time.py                                  # -> results/bench/sweep_time.json
    python benchmarks/sweep_time.py --arms after --profile smoke --methods ae_l2 --out /tmp/t.json
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

ARMS = ("before", "after", "after-cl")
#: Training steps of the TrustMAE cells in ``configs/sweep_cpu.yaml`` (the other methods use the profile's).
SWEEP_STEPS = {"trustmae": 300, "trustmae_no_tr": 300}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--before-ref", default="88a6e1b", help="git commit of the 'before' arm")
    p.add_argument("--profile", default="cpu")
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--category", default="widget")
    p.add_argument("--noise-ratio", default="0.1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=["trustmae", "trustmae_no_tr", "ae_ssim", "ae_l2", "memae"])
    p.add_argument("--steps", type=int, default=0, help="steps of every cell (0 = as the sweep: 300 for TrustMAE)")
    p.add_argument("--jobs", type=int, default=2, help="cells at a time (the sweep's --jobs)")
    p.add_argument("--out", default=str(common.REPO / "results" / "bench" / "sweep_time.json"))
    return p.parse_args(argv)


def _checkout(arm: str, ref: str, tmp: Path) -> Path:
    """The source tree an arm runs: this repository, or a detached worktree of ``ref``."""
    if arm != "before":
        return common.REPO
    tree = tmp / "before"
    proc = subprocess.run(["git", "-C", str(common.REPO), "worktree", "add", "--detach", str(tree), ref],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"error: cannot check out commit {ref} for the 'before' arm ({proc.stderr.strip()[:200]}); "
                         "fetch the full history (git fetch --unshallow) or pass --arms after after-cl")  # fmt: skip
    return tree


def _env(tree: Path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(tree))


def _cell_args(args, method: str, arm: str, runs: Path) -> list[str]:
    steps = args.steps or SWEEP_STEPS.get(method, 0)
    cmd = [sys.executable, "-m", "trustmae_lib", "train", "--dataset", args.dataset, "--category", args.category,
           "--noise-ratio", str(args.noise_ratio), "--method", method, "--profile", args.profile,
           "--seed", str(args.seed), "--out", str(runs), "--evaluate", "--no-progress", "--device", "cpu"]  # fmt: skip
    if steps:
        cmd += ["--steps", str(steps)]
    if arm != "before":  # the first study's settings, the defaults up to 0.1.0 (the before arm's code has them)
        cmd += ["--reading", "literal", "--no-fast"]
    if arm == "after-cl":
        cmd.append("--channels-last")
    return cmd


def run_cell(args, arm: str, method: str, tree: Path, runs: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(_cell_args(args, method, arm, runs), cwd=tree, env=_env(tree), capture_output=True,
                          text=True)  # fmt: skip
    wall = time.perf_counter() - t0
    row = {"arm": arm, "method": method, "wall_s": round(wall, 2), "returncode": proc.returncode}
    results = sorted(runs.glob(f"*-{method}-*/result.json"))
    if proc.returncode != 0 or not results:
        row["error"] = (proc.stderr.strip().splitlines() or ["no result.json"])[-1][:300]
        return row
    res = json.loads(results[-1].read_text())
    metrics = res["metrics"]
    variant = "perceptual" if "perceptual" in metrics else next(iter(metrics))  # the method's own scoring
    row.update(
        train_wall_s=res.get("train_wall_s"),
        eval_wall_s=res.get("eval_wall_s"),
        steps=res.get("steps"),
        variant=variant,
        image_auroc=metrics[variant].get("image_auroc"),
        image_auroc_by_variant={v: m.get("image_auroc") for v, m in metrics.items()},
        library_version=res.get("library_version"),
        train_channels_last=res.get("train_channels_last", False),
    )
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    machine = common.machine_info(torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="sweep_time_") as tmp_name:
        tmp = Path(tmp_name)
        trees = {arm: _checkout(arm, args.before_ref, tmp) for arm in args.arms}
        try:
            for arm in args.arms:  # build the data set outside the clock
                subprocess.run([sys.executable, "-m", "trustmae_lib", "data", args.dataset, "--profile", args.profile],
                               cwd=trees[arm], env=_env(trees[arm]), check=True, capture_output=True)  # fmt: skip
            tasks = [(arm, m) for m in args.methods for arm in args.arms]
            rows = []
            with cf.ThreadPoolExecutor(max_workers=args.jobs) as pool:
                futures = {
                    pool.submit(run_cell, args, arm, m, trees[arm], tmp / "runs" / arm / m): (arm, m)
                    for arm, m in tasks
                }
                for fut in cf.as_completed(futures):
                    row = fut.result()
                    rows.append(row)
                    common.log(f"  {row['arm']:9s} {row['method']:15s} {row['wall_s']:8.1f} s "
                               f"AUROC {row.get('image_auroc', float('nan')):.3f} {row.get('error', '')}")  # fmt: skip
        finally:
            if "before" in trees:
                subprocess.run(["git", "-C", str(common.REPO), "worktree", "remove", "--force", str(trees["before"])],
                               capture_output=True)  # fmt: skip
                shutil.rmtree(trees["before"], ignore_errors=True)
    rows.sort(key=lambda r: (args.methods.index(r["method"]), args.arms.index(r["arm"])))
    totals = {arm: round(sum(r["wall_s"] for r in rows if r["arm"] == arm), 1) for arm in args.arms}
    cells = {"dataset": args.dataset, "category": args.category, "noise_ratio": float(args.noise_ratio),
             "seed": args.seed, "profile": args.profile, "jobs": args.jobs, "threads_per_cell": 1}  # fmt: skip
    head = _head()
    refs = {"before": args.before_ref, "after": head, "after-cl": head}
    payload = {"args": vars(args), "cells": cells, "refs": {a: refs[a] for a in args.arms}, "results": rows,
               "total_wall_s": totals}  # fmt: skip
    common.write_result(args.out, "sweep_time", machine, payload)
    failed = [r for r in rows if "error" in r]
    for arm, total in totals.items():
        common.log(f"{arm:9s} {total:8.1f} s over {sum(r['arm'] == arm for r in rows)} cells")
    return 1 if failed else 0


def _head() -> str:
    out = subprocess.run(["git", "-C", str(common.REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True)  # fmt: skip
    dirty = subprocess.run(["git", "-C", str(common.REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    return out.stdout.strip() + ("+changes" if dirty else "")


if __name__ == "__main__":
    sys.exit(main())
