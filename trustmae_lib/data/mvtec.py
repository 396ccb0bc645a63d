"""The MVTec AD folder layout: scan a category, decode images and masks (the reader every dataset goes through).

The embedded datasets (:mod:`trustmae_lib.data.synthetic`, :mod:`trustmae_lib.data.elpv`) are written in this
layout too, so one reader serves them and a user's MVTec AD folder. *Readings* made here (chapter 1):

* Images of any shape are stretched to ``size x size`` (MVTec AD's images are square); alpha channels are
  dropped; 16-bit grey is scaled to 8 bits (``v * 255 / 65535``, rounded).

Layout read by :func:`scan_category`::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/<defect type or good>/*.png             (optional: needed to evaluate, and to inject noise)
    <root>/<category>/ground_truth/<defect type>/<stem>_mask.png   (optional for the whole category)
    <root>/<category>/defect_pool/<defect type>/*.png               (optional: defective images never tested)
    <root>/<category>/defect_pool_ground_truth/<defect type>/<stem>_mask.png
    <root>/dataset.json                                           (optional, see DATASET_JSON_KEYS)

``dataset.json`` is a JSON object; the reader uses two keys (:data:`DATASET_JSON_KEYS`), each a list of category
folder names, and ignores the rest (the embedded generators record their settings there):

* ``fixed_orientation`` -- categories trained without flips and rotations (added to MVTec AD's cable, metal_nut and
  transistor); ``trustmae train --augment on|off`` overrides the rule per run;
* ``textures`` -- texture categories (added to MVTec AD's five): the AE-L2 / AE-SSIM baselines train on crops of
  them and score them with sliding windows.

Example:
    >>> index = scan_category("data/cpu/synthetic", "widget")  # doctest: +SKIP
    >>> images, masks = trustmae_lib.data.tensors.load_tensors(index.test, size=128)  # doctest: +SKIP
    >>> images.shape, masks.shape  # doctest: +SKIP
    (torch.Size([60, 3, 128, 128]), torch.Size([60, 1, 128, 128]))
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from trustmae_lib.config import DATASET_JSON_KEYS
from trustmae_lib.errors import TrustMAEError
from trustmae_lib.io import read_json

# ----------------------------------------------------------------------------------------------------------
# MVTec AD facts (Bergmann et al., CVPR 2019, Table 1)
# ----------------------------------------------------------------------------------------------------------

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
#: ``category -> (train good, test good, test defective, defect types)``.
MVTEC_COUNTS = {
    "bottle": (209, 20, 63, 3),
    "cable": (224, 58, 92, 8),
    "capsule": (219, 23, 109, 5),
    "carpet": (280, 28, 89, 5),
    "grid": (264, 21, 57, 5),
    "hazelnut": (391, 40, 70, 4),
    "leather": (245, 32, 92, 5),
    "metal_nut": (220, 22, 93, 4),
    "pill": (267, 26, 141, 7),
    "screw": (320, 41, 119, 5),
    "tile": (230, 33, 84, 5),
    "toothbrush": (60, 12, 30, 1),
    "transistor": (213, 60, 40, 4),
    "wood": (247, 19, 60, 5),
    "zipper": (240, 32, 119, 7),
}
MVTEC_TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
#: Categories the supplement trains without geometric augmentation.
FIXED_ORIENTATION = frozenset({"cable", "metal_nut", "transistor"})

#: Folders of a category's defect pool (defective images kept out of the test set, for the ``disjoint`` protocol).
POOL_DIR, POOL_MASK_DIR = "defect_pool", "defect_pool_ground_truth"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: The keys of ``<root>/dataset.json`` the reader uses, each a list of category names, and what they do.


# ----------------------------------------------------------------------------------------------------------
# Index of a category's files
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One image file and its labels.

    Attributes:
        image: path of the image file.
        label: 0 normal, 1 defective.
        defect_type: the ``test/<defect type>`` folder name; ``"good"`` for normal images.
        mask: path of the pixel mask, ``None`` for normal images and image-level datasets.
    """

    image: Path
    label: int
    defect_type: str
    mask: Path | None = None


@dataclass(frozen=True)
class CategoryIndex:
    """All files of one category, as read by :func:`scan_category`.

    Attributes:
        root: the dataset root (the folder holding the category folders), absolute.
        category: the category folder name.
        train: normal training images (``train/good``), sorted by file name.
        test: test images (``test/*``), sorted by defect type then file name; empty when the category has no
            ``test/`` folder (training needs only ``train/good``).
        fixed_orientation: True -> no flips/rotations during training (supplement).
        has_masks: the category has a ``ground_truth/`` folder (pixel labels); False for image-level sets.
        pool: defective images kept apart from the test set (``defect_pool/<defect type>/``, masks in
            ``defect_pool_ground_truth/``), which the ``disjoint`` noise protocol injects; empty for MVTec AD.
    """

    root: Path
    category: str
    train: tuple[Sample, ...]
    test: tuple[Sample, ...]
    fixed_orientation: bool
    has_masks: bool
    pool: tuple[Sample, ...] = ()

    @property
    def test_good(self) -> tuple[Sample, ...]:
        return tuple(s for s in self.test if s.label == 0)

    @property
    def test_defective(self) -> tuple[Sample, ...]:
        return tuple(s for s in self.test if s.label == 1)

    @property
    def defect_types(self) -> tuple[str, ...]:
        return tuple(sorted({s.defect_type for s in self.test if s.label == 1}))

    @property
    def counts(self) -> tuple[int, int, int, int]:
        """``(train good, test good, test defective, defect types)`` -- the shape of :data:`MVTEC_COUNTS`."""
        return len(self.train), len(self.test_good), len(self.test_defective), len(self.defect_types)


def _check_root(root: str | Path) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise TrustMAEError(
            f"data root {root} {what}; pass the folder that holds the category folders (MVTec AD layout "
            "<root>/<category>/train/good), or 'synthetic' / 'elpv' for an embedded dataset"
        )
    return root.resolve()


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_image(p))


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _inside(path: Path, root: Path) -> Path:
    """``path`` resolved; a :class:`TrustMAEError` if it escapes ``root`` (through ``..`` or a symlink)."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise TrustMAEError(
            f"{path} resolves to {resolved}, outside the data root {root}; keep every image inside the root "
            "(copy it in instead of linking to it)"
        )
    return resolved


def list_categories(root: str | Path) -> list[str]:
    """Category folder names under ``root`` (those with a ``train`` folder), sorted.

    Raises:
        TrustMAEError: ``root`` is missing, or no sub-folder has the MVTec AD layout.
    """
    root = _check_root(root)
    dirs = _subdirs(root)
    cats = [d.name for d in dirs if (d / "train").is_dir()]
    if not cats and (root / "train").is_dir():
        raise TrustMAEError(
            f"{root} is a category folder (it holds train/), not a data root; pass its parent {root.parent}"
        )
    if not cats:
        first = dirs[0] if dirs else root / "<category>"
        raise TrustMAEError(
            f"{root} is not in MVTec AD layout: {first / 'train' / 'good'} does not exist; the root must "
            "hold one folder per category, each with train/good, test/<defect> and optionally "
            "ground_truth/<defect>"
        )
    return cats


def dataset_info(root: str | Path) -> dict:
    """The dataset's optional ``<root>/dataset.json`` (written by the generators), ``{}`` when absent."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        return {}
    try:
        info = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TrustMAEError(f"{path} is not valid JSON ({exc}); fix or delete it") from None
    if not isinstance(info, dict):
        raise TrustMAEError(f"{path} must hold a JSON object; fix or delete it")
    for key in DATASET_JSON_KEYS:
        value = info.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TrustMAEError(f"{path}: key '{key}' must be a list of category names, e.g. [\"part\"], got "
                                f"{json.dumps(value)}; fix or delete it")  # fmt: skip
    return info


def scan_category(root: str | Path, category: str) -> CategoryIndex:
    """Index one category of a dataset in MVTec AD layout.

    Masks are matched by name (``test/<d>/<stem>.png`` -> ``ground_truth/<d>/<stem>_mask.png``). A defective
    image without a mask is allowed only when the category has no ``ground_truth/`` folder at all (image-level
    datasets such as elpv). The ``test/`` folder is optional: without it the index has no test images (enough to
    train at noise ratio 0 and to score files; evaluating needs test images).

    Args:
        root: the dataset root.
        category: a category folder name under ``root``.

    Raises:
        TrustMAEError: missing root or folder (the message names it), unknown category (with the closest
            names), empty ``train/good``, a ``test/`` folder without images, a defect image without its mask, a
            mask without its image, or a file outside the root.
    """
    root = _check_root(root)
    if not category or Path(category).name != category or category in (".", ".."):
        raise TrustMAEError(f"category {category!r} must be a plain folder name under {root}, without '/' or '..'")
    folder = root / category
    if not folder.is_dir():
        known = [d.name for d in _subdirs(root)]
        close = difflib.get_close_matches(category, known, n=3)
        hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else f"known: {', '.join(known)}"
        raise TrustMAEError(f"unknown category {category!r}: {folder} does not exist; {hint}")
    folder = _inside(folder, root)
    needed = folder / "train" / "good"
    if not needed.is_dir():
        raise TrustMAEError(
            f"{root} is not in MVTec AD layout: {needed} does not exist; create it (layout "
            "<category>/train/good, optionally <category>/test/<defect> and <category>/ground_truth/<defect>)"
        )

    train_files = [_inside(p, root) for p in _images_in(folder / "train" / "good")]
    if not train_files:
        raise TrustMAEError(f"{folder / 'train' / 'good'} holds no images; add the normal training images")
    train = tuple(Sample(p, 0, "good") for p in train_files)

    gt_dir = folder / "ground_truth"
    has_masks = gt_dir.is_dir()
    test = _scan_labelled(folder / "test", gt_dir, root, has_masks, folder / "test")
    test_dir = folder / "test"
    if not test and test_dir.is_dir():
        raise TrustMAEError(f"{test_dir} holds no images; add test/good and test/<defect> images, or remove the "
                            "empty folder to train without a test set")  # fmt: skip
    pool = _scan_labelled(folder / POOL_DIR, folder / POOL_MASK_DIR, root, has_masks, folder / POOL_DIR)
    if any(s.label == 0 for s in pool):
        raise TrustMAEError(f"{folder / POOL_DIR / 'good'} is not allowed: the defect pool holds defective images "
                            "only (normal training images go to train/good)")  # fmt: skip
    fixed = set(FIXED_ORIENTATION) | set(dataset_info(root).get("fixed_orientation", ()))
    return CategoryIndex(root, category, train, tuple(test), category in fixed, has_masks, tuple(pool))


def _masks_in(gt_dir: Path, root: Path) -> dict[tuple[str, str], Path]:
    """``(defect type, image stem) -> mask path`` for the masks under ``gt_dir/<defect type>/``."""
    masks: dict[tuple[str, str], Path] = {}
    for sub in _subdirs(gt_dir) if gt_dir.is_dir() else []:
        for m in _images_in(sub):
            stem = m.stem[: -len("_mask")] if m.stem.endswith("_mask") else m.stem
            masks[(sub.name, stem)] = _inside(m, root)
    return masks


def _scan_labelled(images_dir: Path, gt_dir: Path, root: Path, has_masks: bool, where: Path) -> list[Sample]:
    """The samples of ``images_dir/<defect type or good>/``, each defective one matched to its mask in ``gt_dir``
    (``test/`` with ``ground_truth/``, or the defect pool with its own mask folder)."""
    masks = _masks_in(gt_dir, root) if has_masks else {}
    samples: list[Sample] = []
    used: set[tuple[str, str]] = set()
    for sub in _subdirs(images_dir) if images_dir.is_dir() else []:
        label = 0 if sub.name == "good" else 1
        for p in _images_in(sub):
            key = (sub.name, p.stem)
            mask = masks.get(key)
            if mask is None and label == 1 and has_masks:
                want = gt_dir / sub.name / f"{p.stem}_mask.png"
                raise TrustMAEError(
                    f"defective image {p} has no mask {want}; add the mask, or remove the category's ground_truth "
                    "folder altogether for image-level labels"
                )
            if mask is not None:
                used.add(key)
            samples.append(Sample(_inside(p, root), label, sub.name, mask))
    orphans = sorted(set(masks) - used)
    if orphans:
        mask = masks[orphans[0]]
        raise TrustMAEError(
            f"mask {mask} has no image {where / orphans[0][0] / orphans[0][1]}.*; "
            f"add the image or delete the mask ({len(orphans)} orphan mask(s) in {gt_dir})"
        )
    return samples


def mvtec_count_mismatch(index: CategoryIndex) -> str | None:
    """Compare an MVTec AD category with the published counts (MVTec AD paper, Table 1); ``None`` when they agree.

    Use it to check that a user-supplied MVTec AD folder is complete; returns a one-line description otherwise
    (and ``None`` for categories that are not MVTec AD's).
    """
    want = MVTEC_COUNTS.get(index.category)
    if want is None or tuple(index.counts) == want:
        return None
    names = ("train good", "test good", "test defective", "defect types")
    diffs = ", ".join(f"{n} {g} (expected {w})" for n, g, w in zip(names, index.counts, want, strict=True) if g != w)
    return f"{index.root / index.category}: {diffs}"


# ----------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------


def _open(path: Path, what: str) -> Image.Image:
    img = None
    try:
        img = Image.open(path)
        img.load()  # decode now: a truncated file fails here, not later
    except FileNotFoundError:
        raise TrustMAEError(f"{what} {path} does not exist; rescan the dataset") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        if img is not None:
            img.close()  # a header that opened but data that did not decode: release the file
        raise TrustMAEError(f"cannot read {what} {path} ({exc}); replace or delete the file") from None
    return img


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to RGB.

    Grayscale (8 or 16 bit), palette, RGBA and LA images are converted to RGB; alpha is dropped.

    Returns:
        ``(H, W, 3)`` uint8.

    Raises:
        TrustMAEError: the file is missing, corrupt or truncated (the message names it).
    """
    path = Path(path)
    img = _open(path, "image")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grey (PNG opens as I;16, sometimes as I): full range 0..65535 -> 0..255, rounded.
        a = np.asarray(img).astype(np.float64)
        a = np.rint(np.clip(a, 0, 65535) * (255.0 / 65535.0)).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=-1)
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = a * 255.0 if a.size and np.nanmax(a) <= 1.0 else a
        a = np.rint(np.clip(np.nan_to_num(a), 0, 255)).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=-1)
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")  # honours palette transparency, then drop it below
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8)


def read_mask(path: str | Path, size_hw: tuple[int, int]) -> np.ndarray:
    """Decode a pixel mask: any non-zero colour value is a defect pixel.

    Args:
        path: the mask file (any mode; palette masks are looked up through their palette).
        size_hw: ``(H, W)`` of the image it belongs to.

    Returns:
        ``(H, W)`` bool.

    Raises:
        TrustMAEError: unreadable file, or its size differs from the image's.
    """
    path = Path(path)
    img = _open(path, "mask")
    if img.mode in ("P", "PA", "CMYK", "YCbCr", "HSV", "LAB"):
        img = img.convert("RGB")
    a = np.asarray(img)
    if img.mode in ("LA", "RGBA", "La", "RGBa"):
        a = a[..., :-1]  # colour channels only
    mask = a > 0 if a.ndim == 2 else (a > 0).any(axis=-1)
    if tuple(mask.shape) != tuple(size_hw):
        raise TrustMAEError(
            f"mask {path} is {mask.shape[0]}x{mask.shape[1]} (HxW) but its image is "
            f"{size_hw[0]}x{size_hw[1]}; "
            "regenerate the mask at the image's size"
        )
    return mask


def defect_areas(index: CategoryIndex) -> list[dict]:
    """The area of every masked defect of a category, as a fraction of its image: one row per defective image of the
    test set (``set: "test"``) and of the defect pool (``set: "pool"``), with ``category``, ``defect_type`` and
    ``area``. Images without a mask are left out (image-level datasets give no rows)."""
    rows = []
    for name, samples in (("test", index.test_defective), ("pool", index.pool)):
        for s in samples:
            if s.mask is None:
                continue
            with _open(s.image, "image") as img:
                hw = (img.height, img.width)
            mask = read_mask(s.mask, hw)
            rows.append({"category": index.category, "set": name, "defect_type": s.defect_type,
                         "area": float(mask.mean())})  # fmt: skip
    return rows


def to_tensor(image_u8: np.ndarray, size: int) -> torch.Tensor:
    """Resize (bilinear, antialiased) and scale an image to the model's input range (supplement).

    Args:
        image_u8: ``(H, W, 3)`` uint8.
        size: output side ``S``.

    Returns:
        ``(3, S, S)`` float32 in [-1, 1].
    """
    x = torch.from_numpy(np.ascontiguousarray(image_u8)).permute(2, 0, 1).to(torch.float32) / 255.0
    if tuple(x.shape[-2:]) != (size, size):
        x = F.resize(x, [size, size], interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    return (x.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()


def mask_to_tensor(mask: np.ndarray, size: int) -> torch.Tensor:
    """Resize a mask with nearest-neighbour interpolation (no new values).

    Args:
        mask: ``(H, W)`` bool.
        size: output side ``S``.

    Returns:
        ``(1, S, S)`` float32 in {0, 1}.
    """
    m = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(mask))[None].to(torch.uint8))
    if tuple(m.shape[-2:]) != (size, size):
        m = F.resize(m, [size, size], interpolation=v2.InterpolationMode.NEAREST_EXACT)
    return m.as_subclass(torch.Tensor).to(torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Tensor cache: decode + resize each file once per size
# ----------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------
# Augmentation (supplement: flips and rotations except for fixed-orientation categories)
# ----------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------
# Embedded datasets: where they live and how they are built
# ----------------------------------------------------------------------------------------------------------
