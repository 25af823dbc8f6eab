"""Distilled sets against random real images (DD-Ranking's question): every row through the stage scripts.

    python bench/bench_vs_random.py --dataset digits --ipc 1,10 --seeds 3 --iterations 200 --epochs 60 \\
        --work runs/vs_random/digits --report runs/vs_random/digits.md
    python bench/bench_vs_random.py --dataset folder --data-dir /data/photos32 --resolution 32 \\
        --squeeze-args "--arch convnet --epochs 3 --lr 0.05 --batch-size 64 --weight-decay 5e-4" \\
        --student convnet --ipc 1,10 --seeds 3 --iterations 100 --epochs 40 --work runs/vs_random/photos

For each IPC: squeeze.py once (reused when --work already holds teacher.pt), barycenter.py, then for every
recover row recover.py with the row's flags (+ the column's --iterations) and evaluate.py (--labels online:
the teacher's soft labels on the fly, and hard labels: both regimes from one run), every one a
subprocess with the same student recipe (--epochs, the preset's optimiser, batch, augmentation). The
baselines come from evaluate's own `--baseline random,coreset` on the first recover row (random: IPC real
images per class, a new subset per seed; coreset: the nearest real image of every barycenter atom,
wmdd/coreset.py, without recover). Rows (--rows, comma list; NAME=FLAGS adds a row of your own):

    random     IPC random real images per class (new per seed)      baseline
    herding    DC's herding coreset on the teacher's features       baseline (evaluate --baseline herding)
    kcenter    DC's greedy k-center coreset on the same features    baseline (evaluate --baseline kcenter)
    coreset    the atoms' nearest real images, no recover           baseline
    hardest    the hardest image of each atom's cell, no recover    baseline (evaluate --baseline hardest)
    full       the whole training set, hard labels (evaluate's      baseline
               `--baseline full`, one student per seed, shared by every IPC under <work>/full): the
               ceiling of the hard-label column; its IOR is the headroom any subset has over random
    sre2l      recover --sre2l (SRe2L's recover), noise start
    wmdd       recover with the paper's defaults (noise start)
    nearest    recover --init nearest
    best       recover --init nearest --iterations 20 --lr 0.02 --crop-scale 0.5 1 (a few small steps from
               the nearest real images; with --barycenter-args "--restarts 8" the README's best configuration
               at IPC 1 and 10)
    hardest0   recover --init hardest --iterations 0 (the hardest image of each atom's cell, no step: the
               `hardest` baseline's images as a synthetic.pt; the README's best configuration at IPC 50,
               and with hard labels from IPC 25)

The tables in bench/RESULTS.md add rows NAME=FLAGS for the other iteration counts and crop scales tried
(hbest=--init hardest --iterations 20 --lr 0.02 --crop-scale 0.5 1; hgentle=... --lr 0.01 --lambda-bn 1; near50=--init nearest --iterations 50, near50c=... --crop-scale 0.5 1, near20c, near10c; l005, l01, l02 = best,
l01x50: 20 or 50 iterations at --lr 0.005-0.02; lbn01, lbn1, lbn100, bnnone, ce: best with --lambda-bn 0.1,
1 or 100, --bn none, --r-ce 1; lbn1l04, lbn1i50: lbn1 at --lr 0.04 or 50 iterations).

--redistill: every seed s makes its own distilled set (barycenter.py and recover.py with --seed s, under
<work>/ipc<k>/seed<s>/) and trains the student of seed s on it, so a distilled row's spread over seeds
holds the randomness of making the set (the k-means++ start of the barycenter, recover's crops), as the
random row's holds the draw of the subset. Without it (the default) a row is one set from --seed and only
the students vary. The random row draws the same subset for seed s either way and its hard-label students
are the same; its soft-label students differ, since evaluate's crop replay plan follows --seed (one plan
for all students of a run, like relabel's stored labels). The teacher is one for all seeds. A second seed
set: --seed 100 (not --eval-args "--seed 100", which leaves the sets as they are).

Writes --report (markdown: top-1 mean +- std over seeds, IOR = acc(row) - acc(random) paired by seed,
soft and hard labels, per IPC) and, beside it, the same numbers as .json. A rerun with the same --work
reuses every finished stage output (each stage's own resume) and every finished student.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINES = ("random", "herding", "kcenter", "coreset", "hardest", "full")
ROWS = {  # name -> recover flags (the column's --iterations is added unless the row sets its own)
    "sre2l": ["--sre2l"],
    "wmdd": [],
    "nearest": ["--init", "nearest"],
    # the README's best configuration (bench/RESULTS.md, "Against random real images")
    "best": ["--init", "nearest", "--iterations", "20", "--lr", "0.02", "--crop-scale", "0.5", "1"],
    "hardest0": ["--init", "hardest", "--iterations", "0"],
}
SHARED = ("teacher.pt", "bn_stats.pt", "features.pt", "barycenters.pt")


def parse_rows(text: str) -> dict:
    rows = {}
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        if "=" in item:
            name, flags = item.split("=", 1)
            rows[name.strip()] = shlex.split(flags)
        elif item in BASELINES:
            rows[item] = None
        elif item in ROWS:
            rows[item] = ROWS[item]
        else:
            raise SystemExit(f"--rows: unknown row {item!r}; use {', '.join(BASELINES + tuple(ROWS))} or NAME=FLAGS")
    return rows


def stage(script: str, argv: list, log_path: str) -> None:
    """Run one stage script as a subprocess, its output to log_path; stop with its tail on failure."""
    cmd = [sys.executable, os.path.join(REPO, script), *map(str, argv)]
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "TQDM_DISABLE": "1"})
        log.write(f"# exit {proc.returncode} after {time.time() - t0:.1f}s\n")
    if proc.returncode:
        with open(log_path) as fh:
            tail = fh.read()[-3000:]
        raise SystemExit(f"{script} failed (exit {proc.returncode}); see {log_path}:\n{tail}")


def link_shared(src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for name in SHARED:
        target, link = os.path.join(src, name), os.path.join(dst, name)
        if os.path.exists(target) and not os.path.lexists(link):
            os.symlink(os.path.abspath(target), link)


def per_seed(results_json: str) -> tuple:
    """({run key ('distilled/soft', 'random/hard', 'full/hard', ...): [top-1 per seed]}, the teacher's val
    top-1) of one evaluate run."""
    with open(results_json) as fh:
        report = json.load(fh)
    return {r["key"]: [x["top1"] for x in r["per_seed"]] for r in report["runs"]}, report.get("teacher_val_top1")


def mean_std(values: list) -> tuple:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values) -> str:
    if not values:
        return "–"
    m, s = mean_std(values)
    return f"{m:.1f} ± {s:.1f}"


def fmt_ior(values, base) -> str:
    if not values or not base:
        return "–"
    m, s = mean_std([a - b for a, b in zip(values, base)])
    mark = " ✓" if m - s > 0 else ""
    return f"{m:+.1f} ± {s:.1f}{mark}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--ipc", default="1,10", help="comma list of IPCs (one table column block each)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, required=True, help="recover iterations of every row")
    p.add_argument("--epochs", type=int, required=True, help="student epochs of every row")
    p.add_argument("--student", default=None, help="evaluate --student (default: the preset's)")
    p.add_argument("--rows", default="random,coreset,sre2l,wmdd,nearest,best")
    p.add_argument("--baselines", default="random,coreset,hardest,full",
                   help="evaluate --baseline list run beside the first recover row (rows named like them)")
    p.add_argument("--squeeze-args", default="", help="extra squeeze.py flags (the teacher recipe)")
    p.add_argument("--barycenter-args", default="", help="extra barycenter.py flags (every column's barycenters, "
                   "so the coreset and every --init nearest row follow them)")
    p.add_argument("--eval-args", default="", help="extra evaluate.py flags for every row")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate --eval-every (default: --epochs, "
                   "one validation at the end)")
    p.add_argument("--redistill", action="store_true",
                   help="a new distilled set per seed: barycenter.py and recover.py run with --seed s and the "
                        "student of seed s trains on that set (default: one set per row, --seeds students on it)")
    p.add_argument("--tag", default=None, help="evaluate each row under <row dir>/<tag> (its own results.json) "
                   "on the row's synthetic.pt: a second recipe (e.g. --eval-args '--recipe dc') beside the first "
                   "without recomputing the distilled sets")
    p.add_argument("--work", required=True, help="run directory root (stage outputs, logs)")
    p.add_argument("--report", default=None, help="markdown table (default <work>/vs_random.md)")
    a = p.parse_args()
    rows = parse_rows(a.rows)
    recover_rows = [n for n, f in rows.items() if f is not None]
    if not recover_rows:
        raise SystemExit("--rows needs at least one recover row: the baselines are evaluated beside it")
    common = ["--dataset", a.dataset, "--device", "cpu", "--seed", a.seed]
    common += ["--data-dir", a.data_dir] if a.data_dir else []
    common += ["--resolution", a.resolution] if a.resolution else []
    os.makedirs(a.work, exist_ok=True)
    log = os.path.join(a.work, "stages.log")
    t_start = time.time()
    base = os.path.join(a.work, "teacher")
    if not os.path.isfile(os.path.join(base, "bn_stats.pt")):
        stage("squeeze.py", common + ["--out", base] + shlex.split(a.squeeze_args), log)
    with open(os.path.join(base, "teacher.pt"), "rb"):
        pass
    results, walls, teacher_top1 = {}, {}, None
    host_baselines = [b for b in a.baselines.split(",") if b in rows]
    for ipc in [int(x) for x in a.ipc.split(",")]:
        # a column is named by the barycenter flags too: other barycenters never reuse another's recover rows
        col = os.path.join(a.work, f"ipc{ipc}" + (f"-b{digest(a.barycenter_args)}" if a.barycenter_args else ""))
        evaluate = common + ["--ipc", ipc, "--labels", "online", "--epochs", a.epochs,
                             "--eval-every", a.eval_every or a.epochs, "--full-data-dir", os.path.join(a.work, "full")]
        evaluate += ["--student", a.student] if a.student else []
        evaluate += shlex.split(a.eval_args)
        if not a.redistill:  # one distilled set per row, a.seeds students on it
            teacher_top1 = distill_column(a, rows, recover_rows, host_baselines, ipc, col, common,
                                          evaluate + ["--seeds", a.seeds], log, results, walls)
            continue
        for s in range(a.seed, a.seed + a.seeds):  # a new distilled set per seed, one student on it
            got, took = {}, {}
            teacher_top1 = distill_column(a, rows, recover_rows, host_baselines, ipc, os.path.join(col, f"seed{s}"),
                                          with_seed(common, s), with_seed(evaluate, s) + ["--seeds", 1], log, got, took)
            for key, r in got.items():
                acc = results.setdefault(key, {"soft": [], "hard": []})
                for regime in acc:
                    acc[regime] += r[regime] or []
            for key, t in took.items():
                walls[key] = walls.get(key, 0.0) + t
    write_report(a, rows, results, walls, teacher_top1, time.time() - t_start)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def with_seed(argv: list, seed: int) -> list:
    """argv with its (first) --seed value replaced."""
    i = argv.index("--seed")
    return [*argv[:i + 1], seed, *argv[i + 2:]]


def distill_column(a, rows, recover_rows, host_baselines, ipc, col, common, evaluate, log, results, walls):
    """One IPC column under `col`: barycenter.py, then recover.py + evaluate.py for every recover row (the
    baselines evaluated beside the first one); per-seed top-1 lists into results[(ipc, name)]. Returns the
    teacher's val top-1 (evaluate's measurement)."""
    base = os.path.join(a.work, "teacher")
    bary = os.path.join(col, "barycenter")
    link_shared(base, bary)
    if not os.path.isfile(os.path.join(bary, "barycenters.pt")):
        stage("barycenter.py", common + ["--ipc", ipc, "--out", bary] + shlex.split(a.barycenter_args), log)
    for k, name in enumerate(recover_rows):
        flags = rows[name] + ([] if "--iterations" in rows[name] else ["--iterations", a.iterations])
        # the directory is named by the recover flags: a changed row never reuses another's synthetic.pt
        out = os.path.join(col, f"{name}-{digest(shlex.join(map(str, flags)))}")
        link_shared(bary, out)
        t0 = time.time()
        if not os.path.isfile(os.path.join(out, "synthetic.pt")):
            stage("recover.py", common + ["--ipc", ipc, "--out", out, "--no-png"] + flags, log)
        baseline = ",".join(host_baselines) if k == 0 and host_baselines else "none"
        eval_out = os.path.join(out, a.tag) if a.tag else out
        link_shared(out, eval_out)
        stage("evaluate.py", evaluate + ["--out", eval_out, "--baseline", baseline,
                                         "--synthetic", os.path.join(out, "synthetic.pt")], log)
        walls[(ipc, name)] = time.time() - t0
        got, teacher_top1 = per_seed(os.path.join(eval_out, "results.json"))
        results[(ipc, name)] = {"soft": got.get("distilled/soft"), "hard": got.get("distilled/hard")}
        if k == 0:
            for b in host_baselines:
                results[(ipc, b)] = {"soft": got.get(f"{b}/soft"), "hard": got.get(f"{b}/hard")}
    return teacher_top1


def write_report(a, rows, results, walls, teacher_top1, total_s: float) -> None:
    report = a.report or os.path.join(a.work, "vs_random.md")
    ipcs = sorted({ipc for ipc, _ in results})
    lines = [f"{a.dataset}{' ' + a.data_dir if a.data_dir else ''} (resolution {a.resolution or 'preset'}), "
             f"{a.seeds} seeds, recover {a.iterations} iterations, student {a.student or 'preset'} "
             f"{a.epochs} epochs, labels: soft = teacher online (KL), hard = class labels; distilled sets: "
             f"{'a new one per seed (--redistill)' if a.redistill else f'one per row (seed {a.seed})'}; "
             f"{platform.node()}, {time.strftime('%Y-%m-%d')}, {total_s / 60:.0f} min in all",
             "", f"teacher val top-1 {teacher_top1:.2f}% (what the soft-label students learn from)"
             if teacher_top1 is not None else "teacher val top-1 not measured", ""]
    for ipc in ipcs:
        rnd = results.get((ipc, "random"), {})
        lines += [f"IPC {ipc}", "",
                  "| images | soft top-1 | IOR soft | hard top-1 | IOR hard | recover + evaluate |",
                  "|---|---|---|---|---|---|"]
        for name in rows:
            r = results.get((ipc, name))
            if r is None:
                continue
            wall = f"{walls[(ipc, name)] / 60:.1f} min" if (ipc, name) in walls else "(with the first row)"
            ior_s = fmt_ior(r["soft"], rnd.get("soft")) if name != "random" else "0"
            ior_h = fmt_ior(r["hard"], rnd.get("hard")) if name != "random" else "0"
            flags = " ".join(rows[name]) if rows[name] else ("paper defaults" if rows[name] == [] else "baseline")
            lines.append(f"| {name} (`{flags}`) | {fmt(r['soft'])} | {ior_s} | {fmt(r['hard'])} | {ior_h} | {wall} |")
        lines.append("")
    lines.append("mean ± sample std over seeds; IOR = acc(row) − acc(random real), paired by seed; ✓: mean − std > 0"
                 + ("; full: the whole training set with hard labels, its IOR the headroom over random"
                    if "full" in rows else ""))
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(report)), exist_ok=True)
    with open(report, "w") as fh:
        fh.write(text)
    with open(os.path.splitext(report)[0] + ".json", "w") as fh:
        json.dump({"args": vars(a), "teacher_val_top1": teacher_top1,
                   "results": {f"ipc{i}/{n}": v for (i, n), v in results.items()}}, fh, indent=1)
    print(text)


if __name__ == "__main__":
    main()
