"""DD-Ranking's scores (arXiv 2505.13300): its formulas under WMDD's evaluation recipe, one place each,
and the LRS as its evaluator (the `ddranking` package 0.2.0) computes it, for evaluate --ddranking.

More: docs/core.md, "wmdd/metrics.py".
"""
from __future__ import annotations

import math
import statistics
import time

from wmdd import artifacts, students

LAMBDA = 0.5  # DD-Ranking's default lrs_lambda and ars_lambda

FORMULAS = {
    "IOR": "IOR = acc(distilled, soft) − acc(random, soft)  [pt]",
    "HLR": "HLR = acc(full data, hard) − acc(distilled, hard)  [pt]",
    "LRS": "LRS = 100 · (e^α − e^−1) / (e − e^−1), α = λ·IOR − (1 − λ)·HLR, IOR and HLR as fractions, λ = 0.5",
    "ARS": "ARS = 100 · (e^β − e^−1) / (e − e^−1), β = λ·W + (1 − λ)·W/O, W = acc(distilled, aug) − acc(random, aug), "
           "W/O the same without augmentation, as fractions, λ = 0.5",
    "IOR_hard": "IOR(hard) = acc(distilled, hard) − acc(random, hard)  [pt]",
    "LRS_ddr": "LRS_ddr = (e^α − e^−1) / (e − e^−1), α = λ·IOR − (1 − λ)·HLR with IOR and HLR in percentage "
               "points, not × 100: DD-Ranking 0.2.0's code (--ddranking); unbounded above, → −0.157 as α falls",
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


def label_robust_score_ddranking(ior_pt: float, hlr_pt: float, lam: float = LAMBDA) -> float:
    """LRS as DD-Ranking 0.2.0's evaluator computes it: α from IOR and HLR in percentage points, the
    transform not scaled (its `lrs`); equal to label_robust_score / 100 only where IOR = HLR = 0."""
    return _squash(lam * ior_pt - (1.0 - lam) * hlr_pt)


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


def scores(acc: dict, full: list | None, ddranking: bool = False) -> dict:
    """Every score computable from per-round accuracies.

    acc: key -> list of per-round top-1 (keys "distilled/soft", "distilled/hard", "random/soft",
    "random/hard", "distilled/soft-noaug", "random/soft-noaug"; any may be missing). full: per-round
    acc(full data, hard), or None. ddranking: also LRS_ddr (0.2.0's scale). Returns name -> {"per_seed": [...],
    mean, std, std_pop, n}."""
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
        if ddranking:
            pair("LRS_ddr", label_robust_score_ddranking, out["IOR"]["per_seed"], out["HLR"]["per_seed"])
    pair("W", improvement_over_random, acc.get("distilled/soft"), acc.get("random/soft"))
    pair("W/O", improvement_over_random, acc.get("distilled/soft-noaug"), acc.get("random/soft-noaug"))
    if "W/O" in out:
        pair("ARS", augmentation_robust_score, out["W"]["per_seed"], out["W/O"]["per_seed"])
    else:
        out.pop("W", None)
    return out


# ---------------------------------------------------------------------------------------------
# evaluate's results (results.json)


def collect_runs(jobs: list, records: dict) -> list:
    """One entry per configuration (students.Job key), its students' records in seed order and the
    mean ± std of their top-1 (both variants) and top-5."""
    runs = []
    for job in jobs:
        if not runs or runs[-1]["key"] != job.key:
            runs.append({"key": job.key, "images": job.images_desc, "label_desc": job.label_desc, "per_seed": []})
        runs[-1]["per_seed"].append(records[(job.key, job.seed)])
    for r in runs:
        for v in VARIANTS:
            r[f"top1_{v}"] = summarize([accuracy(x, v) for x in r["per_seed"]])
        r["top1"], r["top5"] = r["top1_last"], summarize([x["top5"] for x in r["per_seed"]])
    return runs


def teacher_arch(teacher_art):
    return (teacher_art or {}).get("model_args", {}).get("arch") if teacher_art else None


def full_data(args, source, teacher_top1, teacher_art, records: dict) -> dict:
    """acc(full data, hard) of HLR, both variants, with where it comes from (baselines.full_data_source)."""
    full = {"source": source, "student": args.student}
    if source == "user":
        full.update(top1={"last": args.full_data_acc, "best": args.full_data_acc},
                    label=f"user-given (--full-data-acc {args.full_data_acc:g})")
    elif source == "teacher":
        full.update(top1={"last": teacher_top1, "best": teacher_top1},
                    label=f"STAND-IN: the teacher's val top-1 ({teacher_arch(teacher_art)}), not a {args.student} "
                          "student (--hlr-reference teacher)")
    elif source == "student":
        rec = records[("full/hard", args.seed)]
        full.update(top1={v: accuracy(rec, v) for v in VARIANTS},
                    label=f"a {args.student} student trained on the full training set, hard labels, same recipe")
    return full


def results(args, config: dict, jobs: list, records: dict, full_source, settings, teacher_top1, teacher_art,
            world_size: int, upstream: dict, t0: float) -> dict:
    """evaluate's results.json: `config` (the flags and what the run resolved), every configuration's
    students, acc(full data, hard), the scores of both variants with their formulas, upstream files."""
    runs = collect_runs(jobs, records)
    full = full_data(args, full_source, teacher_top1, teacher_art, records)
    seeds = config["seeds_used"]
    scores_by = {}
    for v in VARIANTS:
        acc = {r["key"]: [accuracy(x, v) for x in r["per_seed"]] for r in runs if not students.is_full_data(r["key"])}
        scores_by[v] = scores(acc, None if full_source is None else [full["top1"][v]] * len(seeds),
                              getattr(args, "ddranking", False))
    report = {
        "config": config,
        "label_settings": settings, "teacher_val_top1": teacher_top1, "teacher_arch": teacher_arch(teacher_art),
        "full_data": full, "random_subset_indices": {str(j.seed): j.iset.indices for j in jobs if j.key in ("random/hard", "random/soft")},
        "world_size": world_size, "runs": runs,
        "metrics": scores_by["last"], "metrics_best": scores_by["best"], "formulas": FORMULAS,
        "upstream": upstream,
        "versions": {k: str(v) for k, v in artifacts.library_versions().items()},
        "wall_time_s": round(time.time() - t0, 1),
    }
    report["config"]["seeds"] = args.seeds
    return report


# ---------------------------------------------------------------------------------------------
# evaluate's table (results.md)

SCORE_ROWS = (("IOR", "pt", "+.2f"), ("IOR_hard", "pt", "+.2f"), ("HLR", "pt", "+.2f"), ("LRS", "%", ".2f"),
              ("LRS_ddr", "0.2.0's scale", ".4f"), ("W", "pt", "+.2f"), ("W/O", "pt", "+.2f"), ("ARS", "%", ".2f"))


def _ms(s: dict, spec: str = ".2f") -> str:
    return f"{s['mean']:{spec}} ± {s['std']:.2f}"


def markdown(report: dict) -> str:
    """evaluate's results.md: every student per seed (last epoch, best in brackets), the full-data
    accuracy with where it comes from, then the scores per seed and mean ± std with their formulas."""
    c = report["config"]
    seeds = c["seeds_used"]
    head = "| " + " | ".join(f"seed {s}" for s in seeds) + " |"
    recipe = f"T = {c['temperature']}, loss {c['loss']}" if c.get("recipe", "kd") == "kd" else \
        f"recipe {c['recipe']} (hard labels, SGD lr {c['lr']:g}, weight decay {c['weight_decay']:g})"
    lines = [f"## evaluate: {c['dataset']} (resolution {c['resolution']}), IPC {c['ipc']}, student {c['student']}, "
             f"{c['seeds']} seed(s), {c['epochs']} epochs, batch {c['batch_size']}, {recipe}", "",
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
    grid = [f"{r['key']} seed {x['seed']}: {x['lr']:g}" for r in report["runs"] for x in r["per_seed"] if "lr" in x]
    if c.get("ddranking"):
        lines += ["", "--ddranking (DD-Ranking 0.2.0's evaluator): validation every 20 epochs and after the last; "
                  "the best epoch's column is its number. Rows trained at each lr of its grid, the lr kept: "
                  + ("; ".join(grid) or "none") + "."]
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
        lines += ["Scores: DD-Ranking's formulas (arXiv 2505.13300) under " +
                  ("its 0.2.0 evaluator's lr grid and validations" if c.get("ddranking") else "WMDD's evaluation recipe")
                  + ", paired per seed: round s uses seed s's students and seed s's random subset.", "",
                  "| score | epoch | " + head[2:] + " mean ± std |", "|---|---|" + "---|" * len(seeds) + "---|", *rows, ""]
        shown = {n for n, *_ in SCORE_ROWS if n in report["metrics"]}
        lines += [f"- {FORMULAS[n]}" for n in ("IOR", "IOR_hard", "HLR", "LRS", "LRS_ddr", "ARS") if n in shown]
    lines.append("- mean ± sample std over seeds (DD-Ranking prints the population std: `std_pop` in results.json); "
                 "`last`: after the last epoch (the paper's number), `best`: the best validated epoch (DD-Ranking's)")
    return "\n".join(lines) + "\n"
