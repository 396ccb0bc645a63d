"""Where datasets live: the embedded ones (``synthetic``, ``elpv``) built on demand, or a user's MVTec AD folder.

:func:`ensure_dataset` returns a dataset root: an embedded dataset is built under ``$TRUSTMAE_DATA`` (default
``<repository>/data`` in a checkout, ``~/.cache/trustmae/data`` for an installed wheel) the first time, and rebuilt
when its generator settings change; any other name is a folder in MVTec AD layout, checked by
:func:`trustmae_lib.data.mvtec.list_categories`.

Example:
    >>> root = ensure_dataset("synthetic", load_profile("cpu"))  # doctest: +SKIP
    >>> [row["category"] for row in describe(root)]  # doctest: +SKIP
    ['brick', 'grass', 'gravel', 'widget']
"""

from __future__ import annotations

import os
from pathlib import Path

from trustmae_lib.config import REPO_ROOT
from trustmae_lib.data.mvtec import list_categories, scan_category
from trustmae_lib.errors import TrustMAEError

EMBEDDED_DATASETS = ("synthetic", "elpv")


def _default_data_dir() -> Path:
    """``<repo>/data`` in a checkout; for an installed wheel ``$XDG_CACHE_HOME/trustmae/data`` (default
    ``~/.cache/trustmae/data``): writable, the same whatever the current folder, and the data is rebuilt on demand."""
    if REPO_ROOT is not None:
        return REPO_ROOT / "data"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "trustmae" / "data"


#: Where embedded datasets are built: ``<repo>/data`` in a checkout, ``~/.cache/trustmae/data`` for an installed
#: wheel, unless the environment sets ``TRUSTMAE_DATA``.
DATA_DIR = Path(os.environ.get("TRUSTMAE_DATA") or _default_data_dir())


def data_dir() -> Path:
    """The folder embedded datasets are built in: ``$TRUSTMAE_DATA`` or :data:`DATA_DIR`'s default (read per call)."""
    env = os.environ.get("TRUSTMAE_DATA")
    return Path(env).expanduser() if env else DATA_DIR


def dataset_root(name: str, profile) -> Path:
    """``<data dir>/<profile name>/<name>`` -- where :func:`ensure_dataset` builds an embedded dataset."""
    return data_dir() / profile.name / name


def ensure_dataset(name: str | Path, profile, seed: int = 0) -> Path:
    """Return a dataset root, building an embedded dataset first if needed.

    Args:
        name: ``"synthetic"`` or ``"elpv"`` (built under :func:`dataset_root` when missing or built with other
            settings), or the path of an existing folder in MVTec AD layout (returned as is after a layout
            check).
        profile: a :class:`trustmae_lib.config.Profile` (sizes and counts of the embedded datasets).
        seed: generator seed of an embedded dataset.

    Raises:
        TrustMAEError: an unknown name that is not a folder, or a folder not in MVTec AD layout.
    """
    if str(name) in EMBEDDED_DATASETS:
        from trustmae_lib.data import elpv, synthetic

        root = dataset_root(str(name), profile)
        builder = synthetic if name == "synthetic" else elpv
        if builder.is_current(root, profile, seed):
            return root
        if name == "synthetic":
            return synthetic.generate_synthetic(root, profile, seed=seed)
        return elpv.write_elpv(root, profile, seed=seed)
    path = Path(name).expanduser()
    if not path.exists() and not path.is_absolute() and REPO_ROOT is not None:
        in_repo = REPO_ROOT / path  # sweep files name folders relative to the repository
        path = in_repo if in_repo.exists() else path
    if not path.exists():
        raise TrustMAEError(
            f"unknown dataset {str(name)!r}: {path} does not exist; use 'synthetic', 'elpv' or the path of a "
            "folder in MVTec AD layout"
        )
    list_categories(path)  # layout check
    return path.resolve()


def describe(root: str | Path) -> list[dict]:
    """One row per category: counts (the defect pool's too), defect types, masks and orientation (for the CLI and the
    book)."""
    rows = []
    for cat in list_categories(root):
        idx = scan_category(root, cat)
        tg, ttg, ttd, nd = idx.counts
        rows.append({"category": cat, "train_good": tg, "test_good": ttg, "test_defective": ttd,
                     "defect_pool": len(idx.pool), "defect_types": ",".join(idx.defect_types),
                     "masks": idx.has_masks, "fixed_orientation": idx.fixed_orientation})  # fmt: skip
    return rows
