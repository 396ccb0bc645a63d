"""Checkpoints: atomic, ``weights_only``-loadable snapshots of a training run (engineering, not in the paper).

A checkpoint is a plain ``dict`` of tensors, numbers, strings, lists and dicts -- nothing that needs pickle's
arbitrary-object machinery -- so it is always read with ``torch.load(..., weights_only=True)``. A file that holds
a pickled Python object (or is truncated, or is not a checkpoint at all) is refused with a one-line
:class:`~trustmae_lib.errors.TrustMAEError` naming the file.

Writing goes through :func:`trustmae_lib.io.atomic_write` (temporary sibling + ``os.replace``): a kill during the
write leaves the previous checkpoint intact.

RNG states are stored as tensors: torch's CPU/CUDA generator states are ``uint8`` tensors already; Python's
``random`` state is a tuple of ints (allowed by ``weights_only``); NumPy's legacy state is converted to an
``int64`` tensor plus scalars.
"""

from __future__ import annotations

import io
import pickle
import random
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from trustmae_lib import __version__
from trustmae_lib.errors import TrustMAEError
from trustmae_lib.io import atomic_write

__all__ = ["CHECKPOINT_FORMAT", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]

#: Bumped when the layout of the checkpoint dict changes incompatibly.
CHECKPOINT_FORMAT = 1


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Atomically write ``state`` (plus format and library version) to ``path``.

    Args:
        path: destination file (its folder is created).
        state: a dict of tensors / primitives / nested dicts and lists (no custom objects).

    Returns:
        The path written.
    """
    payload = {"format": CHECKPOINT_FORMAT, "library_version": __version__, **state}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Raises:
        TrustMAEError: the file is missing, truncated/corrupt, holds a pickled object that ``weights_only``
            refuses, or has an unknown format.
    """
    path = Path(path)
    if not path.is_file():
        raise TrustMAEError(f"checkpoint {path} does not exist; train the run first (trustmae train ...)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch words it "Unsupported global: GLOBAL x.y" or, for blocked modules (os, subprocess, ...),
        # "Trying to load unsupported GLOBAL x.y whose module x is blocked".
        found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", str(exc))
        if found is None:
            raise TrustMAEError(
                f"checkpoint {path} is not a torch checkpoint or is corrupt; delete it and retrain"
            ) from None
        raise TrustMAEError(
            f"checkpoint {path} holds a pickled Python object ({found.group(1)}) that weights_only loading "
            "refuses; only load checkpoints written by trustmae_lib, or retrain the run"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as exc:
        raise TrustMAEError(
            f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}); delete it and retrain "
            "(or resume from an earlier copy)"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise TrustMAEError(
            f"checkpoint {path} has format {found!r}, expected {CHECKPOINT_FORMAT}; retrain the run with this "
            "version of trustmae_lib"
        )
    return payload


def rng_state() -> dict:
    """Every global RNG state as ``weights_only``-safe values (torch CPU + CUDA, NumPy, Python)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": _python_state_to_tensor(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only where CUDA is in use)."""
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            int(np_state["pos"]),
            int(np_state["has_gauss"]),
            float(np_state["cached_gaussian"]),
        )
    )
    random.setstate(_python_state_from_tensor(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu().to(torch.uint8) for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _python_state_to_tensor(state: tuple) -> dict:
    version, internal, gauss = state
    return {
        "version": int(version),
        "internal": torch.tensor(internal, dtype=torch.int64),
        "gauss": None if gauss is None else float(gauss),
    }


def _python_state_from_tensor(state: dict) -> tuple:
    return (int(state["version"]), tuple(int(v) for v in state["internal"].tolist()), state["gauss"])
