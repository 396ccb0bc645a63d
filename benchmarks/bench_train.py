"""Training-step benchmark: one full step of TrustMAE and of each baseline, against the matmul limit.

A TrustMAE step is the library's own :meth:`trustmae_lib.engine.methods.TrustMAEMethod.step` -- the
discriminator step (Eq. 13) and the generator step on every term of Eq. 9 (L1, SSIM, perceptual, hinge GAN, feature
matching, margin, trust), with both Adam updates. A baseline step is
:meth:`trustmae_lib.engine.methods.BaselineMethod.step` (supplement §B). The networks, optimisers and the memory
initialisation are built the way :func:`trustmae_lib.engine.train.fit` builds them
(:func:`~trustmae_lib.engine.methods.build_models`, the method classes,
:func:`~trustmae_lib.engine.methods.init_memory_from_features`), and every step first draws its batch the way the
training loop does (:func:`~trustmae_lib.engine.prepare.batch_indices` on the in-memory training tensors, then
:func:`~trustmae_lib.engine.prepare.training_batch`: flips / quarter turns, and for textures in the AE baselines a
random window cut first).

Reported per (profile, method, memory layout): median ms per step and per data draw, the data share of the step,
images/s, FLOPs per step (``FlopCounterMode``), achieved GFLOP/s and its ratio to the float32 matmul throughput
measured in the same process, and the peak resident memory.

Engineering notes (not in the paper):

* the training images are random tensors of the training set's shape: the loop decodes the images once before
  training, so a step's data work (indexing, flips/rotations, crops) does not depend on their content;
* VGG-19 (the ``paper`` profile's backbone) has random weights unless its ImageNet file is in the torch hub cache
  (weights do not change time or FLOPs);
* ``--layouts channels_last`` converts the networks and the batch the way the training loop does on CUDA.

Usage::

    python benchmarks/bench_train.py                      # cpu and paper profiles, NCHW and channels-last
    python benchmarks/bench_train.py --profiles smoke --repeats 1 --warmup 0 --out /tmp/train.json
"""

from __future__ import annotations

import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from trustmae_lib.config import (  # noqa: E402
    RunSpec,
    is_trustmae,  # noqa: E402
    load_profile,
)
from trustmae_lib.engine import methods, prepare  # noqa: E402
from trustmae_lib.errors import TrustMAEError  # noqa: E402
from trustmae_lib.utils import seed_everything  # noqa: E402

METHODS = ("trustmae", "memae", "ae_l2", "ae_ssim")
LAYOUTS = ("nchw", "channels_last")


class StepBench:
    """One method's training step, built like :func:`trustmae_lib.engine.train.fit` builds it.

    Args:
        method: ``trustmae`` or a baseline name.
        profile: the :class:`~trustmae_lib.config.Profile` (sizes, width, batch).
        device: where to run.
        channels_last: convert networks and batches to channels-last.
        amp: ``None`` or ``torch.bfloat16`` (autocast inside the library's step).
        category: decides the texture protocol of the AE baselines (``brick`` is a texture).
        seed: initialisation and data order.
        fast: the library's speed path (:attr:`trustmae_lib.config.RunSpec.fast`: channels-last and the perceptual
            backbone's BatchNorm folded into its convolutions); ``None``: the library's default (on since 0.2.0).
        reading: the reading (:data:`trustmae_lib.config.READINGS`); ``""`` (default here) the supplement-literal
            construction that the committed benchmark files measured, ``None`` the method's default reading.
        fixed_orientation: draw batches as for a fixed-orientation category (the widget, the solar cells: no flips
            or turns); then, as in ``fit``, the step gathers its perceptual targets from the training set's
            (:meth:`~trustmae_lib.engine.methods.TrustMAEMethod.cache_targets`). ``False`` (default here): flips and
            turns, the targets computed in every step, as the committed benchmark files measured.
    """

    def __init__(self, method, profile, device, channels_last=False, amp=None, category="brick", seed=0, fast=False,
                 reading: str | None = "", fixed_orientation: bool = False):  # fmt: skip
        spec = RunSpec(category=category, method=method, profile=profile.name, seed=seed, fast=fast, reading=reading)
        channels_last = channels_last or spec.fast  # the speed path trains channels-last (RunSpec.fast)
        self.device, self.channels_last, self.seed, self.spec = device, channels_last, seed, spec
        seed_everything(seed)
        with common.patched_backbone(common.vgg19_available()) as used:
            models = methods.build_models(spec, profile)
            for m in models.values():
                m.to(device)
                if channels_last:
                    m.to(memory_format=torch.channels_last)
            self.texture = prepare.is_texture(category)
            self.size, self.crop = prepare.train_size(method, profile, self.texture)
            self.batch = profile.batch_size
            self.n = 4 * self.batch  # training tensors in memory; a step gathers `batch` of them
            gen = torch.Generator().manual_seed(seed)
            self.images = (torch.rand(self.n, 3, self.size, self.size, generator=gen) * 2 - 1).to(device)
            self.masks = torch.zeros(self.n, 1, self.size, self.size, device=device)
            init = methods.memory_init_rule(spec, profile)  # as fit() starts
            if init == "kmeans":
                methods.init_memory_kmeans(models["model"], self.images, self.batch, seed=seed)
            if init == "features":
                first = self.images[prepare.batch_indices(0, self.n, self.batch, seed).to(device)]
                if channels_last:
                    first = first.contiguous(memory_format=torch.channels_last)
                methods.init_memory_from_features(models["model"], first, seed=seed)
            cls = methods.TrustMAEMethod if is_trustmae(method) else methods.BaselineMethod
            self.method = cls(spec, profile, models, dict(models), device, amp, None)
            self.fixed_orientation = fixed_orientation
            if fixed_orientation and self.crop is None:  # as fit() does: every batch is images[idx] unchanged
                self.method.cache_targets(self.images, self.batch, channels_last)
        self.backbone_weights = used.get("weights")
        self.models = models
        for m in models.values():
            m.train()

    def compile(self) -> None:
        """Wrap the networks (and the perceptual backbone) in ``torch.compile``."""
        self.method.wrapped = {k: torch.compile(m) for k, m in self.models.items()}
        if hasattr(self.method, "backbone"):
            self.method.backbone = torch.compile(self.method.backbone)

    def data(self, step: int) -> torch.Tensor:
        """The batch of ``step``, drawn as in the training loop: ``(B, 3, S, S)``."""
        return self.batch_and_index(step)[0]

    def batch_and_index(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of ``step`` and its rows of the training tensor, drawn as in the training loop."""
        idx = prepare.batch_indices(step, self.n, self.batch, self.seed).to(self.device)
        gen = torch.Generator().manual_seed(prepare.mix_seed(self.seed, step, 0))
        x = prepare.training_batch(self.images, self.masks, idx, self.crop, self.fixed_orientation, gen)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, idx

    def once(self, step: int) -> dict[str, float]:
        """Train on the batch of ``step`` untimed (e.g. to count its FLOPs); returns the step's log values."""
        x, idx = self.batch_and_index(step)
        return self.method.step(x, step + 1, index=idx)

    def step(self, step: int) -> tuple[float, float]:
        """Draw the batch and run one training step; returns ``(data seconds, step seconds)``."""
        common.sync(self.device)
        t0 = time.perf_counter()
        x, idx = self.batch_and_index(step)
        common.sync(self.device)
        t1 = time.perf_counter()
        self.method.step(x, step + 1, index=idx)
        common.sync(self.device)
        return t1 - t0, time.perf_counter() - t1


def measure(bench: StepBench, args, compile_: bool, repeats: int, amp) -> dict:
    """FLOPs of one step (eager), warm-up steps, a fresh matmul limit, then ``repeats`` timed steps."""
    flops = common.count_flops(lambda: bench.once(0))
    if compile_:
        bench.compile()
    for i in range(args.warmup):
        bench.step(i + 1)
    idle = common.wait_idle(args.wait_idle)
    limit = common.matmul_limit(bench.device, amp or torch.float32, args.matmul_size)["gflops"]
    data_s, step_s = [], []
    with common.CpuMeter() as meter:
        for i in range(repeats):
            d, s = bench.step(args.warmup + i + 1)
            data_s.append(d)
            step_s.append(s)
    step_med = statistics.median(step_s)
    total = [d + s for d, s in zip(data_s, step_s, strict=True)]
    achieved = flops / step_med / 1e9
    return {
        "step": common.summary(step_s),
        "data": common.summary(data_s),
        "step_ms": round(step_med * 1e3, 2),
        "data_ms": round(statistics.median(data_s) * 1e3, 3),
        "data_share": round(statistics.median([d / t for d, t in zip(data_s, total, strict=True)]), 5),
        "images_per_s": round(bench.batch / statistics.median(total), 3),
        "gflop_per_step": round(flops / 1e9, 3),
        "gflop_per_image": round(flops / 1e9 / bench.batch, 3),
        "achieved_gflops": round(achieved, 2),
        "limit_gflops": round(limit, 2),
        "ratio_to_matmul": round(achieved / limit, 4),
        "cpu_utilisation": meter.utilisation,
        **idle,
    }


def signature(method: str, profile) -> tuple:
    """What decides a step's work: equal signatures under two profiles are measured once.

    AE-L2 / AE-SSIM are built at ``min(128, image_size)`` whatever the width, so they are identical under the
    ``cpu`` and ``paper`` profiles; MemAE depends on the size and width; TrustMAE on the whole profile.
    """
    if method in ("ae_l2", "ae_ssim"):
        return (method, min(128, profile.image_size), profile.batch_size)
    if method == "memae":
        return (method, profile.image_size, profile.width, profile.batch_size)
    return (method, tuple(sorted(profile.to_dict().items())))


def parse_args(argv=None):
    p = common.base_parser(__doc__.splitlines()[0], "results/bench/train.json")
    p.set_defaults(repeats=5)
    p.add_argument("--repeats-paper", type=int, default=3, help="timed steps at the paper profile")
    p.add_argument("--profiles", nargs="+", default=["cpu", "paper"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    p.add_argument("--batch-size", type=int, default=0, help="override the profiles' batch size (0 = keep)")
    p.add_argument("--amp", default="none", choices=["none", "bf16"], help="autocast dtype inside the step")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks after the FLOP count")
    p.add_argument("--category", default="brick", help="brick = texture protocol for the AE baselines")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device, amp, machine, lim, ref, peak = common.start(args, "bench_train")
    rows = []
    measured: dict[tuple, dict] = {}
    for prof_name in args.profiles:
        overrides = {"batch_size": args.batch_size} if args.batch_size else {}
        profile = load_profile(prof_name, **overrides)
        repeats = args.repeats_paper if profile.name == "paper" else args.repeats
        for method in args.methods:
            for layout in args.layouts:
                row = {
                    "profile": profile.name,
                    "method": method,
                    "layout": layout,
                    "amp": args.amp,
                    "compile": args.compile,
                    "batch": profile.batch_size,
                    "image_size": profile.image_size,
                    "width": profile.width,
                    "repeats": repeats,
                    "warmup": args.warmup,
                }
                same = measured.get((signature(method, profile), layout))
                if same is not None:  # identical network, input and batch: reuse, and say so
                    row.update({k: v for k, v in same.items() if k not in row}, same_as=same["profile"])
                    rows.append(row)
                    common.log(f"  {profile.name:6s} {method:9s} {layout:13s} same as under '{same['profile']}'")
                    continue
                try:
                    with common.PeakMemory(device) as mem:
                        bench = StepBench(
                            method, profile, device, layout == "channels_last", amp, args.category, seed=0
                        )
                        row["input_size"] = bench.crop or bench.size
                        row["texture_protocol"] = bench.crop is not None
                        if method == "trustmae":
                            row["backbone"] = profile.backbone
                            row["backbone_weights"] = bench.backbone_weights
                        row.update(measure(bench, args, args.compile, repeats, amp))
                    row["memory"] = mem.result()
                    if peak:
                        row["mfu_vs_datasheet"] = round(row["achieved_gflops"] / (peak * 1e3), 4)
                    del bench
                    measured[(signature(method, profile), layout)] = row
                except (RuntimeError, TrustMAEError, torch.OutOfMemoryError) as err:
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                    traceback.print_exc()
                rows.append(row)
                common.log(
                    f"  {profile.name:6s} {method:9s} {layout:13s} "
                    + (
                        f"{row['step_ms']:9.1f} ms/step  {row['images_per_s']:8.2f} img/s  "
                        f"{row['achieved_gflops']:7.1f} GFLOP/s  ratio {row['ratio_to_matmul']:.3f}  "
                        f"data {row['data_share']:.2%}  peak {row['memory']['peak_mib']:.0f} MiB  "
                        f"cpu {row['cpu_utilisation']:.2f} busy {row['busy_before']}"
                        if "error" not in row
                        else row["error"]
                    )
                )
    return common.finish(args.out, "train", machine, lim, ref, args, rows)


if __name__ == "__main__":
    raise SystemExit(main())
