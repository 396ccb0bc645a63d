"""The TrustMAE memory auto-encoder, supplement Table 1, plus :func:`layer_table` for the book's comparison.

Encoder: Conv 7x7/32 (S1, P3) -> five Conv 3x3 (S2, P1) to 64, 128, 256, 512, 512 (``h/2 ... h/32``) ->
three residual blocks at 512; every conv is followed by CBN and ReLU. Memory module ``in R^{512 x M}``
(:mod:`~trustmae_lib.model.memory`, trust region :mod:`~trustmae_lib.model.trust_region`). Decoder: three residual
blocks -> ConvTranspose 4x4 (S2, P1) to 512, 256, 128, 64 with CBN + ReLU -> ConvTranspose to 32 with
InstanceNorm + ReLU -> Conv 7x7/3 (S1, P3) + tanh.

Readings (not fixed by Table 1):

* residual block = ``x + ReLU(CBN(Conv3x3(x)))`` -- Table 1 lists one conv, one CBN and one ReLU per block;
* convolutions followed by a normalisation have no bias (the norm's shift replaces it); the last conv has one;
* InstanceNorm without affine parameters (PyTorch default, as in pix2pixHD);
* PyTorch's default weight initialisation;
* ``width`` scales every channel count to ``max(4, round(c * width))`` (CPU profiles); width 1 is the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from trustmae_lib.errors import TrustMAEError
from trustmae_lib.model.cbn import ConditionalBatchNorm2d, check_class_ids
from trustmae_lib.model.memory import MemoryModule, MemoryReadout, entropy_loss
from trustmae_lib.model.trust_region import TrustRegion, margin_loss

ENCODER_CHANNELS = (32, 64, 128, 256, 512, 512)  # Table 1: conv_in, then the five stride-2 convs
DECODER_CHANNELS = (512, 256, 128, 64, 32)  # Table 1: the five transposed convs
RESIDUAL_BLOCKS = 3
DOWNSAMPLE = 32  # five stride-2 stages


def scale_channels(channels: int, width: float) -> int:
    """Channels at width multiplier ``width``: ``max(4, round(channels * width))``; unchanged at width 1."""
    if width == 1.0:
        return channels
    return max(4, int(round(channels * width)))


class ConvNormAct(nn.Module):
    """Conv (or ConvTranspose) -> optional norm (``"cbn"``, ``"in"``) -> optional activation; one Table-1 row.

    Args:
        in_channels, out_channels, kernel, stride, padding: the convolution.
        norm: ``"cbn"`` (conditional batch norm), ``"in"`` (instance norm) or ``None``.
        act: ``"relu"``, ``"lrelu"`` (LeakyReLU 0.2), ``"tanh"`` or ``None``.
        transposed: use :class:`torch.nn.ConvTranspose2d`.
        num_classes: classes of the CBN.
        spectral_norm: wrap the conv in spectral normalisation (discriminator option).
    """

    _ACT = {
        "relu": ("ReLU", nn.ReLU),
        "lrelu": ("LeakyReLU(0.2)", lambda: nn.LeakyReLU(0.2)),
        "tanh": ("Tanh", nn.Tanh),
        None: ("-", nn.Identity),
    }

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int,
        padding: int,
        norm: str | None = "cbn",
        act: str | None = "relu",
        transposed: bool = False,
        num_classes: int = 1,
        spectral_norm: bool = False,
    ):
        super().__init__()
        conv_cls = nn.ConvTranspose2d if transposed else nn.Conv2d
        self.conv = conv_cls(in_channels, out_channels, kernel, stride, padding, bias=norm is None)
        if spectral_norm:
            self.conv = nn.utils.parametrizations.spectral_norm(self.conv)
        if norm == "cbn":
            self.norm = ConditionalBatchNorm2d(out_channels, num_classes)
        elif norm == "in":
            self.norm = nn.InstanceNorm2d(out_channels)
        else:
            self.norm = None
        act_name, act_cls = self._ACT[act]
        self.act = act_cls()
        self.info = {
            "layer": "ConvTrans" if transposed else "Conv",
            "kernel": kernel,
            "stride": stride,
            "padding": padding,
            "out_channels": out_channels,
            "norm": {"cbn": "CBN", "in": "IN", None: "-"}[norm],
            "activation": act_name,
        }

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """``x: (B, C_in, H, W)``, ``y: (B,)`` class ids or ``None`` -> ``(B, C_out, H', W')``."""
        x = self.conv(x)
        if isinstance(self.norm, ConditionalBatchNorm2d):
            x = self.norm(x, y, validate=False)
        elif self.norm is not None:
            x = self.norm(x)
        return self.act(x)


class ResidualBlock(nn.Module):
    """Table 1 residual block, *reading*: ``x + ReLU(CBN(Conv3x3(x)))`` (S1, P1, channels kept)."""

    def __init__(self, channels: int, num_classes: int = 1):
        super().__init__()
        self.body = ConvNormAct(channels, channels, 3, 1, 1, norm="cbn", act="relu", num_classes=num_classes)
        self.info = {**self.body.info, "layer": "ResBlock"}

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """``(B, C, h, w) -> (B, C, h, w)``."""
        return x + self.body(x, y)


class Encoder(nn.Module):
    """Table 1 encoder: ``(B, 3, H, W) -> (B, C, H/32, W/32)`` with ``C = scale_channels(512, width)``.

    ``stages=4`` (*reading* for small images, the ``cpu`` profile's learned memory) leaves out the last stride-2
    conv (512 -> 512), so a 128-px image gives the 8 x 8 memory grid a 256-px image has in Table 1.
    """

    def __init__(self, width: float = 1.0, num_classes: int = 1, stages: int = 5):
        super().__init__()
        ch = [scale_channels(c, width) for c in ENCODER_CHANNELS[: stages + 1]]
        layers = {"conv_in": ConvNormAct(3, ch[0], 7, 1, 3, num_classes=num_classes)}
        for i in range(1, len(ch)):
            layers[f"down{i}"] = ConvNormAct(ch[i - 1], ch[i], 3, 2, 1, num_classes=num_classes)
        for i in range(1, RESIDUAL_BLOCKS + 1):
            layers[f"res{i}"] = ResidualBlock(ch[-1], num_classes)
        self.layers = nn.ModuleDict(layers)
        self.out_channels = ch[-1]

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        for layer in self.layers.values():
            x = layer(x, y)
        return x


class Decoder(nn.Module):
    """Table 1 decoder: ``(B, C, H/32, W/32) -> (B, 3, H, W)`` in ``[-1, 1]``; ``stages=4`` leaves out the first
    transposed conv (to 512), the mirror of :class:`Encoder`'s."""

    def __init__(self, width: float = 1.0, num_classes: int = 1, stages: int = 5):
        super().__init__()
        c_in = scale_channels(ENCODER_CHANNELS[stages], width)
        ch = [scale_channels(c, width) for c in DECODER_CHANNELS]
        layers: dict[str, nn.Module] = {
            f"res{i}": ResidualBlock(c_in, num_classes) for i in range(1, RESIDUAL_BLOCKS + 1)
        }
        prev = c_in
        skip = len(DECODER_CHANNELS) - stages
        for i, c in enumerate(ch, start=1):
            if i <= skip:
                continue
            last = i == len(ch)
            layers[f"up{i}"] = ConvNormAct(
                prev,
                c,
                4,
                2,
                1,
                norm="in" if last else "cbn",
                act="relu",
                transposed=True,
                num_classes=num_classes,
            )
            prev = c
        layers["conv_out"] = ConvNormAct(prev, 3, 7, 1, 3, norm=None, act="tanh")
        self.layers = nn.ModuleDict(layers)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        for layer in self.layers.values():
            x = layer(x, y)
        return x


@dataclass
class TrustMAEOutput:
    """One forward pass of :class:`TrustMAE`.

    Attributes:
        recon: ``(B, 3, H, W)`` reconstruction in ``[-1, 1]``.
        features: ``(B, C, h, w)`` encoder output (``h = H/32``).
        readout: the memory's :class:`~trustmae_lib.model.memory.MemoryReadout`, ``None`` without memory.
        losses: ``trust`` (``L_trust``), ``margin`` (``L_margin``), ``entropy`` (addressing entropy); zero
            tensors for disabled terms.
        stats: trust-region floats (radii, fractions, mean distance); empty without trust region.
        trusted: ``(B, h, w)`` bool trust-region mask, ``None`` without trust region.
    """

    recon: Tensor
    features: Tensor
    readout: MemoryReadout | None
    losses: dict[str, Tensor]
    stats: dict[str, float] = field(default_factory=dict)
    trusted: Tensor | None = None


class TrustMAE(nn.Module):
    """Memory auto-encoder with trust-region memory updates (supplement Table 1; memory and trust region are
    readings, see :mod:`~trustmae_lib.model.memory` and :mod:`~trustmae_lib.model.trust_region`).

    Args:
        width: channel multiplier (1.0 = Table 1).
        num_classes: classes of every CBN (1 = per-category model).
        memory_slots, memory_topk, memory_temperature, addressing: the memory (:class:`MemoryModule`).
        trust_region: add ``L_trust`` (``False`` = the paper's *w/o TR* ablation: the memory learns only
            through the read-out, no trust term, no detached reads).
        detach_untrusted: untrusted locations address and read a detached memory (only with ``trust_region``).
        inner_quantile, outer_quantile: trust radii as quantiles of recent nearest-slot distances.
        use_memory: ``False`` = plain auto-encoder (decoder reads the encoder output).
        use_margin: compute ``L_margin`` (default off: its default weight is 0, see ``losses.LossWeights``);
            ``None`` = same as ``trust_region``.
        margin: triplet margin of ``L_margin`` (on unit vectors).
        trust_history, fixed_radii, pull: passed to :class:`TrustRegion`.
        similarity, shrink_threshold: passed to :class:`MemoryModule`.
        projection: *reading* -- address the memory in a learned linear 1x1 projection of the encoder output (no
            ReLU), not in the encoder's non-negative ReLU features, where every two locations have a cosine near
            0.65 and cosine addressing cannot tell slots apart. The decoder reads the memory's read-out as before.
        slot_update, ema_decay: how the slots learn (:class:`MemoryModule`); with ``"ema"`` the trust region's bands
            drive :meth:`MemoryModule.ema_update` in every training forward (*w/o TR*: every feature pulls).
        trust_normalised: ``L_trust`` on distances relative to the features' RMS norm (:class:`TrustRegion`).
        stages: stride-2 stages of encoder and decoder (5 = Table 1; 4 = an 8 x 8 memory grid at 128 px).

    Example:
        >>> model = TrustMAE(width=0.125, memory_slots=16, memory_topk=4)
        >>> out = model(torch.zeros(2, 3, 64, 64))
        >>> out.recon.shape, out.features.shape
        (torch.Size([2, 3, 64, 64]), torch.Size([2, 64, 2, 2]))
    """

    def __init__(
        self,
        width: float = 1.0,
        num_classes: int = 1,
        memory_slots: int = 512,
        memory_topk: int = 16,
        memory_temperature: float = 0.1,
        addressing: str = "topk",
        trust_region: bool = True,
        detach_untrusted: bool = True,
        inner_quantile: float = 0.8,
        outer_quantile: float = 0.98,
        use_memory: bool = True,
        use_margin: bool | None = False,
        margin: float = 1.0,
        trust_history: int = 32,
        fixed_radii: tuple[float, float] | None = None,
        pull: str = "squared",
        similarity: str = "cosine",
        shrink_threshold: float = 0.0025,
        projection: bool = False,
        slot_update: str = "gradient",
        ema_decay: float = 0.95,
        trust_normalised: bool = False,
        stages: int = 5,
    ):
        super().__init__()
        if stages not in (4, 5):
            raise TrustMAEError(f"stages must be 5 (Table 1) or 4 (one stride-2 stage fewer), got {stages}")
        if not 0 < width <= 4:
            raise TrustMAEError(f"width {width} must be in (0, 4]; 1.0 is supplement Table 1")
        if num_classes < 1:
            raise TrustMAEError(f"num_classes must be >= 1, got {num_classes}")
        self.hparams = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.num_classes = num_classes
        self.downsample = 2**stages
        self.encoder = Encoder(width, num_classes, stages)
        dim = self.encoder.out_channels
        self.memory = (
            MemoryModule(
                memory_slots,
                dim,
                addressing=addressing,
                topk=memory_topk,
                temperature=memory_temperature,
                shrink_threshold=shrink_threshold,
                similarity=similarity,
                slot_update=slot_update,
                ema_decay=ema_decay,
            )
            if use_memory
            else None
        )
        self.project = nn.Conv2d(dim, dim, 1) if (projection and use_memory) else None
        use_trust = trust_region and use_memory
        self.trust = (
            TrustRegion(
                inner_quantile,
                outer_quantile,
                history=trust_history,
                fixed_radii=fixed_radii,
                pull=pull,
                min_history=min(4, trust_history),
                normalised=trust_normalised,
            )
            if use_trust
            else None
        )
        self.detach_untrusted = detach_untrusted and use_trust
        self.use_margin = use_memory and (trust_region if use_margin is None else use_margin)
        self.margin = margin
        self.decoder = Decoder(width, num_classes, stages)

    @classmethod
    def from_profile(cls, profile, **overrides) -> TrustMAE:
        """Build from a :class:`~trustmae_lib.config.Profile` (width, memory_slots, memory_topk,
        memory_temperature); ``overrides`` replace or add constructor arguments."""
        kwargs = {
            "width": profile.width,
            "memory_slots": profile.memory_slots,
            "memory_topk": profile.memory_topk,
            "memory_temperature": profile.memory_temperature,
        }
        return cls(**{**kwargs, **overrides})

    def check_input(self, x: Tensor, y: Tensor | None = None) -> None:
        """Raise :class:`TrustMAEError` for a batch the network cannot take."""
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise TrustMAEError(
                f"TrustMAE expects images of shape (B, 3, H, W) in [-1, 1], got {shape}; "
                "convert grayscale to RGB and add a batch dimension"
            )
        h, w = x.shape[-2:]
        if h % self.downsample or w % self.downsample or h == 0 or w == 0:
            raise TrustMAEError(
                f"image size {h}x{w} is not a multiple of {self.downsample} (Table 1 has five stride-2 "
                "stages); resize to e.g. 64, 128 or 256"
            )
        if y is None and self.num_classes > 1:
            raise TrustMAEError(f"this model has {self.num_classes} classes; pass the class ids y (B,) to forward")
        check_class_ids(y, x.shape[0], self.num_classes)

    def forward(self, x: Tensor, y: Tensor | None = None) -> TrustMAEOutput:
        """Reconstruct ``x``.

        Args:
            x: ``(B, 3, H, W)`` in ``[-1, 1]``, ``H`` and ``W`` multiples of 32.
            y: ``(B,)`` long class ids (product categories), ``None`` for a one-class model.

        Returns:
            :class:`TrustMAEOutput`.
        """
        self.check_input(x, y)
        z = self.encoder(x, y)  # (B, C, h, w)
        if self.project is not None:
            z = self.project(z)  # (B, C, h, w) memory space: linear, may be negative
        zero = z.new_zeros(())
        losses = {"trust": zero, "margin": zero, "entropy": zero}
        stats: dict[str, float] = {}
        readout = trusted = None
        latent = z
        if self.memory is not None:
            slots = self.memory.memory  # (M, C)
            assignment = None
            if self.trust is not None:
                losses["trust"], stats, trusted, assignment = self.trust(
                    z, slots, return_trusted=True, return_assignment=True
                )
            if self.memory.slot_update == "ema" and self.training:
                stats = {**stats, **self._ema_step(z, assignment)}
            readout = self.memory(z, trusted=trusted if self.detach_untrusted else None)
            if self.use_margin:
                losses["margin"] = margin_loss(z, slots, margin=self.margin, mask=trusted)
            losses["entropy"] = entropy_loss(readout.weights)
            latent = readout.read
        recon = self.decoder(latent, y)  # (B, 3, H, W)
        return TrustMAEOutput(recon=recon, features=z, readout=readout, losses=losses, stats=stats, trusted=trusted)

    def _ema_step(self, z: Tensor, assignment) -> dict[str, float]:
        """One moving-average step of the slots before they are read: the trusted features pull, the doubt band
        pushes (the hinge's ``(delta2 - d) / d`` as strength); without a trust region every feature pulls."""
        from trustmae_lib.model.trust_region import nearest_slot

        if assignment is None:  # w/o TR: plain online k-means over every feature
            rows = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()  # (N, C)
            idx = nearest_slot(rows, self.memory.memory)
            return self.memory.ema_update(rows, idx, torch.ones_like(idx, dtype=torch.bool))
        a = assignment
        scale = (a.outer - a.distance).clamp_min(0) / a.distance.clamp_min(1e-12)  # (N,)
        return self.memory.ema_update(a.rows.float(), a.nearest, a.inside, push=a.between, push_scale=scale)

    def table_layers(self) -> list[tuple[str, str, nn.Module]]:
        """``(part, name, module)`` of every Table-1 row in order (used by :func:`layer_table`)."""
        rows = [("encoder", f"encoder.{n}", m) for n, m in self.encoder.layers.items()]
        if self.memory is not None:
            rows.append(("memory", "memory", self.memory))
        return rows + [("decoder", f"decoder.{n}", m) for n, m in self.decoder.layers.items()]


def layer_table(model: nn.Module, image_size: int, batch_size: int = 1) -> list[dict]:
    """Every layer's parameters and output shape for one ``image_size`` square input (Tables 1 and 2).

    Works for :class:`TrustMAE` and :class:`~trustmae_lib.model.discriminator.Discriminator`. Runs one forward pass
    on zeros in eval mode under ``torch.no_grad`` (the model's mode and buffers are left as they were).

    Returns:
        one dict per row: ``part``, ``name``, ``layer``, ``kernel``, ``stride``, ``padding``,
        ``out_channels``, ``norm``, ``activation``, ``output_shape`` = ``(C, H, W)`` (Table 1 writes
        ``(h, w, c)``); the memory row has ``layer="Memory"`` and ``slots`` = M.
    """
    layers = model.table_layers()
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for _, name, module in layers:

        def hook(_module, _inputs, output, name=name):
            tensor = output.read if isinstance(output, MemoryReadout) else output
            if isinstance(tensor, tuple):  # discriminator head returns (logits, features)
                tensor = tensor[0]
            shapes[name] = tuple(tensor.shape[1:])

        hooks.append(module.register_forward_hook(hook))
    param = next(model.parameters())
    x = torch.zeros(
        batch_size,
        getattr(model, "in_channels", 3),
        image_size,
        image_size,
        device=param.device,
        dtype=param.dtype,
    )
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for handle in hooks:
            handle.remove()
    rows = []
    for part, name, module in layers:
        if isinstance(module, MemoryModule):
            info = {
                "layer": "Memory",
                "kernel": None,
                "stride": None,
                "padding": None,
                "out_channels": module.dim,
                "norm": "-",
                "activation": "-",
                "slots": module.num_slots,
            }
        else:
            info = dict(module.info)
        rows.append({"part": part, "name": name, **info, "output_shape": shapes[name]})
    return rows
