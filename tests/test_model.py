"""TrustMAE network (supplement Table 1) and discriminator (Table 2)."""

import pytest
import torch

from trustmae_lib.config import load_profile
from trustmae_lib.errors import TrustMAEError
from trustmae_lib.model.discriminator import Discriminator
from trustmae_lib.model.memory import MemoryReadout
from trustmae_lib.model.trustmae import TrustMAE, layer_table, scale_channels

# Supplement Table 1 at h = w = 256: (layer, kernel, stride, padding, norm, activation, (h, w, c)).
TABLE_1 = [
    ("Conv", 7, 1, 3, "CBN", "ReLU", (256, 256, 32)),
    ("Conv", 3, 2, 1, "CBN", "ReLU", (128, 128, 64)),
    ("Conv", 3, 2, 1, "CBN", "ReLU", (64, 64, 128)),
    ("Conv", 3, 2, 1, "CBN", "ReLU", (32, 32, 256)),
    ("Conv", 3, 2, 1, "CBN", "ReLU", (16, 16, 512)),
    ("Conv", 3, 2, 1, "CBN", "ReLU", (8, 8, 512)),
    *[("ResBlock", 3, 1, 1, "CBN", "ReLU", (8, 8, 512))] * 3,
    ("Memory", None, None, None, "-", "-", (8, 8, 512)),
    *[("ResBlock", 3, 1, 1, "CBN", "ReLU", (8, 8, 512))] * 3,
    ("ConvTrans", 4, 2, 1, "CBN", "ReLU", (16, 16, 512)),
    ("ConvTrans", 4, 2, 1, "CBN", "ReLU", (32, 32, 256)),
    ("ConvTrans", 4, 2, 1, "CBN", "ReLU", (64, 64, 128)),
    ("ConvTrans", 4, 2, 1, "CBN", "ReLU", (128, 128, 64)),
    ("ConvTrans", 4, 2, 1, "IN", "ReLU", (256, 256, 32)),
    ("Conv", 7, 1, 3, "-", "Tanh", (256, 256, 3)),
]

# Supplement Table 2 at h = w = 256.
TABLE_2 = [
    *[
        ("Conv", 4, 2, 1, "-", "LeakyReLU(0.2)", (256 // 2**i, 256 // 2**i, c))
        for i, c in enumerate((32, 64, 128, 256, 512, 1024), start=1)
    ],
    ("Conv", 3, 1, 1, "-", "-", (4, 4, 1)),
]


def _as_table(rows):
    return [
        (
            r["layer"],
            r["kernel"],
            r["stride"],
            r["padding"],
            r["norm"],
            r["activation"],
            (r["output_shape"][1], r["output_shape"][2], r["output_shape"][0]),
        )
        for r in rows
    ]


def test_table_1_every_layer_at_width_1():
    torch.manual_seed(0)
    model = TrustMAE(width=1.0, memory_slots=64, memory_topk=8)
    running = model.encoder.layers["conv_in"].norm.bn.running_mean.clone()
    rows = layer_table(model, 256)  # one forward pass on a (1, 3, 256, 256) batch with forward hooks
    assert _as_table(rows) == TABLE_1
    assert rows[9]["slots"] == 64 and rows[9]["out_channels"] == 512  # memory in R^{512 x M}
    assert model.training and torch.equal(running, model.encoder.layers["conv_in"].norm.bn.running_mean)


def test_table_2_discriminator_at_width_1():
    disc = Discriminator()
    assert _as_table(layer_table(disc, 256)) == TABLE_2
    with torch.no_grad():
        logits, feats = disc(torch.zeros(2, 3, 128, 192))
    assert logits.shape == (2, 1, 2, 3)
    assert [f.shape[1:] for f in feats] == [
        (c, 128 // 2**i, 192 // 2**i) for i, c in enumerate((32, 64, 128, 256, 512, 1024), start=1)
    ]


def test_width_scales_every_channel():
    assert [scale_channels(c, 0.125) for c in (32, 64, 512, 1024)] == [4, 8, 64, 128]
    assert scale_channels(16, 0.1) == 4  # floor
    assert scale_channels(512, 1.0) == 512
    rows = layer_table(TrustMAE(width=0.25, memory_slots=16, memory_topk=4), 64)
    assert [r["out_channels"] for r in rows[:6]] == [8, 16, 32, 64, 128, 128]
    assert rows[-1]["output_shape"] == (3, 64, 64)
    disc_rows = layer_table(Discriminator(width=0.25), 64)
    assert [r["out_channels"] for r in disc_rows] == [8, 16, 32, 64, 128, 256, 1]


@pytest.mark.parametrize("size", [(48, 64), (64, 100), (16, 16)])
def test_input_side_must_be_multiple_of_32(size):
    model = TrustMAE(width=0.125, memory_slots=8, memory_topk=2)
    with pytest.raises(TrustMAEError, match="multiple of 32"):
        model(torch.zeros(1, 3, *size))


def test_bad_inputs():
    model = TrustMAE(width=0.125, memory_slots=8, memory_topk=2)
    with pytest.raises(TrustMAEError, match="RGB"):
        model(torch.zeros(1, 1, 64, 64))
    with pytest.raises(TrustMAEError):
        model(torch.zeros(2, 3, 64, 64), torch.tensor([0, 1]))  # one-class model, class 1
    with pytest.raises(TrustMAEError, match="at least 64"):
        Discriminator(width=0.125)(torch.zeros(1, 3, 32, 32))
    with pytest.raises(TrustMAEError, match="class ids"):
        TrustMAE(width=0.125, num_classes=2, memory_slots=8, memory_topk=2)(torch.zeros(1, 3, 64, 64))


def _smoke_model(**kwargs):
    torch.manual_seed(0)
    return TrustMAE(width=0.125, memory_slots=16, memory_topk=4, **kwargs)


def test_full_forward_smoke_width():
    model = _smoke_model(use_margin=True)
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    out = model(x)
    assert out.recon.shape == (4, 3, 64, 64) and out.features.shape == (4, 64, 2, 2)
    assert torch.isfinite(out.recon).all() and out.recon.abs().max() <= 1
    assert isinstance(out.readout, MemoryReadout)
    assert out.readout.read.shape == (4, 64, 2, 2) and out.readout.weights.shape == (4, 2, 2, 16)
    assert set(out.losses) == {"trust", "margin", "entropy"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.losses.values())
    assert out.losses["trust"] > 0 and out.losses["margin"] > 0 and out.losses["entropy"] > 0
    assert 0 < out.stats["trust_radius"] <= out.stats["outer_radius"] and out.trusted.shape == (4, 2, 2)
    total = (out.recon - x).abs().mean() + sum(out.losses.values())
    total.backward()
    assert model.memory.memory.grad.abs().sum() > 0
    assert model.encoder.layers["conv_in"].conv.weight.grad.abs().sum() > 0
    assert model.decoder.layers["conv_out"].conv.weight.grad.abs().sum() > 0


def test_without_trust_region():
    model = _smoke_model(trust_region=False)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    out = model(x)
    assert out.losses["trust"].item() == 0.0 and out.losses["margin"].item() == 0.0
    assert out.losses["entropy"] > 0 and out.stats == {} and out.trusted is None and model.trust is None
    (out.recon - x).abs().mean().backward()  # the memory learns through the read-out only
    assert model.memory.memory.grad.abs().sum() > 0


@pytest.mark.parametrize("detach", [True, False])
def test_untrusted_locations_do_not_move_memory(detach):
    # Radii (0, 0): no location is trusted, none pulled or pushed.
    model = _smoke_model(fixed_radii=(0.0, 0.0), detach_untrusted=detach)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    out = model(x)
    assert not out.trusted.any() and out.stats["frac_ignored"] == 1.0
    loss = (out.recon - x).abs().mean() + sum(out.losses.values())
    loss.backward()
    grad = model.memory.memory.grad
    moved = grad is not None and grad.abs().sum() > 0
    assert moved is not detach
    assert model.encoder.layers["conv_in"].conv.weight.grad.abs().sum() > 0


def test_plain_autoencoder_without_memory():
    model = _smoke_model(use_memory=False)
    out = model(torch.zeros(1, 3, 64, 64))
    assert model.memory is None and out.readout is None
    assert all(v.item() == 0.0 for v in out.losses.values())


def test_classes_condition_every_cbn():
    model = _smoke_model(num_classes=3)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "gamma") and hasattr(module, "beta"):
                module.gamma.weight.uniform_(0.5, 1.5)
    model.eval()
    x = torch.rand(1, 3, 64, 64).repeat(2, 1, 1, 1) * 2 - 1
    with torch.no_grad():
        out = model(x, torch.tensor([0, 2]))
    assert not torch.allclose(out.recon[0], out.recon[1])


def test_from_profile():
    profile = load_profile("smoke")
    model = TrustMAE.from_profile(profile, trust_region=False)
    assert model.memory.num_slots == profile.memory_slots and model.memory.topk == profile.memory_topk
    assert model.memory.temperature == profile.memory_temperature
    assert model.memory.dim == scale_channels(512, profile.width) and model.trust is None
    assert model.hparams["width"] == profile.width and model.hparams["trust_region"] is False
    rebuilt = TrustMAE(**model.hparams)
    assert rebuilt.state_dict().keys() == model.state_dict().keys()


def test_margin_is_off_by_default():
    # L_margin collapsed the encoder at our scale (see losses.LossWeights): off unless asked for.
    out = _smoke_model()(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert out.losses["margin"].item() == 0.0 and out.losses["trust"] > 0
