"""recover.py with several processes (torchrun, gloo, 2 CPU ranks), resume after SIGKILL, bad input.

The run: a random digits teacher (only its features and BN statistics matter here), its exact BN
statistics (squeeze --stats-only) and barycenters for IPC 2; recover with --batch-size 2, so every class is
a group of its own (10 groups, 10 shards). Every run that is compared bit for bit runs on one thread: the
in-process references under `one_thread()`, the subprocesses with OMP_NUM_THREADS=1."""
from __future__ import annotations

import argparse
import contextlib
import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import barycenter
import recover
import squeeze
from conftest import copy_run, run_stage
from wmdd import artifacts, cli, data, models, shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMMON = ["--dataset", "digits", "--ipc", 2, "--batch-size", 2, "--iterations", 16]
GROUPS = 10


@contextlib.contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_teacher(out, seed: int = 0, path=None) -> str:
    """A randomly initialised digits teacher.pt, as squeeze.py writes it."""
    args = argparse.Namespace(dataset="digits", data_dir=None, resolution=None, download=False, seed=seed)
    info = data.resolve(args)
    torch.manual_seed(seed)
    spec = models.model_spec(info.arch, info.num_classes, info.stem, info.image_size)
    model = models.build_from_spec(spec).eval()
    path = path or artifacts.run_paths(str(out)).teacher
    artifacts.save(path, {"model": model.state_dict(), "model_args": spec},
                   artifacts.make_meta("squeeze", args, info, val_top1=None, arch=info.arch))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """teacher.pt + bn_stats.pt + features.pt + barycenters.pt (IPC 2) for digits; copy before writing."""
    out = str(tmp_path_factory.mktemp("recover_dist_base"))
    teacher = write_teacher(out)
    run_stage(squeeze, ["--dataset", "digits", "--stats-only", "--teacher", teacher, "--out", out])
    run_stage(barycenter, ["--dataset", "digits", "--ipc", 2, "--out", out])
    return out


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory) -> dict:
    """synthetic.pt of an uninterrupted one-process run with COMMON."""
    out = copy_run(base, tmp_path_factory.mktemp("recover_dist_ref"))
    with one_thread():
        run_stage(recover, COMMON + ["--out", out])
    return artifacts.load(artifacts.run_paths(out).synthetic, stage="recover")


def assert_same_synthetic(path, ref) -> dict:
    syn = artifacts.load(path, stage="recover")
    for key in ("images", "labels", "weights", "loss_batches"):
        assert torch.equal(syn[key], ref[key]), key
    for term in recover.TERMS:
        assert torch.equal(syn["loss_curve"][term], ref["loss_curve"][term]), term
    assert syn["recipe"] == ref["recipe"]
    return syn


def launch(script: str, argv: list, nproc: int = 2, timeout: int = 300, ok: bool = True):
    """torchrun on CPU (gloo, one thread per rank; --standalone: torchrun picks a free port itself).
    ok: assert exit code 0 (and show the end of the log when not)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(REPO, script), *[str(a) for a in argv]]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def kill_when(script: str, argv: list, ready, log_path, timeout: float = 300) -> None:
    """Run `python <script> argv` (one thread; a name without .py runs as `python -m <name>`) and SIGKILL it
    as soon as ready() holds (checked every 20 ms)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    target = [os.path.join(REPO, script)] if script.endswith(".py") else ["-m", script]
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, *target, *map(str, argv)], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + timeout
            while not ready():
                assert proc.poll() is None, f"ended before it was killed: {open(log_path).read()[-3000:]}"
                assert time.time() < deadline, f"not ready after {timeout} s"
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def shard_files(out) -> list:
    return sorted(glob.glob(os.path.join(artifacts.run_paths(out).shards, "recover_*.pt")))


# ---------------------------------------------------------------------------------------------
# torchrun


def test_two_ranks_give_the_images_of_one(base, reference, tmp_path):
    out = copy_run(base, tmp_path / "r2")
    proc = launch("recover.py", COMMON + ["--out", out])
    syn = assert_same_synthetic(artifacts.run_paths(out).synthetic, reference)
    assert syn["meta"]["world_size"] == 2
    assert len(shard_files(out)) == GROUPS
    # both ranks wrote PNGs of their own classes: the tree is complete and equals the images
    pngs = sorted(glob.glob(os.path.join(artifacts.run_paths(out).images, "*", "*.png")))
    assert len(pngs) == 2 * GROUPS
    # one configuration block, one "wrote" line: only rank 0 talks
    assert proc.stdout.count("[recover] configuration:") == 1
    assert proc.stdout.count("[recover] wrote") == 1


def test_a_rank_that_fails_stops_every_rank_and_keeps_the_others_shards(base, tmp_path):
    """Class 7's BN target is NaN: rank 1 (groups 1, 3, 5, 7, 9) stops at group 7 with the non-finite loss
    message; rank 0 still finishes its groups 0, 2, 4, 6, 8; both ranks exit 2; the shards stay on disk."""
    out = copy_run(base, tmp_path / "nan")
    paths = artifacts.run_paths(out)
    stats = artifacts.load(paths.bn_stats)
    stats["mean"][0][7] = float("nan")
    meta = stats.pop("meta")
    artifacts.save(paths.bn_stats, stats, meta)
    proc = launch("recover.py", COMMON + ["--out", out, "--log-every", 1, "--iterations", 4], ok=False)
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]
    # each rank prints one clear message (the first rank to exit makes torchrun stop the other, which may
    # be stopped before it prints): rank 1 its own, rank 0 the one it got from rank 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert 1 <= len(errors) <= 2
    assert f'File "{os.path.join(REPO, "recover.py")}"' not in proc.stderr  # no traceback from the stage
    for line in errors:
        assert "non-finite" in line and "classes 7:8" in line and "resumes" in line
        assert line.startswith(("error: rank 1 of 2 stopped: the recover loss", "error: the recover loss"))
    names = [os.path.basename(p) for p in shard_files(out)]
    assert names == [f"recover_{c:05d}-{c + 1:05d}.pt" for c in (0, 1, 2, 3, 4, 5, 6, 8)]
    assert not os.path.exists(paths.synthetic)


# ---------------------------------------------------------------------------------------------
# resume


def test_sigkill_mid_run_then_rerun_resumes_and_equals_the_uninterrupted_run(base, reference, tmp_path, capsys):
    out = copy_run(base, tmp_path / "killed")
    paths = artifacts.run_paths(out)
    kill_when("recover.py", COMMON + ["--out", out], lambda: shard_files(out), tmp_path / "log.txt")
    done = shard_files(out)
    assert 1 <= len(done) < GROUPS and not os.path.exists(paths.synthetic), "killed too late to test resuming"
    mtimes = {p: os.stat(p).st_mtime_ns for p in done}
    # what a torn write would leave: a temp file, and a damaged shard of a group that is not done
    todo = [c for c in range(GROUPS) if not os.path.exists(shards.shard_path(paths, shards.Group(c, c + 1)))]
    torn = shards.shard_path(paths, shards.Group(todo[-1], todo[-1] + 1))
    with open(torn + ".tmp-99999", "wb") as fh:
        fh.write(b"PK\x03\x04 half")
    with open(torn, "wb") as fh:
        fh.write(open(done[0], "rb").read()[:1000])
    capsys.readouterr()
    with one_thread():
        res = run_stage(recover, COMMON + ["--out", out])
    printed = capsys.readouterr().out
    assert f"resuming: {len(done)} of {GROUPS} groups already in" in printed
    assert f"{GROUPS - len(done)} group(s) recovered" in printed
    assert all(os.stat(p).st_mtime_ns == mtimes[p] for p in done)  # finished shards were kept, not redone
    assert_same_synthetic(res["synthetic"], reference)


# ---------------------------------------------------------------------------------------------
# bad input: exit code 2, the file named, nothing written


def fails(argv, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run(recover.main, recover.get_args_parser(), [str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


@pytest.fixture
def run_dir(base, tmp_path) -> str:
    return copy_run(base, tmp_path / "run")


def edited_copy(src, dst, **meta_changes) -> str:
    obj = artifacts.load(src)
    meta = obj.pop("meta")
    for key, value in meta_changes.items():
        meta[key] = value
    artifacts.save(dst, obj, meta)
    return str(dst)


@pytest.mark.parametrize("change, expected", [
    ({"upstream": {"teacher": "0" * 64}}, "another teacher.pt"),
    ({"classes": [str(c) for c in reversed(range(10))]}, "class list or order"),
    ({"resolution": 32}, "resolution"),
    ({"dataset": "cifar10"}, "dataset"),
])
def test_barycenters_from_another_teacher_dataset_order_or_resolution(run_dir, tmp_path, capsys, change, expected):
    other = edited_copy(artifacts.run_paths(run_dir).barycenters, tmp_path / "other_barycenters.pt", **change)
    err = fails(COMMON + ["--out", run_dir, "--barycenters", other], capsys)
    assert other in err and expected in err
    assert not shard_files(run_dir)


def test_bn_stats_of_another_teacher(run_dir, tmp_path, capsys):
    """squeeze was rerun (a new teacher.pt) but bn_stats.pt and barycenters.pt are the old teacher's."""
    write_teacher(run_dir, seed=1)
    err = fails(COMMON + ["--out", run_dir], capsys)
    assert artifacts.run_paths(run_dir).bn_stats in err and "another teacher.pt" in err
    assert not shard_files(run_dir)


@pytest.mark.parametrize("flag", ["--barycenters", "--teacher"])
def test_truncated_input(run_dir, tmp_path, capsys, flag):
    paths = artifacts.run_paths(run_dir)
    src = paths.barycenters if flag == "--barycenters" else paths.teacher
    bad = str(tmp_path / "truncated.pt")
    with open(bad, "wb") as fh:
        fh.write(open(src, "rb").read()[:2000])
    err = fails(COMMON + ["--out", run_dir, flag, bad], capsys)
    assert bad in err and "corrupt or truncated" in err
    assert not shard_files(run_dir)


class _CreatesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("flag", ["--barycenters", "--teacher"])
def test_pickled_code_is_refused_and_never_run(run_dir, tmp_path, capsys, flag):
    marker = str(tmp_path / "pwned")
    evil = str(tmp_path / "evil.pt")
    torch.save({"meta": {"format_version": 1}, "payload": _CreatesAFile(marker)}, evil)
    torch.load(evil, weights_only=False)  # what an unsafe loader would do: it runs the payload
    assert os.path.exists(marker)
    os.remove(marker)
    err = fails(COMMON + ["--out", run_dir, flag, evil], capsys)
    assert evil in err and "refused to load" in err and "Nothing in it was run" in err
    assert not os.path.exists(marker)
    assert not shard_files(run_dir)


def test_ipc_zero_and_real_init_with_a_class_smaller_than_ipc(run_dir, capsys):
    err = fails(["--dataset", "digits", "--ipc", 0, "--out", run_dir], capsys)
    assert "--ipc (0)" in err and "positive" in err
    err = fails(["--dataset", "digits", "--ipc", 500, "--out", run_dir, "--feature", "none", "--init", "real",
                 "--iterations", 1], capsys)
    assert "--init real" in err and "--ipc 500" in err and "training images" in err
    assert not shard_files(run_dir)
