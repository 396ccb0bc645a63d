"""The `cpu`-profile TrustMAE step before and after the speed path, measured in one run on one machine.

Arms, each a full training step (:meth:`trustmae_lib.engine.methods.TrustMAEMethod.step`, discriminator and
generator, both Adam updates) built as :mod:`bench_train` builds it:

* ``before`` -- the step as the performance issue found it: the library's default configuration of that time (the
  supplement-literal memory, NCHW, the backbone's BatchNorm unfolded) with the two later exact changes undone -- the
  backbone padded on every call as the wheel ships it, the SSIM's statistics filtered as one stack
  (``bench_changes.backbone_before`` and ``ssim_before``). The same numbers as the first study's committed results;
* ``default`` -- the library's default configuration as it is now (since 0.2.0: the learned memory, reading
  ``ema``, on the speed path) on a fixed-orientation category (the widget, as the noise study's core), so that the
  step gathers its perceptual targets from those kept for the run (exact change 7,
  :meth:`~trustmae_lib.engine.methods.TrustMAEMethod.cache_targets`): what a run that names neither gets;
* ``default-nokeep`` -- the same step with the targets computed in every step (as before change 7, the same
  numbers), so that ``default`` against it is what keeping them buys;
* ``after`` -- the speed path, :attr:`trustmae_lib.config.RunSpec.fast` (channels-last, the frozen backbone's
  BatchNorm folded into its convolutions), on the supplement-literal memory: ``before``'s function up to rounding,
  so ``speedup`` is the engineering alone;
* ``after+bf16`` -- the speed path under bfloat16 autocast, only on a CPU with native bf16 (reported, not a
  default: it changes the numbers by more than float rounding);
* ``after+compile`` -- the speed path with the generator, the discriminator and the perceptual backbone compiled in
  place by ``torch.compile`` (Inductor's C++ kernels; reported, not a default). Its first step, which compiles, is
  timed on its own (``compile_s``), before the warm-up; ``--no-compile`` leaves the arm out.

The arms are timed **interleaved** (one step of each in turn, ``--repeats`` rounds, default 30) so that a machine
whose speed drifts -- a shared host -- slows every arm alike; the median of each arm is reported. This is done at
each thread count of ``--thread-counts`` (2: one run on 2 cores, as ``bench_train``; 1: one worker of a ``--jobs 2``
sweep).
The float32 and bf16 matmul limits are measured in the same process at each thread count. On a shared machine the
ratio of two arms moves from one such measurement to the next, so the measurement at the first thread count is
repeated ``--runs`` times (default 3; the repeats leave out the compile arm): ``runs`` keeps every run's speed-ups and
``speedup_default_median`` their median. Then the PyTorch
profiler attributes one step of ``before``, ``after`` and ``default`` to the parts of the network
(:mod:`profile_step`).

Writes ``results/bench/speedup.json``: ``before_ms``, ``after_ms``, ``speedup``, ``ratio_to_matmul`` (of the
after arm, at the first thread count, first run), ``default_ms`` and ``speedup_default`` (the default configuration
against ``before``), ``ratio_to_matmul_default``, every arm at every thread count, the repeated runs, the parts, and
the machine block.

Usage::

    python benchmarks/bench_speedup.py                       # cpu profile, 2 and 1 threads
    python benchmarks/bench_speedup.py --profile smoke --repeats 2 --warmup 1 --thread-counts 1 --out /tmp/s.json
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import profile_step  # noqa: E402
from bench_train import StepBench  # noqa: E402

from trustmae_lib.config import load_profile  # noqa: E402
from trustmae_lib.utils import native_bf16  # noqa: E402

ARMS = ("before", "default", "default-nokeep", "after", "after+bf16", "after+compile")


def build(arm: str, profile, device) -> StepBench:
    """The step of one arm (same seed, same data, same initial weights for every arm)."""
    amp = torch.bfloat16 if arm == "after+bf16" else None
    default = arm.startswith("default")  # the library's defaults (reading, speed path); others: the literal memory
    bench = StepBench("trustmae", profile, device, amp=amp, category="widget", seed=0,
                      fast=None if default else arm != "before", reading=None if default else "",
                      fixed_orientation=default)  # fmt: skip
    if arm == "default-nokeep":
        bench.method.targets = None  # phi(x) in every step, as before change 7
    if arm == "before":  # undo the exact changes: the shipped backbone's padding, the one-stack SSIM
        from unittest import mock

        import bench_changes

        from trustmae_lib.model import losses

        if bench.method.backbone.name == "efficientnet_lite0":
            bench.method.backbone = bench_changes.backbone_before(bench.method.backbone)
        step = bench.step

        def step_before(i: int, step=step):
            with mock.patch.object(losses, "ssim", lambda x, y, **kw: bench_changes.ssim_before(x, y)):
                return step(i)

        bench.step = step_before
    return bench


def time_arms(arms: dict[str, StepBench], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per step of every arm, interleaved: round ``r`` runs one step of each arm in turn."""
    for i in range(warmup):
        for bench in arms.values():
            bench.step(i + 1)
    times: dict[str, list[float]] = {k: [] for k in arms}
    for r in range(repeats):
        for name, bench in arms.items():
            times[name].append(bench.step(warmup + r + 1)[1])
    return times


def compile_in_place(bench: StepBench) -> float:
    """``torch.compile`` the networks and the backbone in place (the step calls the discriminator unwrapped too), then
    run the first step, which compiles; return its seconds."""
    for m in bench.models.values():
        m.compile()
    bench.method.backbone.compile()
    t0 = time.perf_counter()
    bench.step(1)
    return time.perf_counter() - t0


def measure_threads(threads: int, names, profile, device, args) -> dict:
    """Every arm at ``threads`` CPU threads: step times, FLOPs, the limits and the ratios."""
    torch.set_num_threads(threads)
    arms = {name: build(name, profile, device) for name in names}
    flops = {name: common.count_flops(lambda b=b: b.once(0)) for name, b in arms.items()}
    compile_s = {name: compile_in_place(b) for name, b in arms.items() if name.endswith("compile")}  # eager FLOPs
    idle = common.wait_idle(args.wait_idle)
    lim = common.limits(device, args.matmul_size)
    with common.CpuMeter() as meter:
        times = time_arms(arms, args.warmup, args.repeats)
    rows = {}
    for name, t in times.items():
        med = statistics.median(t)
        limit = lim["bfloat16" if name.endswith("bf16") else "float32"]["gflops"]
        rows[name] = {
            "step": common.summary(t),
            "step_ms": round(med * 1e3, 2),
            "gflop_per_step": round(flops[name] / 1e9, 3),
            "achieved_gflops": round(flops[name] / med / 1e9, 2),
            "ratio_to_matmul": round(flops[name] / med / 1e9 / lim["float32"]["gflops"], 4),
            "ratio_to_own_dtype_limit": round(flops[name] / med / 1e9 / limit, 4),
        }
        if name in compile_s:
            rows[name]["compile_s"] = round(compile_s[name], 1)
    before = rows["before"]["step_ms"]
    for row in rows.values():
        row["speedup"] = round(before / row["step_ms"], 3)
    return {"threads": threads, "limits": lim, "cpu_utilisation": meter.utilisation, **idle, "arms": rows}


def run_summary(row: dict) -> dict:
    """The speed-ups of one interleaved measurement (:func:`measure_threads`'s row)."""
    arms = row["arms"]
    return {"before_ms": arms["before"]["step_ms"], "default_ms": arms["default"]["step_ms"],
            "after_ms": arms["after"]["step_ms"], "speedup_default": arms["default"]["speedup"],
            "speedup": arms["after"]["speedup"], "ratio_to_matmul_default": arms["default"]["ratio_to_matmul"],
            "float32_limit_gflops": round(row["limits"]["float32"]["gflops"], 2),
            "cpu_utilisation": row["cpu_utilisation"]}  # fmt: skip


def parts(profile, device, warmup: int) -> dict:
    """Forward and backward milliseconds per part of the network, ``before``, ``after`` and ``default`` (one
    profiled step each; ``before`` here is 0.1.0's default without undoing the exact changes)."""
    out = {}
    arms = {"before": {"fast": False}, "after": {"fast": True},
            "default": {"fast": None, "reading": None, "fixed_orientation": True}}  # fmt: skip
    for name, kw in arms.items():
        row = profile_step.profile_one(profile, "nchw", device, max(1, warmup), **kw)
        out[name] = {
            "step_ms_profiled": row["step_ms_profiled"],
            "parts": row["parts"],
            "categories": row["categories"],
            "top_ops": row["top_ops"],
        }
    return out


def parse_args(argv=None):
    p = common.base_parser(__doc__.splitlines()[0], "results/bench/speedup.json")
    p.set_defaults(repeats=30, warmup=2)
    p.add_argument("--profile", default="cpu", help="the profile whose step is measured (default cpu)")
    p.add_argument("--thread-counts", type=int, nargs="+", default=[2, 1], help="CPU threads of each measurement")
    p.add_argument(
        "--runs",
        type=int,
        default=3,
        help="interleaved measurements at the first thread count (default 3; their median is reported)",
    )
    p.add_argument("--no-parts", action="store_true", help="skip the profiled per-part step")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile arm (compiles for minutes)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.runs < 1:
        raise SystemExit(f"--runs must be at least 1, got {args.runs}")
    device = common.setup_run(args)
    if device.type != "cpu":
        raise SystemExit("bench_speedup.py measures the CPU step; run it with --device cpu")
    profile = load_profile(args.profile)
    names = [a for a in ARMS if (a != "after+bf16" or native_bf16()) and (a != "after+compile" or not args.no_compile)]
    machine = common.machine_info(device)
    machine["native_bf16"] = native_bf16()
    common.log(f"bench_speedup: {machine['cpu']} ({machine['cpu_capability']}, native bf16 {machine['native_bf16']})")
    rows, repeats = [], []
    for threads in args.thread_counts:
        row = measure_threads(threads, names, profile, device, args)
        rows.append(row)
        shown = ", ".join(f"{k} {v['step_ms']:.0f} ms (x{v['speedup']:.2f})" for k, v in row["arms"].items())
        common.log(f"  {threads} thread(s): {shown}; float32 limit {row['limits']['float32']['gflops']:.0f} GFLOP/s")
        if not repeats:  # the first thread count, measured again (the ratio moves between runs on a shared machine)
            eager = [n for n in names if not n.endswith("compile")]
            repeats = [row] + [measure_threads(threads, eager, profile, device, args) for _ in range(args.runs - 1)]
            runs = [run_summary(r) for r in repeats]
            shown = ", x".join(f"{r['speedup_default']:.2f}" for r in runs)
            common.log(f"  default x{shown} in {len(runs)} runs")
    torch.set_num_threads(args.thread_counts[0])
    first = rows[0]
    payload = {
        "profile": profile.name,
        "batch": profile.batch_size,
        "image_size": profile.image_size,
        "width": profile.width,
        "arms": {
            "before": "the step as the performance issue found it: library default of 0.1.0 (the literal memory, NCHW, "
            "RunSpec.fast = False) with "
            "the backbone padded on every call as the wheel ships it and the one-stack SSIM (the same numbers)",
            "default": "library default as it is now (0.2.0: the learned memory, reading ema, on the speed path; "
            "a fixed-orientation category, so the perceptual targets are kept for the run: exact change 7)",
            "default-nokeep": "default with the perceptual targets computed in every step (before change 7; the "
            "same numbers)",
            "after": "speed path (RunSpec.fast = True): channels-last, backbone BatchNorm folded into its "
            "convolutions; the literal memory, as before",
            "after+bf16": "speed path under bfloat16 autocast (native-bf16 CPUs only; not a default)",
            "after+compile": "speed path with the networks and the backbone under torch.compile (Inductor; not a "
            "default); compile_s: its first, compiling step",
        },
        "threads": first["threads"],
        "before_ms": first["arms"]["before"]["step_ms"],
        "after_ms": first["arms"]["after"]["step_ms"],
        "speedup": first["arms"]["after"]["speedup"],
        "default_ms": first["arms"]["default"]["step_ms"],
        "speedup_default": first["arms"]["default"]["speedup"],
        "ratio_to_matmul": first["arms"]["after"]["ratio_to_matmul"],
        "ratio_to_matmul_before": first["arms"]["before"]["ratio_to_matmul"],
        "ratio_to_matmul_default": first["arms"]["default"]["ratio_to_matmul"],
        "default_nokeep_ms": first["arms"]["default-nokeep"]["step_ms"],
        "float32_limit_gflops": round(first["limits"]["float32"]["gflops"], 2),
        "bfloat16_limit_gflops": round(first["limits"]["bfloat16"]["gflops"], 2),
        "by_threads": rows,
        "runs": runs,
        "speedup_default_median": round(statistics.median(r["speedup_default"] for r in runs), 3),
        "speedup_median": round(statistics.median(r["speedup"] for r in runs), 3),
        "parts": None if args.no_parts else parts(profile, device, args.warmup),
        "args": vars(args),
    }
    path = common.write_result(args.out, "speedup", machine, payload)
    common.log(
        f"  default x{payload['speedup_default']:.2f} ({payload['before_ms']:.0f} -> {payload['default_ms']:.0f} ms); "
        f"median of {len(runs)} runs x{payload['speedup_default_median']:.2f}"
    )
    common.log(f"  speedup x{payload['speedup']:.2f} ({payload['before_ms']:.0f} -> {payload['after_ms']:.0f} ms), "
               f"after at {payload['ratio_to_matmul']:.0%} of the float32 matmul limit; wrote {path}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
