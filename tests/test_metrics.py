"""DD-Ranking's scores against hand-computed values, and evaluate's honest baselines: a new random subset
per seed, the full-data student trained once per recipe, hard-label students on unaugmented images, any
torchvision student, and bad input refused (exit 2, nothing lost)."""
from __future__ import annotations

import argparse
import json
import math
import os
import re

import pytest
import torch
import torchvision

import evaluate
from tests.conftest import copy_run, run_stage
from tests.test_relabel import digits_info, make_synthetic
from wmdd import artifacts, augment, baselines, cli, data, metrics, models

E = math.e


def test_lrs_and_ars_hand_computed():
    # α = 0.5 · 0.10 − 0.5 · 0.30 = −0.1; (e^−0.1 − e^−1) / (e − e^−1) = (0.904837 − 0.367879) / 2.350402
    assert metrics.label_robust_score(10.0, 30.0) == pytest.approx(22.8454, abs=1e-4)
    # α = 0: (1 − e^−1) / (e − e^−1) = 1 / (1 + e)
    assert metrics.label_robust_score(20.0, 20.0) == pytest.approx(100 / (1 + E), rel=1e-12)
    # the ends of the scale: α = 1 (IOR 100 pt, HLR −100 pt) -> 100 %, α = −1 -> 0 %
    assert metrics.label_robust_score(100.0, -100.0) == pytest.approx(100.0)
    assert metrics.label_robust_score(-100.0, 100.0) == pytest.approx(0.0, abs=1e-12)
    # ARS adds both improvements: β = 0.5 · 0.10 + 0.5 · 0.05 = 0.075; (e^0.075 − e^−1) / (e − e^−1)
    # = (1.077884 − 0.367879) / 2.350402 = 0.302078
    assert metrics.augmentation_robust_score(10.0, 5.0) == pytest.approx(30.2078, abs=1e-4)
    assert metrics.augmentation_robust_score(10.0, -10.0) == pytest.approx(100 / (1 + E), rel=1e-12)
    assert metrics.label_robust_score(10.0, 30.0, lam=1.0) == pytest.approx(100 * (math.exp(0.1) - 1 / E) / (E - 1 / E))
    # DD-Ranking 0.2.0's code (ddranking/metrics/soft_label.py:561-564) puts the points into α, unscaled:
    # α = 0.5 · 5 − 0.5 · 20 = −7.5; (e^−7.5 − e^−1) / (e − e^−1) = (0.000553 − 0.367879) / 2.350402 = −0.156282
    assert metrics.label_robust_score_ddranking(5.0, 20.0) == pytest.approx(-0.156282, abs=1e-6)
    assert metrics.label_robust_score(5.0, 20.0) == pytest.approx(23.8199, abs=1e-4)  # α = −0.075, × 100
    assert metrics.label_robust_score_ddranking(3.0, 1.0) == pytest.approx(1.0)  # α = 1.5 − 0.5 = 1


def test_scores_pair_rounds_by_seed():
    acc = {"distilled/soft": [80.0, 70.0, 90.0], "random/soft": [60.0, 75.0, 80.0],
           "distilled/hard": [40.0, 50.0, 45.0], "random/hard": [30.0, 55.0, 45.0],
           "distilled/soft-noaug": [50.0, 52.0, 54.0], "random/soft-noaug": [40.0, 52.0, 60.0]}
    s = metrics.scores(acc, [95.0, 95.0, 95.0])
    assert s["IOR"]["per_seed"] == [20.0, -5.0, 10.0]
    assert s["HLR"]["per_seed"] == [55.0, 45.0, 50.0]
    assert s["IOR_hard"]["per_seed"] == [10.0, -5.0, 0.0]
    # round 0: α = 0.5 · 0.20 − 0.5 · 0.55 = −0.175
    assert s["LRS"]["per_seed"][0] == pytest.approx(100 * (math.exp(-0.175) - 1 / E) / (E - 1 / E))
    assert s["ARS"]["per_seed"][2] == pytest.approx(100 * (math.exp(0.5 * 0.10 + 0.5 * -0.06) - 1 / E) / (E - 1 / E))
    assert s["IOR"]["mean"] == pytest.approx(25 / 3)
    assert s["IOR"]["std"] == pytest.approx(((20 - 25 / 3) ** 2 + (-5 - 25 / 3) ** 2 + (10 - 25 / 3) ** 2) ** 0.5 / 2 ** 0.5)
    assert s["IOR"]["std_pop"] == pytest.approx(((20 - 25 / 3) ** 2 + (-5 - 25 / 3) ** 2 + (10 - 25 / 3) ** 2) ** 0.5 / 3 ** 0.5)
    assert "LRS" not in metrics.scores(acc, None) and "ARS" not in metrics.scores({"distilled/soft": [1.0]}, None)
    record = {"top1": 50.0, "history": [{"epoch": 2, "top1": 61.0}, {"epoch": 4, "top1": 50.0}]}
    assert metrics.accuracy(record, "best") == 61.0 and metrics.accuracy(record, "last") == 50.0


def test_random_subset_is_new_per_seed():
    info = digits_info()
    args = argparse.Namespace(dataset="digits", data_dir=None, resolution=None, download=False)
    build = baselines.BASELINES["random"].build
    a, b, a2 = build(info, args, 5, 0), build(info, args, 5, 1), build(info, args, 5, 0)
    assert a.indices == a2.indices and a.indices != b.indices
    assert torch.bincount(a.labels).tolist() == [5] * 10
    targets = data.build_dataset(info, args, "train").targets
    assert [targets[i] for i in b.indices] == b.labels.tolist()
    assert baselines.parse("random,full")[1].name == "full" and baselines.parse("none") == []
    with pytest.raises(cli.UserError, match="unknown baseline"):
        baselines.parse("random,coreset9")


def test_torchvision_student_trains_a_step_at_32px():
    torch.manual_seed(0)
    model = models.build_model("mobilenet_v2", 10, "small", 32)
    plain = torchvision.models.mobilenet_v2(weights=None, num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    # the small stem keeps 4x the spatial resolution of torchvision's stride-2 stem (2x2 vs 1x1 at the end)
    assert model.features(x).shape[-1] == 2 and plain.features(x).shape[-1] == 1
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    assert math.isfinite(loss.item())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert "mobilenet_v2" in models.student_names() and "vit_tiny" in models.student_names()


@pytest.fixture(scope="module")
def hard_run(digits_run, tmp_path_factory):
    out = copy_run(digits_run, tmp_path_factory.mktemp("hard"))
    make_synthetic(out, ipc=5)
    return out


HARD = ["--dataset", "digits", "--ipc", 5, "--labels", "hard", "--epochs", 2, "--seeds", 1]


def test_full_data_student_trained_once_per_recipe(hard_run, monkeypatch):
    trained, sizes, batches = [], [], []
    real = evaluate.train_student
    monkeypatch.setattr(evaluate, "train_student",
                        lambda iset, source, args, info, spec, plan, *a, desc, **k: trained.append(desc.split()[0])
                        or sizes.append(len(iset)) or batches.append(plan.batch_size)
                        or real(iset, source, args, info, spec, plan, *a, desc=desc, **k))
    argv = HARD + ["--out", hard_run, "--baseline", "full"]
    first = run_stage(evaluate, argv)
    assert trained == ["distilled/hard", "full/hard"]
    n_train = len(data.build_dataset(digits_info(), argparse.Namespace(dataset="digits"), "train"))
    assert sizes == [50, n_train]  # the full-data student trains on every real training image
    assert first["full_data"]["source"] == "student"
    full_run = next(r for r in first["runs"] if r["key"] == "full/hard")
    # another synthetic set: the distilled student is retrained, the full-data one kept
    make_synthetic(hard_run, ipc=5, seed=11)
    trained.clear()
    second = run_stage(evaluate, argv)
    assert trained == ["distilled/hard"]
    assert next(r for r in second["runs"] if r["key"] == "full/hard")["per_seed"] == full_run["per_seed"]
    assert second["metrics"]["HLR"]["per_seed"] == pytest.approx(
        [full_run["per_seed"][0]["top1"] - second["runs"][0]["per_seed"][0]["top1"]])
    # another student batch (another IPC's KD batch): the full-data student, in its own batch, is kept
    trained.clear(), batches.clear()
    run_stage(evaluate, argv + ["--batch-size", 7])
    assert trained == ["distilled/hard"] and batches == [7]
    # another recipe (learning rate, full-data batch): both retrained, the full-data one in its batch
    trained.clear(), batches.clear()
    run_stage(evaluate, argv + ["--batch-size", 7, "--full-batch-size", 128, "--lr", "0.002"])
    assert trained == ["distilled/hard", "full/hard"] and batches == [7, 128]


def test_full_data_dir_trains_one_full_data_student_for_several_runs(hard_run, tmp_path, monkeypatch):
    """--full-data-dir (what the paper harness passes every IPC's run): the second run, another IPC in
    another directory, reuses the first run's full-data student and reports its accuracy."""
    mine = copy_run(hard_run, tmp_path / "ipc5")  # copies: the module's other tests keep hard_run's students
    other = copy_run(hard_run, tmp_path / "ipc2")
    make_synthetic(other, ipc=2)
    shared = tmp_path / "shared-students"
    trained = []
    real = evaluate.train_student
    monkeypatch.setattr(evaluate, "train_student",
                        lambda *a, desc, **k: trained.append(desc.split()[0]) or real(*a, desc=desc, **k))
    first = run_stage(evaluate, HARD + ["--out", mine, "--baseline", "full", "--full-data-dir", shared])
    assert "full/hard" in trained and len(os.listdir(shared)) == 1
    trained.clear()
    argv = ["--dataset", "digits", "--ipc", 2, "--labels", "hard", "--epochs", 2, "--seeds", 1]
    second = run_stage(evaluate, argv + ["--out", other, "--baseline", "full", "--full-data-dir", shared])
    assert trained == ["distilled/hard"]
    assert second["full_data"]["top1"] == first["full_data"]["top1"]


def test_hard_label_students_see_unaugmented_images(hard_run, monkeypatch):
    seen = []
    real_build = models.build_model

    def recording_build(*a, **k):
        model = real_build(*a, **k)
        model.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()) if m.training else None)
        return model

    monkeypatch.setattr(models, "build_model", recording_build)
    out = run_stage(evaluate, HARD + ["--out", hard_run, "--baseline", "none"])
    syn = artifacts.load(artifacts.run_paths(hard_run).synthetic)
    info = digits_info()
    plan = augment.ReplayPlan(50, 50, out["config"]["augmentation_seed"])
    normalize = torchvision.transforms.v2.Normalize(info.mean, info.std)
    assert len(seen) == 2  # 2 epochs of one batch of 50
    for e in range(2):
        expected = normalize(syn["images"][plan.batch(e, 0)].float() / 255)  # torchvision's own transform
        torch.testing.assert_close(seen[e], expected, rtol=0, atol=1e-6)
    assert out["runs"][0]["label_desc"] == "hard, no augmentation (DD-Ranking)"
    # --hard-label-aug: the soft recipe's crops (the present behaviour), not the plain images
    seen.clear()
    run_stage(evaluate, HARD + ["--out", hard_run, "--baseline", "none", "--hard-label-aug"])
    assert not torch.allclose(seen[0], normalize(syn["images"][plan.batch(0, 0)].float() / 255))


@pytest.mark.parametrize("flags,message", [
    (["--student", "resnet_unknown"], "mobilenet_v2"),
    (["--full-data-acc", "101"], r"outside \[0, 100\]"),
    (["--full-data-acc", "-1"], r"outside \[0, 100\]"),
])
def test_bad_input_exits_2_and_keeps_results(hard_run, flags, message, capsys):
    paths = artifacts.run_paths(hard_run)
    os.makedirs(hard_run, exist_ok=True)
    with open(paths.results_json, "w") as fh:
        json.dump({"kept": True}, fh)
    before = open(paths.results_json).read()
    with pytest.raises(SystemExit) as e:
        cli.run(evaluate.main, evaluate.get_args_parser(), [str(a) for a in HARD + ["--out", hard_run] + flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    if flags[0] == "--student":
        assert "vit_tiny" in err and "efficientnet_b0" in err
    assert open(paths.results_json).read() == before


def test_user_given_and_teacher_reference_are_labelled(hard_run):
    out = run_stage(evaluate, HARD + ["--out", hard_run, "--baseline", "none", "--full-data-acc", "56.5"])
    assert out["full_data"]["source"] == "user" and "user-given" in out["full_data"]["label"]
    assert out["metrics"]["HLR"]["per_seed"] == pytest.approx([56.5 - out["runs"][0]["per_seed"][0]["top1"]])
    assert "user-given" in open(artifacts.run_paths(hard_run).results_md).read()
    out = run_stage(evaluate, HARD + ["--out", hard_run, "--baseline", "none", "--hlr-reference", "teacher"])
    assert "STAND-IN" in out["full_data"]["label"]
    table = open(artifacts.run_paths(hard_run).results_md).read()
    assert table.count("STAND-IN") >= 2  # the table row and the HLR line
