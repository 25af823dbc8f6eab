"""Stage 5 - evaluate: train fresh students on the distilled set and report them beside honest baselines.

    python evaluate.py --dataset digits --ipc 10 --out runs/digits --seeds 3
    python evaluate.py --dataset imagenet --data-dir /data/imagenet --ipc 10 --out runs/in1k --student resnet50
    python evaluate.py ... --labels online      # teacher on the fly, nothing stored
    python evaluate.py ... --labels hard        # plain cross-entropy on the class labels

Recipe (the released SRe2L/WMDD one): every batch is the replayed relabel batch (same images, crops,
flips and CutMix boxes: wmdd/augment.py); the loss is KL(softmax(t / T) || softmax(s / T)) with T = 20,
averaged over the batch without a T^2 factor (as released), each image weighted by its normalised
barycenter weight (mean 1 over the set; a CutMix image takes the area-weighted mix of its two
images' weights; uniform weights give exactly the released loss). `--loss mse_gt` is the alternative
MSE(s, t) + --gt-weight * CE(s, class labels mixed by CutMix area). AdamW(lr 1e-3, betas 0.9/0.999,
weight decay 0.01 except on BatchNorm / LayerNorm parameters and biases), cosine schedule per epoch,
--epochs and the batch size of the stored labels (a different --epochs or --batch-size is an error).

Labels (`--labels`): `stored` reads relabel's files (default: <out>/labels; `--labels-dir` points at
another run's, e.g. to train students of several architectures on one set, each in its own --out with
`--synthetic` and `--labels-dir` of that run), `online` runs the teacher on each
batch (nothing stored; compressed as relabel would when --topk / --rank / --precision are given),
`hard` is cross-entropy on the class labels (CutMix-mixed by area).

Honest comparison (DESIGN "Honest comparison", DD-Ranking arXiv 2505.13300): with `--baseline random`
(default) the same recipe trains students on IPC random real training images per class (seeded), with
the teacher's soft labels computed online and compressed as the stored ones, and with hard labels; the
distilled set is also trained with hard labels. Reported: top-1 / top-5 on the real validation set
(every --eval-every epochs and at the end), mean +- sample std over --seeds students, the teacher's
full-data accuracy, IOR = acc(distilled) - acc(random) and HLR = acc(full data, hard) - acc(distilled,
hard), where the teacher's val top-1 stands in for the full-data hard-label accuracy.

Writes to --out: `results.json` (every number per seed, the config, the label settings) and
`results.md` (the table, also printed).

Resume: every finished student is written at once to `students/<images>-<labels>-seed<s>.json`
(atomically, with a fingerprint of everything it depends on: settings, seed, synthetic set, teacher,
labels); a rerun of the same command (e.g. after a SIGKILL) keeps those and trains only the rest, so
the final results equal an uninterrupted run's. Change a setting and the stale students are retrained.

Several processes: `torchrun --nproc_per_node N evaluate.py ...` trains each student with
DistributedDataParallel. The batches are relabel's (replayed, not drawn by a DistributedSampler): each
rank takes its contiguous part of every batch, and the loss is scaled so that DDP's gradient average is
the whole batch's gradient. On CUDA, BatchNorm is synchronised (SyncBatchNorm), so a student sees the
statistics of the whole batch as in one process; gloo on CPU has no SyncBatchNorm, so there each
rank's BatchNorm normalises its own part of the batch (a BatchNorm-free student such as vit_tiny
trains as in one process). Validation is split across ranks and the counts summed; rank 0 writes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from wmdd import artifacts, augment, cli, data, dist, engine, models, softlabels, subsets


def get_args_parser():
    p = argparse.ArgumentParser("evaluate: train students on the distilled set, report against baselines",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_common_args(p, ipc=True)
    g = p.add_argument_group("student (unset: the stored labels' or the preset's value)")
    g.add_argument("--student", default=None, choices=models.ARCHES, help="architecture (default: the preset's)")
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
    g = p.add_argument_group("baselines and files")
    g.add_argument("--baseline", default="random", choices=["random", "none"],
                   help="also train on a random real subset of the same IPC, same recipe (DD-Ranking)")
    g.add_argument("--teacher", default=None, help="teacher checkpoint (default <out>/teacher.pt)")
    g.add_argument("--synthetic", default=None, help="synthetic set (default <out>/synthetic.pt)")
    g.add_argument("--labels-dir", default=None,
                   help="relabel's stored labels (default <out>/labels): students of another architecture "
                        "in their own --out")
    g.add_argument("--val-batch-size", type=int, default=500)
    return p


# ---------------------------------------------------------------------------------------------
# losses: per-image terms, weighted, averaged over the batch (n: the whole batch's size, when these
# rows are one rank's part of it; default: these rows are the batch)


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
    per = ((student - teacher.float()) ** 2).mean(dim=1)
    per = per + gt_weight * (lam * F.cross_entropy(student, y, reduction="none")
                             + (1.0 - lam) * F.cross_entropy(student, y_mix, reduction="none"))
    return (weights * per).sum() / (n or student.shape[0])


def image_weights(norm_weights: torch.Tensor, index: torch.Tensor, mix_index: torch.Tensor, lam: float):
    """Per-image loss weight of a CutMix batch: lam * w[own image] + (1 - lam) * w[pasted image]."""
    w = norm_weights[index]
    return lam * w + (1.0 - lam) * w[mix_index]


def param_groups(model, weight_decay: float) -> list:
    """Weight decay on weights of conv / linear layers only: not on BN / LN parameters or biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------
# label sources


class StoredLabels:
    """relabel's files, read one epoch at a time, each batch checked against its replay digest."""
    kind = "stored"

    def __init__(self, labels_dir: str, settings: dict, plan: augment.ReplayPlan):
        self.dir, self.settings, self.num_classes = labels_dir, settings, settings["num_classes"]
        self.offsets = [0]
        for n in plan.batch_sizes():
            self.offsets.append(self.offsets[-1] + n)
        self.epoch, self.obj = None, None

    def targets(self, item: dict, x: torch.Tensor, rows: range | None = None) -> torch.Tensor:
        """The soft targets of batch `item` (of its `rows` when x is one rank's part of the batch)."""
        e, b = int(item["epoch"]), int(item["batch"])
        rows = rows or range(x.shape[0])
        if e != self.epoch:
            self.obj, self.epoch = softlabels.read_epoch(self.dir, e, self.settings), e
        stored = int(self.obj["digests"][b])
        if stored != int(item["digest"]):
            cli.fail(f"the replayed augmentation of epoch {e} batch {b} differs from the one relabel used "
                     f"(digest {stored} vs {int(item['digest'])}): another torch version or augmentation code. "
                     f"Rerun relabel.py in this environment.")
        start = self.offsets[b] + rows.start
        entry = softlabels.slice_entry(self.obj["entry"], start, start + len(rows))
        return softlabels.decode(entry, self.num_classes).to(x.device)


class OnlineLabels:
    """The teacher on each batch, optionally compressed exactly as relabel would store it. A rank-r
    codec needs the whole epoch (its basis is the epoch's): the epoch's batches are then replayed and
    labelled at its first batch, so the targets equal stored ones bit for bit."""
    kind = "online"

    def __init__(self, teacher, num_classes: int, topk=None, precision=None, rank=None):
        self.teacher, self.num_classes = teacher, num_classes
        self.topk, self.precision, self.rank = topk, precision, rank
        self.dataset = self.plan = self.epoch = self.entry = None

    def bind(self, dataset, plan) -> None:
        """The replay the student trains on (used by the per-epoch codec)."""
        self.dataset, self.plan, self.epoch = dataset, plan, None

    @torch.no_grad()
    def targets(self, item: dict, x: torch.Tensor, rows: range | None = None) -> torch.Tensor:
        """The soft targets of batch `item` (of its `rows` when x is one rank's part of the batch)."""
        rows = rows or range(x.shape[0])
        if self.rank is not None:
            e, b = int(item["epoch"]), int(item["batch"])
            if e != self.epoch:
                logits = [self.teacher(self.dataset[(e, k)]["x"].to(x.device))
                          for k in range(self.plan.batches_per_epoch)]
                self.entry = softlabels.encode(torch.cat(logits), None, self.precision or "fp16", self.rank)
                self.epoch = e
            start = b * self.plan.batch_size + rows.start
            entry = softlabels.slice_entry(self.entry, start, start + len(rows))
            return softlabels.decode(entry, self.num_classes).to(x.device)
        t = self.teacher(x)
        if self.topk is None and self.precision is None:
            return t.float()
        return softlabels.decode(softlabels.encode(t, self.topk, self.precision or "fp16"), self.num_classes).to(x.device)


# ---------------------------------------------------------------------------------------------
# one student


def train_student(iset, source, args, info, spec, plan, device, val_loader, seed: int, desc: str,
                  world: dist.World = dist.World()) -> dict:
    """Train one student on `iset` with labels from `source` (None: hard labels); validate.
    Under torchrun: DistributedDataParallel, each rank on its rows of every replayed batch."""
    t0 = time.time()
    torch.manual_seed(seed)
    model = models.build_model(args.student, info.num_classes, info.stem, info.image_size).to(device)
    net = model
    if world.enabled:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999))
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
        x = item["x"][rows.start:rows.stop].to(device, non_blocking=True)
        index, mix = item["index"].to(device), item["mix_index"].to(device)
        lam = float(item["lam_area"])
        y = labels[index]
        w = image_weights(norm_w, index, mix, lam)[rows.start:rows.stop]
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
    final = history[-1]
    return {"seed": seed, "top1": final["top1"], "top5": final["top5"], "history": history,
            "wall_s": round(time.time() - t0, 2), "world_size": world.size}


# ---------------------------------------------------------------------------------------------
# finished students (resume)


def student_fingerprint(args, key: str, seed: int, upstream: dict) -> str:
    """sha256 of everything one student's result depends on: a rerun keeps a student file only if equal."""
    config = {k: v for k, v in cli.args_dict(args).items()
              if k not in ("seeds", "baseline", "workers", "device", "impl", "out", "data_dir", "download",
                           "val_batch_size", "teacher", "synthetic", "labels_dir")}
    blob = json.dumps({"config": config, "key": key, "seed": seed, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def student_path(paths, key: str, seed: int) -> str:
    return os.path.join(paths.students, f"{key.replace('/', '-')}-seed{seed}.json")


def finished_student(path: str, fingerprint: str):
    """The stored record if `path` holds a finished student with this fingerprint, else None
    (a missing, torn or stale file is trained again)."""
    try:
        with open(path) as fh:
            obj = json.load(fh)
        return obj["record"] if obj.get("fingerprint") == fingerprint else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------
# reporting


def summarize(values: list) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def paired(a: list, b: list) -> dict:
    diffs = [x - y for x, y in zip(a, b)]
    return {"per_seed": diffs, **summarize(diffs)}


def fmt(s: dict | None, digits: int = 2) -> str:
    if s is None:
        return "–"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def markdown(report: dict) -> str:
    c = report["config"]
    lines = [f"## evaluate: {c['dataset']} (resolution {c['resolution']}), IPC {c['ipc']}, student {c['student']}, "
             f"{c['seeds']} seed(s), {c['epochs']} epochs, batch {c['batch_size']}, T = {c['temperature']}, "
             f"loss {c['loss']}",
             "", "| images | labels | top-1 (%) | top-5 (%) |", "|---|---|---|---|"]
    for run in report["runs"]:
        lines.append(f"| {run['images']} | {run['label_desc']} | {fmt(run['top1'])} | {fmt(run['top5'])} |")
    t = report["teacher_val_top1"]
    lines.append(f"| full training set | hard: teacher val top-1 (stand-in) | "
                 f"{'–' if t is None else f'{t:.2f}'} | – |")
    lines.append("")
    m = report["metrics"]
    if "IOR" in m:
        lines.append(f"- IOR = acc(distilled, soft) − acc(random, soft) = **{m['IOR']['mean']:+.2f}** pt "
                     f"(± {m['IOR']['std']:.2f}, paired by seed)")
    if "IOR_hard" in m:
        lines.append(f"- IOR with hard labels = {m['IOR_hard']['mean']:+.2f} pt (± {m['IOR_hard']['std']:.2f})")
    if "HLR" in m:
        lines.append(f"- HLR = acc(full data, hard) − acc(distilled, hard) = **{m['HLR']['mean']:+.2f}** pt "
                     f"(± {m['HLR']['std']:.2f}); the full-data hard-label accuracy is the teacher's val top-1 "
                     f"({report['teacher_arch']}, {t:.2f}%), a stand-in for a student trained on the full set")
    lines.append("- mean ± sample std over seeds; top-1 / top-5 on the real validation set after the last epoch")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------


def resolve_label_settings(args, info, syn, labels_dir, teacher_path, synthetic_path):
    """With --labels stored: the stored settings, checked against this run. Fills epochs / batch size."""
    manifest = softlabels.read_manifest(labels_dir)
    settings = manifest["settings"]
    for flag, key in (("epochs", "epochs"), ("batch_size", "batch_size")):
        given = getattr(args, flag)
        if given is not None and given != settings[key]:
            cli.fail(f"--{flag.replace('_', '-')} {given} differs from the stored labels' {key} {settings[key]} "
                     f"({softlabels.manifest_path(labels_dir)}): a student replays relabel's batches, so both "
                     f"must match. Drop the flag (it defaults to the stored {settings[key]}), or rerun relabel.py "
                     f"with --{flag.replace('_', '-')} {given}.")
        setattr(args, flag, settings[key])
    if settings["synthetic_sha256"] != artifacts.sha256_file(synthetic_path):
        cli.fail(f"the labels in {labels_dir} were made from another synthetic set than {synthetic_path} "
                 "(sha256 differs): the images changed since relabel. Rerun relabel.py.")
    if os.path.isfile(teacher_path) and settings["teacher_sha256"] != artifacts.sha256_file(teacher_path):
        cli.fail(f"the labels in {labels_dir} were made by another teacher than {teacher_path} (sha256 "
                 "differs). Rerun relabel.py with this teacher, or pass --teacher with the one used.")
    if settings["num_images"] != len(syn) or settings["num_classes"] != info.num_classes:
        cli.fail(f"the labels in {labels_dir} are for {settings['num_images']} images of "
                 f"{settings['num_classes']} classes; {synthetic_path} has {len(syn)} of {info.num_classes}. "
                 "Rerun relabel.py.")
    if settings["augment"].get("version") != augment.AUG_VERSION:
        cli.fail(f"the labels in {labels_dir} use augmentation version {settings['augment'].get('version')}, "
                 f"this code replays version {augment.AUG_VERSION}. Rerun relabel.py.")
    settings.setdefault("rank", None)
    for flag in ("topk", "rank", "precision"):
        if getattr(args, flag) is not None and getattr(args, flag) != settings[flag]:
            cli.fail(f"--{flag} {getattr(args, flag)} differs from the stored labels' {settings[flag]}; drop the "
                     "flag (the random baseline uses the stored compression) or rerun relabel.py.")
    return settings


def main(args):
    return dist.stage_main(run, args)


def run(args, info, world, device, t0):
    log = world.print
    args.out = cli.default_out(args)
    args.student = args.student or info.arch
    cli.seed_everything(args.seed)
    paths = artifacts.run_paths(args.out)
    teacher_path = args.teacher or paths.teacher
    synthetic_path = args.synthetic or paths.synthetic
    labels_dir = args.labels_dir or paths.labels
    if args.seeds < 1:
        cli.fail(f"--seeds must be at least 1, got {args.seeds}.")

    syn = subsets.load_synthetic(synthetic_path, info, args.ipc, teacher_path)
    settings = None
    if args.labels == "stored":
        settings = resolve_label_settings(args, info, syn, labels_dir, teacher_path, synthetic_path)
        spec = augment.AugmentSpec.from_dict(settings["augment"])
        aug_seed, topk, precision, rank = settings["seed"], settings["topk"], settings["precision"], settings["rank"]
        if args.no_cutmix and spec.cutmix:
            cli.fail("--no-cutmix does not apply to --labels stored: the student replays relabel's batches, "
                     "which used CutMix. Rerun relabel.py with --no-cutmix, or use --labels online / hard.")
    else:
        subsets.default_batch_size(args)
        spec = augment.spec_for(info, source_size=syn.images.shape[-1], cutmix=not args.no_cutmix)
        aug_seed, topk, precision, rank = args.seed, args.topk, args.precision, args.rank
        if topk is not None and rank is not None:
            cli.fail("--topk and --rank are two ways to compress the labels: pass one of them.")
    data.preset_defaults(args, "evaluate")
    if args.epochs < 1 or args.batch_size < 1:
        cli.fail(f"--epochs and --batch-size must be at least 1 (got {args.epochs}, {args.batch_size}).")
    if args.eval_every is None:
        args.eval_every = max(1, args.epochs // 5)
    needs_teacher = args.labels == "online" or (args.baseline == "random" and args.labels != "hard")
    if world.is_main:
        cli.print_config("evaluate", args, classes=info.num_classes, image_size=info.image_size, stem=info.stem,
                         device_resolved=str(device), augmentation=spec.as_dict(), augmentation_seed=aug_seed,
                         label_compression=f"topk={topk} rank={rank} precision={precision}", world_size=world.size,
                         kernels="none used by this stage (student training and teacher forward passes only)")

    teacher, teacher_art = (None, None)
    if needs_teacher or os.path.isfile(teacher_path):
        teacher, teacher_art = models.load_teacher(teacher_path, info, device)
    val_set = data.build_dataset(info, args, "val")
    if world.enabled:  # each rank validates its block; engine.validate sums the counts
        val_set = Subset(val_set, list(dist.rank_slice(len(val_set), world)))
    val_loader = DataLoader(val_set, batch_size=args.val_batch_size, num_workers=args.workers)
    teacher_meta = (teacher_art or {}).get("meta") or {}
    teacher_top1 = teacher_meta.get("val_top1")
    if teacher is not None and teacher_top1 is None:  # a plain state_dict: measure it once
        teacher_top1 = engine.validate(teacher, val_loader, device, desc="teacher", progress=world.is_main,
                                       world=world)["top1"]

    plan = augment.ReplayPlan(len(syn), args.batch_size, aug_seed)
    soft_desc = {"stored": "soft, stored", "online": "soft, teacher online", "hard": "hard"}[args.labels]
    comp = softlabels.describe(topk, precision or ("fp16" if topk or rank else "fp32"), rank)
    loss_desc = f"T = {args.temperature:g}" if args.loss == "kl" else f"MSE + {args.gt_weight:g} CE"
    configs = []  # (key, images label, ImageSet, label source, description)
    if args.labels == "stored":
        configs.append(("distilled/soft", "distilled", syn, StoredLabels(labels_dir, settings, plan),
                        f"{soft_desc} ({comp}), {loss_desc}"))
    elif args.labels == "online":
        configs.append(("distilled/soft", "distilled", syn, OnlineLabels(teacher, info.num_classes, topk, precision, rank),
                        f"{soft_desc} ({comp}), {loss_desc}"))
    configs.append(("distilled/hard", "distilled", syn, None, "hard"))
    if args.baseline == "random":
        real = subsets.random_real_subset(info, args, syn.ipc, args.seed)
        if args.labels != "hard":
            configs.append(("random/soft", f"random real (seed {args.seed})", real,
                            OnlineLabels(teacher, info.num_classes, topk, precision, rank),
                            f"soft, teacher online ({comp}, as distilled), {loss_desc}"))
        configs.append(("random/hard", f"random real (seed {args.seed})", real, None, "hard"))

    seeds = [args.seed + s for s in range(args.seeds)]
    upstream = {"synthetic_sha256": artifacts.sha256_file(synthetic_path), "label_settings": settings,
                "teacher_sha256": artifacts.sha256_file(teacher_path) if teacher is not None else None,
                "random_subset": real.indices if args.baseline == "random" else None}
    # rank 0 decides which students are finished; every rank trains the same remaining ones
    fingerprints = {(key, s): student_fingerprint(args, key, s, upstream) for key, *_ in configs for s in seeds}
    finished = None
    if world.is_main:
        finished = {(key, s): finished_student(student_path(paths, key, s), fp) for (key, s), fp in fingerprints.items()}
        kept = sum(r is not None for r in finished.values())
        if kept:
            print(f"[evaluate] resuming: {kept} of {len(finished)} students already finished in {paths.students}")
    finished = dist.gather_objects(finished, world, None)[0]
    runs = []
    for key, images_desc, iset, source, label_desc in configs:
        per_seed = []
        for s in seeds:
            rec = finished[(key, s)]
            if rec is None:
                iplan = plan if len(iset) == len(syn) else augment.ReplayPlan(len(iset), args.batch_size, aug_seed)
                rec = train_student(iset, source, args, info, spec, iplan, device, val_loader, s,
                                    desc=f"{key} seed {s}", world=world)
                if world.is_main:
                    os.makedirs(paths.students, exist_ok=True)
                    _atomic_write(student_path(paths, key, s), json.dumps(
                        {"fingerprint": fingerprints[(key, s)], "record": rec}, indent=1))
            per_seed.append(rec)
            log(f"[evaluate] {key} seed {s}: top-1 {rec['top1']:.2f} top-5 {rec['top5']:.2f} ({rec['wall_s']:.1f}s)")
        runs.append({"key": key, "images": images_desc, "label_desc": label_desc, "per_seed": per_seed,
                     "top1": summarize([r["top1"] for r in per_seed]), "top5": summarize([r["top5"] for r in per_seed])})

    by_key = {r["key"]: [x["top1"] for x in r["per_seed"]] for r in runs}
    metrics = {}
    if "distilled/soft" in by_key and "random/soft" in by_key:
        metrics["IOR"] = paired(by_key["distilled/soft"], by_key["random/soft"])
    if "random/hard" in by_key:
        metrics["IOR_hard"] = paired(by_key["distilled/hard"], by_key["random/hard"])
    if teacher_top1 is not None:
        metrics["HLR"] = paired([teacher_top1] * len(seeds), by_key["distilled/hard"])
    report = {
        "config": {**cli.args_dict(args), "seeds_used": seeds, "augmentation": spec.as_dict(),
                   "augmentation_seed": aug_seed, "student": args.student},
        "label_settings": settings, "teacher_val_top1": teacher_top1,
        "teacher_arch": (teacher_art or {}).get("model_args", {}).get("arch") if teacher_art else None,
        "hlr_note": "acc(full data, hard) is the teacher's val top-1 (a stand-in for a student trained on "
                    "the full training set with hard labels)",
        "random_subset_indices": upstream["random_subset"], "world_size": world.size,
        "runs": runs, "metrics": metrics,
        "upstream": {"synthetic": synthetic_path, "synthetic_sha256": artifacts.sha256_file(synthetic_path)},
        "versions": artifacts.library_versions(), "wall_time_s": round(time.time() - t0, 1),
    }
    report["config"]["seeds"] = args.seeds
    report["versions"] = {k: str(v) for k, v in report["versions"].items()}
    table = markdown(report)
    if world.is_main:
        os.makedirs(args.out, exist_ok=True)
        _atomic_write(paths.results_json, json.dumps(report, indent=1, default=str))
        _atomic_write(paths.results_md, table)
    log(table)
    log(f"[evaluate] wrote {paths.results_json} and {paths.results_md} in {time.time() - t0:.1f}s")
    dist.barrier(world)
    return report


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    cli.run(main, get_args_parser())
