"""Memory-module benchmark: time and memory of the addressing as the slots ``M`` and the locations ``N`` grow.

For every ``M`` in ``--slots`` and every ``N = B * h * w`` in ``--locations`` (``B = 8``, square ``h = w``) one
forward and backward pass of the memory layer as TrustMAE uses it: :class:`~trustmae_lib.model.memory.MemoryModule`
(cosine similarity, top-k addressing, read-out) with a trust mask (untrusted locations read the detached slots,
:func:`~trustmae_lib.model.trust_region.read_with_trust`) plus the entropy term, and separately the trust region
(:class:`~trustmae_lib.model.trust_region.TrustRegion`: nearest slot, radii from the distance history, ``L_trust``).

Reported per point: median ms (forward + backward), FLOPs (``FlopCounterMode``), MiB of tensors saved for the
backward pass (counted exactly with ``torch.autograd.graph.saved_tensors_hooks``, each storage once), and the
number of ATen operators dispatched -- the same for every ``N`` and ``M``, which shows there is no Python loop
over locations or slots.

Usage::

    python benchmarks/bench_memory.py
    python benchmarks/bench_memory.py --slots 16 32 --locations 32 128 --repeats 1 --out /tmp/memory.json
"""

from __future__ import annotations

import functools
import math
import statistics
import sys
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from trustmae_lib.model.memory import MemoryModule, entropy_loss  # noqa: E402
from trustmae_lib.model.trust_region import TrustRegion  # noqa: E402

BATCH = 8


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def saved_mib(fn) -> float:
    """MiB of distinct storages autograd saves for the backward pass during ``fn()`` (the graph is dropped)."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


def memory_pass(mem: MemoryModule, z: torch.Tensor, trusted: torch.Tensor):
    """Forward of the memory layer; returns the scalar whose backward is timed."""
    out = mem(z, trusted=trusted)
    return out.read.square().mean() + entropy_loss(out.weights)


def trust_pass(trust: TrustRegion, z: torch.Tensor, slots: torch.Tensor):
    loss, _stats = trust(z, slots)
    return loss


def measure_part(forward, z: torch.Tensor, mem: MemoryModule, device, args, ref: float) -> dict:
    """Time, FLOPs, saved-for-backward memory and operator count of ``forward().backward()``."""

    def run():
        forward().backward()
        z.grad = None
        mem.memory.grad = None

    counter = OpCounter()
    with counter:
        run()
    flops = common.count_flops(run)
    with common.CpuMeter() as meter:
        times = common.time_runs(run, device, args.warmup, args.repeats)
    med = statistics.median(times)
    return {
        "time": common.summary(times),
        "ms": round(med * 1e3, 3),
        "gflop": round(flops / 1e9, 4),
        "achieved_gflops": round(flops / med / 1e9, 2),
        "ratio_to_matmul": round(flops / med / 1e9 / ref, 4),
        "saved_mib": round(saved_mib(forward), 3),
        "aten_ops": counter.calls,
        "cpu_utilisation": meter.utilisation,
    }


def parse_args(argv=None):
    p = common.base_parser(__doc__.splitlines()[0], "results/bench/memory.json")
    p.add_argument("--slots", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096])
    p.add_argument("--locations", type=int, nargs="+", default=[128, 512, 2048, 8192])
    p.add_argument("--dim", type=int, default=512, help="feature channels C (512 = Table 1 at width 1)")
    p.add_argument("--topk", type=int, default=16, help="slots kept per location (paper profile: 16)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = common.setup_run(args)
    machine = common.machine_info(device)
    common.log(f"bench_memory: {machine['cpu']} | threads {machine['torch_threads']}")
    common.wait_idle(args.wait_idle)
    lim = common.limits(device, args.matmul_size)
    ref = lim["float32"]["gflops"]
    common.log(f"  matmul limit {ref:.1f} GFLOP/s")
    rows = []
    for n in args.locations:
        side = max(1, round(math.sqrt(n / BATCH)))
        gen = torch.Generator().manual_seed(0)
        z = torch.randn(BATCH, args.dim, side, side, generator=gen).to(device).requires_grad_(True)
        trusted = (torch.rand(BATCH, side, side, generator=gen) < 0.8).to(device)  # ~80 % inside delta1
        idle = common.wait_idle(args.wait_idle)
        for m in args.slots:
            row = {"slots": m, "locations": BATCH * side * side, "dim": args.dim, "topk": min(args.topk, m), **idle}
            try:
                torch.manual_seed(0)
                mem = MemoryModule(m, args.dim, topk=min(args.topk, m), temperature=0.1).to(device)
                trust = TrustRegion().to(device)
                fwd_memory = functools.partial(memory_pass, mem, z, trusted)
                fwd_trust = functools.partial(trust_pass, trust, z, mem.memory)
                row["memory"] = measure_part(fwd_memory, z, mem, device, args, ref)
                row["trust_region"] = measure_part(fwd_trust, z, mem, device, args, ref)
                row["nm_float32_mib"] = round(row["locations"] * m * 4 / 2**20, 3)  # one (N, M) float32 tensor
            except (RuntimeError, torch.OutOfMemoryError) as err:
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                traceback.print_exc()
            rows.append(row)
            if "error" in row:
                common.log(f"  N={row['locations']:6d} M={m:5d}  {row['error']}")
            else:
                common.log(
                    f"  N={row['locations']:6d} M={m:5d}  memory {row['memory']['ms']:8.2f} ms "
                    f"{row['memory']['saved_mib']:8.2f} MiB saved {row['memory']['aten_ops']:4d} ops | "
                    f"trust {row['trust_region']['ms']:8.2f} ms {row['trust_region']['aten_ops']:4d} ops"
                )
    path = common.write_result(
        args.out,
        "memory",
        machine,
        {"limits": lim, "reference_limit_gflops": ref, "args": vars(args), "batch": BATCH, "results": rows},
    )
    common.log(f"  wrote {path}")
    return 0 if not any("error" in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
