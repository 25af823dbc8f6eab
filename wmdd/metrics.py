"""DD-Ranking's scores (arXiv 2505.13300; its evaluator, the `ddranking` package 0.2.0), one place each.

Every score compares students trained under one recipe and is computed *per evaluation round*, then
averaged: round s pairs the students of seed s (distilled set, a random real subset drawn anew for that
seed, the full-data student), as DD-Ranking's `compute_metrics` loops do. Accuracies are top-1 on the
real validation set, in percent.

- IOR (improvement over random) = acc(distilled, soft) − acc(random, soft)            [LabelRobustScoreSoft]
- HLR (hard-label recovery)     = acc(full data, hard) − acc(distilled, hard)          [LabelRobustScoreSoft]
- LRS (label-robust score)      = (e^α − e^−1) / (e − e^−1), α = λ·IOR − (1 − λ)·HLR, λ = 0.5
- ARS (augmentation-robust)     = (e^β − e^−1) / (e − e^−1), β = λ·W + (1 − λ)·W/O, λ = 0.5, where
  W   = acc(distilled, with aug)    − acc(random, with aug)                           [AugmentationRobustScore]
  W/O = acc(distilled, without aug) − acc(random, without aug)
  (ARS's students use the soft labels, DD-Ranking's default label_type='soft'; "with aug" is the soft
  recipe, "without aug" the same students on the unaugmented images.)

IOR, HLR, W and W/O enter α and β as fractions (accuracy / 100), so α, β ∈ [−1, 1] and LRS, ARS ∈ [0, 1];
they are reported in percent (× 100), as the DD-Ranking paper's tables print them. (0.2.0's code
subtracts the percent accuracies and exponentiates those directly; with fractions the score is the
paper's bounded one.) IOR, HLR, W, W/O are reported in percentage points.

DD-Ranking keeps each student's best validation accuracy over training (`best_acc1`); the WMDD paper
reports the last epoch's. Every score here exists in both variants, `best` and `last`.
Mean ± std over rounds: `std` is the sample std (ddof 1, this project's convention); DD-Ranking prints
np.std (ddof 0), kept as `std_pop`.
"""
from __future__ import annotations

import math
import statistics

LAMBDA = 0.5  # DD-Ranking's default lrs_lambda and ars_lambda

FORMULAS = {
    "IOR": "IOR = acc(distilled, soft) − acc(random, soft)  [pt]",
    "HLR": "HLR = acc(full data, hard) − acc(distilled, hard)  [pt]",
    "LRS": "LRS = 100 · (e^α − e^−1) / (e − e^−1), α = λ·IOR − (1 − λ)·HLR, IOR and HLR as fractions, λ = 0.5",
    "ARS": "ARS = 100 · (e^β − e^−1) / (e − e^−1), β = λ·W + (1 − λ)·W/O, W = acc(distilled, aug) − acc(random, aug), "
           "W/O the same without augmentation, as fractions, λ = 0.5",
    "IOR_hard": "IOR(hard) = acc(distilled, hard) − acc(random, hard)  [pt]",
}

VARIANTS = ("best", "last")


def _squash(x: float) -> float:
    """(e^x − e^−1) / (e − e^−1): maps x ∈ [−1, 1] onto [0, 1] (DD-Ranking's LRS / ARS transform)."""
    return (math.exp(x) - math.exp(-1.0)) / (math.e - math.exp(-1.0))


def improvement_over_random(acc_distilled_soft: float, acc_random_soft: float) -> float:
    return acc_distilled_soft - acc_random_soft


def hard_label_recovery(acc_full_hard: float, acc_distilled_hard: float) -> float:
    return acc_full_hard - acc_distilled_hard


def label_robust_score(ior_pt: float, hlr_pt: float, lam: float = LAMBDA) -> float:
    """LRS in percent from IOR and HLR in percentage points."""
    alpha = lam * ior_pt / 100.0 - (1.0 - lam) * hlr_pt / 100.0
    return 100.0 * _squash(alpha)


def augmentation_robust_score(with_aug_pt: float, without_aug_pt: float, lam: float = LAMBDA) -> float:
    """ARS in percent from the with- and without-augmentation improvements over random (points)."""
    beta = lam * with_aug_pt / 100.0 + (1.0 - lam) * without_aug_pt / 100.0
    return 100.0 * _squash(beta)


def summarize(values: list) -> dict:
    """Mean, sample std (ddof 1) and population std (ddof 0, DD-Ranking's np.std) of per-round values."""
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "std_pop": statistics.pstdev(values), "n": len(values)}


def accuracy(record: dict, variant: str) -> float:
    """A student's top-1: `last` (after the last epoch) or `best` (the best validated epoch)."""
    if variant == "last":
        return float(record["top1"])
    if variant == "best":
        return max(float(h["top1"]) for h in record["history"])
    raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")


def scores(acc: dict, full: list | None) -> dict:
    """Every score computable from per-round accuracies.

    acc: key -> list of per-round top-1 (keys "distilled/soft", "distilled/hard", "random/soft",
    "random/hard", "distilled/soft-noaug", "random/soft-noaug"; any may be missing). full: per-round
    acc(full data, hard), or None. Returns name -> {"per_seed": [...], mean, std, std_pop, n}."""
    out = {}

    def pair(name, f, a, b):
        if a is not None and b is not None:
            per = [f(x, y) for x, y in zip(a, b)]
            out[name] = {"per_seed": per, **summarize(per)}

    pair("IOR", improvement_over_random, acc.get("distilled/soft"), acc.get("random/soft"))
    pair("IOR_hard", improvement_over_random, acc.get("distilled/hard"), acc.get("random/hard"))
    pair("HLR", hard_label_recovery, full, acc.get("distilled/hard"))
    if "IOR" in out and "HLR" in out:
        pair("LRS", label_robust_score, out["IOR"]["per_seed"], out["HLR"]["per_seed"])
    pair("W", improvement_over_random, acc.get("distilled/soft"), acc.get("random/soft"))
    pair("W/O", improvement_over_random, acc.get("distilled/soft-noaug"), acc.get("random/soft-noaug"))
    if "W/O" in out:
        pair("ARS", augmentation_robust_score, out["W"]["per_seed"], out["W/O"]["per_seed"])
    else:
        out.pop("W", None)
    return out


# ---------------------------------------------------------------------------------------------
# evaluate's table (results.md)

SCORE_ROWS = (("IOR", "pt", "+.2f"), ("IOR_hard", "pt", "+.2f"), ("HLR", "pt", "+.2f"), ("LRS", "%", ".2f"),
              ("W", "pt", "+.2f"), ("W/O", "pt", "+.2f"), ("ARS", "%", ".2f"))


def _ms(s: dict, spec: str = ".2f") -> str:
    return f"{s['mean']:{spec}} ± {s['std']:.2f}"


def markdown(report: dict) -> str:
    """evaluate's results.md: every student per seed (last epoch, best in brackets), the full-data
    accuracy with where it comes from, then the scores per seed and mean ± std with their formulas."""
    c = report["config"]
    seeds = c["seeds_used"]
    head = "| " + " | ".join(f"seed {s}" for s in seeds) + " |"
    lines = [f"## evaluate: {c['dataset']} (resolution {c['resolution']}), IPC {c['ipc']}, student {c['student']}, "
             f"{c['seeds']} seed(s), {c['epochs']} epochs, batch {c['batch_size']}, T = {c['temperature']}, "
             f"loss {c['loss']}", "",
             "Top-1 (%) on the real validation set: per seed the last epoch's (the best validated epoch's in "
             "brackets); then mean ± std of each.", "",
             "| images | labels " + head + " last epoch | best epoch | top-5, last |",
             "|---|---|" + "---|" * len(seeds) + "---|---|---|"]
    for run in report["runs"]:
        by_seed = {r["seed"]: r for r in run["per_seed"]}
        cells = [f"{accuracy(by_seed[s], 'last'):.2f} ({accuracy(by_seed[s], 'best'):.2f})" if s in by_seed else "·"
                 for s in seeds]
        images = run["images"] + (f" (seed {run['per_seed'][0]['seed']}, once)" if run["key"].startswith("full/") else "")
        lines.append(f"| {images} | {run['label_desc']} | " + " | ".join(cells) +
                     f" | {_ms(run['top1_last'])} | {_ms(run['top1_best'])} | {_ms(run['top5'])} |")
    full = report.get("full_data") or {}
    if full.get("source") in ("user", "teacher"):
        v = full["top1"]["last"]
        lines.append(f"| full training set | {full['label']} | " + " | ".join(f"{v:.2f}" for _ in seeds) +
                     f" | {v:.2f} | {v:.2f} | – |")
    lines += ["", f"acc(full data, hard) in HLR: **{full['label']}**." if full.get("source") else
              "acc(full data, hard): none (no HLR / LRS; pass --baseline random,full or --full-data-acc X).", ""]
    rows = []
    for name, unit, spec in SCORE_ROWS:
        for variant, scores in (("last", report["metrics"]), ("best", report["metrics_best"])):
            if name in scores:
                s = scores[name]
                rows.append(f"| {name} ({unit}) | {variant} | " + " | ".join(f"{x:{spec}}" for x in s["per_seed"]) +
                            f" | {_ms(s, spec)} |")
    if rows:
        lines += ["Scores (DD-Ranking, arXiv 2505.13300), paired per seed: round s uses seed s's students and "
                  "seed s's random subset.", "",
                  "| score | epoch | " + head[2:] + " mean ± std |", "|---|---|" + "---|" * len(seeds) + "---|", *rows, ""]
        shown = {n for n, *_ in SCORE_ROWS if n in report["metrics"]}
        lines += [f"- {FORMULAS[n]}" for n in ("IOR", "IOR_hard", "HLR", "LRS", "ARS") if n in shown]
    lines.append("- mean ± sample std over seeds (DD-Ranking prints the population std: `std_pop` in results.json); "
                 "`last`: after the last epoch (the paper's number), `best`: the best validated epoch (DD-Ranking's)")
    return "\n".join(lines) + "\n"
