"""The embedded datasets: the synthetic generator (trustmae_lib.data.synthetic) and the elpv writer (.elpv)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from trustmae_lib.config import load_profile
from trustmae_lib.data import elpv, synthetic
from trustmae_lib.data.mvtec import list_categories, read_image, read_mask, scan_category
from trustmae_lib.data.noise import defect_count
from trustmae_lib.errors import TrustMAEError

SMOKE = load_profile("smoke")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return synthetic.generate_synthetic(tmp_path_factory.mktemp("synth") / "synthetic", SMOKE, seed=0)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------- synthetic


def test_layout_counts_and_provenance(synth):
    assert list_categories(synth) == sorted(synthetic.CATEGORIES)
    for cat in synthetic.CATEGORIES:
        idx = scan_category(synth, cat)
        types = synthetic.DEFECT_TYPES[cat]
        assert idx.counts == (SMOKE.synthetic_train, SMOKE.synthetic_test_good, SMOKE.synthetic_test_defect,
                              len(types))  # fmt: skip
        per_type = [sum(s.defect_type == t for s in idx.test_defective) for t in types]
        assert max(per_type) - min(per_type) <= 1  # spread evenly over the defect types
        assert idx.has_masks and all(s.mask is not None for s in idx.test_defective)
        assert idx.fixed_orientation == (cat in synthetic.FIXED_ORIENTATION)
        a = read_image(idx.train[0].image)
        assert a.shape == (SMOKE.synthetic_size, SMOKE.synthetic_size, 3)
        # The defect pool: enough for 40 % noise, every type, masks, and no file shared with the test set.
        assert len(idx.pool) == synthetic.pool_size(SMOKE.synthetic_train) == defect_count(SMOKE.synthetic_train, 0.4)
        assert {s.defect_type for s in idx.pool} == set(types) and all(s.mask is not None for s in idx.pool)
        test_bytes = {s.image.read_bytes() for s in idx.test_defective}
        assert not test_bytes & {s.image.read_bytes() for s in idx.pool}
    assert len(set(synthetic.TEXTURE_DEFECTS)) >= 5 and "missing_part" in synthetic.OBJECT_DEFECTS
    assert {"missing_tooth", "bent_tooth", "contamination", "wrong_colour"} == set(synthetic.GEAR_DEFECTS)
    info = json.loads((synth / "dataset.json").read_text())
    assert info["fixed_orientation"] == ["widget"] and info["seed"] == 0 and info["size"] == SMOKE.synthetic_size
    assert info["generator_version"] == synthetic.GENERATOR_VERSION and info["category_versions"]["widget"] == 1
    assert info["categories"] == list(synthetic.CATEGORIES) and "brick" in info["sources"]["brick"]
    assert synthetic.is_current(synth, SMOKE, 0) and not synthetic.is_current(synth, SMOKE, 1)


def test_same_seed_gives_identical_bytes(synth, tmp_path):
    again = synthetic.generate_synthetic(tmp_path / "again", SMOKE, seed=0)
    assert _files(again) == _files(synth)
    subset = synthetic.generate_synthetic(tmp_path / "subset", SMOKE, seed=0, categories=["widget"])
    widget = {k: v for k, v in _files(synth).items() if k.startswith("widget/")}
    assert {k: v for k, v in _files(subset).items() if k != "dataset.json"} == widget
    other = synthetic.generate_synthetic(tmp_path / "other", SMOKE, seed=1, categories=["brick"])
    first = "brick/train/good/000.png"
    assert other.joinpath(first).read_bytes() != synth.joinpath(first).read_bytes()  # the seed matters


def test_written_masks_are_exactly_the_changed_pixels(synth):
    for cat in synthetic.CATEGORIES:
        index = scan_category(synth, cat)
        for split, samples in (("test_defect", index.test_defective), ("pool", index.pool)):
            for s in samples:
                rng = synthetic.image_rng(0, cat, split, s.defect_type, int(s.image.stem))
                clean, _ = synthetic.render_normal(cat, rng, SMOKE.synthetic_size)
                image = read_image(s.image)
                mask = read_mask(s.mask, image.shape[:2])
                np.testing.assert_array_equal((image != clean).any(-1), mask)
                assert 4 <= mask.sum() <= 0.12 * mask.size  # visible, but a small part of the image


def test_image_streams_of_the_widget_are_those_of_version_1():
    # The widget's images must not change with the generator (its committed results stay current): its streams are
    # [seed, category index 3, split id, v1 defect id, number] as in version 1, whatever types were added since.
    v1 = {"good": 0, "color_spot": 1, "crack": 2, "scratch": 4, "missing_part": 8}
    for kind, ident in v1.items():
        for split, sid in (("train", 0), ("test_good", 1), ("test_defect", 2)):
            a = synthetic.image_rng(5, "widget", split, kind, 7).random(3)
            np.testing.assert_array_equal(a, np.random.default_rng([5, 3, sid, ident, 7]).random(3))
    assert synthetic.CATEGORIES.index("widget") == 3
    assert synthetic.DEFECT_SPECS["widget"]["scratch"]["width"] == (1.0, 1.6)


def test_the_gear_turns_and_its_part_defects_change_only_their_part():
    rng = np.random.default_rng(3)
    params = [synthetic.render_normal("gear", rng, 96)[1] for _ in range(6)]
    assert np.ptp([p["theta"] for p in params]) > 1.0  # seen at many angles (training augments it)
    clean, p = synthetic.render_normal("gear", np.random.default_rng(4), 96)
    for kind in ("missing_tooth", "bent_tooth", "wrong_colour"):
        image, mask = synthetic.paint_defect(clean, kind, np.random.default_rng(1), "gear", p)
        assert 10 <= mask.sum() <= 0.08 * mask.size, kind  # one tooth or the hub ring, not the whole gear


@pytest.mark.parametrize("kind", synthetic.ALL_DEFECTS)
def test_paint_defect_mask_exactness(kind):
    cats = [c for c in synthetic.CATEGORIES if kind in synthetic.DEFECT_TYPES[c]]
    for cat in cats:
        for i in range(4):
            rng = np.random.default_rng([7, i])
            clean, params = synthetic.render_normal(cat, rng, 96)
            image, mask = synthetic.paint_defect(clean, kind, rng, cat, params)
            assert image.dtype == np.uint8 and mask.dtype == bool and mask.any()
            np.testing.assert_array_equal(image[~mask], clean[~mask])  # outside: untouched
            assert (image[mask] != clean[mask]).any(-1).all()  # inside: every pixel changed
            # Not trivial: the mean change inside the mask is well below full contrast.
            assert np.abs(image[mask].astype(int) - clean[mask]).mean() < 150


def test_normal_images_vary(synth):
    imgs = np.stack([read_image(s.image).astype(float) for s in scan_category(synth, "widget").train])
    assert imgs.std(0).mean() > 1.0  # jitter in position / light / noise
    for cat in synthetic.TEXTURES:
        imgs = [read_image(s.image) for s in scan_category(synth, cat).train]
        assert len({a.tobytes() for a in imgs}) == len(imgs)


def test_generator_errors(tmp_path):
    with pytest.raises(TrustMAEError, match="unknown synthetic categories"):
        synthetic.generate_synthetic(tmp_path / "x", SMOKE, categories=["marble"])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(TrustMAEError, match="not a dataset written by trustmae_lib"):
        synthetic.generate_synthetic(foreign, SMOKE, categories=["widget"])
    assert (foreign / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------------------ elpv


def test_split_elpv_on_a_fake_table():
    probs = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1 / 3, 2 / 3, 0, 0, 0, 1, 1, 1, 1 / 3])
    types = np.array(["mono"] * 10 + ["poly"] * 7)
    split = elpv.split_elpv(probs, types, max_per_class=0, seed=0)
    mono = split["mono"]
    assert mono["excluded"] == {"1/3": 1, "2/3": 1}
    assert sorted(np.concatenate([mono["train_good"], mono["test_good"]]).tolist()) == [0, 1, 2, 3, 4, 5]
    assert mono["test_defective"].tolist() == [6, 7] and len(mono["test_good"]) == 2  # min(2 defects, 6 // 3)
    assert split["poly"]["test_defective"].tolist() == [13, 14, 15] and len(split["poly"]["test_good"]) == 1
    capped = elpv.split_elpv(probs, types, max_per_class=3, seed=0)["mono"]
    assert len(capped["train_good"]) + len(capped["test_good"]) == 3
    again = elpv.split_elpv(probs, types, max_per_class=3, seed=0)["mono"]
    assert all(np.array_equal(capped[k], again[k]) for k in ("train_good", "test_good", "test_defective"))
    with pytest.raises(TrustMAEError, match="elpv_max_per_class"):
        elpv.split_elpv(probs, types, max_per_class=-1, seed=0)


def test_write_elpv_smoke_labels_and_counts(tmp_path):
    images, probs, types = elpv.load_elpv()
    assert images.shape[1:] == (300, 300) and set(np.unique(types)) == {"mono", "poly"}
    profile = load_profile("smoke", elpv_max_per_class=9)
    root = elpv.write_elpv(tmp_path / "elpv", profile, seed=0, source=(images, probs, types))
    info = json.loads((root / "dataset.json").read_text())
    assert list_categories(root) == ["mono", "poly"] and "CC BY-NC-SA 4.0" in info["licence"]
    for cat in ("mono", "poly"):
        idx = scan_category(root, cat)
        assert idx.counts == (6, 3, 9, 1) and not idx.has_masks and idx.fixed_orientation
        counts = info["counts"][cat]
        assert counts["excluded_uncertain"]["1/3"] == int(((types == cat) & np.isclose(probs, 1 / 3)).sum())
        assert counts["available"]["defective"] == int(((types == cat) & (probs == 1)).sum())
        for s in idx.train + idx.test:
            row = int(s.image.stem)
            assert types[row] == cat and probs[row] == float(s.label)  # 0 -> good, 1 -> defective
            with Image.open(s.image) as im:
                assert im.mode == "L" and im.size == (SMOKE.synthetic_size,) * 2
                want = Image.fromarray(images[row]).resize(im.size, Image.Resampling.BILINEAR)
                np.testing.assert_array_equal(np.asarray(im), np.asarray(want))
        assert not {s.image.name for s in idx.train} & {s.image.name for s in idx.test}
    assert elpv.is_current(root, profile, 0) and not elpv.is_current(root, SMOKE, 0)
