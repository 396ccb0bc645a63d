"""The ``synthetic`` embedded dataset: MVTec-layout categories from real texture photos and two drawn objects.

Not part of the paper: a stand-in for MVTec AD (which cannot be shipped) so that every chapter runs offline.
Normal images of the texture categories ``brick``, ``grass`` and ``gravel`` are random crops of the **real**
photographs in scikit-image (``skimage.data.brick/grass/gravel``, CC0), tinted with a per-category colour and
jittered in scale, brightness, contrast and colour. Two objects are drawn procedurally:

* ``widget`` -- a plate with four screws, a central boss and an orientation notch, with a **fixed orientation**
  (listed under ``fixed_orientation`` in ``dataset.json``, so training does not flip or rotate it, like MVTec's
  cable, metal_nut and transistor); jittered in position, lighting and sensor noise.
* ``gear`` -- a ten-tooth brass gear seen from above at a **random angle** (rotation-invariant, so training
  augments it, like MVTec's screw or metal_nut seen from above), with a bore, five lightening holes and a hub.

Defects are painted onto a clean normal image; the size and contrast of every type are drawn from the uniform
ranges in :data:`DEFECT_SPECS` (chapter 1 tabulates them and plots the areas they produce). Textures:
``scratch`` (light line), ``crack`` (dark jagged line), ``hole`` (dark pit), ``stain`` (soft discolouration),
``color_spot`` (off-palette blob), ``smudge`` (a worn patch where the texture is blurred away). Widget:
``scratch``, ``crack``, ``color_spot`` and ``missing_part`` (a screw left out). Gear: ``missing_tooth``,
``bent_tooth``, ``contamination`` (a dark oily blob) and ``wrong_colour`` (a hub of the wrong finish). The mask
written to ``ground_truth`` is **exactly** the set of pixels whose value differs from the clean image: pixels inside
the painted footprint that the paint would leave unchanged after rounding are nudged by 3 grey levels.

Every category also gets a **defect pool** (``<category>/defect_pool/<type>/`` with masks in
``<category>/defect_pool_ground_truth/<type>/``): defective images of the same types drawn from their own random
streams, never part of the test set. The ``disjoint`` noise protocol injects from it
(:func:`trustmae_lib.data.noise.inject_noise`). It holds as many images as 40 % noise needs (the paper's highest
ratio), so no pool image is used twice.

Versions: :data:`GENERATOR_VERSION` is the version of the dataset as a whole; :data:`CATEGORY_VERSIONS` (in
:mod:`trustmae_lib.config`) the version of each category's train and test images, part of a run's config hash.
Version 2 recalibrated the textures' defects and normal-image jitter and added the gear and the pools; the widget's
train and test images are byte-identical to version 1.

Same seed -> byte-identical files; each image has its own random stream (seed, category, split, defect type,
number), so generating a subset of the categories gives the same images for them.

Example:
    >>> from trustmae_lib.config import load_profile
    >>> root = generate_synthetic("/tmp/synth", load_profile("smoke"))  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import io as _io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from trustmae_lib.config import CATEGORY_VERSIONS, PAPER_NOISE_RATIOS
from trustmae_lib.data.mvtec import POOL_DIR, POOL_MASK_DIR, dataset_info
from trustmae_lib.data.noise import defect_count
from trustmae_lib.errors import TrustMAEError
from trustmae_lib.io import atomic_directory, write_json

GENERATOR_VERSION = 2
TEXTURES = ("brick", "grass", "gravel")
OBJECTS = ("widget", "gear")
CATEGORIES = TEXTURES + OBJECTS
FIXED_ORIENTATION = ("widget",)
TEXTURE_DEFECTS = ("color_spot", "crack", "hole", "scratch", "smudge", "stain")
OBJECT_DEFECTS = ("color_spot", "crack", "missing_part", "scratch")  # the widget's
GEAR_DEFECTS = ("bent_tooth", "contamination", "missing_tooth", "wrong_colour")
DEFECT_TYPES = {**{c: TEXTURE_DEFECTS for c in TEXTURES}, "widget": OBJECT_DEFECTS, "gear": GEAR_DEFECTS}
ALL_DEFECTS = tuple(sorted({d for types in DEFECT_TYPES.values() for d in types}))
SPLITS = ("train", "test_good", "test_defect", "pool")
#: Random-stream id of each image kind (fixed: new types are appended, so older images keep their streams).
STREAM_IDS = {"good": 0, "color_spot": 1, "crack": 2, "hole": 3, "scratch": 4, "stain": 5, "missing_part": 8,
              "bent_tooth": 9, "contamination": 10, "missing_tooth": 11, "wrong_colour": 12, "smudge": 13}  # fmt: skip

#: Uniform ranges ``(low, high)`` of each defect's size and strength, per family of categories. Lengths and radii
#: are fractions of the image side, widths pixels at 128 px (scaled with the image), ``opacity`` the paint's
#: weight towards its target colour. The widget keeps its version-1 ranges (its images must not change); the
#: textures were recalibrated in version 2 (chapter 1 says why).
DEFECT_SPECS = {
    "texture": {
        "scratch": {"length": (0.25, 0.45), "width": (2.4, 3.4), "opacity": (0.6, 0.9)},
        "crack": {"segments": (12, 18), "step": (0.025, 0.04), "width": (2.0, 3.0), "opacity": (0.5, 0.8)},
        "hole": {"radius": (0.05, 0.08), "depth": (0.3, 0.6)},  # brightness left at the pit's centre
        "smudge": {"radius": (0.09, 0.13), "blur": (2.5, 4.0), "opacity": (0.85, 1.0)},  # blur: sigma at 128 px
        "stain": {"radius": (0.08, 0.13), "opacity": (0.65, 0.85)},
        "color_spot": {"radius": (0.05, 0.075), "opacity": (0.45, 0.7)},
    },
    "widget": {
        "scratch": {"length": (0.2, 0.4), "width": (1.0, 1.6), "opacity": (0.3, 0.5)},
        "crack": {"segments": (8, 14), "step": (0.02, 0.035), "width": (1.0, 1.8), "opacity": (0.45, 0.7)},
        "color_spot": {"radius": (0.025, 0.045), "opacity": (0.35, 0.55)},
        "missing_part": {"which": "one of the four screws"},
    },
    "gear": {
        "missing_tooth": {"which": "one of the ten teeth"},
        "bent_tooth": {"bend": (0.25, 0.45)},  # tip displaced by this fraction of the tooth pitch
        "contamination": {"radius": (0.04, 0.065), "opacity": (0.65, 0.85)},
        "wrong_colour": {"which": "the hub ring, in one of three wrong finishes"},
    },
}
#: Normal-image jitter of the textures: crop side (fraction of the 512 px photo), contrast and brightness factors.
TEXTURE_JITTER = {"crop": (0.86, 0.98), "contrast": (0.94, 1.06), "brightness": (0.95, 1.05), "tint_sd": 0.015}

#: Mean RGB of each texture category (the grey photo is tinted with it).
TINTS = {"brick": (172, 96, 70), "grass": (92, 140, 62), "gravel": (150, 140, 122)}
#: Colour-spot hues chosen away from each category's palette.
SPOT_COLOURS = {
    "brick": (70, 110, 190),
    "grass": (190, 80, 150),
    "gravel": (60, 150, 190),
    "widget": (200, 120, 40),
}
STAIN_COLOUR = (70, 52, 30)
OIL_COLOUR = (38, 32, 26)
GEAR_TEETH = 10
GEAR_COLOURS = {"background": (62, 64, 70), "body": (182, 146, 80), "hub": (204, 172, 106)}
WRONG_FINISHES = ((150, 156, 166), (96, 120, 170), (170, 84, 60))  # zinc, blue anodised, copper
NUDGE = 3  # grey levels added to footprint pixels that the paint would leave unchanged
SOURCES = {
    "brick": "skimage.data.brick() -- CC0Textures 'Bricks25', CC0",
    "grass": "skimage.data.grass() -- DeviantArt linolafett 'Grass 01', CC0",
    "gravel": "skimage.data.gravel() -- CC0Textures 'Gravel04', CC0",
}


@functools.cache
def _photo(name: str) -> np.ndarray:
    """The scikit-image photo as float32 (512, 512) in [0, 1] (read once per process)."""
    import skimage.data

    return getattr(skimage.data, name)().astype(np.float32) / 255.0


def image_rng(seed: int, category: str, split: str, defect: str, i: int) -> np.random.Generator:
    """One independent stream per image (stable under subsets of categories); ``split`` one of :data:`SPLITS`."""
    key = [int(seed), CATEGORIES.index(category), SPLITS.index(split), STREAM_IDS[defect], int(i)]
    return np.random.default_rng(key)


def pool_size(n_train: int) -> int:
    """Images in each category's defect pool: what the highest paper noise ratio (40 %) injects into ``n_train``."""
    return defect_count(int(n_train), max(PAPER_NOISE_RATIOS))


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(y, x)``, each ``(size, size)`` float32."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return y, x


# ----------------------------------------------------------------------------------------------------------
# Normal images
# ----------------------------------------------------------------------------------------------------------


def render_texture(category: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A normal texture image: a colour-jittered random crop of a real photo, tinted (:data:`TEXTURE_JITTER`).

    Returns:
        ``(size, size, 3)`` uint8.
    """
    photo = _photo(category)
    side = photo.shape[0]
    lo, hi = TEXTURE_JITTER["crop"]
    crop = int(rng.integers(int(lo * side), int(hi * side) + 1))
    y0, x0 = (int(v) for v in rng.integers(0, side - crop + 1, size=2))
    patch = photo[y0 : y0 + crop, x0 : x0 + crop]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    if category != "brick" and rng.random() < 0.5:  # the courses of the bricks keep their direction
        patch = patch[::-1]
    img = Image.fromarray(np.ascontiguousarray(patch), mode="F").resize((size, size), Image.Resampling.BILINEAR)
    g = np.asarray(img, dtype=np.float32)
    mean = float(photo.mean())
    contrast = rng.uniform(*TEXTURE_JITTER["contrast"])
    brightness = rng.uniform(*TEXTURE_JITTER["brightness"])
    jitter = rng.normal(0.0, TEXTURE_JITTER["tint_sd"], 3)
    tint = np.asarray(TINTS[category], dtype=np.float32) * (1.0 + jitter).astype(np.float32)
    g = (mean + (g - mean) * contrast) / mean * brightness  # relative luminance, ~1 on average
    return np.rint(np.clip(g[..., None] * tint, 0, 255)).astype(np.uint8)


def _widget_params(rng: np.random.Generator, size: int) -> dict:
    return {
        "cy": size / 2 + rng.uniform(-0.02, 0.02) * size,
        "cx": size / 2 + rng.uniform(-0.02, 0.02) * size,
        "light": rng.uniform(0.93, 1.07),
        "gradient": rng.uniform(0.03, 0.08),
        "slot": np.deg2rad(rng.uniform(-8, 8)),
        "noise": rng.normal(0.0, 1.2, (size, size, 1)).astype(np.float32),
    }


def _widget_screws(p: dict, size: int) -> list[tuple[float, float]]:
    d = 0.2 * size
    return [(p["cy"] + sy * d, p["cx"] + sx * d) for sy in (-1, 1) for sx in (-1, 1)]


def _over(img: np.ndarray, alpha: np.ndarray, colour) -> np.ndarray:
    """Alpha-composite a colour (or an ``(H, W, 3)`` image) over ``img``; alpha ``(H, W)`` in [0, 1]."""
    return img + alpha[..., None] * (np.asarray(colour, dtype=np.float32) - img)


def _coverage(sdf: np.ndarray) -> np.ndarray:
    """Antialiased coverage of a shape from its signed distance in pixels (negative inside)."""
    return np.clip(0.5 - sdf, 0.0, 1.0)


def render_widget(p: dict, size: int, missing: int | None = None) -> np.ndarray:
    """Draw the fixed-orientation object; ``missing`` = index (0..3) of a screw left out (a ``missing_part``).

    Returns:
        ``(size, size, 3)`` uint8.
    """
    y, x = _grid(size)
    cy, cx, s = p["cy"], p["cx"], float(size)
    shade = p["light"] * (1.0 + p["gradient"] * (0.5 - y / s))[..., None]  # light from the top
    img = np.broadcast_to(np.asarray([196, 201, 208], np.float32), (size, size, 3)).copy()
    # Plate: rounded square (half side 0.32 s, corner radius 0.07 s) with an orientation notch on top.
    h, r = 0.32 * s, 0.07 * s
    qy, qx = np.abs(y - cy) - (h - r), np.abs(x - cx) - (h - r)
    plate = np.hypot(np.maximum(qy, 0), np.maximum(qx, 0)) + np.minimum(np.maximum(qy, qx), 0) - r
    notch = np.maximum(np.abs(x - cx) - 0.06 * s, np.abs(y - (cy - h)) - 0.05 * s)
    plate = np.maximum(plate, -notch)
    shadow = np.clip(0.5 - (plate - 0.02 * s) / (0.04 * s), 0, 1) * 0.25
    img = img * (1.0 - shadow[..., None])
    brushed = np.asarray([148, 154, 163], np.float32) * (1.0 + 0.04 * np.sin(x / s * 9.0))[..., None]
    img = _over(img, _coverage(plate), brushed)
    # Central boss with a bright rim and a small status lamp below it.
    rb = np.hypot(y - cy, x - cx)
    img = _over(img, _coverage(rb - 0.12 * s) - _coverage(rb - 0.1 * s), (205, 208, 214))
    img = _over(img, _coverage(rb - 0.1 * s), (104, 110, 122))
    img = _over(img, _coverage(np.hypot(y - cy - 0.2 * s, x - cx) - 0.025 * s), (70, 170, 90))
    # Screws: a disc with a slot; a missing screw reveals its dark threaded hole.
    for k, (sy, sx) in enumerate(_widget_screws(p, s)):
        d = np.hypot(y - sy, x - sx)
        if k == missing:
            img = _over(img, _coverage(d - 0.035 * s), (46, 46, 52))
            continue
        img = _over(img, _coverage(d - 0.05 * s), (184, 186, 192))
        along = (x - sx) * np.cos(p["slot"]) + (y - sy) * np.sin(p["slot"])
        across = -(x - sx) * np.sin(p["slot"]) + (y - sy) * np.cos(p["slot"])
        slot = np.maximum(np.abs(along) - 0.035 * s, np.abs(across) - 0.008 * s)
        img = _over(img, _coverage(slot), (90, 92, 98))
    img = img * shade + p["noise"]
    return np.rint(np.clip(img, 0, 255)).astype(np.uint8)


def _gear_params(rng: np.random.Generator, size: int) -> dict:
    return {
        "cy": size / 2 + rng.uniform(-0.03, 0.03) * size,
        "cx": size / 2 + rng.uniform(-0.03, 0.03) * size,
        "theta": rng.uniform(0.0, 2.0 * np.pi),
        "light": rng.uniform(0.93, 1.07),
        "noise": rng.normal(0.0, 1.5, (size, size, 1)).astype(np.float32),
    }


def _gear_shape(p: dict, size: int, missing: int | None, bent: int | None, bend: float) -> np.ndarray:
    """Signed distance (pixels, negative inside) of the gear's outline: root disc plus trapezoidal teeth."""
    y, x = _grid(size)
    s = float(size)
    r = np.hypot(y - p["cy"], x - p["cx"])
    pitch = 2.0 * np.pi / GEAR_TEETH
    phi = np.arctan2(y - p["cy"], x - p["cx"]) - p["theta"]
    k = np.floor(phi / pitch + 0.5)
    local = phi - k * pitch  # angle from the nearest tooth's axis, in [-pitch/2, pitch/2)
    tooth = np.mod(k, GEAR_TEETH).astype(int)
    root, tip = 0.3 * s, 0.38 * s
    height = np.clip((r - root) / (tip - root), 0.0, 1.0)
    if bent is not None:  # the tooth's tip is pushed sideways, more the further out
        local = np.where(tooth == bent, local - bend * pitch * height**1.5, local)
    half_width = pitch * (0.27 - 0.1 * height)
    teeth = np.maximum((np.abs(local) - half_width) * r, r - tip)
    if missing is not None:  # broken off at the root
        teeth = np.where(tooth == missing, np.inf, teeth)
    return np.minimum(r - root, teeth)


def render_gear(
    p: dict, size: int, missing: int | None = None, bent: int | None = None, bend: float = 0.0, hub=None
) -> np.ndarray:
    """Draw the rotation-invariant object: a brass gear on a dark belt, seen from above.

    ``missing``: index of a tooth broken off; ``bent`` / ``bend``: a tooth whose tip is pushed sideways by
    ``bend`` of the tooth pitch; ``hub``: an RGB finish of the hub ring other than brass (``wrong_colour``).

    Returns:
        ``(size, size, 3)`` uint8.
    """
    y, x = _grid(size)
    s = float(size)
    r = np.hypot(y - p["cy"], x - p["cx"])
    phi = np.arctan2(y - p["cy"], x - p["cx"]) - p["theta"]
    img = np.broadcast_to(np.asarray(GEAR_COLOURS["background"], np.float32), (size, size, 3)).copy()
    outline = _gear_shape(p, size, missing, bent, bend)
    holes = [np.hypot(y - p["cy"] - 0.2 * s * np.sin(a), x - p["cx"] - 0.2 * s * np.cos(a)) - 0.045 * s
             for a in p["theta"] + 0.3 + np.arange(5) * 2 * np.pi / 5]  # fmt: skip
    cut = np.minimum(np.min(holes, axis=0), r - 0.055 * s)  # the lightening holes and the bore
    shape = np.maximum(outline, -cut)
    shadow = np.clip(0.5 - (shape - 0.015 * s) / (0.03 * s), 0, 1) * 0.35
    img = img * (1.0 - shadow[..., None])
    machined = 1.0 + 0.035 * np.sin(r / s * 70.0) + 0.05 * np.cos(phi)  # turning marks, light from one side
    img = _over(img, _coverage(shape), np.asarray(GEAR_COLOURS["body"], np.float32) * machined[..., None])
    ring = np.maximum(r - 0.12 * s, 0.055 * s - r)
    finish = GEAR_COLOURS["hub"] if hub is None else hub
    img = _over(img, _coverage(ring), np.asarray(finish, np.float32) * machined[..., None])
    img = img * p["light"] + p["noise"]
    return np.rint(np.clip(img, 0, 255)).astype(np.uint8)


def render_normal(category: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict | None]:
    """A normal image of ``category`` and, for an object, its drawing parameters (the part defects need them)."""
    if category in TEXTURES:
        return render_texture(category, rng, size), None
    if category == "widget":
        p = _widget_params(rng, size)
        return render_widget(p, size), p
    if category == "gear":
        p = _gear_params(rng, size)
        return render_gear(p, size), p
    raise TrustMAEError(f"unknown synthetic category {category!r}; choose from {', '.join(CATEGORIES)}")


# ----------------------------------------------------------------------------------------------------------
# Defects
# ----------------------------------------------------------------------------------------------------------


def _polyline_distance(points: np.ndarray, size: int) -> np.ndarray:
    """Distance of every pixel centre to a polyline ``(K, 2)`` of (y, x) points; ``(size, size)``."""
    y, x = _grid(size)
    pix = np.stack([y, x], axis=-1).reshape(-1, 1, 2)  # (P, 1, 2)
    a, b = points[:-1][None], points[1:][None]  # (1, K-1, 2)
    ab = b - a
    t = np.clip(((pix - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-9), 0.0, 1.0)  # (P, K-1)
    closest = a + t[..., None] * ab
    return np.sqrt(((pix - closest) ** 2).sum(-1)).min(axis=1).reshape(size, size)


def _blob(rng: np.random.Generator, size: int, centre, radius: float, wobble: float = 0.25) -> np.ndarray:
    """Signed radial field of an irregular blob: ``< 1`` inside; ``(size, size)``."""
    y, x = _grid(size)
    dy, dx = y - centre[0], x - centre[1]
    theta = np.arctan2(dy, dx)
    rr = np.ones_like(theta)
    for k in (2, 3, 5):
        rr = rr + wobble / k * rng.uniform(0.5, 1.0) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(dy, dx) / (radius * rr)


def _place(rng: np.random.Generator, category: str, size: int, p: dict | None, margin: float) -> tuple[float, float]:
    """A defect centre: anywhere on a texture (with a margin); on the widget's plate; on the gear's web."""
    if p is None:
        return tuple(rng.uniform(margin * size, (1 - margin) * size, 2))
    if category == "gear":
        radius, angle = rng.uniform(0.14, 0.26) * size, rng.uniform(0.0, 2.0 * np.pi)
        return p["cy"] + radius * np.sin(angle), p["cx"] + radius * np.cos(angle)
    half = 0.24 * size
    return p["cy"] + rng.uniform(-half, half), p["cx"] + rng.uniform(-half, half)


def _scale(size: int) -> float:
    return size / 128.0


def _spec(category: str, kind: str) -> dict:
    family = "texture" if category in TEXTURES else category
    return DEFECT_SPECS[family][kind]


def _line(kind: str, img: np.ndarray, rng, category: str, p: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """A light, slightly bent ``scratch`` or a dark, jagged ``crack`` (a random walk)."""
    size, u, spec = img.shape[0], _scale(img.shape[0]), _spec(category, kind)
    c = np.asarray(_place(rng, category, size, p, 0.2))
    if kind == "scratch":
        length = rng.uniform(*spec["length"]) * size
        ang = rng.uniform(0, np.pi)
        direction, normal = np.array([np.sin(ang), np.cos(ang)]), np.array([np.cos(ang), -np.sin(ang)])
        t = np.linspace(-0.5, 0.5, 16)[:, None]
        bend = rng.uniform(-0.12, 0.12) * length
        pts = c + t * length * direction + (1 - 4 * t**2) * bend * normal
        width, alpha, target = rng.uniform(*spec["width"]) * u, rng.uniform(*spec["opacity"]), 255.0
    else:
        steps = int(rng.integers(*spec["segments"]))
        ang = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.45, steps))
        step = rng.uniform(*spec["step"]) * size
        pts = c + np.concatenate([[[0, 0]], np.cumsum(step * np.stack([np.sin(ang), np.cos(ang)], 1), 0)])
        pts = pts - (pts.mean(0) - c)
        width, alpha, target = rng.uniform(*spec["width"]) * u, rng.uniform(*spec["opacity"]), 0.0
    foot = _polyline_distance(pts, size) <= width / 2
    return foot, img + alpha * (target - img)


def _spot(kind: str, img: np.ndarray, rng, category: str, p: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """A ``hole`` (dark pit, lighter towards its lower rim), a ``smudge`` (texture blurred away) or a soft blob:
    ``stain``, ``color_spot``, ``contamination``."""
    size, spec = img.shape[0], _spec(category, kind)
    if kind == "hole":
        c = _place(rng, category, size, p, 0.12)
        radius, depth = rng.uniform(*spec["radius"]) * size, rng.uniform(*spec["depth"])
        field = _blob(rng, size, c, radius, wobble=0.3)
        y, _ = _grid(size)
        shade = np.clip(depth + 0.25 * (y - c[0]) / radius, depth - 0.15, depth + 0.25)[..., None]
        return field < 1.0, img * shade
    if kind == "smudge":  # worn smooth: the texture inside a soft blob is blurred and slightly brightened
        from scipy.ndimage import gaussian_filter

        c = _place(rng, category, size, p, 0.15)
        radius, sigma = rng.uniform(*spec["radius"]) * size, rng.uniform(*spec["blur"]) * _scale(size)
        amax = rng.uniform(*spec["opacity"])
        field = _blob(rng, size, c, radius)
        worn = gaussian_filter(img, sigma=(sigma, sigma, 0), mode="reflect") * 1.06
        return field < 1.0, _over(img, amax * np.clip(1.5 * (1.0 - field**2), 0.0, 1.0), worn)
    c = _place(rng, category, size, p, 0.15)
    radius, amax = rng.uniform(*spec["radius"]) * size, rng.uniform(*spec["opacity"])
    colour = {"stain": STAIN_COLOUR, "contamination": OIL_COLOUR}.get(kind) or SPOT_COLOURS[category]
    field = _blob(rng, size, c, radius)
    edge = 1.6 if kind == "contamination" else 1.3  # oil has a sharper rim than a stain
    alpha = amax * np.clip(edge * (1.0 - field**2), 0.0, 1.0)
    return field < 1.0, _over(img, alpha, colour)


def _part(kind: str, img: np.ndarray, rng, category: str, p: dict) -> tuple[np.ndarray, np.ndarray]:
    """A defect of an object's parts, drawn by re-rendering the object: the footprint is what changed."""
    size = img.shape[0]
    if kind == "missing_part":
        painted = render_widget(p, size, missing=int(rng.integers(0, 4)))
    elif kind == "missing_tooth":
        painted = render_gear(p, size, missing=int(rng.integers(0, GEAR_TEETH)))
    elif kind == "bent_tooth":
        which, bend = int(rng.integers(0, GEAR_TEETH)), rng.uniform(*_spec(category, kind)["bend"])
        painted = render_gear(p, size, bent=which, bend=bend * rng.choice((-1.0, 1.0)))
    else:  # wrong_colour
        painted = render_gear(p, size, hub=WRONG_FINISHES[int(rng.integers(0, len(WRONG_FINISHES)))])
    painted = painted.astype(np.float32)
    return (painted != img).any(-1), painted


def _paint(kind: str, clean: np.ndarray, rng, category: str, p: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """``(footprint (H, W) bool, painted (H, W, 3) float)`` for one defect drawn on ``clean``."""
    if kind not in DEFECT_TYPES[category]:
        raise TrustMAEError(f"defect type {kind!r} is not one of {category}'s: {', '.join(DEFECT_TYPES[category])}")
    img = clean.astype(np.float32)
    if kind in ("scratch", "crack"):
        return _line(kind, img, rng, category, p)
    if kind in ("hole", "smudge", "stain", "color_spot", "contamination"):
        return _spot(kind, img, rng, category, p)
    return _part(kind, img, rng, category, p)


def paint_defect(
    clean: np.ndarray, kind: str, rng: np.random.Generator, category: str, params: dict | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect on a clean image.

    The returned mask is exactly the set of changed pixels: outside it the image equals ``clean``, inside it
    every pixel differs in at least one channel.

    Args:
        clean: ``(H, W, 3)`` uint8 normal image.
        kind: one of the category's defect types (:data:`DEFECT_TYPES`).
        rng: random stream.
        category: the category (placement, colours and the size ranges of :data:`DEFECT_SPECS`).
        params: an object's drawing parameters (its part defects and placement need them).

    Returns:
        ``(defective (H, W, 3) uint8, mask (H, W) bool)``.
    """
    if category not in CATEGORIES:
        raise TrustMAEError(f"unknown synthetic category {category!r}; choose from {', '.join(CATEGORIES)}")
    if category in OBJECTS and params is None:
        raise TrustMAEError(f"{kind} on the {category} needs the object's drawing parameters (from render_normal)")
    for _ in range(20):  # a footprint may (rarely) come out empty; draw again
        foot, painted = _paint(kind, clean, rng, category, params)
        if foot.sum() >= 4:
            break
    out = clean.copy()
    out[foot] = np.rint(np.clip(painted, 0, 255)).astype(np.uint8)[foot]
    # Pixels of the footprint that rounding left unchanged: nudge them so that mask == changed pixels.
    same = foot & (out == clean).all(-1)
    nudge = np.where(clean < 128, NUDGE, -NUDGE).astype(np.int16)
    out[same] = (clean.astype(np.int16) + nudge)[same].astype(np.uint8)
    return out, foot


# ----------------------------------------------------------------------------------------------------------
# Writing the dataset
# ----------------------------------------------------------------------------------------------------------


def _png(array: np.ndarray) -> bytes:
    """Deterministic PNG bytes (no metadata, fixed compression)."""
    buf = _io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


def _spread(n: int, k: int) -> list[int]:
    """``n`` items over ``k`` types as evenly as possible (the first types get the remainder)."""
    return [n // k + (j < n % k) for j in range(k)]


def _config(profile, seed: int, categories: Sequence[str]) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "size": int(profile.synthetic_size),
        "train": int(profile.synthetic_train),
        "test_good": int(profile.synthetic_test_good),
        "test_defect": int(profile.synthetic_test_defect),
        "categories": list(categories),
    }


def _check_categories(categories: Sequence[str] | None) -> list[str]:
    cats = list(CATEGORIES if categories is None else categories)
    unknown = [c for c in cats if c not in CATEGORIES]
    if unknown or not cats:
        raise TrustMAEError(f"unknown synthetic categories {unknown or cats}; choose from {', '.join(CATEGORIES)}")
    return sorted(set(cats), key=CATEGORIES.index)


def is_current(root: str | Path, profile, seed: int = 0, categories: Sequence[str] | None = None) -> bool:
    """True when ``root`` holds a synthetic dataset written with these settings."""
    info = dataset_info(root) if Path(root).is_dir() else {}
    return info.get("name") == "synthetic" and info.get("config") == _config(
        profile, seed, _check_categories(categories)
    )


def _write_normals(base: Path, cat: str, profile, seed: int) -> None:
    size = int(profile.synthetic_size)
    for split, n in (("train", profile.synthetic_train), ("test_good", profile.synthetic_test_good)):
        folder = base / ("train" if split == "train" else "test") / "good"
        folder.mkdir(parents=True)
        for i in range(n):
            image, _ = render_normal(cat, image_rng(seed, cat, split, "good", i), size)
            (folder / f"{i:03d}.png").write_bytes(_png(image))


def _write_defects(img_dir: Path, gt_dir: Path, cat: str, split: str, total: int, size: int, seed: int) -> dict:
    """``total`` defective images spread over the category's types; returns ``{type: count}``."""
    per_type = dict(zip(DEFECT_TYPES[cat], _spread(total, len(DEFECT_TYPES[cat])), strict=True))
    for kind, n in per_type.items():
        (img_dir / kind).mkdir(parents=True)
        (gt_dir / kind).mkdir(parents=True)
        for i in range(n):
            rng = image_rng(seed, cat, split, kind, i)
            clean, params = render_normal(cat, rng, size)
            image, mask = paint_defect(clean, kind, rng, cat, params)
            (img_dir / kind / f"{i:03d}.png").write_bytes(_png(image))
            (gt_dir / kind / f"{i:03d}_mask.png").write_bytes(_png(mask.astype(np.uint8) * 255))
    return per_type


def _dataset_json(profile, seed: int, cats: list[str], counts: dict) -> dict:
    return {
        "name": "synthetic",
        "generator": "trustmae_lib.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "category_versions": {c: CATEGORY_VERSIONS["synthetic"][c] for c in cats},
        "seed": int(seed),
        "profile": profile.name,
        "size": int(profile.synthetic_size),
        "categories": cats,
        "defect_types": {c: list(DEFECT_TYPES[c]) for c in cats},
        "defect_specs": DEFECT_SPECS,
        "texture_jitter": TEXTURE_JITTER,
        "fixed_orientation": [c for c in cats if c in FIXED_ORIENTATION],
        "counts": counts,
        "sources": {c: SOURCES.get(c, "procedurally drawn by trustmae_lib.data.synthetic") for c in cats},
        "licence": "texture photos: scikit-image's data module, CC0; drawings and defects: generated",
        "masks": "ground_truth masks are exactly the pixels that differ from the clean image",
        "defect_pool": f"{POOL_DIR}/<type>: defective images from their own random streams, never in the test set "
        "(the 'disjoint' noise protocol injects from it)",
        "config": _config(profile, seed, cats),
    }


def generate_synthetic(out: str | Path, profile, seed: int = 0, categories: Sequence[str] | None = None) -> Path:
    """Write the synthetic dataset in MVTec AD layout (atomically: a temporary folder renamed onto ``out``).

    Per category: ``profile.synthetic_train`` normal training images, ``synthetic_test_good`` normal test
    images, ``synthetic_test_defect`` defective test images spread over the category's defect types (masks in
    ``ground_truth``) and a defect pool of :func:`pool_size` images for the ``disjoint`` protocol, each
    ``synthetic_size`` pixels square. ``<out>/dataset.json`` records the provenance.

    Args:
        out: the dataset root to write (replaced if it holds an earlier dataset of this library).
        profile: a :class:`trustmae_lib.config.Profile`.
        seed: generator seed (same seed -> byte-identical files; seed 1 gives the validation copies).
        categories: a subset of :data:`CATEGORIES` (default all).

    Returns:
        The dataset root.
    """
    cats = _check_categories(categories)
    size = int(profile.synthetic_size)
    if size < 32:
        raise TrustMAEError(f"synthetic_size {size} is too small to draw defects; use at least 32")
    counts = {}
    with atomic_directory(out) as tmp:
        for cat in cats:
            base = tmp / cat
            _write_normals(base, cat, profile, seed)
            test = _write_defects(base / "test", base / "ground_truth", cat, "test_defect",
                                  profile.synthetic_test_defect, size, seed)  # fmt: skip
            pool = _write_defects(base / POOL_DIR, base / POOL_MASK_DIR, cat, "pool",
                                  pool_size(profile.synthetic_train), size, seed)  # fmt: skip
            counts[cat] = {"train_good": profile.synthetic_train, "test_good": profile.synthetic_test_good,
                           "test_defective": test, "defect_pool": pool}  # fmt: skip
        write_json(tmp / "dataset.json", _dataset_json(profile, seed, cats, counts))
    return Path(out).expanduser().absolute()
