"""Training: one loop for TrustMAE, its *w/o TR* ablation and the three baselines (supplement Eq. 9-15, §B).

* **TrustMAE** (``trustmae``; ``trustmae_no_tr`` builds the same network with ``trust_region=False``) alternates
  a discriminator step -- the hinge loss of Eq. 13 on ``x`` and ``G(x).detach()`` -- and a generator step on
  Eq. 9: ``10 L_rec + 10 L_sm + 10 L_vgg + 1 L_GAN + 10 L_feat + l_margin L_margin + l_trust L_trust`` with
  ``L_GAN`` from Eq. 14 and ``L_feat`` from Eq. 15, the perceptual term on the profile's backbone.
* **Baselines** (``memae``, ``ae_l2``, ``ae_ssim``) train on their own objective from
  :data:`trustmae_lib.baselines.BASELINES`; AE-L2 / AE-SSIM on texture categories train on random crops of
  textures resized to four times their input size (supplement §B).

Optimisers (*readings*: the supplement gives only the baselines' Adam lr 1e-4): TrustMAE uses Adam with the
profile's ``lr`` / ``lr_disc`` and betas ``(0.5, 0.999)`` -- the usual setting of the hinge-GAN / pix2pixHD family
the losses come from; the baselines use Adam, lr 1e-4, betas ``(0.9, 0.999)`` (PyTorch's default).

Engineering (not in the paper):

* **Data order** is stateless: step ``t`` takes positions ``t*G ... (t+1)*G - 1`` (``G`` = global batch) of an
  endless stream of seeded per-epoch permutations, and draws its augmentation from a generator seeded by
  ``(seed, t, rank)``. A resumed run therefore sees exactly the batches the uninterrupted run would have seen.
  Training images are decoded once (:func:`~trustmae_lib.data.load_tensors`), re-drawn defects get their fixed
  :func:`~trustmae_lib.data.redraw_augment` variant, and flips/rotations are drawn per batch (none for
  fixed-orientation categories).
* **Checkpoints** (``checkpoint.pt``) are written atomically every ``profile.checkpoint_every`` steps and at the
  end, and read with ``weights_only=True`` (:mod:`trustmae_lib.checkpoint`). ``--resume`` continues bit-exactly
  on the CPU.
* **Ctrl-C** finishes the current step, saves a checkpoint and raises :class:`TrainingInterrupted`.
* A **NaN/inf** loss stops the run with a one-line :class:`~trustmae_lib.errors.TrustMAEError`; the last good
  checkpoint is kept, never overwritten.
* **CUDA**: automatic mixed precision (bf16 where supported, else fp16 with a ``GradScaler``) and
  ``channels_last``; losses are computed in float32. On the CPU the layout is NCHW unless the spec asks for
  ``channels_last`` (:attr:`~trustmae_lib.config.RunSpec.channels_last`, ``trustmae train --channels-last``).
* **DDP**: under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` set) the same entry point initialises the process group
  (NCCL on CUDA, gloo on CPU), shards every global batch over the ranks (each rank takes every
  ``world_size``-th index, as ``DistributedSampler`` does), wraps the networks in ``DistributedDataParallel`` and
  lets only rank 0 write files. Batch norm statistics are per rank during the forward pass and rank 0's buffers
  are broadcast before each forward (DDP's default); on CUDA the batch norms are converted to ``SyncBatchNorm``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import Profile, RunSpec
from .errors import TrustMAEError
from .io import atomic_write, read_json, write_json
from .utils import seed_everything

__all__ = [
    "GAN_BETAS",
    "CHECKPOINT",
    "TrainedRun",
    "TrainingInterrupted",
    "prepare",
    "run_dir_for",
    "build_models",
    "is_texture",
    "train",
    "fit",
    "recalibrate_batchnorm",
    "training_batch",
    "load_or_train",
    "load_trained",
    "is_finished",
    "batch_indices",
    "init_memory_from_features",
]

#: Adam betas of the adversarial training (reading: the hinge-GAN / pix2pixHD setting).
GAN_BETAS = (0.5, 0.999)
CHECKPOINT = "checkpoint.pt"
MANIFEST = "manifest.json"
LOG = "log.csv"
RUN_INFO = "run.json"


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train`: the checkpoint of the last finished step was saved (resume with it)."""

    def __init__(self, step: int, checkpoint: Path | None):
        self.step, self.checkpoint = step, checkpoint
        where = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint written on this rank"
        super().__init__(f"training interrupted after step {step}; {where}; continue with resume=True (--resume)")


# --------------------------------------------------------------------------------------------------------------
# Run folder, data
# --------------------------------------------------------------------------------------------------------------


def run_dir_for(spec: RunSpec, out_dir: str | Path = "runs") -> Path:
    """``<out_dir>/<run name>-<config hash>``; dataset / profile paths are shortened to their names."""
    short = dataclasses.replace(spec, dataset=Path(spec.dataset).name or "data", profile=Path(spec.profile).stem)
    return Path(out_dir) / f"{short.run_name()}-{spec.config_hash()}"


def is_texture(category: str, root: str | Path | None = None) -> bool:
    """Texture categories (MVTec AD's five, the synthetic textures, or a dataset.json ``textures`` list)."""
    from .data import MVTEC_TEXTURES, dataset_info
    from .synthetic import TEXTURES

    listed = set(dataset_info(root).get("textures", ())) if root is not None else set()
    return category in set(MVTEC_TEXTURES) | set(TEXTURES) | listed


def prepare(spec: RunSpec, profile: Profile | None = None):
    """Resolve a run's data: profile, category index and noisy split.

    Builds an embedded dataset if missing (with dataset seed 0 -- the run's ``seed`` varies the noise draw and the
    training, not the images), scans the category and injects noise with ``spec.seed``.

    Returns:
        ``(profile, index, split)``.
    """
    from .data import ensure_dataset, scan_category
    from .noise import inject_noise

    profile = profile or spec.load_profile()
    root = ensure_dataset(spec.dataset, profile)
    index = scan_category(root, spec.category)
    split = inject_noise(index, spec.noise_ratio, spec.protocol, seed=spec.seed)
    return profile, index, split


def _cache_dir(spec: RunSpec, root: Path) -> Path | None:
    """On-disk tensor cache for embedded datasets only (never write into a user's dataset folder)."""
    from .data import EMBEDDED_DATASETS, cache_dir_for

    return cache_dir_for(root) if spec.dataset in EMBEDDED_DATASETS else None


def _train_size(method: str, profile: Profile, texture: bool) -> tuple[int, int | None]:
    """``(side the training images are loaded at, crop side or None)``."""
    if method.startswith("trustmae"):
        return profile.image_size, None
    from .baselines import get_baseline

    base = get_baseline(method)
    if base.texture_protocol and texture:
        return base.texture_size(profile), base.input_size(profile)
    return base.input_size(profile), None


def load_train_tensors(spec: RunSpec, profile: Profile, index, split, size: int) -> Tensor:
    """The noisy training set as ``(N, 3, size, size)`` in [-1, 1], re-drawn items already transformed."""
    from .data import load_tensors, redraw_augment

    samples = [item.sample for item in split.train]
    images, masks = load_tensors(samples, size, cache_dir=_cache_dir(spec, index.root), progress=False)
    for i, item in enumerate(split.train):
        if item.redraw:
            images[i], masks[i] = redraw_augment(images[i], masks[i], item.redraw, index.fixed_orientation)
    return images


def batch_indices(step: int, n: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1) -> Tensor:
    """The training-set indices this rank uses at ``step`` (stateless, so resuming repeats them exactly).

    The stream is the concatenation of per-epoch permutations ``randperm(n)`` seeded by ``(seed, epoch)``; step
    ``t`` takes positions ``t*G ... t*G + G - 1`` and rank ``r`` every ``world_size``-th of them from ``r``.

    Returns:
        ``(global_batch // world_size,)`` long.
    """
    pos = step * global_batch + torch.arange(global_batch)
    epochs, offsets = pos // n, pos % n
    out = torch.empty(global_batch, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        g = torch.Generator().manual_seed(_mix(seed, epoch, 0x5EED))
        perm = torch.randperm(n, generator=g)
        sel = epochs == epoch
        out[sel] = perm[offsets[sel]]
    return out[rank::world_size]


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (NumPy's SeedSequence: independent streams for nearby inputs)."""
    return int(np.random.SeedSequence([int(v) % 2**32 for v in values]).generate_state(2, np.uint64)[0] >> 1)


# --------------------------------------------------------------------------------------------------------------
# Models and methods
# --------------------------------------------------------------------------------------------------------------


def build_models(spec: RunSpec, profile: Profile) -> dict[str, nn.Module]:
    """The networks of ``spec.method`` (seed the RNG first for a reproducible initialisation).

    Returns:
        ``{"model": auto-encoder}`` plus ``"discriminator"`` for the TrustMAE methods.
    """
    if spec.method == "patchcore":
        raise TrustMAEError(
            "patchcore has nothing to train; score it with trustmae_lib.patchcore.evaluate_patchcore or a sweep"
        )
    if spec.method.startswith("trustmae"):
        from .discriminator import Discriminator
        from .model import TrustMAE

        overrides = spec.reading_overrides("model")  # an alternative reading (config.READINGS), if any
        model = TrustMAE.from_profile(profile, trust_region=spec.method == "trustmae", **overrides)
        return {"model": model, "discriminator": Discriminator(width=profile.width)}
    from .baselines import get_baseline

    return {"model": get_baseline(spec.method).build(profile)}


@torch.no_grad()
def init_memory_from_features(model: nn.Module, images: Tensor, seed: int = 0) -> None:
    """Set TrustMAE's memory slots to random encoder features of ``images`` (*reading*, ``memory_init``).

    The slots of :class:`~trustmae_lib.memory.MemoryModule` start uniform in ``+-1/sqrt(C)`` (MemAE's code), far
    from the encoder's features in Euclidean distance; Adam moves each coordinate by about ``lr`` per step, so
    the trust region (a Euclidean radius around the nearest slot) would compare features with slots that never
    reach them. Starting from features puts the slots among the data. The encoder runs in training mode (batch
    statistics, as in the first step); its batch-norm buffers are restored afterwards.

    Args:
        model: a :class:`~trustmae_lib.model.TrustMAE` with a memory.
        images: ``(B, 3, H, W)`` in [-1, 1].
        seed: seeds the choice of feature vectors.
    """
    if getattr(model, "memory", None) is None:
        return
    buffers = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    was_training = model.encoder.training
    model.encoder.train()
    z = model.encoder(images)  # (B, C, h, w)
    model.encoder.load_state_dict(buffers)
    model.encoder.train(was_training)
    model.memory.init_from_features(z, generator=torch.Generator().manual_seed(_mix(seed, 0x3E3)))


def training_batch(
    images: Tensor, masks: Tensor, idx: Tensor, crop: int | None, fixed_orientation: bool, generator: torch.Generator
) -> Tensor:
    """One training batch: ``images[idx]`` with a random square symmetry each (``augment``), or -- for the texture
    baselines (``crop``) -- one random ``crop x crop`` window of each, then the symmetry.

    The windows are cut straight from the in-memory training tensor and only they are augmented: the same
    distribution as augmenting the whole 4x texture and then cropping (the valid crop offsets are symmetric under
    the flips and quarter turns), on a sixteenth of the pixels (6.4x faster, ``benchmarks/bench_changes.py``).
    """
    from .baselines import random_crops
    from .data import augment

    if crop is None:
        x, _ = augment(images[idx], masks[idx], fixed_orientation, generator)
        return x
    windows = random_crops(images, crop, generator=generator, index=idx)  # (B, 3, crop, crop)
    x, _ = augment(windows, masks.new_zeros(windows.shape[0], 1, crop, crop), fixed_orientation, generator)
    return x


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, images: Tensor, batch_size: int, crop: int | None = None, seed: int = 0
) -> int:
    """Recompute every batch-norm running mean / variance with the final weights (engineering, not the paper).

    During training the statistics are exponential averages over the last ~10 steps (momentum 0.1) of networks
    that keep changing; TrustMAE's slots move fast under ``L_trust``, so at the end the averages describe
    earlier decoders and the evaluation-mode network reconstructs every image as the same mean texture (measured
    at the ``cpu`` profile on brick: reconstruction std across images 0.003 in evaluation mode, 0.095 in
    training mode; 0.098 after this pass). Here the statistics are reset and re-estimated as plain (cumulative)
    averages over the whole training set in batches of ``batch_size``, un-augmented -- the same idea as
    :func:`torch.optim.swa_utils.update_bn`. Only batch-norm layers switch to training mode, so nothing else
    (the trust-region history, dropout) is touched.

    Args:
        model: the auto-encoder; a model without batch norm is left as it is.
        images: ``(N, 3, S, S)`` training images in [-1, 1] (on the model's device).
        batch_size: images per forward pass (the training batch size: batch statistics as in training).
        crop: random crops of this side (texture baselines), drawn from a generator seeded by ``seed``.

    Returns:
        The number of batch-norm layers recalibrated.
    """
    from .baselines import random_crops

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or images.shape[0] == 0:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
        m.train()
    gen = torch.Generator().manual_seed(_mix(seed, 0xBA7C))
    try:
        for chunk in images.split(batch_size):
            if chunk.shape[0] < 2:  # batch norm needs two samples; a last single image adds nothing
                continue
            if crop is not None:
                chunk = random_crops(chunk, crop, generator=gen)
            model(chunk)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return len(norms)


def _check_finite(values: dict[str, float], step: int) -> TrustMAEError | None:
    """The error for the first NaN/inf value, or ``None``."""
    for name, value in values.items():
        if not math.isfinite(value):
            return TrustMAEError(
                f"loss term '{name}' is {value} at step {step} -- lower the learning rate or check the input"
            )
    return None


class _Method:
    """What differs between methods: the optimisers and one training step."""

    def __init__(
        self,
        spec: RunSpec,
        profile: Profile,
        models: dict[str, nn.Module],
        wrapped: dict[str, nn.Module],
        device: torch.device,
        amp_dtype: torch.dtype | None,
        ddp: _Dist | None = None,
    ):
        self.spec, self.profile, self.models, self.wrapped = spec, profile, models, wrapped
        self.device, self.amp_dtype, self.ddp = device, amp_dtype, ddp
        use_scaler = amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler) if use_scaler else None

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def backward_step(self, loss: Tensor, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
        else:
            loss.backward()
            optimizer.step()

    def end_step(self) -> None:
        if self.scaler is not None:
            self.scaler.update()

    def agree(self, error: TrustMAEError | None) -> None:
        """Raise ``error`` -- on every rank if any rank has one, so that no rank waits in a collective backward."""
        if self.ddp is not None and self.ddp.active:
            flag = torch.tensor([float(error is not None)], device=self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(flag)
            if error is None and flag.item() > 0:
                error = TrustMAEError("another rank hit a NaN/inf loss (see its message)")
        if error is not None:
            raise error

    optimizers: dict[str, torch.optim.Optimizer]
    backbone_info: dict

    def step(self, x: Tensor, step: int) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError


class _TrustMAEMethod(_Method):
    """Alternating hinge-GAN training of the memory auto-encoder (Eq. 9, 13, 14, 15)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from .losses import LossWeights
        from .perceptual import build_backbone

        self.backbone = build_backbone(self.profile.backbone).to(self.device)
        self.backbone_info = {"name": self.backbone.name, "weights_source": self.backbone.weights_source}
        self.weights = LossWeights(**self.spec.reading_overrides("loss"))
        self.optimizers = {
            "model": torch.optim.Adam(self.models["model"].parameters(), lr=self.profile.lr, betas=GAN_BETAS),
            "discriminator": torch.optim.Adam(
                self.models["discriminator"].parameters(), lr=self.profile.lr_disc, betas=GAN_BETAS
            ),
        }

    def step(self, x: Tensor, step: int) -> dict[str, float]:
        from .losses import (
            feature_matching_loss,
            generator_loss,
            hinge_d_loss,
            hinge_g_loss,
            perceptual_loss,
            reconstruction_loss,
            ssim_loss,
        )

        gen, disc = self.wrapped["model"], self.wrapped["discriminator"]
        disc_raw = self.models["discriminator"]
        b = x.shape[0]
        with self.autocast():
            out = gen(x)
        recon = out.recon.float()

        # Discriminator step, Eq. 13, on real x and the detached reconstruction (one forward: same batch stats).
        disc_raw.requires_grad_(True)
        with self.autocast():
            logits, _ = disc(torch.cat([x, recon.detach().to(x.dtype)]))
        real_logits, fake_logits = logits.float().split(b)
        d_loss = hinge_d_loss(real_logits, fake_logits)
        self.agree(_check_finite({"disc": float(d_loss.detach())}, step))
        self.backward_step(d_loss, self.optimizers["discriminator"])

        # Generator step, Eq. 9 (D frozen, called unwrapped so its DDP reducer is not involved).
        disc_raw.requires_grad_(False)
        with self.autocast():
            logits, feats = disc_raw(torch.cat([x, recon.to(x.dtype)]))
            with torch.no_grad():
                feats_x = self.backbone(x)
            feats_r = self.backbone(recon.to(x.dtype))
        fake_logits = logits.float()[b:]
        real_feats = [f.float()[:b] for f in feats]
        fake_feats = [f.float()[b:] for f in feats]
        xf = x.float()
        terms = {
            "rec": reconstruction_loss(xf, recon),  # Eq. 10
            "sm": ssim_loss(xf, recon),  # Eq. 11
            "vgg": perceptual_loss(
                [f.float() for f in feats_x], [f.float() for f in feats_r], self.backbone.layer_weights
            ),  # Eq. 12
            "gan": hinge_g_loss(fake_logits),  # Eq. 14
            "feat": feature_matching_loss(real_feats, fake_feats),  # Eq. 15
            "margin": out.losses["margin"].float(),
            "trust": out.losses["trust"].float(),
        }
        try:
            total, log = generator_loss(terms, self.weights, step=step)  # Eq. 9; raises on NaN / inf
            failure = None
        except TrustMAEError as err:
            failure = err
        self.agree(failure)
        self.backward_step(total, self.optimizers["model"])
        disc_raw.requires_grad_(True)
        self.end_step()
        return {
            "disc": float(d_loss.detach()),
            **log,
            "entropy": float(out.losses["entropy"].detach()),
            **{k: float(v) for k, v in out.stats.items()},
        }


class _BaselineMethod(_Method):
    """Plain reconstruction training of a Table-4 baseline (supplement §B)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from .baselines import get_baseline

        self.baseline = get_baseline(self.spec.method)
        self.backbone_info = {"name": None, "weights_source": "not used (scored by its residual map)"}
        self.optimizers = {"model": self.baseline.optimizer(self.models["model"])}

    def step(self, x: Tensor, step: int) -> dict[str, float]:
        with self.autocast():
            out = self.wrapped["model"](x)
        out = out._replace(recon=out.recon.float(), weights=None if out.weights is None else out.weights.float())
        loss, log = self.baseline.loss(x.float(), out)
        self.agree(_check_finite(log, step))
        self.backward_step(loss, self.optimizers["model"])
        self.end_step()
        return dict(log)


# --------------------------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def _init_distributed() -> _Dist:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1); otherwise single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    if "RANK" not in os.environ:
        raise TrustMAEError("WORLD_SIZE is set but RANK is not; launch distributed runs with torchrun")
    local = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
        owns = True
    return _Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, owns_group=owns)


def _device_for(ddp: _Dist, device: str | torch.device | None) -> torch.device:
    if device not in (None, "auto"):
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", ddp.local_rank if ddp.active else torch.cuda.current_device())
    return torch.device("cpu")


class _StopFlag:
    """SIGINT -> finish the current step, then stop (a second Ctrl-C interrupts at once)."""

    def __init__(self):
        self.set = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.set:  # second Ctrl-C: give up on a clean stop
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------


@dataclass
class FitResult:
    """What :func:`fit` leaves behind (the trained networks stay in memory)."""

    run_dir: Path
    models: dict[str, nn.Module]
    step: int
    log: list[dict] = field(default_factory=list)


def _write_log(path: Path, rows: list[dict]) -> None:
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


def _state_dict(module: nn.Module, ddp: _Dist | None = None, apply: bool = False) -> dict:
    """CPU copy of ``module.state_dict()``; under DDP with batch-norm running statistics averaged over the ranks.

    DDP keeps parameters identical but every rank updates its own running mean/variance (rank 0's are broadcast
    before each forward). The saved -- and with ``apply`` the live -- statistics are the mean over the ranks, so
    every rank ends with identical weights. Training-mode forwards use batch statistics, so this does not change
    the optimisation. Collective: call it on every rank.
    """
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    if ddp is None or not ddp.active:
        return state
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.track_running_stats:
            for buf in ("running_mean", "running_var"):
                live = getattr(sub, buf)
                mean = live.detach().clone()
                dist.all_reduce(mean)
                mean /= ddp.world_size
                state[f"{name}.{buf}" if name else buf] = mean.cpu()
                if apply:
                    live.copy_(mean)
    return state


def train(
    spec: RunSpec,
    out_dir: str | Path = "runs",
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> Path:
    """Train one run and return its folder ``<out_dir>/<run name>-<config hash>``.

    The folder receives ``manifest.json`` (the noisy split), ``log.csv`` (every ``log_every`` steps: each loss
    term, trust-region statistics, seconds per step and spent waiting for data), ``checkpoint.pt`` and
    ``run.json``.

    Args:
        spec: what to train.
        out_dir: parent folder of the run folders.
        resume: continue from the folder's checkpoint (bit-identical to an uninterrupted run on the CPU). Without
            it an existing checkpoint is an error, so nothing is overwritten by accident.
        progress: show a tqdm bar with the current losses.
        device: ``None`` -> CUDA if available, else CPU.

    Raises:
        TrustMAEError: bad data, a NaN/inf loss (the last good checkpoint is kept), or a checkpoint that belongs to
            another configuration.
        TrainingInterrupted: Ctrl-C (after saving a checkpoint).
    """
    return fit(spec, out_dir, resume=resume, progress=progress, device=device).run_dir


def fit(
    spec: RunSpec,
    out_dir: str | Path = "runs",
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> FitResult:
    """:func:`train`, returning the networks as well (used by the DDP test and notebooks)."""
    ddp = _init_distributed()
    try:
        return _fit(spec, Path(out_dir), resume, progress, device, ddp)
    finally:
        if ddp.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _fit(spec: RunSpec, out_dir: Path, resume: bool, progress: bool, device, ddp: _Dist) -> FitResult:
    t_start = time.perf_counter()
    profile = spec.load_profile()
    run_dir = run_dir_for(spec, out_dir)
    ckpt_path = run_dir / CHECKPOINT
    if ddp.active and not ddp.is_main:
        ddp.barrier()  # rank 0 builds the dataset first
    _, index, split = prepare(spec, profile)
    if ddp.active and ddp.is_main:
        ddp.barrier()

    checkpoint = None
    if ckpt_path.is_file():
        if not resume and is_finished(run_dir, spec):
            raise TrustMAEError(
                f"{run_dir} is already trained; evaluate it (trustmae evaluate {run_dir}), use load_or_train, "
                "or delete the folder to train again"
            )
        if not resume:
            raise TrustMAEError(
                f"{run_dir} already holds a checkpoint; pass resume=True (--resume) to continue it, "
                "or delete the folder to start again"
            )
        checkpoint = load_checkpoint(ckpt_path)
        _check_same_config(checkpoint, spec, profile, ckpt_path)
        if int(checkpoint.get("world_size", 1)) != ddp.world_size:
            raise TrustMAEError(
                f"{ckpt_path} was trained with {checkpoint.get('world_size', 1)} process(es); resume it "
                f"with the same number (now {ddp.world_size}) so the data order stays the same"
            )
        if checkpoint.get("manifest_hash") != split.manifest_hash:
            raise TrustMAEError(
                f"{ckpt_path} was trained on another noisy split (manifest {checkpoint.get('manifest_hash')}"
                f", now {split.manifest_hash}); the dataset changed -- delete the run and retrain"
            )
    if ddp.is_main:
        from .noise import save_manifest

        run_dir.mkdir(parents=True, exist_ok=True)
        save_manifest(split, run_dir / MANIFEST)

    dev = _device_for(ddp, device)
    channels_last = dev.type == "cuda" or spec.channels_last
    amp_dtype = None
    if dev.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    # Reproducible initialisation: every rank builds the same networks from the run's seed.
    seed_everything(spec.seed)
    models = build_models(spec, profile)
    for m in models.values():
        m.to(dev)
        if channels_last:
            m.to(memory_format=torch.channels_last)
    texture = is_texture(spec.category, index.root)
    size, crop = _train_size(spec.method, profile, texture)
    images = load_train_tensors(spec, profile, index, split, size).to(dev)
    masks = torch.zeros(images.shape[0], 1, size, size, device=dev)
    n = images.shape[0]
    global_batch = profile.batch_size * ddp.world_size
    steps = profile.steps
    if checkpoint is None and spec.method.startswith("trustmae") and profile.memory_init == "features":
        # Same slots on every rank: the first global batch, un-augmented, and a seeded draw.
        first = images[batch_indices(0, n, global_batch, spec.seed).to(dev)]
        init_memory_from_features(models["model"], first, seed=spec.seed)
    if ddp.active and dev.type == "cuda":
        models = {k: nn.SyncBatchNorm.convert_sync_batchnorm(m) for k, m in models.items()}
    wrapped: dict[str, nn.Module] = dict(models)
    if ddp.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [dev.index] if dev.type == "cuda" else None
        wrapped = {k: DDP(m, device_ids=ids) for k, m in models.items()}
    method_cls = _TrustMAEMethod if spec.method.startswith("trustmae") else _BaselineMethod
    method = method_cls(spec, profile, models, wrapped, dev, amp_dtype, ddp)

    start, log_rows, wall_before, data_before = 0, [], 0.0, 0.0
    if checkpoint is not None:
        _load_models(models, checkpoint, ckpt_path)
        for name, opt in method.optimizers.items():
            opt.load_state_dict(checkpoint["optimizers"][name])
        if method.scaler is not None and checkpoint.get("scaler"):
            method.scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"])
        start = int(checkpoint["step"])
        log_rows = list(checkpoint.get("log", []))
        wall_before = float(checkpoint.get("train_wall_s", 0.0))
        data_before = float(checkpoint.get("data_wait_s", 0.0))

    for m in models.values():
        m.train()
    data_wait = 0.0
    step = start

    def save(finished: bool) -> Path | None:
        weights = {k: _state_dict(m, ddp, apply=finished) for k, m in models.items()}  # collective under DDP
        if not ddp.is_main:
            return None
        wall = wall_before + (time.perf_counter() - t_start)
        state = {
            "step": step,
            "finished": finished,
            "config_hash": spec.config_hash(),
            "spec": spec.to_dict(),
            "profile": profile.to_dict(),
            "method": spec.method,
            "models": weights,
            "optimizers": {k: o.state_dict() for k, o in method.optimizers.items()},
            "scaler": method.scaler.state_dict() if method.scaler is not None else None,
            "rng": rng_state(),
            "log": log_rows,
            "train_wall_s": wall,
            "data_wait_s": data_before + data_wait,
            "device": str(dev),
            "channels_last": channels_last,
            "world_size": ddp.world_size,
            "root": str(index.root),
            "manifest_hash": split.manifest_hash,
            "backbone": method.backbone_info,
            "torch_version": str(torch.__version__),
        }
        save_checkpoint(ckpt_path, state)
        _write_log(run_dir / LOG, log_rows)
        write_json(
            run_dir / RUN_INFO,
            {
                "spec": spec.to_dict(),
                "profile": profile.to_dict(),
                "config_hash": spec.config_hash(),
                "step": step,
                "steps": steps,
                "finished": finished,
                "train_wall_s": round(wall, 3),
                "data_wait_s": round(data_before + data_wait, 3),
                "device": str(dev),
                "channels_last": channels_last,
                "world_size": ddp.world_size,
                "manifest_hash": split.manifest_hash,
                "backbone": method.backbone_info,
                "library_version": __version__,
            },
        )
        return ckpt_path

    bar = tqdm(
        total=steps,
        initial=start,
        desc=f"{spec.method} {spec.category}",
        leave=False,
        disable=not (progress and ddp.is_main),
        dynamic_ncols=True,
    )
    try:
        with _StopFlag() as stop:
            while step < steps:
                t0 = time.perf_counter()
                idx = batch_indices(step, n, global_batch, spec.seed, ddp.rank, ddp.world_size).to(dev)
                gen = torch.Generator().manual_seed(_mix(spec.seed, step, ddp.rank))
                x = training_batch(images, masks, idx, crop, index.fixed_orientation, gen)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                t1 = time.perf_counter()
                data_wait += t1 - t0
                try:
                    values = method.step(x, step + 1)
                except TrustMAEError as err:
                    last = f"last good checkpoint {ckpt_path}" if ckpt_path.is_file() else "no checkpoint was written"
                    raise TrustMAEError(f"training stopped: {err}; {last}") from None
                step += 1
                bar.update(1)
                if step % max(1, profile.log_every) == 0 or step == steps:
                    row = {
                        "step": step,
                        **{k: round(v, 6) for k, v in values.items()},
                        "step_s": round(time.perf_counter() - t0, 4),
                        "data_s": round(t1 - t0, 4),
                    }
                    log_rows.append(row)
                    shown = {k: values[k] for k in ("total", "disc", "rec", "loss") if k in values}
                    bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()})
                    if ddp.is_main:
                        _write_log(run_dir / LOG, log_rows)
                stop_now = stop.set
                if ddp.active:  # every rank must stop at the same step
                    flag = torch.tensor([float(stop_now)], device=dev if dev.type == "cuda" else "cpu")
                    dist.all_reduce(flag)
                    stop_now = bool(flag.item() > 0)
                if stop_now:
                    path = save(finished=False)
                    raise TrainingInterrupted(step, path)
                if profile.checkpoint_every and step % profile.checkpoint_every == 0 and step < steps:
                    save(finished=False)
    finally:
        bar.close()
    if start < steps:  # the run trained here (not a reload of a finished one): final batch-norm statistics
        recalibrate_batchnorm(models["model"], images, profile.batch_size, crop=crop, seed=spec.seed)
    save(finished=True)
    return FitResult(run_dir=run_dir, models=models, step=step, log=log_rows)


def _check_same_config(checkpoint: dict, spec: RunSpec, profile: Profile, path: Path) -> None:
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


def _load_models(models: dict[str, nn.Module], checkpoint: dict, path: Path) -> None:
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


# --------------------------------------------------------------------------------------------------------------
# Loading trained runs
# --------------------------------------------------------------------------------------------------------------


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
        if self.method.startswith("trustmae"):
            return self.profile.image_size
        from .baselines import get_baseline

        return get_baseline(self.method).input_size(self.profile)

    @property
    def score_size(self) -> int:
        """Side the images are scored at (texture baselines: the 4x texture size, scored with sliding windows)."""
        size, crop = _train_size(self.method, self.profile, self.texture)
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


def load_or_train(spec: RunSpec, out_dir: str | Path = "runs", progress: bool = True) -> Path:
    """Reuse a finished run with the same config hash, resume an unfinished one, or train from scratch."""
    run_dir = run_dir_for(spec, out_dir)
    if is_finished(run_dir, spec):
        return run_dir
    return train(spec, out_dir, resume=(run_dir / CHECKPOINT).is_file(), progress=progress)


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
    from .data import ensure_dataset, scan_category
    from .noise import load_manifest

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
        _check_same_config(checkpoint, spec, spec.load_profile(), path)
    if not checkpoint.get("finished"):
        raise TrustMAEError(
            f"{path} is unfinished (step {checkpoint.get('step')} of {stored_profile.steps}); "
            "finish it with train(..., resume=True) / trustmae train --resume"
        )
    seed_everything(stored_spec.seed)
    models = build_models(stored_spec, stored_profile)
    _load_models(models, checkpoint, path)
    dev = (
        torch.device(device)
        if device not in (None, "auto")
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
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
