"""The ``synthetic`` embedded dataset: MVTec-layout categories from real texture photos and a drawn object.

Not part of the paper: a stand-in for MVTec AD (which cannot be shipped) so that every chapter runs offline.
Normal images of the texture categories ``brick``, ``grass`` and ``gravel`` are random crops of the **real**
photographs in scikit-image (``skimage.data.brick/grass/gravel``, CC0), tinted with a per-category colour and
jittered in scale, brightness, contrast and colour. ``widget`` is a procedurally drawn object with a **fixed
orientation** (a plate with four screws, a central boss and an orientation notch), jittered in position,
lighting and sensor noise; it is listed under ``fixed_orientation`` in ``dataset.json`` so that training does
not flip or rotate it, like MVTec's cable, metal_nut and transistor.

Defects are painted onto a clean normal image: ``scratch`` (thin, light, slightly curved), ``crack`` (thin,
dark, random walk), ``hole`` (dark irregular pit), ``stain`` (large, faint, soft discolouration),
``color_spot`` (small off-palette blob) and, for the object, ``missing_part`` (a screw removed). The mask
written to ``ground_truth`` is **exactly** the set of pixels whose value differs from the clean image: pixels
inside the painted footprint that the paint would leave unchanged after rounding are nudged by 3 grey levels.

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

from trustmae_lib.data.mvtec import dataset_info
from trustmae_lib.errors import TrustMAEError
from trustmae_lib.io import atomic_directory, write_json

GENERATOR_VERSION = 1
TEXTURES = ("brick", "grass", "gravel")
OBJECTS = ("widget",)
CATEGORIES = TEXTURES + OBJECTS
FIXED_ORIENTATION = OBJECTS
TEXTURE_DEFECTS = ("color_spot", "crack", "hole", "scratch", "stain")
OBJECT_DEFECTS = ("color_spot", "crack", "missing_part", "scratch")
ALL_DEFECTS = tuple(sorted(set(TEXTURE_DEFECTS + OBJECT_DEFECTS)))
DEFECT_TYPES = {**{c: TEXTURE_DEFECTS for c in TEXTURES}, **{c: OBJECT_DEFECTS for c in OBJECTS}}

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
    """One independent stream per image (stable under subsets of categories)."""
    split_id = ("train", "test_good", "test_defect").index(split)
    defect_id = (("good",) + TEXTURE_DEFECTS + OBJECT_DEFECTS).index(defect)
    return np.random.default_rng([int(seed), CATEGORIES.index(category), split_id, defect_id, int(i)])


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(y, x)``, each ``(size, size)`` float32."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return y, x


# ----------------------------------------------------------------------------------------------------------
# Normal images
# ----------------------------------------------------------------------------------------------------------


def render_texture(category: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A normal texture image: a colour-jittered random crop of a real photo, tinted.

    Returns:
        ``(size, size, 3)`` uint8.
    """
    photo = _photo(category)
    side = photo.shape[0]
    crop = int(rng.integers(int(0.42 * side), int(0.62 * side) + 1))
    y0, x0 = (int(v) for v in rng.integers(0, side - crop + 1, size=2))
    patch = photo[y0 : y0 + crop, x0 : x0 + crop]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    if category != "brick" and rng.random() < 0.5:  # the courses of the bricks keep their direction
        patch = patch[::-1]
    img = Image.fromarray(np.ascontiguousarray(patch), mode="F").resize((size, size), Image.Resampling.BILINEAR)
    g = np.asarray(img, dtype=np.float32)
    mean = float(photo.mean())
    contrast = rng.uniform(0.88, 1.12)
    brightness = rng.uniform(0.92, 1.08)
    tint = np.asarray(TINTS[category], dtype=np.float32) * (1.0 + rng.normal(0.0, 0.02, 3)).astype(np.float32)
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


def render_normal(category: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict | None]:
    """A normal image of ``category`` and, for the object, its drawing parameters (for ``missing_part``)."""
    if category in TEXTURES:
        return render_texture(category, rng, size), None
    if category in OBJECTS:
        p = _widget_params(rng, size)
        return render_widget(p, size), p
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
    """A defect centre: anywhere on a texture (with a margin); on the plate of the object."""
    if p is None:
        return tuple(rng.uniform(margin * size, (1 - margin) * size, 2))
    half = 0.24 * size
    return p["cy"] + rng.uniform(-half, half), p["cx"] + rng.uniform(-half, half)


def _scale(size: int) -> float:
    return size / 128.0


def _paint(kind: str, clean: np.ndarray, rng, category: str, p: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """``(footprint (H, W) bool, painted (H, W, 3) float)`` for one defect drawn on ``clean``."""
    size = clean.shape[0]
    img = clean.astype(np.float32)
    u = _scale(size)
    if kind in ("scratch", "crack"):
        c = np.asarray(_place(rng, category, size, p, 0.2))
        if kind == "scratch":  # a light, slightly bent, thin line
            length = rng.uniform(0.2, 0.4) * size
            ang = rng.uniform(0, np.pi)
            direction, normal = np.array([np.sin(ang), np.cos(ang)]), np.array([np.cos(ang), -np.sin(ang)])
            t = np.linspace(-0.5, 0.5, 16)[:, None]
            bend = rng.uniform(-0.12, 0.12) * length
            pts = c + t * length * direction + (1 - 4 * t**2) * bend * normal
            width, alpha, target = rng.uniform(1.0, 1.6) * u, rng.uniform(0.3, 0.5), 255.0
        else:  # a dark, jagged random walk
            steps = int(rng.integers(8, 14))
            ang = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.45, steps))
            step = rng.uniform(0.02, 0.035) * size
            pts = c + np.concatenate([[[0, 0]], np.cumsum(step * np.stack([np.sin(ang), np.cos(ang)], 1), 0)])
            pts = pts - (pts.mean(0) - c)
            width, alpha, target = rng.uniform(1.0, 1.8) * u, rng.uniform(0.45, 0.7), 0.0
        foot = _polyline_distance(pts, size) <= width / 2
        return foot, img + alpha * (target - img)
    if kind == "hole":  # a dark irregular pit, lighter towards its lower rim
        c = _place(rng, category, size, p, 0.12)
        radius = rng.uniform(0.035, 0.06) * size
        field = _blob(rng, size, c, radius, wobble=0.3)
        foot = field < 1.0
        y, _ = _grid(size)
        depth = np.clip(0.25 + 0.25 * (y - c[0]) / radius, 0.1, 0.5)[..., None]
        return foot, img * depth
    if kind in ("stain", "color_spot"):
        c = _place(rng, category, size, p, 0.15)
        if kind == "stain":  # large, faint, soft-edged
            radius, amax, colour = rng.uniform(0.07, 0.12) * size, rng.uniform(0.25, 0.4), STAIN_COLOUR
        else:  # small, off-palette
            radius, amax, colour = (
                rng.uniform(0.025, 0.045) * size,
                rng.uniform(0.35, 0.55),
                SPOT_COLOURS[category],
            )
        field = _blob(rng, size, c, radius)
        foot = field < 1.0
        alpha = amax * np.clip(1.3 * (1.0 - field**2), 0.0, 1.0)
        return foot, _over(img, alpha, colour)
    if kind == "missing_part":
        missing = int(rng.integers(0, 4))
        painted = render_widget(p, size, missing=missing).astype(np.float32)
        foot = (painted != img).any(-1)
        return foot, painted
    raise TrustMAEError(f"unknown defect type {kind!r}; choose from {', '.join(sorted(ALL_DEFECTS))}")


def paint_defect(
    clean: np.ndarray, kind: str, rng: np.random.Generator, category: str, params: dict | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect on a clean image.

    The returned mask is exactly the set of changed pixels: outside it the image equals ``clean``, inside it
    every pixel differs in at least one channel.

    Args:
        clean: ``(H, W, 3)`` uint8 normal image.
        kind: a defect type (``scratch``, ``crack``, ``hole``, ``stain``, ``color_spot``, ``missing_part``).
        rng: random stream.
        category: the category (placement and colours).
        params: the object's drawing parameters (``missing_part`` needs them).

    Returns:
        ``(defective (H, W, 3) uint8, mask (H, W) bool)``.
    """
    if kind == "missing_part" and params is None:
        raise TrustMAEError("missing_part needs the object's drawing parameters; use it on the widget category")
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


def generate_synthetic(out: str | Path, profile, seed: int = 0, categories: Sequence[str] | None = None) -> Path:
    """Write the synthetic dataset in MVTec AD layout (atomically: a temporary folder renamed onto ``out``).

    Per category: ``profile.synthetic_train`` normal training images, ``synthetic_test_good`` normal test
    images and ``synthetic_test_defect`` defective test images spread over the category's defect types, each
    ``synthetic_size`` pixels square, with masks in ``ground_truth``. ``<out>/dataset.json`` records the
    provenance.

    Args:
        out: the dataset root to write (replaced if it holds an earlier dataset of this library).
        profile: a :class:`trustmae_lib.config.Profile`.
        seed: generator seed (same seed -> byte-identical files).
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
            types = DEFECT_TYPES[cat]
            for split, n in (("train", profile.synthetic_train), ("test_good", profile.synthetic_test_good)):
                folder = base / ("train" if split == "train" else "test") / "good"
                folder.mkdir(parents=True)
                for i in range(n):
                    image, _ = render_normal(cat, image_rng(seed, cat, split, "good", i), size)
                    (folder / f"{i:03d}.png").write_bytes(_png(image))
            per_type = dict(zip(types, _spread(profile.synthetic_test_defect, len(types)), strict=True))
            for kind, n in per_type.items():
                img_dir, gt_dir = base / "test" / kind, base / "ground_truth" / kind
                img_dir.mkdir(parents=True)
                gt_dir.mkdir(parents=True)
                for i in range(n):
                    rng = image_rng(seed, cat, "test_defect", kind, i)
                    clean, params = render_normal(cat, rng, size)
                    image, mask = paint_defect(clean, kind, rng, cat, params)
                    (img_dir / f"{i:03d}.png").write_bytes(_png(image))
                    (gt_dir / f"{i:03d}_mask.png").write_bytes(_png(mask.astype(np.uint8) * 255))
            counts[cat] = {
                "train_good": profile.synthetic_train,
                "test_good": profile.synthetic_test_good,
                "test_defective": per_type,
            }
        write_json(
            tmp / "dataset.json",
            {
                "name": "synthetic",
                "generator": "trustmae_lib.data.synthetic",
                "generator_version": GENERATOR_VERSION,
                "seed": int(seed),
                "profile": profile.name,
                "size": size,
                "categories": cats,
                "defect_types": {c: list(DEFECT_TYPES[c]) for c in cats},
                "fixed_orientation": [c for c in cats if c in FIXED_ORIENTATION],
                "counts": counts,
                "sources": {c: SOURCES.get(c, "procedurally drawn by trustmae_lib.data.synthetic") for c in cats},
                "licence": "texture photos: scikit-image's data module, CC0; drawings and defects: generated",
                "masks": "ground_truth masks are exactly the pixels that differ from the clean image",
                "config": _config(profile, seed, cats),
            },
        )
    return Path(out).expanduser().absolute()
