"""Memory module (reading: cosine / dot similarity, softmax, top-k or MemAE shrinkage, weighted read-out)."""

import math

import pytest
import torch
import torch.nn.functional as F

from trustmae_lib.errors import TrustMAEError
from trustmae_lib.model.memory import MemoryModule, entropy_loss, hard_shrink


def _naive_topk_read(z, memory, k, temperature):
    """Reference written location by location and slot by slot (test only)."""
    b, c, h, w = z.shape
    m = memory.shape[0]
    read = torch.zeros_like(z)
    weights = torch.zeros(b, h, w, m)
    for bi in range(b):
        for i in range(h):
            for j in range(w):
                q = z[bi, :, i, j]
                sims = [F.cosine_similarity(q, memory[s], dim=0).item() for s in range(m)]
                top = sorted(range(m), key=lambda s: -sims[s])[:k]
                exps = {s: math.exp(sims[s] / temperature) for s in top}
                total = sum(exps.values())
                for s in top:
                    weights[bi, i, j, s] = exps[s] / total
                    read[bi, :, i, j] += exps[s] / total * memory[s]
    return read, weights


def test_topk_weights_are_sparse_and_normalised():
    torch.manual_seed(0)
    mem = MemoryModule(num_slots=20, dim=8, topk=5)
    out = mem(torch.randn(3, 8, 4, 5))
    assert out.read.shape == (3, 8, 4, 5)
    assert out.weights.shape == out.similarity.shape == (3, 4, 5, 20)
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(3, 4, 5))
    assert (out.weights >= 0).all()
    assert ((out.weights > 0).sum(-1) <= 5).all()
    # The kept slots are the 5 most similar ones.
    kept = out.weights.topk(5, dim=-1).indices.sort(-1).values
    best = out.similarity.topk(5, dim=-1).indices.sort(-1).values
    assert torch.equal(kept, best)


def test_readout_equals_naive_weighted_slot_sum():
    torch.manual_seed(1)
    mem = MemoryModule(num_slots=7, dim=5, topk=3, temperature=0.2)
    z = torch.randn(2, 5, 2, 3)
    out = mem(z)
    read, weights = _naive_topk_read(z, mem.memory.detach(), k=3, temperature=0.2)
    torch.testing.assert_close(out.weights.detach(), weights)
    torch.testing.assert_close(out.read.detach(), read)
    # Cosine similarity itself, against torch's reference.
    sim = F.cosine_similarity(z.permute(0, 2, 3, 1)[..., None, :], mem.memory.detach(), dim=-1)
    torch.testing.assert_close(out.similarity.detach(), sim)


def test_hard_shrink_hand_example():
    w = torch.tensor([0.001, 0.0025, 0.01, 0.5])
    got = hard_shrink(w, threshold=0.0025, eps=1e-12)
    # relu(w - l) * w / (|w - l| + eps): zero below/at the threshold, ~w above it.
    expected = torch.tensor([0.0, 0.0, 0.0075 * 0.01 / 0.0075, 0.4975 * 0.5 / 0.4975])
    torch.testing.assert_close(got, expected)


def test_shrink_addressing_memae_dot_product():
    mem = MemoryModule(num_slots=4, dim=2, addressing="shrink", similarity="dot", temperature=1.0, shrink_threshold=0.2)
    with torch.no_grad():
        mem.memory.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    z = torch.tensor([2.0, 0.5]).view(1, 2, 1, 1)
    out = mem(z)
    sim = torch.tensor([2.0, 0.5, -2.0, -0.5])  # dot products
    torch.testing.assert_close(out.similarity.flatten(), sim)
    soft = torch.softmax(sim, 0)  # ~[0.74, 0.17, 0.01, 0.08]: only slot 0 passes lambda = 0.2
    shrunk = F.relu(soft - 0.2) * soft / ((soft - 0.2).abs() + 1e-12)
    expected = shrunk / shrunk.sum()
    torch.testing.assert_close(out.weights.flatten(), expected)
    assert (out.weights > 0).sum() == 1
    torch.testing.assert_close(out.read.flatten(), torch.tensor([1.0, 0.0]))


def test_dense_softmax_addressing():
    torch.manual_seed(2)
    mem = MemoryModule(num_slots=6, dim=3, addressing="softmax", temperature=0.5)
    out = mem(torch.randn(1, 3, 2, 2))
    torch.testing.assert_close(out.weights, torch.softmax(out.similarity / 0.5, dim=-1))
    assert (out.weights > 0).all()


def test_gradients_reach_slots_and_features():
    torch.manual_seed(3)
    mem = MemoryModule(num_slots=10, dim=4, topk=3)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    mem(z).read.pow(2).sum().backward()
    assert mem.memory.grad is not None and mem.memory.grad.abs().sum() > 0
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_untrusted_locations_cannot_move_slots():
    torch.manual_seed(4)
    mem = MemoryModule(num_slots=10, dim=4, topk=3)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    plain = mem(z)
    out = mem(z, trusted=torch.zeros(2, 3, 3, dtype=torch.bool))
    torch.testing.assert_close(out.read, plain.read)  # same values, different gradient
    (out.read.pow(2).sum() + entropy_loss(out.weights)).backward()
    assert mem.memory.grad is None or torch.all(mem.memory.grad == 0)  # neither through read nor addressing
    assert z.grad.abs().sum() > 0  # the encoder still learns


def test_entropy_loss():
    one_hot = F.one_hot(torch.tensor([[1, 2], [0, 3]]), 4).float()  # (2, 2, 4)
    assert entropy_loss(one_hot).item() == pytest.approx(0.0, abs=1e-6)
    uniform = torch.full((3, 2, 2, 8), 1 / 8)
    assert entropy_loss(uniform).item() == pytest.approx(math.log(8), rel=1e-5)
    mixed = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert MemoryModule.entropy_loss(mixed).item() == pytest.approx(math.log(2) / 2, rel=1e-5)


def test_init_from_features():
    mem = MemoryModule(num_slots=5, dim=3, topk=2)
    z = torch.randn(2, 3, 2, 2)
    mem.init_from_features(z, generator=torch.Generator().manual_seed(0))
    rows = z.permute(0, 2, 3, 1).reshape(-1, 3)
    assert all((rows == slot).all(-1).any() for slot in mem.memory.detach())


@pytest.mark.parametrize(
    "kwargs",
    [{"addressing": "nearest"}, {"similarity": "l2"}, {"topk": 0}, {"topk": 11}, {"temperature": 0.0}],
)
def test_bad_configuration(kwargs):
    with pytest.raises(TrustMAEError):
        MemoryModule(num_slots=10, dim=4, **kwargs)


def test_wrong_feature_channels():
    with pytest.raises(TrustMAEError, match="dim"):
        MemoryModule(num_slots=10, dim=4)(torch.randn(1, 5, 2, 2))


def test_topk_unselected_slots_get_exactly_zero_gradient():
    # A full softmax followed by top-k would leak ~1e-9 of gradient to every slot, which Adam amplifies.
    torch.manual_seed(0)
    module = MemoryModule(16, 8, addressing="topk", topk=3)
    out = module(torch.randn(2, 8, 2, 2))
    out.read.square().sum().backward()
    used = (out.weights.reshape(-1, 16) > 0).any(0)
    assert (~used).any()
    assert torch.count_nonzero(module.memory.grad[~used]) == 0
    assert module.memory.grad[used].abs().sum() > 0
