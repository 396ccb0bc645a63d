"""The discriminator of the adversarial losses (supplement Table 2; Eq. 13-15 use its logits and features).

Six Conv 4x4 (S2, P1) to 32, 64, 128, 256, 512, 1024, each followed by LeakyReLU(0.2), then Conv 3x3 (S1,
P1) to one logit per ``h/64 x w/64`` patch. No normalisation (Table 2 lists none). The six activations are
returned for the feature-matching loss ``L_feat`` (Eq. 15).

Readings: convolutions keep their bias; spectral normalisation is an option (default off, not in Table 2);
``width`` scales channels like :func:`trustmae_lib.model.trustmae.scale_channels`.
"""

from __future__ import annotations

from torch import Tensor, nn

from trustmae_lib.errors import TrustMAEError
from trustmae_lib.model.trustmae import ConvNormAct, scale_channels

DISC_CHANNELS = (32, 64, 128, 256, 512, 1024)  # Table 2
MIN_SIDE = 64  # six stride-2 stages: h/64 must be >= 1


class Discriminator(nn.Module):
    """Patch discriminator of supplement Table 2.

    Args:
        width: channel multiplier (1.0 = Table 2).
        in_channels: image channels.
        spectral_norm: wrap every conv in spectral normalisation (a reading; off in Table 2).

    Example:
        >>> import torch
        >>> logits, feats = Discriminator(width=0.125)(torch.zeros(2, 3, 64, 64))
        >>> logits.shape, len(feats)
        (torch.Size([2, 1, 1, 1]), 6)
    """

    def __init__(self, width: float = 1.0, in_channels: int = 3, spectral_norm: bool = False):
        super().__init__()
        if not 0 < width <= 4:
            raise TrustMAEError(f"width {width} must be in (0, 4]; 1.0 is supplement Table 2")
        self.in_channels = in_channels
        blocks, prev = [], in_channels
        for c in DISC_CHANNELS:
            c = scale_channels(c, width)
            blocks.append(ConvNormAct(prev, c, 4, 2, 1, norm=None, act="lrelu", spectral_norm=spectral_norm))
            prev = c
        self.blocks = nn.ModuleList(blocks)
        self.head = ConvNormAct(prev, 1, 3, 1, 1, norm=None, act=None, spectral_norm=spectral_norm)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Score every patch of ``x``.

        Args:
            x: ``(B, C_in, H, W)`` images in ``[-1, 1]``, ``H, W >= 64``.

        Returns:
            ``logits (B, 1, H/64, W/64)`` and the six LeakyReLU activations ``(B, C_l, H/2^l, W/2^l)``.
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise TrustMAEError(
                f"Discriminator expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}; pass image batches"
            )
        if min(x.shape[-2:]) < MIN_SIDE:
            raise TrustMAEError(
                f"Discriminator needs images of at least {MIN_SIDE}x{MIN_SIDE} (six stride-2 "
                f"stages, Table 2), got {x.shape[-2]}x{x.shape[-1]}; use image_size >= 64"
            )
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return self.head(x), features

    def table_layers(self) -> list[tuple[str, str, nn.Module]]:
        """``(part, name, module)`` of every Table-2 row (used by :func:`trustmae_lib.model.trustmae.layer_table`)."""
        rows = [("discriminator", f"blocks.{i}", b) for i, b in enumerate(self.blocks)]
        return rows + [("discriminator", "head", self.head)]
