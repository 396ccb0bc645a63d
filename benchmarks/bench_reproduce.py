"""``make reproduce`` from scratch, timed: the core of the noise study recomputed in a clean worktree.

``make reproduce`` runs the sweeps of ``configs/sweep_cpu_core.yaml`` and ``configs/sweep_cpu_core_disjoint.yaml``
with ``--fresh --jobs 2``. This script does the same in a detached git worktree of ``--ref`` (default ``HEAD``, so
the committed code and committed result files; nothing in this checkout is touched), with the data sets built
before the clock starts, and records:

* the wall time of each sweep and in all, the number of cells, workers and threads per worker, and the time per
  144 cells (the unit of chapter 14's target);
* how the recomputed result files compare with the committed ones: on the platform that wrote a committed file,
  every metric must be identical (the study is deterministic under its seeds); elsewhere the largest image-AUROC
  difference is reported;
* the machine block of every benchmark file (CPU, ISA level, float32 / bf16 matmul limits).

Usage::

    python benchmarks/bench_reproduce.py                     # -> results/bench/reproduce.json (~1.5 h on 2 cores)
    python benchmarks/bench_reproduce.py --sweeps sweep_cpu_core --out /tmp/r.json
"""

from __future__ import annotations

import argparse
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

from trustmae_lib.utils import native_bf16, same_platform  # noqa: E402

SWEEPS = ("sweep_cpu_core", "sweep_cpu_core_disjoint")
#: The unit of chapter 14's target for the noise study: at most 60 minutes per 144 cells on 2 cores.
CELLS_UNIT = 144


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweeps", nargs="+", default=list(SWEEPS), help="sweep files, in the order make reproduce runs")
    p.add_argument("--ref", default="HEAD", help="git commit whose code and committed results are used")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (make reproduce uses 2)")
    p.add_argument("--profile", default="cpu", help="profile whose data sets are built before the clock")
    p.add_argument("--matmul-size", type=int, default=0, help="side of the limit matmul (0 = 2048)")
    p.add_argument("--keep", action="store_true", help="keep the worktree (its runs/ and results/) afterwards")
    p.add_argument("--out", default=str(common.REPO / "results" / "bench" / "reproduce.json"))
    return p.parse_args(argv)


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(common.REPO), *args], capture_output=True, text=True)


def _env(tree: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(tree), PYTHONHASHSEED="0")


def cells_of(tree: Path, name: str) -> list[str]:
    """The result paths (relative to ``tree``) of every cell of sweep ``name``, as the worktree's code names them."""
    return subprocess.run([sys.executable, "-c", _LIST, name], cwd=tree, env=_env(tree), capture_output=True,
                          text=True, check=True).stdout.split()  # fmt: skip


def compare(tree: Path, paths: list[str]) -> dict:
    """Recomputed result files in ``tree`` against the committed ones of the same cells (read from the worktree's
    git index, i.e. ``--ref``)."""
    identical, differ, other_platform, max_diff, missing = 0, [], 0, 0.0, []
    for rel in paths:
        path = tree / rel
        committed = subprocess.run(["git", "-C", str(tree), "show", f"HEAD:{rel}"], capture_output=True, text=True)
        if not path.is_file() or committed.returncode != 0:
            missing.append(rel)
            continue
        fresh, old = json.loads(path.read_text()), json.loads(committed.stdout)
        diff = max(abs((fresh["metrics"][v].get("image_auroc") or 0.0) - (m.get("image_auroc") or 0.0))
                   for v, m in old["metrics"].items())  # fmt: skip
        max_diff = max(max_diff, diff)
        if not same_platform(fresh.get("platform"), old.get("platform")):
            other_platform += 1
        elif fresh["metrics"] == old["metrics"]:
            identical += 1
        else:
            differ.append(rel)
    return {"identical_on_same_platform": identical, "differ_on_same_platform": differ,
            "committed_on_other_platform": other_platform, "max_image_auroc_diff": round(max_diff, 6),
            "missing": missing}  # fmt: skip


#: Prints the relative result paths of every cell of a sweep (run inside the worktree).
_LIST = """
import sys
from trustmae_lib.study import sweep
from trustmae_lib.study.sweep import result_path
from trustmae_lib.config import REPO_ROOT
c = sweep.load_sweep(sys.argv[1])
print("\\n".join(str(result_path(s, c.results_dir).relative_to(REPO_ROOT)) for s in c.grid()))
"""


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)  # the limits of one worker's thread (each sweep worker runs one)
    machine = common.machine_info(torch.device("cpu"))
    machine["native_bf16"] = native_bf16()
    limits = common.limits(torch.device("cpu"), args.matmul_size)  # measured before the clock, on an idle machine
    ref = _git("rev-parse", "--short", args.ref).stdout.strip()
    if not ref:
        raise SystemExit(f"error: unknown git ref {args.ref!r}; pass a commit of this repository with --ref")
    tmp = Path(tempfile.mkdtemp(prefix="bench_reproduce_"))
    tree = tmp / "tree"
    proc = _git("worktree", "add", "--detach", str(tree), ref)
    if proc.returncode != 0:
        raise SystemExit(f"error: cannot check out {ref} ({proc.stderr.strip()[:200]})")
    try:
        for dataset in ("synthetic", "elpv"):  # the data sets, outside the clock (as `make data` before it)
            out = f"data/{args.profile}/{dataset}"
            subprocess.run([sys.executable, "-m", "trustmae_lib", "data", dataset, "--profile", args.profile,
                            "--out", out], cwd=tree, env=_env(tree), check=True, capture_output=True)  # fmt: skip
        sweeps, failed, recomputed = [], 0, []
        start = time.perf_counter()
        for name in args.sweeps:
            t0 = time.perf_counter()
            command = [sys.executable, "-m", "trustmae_lib", "sweep", name, "--fresh", "--jobs", str(args.jobs)]
            run = subprocess.run(command, cwd=tree, env=_env(tree), capture_output=True, text=True)
            wall = time.perf_counter() - t0
            paths = cells_of(tree, name)
            n = len(paths)
            failed += run.returncode != 0
            recomputed += paths
            sweeps.append({"sweep": name, "cells": n, "wall_s": round(wall, 1), "returncode": run.returncode,
                           **({"stderr_tail": run.stderr[-2000:]} if run.returncode else {})})  # fmt: skip
            common.log(f"  {name}: {n} cells, {wall / 60:.1f} min (exit {run.returncode})")
        total = time.perf_counter() - start
        cells = sum(s["cells"] for s in sweeps)
        payload = {
            "args": vars(args),
            "ref": ref,
            "command": "; ".join(f"trustmae sweep {s} --fresh --jobs {args.jobs}" for s in args.sweeps),
            "jobs": args.jobs,
            "threads_per_worker": 1,
            "float32_limit_gflops_per_thread": round(limits["float32"]["gflops"], 2),
            "bfloat16_limit_gflops_per_thread": round(limits["bfloat16"]["gflops"], 2),
            "data_built_before_clock": True,
            "sweeps": sweeps,
            "cells": cells,
            "total_wall_s": round(total, 1),
            "total_min": round(total / 60, 1),
            "min_per_144_cells": round(total / 60 * CELLS_UNIT / max(1, cells), 1),
            "load_average_after": common.load_average(),
            "agreement_with_committed": compare(tree, recomputed),
        }
    finally:
        if not args.keep:
            _git("worktree", "remove", "--force", str(tree))
            shutil.rmtree(tmp, ignore_errors=True)
    common.write_result(args.out, "reproduce", machine, payload)
    common.log(f"make reproduce: {cells} cells in {total / 60:.1f} min ({payload['min_per_144_cells']} min per "
               f"{CELLS_UNIT} cells); agreement: {payload['agreement_with_committed']}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
