"""One setup call per chapter (d2l style): seeds, determinism, threads, figure style, device."""

from __future__ import annotations

import os
import platform
import random
from dataclasses import dataclass

import numpy as np
import torch

from . import __version__


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


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(device: str | None = None) -> torch.device:
    """``None``/"auto" -> CUDA if available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def describe_device(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


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
