"""recover.py: the loss terms against direct float64 formulas, ablation switches, pixels-only gradients,
chunked classes, outputs, sharding / resume, errors, and the user's Tiny-ImageNet command line."""
from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

import barycenter
import recover
import squeeze
from conftest import copy_run, make_tiny_tree, run_stage
from wmdd import artifacts, augment, bnstats, cli, data, models, shards


def make_barycenters(out, ipc: int, dataset: str = "digits", data_dir=None, resolution=None) -> str:
    """barycenters.pt for IPC atoms per class, by the barycenter stage (exact EMD, uniform weights)."""
    argv = ["--dataset", dataset, "--ipc", ipc, "--out", out]
    argv += ["--data-dir", data_dir] if data_dir else []
    argv += ["--resolution", resolution] if resolution else []
    run_stage(barycenter, argv)
    return artifacts.run_paths(out).barycenters


@pytest.fixture(scope="module")
def run2(digits_run, tmp_path_factory) -> str:
    """The digits run with barycenters for IPC 2 (copy it again before writing)."""
    out = copy_run(digits_run, tmp_path_factory.mktemp("recover_run"))
    make_barycenters(out, 2)
    return out


def setup(out, *flags, ipc=2):
    """(args, info, inputs, objective) as recover.main resolves them, without running the loop."""
    args = recover.get_args_parser().parse_args(["--dataset", "digits", "--ipc", str(ipc), "--out", str(out),
                                                 *map(str, flags)])
    info = data.resolve(args)
    recover.resolve_args(args, info, torch.device("cpu"))
    inputs = shards.load_inputs(args, info, torch.device("cpu"), artifacts.run_paths(args.out))
    return args, info, inputs, recover.Objective(inputs[0], args)


def targets(args, info, inputs, classes=(0, 1, 2)):
    _, _, bn, points, _ = inputs
    a, b, ipc = classes[0], classes[-1] + 1, args.ipc
    per_class = args.bn == "per-class"
    bn_mean = [] if bn is None else [t[a:b] if per_class else t for t in bn["mean"]]
    bn_var = [] if bn is None else [t[a:b] if per_class else t for t in bn["var"]]
    atoms = points[a:b].reshape((b - a) * ipc, -1) if points is not None else None
    return recover.Targets(torch.arange(a, b).repeat_interleave(ipc), atoms, bn_mean, bn_var,
                           (b - a) if per_class else 1)


def terms_of(objective, x, tg):
    feats, logits, moments = objective.forward(x, tg.groups, tg.bn_mean)
    return objective.terms(feats, logits, moments, tg, slice(None))


# ---------------------------------------------------------------------------------------------
# the loss


def test_group_moments_and_bn_loss_equal_float64():
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(12, 5, 4, 3, generator=g, dtype=torch.float64) * 0.3 + 40.0  # |mean| >> std
    t_mean = torch.randn(3, 5, generator=g, dtype=torch.float64) + 40.0
    t_var = torch.rand(3, 5, generator=g, dtype=torch.float64)
    xg = x64.view(3, 4, 5, -1)
    mean64, var64 = xg.mean((1, 3)), xg.var((1, 3), unbiased=False)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = x64.float().contiguous(memory_format=layout).requires_grad_(True)
        mean, var = bnstats.group_moments(x, 3, shift=t_mean.float())
        torch.testing.assert_close(mean.double(), mean64, rtol=0, atol=2e-5)
        torch.testing.assert_close(var.double(), var64, rtol=2e-4, atol=1e-6)
        loss = bnstats.bn_match_loss(mean, var, t_mean.float(), t_var.float())
        direct = sum(((mean64[c] - t_mean[c]).norm() + (var64[c] - t_var[c]).norm()) for c in range(3)) / 3
        torch.testing.assert_close(loss.double(), direct, rtol=1e-5, atol=1e-6)
        # the closed-form backward equals autograd through the float64 formula
        x_ref = x64.clone().requires_grad_(True)
        xr = x_ref.view(3, 4, 5, -1)
        ref = bnstats.bn_match_loss(xr.mean((1, 3)), xr.var((1, 3), unbiased=False), t_mean, t_var)
        (grad,) = torch.autograd.grad(loss, x)
        (grad_ref,) = torch.autograd.grad(ref, x_ref)
        torch.testing.assert_close(grad.double(), grad_ref, rtol=1e-3, atol=1e-6)
    # global statistics: one group; merging two halves equals the whole
    shift = t_mean[:1].float()
    m_all, v_all = bnstats.group_moments(x64, 1, shift)
    m_a, v_a = bnstats.group_moments(x64[:5], 1, shift)
    m_b, v_b = bnstats.group_moments(x64[5:], 1, shift)
    n_a, n_b = 5 * 12, 7 * 12
    m, v = bnstats.merge_moments(n_a, m_a, v_a, n_b, m_b, v_b)
    torch.testing.assert_close(m, m_all, rtol=0, atol=1e-5)
    torch.testing.assert_close(v, v_all, rtol=1e-3, atol=1e-5)


def test_loss_terms_equal_the_formulas(run2):
    args, info, inputs, objective = setup(run2, "--r-ce", "0.5")
    model, bn = inputs[0], inputs[2]
    tg = targets(args, info, inputs)
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = terms_of(objective, x, tg)
    # direct float64 computation from the BN inputs of an independent forward
    captured = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp: captured.append(inp[0].detach().double()))
             for _, m in models.bn_layers(model)]
    feats = models.penultimate(model.float(), x.contiguous()).double()
    logits = models.classifier(model)(feats.float()).double()
    for h in hooks:
        h.remove()
    assert len(captured) == len(models.bn_layers(model)) == len(bn["mean"])
    feature = torch.linalg.matrix_norm(feats - tg.atoms.double())  # Frobenius, not squared, not averaged
    bn_term = 0.0
    for l, a in enumerate(captured):
        ag = a.view(3, 2, a.shape[1], -1)
        mean, var = ag.mean((1, 3)), ag.var((1, 3), unbiased=False)
        per_class = [(mean[c] - bn["mean"][l][c].double()).norm() + (var[c] - bn["var"][l][c].double()).norm()
                     for c in range(3)]
        bn_term = bn_term + (args.first_bn_mult if l == 0 else 1.0) * sum(per_class) / 3
    ce = torch.nn.functional.cross_entropy(logits, tg.labels)
    torch.testing.assert_close(out["feature"].double(), feature, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out["bn"].double(), bn_term, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["ce"].double(), ce, rtol=1e-5, atol=1e-6)
    total = feature + args.lambda_bn * bn_term + 0.5 * ce
    torch.testing.assert_close(out["total"].double(), total, rtol=1e-4, atol=1e-4)
    objective.remove()


def test_each_ablation_switch_changes_exactly_its_term(run2):
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    results = {}
    for name, flags in {"wmdd": [], "ce": ["--r-ce", "1"], "no_feature": ["--feature", "none", "--r-ce", "1"],
                        "global": ["--bn", "global"], "global_data": ["--bn", "global", "--global-stats", "data"],
                        "no_bn": ["--bn", "none"], "first": ["--first-bn-mult", "3"]}.items():
        args, info, inputs, objective = setup(run2, *flags)
        results[name] = {k: float(v) for k, v in terms_of(objective, x, targets(args, info, inputs)).items()}
        results[name]["args"] = args
        objective.remove()
    w, ce = results["wmdd"], results["ce"]
    assert w["ce"] == 0 and ce["ce"] > 0 and (w["feature"], w["bn"]) == (ce["feature"], ce["bn"])
    assert results["no_feature"]["feature"] == 0 and results["no_feature"]["bn"] == w["bn"]
    assert results["no_feature"]["ce"] == ce["ce"]
    for name in ("global", "global_data"):
        assert results[name]["feature"] == w["feature"] and results[name]["bn"] != w["bn"]
        assert results[name]["args"].first_bn_mult == 10.0 and results[name]["args"].layout == "ipc-major"
    assert results["global"]["bn"] != results["global_data"]["bn"]
    assert results["no_bn"]["bn"] == 0 and results["no_bn"]["feature"] == w["feature"]
    assert results["first"]["feature"] == w["feature"] and results["first"]["bn"] > w["bn"]
    sre2l = recover.get_args_parser().parse_args(["--dataset", "digits", "--sre2l"])
    recover.resolve_args(sre2l, data.resolve(sre2l), torch.device("cpu"))
    assert (sre2l.feature, sre2l.bn, sre2l.global_stats, sre2l.r_ce, sre2l.first_bn_mult, sre2l.lambda_bn,
            sre2l.layout) == ("none", "global", "running", 1.0, 10.0, 0.01, "ipc-major")


def test_bf16_autocast_loss_close_to_fp32(run2):
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    out = {}
    for amp in ("fp32", "bf16"):
        args, info, inputs, objective = setup(run2, "--amp", amp, "--r-ce", "1")
        out[amp] = terms_of(objective, x, targets(args, info, inputs))
        objective.remove()
    for t in recover.TERMS:
        torch.testing.assert_close(out["bf16"][t], out["fp32"][t], rtol=3e-2, atol=1e-3)


def test_gradients_reach_only_the_pixels(run2):
    args, info, inputs, objective = setup(run2, "--r-ce", "1", "--iterations", "3")
    model = inputs[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x0 = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    opt = recover.BatchOptimizer(objective, x0, targets(args, info, inputs), args, info)
    gen = torch.Generator().manual_seed(0)
    for it in range(3):
        opt.step(it, augment.draw_shared_view(gen, 16, info.crop_scale, info.flip, args.jitter))
    assert opt.x.grad is not None and opt.x.grad.abs().sum() > 0 and not torch.equal(opt.x.detach(), x0)
    assert not model.training
    for name, p in model.named_parameters():
        assert p.grad is None and not p.requires_grad, name
    for k, v in model.state_dict().items():  # weights and running statistics untouched
        assert torch.equal(v, before[k]), k
    lo = ((0 - torch.tensor(info.mean)) / torch.tensor(info.std)).view(1, 3, 1, 1)
    hi = ((1 - torch.tensor(info.mean)) / torch.tensor(info.std)).view(1, 3, 1, 1)
    assert (opt.x >= lo - 1e-6).all() and (opt.x <= hi + 1e-6).all()
    objective.remove()


def test_ipc_above_batch_size_accumulates_exact_class_gradients(run2, tmp_path):
    out = copy_run(run2, tmp_path / "run")
    make_barycenters(out, 5)
    images, curves = [], []
    for bs in (5, 2):  # whole class in one batch; chunks of 2 + 2 + 1 images
        args, info, inputs, objective = setup(out, "--batch-size", bs, "--r-ce", "0.3", "--iterations", "3", ipc=5)
        group = shards.plan_groups(1, 2, 10, 5, bs, "class-major")[0]
        shard = recover.recover_group(group, objective, inputs, args, info, torch.device("cpu"), None, None)
        images.append(shard["images"].int())
        curves.append(shard["loss_curve"]["total"])
        objective.remove()
    torch.testing.assert_close(curves[1], curves[0], rtol=1e-4, atol=1e-4)
    assert (images[1] - images[0]).abs().max() <= 1


# ---------------------------------------------------------------------------------------------
# the stage


def test_outputs_shapes_order_meta_and_pngs(run2, tmp_path):
    out = copy_run(run2, tmp_path / "run")
    run_stage(recover, ["--dataset", "digits", "--ipc", 2, "--out", out, "--iterations", 3, "--r-ce", "0.1"])
    paths = artifacts.run_paths(out)
    syn = artifacts.load(paths.synthetic, stage="recover")
    assert syn["images"].dtype == torch.uint8 and syn["images"].shape == (20, 3, 16, 16)
    assert syn["labels"].tolist() == [c for c in range(10) for _ in range(2)] and syn["ipc"] == 2
    bary = artifacts.load(paths.barycenters)
    torch.testing.assert_close(syn["weights"], bary["weights"].reshape(-1))
    assert set(syn["loss_curve"]) == set(recover.TERMS) and syn["loss_curve"]["total"].shape == (1, 3)
    meta = syn["meta"]
    assert meta["stage"] == "recover" and meta["classes"] == [str(c) for c in range(10)]
    assert meta["upstream"] == {k: artifacts.sha256_file(p) for k, p in
                                (("teacher", paths.teacher), ("bn_stats", paths.bn_stats),
                                 ("barycenters", paths.barycenters))}
    assert meta["args"]["lambda_bn"] == 10.0 and meta["recipe"]["ipc"] == 2
    for c in range(10):
        files = sorted(os.listdir(os.path.join(paths.images, str(c))))
        assert files == [f"{c}_0.png", f"{c}_1.png"]
        for j, f in enumerate(files):
            png = torch.from_numpy(__import__("numpy").array(Image.open(os.path.join(paths.images, str(c), f))))
            assert torch.equal(png.permute(2, 0, 1), syn["images"][2 * c + j])


def test_shards_reproduce_the_unsplit_run_and_resume(run2, tmp_path, capsys):
    split, whole = copy_run(run2, tmp_path / "split"), copy_run(run2, tmp_path / "whole")
    common = ["--dataset", "digits", "--ipc", 2, "--batch-size", 10, "--iterations", 3, "--no-png"]
    assert run_stage(recover, common + ["--out", split, "--classes", "5:10"])["synthetic"] is None
    assert run_stage(recover, common + ["--out", split, "--classes", "0:5"])["synthetic"] is not None
    run_stage(recover, common + ["--out", whole])
    a = artifacts.load(artifacts.run_paths(split).synthetic)
    b = artifacts.load(artifacts.run_paths(whole).synthetic)
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    assert torch.equal(a["loss_curve"]["total"], b["loss_curve"]["total"])
    assert sorted(os.listdir(artifacts.run_paths(whole).shards)) == ["recover_00000-00005.pt", "recover_00005-00010.pt"]
    capsys.readouterr()
    run_stage(recover, common + ["--out", whole])  # everything there: nothing recomputed
    assert "resuming: 2 of 2 groups" in capsys.readouterr().out
    c = artifacts.load(artifacts.run_paths(whole).synthetic)
    assert torch.equal(c["images"], b["images"])
    # another recipe does not reuse the shards
    run_stage(recover, common + ["--out", whole, "--seed", 1])
    assert not torch.equal(artifacts.load(artifacts.run_paths(whole).synthetic)["images"], b["images"])


def test_sre2l_ipc_major_and_real_init(run2, tmp_path):
    out = copy_run(run2, tmp_path / "run")
    os.remove(artifacts.run_paths(out).barycenters)  # not needed without the feature term
    res = run_stage(recover, ["--dataset", "digits", "--ipc", 2, "--out", out, "--iterations", 2, "--sre2l",
                              "--init", "real", "--no-png"])
    syn = artifacts.load(res["synthetic"])
    assert syn["images"].shape == (20, 3, 16, 16) and syn["labels"].tolist() == [c for c in range(10) for _ in range(2)]
    assert syn["loss_batches"].tolist() == [[0, 10, 0], [0, 10, 1]]  # one batch per image index, all classes
    assert set(syn["meta"]["upstream"]) == {"teacher"} and float(syn["loss_curve"]["ce"][0, 0]) > 0
    torch.testing.assert_close(syn["weights"], torch.full((20,), 0.5))


def test_nan_stops_with_class_range_and_iteration(run2, tmp_path, capsys):
    out = copy_run(run2, tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        cli.run(recover.main, recover.get_args_parser(),
                ["--dataset", "digits", "--ipc", "2", "--out", out, "--iterations", "4", "--lr", "inf",
                 "--log-every", "1", "--no-png"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "iteration 2 of 4" in err and "classes 0:10" in err and "Traceback" not in err


def test_bad_inputs_are_clear_errors(run2, tmp_path):
    out = copy_run(run2, tmp_path / "run")
    with pytest.raises(cli.UserError, match="--ipc 3"):  # barycenters made for IPC 2
        run_stage(recover, ["--dataset", "digits", "--ipc", 3, "--out", out, "--iterations", 1])
    with pytest.raises(cli.UserError, match="class range"):
        run_stage(recover, ["--dataset", "digits", "--ipc", 2, "--out", out, "--classes", "x:y"])
    with pytest.raises(cli.UserError, match="per-class"):
        run_stage(recover, ["--dataset", "digits", "--ipc", 2, "--out", out, "--layout", "ipc-major"])


@pytest.mark.parametrize("resolution", [64, pytest.param(224, marks=pytest.mark.slow)])
def test_user_tiny_command_line(tmp_path, resolution):
    """squeeze -> barycenters -> `recover.py --dataset tiny --ipc 50 --data-dir <raw tree> --out <dir>`.
    At the default (224 px, WMDD's protocol: the literal command) a step over 100 images takes minutes on
    two CPU cores, so the default suite runs it at --resolution 64 (SRe2L's protocol) and 224 is `slow`."""
    tree = make_tiny_tree(tmp_path / "tiny-imagenet-200", num_classes=2, train_per_class=50, val_per_class=2,
                          size=16)
    out = str(tmp_path / "run")
    res_flag = [] if resolution == 224 else ["--resolution", resolution]
    run_stage(squeeze, ["--dataset", "tiny", "--data-dir", tree["root"], "--arch", "convnet", "--epochs", 1,
                        "--out", out, *res_flag])
    make_barycenters(out, 50, dataset="tiny", data_dir=tree["root"], resolution=resolution)
    res = run_stage(recover, ["--dataset", "tiny", "--ipc", 50, "--data-dir", tree["root"], "--out", out,
                              "--iterations", 2, *res_flag])
    syn = artifacts.load(res["synthetic"], stage="recover")
    assert syn["images"].shape == (100, 3, resolution, resolution) and syn["meta"]["classes"] == tree["wnids"]
    assert syn["meta"]["resolution"] == resolution
    assert len(os.listdir(os.path.join(out, "images", tree["wnids"][1]))) == 50
