"""Training: one loop for TrustMAE, its *w/o TR* ablation and the three baselines (supplement Eq. 9-15, §B).

:func:`train` is cut into named steps: refuse to overwrite or mix runs (:func:`_existing_checkpoint`), build the
networks and the training tensors (:func:`_build`), restore a checkpoint (:func:`_restore`), run the loop
(:func:`_loop`, one :func:`_one_step` at a time), and save -- one record (:func:`run_record`) written into the
checkpoint and as ``run.json``. What a step does per method is in :mod:`trustmae_lib.engine.methods`; the inputs and
the batch order in :mod:`trustmae_lib.engine.prepare`; run folders in :mod:`trustmae_lib.engine.runs`.

Engineering (not in the paper):

* **Checkpoints** (``checkpoint.pt``) are written atomically every ``profile.checkpoint_every`` steps and at the
  end. ``--resume`` continues bit-exactly on the CPU.
* **Ctrl-C** finishes the current step, saves a checkpoint and raises :class:`TrainingInterrupted`.
* A **NaN/inf** loss stops the run with a one-line :class:`~trustmae_lib.errors.TrustMAEError`; the last good
  checkpoint is kept, never overwritten.
* **Out of memory** (``torch.OutOfMemoryError`` on a GPU, the CPU allocator's "can't allocate memory") in a step
  stops the run the same way, naming the profile keys to lower (``batch_size``, ``image_size``).
* The **assumed contamination** of the training folder (``contamination``, ``trustmae train --contamination``) is
  recorded beside the spec, not in it: it sets the decision threshold at evaluation, never the network, so it does
  not change the config hash or the run folder.
* **Layout**: ``channels_last`` on CUDA; on the CPU NCHW unless the spec asks for it
  (:attr:`~trustmae_lib.config.RunSpec.channels_last`, ``trustmae train --channels-last``, or the speed path
  :attr:`~trustmae_lib.config.RunSpec.fast`, ``--fast``, which also folds the perceptual backbone's BatchNorm).
* **DDP** (:mod:`trustmae_lib.engine.distributed`): the same entry point under ``torchrun`` wraps the networks in
  ``DistributedDataParallel``; rank 0's batch-norm buffers are broadcast before each forward (DDP's default); on
  CUDA the batch norms are converted to ``SyncBatchNorm``.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from trustmae_lib import __version__
from trustmae_lib.config import Profile, RunSpec
from trustmae_lib.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from trustmae_lib.engine.distributed import DistContext, gather_state_dict, init_distributed
from trustmae_lib.engine.methods import (
    BaselineMethod,
    Method,
    TrustMAEMethod,
    build_models,
    init_memory_from_features,
    init_memory_kmeans,
    memory_init_rule,
    recalibrate_batchnorm,
)
from trustmae_lib.engine.prepare import (
    augmentation,
    batch_indices,
    is_texture,
    load_train_tensors,
    mix_seed,
    prepare,
    train_size,
    training_batch,
)
from trustmae_lib.engine.runs import (
    CHECKPOINT,
    LOG,
    MANIFEST,
    RUN_INFO,
    check_same_config,
    is_finished,
    load_models,
    run_dir_for,
    write_log,
)
from trustmae_lib.errors import TrustMAEError
from trustmae_lib.io import write_json
from trustmae_lib.utils import is_out_of_memory, pick_device, platform_info, seed_everything, torch_threads

__all__ = ["TrainingInterrupted", "FitResult", "train", "fit", "load_or_train"]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train`: the checkpoint of the last finished step was saved (resume with it)."""

    def __init__(self, step: int, checkpoint: Path | None):
        self.step, self.checkpoint = step, checkpoint
        where = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint written on this rank"
        super().__init__(f"training interrupted after step {step}; {where}; continue with resume=True (--resume)")


# --------------------------------------------------------------------------------------------------------------
# Run folder, data
# --------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------
# Models and methods
# --------------------------------------------------------------------------------------------------------------


class _StopFlag:
    """SIGINT -> finish the current step, then stop (a second Ctrl-C interrupts at once)."""

    def __init__(self):
        self.set = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.set:  # second Ctrl-C: give up on a clean stop
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------


@dataclass
class FitResult:
    """What :func:`fit` leaves behind (the trained networks stay in memory)."""

    run_dir: Path
    models: dict[str, nn.Module]
    step: int
    log: list[dict] = field(default_factory=list)


def train(
    spec: RunSpec,
    out_dir: str | Path = "runs",
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    contamination: float | None = None,
) -> Path:
    """Train one run and return its folder ``<out_dir>/<run name>-<config hash>``.

    The folder receives ``manifest.json`` (the noisy split), ``log.csv`` (every ``log_every`` steps: each loss
    term, trust-region statistics, seconds per step and spent waiting for data), ``checkpoint.pt`` and
    ``run.json``.

    Args:
        spec: what to train.
        out_dir: parent folder of the run folders.
        resume: continue from the folder's checkpoint (bit-identical to an uninterrupted run on the CPU). Without
            it an existing checkpoint is an error, so nothing is overwritten by accident.
        progress: show a tqdm bar with the current losses.
        device: ``None`` -> CUDA if available, else CPU.
        contamination: the share of defective images assumed in the training set, in [0, 0.9] -- what the
            decision threshold allows for (:func:`trustmae_lib.engine.evaluate.fit_threshold`). ``None``: the
            injected noise ratio (a resumed run keeps the value it was started with). Recorded in ``run.json``
            and the checkpoint (``assumed_contamination``, ``contamination_source``); not part of the config hash.

    Raises:
        TrustMAEError: bad data, a NaN/inf loss or out of memory (the last good checkpoint is kept), or a checkpoint
            that belongs to another configuration.
        TrainingInterrupted: Ctrl-C (after saving a checkpoint).
    """
    return fit(spec, out_dir, resume=resume, progress=progress, device=device, contamination=contamination).run_dir


def fit(
    spec: RunSpec,
    out_dir: str | Path = "runs",
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    contamination: float | None = None,
) -> FitResult:
    """:func:`train`, returning the networks as well (used by the DDP test and notebooks)."""
    from trustmae_lib.config import check_contamination

    if contamination is not None:
        contamination = check_contamination(contamination)
    ddp = init_distributed()
    try:
        with torch_threads(spec.threads):  # the run's own thread count (RunSpec.threads): recorded and keyed
            return _fit(spec, Path(out_dir), resume, progress, device, ddp, contamination)
    finally:
        if ddp.owns_group and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class _Session:
    """Everything one training run holds between its steps (built by :func:`_build`)."""

    spec: RunSpec
    profile: Profile
    run_dir: Path
    split: object
    fixed_orientation: bool
    augment_reason: str  # why the training images are (not) flipped and turned (prepare.augmentation)
    device: torch.device
    channels_last: bool
    models: dict[str, nn.Module]
    method: Method
    images: Tensor
    masks: Tensor  # all-zero: training images carry no masks the losses use
    crop: int | None
    ddp: DistContext
    contamination: float | None = None  # assumed defective share given for this run; None -> the noise ratio
    memory_init: Tensor | None = None  # (M, C) slots at step 0, kept in the checkpoint (memory.slot_movement)
    t_start: float = field(default_factory=time.perf_counter)
    step: int = 0
    log: list[dict] = field(default_factory=list)
    wall_before: float = 0.0
    data_wait: float = 0.0

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT


def _existing_checkpoint(spec: RunSpec, profile: Profile, run_dir: Path, split, resume: bool, ddp) -> dict | None:
    """The checkpoint to resume from (``None`` for a fresh run); refuses to overwrite or to mix configurations."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        return None
    if not resume and is_finished(run_dir, spec):
        raise TrustMAEError(
            f"{run_dir} is already trained; evaluate it (trustmae evaluate {run_dir}), use load_or_train, "
            "or delete the folder to train again"
        )
    if not resume:
        raise TrustMAEError(
            f"{run_dir} already holds a checkpoint; pass resume=True (--resume) to continue it, "
            "or delete the folder to start again"
        )
    checkpoint = load_checkpoint(path)
    check_same_config(checkpoint, spec, profile, path)
    if int(checkpoint.get("world_size", 1)) != ddp.world_size:
        raise TrustMAEError(
            f"{path} was trained with {checkpoint.get('world_size', 1)} process(es); resume it "
            f"with the same number (now {ddp.world_size}) so the data order stays the same"
        )
    if checkpoint.get("manifest_hash") != split.manifest_hash:
        raise TrustMAEError(
            f"{path} was trained on another noisy split (manifest {checkpoint.get('manifest_hash')}"
            f", now {split.manifest_hash}); the dataset changed -- delete the run and retrain"
        )
    return checkpoint


def _build(spec: RunSpec, profile: Profile, run_dir: Path, index, split, device, ddp, fresh: bool) -> _Session:
    """Networks, optimisers and the in-memory training set on the run's device (same on every rank)."""
    dev = pick_device(device, local_rank=ddp.local_rank if ddp.active else None)
    channels_last = dev.type == "cuda" or spec.channels_last or spec.fast
    amp_dtype = None
    if dev.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    seed_everything(spec.seed)  # reproducible initialisation: every rank builds the same networks
    models = build_models(spec, profile)
    for m in models.values():
        m.to(dev)
        if channels_last:
            m.to(memory_format=torch.channels_last)
    size, crop = train_size(spec.method, profile, is_texture(spec.category, index.root))
    images = load_train_tensors(spec, profile, index, split, size).to(dev)
    init = memory_init_rule(spec, profile)
    if fresh and init == "kmeans":
        init_memory_kmeans(models["model"], images, profile.batch_size, seed=spec.seed)
    if fresh and init == "features":
        # Same slots on every rank: the first global batch, un-augmented, and a seeded draw.
        first = images[batch_indices(0, images.shape[0], profile.batch_size * ddp.world_size, spec.seed).to(dev)]
        init_memory_from_features(models["model"], first, seed=spec.seed)
    if ddp.active and dev.type == "cuda":
        models = {k: nn.SyncBatchNorm.convert_sync_batchnorm(m) for k, m in models.items()}
    wrapped: dict[str, nn.Module] = dict(models)
    if ddp.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [dev.index] if dev.type == "cuda" else None
        wrapped = {k: DDP(m, device_ids=ids) for k, m in models.items()}
    method_cls = TrustMAEMethod if spec.is_trustmae else BaselineMethod
    method = method_cls(spec, profile, models, wrapped, dev, amp_dtype, ddp)
    masks = images.new_zeros(images.shape[0], 1, *images.shape[-2:])
    augmented, reason = augmentation(spec, index)
    if not augmented and crop is None:  # every batch is images[idx] unchanged: the frozen targets can be kept
        method.cache_targets(images, profile.batch_size, channels_last)
    memory = getattr(models["model"], "memory", None)  # TrustMAE's and MemAE's MemoryModule (None: no memory)
    memory_init = memory.memory.detach().float().cpu().clone() if fresh and memory is not None else None
    return _Session(spec, profile, run_dir, split, not augmented, reason, dev, channels_last, models, method,
                    images, masks, crop, ddp, memory_init=memory_init)  # fmt: skip


def _restore(session: _Session, checkpoint: dict) -> None:
    """Weights, optimiser and RNG states, step, log and wall time of a checkpoint (resume)."""
    load_models(session.models, checkpoint, session.checkpoint_path)
    for name, opt in session.method.optimizers.items():
        opt.load_state_dict(checkpoint["optimizers"][name])
    if session.method.scaler is not None and checkpoint.get("scaler"):
        session.method.scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"])
    session.step = int(checkpoint["step"])
    session.log = list(checkpoint.get("log", []))
    session.wall_before = float(checkpoint.get("train_wall_s", 0.0))
    session.data_wait = float(checkpoint.get("data_wait_s", 0.0))
    session.memory_init = checkpoint.get("memory_init")  # None for checkpoints written before it was kept
    if session.contamination is None and checkpoint.get("contamination_source") == "given":
        session.contamination = float(checkpoint["assumed_contamination"])  # resumed without --contamination


def run_record(session: _Session, finished: bool) -> dict:
    """The run's bookkeeping, written both into the checkpoint and as ``run.json`` (one dict, one place)."""
    s = session
    given = s.contamination is not None
    return {
        "spec": s.spec.to_dict(),
        "profile": s.profile.to_dict(),
        "config_hash": s.spec.config_hash(),
        "method": s.spec.method,
        "step": s.step,
        "steps": s.profile.steps,
        "finished": finished,
        "train_wall_s": round(s.wall_before + (time.perf_counter() - s.t_start), 3),
        "data_wait_s": round(s.data_wait, 3),
        "device": str(s.device),
        "channels_last": s.channels_last,
        "world_size": s.ddp.world_size,
        "manifest_hash": s.split.manifest_hash,
        # Evaluation settings recorded beside the spec (not hashed): the threshold's assumed contamination.
        "assumed_contamination": float(s.contamination if given else s.spec.noise_ratio),
        "contamination_source": "given" if given else "noise_ratio",
        "augment": {"setting": s.spec.augment, "applied": not s.fixed_orientation, "reason": s.augment_reason},
        "n_train": len(s.split.train),
        "n_test": len(s.split.test),
        "backbone": s.method.backbone_info,
        "library_version": __version__,
        "torch_version": str(torch.__version__),
        "platform": platform_info(s.device),
    }


def _save(session: _Session, finished: bool) -> Path | None:
    """Write the checkpoint (weights, optimisers, RNG, log + :func:`run_record`), ``log.csv`` and ``run.json``."""
    s = session
    weights = {k: gather_state_dict(m, s.ddp, apply=finished) for k, m in s.models.items()}  # collective (DDP)
    if not s.ddp.is_main:
        return None
    record = run_record(s, finished)
    state = {
        **record,
        "models": weights,
        "optimizers": {k: o.state_dict() for k, o in s.method.optimizers.items()},
        "scaler": s.method.scaler.state_dict() if s.method.scaler is not None else None,
        "rng": rng_state(),
        "log": s.log,
        "memory_init": s.memory_init,
    }
    save_checkpoint(s.checkpoint_path, state)
    write_log(s.run_dir / LOG, s.log)
    write_json(s.run_dir / RUN_INFO, record)
    return s.checkpoint_path


def _one_step(session: _Session) -> dict[str, float]:
    """Draw the step's batch (stateless: a resumed run sees the same batches) and train on it.

    A :class:`~trustmae_lib.errors.TrustMAEError` (e.g. a NaN loss) or memory running out stops the run with one
    line; nothing is saved, so the last checkpoint on disk stays as it was."""
    s = session
    t0 = time.perf_counter()
    try:
        x, idx = _draw_batch(s)
        t1 = time.perf_counter()
        s.data_wait += t1 - t0
        values = s.method.step(x, s.step + 1, index=idx)
    except TrustMAEError as err:
        raise TrustMAEError(f"training stopped: {err}; {_last_checkpoint(s)}") from None
    except (RuntimeError, MemoryError) as err:
        if not is_out_of_memory(err):
            raise
        raise out_of_memory_error(s.spec, s.profile, s.device, f"training step {s.step + 1}",
                                  _last_checkpoint(s)) from None  # fmt: skip
    s.step += 1
    return {**values, "step_s": round(time.perf_counter() - t0, 4), "data_s": round(t1 - t0, 4)}


def _draw_batch(s: _Session) -> tuple[Tensor, Tensor]:
    """The step's batch and its rows of the training tensor (the batch is ``images[idx]`` itself only when the run
    neither augments nor crops)."""
    global_batch = s.profile.batch_size * s.ddp.world_size
    idx = batch_indices(s.step, s.images.shape[0], global_batch, s.spec.seed, s.ddp.rank, s.ddp.world_size)
    idx = idx.to(s.device)
    gen = torch.Generator().manual_seed(mix_seed(s.spec.seed, s.step, s.ddp.rank))
    x = training_batch(s.images, s.masks, idx, s.crop, s.fixed_orientation, gen)
    if s.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, idx


def _last_checkpoint(session: _Session) -> str:
    path = session.checkpoint_path
    if not path.is_file():
        return "no checkpoint was written"
    return f"last good checkpoint {path} kept"


def out_of_memory_error(spec: RunSpec, profile: Profile, device, where: str, kept: str) -> TrustMAEError:
    """The one-line error for memory running out while training: which profile keys to lower, and what was kept."""
    from trustmae_lib.config import CONFIG_DIR

    is_file = Path(spec.profile).suffix in (".yaml", ".yml")
    source = spec.profile if is_file else CONFIG_DIR / f"{spec.profile}.yaml"
    return TrustMAEError(
        f"out of memory in {where} on {device} (profile {Path(spec.profile).stem}: batch_size {profile.batch_size}, "
        f"image_size {profile.image_size}); lower batch_size (or image_size) in a copy of {source} and pass it "
        f"with --profile FILE.yaml{'' if device.type == 'cpu' else ', or train with --device cpu'}; {kept}"
    )


def _should_stop(session: _Session, stop: _StopFlag) -> bool:
    """Ctrl-C seen (on any rank: every rank must stop at the same step)."""
    stop_now = stop.set
    if session.ddp.active:
        dev = session.device
        flag = torch.tensor([float(stop_now)], device=dev if dev.type == "cuda" else "cpu")
        dist.all_reduce(flag)
        stop_now = bool(flag.item() > 0)
    return stop_now


def _loop(session: _Session, progress: bool) -> None:
    """Train until ``profile.steps``: log every ``log_every`` steps, checkpoint every ``checkpoint_every``."""
    s, steps = session, session.profile.steps
    desc = f"{s.spec.method} {s.spec.category}"
    bar = tqdm(total=steps, initial=s.step, desc=desc, leave=False, disable=not (progress and s.ddp.is_main),
               dynamic_ncols=True)  # fmt: skip
    try:
        with _StopFlag() as stop:
            while s.step < steps:
                values = _one_step(s)
                bar.update(1)
                if s.step % max(1, s.profile.log_every) == 0 or s.step == steps:
                    timing = {k: values.pop(k) for k in ("step_s", "data_s")}
                    s.log.append({"step": s.step, **{k: round(v, 6) for k, v in values.items()}, **timing})
                    shown = {k: values[k] for k in ("total", "disc", "rec", "loss") if k in values}
                    bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()})
                    if s.ddp.is_main:
                        write_log(s.run_dir / LOG, s.log)
                if _should_stop(s, stop):
                    raise TrainingInterrupted(s.step, _save(s, finished=False))
                every = s.profile.checkpoint_every
                if every and s.step % every == 0 and s.step < steps:
                    _save(s, finished=False)
    finally:
        bar.close()


def _fit(spec: RunSpec, out_dir: Path, resume: bool, progress: bool, device, ddp: DistContext,
         contamination: float | None = None) -> FitResult:  # fmt: skip
    profile = spec.load_profile()
    run_dir = run_dir_for(spec, out_dir)
    if ddp.active and not ddp.is_main:
        ddp.barrier()  # rank 0 builds the dataset first
    _, index, split = prepare(spec, profile)
    if ddp.active and ddp.is_main:
        ddp.barrier()
    checkpoint = _existing_checkpoint(spec, profile, run_dir, split, resume, ddp)
    if ddp.is_main:
        from trustmae_lib.data.noise import save_manifest

        run_dir.mkdir(parents=True, exist_ok=True)
        save_manifest(split, run_dir / MANIFEST)
    try:
        session = _build(spec, profile, run_dir, index, split, device, ddp, fresh=checkpoint is None)
    except (RuntimeError, MemoryError) as err:
        if not is_out_of_memory(err):
            raise
        kept = "the run folder's checkpoint is unchanged" if checkpoint else "no checkpoint was written"
        dev = pick_device(device, local_rank=ddp.local_rank if ddp.active else None)
        raise out_of_memory_error(spec, profile, dev, "building the networks and the training set", kept) from None
    session.contamination = contamination
    start = 0
    if checkpoint is not None:
        _restore(session, checkpoint)
        start = session.step
    for m in session.models.values():
        m.train()
    _loop(session, progress)
    if start < profile.steps:  # trained here (not a reload of a finished run): final batch-norm statistics
        try:
            recalibrate_batchnorm(session.models["model"], session.images, profile.batch_size, crop=session.crop,
                                  seed=spec.seed)  # fmt: skip
        except (RuntimeError, MemoryError) as err:
            if not is_out_of_memory(err):
                raise
            raise out_of_memory_error(spec, profile, session.device, "the final batch-norm statistics",
                                      _last_checkpoint(session)) from None  # fmt: skip
    _save(session, finished=True)
    return FitResult(run_dir=run_dir, models=session.models, step=session.step, log=session.log)


def load_or_train(spec: RunSpec, out_dir: str | Path = "runs", progress: bool = True) -> Path:
    """Reuse a finished run with the same config hash, resume an unfinished one, or train from scratch."""
    run_dir = run_dir_for(spec, out_dir)
    if is_finished(run_dir, spec):
        return run_dir
    return train(spec, out_dir, resume=(run_dir / CHECKPOINT).is_file(), progress=progress)
