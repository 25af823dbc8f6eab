"""The classic recipe (evaluate --recipe dc|dsa, wmdd/classic.py) against its definitions: the ConvNet-IN,
the SGD schedule, each DSA transform, herding and k-center against brute force, and evaluate end to end."""
from __future__ import annotations

import argparse
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import evaluate
from tests.conftest import run_stage
from tests.test_relabel import digits_info, make_synthetic
from wmdd import artifacts, classic, cli, data, students


def clone(g: torch.Generator) -> torch.Generator:
    twin = torch.Generator()
    twin.set_state(g.get_state())
    return twin


def images(n=3, c=2, h=8, w=8, seed=0):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# the student


@pytest.mark.parametrize("channels,size,pad", [(1, 28, 3), (3, 32, 1)])
def test_convnet_in_shapes(channels, size, pad):
    net = classic.ConvNetIN(channels, 10, size)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.padding for c in convs] == [(pad, pad), (1, 1), (1, 1)] and convs[0].in_channels == channels
    assert all(c.out_channels == 128 and c.kernel_size == (3, 3) for c in convs)
    x = torch.randn(2, channels, size, size)
    assert net.embed(x).shape == (2, 2048) and net(x).shape == (2, 10)
    assert [type(m).__name__ for m in net.features][:4] == ["Conv2d", "GroupNorm", "ReLU", "AvgPool2d"]


def test_convnet_in_norm_is_per_instance():
    net = classic.ConvNetIN(1, 10, 28)
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 3 and all(m.num_groups == m.num_channels == 128 and m.affine for m in norms)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    x = torch.randn(4, 1, 28, 28)
    net.train()
    torch.testing.assert_close(net(x)[:1], net(x[:1]))  # an image's output does not depend on its batch


# ---------------------------------------------------------------------------------------------
# the schedule and the optimiser (DC's evaluate_synset)


def test_schedule_matches_evaluate_synset():
    dc, dsa = classic.RECIPES["dc"], classic.RECIPES["dsa"]
    assert (dc.epochs, dc.augment, dsa.epochs, dsa.augment) == (300, "none", 1000, classic.DSA_STRATEGY)
    for r in (dc, dsa):
        assert (r.lr, r.momentum, r.weight_decay, r.batch_size) == (0.01, 0.9, 5e-4, 256)
        lrs = [classic.lr_at(p, r) for p in range(r.epochs + 1)]  # passes 0..E: range(Epoch + 1)
        drop = r.epochs // 2 + 1                                   # lr *= 0.1 after the pass `ep in [E // 2 + 1]`
        assert lrs == [0.01] * (drop + 1) + [pytest.approx(0.001)] * (r.epochs - drop)
    assert classic.lr_at(151, dc) == 0.01 and classic.lr_at(152, dc) == pytest.approx(0.001)


def test_training_loop_follows_the_schedule(monkeypatch):
    """Passes, batches, the lr of each step, SGD's settings and a fresh optimiser (no momentum) at the step."""
    recipe = classic.Recipe("dc", 6, "none", batch_size=4)
    made, steps = [], []
    real = classic.optimizer

    def spy(params, lr, r):
        opt = real(params, lr, r)
        made.append(opt)
        original = opt.step
        opt.step = lambda *a, **k: (steps.append((len(made), opt.param_groups[0]["lr"], bool(opt.state))),
                                    original(*a, **k))[1]
        return opt

    monkeypatch.setattr(classic, "optimizer", spy)
    x = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    y = torch.arange(10) % 3
    torch.manual_seed(0)
    rec = classic.train(classic.ConvNetIN(1, 3, 8, width=4, depth=1), x, y, recipe, 0, (0.5,), (0.25,), "cpu",
                        validate=lambda m: {"top1": 50.0, "top5": 100.0})
    assert len(steps) == 7 * 3                             # E + 1 passes of ceil(10 / 4) batches
    assert [lr for _, lr, _ in steps] == [0.01] * (5 * 3) + [pytest.approx(0.001)] * (2 * 3)
    assert [k for k, _, _ in steps] == [1] * 15 + [2] * 6  # a second optimiser from pass E // 2 + 2 = 5 on
    assert steps[15][2] is False and steps[16][2] is True  # its momentum starts empty
    for opt in made:
        g = opt.param_groups[0]
        assert isinstance(opt, torch.optim.SGD) and g["momentum"] == 0.9 and g["weight_decay"] == 5e-4
        assert len(opt.param_groups) == 1  # weight decay on every parameter, as DC's
    assert [h["epoch"] for h in rec["history"]] == [6] and rec["top1"] == 50.0
    assert rec["recipe"]["passes"] == 7 and rec["recipe"]["lr_step_after_pass"] == 4


def test_same_seed_same_student():
    x = torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8)
    y = torch.arange(12) % 4
    recipe = classic.Recipe("dsa", 2, classic.DSA_STRATEGY, batch_size=5)
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        net = classic.ConvNetIN(1, 4, 8, width=4, depth=1)
        classic.train(net, x, y, recipe, 3, (0.5,), (0.25,), "cpu")
        outs.append(net.classifier.weight.detach().clone())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# DSA's transforms, each against its definition with the same draws


def test_flip():
    x, g = images(), torch.Generator().manual_seed(1)
    u = torch.rand(3, generator=clone(g))
    out = classic.flip(x, g)
    for b in range(3):
        torch.testing.assert_close(out[b], x[b].flip(-1) if u[b] < 0.5 else x[b])


def test_color_ops():
    x, g = images(c=3), torch.Generator().manual_seed(2)
    u = torch.rand(3, generator=clone(g)).view(3, 1, 1, 1)
    torch.testing.assert_close(classic.brightness(x, g), x + (u - 0.5) * 1.0)
    u = torch.rand(3, generator=clone(g)).view(3, 1, 1, 1)
    m = x.mean(dim=1, keepdim=True)
    torch.testing.assert_close(classic.saturation(x, g), (x - m) * (2.0 * u) + m)
    gray = images(c=1)
    torch.testing.assert_close(classic.saturation(gray, g), gray)  # one channel: the identity
    u = torch.rand(3, generator=clone(g)).view(3, 1, 1, 1)
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(classic.contrast(x, g), (x - m) * (u + 0.5) + m)


def test_crop_is_a_zero_filled_translation():
    x, g = images(n=6, h=28, w=28), torch.Generator().manual_seed(3)
    twin = clone(g)
    dy, dx = torch.randint(-4, 5, (6,), generator=twin), torch.randint(-4, 5, (6,), generator=twin)  # round(0.125 * 28)
    out = classic.crop(x, g)
    for b in range(6):
        padded = F.pad(x[b], [4, 4, 4, 4])  # shift by (dy, dx) = the window of the padded image at (4 + dy, 4 + dx)
        expected = padded[:, 4 + dy[b]:4 + dy[b] + 28, 4 + dx[b]:4 + dx[b] + 28]
        torch.testing.assert_close(out[b], expected)


def test_cutout_zeroes_the_clipped_square():
    x, g = images(n=8, c=1, h=28, w=28) + 10.0, torch.Generator().manual_seed(4)  # no pixel is 0 before
    twin = clone(g)
    cy, cx = torch.randint(0, 29, (8,), generator=twin), torch.randint(0, 29, (8,), generator=twin)
    out = classic.cutout(x, g)
    assert classic.cutout_size(28, 28) == (14, 14)
    for b in range(8):
        r0, c0 = int(cy[b]) - 7, int(cx[b]) - 7  # the square [c - 7, c + 7) per axis, clipped to the image
        mask = torch.ones(28, 28)
        mask[max(r0, 0):max(r0 + 14, 0), max(c0, 0):max(c0 + 14, 0)] = 0
        torch.testing.assert_close(out[b], x[b] * mask)
        rows, cols = min(r0 + 14, 28) - max(r0, 0), min(c0 + 14, 28) - max(c0, 0)
        assert int((out[b] == 0).sum()) == rows * cols


@pytest.mark.parametrize("name", ["scale", "rotate"])
def test_scale_and_rotate_are_affine_grids(name):
    x, g = images(n=4, c=1, h=28, w=28), torch.Generator().manual_seed(5)
    u = torch.rand(8, generator=clone(g))
    thetas = []
    for b in range(4):
        if name == "scale":  # s_x, s_y ~ U[1 / 1.2, 1.2]: all the s_x draws, then all the s_y
            sx, sy = (u[i] * (1.2 - 1 / 1.2) + 1 / 1.2 for i in (b, 4 + b))
            thetas.append([[sx, 0.0, 0.0], [0.0, sy, 0.0]])
        else:  # angle ~ U[-15, 15] degrees
            a = float((u[b] - 0.5) * 2 * 15) * math.pi / 180
            thetas.append([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])
    theta = torch.tensor(thetas, dtype=torch.float32)
    expected = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    torch.testing.assert_close(getattr(classic, name)(x, g), expected)


def test_dsa_picks_one_transform_per_batch():
    x = images(n=5, c=1, h=16, w=16)
    names = classic.DSA_STRATEGY.split("_")
    assert names == ["color", "crop", "cutout", "flip", "scale", "rotate"]
    seen = set()
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        twin = clone(g)
        name = names[int(torch.randint(6, (1,), generator=twin))]
        expected = x
        for op in classic.TRANSFORMS[name]:
            expected = op(expected, twin)
        torch.testing.assert_close(classic.dsa(x, g), expected)
        seen.add(name)
    assert seen == set(names)
    assert classic.dsa(x, torch.Generator(), "none") is x


# ---------------------------------------------------------------------------------------------
# herding and k-center against brute force


def features(n=25, d=4, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_herding_each_pick_is_the_brute_force_minimum(seed):
    f = features(seed=seed)
    picks = classic.herding(f, 9)
    assert len(set(picks)) == 9
    mu = f.mean(0)
    for t in range(1, 10):
        before = picks[:t - 1]
        gaps = {i: float((mu - (f[before].sum(0) + f[i]) / t).norm()) for i in range(len(f)) if i not in before}
        assert gaps[picks[t - 1]] == pytest.approx(min(gaps.values()), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kcenter_each_pick_is_the_brute_force_farthest(seed):
    f = features(seed=seed)
    picks = classic.kcenter(f, 9)
    assert len(set(picks)) == 9
    dist = lambda i, j: float((f[i] - f[j]).norm())  # noqa: E731
    centre = min(range(len(f)), key=lambda i: float((f[i] - f.mean(0)).norm()))
    assert picks[0] == centre
    for t in range(1, 9):
        chosen = picks[:t]
        cover = {i: min(dist(i, j) for j in chosen) for i in range(len(f))}
        assert cover[picks[t]] == pytest.approx(max(cover.values()), abs=1e-12)
    # at k = 3 on tiny data greedy is what it is: its radius is within 2x the best radius (Gonzalez)
    f3 = features(n=9, d=2, seed=seed)
    radius = lambda cs: max(min(float((f3[i] - f3[j]).norm()) for j in cs) for i in range(9))  # noqa: E731
    best = min(radius(cs) for cs in itertools.combinations(range(9), 3))
    assert radius(classic.kcenter(f3, 3)) <= 2 * best + 1e-12


# ---------------------------------------------------------------------------------------------
# evaluate --recipe dc, end to end on digits (a few epochs; no teacher: features.pt stands in for its features)


@pytest.fixture
def digits_set(tmp_path):
    """synthetic.pt (IPC 2) and a features.pt of seeded random features of digits' training images."""
    out = str(tmp_path / "run")
    make_synthetic(out, ipc=2)
    info = digits_info()
    args = argparse.Namespace(dataset="digits", data_dir=None, resolution=None, download=False, seed=0, ipc=2)
    labels = torch.as_tensor(data.build_dataset(info, args, "train").targets)
    feats = torch.randn(len(labels), 6, generator=torch.Generator().manual_seed(0))
    artifacts.save(artifacts.run_paths(out).features, {"features": feats, "labels": labels},
                   artifacts.make_meta("features", args, info))
    return out


def test_evaluate_recipe_dc_end_to_end(digits_set, monkeypatch):
    out = digits_set
    argv = ["--dataset", "digits", "--ipc", 2, "--out", out, "--recipe", "dc", "--epochs", 2, "--seeds", 2,
            "--baseline", "random,herding,kcenter"]
    report = run_stage(evaluate, argv)
    keys = [r["key"] for r in report["runs"]]
    assert keys == ["distilled/hard", "random/hard", "herding/hard", "kcenter/hard"]
    c = report["config"]
    assert (c["recipe"], c["student"], c["labels"], c["lr"], c["weight_decay"], c["batch_size"]) == \
        ("dc", "convnet_in", "hard", 0.01, 5e-4, 256)
    for r in report["runs"]:
        assert "DC recipe" in r["label_desc"] and [x["seed"] for x in r["per_seed"]] == [0, 1]
        for x in r["per_seed"]:
            assert [h["epoch"] for h in x["history"]] == [2] and 0 <= x["top1"] <= 100
            assert x["recipe"]["passes"] == 3
    # herding / k-center: per class on features.pt, one set for every seed
    info = digits_info()
    args = evaluate.get_args_parser().parse_args(["--dataset", "digits", "--ipc", "2", "--out", out])
    feats, labels = classic.training_features(info, args)
    for name in ("herding", "kcenter"):
        iset = classic.coreset_baseline(info, args, 2, name)
        for c_ in range(10):
            rows = (labels == c_).nonzero().flatten()
            assert iset.indices[2 * c_:2 * c_ + 2] == rows[classic.SELECTORS[name](feats[rows], 2)].tolist()
        assert (iset.labels == torch.arange(10).repeat_interleave(2)).all()
    table = open(artifacts.run_paths(out).results_md).read()
    assert "recipe dc" in table and "herding coreset" in table and "k-center coreset" in table
    # resume: every student was written when it finished; a rerun trains none and reports the same
    monkeypatch.setattr(classic, "train", lambda *a, **k: pytest.fail("a finished student was trained again"))
    again = run_stage(evaluate, argv)
    assert [[x["top1"] for x in r["per_seed"]] for r in again["runs"]] == \
        [[x["top1"] for x in r["per_seed"]] for r in report["runs"]]


def test_recipe_flag_errors(digits_set):
    base = ["--dataset", "digits", "--ipc", 2, "--out", digits_set, "--epochs", 1, "--baseline", "none"]
    with pytest.raises(cli.UserError, match="--recipe dc trains on the class labels"):
        run_stage(evaluate, base + ["--recipe", "dc", "--labels", "online"])
    with pytest.raises(cli.UserError, match="classic recipe's student"):
        run_stage(evaluate, base + ["--student", "convnet_in"])


def test_default_recipe_keeps_the_fingerprints():
    """--recipe kd (the default) leaves every student's fingerprint as it was before the flag existed."""
    args = evaluate.get_args_parser().parse_args(["--dataset", "digits", "--ipc", "10"])
    assert args.recipe == "kd"
    with_flag = students.student_fingerprint(args, "random/hard", 0, {"x": 1})
    del args.recipe
    assert students.student_fingerprint(args, "random/hard", 0, {"x": 1}) == with_flag
    assert students.student_fingerprint(args, "full/hard", 0, {"x": 1}) == \
        students.student_fingerprint(evaluate.get_args_parser().parse_args(["--dataset", "digits", "--ipc", "10"]),
                                     "full/hard", 0, {"x": 1})
