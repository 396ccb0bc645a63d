"""The ``data`` command line (trustmae_lib.cli): builds datasets, describes them, and fails with one line."""

from __future__ import annotations

import subprocess
import sys

from trustmae_lib.cli import COMMANDS, main
from trustmae_lib.data.mvtec import scan_category


def test_data_synthetic_writes_a_dataset_and_is_idempotent(tmp_path, capsys):
    out = tmp_path / "synth"
    args = [
        "data",
        "synthetic",
        "--out",
        str(out),
        "--profile",
        "smoke",
        "--seed",
        "3",
        "--categories",
        "widget",
    ]
    assert main(args) == 0
    assert "wrote synthetic dataset" in capsys.readouterr().out
    idx = scan_category(out, "widget")
    assert idx.fixed_orientation and len(idx.train) == 12
    stamp = (out / "dataset.json").stat().st_mtime_ns
    assert main(args) == 0
    assert "up to date" in capsys.readouterr().out and (out / "dataset.json").stat().st_mtime_ns == stamp
    assert main([*args, "--force"]) == 0 and (out / "dataset.json").stat().st_mtime_ns != stamp
    capsys.readouterr()
    assert main(["data", "info", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[0] == "category" and lines[-1].split()[:4] == ["widget", "12", "6", "6"]


def test_data_info_on_the_fixture(mvtec_tree, capsys):
    assert main(["data", "info", str(mvtec_tree)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [r[0] for r in rows] == ["bottle", "cable", "grid"] and rows[0][1:4] == ["4", "2", "3"]


def test_errors_exit_2_with_one_line(tmp_path, capsys):
    missing = tmp_path / "missing"
    assert main(["data", "info", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(missing) in err
    assert main(["data", "synthetic", "--out", str(tmp_path / "s"), "--profile", "nonsense"]) == 2
    assert "unknown profile" in capsys.readouterr().err
    assert main(["data", "synthetic", "--out", str(tmp_path / "s"), "--categories", "marble"]) == 2
    assert main(["data", "bogus"]) == 2  # usage error from argparse


def test_help_and_registry(capsys):
    assert "data" in COMMANDS
    assert main(["--help"]) == 0 and "data" in capsys.readouterr().out
    assert main(["data", "synthetic", "--help"]) == 0 and "--seed" in capsys.readouterr().out


def test_module_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trustmae_lib", "data", "info", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
