"""Where a TrustMAE training step spends its time: the PyTorch profiler over one step, by operator and by layer.

The step is the one :mod:`bench_train` times (:meth:`trustmae_lib.engine.methods.TrustMAEMethod.step`, built like
:func:`trustmae_lib.engine.train.fit` builds it). One profiled step after warm-up gives:

* **categories** -- the self time of every operator, grouped into convolution forward / backward, matrix
  multiply, normalisation, element-wise work, the Adam updates (everything inside ``Optimizer.step``) and
  framework overhead (autograd bookkeeping, Python);
* **parts** and **layers** -- forward time from ``record_function`` ranges opened by forward hooks on the
  networks' parts (encoder, memory, trust region, decoder, discriminator, perceptual backbone) and on every
  convolution, and backward time from the autograd nodes those forward operators created (matched by the
  profiler's sequence numbers); FLOPs of each layer from ``FlopCounterMode``'s per-module counts.

Usage::

    python benchmarks/profile_step.py                      # cpu and paper profiles
    python benchmarks/profile_step.py --profiles smoke --warmup 1 --out /tmp/profile.json
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

from torch import nn
from torch.profiler import ProfilerActivity, record_function
from torch.profiler import profile as torch_profile
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from bench_train import StepBench  # noqa: E402

from trustmae_lib.config import load_profile  # noqa: E402

LEAF_TYPES = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
PART_PREFIX, LAYER_PREFIX = "part::", "layer::"
BACKWARD_PREFIX = "autograd::engine::evaluate_function: "


def category(name: str, in_optimizer: bool) -> str:
    """Category of an operator's self time."""
    if in_optimizer:
        return "optimizer (Adam)"
    n = name.lower()
    if "conv" in n and n.startswith("aten::"):  # mkldnn_convolution, _slow_conv2d_forward, ..._backward
        return "conv backward" if "backward" in n else "conv forward"
    if n in ("aten::mm", "aten::bmm", "aten::addmm", "aten::matmul", "aten::linear", "aten::_cdist_forward"):
        return "matmul"
    if "batch_norm" in n or "instance_norm" in n:
        return "normalisation"
    if n.startswith("aten::"):
        return "element-wise and other ops"
    return "framework overhead"


class Ranges:
    """Forward hooks that open a profiler range per part and per convolution (and remove themselves)."""

    def __init__(self):
        self.handles = []
        self.open: dict[str, list] = defaultdict(list)

    def add(self, label: str, module: nn.Module) -> None:
        def pre(_m, _inputs, label=label):
            rf = record_function(label)
            rf.__enter__()
            self.open[label].append(rf)

        def post(_m, _inputs, _output, label=label):
            self.open[label].pop().__exit__(None, None, None)

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def networks(bench: StepBench) -> dict[str, nn.Module]:
    nets = {"generator": bench.models["model"]}
    if "discriminator" in bench.models:
        nets["discriminator"] = bench.models["discriminator"]
    if hasattr(bench.method, "backbone"):
        nets["backbone"] = bench.method.backbone
    return nets


def parts_of(nets: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Coarse parts: the generator's encoder / memory / trust region / decoder, D, the backbone."""
    gen = nets["generator"]
    parts = {}
    for name in ("encoder", "memory", "trust", "decoder"):
        sub = getattr(gen, name, None)
        if isinstance(sub, nn.Module):
            parts[name] = sub
    if not parts:
        parts["generator"] = gen
    for name in ("discriminator", "backbone"):
        if name in nets:
            parts[name] = nets[name]
    return parts


def leaf_layers(nets: dict[str, nn.Module]) -> dict[str, tuple[str, nn.Module]]:
    """``{FlopCounterMode-style name: (network, module)}`` of every convolution / linear layer."""
    out = {}
    for net_name, net in nets.items():
        root = type(net).__name__
        for path, mod in net.named_modules():
            if isinstance(mod, LEAF_TYPES):
                out[f"{root}.{path}"] = (net_name, mod)
    return out


def layer_flops(bench: StepBench, step: int) -> dict[str, int]:
    """FLOPs per module name (forward + backward) of one step, from ``FlopCounterMode``."""
    with FlopCounterMode(display=False, depth=None) as counter:
        bench.once(step)
    return {k: int(sum(v.values())) for k, v in counter.get_flop_counts().items()}


def ancestors(event):
    e = event.cpu_parent
    while e is not None:
        yield e
        e = e.cpu_parent


def analyse(events, layer_names: set[str], part_names: set[str]) -> dict:
    """Attribute self time to categories, forward/backward time to parts and layers."""
    cats: dict[str, float] = defaultdict(float)
    ops: dict[str, list] = defaultdict(lambda: [0.0, 0])
    seq_layer, seq_part = {}, {}
    fwd = {"layer": defaultdict(float), "part": defaultdict(float)}
    bwd = {"layer": defaultdict(float), "part": defaultdict(float)}
    main_events = [e for e in events if e.device_type.name == "CPU"]
    for e in main_events:
        chain = list(ancestors(e))
        in_opt = e.name.startswith("Optimizer.step") or any(a.name.startswith("Optimizer.step") for a in chain)
        if not e.name.startswith((PART_PREFIX, LAYER_PREFIX)) and not e.name.startswith("Optimizer.step"):
            cats[category(e.name, in_opt)] += e.self_cpu_time_total
            if e.name.startswith("aten::"):
                ops[e.name][0] += e.self_cpu_time_total
                ops[e.name][1] += 1
        if e.name.startswith(LAYER_PREFIX):
            fwd["layer"][e.name[len(LAYER_PREFIX) :]] += e.cpu_time_total
        elif e.name.startswith(PART_PREFIX):
            fwd["part"][e.name[len(PART_PREFIX) :]] += e.cpu_time_total
        if e.sequence_nr >= 0 and not e.name.startswith(BACKWARD_PREFIX):
            layer = next((a.name for a in chain if a.name.startswith(LAYER_PREFIX)), None)
            part = next((a.name for a in chain if a.name.startswith(PART_PREFIX)), None)
            if layer:
                seq_layer.setdefault(e.sequence_nr, layer[len(LAYER_PREFIX) :])
            if part:
                seq_part.setdefault(e.sequence_nr, part[len(PART_PREFIX) :])
    for e in main_events:
        if e.name.startswith(BACKWARD_PREFIX) and e.sequence_nr >= 0:
            if e.sequence_nr in seq_layer:
                bwd["layer"][seq_layer[e.sequence_nr]] += e.cpu_time_total
            if e.sequence_nr in seq_part:
                bwd["part"][seq_part[e.sequence_nr]] += e.cpu_time_total
    return {"categories": cats, "ops": ops, "fwd": fwd, "bwd": bwd}


def profile_one(
    profile,
    layout: str,
    device,
    warmup: int,
    wait_idle: float = 0.0,
    fast: bool | None = False,
    reading: str | None = "",
    fixed_orientation: bool = False,
) -> dict:
    """One profiled TrustMAE step of ``profile`` in ``layout`` (``fast``: the library's speed path, channels-last
    with the backbone's BatchNorm folded; ``reading`` and ``fixed_orientation`` as for :class:`StepBench`)."""
    bench = StepBench("trustmae", profile, device, channels_last=layout == "channels_last", fast=fast,
                      reading=reading, fixed_orientation=fixed_orientation)  # fmt: skip
    fast = bench.spec.fast
    layout = "channels_last" if fast else layout
    nets = networks(bench)
    layers = leaf_layers(nets)
    parts = parts_of(nets)
    flops = layer_flops(bench, 0)
    for i in range(warmup):
        bench.step(i + 1)
    idle = common.wait_idle(wait_idle)
    t0 = time.perf_counter()
    bench.step(warmup + 1)
    plain_ms = (time.perf_counter() - t0) * 1e3
    ranges = Ranges()
    for name, (_net, mod) in layers.items():
        ranges.add(LAYER_PREFIX + name, mod)
    for name, mod in parts.items():
        ranges.add(PART_PREFIX + name, mod)
    activities = [ProfilerActivity.CPU]
    try:
        with torch_profile(activities=activities) as prof:
            t0 = time.perf_counter()
            bench.step(warmup + 2)
            profiled_ms = (time.perf_counter() - t0) * 1e3
    finally:
        ranges.remove()
    res = analyse(prof.events(), set(layers), set(parts))
    total_us = sum(res["categories"].values())
    categories = sorted(
        (
            {"category": k, "ms": round(v / 1e3, 3), "share": round(v / total_us, 4)}
            for k, v in res["categories"].items()
        ),
        key=lambda r: -r["ms"],
    )
    top_ops = sorted(
        ({"op": k, "self_ms": round(v[0] / 1e3, 3), "calls": v[1]} for k, v in res["ops"].items()),
        key=lambda r: -r["self_ms"],
    )[:25]
    part_rows = []
    for name, mod in parts.items():
        root = type(nets["generator"]).__name__ + "." + name if name not in nets else type(mod).__name__
        gflop = sum(v for k, v in flops.items() if k in layers and (k == root or k.startswith(root + ".")))
        if name == "memory":
            gflop = flops.get(root, 0)
        f, b = res["fwd"]["part"].get(name, 0.0), res["bwd"]["part"].get(name, 0.0)
        part_rows.append(
            {
                "part": name,
                "fwd_ms": round(f / 1e3, 3),
                "bwd_ms": round(b / 1e3, 3),
                "gflop": round(gflop / 1e9, 4),
                "gflops": round(gflop / ((f + b) / 1e6) / 1e9, 2) if f + b > 0 else None,
            }
        )
    layer_rows = []
    for name, (net, mod) in layers.items():
        f, b = res["fwd"]["layer"].get(name, 0.0), res["bwd"]["layer"].get(name, 0.0)
        gflop = flops.get(name, 0) / 1e9
        if f == 0 and b == 0 and gflop == 0:
            continue  # not used by the step (e.g. EfficientNet's classifier head)
        weight = getattr(mod, "weight", None)
        layer_rows.append(
            {
                "layer": name,
                "network": net,
                "kind": type(mod).__name__,
                "weight_shape": list(weight.shape) if weight is not None else None,
                "fwd_ms": round(f / 1e3, 3),
                "bwd_ms": round(b / 1e3, 3),
                "ms": round((f + b) / 1e3, 3),
                "gflop": round(gflop, 4),
                "gflops": round(gflop / ((f + b) / 1e6), 2) if f + b > 0 else None,
            }
        )
    layer_rows.sort(key=lambda r: -r["ms"])
    return {
        "profile": profile.name,
        "method": "trustmae",
        "layout": layout,
        "fast": fast,
        "batch": profile.batch_size,
        "image_size": profile.image_size,
        "width": profile.width,
        "backbone": profile.backbone,
        "step_ms_plain": round(plain_ms, 2),
        "step_ms_profiled": round(profiled_ms, 2),
        "op_time_ms": round(total_us / 1e3, 2),
        "step_gflop": round(flops.get("Global", 0) / 1e9, 3),
        **idle,
        "categories": categories,
        "top_ops": top_ops,
        "parts": part_rows,
        "layers": layer_rows,
    }


def parse_args(argv=None):
    p = common.base_parser(__doc__.splitlines()[0], "results/bench/profile.json")
    p.add_argument("--profiles", nargs="+", default=["cpu", "paper"])
    p.add_argument("--layout", default="nchw", choices=["nchw", "channels_last"])
    p.add_argument("--fast", action="store_true", help="the library's speed path (RunSpec.fast)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = common.setup_run(args)
    if device.type != "cpu":
        raise SystemExit("profile_step.py profiles the CPU; run it with --device cpu")
    machine = common.machine_info(device)
    common.log(f"profile_step: {machine['cpu']} | threads {machine['torch_threads']}")
    lim = common.limits(device, args.matmul_size)
    ref = lim["float32"]["gflops"]
    rows = []
    for name in args.profiles:
        row = profile_one(load_profile(name), args.layout, device, max(1, args.warmup), args.wait_idle, args.fast)
        rows.append(row)
        common.log(f"  {name}: step {row['step_ms_plain']:.0f} ms (profiled {row['step_ms_profiled']:.0f} ms)")
        for c in row["categories"]:
            common.log(f"    {c['category']:28s} {c['ms']:9.1f} ms  {c['share']:6.1%}")
        for layer in row["layers"][:5]:
            common.log(f"    {layer['layer']:50s} {layer['ms']:8.1f} ms  {layer['gflops'] or 0:7.1f} GFLOP/s")
    path = common.write_result(
        args.out,
        "profile",
        machine,
        {"limits": lim, "reference_limit_gflops": ref, "args": vars(args), "results": rows},
    )
    common.log(f"  wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
