"""Images as tensors: decode, resize to the profile's side, scale to [-1, 1], cache.

Supplement preprocessing: images are resized to the profile's side (256 x 256 in the paper) and scaled to [-1, 1].
Each file is decoded once per ``(file, modification time, side)`` (:class:`TensorCache`), kept as uint8 in memory
and, for the embedded datasets, on disk, so a tensor served from the cache is bit-identical to a fresh decode.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from trustmae_lib.data.mvtec import Sample, mask_to_tensor, read_image, read_mask, to_tensor
from trustmae_lib.errors import TrustMAEError
from trustmae_lib.io import atomic_write

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


def image_tensor(path: str | Path, size: int) -> torch.Tensor:
    """One image file as training and the threshold see it (:func:`load_tensors` without the cache): decoded,
    resized to ``size``, rounded to 8 bits as the cache stores it, and scaled to [-1, 1]: ``(3, S, S)`` float32.

    ``trustmae score`` decodes its files with it, so a training image scored from its file gets the score the run's
    threshold was fitted on (a resized image that skipped the rounding would differ by up to half a grey level).
    """
    return _dequantise(_quantise(to_tensor(read_image(path), size)))


def cache_dir_for(root: str | Path) -> Path:
    """The on-disk tensor cache of a dataset: ``<root>/.cache`` (ignored by :func:`list_categories`)."""
    return Path(root) / ".cache"
