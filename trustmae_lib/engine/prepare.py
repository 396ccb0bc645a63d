"""A run's inputs: the noisy split of its category, the training tensors, and the stateless batch order.

* :func:`prepare` builds an embedded dataset if needed, scans the category and injects noise with the run's seed.
* Training images are decoded once (:func:`~trustmae_lib.data.tensors.load_tensors`); re-drawn defects get their
  fixed :func:`~trustmae_lib.data.augment.redraw_augment` variant (:func:`load_train_tensors`).
* **Data order** is stateless: step ``t`` takes positions ``t*G ... (t+1)*G - 1`` (``G`` = global batch) of an
  endless stream of seeded per-epoch permutations (:func:`batch_indices`), and draws its flips / rotations from a
  generator seeded by ``(seed, t, rank)`` (:func:`training_batch`). A resumed run sees exactly the batches the
  uninterrupted run would have seen.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from trustmae_lib.config import Profile, RunSpec, is_trustmae


def is_texture(category: str, root: str | Path | None = None) -> bool:
    """Texture categories (MVTec AD's five, the synthetic textures, or a dataset.json ``textures`` list)."""
    from trustmae_lib.data.mvtec import MVTEC_TEXTURES, dataset_info
    from trustmae_lib.data.synthetic import TEXTURES

    listed = set(dataset_info(root).get("textures", ())) if root is not None else set()
    return category in set(MVTEC_TEXTURES) | set(TEXTURES) | listed


def augmentation(spec: RunSpec, index) -> tuple[bool, str]:
    """Whether the run flips and turns its training images, and why: ``(applied, reason)``.

    ``spec.augment`` ``"on"`` / ``"off"`` decides; ``"auto"`` follows the supplement: no augmentation for MVTec AD's
    fixed-orientation categories (cable, metal_nut, transistor) and for those the dataset's ``dataset.json`` lists
    under ``fixed_orientation``; flips and quarter turns for every other category. The same choice governs the noise
    protocol's re-draws (symmetries of the square, or a small shift and brightness change when the orientation is
    fixed).
    """
    from trustmae_lib.data.mvtec import FIXED_ORIENTATION

    if spec.augment != "auto":
        return spec.augment == "on", f"--augment {spec.augment}"
    if not index.fixed_orientation:
        return True, f"auto: {index.category} is not a fixed-orientation category"
    if index.category in FIXED_ORIENTATION:
        return False, f"auto: {index.category} is one of MVTec AD's fixed-orientation categories"
    return False, f"auto: {index.root / 'dataset.json'} lists {index.category} under fixed_orientation"


def fixed_orientation(spec: RunSpec, index) -> bool:
    """The run keeps its training images' orientation (no flips or turns): ``not augmentation(spec, index)[0]``."""
    return not augmentation(spec, index)[0]


def prepare(spec: RunSpec, profile: Profile | None = None):
    """Resolve a run's data: profile, category index and noisy split.

    Builds an embedded dataset if missing (with dataset seed 0 -- the run's ``seed`` varies the noise draw and the
    training, not the images), scans the category and injects noise with ``spec.seed``.

    Returns:
        ``(profile, index, split)``.
    """
    from trustmae_lib.data.embedded import ensure_dataset
    from trustmae_lib.data.mvtec import scan_category
    from trustmae_lib.data.noise import inject_noise

    profile = profile or spec.load_profile()
    root = ensure_dataset(spec.dataset, profile)
    index = scan_category(root, spec.category)
    split = inject_noise(index, spec.noise_ratio, spec.protocol, seed=spec.seed)
    return profile, index, split


def tensor_cache_dir(spec: RunSpec, root: Path) -> Path | None:
    """On-disk tensor cache for embedded datasets only (never write into a user's dataset folder)."""
    from trustmae_lib.data.embedded import EMBEDDED_DATASETS
    from trustmae_lib.data.tensors import cache_dir_for

    return cache_dir_for(root) if spec.dataset in EMBEDDED_DATASETS else None


def train_size(method: str, profile: Profile, texture: bool) -> tuple[int, int | None]:
    """``(side the training images are loaded at, crop side or None)``."""
    if is_trustmae(method):
        return profile.image_size, None
    from trustmae_lib.model.baselines import get_baseline

    base = get_baseline(method)
    if base.texture_protocol and texture:
        return base.texture_size(profile), base.input_size(profile)
    return base.input_size(profile), None


def load_train_tensors(spec: RunSpec, profile: Profile, index, split, size: int, with_masks: bool = False):
    """The noisy training set as ``(N, 3, size, size)`` in [-1, 1], re-drawn items already transformed (and, with
    ``with_masks``, their defect masks ``(N, 1, size, size)``, transformed alike, as a second value)."""
    from trustmae_lib.data.augment import redraw_augment
    from trustmae_lib.data.tensors import load_tensors

    samples = [item.sample for item in split.train]
    images, masks = load_tensors(samples, size, cache_dir=tensor_cache_dir(spec, index.root), progress=False)
    fixed = fixed_orientation(spec, index)
    for i, item in enumerate(split.train):
        if item.redraw:
            images[i], masks[i] = redraw_augment(images[i], masks[i], item.redraw, fixed)
    return (images, masks) if with_masks else images


def batch_indices(step: int, n: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1) -> Tensor:
    """The training-set indices this rank uses at ``step`` (stateless, so resuming repeats them exactly).

    The stream is the concatenation of per-epoch permutations ``randperm(n)`` seeded by ``(seed, epoch)``; step
    ``t`` takes positions ``t*G ... t*G + G - 1`` and rank ``r`` every ``world_size``-th of them from ``r``.

    Returns:
        ``(global_batch // world_size,)`` long.
    """
    pos = step * global_batch + torch.arange(global_batch)
    epochs, offsets = pos // n, pos % n
    out = torch.empty(global_batch, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        g = torch.Generator().manual_seed(mix_seed(seed, epoch, 0x5EED))
        perm = torch.randperm(n, generator=g)
        sel = epochs == epoch
        out[sel] = perm[offsets[sel]]
    return out[rank::world_size]


def mix_seed(*values: int) -> int:
    """A 63-bit seed from several integers (NumPy's SeedSequence: independent streams for nearby inputs)."""
    return int(np.random.SeedSequence([int(v) % 2**32 for v in values]).generate_state(2, np.uint64)[0] >> 1)


def training_batch(
    images: Tensor, masks: Tensor, idx: Tensor, crop: int | None, fixed_orientation: bool, generator: torch.Generator
) -> Tensor:
    """One training batch: ``images[idx]`` with a random square symmetry each (``augment``), or -- for the texture
    baselines (``crop``) -- one random ``crop x crop`` window of each, then the symmetry.

    The windows are cut straight from the in-memory training tensor and only they are augmented: the same
    distribution as augmenting the whole 4x texture and then cropping (the valid crop offsets are symmetric under
    the flips and quarter turns), on a sixteenth of the pixels (6.4x faster, ``benchmarks/bench_changes.py``).
    """
    from trustmae_lib.data.augment import augment
    from trustmae_lib.model.baselines import random_crops

    if crop is None:
        x, _ = augment(images[idx], masks[idx], fixed_orientation, generator)
        return x
    windows = random_crops(images, crop, generator=generator, index=idx)  # (B, 3, crop, crop)
    x, _ = augment(windows, masks.new_zeros(windows.shape[0], 1, crop, crop), fixed_orientation, generator)
    return x
