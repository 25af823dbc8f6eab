"""recover's lambda_BN per (dataset, IPC): `recover.py --dry-run` (a subprocess, no dataset on disk) prints the
value of the authors' released run and the run it comes from. The expected values are read from the release
(Liu-Hy/WMDD, first commit 3ce9d3d) by hand: log/341.json "r_bn": 3.0 (ImageNette IPC 50), log/328.json
"r_bn": 30.0 (Tiny-ImageNet IPC 1), log/888.json "r_bn": 30.0 (ImageNette IPC 10), try.sh:421 `-b 500`
(ImageNet-1K IPC 10)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dry_run(tmp_path, *argv) -> tuple:
    """(exit code, printed lambda_bn, printed lambda_bn_source, the process) of `python recover.py ... --dry-run`, in an
    empty folder with WMDD_DATA pointing at an empty one: nothing on disk to read."""
    (tmp_path / "data").mkdir(exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, WMDD_DATA=str(tmp_path / "data"))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "recover.py"), *map(str, argv), "--dry-run"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    value = re.search(r"^\s+lambda_bn = (\S+)$", proc.stdout, re.M)
    source = re.search(r"^\s+lambda_bn_source = (.+)$", proc.stdout, re.M)
    return proc.returncode, value and float(value.group(1)), source and source.group(1), proc


@pytest.mark.parametrize("dataset, ipc, expected, log", [
    ("imagenette", 50, 3.0, "log/341"), ("tiny", 1, 30.0, "log/328"), ("imagenette", 10, 30.0, "log/888"),
    ("imagenet", 10, 500.0, "try.sh:421")])
def test_dry_run_prints_the_released_runs_lambda_and_its_log(tmp_path, dataset, ipc, expected, log):
    rc, value, source, proc = dry_run(tmp_path, "--dataset", dataset, "--ipc", ipc)
    assert rc == 0, proc.stderr
    assert value == expected and log in source and "Liu-Hy/WMDD" in source
    assert not os.listdir(tmp_path / "data") and not (tmp_path / "runs").exists()  # nothing read or written


def test_an_explicit_lambda_bn_wins(tmp_path):
    rc, value, source, proc = dry_run(tmp_path, "--dataset", "imagenette", "--ipc", 50, "--lambda-bn", 7)
    assert rc == 0, proc.stderr
    assert value == 7.0 and source == "--lambda-bn"


@pytest.mark.parametrize("argv, expected, why", [
    (["--dataset", "imagenette", "--ipc", 20], 10.0, "no released run at IPC 20"),  # the preset's own value
    (["--dataset", "tiny", "--ipc", 1, "--resolution", 64], 300.0, "no released run at 64 px"),
    (["--dataset", "digits", "--ipc", 10], 10.0, "not a dataset of the release"),
    (["--dataset", "fashion_mnist", "--ipc", 10], 10.0, "not a dataset of the release")])
def test_what_the_release_did_not_run_keeps_the_presets_value_labelled(tmp_path, argv, expected, why):
    rc, value, source, proc = dry_run(tmp_path, *argv)
    assert rc == 0, proc.stderr
    assert value == expected and "preset's value" in source and why in source


def test_a_value_the_logs_do_not_give_is_labelled_assumed(tmp_path):
    """ImageNet-1K at IPC 1: no released run prints an accuracy; the IPC 10 value, said to be assumed."""
    rc, value, source, proc = dry_run(tmp_path, "--dataset", "imagenet", "--ipc", 1)
    assert rc == 0, proc.stderr
    assert value == 500.0 and source.startswith("assumed")


def test_sre2l_keeps_sre2ls_released_weight(tmp_path):
    """SRe2L's recover_tiny.sh R_BN 1 (and 0.01 elsewhere), not WMDD's table."""
    assert dry_run(tmp_path, "--dataset", "tiny", "--ipc", 10, "--sre2l")[1] == 1.0
    assert dry_run(tmp_path, "--dataset", "imagenette", "--ipc", 10, "--sre2l")[1] == 0.01
