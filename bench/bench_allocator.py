"""Training-step speed on the CPU with glibc's own malloc policy against engine.tune_cpu_allocator.

    python bench/bench_allocator.py              # ~3 minutes on 2 idle cores
    python bench/bench_allocator.py --steps 5    # a smoke run

Every stage calls engine.tune_cpu_allocator() (wmdd.engine.stage_main): it raises glibc's mmap threshold,
trim threshold and top pad so that a training step's freed activations stay in the heap instead of
being unmapped and faulted in again at the next step. A malloc policy is per process and cannot be
undone, so each setting runs in its own child process (WMDD_MALLOC=default for glibc's own), the two
alternating `--rounds` times; the median of the rounds is shown. One step = forward, cross-entropy,
backward, AdamW on a fixed random batch (evaluate.py's student step). The final losses must be equal
bit for bit: only where memory comes from changes, not what is computed.

Prints a markdown table (pasted into bench/RESULTS.md, section "CPU allocator").
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # repo root, no install

CASES = (("convnet", "small", 16, 100), ("convnet", "small", 16, 256), ("convnet", "small", 32, 100),
         ("resnet18", "small", 32, 64))


def child(steps: int) -> None:
    import torch
    import torch.nn.functional as F

    from wmdd import engine, models

    note = engine.tune_cpu_allocator()
    out = {"allocator": note, "cases": []}
    for arch, stem, size, batch in CASES:
        torch.manual_seed(0)
        model = models.build_model(arch, 10, stem, size)
        models.training_layout(model, torch.device("cpu"))
        optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
        x = models.as_layout(torch.randn(batch, 3, size, size), True)
        y = torch.randint(0, 10, (batch,))
        elapsed = 0.0
        for i in range(3 + steps):
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if i >= 3:
                elapsed += time.perf_counter() - t0
        out["cases"].append({"ms": 1000 * elapsed / steps, "loss": loss.item()})
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per case and child (after 3 warm-up steps)")
    p.add_argument("--rounds", type=int, default=3, help="child processes per setting, alternating")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.steps)
    results = {"default": [], "tuned": []}
    for _ in range(args.rounds):
        for setting in results:
            env = {k: v for k, v in os.environ.items() if k != "WMDD_MALLOC"}
            if setting == "default":
                env["WMDD_MALLOC"] = "default"
            run = subprocess.run([sys.executable, __file__, "--child", "--steps", str(args.steps)], env=env,
                                 capture_output=True, text=True, check=True)
            results[setting].append(json.loads(run.stdout.strip().splitlines()[-1]))
    import torch

    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"tuned = {results['tuned'][0]['allocator']}")
    print("| model | input | batch | glibc default ms/step | tuned ms/step | speed-up | final loss equal |")
    print("|---|---|---|---|---|---|---|")
    for i, (arch, _, size, batch) in enumerate(CASES):
        ms = {s: statistics.median(r["cases"][i]["ms"] for r in rs) for s, rs in results.items()}
        losses = {r["cases"][i]["loss"] for rs in results.values() for r in rs}
        print(f"| {arch} | {size} px | {batch} | {ms['default']:.1f} | {ms['tuned']:.1f} | "
              f"{ms['default'] / ms['tuned']:.2f}x | {'yes' if len(losses) == 1 else 'NO: ' + str(sorted(losses))} |")


if __name__ == "__main__":
    main()
