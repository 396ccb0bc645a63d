"""Data: the MVTec AD folder layout, image decoding, tensors, augmentation and the embedded datasets.

Implements DESIGN §4 and the supplement's preprocessing (images resized to 256 x 256 and scaled to [-1, 1])
and augmentation (horizontal and vertical flips and random rotations, except for the categories with a fixed
orientation: cable, metal_nut, transistor).

*Readings* made here (stated again in the book):

* **Rotations** are the four multiples of 90 degrees. Together with the two flips they draw uniformly from the
  eight symmetries of the square, which are exact (no interpolation, no empty corners) and move image and mask
  identically. The supplement does not give the angle range.
* **Re-draws** of scarce defective images (noise protocol, :mod:`trustmae_lib.noise`): re-draw ``k`` is a
  fixed, seeded transform of the file -- a symmetry of the square for free-orientation categories, and for
  fixed-orientation ones a small reflect-padded shift plus a small brightness/contrast change (a rotated cable
  is not a cable).
* Images of any shape are stretched to ``size x size`` (MVTec AD's images are square); alpha channels are
  dropped; 16-bit grey is scaled to 8 bits (``v * 255 / 65535``, rounded).

Layout read by :func:`scan_category`::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/<defect type or good>/*.png
    <root>/<category>/ground_truth/<defect type>/<stem>_mask.png   (optional for the whole category)
    <root>/dataset.json                                           (optional: {"fixed_orientation": [...]})

Example:
    >>> index = scan_category("data/cpu/synthetic", "widget")  # doctest: +SKIP
    >>> images, masks = load_tensors(index.test, size=128)  # doctest: +SKIP
    >>> images.shape, masks.shape  # doctest: +SKIP
    (torch.Size([60, 3, 128, 128]), torch.Size([60, 1, 128, 128]))
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

from .errors import TrustMAEError
from .io import atomic_write, read_json

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

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
EMBEDDED_DATASETS = ("synthetic", "elpv")
#: Where embedded datasets are built: ``<repo>/data`` unless the environment sets ``TRUSTMAE_DATA``.
DATA_DIR = Path(os.environ.get("TRUSTMAE_DATA", Path(__file__).resolve().parent.parent / "data"))


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
        test: test images (``test/*``), sorted by defect type then file name.
        fixed_orientation: True -> no flips/rotations during training (supplement).
        has_masks: the category has a ``ground_truth/`` folder (pixel labels); False for image-level sets.
    """

    root: Path
    category: str
    train: tuple[Sample, ...]
    test: tuple[Sample, ...]
    fixed_orientation: bool
    has_masks: bool

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
    return info


def scan_category(root: str | Path, category: str) -> CategoryIndex:
    """Index one category of a dataset in MVTec AD layout.

    Masks are matched by name (``test/<d>/<stem>.png`` -> ``ground_truth/<d>/<stem>_mask.png``). A defective
    image without a mask is allowed only when the category has no ``ground_truth/`` folder at all (image-level
    datasets such as elpv).

    Args:
        root: the dataset root.
        category: a category folder name under ``root``.

    Raises:
        TrustMAEError: missing root or folder (the message names it), unknown category (with the closest
            names), empty ``train/good``, no test images, a defect image without its mask, a mask without its
            image, or a file outside the root.
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
    for needed in (folder / "train" / "good", folder / "test"):
        if not needed.is_dir():
            raise TrustMAEError(
                f"{root} is not in MVTec AD layout: {needed} does not exist; create it (layout "
                "<category>/train/good, <category>/test/<defect>, <category>/ground_truth/<defect>)"
            )

    train_files = [_inside(p, root) for p in _images_in(folder / "train" / "good")]
    if not train_files:
        raise TrustMAEError(f"{folder / 'train' / 'good'} holds no images; add the normal training images")
    train = tuple(Sample(p, 0, "good") for p in train_files)

    gt_dir = folder / "ground_truth"
    has_masks = gt_dir.is_dir()
    masks: dict[tuple[str, str], Path] = {}  # (defect type, image stem) -> mask path
    if has_masks:
        for sub in _subdirs(gt_dir):
            for m in _images_in(sub):
                stem = m.stem[: -len("_mask")] if m.stem.endswith("_mask") else m.stem
                masks[(sub.name, stem)] = _inside(m, root)

    test: list[Sample] = []
    used: set[tuple[str, str]] = set()
    for sub in _subdirs(folder / "test"):
        label = 0 if sub.name == "good" else 1
        for p in _images_in(sub):
            key = (sub.name, p.stem)
            mask = masks.get(key)
            if mask is None and label == 1 and has_masks:
                want = gt_dir / sub.name / f"{p.stem}_mask.png"
                raise TrustMAEError(
                    f"defective image {p} has no mask {want}; add the mask, or remove {gt_dir} altogether "
                    "for image-level labels"
                )
            if mask is not None:
                used.add(key)
            test.append(Sample(_inside(p, root), label, sub.name, mask))
    orphans = sorted(set(masks) - used)
    if orphans:
        mask = masks[orphans[0]]
        raise TrustMAEError(
            f"mask {mask} has no image {folder / 'test' / orphans[0][0] / orphans[0][1]}.*; "
            f"add the image or delete the mask ({len(orphans)} orphan mask(s) in {gt_dir})"
        )
    if not test:
        raise TrustMAEError(f"{folder / 'test'} holds no images; add test/good and test/<defect> images")

    fixed = set(FIXED_ORIENTATION) | set(dataset_info(root).get("fixed_orientation", ()))
    return CategoryIndex(root, category, train, tuple(test), category in fixed, has_masks)


def mvtec_count_mismatch(index: CategoryIndex) -> str | None:
    """Compare an MVTec AD category with the published counts (DESIGN §4); ``None`` when they agree.

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

CACHE_VERSION = 1
#: In-memory cache shared by every :class:`TensorCache`: key -> ((3, S, S) uint8, (1, S, S) bool).
_MEMORY: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _mtime(path: Path | None) -> int | None:
    return None if path is None else path.stat().st_mtime_ns


def _quantise(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 (the cached form; the source pixels are 8-bit anyway)."""
    return torch.round((x + 1.0) * 127.5).clamp(0, 255).to(torch.uint8)


def _dequantise(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [-1, 1] (exact inverse of the 8-bit grid: 0 -> -1, 255 -> 1)."""
    return x.to(torch.float32) / 127.5 - 1.0


class TensorCache:
    """Decodes and resizes each image (and its mask) once per ``(file, mtime, size)``.

    Entries live in a module-level dictionary (shared by all instances in the process) and, when ``cache_dir``
    is given, in one small ``.pt`` file per entry written atomically and read back with ``weights_only=True``.
    Cached images are stored as uint8 after resizing, so a tensor served from memory, from disk or freshly
    decoded is bit-identical.

    Attributes:
        decoded: how many files this instance decoded (cache misses); tests use it.
    """

    def __init__(self, cache_dir: str | Path | None = None, progress: bool = True):
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.progress = progress
        self.decoded = 0

    @staticmethod
    def clear_memory() -> None:
        """Forget every in-memory entry (all instances)."""
        _MEMORY.clear()

    def _key(self, sample: Sample, size: int) -> tuple:
        image = Path(sample.image)
        try:
            return (str(image), _mtime(image), None if sample.mask is None else str(sample.mask),
                    _mtime(sample.mask), int(size))  # fmt: skip
        except FileNotFoundError as exc:
            raise TrustMAEError(f"{exc.filename} does not exist; rescan the dataset") from None

    def _disk_path(self, key: tuple) -> Path | None:
        if self.cache_dir is None:
            return None
        digest = hashlib.sha1(repr((CACHE_VERSION, *key)).encode()).hexdigest()[:20]
        return self.cache_dir / f"s{key[-1]}" / f"{Path(key[0]).stem}-{digest}.pt"

    def _read_disk(self, path: Path | None):
        if path is None or not path.is_file():
            return None
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            return blob["image"], blob["mask"]
        except Exception:  # stale or damaged cache entry: decode again and overwrite it
            return None

    def _write_disk(self, path: Path | None, image: torch.Tensor, mask: torch.Tensor) -> None:
        if path is None:
            return
        try:
            with atomic_write(path, "wb") as handle:
                torch.save({"image": image, "mask": mask}, handle)
        except OSError:  # read-only dataset folder: the in-memory cache still works
            pass

    def _decode(self, sample: Sample, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = read_image(sample.image)
        if sample.mask is None:
            mask = torch.zeros(1, size, size, dtype=torch.bool)
        else:
            mask = mask_to_tensor(read_mask(sample.mask, image.shape[:2]), size).to(torch.bool)
        self.decoded += 1
        return _quantise(to_tensor(image, size)), mask

    def get(self, samples: Sequence[Sample], size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and masks of ``samples`` at side ``size``.

        Returns:
            images ``(N, 3, S, S)`` uint8, masks ``(N, 1, S, S)`` bool (all False where there is no mask).
        """
        keys = [self._key(s, size) for s in samples]
        missing = [i for i, k in enumerate(keys) if k not in _MEMORY]
        show = self.progress and len(missing) > 50
        for i in tqdm(missing, desc=f"decoding images ({size} px)", disable=not show, leave=False):
            path = self._disk_path(keys[i])
            entry = self._read_disk(path)
            if entry is None:
                entry = self._decode(samples[i], size)
                self._write_disk(path, *entry)
            _MEMORY[keys[i]] = entry
        if not samples:
            return torch.zeros(0, 3, size, size, dtype=torch.uint8), torch.zeros(0, 1, size, size, dtype=torch.bool)
        images = torch.stack([_MEMORY[k][0] for k in keys])
        masks = torch.stack([_MEMORY[k][1] for k in keys])
        return images, masks


def load_tensors(
    samples: Sequence[Sample], size: int, cache_dir: str | Path | None = None, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode, resize and scale ``samples`` (each file once per size, see :class:`TensorCache`).

    Args:
        samples: the files.
        size: side ``S``.
        cache_dir: optional on-disk cache folder, e.g. ``<root>/.cache`` (:func:`cache_dir_for`).
        progress: show a tqdm bar when more than 50 files must be decoded.

    Returns:
        images ``(N, 3, S, S)`` float32 in [-1, 1]; masks ``(N, 1, S, S)`` float32 in {0, 1}.
    """
    images, masks = TensorCache(cache_dir, progress).get(samples, size)
    return _dequantise(images), masks.to(torch.float32)


def cache_dir_for(root: str | Path) -> Path:
    """The on-disk tensor cache of a dataset: ``<root>/.cache`` (ignored by :func:`list_categories`)."""
    return Path(root) / ".cache"


# ----------------------------------------------------------------------------------------------------------
# Augmentation (supplement: flips and rotations except for fixed-orientation categories)
# ----------------------------------------------------------------------------------------------------------


def _dihedral_ops(hflip: bool, vflip: bool, quarter_turns: int) -> tuple[tuple[int, ...], bool]:
    """One symmetry of the square as ``(dims to flip, transpose last two dims afterwards)``.

    ``hflip`` (flip W), then ``vflip`` (flip H), then ``quarter_turns`` counter-clockwise turns by 90 degrees
    (``torch.rot90(x, 1, (-2, -1))`` = flip W, then transpose) collapse into a single flip followed by an optional
    transpose: a turn toggles the W flip when not yet transposed, else the H flip, and toggles the transpose.
    """
    flip_h, flip_w, transpose = vflip, hflip, False
    for _ in range(quarter_turns % 4):
        if transpose:
            flip_h = not flip_h
        else:
            flip_w = not flip_w
        transpose = not transpose
    return tuple(d for d, on in ((-2, flip_h), (-1, flip_w)) if on), transpose


def _apply_dihedral(x: torch.Tensor, dims: tuple[int, ...], transpose: bool) -> torch.Tensor:
    """``x.flip(dims)`` then an optional transpose of the last two dims (a view); at most one copy."""
    if dims:
        x = x.flip(dims)
    return x.transpose(-2, -1) if transpose else x


def _dihedral(image, mask, hflip: bool, vflip: bool, quarter_turns: int):
    """Apply one symmetry of the square to an image and its mask with the same operations (keeps them aligned).

    Equal, pixel for pixel, to torchvision v2's ``horizontal_flip``, ``vertical_flip`` and ``rotate`` by
    ``90 * quarter_turns`` degrees in that order (all are permutations of the pixels), in one copy.

    Args:
        image: ``(..., C, S, S)``; mask: ``(..., 1, S, S)``.
        hflip, vflip: flip left-right / top-bottom.
        quarter_turns: counter-clockwise rotations by 90 degrees.
    """
    dims, transpose = _dihedral_ops(hflip, vflip, quarter_turns)
    if not dims and not transpose:
        return image.clone(), mask.clone()
    return (
        _apply_dihedral(image, dims, transpose).contiguous(),
        _apply_dihedral(mask, dims, transpose).contiguous(),
    )


def augment(
    images: torch.Tensor,
    masks: torch.Tensor,
    fixed_orientation: bool,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips and 90-degree rotations, the same for each image and its mask (supplement; *reading*).

    Each sample independently gets a horizontal flip (p = 1/2), a vertical flip (p = 1/2) and ``k`` quarter
    turns (``k`` uniform in 0..3): a uniform draw from the 8 symmetries of the square. Identity when
    ``fixed_orientation``.

    Args:
        images: ``(B, C, S, S)`` (any dtype / range).
        masks: ``(B, 1, S, S)``.
        fixed_orientation: the category must keep its orientation (cable, metal_nut, transistor, ...).
        generator: draws the parameters (on the CPU); the default generator when ``None``.

    Returns:
        ``(images, masks)``, same shapes and dtypes.
    """
    if fixed_orientation or images.shape[0] == 0:
        return images, masks
    if images.shape[-1] != images.shape[-2]:
        raise TrustMAEError(f"augment needs square images, got {tuple(images.shape[-2:])}; resize them first")
    b = images.shape[0]
    # One integer per sample encodes (hflip, vflip, quarter turns): 16 codes, each symmetry hit twice.
    codes = torch.randint(0, 16, (b,), generator=generator)
    # Every sample belongs to exactly one code group, so the outputs are fully written (no clone needed).
    out_i, out_m = torch.empty_like(images), torch.empty_like(masks)
    for code in codes.unique().tolist():  # at most 16 groups, each transformed as one batch
        sel = (codes == code).nonzero().flatten().to(images.device)
        dims, transpose = _dihedral_ops(bool(code & 1), bool(code & 2), code >> 2)
        out_i[sel] = _apply_dihedral(images[sel], dims, transpose)
        out_m[sel] = _apply_dihedral(masks[sel], dims, transpose)
    return out_i, out_m


#: Largest shift of a fixed-orientation re-draw, as a fraction of the side; brightness/contrast factors range.
REDRAW_MAX_SHIFT = 0.06
REDRAW_JITTER = 0.1


def redraw_augment(
    image: torch.Tensor, mask: torch.Tensor, redraw_id: int, fixed_orientation: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``redraw_id``-th deterministic variant of a defective image (*reading*, noise protocol).

    ``0`` is the image itself. Free orientation: re-draws 1..7 are the seven non-identity symmetries of the
    square; from 8 on, a seeded symmetry is combined with the fixed-orientation variant below. Fixed
    orientation: a seeded shift of up to 6 % of the side (reflect padding, integer pixels: exact, the mask
    moves with the image) and brightness/contrast factors in [0.9, 1.1] (image only).

    Args:
        image: ``(3, S, S)`` float in [-1, 1].
        mask: ``(1, S, S)``.
        redraw_id: 0, 1, 2, ...
        fixed_orientation: keep the orientation.

    Returns:
        ``(image, mask)`` with the same shapes, dtypes and ranges.
    """
    if redraw_id < 0:
        raise TrustMAEError(f"redraw id {redraw_id} must be >= 0 (0 = the image itself)")
    if redraw_id == 0:
        return image, mask
    g = torch.Generator().manual_seed(10_007 * int(redraw_id) + 1)
    if not fixed_orientation:
        code = redraw_id if redraw_id < 8 else int(torch.randint(1, 8, (1,), generator=g))
        # code bits: 1 = hflip, 2 = vflip, 4 = one quarter turn -> the seven non-identity symmetries.
        image, mask = _dihedral(image, mask, bool(code & 1), bool(code & 2), (code >> 2) & 1)
        if redraw_id < 8:
            return image, mask
    side = image.shape[-1]
    t = max(1, round(REDRAW_MAX_SHIFT * side))
    dy, dx = (torch.randint(-t, t + 1, (2,), generator=g)).tolist()
    if dy == 0 and dx == 0:
        dx = t
    lo, hi = 1.0 - REDRAW_JITTER, 1.0 + REDRAW_JITTER
    brightness, contrast = (lo + (hi - lo) * torch.rand(2, generator=g)).tolist()
    img, msk = tv_tensors.Image(image), tv_tensors.Mask(mask.to(torch.float32))  # reflect-pad needs float
    # Shift by (dy, dx): reflect-pad by t on every side, then crop an S x S window offset by (t - dy, t - dx).
    img, msk = F.pad(img, [t], padding_mode="reflect"), F.pad(msk, [t], padding_mode="reflect")
    img, msk = F.crop(img, t - dy, t - dx, side, side), F.crop(msk, t - dy, t - dx, side, side)
    x = (img.as_subclass(torch.Tensor) + 1.0) / 2.0  # [-1, 1] -> [0, 1] for the colour functions
    x = F.adjust_contrast(F.adjust_brightness(x, brightness), contrast)
    return (x.clamp(0, 1) * 2.0 - 1.0).to(image.dtype), msk.as_subclass(torch.Tensor).to(mask.dtype)


# ----------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------


class ImageDataset(torch.utils.data.Dataset):
    """Images of a list of samples, decoded once (:class:`TensorCache`) and augmented per item when training.

    Items are dicts ``{"image": (3, S, S) float32 in [-1, 1], "mask": (1, S, S) float32 in {0, 1},
    "label": int, "index": int, "class_id": int}``. ``index`` is the position in ``samples``; ``class_id``
    is the category's class for the conditional batch norm (0 unless ``class_ids`` is given).

    Args:
        samples: the files.
        size: side ``S``.
        train: apply :func:`augment` to every item.
        fixed_orientation: passed to :func:`augment` and :func:`redraw_augment`.
        redraw: optional per-sample re-draw ids (0 = file as is; see :func:`redraw_augment`).
        class_ids: optional per-sample class ids.
        cache_dir: optional on-disk tensor cache (:func:`cache_dir_for`).
        generator: draws the augmentation; the default torch generator when ``None`` (reproducible after
            ``trustmae_lib.utils.setup(seed)``). Leave it ``None`` with ``num_workers > 0``: each worker would
            get a copy of the same generator state, whereas the default generator is seeded per worker.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        size: int,
        train: bool = False,
        fixed_orientation: bool = False,
        redraw: Sequence[int] | None = None,
        class_ids: Sequence[int] | None = None,
        cache_dir: str | Path | None = None,
        generator: torch.Generator | None = None,
    ):
        self.samples = tuple(samples)
        n = len(self.samples)
        self.redraw = tuple(int(r) for r in redraw) if redraw is not None else (0,) * n
        self.class_ids = tuple(int(c) for c in class_ids) if class_ids is not None else (0,) * n
        for name, values in (("redraw", self.redraw), ("class_ids", self.class_ids)):
            if len(values) != n:
                raise TrustMAEError(f"ImageDataset: {name} has {len(values)} entries for {n} samples; pass one each")
        self.size, self.train, self.fixed_orientation, self.generator = (
            size,
            train,
            fixed_orientation,
            generator,
        )
        self._images, self._masks = TensorCache(cache_dir).get(self.samples, size)  # uint8 / bool, shared

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        image, mask = _dequantise(self._images[i]), self._masks[i].to(torch.float32)
        if self.redraw[i]:
            image, mask = redraw_augment(image, mask, self.redraw[i], self.fixed_orientation)
        if self.train:
            images, masks = augment(image[None], mask[None], self.fixed_orientation, self.generator)
            image, mask = images[0], masks[0]
        return {"image": image, "mask": mask, "label": int(self.samples[i].label), "index": int(i),
                "class_id": self.class_ids[i]}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Embedded datasets: where they live and how they are built
# ----------------------------------------------------------------------------------------------------------


def data_dir() -> Path:
    """The folder embedded datasets are built in: ``$TRUSTMAE_DATA`` or ``<repo>/data`` (read per call)."""
    env = os.environ.get("TRUSTMAE_DATA")
    return Path(env).expanduser() if env else DATA_DIR


def dataset_root(name: str, profile) -> Path:
    """``<data dir>/<profile name>/<name>`` -- where :func:`ensure_dataset` builds an embedded dataset."""
    return data_dir() / profile.name / name


@contextlib.contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """Build a folder in a temporary sibling, then rename it onto ``out`` (nothing half-written is visible).

    An existing ``out`` is replaced only if it is a dataset this library wrote (it holds ``dataset.json``) or
    empty; any other folder is refused. On an exception the temporary folder is removed.
    """
    out = Path(out).expanduser().absolute()
    if out.exists() and not (out.is_dir() and ((out / "dataset.json").is_file() or not any(out.iterdir()))):
        raise TrustMAEError(
            f"{out} already exists and is not a dataset written by trustmae_lib (no dataset.json); "
            "choose a new or empty folder"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.{os.getpid()}.old")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
        from . import elpv, synthetic

        root = dataset_root(str(name), profile)
        builder = synthetic if name == "synthetic" else elpv
        if builder.is_current(root, profile, seed):
            return root
        if name == "synthetic":
            return synthetic.generate_synthetic(root, profile, seed=seed)
        return elpv.write_elpv(root, profile, seed=seed)
    path = Path(name).expanduser()
    if not path.exists() and not path.is_absolute():
        from .config import CONFIG_DIR

        in_repo = CONFIG_DIR.parent / path  # sweep files name folders relative to the repository
        path = in_repo if in_repo.exists() else path
    if not path.exists():
        raise TrustMAEError(
            f"unknown dataset {str(name)!r}: {path} does not exist; use 'synthetic', 'elpv' or the path of a "
            "folder in MVTec AD layout"
        )
    list_categories(path)  # layout check
    return path.resolve()


def describe(root: str | Path) -> list[dict]:
    """One row per category: counts, defect types, masks and orientation (for the CLI and the book)."""
    rows = []
    for cat in list_categories(root):
        idx = scan_category(root, cat)
        tg, ttg, ttd, nd = idx.counts
        rows.append({"category": cat, "train_good": tg, "test_good": ttg, "test_defective": ttd,
                     "defect_types": ",".join(idx.defect_types), "masks": idx.has_masks,
                     "fixed_orientation": idx.fixed_orientation})  # fmt: skip
    return rows
