"""Side-by-side timings of the compiled kernels (wmdd._C) against their references, in one run.

    python bench/bench_kernels.py               # default: ~2-3 minutes on 2 idle CPU cores
    python bench/bench_kernels.py --quick       # smaller sizes, a smoke run
    python bench/bench_kernels.py --threads 1   # every method on one thread

1. class_moments on one BN-input-sized tensor: extension vs the torch reference (index_add_) vs a naive
   per-class Python loop.
2. The statistics pass (eval forward with forward pre-hooks on every BatchNorm input calling
   ops.class_moments, wmdd/bnstats.py) divided by a plain eval forward over the same data; ResNet-18
   (small stem) and the ConvNet on random 32 px images. Acceptance: <= 1.10x with the extension.
3. Sinkhorn time per iteration for 100 problems (k = 50, N = 500, squared-Euclidean costs of 512-d
   points scaled to mean 1, reg 0.05): batched extension vs POT's sinkhorn_log on its numpy and torch
   backends (looped over problems) vs the reference path (ops, impl="ref"). Acceptance: extension >= 5x
   faster than POT torch. All methods run the same fixed number of iterations (tol = 0).

Prints markdown tables (pasted into bench/RESULTS.md, section "Kernels"). Timings interleave the
methods and keep the fastest of the repeats, so a busy machine affects all of them alike.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root: wmdd, no install

from wmdd import ops  # noqa: E402


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def timed(fn, repeats: int) -> list:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def interleaved(fns: dict, repeats: int) -> dict:
    """{name: fastest seconds}, running the methods round-robin (each once as warm-up). The minimum is
    the estimate least disturbed by other processes on a shared machine."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name] += timed(fn, 1)
    return {name: min(t) for name, t in times.items()}


def table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def naive_moments(x, y, num_classes):
    """Per-class Python loop: select the class's samples, then reduce (what one writes first)."""
    c = x.shape[1]
    s = torch.zeros(num_classes, c, dtype=torch.float64)
    q = torch.zeros(num_classes, c, dtype=torch.float64)
    n = torch.zeros(num_classes, dtype=torch.float64)
    for k in range(num_classes):
        xk = x[y == k].double()
        s[k] = xk.sum((0, 2, 3))
        q[k] = (xk * xk).sum((0, 2, 3))
        n[k] = xk.shape[0] * xk.shape[2] * xk.shape[3]
    return s, q, n


# ---------------------------------------------------------------------------------------------


def bench_moments(quick: bool) -> str:
    rows = []
    shapes = [(128, 64, 32, 32), (128, 512, 4, 4)] if not quick else [(32, 64, 16, 16)]
    for shape in shapes:
        for num_classes in (10, 100):
            x = torch.randn(shape)
            y = torch.randint(0, num_classes, (shape[0],))
            fns = {"ref": lambda: ops.class_moments(x, y, num_classes, impl="ref"),
                   "naive": lambda: naive_moments(x, y, num_classes)}
            if ops.ext_available():
                fns["ext"] = lambda: ops.class_moments(x, y, num_classes, impl="ext")
                xl = x.contiguous(memory_format=torch.channels_last)
                fns["ext_cl"] = lambda: ops.class_moments(xl, y, num_classes, impl="ext")
            t = interleaved(fns, 3 if quick else 5)
            ext = t.get("ext", float("nan"))
            rows.append([f"{list(shape)}", num_classes, f"{ext * 1e3:.2f}", f"{t.get('ext_cl', float('nan')) * 1e3:.2f}",
                         f"{t['ref'] * 1e3:.2f}", f"{t['naive'] * 1e3:.2f}",
                         f"{t['ref'] / ext:.1f}x", f"{t['naive'] / ext:.1f}x"])
    return table(["x (float32)", "K", "ext ms", "ext ms (channels_last)", "torch ref ms", "naive loop ms",
                  "ref / ext", "naive / ext"], rows)


def bench_stats_pass(quick: bool) -> str:
    from wmdd.bnstats import ClassMomentHooks
    from wmdd.models import build_model

    n_images, batch = (64, 32) if quick else (256, 128)
    g = torch.Generator().manual_seed(0)
    data = torch.randn(n_images, 3, 32, 32, generator=g)
    labels = torch.randint(0, 10, (n_images,), generator=g)
    rows = []
    for arch, stem in (("resnet18", "small"), ("convnet", "small")):
        model = build_model(arch, 10, stem, 32).eval()

        def plain():
            with torch.no_grad():
                for i in range(0, n_images, batch):
                    model(data[i:i + batch])

        def stats(impl):
            def run():
                with torch.no_grad(), ClassMomentHooks(model, 10, impl=impl) as hooks:
                    for i in range(0, n_images, batch):
                        hooks.labels = labels[i:i + batch]
                        model(data[i:i + batch])
            return run

        fns = {"plain": plain, "ref": stats("ref")}
        if ops.ext_available():
            fns["ext"] = stats("ext")
        t = interleaved(fns, 2 if quick else 3)
        # The time inside the kernel calls of one pass, measured around each call: a direct estimate
        # of the overhead, less noisy than the difference of two pass times on a busy machine.
        inside = {}
        for impl in ("ext", "ref") if ops.ext_available() else ("ref",):
            calls = []
            moments = ops.class_moments

            def timed_moments(*a, **kw):
                t0 = time.perf_counter()
                out = moments(*a, **kw)
                calls.append(time.perf_counter() - t0)
                return out
            ops.class_moments = timed_moments
            try:
                stats(impl)()
            finally:
                ops.class_moments = moments
            inside[impl] = sum(calls)
        n_bn = sum(1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        ext_t, ext_in = t.get("ext", float("nan")), inside.get("ext", float("nan"))
        rows.append([f"{arch} ({n_bn} BN), {n_images} x 3x32x32, batch {batch}", f"{t['plain']:.3f}",
                     f"{ext_t:.3f}", f"{t['ref']:.3f}", f"**{ext_t / t['plain']:.3f}x**", f"{t['ref'] / t['plain']:.3f}x",
                     f"{ext_in * 1e3:.1f} ({1 + ext_in / t['plain']:.3f}x)",
                     f"{inside['ref'] * 1e3:.0f} ({1 + inside['ref'] / t['plain']:.3f}x)"])
    return table(["model, data", "plain eval forward s", "stats pass ext s", "stats pass ref s",
                  "ext / plain", "ref / plain", "in ext calls ms (1 + share)", "in ref calls ms (1 + share)"], rows)


def sinkhorn_problems(bsz, k, n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bsz, k, d, generator=g, dtype=torch.float64)
    y = torch.randn(bsz, n, d, generator=g, dtype=torch.float64)
    cost = torch.cdist(x, y) ** 2
    cost = cost / cost.mean((1, 2), keepdim=True)
    a = torch.full((bsz, k), 1.0 / k, dtype=torch.float64)
    b = torch.full((bsz, n), 1.0 / n, dtype=torch.float64)
    return cost.to(dtype), a.to(dtype), b.to(dtype)


def bench_sinkhorn(quick: bool) -> str:
    import ot

    bsz, k, n, d = (20, 50, 500, 512) if quick else (100, 50, 500, 512)
    reg, iters = 0.05, 10
    rows = []
    for dtype in (torch.float64, torch.float32):
        cost, a, b = sinkhorn_problems(bsz, k, n, d, dtype)
        cn, an, bn = cost.numpy(), a.numpy(), b.numpy()

        def pot(backend_arrays):
            c_, a_, b_ = backend_arrays

            def run():
                for p in range(bsz):
                    ot.bregman.sinkhorn_log(a_[p], b_[p], c_[p], reg, numItermax=iters, stopThr=0.0, warn=False)
            return run

        fns = {"POT numpy": pot((cn, an, bn)), "POT torch": pot((cost, a, b)),
               "ref": lambda: ops.sinkhorn_log_batched(cost, a, b, reg, max_iter=iters, tol=0.0, impl="ref")}
        if ops.ext_available():
            fns["ext"] = lambda: ops.sinkhorn_log_batched(cost, a, b, reg, max_iter=iters, tol=0.0, impl="ext")
        t = {name: s / iters for name, s in interleaved(fns, 2 if quick else 3).items()}
        ext = t.get("ext", float("nan"))
        rows.append([str(dtype).replace("torch.", ""), f"{ext * 1e3:.2f}", f"{t['POT numpy'] * 1e3:.1f}",
                     f"{t['POT torch'] * 1e3:.1f}", f"{t['ref'] * 1e3:.1f}",
                     f"{t['POT numpy'] / ext:.0f}x", f"**{t['POT torch'] / ext:.0f}x**", f"{t['ref'] / ext:.0f}x"])
    head = f"{bsz} problems, k={k}, N={n}, d={d}, reg={reg}, {iters} iterations each; ms per iteration (all problems)"
    return head + "\n\n" + table(["dtype", "ext", "POT numpy", "POT torch", "ref (ops)", "numpy / ext",
                                  "POT torch / ext", "ref / ext"], rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    parser.add_argument("--only", choices=["moments", "stats", "sinkhorn"], default=None, help="one section")
    parser.add_argument("--threads", type=int, default=None, help="torch / kernel threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    np.random.seed(0)
    t0 = time.time()
    print(f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}; "
          f"torch {torch.__version__}; {ops.describe()}\n")
    if not ops.ext_available():
        print("(wmdd._C not built: only the reference columns are measured; build with `make install`)\n")
    sections = [("moments", "class_moments, one call", bench_moments),
                ("stats", "statistics pass / plain eval forward (CPU)", bench_stats_pass),
                ("sinkhorn", "Sinkhorn per iteration", bench_sinkhorn)]
    for key, title, fn in sections:
        if args.only in (None, key):
            print(f"### {title}\n\n{fn(args.quick)}\n", flush=True)
    print(f"(bench_kernels: {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
