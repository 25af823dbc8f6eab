"""Soft-label storage: bytes of our format vs the FKD/SRe2L format, and what compression costs a student.

    python bench/bench_labels.py                 # ~3-4 minutes on 2 idle CPU cores (reuses runs/demo or runs/digits)
    python bench/bench_labels.py --quick         # a smoke run (2 seeds, 20 epochs, 3 compressions)
    python bench/bench_labels.py --run DIR       # teacher.pt (and synthetic.pt, if any) from DIR

1. Storage. The FKD format (SRe2L's / WMDD's released relabel) writes one file per batch holding
   [crop coords float32 [n, 4], flips [n], CutMix index int64 [n], lambda, box, fp16 logits [n, C]]. Ours
   writes one file per epoch with the compressed logits and an 8-byte digest per batch; the augmentation
   is replayed from (seed, epoch, batch). Both are measured as files on disk (torch.save, no
   compression) for ImageNet-1K-shaped batches (C = 1000, batch 100), then extrapolated linearly (per-file
   overhead + bytes per image) to ImageNet-1K at IPC 10 and 50 for 300 epochs.
2. Accuracy. On digits, a ConvNet student trained with the preset recipe (60 epochs) on labels stored at
   each compression, same seeds and same replayed batches for every compression (differences are
   paired by seed), against the full fp16 labels. The image set is the run's synthetic.pt when it has
   one, else a seeded random real subset (IPC 10); the label compression acts on the labels only.

Prints markdown tables (pasted into bench/RESULTS.md, section "Labels").
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root, no install

import evaluate  # noqa: E402
import relabel  # noqa: E402
import squeeze  # noqa: E402
from wmdd import artifacts, augment, cli, data, presets, students, subsets, softlabels  # noqa: E402

IN1K_CLASSES, EPOCHS, BATCH = 1000, 300, 100
# (topk, precision, rank)
STORAGE_CONFIGS = [(None, "fp16", None), (None, "int8", None), (100, "fp16", None), (50, "fp16", None),
                   (20, "fp16", None), (50, "int8", None), (20, "int8", None),
                   (None, "int8", 256), (None, "int8", 128), (None, "int8", 64), (None, "int8", 32)]
ACCURACY_CONFIGS = [(None, "fp16", None), (None, "int8", None), (2, "fp16", None), (1, "fp16", None),
                    (None, "int8", 5), (None, "int8", 3), (None, "int8", 2)]
QUICK_CONFIGS = [(None, "fp16", None), (1, "fp16", None), (None, "int8", 3)]


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# ---------------------------------------------------------------------------------------------
# 1. storage


def fkd_batch_file(path, n: int, num_classes: int) -> int:
    """One FKD batch record as SRe2L's relabel saves it; returns its size on disk."""
    g = torch.Generator().manual_seed(0)
    record = [torch.rand(n, 4, generator=g),                        # crop coords (relative), float32
              torch.rand(n, generator=g) < 0.5,                     # flip status
              torch.randperm(n, generator=g),                       # CutMix index, int64
              0.37,                                                 # lambda
              [torch.tensor(3), torch.tensor(5), torch.tensor(90), torch.tensor(120)],  # box
              torch.randn(n, num_classes, generator=g).half()]      # logits, fp16
    torch.save(record, path)
    return os.path.getsize(path)


def ours_epoch_file(labels_dir, n: int, num_classes: int, topk, precision, rank) -> int:
    """One epoch file of n images (n / BATCH digests); returns its size on disk."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, num_classes, generator=g) * 3
    entry = softlabels.encode(logits, topk, precision, rank)
    settings = {"epochs": EPOCHS, "batch_size": BATCH, "seed": 0, "topk": topk, "precision": precision, "rank": rank}
    path = softlabels.write_epoch(labels_dir, 0, entry, torch.zeros(max(1, n // BATCH), dtype=torch.int64),
                                  settings, "imagenet")
    return os.path.getsize(path)


def storage_table(tmp: str) -> str:
    fkd_file = fkd_batch_file(os.path.join(tmp, "batch_0.tar"), BATCH, IN1K_CLASSES)
    fkd_per_image = fkd_file / BATCH
    rows = [f"FKD format (released relabel): one {fkd_file:,} B file per batch of {BATCH} = "
            f"{fkd_per_image:,.1f} B per image-epoch (payload {softlabels.fkd_bytes_per_batch(IN1K_CLASSES, BATCH) / BATCH:,.1f} B)",
            "", "| our format | B / image-epoch | per-epoch overhead (B) | IN-1K IPC 10, 300 ep (vs FKD) | "
                "IN-1K IPC 50, 300 ep (vs FKD) |", "|---|---|---|---|---|"]
    fkd_total = {ipc: EPOCHS * (IN1K_CLASSES * ipc // BATCH) * fkd_file for ipc in (10, 50)}
    rows.insert(1, f"FKD totals: IPC 10 {fkd_total[10] / 1e9:.2f} GB, IPC 50 {fkd_total[50] / 1e9:.2f} GB "
                   f"(300 epochs, {IN1K_CLASSES * 10 // BATCH * EPOCHS:,} / {IN1K_CLASSES * 50 // BATCH * EPOCHS:,} files)")
    results = []
    for topk, precision, rank in STORAGE_CONFIGS:
        d = os.path.join(tmp, f"ours_{topk}_{precision}_{rank}")
        size = ours_epoch_file(d, 1000, IN1K_CLASSES, topk, precision, rank)
        # torch.save stores tensors uncompressed: bytes grow by exactly the payload per image (+ the
        # 8-byte digest per batch); the rest of the file (container, meta, shared basis) is overhead
        per_image = softlabels.bytes_per_image(IN1K_CLASSES, topk, precision, rank) + 8 / BATCH
        overhead = size - 1000 * per_image
        total = {ipc: EPOCHS * (overhead + per_image * IN1K_CLASSES * ipc) for ipc in (10, 50)}
        ratio = {ipc: fkd_total[ipc] / total[ipc] for ipc in (10, 50)}
        results.append((topk, precision, rank, per_image, ratio))
        rows.append(f"| {softlabels.describe(topk, precision, rank)} | {per_image:,.2f} | {overhead:,.0f} | "
                    f"{total[10] / 1e9:.3f} GB ({ratio[10]:.1f}x) | {total[50] / 1e9:.3f} GB ({ratio[50]:.1f}x) |")
    return "\n".join(rows) + "\n", results


# ---------------------------------------------------------------------------------------------
# 2. accuracy on digits


def prepare_run(args, tmp: str) -> tuple:
    """(run dir with teacher.pt + synthetic.pt, description of the image set)."""
    src = args.run
    run = os.path.join(tmp, "digits")
    os.makedirs(run, exist_ok=True)
    ns = argparse.Namespace(dataset="digits", data_dir=None, resolution=None, download=False, seed=1, ipc=10)
    info = data.resolve(ns)
    teacher = os.path.join(src, "teacher.pt") if src else None
    if teacher and os.path.isfile(teacher):
        try:
            artifacts.load(teacher, stage="squeeze")
            shutil.copy(teacher, os.path.join(run, "teacher.pt"))
        except cli.UserError as e:
            print(f"[bench] {teacher} is not usable ({e}); training a teacher")
            teacher = None
    else:
        teacher = None
    if teacher is None:
        print("[bench] training a 4-epoch digits teacher")
        squeeze.main(squeeze.get_args_parser().parse_args(["--dataset", "digits", "--epochs", "4", "--out", run]))
    syn = os.path.join(src, "synthetic.pt") if src else None
    if syn and os.path.isfile(syn):
        try:
            s = subsets.load_synthetic(syn, info, 10, os.path.join(run, "teacher.pt"))
            shutil.copy(syn, os.path.join(run, "synthetic.pt"))
            return run, f"{syn} (IPC {s.ipc})"
        except cli.UserError as e:
            print(f"[bench] {syn} is not usable here ({e}); using a random real subset")
    iset = subsets.random_real_subset(info, ns, 10, seed=1)
    subsets.save_as_synthetic(iset, os.path.join(run, "synthetic.pt"), info, ns, os.path.join(run, "teacher.pt"))
    return run, "a seeded random real subset, IPC 10 (no synthetic.pt in the run)"


def kept_energy(run_dir: str, num_classes: int) -> dict:
    """rank -> share of the per-image-centred logits' energy (about their epoch mean) that the top
    `rank` principal directions keep, averaged over the stored fp16 epochs."""
    labels_dir = artifacts.run_paths(run_dir).labels
    shares = {r: [] for r in range(1, num_classes)}
    for f in sorted(os.listdir(labels_dir)):
        if f.startswith("epoch_"):
            x = torch.load(os.path.join(labels_dir, f), weights_only=True)["entry"]["values"].double()
            x = x - x.mean(1, keepdim=True)
            ev = torch.linalg.eigvalsh((x - x.mean(0)).T @ (x - x.mean(0))).flip(0)
            for r in shares:
                shares[r].append(float(ev[:r].sum() / ev.sum()))
    return {r: statistics.fmean(v) for r, v in shares.items()}


def accuracy_table(args, tmp: str) -> str:
    run, set_desc = prepare_run(args, tmp)
    info = data.resolve(argparse.Namespace(dataset="digits", data_dir=None, resolution=None, download=False))
    from torch.utils.data import DataLoader
    val_loader = DataLoader(data.build_dataset(info, argparse.Namespace(), "val"), batch_size=500)
    configs = QUICK_CONFIGS if args.quick else ACCURACY_CONFIGS
    acc, sizes = {}, {}
    for topk, precision, rank in configs:
        out = os.path.join(tmp, f"acc_{topk}_{precision}_{rank}")
        os.makedirs(out, exist_ok=True)
        for f in ("teacher.pt", "synthetic.pt"):
            shutil.copy(os.path.join(run, f), os.path.join(out, f))
        argv = ["--dataset", "digits", "--ipc", "10", "--out", out, "--epochs", str(args.epochs), "--seed", "0",
                "--precision", precision] + (["--topk", str(topk)] if topk else []) + \
            (["--rank", str(rank)] if rank else [])
        relabel.main(relabel.get_args_parser().parse_args(argv))
        labels_dir = artifacts.run_paths(out).labels
        sizes[(topk, precision, rank)] = sum(os.path.getsize(os.path.join(labels_dir, f)) for f in os.listdir(labels_dir)
                                       if f.startswith("epoch_"))
        ev = evaluate.get_args_parser().parse_args(["--dataset", "digits", "--ipc", "10", "--out", out,
                                                    "--eval-every", str(args.epochs)])
        data.preset_defaults(ev, "evaluate")
        ev.student, ev.epochs, ev.batch_size = info.arch, args.epochs, 100
        settings = softlabels.read_manifest(labels_dir)["settings"]
        plan = augment.ReplayPlan(settings["num_images"], settings["batch_size"], settings["seed"])
        spec = augment.AugmentSpec.from_dict(settings["augment"])
        syn = subsets.load_synthetic(artifacts.run_paths(out).synthetic, info, 10)
        acc[(topk, precision, rank)] = []
        for s in range(args.seeds):
            rec = evaluate.train_student(syn, students.StoredLabels(labels_dir, settings, plan), ev, info, spec, plan,
                                         torch.device("cpu"), val_loader, s, desc=f"{softlabels.describe(topk, precision, rank)} seed {s}")
            acc[(topk, precision, rank)].append(rec["top1"])
            print(f"[bench] {softlabels.describe(topk, precision, rank)} seed {s}: top-1 {rec['top1']:.2f}")
    ref = acc[(None, "fp16", None)]
    energy = kept_energy(os.path.join(tmp, "acc_None_fp16_None"), 10)
    rows = [f"Image set: {set_desc}; student ConvNet, {args.epochs} epochs, batch 100, T = 20, {args.seeds} seeds "
            f"(0..{args.seeds - 1}); top-1 on the 360 real validation images (1 image = 0.28 pt).", "",
            "| stored labels (digits, 10 classes) | B / image-epoch | labels on disk | top-1 (%) | "
            "Δ vs all fp16 (paired) | centred-logit energy kept | ImageNet-1K analogue |",
            "|---|---|---|---|---|---|---|"]
    for (topk, precision, rank), values in acc.items():
        d = [a - b for a, b in zip(values, ref)]
        frac = "all" if topk is None and rank is None else \
            (f"top-{topk * 100} of 1000" if topk else f"rank {rank * 100} of 1000") + f" ({(topk or rank) * 10}% of classes)"
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        dsd = statistics.stdev(d) if len(d) > 1 else 0.0
        rows.append(f"| {softlabels.describe(topk, precision, rank)} | {softlabels.bytes_per_image(10, topk, precision, rank)} | "
                    f"{sizes[(topk, precision, rank)] / 1024:.1f} KiB | {statistics.fmean(values):.2f} ± {sd:.2f} | "
                    f"{statistics.fmean(d):+.2f} ± {dsd:.2f} | "
                    f"{f'{100 * energy[rank]:.2f}%' if rank else '–'} | {frac} |")
    return "\n".join(rows) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None,
                   help="run directory with teacher.pt (and synthetic.pt); default: runs/demo (make demo), "
                        "else runs/digits, else a 4-epoch teacher trained here")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=None, help="default: the digits preset's (60)")
    p.add_argument("--quick", action="store_true", help="2 seeds, 20 epochs, 3 codecs")
    p.add_argument("--skip-accuracy", action="store_true")
    args = p.parse_args()
    if args.run is None:
        args.run = next((d for d in ("runs/demo", "runs/digits") if os.path.isfile(os.path.join(d, "teacher.pt"))), None)
    if args.quick:
        args.seeds, args.epochs = 2, args.epochs or 20
    args.epochs = args.epochs or presets.PRESETS["digits"].stages["evaluate"]["epochs"]
    t0 = time.time()
    print(f"# bench_labels: {time.strftime('%Y-%m-%d')}, {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        table, _ = storage_table(tmp)
        print("\n## Storage (ImageNet-1K-shaped batches: 1000 classes, batch 100)\n")
        print(table)
        if not args.skip_accuracy:
            acc = accuracy_table(args, tmp)
            print("\n## Student accuracy vs label compression (digits)\n")
            print(acc)
    print(f"[bench] done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
