"""evaluate: the loss and its weighting, label sources, mismatch errors, a 2-epoch end-to-end run, the
--ddranking mode against DD-Ranking 0.2.0's evaluator, and the ViT-T student (timm's) with the released
weight-decay rule."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import evaluate
import relabel
from tests.conftest import copy_run, run_stage
from tests.test_relabel import digits_info, make_synthetic
from wmdd import artifacts, augment, baselines, cli, models, protocol, softlabels, students


@pytest.fixture(scope="module")
def labelled(digits_run, tmp_path_factory):
    """synthetic.pt (non-uniform barycenter weights) + 2 epochs of stored labels, batch 100."""
    out = copy_run(digits_run, tmp_path_factory.mktemp("labelled"))
    w = torch.rand(100, generator=torch.Generator().manual_seed(0)) + 0.5
    w = w / w.view(10, 10).sum(1).repeat_interleave(10)          # per-class weights sum to 1
    make_synthetic(out, weights=w)
    run_stage(relabel, ["--dataset", "digits", "--ipc", 10, "--out", out, "--epochs", 2])
    return out


def test_kl_is_the_released_loss_with_unit_weights():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g) * 3
    T = 20.0
    released = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1))
    torch.testing.assert_close(evaluate.soft_kl(s, t, T, torch.ones(8)), released)


def test_kl_weighting():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    w = torch.tensor([0.5, 1.5, 1.0, 2.0, 0.25, 0.75])
    per = [F.kl_div(F.log_softmax(s[i:i + 1] / 4, 1), F.softmax(t[i:i + 1] / 4, 1), reduction="sum") for i in range(6)]
    expected = sum(w[i] * per[i] for i in range(6)) / 6
    torch.testing.assert_close(evaluate.soft_kl(s, t, 4.0, w), expected)
    # CutMix: an image's weight mixes its own and the pasted image's by area
    norm = torch.tensor([0.5, 1.0, 1.5, 1.0])
    got = protocol.kd_image_weights(norm, torch.tensor([2, 0, 3]), torch.tensor([1, 2, 0]), 0.75, "mixed-set")
    torch.testing.assert_close(got, torch.tensor([0.75 * 1.5 + 0.25 * 0.5, 0.75 * 0.5 + 0.25 * 1.0,
                                                  0.75 * 1.0 + 0.25 * 1.5]))
    # the hard-label loss is the CutMix-mixed CE, weighted the same way
    y, y2 = torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([0, 0, 0, 0, 0, 0])
    ce = 0.3 * F.cross_entropy(s, y, reduction="none") + 0.7 * F.cross_entropy(s, y2, reduction="none")
    torch.testing.assert_close(evaluate.mixed_ce(s, y, y2, 0.3, w), (w * ce).mean())


def test_weights_reach_the_loss(labelled, monkeypatch):
    """The student's loss sees the barycenter weights normalised to mean 1, mixed by CutMix area."""
    seen = []
    real_kl = evaluate.soft_kl
    monkeypatch.setattr(evaluate, "soft_kl", lambda s, t, T, w, n=None: seen.append(w.clone()) or real_kl(s, t, T, w, n))
    syn = artifacts.load(artifacts.run_paths(labelled).synthetic)
    run_stage(evaluate, ["--dataset", "digits", "--ipc", 10, "--out", labelled, "--epochs", 2, "--baseline", "none"])
    norm = syn["weights"] / syn["weights"].mean()
    settings = softlabels.read_manifest(artifacts.run_paths(labelled).labels)["settings"]
    spec = augment.AugmentSpec.from_dict(settings["augment"])
    plan = augment.ReplayPlan(100, 100, settings["seed"])
    assert len(seen) == 2
    for e in range(2):
        p = augment.draw_batch(spec, plan.batch(e, 0), settings["seed"], e, 0)
        expected = p.lam_area * norm[p.index] + (1 - p.lam_area) * norm[p.index][p.mix_index]
        torch.testing.assert_close(seen[e], expected)
        assert not torch.allclose(seen[e], torch.ones(100))


def test_stored_equals_online_labels(labelled):
    """The stored labels are the teacher's fp16 logits on the replayed batch: an online teacher with the
    same compression gives the identical target, batch by batch."""
    paths = artifacts.run_paths(labelled)
    info = digits_info()
    teacher, _ = models.load_teacher(paths.teacher, info)
    settings = softlabels.read_manifest(paths.labels)["settings"]
    plan = augment.ReplayPlan(100, 100, settings["seed"])
    syn = artifacts.load(paths.synthetic)
    ds = augment.ReplayDataset(syn["images"], plan, augment.AugmentSpec.from_dict(settings["augment"]),
                               info.mean, info.std)
    stored = students.StoredLabels(paths.labels, settings, plan)
    online = students.OnlineLabels(teacher, 10, None, "fp16")
    for e in range(2):
        item = ds[(e, 0)]
        assert torch.equal(stored.targets(item, item["x"]), online.targets(item, item["x"]))
    tampered = dict(ds[(1, 0)], digest=ds[(1, 0)]["digest"] + 1)
    with pytest.raises(cli.UserError, match="replayed augmentation of epoch 1 batch 0 differs"):
        stored.targets(tampered, tampered["x"])


def test_rank_codec_stored_equals_online(labelled, tmp_path):
    """The rank-r codec's basis is per epoch: online labels replay the epoch first and match stored ones."""
    out = copy_run(labelled, tmp_path / "rank")
    run_stage(relabel, ["--dataset", "digits", "--ipc", 10, "--out", out, "--epochs", 2, "--batch-size", 40,
                        "--rank", 3, "--precision", "int8"])
    paths = artifacts.run_paths(out)
    info = digits_info()
    teacher, _ = models.load_teacher(paths.teacher, info)
    settings = softlabels.read_manifest(paths.labels)["settings"]
    assert settings["rank"] == 3
    plan = augment.ReplayPlan(100, 40, settings["seed"])
    syn = artifacts.load(paths.synthetic)
    ds = augment.ReplayDataset(syn["images"], plan, augment.AugmentSpec.from_dict(settings["augment"]),
                               info.mean, info.std)
    stored = students.StoredLabels(paths.labels, settings, plan)
    online = students.OnlineLabels(teacher, 10, None, "int8", 3)
    online.bind(ds, plan)
    for e in range(2):
        for b in range(3):
            item = ds[(e, b)]
            got = stored.targets(item, item["x"])
            assert got.shape == (item["x"].shape[0], 10)
            assert torch.equal(got, online.targets(item, item["x"]))
            # one torchrun rank's part of the batch (evaluate under DDP): the same rows of the same targets
            rows = range(7, item["x"].shape[0] - 3)
            part = item["x"][rows.start:rows.stop]
            assert torch.equal(stored.targets(item, part, rows), got[rows.start:rows.stop])
            assert torch.equal(online.targets(item, part, rows), got[rows.start:rows.stop])
    entry = softlabels.read_epoch(paths.labels, 0, settings)["entry"]
    assert entry["code"].shape == (100, 3) and entry["shared_basis"].shape == (3, 10)


def test_no_weight_decay_on_bn_and_bias():
    model = models.build_model("resnet18", 10, "small", 32)
    decay, no_decay = students.param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    bn = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert bn <= {id(p) for p in no_decay["params"]}
    assert id(model.fc.bias) in {id(p) for p in no_decay["params"]}
    assert id(model.fc.weight) in {id(p) for p in decay["params"]}


@pytest.mark.parametrize("flag,value,what", [("--batch-size", 50, "batch_size 100"), ("--epochs", 5, "epochs 2")])
def test_batch_size_or_epoch_mismatch_is_a_clear_error(labelled, flag, value, what):
    argv = ["--dataset", "digits", "--ipc", 10, "--out", labelled, flag, value]
    with pytest.raises(cli.UserError, match=f"differs from the stored labels' {what}"):
        run_stage(evaluate, argv)
    with pytest.raises(SystemExit) as e:
        cli.run(evaluate.main, evaluate.get_args_parser(), [str(a) for a in argv])
    assert e.value.code == 2


def test_help_lists_every_baseline_of_the_registry():
    """`evaluate.py --help` names every baseline --baseline accepts (generated from baselines.BASELINES)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "evaluate.py", "--help"], cwd=repo, capture_output=True, text=True,
                         check=True, env={**os.environ, "COLUMNS": "100"}).stdout
    block = " ".join(re.search(r"--baseline BASELINE\s+(.*?)\n  -", out, re.S).group(1).split()).replace("- ", "-")
    listed = block.split("same recipe: ", 1)[1].split("; or none", 1)[0]
    names = [n.strip() for n in re.sub(r"\([^()]*\)", "", listed).split(",")]
    assert names == list(baselines.BASELINES) and {"random", "full", "coreset", "hardest"} <= set(names)
    for b in baselines.BASELINES.values():
        assert f"{b.name} ({b.help})" in block


def test_missing_labels_say_what_to_run(digits_run, tmp_path):
    out = copy_run(digits_run, tmp_path / "run")
    make_synthetic(out)
    with pytest.raises(cli.UserError, match="Run relabel.py"):
        run_stage(evaluate, ["--dataset", "digits", "--ipc", 10, "--out", out])


def test_end_to_end_two_epochs(labelled, capsys):
    report = run_stage(evaluate, ["--dataset", "digits", "--ipc", 10, "--out", labelled, "--seeds", 2,
                                  "--baseline", "random,full", "--eval-every", 1, "--ars"])
    keys = [r["key"] for r in report["runs"]]
    assert keys == ["distilled/soft", "distilled/hard", "distilled/soft-noaug", "random/soft", "random/hard",
                    "random/soft-noaug", "full/hard"]
    for r in report["runs"]:
        assert [x["seed"] for x in r["per_seed"]] == ([0] if r["key"] == "full/hard" else [0, 1])
        assert all(0 <= x["top1"] <= x["top5"] <= 100 for x in r["per_seed"])
        assert [h["epoch"] for h in r["per_seed"][0]["history"]] == [1, 2]
        assert all(x["best_top1"] == max(h["top1"] for h in x["history"]) for x in r["per_seed"])
    acc = {r["key"]: [x["top1"] for x in r["per_seed"]] for r in report["runs"]}
    best = {r["key"]: [x["best_top1"] for x in r["per_seed"]] for r in report["runs"]}
    m, mb = report["metrics"], report["metrics_best"]
    assert m["IOR"]["per_seed"] == pytest.approx([a - b for a, b in zip(acc["distilled/soft"], acc["random/soft"])])
    assert mb["IOR"]["per_seed"] == pytest.approx([a - b for a, b in zip(best["distilled/soft"], best["random/soft"])])
    # HLR: the full-data student of the evaluation architecture (not the teacher), paired with every seed
    full = acc["full/hard"][0]
    assert report["full_data"]["source"] == "student"
    assert m["HLR"]["per_seed"] == pytest.approx([full - a for a in acc["distilled/hard"]])
    for v, scores in (("last", m), ("best", mb)):
        for s, (ior, hlr) in enumerate(zip(scores["IOR"]["per_seed"], scores["HLR"]["per_seed"])):
            alpha = 0.5 * ior / 100 - 0.5 * hlr / 100
            assert scores["LRS"]["per_seed"][s] == pytest.approx(100 * (math.exp(alpha) - math.exp(-1)) /
                                                                 (math.e - math.exp(-1)))
    wo = [a - b for a, b in zip(acc["distilled/soft-noaug"], acc["random/soft-noaug"])]
    assert m["W/O"]["per_seed"] == pytest.approx(wo) and "ARS" in m
    # a new random subset per seed, recorded
    subsets_by_seed = report["random_subset_indices"]
    assert set(subsets_by_seed) == {"0", "1"} and subsets_by_seed["0"] != subsets_by_seed["1"]
    paths = artifacts.run_paths(labelled)
    saved = json.load(open(paths.results_json))
    assert saved["runs"][0]["per_seed"][1]["top1"] == report["runs"][0]["per_seed"][1]["top1"]
    assert saved["random_subset_indices"] == subsets_by_seed
    table = open(paths.results_md).read()
    for word in ("IOR", "HLR", "LRS", "ARS", "random real (new subset per seed)", "full training set", "seed 1",
                 "best epoch", "(e^α − e^−1) / (e − e^−1)"):
        assert word in table, word
    assert "stand-in" not in table.lower()
    assert table in capsys.readouterr().out


def test_channels_last_training_matches_nchw():
    """models.training_layout (the CPU students' and teacher's layout) changes only the memory format: in
    float64, where summation order no longer shows, three AdamW steps give NCHW training's losses and
    weights, and the state_dict loads into a fresh NCHW model that gives the same logits."""
    arch = "convnet"
    torch.manual_seed(0)
    nchw = models.build_model(arch, 10, "small", 16).double()
    cl = models.build_model(arch, 10, "small", 16).double()
    cl.load_state_dict(nchw.state_dict())
    assert models.training_layout(cl, "cpu") and not models.training_layout(nn.Linear(2, 2), "meta")
    conv = next(m for m in cl.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x, y = torch.randn(8, 3, 16, 16, dtype=torch.float64), torch.randint(0, 10, (8,))
    x_cl = models.as_layout(x, True)
    assert x_cl.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(memory_format=torch.channels_last)
    assert models.as_layout(x, False) is x
    losses = {}
    for name, model, inp in (("nchw", nchw, x), ("cl", cl, x_cl)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()
        for step in range(3):
            loss = F.cross_entropy(model(inp), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name, step] = loss.item()
    for step in range(3):
        assert losses["cl", step] == pytest.approx(losses["nchw", step], rel=1e-9)
    assert losses["nchw", 2] < losses["nchw", 0]
    for p_cl, p_nchw in zip(cl.parameters(), nchw.parameters()):
        torch.testing.assert_close(p_cl, p_nchw, rtol=1e-9, atol=1e-9)
    fresh = models.build_model(arch, 10, "small", 16).double()
    fresh.load_state_dict(cl.state_dict())
    fresh.eval(), nchw.eval()
    torch.testing.assert_close(fresh(x), nchw(x), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# --ddranking, against DD-Ranking 0.2.0's evaluator (the wheel ddranking-0.2.0-py3-none-any.whl, read by
# hand; the values below are quoted from it, not taken from wmdd)

# ddranking/metrics/soft_label.py:211 and :240 (`_hyper_param_search_for_{hard,soft}_label`):
#     lr_list = [0.001, 0.005, 0.01, 0.05, 0.1]
DDR_LR_LIST = [0.001, 0.005, 0.01, 0.05, 0.1]
# ddranking/metrics/soft_label.py:130: self.test_interval = 20, used as `if (epoch + 1) % self.test_interval == 0`
# (:318, :374) before `if acc1 > best_acc1` (:325, :381): the best over validations every 20 epochs
DDR_TEST_INTERVAL = 20


def _record_training(monkeypatch):
    calls = []
    real = evaluate.train_student

    def spy(iset, source, args, info, spec, plan, device, val_loader, seed, desc, world=None):
        calls.append({"desc": desc, "lr": args.lr, "eval_every": args.eval_every, "spec": spec})
        return real(iset, source, args, info, spec, plan, device, val_loader, seed, desc=desc, world=world)

    monkeypatch.setattr(evaluate, "train_student", spy)
    return calls


def test_ddranking_mode_lr_grid_best_and_lrs_on_percent(labelled, monkeypatch, capsys):
    """`--ddranking` end to end on digits (IPC 10, 2 epochs): the random rows and the distilled hard-label
    row are trained at every lr of 0.2.0's grid and the best validated one is kept; the distilled soft row
    keeps --lr (0.2.0's syn_lr) and the full-data student its recipe; validation interval 20; hard-label
    students unaugmented (use_aug_for_hard=False, soft_label.py:27, :312); LRS_ddr on percent values."""
    out = copy_run(labelled, os.path.join(os.path.dirname(labelled), "ddranking"))
    calls = _record_training(monkeypatch)
    report = run_stage(evaluate, ["--dataset", "digits", "--ipc", 10, "--out", out, "--baseline", "random,full",
                                  "--ddranking", "--lr", 0.002])
    printed = capsys.readouterr().out
    assert "ddranking_mode = on (DD-Ranking 0.2.0)" in printed
    assert all(c["eval_every"] == DDR_TEST_INTERVAL for c in calls) and report["config"]["eval_every"] == 20
    lrs = {}
    for c in calls:
        lrs.setdefault(c["desc"].split(" seed")[0], []).append(c["lr"])
    assert lrs == {"distilled/soft": [0.002], "distilled/hard": DDR_LR_LIST, "random/soft": DDR_LR_LIST,
                   "random/hard": DDR_LR_LIST, "full/hard": [0.002]}
    hard = [c["spec"] for c in calls if "/hard" in c["desc"]]  # whole images: no crop, flip or CutMix
    assert hard and all(tuple(s.scale) == (1.0, 1.0) and not s.flip and not s.cutmix for s in hard)
    for run in report["runs"]:
        rec = run["per_seed"][0]
        if run["key"] in ("distilled/soft", "full/hard"):
            assert "lr" not in rec
            continue
        grid = {float(k): v for k, v in rec["lr_grid"].items()}
        assert sorted(grid) == DDR_LR_LIST
        # soft_label.py:233-235: `if acc > best_acc: best_acc, best_lr = acc, lr`: the first of the best
        best = max(grid.values())
        assert rec["lr"] == next(lr for lr in DDR_LR_LIST if grid[lr] == best) and rec["best_top1"] == best
        assert [h["epoch"] for h in rec["history"]] == [2]  # fewer than 20 epochs: the last one only
    # soft_label.py:561-564: hlr = full - syn_hard; ior = syn_soft - random_soft (percent);
    # alpha = lrs_lambda * ior - (1 - lrs_lambda) * hlr; lrs = (exp(alpha) - exp(-1)) / (exp(1) - exp(-1))
    for v, scores in (("last", report["metrics"]), ("best", report["metrics_best"])):
        ior, hlr = scores["IOR"]["per_seed"][0], scores["HLR"]["per_seed"][0]
        alpha = 0.5 * ior - 0.5 * hlr
        assert scores["LRS_ddr"]["per_seed"][0] == pytest.approx((math.exp(alpha) - math.exp(-1)) /
                                                                 (math.exp(1) - math.exp(-1)))
        assert scores["LRS"]["per_seed"][0] == pytest.approx(
            100 * (math.exp(alpha / 100) - math.exp(-1)) / (math.e - math.exp(-1)))
    table = open(artifacts.run_paths(out).results_md).read()
    assert "LRS_ddr" in table and "random/soft seed 0: " in table and "--ddranking" in table


def test_soft_only_trains_the_soft_students_and_nothing_else(labelled, tmp_path):
    """--soft-only drops every hard-label job; the soft students are the ones a full run trains (same top-1)."""
    argv = ["--dataset", "digits", "--ipc", 10, "--labels", "online", "--epochs", 1, "--baseline", "random"]
    both = run_stage(evaluate, argv + ["--out", copy_run(labelled, tmp_path / "both")])
    soft = run_stage(evaluate, argv + ["--out", copy_run(labelled, tmp_path / "soft"), "--soft-only"])
    assert [r["key"] for r in both["runs"]] == ["distilled/soft", "distilled/hard", "random/soft", "random/hard"]
    assert [r["key"] for r in soft["runs"]] == ["distilled/soft", "random/soft"]
    top1 = {r["key"]: r["per_seed"][0]["top1"] for r in both["runs"]}
    assert all(r["per_seed"][0]["top1"] == top1[r["key"]] for r in soft["runs"])
    assert "IOR" in soft["metrics"] and "HLR" not in soft["metrics"] and "IOR_hard" not in soft["metrics"]
    assert soft["random_subset_indices"] == both["random_subset_indices"]
    with pytest.raises(SystemExit) as e:
        cli.run(evaluate.main, evaluate.get_args_parser(), [str(a) for a in argv + ["--out", labelled, "--soft-only",
                                                                                     "--labels", "hard"]])
    assert e.value.code == 2


def test_ddranking_mode_validates_every_20_epochs(labelled, tmp_path):
    """Past 20 epochs the students are validated at epoch 20 (soft_label.py:130, :318, :374) and after the last."""
    out = copy_run(labelled, tmp_path / "ddr21")
    report = run_stage(evaluate, ["--dataset", "digits", "--ipc", 10, "--out", out, "--labels", "online",
                                  "--epochs", 21, "--baseline", "none", "--ddranking"])
    for run in report["runs"]:
        assert [h["epoch"] for h in run["per_seed"][0]["history"]] == [DDR_TEST_INTERVAL, 21]


@pytest.mark.parametrize("flags,message", [(["--eval-every", 5], "contradicts --ddranking"),
                                           (["--labels", "hard"], "soft-label evaluator"),
                                           (["--recipe", "dc"], "soft-label evaluator")])
def test_ddranking_mode_refuses_what_it_does_not_define(labelled, flags, message):
    argv = ["--dataset", "digits", "--ipc", 10, "--out", labelled, "--baseline", "none", "--ddranking", *flags]
    with pytest.raises(cli.UserError, match=message):
        run_stage(evaluate, argv)
    with pytest.raises(SystemExit) as e:
        cli.run(evaluate.main, evaluate.get_args_parser(), [str(a) for a in argv])
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------------
# ViT-Tiny: timm's, as the released code builds it, and the released weight-decay rule


def released_decay_names(model) -> set:
    """The release's rule, train/utils.py:96-102 (`get_parameters`), applied here on its own:
    `if pname.find('weight') >= 0 and len(p.size()) > 1:` -> weight decay, else none."""
    return {n for n, p in model.named_parameters() if n.find("weight") >= 0 and len(p.size()) > 1}


def group_names(model, groups) -> tuple:
    name = {id(p): n for n, p in model.named_parameters()}
    return tuple({name[id(p)] for p in g["params"]} for g in groups)


def test_vit_tiny_student_is_timms_with_the_released_weight_decay(labelled, tmp_path, monkeypatch):
    """evaluate --student vit_tiny builds timm's vit_tiny_patch16_224 (the release's models/factory.py:9,
    `timm.create_model(model_name, pretrained=False, num_classes=...)`) at the input size, and its AdamW
    groups put pos_embed, cls_token, norms and biases out of weight decay by the release's rule."""
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[vit]'): the torchvision "
                                              "fallback is tested in test_vit_tiny_without_timm")
    seen = []
    real = students.param_groups
    monkeypatch.setattr(students, "param_groups", lambda m, wd: seen.append(m) or real(m, wd))
    out = copy_run(labelled, tmp_path / "vit")
    report = run_stage(evaluate, ["--dataset", "digits", "--ipc", 10, "--out", out, "--baseline", "none",
                                  "--student", "vit_tiny", "--labels", "hard", "--epochs", 1])
    assert report["runs"][0]["key"] == "distilled/hard" and seen
    model = seen[0]
    assert isinstance(model, timm.models.vision_transformer.VisionTransformer)
    size = digits_info().image_size
    oracle = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=size,
                               patch_size=4)  # patch 4 below 64 px, as the torchvision build had
    assert [(n, p.shape) for n, p in model.named_parameters()] == [(n, p.shape) for n, p in oracle.named_parameters()]
    assert model.embed_dim == 192 and len(model.blocks) == 12 and model.blocks[0].attn.num_heads == 3
    decay, no_decay = group_names(model, real(model, 0.01))
    assert decay == released_decay_names(model) and no_decay == {n for n, _ in model.named_parameters()} - decay
    assert {"pos_embed", "cls_token", "norm.weight", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias",
            "blocks.11.mlp.fc2.bias", "head.bias"} <= no_decay
    assert {"blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.mlp.fc1.weight",
            "patch_embed.proj.weight", "head.weight"} <= decay


def test_vit_tiny_without_timm(monkeypatch, capsys):
    """No timm: torchvision's ViT of the same shape, with a printed note, and the same rule keeps its
    class_token and pos_embedding out of weight decay; a spec written with timm asks for timm (exit 2)."""
    monkeypatch.setattr(models, "_timm", lambda: None)
    model = models.build_model("vit_tiny", 10, "small", 32)
    assert isinstance(model, torchvision.models.VisionTransformer) and "timm is not installed" in capsys.readouterr().out
    assert models.model_spec("vit_tiny", 10, "small", 32)["vit_impl"] == "torchvision"
    decay, no_decay = group_names(model, students.param_groups(model, 0.05))
    assert decay == released_decay_names(model)
    assert {"class_token", "encoder.pos_embedding", "encoder.ln.weight", "heads.head.bias"} <= no_decay
    # a teacher.pt written before vit_impl existed was torchvision's
    old = {"arch": "vit_tiny", "num_classes": 10, "stem": "small", "image_size": 32}
    assert isinstance(models.build_from_spec(old), torchvision.models.VisionTransformer)
    with pytest.raises(cli.UserError, match="pip install timm"):
        models.build_from_spec({**old, "vit_impl": "timm"})


@pytest.mark.parametrize("arch", ["convnet", "resnet18"])
def test_weight_decay_groups_of_convnet_and_resnet_unchanged(arch):
    """The groups before the released rule (every parameter of more than one dimension decays, the rest
    not), parameter for parameter and in order."""
    model = models.build_model(arch, 10, "small", 32)
    decay, no_decay = students.param_groups(model, 0.01)
    assert [id(p) for p in decay["params"]] == [id(p) for p in model.parameters() if p.ndim > 1]
    assert [id(p) for p in no_decay["params"]] == [id(p) for p in model.parameters() if p.ndim <= 1]
