"""The README's runnable command block runs as written (in a copy of the scripts, so nothing lands in
the checkout), and every stage command it names for other presets parses."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(REPO, "README.md")).read()


def readme_block(tag: str) -> list:
    """The command lines of the ```bash block that follows `<!-- readme-test: tag -->`."""
    m = re.search(rf"<!-- readme-test: {tag} -->\s*```bash\n(.*?)```", README, re.S)
    assert m, f"README has no block tagged {tag}"
    return [line for line in m.group(1).splitlines() if line.strip() and not line.startswith("#")]


def all_stage_commands() -> list:
    """Every `python <stage>.py ...` (or `torchrun ... <stage>.py ...`) line of every bash block, as a
    `python <stage>.py ...` line with shell variables substituted."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        env = dict(re.findall(r"(\w+)=(\S+)", block.splitlines()[0])) if "=" in block.splitlines()[0] else {}
        for line in block.splitlines():
            line = re.sub(r"^torchrun( --\S+ \S+)* ", "python ", line)
            if line.startswith("python ") and line.split()[1].endswith(".py"):
                for k, v in env.items():
                    line = line.replace(f"${k}", v)
                lines.append(line)
    return lines


def test_every_readme_stage_command_parses():
    import barycenter, evaluate, recover, relabel, squeeze  # noqa: E401
    modules = {m.__name__ + ".py": m for m in (squeeze, barycenter, recover, relabel, evaluate)}
    commands = all_stage_commands()
    assert len(commands) >= 10
    for line in commands:
        argv = shlex.split(line)[1:]
        modules[argv[0]].get_args_parser().parse_args(argv[1:])  # SystemExit on an unknown flag


@pytest.mark.slow
def test_readme_digits_block_runs_as_written(tmp_path):
    work = tmp_path / "checkout"
    work.mkdir()
    for script in ("squeeze.py", "barycenter.py", "recover.py", "relabel.py", "evaluate.py"):
        shutil.copy(os.path.join(REPO, script), work)
    shutil.copytree(os.path.join(REPO, "wmdd"), work / "wmdd", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(work))
    for line in readme_block("digits"):
        argv = shlex.split(line)
        assert argv[0] == "python"
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=work, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{line}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    for name in ("teacher.pt", "barycenters.pt", "synthetic.pt", "results.md", "images.png", "tsne.png"):
        assert (work / "runs" / "digits" / name).exists(), name
