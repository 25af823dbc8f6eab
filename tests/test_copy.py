"""The 'copy the stages into your repo' use: the five scripts and the core `wmdd/`, alone in an empty
directory, with this checkout off sys.path, run the whole digits pipeline (with and without the
compiled kernels); remove one core module from the copy and the first stage that needs it names it."""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("squeeze.py", "barycenter.py", "recover.py", "relabel.py", "evaluate.py")
SMALL = {"squeeze.py": ["--epochs", "2"], "barycenter.py": [], "recover.py": ["--iterations", "3"],
         "relabel.py": ["--epochs", "2"], "evaluate.py": ["--baseline", "none", "--epochs", "2", "--seeds", "1"]}
BUILT = glob.glob(os.path.join(REPO, "wmdd", "_C*.so"))


def make_copy(root, with_kernels: bool, drop: str | None = None) -> str:
    """The five scripts and wmdd/ (its .py files, and the built extension when asked) under root."""
    os.makedirs(root)
    for script in STAGES:
        shutil.copy(os.path.join(REPO, script), root)
    skip = ["__pycache__", "*.pyc"] + ([] if with_kernels else ["*.so"])
    shutil.copytree(os.path.join(REPO, "wmdd"), os.path.join(root, "wmdd"), ignore=shutil.ignore_patterns(*skip))
    if drop:
        os.remove(os.path.join(root, "wmdd", drop))
    return str(root)


# `pip install -e .` puts a finder for this checkout's `wmdd` on sys.meta_path (it would serve wmdd._C from
# here to the copy): drop it, then run the script or code as `python` would.
BOOT = ("import runpy, sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in "
        "getattr(f, '__module__', '') + type(f).__module__]; sys.argv = sys.argv[1:]; "
        "exec(sys.argv[1]) if sys.argv[0] == '-c' else runpy.run_path(sys.argv[0], run_name='__main__')")


def run_in(copy: str, *argv, check: bool = True) -> subprocess.CompletedProcess:
    """`python *argv` in the copy, with neither PYTHONPATH nor the editable install's finder: the copy's
    folder and site-packages are all it can import from."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WMDD_NO_EXT", "WMDD_IMPL")}
    proc = subprocess.run([sys.executable, "-c", BOOT, *argv], cwd=copy, env=env, capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("with_kernels", [False, True], ids=["no-kernels", "kernels"])
def test_five_stages_and_the_core_alone_run_the_digits_pipeline(tmp_path, with_kernels):
    if with_kernels and not BUILT:
        pytest.skip("the extension is not built in this checkout (pip install -e . builds it)")
    copy = make_copy(tmp_path / "other_repo", with_kernels)
    where = run_in(copy, "-c", "import wmdd, wmdd.ops as o; print(wmdd.__file__); print(o.describe())").stdout
    assert where.splitlines()[0] == os.path.join(copy, "wmdd", "__init__.py")  # not this checkout's wmdd
    assert ("compiled extension" in where.splitlines()[1]) == with_kernels, where
    out = os.path.join(copy, "runs", "digits")
    for script in STAGES:
        ipc = [] if script == "squeeze.py" else ["--ipc", "2"]
        printed = run_in(copy, script, "--dataset", "digits", *ipc, "--out", out, "--seed", "0", *SMALL[script]).stdout
    assert "distilled" in printed
    synthetic = torch.load(os.path.join(out, "synthetic.pt"), weights_only=True)
    assert synthetic["images"].shape == (20, 3, 16, 16) and synthetic["images"].dtype == torch.uint8
    assert synthetic["labels"].tolist() == [c for c in range(10) for _ in range(2)]
    assert len(glob.glob(os.path.join(out, "images", "*", "*.png"))) == 20
    assert len(glob.glob(os.path.join(out, "labels", "epoch_*.pt"))) == 2
    with open(os.path.join(out, "results.json")) as fh:
        results = json.load(fh)
    distilled = next(r for r in results["runs"] if r["key"] == "distilled/soft")
    assert 0 <= distilled["per_seed"][0]["top1"] <= 100 and results["upstream"]["synthetic"] == os.path.join(
        out, "synthetic.pt")


def test_a_missing_core_module_is_named_by_the_first_stage_that_needs_it(tmp_path):
    copy = make_copy(tmp_path / "other_repo", with_kernels=False, drop="coreset.py")
    out = os.path.join(copy, "runs", "digits")
    squeezed = run_in(copy, "squeeze.py", "--dataset", "digits", "--out", out, *SMALL["squeeze.py"], check=False)
    assert squeezed.returncode == 0, squeezed.stderr[-2000:]  # squeeze does not need wmdd/coreset.py
    failed = run_in(copy, "barycenter.py", "--dataset", "digits", "--ipc", "2", "--out", out, check=False)
    failed = failed if failed.returncode else run_in(copy, "recover.py", "--dataset", "digits", "--ipc", "2",
                                                     "--out", out, check=False)
    assert failed.returncode != 0
    last = failed.stderr.strip().splitlines()[-1]
    assert re.search(r"No module named 'wmdd\.coreset'|cannot import name 'coreset' from 'wmdd'", last), last
