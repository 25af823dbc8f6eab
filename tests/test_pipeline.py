"""The whole pipeline on a minimal digits setting and the report (the copy-the-scripts use: test_copy.py)."""
from __future__ import annotations

import json
import os
import re

import barycenter
import evaluate
import recover
import relabel
from tests.conftest import copy_run, run_stage
from lab import embedding, report
from wmdd import artifacts

DIGITS = ["--dataset", "digits", "--ipc", "2"]


def _pipeline(run: str, sre2l: str) -> None:
    run_stage(barycenter, DIGITS + ["--out", run])
    run_stage(recover, DIGITS + ["--out", run, "--iterations", "4"])
    run_stage(relabel, DIGITS + ["--out", run, "--epochs", "2"])
    run_stage(evaluate, DIGITS + ["--out", run, "--seeds", "2", "--baseline", "random"])
    teacher = ["--teacher", artifacts.run_paths(run).teacher]
    run_stage(recover, DIGITS + ["--out", sre2l, "--sre2l", "--iterations", "4", *teacher,
                                 "--bn-stats", artifacts.run_paths(run).bn_stats])
    run_stage(relabel, DIGITS + ["--out", sre2l, "--epochs", "2", *teacher])
    run_stage(evaluate, DIGITS + ["--out", sre2l, "--seeds", "2", "--baseline", "none", *teacher])


def test_pipeline_and_report_numbers_match_results(digits_run, tmp_path):
    run = copy_run(digits_run, tmp_path / "demo")
    sre2l = str(tmp_path / "demo" / "sre2l")
    _pipeline(run, sre2l)
    paths = artifacts.run_paths(run)
    for f in (paths.teacher, paths.bn_stats, paths.features, paths.barycenters, paths.synthetic,
              paths.results_json, paths.results_md, os.path.join(paths.images, "0")):
        assert os.path.exists(f), f
    assert len(os.listdir(os.path.join(paths.images, "9"))) == 2

    pictures = report.build(run, {"SRe2L": sre2l}, recipe=embedding.Recipe(epochs=1))
    md = report.write_report(os.path.join(run, "REPORT.md"), {"WMDD": run, "SRe2L": sre2l}, pictures)
    for key in ("images", "tsne", "tsne_independent", "recover_loss"):
        assert os.path.getsize(pictures[key]) > 1000
    text = open(md).read()
    for name, directory in (("WMDD", run), ("SRe2L", sre2l)):
        res = json.load(open(artifacts.run_paths(directory).results_json))
        for r in res["runs"]:
            label = f"{name} (distilled)" if r["key"].startswith("distilled/") else r["images"]
            row = next(line for line in text.splitlines()
                       if line.startswith(f"| {label} | {r['label_desc']} |"))
            mean, std = map(float, re.findall(r"([\d.]+) ± ([\d.]+)", row)[0])
            assert abs(mean - r["top1"]["mean"]) < 0.005 and abs(std - r["top1"]["std"]) < 0.005
        for k, v in res["metrics"].items():
            assert f"{k} = {v['mean']:+.2f} ± {v['std']:.2f} pt" in text
    assert "![tsne](tsne.png)" in text
    div = json.load(open(os.path.join(run, "diversity.json")))
    assert set(div) >= {"WMDD", "SRe2L"}
    # Fig. 4 and the independent diversity: a model trained on all real images + both synthetic sets
    assert "![tsne_independent](tsne_independent.png)" in text
    independent = json.load(open(os.path.join(run, "diversity_independent.json")))
    record = independent["embedding_model"]
    n_real = len(embedding.real_images(*embedding.load_sets(run)[:2]))
    assert record["train_size"] == n_real + 2 * 2 * 10 and record["synthetic_sizes"] == {"WMDD": 20, "SRe2L": 20}
    assert "not the teacher" in pictures["tsne_independent_caption"] and pictures["tsne_independent_caption"] in text
    for name, value in independent["diversity"].items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {value:.3f} | {div[name]:.3f} |" in row
