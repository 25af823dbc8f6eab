"""bench/gpu_check.sh without a GPU (CUDA hidden), so the script waiting for a lent GPU cannot rot: every GPU
step says "skipped: no CUDA", every CPU step records numbers, a failing or timed-out step is recorded and
the run goes on, and bad input stops with exit code 2. Everything is written under tmp_path."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "gpu_check.sh")
GPU_STEPS = ("build", "pytest_gpu", "recover_imagenet")
CPU_STEPS = ("env", "wheels", "recover_bench", "flops", "barycenter", "torchrun")
NUMBER = re.compile(r"^-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

pytestmark = pytest.mark.skipif(not (shutil.which("bash") and shutil.which("timeout")),
                                reason="bench/gpu_check.sh needs bash and coreutils' timeout")


def run_check(tmp_path, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TMPDIR=str(tmp_path))
    env.pop("OUT", None)
    return subprocess.run(["bash", SCRIPT, "--python", sys.executable, *map(str, args)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def parse(path) -> tuple:
    """({step: its status text}, {step: {key: value}}) of a gpu_check.txt."""
    status, values = {}, {}
    with open(path) as fh:
        for line in fh.read().splitlines():
            m = re.match(r"^\[(\w+)\] (.*)$", line)
            if m:
                status[m.group(1)] = m.group(2)
                values.setdefault(m.group(1), {})
                continue
            m = re.match(r"^(\w+)\.(\S+) = (.*)$", line)
            if m:
                values.setdefault(m.group(1), {})[m.group(2)] = m.group(3)
    return status, values


def numbers(values: dict) -> dict:
    return {k: float(v) for k, v in values.items() if NUMBER.match(v)}


def summary(path) -> str:
    with open(path) as fh:
        return [line for line in fh.read().splitlines() if line.startswith("summary: ")][-1]


def test_cpu_run_skips_the_gpu_steps_and_measures_the_others(tmp_path):
    out = tmp_path / "out"
    proc = run_check(tmp_path, "--out", out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    status, values = parse(out / "gpu_check.txt")
    assert set(status) == set(GPU_STEPS + CPU_STEPS)
    for step in GPU_STEPS:
        assert status[step] == "skipped: no CUDA"
        assert f"[{step}] skipped: no CUDA" in proc.stdout
    for step in CPU_STEPS:
        assert status[step].startswith("ok ("), (step, status[step])
        if step != "wheels":  # wheels records POT's version
            assert numbers(values[step]), f"{step} recorded no number: {values[step]}"
    assert re.match(r"\d+\.\d+", values["wheels"]["pot"])
    assert summary(out / "gpu_check.txt").startswith("summary: 6 ok, 3 skipped, 0 failed")

    assert values["env"]["cuda_available"] == "false"
    # ResNet-18 at 224 px, batch 100: forward + backward to the pixels, ~725 GFLOP
    assert 700 < numbers(values["flops"])["gflop_per_iteration"] < 750
    bench = numbers(values["recover_bench"])
    for loop in ("released", "ours_fp32", "ours_bf16"):
        assert bench[f"convnet-digits-16px.{loop}.ms_per_step"] > 0
    assert bench["convnet-digits-16px.ours_fp32.rel_loss_step0"] <= 1e-4
    bary = numbers(values["barycenter"])
    assert bary["seconds"] > 0 and bary["sinkhorn_iterations_per_solve"] >= 1
    if "ext_vs_ref.max_atom_diff_rel" in bary:  # kernels built and POT present
        assert bary["ext_vs_ref.max_atom_diff_rel"] < 1e-3
    run = values["torchrun"]
    assert run["backend"] == "gloo" and run["world_size"] == "2"
    assert run["equal_to_one_process"] == "true", run
    assert run["nccl_probe"] == "skipped: no CUDA"

    with open(out / "gpu_check.log") as fh:
        log = fh.read()
    assert "bench_recover.py" in log and "torch.distributed.run" in log
    assert not list(tmp_path.glob("wmdd_gpu_check.*")), "the scratch folder was left behind"


def test_a_failed_or_timed_out_step_is_recorded_and_the_next_steps_run(tmp_path):
    out = tmp_path / "out"
    proc = run_check(tmp_path, "--out", out, "--only", "env,wheels,flops",
                     "--fail-step", "env=timeout", "--fail-step", "wheels")
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    status, values = parse(out / "gpu_check.txt")
    assert status["env"].startswith("FAILED rc=124 (timeout after 2 s)"), status["env"]
    assert status["wheels"].startswith("FAILED rc=3 "), status["wheels"]
    assert status["flops"].startswith("ok ("), status["flops"]
    assert numbers(values["flops"])["gflop_per_iteration"] > 0
    for step in ("build", "pytest_gpu", "recover_bench", "recover_imagenet", "barycenter", "torchrun"):
        assert status[step] == "skipped: not selected"
    assert summary(out / "gpu_check.txt").startswith("summary: 1 ok, 6 skipped, 2 failed")
    with open(out / "gpu_check.txt") as fh:
        assert "    | failing on purpose (exit code 3)" in fh.read()


@pytest.mark.parametrize("case", ["out-under-a-file", "budget", "only", "fail-step", "wheels", "option", "python"])
def test_bad_input_exits_2_with_a_message(tmp_path, case):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = tmp_path / "out"
    args = {"out-under-a-file": ["--out", blocker / "results"],
            "budget": ["--out", out, "--budget", "soon"],
            "only": ["--out", out, "--only", "env,warp_drive"],
            "fail-step": ["--out", out, "--fail-step", "env=later"],
            "wheels": ["--out", out, "--wheels", tmp_path / "no_such_folder"],
            "option": ["--out", out, "--frobnicate"],
            "python": ["--out", out, "--python", tmp_path / "no_python"]}[case]
    proc = run_check(tmp_path, *args, timeout=120)  # "python": the last --python given wins
    assert proc.returncode == 2, proc.stdout + proc.stderr
    message = {"out-under-a-file": "cannot create or write the output folder", "budget": "--budget",
               "only": "no step 'warp_drive'", "fail-step": "use STEP or STEP=timeout",
               "wheels": "is not a folder", "option": "unknown argument '--frobnicate'",
               "python": "no such program"}[case]
    assert message in proc.stderr
    assert not (out / "gpu_check.txt").exists()


@pytest.mark.slow
def test_recover_imagenet_step_runs_at_a_tiny_size_on_cpu(tmp_path):
    """The GPU-only recover_imagenet step's plumbing (folder dataset, squeeze, barycenter, four recover runs,
    the released port), at 32 px on CPU: what the CPU run of gpu_check.sh skips."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "gpu_check.py"), "recover-imagenet",
                           "--device", "cpu", "--tiny", "--work", tmp_path / "work"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    got = dict(re.findall(r"^@@ (\S+) = (.*)$", proc.stdout, re.M))
    for loop in ("released_fp32", "released_bf16", "ours_fp32", "ours_bf16"):
        assert NUMBER.match(got[f"{loop}.ms_per_iteration"]), got
    assert float(got["released_bf16_vs_fp32.rel_loss_step0"]) < 3e-2
    assert float(got["ours_bf16_vs_fp32.rel_loss_step0"]) < 3e-2
    assert 0.9 < float(got["released_bf16_vs_fp32.cos_grad_step1"]) <= 1.0 + 1e-6
