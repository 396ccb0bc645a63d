"""Scoring benchmark: anomaly maps per second with :func:`trustmae_lib.engine.evaluate.score`, against matmul limit.

Each configuration scores ``--images`` random images with untrained networks built like a trained run
(:func:`~trustmae_lib.engine.methods.build_models`; weights do not change time or FLOPs) wrapped in a
:class:`~trustmae_lib.engine.runs.TrainedRun`: TrustMAE with the spatial perceptual distance
(``perceptual``, the paper's scoring) and the pixel distance (``pixel``, *w/o PD*), MemAE with its residual map,
and AE-L2 / AE-SSIM on a texture (sliding windows over the 4x texture image, supplement §B) and on an object
(one window).

Layouts: ``nchw`` runs ``score(..., channels_last=False)`` on NCHW networks and images (the library before the
channels-last change); ``channels_last`` runs the library's default ``channels_last=True``.

Reported per configuration: images/s, ms per image, FLOPs per image (``FlopCounterMode``), achieved GFLOP/s and
its ratio to the float32 matmul throughput measured in the same process, peak resident memory.

Usage::

    python benchmarks/bench_score.py
    python benchmarks/bench_score.py --profiles smoke --repeats 1 --warmup 0 --images 2 --out /tmp/score.json
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from bench_train import signature  # noqa: E402

from trustmae_lib.config import (  # noqa: E402
    RunSpec,
    is_trustmae,  # noqa: E402
    load_profile,
)
from trustmae_lib.engine import methods, runs  # noqa: E402
from trustmae_lib.engine.evaluate import score  # noqa: E402
from trustmae_lib.errors import TrustMAEError  # noqa: E402
from trustmae_lib.model.perceptual import build_backbone  # noqa: E402
from trustmae_lib.utils import seed_everything  # noqa: E402

#: (method, variant, category): category ``brick`` is a texture, ``widget`` an object.
CONFIGS = (
    ("trustmae", "perceptual", "brick"),
    ("trustmae", "pixel", "brick"),
    ("memae", "residual", "brick"),
    ("ae_l2", "residual", "brick"),
    ("ae_l2", "residual", "widget"),
    ("ae_ssim", "residual", "brick"),
    ("ae_ssim", "residual", "widget"),
)
LAYOUTS = ("nchw", "channels_last")


def untrained_run(method: str, category: str, profile, device, channels_last: bool):
    """A :class:`~trustmae_lib.engine.runs.TrainedRun` with freshly initialised networks (for timing only)."""
    # The configuration the committed file measured: the supplement-literal reading, the backbone unfolded (0.1.0).
    spec = RunSpec(category=category, method=method, profile=profile.name, reading="", fast=False)
    seed_everything(0)
    models = methods.build_models(spec, profile)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for m in models.values():
        m.to(device, memory_format=fmt).eval()
    run = runs.TrainedRun(
        run_dir=Path("untrained"),
        spec=spec,
        profile=profile,
        models=models,
        split=None,
        index=SimpleNamespace(root=None),
        device=device,
        meta={},
    )
    weights = None
    if is_trustmae(method):
        pretrained = profile.backbone != "vgg19" or common.vgg19_available()
        backbone = build_backbone(profile.backbone, pretrained=pretrained).to(device, memory_format=fmt)
        run._backbone = backbone  # the cache that evaluate.score fills on first use
        weights = backbone.weights_source
    return run, weights


def windows_per_image(run) -> int:
    """Auto-encoder passes per scored image: 1, or the sliding windows plus the display tiles of a texture."""
    size, window = run.score_size, run.input_size
    if size <= window:
        return 1
    from trustmae_lib.model.baselines import get_baseline

    stride = get_baseline(run.method).texture_stride(run.profile)
    return ((size - window) // stride + 1) ** 2 + (size // window) ** 2


def parse_args(argv=None):
    p = common.base_parser(__doc__.splitlines()[0], "results/bench/score.json")
    p.add_argument("--profiles", nargs="+", default=["cpu", "paper"])
    p.add_argument("--images", type=int, default=8, help="images scored per timed run")
    p.add_argument(
        "--images-windows", type=int, default=2, help="images per run where a texture is scored window by window"
    )
    p.add_argument("--batch-size", type=int, default=16, help="evaluate.score's batch size")
    p.add_argument("--methods", nargs="+", default=sorted({c[0] for c in CONFIGS}))
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    p.add_argument("--amp", default="none", choices=["none", "bf16"], help="run score() under autocast")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device, amp, machine, lim, ref, peak = common.start(args, "bench_score")
    rows = []
    measured: dict[tuple, dict] = {}
    for prof_name in args.profiles:
        profile = load_profile(prof_name)
        for method, variant, category in CONFIGS:
            if method not in args.methods:
                continue
            for layout in args.layouts:
                row = {
                    "profile": profile.name,
                    "method": method,
                    "variant": variant,
                    "category": category,
                    "layout": layout,
                    "amp": args.amp,
                    "images": args.images,
                    "batch_size": args.batch_size,
                    "repeats": args.repeats,
                    "warmup": args.warmup,
                }
                key = (signature(method, profile), variant, category, layout)
                if key in measured:  # identical network and images: reuse, and say so
                    same = measured[key]
                    row.update({k: v for k, v in same.items() if k not in row}, same_as=same["profile"])
                    rows.append(row)
                    common.log(
                        f"  {profile.name:6s} {method:9s} {variant:10s} {category:7s} {layout:13s} same as "
                        f"under '{same['profile']}'"
                    )
                    continue
                try:
                    with common.PeakMemory(device) as mem:
                        cl = layout == "channels_last"
                        run, weights = untrained_run(method, category, profile, device, cl)
                        size = run.score_size
                        n = args.images_windows if size > run.input_size else args.images
                        row["images"] = n
                        gen = torch.Generator().manual_seed(0)
                        images = torch.rand(n, 3, size, size, generator=gen) * 2 - 1
                        images = images.to(device, memory_format=torch.channels_last if cl else torch.contiguous_format)
                        row.update(
                            score_size=size,
                            model_input=run.input_size,
                            model_windows_per_image=windows_per_image(run),
                            backbone_weights=weights,
                        )

                        def call(run=run, images=images, variant=variant, cl=cl):
                            ctx = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
                            with ctx:
                                return score(run, images, variant, batch_size=args.batch_size, channels_last=cl)

                        flops = common.count_flops(call)
                        for _ in range(args.warmup):
                            call()
                        row.update(common.wait_idle(args.wait_idle))
                        limit = common.matmul_limit(device, amp or torch.float32, args.matmul_size)["gflops"]
                        with common.CpuMeter() as meter:
                            times = common.time_runs(call, device, 0, args.repeats)
                    stats = common.summary(times)
                    achieved = flops / stats["median_s"] / 1e9
                    row.update(
                        time=stats,
                        images_per_s=round(n / stats["median_s"], 3),
                        ms_per_image=round(stats["median_s"] / n * 1e3, 3),
                        gflop_per_image=round(flops / n / 1e9, 3),
                        achieved_gflops=round(achieved, 2),
                        limit_gflops=round(limit, 2),
                        ratio_to_matmul=round(achieved / limit, 4),
                        cpu_utilisation=meter.utilisation,
                        memory=mem.result(),
                    )
                    if peak:
                        row["mfu_vs_datasheet"] = round(achieved / (peak * 1e3), 4)
                    del run, images
                    measured[key] = row
                except (RuntimeError, TrustMAEError, torch.OutOfMemoryError) as err:
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                    traceback.print_exc()
                rows.append(row)
                common.log(
                    f"  {profile.name:6s} {method:9s} {variant:10s} {category:7s} {layout:13s} "
                    + (
                        f"{row['images_per_s']:9.2f} img/s  {row['gflop_per_image']:8.2f} GFLOP/img  "
                        f"{row['achieved_gflops']:7.1f} GFLOP/s  ratio {row['ratio_to_matmul']:.3f}  "
                        f"cpu {row['cpu_utilisation']:.2f} busy {row['busy_before']}"
                        if "error" not in row
                        else row["error"]
                    )
                )
    return common.finish(args.out, "score", machine, lim, ref, args, rows)


if __name__ == "__main__":
    raise SystemExit(main())
