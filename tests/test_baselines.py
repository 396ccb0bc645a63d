"""Tests of the Table 4 baselines: MemAE (2D port), AE-L2 / AE-SSIM (Bergmann et al.), texture protocol."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trustmae_lib.config import load_profile
from trustmae_lib.errors import TrustMAEError
from trustmae_lib.model.baselines import (
    BASELINES,
    BaselineOutput,
    BergmannAE,
    MemAE2D,
    ae_l2_loss,
    ae_ssim_loss,
    get_baseline,
    l2_residual_map,
    memae_loss,
    random_crops,
    sliding_window_map,
    ssim_residual_map,
)


def _smooth_images(b: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [-1, 1] (low-frequency noise, bilinearly upsampled)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, max(2, size // 8), max(2, size // 8), generator=g) * 2 - 1
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1)


def _trace(seq: nn.Sequential, x: torch.Tensor, kinds) -> list[tuple[int, ...]]:
    """Output shapes of the layers of ``seq`` whose type is in ``kinds``."""
    shapes = []
    for layer in seq:
        x = layer(x)
        if isinstance(layer, kinds):
            shapes.append(tuple(x.shape[1:]))
    return shapes


# ------------------------------------------------------------------------------------------------------ MemAE


def test_memae_architecture_matches_official_port():
    net = MemAE2D().eval()  # width 1: exactly the official channel counts, 128 x 256 memory
    convs = [m for m in net.encoder if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [96, 128, 256, 256]
    assert all(c.kernel_size == (3, 3) and c.stride == (2, 2) and c.padding == (1, 1) for c in convs)
    deconvs = [m for m in net.decoder if isinstance(m, nn.ConvTranspose2d)]
    assert [d.out_channels for d in deconvs] == [256, 128, 96, 3]
    assert all(d.kernel_size == (3, 3) and d.stride == (2, 2) and d.output_padding == (1, 1) for d in deconvs)
    # BN + LeakyReLU(0.2) after every encoder conv and every decoder deconv but the last
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.encoder) == 4
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.decoder) == 3
    assert isinstance(net.decoder[-1], nn.ConvTranspose2d)
    assert all(m.negative_slope == 0.2 for m in net.modules() if isinstance(m, nn.LeakyReLU))
    assert tuple(net.memory.memory.shape) == (128, 256)
    assert (net.memory.addressing, net.memory.similarity, net.memory.temperature) == ("shrink", "dot", 1.0)
    assert net.memory.shrink_threshold == 0.0025 and net.memory.eps == 1e-12
    x = _smooth_images(1, 256)
    with torch.no_grad():
        enc = _trace(net.encoder, x, nn.Conv2d)
        assert enc == [(96, 128, 128), (128, 64, 64), (256, 32, 32), (256, 16, 16)]
        dec = _trace(net.decoder, torch.zeros(1, 256, 16, 16), nn.ConvTranspose2d)
        assert dec == [(256, 32, 32), (128, 64, 64), (96, 128, 128), (3, 256, 256)]
        out = net(x)
    assert out.recon.shape == x.shape and out.weights.shape == (1, 16, 16, 128)
    assert out.recon.abs().max() <= 1  # tanh output


def test_memae_width_scales_hidden_channels_not_latent():
    net = MemAE2D(memory_slots=16, latent_dim=40, width=0.25)
    convs = [m.out_channels for m in net.encoder if isinstance(m, nn.Conv2d)]
    assert convs == [24, 32, 64, 40]
    assert [m.out_channels for m in net.decoder if isinstance(m, nn.ConvTranspose2d)] == [64, 32, 24, 3]
    out = net(_smooth_images(2, 64))
    assert out.recon.shape == (2, 3, 64, 64) and out.weights.shape == (2, 4, 4, 16)
    lin = MemAE2D(memory_slots=16, latent_dim=40, width=0.25, output_activation="linear")
    with pytest.raises(TrustMAEError):
        lin(torch.zeros(1, 3, 40, 40))  # not a multiple of 16
    with pytest.raises(TrustMAEError):
        MemAE2D(output_activation="sigmoid")


def test_memae_weights_follow_hard_shrinkage_formula():
    torch.manual_seed(0)
    net = MemAE2D(memory_slots=64, latent_dim=32, width=0.25).eval()
    with torch.no_grad():
        net.memory.memory.normal_(0.0, 10.0)  # large dot products -> peaked softmax, so shrinkage bites
        x = _smooth_images(2, 64, seed=1)
        out = net(x)
        readout = net.memory(net.encoder(x))
    w = out.weights  # (B, h, w, M)
    torch.testing.assert_close(w, readout.weights)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
    lam, eps = 0.0025, 1e-12
    soft = torch.softmax(readout.similarity, dim=-1)  # dot products, temperature 1
    # the similarity really is the dot product of features and slots
    z = net.encoder(x).permute(0, 2, 3, 1)
    torch.testing.assert_close(readout.similarity, z @ net.memory.memory.T, rtol=1e-4, atol=1e-4)
    shrunk = F.relu(soft - lam) * soft / ((soft - lam).abs() + eps)
    expect = shrunk / shrunk.sum(-1, keepdim=True)
    torch.testing.assert_close(w, expect, rtol=1e-5, atol=1e-7)
    below = soft < lam
    assert below.any() and (~below).any()
    assert (w[below] == 0).all() and (w[~below] > 0).all()
    # the read-out that feeds the decoder is weights x slots
    torch.testing.assert_close(readout.read.permute(0, 2, 3, 1), w @ net.memory.memory, rtol=1e-4, atol=1e-5)


def test_memae_loss_hand_case():
    x = torch.zeros(1, 3, 4, 4)
    recon = torch.full((1, 3, 4, 4), 0.5)  # MSE = 0.25
    weights = torch.tensor([[[[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]]])  # (1, 1, 2, 4): entropies ln 2, 0
    total, logs = memae_loss(x, BaselineOutput(recon, weights))
    entropy = math.log(2) / 2
    assert logs["recon"] == pytest.approx(0.25)
    assert logs["entropy"] == pytest.approx(entropy, rel=1e-6)
    assert float(total) == pytest.approx(0.25 + 0.0002 * entropy, rel=1e-6)
    assert logs["loss"] == pytest.approx(float(total))
    total10, _ = memae_loss(x, BaselineOutput(recon, weights), entropy_weight=10.0)
    assert float(total10) == pytest.approx(0.25 + 10 * entropy, rel=1e-6)
    # the memory-less twin has no weights: its loss is the MSE alone
    twin, twin_logs = memae_loss(x, BaselineOutput(recon, None))
    assert float(twin) == pytest.approx(0.25) and twin_logs["entropy"] == 0.0


# ------------------------------------------------------------------------------------------------ Bergmann AE


@pytest.mark.parametrize(
    "size, spatial",
    [(128, [64, 32, 32, 16, 16, 8, 8, 8, 1]), (64, [32, 16, 16, 8, 8, 4, 4, 4, 1])],
)
def test_bergmann_shapes_through_every_layer(size, spatial):
    ae = BergmannAE(image_size=size).eval()
    chans = [32, 32, 32, 64, 64, 128, 64, 32, 100]
    convs = [m for m in ae.encoder if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size[0], c.stride[0]) for c in convs] == [
        (4, 2),
        (4, 2),
        (3, 1),
        (4, 2),
        (3, 1),
        (4, 2),
        (3, 1),
        (3, 1),
        (size // 16, 1),
    ]
    assert convs[-1].padding == (0, 0)  # valid latent convolution
    x = _smooth_images(2, size)
    with torch.no_grad():
        enc = _trace(ae.encoder, x, nn.Conv2d)
        assert enc == [(c, s, s) for c, s in zip(chans, spatial, strict=True)]
        dec = _trace(ae.decoder, torch.zeros(2, 100, 1, 1), nn.ConvTranspose2d)
        mirror = [(c, s, s) for c, s in zip(chans[-2::-1] + [3], spatial[-2::-1] + [size], strict=True)]
        assert dec == mirror
        out = ae(x)
    assert out.recon.shape == x.shape and out.weights is None
    # LeakyReLU(0.2) after every layer except the latent layer and the output layer (Bergmann et al.)
    assert sum(isinstance(m, nn.LeakyReLU) for m in ae.encoder) == 8
    assert sum(isinstance(m, nn.LeakyReLU) for m in ae.decoder) == 8
    assert isinstance(ae.encoder[-1], nn.Conv2d) and isinstance(ae.decoder[-1], nn.ConvTranspose2d)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in ae.modules())


def test_bergmann_rejects_bad_sizes():
    with pytest.raises(TrustMAEError):
        BergmannAE(image_size=100)
    with pytest.raises(TrustMAEError):
        BergmannAE(image_size=64)(torch.zeros(1, 3, 128, 128))


# --------------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("name", ["memae", "ae_l2", "ae_ssim"])
def test_training_steps_reduce_loss(name):
    torch.manual_seed(0)
    spec = BASELINES[name]
    # small versions of each network (32 px, narrow) and lr 3e-3 so that 30 CPU steps show progress
    if name == "memae":
        model = MemAE2D(memory_slots=16, latent_dim=16, width=0.125)
    else:
        model = BergmannAE(image_size=32, width=0.25)
    model.train()
    x = _smooth_images(4, 32, seed=3)
    opt = spec.optimizer(model, lr=3e-3)
    losses = []
    for _ in range(30):
        out = model(x)
        total, logs = spec.loss(x, out)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(logs["loss"])
        assert logs["loss"] == pytest.approx(total.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.9 * losses[0], losses
    assert sum(b < a for a, b in zip(losses[:-1], losses[1:], strict=True)) > 20  # mostly monotone, not one lucky step


# ---------------------------------------------------------------------------------------------- residual maps


@pytest.mark.parametrize("fn", [l2_residual_map, ssim_residual_map])
def test_residual_maps_zero_for_perfect_and_local_for_changes(fn):
    x = _smooth_images(2, 48, seed=5)
    same = fn(x, x.clone())
    assert same.shape == (2, 1, 48, 48)
    torch.testing.assert_close(same, torch.zeros_like(same), atol=1e-5, rtol=0)
    recon = x.clone()
    recon[0, :, 20:28, 30:38] = -x[0, :, 20:28, 30:38] + 0.5  # change a patch of image 0 only
    res = fn(x, recon)
    assert res.shape == (2, 1, 48, 48)
    assert res[0, 0, 20:28, 30:38].min() > 1e-3
    torch.testing.assert_close(res[1], torch.zeros_like(res[1]), atol=1e-5, rtol=0)
    reach = 0 if fn is l2_residual_map else 5  # an SSIM window (11 x 11) spreads a change by its radius
    outside = torch.ones(48, 48, dtype=torch.bool)
    outside[20 - reach : 28 + reach, 30 - reach : 38 + reach] = False
    assert res[0, 0][outside].abs().max() < 1e-5
    peak = int(res[0, 0].flatten().argmax())
    assert 20 - reach <= peak // 48 < 28 + reach and 30 - reach <= peak % 48 < 38 + reach


def test_l2_residual_map_and_losses_values():
    x = torch.zeros(1, 3, 16, 16)
    recon = torch.zeros(1, 3, 16, 16)
    recon[0, 0] = 0.3  # one channel off by 0.3 -> per-pixel error 0.09 / 3 channels
    torch.testing.assert_close(l2_residual_map(x, recon), torch.full((1, 1, 16, 16), 0.03))
    assert float(ae_l2_loss(x, recon)) == pytest.approx(0.03)
    assert float(ae_l2_loss(x, recon)) == pytest.approx(float(l2_residual_map(x, recon).mean()))
    y = _smooth_images(2, 32)
    assert float(ae_ssim_loss(y, y)) == pytest.approx(0.0, abs=1e-6)
    assert float(ae_ssim_loss(y, torch.flip(y, dims=[-1]))) > 0.05


# ------------------------------------------------------------------------------------------- texture protocol


def test_random_crops_are_real_windows_and_deterministic():
    b, s, crop = 8, 40, 16
    rows = torch.arange(s, dtype=torch.float32).view(1, 1, s, 1).expand(b, 1, s, s)
    cols = torch.arange(s, dtype=torch.float32).view(1, 1, 1, s).expand(b, 1, s, s)
    ids = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 1, s, s)
    images = torch.cat([rows, cols, ids], 1)  # each pixel encodes (row, col, image index)
    c1 = random_crops(images, crop, torch.Generator().manual_seed(7))
    c2 = random_crops(images, crop, torch.Generator().manual_seed(7))
    c3 = random_crops(images, crop, torch.Generator().manual_seed(8))
    assert c1.shape == (b, 3, crop, crop)
    torch.testing.assert_close(c1, c2)
    assert not torch.equal(c1, c3)
    top, left = c1[:, 0, 0, 0], c1[:, 1, 0, 0]
    ar = torch.arange(crop, dtype=torch.float32)
    torch.testing.assert_close(c1[:, 0], (top[:, None, None] + ar[None, :, None]).expand(b, crop, crop))
    torch.testing.assert_close(c1[:, 1], (left[:, None, None] + ar[None, None, :]).expand(b, crop, crop))
    torch.testing.assert_close(c1[:, 2], ids[:, 0, :crop, :crop])  # crop b comes from image b
    assert (top >= 0).all() and (top <= s - crop).all() and (left <= s - crop).all()
    assert len(set(top.tolist())) > 1 and len(set(left.tolist())) > 1  # offsets differ between images
    assert not torch.equal(top, left)  # row and column offsets are drawn independently
    with pytest.raises(TrustMAEError):
        random_crops(images, s + 1)


def _naive_sliding(model_fn, images, window, stride, residual_fn):
    b, _, h, w = images.shape
    total = torch.zeros(b, 1, h, w)
    count = torch.zeros(1, 1, h, w)
    for top in range(0, h - window + 1, stride):
        for left in range(0, w - window + 1, stride):
            patch = images[:, :, top : top + window, left : left + window]
            total[:, :, top : top + window, left : left + window] += residual_fn(patch, model_fn(patch))
            count[:, :, top : top + window, left : left + window] += 1
    return total / count, count


@pytest.mark.parametrize("residual_fn", [l2_residual_map, ssim_residual_map])
def test_sliding_window_map_matches_naive_loop(residual_fn):
    torch.manual_seed(0)
    ae = BergmannAE(image_size=16, width=0.25).eval()

    def model_fn(p):
        return ae(p).recon

    images = torch.rand(2, 3, 48, 64) * 2 - 1  # non-square, so swapped axes would fail
    with torch.no_grad():
        fast = sliding_window_map(model_fn, images, window=16, stride=8, residual_fn=residual_fn, max_windows=7)
        slow, count = _naive_sliding(model_fn, images, 16, 8, residual_fn)
    assert fast.shape == (2, 1, 48, 64)
    assert (count > 0).all()  # the grid covers every pixel
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)


def test_sliding_window_map_covers_every_pixel_and_checks_stride():
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    zero_fn = torch.zeros_like  # "reconstruct" every window as 0 -> residual = mean x^2 at every pixel
    out = sliding_window_map(zero_fn, images, window=16, stride=4)
    torch.testing.assert_close(out, images.pow(2).mean(1, keepdim=True))
    calls = []
    sliding_window_map(lambda p: calls.append(len(p)) or p, images, window=16, stride=4, max_windows=10)
    assert sum(calls) == 25 and max(calls) <= 10  # (32 - 16) / 4 + 1 = 5 positions per axis, batched
    with pytest.raises(TrustMAEError):
        sliding_window_map(zero_fn, images, window=16, stride=5)  # 16 is not a multiple of 5
    with pytest.raises(TrustMAEError):
        sliding_window_map(zero_fn, images, window=40)


# --------------------------------------------------------------------------------------------------- registry


def test_registry_sizes_and_settings():
    assert set(BASELINES) == {"memae", "ae_l2", "ae_ssim"}
    smoke, cpu, paper = (load_profile(n) for n in ("smoke", "cpu", "paper"))
    for spec in BASELINES.values():
        assert spec.lr == 1e-4 and spec.betas == (0.9, 0.999)
        opt = spec.optimizer(nn.Linear(2, 2))
        assert isinstance(opt, torch.optim.Adam)
        assert opt.defaults["lr"] == 1e-4 and opt.defaults["betas"] == (0.9, 0.999)
    assert BASELINES["memae"].input_size(paper) == 256 and not BASELINES["memae"].texture_protocol
    for name in ("ae_l2", "ae_ssim"):
        spec = BASELINES[name]
        assert spec.texture_protocol
        assert [spec.input_size(p) for p in (smoke, cpu, paper)] == [64, 128, 128]
        assert spec.texture_size(paper) == 512 and spec.texture_stride(paper) == 32
        assert (512 - 128) % spec.texture_stride(paper) == 0
    assert BASELINES["ae_l2"].residual_map is l2_residual_map
    assert BASELINES["ae_ssim"].residual_map is ssim_residual_map
    assert BASELINES["memae"].residual_map is l2_residual_map
    memae = BASELINES["memae"].build(paper)
    assert tuple(memae.memory.memory.shape) == (128, 256)
    ae = BASELINES["ae_ssim"].build(smoke)
    assert isinstance(ae, BergmannAE) and ae.image_size == 64 and ae.latent_dim == 100
    with pytest.raises(TrustMAEError):
        get_baseline("memea")
