"""The documentation refers only to what is in the repository, and the README stays short.

- Every relative Markdown link of README.md, docs/*.md and bench/RESULTS.md points to a file or folder
  of the repository.
- Every path they name under one of the repository's folders (`docs/x.md`, `lab/paper.py`,
  `bench/RESULTS.md`, ...), every Markdown file they name, every module they run (`python -m lab.paper`)
  and every `wmdd.<module>` / `lab.<module>` they name exists. Outputs of a run (`results.md`, `PAPER.md`,
  `runs/...`) are not paths of the repository and are not checked.
- README.md is at most 150 lines.
- No file of the repository refers to a document outside it (the design notes and build notes that
  live beside the checkout, or anything in the shared folder beside it).
"""
from __future__ import annotations

import glob
import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md"))) \
    + ["bench/RESULTS.md"]
# Folders of the repository: a path that starts with one of them must exist.
REPO_DIRS = ("wmdd", "lab", "bench", "tests", "docs", "csrc", ".ci")
# Markdown files that runs write (not documents of the repository).
OUTPUT_MD = {"results.md", "PAPER.md", "COMMANDS.md", "REPORT.md"}
PATH_CHARS = r"[\w.\-/]"


def read(doc: str) -> str:
    return open(os.path.join(REPO, doc), encoding="utf-8").read()


def exists(path: str) -> bool:
    return os.path.exists(os.path.join(REPO, path))


def inside_repo(doc: str, target: str) -> str | None:
    """target relative to doc's folder, as a path relative to the repository root; None when outside."""
    full = os.path.normpath(os.path.join(REPO, os.path.dirname(doc), target))
    rel = os.path.relpath(full, REPO)
    return None if rel.startswith("..") else rel


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_exist(doc):
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", read(doc)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http(s), mailto; an anchor in the same page
        path = inside_repo(doc, target.split("#")[0])
        if path is None or not exists(path):
            bad.append(target)
    assert not bad, f"{doc} links to what the repository does not hold: {bad}"


def named_paths(text: str) -> list:
    """Repository paths a text names: any token (in backticks or not) that starts with a repository folder,
    and any Markdown file named in backticks. Tokens holding a placeholder or a glob (<class>, *) are left
    out, and so are outputs of a run."""
    found = []
    for m in re.finditer(rf"(?<![\w./\-]){PATH_CHARS}*{PATH_CHARS}", text):
        token = m.group(0).rstrip(".")
        nxt = text[m.end():m.end() + 1]
        if nxt in "*<{" and nxt:
            continue
        first = token.split("/")[0]
        if "/" in token and first in REPO_DIRS:
            found.append(token)
    for span in re.findall(r"`([^`\n]+)`", text):
        for token in span.split():
            token = token.strip(",;:()")
            if token.endswith(".md") and "/" not in token and token not in OUTPUT_MD and not re.search(r"[<>*]", token):
                found.append(token)
    return found


@pytest.mark.parametrize("doc", DOCS)
def test_named_paths_exist(doc):
    text = read(doc)
    bad = []
    for token in named_paths(text):
        if "/" in token:
            ok = exists(token)
        else:  # a Markdown file named by its name alone: at the root, beside the page, or in docs/
            ok = any(exists(os.path.join(d, token)) for d in ("", os.path.dirname(doc), "docs"))
        if not ok:
            bad.append(token)
    assert not bad, f"{doc} names files the repository does not hold: {sorted(set(bad))}"


def module_exists(name: str) -> bool:
    path = os.path.join(REPO, *name.split("."))
    return os.path.exists(path + ".py") or os.path.exists(os.path.join(path, "__init__.py")) \
        or bool(glob.glob(path + ".*.so")) or bool(glob.glob(path + "*.so"))


@pytest.mark.parametrize("doc", DOCS)
def test_named_modules_exist(doc):
    text = read(doc)
    names = set(re.findall(r"python -m ([\w.]+)", text))
    names |= {m.group(0) for m in re.finditer(r"(?<![\w./\-])(?:wmdd|lab)\.[A-Za-z_]\w*", text)}
    bad = []
    for name in sorted(names):
        if name.split(".")[0] not in ("wmdd", "lab"):
            continue  # other packages' modules (pytest, pip, ...)
        if name == "wmdd._C":
            continue  # the compiled extension: a build output
        if not module_exists(name):
            bad.append(name)
    assert not bad, f"{doc} names modules that do not exist: {bad}"


def test_readme_fits_on_two_screens():
    lines = read("README.md").count("\n")
    assert lines <= 150, f"README.md has {lines} lines (at most 150: the rest belongs in docs/)"


def test_readme_links_every_docs_page():
    readme = read("README.md")
    pages = [os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md"))]
    missing = [p for p in pages if f"]({p})" not in readme]
    assert not missing, f"README.md does not link {missing}"
    index = read("docs/README.md")
    missing = [p for p in pages if os.path.basename(p) != "README.md" and f"]({os.path.basename(p)})" not in index]
    assert not missing, f"docs/README.md does not link {missing}"


def repository_files() -> list:
    """The files git tracks, plus untracked ones it does not ignore."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return sorted({f for f in out.decode().split("\0") if f and os.path.isfile(os.path.join(REPO, f))})


# Documents that live beside the checkout, not in it (spelt in pieces so this file does not name them).
OUTSIDE = re.compile(r"\b" + "DES" + r"IGN\b|" + "BUILD" + r"_NOTES|\.\./" + "shared/")


def test_no_file_refers_to_a_document_outside_the_repository():
    bad = []
    for path in repository_files():
        try:
            text = open(os.path.join(REPO, path), encoding="utf-8").read()
        except (UnicodeDecodeError, OSError):
            continue  # binary files
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                bad.append(f"{path}:{number}: {line.strip()[:100]}")
    assert not bad, "references to documents outside the repository:\n" + "\n".join(bad)
