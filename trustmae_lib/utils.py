"""One setup call per chapter (d2l style): seeds, determinism, threads, figure style, device; and :func:`glue`."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import random
from dataclasses import dataclass

import numpy as np
import torch

from trustmae_lib import __version__


@dataclass(frozen=True)
class RunContext:
    seed: int
    device: torch.device
    threads: int

    def summary(self) -> str:
        return (
            f"trustmae_lib {__version__} | torch {torch.__version__} | device {describe_device(self.device)} | "
            f"threads {self.threads} | seed {self.seed}"
        )


@contextlib.contextmanager
def torch_threads(threads: int):
    """Run the block with ``threads`` intra-op CPU threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


#: Messages of the allocators' ``RuntimeError`` when memory runs out (CPU on Linux / Windows, other backends).
_OOM_MESSAGES = ("can't allocate memory", "cannot allocate memory", "could not allocate", "not enough memory",
                 "out of memory")  # fmt: skip


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` means that memory ran out: ``torch.OutOfMemoryError`` (``torch.cuda.OutOfMemoryError`` is the
    same class), ``MemoryError``, or a ``RuntimeError`` whose message says an allocation failed (the CPU allocator's
    "DefaultCPUAllocator: can't allocate memory ...")."""
    if isinstance(exc, (torch.OutOfMemoryError, torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MESSAGES)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(device: str | torch.device | None = None, local_rank: int | None = None) -> torch.device:
    """The one device picker: ``None``/"auto" -> CUDA if available (GPU ``local_rank`` under DDP, else the current
    one), otherwise the CPU; anything else is taken as given."""
    if device not in (None, "auto"):
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device() if local_rank is None else local_rank)
    return torch.device("cpu")


def describe_device(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({cpu_model()}, {os.cpu_count()} cores)"


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return handle.read()
    except OSError:
        return ""


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (falls back to :func:`platform.processor`)."""
    for line in _cpuinfo().splitlines():
        if line.startswith(("model name", "Model", "Hardware")) and ":" in line:
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def native_bf16() -> bool:
    """Whether the CPU has bfloat16 arithmetic instructions (x86 AVX512-BF16 / AMX-BF16, Arm BF16)."""
    flags = set()
    for line in _cpuinfo().splitlines():
        if line.startswith(("flags", "Features")) and ":" in line:
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


#: The fields of :func:`platform_info` that decide the floating-point path of a CPU run. ``native_bf16`` is among
#: them because a generic model name ("Intel(R) Xeon(R) Processor") hides the CPU generation; a record that lacks it
#: (``None``, written before it was recorded) is never the same platform as one that has it.
PLATFORM_KEYS = ("cpu", "machine", "cpu_capability", "native_bf16", "torch", "threads")


def platform_info(device: torch.device | str = "cpu") -> dict:
    """Where a number was computed: CPU model, architecture, the ISA level torch dispatches to, bf16 support,
    torch build, thread count (and the GPU, if any). Two CPU runs give bit-identical results only when every
    :data:`PLATFORM_KEYS` field agrees (:func:`same_platform`); elsewhere they agree within the seed spread.
    """
    device = torch.device(device)
    return {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16(),
        "torch": str(torch.__version__),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def same_platform(a: dict | None, b: dict | None) -> bool:
    """Whether two :func:`platform_info` records name the same floating-point path (``False`` if one is unknown)."""
    if not a or not b:
        return False
    return all(a.get(k) == b.get(k) for k in PLATFORM_KEYS) and a.get("gpu") == b.get("gpu")


def setup(seed: int = 0, device: str | None = None, deterministic: bool = True, figures: bool = True) -> RunContext:
    """Seed everything, make CPU kernels deterministic, set the figure style, pick the device.

    Returns a :class:`RunContext`; print ``ctx.summary()`` for the one-line header of a chapter.
    """
    seed_everything(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    if figures:
        import matplotlib

        matplotlib.rcParams.update(
            {
                "figure.dpi": 100,
                "savefig.dpi": 120,
                "figure.figsize": (8, 3),
                "axes.grid": False,
                "image.interpolation": "nearest",
                "font.size": 9,
            }
        )
    return RunContext(seed=seed, device=pick_device(device), threads=torch.get_num_threads())


@functools.cache
def _myst_glue():
    """myst-nb's ``glue`` when myst-nb is installed (the book's ``[dev]`` extra), else ``None``."""
    try:
        from myst_nb import glue
    except ImportError:
        return None
    return glue


def glue(name: str, variable, display: bool = True) -> None:
    """Paste ``variable`` into the book under ``name``: myst-nb's ``glue`` where myst-nb is installed.

    Without myst-nb (a notebook run with only the wheel, e.g. in Colab) there is no book to paste into, so the value
    is only shown (``display=True``, through IPython where available) or dropped (``display=False``). myst-nb is a
    documentation builder (Sphinx, docutils, SQLAlchemy, ...), so it stays in the ``[dev]`` extra.
    """
    myst = _myst_glue()
    if myst is not None:
        return myst(name, variable, display)
    if not display:
        return None
    try:
        from IPython.display import display as show
    except ImportError:
        print(variable)
    else:
        show(variable)
    return None
