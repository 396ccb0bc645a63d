"""The ``elpv`` embedded dataset: real electroluminescence images of solar cells in MVTec AD layout.

Not part of the paper: a real, installable defect benchmark (``elpv-dataset``, Buerhop-Lutz et al. 2018,
Deitsch et al. 2019; 2,624 cells of 300 x 300 px, data licence CC BY-NC-SA 4.0 -- it is written under
``data/`` at build time and never committed). Each cell carries an expert's defect probability in
{0, 1/3, 2/3, 1} and a cell type (``mono`` / ``poly``), which become the two categories.

*Readings*:

* probability 0 -> normal, 1 -> defective (``test/defective``); the uncertain 1/3 and 2/3 cells are left out
  (their counts are recorded in ``dataset.json``);
* labels are image-level only: no ``ground_truth`` folder, so only image AUROC is defined;
* per (category, label) at most ``profile.elpv_max_per_class`` cells (0 = all), a seeded subset;
* the normal cells are split, seeded, into ``test/good`` (as many as the defective cells, but at most a third
  of the normal cells) and ``train/good`` (the rest);
* cells are listed as fixed-orientation: a quarter turn would make their bus bars run the other way, which no
  real cell image shows.

File stems are the cells' row numbers in elpv's ``labels.csv`` (``0123.png`` is row 123).

Example:
    >>> from trustmae_lib.config import load_profile
    >>> root = write_elpv("/tmp/elpv", load_profile("smoke"))  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
from PIL import Image

from trustmae_lib.data.mvtec import dataset_info
from trustmae_lib.errors import TrustMAEError
from trustmae_lib.io import atomic_directory, write_json

WRITER_VERSION = 1
CATEGORIES = ("mono", "poly")
LICENCE = "CC BY-NC-SA 4.0 (elpv-dataset data); written at build time, never committed"
CITATION = (
    "Buerhop-Lutz et al., A Benchmark for Visual Identification of Defective Solar Cells in "
    "Electroluminescence Imagery, EU PVSEC 2018; Deitsch et al., Automatic classification of defective "
    "photovoltaic module cells in electroluminescence images, Solar Energy 2019"
)


def elpv_version() -> str:
    try:
        return importlib.metadata.version("elpv-dataset")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def load_elpv() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The installed elpv data: images ``(N, 300, 300)`` uint8, probabilities ``(N,)``, types ``(N,)`` str."""
    try:
        from elpv_dataset.utils import load_dataset
    except ImportError:
        raise TrustMAEError(
            "the elpv dataset needs the package elpv-dataset; install it with `pip install elpv-dataset`"
        ) from None
    images, probs, types = load_dataset()
    return np.asarray(images), np.asarray(probs, dtype=np.float64), np.asarray(types).astype(str)


def split_elpv(probs: np.ndarray, types: np.ndarray, max_per_class: int, seed: int) -> dict:
    """Choose the rows of each category's ``train/good``, ``test/good`` and ``test/defective`` (seeded).

    Args:
        probs: ``(N,)`` defect probabilities in {0, 1/3, 2/3, 1}.
        types: ``(N,)`` cell types.
        max_per_class: cap on cells per (category, label); 0 = all.
        seed: seed of the subset and split draws.

    Returns:
        ``{category: {"train_good": rows, "test_good": rows, "test_defective": rows, "available": {...},
        "excluded": {"1/3": n, "2/3": n}}}``, rows sorted ascending.
    """
    if max_per_class < 0:
        raise TrustMAEError(f"elpv_max_per_class {max_per_class} must be >= 0 (0 = all cells)")
    out = {}
    for k, cat in enumerate(CATEGORIES):
        rng = np.random.default_rng([int(seed), k])
        in_cat = types == cat
        normal = np.flatnonzero(in_cat & np.isclose(probs, 0.0))
        defective = np.flatnonzero(in_cat & np.isclose(probs, 1.0))
        excluded = {
            "1/3": int((in_cat & np.isclose(probs, 1 / 3)).sum()),
            "2/3": int((in_cat & np.isclose(probs, 2 / 3)).sum()),
        }
        available = {"normal": len(normal), "defective": len(defective)}
        if max_per_class:
            if len(normal) > max_per_class:
                normal = np.sort(rng.choice(normal, max_per_class, replace=False))
            if len(defective) > max_per_class:
                defective = np.sort(rng.choice(defective, max_per_class, replace=False))
        if len(normal) < 2 or len(defective) < 1:
            raise TrustMAEError(
                f"elpv category {cat!r} has {len(normal)} normal and {len(defective)} defective cells; "
                "raise elpv_max_per_class (0 = all)"
            )
        n_test = max(1, min(len(defective), len(normal) // 3))
        order = rng.permutation(normal)
        out[cat] = {
            "train_good": np.sort(order[n_test:]),
            "test_good": np.sort(order[:n_test]),
            "test_defective": defective,
            "available": available,
            "excluded": excluded,
        }
    return out


def _config(profile, seed: int) -> dict:
    return {
        "writer_version": WRITER_VERSION,
        "elpv_dataset": elpv_version(),
        "seed": int(seed),
        "size": int(profile.synthetic_size),
        "max_per_class": int(profile.elpv_max_per_class),
    }


def is_current(root: str | Path, profile, seed: int = 0) -> bool:
    """True when ``root`` holds an elpv dataset written with these settings."""
    info = dataset_info(root) if Path(root).is_dir() else {}
    return info.get("name") == "elpv" and info.get("config") == _config(profile, seed)


def _png(cell: np.ndarray, size: int) -> bytes:
    import io

    img = Image.fromarray(np.ascontiguousarray(cell))
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


def write_elpv(out: str | Path, profile, seed: int = 0, source=None) -> Path:
    """Write elpv's mono and poly cells in MVTec AD layout (atomically), resized to ``synthetic_size``.

    Args:
        out: the dataset root to write (replaced if it holds an earlier dataset of this library).
        profile: a :class:`trustmae_lib.config.Profile` (``synthetic_size``, ``elpv_max_per_class``).
        seed: seed of the subset and split draws.
        source: ``(images, probs, types)`` to use instead of the installed package (tests).

    Returns:
        The dataset root.
    """
    images, probs, types = load_elpv() if source is None else source
    size = int(profile.synthetic_size)
    split = split_elpv(probs, types, int(profile.elpv_max_per_class), seed)
    width = max(4, len(str(len(images) - 1)))
    counts = {}
    with atomic_directory(out) as tmp:
        for cat, parts in split.items():
            for part, folder in (("train_good", "train/good"), ("test_good", "test/good"),
                                 ("test_defective", "test/defective")):  # fmt: skip
                target = tmp / cat / folder
                target.mkdir(parents=True)
                for row in parts[part]:
                    (target / f"{int(row):0{width}d}.png").write_bytes(_png(images[row], size))
            counts[cat] = {
                "train_good": len(parts["train_good"]),
                "test_good": len(parts["test_good"]),
                "test_defective": len(parts["test_defective"]),
                "available": parts["available"],
                "excluded_uncertain": parts["excluded"],
            }
        write_json(
            tmp / "dataset.json",
            {
                "name": "elpv",
                "source": f"elpv-dataset {elpv_version()} (pip package; {CITATION})",
                "licence": LICENCE,
                "seed": int(seed),
                "profile": profile.name,
                "size": size,
                "categories": list(CATEGORIES),
                "labels": "defect probability 0 -> test/good or train/good; 1 -> test/defective; "
                "1/3 and 2/3 excluded (counts under excluded_uncertain)",
                "max_per_class": int(profile.elpv_max_per_class),
                "defect_types": {c: ["defective"] for c in CATEGORIES},
                "fixed_orientation": list(CATEGORIES),
                "masks": "none: image-level labels only",
                "file_stems": "row number in elpv_dataset/data/labels.csv",
                "counts": counts,
                "config": _config(profile, seed),
            },
        )
    return Path(out).expanduser().absolute()
