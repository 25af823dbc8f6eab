"""The real image sets a distilled set is compared with (evaluate `--baseline`, a comma list), one entry each.

More: docs/core.md, "wmdd/baselines.py".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from wmdd import classic, coreset, subsets
from wmdd.cli import fail


@dataclass(frozen=True)
class Baseline:
    name: str
    per_seed: bool            # a new image set for every student seed (else one set, one student)
    labels: tuple             # label kinds its students train with: "soft" (the recipe's), "hard"
    build: Callable           # (info, args, ipc, seed) -> subsets.ImageSet
    describe: str             # the images column of the tables
    help: str                 # its line in --baseline's help


BASELINES = {
    "random": Baseline("random", True, ("soft", "hard"),
                       lambda info, args, ipc, seed: subsets.random_real_subset(info, args, ipc, seed),
                       "random real (new subset per seed)",
                       "IPC random real images per class, a new subset per seed"),
    "full": Baseline("full", False, ("hard",),
                     lambda info, args, ipc, seed: subsets.full_training_set(info, args),
                     "full training set", "the full training set, hard labels: HLR's reference"),
    "coreset": Baseline("coreset", False, ("soft", "hard"),
                        lambda info, args, ipc, seed: _coreset(info, args, ipc),
                        "nearest-real coreset (atoms' images, no recover)",
                        "the real image nearest each barycenter atom, without recover"),
    "hardest": Baseline("hardest", False, ("soft", "hard"),
                        lambda info, args, ipc, seed: _coreset(info, args, ipc, "hardest"),
                        "hardest-in-cell coreset (no recover)",
                        "the image of each atom's cell with the smallest teacher margin, without recover"),
    # DC's coreset baselines (Zhao et al. 2021, Sec. 4): per class on the features of a network trained on the
    # whole training set; here the project teacher's penultimate features (features.pt, or computed)
    "herding": Baseline("herding", False, ("soft", "hard"),
                        lambda info, args, ipc, seed: classic.coreset_baseline(info, args, ipc, "herding"),
                        "herding coreset (teacher features)",
                        "per class, herding on the teacher's features as DC's baseline: each pick brings the "
                        "running mean of the picked features closest to the class mean"),
    "kcenter": Baseline("kcenter", False, ("soft", "hard"),
                        lambda info, args, ipc, seed: classic.coreset_baseline(info, args, ipc, "kcenter"),
                        "k-center coreset (teacher features)",
                        "per class, greedy k-center on the teacher's features as DC's baseline: the point nearest "
                        "the class mean, then each time the point farthest from the chosen ones"),
}


def _coreset(info, args, ipc: int, pick: str = "nearest"):
    return coreset.baseline_subset(info, args, ipc, pick)


def parse(text: str) -> list:
    """`--baseline` ('random,full', 'random', 'none') -> the Baseline entries, in the given order."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in BASELINES]
    if unknown or not names:
        fail(f"--baseline {text!r}: unknown baseline(s) {', '.join(unknown) or '(empty)'}; pass a comma list "
             f"of {', '.join(BASELINES)} (e.g. --baseline random,full), or --baseline none.")
    return [BASELINES[n] for n in dict.fromkeys(names)]


def help_text() -> str:
    """`--baseline`'s help: every registered baseline with its line, generated from BASELINES."""
    listed = ", ".join(f"{b.name} ({b.help})" for b in BASELINES.values())
    return f"comma list of real-image baselines trained with the same recipe: {listed}; or none"


def full_data_source(args, bases: dict):
    """Where HLR's acc(full data, hard) comes from: 'user' (--full-data-acc), 'teacher' (asked for),
    'student' (the full-data student, --baseline full), or None (no HLR, no LRS)."""
    if args.full_data_acc is not None:
        return "user"
    if args.hlr_reference == "teacher":
        return "teacher"
    return "student" if "full" in bases else None
