"""Trust-region memory update, L_margin and detached reads (the reading of ``trustmae_lib.model.trust_region``;
chapter 4, *Deviations and readings*)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trustmae_lib.errors import TrustMAEError
from trustmae_lib.model.trust_region import STAT_KEYS, TrustRegion, margin_loss, read_with_trust


def _features(points):
    """``(N, C)`` points -> ``(1, C, 1, N)`` feature map, one location per point."""
    return torch.as_tensor(points, dtype=torch.float32).T[None, :, None, :].contiguous()


def _step(distance, pull="squared"):
    """One SGD step on the slots for a single feature at ``distance`` from slot 0; radii fixed at (1, 2)."""
    tr = TrustRegion(fixed_radii=(1.0, 2.0), pull=pull)
    memory = torch.tensor([[0.0, 0.0], [10.0, 10.0]], requires_grad=True)
    z = _features([[distance, 0.0]]).requires_grad_(True)
    loss, stats = tr(z, memory)
    if loss.requires_grad:
        loss.backward()
    assert z.grad is None  # features are detached: only slots learn from L_trust
    grad = memory.grad if memory.grad is not None else torch.zeros_like(memory)
    assert torch.all(grad[1] == 0)  # the far slot is not the nearest one: untouched
    new = (memory - 0.1 * grad).detach()
    return new[0].norm().item(), (new[0] - torch.tensor([distance, 0.0])).norm().item(), stats, grad


@pytest.mark.parametrize("pull", ["squared", "linear"])
def test_slot_pulled_inside_pushed_between_ignored_beyond(pull):
    _, d_in, stats, _ = _step(0.5, pull)
    assert d_in < 0.5 and stats["frac_pulled"] == 1.0
    _, d_mid, stats, _ = _step(1.5, pull)
    assert d_mid > 1.5 and stats["frac_pushed"] == 1.0
    moved, d_far, stats, grad = _step(3.0, pull)
    assert torch.all(grad == 0) and moved == 0.0 and d_far == pytest.approx(3.0)
    assert stats["frac_ignored"] == 1.0


def test_push_stops_at_outer_radius():
    tr = TrustRegion(fixed_radii=(1.0, 2.0))
    memory = torch.zeros(1, 2, requires_grad=True)
    loss, _ = tr(_features([[1.5, 0.0], [0.0, 1.9]]), memory)
    assert loss.item() == pytest.approx(((2 - 1.5) + (2 - 1.9)) / 2, rel=1e-5)  # hinge, mean over locations


def test_quantile_radii_fractions_and_mask():
    # One slot at the origin, ten features at distances 1..10.
    distances = np.arange(1.0, 11.0)
    z = _features([[d, 0.0] for d in distances])
    tr = TrustRegion(inner_quantile=0.8, outer_quantile=0.98)
    loss, stats, trusted = tr(z, torch.zeros(1, 2, requires_grad=True), return_trusted=True)
    assert set(stats) == set(STAT_KEYS) and all(isinstance(v, float) for v in stats.values())
    inner, outer = np.quantile(distances, [0.8, 0.98])  # 8.2 and 9.82
    assert stats["trust_radius"] == pytest.approx(inner, rel=1e-5)
    assert stats["outer_radius"] == pytest.approx(outer, rel=1e-5)
    assert stats["frac_pulled"] == pytest.approx(0.8)  # 1..8
    assert stats["frac_pushed"] == pytest.approx(0.1)  # 9
    assert stats["frac_ignored"] == pytest.approx(0.1)  # 10
    assert stats["mean_distance"] == pytest.approx(5.5, rel=1e-5)
    assert trusted.shape == (1, 1, 10) and trusted.flatten().tolist() == [True] * 8 + [False] * 2
    expected = (np.sum(distances[:8] ** 2) + (outer - 9.0)) / 10  # d^2 pulled, relu(outer - d) pushed
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def _batch(scale, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = torch.rand(n, generator=g) * scale
    return _features(torch.stack([d, torch.zeros(n)], 1)), d


def test_running_quantiles_over_history_ring_buffer():
    memory = torch.zeros(1, 2)
    tr = TrustRegion(history=3, min_history=2, sketch_size=512)
    z, d = _batch(1.0, seed=0)
    _, stats = tr(z, memory)  # warm-up: exact quantiles of this batch
    assert stats["trust_radius"] == pytest.approx(torch.quantile(d, 0.8).item(), rel=1e-6)
    pool = [d]
    for seed in (1, 2):
        z, d = _batch(2.0, seed=seed)
        pool.append(d)
        _, stats = tr(z, memory)
    # Pooled over the last three batches (each summarised by its quantile sketch).
    union = torch.cat(pool)
    assert stats["trust_radius"] == pytest.approx(torch.quantile(union, 0.8).item(), rel=0.03)
    assert stats["outer_radius"] == pytest.approx(torch.quantile(union, 0.98).item(), rel=0.03)
    assert stats["history_batches"] == 3.0
    # Three batches later the first three have left the ring buffer.
    for seed in (3, 4, 5):
        z, d = _batch(100.0, seed=seed)
        _, stats = tr(z, memory)
    assert stats["trust_radius"] == pytest.approx(80.0, rel=0.05)
    # Evaluation mode reads but never writes the buffer.
    before = tr.distance_history.clone()
    tr.eval()
    _, stats_eval = tr(_batch(1.0, seed=9)[0], memory)
    assert torch.equal(tr.distance_history, before) and stats_eval["history_batches"] == 6.0
    assert stats_eval["trust_radius"] == pytest.approx(stats["trust_radius"])
    # The history lands in the state dict: a fresh module restores the same radii.
    fresh = TrustRegion(history=3, min_history=2, sketch_size=512).eval()
    fresh.load_state_dict(tr.state_dict())
    assert fresh(_batch(1.0, seed=9)[0], memory)[1] == stats_eval


def test_fixed_radii_reported_and_history_untouched():
    tr = TrustRegion(fixed_radii=(0.5, 4.0))
    _, stats = tr(_batch(1.0)[0], torch.zeros(1, 2))
    assert stats["trust_radius"] == 0.5 and stats["outer_radius"] == 4.0
    assert int(tr.history_count) == 0


def test_read_with_trust_values_and_gradients():
    torch.manual_seed(0)
    weights = torch.softmax(torch.randn(2, 2, 3, 5), -1).requires_grad_(True)  # (B, h, w, M)
    memory = torch.randn(5, 4, requires_grad=True)
    trusted = torch.zeros(2, 2, 3, dtype=torch.bool)
    trusted[0, 1, 2] = trusted[1, 0, 0] = True
    read = read_with_trust(weights, memory, trusted)
    naive = torch.einsum("bhwm,mc->bchw", weights, memory)
    torch.testing.assert_close(read, naive)
    read.sum().backward()
    # d(sum read)/d memory[j, c] = sum over TRUSTED locations of w_j only.
    expected = weights.detach()[trusted].sum(0)[:, None].expand(5, 4)
    torch.testing.assert_close(memory.grad, expected)
    assert torch.all(weights.grad[~trusted] != 0)  # untrusted locations still train the encoder side


def test_margin_loss_hand_example():
    memory = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]], requires_grad=True)
    z = _features([[2.0, 0.0], [0.0, 1.0]]).requires_grad_(True)
    loss = margin_loss(z, memory, margin=1.0, space="euclidean")
    # (2,0): nearest (1,0) d=1, second (0,2) d=sqrt(8); (0,1): nearest (0,2) d=1, second (1,0) d=sqrt(2).
    expected = (max(1 - 8**0.5 + 1, 0) + max(1 - 2**0.5 + 1, 0)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-4)
    loss.backward()
    assert z.grad.abs().sum() > 0 and memory.grad[:2].abs().sum() > 0 and torch.all(memory.grad[2] == 0)
    # Cosine space: compare normalised vectors.
    cos = margin_loss(z, memory, margin=0.5, space="cosine")
    zn = F.normalize(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), dim=1)
    mn = F.normalize(memory.detach(), dim=1)
    ref = F.triplet_margin_loss(zn, mn[[0, 1]], mn[[1, 0]], margin=0.5)
    assert cos.item() == pytest.approx(ref.item(), abs=1e-5)
    masked = margin_loss(z, memory, margin=1.0, space="euclidean", mask=torch.tensor([[[False, True]]]))
    assert masked.item() == pytest.approx(max(2 - 2**0.5, 0), abs=1e-4)
    none = margin_loss(z, memory, mask=torch.zeros(1, 1, 2, dtype=torch.bool))
    assert none.item() == 0.0


def test_bad_arguments():
    with pytest.raises(TrustMAEError):
        TrustRegion(inner_quantile=0.99, outer_quantile=0.9)
    with pytest.raises(TrustMAEError):
        TrustRegion(fixed_radii=(2.0, 1.0))
    with pytest.raises(TrustMAEError):
        TrustRegion(pull="cubic")
    with pytest.raises(TrustMAEError):
        TrustRegion()(torch.zeros(1, 3, 2, 2), torch.zeros(4, 2))
    with pytest.raises(TrustMAEError):
        margin_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2))


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tr = TrustRegion(history=4, min_history=1, sketch_size=64)
        distances = torch.arange(1.0, 11.0) * (rank + 1)  # rank 0: 1..10, rank 1: 2..20
        _, stats = tr(_features(torch.stack([distances, torch.zeros(10)], 1)), torch.zeros(1, 2))
        torch.save(torch.tensor([stats["trust_radius"], stats["outer_radius"]]), f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_radii_are_pooled_over_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1))
    torch.testing.assert_close(r0, r1)  # every rank uses the same radii
    union = torch.cat([torch.arange(1.0, 11.0), torch.arange(2.0, 21.0, 2.0)])
    torch.testing.assert_close(r0, torch.quantile(union, torch.tensor([0.8, 0.98])), rtol=0.05, atol=0)
