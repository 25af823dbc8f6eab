"""torchrun on CPU (gloo, 2 processes): the stages give the same artifacts as one process."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch

from tests.conftest import make_tiny_tree
from wmdd import artifacts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, argv: list, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           os.path.join(REPO, script), *[str(a) for a in argv]]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_stats_pass_two_ranks_equals_one(digits_run, tmp_path):
    teacher = artifacts.run_paths(digits_run).teacher
    torchrun("squeeze.py", ["--dataset", "digits", "--stats-only", "--teacher", teacher, "--out", tmp_path / "r2"])
    two = artifacts.load(artifacts.run_paths(tmp_path / "r2").bn_stats)
    one = artifacts.load(artifacts.run_paths(digits_run).bn_stats)
    assert two["meta"]["world_size"] == 2
    for key in ("mean", "var", "global_mean", "global_var", "count"):
        for a, b in zip(two[key], one[key]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_squeeze_trains_under_ddp(tmp_path):
    tree = make_tiny_tree(tmp_path / "tiny", num_classes=3, train_per_class=4, val_per_class=1)
    out = tmp_path / "run"
    torchrun("squeeze.py", ["--dataset", "tiny", "--data-dir", tree["root"], "--resolution", "64",
                            "--arch", "convnet", "--epochs", "1", "--batch-size", "4", "--out", out])
    paths = artifacts.run_paths(out)
    assert artifacts.load(paths.teacher)["meta"]["classes"] == tree["wnids"]
    assert artifacts.load(paths.bn_stats)["meta"]["world_size"] == 2
