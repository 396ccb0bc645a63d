"""Augmentation (supplement): horizontal and vertical flips and random rotations, and the noise protocol's re-draws.

*Readings* made here (stated again in chapter 1, "Deviations and readings"):

* **Rotations** are the four multiples of 90 degrees. Together with the two flips they draw uniformly from the
  eight symmetries of the square, which are exact (no interpolation, no empty corners) and move image and mask
  identically. The supplement does not give the angle range. Fixed-orientation categories (cable, metal_nut,
  transistor, and any category a ``dataset.json`` declares so) are not augmented.
* **Re-draws** of scarce defective images (noise protocol, :mod:`trustmae_lib.data.noise`): re-draw ``k`` is a
  fixed, seeded transform of the file -- a symmetry of the square for free-orientation categories, and for
  fixed-orientation ones a small reflect-padded shift plus a small brightness/contrast change (a rotated cable
  is not a cable).
"""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from trustmae_lib.errors import TrustMAEError


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
