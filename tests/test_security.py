"""Untrusted files: ``weights_only`` checkpoints, ``safe_load`` YAML, and paths that stay in the data root.

Each payload below is live -- the test first shows that an unsafe loader would run it (it creates a marker
folder) -- and then that the library refuses the file with one line and the marker never appears.

Covered elsewhere: a checkpoint holding a pickled object is refused by :func:`load_checkpoint`
(``tests/test_train.py::test_weights_only_loading_refuses_a_pickled_payload``), ``../`` and absolute paths in
a noise manifest (``tests/test_noise.py::test_manifest_path_escape_fails``) and a symlink in a category folder
(``tests/test_data.py::test_error_path_escaping_root``) at the API level.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from trustmae_lib.cli import main
from trustmae_lib.config import load_profile
from trustmae_lib.data.mvtec import scan_category
from trustmae_lib.data.noise import inject_noise, load_manifest, save_manifest
from trustmae_lib.data.tensors import TensorCache, load_tensors
from trustmae_lib.engine.checkpoint import load_checkpoint
from trustmae_lib.engine.runs import CHECKPOINT
from trustmae_lib.errors import TrustMAEError
from trustmae_lib.study import sweep

pytestmark = pytest.mark.usefixtures("isolated_data")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, make_mvtec_tree) -> Path:
    """A finished one-step ae_l2 run on the tiny tree (tests copy it before tampering with it)."""
    base = tmp_path_factory.mktemp("trained")
    tree = make_mvtec_tree(base / "mvtec")
    argv = [
        "train",
        "--profile",
        "smoke",
        "--method",
        "ae_l2",
        "--steps",
        "1",
        "--no-progress",
        "--out",
        str(base / "runs"),
        "--dataset",
        str(tree),
        "--category",
        "bottle",
    ]
    assert main(argv) == 0
    (run,) = (base / "runs").iterdir()
    return run


def _one_error_line(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


class _MakeDirs:
    """Pickles as a call of ``os.makedirs(path)`` -- arbitrary code run by an unsafe ``torch.load``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def _evil_checkpoint(path: Path, marker: Path) -> None:
    torch.save({"format": 1, "step": 1, "finished": True, "models": {"model": _MakeDirs(marker)}}, path)


def test_pickled_payload_is_live_but_load_checkpoint_refuses_it(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / CHECKPOINT
    _evil_checkpoint(path, marker)
    torch.load(path, weights_only=False)  # what an unsafe loader does: the payload runs
    assert marker.is_dir()
    marker.rmdir()
    with pytest.raises(TrustMAEError, match="pickled Python object") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "makedirs" in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["evaluate", "score", "train --resume"])
def test_cli_refuses_a_checkpoint_with_a_payload(command, trained_run, tmp_path, capsys):
    run = Path(shutil.copytree(trained_run, tmp_path / "runs" / trained_run.name))
    spec = load_checkpoint(run / CHECKPOINT)["spec"]
    marker = tmp_path / "pwned"
    _evil_checkpoint(run / CHECKPOINT, marker)
    if command == "evaluate":
        argv = ["evaluate", str(run)]
    elif command == "score":
        Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
        argv = ["score", str(run), str(tmp_path / "x.png"), "--out", str(tmp_path / "scored")]
    else:
        argv = [
            "train",
            "--profile",
            "smoke",
            "--method",
            "ae_l2",
            "--steps",
            "1",
            "--no-progress",
            "--resume",
            "--out",
            str(tmp_path / "runs"),
            "--dataset",
            spec["dataset"],
            "--category",
            "bottle",
        ]
    _one_error_line(capsys, main(argv), str(run / CHECKPOINT), "weights_only")
    assert not marker.exists()
    assert not (tmp_path / "scored").exists() and not (run / "result.json").exists()


def test_a_poisoned_tensor_cache_entry_is_never_unpickled(mvtec_tree, tmp_path):
    """The tensor cache on disk is read with ``weights_only=True``: a payload is ignored, the file decoded."""
    samples = scan_category(mvtec_tree, "bottle").train[:2]
    cache = tmp_path / "cache"
    TensorCache.clear_memory()
    clean, _ = load_tensors(samples, 32, cache_dir=cache)
    entries = sorted(cache.rglob("*.pt"))
    assert len(entries) == 2
    marker = tmp_path / "pwned"
    for entry in entries:
        torch.save({"image": _MakeDirs(marker), "mask": torch.zeros(1)}, entry)
    TensorCache.clear_memory()
    again, _ = load_tensors(samples, 32, cache_dir=cache)
    assert not marker.exists()
    torch.testing.assert_close(again, clean, rtol=0, atol=0)


EVIL_YAML = "steps: 2\nbatch_size: !!python/object/apply:os.makedirs [{marker}]\n"


def test_yaml_payload_is_live_but_profiles_refuse_it(tmp_path, capsys, mvtec_tree):
    marker = tmp_path / "pwned"
    text = EVIL_YAML.format(marker=json.dumps(str(marker)))
    yaml.unsafe_load(text)  # what an unsafe loader does: the payload runs
    assert marker.is_dir()
    marker.rmdir()
    path = tmp_path / "evil.yaml"
    path.write_text(text)
    with pytest.raises(TrustMAEError, match="not valid YAML"):
        load_profile(path)
    argv = [
        "train",
        "--profile",
        str(path),
        "--method",
        "ae_l2",
        "--no-progress",
        "--out",
        str(tmp_path / "runs"),
        "--dataset",
        str(mvtec_tree),
        "--category",
        "bottle",
    ]
    _one_error_line(capsys, main(argv), str(path), "not valid YAML")
    assert not marker.exists() and not (tmp_path / "runs").exists()


def test_yaml_object_tags_are_refused_in_profiles_and_sweeps(tmp_path):
    path = tmp_path / "tagged.yaml"
    path.write_text("!!python/object:trustmae_lib.config.Profile {steps: 1}\n")
    with pytest.raises(TrustMAEError, match="not valid YAML"):
        load_profile(path)
    marker = tmp_path / "pwned"
    path.write_text(
        "profile: smoke\ndatasets: {synthetic: [brick]}\n"
        f"seeds: !!python/object/apply:os.makedirs [{json.dumps(str(marker))}]\n"
    )
    with pytest.raises(TrustMAEError, match="not valid YAML"):
        sweep.load_sweep(path)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------
# Paths stay inside the data root
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def saved_split(mvtec_tree, tmp_path):
    """A noise manifest of the tiny tree, and a file outside the root that an attacker would like read."""
    split = inject_noise(scan_category(mvtec_tree, "bottle"), 0.2, seed=0)
    manifest = save_manifest(split, tmp_path / "manifest.json")
    secret = tmp_path / "secret.png"
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(secret)
    return mvtec_tree, manifest, secret


def _point_first_test_file_at(manifest: Path, rel: str) -> None:
    data = json.loads(manifest.read_text())
    entry = next(e for e in data["files"] if e["role"] == "test")
    entry["image"] = rel
    manifest.write_text(json.dumps(data))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "dotdot-inside-path"])
def test_manifest_paths_cannot_leave_the_root(saved_split, kind):
    root, manifest, secret = saved_split
    rel = {
        "dotdot": f"../{secret.name}",
        "absolute": str(secret),
        "dotdot-inside-path": f"bottle/test/../../../{secret.name}",
    }[kind]
    _point_first_test_file_at(manifest, rel)
    with pytest.raises(TrustMAEError, match="escapes the data root") as info:
        load_manifest(manifest, root)
    assert rel in str(info.value)


def test_manifest_path_through_a_symlink_cannot_leave_the_root(saved_split):
    """A relative path without ``..`` that leaves the root through a symlink inside it is refused too."""
    root, manifest, secret = saved_split
    (root / "elsewhere").mkdir()
    os.symlink(secret, root / "elsewhere" / "innocent.png")
    _point_first_test_file_at(manifest, "elsewhere/innocent.png")
    with pytest.raises(TrustMAEError, match="outside the data root") as info:
        load_manifest(manifest, root)
    assert "elsewhere/innocent.png" in str(info.value)


def test_a_tampered_run_manifest_is_refused_by_evaluate(trained_run, tmp_path, capsys):
    run = Path(shutil.copytree(trained_run, tmp_path / trained_run.name))
    _point_first_test_file_at(run / "manifest.json", "../../../../etc/passwd")
    _one_error_line(capsys, main(["evaluate", str(run)]), "manifest.json", "escapes the data root")
    assert not (run / "result.json").exists()


def test_dataset_symlink_and_category_traversal_are_refused_by_the_cli(mvtec_tree, tmp_path, capsys):
    outside = tmp_path / "outside.png"
    Image.new("RGB", (32, 32)).save(outside)
    link = mvtec_tree / "bottle" / "train" / "good" / "999.png"
    os.symlink(outside, link)
    base = [
        "train",
        "--profile",
        "smoke",
        "--method",
        "ae_l2",
        "--steps",
        "1",
        "--no-progress",
        "--out",
        str(tmp_path / "runs"),
        "--dataset",
        str(mvtec_tree),
    ]
    _one_error_line(capsys, main([*base, "--category", "bottle"]), str(link), "outside the data root")
    for category in ("../mvtec", "bottle/../cable", "/etc"):
        _one_error_line(capsys, main([*base, "--category", category]), "plain folder name")
    assert not (tmp_path / "runs").exists()
