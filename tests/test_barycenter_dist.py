"""barycenter.py with several processes (torchrun, gloo, 2 CPU ranks), resume after SIGKILL, bad input.

A random digits teacher (the stage only needs its features). Runs compared bit for bit run on one
thread: in-process under `one_thread()`, subprocesses with OMP_NUM_THREADS=1."""
from __future__ import annotations

import os

import pytest
import torch

import barycenter
from conftest import copy_run, run_stage
from tests.test_recover_dist import _CreatesAFile, kill_when, launch, one_thread, write_teacher
from wmdd import artifacts, cli

# sinkhorn in blocks of 3 classes (4 blocks: 0:3 3:6 6:9 9:10), features in batches of 200 (8 batches)
SINKHORN = ["--dataset", "digits", "--ipc", 4, "--solver", "sinkhorn", "--class-batch", 3, "--batch-size", 200]
# the released learned-weights EMD loop (about 0.3 s per class here), one class per shard
LEARNED = ["--dataset", "digits", "--ipc", 4, "--weights", "learned", "--class-batch", 1]
RESULT = ("points", "weights", "w2", "iters")


@pytest.fixture(scope="module")
def teacher_only(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("bary_dist_teacher"))
    write_teacher(out)
    return out


@pytest.fixture(scope="module")
def reference(teacher_only, tmp_path_factory) -> str:
    """A one-process SINKHORN run (features.pt + barycenters.pt); copy before writing."""
    out = copy_run(teacher_only, tmp_path_factory.mktemp("bary_dist_ref"))
    with one_thread():
        run_stage(barycenter, SINKHORN + ["--out", out])
    return out


def assert_same(a: str, b: str, keys) -> dict:
    x, y = artifacts.load(a), artifacts.load(b)
    for key in keys:
        assert torch.equal(x[key], y[key]), key
    return x


def shard_files(out) -> list:
    return artifacts.shard_files(artifacts.run_paths(out), "barycenter")


def test_two_ranks_equal_one(teacher_only, reference, tmp_path):
    """Features extracted in two blocks of batches and gathered; classes solved in blocks by two ranks."""
    out = copy_run(teacher_only, tmp_path / "r2")
    proc = launch("barycenter.py", SINKHORN + ["--out", out])
    two, one = artifacts.run_paths(out), artifacts.run_paths(reference)
    feats = assert_same(two.features, one.features, ("features", "labels"))
    assert feats["meta"]["world_size"] == 2
    bc = assert_same(two.barycenters, one.barycenters, RESULT)
    assert bc["meta"]["world_size"] == 2 and bc["meta"]["class_range"] == [0, 10]
    assert shard_files(out) == []  # the block shards are in barycenters.pt now
    assert proc.stdout.count("[barycenter] configuration:") == 1
    assert proc.stdout.count("[barycenter] wrote") == 2  # features.pt and barycenters.pt, by rank 0


def test_sigkill_mid_solve_then_rerun_resumes_and_equals_the_uninterrupted_run(reference, tmp_path, capsys):
    base = copy_run(reference, tmp_path / "base")
    os.remove(artifacts.run_paths(base).barycenters)  # teacher.pt + features.pt (reused by every run below)
    whole, out = copy_run(base, tmp_path / "whole"), copy_run(base, tmp_path / "killed")
    with one_thread():
        run_stage(barycenter, LEARNED + ["--out", whole])
    kill_when("barycenter.py", LEARNED + ["--out", out], lambda: shard_files(out), tmp_path / "log.txt")
    done = shard_files(out)
    paths = artifacts.run_paths(out)
    assert 1 <= len(done) < 10 and not os.path.exists(paths.barycenters), "killed too late to test resuming"
    # a torn write's leftovers: a temp file, and a damaged shard of a class not done yet
    todo = [c for c in range(10) if artifacts.shard_path(paths, "barycenter", c, c + 1) not in done]
    torn = artifacts.shard_path(paths, "barycenter", todo[-1], todo[-1] + 1)
    with open(torn + ".tmp-99999", "wb") as fh:
        fh.write(b"PK\x03\x04 half")
    with open(torn, "wb") as fh:
        fh.write(open(done[0], "rb").read()[:500])
    capsys.readouterr()
    with one_thread():
        run_stage(barycenter, LEARNED + ["--out", out])
    printed = capsys.readouterr().out
    assert f"reusing {len(done)} classes from shards" in printed
    assert f"ignoring {torn}" in printed and "corrupt or truncated" in printed
    assert_same(paths.barycenters, artifacts.run_paths(whole).barycenters, RESULT)
    # the rerun of a finished run solves nothing: barycenters.pt is the cache
    capsys.readouterr()
    with one_thread():
        run_stage(barycenter, LEARNED + ["--out", out])
    assert "reusing 10 classes from" in capsys.readouterr().out
    assert_same(paths.barycenters, artifacts.run_paths(whole).barycenters, RESULT)


# ---------------------------------------------------------------------------------------------
# bad input: exit code 2, the file named, nothing written


def fails(argv, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run(barycenter.main, barycenter.get_args_parser(), [str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


@pytest.mark.parametrize("change, expected", [
    ({"classes": [str(c) for c in reversed(range(10))]}, "class list or order"),
    ({"resolution": 32}, "resolution"),
    ({"dataset": "cifar10"}, "dataset"),
])
def test_teacher_of_another_dataset_order_or_resolution(reference, tmp_path, capsys, change, expected):
    """Also with a features.pt cache present: it was made from another teacher.pt, so it is not used."""
    out = copy_run(reference, tmp_path / "run")
    paths = artifacts.run_paths(out)
    obj = artifacts.load(paths.teacher)
    meta = obj.pop("meta")
    meta.update(change)
    artifacts.save(paths.teacher, obj, meta)
    before = artifacts.sha256_file(paths.barycenters)
    err = fails(SINKHORN + ["--out", out], capsys)
    assert paths.teacher in err and expected in err
    assert artifacts.sha256_file(paths.barycenters) == before and shard_files(out) == []


def test_truncated_or_unsafe_teacher(teacher_only, tmp_path, capsys):
    out = copy_run(teacher_only, tmp_path / "run")
    bad = str(tmp_path / "truncated.pt")
    with open(bad, "wb") as fh:
        fh.write(open(artifacts.run_paths(out).teacher, "rb").read()[:3000])
    err = fails(SINKHORN + ["--out", out, "--teacher", bad], capsys)
    assert bad in err and "corrupt or truncated" in err
    marker, evil = str(tmp_path / "pwned"), str(tmp_path / "evil.pt")
    torch.save({"meta": {"format_version": 1}, "model": _CreatesAFile(marker)}, evil)
    err = fails(SINKHORN + ["--out", out, "--teacher", evil], capsys)
    assert evil in err and "refused to load" in err and not os.path.exists(marker)
    assert not os.path.exists(artifacts.run_paths(out).features)


def test_ipc_zero_or_larger_than_a_class(reference, tmp_path, capsys):
    out = copy_run(reference, tmp_path / "run")
    err = fails(SINKHORN + ["--out", out, "--ipc", 0], capsys)
    assert "--ipc must be a positive" in err
    err = fails(SINKHORN + ["--out", out, "--ipc", 1000], capsys)
    assert "--ipc 1000 is larger than class" in err and "training images" in err
    assert shard_files(out) == []
