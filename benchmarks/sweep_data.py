"""How long the noise study's real training runs waited for data, from their own logs.

``bench_train.py`` measures the batch draw on random tensors with the benchmark's threads; this script reads what
the sweep's runs recorded while they trained: every logged step of ``<runs>/*/log.csv`` carries ``step_s`` (the
whole step, batch draw included) and ``data_s`` (the batch draw), and ``run.json`` the run's total ``data_wait_s``
and ``train_wall_s``. Reported per method and category: runs, median per-step share of the draw, its maximum over
runs, and the total share (all waits over all training time). The run folders are not committed (checkpoints);
run it after ``make reproduce`` / ``make sweep``.

Usage::

    python benchmarks/sweep_data.py                      # runs/cpu -> results/bench/sweep_data.json
    python benchmarks/sweep_data.py --runs runs/cpu --out /tmp/sweep_data.json
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def run_shares(run_dir: Path) -> dict | None:
    """One finished run's method, category, per-step median draw share and total draw share (``None`` if absent)."""
    try:
        info = json.loads((run_dir / "run.json").read_text())
        with open(run_dir / "log.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, ValueError):
        return None
    shares = [float(r["data_s"]) / float(r["step_s"]) for r in rows if r.get("data_s") and float(r["step_s"]) > 0]
    if not info.get("finished") or not shares or not info.get("train_wall_s"):
        return None
    return {
        "method": info["spec"]["method"],
        "category": f"{Path(info['spec']['dataset']).name}/{info['spec']['category']}",
        "step_share": statistics.median(shares),
        "total_share": float(info.get("data_wait_s", 0.0)) / float(info["train_wall_s"]),
        "threads": info.get("threads"),
    }


def summarise(runs: list[dict]) -> list[dict]:
    """Per (method, category): runs, median and maximum of the per-run median step share, median total share."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["category"]), []).append(r)
    return [
        {
            "method": m,
            "category": c,
            "runs": len(rs),
            "median_step_share": round(statistics.median(r["step_share"] for r in rs), 5),
            "max_step_share": round(max(r["step_share"] for r in rs), 5),
            "median_total_share": round(statistics.median(r["total_share"] for r in rs), 5),
        }
        for (m, c), rs in sorted(groups.items())
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=str(common.REPO / "runs" / "cpu"), help="folder of run folders")
    p.add_argument("--out", default=str(common.REPO / "results" / "bench" / "sweep_data.json"))
    args = p.parse_args(argv)
    found = [r for d in sorted(Path(args.runs).glob("*/")) if (r := run_shares(d)) is not None]
    if not found:
        print(f"error: no finished runs with a log.csv under {args.runs}; run `make sweep` first", file=sys.stderr)
        return 2
    import torch

    rows = summarise(found)
    machine = common.machine_info(torch.device("cpu"))
    path = common.write_result(args.out, "sweep_data", machine, {"args": vars(args), "results": rows})
    for r in rows:
        common.log(f"  {r['method']:15s} {r['category']:18s} {r['runs']:3d} runs  draw {r['median_step_share']:.2%} "
                   f"of a step (max {r['max_step_share']:.2%})")  # fmt: skip
    common.log(f"  wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
