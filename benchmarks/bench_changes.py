"""Before/after measurements of the speed changes made to the library, each in one process, outputs compared.

1. ``data.augment`` (the per-step flips and quarter turns of the training loop): it used to clone the batch and
   apply torchvision's ``horizontal_flip``, ``vertical_flip`` and ``rotate`` one after the other to every group of
   samples with the same symmetry; it now writes into an empty tensor and applies one ``flip`` plus a transpose
   view per group. The *before* code is kept here verbatim as the reference; both must give identical tensors.
   Timed at the batch shapes of the training loop: 128 px (``cpu`` TrustMAE), 256 px (``paper``) and 512 px
   (AE-L2 / AE-SSIM textures, resized to 4x before cropping).

2. ``train.training_batch`` for AE-L2 / AE-SSIM on textures: the loop used to gather the batch's whole 512-px
   texture images, augment them and then crop 128-px windows; it now cuts the windows straight from the in-memory
   training tensor and augments only them. Same distribution (the valid crop positions are symmetric under the
   flips and quarter turns), a sixteenth of the pixels; not the same random draws, so not identical output. The
   *before* code is kept here as the reference.

3. Tried and **not applied**: drawing step ``s + 1``'s batch on a helper thread while step ``s`` trains
   (:class:`BatchPrefetcher` below), so that a step never waits for its data. Measured on short training runs of
   the methods with the largest data share (AE-L2 and AE-SSIM on a texture, MemAE) at the ``cpu`` profile, each
   run from the same initialisation with the batch drawn in the loop (before) and ahead (after, with the helper
   thread at torch's default thread count and at one thread): the wait per step, the wall time per step, and
   whether the weights after the run are identical. The wait vanishes, but on a machine whose cores are all busy
   with the step the draw still costs the same CPU time, and the step gets slower, so the library keeps drawing
   in the loop.

4. ``evaluate``'s scoring of a TrustMAE run: it used to score each of the three variants (``perceptual``,
   ``pixel``, ``global``) on its own, reconstructing every image three times and passing input and reconstruction
   through the backbone twice; :func:`trustmae_lib.engine.evaluate.score_variants` now reconstructs each batch once
   and passes it through the backbone once for all of them. Timed on the test images of a one-step run of the
   ``--scoring-profile`` (the *before* is three :func:`~trustmae_lib.engine.evaluate.score` calls); both must give
   identical maps, image scores and reconstructions.

5. The perceptual backbone (EfficientNet-Lite0): ``efficientnet_lite_pytorch`` pads the input of every
   convolution with ``F.pad`` on each call and clamps every ReLU6 into a new tensor; the library now gives the
   stride-1 convolutions their (symmetric) padding up front and runs ReLU6 in place
   (:func:`trustmae_lib.model.perceptual._pad_statically`). Timed on the training step's two backbone passes (the
   input without gradient, the reconstruction with its input gradient) in the default layout and on the speed
   path; features and input gradients must be identical.

6. The SSIM of ``L_sm``: its five Gaussian-filtered statistics used to come from one grouped convolution of a
   ``(B, 5C, H, W)`` stack, so the backward pass filtered all five; now the input's own two statistics and the three
   that involve the reconstruction are filtered as two stacks. The *before* code is kept here verbatim; the loss and
   the reconstruction's gradient must be identical.

7. Both together in the whole ``cpu``-profile TrustMAE training step (:mod:`bench_train`'s ``StepBench``): two
   copies of the step built from the same seed, one with the *before* backbone and SSIM, stepped interleaved on
   the same batches; every weight of both networks must be identical after the last step.

The memory-layout change (channels-last) is a proposal for the training loop, measured by ``bench_train.py``.

Usage::

    python benchmarks/bench_changes.py
    python benchmarks/bench_changes.py --sizes 32 --repeats 3 --out /tmp/changes.json
"""

from __future__ import annotations

import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as F
from torchvision import tv_tensors

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from trustmae_lib.data.augment import augment  # noqa: E402


def _dihedral_before(image, mask, hflip: bool, vflip: bool, quarter_turns: int):
    """The library's ``_dihedral`` before the change (torchvision v2 calls, one copy each)."""
    image, mask = tv_tensors.Image(image), tv_tensors.Mask(mask)
    if hflip:
        image, mask = F.horizontal_flip(image), F.horizontal_flip(mask)
    if vflip:
        image, mask = F.vertical_flip(image), F.vertical_flip(mask)
    if quarter_turns % 4:
        angle = 90.0 * (quarter_turns % 4)
        image, mask = F.rotate(image, angle), F.rotate(mask, angle)
    return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


def augment_before(images, masks, fixed_orientation, generator=None):
    """The library's ``augment`` before the change."""
    if fixed_orientation or images.shape[0] == 0:
        return images, masks
    b = images.shape[0]
    codes = torch.randint(0, 16, (b,), generator=generator)
    out_i, out_m = images.clone(), masks.clone()
    for code in codes.unique().tolist():
        sel = (codes == code).nonzero().flatten().to(images.device)
        im, mk = _dihedral_before(images[sel], masks[sel], bool(code & 1), bool(code & 2), code >> 2)
        out_i[sel], out_m[sel] = im, mk
    return out_i, out_m


def measure_augment(size: int, batch: int, repeats: int) -> dict:
    """Median ms of both versions on the same batches (interleaved), and whether their outputs are identical."""
    gen = torch.Generator().manual_seed(0)
    pool = torch.rand(4 * batch, 3, size, size, generator=gen) * 2 - 1
    masks = torch.zeros(4 * batch, 1, size, size)
    times = {"before": [], "after": []}
    identical = True
    for r in range(repeats + 2):  # two warm-up rounds
        idx = torch.randperm(4 * batch, generator=gen)[:batch]
        outs = {}
        for name, fn in (("before", augment_before), ("after", augment)):
            t0 = time.perf_counter()
            outs[name] = fn(pool[idx], masks[idx], False, torch.Generator().manual_seed(r))
            if r >= 2:
                times[name].append(time.perf_counter() - t0)
        identical &= all(torch.equal(a, b) for a, b in zip(outs["before"], outs["after"], strict=True))
    before, after = statistics.median(times["before"]), statistics.median(times["after"])
    return {
        "change": "data.augment: one flip + transpose view per symmetry group, no clone",
        "where": "trustmae_lib/data.py (augment, _dihedral)",
        "applied": True,
        "shape": [batch, 3, size, size],
        "before_ms": round(before * 1e3, 3),
        "after_ms": round(after * 1e3, 3),
        "speedup": round(before / after, 3),
        "identical_output": bool(identical),
        "runs_before_s": [round(t, 6) for t in times["before"]],
        "runs_after_s": [round(t, 6) for t in times["after"]],
    }


def measure_crop_first(size: int, crop: int, batch: int, repeats: int) -> dict:
    """The texture baselines' batch draw: augment then crop (before) vs ``train.training_batch`` (after)."""
    from trustmae_lib.engine.prepare import training_batch
    from trustmae_lib.model.baselines import random_crops

    gen = torch.Generator().manual_seed(0)
    pool = torch.rand(4 * batch, 3, size, size, generator=gen) * 2 - 1
    masks = torch.zeros(4 * batch, 1, size, size)
    times = {"before": [], "after": []}
    for r in range(repeats + 2):
        idx = torch.randperm(4 * batch, generator=gen)[:batch]
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(r)
        x, _ = augment(pool[idx], masks[idx], False, g)
        x = random_crops(x, crop, generator=g)
        t1 = time.perf_counter()
        g = torch.Generator().manual_seed(r)
        y = training_batch(pool, masks, idx, crop, False, g)
        t2 = time.perf_counter()
        assert x.shape == y.shape == (batch, 3, crop, crop)
        if r >= 2:
            times["before"].append(t1 - t0)
            times["after"].append(t2 - t1)
    before, after = statistics.median(times["before"]), statistics.median(times["after"])
    return {
        "change": "train.training_batch: crop the texture windows straight from the training tensor, then augment",
        "where": "trustmae_lib/train.py (training_batch)",
        "applied": True,
        "must_be_identical": False,
        "shape": [batch, 3, size, size],
        "before_ms": round(before * 1e3, 3),
        "after_ms": round(after * 1e3, 3),
        "speedup": round(before / after, 3),
        "identical_output": False,
        "runs_before_s": [round(t, 6) for t in times["before"]],
        "runs_after_s": [round(t, 6) for t in times["after"]],
    }


class BatchPrefetcher:
    """The rejected alternative: ``get(s)`` returns step ``s``'s batch and starts drawing ``s + 1``'s on a helper
    thread (``helper_threads`` torch threads there; ``None`` = torch's default) while the caller trains."""

    def __init__(self, draw, last_step: int, helper_threads: int | None = 1):
        from concurrent.futures import ThreadPoolExecutor

        init = (torch.set_num_threads, (helper_threads,)) if helper_threads else (None, ())
        self.draw, self.last_step, self.pending = draw, last_step, None
        self.pool = ThreadPoolExecutor(1, initializer=init[0], initargs=init[1])

    def get(self, step: int) -> torch.Tensor:
        pending, self.pending = self.pending, None
        x = pending[1].result() if pending is not None and pending[0] == step else self.draw(step)
        if step + 1 < self.last_step:
            self.pending = (step + 1, self.pool.submit(self.draw, step + 1))
        return x

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def measure_prefetch(method: str, category: str, steps: int, helper_threads: int | None) -> dict:
    """The same ``steps`` training steps drawn in the loop (before) and ahead on a helper thread (after)."""
    from bench_train import StepBench

    from trustmae_lib.config import load_profile

    profile = load_profile("cpu")
    cpu = torch.device("cpu")
    waits, walls, weights = {}, {}, {}
    for name in ("before", "after"):
        bench = StepBench(method, profile, cpu, category=category, seed=0)
        ahead = BatchPrefetcher(bench.data, steps, helper_threads) if name == "after" else None
        wait, wall = [], []
        for step in range(steps):
            common.sync(cpu)
            t0 = time.perf_counter()
            x = ahead.get(step) if ahead is not None else bench.data(step)
            t1 = time.perf_counter()
            bench.method.step(x, step + 1)
            if step >= 2:  # warm-up
                wait.append(t1 - t0)
                wall.append(time.perf_counter() - t0)
        if ahead is not None:
            ahead.close()
        waits[name], walls[name] = statistics.median(wait), statistics.median(wall)
        weights[name] = {k: v.clone() for k, v in bench.models["model"].state_dict().items()}
    identical = all(torch.equal(weights["before"][k], weights["after"][k]) for k in weights["before"])
    return {
        "change": "draw the next batch on a helper thread while the step trains (tried, not applied)",
        "where": "benchmarks/bench_changes.py (BatchPrefetcher); the library draws in the loop",
        "applied": False,
        "helper_threads": helper_threads or torch.get_num_threads(),
        "method": method,
        "category": category,
        "steps": steps,
        "shape": [profile.batch_size, 3, profile.image_size, profile.image_size],
        "before_ms": round(waits["before"] * 1e3, 3),
        "after_ms": round(waits["after"] * 1e3, 3),
        "measures": "median wait for the batch per step (ms)",
        "wait_share_before": round(waits["before"] / walls["before"], 5),
        "wait_share_after": round(waits["after"] / walls["after"], 5),
        "step_wall_before_ms": round(walls["before"] * 1e3, 2),
        "step_wall_after_ms": round(walls["after"] * 1e3, 2),
        "speedup": round(walls["before"] / walls["after"], 3),
        "identical_output": bool(identical),
    }


def measure_shared_scoring(profile: str, repeats: int) -> dict:
    """Median seconds of the three TrustMAE scoring variants one at a time (before) and in one pass (after), on the
    test images of a one-step run, and whether every output is identical."""
    import tempfile

    from trustmae_lib.config import RunSpec
    from trustmae_lib.engine import evaluate, runs, train

    with tempfile.TemporaryDirectory() as tmp:
        spec = RunSpec(category="widget", method="trustmae", profile=profile, seed=0, steps=1, fast=True, reading="")
        trained = runs.load_trained(train.train(spec, tmp, progress=False))
        images, _ = evaluate._test_tensors(trained, trained.score_size)
        variants = evaluate.VARIANTS
        times = {"before": [], "after": []}
        identical = True
        for r in range(repeats + 1):  # one warm-up round
            t0 = time.perf_counter()
            before = {v: evaluate.score(trained, images, v) for v in variants}
            t1 = time.perf_counter()
            after = evaluate.score_variants(trained, images, variants)
            t2 = time.perf_counter()
            if r >= 1:
                times["before"].append(t1 - t0)
                times["after"].append(t2 - t1)
            identical &= all(torch.equal(a, b) for v in variants for a, b in zip(before[v], after[v], strict=True))
    before_s, after_s = statistics.median(times["before"]), statistics.median(times["after"])
    return {
        "change": "evaluate: one reconstruction and one backbone pass per batch for every scoring variant",
        "where": "trustmae_lib/engine/evaluate.py (score_variants)",
        "applied": True,
        "profile": profile,
        "variants": list(variants),
        "shape": list(images.shape),
        "before_ms": round(before_s * 1e3, 1),
        "after_ms": round(after_s * 1e3, 1),
        "speedup": round(before_s / after_s, 3),
        "identical_output": bool(identical),
        "runs_before_s": [round(t, 4) for t in times["before"]],
        "runs_after_s": [round(t, 4) for t in times["after"]],
    }


def backbone_before(backbone):
    """A copy of ``backbone`` as ``efficientnet_lite_pytorch`` ships it: every stride-1 convolution padded by
    ``F.pad`` on each call (``Conv2dDynamicSamePadding``), ReLU6 not in place. Shares the weights."""
    import copy

    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding
    from torch import nn

    from trustmae_lib.model.perceptual import _SamePaddedConv2d

    before = copy.deepcopy(backbone)
    for module in list(before.net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU6):
                child.inplace = False
            elif isinstance(child, _SamePaddedConv2d):
                conv = Conv2dDynamicSamePadding(child.in_channels, child.out_channels, child.kernel_size, 1, 1,
                                                child.groups, child.bias is not None)  # fmt: skip
                conv.weight, conv.bias = child.weight, child.bias
                setattr(module, name, conv)
    return before


def _interleaved(before, after, repeats: int, warmup: int = 2) -> tuple[float, float, bool]:
    """Median seconds of ``before()`` and ``after()`` run in turn (``warmup`` untimed rounds first), and whether every
    round gave bit-identical tensors (each returns a sequence of tensors)."""
    times = {"before": [], "after": []}
    identical = True
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        out_b = before()
        t1 = time.perf_counter()
        out_a = after()
        t2 = time.perf_counter()
        if i >= warmup:
            times["before"].append(t1 - t0)
            times["after"].append(t2 - t1)
        identical &= all(torch.equal(a, b) for a, b in zip(out_a, out_b, strict=True))
    return statistics.median(times["before"]), statistics.median(times["after"]), bool(identical)


def _backbone_passes(backbone, x, r):
    """The step's two passes: the input without gradient, the reconstruction with its input gradient."""
    with torch.no_grad():
        fx = backbone(x)
    r = r.detach().requires_grad_(True)
    fr = backbone(r)
    sum(((a - b) ** 2).mean() for a, b in zip(fx, fr, strict=True)).backward()
    return fx, fr, r.grad


def measure_backbone(fast: bool, batch: int, size: int, repeats: int) -> dict:
    """The perceptual backbone's two training passes with the dynamic padding (before) and the static one (after)."""
    from trustmae_lib.model.perceptual import build_backbone

    after = build_backbone("efficientnet_lite0", fold_bn=fast)
    before = backbone_before(after)
    fmt = torch.channels_last if fast else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).contiguous(memory_format=fmt)
    r = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).contiguous(memory_format=fmt)

    def flat(out):
        return [*out[0], *out[1], out[2]]

    before_s, after_s, identical = _interleaved(
        lambda: flat(_backbone_passes(before, x, r)), lambda: flat(_backbone_passes(after, x, r)), repeats
    )
    return {
        "change": "perceptual backbone: static padding for stride-1 convolutions, ReLU6 in place"
        + (" (speed path: folded BatchNorm, channels-last)" if fast else " (default layout)"),
        "where": "trustmae_lib/model/perceptual.py (_pad_statically)",
        "applied": True,
        "replaced_convolutions": int(after.static_padded),
        "shape": [batch, 3, size, size],
        "before_ms": round(before_s * 1e3, 2),
        "after_ms": round(after_s * 1e3, 2),
        "speedup": round(before_s / after_s, 3),
        "identical_output": bool(identical),
    }


def ssim_before(x, y, window_size: int = 11, sigma: float = 1.5, c1: float = 0.01**2, c2: float = 0.03**2):
    """``losses.ssim`` (valid, mean) before the change: the five statistics filtered as one stack."""
    import torch.nn.functional as Fn

    from trustmae_lib.model.losses import gaussian_window

    c = x.shape[1]
    x, y = (x + 1.0) / 2.0, (y + 1.0) / 2.0
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    g = gaussian_window(window_size, sigma, dtype=x.dtype, device=x.device)
    n = stack.shape[1]
    stack = Fn.conv2d(stack, g.view(1, 1, -1, 1).expand(n, 1, -1, 1), groups=n)
    stack = Fn.conv2d(stack, g.view(1, 1, 1, -1).expand(n, 1, 1, -1), groups=n)
    mu_x, mu_y, e_xx, e_yy, e_xy = stack.split(c, dim=1)
    var_x = e_xx - mu_x**2
    var_y = e_yy - mu_y**2
    cov_xy = e_xy - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return (num / den).mean()


def measure_ssim(channels_last: bool, batch: int, size: int, repeats: int) -> dict:
    """``L_sm`` and its backward into the reconstruction, one stack of five (before) and two stacks (after)."""
    from trustmae_lib.model.losses import ssim

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).contiguous(memory_format=fmt)
    y0 = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).contiguous(memory_format=fmt)

    def run(fn):
        y = y0.clone().requires_grad_(True)
        loss = 1.0 - fn(x, y)
        loss.backward()
        return loss.detach(), y.grad

    before_s, after_s, identical = _interleaved(lambda: run(ssim_before), lambda: run(ssim), repeats)
    return {
        "change": "SSIM (L_sm): the input's statistics and the reconstruction's filtered as two stacks"
        + (" (channels-last)" if channels_last else " (default layout)"),
        "where": "trustmae_lib/model/losses.py (ssim)",
        "applied": True,
        "shape": [batch, 3, size, size],
        "before_ms": round(before_s * 1e3, 2),
        "after_ms": round(after_s * 1e3, 2),
        "speedup": round(before_s / after_s, 3),
        "identical_output": bool(identical),
    }


def measure_step(profile_name: str, fast: bool, steps: int) -> dict:
    """Changes 5 and 6 together in the whole TrustMAE training step: two copies built from the same seed, the
    *before* one with the shipped backbone and the one-stack SSIM, stepped interleaved on the same batches."""
    from unittest import mock

    from bench_train import StepBench

    from trustmae_lib.config import load_profile
    from trustmae_lib.model import losses

    profile = load_profile(profile_name)
    device = torch.device("cpu")
    before = StepBench("trustmae", profile, device, category="widget", seed=0, fast=fast)
    after = StepBench("trustmae", profile, device, category="widget", seed=0, fast=fast)
    before.method.backbone = backbone_before(before.method.backbone)

    def old_ssim(x, y, **kw):
        return ssim_before(x, y)

    times = {"before": [], "after": []}
    warmup = 2
    for i in range(steps + warmup):
        with mock.patch.object(losses, "ssim", old_ssim):
            _, tb = before.step(i)
        _, ta = after.step(i)
        if i >= warmup:
            times["before"].append(tb)
            times["after"].append(ta)
    identical = all(
        torch.equal(pa, pb)
        for key in after.models
        for pa, pb in zip(after.models[key].parameters(), before.models[key].parameters(), strict=True)
    )
    before_s, after_s = statistics.median(times["before"]), statistics.median(times["after"])
    return {
        "change": "whole TrustMAE step with changes 5 and 6"
        + (" (speed path, RunSpec.fast)" if fast else " (library default)"),
        "where": "benchmarks/bench_train.py StepBench",
        "applied": True,
        "profile": profile_name,
        "steps": steps + warmup,
        "shape": [profile.batch_size, 3, before.size, before.size],
        "before_ms": round(before_s * 1e3, 1),
        "after_ms": round(after_s * 1e3, 1),
        "speedup": round(before_s / after_s, 3),
        "identical_output": bool(identical),
    }


def parse_args(argv=None):
    p = common.base_parser(__doc__.splitlines()[0], "results/bench/changes.json")
    p.set_defaults(repeats=15)
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--texture", type=int, nargs=2, default=[512, 128], metavar=("SIZE", "CROP"))
    p.add_argument("--prefetch-steps", type=int, default=40, help="training steps per prefetch run (0: skip)")
    p.add_argument("--scoring-profile", default="cpu", help="profile of the run whose scoring is timed ('': skip)")
    p.add_argument("--scoring-repeats", type=int, default=5, help="rounds of the scoring measurement")
    p.add_argument("--step-profile", default="cpu", help="profile of the whole-step measurement ('': skip)")
    p.add_argument("--step-steps", type=int, default=12, help="timed training steps per arm of the whole step")
    p.add_argument("--perceptual-size", type=int, default=128, help="image side of the backbone and SSIM timings")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = common.setup_run(args)
    if device.type != "cpu":
        raise SystemExit("bench_changes.py measures the CPU data path; run it with --device cpu")
    machine = common.machine_info(device)
    common.log(f"bench_changes: {machine['cpu']} | threads {machine['torch_threads']}")
    rows = []
    common.wait_idle(args.wait_idle)
    for size in args.sizes:
        row = measure_augment(size, args.batch, args.repeats)
        rows.append(row)
        common.log(
            f"  augment {row['shape']}: {row['before_ms']:.2f} -> {row['after_ms']:.2f} ms "
            f"({row['speedup']:.2f}x), identical {row['identical_output']}"
        )
    row = measure_crop_first(args.texture[0], args.texture[1], args.batch, args.repeats)
    rows.append(row)
    common.log(
        f"  crop before augment {row['shape']}: {row['before_ms']:.2f} -> {row['after_ms']:.2f} ms "
        f"({row['speedup']:.2f}x)"
    )
    if args.prefetch_steps:
        for (method, category), helper in itertools.product(
            (("ae_l2", "brick"), ("ae_ssim", "brick"), ("memae", "brick")), (None, 1)
        ):
            row = measure_prefetch(method, category, args.prefetch_steps, helper)
            rows.append(row)
            common.log(
                f"  prefetch ({row['helper_threads']} helper threads) {method} {category}: "
                f"wait {row['before_ms']:.2f} -> {row['after_ms']:.2f} ms "
                f"({row['wait_share_before']:.1%} -> {row['wait_share_after']:.1%} of a step), step "
                f"{row['step_wall_before_ms']:.1f} -> {row['step_wall_after_ms']:.1f} ms, identical "
                f"{row['identical_output']}"
            )
    if args.scoring_profile:
        row = measure_shared_scoring(args.scoring_profile, args.scoring_repeats)
        rows.append(row)
        common.log(
            f"  scoring {row['variants']} on {row['shape']}: {row['before_ms']:.0f} -> {row['after_ms']:.0f} ms "
            f"({row['speedup']:.2f}x), identical {row['identical_output']}"
        )
    for fast in (False, True):
        row = measure_backbone(fast, args.batch, args.perceptual_size, args.repeats)
        rows.append(row)
        common.log(f"  {row['change']}: {row['before_ms']:.1f} -> {row['after_ms']:.1f} ms "
                   f"({row['speedup']:.2f}x), identical {row['identical_output']}")  # fmt: skip
    for channels_last in (False, True):
        row = measure_ssim(channels_last, args.batch, args.perceptual_size, args.repeats)
        rows.append(row)
        common.log(f"  {row['change']}: {row['before_ms']:.1f} -> {row['after_ms']:.1f} ms "
                   f"({row['speedup']:.2f}x), identical {row['identical_output']}")  # fmt: skip
    if args.step_profile:
        for fast in (False, True):
            row = measure_step(args.step_profile, fast, args.step_steps)
            rows.append(row)
            common.log(f"  {row['change']}: {row['before_ms']:.0f} -> {row['after_ms']:.0f} ms "
                       f"({row['speedup']:.2f}x), identical weights {row['identical_output']}")  # fmt: skip
    path = common.write_result(args.out, "changes", machine, {"args": vars(args), "results": rows})
    common.log(f"  wrote {path}")
    return 0 if all(r["identical_output"] for r in rows if r["applied"] and r.get("must_be_identical", True)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
