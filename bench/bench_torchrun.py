"""Several processes vs one: every torchrun-capable stage on digits, 2 ranks beside 1 process, one run.

    python bench/bench_torchrun.py                 # 16 px digits, 2 repeats of each row
    python bench/bench_torchrun.py --resolution 32 --repeats 3

Rows (CPU, gloo, OMP_NUM_THREADS=1 per process, so 2 ranks use the 2 cores and 1 process uses one):
- squeeze --stats-only: the statistics pass (per-class BN sums all-reduced over ranks), of a randomly
  initialised digits ConvNet teacher (the pass costs the same for any weights);
- recover: 2 class groups of 5 classes x IPC 10 (one group per rank), 100 iterations;
- relabel: 30 epochs, batch 50 (epochs split across ranks);
- evaluate: DDP, 30 epochs, --baseline none (each rank half of every batch).
Reported: wall time of the whole command (start-up included), the time the stage itself reports
(squeeze: its "statistics pass" time; the others: their total), and the ratio 1 process / 2 ranks.
The load average of the machine is printed with each row: other jobs on the cores distort the pairs.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# what each timed stage writes: removed before every repeat (a rerun would resume and skip the work)
OUTPUTS = {"squeeze.py": ["bn_stats.pt"], "recover.py": ["shards", "synthetic.pt"], "relabel.py": ["labels"],
           "evaluate.py": ["students", "results.json"]}


def write_random_teacher(out: str, resolution: int) -> None:
    import torch
    from wmdd import artifacts, data, models
    args = argparse.Namespace(dataset="digits", data_dir=None, resolution=resolution, download=False, seed=0)
    info = data.resolve(args)
    torch.manual_seed(0)
    spec = models.model_spec(info.arch, info.num_classes, info.stem, info.image_size)
    artifacts.save(artifacts.run_paths(out).teacher,
                   {"model": models.build_from_spec(spec).eval().state_dict(), "model_args": spec},
                   artifacts.make_meta("squeeze", args, info, val_top1=None, arch=info.arch))


def run(cmd: list, nproc: int) -> tuple:
    """(wall seconds, stdout) of `python <stage> ...` or torchrun with nproc ranks."""
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, TQDM_DISABLE="1")
    t0 = time.perf_counter()
    proc = subprocess.run(launcher + [os.path.join(REPO, cmd[0]), *cmd[1:]], cwd=REPO, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return wall, proc.stdout


def inside(stdout: str, pattern: str) -> float:
    found = re.findall(pattern, stdout)
    return float(found[-1]) if found else float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=16, choices=[16, 32])
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    digits = ["--dataset", "digits", "--resolution", str(args.resolution)]
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "base")
        write_random_teacher(base, args.resolution)
        run(["squeeze.py", *digits, "--stats-only", "--teacher", os.path.join(base, "teacher.pt"), "--out", base], 1)
        run(["barycenter.py", *digits, "--ipc", "10", "--out", base], 1)
        stages = [
            ("squeeze --stats-only (statistics pass)",
             ["squeeze.py", *digits, "--stats-only", "--teacher", "{out}/teacher.pt"], r"([\d.]+)s statistics pass"),
            ("recover (2 groups, 100 it)",
             ["recover.py", *digits, "--ipc", "10", "--batch-size", "50", "--iterations", "100", "--no-png"],
             r"recovered(?: by \d+ ranks)? in ([\d.]+)s"),
            ("relabel (30 epochs)", ["relabel.py", *digits, "--ipc", "10", "--epochs", "30", "--batch-size", "50"],
             r"complete, in ([\d.]+)s"),
            ("evaluate (DDP, 30 epochs)", ["evaluate.py", *digits, "--ipc", "10", "--baseline", "none"],
             r"results.md in ([\d.]+)s"),
        ]
        rows = []
        work = {n: os.path.join(tmp, f"run{n}") for n in (1, 2)}
        for n in (1, 2):
            subprocess.run(["cp", "-r", base, work[n]], check=True)
        for name, cmd, pattern in stages:
            for n in (1, 2):
                walls, insides = [], []
                for _ in range(args.repeats):
                    for stale in OUTPUTS[cmd[0]]:
                        subprocess.run(["rm", "-rf", os.path.join(work[n], stale)], check=True)
                    wall, out = run([c.replace("{out}", work[n]) for c in cmd] + ["--out", work[n]], n)
                    walls.append(wall)
                    insides.append(inside(out, pattern))
                rows.append((name, n, walls, insides, os.getloadavg()[0]))
                print(f"{name:40s} {n} process(es): wall {' / '.join(f'{w:.1f}' for w in walls)} s, "
                      f"inside {' / '.join(f'{t:.2f}' for t in insides)} s", flush=True)
    print(f"\n{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"digits at {args.resolution} px, OMP_NUM_THREADS=1 per process, {args.repeats} repeats\n")
    print("| stage | processes | wall (s) | inside the stage (s) | 1 process / 2 ranks (inside, best) | load avg |")
    print("|---|---|---|---|---|---|")
    best = {}
    for name, n, walls, insides, load in rows:
        best[(name, n)] = min(insides)
        ratio = f"{best[(name, 1)] / best[(name, 2)]:.2f}x" if n == 2 else ""
        print(f"| {name} | {n} | {' / '.join(f'{w:.1f}' for w in walls)} | "
              f"{' / '.join(f'{t:.2f}' for t in insides)} | {ratio} | {load:.1f} |")


if __name__ == "__main__":
    main()
