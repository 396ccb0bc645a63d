"""Run folders: their names, their files, and loading a finished run for scoring.

A run folder ``<out>/<run name>-<config hash>`` (:func:`run_dir_for`) holds ``manifest.json`` (the noisy split),
``log.csv`` (losses and diagnostics every ``log_every`` steps), ``checkpoint.pt`` (read with
``weights_only=True``, :mod:`trustmae_lib.engine.checkpoint`) and ``run.json`` (the run's record: spec, profile,
config hash, step, wall time, platform). :func:`load_trained` rebuilds the networks, checks the configuration and
the manifest, and returns a :class:`TrainedRun`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trustmae_lib.config import Profile, RunSpec, is_trustmae
from trustmae_lib.engine.checkpoint import load_checkpoint
from trustmae_lib.engine.methods import build_models
from trustmae_lib.engine.prepare import is_texture, train_size
from trustmae_lib.errors import TrustMAEError
from trustmae_lib.io import atomic_write, read_json
from trustmae_lib.utils import pick_device, seed_everything

CHECKPOINT = "checkpoint.pt"


MANIFEST = "manifest.json"


LOG = "log.csv"


RUN_INFO = "run.json"


def run_dir_for(spec: RunSpec, out_dir: str | Path = "runs") -> Path:
    """``<out_dir>/<run name>-<config hash>`` (:meth:`~trustmae_lib.config.RunSpec.file_stem`)."""
    return Path(out_dir) / spec.file_stem()


def write_log(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(path, "w") as handle:
        handle.write(buffer.getvalue())


def check_same_config(checkpoint: dict, spec: RunSpec, profile: Profile, path: Path) -> None:
    if checkpoint.get("config_hash") != spec.config_hash():
        stored_spec, stored_profile = checkpoint.get("spec", {}), checkpoint.get("profile", {})
        diffs = [
            f"{k}={stored_spec.get(k)!r} (asked {v!r})" for k, v in spec.to_dict().items() if stored_spec.get(k) != v
        ]
        diffs += [
            f"profile.{k}={stored_profile.get(k)!r} (asked {v!r})"
            for k, v in profile.to_dict().items()
            if stored_profile.get(k) != v
        ]
        what = ", ".join(diffs[:4]) or "config hash differs"
        raise TrustMAEError(
            f"{path} was trained with another configuration: {what}; use a matching spec/profile or train a new run"
        )


def load_models(models: dict[str, nn.Module], checkpoint: dict, path: Path) -> None:
    stored = checkpoint.get("models", {})
    for name, module in models.items():
        if name not in stored:
            raise TrustMAEError(f"{path} has no weights for '{name}'; it belongs to another method -- retrain")
        try:
            module.load_state_dict(stored[name], strict=True)
        except RuntimeError as err:
            detail = " ".join(str(err).split())[:160]
            raise TrustMAEError(
                f"{path}: the '{name}' weights do not fit the architecture ({detail}); the profile "
                "or library changed since training -- retrain the run"
            ) from None


@dataclass
class TrainedRun:
    """A finished run, ready for scoring.

    Attributes:
        run_dir: the run folder.
        spec, profile: what was trained (from the checkpoint).
        models: ``{"model": auto-encoder, ...}`` in eval mode on ``device``.
        split: the noisy split (rebuilt from ``manifest.json`` and checked).
        index: the category's files.
        device: where the models are.
        meta: the checkpoint's bookkeeping (``step``, ``train_wall_s``, ``device``, ``backbone``, ...).
    """

    run_dir: Path
    spec: RunSpec
    profile: Profile
    models: dict[str, nn.Module]
    split: object
    index: object
    device: torch.device
    meta: dict

    @property
    def method(self) -> str:
        return self.spec.method

    @property
    def texture(self) -> bool:
        return is_texture(self.spec.category, self.index.root)

    @property
    def input_size(self) -> int:
        """Side of the images (or windows) the auto-encoder takes."""
        if is_trustmae(self.method):
            return self.profile.image_size
        from trustmae_lib.model.baselines import get_baseline

        return get_baseline(self.method).input_size(self.profile)

    @property
    def score_size(self) -> int:
        """Side the images are scored at (texture baselines: the 4x texture size, scored with sliding windows)."""
        size, crop = train_size(self.method, self.profile, self.texture)
        return size


def is_finished(run_dir: str | Path, spec: RunSpec | None = None) -> bool:
    """True when ``run_dir`` holds a finished checkpoint (of ``spec``'s configuration, when given)."""
    path = Path(run_dir) / RUN_INFO
    if not path.is_file() or not (Path(run_dir) / CHECKPOINT).is_file():
        return False
    try:
        info = read_json(path)
    except (OSError, ValueError):
        return False
    if not info.get("finished"):
        return False
    return spec is None or info.get("config_hash") == spec.config_hash()


def load_trained(
    run_dir: str | Path, spec: RunSpec | None = None, device: str | torch.device | None = None
) -> TrainedRun:
    """Load a finished run for scoring.

    Args:
        run_dir: a folder written by :func:`train`.
        spec: optional -- the configuration the caller expects; a different one is an error.
        device: ``None`` -> CUDA if available, else CPU.

    Raises:
        TrustMAEError: missing folder or checkpoint, corrupt checkpoint (named), unfinished run, configuration or
            architecture mismatch, or a dataset that no longer matches the run's manifest.
    """
    from trustmae_lib.data.embedded import ensure_dataset
    from trustmae_lib.data.mvtec import scan_category
    from trustmae_lib.data.noise import load_manifest

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TrustMAEError(f"run folder {run_dir} does not exist; train it first (trustmae train ...)")
    path = run_dir / CHECKPOINT
    checkpoint = load_checkpoint(path)
    try:
        stored_spec = RunSpec(**checkpoint["spec"])
        stored_profile = Profile(**checkpoint["profile"])
    except (KeyError, TypeError) as err:
        raise TrustMAEError(f"{path} lacks a valid spec/profile ({err}); retrain the run") from None
    if spec is not None:
        check_same_config(checkpoint, spec, spec.load_profile(), path)
    if not checkpoint.get("finished"):
        raise TrustMAEError(
            f"{path} is unfinished (step {checkpoint.get('step')} of {stored_profile.steps}); "
            "finish it with train(..., resume=True) / trustmae train --resume"
        )
    seed_everything(stored_spec.seed)
    models = build_models(stored_spec, stored_profile)
    load_models(models, checkpoint, path)
    dev = pick_device(device)
    for m in models.values():
        m.to(dev).eval()
    root = ensure_dataset(stored_spec.dataset, stored_profile)
    index = scan_category(root, stored_spec.category)
    split = load_manifest(run_dir / MANIFEST, root)
    if split.manifest_hash != checkpoint.get("manifest_hash"):
        raise TrustMAEError(
            f"{run_dir / MANIFEST} does not match the checkpoint's split; the run folder was edited -- retrain the run"
        )
    meta = {k: v for k, v in checkpoint.items() if k not in ("models", "optimizers", "scaler", "rng", "log")}
    return TrainedRun(
        run_dir=run_dir,
        spec=stored_spec,
        profile=stored_profile,
        models=models,
        split=split,
        index=index,
        device=dev,
        meta=meta,
    )


def iter_log(run_dir: str | Path) -> Iterator[dict]:
    """Rows of a run's ``log.csv`` as dicts of floats (``step`` as int)."""
    path = Path(run_dir) / LOG
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            yield {k: (int(v) if k == "step" else float(v)) for k, v in row.items() if v != ""}
