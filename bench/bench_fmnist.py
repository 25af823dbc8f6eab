"""Fashion-MNIST: the protocol check. Random real subsets under the classic recipe (evaluate --recipe dc|dsa)
must reproduce the DC paper's Table 1 "Random" row before any other number of this dataset is trusted.

    python bench/bench_fmnist.py --ipc 1 10 --students 5 --work runs/fmnist_check          # DC, 300 epochs
    python bench/bench_fmnist.py --ipc 50 --students 3 --work runs/fmnist_check
    python bench/bench_fmnist.py --ipc 1 10 --students 5 --epochs 600 --work runs/fmnist_check  # convergence
    python bench/bench_fmnist.py --report --work runs/fmnist_check

The path is evaluate's own for its `random/hard` students under --recipe dc: the `fashion_mnist` preset
(data.resolve / data.build_dataset: the four IDX files, DC's normalisation 0.2861 / 0.3530, the 10,000
test images as the validation split), subsets.random_real_subset (student s: random subset s), and
classic.train on the ConvNet-IN (model init from seed s), top-1 on the test set after the last epoch.
Each student is one JSON file under --work, written when it finishes; a rerun skips finished ones.
Run with one thread per process (--threads 1, the default) and at most two processes at once.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch.utils.data import DataLoader  # noqa: E402

from wmdd import artifacts, classic, data, engine, subsets  # noqa: E402

# DC (Zhao et al., ICLR 2021) Table 1, Fashion-MNIST, "Random" (mean, std) per IPC; whole dataset 93.5 +- 0.1
PUBLISHED = {1: (51.4, 3.8), 10: (73.8, 0.7), 50: (82.5, 0.7)}
WHOLE = (93.5, 0.1)
DEFAULT_STUDENTS = {1: 5, 10: 5, 50: 3}


def tolerance(ipc: int) -> float:
    """The check passes within two published standard deviations or 1.5 points, whichever is larger."""
    return max(2 * PUBLISHED[ipc][1], 1.5)


def student_file(work: str, recipe: str, epochs: int, ipc: int, seed: int) -> str:
    return os.path.join(work, f"{recipe}-e{epochs}-ipc{ipc}-seed{seed}.json")


def load_data(args):
    ns = argparse.Namespace(dataset="fashion_mnist", data_dir=args.data_dir, resolution=None, download=False,
                            protocol=None, workers=0)
    info = data.resolve(ns)
    val = engine.in_memory(data.build_dataset(info, ns, "val"))
    return info, ns, DataLoader(val, batch_size=500)


def train_one(args, info, ns, val_loader, ipc: int, seed: int) -> dict:
    iset = subsets.random_real_subset(info, ns, ipc, seed)
    base = classic.RECIPES[args.recipe]
    recipe = classic.Recipe(base.name, args.epochs or base.epochs, base.augment)
    torch.manual_seed(seed)
    model = classic.build_student("convnet_in", info, iset.images.shape[1], iset.images.shape[-1])
    rec = classic.train(model, iset.images, iset.labels, recipe, seed, info.mean, info.std, torch.device("cpu"),
                        validate=lambda m: engine.validate(m, val_loader, torch.device("cpu"), progress=False))
    rec.update(ipc=ipc, subset_seed=seed, indices=iset.indices, threads=torch.get_num_threads(),
               machine=platform.node(), cpu=platform.processor() or platform.machine(),
               finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    return rec


def run(args) -> None:
    torch.set_num_threads(args.threads)
    info, ns, val_loader = load_data(args)
    os.makedirs(args.work, exist_ok=True)
    base = classic.RECIPES[args.recipe]
    epochs = args.epochs or base.epochs
    for ipc in args.ipc:
        for seed in range(args.first_seed, args.first_seed + (args.students or DEFAULT_STUDENTS[ipc])):
            path = student_file(args.work, args.recipe, epochs, ipc, seed)
            if os.path.isfile(path):
                print(f"[fmnist] {os.path.basename(path)}: done, skipped", flush=True)
                continue
            rec = train_one(args, info, ns, val_loader, ipc, seed)
            artifacts.write_text(path, json.dumps(rec, indent=1))
            print(f"[fmnist] {args.recipe} {epochs} ep, IPC {ipc}, seed {seed}: top-1 {rec['top1']:.2f} "
                  f"({rec['wall_s']:.0f} s)", flush=True)


def report(args) -> str:
    rows = {}
    for path in sorted(glob.glob(os.path.join(args.work, "*-e*-ipc*-seed*.json"))):
        with open(path) as fh:
            r = json.load(fh)
        rec = r["recipe"]
        rows.setdefault((rec["name"], rec["epochs"], r["ipc"]), []).append(r)
    lines = ["| recipe | epochs | IPC | ours: top-1 mean ± std (n) | per student | published (DC, Random) | "
             "distance | tolerance | check | wall per student |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (name, epochs, ipc), recs in sorted(rows.items()):
        accs = [x["top1"] for x in sorted(recs, key=lambda x: x["seed"])]
        mean = statistics.fmean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        pub, pstd = PUBLISHED.get(ipc, (float("nan"), float("nan")))
        ok = "pass" if abs(mean - pub) <= tolerance(ipc) else "MISS"
        wall = statistics.fmean(x["wall_s"] for x in recs)
        lines.append(f"| {name} | {epochs} | {ipc} | {mean:.1f} ± {std:.1f} ({len(accs)}) | "
                     f"{', '.join(f'{a:.1f}' for a in accs)} | {pub} ± {pstd} | {mean - pub:+.1f} | "
                     f"{tolerance(ipc):.1f} | {ok if name == 'dc' and epochs == 300 else '–'} | {wall:.0f} s |")
    lines.append("")
    lines.append("std: sample std (ddof 1) over students, each on its own random subset (seed s: subset s, init s).")
    lines += ["", "Convergence: 2E epochs against E, the same subsets and inits (seeds finished in both):", "",
              "| recipe | IPC | E -> 2E | mean at E | mean at 2E | change of the mean | paired change per seed | "
              "std at E | change < std |", "|---|---|---|---|---|---|---|---|---|"]
    for (name, epochs, ipc), recs in sorted(rows.items()):
        longer = {x["seed"]: x["top1"] for x in rows.get((name, 2 * epochs, ipc), [])}
        short = {x["seed"]: x["top1"] for x in recs}
        both = sorted(set(short) & set(longer))
        if not both:
            continue
        a, b = [short[s] for s in both], [longer[s] for s in both]
        std = statistics.stdev(short.values()) if len(short) > 1 else 0.0
        change = statistics.fmean(b) - statistics.fmean(a)
        lines.append(f"| {name} | {ipc} | {epochs} -> {2 * epochs} ({len(both)} seeds) | {statistics.fmean(a):.2f} | "
                     f"{statistics.fmean(b):.2f} | {change:+.2f} | {', '.join(f'{y - x:+.2f}' for x, y in zip(a, b))} | "
                     f"{std:.2f} | {'yes' if abs(change) < std else 'NO'} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    p.add_argument("--students", type=int, default=None, help="students per IPC (default 5, 5, 3 at IPC 1, 10, 50)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--recipe", default="dc", choices=sorted(classic.RECIPES))
    p.add_argument("--epochs", type=int, default=None, help="the recipe's E (default: 300 dc, 1000 dsa)")
    p.add_argument("--data-dir", default=None, help="the four IDX files (default: the preset's search)")
    p.add_argument("--work", default="runs/fmnist_check")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report", action="store_true", help="print the table of the finished students and exit")
    args = p.parse_args(argv)
    if args.report:
        print(report(args))
    else:
        run(args)


if __name__ == "__main__":
    main()
