"""Tests for the noise protocol (trustmae_lib.data.noise) on a fake category index (no image files needed)."""

from __future__ import annotations

import doctest
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trustmae_lib.data import noise
from trustmae_lib.data.mvtec import CategoryIndex, Sample, scan_category
from trustmae_lib.data.noise import (
    NoisySplit,
    TrainItem,
    defect_count,
    inject_noise,
    load_manifest,
    noise_table,
    save_manifest,
)
from trustmae_lib.errors import TrustMAEError
from trustmae_lib.io import read_json, write_json

N_GOOD = 100
TYPES = {"crack": 10, "hole": 6, "scratch": 4}  # pool of 20 defective test images
N_TEST_GOOD = 15
# d = round(r * 100 / (1 - r)) for the paper's noise levels (and 0), and the re-draws beyond the pool of 20.
EXPECTED = {
    0.0: (0, 0),
    0.05: (5, 0),
    0.10: (11, 0),
    0.15: (18, 0),
    0.20: (25, 5),
    0.30: (43, 23),
    0.40: (67, 47),
}


def make_index(root: Path, category: str = "widget", n_good: int = N_GOOD, types=None, n_test_good=N_TEST_GOOD):
    types = TYPES if types is None else types
    base = root / category
    train = tuple(Sample(base / "train" / "good" / f"{i:03d}.png", 0, "good") for i in range(n_good))
    test = [Sample(base / "test" / "good" / f"{i:03d}.png", 0, "good") for i in range(n_test_good)]
    for t, n in sorted(types.items()):
        test += [
            Sample(base / "test" / t / f"{i:03d}.png", 1, t, base / "ground_truth" / t / f"{i:03d}_mask.png")
            for i in range(n)
        ]
    return CategoryIndex(
        root=root, category=category, train=train, test=tuple(test), fixed_orientation=False, has_masks=True
    )


@pytest.fixture
def index(tmp_path):
    return make_index(tmp_path / "data")


@pytest.mark.parametrize("ratio", sorted(EXPECTED))
def test_counts_and_realised_ratio(index, ratio):
    d, redrawn = EXPECTED[ratio]
    assert defect_count(N_GOOD, ratio) == d
    split = inject_noise(index, ratio, seed=3)
    assert (split.n_good, split.n_injected, split.n_redrawn) == (N_GOOD, d, redrawn)
    assert len(split.train) == N_GOOD + d
    assert sum(item.sample.label for item in split.train) == d
    assert [item.sample for item in split.train[:N_GOOD]] == list(index.train)  # all normal images, as they are
    assert all(item.redraw == 0 for item in split.train[:N_GOOD])
    assert split.realised_ratio == pytest.approx(d / (N_GOOD + d))
    assert abs(split.realised_ratio - ratio) < 0.005
    counts = split.manifest["counts"]
    assert (counts["n_good"], counts["n_injected"], counts["n_redrawn"]) == (N_GOOD, d, redrawn)


def test_defect_count_is_closest_ratio():
    for n_good in (1, 7, 60, 209, 391):
        for ratio in (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.9):
            d = defect_count(n_good, ratio)
            best = min(range(0, 20 * n_good), key=lambda k: abs(k / (n_good + k) - ratio))
            assert abs(d / (n_good + d) - ratio) == pytest.approx(abs(best / (n_good + best) - ratio), abs=1e-12)


def test_injected_come_from_defective_test_images_spread_over_types(index):
    pool = set(index.test_defective)
    split = inject_noise(index, 9 / 109, seed=0)  # d = 9: three of each of the three types
    assert split.n_injected == 9
    assert all(item.sample in pool and item.redraw == 0 for item in split.injected)
    assert len({item.sample for item in split.injected}) == 9  # without replacement
    assert Counter(item.sample.defect_type for item in split.injected) == {
        "crack": 3,
        "hole": 3,
        "scratch": 3,
    }
    split = inject_noise(index, 0.13, seed=5)  # d = 15: scratch (4) exhausted, 11 split 5/6 between the others
    assert split.n_injected == 15
    by_type = Counter(item.sample.defect_type for item in split.injected)
    assert by_type["scratch"] == 4 and sorted([by_type["crack"], by_type["hole"]]) == [5, 6]


def test_leftover_types_are_chosen_at_random(index):
    # d = 1: which defect type gets the single slot depends on the seed (no type is favoured by its name)
    types = {inject_noise(index, 1 / 101, seed=s).injected[0].sample.defect_type for s in range(20)}
    assert types == set(TYPES)


def test_redraws_when_pool_is_short(index):
    split = inject_noise(index, 0.40, seed=1)  # d = 67 from a pool of 20: passes of 20, 20, 20, 7
    redraws = Counter(item.redraw for item in split.injected)
    assert redraws == {0: 20, 1: 20, 2: 20, 3: 7}
    assert {item.sample for item in split.injected if item.redraw == 0} == set(index.test_defective)
    assert len(set(split.injected)) == 67  # every (file, redraw id) pair is distinct
    assert split.n_redrawn == 47
    # the partial last pass is spread over defect types too: 7 -> 3, 2, 2 (scratch has 4, so no cap here)
    assert sorted(Counter(i.sample.defect_type for i in split.injected if i.redraw == 3).values()) == [
        2,
        2,
        3,
    ]
    entries = [e for e in split.manifest["files"] if e["role"] == "train_injected"]
    assert Counter(e["redraw"] for e in entries) == redraws
    assert all("redraw" not in e for e in split.manifest["files"] if e["role"] != "train_injected")


def test_overlap_keeps_the_test_set(index):
    for ratio in (0.05, 0.4):
        split = inject_noise(index, ratio, protocol="overlap", seed=2)
        assert split.test == index.test
        assert split.protocol == "overlap"


def test_disjoint_without_a_pool_splits_the_defective_test_images_once(index, tmp_path):
    # No defect_pool/: half of each type's defective test images (10 of 20) form the pool, the same for every seed
    # and ratio; the injected images come from it only, and the test set never contains them.
    splits = [inject_noise(index, r, protocol="disjoint", seed=s) for r in (0.0, 0.15, 0.4) for s in (0, 2)]
    tests = {split.test for split in splits}
    assert len(tests) == 1
    (test,) = tests
    pool = set(index.test_defective) - set(test)
    assert len(pool) == 10 and Counter(s.defect_type for s in pool) == {"crack": 5, "hole": 3, "scratch": 2}
    assert [s for s in index.test if s not in pool] == list(test)  # order kept
    split = splits[2]  # 15 %: d = 18 from a pool of 10 -> 8 re-draws
    assert {item.sample for item in split.injected} <= pool and split.n_injected == 18 and split.n_redrawn == 8
    assert split.manifest["pool"] == {"source": "test_split", "size": 10, "n_test_defective_full": 20}
    assert split.manifest["counts"]["n_test_defective"] == 10
    injected = [e for e in split.manifest["files"] if e["role"] == "train_injected"]
    assert injected and all(e["pool"] == "test_split" for e in injected)
    path = save_manifest(split, tmp_path / "disjoint.json")
    assert load_manifest(path, index.root).manifest == split.manifest


def test_disjoint_draws_from_the_category_pool_and_keeps_the_whole_test_set(index):
    base = index.root / index.category
    masks = base / "defect_pool_ground_truth" / "crack"
    pool = tuple(Sample(base / "defect_pool" / "crack" / f"{i:03d}.png", 1, "crack", masks / f"{i:03d}_mask.png")
                 for i in range(30))  # fmt: skip
    with_pool = CategoryIndex(index.root, index.category, index.train, index.test, False, True, pool)
    split = inject_noise(with_pool, 0.2, protocol="disjoint", seed=1)  # d = 25 of 30: no re-draw
    assert split.test == index.test and split.n_redrawn == 0
    assert {item.sample for item in split.injected} <= set(pool)
    assert split.manifest["pool"] == {"source": "defect_pool", "size": 30, "n_test_defective_full": 20}
    # The overlap protocol ignores the pool, and its manifest has no pool entry (its hash is as before the pools).
    overlap = inject_noise(with_pool, 0.2, protocol="overlap", seed=1)
    assert overlap.manifest == inject_noise(index, 0.2, protocol="overlap", seed=1).manifest
    assert "pool" not in overlap.manifest and all("pool" not in e for e in overlap.manifest["files"])


def test_disjoint_with_nothing_to_split_fails(tmp_path):
    index = make_index(tmp_path, types={"crack": 1, "hole": 1})  # a type with one image keeps it in the test set
    assert inject_noise(index, 0.0, protocol="disjoint").test == index.test
    with pytest.raises(TrustMAEError, match="disjoint.*no defective images.*overlap.*defect_pool"):
        inject_noise(index, 0.2, protocol="disjoint")


def test_disjoint_without_normal_test_images_fails(tmp_path):
    with pytest.raises(TrustMAEError, match="no normal test image"):
        inject_noise(make_index(tmp_path, n_test_good=0), 0.05, protocol="disjoint")


def test_nested_across_ratios(index):
    sets = [{(i.sample, i.redraw) for i in inject_noise(index, r, seed=7).injected} for r in sorted(EXPECTED)]
    assert all(a <= b for a, b in zip(sets[:-1], sets[1:], strict=True))


def test_deterministic_and_seed_sensitive(index):
    a, b = inject_noise(index, 0.1, seed=11), inject_noise(index, 0.1, seed=11)
    assert a == b and a.manifest_hash == b.manifest_hash
    draws = {frozenset(i.sample for i in inject_noise(index, 0.1, seed=s).injected) for s in range(5)}
    assert len(draws) == 5
    c = inject_noise(index, 0.1, seed=12)
    assert c.manifest_hash != a.manifest_hash


def test_manifest_round_trip_and_hash(index, tmp_path):
    split = inject_noise(index, 0.3, seed=4)
    path = save_manifest(split, tmp_path / "runs" / "manifest.json")
    assert not list(path.parent.glob(".*.tmp"))  # written atomically, no leftovers
    loaded = load_manifest(path, index.root)
    assert isinstance(loaded, NoisySplit) and loaded == split
    assert loaded.manifest_hash == split.manifest_hash
    canonical = json.dumps(read_json(path), sort_keys=True, separators=(",", ":"))
    assert split.manifest_hash == hashlib.sha256(canonical.encode()).hexdigest()[:12]
    assert len(split.manifest_hash) == 12 and int(split.manifest_hash, 16) >= 0
    m = split.manifest
    assert m["version"] == 1 and (m["category"], m["ratio"], m["protocol"], m["seed"]) == (
        "widget",
        0.3,
        "overlap",
        4,
    )
    roles = Counter(e["role"] for e in m["files"])
    assert roles == {"train_good": N_GOOD, "train_injected": 43, "test": len(index.test)}
    for e in m["files"]:  # relative to the data root, POSIX separators
        assert not Path(e["image"]).is_absolute() and e["image"].startswith("widget/")
    injected = [e for e in m["files"] if e["role"] == "train_injected"]
    assert all(e["mask"].startswith("widget/ground_truth/") for e in injected)


def test_manifest_is_independent_of_the_root_location(tmp_path):
    a = inject_noise(make_index(tmp_path / "here"), 0.2, seed=0)
    b = inject_noise(make_index(tmp_path / "elsewhere" / "deeper"), 0.2, seed=0)
    assert a.manifest == b.manifest and a.manifest_hash == b.manifest_hash
    assert a.manifest_hash != inject_noise(make_index(tmp_path / "here"), 0.15, seed=0).manifest_hash


@pytest.mark.parametrize("bad", ["../outside/000.png", "/etc/passwd", "widget/../../x.png", "C:\\data\\x.png"])
def test_manifest_path_escape_fails(index, tmp_path, bad):
    path = save_manifest(inject_noise(index, 0.05, seed=0), tmp_path / "m.json")
    data = read_json(path)
    data["files"][0]["image"] = bad
    write_json(path, data)
    with pytest.raises(TrustMAEError, match="absolute or escapes the data root"):
        load_manifest(path, index.root)


def test_manifest_edits_and_bad_files_fail(index, tmp_path):
    path = save_manifest(inject_noise(index, 0.05, seed=0), tmp_path / "m.json")
    data = read_json(path)
    data["counts"]["n_injected"] = 6
    write_json(path, data)
    with pytest.raises(TrustMAEError, match="inconsistent"):
        load_manifest(path, index.root)
    data["version"] = 99
    write_json(path, data)
    with pytest.raises(TrustMAEError, match="version"):
        load_manifest(path, index.root)
    path.write_text("{ not json")
    with pytest.raises(TrustMAEError, match="not valid JSON"):
        load_manifest(path, index.root)
    with pytest.raises(TrustMAEError, match="not found"):
        load_manifest(tmp_path / "missing.json", index.root)


@pytest.mark.parametrize("ratio", [-0.05, 0.95, 1.0, float("nan"), "0.1", True, None])
def test_bad_ratio_fails(index, ratio):
    with pytest.raises(TrustMAEError, match=r"\[0, 0.9\]") as info:
        inject_noise(index, ratio)
    assert "\n" not in str(info.value)
    with pytest.raises(TrustMAEError):
        defect_count(N_GOOD, ratio)


def test_other_bad_input_fails(index, tmp_path):
    assert defect_count(N_GOOD, 0.9) == 900  # the upper end is allowed
    with pytest.raises(TrustMAEError, match="overlap, disjoint"):
        inject_noise(index, 0.1, protocol="random")
    with pytest.raises(TrustMAEError, match="seed"):
        inject_noise(index, 0.1, seed=-1)
    with pytest.raises(TrustMAEError, match="no defective test images"):
        inject_noise(make_index(tmp_path, types={}), 0.1)
    assert inject_noise(make_index(tmp_path, types={}), 0.0).n_injected == 0
    dirty = CategoryIndex(index.root, "widget", index.train + index.test_defective[:1], index.test, False, True)
    with pytest.raises(TrustMAEError, match="already holds defective"):
        inject_noise(dirty, 0.1)
    with pytest.raises(TrustMAEError, match="not under the data root"):
        inject_noise(CategoryIndex(tmp_path / "b", "widget", index.train, index.test, False, True), 0.1)


def test_noise_table_matches_inject_noise(index):
    table = noise_table({"widget": (N_GOOD, 20), "toothbrush": (60, 12, 30, 1)})
    assert list(table.columns) == [
        "category",
        "ratio",
        "n_train_good",
        "n_test_defective",
        "injected",
        "redrawn",
        "realised_ratio",
    ]
    assert len(table) == 2 * 7
    for row in table[table.category == "widget"].itertuples():
        split = inject_noise(index, row.ratio)
        assert (row.injected, row.redrawn) == (split.n_injected, split.n_redrawn) == EXPECTED[row.ratio]
    tooth = table[table.category == "toothbrush"].set_index("ratio")
    assert tooth.loc[0.4, "injected"] == 40 and tooth.loc[0.4, "redrawn"] == 10
    assert tooth.loc[0.05, "injected"] == 3 and tooth.loc[0.05, "redrawn"] == 0
    with pytest.raises(TrustMAEError, match="n_train_good, n_test_defective"):
        noise_table({"x": (1, 2, 3)})


def test_train_item_defaults_and_doctests():
    sample = Sample(Path("a.png"), 1, "crack")
    assert TrainItem(sample) == TrainItem(sample, 0) != TrainItem(sample, 1)
    assert doctest.testmod(noise).failed == 0


def test_with_the_data_layer(tmp_path):
    """A real folder in MVTec AD layout, scanned by trustmae_lib.data.mvtec, survives the manifest round trip."""

    def png(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)

    cat = tmp_path / "root" / "thing"
    for i in range(19):
        png(cat / "train" / "good" / f"{i:03d}.png")
    for i in range(3):
        png(cat / "test" / "good" / f"{i:03d}.png")
    for t in ("dent", "spot"):
        for i in range(2):
            png(cat / "test" / t / f"{i:03d}.png")
            png(cat / "ground_truth" / t / f"{i:03d}_mask.png")
    index = scan_category(tmp_path / "root", "thing")
    split = inject_noise(index, 0.2, seed=0)  # d = round(0.2 * 19 / 0.8) = 5 > pool of 4: one re-draw
    assert (split.n_injected, split.n_redrawn) == (5, 1)
    assert all(item.sample.mask is not None for item in split.injected)
    assert all(Path(item.sample.image).is_file() for item in split.train)
    loaded = load_manifest(save_manifest(split, tmp_path / "m.json"), tmp_path / "root")
    assert loaded == split
