"""barycenter.py: the stage end to end (features cache, shards, errors) on digits and a raw
Tiny-ImageNet tree. Teachers are freshly initialised networks written in squeeze's teacher.pt format
(the stage only needs their features), so the file runs in seconds; the slow test uses the trained
digits teacher from the shared `digits_run` fixture."""
from __future__ import annotations

import argparse
import os

import pytest
import torch

import barycenter
from conftest import copy_run, make_tiny_tree
from wmdd import artifacts, cli, data, models
from wmdd import ot as wot


def run(argv):
    return barycenter.main(barycenter.get_args_parser().parse_args([str(a) for a in argv]))


def write_teacher(out, dataset: str, data_dir=None, resolution=None, seed: int = 0, arch=None) -> str:
    """A randomly initialised teacher.pt for `dataset`, as squeeze.py would write it."""
    args = argparse.Namespace(dataset=dataset, data_dir=data_dir and str(data_dir), resolution=resolution,
                              download=False, seed=seed)
    info = data.resolve(args)
    torch.manual_seed(seed)
    spec = models.model_spec(arch or info.arch, info.num_classes, info.stem, info.image_size)
    model = models.build_from_spec(spec).eval()
    path = artifacts.run_paths(str(out)).teacher
    artifacts.save(path, {"model": model.state_dict(), "model_args": spec},
                   artifacts.make_meta("squeeze", args, info, val_top1=None, arch=info.arch))
    return path


@pytest.fixture(scope="module")
def digits_base(tmp_path_factory):
    """teacher.pt + features.pt for digits, made once (tests copy it: the features are then reused)."""
    out = tmp_path_factory.mktemp("digits_base")
    write_teacher(out, "digits")
    run(["--dataset", "digits", "--ipc", 1, "--out", out])
    os.remove(artifacts.run_paths(str(out)).barycenters)
    return str(out)


@pytest.fixture
def digits_teacher(digits_base, tmp_path):
    return copy_run(digits_base, tmp_path / "digits")


def test_digits_exact_writes_barycenters_and_caches_features(digits_teacher, capsys):
    out = digits_teacher
    paths = artifacts.run_paths(str(out))
    res = run(["--dataset", "digits", "--ipc", 10, "--out", out])
    assert res["barycenters"] == paths.barycenters
    bc = artifacts.load(paths.barycenters, stage="barycenter")
    feats = artifacts.load(paths.features, stage="features")
    n, d = feats["features"].shape
    assert bc["points"].shape == (10, 10, d) and bc["points"].dtype == torch.float32
    assert bc["weights"].shape == (10, 10) and torch.allclose(bc["weights"], torch.full((10, 10), 0.1))
    assert bc["w2"].shape == (10,) and torch.all(bc["w2"] > 0)
    meta = bc["meta"]
    assert meta["upstream"]["teacher"] == artifacts.sha256_file(paths.teacher)
    assert meta["upstream"]["features"] == artifacts.sha256_file(paths.features)
    assert meta["args"]["solver"] == "exact" and meta["args"]["weights"] == "uniform"  # released defaults
    assert meta["classes"] == [str(i) for i in range(10)] and meta["k"] == 10
    # the stored objective is the exact W2^2 of the stored barycenter against the class's features
    c = 3
    cls = feats["features"][feats["labels"] == c]
    assert float(bc["w2"][c]) == pytest.approx(wot.w2_squared(bc["points"][c], bc["weights"][c], cls), rel=1e-4)
    assert feats["labels"].shape == (n,) and len(feats["labels"]) == len(data.build_dataset(
        data.resolve(argparse.Namespace(dataset="digits", data_dir=None, resolution=None)), None).targets)
    # the start-up banner names the kernels
    assert "kernels:" in capsys.readouterr().out

    # second run: features reused (file untouched), same result
    mtime = os.stat(paths.features).st_mtime_ns
    run(["--dataset", "digits", "--ipc", 10, "--out", out])
    assert os.stat(paths.features).st_mtime_ns == mtime
    assert "reusing" in capsys.readouterr().out
    assert torch.equal(artifacts.load(paths.barycenters)["points"], bc["points"])


def test_digits_sinkhorn_and_learned(digits_teacher):
    out = digits_teacher
    paths = artifacts.run_paths(str(out))
    run(["--dataset", "digits", "--ipc", 5, "--out", out])
    exact = artifacts.load(paths.barycenters)
    run(["--dataset", "digits", "--ipc", 5, "--out", out, "--solver", "sinkhorn"])
    sink = artifacts.load(paths.barycenters)
    assert sink["meta"]["args"]["solver"] == "sinkhorn"
    assert float(sink["w2"].sum()) <= 1.01 * float(exact["w2"].sum())
    for step in ("lloyd", "anneal", "mirror"):
        run(["--dataset", "digits", "--ipc", 5, "--out", out, "--solver", "sinkhorn", "--weights", "learned",
             "--learned-step", step])
        learned = artifacts.load(paths.barycenters)
        assert learned["meta"]["args"]["learned_step"] == step  # a new setting: not the previous file reused
        assert torch.all(learned["weights"] >= 0) and torch.allclose(learned["weights"].sum(1), torch.ones(10))
        assert float(learned["w2"].sum()) <= float(sink["w2"].sum())  # free weights: lower objective


def test_shards_merge_into_the_full_result(digits_teacher, capsys):
    out = digits_teacher
    paths = artifacts.run_paths(str(out))
    common = ["--dataset", "digits", "--ipc", 4, "--out", out, "--solver", "sinkhorn"]
    shard = run(common + ["--classes", "2:5"])["barycenters"]
    assert shard == os.path.join(paths.shards, "barycenter_00002-00005.pt")
    part = artifacts.load(shard, stage="barycenter")
    assert part["points"].shape[0] == 3 and part["meta"]["class_range"] == [2, 5]
    run(common)
    assert "reusing 3 classes from shards" in capsys.readouterr().out
    merged = artifacts.load(paths.barycenters)
    assert torch.equal(merged["points"][2:5], part["points"])
    # a shard made with other settings is not reused
    run(["--dataset", "digits", "--ipc", 4, "--out", out, "--solver", "sinkhorn", "--reg", "0.02"])
    assert "from shards" not in capsys.readouterr().out
    # sharding does not change a class's result (per-class seeds)
    full = artifacts.load(paths.barycenters)
    os.remove(shard)
    run(common)
    assert torch.allclose(artifacts.load(paths.barycenters)["points"][2:5], part["points"], atol=1e-5)
    assert full["meta"]["args"]["reg"] == 0.02


def test_classes_takes_a_range_or_one_class(digits_teacher, capsys):
    out = digits_teacher
    common = ["--dataset", "digits", "--ipc", 4, "--out", out, "--solver", "sinkhorn"]
    shard = run(common + ["--classes", "7"])["barycenters"]
    assert shard == artifacts.shard_path(artifacts.run_paths(str(out)), "barycenter", 7, 8)
    assert artifacts.load(shard)["meta"]["class_range"] == [7, 8]
    for spec, message in (("3:x", "--classes '3:x' is not a class range"), ("5:20", "outside 0:10"), ("5:5", "or empty")):
        with pytest.raises(SystemExit) as e:
            cli.run(barycenter.main, barycenter.get_args_parser(), [str(a) for a in common] + ["--classes", spec])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_tiny_raw_tree_ipc50(tmp_path):
    """The raw Tiny-ImageNet layout with --ipc 50 (a ConvNet teacher keeps the feature pass short)."""
    tree = make_tiny_tree(tmp_path / "tiny-imagenet-200", num_classes=2, train_per_class=53, val_per_class=1)
    out = tmp_path / "run"
    write_teacher(out, "tiny", tree["root"], resolution=64, arch="convnet")
    run(["--dataset", "tiny", "--data-dir", tree["root"], "--resolution", 64, "--ipc", 50, "--out", out])
    bc = artifacts.load(artifacts.run_paths(str(out)).barycenters)
    d = artifacts.load(artifacts.run_paths(str(out)).features)["features"].shape[1]
    assert bc["points"].shape == (2, 50, d)
    assert bc["meta"]["classes"] == tree["wnids"] and bc["meta"]["resolution"] == 64
    assert torch.isfinite(bc["points"]).all() and torch.all(bc["w2"] >= 0)


def test_restarts_keep_each_class_lowest_w2_start(digits_teacher, capsys):
    """--restarts R: per class, the lowest-W2^2 of R independent single-start solves (restart 0 = the plain
    run's start), recorded in meta, never mixed with a file of another R, the same under sharding."""
    out = digits_teacher
    paths = artifacts.run_paths(str(out))
    common = ["--dataset", "digits", "--ipc", 5, "--out", out]
    run(common)
    plain = artifacts.load(paths.barycenters)
    run(common + ["--restarts", 1])
    assert "reusing 10 classes" in capsys.readouterr().out  # 1 is the plain run (files without the key too)
    run(common + ["--restarts", 4])
    assert "reusing 10 classes" not in capsys.readouterr().out  # another R: not the plain file
    best = artifacts.load(paths.barycenters)
    assert best["meta"]["args"]["restarts"] == 4
    feats = artifacts.load(paths.features)
    for c in range(10):
        cls = feats["features"][feats["labels"] == c]
        starts = [wot.free_support_barycenter(cls, 5, seed=0, class_index=c)]  # restart 0: the plain run's seed
        starts += [wot.free_support_barycenter_batched([cls], 5, seeds=[wot.restart_seed(0, c, r)])
                   for r in (1, 2, 3)]
        w2 = [float(b.w2 if b.w2.ndim == 0 else b.w2[0]) for b in starts]
        assert w2[0] == pytest.approx(float(plain["w2"][c]), rel=1e-6)
        assert float(best["w2"][c]) == pytest.approx(min(w2), rel=1e-6)
        # the stored objective is that of the stored points, recomputed from the class's features
        assert float(best["w2"][c]) == pytest.approx(wot.w2_squared(best["points"][c], best["weights"][c], cls),
                                                      rel=1e-4)
    assert len({wot.restart_seed(0, c, r) for c in range(10) for r in range(4)}) == 40
    assert torch.all(best["w2"] <= plain["w2"]) and torch.any(best["w2"] < plain["w2"])
    # a shard of the classes reproduces the unsplit result
    shard = run(common + ["--restarts", 4, "--classes", "3:6"])["barycenters"]
    assert torch.equal(artifacts.load(shard)["points"], best["points"][3:6])
    with pytest.raises(cli.UserError, match="--restarts 0"):
        run(common + ["--restarts", 0])


def test_ipc_errors_name_the_class_and_its_count(digits_teacher):
    with pytest.raises(cli.UserError, match=r"--ipc 500 is larger than class '\d' which has \d+|larger than class"):
        run(["--dataset", "digits", "--ipc", 500, "--out", digits_teacher])
    try:
        run(["--dataset", "digits", "--ipc", 500, "--out", digits_teacher])
    except cli.UserError as e:
        msg = str(e)
    assert "training images" in msg and "--ipc" in msg
    with pytest.raises(cli.UserError, match="positive"):
        run(["--dataset", "digits", "--ipc", 0, "--out", digits_teacher])
    assert not os.path.exists(artifacts.run_paths(str(digits_teacher)).barycenters)


def test_cli_exit_code_2(digits_teacher, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(barycenter.main, barycenter.get_args_parser(),
                ["--dataset", "digits", "--ipc", "-3", "--out", str(digits_teacher)])
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_missing_or_foreign_teacher(tmp_path, digits_teacher):
    with pytest.raises(cli.UserError, match="squeeze.py"):
        run(["--dataset", "digits", "--ipc", 2, "--out", tmp_path / "empty"])
    tree = make_tiny_tree(tmp_path / "tiny", num_classes=3, train_per_class=2, val_per_class=1)
    with pytest.raises(cli.UserError, match="digits"):
        run(["--dataset", "tiny", "--data-dir", tree["root"], "--resolution", 64, "--ipc", 1,
             "--teacher", artifacts.run_paths(str(digits_teacher)).teacher, "--out", tmp_path / "x"])


def test_features_recomputed_for_another_teacher(digits_teacher, capsys):
    out = digits_teacher
    paths = artifacts.run_paths(str(out))
    run(["--dataset", "digits", "--ipc", 2, "--out", out])
    before = artifacts.load(paths.features)["features"]
    write_teacher(out, "digits", seed=1)  # squeeze rerun: another teacher
    run(["--dataset", "digits", "--ipc", 2, "--out", out])
    assert "another teacher" in capsys.readouterr().out
    after = artifacts.load(paths.features)
    assert after["meta"]["upstream"]["teacher"] == artifacts.sha256_file(paths.teacher)
    assert not torch.equal(after["features"], before)


@pytest.mark.slow
def test_digits_after_real_squeeze(digits_run, tmp_path):
    """The acceptance command on a trained teacher: barycenter.py --dataset digits --ipc 10."""
    import time

    out = copy_run(digits_run, tmp_path / "run")
    t0 = time.time()
    run(["--dataset", "digits", "--ipc", 10, "--out", out])
    assert time.time() - t0 < 60
    bc = artifacts.load(artifacts.run_paths(out).barycenters)
    assert bc["points"].shape[:2] == (10, 10)
