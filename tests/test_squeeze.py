"""Squeeze stage and the foundation it stands on: datasets, models, BN statistics, artifacts."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import squeeze
from tests.conftest import copy_run, make_tiny_tree, run_stage
from wmdd import artifacts, bnstats, cli, data, models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli_exit_code(module, argv) -> int:
    with pytest.raises(SystemExit) as e:
        cli.run(module.main, module.get_args_parser(), [str(a) for a in argv])
    return e.value.code


def _bn_inputs(model, loader) -> tuple:
    """Every BN layer's input over `loader` (float64, in dataset order) and the labels."""
    inputs = {name: [] for name, _ in models.bn_layers(model)}
    handles = [m.register_forward_pre_hook(lambda mod, inp, name=name: inputs[name].append(inp[0].double()))
               for name, m in models.bn_layers(model)]
    labels = []
    with torch.no_grad():
        for x, y in loader:
            model(x)
            labels.append(y)
    for h in handles:
        h.remove()
    return {name: torch.cat(chunks) for name, chunks in inputs.items()}, torch.cat(labels)


def _float64_stats(model, loader, num_classes):
    """Independent oracle: keep every BN input in memory, then x[y == c] per class in float64."""
    inputs, y = _bn_inputs(model, loader)
    out = {}
    for name, x in inputs.items():  # x: [N, C, H, W]
        mean = torch.stack([x[y == c].mean(dim=(0, 2, 3)) for c in range(num_classes)])
        var = torch.stack([x[y == c].var(dim=(0, 2, 3), unbiased=False) for c in range(num_classes)])
        out[name] = (mean, var, x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False))
    return out


def test_digits_squeeze_artifacts_and_exact_bn_stats(digits_run):
    paths = artifacts.run_paths(digits_run)
    teacher = artifacts.load(paths.teacher, stage="squeeze")
    stats = artifacts.load(paths.bn_stats, stage="squeeze-stats")
    meta = teacher["meta"]
    assert meta["dataset"] == "digits" and meta["classes"] == [str(d) for d in range(10)]
    assert meta["resolution"] == 16 and meta["val_top1"] > 80  # 3 epochs; the default 15 reach ~97
    assert stats["meta"]["upstream"]["teacher"] == artifacts.sha256_file(paths.teacher)

    args = squeeze.get_args_parser().parse_args(["--dataset", "digits"])
    info = data.resolve(args)
    model, _ = models.load_teacher(paths.teacher, info)
    loader = DataLoader(data.build_dataset(info, args, "train"), batch_size=200)
    oracle = _float64_stats(model, loader, info.num_classes)
    assert stats["layers"] == list(oracle)
    for i, name in enumerate(stats["layers"]):
        mean, var, g_mean, g_var = oracle[name]
        torch.testing.assert_close(stats["mean"][i], mean, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(stats["var"][i], var, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(stats["global_mean"][i], g_mean, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(stats["global_var"][i], g_var, rtol=1e-6, atol=1e-9)
        assert stats["mean"][i].dtype == torch.float64


def test_stats_only_accepts_plain_torchvision_state_dict(digits_run, tmp_path):
    paths = artifacts.run_paths(digits_run)
    state = artifacts.load(paths.teacher)["model"]
    plain = tmp_path / "plain_state_dict.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, plain)  # as a DDP training script saves it
    out = tmp_path / "run"
    run_stage(squeeze, ["--dataset", "digits", "--stats-only", "--teacher", plain, "--out", out])
    new = artifacts.load(artifacts.run_paths(out).bn_stats)
    old = artifacts.load(paths.bn_stats)
    for a, b in zip(new["mean"], old["mean"]):
        torch.testing.assert_close(a, b)
    assert os.path.exists(artifacts.run_paths(out).teacher)  # downstream stages get a teacher.pt with meta


def _squeeze_process(argv) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    return subprocess.Popen([sys.executable, os.path.join(REPO, "squeeze.py"), *map(str, argv)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_squeeze_killed_mid_run_resumes_identically(tmp_path):
    """SIGKILL a real squeeze after its first epoch checkpoint; the rerun resumes and ends as a straight run."""
    tree = make_tiny_tree(tmp_path / "tiny", num_classes=3, train_per_class=4, val_per_class=1)
    common = ["--dataset", "tiny", "--data-dir", tree["root"], "--resolution", "64", "--arch", "convnet",
              "--batch-size", "4", "--seed", "3", "--epochs", "4"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _squeeze_process(common + ["--out", straight]).wait(timeout=600) == 0

    victim = _squeeze_process(common + ["--out", resumed])
    checkpoint = artifacts.run_paths(resumed).squeeze_checkpoint
    deadline = time.time() + 600
    while not os.path.exists(checkpoint) and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not os.path.exists(artifacts.run_paths(resumed).teacher)

    rerun = _squeeze_process(common + ["--out", resumed])
    output = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, output[-2000:]
    assert "resuming from" in output
    a = artifacts.load(artifacts.run_paths(straight).teacher)["model"]
    b = artifacts.load(artifacts.run_paths(resumed).teacher)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)

    # a checkpoint from another recipe is refused with a clear message, not silently resumed
    assert _cli_exit_code(squeeze, common[:-1] + ["5", "--out", resumed]) == 2


@pytest.mark.parametrize("resolution", [64, 224])
def test_tiny_raw_layout_squeeze(tmp_path, resolution):
    tree = make_tiny_tree(tmp_path / "tiny-imagenet-200", num_classes=3, train_per_class=4, val_per_class=2)
    out = tmp_path / f"run{resolution}"
    run_stage(squeeze, ["--dataset", "tiny", "--data-dir", tree["root"], "--resolution", resolution,
                        "--arch", "convnet", "--epochs", "1", "--batch-size", "6", "--out", out])
    meta = artifacts.load(artifacts.run_paths(out).teacher)["meta"]
    assert meta["classes"] == tree["wnids"]  # sorted, although wnids.txt is shuffled
    assert meta["resolution"] == resolution and meta["image_size"] == resolution

    args = squeeze.get_args_parser().parse_args(["--dataset", "tiny", "--data-dir", tree["root"],
                                                 "--resolution", str(resolution)])
    info = data.resolve(args)
    val = data.build_dataset(info, args, "val")
    assert len(val) == 3 * 2
    for path, label in val.samples:  # every val image's class index is its annotation's wnid
        assert info.classes[label] == tree["val_labels"][os.path.basename(path)]
    x, _ = val[0]
    assert x.shape == (3, resolution, resolution)


def test_tiny_stems():
    r224 = models.build_model("resnet18", 200, "tiny224", 224)
    assert (r224.conv1.kernel_size, r224.conv1.stride, r224.conv1.padding) == ((3, 3), (2, 2), (3, 3))
    assert isinstance(r224.maxpool, torch.nn.Identity)
    r64 = models.build_model("resnet18", 200, "small", 64)
    assert (r64.conv1.kernel_size, r64.conv1.stride, r64.conv1.padding) == ((3, 3), (1, 1), (1, 1))
    x = torch.randn(2, 3, 64, 64)
    r64.eval()
    feats = models.penultimate(r64, x)
    assert feats.shape == (2, 512)
    torch.testing.assert_close(models.classifier(r64)(feats), r64(x))
    assert len(models.bn_layers(r64)) == 20  # 17 + 3 downsample BNs


@pytest.mark.parametrize("arch", ["convnet", "vit_tiny", "resnet50"])
def test_penultimate_feeds_classifier(arch):
    model = models.build_model(arch, 5, "small", 32).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(models.classifier(model)(models.penultimate(model, x)), model(x))


def test_bad_dataset_input_exits_2_with_message(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./data/tiny-imagenet-200 here, and no $WMDD_DATA
    monkeypatch.delenv("WMDD_DATA", raising=False)
    assert _cli_exit_code(squeeze, ["--dataset", "tiny", "--out", tmp_path / "o"]) == 2
    err = capsys.readouterr().err
    assert "no --data-dir was given" in err and os.path.join("data", "tiny-imagenet-200") in err
    assert _cli_exit_code(squeeze, ["--dataset", "tiny", "--data-dir", tmp_path / "nope"]) == 2
    assert "does not exist" in capsys.readouterr().err

    wrong = tmp_path / "wrong"
    (wrong / "train").mkdir(parents=True)
    assert _cli_exit_code(squeeze, ["--dataset", "tiny", "--data-dir", wrong]) == 2
    err = capsys.readouterr().err
    assert "wnids.txt" in err and "val_annotations.txt" in err  # names the expected layout

    tree = make_tiny_tree(tmp_path / "t", num_classes=2, train_per_class=2, val_per_class=1)
    folder = os.path.join(tree["root"], "train", tree["wnids"][0], "images")
    for f in os.listdir(folder):
        os.remove(os.path.join(folder, f))
    assert _cli_exit_code(squeeze, ["--dataset", "tiny", "--data-dir", tree["root"], "--arch", "convnet",
                                    "--epochs", "1", "--out", tmp_path / "o2"]) == 2
    assert f"no image for class(es) {tree['wnids'][0]}" in capsys.readouterr().err


def test_folder_preset_reads_imagefolder(folder_tree, tmp_path):
    out = tmp_path / "run"
    run_stage(squeeze, ["--dataset", "folder", "--data-dir", folder_tree["root"], "--resolution", "32",
                        "--arch", "convnet", "--epochs", "1", "--out", out])
    assert artifacts.load(artifacts.run_paths(out).bn_stats)["meta"]["classes"] == folder_tree["classes"]


def test_artifacts_atomic_safe_and_checked(digits_run, tmp_path, monkeypatch):
    run = copy_run(digits_run, tmp_path / "run")
    paths = artifacts.run_paths(run)
    before = open(paths.bn_stats, "rb").read()

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(cli.UserError, match="intact"):
        artifacts.save(paths.bn_stats, {"x": 1}, {"format_version": 1})
    monkeypatch.undo()
    assert open(paths.bn_stats, "rb").read() == before  # the old file survived the failed write
    assert not [f for f in os.listdir(run) if ".tmp-" in f]

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(before[: len(before) // 2])
    with pytest.raises(cli.UserError, match="corrupt or truncated"):
        artifacts.load(truncated)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    evil = tmp_path / "evil.pt"
    torch.save({"meta": {}, "x": Evil()}, evil)
    with pytest.raises(cli.UserError, match="refused to load"):
        artifacts.load(evil)
    assert not (tmp_path / "pwned").exists()

    info = data.resolve(squeeze.get_args_parser().parse_args(["--dataset", "digits", "--resolution", "32"]))
    meta = artifacts.load(paths.bn_stats)["meta"]
    with pytest.raises(cli.UserError, match="resolution"):
        artifacts.check_compatible(meta, info, paths.bn_stats)
    info16 = data.resolve(squeeze.get_args_parser().parse_args(["--dataset", "digits"]))
    other_teacher = tmp_path / "other.pt"
    torch.save({"meta": {}}, other_teacher)
    with pytest.raises(cli.UserError, match="sha256"):
        artifacts.check_compatible(meta, info16, paths.bn_stats, upstream={"teacher": other_teacher})
    artifacts.check_compatible(meta, info16, paths.bn_stats, upstream={"teacher": paths.teacher})


def test_bnstats_finalize_pools_classes_into_global_stats():
    model = models.build_model("convnet", 3, "small", 16).eval()
    x, y = torch.randn(12, 3, 16, 16), torch.tensor([0, 1, 2, 0] * 3)
    stats = bnstats.finalize(bnstats.collect(model, [(x, y)], 3, "cpu", progress=False))
    assert stats["count"][0].tolist() == [6 * 256, 3 * 256, 3 * 256]  # samples of the class x H x W
    pooled = (stats["mean"][0] * stats["count"][0][:, None]).sum(0) / stats["count"][0].sum()
    torch.testing.assert_close(stats["global_mean"][0], pooled)
    # the first BN sees conv1(x): its global mean is the float64 mean of that activation
    act = model.features[0](x).double()
    torch.testing.assert_close(stats["global_mean"][0], act.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(stats["global_var"][0], act.var(dim=(0, 2, 3), unbiased=False))


# ---------------------------------------------------------------------------------------------
# --protocol released: the per-class variance and the teacher's schedule as the release computes them



def test_class_var_batch_mean_is_the_released_per_batch_variance(digits_run, tmp_path):
    """--protocol released (--class-var batch-mean): each class's variance is, as BatchNorm2dWithPerClassStats
    accumulates it, sum_b size_b * var_b / n_c over one-class DataLoader batches of 100 in dataset order (the
    last one partial); exact: numpy's var of the class. They differ by the between-batch term."""
    out = copy_run(digits_run, tmp_path / "run")
    run_stage(squeeze, ["--dataset", "digits", "--stats-only", "--out", out, "--protocol", "released"])
    released = artifacts.load(artifacts.run_paths(out).bn_stats, stage="squeeze-stats")
    exact = artifacts.load(artifacts.run_paths(digits_run).bn_stats, stage="squeeze-stats")
    assert released["meta"]["protocol"]["choices"]["class_var"] == "batch-mean"
    assert exact["meta"]["protocol"]["choices"]["class_var"] == "exact"

    args = squeeze.get_args_parser().parse_args(["--dataset", "digits"])
    info = data.resolve(args)
    model, _ = models.load_teacher(artifacts.run_paths(digits_run).teacher, info)
    inputs, y = _bn_inputs(model, DataLoader(data.build_dataset(info, args, "train"), batch_size=64))
    sizes = [int((y == c).sum()) for c in range(info.num_classes)]
    assert any(n % 100 for n in sizes)  # a partial last batch in some class
    for i, name in enumerate(released["layers"]):
        x = inputs[name]
        for c in range(info.num_classes):
            xc = x[y == c]  # the class's samples, in dataset order
            batches = torch.split(xc, 100)  # DataLoader(Subset(class), batch_size=100, shuffle=False)
            var_b = [b.var(dim=(0, 2, 3), unbiased=False) for b in batches]  # input.var(unbiased=False)
            want = sum(b.shape[0] * v for b, v in zip(batches, var_b)) / xc.shape[0]  # class_var * input.size(0)
            torch.testing.assert_close(released["var"][i][c], want, rtol=1e-6, atol=1e-9)
            per_channel = xc.transpose(0, 1).reshape(x.shape[1], -1).numpy()
            np_var = torch.from_numpy(np.var(per_channel, axis=1))
            torch.testing.assert_close(exact["var"][i][c], np_var, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(released["mean"][i][c], xc.mean(dim=(0, 2, 3)), rtol=1e-6, atol=1e-9)
            between = sum(b.shape[0] * (b.mean(dim=(0, 2, 3)) - xc.mean(dim=(0, 2, 3))) ** 2
                          for b in batches) / xc.shape[0]
            torch.testing.assert_close(exact["var"][i][c] - released["var"][i][c], between, rtol=1e-5, atol=1e-8)
            assert (between > 0).all()
        torch.testing.assert_close(released["count"][i], exact["count"][i])  # the class's own sums are kept
        torch.testing.assert_close(released["sum"][i], exact["sum"][i])


def _lrs_of_a_run(monkeypatch, argv) -> list:
    """The learning rate of every SGD step of a squeeze run."""
    seen, step = [], torch.optim.SGD.step

    def recording(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", recording)
    run_stage(squeeze, argv)
    monkeypatch.undo()
    return seen


@pytest.mark.parametrize("warmup", [0, 1])
def test_lr_step_epoch_is_pretrain_py_per_epoch_schedule(tmp_path, monkeypatch, warmup):
    """--lr-step epoch: every step of epoch e uses the lr that the release's pretrain.py schedule has after e
    epochs (torchvision's recipe: CosineAnnealingLR(T_max=epochs - warmup) after LinearLR(0.01) warm-up
    epochs, stepped once per epoch), built here on a parameter of its own."""
    epochs, lr = 3, 0.05
    argv = ["--dataset", "digits", "--epochs", epochs, "--lr", lr, "--warmup-epochs", warmup, "--batch-size", 256,
            "--out", tmp_path / "run", "--lr-step", "epoch"]
    seen = _lrs_of_a_run(monkeypatch, argv)
    steps = len(seen) // epochs
    assert len(seen) == epochs * steps and steps > 1
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs - warmup)
    sched = cosine if not warmup else torch.optim.lr_scheduler.SequentialLR(
        opt, [torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=warmup), cosine], [warmup])
    want = []
    for _ in range(epochs):
        want += [opt.param_groups[0]["lr"]] * steps
        opt.step()
        sched.step()
    assert seen == pytest.approx(want, rel=1e-12)
    if not warmup:  # and per iteration (--protocol wmdd) the lr changes within an epoch
        per_it = _lrs_of_a_run(monkeypatch, argv[:-2] + ["--out", tmp_path / "it"])
        assert per_it[0] == lr and per_it[1] < lr and len(per_it) == len(seen)
