"""What each method trains: its networks, optimisers and one training step (supplement Eq. 9-15, §B).

* **TrustMAE** (``trustmae``; ``trustmae_no_tr`` builds the same network with ``trust_region=False``) alternates
  a discriminator step -- the hinge loss of Eq. 13 on ``x`` and ``G(x).detach()`` -- and a generator step on
  Eq. 9: ``10 L_rec + 10 L_sm + 10 L_vgg + 1 L_GAN + 10 L_feat + l_margin L_margin + l_trust L_trust`` with
  ``L_GAN`` from Eq. 14 and ``L_feat`` from Eq. 15, the perceptual term on the profile's backbone
  (:class:`TrustMAEMethod`).
* **Baselines** (``memae``, ``ae_l2``, ``ae_ssim``) train on their own objective from
  :data:`trustmae_lib.model.baselines.BASELINES` (:class:`BaselineMethod`).

Optimisers (*readings*: the supplement gives only the baselines' Adam lr 1e-4): TrustMAE uses Adam with the
profile's ``lr`` / ``lr_disc`` and betas ``(0.5, 0.999)`` -- the usual setting of the hinge-GAN / pix2pixHD family
the losses come from; the baselines use Adam, lr 1e-4, betas ``(0.9, 0.999)`` (PyTorch's default).

A **NaN/inf** loss raises a one-line :class:`~trustmae_lib.errors.TrustMAEError` on every rank (:meth:`Method.agree`).
On CUDA the steps run under automatic mixed precision (bf16 where supported, else fp16 with a ``GradScaler``);
losses are computed in float32.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from trustmae_lib.config import Profile, RunSpec
from trustmae_lib.engine.distributed import DistContext
from trustmae_lib.engine.prepare import mix_seed
from trustmae_lib.errors import TrustMAEError

#: Adam betas of the adversarial training (reading: the hinge-GAN / pix2pixHD setting).
GAN_BETAS = (0.5, 0.999)

#: The most memory (bytes) that the training set's frozen perceptual targets may take to be computed once per run
#: (:meth:`TrustMAEMethod.cache_targets`); above it (e.g. VGG-19 at 256 px on a large category) they are computed
#: in every step, as before. About 0.45 MB per image at the ``cpu`` profile (EfficientNet-Lite0, 128 px).
TARGET_CACHE_BYTES = 1 << 30


def memory_init_rule(spec: RunSpec, profile: Profile) -> str | None:
    """How a run starts its memory slots: the reading's ``memory_init`` (``kmeans`` under the default ``ema``), else
    the profile's (``features`` in the shipped profiles); ``None`` for a method without TrustMAE's memory. The one
    rule that :func:`~trustmae_lib.engine.train.fit`, the benchmarks and chapter 9's walk-through follow."""
    if not spec.is_trustmae:
        return None
    return spec.reading_overrides("init").get("memory_init", profile.memory_init)


def build_models(spec: RunSpec, profile: Profile) -> dict[str, nn.Module]:
    """The networks of ``spec.method`` (seed the RNG first for a reproducible initialisation).

    Returns:
        ``{"model": auto-encoder}`` plus ``"discriminator"`` for the TrustMAE methods.
    """
    if spec.method == "patchcore":
        raise TrustMAEError(
            "patchcore has nothing to train; score it with trustmae_lib.model.patchcore.evaluate_patchcore or a sweep"
        )
    if spec.is_trustmae:
        from trustmae_lib.model.discriminator import Discriminator
        from trustmae_lib.model.trustmae import TrustMAE

        overrides = spec.reading_overrides("model")  # an alternative reading (config.READINGS), if any
        model = TrustMAE.from_profile(profile, trust_region=spec.method == "trustmae", **overrides)
        return {"model": model, "discriminator": Discriminator(width=profile.width)}
    from trustmae_lib.model.baselines import get_baseline

    return {"model": get_baseline(spec.method).build(profile, **spec.reading_overrides("model"))}


@torch.no_grad()
def init_memory_from_features(model: nn.Module, images: Tensor, seed: int = 0) -> None:
    """Set TrustMAE's memory slots to random encoder features of ``images`` (*reading*, ``memory_init``).

    The slots of :class:`~trustmae_lib.model.memory.MemoryModule` start uniform in ``+-1/sqrt(C)`` (MemAE's code), far
    from the encoder's features in Euclidean distance; Adam moves each coordinate by about ``lr`` per step, so
    the trust region (a Euclidean radius around the nearest slot) would compare features with slots that never
    reach them. Starting from features puts the slots among the data. The features are taken where the memory
    addresses them (after the projection, if the model has one; :func:`memory_space_features`), with the encoder in
    training mode (batch statistics, as in the first step); its batch-norm buffers are restored afterwards.

    Args:
        model: a :class:`~trustmae_lib.model.trustmae.TrustMAE` with a memory.
        images: ``(B, 3, H, W)`` in [-1, 1], one batch.
        seed: seeds the choice of feature vectors.
    """
    if getattr(model, "memory", None) is None:
        return
    rows = memory_space_features(model, images, batch_size=images.shape[0])  # (B*h*w, C)
    model.memory.init_from_features(rows[:, :, None, None],
                                    generator=torch.Generator().manual_seed(mix_seed(seed, 0x3E3)))  # fmt: skip


@torch.no_grad()
def memory_space_features(model: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    """TrustMAE's features in its memory space (encoder, then the projection if any) for every image, as rows
    ``(N*h*w, C)``; the encoder runs in training mode (batch statistics in batches of ``batch_size``, as in training)
    and its batch-norm buffers are restored afterwards."""
    buffers = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    was_training = model.encoder.training
    model.encoder.train()
    rows = []
    try:
        for chunk in images.split(batch_size):
            z = model.encoder(chunk)  # (b, C, h, w)
            if getattr(model, "project", None) is not None:
                z = model.project(z)
            rows.append(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float().cpu())
    finally:
        model.encoder.load_state_dict(buffers)
        model.encoder.train(was_training)
    return torch.cat(rows)


@torch.no_grad()
def init_memory_kmeans(model: nn.Module, images: Tensor, batch_size: int, seed: int = 0) -> None:
    """Set TrustMAE's slots to k-means centroids of the memory-space features of the whole training set (*reading*,
    ``memory_init: kmeans``): every slot starts at a mode of the data, none at one batch's features. At 40 % noise
    defective images are among them too; what keeps their slots from lasting is the slots' learning (chapter 4)."""
    if getattr(model, "memory", None) is None:
        return
    rows = memory_space_features(model, images, batch_size)
    model.memory.init_kmeans(rows, seed=mix_seed(seed, 0x3E3) % (2**31))


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
    from trustmae_lib.model.baselines import random_crops

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
    gen = torch.Generator().manual_seed(mix_seed(seed, 0xBA7C))
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


def check_finite(values: dict[str, float], step: int) -> TrustMAEError | None:
    """The error for the first NaN/inf value, or ``None``."""
    for name, value in values.items():
        if not math.isfinite(value):
            return TrustMAEError(
                f"loss term '{name}' is {value} at step {step} -- lower the learning rate or check the input"
            )
    return None


class Method:
    """What differs between methods: the optimisers and one training step."""

    def __init__(
        self,
        spec: RunSpec,
        profile: Profile,
        models: dict[str, nn.Module],
        wrapped: dict[str, nn.Module],
        device: torch.device,
        amp_dtype: torch.dtype | None,
        ddp: DistContext | None = None,
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

    def cache_targets(self, images: Tensor, batch_size: int, channels_last: bool) -> int:
        """Compute what the step needs of the training images alone once (the caller promises that every batch is
        ``images[index]`` unchanged); returns the bytes kept, 0 for none. No baseline has such a target."""
        return 0

    def step(self, x: Tensor, step: int, index: Tensor | None = None) -> dict[str, float]:  # pragma: no cover
        """One training step on the batch ``x`` (``index``: its rows of the training tensor, if it is one)."""
        raise NotImplementedError


class TrustMAEMethod(Method):
    """Alternating hinge-GAN training of the memory auto-encoder (Eq. 9, 13, 14, 15)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from trustmae_lib.config import LossWeights
        from trustmae_lib.model.perceptual import build_backbone

        self.backbone = build_backbone(self.profile.backbone, fold_bn=self.spec.fast).to(self.device)
        self.backbone_info = {"name": self.backbone.name, "weights_source": self.backbone.weights_source}
        self.weights = LossWeights(**self.spec.reading_overrides("loss"))
        train = self.spec.reading_overrides("train")  # a reading's learning rates, else the profile's
        lr, lr_disc = train.get("lr", self.profile.lr), train.get("lr_disc", self.profile.lr_disc)
        self.optimizers = {
            "model": torch.optim.Adam(self.models["model"].parameters(), lr=lr, betas=GAN_BETAS),
            "discriminator": torch.optim.Adam(self.models["discriminator"].parameters(), lr=lr_disc, betas=GAN_BETAS),
        }
        self.targets: list[Tensor] | None = None  # the frozen backbone's features of every training image, if kept

    @torch.no_grad()
    def cache_targets(self, images: Tensor, batch_size: int, channels_last: bool) -> int:
        """Keep Eq. 12's targets ``phi(x)`` -- the frozen backbone's features of every training image -- for the run.

        The backbone is frozen and in eval mode, so ``phi(x)`` of a training image never changes; when every batch
        is ``images[index]`` unchanged (no flips, turns or crops: the fixed-orientation categories, which include the
        noise study's core) the step gathers them instead of running the backbone on ``x`` (about an eighth of the
        ``cpu``-profile step, chapter 14). They are computed in batches of ``batch_size`` in the step's layout, and
        the backbone's output for an image does not depend on the other images of its batch, so the run's numbers
        are those of the uncached step to the last bit (``tests/test_train.py`` trains both and compares every
        weight). Kept only up to :data:`TARGET_CACHE_BYTES`; returns the bytes kept (0: computed in every step).
        """
        self.targets = None
        n = images.shape[0]
        if TARGET_CACHE_BYTES <= 0 or n == 0:
            return 0
        kept: list[list[Tensor]] = []
        for start in range(0, n, batch_size):
            chunk = images[start : start + batch_size]
            if channels_last:
                chunk = chunk.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                kept.append(self.backbone(chunk))
            per_image = sum(f[0].numel() * f.element_size() for f in kept[0])
            if per_image * n > TARGET_CACHE_BYTES:
                return 0
        self.targets = [torch.cat(level) for level in zip(*kept, strict=True)]
        return sum(t.numel() * t.element_size() for t in self.targets)

    def step(self, x: Tensor, step: int, index: Tensor | None = None) -> dict[str, float]:
        from trustmae_lib.model.losses import (
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
        self.agree(check_finite({"disc": float(d_loss.detach())}, step))
        self.backward_step(d_loss, self.optimizers["discriminator"])

        # Generator step, Eq. 9 (D frozen, called unwrapped so its DDP reducer is not involved).
        disc_raw.requires_grad_(False)
        with self.autocast():
            logits, feats = disc_raw(torch.cat([x, recon.to(x.dtype)]))
            if self.targets is not None and index is not None:  # cache_targets: x == images[index]
                feats_x = [t[index] for t in self.targets]
            else:
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


class BaselineMethod(Method):
    """Plain reconstruction training of a Table-4 baseline (supplement §B)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from trustmae_lib.model.baselines import get_baseline

        self.baseline = get_baseline(self.spec.method)
        self.backbone_info = {"name": None, "weights_source": "not used (scored by its residual map)"}
        lr = self.spec.reading_overrides("train").get("lr")  # a reading's learning rate (MemAE's), else §B's
        self.optimizers = {"model": self.baseline.optimizer(self.models["model"], lr=lr)}

    def step(self, x: Tensor, step: int, index: Tensor | None = None) -> dict[str, float]:
        with self.autocast():
            out = self.wrapped["model"](x)
        out = out._replace(recon=out.recon.float(), weights=None if out.weights is None else out.weights.float())
        loss, log = self.baseline.loss(x.float(), out)
        self.agree(check_finite(log, step))
        self.backward_step(loss, self.optimizers["model"])
        self.end_step()
        return dict(log)
