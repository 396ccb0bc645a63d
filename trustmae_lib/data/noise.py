"""The noise protocol: defective images injected into a category's training set (paper §4, Tables 3, 4).

*Reading*: the paper trains on MVTec AD categories "contaminated" with 5-40 % defective images but does not
say how the contaminated sets were built. This module fixes one protocol and records every choice:

* **Noise ratio** ``r`` is the fraction of the *final* training set that is defective, ``d / (n_good + d)``;
  :func:`defect_count` gives the ``d`` closest to ``r``.
* **Pool.** The defective training images are drawn from the category's defective *test* images (MVTec has
  no other defective images). The draw is seeded, without replacement, and spread as evenly as possible over
  the defect types (round robin in a seeded order). MVTec's pools are small -- even moving every defect into
  training gives 15-35 % noise per category -- so when ``d`` exceeds the pool the pool is used again: the
  ``k``-th extra pass over it yields augmented *re-draws* with ``redraw = k`` (:class:`TrainItem`); the data
  layer turns that id into a deterministic augmentation of the file.
* **Protocol** ``overlap`` (default): the test set stays the full test set, so an injected image is also a
  test image. Evidence that the paper did this: in the supplement's Table 4 every toothbrush AUC (12 good x 30
  defective test images = 360 pairs) is a multiple of 1/360 at every noise level (1/1080 for three MemAE
  entries, e.g. a mean of three runs on 360 pairs), whereas removing the injected images would leave
  12 x 27 = 324 pairs at 5 % and no defective test image at all at 40 % (40 defects needed, 30 exist).
  Protocol ``disjoint``: the defective training images never appear in the test set. They come from the
  category's own defect pool when the dataset has one (``defect_pool/``: the synthetic generator writes one per
  category), otherwise from a fixed split of the defective test images (:func:`disjoint_sets`: about half of each
  defect type, the same for every seed and ratio, so all disjoint runs of a category share one smaller test set --
  elpv, and a user's MVTec AD folder). Pools that run out are re-drawn like the overlap pool. The manifest records
  the pool each injected image came from and the test set's size.
* **Manifest.** Every chosen file, with its role, goes into a JSON manifest with paths relative to the data
  root; its hash goes into each result so a run can be traced to its exact training and test files.

Draws are nested: for one seed, the images injected at a lower ratio are a subset of those injected at a
higher ratio (each pass is a fixed seeded ordering of the pool and ``d`` takes a prefix of it).

Example:
    >>> defect_count(209, 0.10)  # bottle: 23 / (209 + 23) = 9.9 %
    23
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import pandas as pd

from trustmae_lib.config import PROTOCOLS
from trustmae_lib.data.mvtec import POOL_DIR, CategoryIndex, Sample
from trustmae_lib.errors import TrustMAEError
from trustmae_lib.io import read_json, write_json

__all__ = [
    "MAX_RATIO",
    "MANIFEST_VERSION",
    "TrainItem",
    "NoisySplit",
    "defect_count",
    "disjoint_sets",
    "inject_noise",
    "save_manifest",
    "load_manifest",
    "noise_table",
]

MAX_RATIO = 0.9
MANIFEST_VERSION = 1
#: The ``disjoint`` protocol without a defect pool: the seed of the split of the defective test images (fixed, so
#: that every seed and ratio of a category is tested on the same images).
SPLIT_SEED = 0
_ROLES = ("train_good", "train_injected", "test")


def _check_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.floating, np.integer)):
        raise TrustMAEError(f"noise ratio {ratio!r} is not a number; give a fraction in [0, {MAX_RATIO}]")
    ratio = float(ratio)
    if not (math.isfinite(ratio) and 0.0 <= ratio <= MAX_RATIO):
        raise TrustMAEError(
            f"noise ratio {ratio} is outside [0, {MAX_RATIO}]; give the defective fraction of the "
            "training set as a fraction (0.1 for 10 %)"
        )
    return ratio


def defect_count(n_good: int, ratio: float) -> int:
    """Number ``d`` of defective images that makes ``d / (n_good + d)`` closest to ``ratio``.

    This is ``round(ratio * n_good / (1 - ratio))`` except at exact half-way points, where the candidate whose
    realised ratio is closer wins.

    Args:
        n_good: normal training images (>= 1).
        ratio: wanted defective fraction of the final training set, in [0, 0.9].

    Returns:
        d >= 0.

    Example:
        >>> [defect_count(60, r) for r in (0.0, 0.05, 0.2, 0.4)]  # toothbrush
        [0, 3, 15, 40]
    """
    ratio = _check_ratio(ratio)
    if isinstance(n_good, bool) or not isinstance(n_good, (int, np.integer)) or n_good < 1:
        raise TrustMAEError(f"n_good={n_good!r}: need at least one normal training image to add noise to")
    n_good = int(n_good)
    x = ratio * n_good / (1.0 - ratio)
    candidates = sorted({math.floor(x), math.ceil(x)})
    return int(min(candidates, key=lambda d: (abs(d / (n_good + d) - ratio), d)))


@dataclass(frozen=True)
class TrainItem:
    """One training image: a file and which augmented re-draw of it to use.

    Attributes:
        sample: the file (normal train image, or a defective test image moved into training).
        redraw: 0 = the file as is; k > 0 = the k-th augmented re-draw of a scarce defective image (the data
            layer derives a deterministic augmentation from k).
    """

    sample: Sample
    redraw: int = 0


@dataclass
class NoisySplit:
    """A category's training and test sets after noise injection (see :func:`inject_noise`).

    Attributes:
        category: category name.
        ratio: requested noise ratio (the realised one is :attr:`realised_ratio`).
        protocol: ``"overlap"`` or ``"disjoint"``.
        seed: seed of the draw.
        train: normal training items, then the injected defective ones.
        test: test samples (the full test set under ``overlap``).
        n_good: normal training images.
        n_injected: defective training items (originals + re-draws).
        n_redrawn: how many of the injected items are augmented re-draws (``redraw > 0``).
        manifest: JSON-able record of every choice (see :func:`save_manifest`).
    """

    category: str
    ratio: float
    protocol: str
    seed: int
    train: tuple[TrainItem, ...]
    test: tuple[Sample, ...]
    n_good: int
    n_injected: int
    n_redrawn: int
    manifest: dict

    @property
    def realised_ratio(self) -> float:
        """Defective fraction of the training set actually built, ``n_injected / (n_good + n_injected)``."""
        return self.n_injected / (self.n_good + self.n_injected)

    @property
    def manifest_hash(self) -> str:
        """First 12 hex digits of the sha256 of the manifest's canonical JSON (sorted keys, no spaces)."""
        return _hash(self.manifest)

    @property
    def injected(self) -> tuple[TrainItem, ...]:
        """The defective training items."""
        return tuple(item for item in self.train if item.sample.label == 1)


def _hash(manifest: Mapping) -> str:
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]


def _pass_order(pool: Sequence[Sample], rng: np.random.Generator) -> list[int]:
    """A seeded ordering of the pool whose every prefix is spread as evenly as possible over defect types.

    Round robin: each defect type's images in a random order; in each round, one image of every type that
    still has one, the types visited in a fresh random order.
    """
    types = sorted({s.defect_type for s in pool})
    queues = []
    for t in types:
        members = [i for i, s in enumerate(pool) if s.defect_type == t]
        queues.append([members[j] for j in rng.permutation(len(members))])
    order: list[int] = []
    depth = 0
    while len(order) < len(pool):
        for t in rng.permutation(len(types)):
            if depth < len(queues[t]):
                order.append(queues[t][depth])
        depth += 1
    return order


def _draw(pool: Sequence[Sample], d: int, seed: int) -> list[tuple[int, int]]:
    """``d`` (pool index, redraw id) pairs: pass 0 = originals without replacement, pass k = k-th re-draws."""
    rng = np.random.default_rng(seed)
    chosen: list[tuple[int, int]] = []
    k = 0
    while len(chosen) < d:
        order = _pass_order(pool, rng)  # drawn for every pass in turn, so draws are nested across d
        take = sorted(order[: d - len(chosen)])  # sorted: the manifest lists files in the index's order
        chosen.extend((i, k) for i in take)
        k += 1
    return chosen


def _relative(path: Path, root: Path, what: str) -> str:
    path, root = Path(path), Path(root)
    for p, r in ((path, root), (path.resolve(), root.resolve())):
        try:
            return p.relative_to(r).as_posix()
        except ValueError:
            continue
    raise TrustMAEError(f"{what} {path} is not under the data root {root}; build the index from that root")


def _entry(sample: Sample, root: Path, role: str, redraw: int | None = None, pool: str | None = None) -> dict:
    entry = {
        "role": role,
        "image": _relative(sample.image, root, "image"),
        "label": int(sample.label),
        "defect_type": str(sample.defect_type),
        "mask": None if sample.mask is None else _relative(sample.mask, root, "mask"),
    }
    if redraw is not None:
        entry["redraw"] = int(redraw)
    if pool is not None:
        entry["pool"] = pool
    return entry


def _build_manifest(
    root: Path,
    category: str,
    ratio: float,
    protocol: str,
    seed: int,
    train: Sequence[TrainItem],
    test: Sequence[Sample],
    n_good: int,
    n_injected: int,
    n_redrawn: int,
    pool: dict | None = None,
) -> dict:
    source = None if pool is None else pool["source"]
    files = [
        _entry(item.sample, root, "train_good")
        if item.sample.label == 0
        else _entry(item.sample, root, "train_injected", item.redraw, source)
        for item in train
    ]
    files += [_entry(s, root, "test") for s in test]
    manifest = {
        "version": MANIFEST_VERSION,
        "category": str(category),
        "ratio": float(ratio),
        "protocol": str(protocol),
        "seed": int(seed),
        "counts": {
            "n_good": int(n_good),
            "n_injected": int(n_injected),
            "n_redrawn": int(n_redrawn),
            "realised_ratio": round(n_injected / (n_good + n_injected), 6),
            "n_test_good": sum(1 for s in test if s.label == 0),
            "n_test_defective": sum(1 for s in test if s.label == 1),
        },
        "files": files,
    }
    if pool is not None:  # only under 'disjoint', so overlap manifests (and their hashes) are as before
        manifest["pool"] = dict(pool)
    return manifest


def disjoint_sets(index: CategoryIndex) -> tuple[tuple[Sample, ...], tuple[Sample, ...], str]:
    """The ``disjoint`` protocol's ``(pool, test set, source)`` for a category.

    ``source`` is ``"defect_pool"`` when the category has its own pool (the test set is then the full test set),
    else ``"test_split"``: of each defect type's test images, ``n // 2`` chosen with :data:`SPLIT_SEED` form the pool
    and the rest stay in the (smaller) test set -- a type with a single image keeps it in the test set.
    """
    if index.pool:
        return tuple(index.pool), tuple(index.test), "defect_pool"
    rng = np.random.default_rng(SPLIT_SEED)
    moved: set[Sample] = set()
    for kind in index.defect_types:
        members = [s for s in index.test_defective if s.defect_type == kind]
        moved.update(members[j] for j in rng.permutation(len(members))[: len(members) // 2])
    pool = tuple(s for s in index.test_defective if s in moved)
    return pool, tuple(s for s in index.test if s not in moved), "test_split"


def inject_noise(index: CategoryIndex, ratio: float, protocol: str = "overlap", seed: int = 0) -> NoisySplit:
    """Build a noisy training set: all normal training images plus ``d`` defective images.

    ``d = defect_count(n_good, ratio)``. The defective images come from the protocol's pool, drawn with a
    ``numpy`` Generator seeded by ``seed``: without replacement first, spread evenly over the defect types; if
    the pool is smaller than ``d``, further passes over it add augmented re-draws (``redraw`` 1, 2, ...).

    Protocols:
        ``overlap`` (default, the paper's reading): the test set is ``index.test`` unchanged. Evidence: the
        supplement's Table 4 toothbrush AUCs are multiples of 1/360 (12 good x 30 defective test images) at
        every noise level, so the full test set was scored.
        ``disjoint``: the injected images come from a pool never tested (:func:`disjoint_sets`: the category's
        ``defect_pool/``, or a fixed split of its defective test images); an error if that leaves no defective or
        no normal test image (a category without any test images trains under either protocol at ratio 0).

    At ratio 0 nothing is injected and the category needs no test images at all (a ``train/good``-only folder).

    Args:
        index: the category's files (normal training images only in ``index.train``).
        ratio: defective fraction of the final training set, in [0, 0.9].
        protocol: ``"overlap"`` or ``"disjoint"``.
        seed: seed of the draw (>= 0); same seed -> same split.

    Returns:
        The split, with its manifest.

    Raises:
        TrustMAEError: bad ratio, protocol or seed; defective images in ``index.train``; no defective test
            image to draw from; ``disjoint`` leaving an empty test class.
    """
    ratio = _check_ratio(ratio)
    if protocol not in PROTOCOLS:
        raise TrustMAEError(f"unknown noise protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise TrustMAEError(f"seed={seed!r} must be a non-negative integer")
    seed = int(seed)
    if any(s.label != 0 for s in index.train):
        raise TrustMAEError(
            f"{index.category}: the index's training set already holds defective images; "
            "build the index from clean train/good images and let inject_noise add the noise"
        )
    n_good = len(index.train)
    d = defect_count(n_good, ratio)
    if protocol == "overlap":
        pool, test, pool_info = tuple(index.test_defective), tuple(index.test), None
    else:
        pool, test, source = disjoint_sets(index)
        pool_info = {"source": source, "size": len(pool), "n_test_defective_full": len(index.test_defective)}
    if d > 0 and not pool and protocol == "overlap":
        where = index.root / index.category / "test"
        raise TrustMAEError(
            f"{index.category}: no defective test images ({where}/<defect type>/) to inject at noise ratio {ratio}; "
            "use noise ratio 0 (for a training folder that already holds defects, pass --contamination instead)"
        )
    if d > 0 and not pool:
        raise TrustMAEError(
            f"{index.category}: protocol 'disjoint' finds no defective images to inject at noise ratio {ratio} (no "
            f"{POOL_DIR}/ folder, and no defect type has two test images to split); use protocol 'overlap' or add "
            f"defective images under {index.root / index.category / POOL_DIR}/<defect type>/"
        )
    missing = [name for name, lab in (("defective", 1), ("normal", 0)) if not any(s.label == lab for s in test)]
    if protocol == "disjoint" and index.test and missing:  # no test set at all (train/good only) is allowed
        raise TrustMAEError(
            f"{index.category}: protocol 'disjoint' leaves no {' or '.join(missing)} test image ({len(pool)} of "
            f"{len(index.test_defective)} defective test images form the pool); add test images or use 'overlap'"
        )
    picks = _draw(pool, d, seed)
    injected = tuple(TrainItem(pool[i], k) for i, k in picks)
    n_redrawn = sum(1 for _, k in picks if k > 0)
    train = tuple(TrainItem(s) for s in index.train) + injected
    manifest = _build_manifest(
        index.root, index.category, ratio, protocol, seed, train, test, n_good, len(injected), n_redrawn, pool_info
    )
    return NoisySplit(
        category=index.category,
        ratio=ratio,
        protocol=protocol,
        seed=seed,
        train=train,
        test=test,
        n_good=n_good,
        n_injected=len(injected),
        n_redrawn=n_redrawn,
        manifest=manifest,
    )


def save_manifest(split: NoisySplit, path: str | Path) -> Path:
    """Write ``split.manifest`` as key-sorted JSON, atomically. Returns the path."""
    return write_json(path, split.manifest)


def _safe_relative(rel, manifest_path: Path) -> str:
    if not isinstance(rel, str) or not rel:
        raise TrustMAEError(f"manifest {manifest_path}: file path {rel!r} is not a string; regenerate the manifest")
    posix, windows = PurePosixPath(rel), PureWindowsPath(rel)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in posix.parts or ".." in windows.parts:
        raise TrustMAEError(
            f"manifest {manifest_path}: path {rel!r} is absolute or escapes the data root; "
            "manifests must hold paths relative to the root -- regenerate it"
        )
    return rel


def _inside_root(root: Path, rel, manifest_path: Path) -> Path:
    """``root / rel``, checked as text (:func:`_safe_relative`) and on disk (no symlink out of ``root``)."""
    path = root / _safe_relative(rel, manifest_path)
    if not path.resolve().is_relative_to(root):
        raise TrustMAEError(
            f"manifest {manifest_path}: path {rel!r} resolves to {path.resolve()}, outside the data root "
            f"{root}; keep every file inside the root (copy it in instead of linking to it)"
        )
    return path


def load_manifest(path: str | Path, root: str | Path) -> NoisySplit:
    """Rebuild a :class:`NoisySplit` from a manifest written by :func:`save_manifest`.

    Args:
        path: the manifest JSON.
        root: the data root its relative paths refer to (the index's ``root``).

    Raises:
        TrustMAEError: unreadable or inconsistent manifest, unknown version, or a path that is absolute or
            leaves the root (``../`` or a symlink).
    """
    path, root = Path(path), Path(root).expanduser().resolve()  # absolute, like CategoryIndex.root
    try:
        data = read_json(path)
    except FileNotFoundError:
        raise TrustMAEError(f"noise manifest {path} not found; create it with save_manifest") from None
    except (OSError, ValueError) as exc:
        raise TrustMAEError(f"noise manifest {path} is not valid JSON ({exc}); regenerate it") from None
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
        version = data.get("version") if isinstance(data, dict) else None
        raise TrustMAEError(
            f"noise manifest {path} has version {version!r}, expected {MANIFEST_VERSION}; regenerate it"
        )
    try:
        train: list[TrainItem] = []
        test: list[Sample] = []
        for entry in data["files"]:
            role = entry["role"]
            if role not in _ROLES:
                raise TrustMAEError(f"manifest {path}: unknown role {role!r}; expected one of {', '.join(_ROLES)}")
            mask = entry["mask"]
            sample = Sample(
                image=_inside_root(root, entry["image"], path),
                label=int(entry["label"]),
                defect_type=str(entry["defect_type"]),
                mask=None if mask is None else _inside_root(root, mask, path),
            )
            if role == "test":
                test.append(sample)
            else:
                train.append(TrainItem(sample, int(entry.get("redraw", 0))))
        if data["protocol"] not in PROTOCOLS:
            raise TrustMAEError(f"manifest {path}: unknown protocol {data['protocol']!r}; regenerate it")
        counts = data["counts"]
        split = NoisySplit(
            category=str(data["category"]),
            ratio=float(data["ratio"]),
            protocol=str(data["protocol"]),
            seed=int(data["seed"]),
            train=tuple(train),
            test=tuple(test),
            n_good=int(counts["n_good"]),
            n_injected=int(counts["n_injected"]),
            n_redrawn=int(counts["n_redrawn"]),
            manifest=data,
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise TrustMAEError(f"noise manifest {path} is missing field {exc}; regenerate it") from None
    # The file must be exactly what inject_noise would have recorded for these files (counts, roles, order).
    rebuilt = _build_manifest(
        root,
        split.category,
        split.ratio,
        split.protocol,
        split.seed,
        split.train,
        split.test,
        sum(1 for t in split.train if t.sample.label == 0),
        len(split.injected),
        sum(1 for t in split.injected if t.redraw > 0),
        data.get("pool"),
    )
    if rebuilt != data:
        raise TrustMAEError(f"noise manifest {path} is inconsistent (counts or fields edited); regenerate it")
    return split


def noise_table(
    counts: Mapping[str, Sequence[int]], ratios: Iterable[float] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4)
) -> pd.DataFrame:
    """How many defects each noise ratio injects, and how many of them must be re-drawn, per category.

    Args:
        counts: category -> ``(n_train_good, n_test_defective)``; 4-tuples laid out like ``MVTEC_COUNTS``
            (train good, test good, test defective, defect types) are accepted too.
        ratios: noise ratios to tabulate.

    Returns:
        One row per (category, ratio) with columns ``category, ratio, n_train_good, n_test_defective,
        injected, redrawn, realised_ratio``; ``redrawn = max(0, injected - n_test_defective)``.

    Example:
        >>> noise_table({"toothbrush": (60, 30)}, ratios=(0.4,))[["injected", "redrawn"]].values.tolist()
        [[40, 10]]
    """
    rows = []
    ratios = tuple(ratios)
    for category, value in counts.items():
        value = tuple(value)
        if len(value) == 2:
            n_good, pool = value
        elif len(value) == 4:
            n_good, _, pool, _ = value
        else:
            raise TrustMAEError(
                f"noise_table: counts for {category!r} must be (n_train_good, n_test_defective), got {value!r}"
            )
        for ratio in ratios:
            d = defect_count(int(n_good), ratio)
            rows.append(
                {
                    "category": category,
                    "ratio": float(ratio),
                    "n_train_good": int(n_good),
                    "n_test_defective": int(pool),
                    "injected": d,
                    "redrawn": max(0, d - int(pool)),
                    "realised_ratio": d / (int(n_good) + d),
                }
            )
    return pd.DataFrame(
        rows,
        columns=[
            "category",
            "ratio",
            "n_train_good",
            "n_test_defective",
            "injected",
            "redrawn",
            "realised_ratio",
        ],
    )
