"""The command blocks of README.md and docs/*.md are tested.

- Every command line of every ```bash block parses: `python <stage>.py ...` (and `torchrun ... <stage>.py
  ...`) with that stage's get_args_parser(), `python -m lab.paper ...` with lab.paper's parser,
  `python -m <module> ...` and `python bench/<script>.py ...` with the parser their main() builds, and
  every `make <target>` names a target of the Makefile. Other programs (pip, nvidia-smi, ...) are not
  checked.
- The README's block tagged `<!-- readme-test: digits -->` runs as written (slow; in a copy of the
  scripts, so nothing lands in the checkout).
"""
from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import inspect
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(REPO, "README.md")).read()
STAGES = ("squeeze", "barycenter", "recover", "relabel", "evaluate")
DOC_FILES = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=\S*$")


def readme_block(tag: str) -> list:
    """The command lines of the ```bash block that follows `<!-- readme-test: tag -->`."""
    m = re.search(rf"<!-- readme-test: {tag} -->\s*```bash\n(.*?)```", README, re.S)
    assert m, f"README has no block tagged {tag}"
    return [line for line in m.group(1).splitlines() if line.strip() and not line.startswith("#")]


def bash_blocks(text: str) -> list:
    return re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)


def block_commands(block: str) -> list:
    """The commands of one bash block as argv lists: continuation lines joined, comments dropped, a line
    of only VAR=VALUE assignments setting variables for the rest of the block, a VAR=VALUE prefix of a
    command dropped, $VAR / ${VAR} substituted."""
    env, commands = {}, []
    for line in block.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if not argv:
            continue
        argv = [re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), a) for a in argv]
        if all(ASSIGNMENT.match(a) for a in argv):
            env.update(a.split("=", 1) for a in argv)
            continue
        while argv and ASSIGNMENT.match(argv[0]):
            argv = argv[1:]
        commands.append((line.strip(), argv))
    return commands


def doc_commands(doc: str) -> list:
    text = open(os.path.join(REPO, doc)).read()
    return [c for block in bash_blocks(text) for c in block_commands(block)]


def as_python(argv: list) -> list:
    """`torchrun [its options] script.py args` as `python script.py args`; anything else unchanged."""
    if argv[0] == "torchrun":
        script = next((i for i, a in enumerate(argv) if a.endswith(".py")), None)
        return argv if script is None else ["python", *argv[script:]]
    return argv


class _Parsed(Exception):
    pass


def parse_with_main(main, argv: list) -> None:
    """Run `main`'s own argument parsing on argv and stop there: parse_args is wrapped to raise once the
    arguments parsed (an unknown flag raises SystemExit first), so nothing else of main runs."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        mp.setattr(sys, "argv", ["prog", *argv])
        with pytest.raises(_Parsed):
            main(argv) if inspect.signature(main).parameters else main()



def makefile_targets() -> set:
    return set(re.findall(r"^([\w.-]+):", open(os.path.join(REPO, "Makefile")).read(), re.M))


def check_command(doc: str, line: str, argv: list) -> None:
    argv = as_python(argv)
    if os.path.basename(argv[0]) in ("python", "python3"):
        argv = ["python", *argv[1:]]
    where = f"{doc}: {line}"
    try:
        if argv[0] == "make":
            missing = [t for t in argv[1:] if not t.startswith("-") and "=" not in t and t not in makefile_targets()]
            assert not missing, f"{where}: no Makefile target {missing}"
        elif argv[0] != "python" or argv[1:2] == ["-c"]:
            pass  # pip, nvidia-smi, cd, python -c ...: not this project's commands
        elif argv[:2] == ["python", "-m"] and argv[2].split(".")[0] not in ("lab", "wmdd"):
            pass  # pip, pytest, ...: other packages' modules
        elif argv[:2] == ["python", "-m"] and argv[2] == "lab.paper":
            import lab.paper  # the harness lives in lab/ (issue #28): an ImportError here is a failure
            lab.paper.get_args_parser().parse_args(argv[3:])
        elif argv[:2] == ["python", "-m"]:
            parse_with_main(importlib.import_module(argv[2]).main, argv[3:])
        elif argv[0] == "python" and argv[1] in {s + ".py" for s in STAGES}:
            importlib.import_module(argv[1][:-3]).get_args_parser().parse_args(argv[2:])
        elif argv[0] == "python" and argv[1].startswith("bench/") and argv[1].endswith(".py"):
            spec = importlib.util.spec_from_file_location(os.path.basename(argv[1])[:-3], os.path.join(REPO, argv[1]))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            parse_with_main(module.main, argv[2:])
        else:
            pytest.fail(f"{where}: a python command these tests do not know how to check; write it out in full "
                        f"(python <stage>.py, python -m <module>, python bench/<script>.py, torchrun <stage>.py)")
    except SystemExit as e:
        pytest.fail(f"{where}: does not parse (exit {e.code})")


@pytest.mark.parametrize("doc", DOC_FILES)
def test_every_command_of_the_docs_parses(doc):
    for line, argv in doc_commands(doc):
        check_command(doc, line, argv)


def test_the_docs_have_their_commands():
    stage = lambda cmds: [a for _, a in cmds if as_python(a)[0] == "python" and as_python(a)[1].endswith(".py")
                          and as_python(a)[1][:-3] in STAGES]
    assert len(stage(doc_commands("README.md"))) >= 5
    assert len(stage([c for doc in DOC_FILES for c in doc_commands(doc)])) >= 40
    for name in STAGES:  # each stage's manual shows its own commands
        assert any(as_python(a)[1] == name + ".py" for a in stage(doc_commands(f"docs/{name}.md"))), name
    assert any(a[:3] == ["python", "-m", "lab.paper"] for doc in DOC_FILES for _, a in doc_commands(doc))
    assert readme_block("digits")


@pytest.mark.slow
def test_readme_digits_block_runs_as_written(tmp_path):
    work = tmp_path / "checkout"
    work.mkdir()
    for script in ("squeeze.py", "barycenter.py", "recover.py", "relabel.py", "evaluate.py"):
        shutil.copy(os.path.join(REPO, script), work)
    for package in ("wmdd", "lab"):  # the core, and lab/ for the report the block ends with
        shutil.copytree(os.path.join(REPO, package), work / package, ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(work))
    for line in readme_block("digits"):
        argv = shlex.split(line)
        assert argv[0] == "python"
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=work, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{line}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    for name in ("teacher.pt", "barycenters.pt", "synthetic.pt", "results.md", "images.png", "tsne.png"):
        assert (work / "runs" / "digits" / name).exists(), name
