"""Shared fixtures: a tiny dataset in MVTec AD layout written into ``tmp_path``.

``mvtec_tree`` (32 x 32 images) holds three categories::

    bottle/  RGB and RGBA images; defects broken_large (2) and contamination (1), with masks
    grid/    grayscale: 8-bit L, 16-bit I;16, palette P and LA images; defect bent (2), palette masks
    cable/   RGB, fixed orientation (MVTec's); defect cut (1)

Normal images are random values in [0, 200] (every channel); each defective image is a normal image with the
mask's pixels set to 255 in every channel, so ``image == 255`` is exactly the mask.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SIZE = 32
#: category -> (train images, test good images, {defect type: count})
TREE = {
    "bottle": (4, 2, {"broken_large": 2, "contamination": 1}),
    "grid": (4, 1, {"bent": 2}),
    "cable": (3, 1, {"cut": 1}),
}


def _save(array: np.ndarray, path: Path, mode: str) -> None:
    """Save an (H, W, 3) uint8 picture in a given PIL mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    grey = array[..., 0]
    if mode == "RGB":
        img = Image.fromarray(array)
    elif mode == "RGBA":
        img = Image.fromarray(np.dstack([array, np.full(grey.shape, 128, np.uint8)]))
    elif mode == "L":
        img = Image.fromarray(grey)
    elif mode == "LA":
        img = Image.fromarray(np.dstack([grey, np.full(grey.shape, 200, np.uint8)]), mode="LA")
    elif mode == "I;16":
        img = Image.fromarray(grey.astype(np.uint16) * 257)  # exact 8 -> 16 bit: v * 257
    elif mode == "P":
        img = Image.fromarray(grey).convert("P")  # grey palette: lossless
    else:
        raise ValueError(mode)
    img.save(path)


def _picture(rng: np.random.Generator, grey: bool) -> np.ndarray:
    a = rng.integers(0, 201, (SIZE, SIZE, 1 if grey else 3), dtype=np.uint8)
    return np.repeat(a, 3, axis=-1) if grey else a


def _mask(rng: np.random.Generator) -> np.ndarray:
    m = np.zeros((SIZE, SIZE), bool)
    y, x = rng.integers(2, SIZE - 12, 2)
    h, w = rng.integers(3, 10, 2)
    m[y : y + h, x : x + w] = True
    return m


def write_mvtec_tree(root: Path) -> Path:
    """Write the tiny tree described in the module docstring under ``root``; returns ``root``."""
    rng = np.random.default_rng(0)
    for cat, (n_train, n_good, defects) in TREE.items():
        grey = cat == "grid"
        base = root / cat
        train_modes = ["L", "I;16", "P", "L"] if grey else ["RGB"] * n_train
        for i in range(n_train):
            _save(_picture(rng, grey), base / "train" / "good" / f"{i:03d}.png", train_modes[i])
        for i in range(n_good):
            _save(_picture(rng, grey), base / "test" / "good" / f"{i:03d}.png", "LA" if grey else "RGBA")
        for kind, n in defects.items():
            for i in range(n):
                pic, mask = _picture(rng, grey), _mask(rng)
                pic[mask] = 255
                _save(pic, base / "test" / kind / f"{i:03d}.png", "L" if grey else "RGB")
                m = Image.fromarray(mask.astype(np.uint8) * 255)
                (base / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
                (m.convert("P") if grey else m).save(base / "ground_truth" / kind / f"{i:03d}_mask.png")
    return root


@pytest.fixture
def mvtec_tree(tmp_path: Path) -> Path:
    """Root of a tiny MVTec-layout dataset (categories bottle, cable, grid; see the module docstring)."""
    return write_mvtec_tree(tmp_path / "mvtec")


@pytest.fixture(scope="session")
def make_mvtec_tree():
    """``make_mvtec_tree(root) -> root`` (:func:`write_mvtec_tree`), for module-scoped fixtures."""
    return write_mvtec_tree


@pytest.fixture(scope="module")
def isolated_data(tmp_path_factory):
    """Embedded datasets are built once per module in a temporary folder (``TRUSTMAE_DATA``), never in the
    repository; torch runs on one thread (tiny tensors: faster, and immune to OpenMP spinning on a busy machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRUSTMAE_DATA", str(tmp_path_factory.mktemp("data")))
        yield
    torch.set_num_threads(threads)
