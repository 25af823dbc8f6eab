"""Training-step speed of a student or teacher in NCHW vs channels_last on the CPU (models.training_layout).

    python bench/bench_layout.py              # ~1 minute on 2 idle cores
    python bench/bench_layout.py --steps 5    # a smoke run

One training step = forward, cross-entropy, backward, AdamW step on a fixed random batch, the recipe
evaluate.py's students run. The two layouts are interleaved step by step (same weights at the start,
same batch), so their ratio is comparable within one run even on a shared machine. The loss after the
last step is printed for both: the layouts differ only in float summation order.

Prints a markdown table (pasted into bench/RESULTS.md, section "Training layout").
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root, no install

from wmdd import models  # noqa: E402

CASES = (("convnet", "small", 16, 100), ("convnet", "small", 32, 100), ("resnet18", "small", 32, 64))


def step(model, optimizer, x, y) -> float:
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per layout and case (after 3 warm-up steps)")
    args = p.parse_args()
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| model | input | batch | NCHW ms/step | channels_last ms/step | speed-up | final loss NCHW / CL |")
    print("|---|---|---|---|---|---|---|")
    for arch, stem, size, batch in CASES:
        torch.manual_seed(0)
        base = models.build_model(arch, 10, stem, size)
        nchw, cl = base, copy.deepcopy(base)
        assert models.training_layout(cl, "cpu")
        x = torch.randn(batch, 3, size, size)
        y = torch.randint(0, 10, (batch,))
        runs = {"nchw": [nchw, torch.optim.AdamW(nchw.parameters(), 1e-3), x, 0.0, 0.0],
                "cl": [cl, torch.optim.AdamW(cl.parameters(), 1e-3), models.as_layout(x, True), 0.0, 0.0]}
        for i in range(3 + args.steps):
            for run in runs.values():
                t0 = time.perf_counter()
                run[4] = step(run[0], run[1], run[2], y)
                if i >= 3:
                    run[3] += time.perf_counter() - t0
        ms = {k: 1000 * r[3] / args.steps for k, r in runs.items()}
        print(f"| {arch} | {size} px | {batch} | {ms['nchw']:.1f} | {ms['cl']:.1f} | {ms['nchw'] / ms['cl']:.2f}x "
              f"| {runs['nchw'][4]:.5f} / {runs['cl'][4]:.5f} |")


if __name__ == "__main__":
    main()
