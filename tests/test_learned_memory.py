"""The learned memory (reading ``ema`` of chapter 4): moving-average slot updates driven by the trust region, k-means
initialisation over the whole training set, the projected memory space and the normalised ``L_trust``."""

from __future__ import annotations

import pytest
import torch
from sklearn.cluster import KMeans

from trustmae_lib.config import READINGS, RunSpec
from trustmae_lib.engine.checkpoint import load_checkpoint
from trustmae_lib.engine.evaluate import evaluate
from trustmae_lib.engine.runs import CHECKPOINT, load_trained
from trustmae_lib.engine.train import fit
from trustmae_lib.errors import TrustMAEError
from trustmae_lib.model.memory import MemoryModule
from trustmae_lib.model.trust_region import TrustRegion
from trustmae_lib.model.trustmae import TrustMAE


def _ema_memory(slots, decay=0.5, dead_fraction=0.0):
    mem = MemoryModule(num_slots=slots.shape[0], dim=slots.shape[1], topk=1, slot_update="ema", ema_decay=decay,
                       dead_fraction=dead_fraction)  # fmt: skip
    with torch.no_grad():
        mem.memory.copy_(slots)
    return mem


def test_ema_update_moves_each_slot_toward_the_mean_of_its_trusted_features_only():
    mem = _ema_memory(torch.tensor([[0.0, 0.0], [10.0, 10.0], [-5.0, 5.0]]), decay=0.75)
    rows = torch.tensor([[1.0, 0.0], [3.0, 0.0], [100.0, 100.0], [11.0, 10.0]])
    nearest = torch.tensor([0, 0, 0, 1])
    pull = torch.tensor([True, True, False, True])  # the far row is not trusted: it must not count
    info = mem.ema_update(rows, nearest, pull)
    # slot 0: a quarter of the way to mean(1, 3) = 2; slot 1: a quarter of the way to (11, 10); slot 2: unused, kept
    assert torch.allclose(mem.memory, torch.tensor([[0.5, 0.0], [10.25, 10.0], [-5.0, 5.0]]))
    assert info == {"slots_pulled": 2.0, "slots_pushed": 0.0, "slots_restarted": 0.0}
    assert not mem.memory.requires_grad  # the optimiser never sees these slots


def test_ema_push_moves_a_slot_away_from_the_doubtful_feature():
    mem = _ema_memory(torch.tensor([[0.0, 0.0], [5.0, 5.0]]), decay=0.5)
    rows = torch.tensor([[1.0, 0.0]])
    info = mem.ema_update(rows, torch.tensor([0]), torch.tensor([False]), push=torch.tensor([True]),
                          push_scale=torch.tensor([2.0]))  # fmt: skip
    # m += (1 - decay) * scale * (m - z) = 0.5 * 2 * (-1, 0)
    assert torch.allclose(mem.memory[0], torch.tensor([-1.0, 0.0]))
    assert torch.allclose(mem.memory[1], torch.tensor([5.0, 5.0])) and info["slots_pushed"] == 1.0


def test_a_slot_no_feature_uses_is_restarted_at_a_trusted_feature():
    torch.manual_seed(0)
    mem = _ema_memory(torch.tensor([[0.0, 0.0], [50.0, 50.0]]), decay=0.5, dead_fraction=0.2)
    rows = torch.randn(16, 2) * 0.1
    for _ in range(6):  # slot 1 is never nearest: its use decays until it counts as dead
        mem.ema_update(rows, torch.zeros(16, dtype=torch.long), torch.ones(16, dtype=torch.bool))
    assert int(mem.restarts) >= 1
    assert any(torch.allclose(mem.memory[1], r) for r in rows)  # now among the data


def test_ema_update_refuses_a_gradient_memory():
    with pytest.raises(TrustMAEError, match="slot_update='ema'"):
        MemoryModule(4, 2, topk=1).ema_update(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long),
                                                torch.ones(1, dtype=torch.bool))  # fmt: skip
    with pytest.raises(TrustMAEError, match="slot update"):
        MemoryModule(4, 2, topk=1, slot_update="adam")


def test_kmeans_init_puts_the_slots_at_scikit_learns_centroids():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0]])
    rows = (centres.repeat_interleave(50, 0) + 0.1 * torch.randn(200, 3, generator=gen)).double()
    mem = MemoryModule(num_slots=4, dim=3, topk=1)
    mem.init_kmeans(rows, seed=3)
    ref = KMeans(n_clusters=4, n_init=1, max_iter=100, random_state=3).fit(rows.numpy()).cluster_centers_
    assert torch.allclose(mem.memory.double(), torch.from_numpy(ref), atol=1e-5)
    # every true centre has a slot within the noise
    assert (torch.cdist(centres, mem.memory.float()).min(1).values < 0.1).all()


def test_normalised_trust_loss_does_not_depend_on_the_feature_scale():
    torch.manual_seed(0)
    z, m = torch.randn(2, 8, 4, 4), torch.randn(16, 8)
    everything = {"inner_quantile": 1.0, "outer_quantile": 1.0}  # every feature pulls: a pure squared distance
    plain, norm = TrustRegion(**everything), TrustRegion(normalised=True)
    plain.eval(), norm.eval()
    a, _ = plain(z, m)
    b, _ = plain(10 * z, 10 * m)
    assert float(b) == pytest.approx(float(a) * 100, rel=1e-4)  # raw squared distances grow with the scale
    c, _ = norm(z, m)
    d, _ = norm(10 * z, 10 * m)
    assert float(d) == pytest.approx(float(c), rel=1e-4) and float(c) != pytest.approx(float(a), rel=1e-2)


def test_assign_gives_the_forward_passes_trusted_mask():
    torch.manual_seed(1)
    tr = TrustRegion()
    tr.eval()
    z, m = torch.randn(2, 8, 3, 3), torch.randn(10, 8)
    _, _, trusted, a = tr(z, m, return_trusted=True, return_assignment=True)
    assert torch.equal(trusted.reshape(-1), a.inside)
    assert torch.equal(a.nearest, torch.cdist(a.rows, m).argmin(1))
    assert not (a.inside & a.between).any() and float(a.inner) <= float(a.outer)


def test_projection_gives_a_signed_memory_space_and_the_ema_model_updates_only_in_training():
    torch.manual_seed(0)
    model = TrustMAE(width=0.125, memory_slots=16, memory_topk=4, projection=True, slot_update="ema")
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    before = model.memory.memory.clone()
    out = model(x)
    assert (out.features < 0).any()  # the encoder's ReLU features never are
    assert not torch.equal(model.memory.memory, before) and out.stats["slots_pulled"] > 0
    model.eval()
    frozen = model.memory.memory.clone()
    model(x)
    assert torch.equal(model.memory.memory, frozen)  # evaluation never moves the slots
    out.recon.mean().backward()  # the encoder still learns through the addressing weights
    assert model.project.weight.grad is not None and model.memory.memory.grad is None


def test_learned_memory_reading_moves_its_slots_far_more_than_adam_in_real_training(tmp_path):
    assert READINGS["ema"]["init"] == {"memory_init": "kmeans"}
    movement = {}
    for reading in ("", "ema"):
        spec = RunSpec(method="trustmae", category="widget", noise_ratio=0.2, steps=6, reading=reading)
        run = fit(spec, tmp_path / (reading or "default"), progress=False)
        result = evaluate(run.run_dir)
        init = load_checkpoint(run.run_dir / CHECKPOINT)["memory_init"]
        slots = load_trained(run.run_dir).models["model"].memory.memory.detach()
        movement[reading] = result["diagnostics"]["memory"]["slot_movement"]
        assert movement[reading] == pytest.approx(float((slots - init).norm() / init.norm()), rel=1e-5)
    assert movement["ema"] > 5 * movement[""], movement


def test_both_initialisations_take_the_features_where_the_memory_addresses_them():
    from trustmae_lib.engine.methods import init_memory_from_features, init_memory_kmeans, memory_space_features

    torch.manual_seed(0)
    model = TrustMAE(width=0.125, memory_slots=8, memory_topk=2, projection=True, slot_update="ema")
    images = torch.rand(4, 3, 64, 64) * 2 - 1
    rows = memory_space_features(model, images, batch_size=4)  # (4*2*2, C) after the projection
    encoder_rows = model.encoder(images).detach().permute(0, 2, 3, 1).reshape(-1, rows.shape[1])
    assert not torch.allclose(rows, encoder_rows)  # the projection changes the space
    init_memory_from_features(model, images, seed=0)
    assert all(any(torch.equal(slot, r) for r in rows) for slot in model.memory.memory)  # slots are projected rows
    init_memory_kmeans(model, images, batch_size=4, seed=0)
    # k-means centroids: each slot is the mean of the rows nearest to it (8 slots for 16 rows)
    nearest = torch.cdist(rows, model.memory.memory).argmin(1)
    for i in nearest.unique():
        assert torch.allclose(model.memory.memory[i], rows[nearest == i].mean(0), atol=1e-4)
