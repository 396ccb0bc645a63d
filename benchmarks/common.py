"""Shared helpers of the performance scripts (engineering; not part of the paper).

Every benchmark script measures, in its own process and with its own thread count, the *limit* it compares
against (dense matrix-multiply throughput, :func:`matmul_limit`), times the work as a median over repeated runs
after warm-up (:func:`time_runs`), counts FLOPs with :class:`torch.utils.flop_counter.FlopCounterMode`
(:func:`count_flops`) and writes one JSON file with a :func:`machine_info` header (machine, threads, versions,
load average) atomically (:func:`write_result`).

The scripts are run as ``python benchmarks/<script>.py`` (``make bench``); they import this file as ``common``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from trustmae_lib import __version__  # noqa: E402
from trustmae_lib.errors import TrustMAEError  # noqa: E402
from trustmae_lib.io import write_json  # noqa: E402
from trustmae_lib.utils import cpu_model, native_bf16  # noqa: E402

SCHEMA_VERSION = 1

#: Dense bf16 tensor-core peak (TFLOP/s, no sparsity) of common GPUs, from the vendors' data sheets. Used for
#: model FLOP utilisation (MFU) on a GPU; ``--peak-tflops`` overrides it. Matched as a substring of the name.
GPU_BF16_PEAK_TFLOPS = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 756.0,
    "GH200": 989.4,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.1,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.2,
    "RTX 3090": 71.0,
    "RTX A6000": 154.8,
}


# --------------------------------------------------------------------------------------------------------------
# Machine and arguments
# --------------------------------------------------------------------------------------------------------------


def load_average() -> list[float] | None:
    """``os.getloadavg()`` (1, 5, 15 min), rounded; ``None`` where the OS has none."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info(device: torch.device) -> dict:
    """Who measured: machine, threads, versions, load average, time (the header of every result file)."""
    import numpy
    import torchvision

    info = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "numpy": numpy.__version__,
        "trustmae_lib": __version__,
        "platform": platform.platform(),
        "load_average": load_average(),
        "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return info


def base_parser(description: str, out: str) -> argparse.ArgumentParser:
    """Arguments every script shares: output, repeats, warm-up, threads, device, matmul size."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=out, help=f"result JSON (default {out})")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = PyTorch's default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--matmul-size", type=int, default=0, help="side of the limit matmul (0 = 2048 CPU, 8192 GPU)")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=60.0,
        help="before each measurement wait up to this many seconds for other programs to leave the CPUs",
    )
    return p


def setup_run(args) -> torch.device:
    """Apply ``--threads`` and check ``--device``; returns the device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrustMAEError("--device cuda but no CUDA device is visible; run with --device cpu")
    if args.repeats < 1 or args.warmup < 0:
        raise TrustMAEError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    return device


# --------------------------------------------------------------------------------------------------------------
# Timing, FLOPs, memory
# --------------------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls (device synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


class CpuMeter:
    """CPU time this process got during a section, as a fraction of ``wall time x torch threads``.

    Idle OpenMP workers spin rather than sleep, so on free cores a compute-bound section gets close to 1; a
    clearly lower value means other programs took the cores (the timing is then inflated).
    """

    def __enter__(self) -> CpuMeter:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.wall0
        cpu = time.process_time() - self.cpu0
        self.utilisation = round(cpu / max(wall * torch.get_num_threads(), 1e-9), 3)


def busy_fraction(interval: float = 1.0) -> float | None:
    """Fraction of all CPUs busy over ``interval`` seconds (``/proc/stat``), measured while this process sleeps."""

    def read():
        fields = [float(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
        return sum(fields), idle

    try:
        t0, i0 = read()
        time.sleep(interval)
        t1, i1 = read()
    except (OSError, ValueError, IndexError):
        return None
    return round(1.0 - (i1 - i0) / max(t1 - t0, 1e-9), 3)


def wait_idle(max_wait: float, threshold: float = 0.15) -> dict:
    """Wait (up to ``max_wait`` s) until other programs use less than ``threshold`` of the CPUs.

    Returns ``{"busy_before", "waited_s"}`` -- recorded with each measurement.
    """
    if max_wait <= 0:
        return {"busy_before": None, "waited_s": 0.0}
    start = time.perf_counter()
    busy = busy_fraction()
    while busy is not None and busy > threshold and time.perf_counter() - start < max_wait:
        time.sleep(5.0)
        busy = busy_fraction()
    return {"busy_before": busy, "waited_s": round(time.perf_counter() - start, 1)}


def summary(times: list[float]) -> dict:
    """Median, min and max (seconds) and every run."""
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "runs_s": [round(t, 6) for t in times],
    }


class _FlopCounter(TorchDispatchMode):
    """``FlopCounterMode``'s per-operator formulas without its module tracker (which fails in inference mode)."""

    def __init__(self):
        super().__init__()
        self.registry = FlopCounterMode(display=False).flop_registry
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        formula = self.registry.get(func._overloadpacket)
        if formula is None:
            # Inference mode skips the autograd decompositions (aten.conv2d -> aten.convolution): decompose here.
            with self:
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (matmuls and convolutions, forward and backward).

    Uses the operator formulas of :class:`torch.utils.flop_counter.FlopCounterMode` (the same numbers it
    reports) in a plain dispatch mode, so that it also works inside ``torch.inference_mode``.
    """
    with _FlopCounter() as counter:
        fn()
    return counter.total


def matmul_limit(device: torch.device, dtype: torch.dtype, size: int = 0, repeats: int = 10) -> dict:
    """Dense ``size x size`` matmul throughput in this process (the limit the workloads are compared with).

    Returns:
        ``{"dtype", "size", "gflops" (median), "gflops_best", "threads"}``.
    """
    size = size or (8192 if device.type == "cuda" else 2048)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device, dtype)
    b = torch.randn(size, size, generator=gen).to(device, dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    times = time_runs(lambda: torch.mm(a, b, out=out), device, warmup=2, repeats=repeats)
    flops = 2.0 * size**3
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "size": size,
        "gflops": flops / statistics.median(times) / 1e9,
        "gflops_best": flops / min(times) / 1e9,
        "threads": torch.get_num_threads(),
    }


def limits(device: torch.device, size: int = 0) -> dict:
    """float32 and bf16 matmul limits (measured); on a GPU also the data-sheet dense bf16 peak."""
    out = {"float32": matmul_limit(device, torch.float32, size), "bfloat16": matmul_limit(device, torch.bfloat16, size)}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in GPU_BF16_PEAK_TFLOPS.items() if k in name), None)
        out["bf16_peak_tflops_datasheet"] = peak
    return out


class PeakMemory:
    """Peak memory of a section: resident set size (CPU) or allocated device memory (CUDA).

    On Linux the kernel's high-water mark ``VmHWM`` is reset by writing ``5`` to ``/proc/self/clear_refs``, so
    every section gets its own peak of the whole process (Python, libraries, models, data, activations). Where
    that is impossible the process-wide ``ru_maxrss`` is reported and ``"scope"`` says so.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.scope = "section"

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.scope = "process"
        self.start_mib = self.current_mib()
        return self

    def __exit__(self, *exc) -> None:
        self.peak = self.peak_mib()

    def current_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        return _proc_status_kib("VmRSS") / 1024

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.scope == "section":
            return _proc_status_kib("VmHWM") / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def result(self) -> dict:
        kind = "cuda_max_allocated" if self.device.type == "cuda" else "rss"
        return {
            "peak_mib": round(self.peak, 1),
            "start_mib": round(self.start_mib, 1),
            "kind": kind,
            "scope": self.scope,
        }


def _proc_status_kib(key: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


@contextlib.contextmanager
def patched_backbone(pretrained_vgg: bool):
    """Build ``vgg19`` with random weights while active unless its ImageNet file is in the hub cache.

    The VGG-19 checkpoint is not available offline; its weights do not change the time or FLOPs of a step.
    Yields a dict that receives ``"weights"`` (what was used).
    """
    import trustmae_lib.model.perceptual as perceptual

    original = perceptual.build_backbone
    used: dict = {}

    def build(name, pretrained=True, after_relu=True, fold_bn=False):
        if name == "vgg19" and pretrained and not pretrained_vgg:
            pretrained = False
        backbone = original(name, pretrained=pretrained, after_relu=after_relu, fold_bn=fold_bn)
        used["weights"] = backbone.weights_source
        return backbone

    perceptual.build_backbone = build
    try:
        yield used
    finally:
        perceptual.build_backbone = original


def vgg19_available() -> bool:
    from trustmae_lib.model.perceptual import vgg19_cache_path

    return os.path.isfile(vgg19_cache_path())


def portable(value):
    """An argument as it may be committed: absolute paths inside the repository made relative, others reduced to
    their file name (a result file names no folder of the machine that wrote it)."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        path = Path(value).resolve()
        return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else path.name
    return value


def write_result(path: str | Path, kind: str, machine: dict, payload: dict) -> Path:
    """Write ``{"schema", "kind", "machine", **payload}`` atomically; the load average is taken again at the end.

    Arguments (``payload["args"]``) are written through :func:`portable`: no machine path reaches the file.
    """
    payload = {**payload, "args": portable(payload["args"])} if "args" in payload else payload
    machine = dict(machine)
    machine["load_average_end"] = load_average()
    machine["finished_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"schema": SCHEMA_VERSION, "kind": kind, "machine": machine, **payload})
    return path


def log(*parts) -> None:
    print(*parts, flush=True)


def finish(out, kind: str, machine: dict, limits: dict, reference: float, args, rows: list[dict]) -> int:
    """Write a timing benchmark's result file and return its exit status (1 when any row holds an error)."""
    payload = {"limits": limits, "reference_limit_gflops": reference, "args": vars(args), "results": rows}
    log(f"  wrote {write_result(out, kind, machine, payload)}")
    return 0 if not any("error" in r for r in rows) else 1


def start(args, name: str):
    """The common start of a timing benchmark: device and threads, machine info, wait for an idle machine, the
    matmul limits. Returns ``(device, amp dtype or None, machine, limits, reference GFLOP/s, bf16 datasheet peak)``.
    """
    import torch

    device = setup_run(args)
    amp = torch.bfloat16 if args.amp == "bf16" else None
    machine = machine_info(device)
    log(f"{name}: {machine['cpu']} | {machine['gpu'] or 'no GPU'} | threads {machine['torch_threads']}")
    wait_idle(args.wait_idle)
    lim = limits(device, args.matmul_size)
    shown = [f"{k} {v['gflops']:.1f} GFLOP/s" for k, v in lim.items() if isinstance(v, dict)]
    log(f"  matmul limit: {', '.join(shown)}")
    ref = lim["bfloat16" if amp is not None else "float32"]["gflops"]
    return device, amp, machine, lim, ref, lim.get("bf16_peak_tflops_datasheet")
