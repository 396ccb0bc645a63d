"""Training loop: every method learns, resume is exact, NaN stops cleanly, Ctrl-C saves, checkpoints are safe."""

from __future__ import annotations

import os
import signal

import pytest
import torch
import yaml

from trustmae_lib.config import METHODS, RunSpec, is_trustmae, load_profile
from trustmae_lib.engine.checkpoint import load_checkpoint, save_checkpoint
from trustmae_lib.engine.methods import build_models
from trustmae_lib.engine.prepare import batch_indices, is_texture, load_train_tensors, prepare, train_size
from trustmae_lib.engine.runs import CHECKPOINT, iter_log, load_trained, run_dir_for
from trustmae_lib.engine.train import TrainingInterrupted, fit, load_or_train, train
from trustmae_lib.errors import TrustMAEError
from trustmae_lib.model import losses
from trustmae_lib.utils import seed_everything

pytestmark = pytest.mark.usefixtures("isolated_data")


def _profile_file(tmp_path, **changes) -> str:
    """A smoke profile with some values changed, as a YAML file (RunSpec.profile accepts a path)."""
    values = {k: v for k, v in load_profile("smoke").to_dict().items() if k != "name"}
    values.update(changes)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def _objective(method: str, model, x: torch.Tensor) -> float:
    """The method's own reconstruction objective on a fixed batch (batch statistics, no update)."""
    model.train()
    with torch.no_grad():
        recon = model(x).recon
    if method == "ae_ssim":
        return float(losses.ssim_loss(x, recon))
    if is_trustmae(method):
        return float(losses.reconstruction_loss(x, recon))
    return float((x - recon).pow(2).mean())


def _same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        sa, sb = a[name].state_dict(), b[name].state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, equal_nan=True, msg=f"{name}.{key} differs")


def test_batch_indices_cover_each_epoch_and_shard_disjointly():
    n, g = 10, 4
    stream = torch.cat([batch_indices(t, n, g, seed=3) for t in range(5)])  # 20 positions = 2 epochs
    assert sorted(stream[:10].tolist()) == list(range(n)) and sorted(stream[10:].tolist()) == list(range(n))
    assert not torch.equal(stream[:10], stream[10:])  # a fresh permutation per epoch
    full = batch_indices(7, n, g, seed=3)
    shards = [batch_indices(7, n, g, seed=3, rank=r, world_size=2) for r in range(2)]
    assert sorted(torch.cat(shards).tolist()) == sorted(full.tolist())
    assert torch.equal(batch_indices(7, n, g, seed=3), full)  # stateless: the same step gives the same batch
    assert not torch.equal(batch_indices(0, n, g, seed=4), batch_indices(0, n, g, seed=3))


@pytest.mark.parametrize("method", METHODS)
def test_smoke_training_reduces_the_objective(method, tmp_path):
    spec = RunSpec(method=method, category="widget", steps=8)
    profile, index, split = prepare(spec)
    size, crop = train_size(method, profile, is_texture("widget"))
    x = load_train_tensors(spec, profile, index, split, size)
    seed_everything(spec.seed)
    before = _objective(method, build_models(spec, profile)["model"], x)
    result = fit(spec, tmp_path, progress=False)
    after = _objective(method, result.models["model"], x)
    assert after < before, f"{method}: objective {before:.4f} -> {after:.4f}"
    rows = list(iter_log(result.run_dir))
    assert [r["step"] for r in rows] == list(range(1, 9))
    key = "total" if is_trustmae(method) else "loss"
    assert all(torch.isfinite(torch.tensor(r[key])) for r in rows)
    if method == "trustmae":  # Eq. 9 terms and trust-region statistics are logged
        assert {"rec", "sm", "vgg", "gan", "feat", "margin", "trust", "disc", "trust_radius"} <= rows[0].keys()
        assert rows[-1]["trust"] > 0
    if method == "trustmae_no_tr":
        assert rows[-1]["trust"] == 0 and "trust_radius" not in rows[-1]
    files = {p.name for p in result.run_dir.iterdir()}
    assert {"checkpoint.pt", "log.csv", "manifest.json", "run.json"} <= files
    assert not [f for f in files if f.endswith(".tmp")]


def test_texture_baseline_trains_on_crops_of_the_4x_image():
    profile = load_profile("smoke")
    assert train_size("ae_l2", profile, texture=True) == (4 * profile.image_size, profile.image_size)
    assert train_size("ae_l2", profile, texture=False) == (profile.image_size, None)
    assert train_size("trustmae", profile, texture=True) == (profile.image_size, None)


def test_interrupt_then_resume_equals_uninterrupted(tmp_path, monkeypatch):
    spec = RunSpec(method="trustmae", steps=4)
    full = fit(spec, tmp_path / "full", progress=False)

    calls = {"n": 0}
    real = losses.hinge_g_loss

    def ctrl_c_in_step_two(fake_logits):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C during step 2
        return real(fake_logits)

    monkeypatch.setattr(losses, "hinge_g_loss", ctrl_c_in_step_two)
    with pytest.raises(TrainingInterrupted) as info:
        fit(spec, tmp_path / "split", progress=False)
    monkeypatch.setattr(losses, "hinge_g_loss", real)
    assert info.value.step == 2 and info.value.checkpoint.is_file()
    saved = load_checkpoint(info.value.checkpoint)
    assert saved["step"] == 2 and not saved["finished"]
    with pytest.raises(TrustMAEError, match="resume"):  # an existing checkpoint is never silently overwritten
        train(spec, tmp_path / "split", progress=False)
    resumed = fit(spec, tmp_path / "split", resume=True, progress=False)
    assert resumed.step == 4
    _same_weights(full.models, resumed.models)
    assert [r["step"] for r in iter_log(resumed.run_dir)] == [1, 2, 3, 4]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    spec = RunSpec(method="trustmae", profile=_profile_file(tmp_path, steps=4, checkpoint_every=2))
    real = losses.reconstruction_loss
    calls = {"n": 0}

    def nan_from_step_three(x, x_hat):
        calls["n"] += 1
        value = real(x, x_hat)
        return value * float("nan") if calls["n"] >= 3 else value

    monkeypatch.setattr(losses, "reconstruction_loss", nan_from_step_three)
    with pytest.raises(TrustMAEError) as info:
        train(spec, tmp_path / "runs", progress=False)
    message = str(info.value)
    assert "\n" not in message and "'rec'" in message and "step 3" in message and CHECKPOINT in message
    run_dir = run_dir_for(spec, tmp_path / "runs")
    kept = load_checkpoint(run_dir / CHECKPOINT)
    assert kept["step"] == 2 and not kept["finished"]
    for key, state in kept["models"]["model"].items():
        if key != "trust.distance_history":  # unused ring-buffer rows are NaN by design
            assert torch.isfinite(state.float()).all(), key


def test_load_or_train_reuses_and_load_trained_checks(tmp_path):
    spec = RunSpec(method="memae", category="widget", steps=2)
    run_dir = load_or_train(spec, tmp_path, progress=False)
    stamp = (run_dir / CHECKPOINT).stat().st_mtime_ns
    assert load_or_train(spec, tmp_path, progress=False) == run_dir
    assert (run_dir / CHECKPOINT).stat().st_mtime_ns == stamp  # reused, not retrained

    trained = load_trained(run_dir, spec=spec)
    assert trained.spec == spec and not trained.models["model"].training
    assert len(trained.split.train) == trained.split.n_good + trained.split.n_injected

    with pytest.raises(TrustMAEError, match="another configuration"):
        load_trained(run_dir, spec=RunSpec(method="memae", category="widget", steps=3))
    with pytest.raises(TrustMAEError, match="does not exist"):
        load_trained(tmp_path / "nowhere")

    # Architecture mismatch: drop one tensor from the stored weights.
    payload = load_checkpoint(run_dir / CHECKPOINT)
    payload["models"]["model"].pop(next(iter(payload["models"]["model"])))
    save_checkpoint(run_dir / CHECKPOINT, payload)
    with pytest.raises(TrustMAEError, match="do not fit the architecture"):
        load_trained(run_dir)

    # Truncated file: a one-line error naming it.
    blob = (run_dir / CHECKPOINT).read_bytes()
    (run_dir / CHECKPOINT).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(TrustMAEError, match="checkpoint.pt") as info:
        load_trained(run_dir)
    assert "\n" not in str(info.value)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_weights_only_loading_refuses_a_pickled_payload(tmp_path):
    path = tmp_path / CHECKPOINT
    torch.save({"format": 1, "step": 1, "evil": _Payload()}, path)
    with pytest.raises(TrustMAEError, match="weights_only") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrustMAEError, match="garbage.pt"):
        load_checkpoint(tmp_path / "garbage.pt")


def test_different_seeds_give_different_runs_and_same_seed_the_same(tmp_path):
    a = fit(RunSpec(method="ae_l2", category="widget", steps=2, seed=0), tmp_path / "a", progress=False)
    b = fit(RunSpec(method="ae_l2", category="widget", steps=2, seed=0), tmp_path / "b", progress=False)
    c = fit(RunSpec(method="ae_l2", category="widget", steps=2, seed=1), tmp_path / "c", progress=False)
    _same_weights(a.models, b.models)
    first = next(iter(a.models["model"].state_dict()))
    assert not torch.equal(a.models["model"].state_dict()[first], c.models["model"].state_dict()[first])


@pytest.mark.parametrize("category, cached", [("widget", True), ("brick", False)])
def test_kept_perceptual_targets_train_the_same_network_to_the_last_bit(category, cached, tmp_path, monkeypatch):
    # A fixed-orientation category's batches are rows of the training tensor, so the frozen backbone's features of
    # x are computed once and gathered (methods.TARGET_CACHE_BYTES); a flipped/turned texture batch is not a row,
    # so its targets must still be computed in every step. Either way the run equals the one that keeps nothing.
    from trustmae_lib.engine import methods
    from trustmae_lib.model.perceptual import PerceptualBackbone

    calls = {"images": 0}
    real_forward = PerceptualBackbone.forward

    def counting_forward(self, x):
        calls["images"] += x.shape[0]
        return real_forward(self, x)

    monkeypatch.setattr(PerceptualBackbone, "forward", counting_forward)
    spec = RunSpec(method="trustmae", category=category, steps=5)  # 5 batches of 4 > 12 training images
    profile = load_profile(spec.profile)
    kept = fit(spec, tmp_path / "kept", progress=False)
    seen, calls["images"] = calls["images"], 0
    monkeypatch.setattr(methods, "TARGET_CACHE_BYTES", 0)  # keep nothing: phi(x) in every step, as before
    plain = fit(spec, tmp_path / "plain", progress=False)
    _same_weights(kept.models, plain.models)
    terms = ("disc", "rec", "sm", "vgg", "gan", "feat", "trust", "total")
    logged = [[[r[k] for k in terms] for r in iter_log(run.run_dir)] for run in (kept, plain)]
    assert logged[0] == logged[1]
    n_train = len(prepare(spec, profile)[2].train)
    plain_images = calls["images"]
    assert plain_images >= 2 * spec.steps * profile.batch_size  # x and G(x) in every step (and any after training)
    # kept: every training image once instead of x in each step
    saved = spec.steps * profile.batch_size - n_train if cached else 0
    assert not cached or saved > 0
    assert seen == plain_images - saved


def test_recalibrate_batchnorm_recomputes_statistics_over_the_training_set():
    from trustmae_lib.engine.methods import recalibrate_batchnorm

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    bn = net[1]
    bn.running_mean.fill_(7.0)
    bn.running_var.fill_(9.0)
    images = torch.randn(16, 3, 8, 8) * 2 + 1
    net.train()
    assert recalibrate_batchnorm(net, images, batch_size=8) == 1
    with torch.no_grad():
        feats = net[0](images)  # (16, 4, 6, 6)
    batch_vars = [f.transpose(0, 1).reshape(4, -1).var(dim=1, unbiased=True) for f in feats.split(8)]
    torch.testing.assert_close(bn.running_mean, feats.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, torch.stack(batch_vars).mean(0), rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.1 and net.training  # restored


def test_recalibrate_batchnorm_leaves_the_trust_region_history_alone():
    from trustmae_lib.engine.methods import recalibrate_batchnorm
    from trustmae_lib.model.trustmae import TrustMAE

    torch.manual_seed(0)
    model = TrustMAE(width=0.125, memory_slots=8, memory_topk=2)
    model.train()
    model(torch.rand(4, 3, 64, 64) * 2 - 1)  # one training forward records a trust-region sketch
    before = {k: v.clone() for k, v in model.trust.state_dict().items()}
    model.eval()
    assert recalibrate_batchnorm(model, torch.rand(6, 3, 64, 64) * 2 - 1, batch_size=3) > 0
    assert not model.training
    for k, v in model.trust.state_dict().items():
        torch.testing.assert_close(v, before[k], equal_nan=True)
    assert recalibrate_batchnorm(torch.nn.Conv2d(3, 3, 1), torch.zeros(2, 3, 4, 4), 2) == 0


def test_training_batch_windows_are_symmetries_of_crops_of_the_drawn_images():
    from trustmae_lib.engine.prepare import training_batch

    g = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 12, 12, generator=g)
    masks = torch.zeros(5, 1, 12, 12)
    idx = torch.tensor([3, 0, 3, 4])
    out = training_batch(images, masks, idx, 4, False, torch.Generator().manual_seed(1))
    assert out.shape == (4, 3, 4, 4)
    for b, i in enumerate(idx.tolist()):
        # every window is one of the 8 square symmetries of some 4x4 window of images[i]
        windows = images[i].unfold(1, 4, 1).unfold(2, 4, 1).permute(1, 2, 0, 3, 4).reshape(-1, 3, 4, 4)
        sym = [torch.rot90(w, k, (1, 2)) for w in (out[b], out[b].flip(2)) for k in range(4)]
        assert any(torch.equal(s, w) for s in sym for w in windows)
    # without crop: the images themselves under a symmetry, fixed orientation = unchanged
    same = training_batch(images, masks, idx, None, True, torch.Generator().manual_seed(1))
    assert torch.equal(same, images[idx])


def test_a_reading_changes_the_built_network_and_the_run_key():
    from trustmae_lib.config import READINGS, reading_methods

    profile = load_profile("smoke")
    base = RunSpec(method="trustmae", category="widget", reading="")  # the supplement-literal construction
    default = build_models(base, profile)["model"]
    for name, reading in READINGS.items():
        method = reading_methods(name)[0]
        spec = RunSpec(method=method, category="widget", reading=name, fast=False)
        assert spec.config_hash() != RunSpec(method=method, category="widget", reading="", fast=False).config_hash()
        assert run_dir_for(spec).name.split("-")[-2] == name
        if method != "trustmae":
            continue
        model = build_models(spec, profile)["model"]
        for key, value in reading.get("model", {}).items():
            assert model.hparams[key] == value != default.hparams[key], (name, key)
    assert build_models(RunSpec(method="trustmae", reading="nopush"), profile)["model"].trust.outer_quantile == 0.8
    assert build_models(RunSpec(method="trustmae", reading="m512"), profile)["model"].memory.memory.shape[0] == 512
    assert not build_models(RunSpec(method="trustmae", reading="attached"), profile)["model"].detach_untrusted
    learned = build_models(RunSpec(method="trustmae", reading="ema"), profile)["model"]
    assert learned.project is not None and learned.memory.slot_update == "ema" and learned.trust.normalised
    assert build_models(RunSpec(method="trustmae", reading="ema8"), profile)["model"].downsample == 16
    sharp = build_models(RunSpec(method="trustmae", reading="ema_t02"), profile)["model"]
    assert sharp.memory.temperature == 0.02 and sharp.memory.slot_update == "ema" and sharp.project is not None
    # MemAE's readings: the paper's threshold interval at M = 128 and the memory-less twin
    memae = build_models(RunSpec(method="memae", reading="shrink2m"), profile)["model"]
    assert memae.memory.shrink_threshold == pytest.approx(2 / memae.memory.num_slots)
    assert build_models(RunSpec(method="memae", reading="nomem"), profile)["model"].memory is None


@pytest.mark.parametrize("reading, lr", [("shrink2m", 1e-4), ("shrink2m_lr2e3", 2e-3), ("nomem_lr2e3", 2e-3)])
def test_a_readings_learning_rate_is_the_one_memae_trains_with(reading, lr):
    # Adam's first step moves every weight whose gradient is well above eps by almost exactly lr: the largest move
    # of the step is the learning rate the reading asked for (the supplement's 1e-4 without one).
    from trustmae_lib.engine.methods import BaselineMethod

    profile = load_profile("smoke")
    spec = RunSpec(method="memae", category="widget", reading=reading)
    seed_everything(0)
    models = build_models(spec, profile)
    method = BaselineMethod(spec, profile, models, dict(models), torch.device("cpu"), None, None)
    before = {k: v.clone() for k, v in models["model"].state_dict().items() if v.is_floating_point()}
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    method.step(x, 1)
    moved = max((v - before[k]).abs().max().item() for k, v in models["model"].state_dict().items() if k in before
                and "running" not in k)  # fmt: skip
    assert moved == pytest.approx(lr, rel=0.05)


def test_a_readings_learning_rates_are_the_ones_trustmae_trains_with():
    # Adam's first step moves a weight by about lr: the generator's and the discriminator's largest moves follow the
    # reading's rates (1e-3), not the profile's (2e-4). The learned memory's slots are moving averages, not Adam's.
    from trustmae_lib.engine.methods import TrustMAEMethod

    profile = load_profile("smoke")
    spec = RunSpec(method="trustmae", category="widget", reading="ema_lr1e3")
    seed_everything(0)
    models = build_models(spec, profile)
    method = TrustMAEMethod(spec, profile, models, dict(models), torch.device("cpu"), None, None)
    before = {name: {k: v.clone() for k, v in m.named_parameters()} for name, m in models.items()}
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    method.step(x, 1)
    for name, m in models.items():
        moved = max((v - before[name][k]).abs().max().item() for k, v in m.named_parameters() if k != "memory.memory")
        assert moved == pytest.approx(1e-3, rel=0.05) and moved > 2 * profile.lr, name


def test_the_trust_weight_reading_scales_only_l_trust_in_the_logged_total(tmp_path):
    # Same seed, data and initialisation: step 1's terms are identical, only lambda_trust differs (1 vs 0.1).
    rows = {}
    for reading in ("", "trust01"):
        spec = RunSpec(method="trustmae", category="widget", steps=1, reading=reading)
        rows[reading] = next(iter_log(fit(spec, tmp_path / (reading or "default"), progress=False).run_dir))
    a, b = rows[""], rows["trust01"]
    assert a["trust"] == pytest.approx(b["trust"]) and a["trust"] > 0
    assert a["total"] - b["total"] == pytest.approx(0.9 * a["trust"], rel=1e-4)


def test_a_run_that_names_no_reading_runs_the_core_studys_settings_and_the_literal_one_keeps_its_files():
    from trustmae_lib.study.sweep import load_sweep

    cell = {"dataset": "synthetic", "category": "widget", "profile": "cpu", "steps": 300}
    core = {s.config_hash(): s for s in load_sweep("sweep_cpu_core").grid()}
    # Since 0.2.0 a spec without a reading runs the learned memory on the speed path -- for TrustMAE and w/o TR the
    # `ema` cells, for MemAE the chosen threshold and rate: exactly the cells of the noise study's core ...
    for method, reading in (("trustmae", "ema"), ("trustmae_no_tr", "ema"), ("memae", "shrink2m_lr2e3")):
        spec = RunSpec(method=method, **cell)
        assert (spec.reading, spec.fast) == (reading, True)
        assert core[spec.config_hash()] == spec, method
    # ... the auto-encoders take no reading and PatchCore trains nothing, so it has no speed path
    assert (RunSpec(method="ae_l2", **cell).reading, RunSpec(method="ae_l2", **cell).fast) == ("", True)
    assert (RunSpec(method="patchcore", **cell).reading, RunSpec(method="patchcore", **cell).fast) == ("", False)
    # ... while the supplement-literal construction (the default up to 0.1.0) keeps the hash of the first study's files
    first = {s.config_hash() for s in load_sweep("sweep_cpu").grid()}
    literal = RunSpec(method="trustmae", reading="", fast=False, **cell)
    assert literal.config_hash() in first and RunSpec(method="trustmae", **cell).config_hash() not in first
    assert literal.run_name() == "synthetic-widget-n00-overlap-trustmae-cpu-s0"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "ae_l2", "reading": "inner60"}, "not ae_l2"),
        ({"method": "trustmae", "reading": "nomem"}, "applies to memae, not trustmae"),
        ({"method": "trustmae", "reading": "inner6"}, "unknown reading"),
    ],
)
def test_bad_readings_are_one_line_errors(kwargs, match):
    with pytest.raises(TrustMAEError, match=match):
        RunSpec(**kwargs)


def test_channels_last_training_on_the_cpu_is_keyed_apart_and_agrees_up_to_rounding(tmp_path):
    base = RunSpec(method="trustmae", category="widget", steps=1, fast=False)
    cl = RunSpec(method="trustmae", category="widget", steps=1, channels_last=True, fast=False)
    assert base.config_hash() == RunSpec(method="trustmae", category="widget", steps=1, fast=False).config_hash()
    assert cl.config_hash() != base.config_hash() and run_dir_for(cl).name.split("-")[-2] == "cl"
    a, b = fit(base, tmp_path / "nchw", progress=False), fit(cl, tmp_path / "cl", progress=False)
    assert not load_checkpoint(a.run_dir / CHECKPOINT)["channels_last"]
    assert load_checkpoint(b.run_dir / CHECKPOINT)["channels_last"]
    conv = next(k for k, v in b.models["model"].state_dict().items() if v.ndim == 4)
    assert b.models["model"].state_dict()[conv].is_contiguous(memory_format=torch.channels_last)
    # The same forward pass: every term of Eq. 9 at step 1 agrees up to float rounding ...
    la, lb = next(iter_log(a.run_dir)), next(iter_log(b.run_dir))
    for term in ("rec", "sm", "vgg", "gan", "feat", "trust", "total"):
        assert lb[term] == pytest.approx(la[term], rel=1e-5, abs=5e-6), term  # the log keeps 6 decimals
    # ... and Adam moves a weight by at most lr per step, whatever the gradient's size: a gradient that is zero up to
    # rounding may point either way in the two layouts, so the two runs' weights differ by at most 2 lr after a step.
    lr = max(load_profile("smoke").lr, load_profile("smoke").lr_disc)
    for name in ("model", "discriminator"):
        pa, pb = dict(a.models[name].named_parameters()), dict(b.models[name].named_parameters())
        for key in pa:
            assert (pa[key] - pb[key]).abs().max() <= 2 * lr + 2e-5, f"{name}.{key}"  # + init rounding
    with pytest.raises(TrustMAEError, match="trains nothing"):
        RunSpec(method="patchcore", channels_last=True)


def test_the_fast_path_is_keyed_apart_folds_the_backbone_and_agrees_up_to_rounding(tmp_path):
    from trustmae_lib.engine.evaluate import _backbone_for, score

    base = RunSpec(method="trustmae", category="widget", steps=1, fast=False)
    fast = RunSpec(method="trustmae", category="widget", steps=1, fast=True)
    assert fast.config_hash() != base.config_hash() and run_dir_for(fast).name.split("-")[-2] == "fast"
    a, b = fit(base, tmp_path / "base", progress=False), fit(fast, tmp_path / "fast", progress=False)
    assert load_checkpoint(b.run_dir / CHECKPOINT)["channels_last"]  # fast implies the channels-last layout
    la, lb = next(iter_log(a.run_dir)), next(iter_log(b.run_dir))
    for term in ("rec", "sm", "vgg", "gan", "feat", "trust", "total"):
        assert lb[term] == pytest.approx(la[term], rel=1e-4, abs=5e-6), term
    ta, tb = load_trained(a.run_dir), load_trained(b.run_dir)
    x = torch.rand(2, 3, ta.score_size, ta.score_size) * 2 - 1
    sa, sb = score(ta, x), score(tb, x)
    assert _backbone_for(tb).folded and not _backbone_for(ta).folded  # scoring uses the run's own backbone
    assert torch.isfinite(sb.anomaly_maps).all() and sb.anomaly_maps.shape == sa.anomaly_maps.shape
    with pytest.raises(TrustMAEError, match="trains nothing"):
        RunSpec(method="patchcore", fast=True)


def test_a_run_trains_and_scores_with_its_own_thread_count_whatever_the_process_uses(tmp_path):
    from trustmae_lib.engine.evaluate import evaluate
    from trustmae_lib.io import read_json

    spec = RunSpec(method="trustmae", category="widget", steps=2)
    assert spec.threads == 1 and run_dir_for(spec).name.split("-")[-2] == "fast"  # default: unkeyed, no suffix
    before = torch.get_num_threads()
    runs = {}
    try:
        for process_threads in (1, 2):  # the caller's setting must not reach the run's arithmetic
            torch.set_num_threads(process_threads)
            runs[process_threads] = fit(spec, tmp_path / f"p{process_threads}", progress=False)
            assert torch.get_num_threads() == process_threads  # restored after the run
            result = evaluate(runs[process_threads].run_dir)
            assert result["platform"]["threads"] == 1 and torch.get_num_threads() == process_threads
            assert read_json(runs[process_threads].run_dir / "run.json")["platform"]["threads"] == 1
    finally:
        torch.set_num_threads(before)
    _same_weights(runs[1].models, runs[2].models)
    two = RunSpec(method="trustmae", category="widget", steps=2, threads=2)
    assert two.config_hash() != spec.config_hash() and run_dir_for(two).name.split("-")[-2] == "t2"
    with pytest.raises(TrustMAEError, match="threads"):
        RunSpec(threads=0)
