"""torchrun on CPU (gloo, 2 processes): the stages give the same artifacts as one process."""
from __future__ import annotations

import os

import torch

from tests.conftest import make_tiny_tree
from tests.test_recover_dist import launch  # the one torchrun launcher of the tests
from wmdd import artifacts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_stats_pass_two_ranks_equals_one(digits_run, tmp_path):
    teacher = artifacts.run_paths(digits_run).teacher
    launch("squeeze.py", ["--dataset", "digits", "--stats-only", "--teacher", teacher, "--out", tmp_path / "r2"])
    two = artifacts.load(artifacts.run_paths(tmp_path / "r2").bn_stats)
    one = artifacts.load(artifacts.run_paths(digits_run).bn_stats)
    assert two["meta"]["world_size"] == 2
    for key in ("mean", "var", "global_mean", "global_var", "count"):
        for a, b in zip(two[key], one[key]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_squeeze_trains_under_ddp(tmp_path):
    tree = make_tiny_tree(tmp_path / "tiny", num_classes=3, train_per_class=4, val_per_class=1)
    out = tmp_path / "run"
    launch("squeeze.py", ["--dataset", "tiny", "--data-dir", tree["root"], "--resolution", "64",
                            "--arch", "convnet", "--epochs", "1", "--batch-size", "4", "--out", out])
    paths = artifacts.run_paths(out)
    assert artifacts.load(paths.teacher)["meta"]["classes"] == tree["wnids"]
    assert artifacts.load(paths.bn_stats)["meta"]["world_size"] == 2
