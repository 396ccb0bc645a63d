"""The baselines of supplement Table 4: MemAE, AE-L2 and AE-SSIM (supplement §B).

* **MemAE** (Gong et al., ICCV 2019): a 2D port of the official video code
  (donggong1/memae-anomaly-detection), written from that code's architecture, stated here. Encoder: four 3x3
  stride-2 convolutions (96, 128, 256, 256 channels at width 1; the last one outputs ``latent_dim``), each followed by
  batch norm and LeakyReLU(0.2). Memory of 128 x 256: softmax of dot products, hard shrinkage ``relu(w -
  lambda) w / (|w - lambda| + eps)`` with ``lambda = 0.0025``, ``eps = 1e-12``, L1 renormalisation
  (:class:`~trustmae_lib.model.memory.MemoryModule` with ``addressing="shrink", similarity="dot", temperature=1``).
  Decoder: four 3x3 stride-2 transposed convolutions (256, 128, 96, image channels; padding 1, output padding
  1), batch norm + LeakyReLU(0.2) except after the last. Loss: MSE + 0.0002 x mean entropy of the addressing
  weights; Adam, lr 1e-4 (supplement §B). Scored by the per-pixel squared reconstruction error.
* **AE-L2 / AE-SSIM** (Bergmann et al., VISAPP 2019, in the setting of Dehaene et al. 2020): the convolutional
  auto-encoder with a 100-d latent vector at 128 x 128 px; AE-L2 trains on and scores with the squared error,
  AE-SSIM with ``1 - SSIM`` (11 x 11 window). Textures are resized to 4x the input size (512 px), trained on
  random input-size crops and scored with sliding windows (:func:`random_crops`, :func:`sliding_window_map`).

*Readings* (not fixed by the supplement; the book lists them under "Deviations and readings"):

* MemAE's final activation is ``tanh`` (the official video code has none; our images are in [-1, 1]);
  ``output_activation="linear"`` gives the official form.
* Bergmann et al. apply LeakyReLU(0.2) "for each layer except the output layers of both the encoder and the
  decoder": the 100-d latent code and the reconstruction are linear. We keep that (default
  ``output_activation="linear"``; ``"tanh"`` is available). Their network has no batch norm, so neither has
  ours.
* Bergmann paddings: 4x4 stride-2 layers use padding 1 (exact halving / doubling), 3x3 stride-1 layers
  padding 1, the latent layer is a valid convolution with kernel ``image_size / 16`` (8 at 128 px); the
  decoder mirrors every layer with a transposed convolution of the same kernel, stride and padding.
* ``width`` scales every hidden channel count (rounded, at least 1); MemAE's ``latent_dim`` (the memory
  dimension) and Bergmann's 100-d latent are separate arguments. The registry scales MemAE with the profile's
  width (latent ``256 x width``, 128 slots at every profile) and builds the Bergmann AE at width 1 (it is
  small: 1.05 M parameters).
* Adam betas are PyTorch's defaults ``(0.9, 0.999)`` for all three (the supplement names Adam and lr 1e-4).
* Residual maps average the per-channel error over the colour channels (so ``ae_l2_loss`` is the map's mean).
  AE-SSIM trains on ``1 - mean SSIM`` over valid window positions and scores with the mirror-padded
  (``padding="same"``) ``1 - SSIM`` map, which has the image's size.
* Texture windows are scored with stride ``window / 4`` (32 px at 128 px), so that they tile the image
  exactly; overlapping windows are averaged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trustmae_lib.errors import TrustMAEError
from trustmae_lib.model.losses import ssim
from trustmae_lib.model.memory import MemoryModule, entropy_loss

OUTPUT_ACTIVATIONS = ("tanh", "linear")


class BaselineOutput(NamedTuple):
    """What a baseline returns for a ``(B, C, H, W)`` input."""

    recon: Tensor  # (B, C, H, W): the reconstruction
    weights: Tensor | None  # (B, h, w, M) memory addressing weights (MemAE); None for the plain auto-encoders


def _ch(n: int, width: float) -> int:
    """Channel count ``n`` scaled by ``width`` (rounded, at least 1)."""
    return max(1, int(round(n * width)))


def _check_activation(name: str) -> None:
    if name not in OUTPUT_ACTIVATIONS:
        raise TrustMAEError(f"unknown output_activation '{name}'; use one of {', '.join(OUTPUT_ACTIVATIONS)}")


def _check_images(x: Tensor, channels: int, multiple: int, what: str) -> None:
    if x.dim() != 4 or x.shape[1] != channels:
        raise TrustMAEError(
            f"{what} expects images of shape (B, {channels}, H, W), got {tuple(x.shape)}; "
            "pass a batch of images with that many channels"
        )
    if x.shape[-1] % multiple or x.shape[-2] % multiple:
        raise TrustMAEError(
            f"{what} needs H and W divisible by {multiple}, got {tuple(x.shape[-2:])}; "
            f"resize the images to a multiple of {multiple}"
        )


# ------------------------------------------------------------------------------------------------------------
# MemAE (2D port)
# ------------------------------------------------------------------------------------------------------------


class MemAE2D(nn.Module):
    """MemAE (Gong et al. 2019) with the official 3D video network ported to 2D (supplement §B).

    Args:
        in_channels: image channels.
        memory_slots: ``M`` (128 in supplement §B).
        latent_dim: memory dimension = channels of the last encoder convolution (256 in supplement §B).
        shrink_threshold: hard-shrinkage ``lambda`` (official code: 0.0025).
        width: multiplier of the hidden channels 96, 128, 256 (not of ``latent_dim``).
        output_activation: ``"tanh"`` (default, *reading*) or ``"linear"`` (official code).
        use_memory: ``False`` = the same encoder and decoder without the memory (the decoder reads the encoder's
            output): the twin that shows what the memory adds.

    Example:
        >>> net = MemAE2D(memory_slots=16, latent_dim=32, width=0.25)
        >>> out = net(torch.randn(2, 3, 64, 64))
        >>> out.recon.shape, out.weights.shape
        (torch.Size([2, 3, 64, 64]), torch.Size([2, 4, 4, 16]))
    """

    def __init__(
        self,
        in_channels: int = 3,
        memory_slots: int = 128,
        latent_dim: int = 256,
        shrink_threshold: float = 0.0025,
        width: float = 1.0,
        output_activation: str = "tanh",
        use_memory: bool = True,
    ):
        super().__init__()
        _check_activation(output_activation)
        if width <= 0:
            raise TrustMAEError(f"width {width} must be > 0; 1.0 is the official MemAE network")
        self.in_channels, self.output_activation = in_channels, output_activation
        enc = [in_channels, _ch(96, width), _ch(128, width), _ch(256, width), latent_dim]
        layers: list[nn.Module] = []
        for cin, cout in zip(enc[:-1], enc[1:], strict=True):  # four 3x3 stride-2 convs, BN, LeakyReLU(0.2)
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2)]
        self.encoder = nn.Sequential(*layers)
        self.memory = (
            MemoryModule(
                memory_slots,
                latent_dim,
                addressing="shrink",
                similarity="dot",
                temperature=1.0,
                shrink_threshold=shrink_threshold,
                eps=1e-12,
            )
            if use_memory
            else None
        )
        dec = [latent_dim, _ch(256, width), _ch(128, width), _ch(96, width), in_channels]
        layers = []
        for i, (cin, cout) in enumerate(zip(dec[:-1], dec[1:], strict=True)):
            # 3x3 stride-2 transposed conv, padding 1, output padding 1: exact doubling
            layers.append(nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1))
            if i < len(dec) - 2:  # no BN / activation after the last layer
                layers += [nn.BatchNorm2d(cout), nn.LeakyReLU(0.2)]
        self.decoder = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> BaselineOutput:
        """Reconstruct ``x``.

        Args:
            x: ``(B, C, H, W)`` in [-1, 1], ``H`` and ``W`` divisible by 16.

        Returns:
            :class:`BaselineOutput` with ``recon (B, C, H, W)`` and ``weights (B, H/16, W/16, M)``.
        """
        _check_images(x, self.in_channels, 16, "MemAE2D")
        z = self.encoder(x)  # (B, latent_dim, H/16, W/16)
        mem = self.memory(z) if self.memory is not None else None  # read-out = weights x slots
        recon = self.decoder(z if mem is None else mem.read)  # (B, C, H, W)
        if self.output_activation == "tanh":
            recon = torch.tanh(recon)
        return BaselineOutput(recon=recon, weights=None if mem is None else mem.weights)


def memae_loss(x: Tensor, out: BaselineOutput, entropy_weight: float = 0.0002) -> tuple[Tensor, dict[str, float]]:
    """MemAE's training loss: ``MSE(x, recon) + entropy_weight * mean entropy of the weights``.

    Args:
        x: ``(B, C, H, W)`` input images.
        out: the :class:`MemAE2D` output for ``x``.
        entropy_weight: weight of the entropy term (official code: 0.0002).

    Returns:
        ``(total, {"loss", "recon", "entropy"})``: a scalar tensor and its parts as floats. Without weights (the
        memory-less twin, ``MemAE2D(use_memory=False)``) the entropy term is 0: the loss is the MSE.
    """
    recon = F.mse_loss(out.recon, x)
    # mean over locations of -sum_i w_i log(w_i + 1e-12)
    entropy = recon.new_zeros(()) if out.weights is None else entropy_loss(out.weights)
    total = recon + entropy_weight * entropy
    return total, {
        "loss": float(total.detach()),
        "recon": float(recon.detach()),
        "entropy": float(entropy.detach()),
    }


# ------------------------------------------------------------------------------------------------------------
# Bergmann et al. (VISAPP 2019) convolutional auto-encoder: AE-L2 / AE-SSIM
# ------------------------------------------------------------------------------------------------------------

#: Encoder of Bergmann et al. before the latent layer: (kernel, stride, padding, channels at width 1).
BERGMANN_LAYERS = (
    (4, 2, 1, 32),
    (4, 2, 1, 32),
    (3, 1, 1, 32),
    (4, 2, 1, 64),
    (3, 1, 1, 64),
    (4, 2, 1, 128),
    (3, 1, 1, 64),
    (3, 1, 1, 32),
)


class BergmannAE(nn.Module):
    """Convolutional auto-encoder of Bergmann et al. (VISAPP 2019) with a ``latent_dim``-d bottleneck.

    Encoder (kernel/stride -> channels): 4/2->32, 4/2->32, 3/1->32, 4/2->64, 3/1->64, 4/2->128, 3/1->64,
    3/1->32, then a valid convolution with kernel ``image_size / 16`` -> ``latent_dim`` x 1 x 1. The decoder
    mirrors it with transposed convolutions. LeakyReLU(0.2) after every layer except the latent layer and the
    output layer.

    Args:
        image_size: input side (128 in the paper); a multiple of 16.
        latent_dim: size of the latent code (100 in supplement §B).
        in_channels: image channels.
        width: multiplier of the hidden channels (not of ``latent_dim``).
        output_activation: ``"linear"`` (default, Bergmann et al.) or ``"tanh"``.

    Example:
        >>> ae = BergmannAE(image_size=64)
        >>> ae(torch.randn(2, 3, 64, 64)).recon.shape
        torch.Size([2, 3, 64, 64])
    """

    def __init__(
        self,
        image_size: int = 128,
        latent_dim: int = 100,
        in_channels: int = 3,
        width: float = 1.0,
        output_activation: str = "linear",
    ):
        super().__init__()
        _check_activation(output_activation)
        if image_size < 16 or image_size % 16:
            raise TrustMAEError(
                f"BergmannAE image_size {image_size} must be a positive multiple of 16 "
                "(four stride-2 stages, then a valid conv); use e.g. 64 or 128"
            )
        if width <= 0:
            raise TrustMAEError(f"width {width} must be > 0; 1.0 is the network of Bergmann et al.")
        self.image_size, self.in_channels, self.latent_dim = image_size, in_channels, latent_dim
        self.output_activation = output_activation
        bottleneck = image_size // 16  # 8 at 128 px
        chans = [in_channels] + [_ch(c, width) for *_, c in BERGMANN_LAYERS]
        enc: list[nn.Module] = []
        for (k, s, p, _), cin, cout in zip(BERGMANN_LAYERS, chans[:-1], chans[1:], strict=True):
            enc += [nn.Conv2d(cin, cout, k, stride=s, padding=p), nn.LeakyReLU(0.2)]
        enc.append(nn.Conv2d(chans[-1], latent_dim, bottleneck))  # valid conv -> (B, d, 1, 1), linear
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.ConvTranspose2d(latent_dim, chans[-1], bottleneck), nn.LeakyReLU(0.2)]
        mirrored = list(zip(BERGMANN_LAYERS, chans[:-1], chans[1:], strict=True))[::-1]
        for i, ((k, s, p, _), cout, cin) in enumerate(mirrored):
            dec.append(nn.ConvTranspose2d(cin, cout, k, stride=s, padding=p))
            if i < len(mirrored) - 1:  # the output layer stays linear
                dec.append(nn.LeakyReLU(0.2))
        self.decoder = nn.Sequential(*dec)

    def forward(self, x: Tensor) -> BaselineOutput:
        """Reconstruct ``x``.

        Args:
            x: ``(B, C, image_size, image_size)`` in [-1, 1].

        Returns:
            :class:`BaselineOutput` with ``recon (B, C, image_size, image_size)`` and ``weights=None``.
        """
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_channels, self.image_size, self.image_size):
            raise TrustMAEError(
                f"BergmannAE expects (B, {self.in_channels}, {self.image_size}, {self.image_size}), "
                f"got {tuple(x.shape)}; resize or crop the images to the model's image_size"
            )
        recon = self.decoder(self.encoder(x))  # (B, d, 1, 1) in between
        if self.output_activation == "tanh":
            recon = torch.tanh(recon)
        return BaselineOutput(recon=recon, weights=None)


# ------------------------------------------------------------------------------------------------------------
# Losses and residual maps
# ------------------------------------------------------------------------------------------------------------


def ae_l2_loss(x: Tensor, recon: Tensor) -> Tensor:
    """AE-L2 training loss: mean per-pixel squared error. ``x, recon: (B, C, H, W)`` -> scalar."""
    return F.mse_loss(recon, x)


def ae_ssim_loss(x: Tensor, recon: Tensor) -> Tensor:
    """AE-SSIM training loss: ``1 - mean SSIM`` (11 x 11 Gaussian window, sigma 1.5, valid positions).

    ``x, recon: (B, C, H, W)`` in [-1, 1] -> scalar.
    """
    return 1.0 - ssim(x, recon, window_size=11, sigma=1.5, reduction="mean", padding="valid")


def l2_residual_map(x: Tensor, recon: Tensor) -> Tensor:
    """Per-pixel squared error averaged over channels: ``(B, C, H, W) x 2 -> (B, 1, H, W)``."""
    return (x - recon).pow(2).mean(1, keepdim=True)


def ssim_residual_map(x: Tensor, recon: Tensor) -> Tensor:
    """``1 - SSIM`` map (11 x 11 window) averaged over channels: ``(B, C, H, W) x 2 -> (B, 1, H, W)``.

    The image is mirror-padded (``padding="same"``) so that the map has the image's size.
    """
    return 1.0 - ssim(x, recon, window_size=11, sigma=1.5, reduction="none", padding="same")


# ------------------------------------------------------------------------------------------------------------
# Texture protocol: random crops for training, sliding windows for scoring (supplement §B)
# ------------------------------------------------------------------------------------------------------------


def random_crops(
    images: Tensor, crop: int, generator: torch.Generator | None = None, index: Tensor | None = None
) -> Tensor:
    """One random ``crop x crop`` patch per image (training on textures, supplement §B).

    Args:
        images: ``(N, C, S, S)`` (any ``H, W >= crop``).
        crop: patch side.
        generator: a CPU ``torch.Generator`` for reproducible offsets.
        index: optional ``(B,)`` long: crop from ``images[index]`` without copying those whole images first (the
            training loop's batch draw); default all ``N`` images.

    Returns:
        ``(B, C, crop, crop)`` (``B = N`` without ``index``).
    """
    if images.dim() != 4:
        raise TrustMAEError(f"random_crops expects (B, C, H, W) images, got shape {tuple(images.shape)}")
    _, _, h, w = images.shape
    b = images.shape[0] if index is None else index.shape[0]
    if not 0 < crop <= min(h, w):
        raise TrustMAEError(
            f"crop {crop} must be in [1, {min(h, w)}] for images of size {h}x{w}; use a smaller crop or larger images"
        )
    top = torch.randint(0, h - crop + 1, (b,), generator=generator).to(images.device)
    left = torch.randint(0, w - crop + 1, (b,), generator=generator).to(images.device)
    offs = torch.arange(crop, device=images.device)
    rows = (top[:, None] + offs)[:, :, None]  # (B, crop, 1)
    cols = (left[:, None] + offs)[:, None, :]  # (B, 1, crop)
    batch = (torch.arange(b, device=images.device) if index is None else index.to(images.device))[:, None, None]
    # advanced indices around a slice: the broadcast dims come first -> (B, crop, crop, C)
    return images[batch, :, rows, cols].permute(0, 3, 1, 2).contiguous()


def sliding_window_map(
    model_fn: Callable[[Tensor], Tensor],
    images: Tensor,
    window: int = 128,
    stride: int | None = None,
    residual_fn: Callable[[Tensor, Tensor], Tensor] = l2_residual_map,
    max_windows: int = 256,
) -> Tensor:
    """Residual map of large images, reconstructed window by window and averaged where windows overlap.

    Every ``window x window`` patch on a grid with step ``stride`` is reconstructed by ``model_fn`` (in
    batches of ``max_windows`` patches), its residual map is computed by ``residual_fn``, and the maps are put
    back in place with ``fold``; each pixel gets the mean over the windows that cover it.

    Args:
        model_fn: ``(N, C, window, window) -> (N, C, window, window)`` reconstruction (model in eval mode).
        images: ``(B, C, S, S)`` (any ``H, W``).
        window: window side (the auto-encoder's input size).
        stride: grid step; ``None`` -> ``window // 4``. ``H - window`` and ``W - window`` must be multiples of
            it, so that the windows cover every pixel.
        residual_fn: ``(x, recon) -> (N, 1, window, window)``, e.g. :func:`l2_residual_map`.
        max_windows: most patches per ``model_fn`` call.

    Returns:
        ``(B, 1, H, W)`` anomaly map.
    """
    if images.dim() != 4:
        raise TrustMAEError(f"sliding_window_map expects (B, C, H, W) images, got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    stride = max(1, window // 4) if stride is None else stride
    if window > min(h, w) or stride < 1:
        raise TrustMAEError(
            f"window {window} / stride {stride} do not fit images of size {h}x{w}; "
            "use a window no larger than the image and a stride >= 1"
        )
    if (h - window) % stride or (w - window) % stride:
        raise TrustMAEError(
            f"stride {stride} does not tile {h}x{w} images with {window}-px windows; pick a stride "
            f"that divides {h - window} and {w - window} (e.g. window // 4 with sizes 4x window)"
        )
    kernel = dict(kernel_size=window, stride=stride)
    cols = F.unfold(images, **kernel)  # (B, C*window*window, L)
    n_win = cols.shape[-1]
    patches = cols.transpose(1, 2).reshape(b * n_win, c, window, window)  # (B*L, C, window, window)
    maps = []
    for chunk in patches.split(max_windows):
        maps.append(residual_fn(chunk, model_fn(chunk)))  # (n, 1, window, window)
    res = torch.cat(maps).reshape(b, n_win, window * window).transpose(1, 2)  # (B, window*window, L)
    summed = F.fold(res, output_size=(h, w), **kernel)  # (B, 1, H, W): sum over covering windows
    ones = torch.ones(1, 1, h, w, dtype=images.dtype, device=images.device)
    count = F.fold(F.unfold(ones, **kernel), output_size=(h, w), **kernel)  # (1, 1, H, W) windows per pixel
    return summed / count


# ------------------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaselineSpec:
    """How to build, train and score one baseline of supplement Table 4.

    Attributes:
        name: method name (``"memae"``, ``"ae_l2"``, ``"ae_ssim"``).
        build: ``(profile, **overrides) -> nn.Module`` returning :class:`BaselineOutput` (overrides: constructor
            arguments of a reading, e.g. MemAE's ``shrink_threshold``).
        loss: ``(x, out) -> (total scalar tensor, {name: float})``.
        residual_map: ``(x, recon) -> (B, 1, H, W)`` anomaly map (how the method scores).
        input_size: ``profile -> int``, side of the images (or crops) the model sees.
        lr: Adam learning rate (supplement §B: 1e-4).
        betas: Adam betas (*reading*: PyTorch defaults).
        texture_protocol: textures are resized to ``texture_scale x input_size``, trained on random crops and
            scored with :func:`sliding_window_map` (AE-L2 / AE-SSIM only, supplement §B).
        texture_scale: resize factor of textures (512 / 128 = 4 in the paper).
    """

    name: str
    build: Callable[..., nn.Module]
    loss: Callable[[Tensor, BaselineOutput], tuple[Tensor, dict[str, float]]]
    residual_map: Callable[[Tensor, Tensor], Tensor]
    input_size: Callable[[object], int]
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    texture_protocol: bool = False
    texture_scale: int = 4

    def texture_size(self, profile) -> int:
        """Side textures are resized to before cropping (512 at 128 px)."""
        return self.texture_scale * self.input_size(profile)

    def texture_stride(self, profile) -> int:
        """Sliding-window step for scoring textures (*reading*: a quarter window)."""
        return max(1, self.input_size(profile) // 4)

    def optimizer(self, model: nn.Module, lr: float | None = None) -> torch.optim.Adam:
        """Adam with this baseline's betas and lr (``lr`` overrides it, e.g. for a quick test)."""
        return torch.optim.Adam(model.parameters(), lr=self.lr if lr is None else lr, betas=self.betas)


def _memae_build(profile, **overrides) -> MemAE2D:
    return MemAE2D(**{"memory_slots": 128, "latent_dim": _ch(256, profile.width), "width": profile.width, **overrides})


def _memae_input(profile) -> int:
    return profile.image_size  # 256 px in supplement §B


def _bergmann_input(profile) -> int:
    return min(128, profile.image_size)


def _bergmann_build(profile, **overrides) -> BergmannAE:
    return BergmannAE(**{"image_size": _bergmann_input(profile), "latent_dim": 100, **overrides})


def _ae_l2(x: Tensor, out: BaselineOutput) -> tuple[Tensor, dict[str, float]]:
    loss = ae_l2_loss(x, out.recon)
    return loss, {"loss": float(loss.detach())}


def _ae_ssim(x: Tensor, out: BaselineOutput) -> tuple[Tensor, dict[str, float]]:
    loss = ae_ssim_loss(x, out.recon)
    return loss, {"loss": float(loss.detach())}


BASELINES: dict[str, BaselineSpec] = {
    "memae": BaselineSpec(
        name="memae",
        build=_memae_build,
        loss=memae_loss,
        residual_map=l2_residual_map,
        input_size=_memae_input,
    ),
    "ae_l2": BaselineSpec(
        name="ae_l2",
        build=_bergmann_build,
        loss=_ae_l2,
        residual_map=l2_residual_map,
        input_size=_bergmann_input,
        texture_protocol=True,
    ),
    "ae_ssim": BaselineSpec(
        name="ae_ssim",
        build=_bergmann_build,
        loss=_ae_ssim,
        residual_map=ssim_residual_map,
        input_size=_bergmann_input,
        texture_protocol=True,
    ),
}


def get_baseline(name: str) -> BaselineSpec:
    """The :class:`BaselineSpec` of ``name``, or a one-line error listing the known baselines."""
    if name not in BASELINES:
        raise TrustMAEError(f"unknown baseline '{name}'; choose one of {', '.join(BASELINES)}")
    return BASELINES[name]
