"""The real image sets a distilled set is compared with (evaluate `--baseline`, a comma list), one entry each.

- `random`: IPC random real training images per class, drawn anew for every student seed (seed s ->
  its own subset, as DD-Ranking draws one per evaluation round); trained with the soft-label recipe and
  with hard labels: IOR = acc(distilled) − acc(random) pairs the two per seed.
- `full`: the whole real training set, hard labels: the full-data student of DD-Ranking's HLR. It does
  not depend on the synthetic set, the teacher or the seed list, so it is trained once (with --seed) per
  dataset, student architecture and recipe and kept in students/.
- `coreset`: the real training image nearest (teacher feature) to each barycenter atom of --out, each
  used once (wmdd/coreset.py; the start of recover --init nearest), without recover: what recover adds
  to the barycenter's choice. Trained like the distilled set (soft and hard labels).
- `hardest`: from each barycenter atom's cell (the class images the barycenter's transport plan gives
  it), the image with the smallest teacher margin (wmdd/coreset.py; the start of recover --init
  hardest), without recover. Trained like the distilled set (soft and hard labels).

A new baseline is one `Baseline(...)` entry: its name, whether each seed draws its own set, the label
kinds it trains with, and the function that builds its `subsets.ImageSet` from (info, args, ipc, seed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from wmdd import coreset, subsets
from wmdd.cli import fail


@dataclass(frozen=True)
class Baseline:
    name: str
    per_seed: bool            # a new image set for every student seed (else one set, one student)
    labels: tuple             # label kinds its students train with: "soft" (the recipe's), "hard"
    build: Callable           # (info, args, ipc, seed) -> subsets.ImageSet
    describe: str             # the images column of the tables


BASELINES = {
    "random": Baseline("random", True, ("soft", "hard"),
                       lambda info, args, ipc, seed: subsets.random_real_subset(info, args, ipc, seed),
                       "random real (new subset per seed)"),
    "full": Baseline("full", False, ("hard",),
                     lambda info, args, ipc, seed: subsets.full_training_set(info, args),
                     "full training set"),
    "coreset": Baseline("coreset", False, ("soft", "hard"),
                        lambda info, args, ipc, seed: _coreset(info, args, ipc),
                        "nearest-real coreset (atoms' images, no recover)"),
    "hardest": Baseline("hardest", False, ("soft", "hard"),
                        lambda info, args, ipc, seed: _coreset(info, args, ipc, "hardest"),
                        "hardest-in-cell coreset (no recover)"),
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
