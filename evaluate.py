"""Stage 5 - evaluate: train fresh students on the distilled set and report them beside honest baselines.

    python evaluate.py --dataset digits --ipc 10 --out runs/digits --seeds 3
    python evaluate.py --dataset imagenet --data-dir /data/imagenet --ipc 10 --out runs/in1k --student resnet50
    python evaluate.py ... --labels online      # teacher on the fly, nothing stored (--labels hard: class labels)
    python evaluate.py ... --student mobilenet_v2 --full-data-acc 56.5 --ars

Each student replays relabel's batches (same images, crops, flips, CutMix boxes: wmdd/augment.py) and
learns from the stored soft labels (`--labels stored`, default), the teacher on each batch (`online`) or
the class labels (`hard`, CutMix-mixed cross-entropy), with AdamW and a cosine schedule per epoch.
The KD loss: sum_i w_i KL(softmax(t_i / T) || softmax(s_i / T)) / n, T = 20, w_i the image's barycenter
weight normalised to mean 1 (`soft_kl` below; uniform weights give the released loss exactly).
`--recipe dc|dsa` trains every student with the classic DC / DSA / DM recipe instead (wmdd/classic.py: a
ConvNet-IN, SGD on the class labels, 300 epochs / 1000 with DSA augmentation; docs/evaluate.md).

Baselines (`--baseline`, a comma list or `none`; wmdd/baselines.py, every name in `--help`): `random`
(IPC random real images per class, a new subset per seed, soft and hard labels), `full` (the whole
training set, hard labels: acc(full data, hard) of HLR, trained once per dataset, architecture and
recipe), `coreset` and `hardest` (real images picked from the barycenter, without recover).
`--full-data-acc X` gives acc(full data, hard) instead; `--hlr-reference teacher` uses the teacher's
top-1 as a labelled stand-in; `--ars` adds soft-label students without augmentation (ARS).
Reported (printed, results.md, results.json): every student's top-1 per seed, last and best epoch, and
IOR, HLR, LRS (and ARS) per seed and mean +- std: DD-Ranking's formulas under WMDD's evaluation recipe
(wmdd/metrics.py). `--ddranking` follows DD-Ranking 0.2.0's evaluator instead where it is well defined:
baseline rows at each lr of its grid, validation every 20 epochs, its percent-scale LRS beside ours.

Resume: every finished student is written at once to students/ with a fingerprint of all it depends on;
a rerun keeps those and trains only the rest (a changed setting retrains the stale ones).
`torchrun --nproc_per_node N evaluate.py ...` trains each student with DistributedDataParallel.

Full manual: docs/evaluate.md
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from wmdd import (artifacts, augment, baselines, classic, cli, data, dist, engine, metrics, models, protocol, softlabels,
                  students, subsets)


def get_args_parser():
    p = argparse.ArgumentParser("evaluate: train students on the distilled set, report against baselines",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_common_args(p, ipc=True)
    g = p.add_argument_group("student (unset: the stored labels' or the preset's value)")
    g.add_argument("--student", default=None,
                   help="architecture: one of the project's (resnet18, resnet50, resnet101, convnet, vit_tiny) or any "
                        "classification model of torchvision's registry (mobilenet_v2, swin_t, ...); default: the preset's")
    g.add_argument("--recipe", default="kd", choices=classic.RECIPE_NAMES,
                   help="kd: the SRe2L/WMDD soft-label recipe below; dc / dsa: the classic recipe of DC / DSA / DM "
                        "(ConvNet-IN student, SGD on hard labels, 300 epochs / 1000 with DSA augmentation; "
                        "wmdd/classic.py)")
    g.add_argument("--labels", default="stored", choices=["stored", "online", "hard"], help="label source")
    g.add_argument("--loss", default="kl", choices=["kl", "mse_gt"], help="soft-label loss")
    g.add_argument("--gt-weight", type=float, default=0.1, help="weight of the class-label CE in --loss mse_gt")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None, help="must equal relabel's with --labels stored")
    g.add_argument("--lr", type=float, default=None, help="AdamW learning rate (cosine schedule)")
    g.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (not on BN / biases)")
    g.add_argument("--temperature", type=float, default=None, help="KL temperature T")
    g.add_argument("--seeds", type=int, default=1, help="students per configuration: --seed, --seed+1, ...")
    g.add_argument("--eval-every", type=int, default=None, help="validate every N epochs (default epochs/5)")
    g.add_argument("--topk", type=int, default=None, help="online labels: compress like relabel --topk")
    g.add_argument("--rank", type=int, default=None, help="online labels: compress like relabel --rank")
    g.add_argument("--precision", default=None, choices=softlabels.PRECISIONS, help="online labels: as relabel")
    g.add_argument("--no-cutmix", action="store_true", help="online / hard labels: crops and flips only")
    g.add_argument("--soft-only", action="store_true", help="stored / online labels: train the soft-label students "
                   "only (no hard-label column, so no IOR_hard, HLR or LRS)")
    g.add_argument("--kd-weights", default=None, choices=["mixed-set", "own-batch"],
                   help="barycenter weight of each loss term: mixed-set (w / mean over the set, CutMix-area mix "
                        "of the two images'; --protocol wmdd) or own-batch (the image's own w / mean over the "
                        "batch; --protocol released, train_FKD.py). Equal with uniform weights")
    g.add_argument("--ddranking", action="store_true",
                   help="DD-Ranking 0.2.0's evaluator where it is well defined: baseline rows and the distilled "
                        "hard-label row trained at each lr of its grid (0.001 ... 0.1), the best kept; validation "
                        "every 20 epochs; its LRS on percent values (LRS_ddr) beside ours (docs/evaluate.md)")
    g.add_argument("--hard-label-aug", action="store_true",
                   help="hard-label students train on the soft recipe's crops + CutMix (default: unaugmented "
                        "images, as DD-Ranking's use_aug_for_hard=False)")
    g = p.add_argument_group("baselines, scores and files")
    g.add_argument("--baseline", default="random,full", help=baselines.help_text())
    g.add_argument("--full-batch-size", type=int, default=256,
                   help="the full-data student's batch (DD-Ranking's real_batch_size; independent of the IPC)")
    g.add_argument("--full-data-dir", default=None,
                   help="where the full-data student is kept (default <out>/students): one directory shared by "
                        "several runs of a dataset (other IPCs, rows) trains it once")
    g.add_argument("--full-data-acc", type=float, default=None,
                   help="acc(full data, hard) in percent, given (e.g. a published value): no full-data student")
    g.add_argument("--hlr-reference", default="student", choices=["student", "teacher"],
                   help="HLR's full-data accuracy: the full-data student (--baseline full) or, only when asked, "
                        "the teacher's val top-1 as a stand-in (labelled so)")
    g.add_argument("--ars", action="store_true",
                   help="also train soft-label students without augmentation (distilled and random): ARS")
    g.add_argument("--teacher", default=None, help="teacher checkpoint (default <out>/teacher.pt)")
    g.add_argument("--synthetic", default=None, help="synthetic set (default <out>/synthetic.pt)")
    g.add_argument("--labels-dir", default=None,
                   help="relabel's stored labels (default <out>/labels): students of another architecture "
                        "in their own --out")
    g.add_argument("--val-batch-size", type=int, default=500)
    return p


# ---------------------------------------------------------------------------------------------
# the losses: per-image terms, weighted, averaged over the batch (n: the whole batch's size, when these
# rows are one rank's part of it; default: these rows are the batch)


# Eq. KD: the knowledge-distillation loss, KL(softmax(t / T) || softmax(s / T)) per image, weighted
def soft_kl(student: torch.Tensor, teacher: torch.Tensor, T: float, weights: torch.Tensor, n=None) -> torch.Tensor:
    """sum_i w_i KL(softmax(t_i / T) || softmax(s_i / T)) / n. With w = 1 this is the released
    nn.KLDivLoss(reduction='batchmean')(log_softmax(s / T), softmax(t / T)) (no T^2 factor)."""
    log_p_t = F.log_softmax(teacher.float() / T, dim=1)
    kl = (log_p_t.exp() * (log_p_t - F.log_softmax(student / T, dim=1))).sum(dim=1)
    return (weights * kl).sum() / (n or student.shape[0])


def mixed_ce(student, y, y_mix, lam: float, weights, n=None) -> torch.Tensor:
    """CutMix cross-entropy: lam * CE(y) + (1 - lam) * CE(y of the pasted image), weighted."""
    per = lam * F.cross_entropy(student, y, reduction="none") + \
        (1.0 - lam) * F.cross_entropy(student, y_mix, reduction="none")
    return (weights * per).sum() / (n or student.shape[0])


def mse_gt(student, teacher, y, y_mix, lam: float, weights, gt_weight: float, n=None) -> torch.Tensor:
    """--loss mse_gt: MSE(s, t) + gt_weight * the CutMix cross-entropy, weighted."""
    per = ((student - teacher.float()) ** 2).mean(dim=1)
    per = per + gt_weight * (lam * F.cross_entropy(student, y, reduction="none")
                             + (1.0 - lam) * F.cross_entropy(student, y_mix, reduction="none"))
    return (weights * per).sum() / (n or student.shape[0])


# ---------------------------------------------------------------------------------------------
# one student


def train_student(iset, source, args, info, spec, plan, device, val_loader, seed: int, desc: str,
                  world: dist.World = dist.World()) -> dict:
    """Train one student on `iset` with labels from `source` (None: hard labels); validate.
    Under torchrun: DistributedDataParallel, each rank on its rows of every replayed batch."""
    t0 = time.time()
    torch.manual_seed(seed)
    model = models.build_model(args.student, info.num_classes, info.stem, info.image_size).to(device)
    channels_last = models.training_layout(model, device)
    net = model
    if world.enabled:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(students.param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: 0.5 * (1.0 + math.cos(math.pi * e / args.epochs)))
    norm_w = (iset.weights / iset.weights.mean()).to(device)
    labels = iset.labels.to(device)
    dataset = augment.ReplayDataset(iset.images, plan, spec, info.mean, info.std)
    if hasattr(source, "bind"):
        source.bind(dataset, plan)
    loader = DataLoader(dataset, batch_size=None, sampler=augment.ReplaySampler(plan, range(args.epochs)),
                        num_workers=args.workers)
    history, running, seen = [], 0.0, 0
    last_batch = plan.batches_per_epoch - 1
    bar = tqdm(loader, desc=desc, total=args.epochs * plan.batches_per_epoch, leave=False, disable=not world.is_main)
    for item in bar:
        n = item["x"].shape[0]
        rows = dist.rank_slice(n, world)  # this rank's part of the batch (all of it in one process)
        x = models.as_layout(item["x"][rows.start:rows.stop].to(device, non_blocking=True), channels_last)
        index, mix = item["index"].to(device), item["mix_index"].to(device)
        lam = float(item["lam_area"])
        y = labels[index]
        w = protocol.kd_image_weights(norm_w, index, mix, lam, args.kd_weights)[rows.start:rows.stop]
        y_own, y_pasted = y[rows.start:rows.stop], y[mix][rows.start:rows.stop]
        target = source.targets(item, x, rows) if source is not None else None
        net.train()
        out = net(x)
        if source is None:
            loss = mixed_ce(out, y_own, y_pasted, lam, w, n)
        elif args.loss == "kl":
            loss = soft_kl(out, target, args.temperature, w, n)
        else:
            loss = mse_gt(out, target, y_own, y_pasted, lam, w, args.gt_weight, n)
        batch_loss = dist.all_reduce_sum_(loss.detach().clone(), world).item()  # every rank's rows: the batch's
        if not math.isfinite(batch_loss):
            cli.fail(f"the student's loss became {batch_loss} in epoch {int(item['epoch']) + 1} ({desc}). "
                     "Lower --lr, or check the labels (rerun relabel.py).")
        optimizer.zero_grad(set_to_none=True)
        (loss * world.size).backward()  # DDP averages over ranks: the sum of the ranks' parts remains
        optimizer.step()
        running += batch_loss * n
        seen += n
        if int(item["batch"]) == last_batch:
            epoch = int(item["epoch"]) + 1
            scheduler.step()
            if epoch % args.eval_every == 0 or epoch == args.epochs:
                val = engine.validate(model, val_loader, device, progress=False, world=world)
                history.append({"epoch": epoch, "train_loss": running / seen, **val})
                bar.set_postfix(loss=f"{running / seen:.4f}", val_top1=f"{val['top1']:.2f}")
                running, seen = 0.0, 0
    final, best = history[-1], max(history, key=lambda h: h["top1"])
    return {"seed": seed, "top1": final["top1"], "top5": final["top5"], "best_top1": best["top1"],
            "best_epoch": best["epoch"], "history": history,
            "wall_s": round(time.time() - t0, 2), "world_size": world.size}


def train_job(job, args, info, device, val_loader, world) -> dict:
    """One job's student at args.lr: the classic recipe's (--recipe dc / dsa) or the KD recipe's."""
    if args.recipe != "kd":
        return classic.train_job(job, args, info, device, val_loader, world)
    desc = f"{job.key} seed {job.seed}" + (f" lr {args.lr:g}" if args.ddranking else "")
    return train_student(job.iset, job.source, args, info, job.spec, job.plan, device, val_loader, job.seed,
                         desc=desc, world=world)


# ---------------------------------------------------------------------------------------------
# the run: every student (kept when finished), then the scores


def main(args):
    return engine.stage_main(run, args)


def run(args, info, world, device, t0):
    log = world.print
    args.out = cli.default_out(args)
    classic.resolve(args)  # --recipe dc / dsa: hard labels, ConvNet-IN, the recipe's epochs, lr, batch
    args.student = args.student or info.arch
    students.check_flags(args)
    cli.seed_everything(args.seed)
    paths = artifacts.run_paths(args.out)
    teacher_path = args.teacher or paths.teacher
    synthetic_path = args.synthetic or paths.synthetic
    bases = {b.name: b for b in baselines.parse(args.baseline)}
    labels_dir = args.labels_dir or paths.labels

    syn = subsets.load_synthetic(synthetic_path, info, args.ipc, teacher_path)
    settings, spec, aug_seed, (topk, precision, rank) = students.label_recipe(args, info, syn, labels_dir,
                                                                              teacher_path, synthetic_path)
    data.preset_defaults(args, "evaluate")
    if args.epochs < 1 or args.batch_size < 1 or args.full_batch_size < 1:
        cli.fail(f"--epochs, --batch-size and --full-batch-size must be at least 1 (got {args.epochs}, "
                 f"{args.batch_size}, {args.full_batch_size}).")
    if args.soft_only and args.labels == "hard":
        cli.fail("--soft-only trains the soft-label students only, but --labels hard (or --recipe dc / dsa) has none: "
                 "drop --soft-only, or use --labels online / stored.")
    ddranking = students.ddranking_mode(args)  # --ddranking: its validation interval
    if args.eval_every is None:
        args.eval_every = max(1, args.epochs // 5)
    full_source = baselines.full_data_source(args, bases)
    soft = args.labels != "hard"
    needs_teacher = args.labels == "online" or ("random" in bases and soft) or (args.ars and soft) \
        or full_source == "teacher"
    plain = augment.plain_spec(info, syn.images.shape[-1])
    hard_spec = spec if args.hard_label_aug else plain
    if world.is_main:
        engine.print_config("evaluate", args, classes=info.num_classes, image_size=info.image_size, stem=info.stem,
                            device_resolved=str(device), augmentation=spec.as_dict(), augmentation_seed=aug_seed,
                            hard_label_augmentation=hard_spec.as_dict(), full_data_accuracy_from=full_source,
                            ddranking_mode=ddranking,
                            label_compression=f"topk={topk} rank={rank} precision={precision}", world_size=world.size,
                            kernels="none used by this stage (student training and teacher forward passes only)")

    teacher, teacher_art = (None, None)
    if needs_teacher or os.path.isfile(teacher_path):
        teacher, teacher_art = models.load_teacher(teacher_path, info, device)
    val_set = data.build_dataset(info, args, "val")
    if world.enabled:  # each rank validates its block; engine.validate sums the counts
        val_set = Subset(val_set, list(dist.rank_slice(len(val_set), world)))
    val_set = engine.in_memory(val_set)  # transformed once, not at every validation of every student
    val_loader = DataLoader(val_set, batch_size=args.val_batch_size, num_workers=args.workers)
    teacher_meta = (teacher_art or {}).get("meta") or {}
    teacher_top1 = teacher_meta.get("val_top1")
    if teacher is not None and teacher_top1 is None:  # a plain state_dict: measure it once
        teacher_top1 = engine.validate(teacher, val_loader, device, desc="teacher", progress=world.is_main,
                                       world=world)["top1"]
    if full_source == "teacher" and teacher_top1 is None:
        cli.fail(f"--hlr-reference teacher needs the teacher's accuracy, but there is no teacher at {teacher_path}. "
                 "Pass --teacher, or --full-data-acc X, or drop --hlr-reference (the full-data student).")

    seeds = [args.seed + s for s in range(args.seeds)]
    sha = artifacts.sha256_file(synthetic_path)
    upstream = {"synthetic_sha256": sha, "label_settings": settings,
                "teacher_sha256": artifacts.sha256_file(teacher_path) if teacher is not None else None}
    jobs = students.student_jobs(args, info, syn, bases, seeds, teacher, settings, paths, spec, plain, hard_spec,
                                 aug_seed, (topk, precision, rank), full_source, upstream)
    records = {}
    for job, rec in zip(jobs, students.finished_records(jobs, world, paths.students)):
        if rec is None:
            rec = students.over_lr_grid(job, args, lambda a: train_job(job, a, info, device, val_loader, world))
            if world.is_main:
                students.save_record(job, rec)
        records[(job.key, job.seed)] = rec
        log(f"[evaluate] {job.key} seed {job.seed}: top-1 {rec['top1']:.2f} (best {metrics.accuracy(rec, 'best'):.2f}) "
            f"top-5 {rec['top5']:.2f} ({rec['wall_s']:.1f}s)"
            + (f", lr {rec['lr']:g} of DD-Ranking's grid" if "lr" in rec else ""))

    config = {**cli.args_dict(args), "seeds_used": seeds, "augmentation": spec.as_dict(),
              "hard_label_augmentation": hard_spec.as_dict(), "augmentation_seed": aug_seed, "student": args.student}
    report = metrics.results(args, config, jobs, records, full_source, settings, teacher_top1, teacher_art, world.size,
                             {"synthetic": synthetic_path, "synthetic_sha256": sha}, t0)
    table = metrics.markdown(report)
    if world.is_main:
        os.makedirs(args.out, exist_ok=True)
        artifacts.write_text(paths.results_json, json.dumps(report, indent=1, default=str))
        artifacts.write_text(paths.results_md, table)
    log(table)
    log(f"[evaluate] wrote {paths.results_json} and {paths.results_md} in {time.time() - t0:.1f}s")
    dist.barrier(world)
    return report


if __name__ == "__main__":
    cli.run(main, get_args_parser())
