"""relabel and evaluate with several processes (torchrun, gloo, 2 CPU ranks) and resumed after SIGKILL.

- relabel: 2 ranks split the epochs and write the same files as 1 rank; a SIGKILLed run, rerun, keeps the
  epochs it finished and ends with the files of an uninterrupted run (a torn epoch file is redone).
- evaluate: under DDP each rank trains on its half of every replayed batch and the loss is scaled so the
  averaged gradient is the whole batch's: with a BatchNorm-free student (vit_tiny) 2 ranks train the
  student 1 rank trains; a convnet student (per-rank BatchNorm on CPU) runs and reports. A SIGKILLed
  evaluate, rerun, keeps its finished students and reports what an uninterrupted run reports.
Every run compared bit for bit runs on one thread (OMP_NUM_THREADS=1 / one_thread())."""
from __future__ import annotations

import glob
import json
import os

import pytest
import torch

import evaluate
import relabel
from conftest import copy_run, run_stage
from test_recover_dist import kill_when, launch, one_thread
from test_relabel import make_synthetic
from wmdd import artifacts, softlabels

RELABEL = ["--dataset", "digits", "--ipc", 50, "--epochs", 24, "--batch-size", 10, "--seed", 1]


@pytest.fixture(scope="module")
def syn_run(digits_run, tmp_path_factory) -> str:
    """digits teacher + a 50-per-class random real synthetic.pt (500 images: 50 batches of 10 an epoch)."""
    out = copy_run(digits_run, tmp_path_factory.mktemp("labels_dist"))
    make_synthetic(out, ipc=50)
    return out


@pytest.fixture(scope="module")
def relabel_reference(syn_run, tmp_path_factory) -> str:
    out = copy_run(syn_run, tmp_path_factory.mktemp("relabel_ref"))
    with one_thread():
        run_stage(relabel, RELABEL + ["--out", out])
    return artifacts.run_paths(out).labels


def epoch_files(labels_dir) -> list:
    return sorted(glob.glob(os.path.join(labels_dir, "epoch_*.pt")))


def assert_same_labels(labels_dir, reference_dir, epochs: int = 24) -> None:
    assert len(epoch_files(labels_dir)) == epochs
    for e in range(epochs):
        got = torch.load(softlabels.epoch_path(labels_dir, e), weights_only=True)
        ref = torch.load(softlabels.epoch_path(reference_dir, e), weights_only=True)
        assert torch.equal(got["digests"], ref["digests"]), e
        for key, value in ref["entry"].items():
            assert torch.equal(got["entry"][key], value), (e, key)
    assert softlabels.read_manifest(labels_dir)["settings"] == softlabels.read_manifest(reference_dir)["settings"]


# ---------------------------------------------------------------------------------------------
# relabel


def test_relabel_two_ranks_write_the_labels_of_one(syn_run, relabel_reference, tmp_path):
    out = copy_run(syn_run, tmp_path / "r2")
    proc = launch("relabel.py", RELABEL + ["--out", out])
    assert_same_labels(artifacts.run_paths(out).labels, relabel_reference)
    assert proc.stdout.count("[relabel] configuration:") == 1
    assert "24 epoch(s) x 50 batch(es) of soft labels by 2 ranks" in proc.stdout
    assert softlabels.read_manifest(artifacts.run_paths(out).labels)["meta"]["world_size"] == 2


def test_relabel_sigkill_then_rerun_keeps_finished_epochs_and_equals_uninterrupted(syn_run, relabel_reference,
                                                                                  tmp_path, capsys):
    out = copy_run(syn_run, tmp_path / "killed")
    labels_dir = artifacts.run_paths(out).labels
    kill_when("relabel.py", RELABEL + ["--out", out], lambda: len(epoch_files(labels_dir)) >= 2, tmp_path / "log.txt")
    done = epoch_files(labels_dir)
    assert 2 <= len(done) < 24, "killed too late to test resuming"
    mtimes = {p: os.stat(p).st_mtime_ns for p in done}
    # what a torn write leaves: a temp file, and a truncated file of an epoch that is not done
    torn = softlabels.epoch_path(labels_dir, 23)
    with open(torn + ".tmp-99999", "wb") as fh:
        fh.write(b"PK\x03\x04 half")
    with open(torn, "wb") as fh:
        fh.write(open(done[0], "rb").read()[:300])
    capsys.readouterr()
    with one_thread():
        res = run_stage(relabel, RELABEL + ["--out", out])
    assert f"resuming: {len(done)} of 24 epochs already stored" in capsys.readouterr().out
    assert res["epochs_written"] == 24 - len(done)
    assert all(os.stat(p).st_mtime_ns == mtimes[p] for p in done)  # kept, not redone
    assert_same_labels(labels_dir, relabel_reference)


# ---------------------------------------------------------------------------------------------
# evaluate

EVAL = ["--dataset", "digits", "--ipc", 5, "--baseline", "none", "--eval-every", 2]


@pytest.fixture(scope="module")
def labelled(digits_run, tmp_path_factory) -> str:
    """digits teacher + a 5-per-class synthetic.pt + 4 epochs of stored labels, batch 25 (2 batches an epoch)."""
    out = copy_run(digits_run, tmp_path_factory.mktemp("eval_dist"))
    make_synthetic(out, ipc=5)
    with one_thread():
        run_stage(relabel, ["--dataset", "digits", "--ipc", 5, "--epochs", 4, "--batch-size", 25, "--out", out])
    return out


def test_evaluate_ddp_two_ranks_train_the_student_of_one(labelled, tmp_path):
    """vit_tiny has no BatchNorm, so DDP over 2 half batches must follow the 1-process run: the same
    per-epoch training loss (the whole batch's, summed over ranks) and the same accuracy."""
    argv = EVAL + ["--student", "vit_tiny", "--epochs", 4]
    one = copy_run(labelled, tmp_path / "one")
    with one_thread():
        ref = run_stage(evaluate, argv + ["--out", one])
    two = copy_run(labelled, tmp_path / "two")
    proc = launch("evaluate.py", argv + ["--out", two])
    got = json.load(open(artifacts.run_paths(two).results_json))
    assert got["world_size"] == 2 and proc.stdout.count("[evaluate] configuration:") == 1
    for r_got, r_ref in zip(got["runs"], ref["runs"]):
        assert r_got["key"] == r_ref["key"]
        h_got, h_ref = r_got["per_seed"][0]["history"], r_ref["per_seed"][0]["history"]
        assert [h["epoch"] for h in h_got] == [h["epoch"] for h in h_ref] == [2, 4]
        for a, b in zip(h_got, h_ref):
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
            assert a["top1"] == pytest.approx(b["top1"], abs=0.6)  # at most 2 of 360 images flip


def test_evaluate_ddp_convnet_runs_and_reports(labelled, tmp_path):
    out = copy_run(labelled, tmp_path / "conv")
    proc = launch("evaluate.py", EVAL + ["--out", out, "--seeds", 2])
    res = json.load(open(artifacts.run_paths(out).results_json))
    assert res["world_size"] == 2 and [r["key"] for r in res["runs"]] == ["distilled/soft", "distilled/hard"]
    for r in res["runs"]:
        assert all(10 < s["top1"] <= s["top5"] <= 100 and s["world_size"] == 2 for s in r["per_seed"])
    assert proc.stdout.count("[evaluate] wrote") == 1


def test_evaluate_sigkill_then_rerun_keeps_finished_students(labelled, tmp_path, capsys):
    argv = EVAL + ["--seeds", 3]
    ref_dir = copy_run(labelled, tmp_path / "straight")
    with one_thread():
        ref = run_stage(evaluate, argv + ["--out", ref_dir])
    out = copy_run(labelled, tmp_path / "killed")
    students = artifacts.run_paths(out).students
    kill_when("evaluate.py", argv + ["--out", out], lambda: len(glob.glob(os.path.join(students, "*.json"))) >= 1,
              tmp_path / "log.txt")
    done = sorted(glob.glob(os.path.join(students, "*.json")))
    assert 1 <= len(done) < 6 and not os.path.exists(artifacts.run_paths(out).results_json)
    mtimes = {p: os.stat(p).st_mtime_ns for p in done}
    torn = os.path.join(students, "distilled-hard-seed2.json")
    with open(torn, "w") as fh:
        fh.write('{"fingerprint": "')
    capsys.readouterr()
    with one_thread():
        got = run_stage(evaluate, argv + ["--out", out])
    assert f"resuming: {len(done)} of 6 students already finished" in capsys.readouterr().out
    assert all(os.stat(p).st_mtime_ns == mtimes[p] for p in done)
    for r_got, r_ref in zip(got["runs"], ref["runs"]):
        for a, b in zip(r_got["per_seed"], r_ref["per_seed"]):
            assert (a["seed"], a["top1"], a["top5"], a["history"]) == (b["seed"], b["top1"], b["top5"], b["history"])
    assert got["metrics"] == ref["metrics"]


def test_a_changed_setting_retrains_every_student(labelled, tmp_path, capsys):
    out = copy_run(labelled, tmp_path / "stale")
    with one_thread():
        run_stage(evaluate, EVAL + ["--out", out])
        capsys.readouterr()
        run_stage(evaluate, EVAL + ["--out", out, "--seeds", 2])  # more seeds: the first two are kept
        assert "resuming: 2 of 4 students" in capsys.readouterr().out
        run_stage(evaluate, EVAL + ["--out", out, "--temperature", 4])  # another recipe: nothing kept
        assert "resuming" not in capsys.readouterr().out
