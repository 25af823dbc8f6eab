"""Barycenter benchmark: POT (as released) vs this project's batched solvers, side by side.

    python bench/bench_barycenter.py                # default sweep (under 5 minutes on 2 cores)
    python bench/bench_barycenter.py --quick        # smaller: fewer classes per case
    python bench/bench_barycenter.py --full         # more classes, slow POT rows at the ImageNet shape
    python bench/bench_barycenter.py --record       # also write the table into bench/RESULTS.md

Data: feature clouds that look like ResNet avgpool features (non-negative, post-ReLU; each class a
mixture of 3-11 modes with a low-rank within-mode spread and per-dimension scales drawn from a gamma
law), d = 512. Cases: N = 500 with k = 10 and k = 50, and the ImageNet shape (N = 1300, k = 50):
the per-class time is extrapolated to 1000 classes (this CPU runs a sample of classes, said in the
table).

Rows, all from the same greedy k-means++ initialisation per class:
- POT exact: ot.lp.free_support_barycenter with uniform weights (the released WMDD semantics).
- POT Sinkhorn: ot.bregman.free_support_sinkhorn_barycenter (log-domain Sinkhorn, POT's defaults
  otherwise) with the same epsilon as ours (1e-2 of each class's cost scale), one class at a time.
- wmdd sinkhorn (impl ref / ext): wmdd.ot with solver="sinkhorn", all classes of a case batched;
  `ext` only when the compiled kernels are built (ops.resolve_impl("auto")).
- released learned: the released learned-weights loop with POT EMD (10 outer steps, 100
  mirror-descent steps each, theta = 0.2); wmdd learned: weights="learned" (default: Lloyd straight
  from the init; its 'outer iters' are Lloyd steps), with anneal=True (the entropic alternation with
  the exact weight step, then Lloyd), and with md_steps=1 (mirror descent with Sinkhorn potentials).

Time: CPU seconds of this process per class (time.process_time; with the default --threads 1 this
is the single-core time and is not inflated by other load on the machine), and wall seconds.
--threads limits torch *and* numpy's BLAS (threadpoolctl; POT's loops call numpy matmuls): an
unlimited OpenBLAS pool on a busy 2-core machine made POT exact 8-32x slower, in CPU and wall time,
than the same code on one thread (bench/RESULTS.md, Barycenter).
Objective: exact W2^2 (POT EMD) per class, computed after the timed solve for every row; the table
shows its mean and the ratio to POT exact's (mean and worst class). Evaluation time is not included.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # after PYTHONPATH

from wmdd import ops  # noqa: E402
from wmdd import ot as wot  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
SECTION = "## Barycenter"


def feature_cloud(n: int, d: int = 512, seed: int = 0) -> torch.Tensor:
    """One class's features: a mixture of modes, per-dimension gamma scales, low-rank spread, ReLU."""
    rng = np.random.default_rng(seed)
    modes = int(rng.integers(3, 12))
    scale = rng.gamma(0.6, 1.0, size=d)                      # sparse-ish positive channel profile
    centres = scale + rng.normal(scale=0.6, size=(modes, d)) * np.sqrt(scale)
    z = rng.choice(modes, size=n, p=rng.dirichlet(np.full(modes, 2.0)))
    low_rank = rng.normal(size=(n, 16)) @ rng.normal(scale=0.25, size=(16, d))
    x = centres[z] + (low_rank + rng.normal(scale=0.25, size=(n, d))) * np.sqrt(scale)
    return torch.tensor(np.maximum(x, 0.0), dtype=torch.float32)


def timed(fn):
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


def init_points(feats, k, seed):
    y, _, counts = wot.pad_classes([f - f.mean(0) for f in feats])
    x0 = wot.kmeanspp_init(y, counts, k, [wot.class_seed(seed, c) for c in range(len(feats))])
    return [x0[c].double() + feats[c].double().mean(0) for c in range(len(feats))]


def objective(points, weights, feats):
    return np.array([wot.w2_squared(points[c], weights[c], feats[c]) for c in range(len(points))])


def run_pot_exact(feats, inits):
    import ot

    def solve():
        out = []
        for f, x0 in zip(feats, inits):
            y = f.double().numpy()
            out.append(ot.lp.free_support_barycenter([y], [np.full(len(y), 1 / len(y))], x0.numpy()))
        return out
    pts, cpu, wall = timed(solve)
    k = inits[0].shape[0]
    return pts, [np.full(k, 1 / k)] * len(pts), cpu, wall, None


def run_pot_sinkhorn(feats, inits, reg_rel):
    import ot

    def solve():
        out = []
        for f, x0 in zip(feats, inits):
            y = f.double().numpy()
            scale = 2 * ((y - y.mean(0)) ** 2).sum(1).mean()
            out.append(ot.bregman.free_support_sinkhorn_barycenter(
                [y], [np.full(len(y), 1 / len(y))], x0.numpy(), reg_rel * scale, method="sinkhorn_log"))
        return out
    pts, cpu, wall = timed(solve)
    k = inits[0].shape[0]
    return pts, [np.full(k, 1 / k)] * len(pts), cpu, wall, None


def run_wmdd(feats, inits, **kw):
    res, cpu, wall = timed(lambda: wot.free_support_barycenter_batched(
        feats, inits[0].shape[0], init=inits, compute_objective=False, **kw))
    return res.points, res.weights, cpu, wall, float(res.iters.float().mean())


def run_released_learned(feats, inits):
    def solve():
        pts, ws = [], []
        for f, x0 in zip(feats, inits):
            x, w = wot.released_learned_barycenter(f.double().numpy(), x0.numpy())
            pts.append(x)
            ws.append(w)
        return pts, ws
    (pts, ws), cpu, wall = timed(solve)
    return pts, ws, cpu, wall, 10.0


def bench_case(name, n, k, n_classes, sub, args, extrapolate=None):
    """Run every row on (a prefix of) the case's classes; returns table rows."""
    feats = [feature_cloud(n, seed=1000 * k + c) for c in range(n_classes)]
    inits = init_points(feats, k, args.seed)
    impls = ["ref"] + (["ext"] if ops.resolve_impl("auto") == "ext" else [])
    plan = [
        ("POT exact (released)", n_classes, lambda f, i: run_pot_exact(f, i)),
        ("POT Sinkhorn", sub["pot_sinkhorn"], lambda f, i: run_pot_sinkhorn(f, i, args.reg)),
    ]
    for impl in impls:
        m = n_classes if impl == "ext" else sub["wmdd_ref"]
        plan.append((f"wmdd sinkhorn, uniform ({impl})", m,
                     lambda f, i, impl=impl: run_wmdd(f, i, solver="sinkhorn", reg=args.reg, impl=impl)))
    plan += [
        ("released learned (POT EMD)", sub["released_learned"], lambda f, i: run_released_learned(f, i)),
        ("wmdd learned (default: Lloyd)", n_classes,
         lambda f, i: run_wmdd(f, i, solver="sinkhorn", weights="learned", reg=args.reg)),
        ("wmdd learned, anneal=True (entropic + Lloyd)", n_classes,
         lambda f, i: run_wmdd(f, i, solver="sinkhorn", weights="learned", anneal=True, reg=args.reg)),
    ]
    for impl in impls:
        m = n_classes if impl == "ext" else sub["wmdd_ref"]
        plan.append((f"wmdd learned, mirror descent ({impl})", m,
                     lambda f, i, impl=impl: run_wmdd(f, i, solver="sinkhorn", weights="learned", md_steps=1,
                                                      reg=args.reg, impl=impl)))
    rows, exact_w2, released_w2 = [], None, None
    for label, m, fn in plan:
        if m <= 0:
            continue
        print(f"  {name}: {label} on {m} classes ...", flush=True)
        pts, ws, cpu, wall, outer = fn(feats[:m], inits[:m])
        w2 = objective(pts, ws, feats[:m])
        if label.startswith("POT exact"):
            exact_w2 = w2
        if label.startswith("released learned"):
            released_w2 = w2
        ref = exact_w2 if "learned" not in label or released_w2 is None else released_w2
        common = min(m, len(ref))  # the ratio is over the classes both rows solved
        ratio = w2[:common] / ref[:common]
        row = dict(case=name, method=label, classes=m, cpu=cpu / m, wall=wall / m, w2=float(w2.mean()),
                   ratio_mean=float(ratio.mean()), ratio_max=float(ratio.max()), outer=outer,
                   vs="released learned" if "learned" in label and released_w2 is not None else "POT exact")
        rows.append(row)
        print(f"    {cpu / m:.3f} CPU-s/class, W2^2 {row['w2']:.4g}, ratio {row['ratio_mean']:.4f} "
              f"(max {row['ratio_max']:.4f})", flush=True)
    base = {r["vs"]: None for r in rows}
    for r in rows:
        if r["method"].startswith("POT exact"):
            base["POT exact"] = r["cpu"]
        if r["method"].startswith("released learned"):
            base["released learned"] = r["cpu"]
    for r in rows:
        b = base.get(r["vs"])
        r["speedup"] = b / r["cpu"] if b else float("nan")
        if extrapolate:
            r["extrapolated"] = r["cpu"] * extrapolate
    return rows


def markdown(rows, header: str, extrapolate_to: int | None) -> str:
    cols = ("| case | method | classes run | CPU s / class | wall s / class | mean W2^2 (its classes) | "
            "W2^2 / reference (mean, worst; common classes) | reference | speed-up (CPU) | outer iters |")
    if extrapolate_to:
        cols += f" CPU h for {extrapolate_to} classes |"
    lines = [header, "", cols, "|" + "---|" * (cols.count("|") - 1)]
    for r in rows:
        outer = "" if r["outer"] is None else f"{r['outer']:.1f}"
        line = (f"| {r['case']} | {r['method']} | {r['classes']} | {r['cpu']:.3f} | {r['wall']:.3f} | "
                f"{r['w2']:.4g} | {r['ratio_mean']:.4f}, {r['ratio_max']:.4f} | {r['vs']} | "
                f"{r['speedup']:.3g}x | {outer} |")
        if extrapolate_to:
            line += f" {r['extrapolated'] / 3600:.2f} |" if "extrapolated" in r else " |"
        lines.append(line)
    return "\n".join(lines)


def machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except Exception:
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores"


def record(text: str) -> None:
    """Replace (or append) the Barycenter section of bench/RESULTS.md; other sections are untouched."""
    old = open(RESULTS).read() if os.path.exists(RESULTS) else "# Benchmark results\n"
    start = old.find(SECTION)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    else:
        nxt = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text + ("\n" + old[nxt + 1:] if nxt >= 0 else "\n")
    with open(RESULTS, "w") as fh:
        fh.write(new)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer classes per case (about 2 minutes)")
    p.add_argument("--full", action="store_true",
                   help="more classes, and the slow POT rows at the ImageNet shape too (15+ minutes)")
    p.add_argument("--record", action="store_true", help="write the tables into bench/RESULTS.md")
    p.add_argument("--threads", type=int, default=1, help="torch and numpy-BLAS threads (POT's EMD is single-threaded)")
    p.add_argument("--reg", type=float, default=wot.DEFAULT_REG, help="epsilon relative to the cost scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--imagenet-classes", type=int, default=None,
                   help="classes of the ImageNet-shaped case for POT exact and the ext rows (default 3)")
    p.add_argument("--date", default=datetime.date.today().isoformat())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    with threadpool_limits(limits=args.threads):  # numpy's BLAS (POT) too, not only torch
        run(args)


def run(args):
    print(f"barycenter bench: {machine()}; torch threads {args.threads}; {ops.describe('auto')}", flush=True)

    # classes per row: (POT exact and the ext rows, POT Sinkhorn, ref rows, released learned loop)
    if args.full:
        counts = {"small": (16, 2, 6, 2), "k50": (10, 2, 4, 2), "big": (8, 1, 2, 1)}
    elif args.quick:
        counts = {"small": (4, 1, 2, 1), "k50": (3, 0, 1, 1), "big": (2, 0, 1, 0)}
    else:
        counts = {"small": (8, 1, 3, 1), "k50": (6, 1, 2, 1), "big": (3, 0, 1, 0)}
    if args.imagenet_classes:
        counts["big"] = (args.imagenet_classes,) + counts["big"][1:]

    def sub(key):
        _, pot_sinkhorn, wmdd_ref, released = counts[key]
        return dict(pot_sinkhorn=pot_sinkhorn, wmdd_ref=wmdd_ref, released_learned=released)

    t0 = time.time()
    rows = []
    rows += bench_case("N=500, k=10", 500, 10, counts["small"][0], sub("small"), args)
    rows += bench_case("N=500, k=50", 500, 50, counts["k50"][0], sub("k50"), args)
    imagenet = bench_case("ImageNet shape: N=1300, k=50", 1300, 50, counts["big"][0], sub("big"), args,
                          extrapolate=1000)
    header = (f"{SECTION}\n\n{args.date}, {machine()}, torch {torch.__version__} with {args.threads} thread(s), "
              f"{ops.describe('auto')}; numpy's BLAS (POT) limited to the same threads (threadpoolctl). Features: synthetic post-ReLU clouds, d = 512 "
              f"(bench/bench_barycenter.py{' --full' if args.full else ' --quick' if args.quick else ''}; "
              f"total {time.time() - t0:.0f} s wall). "
              f"Epsilon = {args.reg:g} of each class's cost scale. 'classes run' is the sample of classes "
              "each row solved; per-class times are means over it and the ImageNet column extrapolates "
              "them linearly to 1000 classes.")
    text = markdown(rows, header + "\n\n### N = 500", None) + "\n\n" + markdown(
        imagenet, "### ImageNet shape (1000 classes x 1300 images, k = 50)", 1000)
    print()
    print(text)
    if args.record:
        record(text)
        print(f"\nrecorded in {RESULTS}")


if __name__ == "__main__":
    main()
