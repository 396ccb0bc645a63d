"""trustmae_lib.data: MVTec AD layout reader, decoding, tensors, cache, augmentation, dataset locator."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from trustmae_lib.config import load_profile
from trustmae_lib.data import embedded, tensors
from trustmae_lib.data import mvtec as data
from trustmae_lib.data.augment import augment, redraw_augment
from trustmae_lib.data.embedded import ensure_dataset
from trustmae_lib.data.mvtec import list_categories, read_image, read_mask, scan_category, to_tensor
from trustmae_lib.data.tensors import TensorCache, load_tensors
from trustmae_lib.errors import TrustMAEError
from trustmae_lib.io import atomic_directory


@pytest.fixture(autouse=True)
def _fresh_cache():
    TensorCache.clear_memory()
    yield
    TensorCache.clear_memory()


# ------------------------------------------------------------------------------------------------- constants


def test_mvtec_constants_match_the_paper_totals():
    assert list(data.MVTEC_CATEGORIES) == sorted(data.MVTEC_CATEGORIES) and len(data.MVTEC_CATEGORIES) == 15
    assert set(data.MVTEC_COUNTS) == set(data.MVTEC_CATEGORIES)
    totals = np.array(list(data.MVTEC_COUNTS.values())).sum(0)
    assert tuple(totals) == (3629, 467, 1258, 73)
    assert set(data.MVTEC_TEXTURES) < set(data.MVTEC_CATEGORIES)
    assert data.FIXED_ORIENTATION == {"cable", "metal_nut", "transistor"}


# ----------------------------------------------------------------------------------------------------- index


def test_scan_reads_the_tree(mvtec_tree):
    (mvtec_tree / ".cache").mkdir()  # hidden folders are not categories
    assert list_categories(mvtec_tree) == ["bottle", "cable", "grid"]
    idx = scan_category(mvtec_tree, "bottle")
    assert idx.counts == (4, 2, 3, 2)
    assert idx.defect_types == ("broken_large", "contamination")
    assert idx.has_masks and not idx.fixed_orientation
    assert all(s.label == 0 and s.defect_type == "good" and s.mask is None for s in idx.train + idx.test_good)
    for s in idx.test_defective:
        assert s.label == 1 and s.mask.name == f"{s.image.stem}_mask.png"
        assert s.mask.parent.name == s.defect_type
    assert idx.root == mvtec_tree.resolve()
    assert scan_category(mvtec_tree, "cable").fixed_orientation  # MVTec's own fixed-orientation category


def test_dataset_json_declares_fixed_orientation(mvtec_tree):
    (mvtec_tree / "dataset.json").write_text('{"fixed_orientation": ["bottle"]}')
    assert scan_category(mvtec_tree, "bottle").fixed_orientation
    assert not scan_category(mvtec_tree, "grid").fixed_orientation


def test_image_level_category_without_ground_truth(mvtec_tree):
    shutil.rmtree(mvtec_tree / "bottle" / "ground_truth")
    idx = scan_category(mvtec_tree, "bottle")
    assert not idx.has_masks and len(idx.test_defective) == 3
    assert all(s.mask is None for s in idx.test)


def test_mvtec_count_check(mvtec_tree):
    msg = data.mvtec_count_mismatch(scan_category(mvtec_tree, "bottle"))
    assert "train good 4 (expected 209)" in msg
    assert data.mvtec_count_mismatch(scan_category(mvtec_tree, "grid")) is not None


def _error(fn, *args) -> str:
    with pytest.raises(TrustMAEError) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_error_root_missing(tmp_path):
    missing = tmp_path / "nope"
    assert str(missing) in _error(scan_category, missing, "bottle")
    assert str(missing) in _error(list_categories, missing)


def test_error_root_not_in_layout(tmp_path):
    (tmp_path / "stuff").mkdir()
    assert str(tmp_path / "stuff" / "train" / "good") in _error(list_categories, tmp_path)
    (tmp_path / "cat" / "test").mkdir(parents=True)
    assert str(tmp_path / "cat" / "train" / "good") in _error(scan_category, tmp_path, "cat")


def test_error_unknown_category_suggests(mvtec_tree):
    msg = _error(scan_category, mvtec_tree, "botle")
    assert "'bottle'" in msg and str(mvtec_tree / "botle") in msg


def test_error_empty_train_and_no_test(mvtec_tree):
    for p in (mvtec_tree / "cable" / "train" / "good").iterdir():
        p.unlink()
    assert str(mvtec_tree / "cable" / "train" / "good") in _error(scan_category, mvtec_tree, "cable")
    shutil.rmtree(mvtec_tree / "grid" / "test")
    shutil.rmtree(mvtec_tree / "grid" / "ground_truth")
    (mvtec_tree / "grid" / "test" / "good").mkdir(parents=True)
    assert str(mvtec_tree / "grid" / "test") in _error(scan_category, mvtec_tree, "grid")


def test_error_mask_without_image_and_image_without_mask(mvtec_tree):
    orphan = mvtec_tree / "bottle" / "ground_truth" / "broken_large" / "007_mask.png"
    shutil.copy(orphan.with_name("000_mask.png"), orphan)
    assert str(orphan) in _error(scan_category, mvtec_tree, "bottle")
    orphan.unlink()
    mask = mvtec_tree / "bottle" / "ground_truth" / "contamination" / "000_mask.png"
    mask.unlink()
    assert str(mask) in _error(scan_category, mvtec_tree, "bottle")


def _add_pool(root, category="bottle"):
    """Copy the category's defective test images (and masks) into a defect pool under new names."""
    base = root / category
    for kind in ("broken_large", "contamination"):
        for img in sorted((base / "test" / kind).iterdir()):
            for sub in ("defect_pool", "defect_pool_ground_truth"):
                (base / sub / kind).mkdir(parents=True, exist_ok=True)
            shutil.copy(img, base / "defect_pool" / kind / f"p{img.name}")
            shutil.copy(base / "ground_truth" / kind / f"{img.stem}_mask.png",
                        base / "defect_pool_ground_truth" / kind / f"p{img.stem}_mask.png")  # fmt: skip
    return base


def test_scan_reads_the_defect_pool_apart_from_the_test_set(mvtec_tree):
    assert scan_category(mvtec_tree, "bottle").pool == ()
    base = _add_pool(mvtec_tree)
    idx = scan_category(mvtec_tree, "bottle")
    assert idx.counts == (4, 2, 3, 2)  # the pool is not part of the test set
    assert len(idx.pool) == 3 and all(s.label == 1 and s.mask.name == f"{s.image.stem}_mask.png" for s in idx.pool)
    assert {s.image.parent.parent.name for s in idx.pool} == {"defect_pool"}
    areas = data.defect_areas(idx)
    assert [r["set"] for r in areas].count("pool") == 3 and all(0 < r["area"] < 1 for r in areas)
    # A pool image without its mask, and normal images in the pool, are named.
    (base / "defect_pool_ground_truth" / "contamination" / "p000_mask.png").unlink()
    assert "p000.png has no mask" in _error(scan_category, mvtec_tree, "bottle")
    shutil.rmtree(base / "defect_pool_ground_truth")
    (base / "defect_pool").rename(base / "pool_tmp")
    (base / "defect_pool" / "good").mkdir(parents=True)
    shutil.copy(base / "train" / "good" / "000.png", base / "defect_pool" / "good" / "000.png")
    assert "defect pool holds defective images only" in _error(scan_category, mvtec_tree, "bottle")


def test_error_path_escaping_root(mvtec_tree, tmp_path):
    outside = tmp_path / "outside.png"
    Image.new("RGB", (32, 32)).save(outside)
    link = mvtec_tree / "bottle" / "train" / "good" / "999.png"
    os.symlink(outside, link)
    msg = _error(scan_category, mvtec_tree, "bottle")
    assert str(link) in msg and "outside the data root" in msg
    assert "plain folder name" in _error(scan_category, mvtec_tree, "../mvtec")


# -------------------------------------------------------------------------------------------------- decoding


def test_read_image_modes(tmp_path):
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "l.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "i16.png")  # 16 bit: v * 257 -> v
    Image.fromarray(np.dstack([rgb, grey])).save(tmp_path / "rgba.png")
    Image.fromarray(np.dstack([grey, grey]), mode="LA").save(tmp_path / "la.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.jpg", quality=100, subsampling=0)
    pal = Image.new("P", (2, 1))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "p.png")
    for name in ("l.png", "i16.png", "la.png"):
        out = read_image(tmp_path / name)
        assert out.shape == (5, 7, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, -1))
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), [[[10, 20, 30], [200, 100, 50]]])
    assert np.abs(read_image(tmp_path / "rgb.jpg").astype(int) - rgb).mean() < 3  # lossy, but RGB


def test_read_image_16bit_uses_the_full_range(tmp_path):
    Image.fromarray(np.array([[0, 128, 32768, 65535]], dtype=np.uint16)).save(tmp_path / "x.png")
    np.testing.assert_array_equal(read_image(tmp_path / "x.png")[..., 0], [[0, 0, 128, 255]])


def test_corrupt_and_truncated_images_name_the_file(mvtec_tree, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    assert str(bad) in _error(read_image, bad)
    good = mvtec_tree / "bottle" / "train" / "good" / "000.png"
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:200])
    assert str(cut) in _error(read_image, cut)


def test_read_mask_binarises_and_checks_size(mvtec_tree, tmp_path):
    m = np.zeros((4, 6), np.uint8)
    m[1, 2], m[3, 5] = 1, 255
    Image.fromarray(m).save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png", (4, 6)), m > 0)
    msg = _error(read_mask, tmp_path / "m.png", (8, 6))
    assert str(tmp_path / "m.png") in msg and "4x6" in msg and "8x6" in msg
    # A wrong-size mask inside a dataset fails when its tensors are loaded.
    idx = scan_category(mvtec_tree, "bottle")
    Image.new("L", (16, 16), 255).save(idx.test_defective[0].mask)
    assert str(idx.test_defective[0].mask) in _error(load_tensors, idx.test_defective, 32)


def test_to_tensor_range_and_shape():
    img = np.zeros((10, 20, 3), np.uint8)
    img[:, 10:] = 255
    x = to_tensor(img, 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    torch.testing.assert_close(x[:, :, 0], torch.full((3, 16), -1.0))
    torch.testing.assert_close(x[:, :, -1], torch.full((3, 16), 1.0))
    same = to_tensor(img[:, :10], 10)  # no resize: exact endpoints
    assert torch.all(same == -1.0)


# --------------------------------------------------------------------------------------------------- tensors


def test_load_tensors_images_and_masks_agree(mvtec_tree):
    idx = scan_category(mvtec_tree, "bottle")
    images, masks = load_tensors(idx.test, 32)
    assert images.shape == (5, 3, 32, 32) and masks.shape == (5, 1, 32, 32)
    assert images.dtype == masks.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    # Defect pixels are 255 everywhere the mask is (conftest), and only there.
    torch.testing.assert_close((images == 1.0).all(1, keepdim=True).float(), masks)
    assert masks[[i for i, s in enumerate(idx.test) if s.label == 0]].sum() == 0
    small_images, small_masks = load_tensors(idx.test, 16)
    assert small_images.shape == (5, 3, 16, 16) and set(small_masks.unique().tolist()) == {0.0, 1.0}


def test_cache_decodes_once_and_returns_identical_tensors(mvtec_tree):
    idx = scan_category(mvtec_tree, "grid")
    cache_dir = tensors.cache_dir_for(mvtec_tree)
    first = TensorCache(cache_dir)
    a = first.get(idx.test, 32)
    assert first.decoded == len(idx.test)
    second = TensorCache(cache_dir)
    b = second.get(idx.test, 32)
    assert second.decoded == 0
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # From disk after the memory is gone: still no decoding, same tensors.
    TensorCache.clear_memory()
    third = TensorCache(cache_dir)
    c = third.get(idx.test, 32)
    assert third.decoded == 0 and all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    assert any(cache_dir.rglob("*.pt")) and list_categories(mvtec_tree) == ["bottle", "cable", "grid"]
    # A changed file is decoded again.
    path = idx.test[0].image
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    fourth = TensorCache(cache_dir)
    fourth.get(idx.test, 32)
    assert fourth.decoded == 1


# ---------------------------------------------------------------------------------------------- augmentation


def _bright_batch(n: int = 8, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    masks = (images[:, :1] > 0.6).float()  # the mask is painted from the image
    return images, masks


def test_augment_keeps_images_and_masks_aligned():
    images, masks = _bright_batch()
    out_i, out_m = augment(images, masks, False, torch.Generator().manual_seed(3))
    assert out_i.shape == images.shape and out_m.shape == masks.shape
    torch.testing.assert_close(out_m, (out_i[:, :1] > 0.6).float())
    # Each sample is an exact permutation of its pixels (no interpolation), and some samples moved.
    for a, b in zip(images, out_i, strict=True):
        torch.testing.assert_close(a.flatten().sort().values, b.flatten().sort().values)
    assert not torch.equal(out_i, images)
    # Every output is one of the 8 symmetries of its input.
    for a, b in zip(images, out_i, strict=True):
        variants = [torch.rot90(v, k, (-2, -1)) for v in (a, a.flip(-1)) for k in range(4)]
        assert any(torch.equal(v, b) for v in variants)


def test_augment_is_deterministic_and_identity_for_fixed_orientation():
    images, masks = _bright_batch()
    a = augment(images, masks, False, torch.Generator().manual_seed(5))
    b = augment(images, masks, False, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    same_i, same_m = augment(images, masks, True, torch.Generator().manual_seed(5))
    assert torch.equal(same_i, images) and torch.equal(same_m, masks)


@pytest.mark.parametrize("fixed", [False, True])
def test_redraw_augment(fixed):
    images, masks = _bright_batch(1, 32)
    image, mask = images[0], masks[0]
    assert redraw_augment(image, mask, 0, fixed)[0] is image
    outs = [redraw_augment(image, mask, k, fixed) for k in range(1, 12)]
    for k, (im, mk) in enumerate(outs, start=1):
        again = redraw_augment(image, mask, k, fixed)
        assert torch.equal(im, again[0]) and torch.equal(mk, again[1])  # deterministic per id
        assert im.shape == image.shape and mk.shape == mask.shape and im.min() >= -1 and im.max() <= 1
        assert set(mk.unique().tolist()) <= {0.0, 1.0}  # moved, not resampled
        if not fixed and k < 8:  # pure symmetries: the mask is still painted from the image
            torch.testing.assert_close(mk, (im[:1] > 0.6).float())
            assert mk.sum() == mask.sum()
    assert len({im.numpy().tobytes() for im, _ in outs}) == len(outs)  # all re-draws differ
    # Alignment through shifts and brightness/contrast: an image equal to its mask stays equal to it.
    two_level = mask.expand(3, -1, -1) * 2 - 1
    for k in range(1, 12):
        im, mk = redraw_augment(two_level, mask, k, fixed)
        torch.testing.assert_close(mk, (im[:1] > im[:1].min()).float())
    with pytest.raises(TrustMAEError):
        redraw_augment(image, mask, -1, fixed)


def test_redraw_then_augment_keeps_defects_on_their_masks(mvtec_tree):
    idx = scan_category(mvtec_tree, "bottle")
    samples = list(idx.train) + list(idx.test_defective)
    redraw = [0] * len(idx.train) + [0, 1, 2]
    images, masks = load_tensors(samples, 32)
    gen = torch.Generator().manual_seed(0)
    for i, r in enumerate(redraw):
        image, mask = images[i], masks[i]
        if r:
            image, mask = redraw_augment(image, mask, r, fixed_orientation=False)
        batch, batch_masks = augment(image[None], mask[None], False, gen)
        assert batch.shape == (1, 3, 32, 32) and batch_masks.shape == (1, 1, 32, 32)
        # The defect stays exactly where the mask is after re-draw + training augmentation.
        torch.testing.assert_close((batch[0] == 1.0).all(0, keepdim=True).float(), batch_masks[0])


# --------------------------------------------------------------------------------------------------- locator


def test_ensure_dataset_builds_once_and_accepts_folders(tmp_path, monkeypatch, mvtec_tree):
    monkeypatch.setenv("TRUSTMAE_DATA", str(tmp_path / "store"))
    profile = load_profile("smoke", synthetic_train=3, synthetic_test_good=2, synthetic_test_defect=5)
    root = ensure_dataset("synthetic", profile)
    assert root == tmp_path / "store" / "smoke" / "synthetic" == embedded.dataset_root("synthetic", profile)
    stamp = (root / "dataset.json").stat().st_mtime_ns
    assert ensure_dataset("synthetic", profile) == root
    assert (root / "dataset.json").stat().st_mtime_ns == stamp  # not rebuilt
    assert scan_category(root, "widget").counts == (3, 2, 5, 4)
    assert ensure_dataset(str(mvtec_tree), profile) == mvtec_tree.resolve()
    msg = _error(ensure_dataset, str(tmp_path / "missing"), profile)
    assert "synthetic" in msg and str(tmp_path / "missing") in msg
    assert not [p for p in (tmp_path / "store" / "smoke").iterdir() if p.name.startswith(".")]  # no leftovers


def test_atomic_directory_refuses_foreign_folders_and_cleans_up(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    assert str(foreign) in _error(lambda: atomic_directory(foreign).__enter__())
    target = tmp_path / "new"
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("boom")
    assert not target.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
