"""python -m lab.paper: every table and figure on a tiny digits configuration, PAPER.md's numbers against the
stages' own results.json, a rerun that does no stage work, SIGKILL + rerun, and bad input."""
from __future__ import annotations

import glob
import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest
import torch

from test_recover_dist import kill_when
from tests.conftest import make_folder_tree
from lab import paper
from wmdd import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every table and figure at IPC 1: one teacher epoch, 2 recover iterations, 1 student epoch, 1 seed
TINY = ["--dataset", "digits", "--ipc", "1", "--squeeze-epochs", "1", "--iterations", "2", "--epochs", "1",
        "--seeds", "1", "--lambda-sweep", "1", "--students", "convnet,vit_tiny", "--fig-classes", "3"]


def run_paper(argv: list):
    return cli.run(paper.main, paper.get_args_parser(), [str(a) for a in argv])


def table(text: str, heading: str) -> list:
    """The rows (lists of cells) of the markdown table under `## heading...`."""
    section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("|---")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in rows[1:]]


def mean_std(cell: str) -> tuple:
    mean, std = re.fullmatch(r"([+-]?[\d.]+) ± ([\d.]+)", cell).groups()
    return float(mean), float(std)


def top1(directory, key: str) -> dict:
    with open(os.path.join(directory, "results.json")) as fh:
        res = json.load(fh)
    return next(r["top1"] for r in res["runs"] if r["key"] == key)


def assert_cell(cell: str, summary: dict) -> None:
    mean, std = mean_std(cell)
    assert abs(mean - summary["mean"]) < 0.006 and abs(std - summary["std"]) < 0.006, (cell, summary)


def artifacts_of(run: str) -> dict:
    """mtime of every file the stages and figures wrote (everything but the report files)."""
    return {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(run, "**", "*"), recursive=True)
            if os.path.isfile(p) and os.path.basename(p) not in ("PAPER.md", "COMMANDS.md")}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> str:
    run = str(tmp_path_factory.mktemp("paper") / "run")
    run_paper(TINY + ["--out", run, "--in-process"])
    return run


def test_every_table_and_figure_holds_the_stages_numbers(tiny_run):
    text = open(os.path.join(tiny_run, "PAPER.md")).read()
    ipc1 = os.path.join(tiny_run, "ipc1")
    # Table I: WMDD soft / hard, random real soft / hard, IOR and HLR, from ipc1/wmdd/results.json
    (row,) = table(text, "Table I")
    wmdd = os.path.join(ipc1, "wmdd")
    assert row[0] == "1" and row[2] == "–"  # digits: the paper has no number
    for cell, key in zip((row[1], row[3], row[4], row[5]),
                         ("distilled/soft", "distilled/hard", "random/soft", "random/hard")):
        assert_cell(cell, top1(wmdd, key))
    metrics = json.load(open(os.path.join(wmdd, "results.json")))["metrics"]
    assert_cell(row[6], metrics["IOR"])
    assert_cell(row[7], metrics["HLR"])
    assert_cell(row[8], metrics["LRS"])
    assert_cell(row[9], next(r for r in json.load(open(os.path.join(wmdd, "results.json")))["runs"]
                             if r["key"] == "distilled/soft")["top1_best"])
    # Table II: the preset's student is the WMDD row, the other trains on its set and labels
    rows = table(text, "Table II")
    assert [r[1] for r in rows] == ["convnet", "vit_tiny"]
    assert_cell(rows[0][2], top1(wmdd, "distilled/soft"))
    assert_cell(rows[1][2], top1(os.path.join(ipc1, "wmdd-vit_tiny"), "distilled/soft"))
    resvit = json.load(open(os.path.join(ipc1, "wmdd-vit_tiny", "results.json")))
    assert resvit["config"]["student"] == "vit_tiny"
    # Table III: the five ablation rows, each from its own directory
    rows = table(text, "Table III")
    assert [r[0] for r in rows] == [name for name, *_ in paper.ABLATIONS]
    for r in rows:
        assert_cell(r[4], top1(os.path.join(ipc1, r[0]), "distilled/soft"))
        assert_cell(r[5], top1(os.path.join(ipc1, r[0]), "distilled/hard"))
    sre2l_args = torch.load(os.path.join(ipc1, "sre2l", "synthetic.pt"), weights_only=True)["meta"]["args"]
    assert sre2l_args["sre2l"] and sre2l_args["bn"] == "global" and sre2l_args["feature"] == "none"
    # Fig. 2: lambda 1 (its own row) and the preset's 10 (the WMDD row)
    rows = table(text, "Fig. 2")
    assert [r[0] for r in rows] == ["1", "10"]
    assert_cell(rows[0][1], top1(os.path.join(ipc1, "lambda-bn-1"), "distilled/soft"))
    assert_cell(rows[1][1], top1(wmdd, "distilled/soft"))
    lam = torch.load(os.path.join(ipc1, "lambda-bn-1", "synthetic.pt"), weights_only=True)["meta"]["args"]
    assert lam["lambda_bn"] == 1.0
    # Fig. 4: its diversity table is the JSON it wrote
    rows = table(text, "Fig. 4")
    div = json.load(open(os.path.join(tiny_run, "fig4_diversity.json")))["diversity"]
    assert {r[0]: float(r[1]) for r in rows} == pytest.approx(div, abs=1e-3)
    assert {"WMDD", "SRe2L"} <= set(div) and os.path.isfile(os.path.join(ipc1, "wmdd", "embedding_model.pt"))
    # Table IV: seconds per iteration = recover's seconds / (batches x iterations)
    for r in table(text, "Table IV"):
        meta = torch.load(os.path.join(ipc1, r[0], "synthetic.pt"), weights_only=True)
        t = meta["meta"]["timing"]
        assert t["steps"] == len(meta["loss_batches"]) * 2
        assert float(r[1]) == pytest.approx(1000 * t["seconds"] / t["steps"], abs=0.006)
        assert float(r[2]) == pytest.approx(t["peak_memory_bytes"] / 2**20, abs=0.5)
    for png in ("fig2_lambda_bn.png", "fig4_tsne.png", "fig6_images.png"):
        assert f"]({png})" in text and os.path.getsize(os.path.join(tiny_run, png)) > 1000
    assert "## Wall time of each stage" in text and "- machine: " in text


def test_every_printed_command_parses_and_wrote_its_files(tiny_run):
    """PAPER.md's commands are the stages' own command lines (each parses with its argparse)."""
    import barycenter, evaluate, recover, relabel, squeeze  # noqa: E401
    modules = {m.__name__ + ".py": m for m in (squeeze, barycenter, recover, relabel, evaluate)}
    text = open(os.path.join(tiny_run, "COMMANDS.md")).read()
    lines = [line for line in text.splitlines() if line.startswith("python ")]
    assert len(lines) == 1 + 1 + 6 * 3 + 1  # squeeze, barycenter, 6 rows x 3 stages, one more student
    for line in lines:
        argv = shlex.split(line)[1:]
        args = modules[argv[0]].get_args_parser().parse_args(argv[1:])
        assert os.path.isdir(args.out), line
    assert all(line in open(os.path.join(tiny_run, "PAPER.md")).read() for line in lines)


def test_a_rerun_does_no_stage_work_and_rewrites_the_same_report(tiny_run, monkeypatch):
    before = artifacts_of(tiny_run)
    report = open(os.path.join(tiny_run, "PAPER.md")).read()

    def no_stage(*a, **k):
        raise AssertionError("a stage ran on a finished reproduction")

    monkeypatch.setattr(paper, "run_in_process", no_stage)
    monkeypatch.setattr(paper.subprocess, "call", no_stage)
    for name in ("draw_fig2", "draw_fig4", "draw_fig6"):
        monkeypatch.setattr(paper, name, no_stage)
    run_paper(TINY + ["--out", tiny_run, "--in-process"])
    assert artifacts_of(tiny_run) == before
    assert open(os.path.join(tiny_run, "PAPER.md")).read() == report


def test_a_changed_upstream_file_reruns_what_depends_on_it(tiny_run, tmp_path, monkeypatch):
    """The skip record is by file: a row's labels changed since relabel wrote them rerun that row's relabel,
    and its evaluate (whose input changed), nothing else."""
    import shutil
    run = str(tmp_path / "run")
    shutil.copytree(tiny_run, run)
    ran = []
    monkeypatch.setattr(paper, "run_in_process", lambda step: ran.append(step.key))
    # the copy has new mtimes: rebuild the record as it would be for this directory, then touch one file
    ledger = paper.Ledger(os.path.join(run, "stages.json"))
    argv = [str(a) for a in TINY + ["--out", run, "--in-process"]]
    args = paper.get_args_parser().parse_args(argv)
    paper.resolve_args(args)
    plan = paper.build_plan(args, paper.Commands(args))
    for row in plan.rows:
        for step in row.steps:
            ledger.record(step, 1.0, "test")
    manifest = os.path.join(run, "ipc1", "ce", "labels", "manifest.pt")
    st = os.stat(manifest)
    os.utime(manifest, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    monkeypatch.setattr(paper, "draw_fig2", lambda *a: None)
    monkeypatch.setattr(paper, "draw_fig4", lambda *a: None)
    monkeypatch.setattr(paper, "draw_fig6", lambda *a: None)
    run_paper(argv)
    assert [shlex.split(k)[1] for k in ran] == ["relabel.py", "evaluate.py"]
    assert all("ipc1/ce " in k for k in ran)


@pytest.mark.parametrize("argv, message", [
    (["--only", "table1,table9"], "table9 is not one of"),
    (["--ipc", "1,ten"], "does not parse"),
    (["--ipc", "0"], "must be positive"),
    (["--dataset", "tiny"], "no --data-dir was given"),
    (["--students", "resnet18,alexnet"], "alexnet is not one of"),
    (["--in-process", "--nproc", "2"], "--in-process"),
])
def test_bad_input_exits_2_before_any_work(argv, message, tmp_path, capsys):
    out = tmp_path / "never"
    base = ["--dataset", "digits", "--out", str(out)]
    with pytest.raises(SystemExit) as e:
        run_paper(base + argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_nproc_runs_every_stage_under_torchrun(tmp_path):
    args = paper.get_args_parser().parse_args(["--dataset", "digits", "--out", str(tmp_path), "--nproc", "2",
                                               "--only", "table1", "--ipc", "10"])
    paper.resolve_args(args)
    steps = [s for r in paper.build_plan(args, paper.Commands(args)).rows for s in r.steps]
    assert [s.kind for s in steps] == ["squeeze", "barycenter", "recover", "relabel", "evaluate"]
    for s in steps:
        assert s.key.startswith("torchrun --standalone --nproc_per_node 2 ")
        assert s.argv[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        assert s.argv[6] == os.path.join(REPO, s.script) and s.argv[7:] == s.flags


def test_the_documented_commands_parse():
    readme = open(os.path.join(REPO, "docs", "paper.md")).read()
    lines = [line.split("#")[0] for line in readme.splitlines() if line.startswith("python -m lab.paper ")]
    assert len(lines) >= 4
    for line in lines:
        paper.get_args_parser().parse_args(shlex.split(line)[3:])


def test_dry_run_lists_the_plan_and_runs_nothing(tmp_path, capsys):
    run_paper(["--dataset", "digits", "--out", str(tmp_path / "run"), "--ipc", "1,10", "--dry-run"])
    printed = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("python ")]
    # Table I 2 rows, Table III 4 more, Fig. 2 3 more at IPC 10: 9 sets; Table II 2 students x IPC 10
    assert printed.count("recover.py") == 9 and printed.count("evaluate.py") == 11
    assert printed.count("squeeze.py") == 1 and printed.count("barycenter.py") == 2
    assert not (tmp_path / "run").exists()


def _paper_text_without_runs(tmp_path, monkeypatch, dataset: str) -> str:
    """PAPER.md of a --dataset run with Tables I and III at IPC 1 and 10, written before any stage ran (every
    cell "not run"): what it prints beside the settings, not the numbers."""
    tree = make_folder_tree(tmp_path / dataset, num_classes=2, train_per_class=1, val_per_class=1)
    args = paper.get_args_parser().parse_args(["--dataset", dataset, "--data-dir", tree["root"], "--ipc", "1,10",
                                               "--only", "table1,table3", "--out", str(tmp_path / "run")])
    paper.resolve_args(args)
    cmd = paper.Commands(args)
    plan = paper.build_plan(args, cmd)
    none = {"soft": None, "hard": None, "random_soft": None, "random_hard": None, "metrics": {}, "soft_best": None,
            "full": None, "full_label": None, "teacher": None, "student": "resnet18", "seeds": 3, "epochs": 300}
    monkeypatch.setattr(paper, "read_results", lambda directory: none)
    (tmp_path / "run").mkdir()
    path = paper.write_paper(args, cmd, plan, paper.Ledger(str(tmp_path / "run" / "stages.json")), plan.rows, "x")
    return open(path).read()


def test_assumptions_are_printed_as_assumed(tmp_path, monkeypatch):
    """Table III row 4's λ_BN (global-bn) and ImageNet-1K's teacher recipe are in neither the paper nor the
    released logs: PAPER.md says "assumed" beside them (its heading, its cell, the header's teacher line);
    the λ_BN of the released runs is printed with the log it comes from (ImageNette: log/304 at IPC 1,
    log/888 at IPC 10, where the release's try.sh / log JSON hold r_bn 10 and 30)."""
    text = _paper_text_without_runs(tmp_path / "nette", monkeypatch, "imagenette")
    assert re.search(r"^## Table III: ablations at IPC 10 \(global-bn's λ_BN assumed\)", text, re.M)
    rows = {r[0]: r for r in table(text, "Table III")}
    assert rows["global-bn"][7].startswith("30 (assumed")
    assert rows["wmdd"][7] == "30 (Liu-Hy/WMDD log/888 (65.30, with KD batch 50))"
    assert "sre2l" in rows and "assumed" not in rows["sre2l"][7] and "assumed" not in rows["ce"][7]
    assert "- recover λ_BN at IPC 1: 10 (Liu-Hy/WMDD log/304" in text
    assert "teacher recipe" not in text  # ImageNette's teacher is in the logs
    text = _paper_text_without_runs(tmp_path / "in1k", monkeypatch, "imagenet")
    assert re.search(r"^## Table I: WMDD at each IPC \(teacher recipe assumed\)", text, re.M)
    assert re.search(r"^- teacher recipe: assumed: ", text, re.M)
    assert re.search(r"^- recover λ_BN at IPC 1: 500 \(assumed", text, re.M)  # the logs are silent at IPC 1
    assert table(text, "Table III")[3][7].startswith("500 (assumed")


def _table1_numbers(run: str) -> dict:
    with open(os.path.join(run, "ipc1", "wmdd", "results.json")) as fh:
        res = json.load(fh)
    return {r["key"]: [x["top1"] for x in r["per_seed"]] for r in res["runs"]}


@pytest.mark.slow
def test_killed_mid_row_and_rerun_ends_with_the_uninterrupted_numbers(tmp_path):
    """SIGKILL while a stage subprocess of the WMDD row runs (its synthetic set is written, its labels not
    all), then the same command: Table I's numbers equal the uninterrupted run's. The stage dies too."""
    run = str(tmp_path / "run")
    argv = TINY + ["--out", run, "--only", "table1"]
    labels = os.path.join(run, "ipc1", "wmdd", "labels")
    kill_when("lab.paper", argv, lambda: os.path.isfile(os.path.join(run, "ipc1", "wmdd", "synthetic.pt")),
              tmp_path / "log.txt")
    assert not os.path.isfile(os.path.join(run, "ipc1", "wmdd", "results.json"))
    for _ in range(50):  # the stage gets SIGKILL when its parent dies (PR_SET_PDEATHSIG)
        left = subprocess.run(["pgrep", "-f", "--", f"--out {run}/"], capture_output=True, text=True).stdout.split()
        if not left:
            break
        time.sleep(0.1)
    assert not left, "a stage outlived the killed lab.paper"
    proc = subprocess.run([sys.executable, "-m", "lab.paper", *argv], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ipc1/wmdd: started" in proc.stdout and "teacher: done before, skipped" in proc.stdout
    assert os.path.isdir(labels)
    reference = str(tmp_path / "reference")  # uninterrupted, same command and environment (one thread)
    proc = subprocess.run([sys.executable, "-m", "lab.paper", *TINY, "--out", reference, "--only", "table1"],
                          cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _table1_numbers(run) == _table1_numbers(reference)


def test_the_protocol_defaults_to_the_released_one_for_the_papers_datasets(tmp_path):
    from tests.conftest import make_folder_tree

    root = make_folder_tree(tmp_path / "imagenette2", num_classes=2, train_per_class=1, val_per_class=1)["root"]
    for argv, expected in ((["--dataset", "imagenette", "--data-dir", root], "released"),
                           (["--dataset", "imagenette", "--data-dir", root, "--protocol", "wmdd"], "wmdd"),
                           (["--dataset", "digits"], "wmdd")):
        args = paper.get_args_parser().parse_args(argv + ["--out", str(tmp_path / "out")])
        paper.resolve_args(args)
        assert args.protocol == expected
        flags = paper.Commands(args).common(str(tmp_path / "out"))
        assert (["--protocol", "released"] == flags[-2:]) == (expected == "released")


def test_a_tick_beside_a_paper_value_carries_both_values_and_the_tolerance():
    assert paper.versus({"mean": 64.1, "std": 0.2}, 64.8) == "64.80 ✓ (ours 64.10, |Δ| 0.70, tol 1.00)"
    assert paper.versus({"mean": 62.0, "std": 1.5}, 64.8) == "64.80 ✓ (ours 62.00, |Δ| 2.80, tol 3.00)"
    assert paper.versus({"mean": 60.0, "std": 0.1}, 64.8).startswith("64.80 ✗")
    assert paper.versus(None, 64.8) == "64.80: not run"
    assert paper.versus({"mean": 60.0, "std": 0.1}, None) == "–"
