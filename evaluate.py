"""Stage 5 - evaluate: train fresh students on the distilled set and report them beside honest baselines.

    python evaluate.py --dataset digits --ipc 10 --out runs/digits --seeds 3
    python evaluate.py --dataset imagenet --data-dir /data/imagenet --ipc 10 --out runs/in1k --student resnet50
    python evaluate.py ... --labels online      # teacher on the fly, nothing stored
    python evaluate.py ... --labels hard        # plain cross-entropy on the class labels
    python evaluate.py ... --student mobilenet_v2 --full-data-acc 56.5 --ars

Recipe (the released SRe2L/WMDD one): every soft-label batch is the replayed relabel batch (same images, crops,
flips and CutMix boxes: wmdd/augment.py); the loss is KL(softmax(t / T) || softmax(s / T)) with T = 20,
averaged over the batch without a T^2 factor (as released), each image weighted by its normalised
barycenter weight (mean 1 over the set; a CutMix image takes the area-weighted mix of its two
images' weights; uniform weights give exactly the released loss; `--kd-weights own-batch`, under
`--protocol released`, is the released weighting: the image's own weight over its batch's mean). `--loss mse_gt` is the alternative
MSE(s, t) + --gt-weight * CE(s, class labels mixed by CutMix area). AdamW(lr 1e-3, betas 0.9/0.999,
weight decay 0.01 except on BatchNorm / LayerNorm parameters and biases), cosine schedule per epoch,
--epochs and the batch size of the stored labels (a different --epochs or --batch-size is an error).

`--protocol released` (wmdd/protocol.py) sets --kd-weights own-batch and refuses a synthetic.pt made
under the other protocol's stored-image choices (exit code 2); the batch-size default is relabel's rule.

Labels (`--labels`): `stored` reads relabel's files (default: <out>/labels; `--labels-dir` points at
another run's, e.g. to train students of several architectures on one set, each in its own --out with
`--synthetic` and `--labels-dir` of that run), `online` runs the teacher on each
batch (nothing stored; compressed as relabel would when --topk / --rank / --precision are given),
`hard` is cross-entropy on the class labels.

Students (`--student`): the project's resnet18 / resnet50 / resnet101 / convnet / vit_tiny, or any
classification model of torchvision's registry by name (mobilenet_v2, efficientnet_b0, densenet121,
swin_t, vit_b_16, ...: `torchvision.models.list_models(module=torchvision.models)`), untrained, with the
small-input stem of its family at 32/64 px (wmdd/models.py says which, per family). An unknown name
stops with the list of valid ones (exit 2).

Honest comparison, as DD-Ranking (arXiv 2505.13300; its evaluator `ddranking` 0.2.0) defines it:
- `--baseline random,full` (default; a comma list, or `none`; wmdd/baselines.py builds each set):
  `random` trains the same recipe on IPC random real training images per class, a NEW subset for every
  seed (seed s -> subset s, its indices in results.json), with the teacher's soft labels computed online
  and compressed as the stored ones, and with hard labels; `full` trains one hard-label student of the
  evaluation architecture (`--student`) on the whole real training set with the same recipe (epochs,
  optimiser, schedule), in batches of `--full-batch-size` (default 256, DD-Ranking's real_batch_size: the
  IPC-bound KD batch, 10 at IPC 1, would make it 25x more steps): acc(full data, hard) for HLR. It
  depends only on the dataset, the architecture and the recipe (not the synthetic set, teacher, labels
  or IPC), so it is trained once (with --seed) and kept in students/ (or `--full-data-dir DIR`, shared by
  the runs of one dataset: the paper harness keeps it in shared/students/) across reruns and IPCs; a
  changed recipe retrains it.
- `--full-data-acc X`: use X (percent, e.g. a published value for ImageNet) instead of training the
  full-data student; recorded and printed as user-given. Outside [0, 100]: refused (exit 2).
- `--hlr-reference teacher`: the teacher's val top-1 stands in for acc(full data, hard), only when asked,
  and labelled STAND-IN in every table (it is another architecture, trained with another recipe).
- Hard-label students (distilled, random, full) train on the unaugmented images (whole image, no flip,
  no CutMix; a new order every epoch), as DD-Ranking's default use_aug_for_hard=False feeds its tensors.
  `--hard-label-aug` gives them the soft recipe's crops + CutMix instead (this project's earlier behaviour).
- `--ars`: also train soft-label students WITHOUT augmentation on the distilled set and on each seed's
  random subset (teacher labels on the plain images, compressed as stored): ARS. Cost: 2 more students
  per seed (with the default baselines, 2 per seed on top of 4 per seed plus the one full-data student).
- Reported (printed, results.md, results.json): every student's top-1 per seed after the last epoch
  (the paper's number) and at its best validated epoch (DD-Ranking's), mean +- sample std; and per seed
  and mean +- std, for both variants, IOR = acc(distilled, soft) - acc(random, soft), IOR with hard
  labels, HLR = acc(full, hard) - acc(distilled, hard), LRS = (e^a - e^-1) / (e - e^-1) with
  a = 0.5 IOR - 0.5 HLR (fractions), and with --ars ARS (wmdd/metrics.py has each formula).
  Validation every --eval-every epochs and at the end.

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
import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from wmdd import artifacts, augment, baselines, cli, data, dist, engine, metrics, models, protocol, softlabels, subsets
from wmdd.students import finished_student, is_full_data, student_fingerprint, student_path


def get_args_parser():
    p = argparse.ArgumentParser("evaluate: train students on the distilled set, report against baselines",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_common_args(p, ipc=True)
    g = p.add_argument_group("student (unset: the stored labels' or the preset's value)")
    g.add_argument("--student", default=None,
                   help="architecture: one of the project's (resnet18, resnet50, resnet101, convnet, vit_tiny) or any "
                        "classification model of torchvision's registry (mobilenet_v2, swin_t, ...); default: the preset's")
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
    g.add_argument("--kd-weights", default=None, choices=["mixed-set", "own-batch"],
                   help="barycenter weight of each loss term: mixed-set (w / mean over the set, CutMix-area mix "
                        "of the two images'; --protocol wmdd) or own-batch (the image's own w / mean over the "
                        "batch; --protocol released, train_FKD.py). Equal with uniform weights")
    g.add_argument("--hard-label-aug", action="store_true",
                   help="hard-label students train on the soft recipe's crops + CutMix (default: unaugmented "
                        "images, as DD-Ranking's use_aug_for_hard=False)")
    g = p.add_argument_group("baselines, scores and files")
    g.add_argument("--baseline", default="random,full",
                   help="comma list of real-image baselines trained with the same recipe: random (IPC random real "
                        "images per class, a new subset per seed), full (the full training set, hard labels: HLR's "
                        "reference); or none")
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


def image_weights(norm_weights: torch.Tensor, index: torch.Tensor, mix_index: torch.Tensor, lam: float,
                  mode: str = "mixed-set"):
    """Per-image loss weight of a CutMix batch (--kd-weights, wmdd/protocol.py): mixed-set:
    lam * w[own image] + (1 - lam) * w[pasted image]; own-batch: w[own image] / its mean over the batch."""
    return protocol.kd_image_weights(norm_weights, index, mix_index, lam, mode)


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
    channels_last = models.training_layout(model, device)
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
        x = models.as_layout(item["x"][rows.start:rows.stop].to(device, non_blocking=True), channels_last)
        index, mix = item["index"].to(device), item["mix_index"].to(device)
        lam = float(item["lam_area"])
        y = labels[index]
        w = image_weights(norm_w, index, mix, lam, args.kd_weights)[rows.start:rows.stop]
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


# ---------------------------------------------------------------------------------------------
# labels


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
    return engine.stage_main(run, args)


def run(args, info, world, device, t0):
    log = world.print
    args.out = cli.default_out(args)
    args.student = args.student or info.arch
    check_flags(args)
    cli.seed_everything(args.seed)
    paths = artifacts.run_paths(args.out)
    teacher_path = args.teacher or paths.teacher
    synthetic_path = args.synthetic or paths.synthetic
    bases = {b.name: b for b in baselines.parse(args.baseline)}
    labels_dir = args.labels_dir or paths.labels

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
    if args.epochs < 1 or args.batch_size < 1 or args.full_batch_size < 1:
        cli.fail(f"--epochs, --batch-size and --full-batch-size must be at least 1 (got {args.epochs}, "
                 f"{args.batch_size}, {args.full_batch_size}).")
    if args.eval_every is None:
        args.eval_every = max(1, args.epochs // 5)
    full_source = full_data_source(args, bases)
    soft = args.labels != "hard"
    needs_teacher = args.labels == "online" or ("random" in bases and soft) or (args.ars and soft) \
        or full_source == "teacher"
    plain = augment.plain_spec(info, syn.images.shape[-1])
    hard_spec = spec if args.hard_label_aug else plain
    if world.is_main:
        engine.print_config("evaluate", args, classes=info.num_classes, image_size=info.image_size, stem=info.stem,
                         device_resolved=str(device), augmentation=spec.as_dict(), augmentation_seed=aug_seed,
                         hard_label_augmentation=hard_spec.as_dict(), full_data_accuracy_from=full_source,
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
    jobs = student_jobs(args, info, syn, bases, seeds, teacher, settings, paths, spec, plain, hard_spec,
                        aug_seed, (topk, precision, rank), full_source, upstream)
    # rank 0 decides which students are finished; every rank trains the same remaining ones
    finished = None
    if world.is_main:
        finished = [finished_student(j.path, j.fingerprint) for j in jobs]
        kept = sum(r is not None for r in finished)
        if kept:
            print(f"[evaluate] resuming: {kept} of {len(finished)} students already finished in {paths.students}")
    finished = dist.gather_objects(finished, world, None)[0]
    records = {}
    for job, rec in zip(jobs, finished):
        if rec is None:
            rec = train_student(job.iset, job.source, args, info, job.spec, job.plan, device, val_loader, job.seed,
                                desc=f"{job.key} seed {job.seed}", world=world)
            if world.is_main:
                os.makedirs(os.path.dirname(job.path), exist_ok=True)
                artifacts.write_text(job.path, json.dumps({"fingerprint": job.fingerprint, "record": rec}, indent=1))
        records[(job.key, job.seed)] = rec
        log(f"[evaluate] {job.key} seed {job.seed}: top-1 {rec['top1']:.2f} (best {metrics.accuracy(rec, 'best'):.2f}) "
            f"top-5 {rec['top5']:.2f} ({rec['wall_s']:.1f}s)")

    runs = []
    for job in jobs:
        if not runs or runs[-1]["key"] != job.key:
            runs.append({"key": job.key, "images": job.images_desc, "label_desc": job.label_desc, "per_seed": []})
        runs[-1]["per_seed"].append(records[(job.key, job.seed)])
    for r in runs:
        for v in metrics.VARIANTS:
            r[f"top1_{v}"] = metrics.summarize([metrics.accuracy(x, v) for x in r["per_seed"]])
        r["top1"], r["top5"] = r["top1_last"], metrics.summarize([x["top5"] for x in r["per_seed"]])

    full = {"source": full_source, "student": args.student}
    if full_source == "user":
        full.update(top1={"last": args.full_data_acc, "best": args.full_data_acc},
                    label=f"user-given (--full-data-acc {args.full_data_acc:g})")
    elif full_source == "teacher":
        full.update(top1={"last": teacher_top1, "best": teacher_top1},
                    label=f"STAND-IN: the teacher's val top-1 ({teacher_arch(teacher_art)}), not a {args.student} "
                          "student (--hlr-reference teacher)")
    elif full_source == "student":
        rec = records[("full/hard", args.seed)]
        full.update(top1={v: metrics.accuracy(rec, v) for v in metrics.VARIANTS},
                    label=f"a {args.student} student trained on the full training set, hard labels, same recipe")
    scores = {}
    for v in metrics.VARIANTS:
        acc = {r["key"]: [metrics.accuracy(x, v) for x in r["per_seed"]] for r in runs if not is_full_data(r["key"])}
        scores[v] = metrics.scores(acc, None if full_source is None else [full["top1"][v]] * len(seeds))
    report = {
        "config": {**cli.args_dict(args), "seeds_used": seeds, "augmentation": spec.as_dict(),
                   "hard_label_augmentation": hard_spec.as_dict(), "augmentation_seed": aug_seed,
                   "student": args.student},
        "label_settings": settings, "teacher_val_top1": teacher_top1, "teacher_arch": teacher_arch(teacher_art),
        "full_data": full, "random_subset_indices": {str(j.seed): j.iset.indices for j in jobs if j.key == "random/hard"},
        "world_size": world.size, "runs": runs,
        "metrics": scores["last"], "metrics_best": scores["best"], "formulas": metrics.FORMULAS,
        "upstream": {"synthetic": synthetic_path, "synthetic_sha256": sha},
        "versions": {k: str(v) for k, v in artifacts.library_versions().items()},
        "wall_time_s": round(time.time() - t0, 1),
    }
    report["config"]["seeds"] = args.seeds
    table = metrics.markdown(report)
    if world.is_main:
        os.makedirs(args.out, exist_ok=True)
        artifacts.write_text(paths.results_json, json.dumps(report, indent=1, default=str))
        artifacts.write_text(paths.results_md, table)
    log(table)
    log(f"[evaluate] wrote {paths.results_json} and {paths.results_md} in {time.time() - t0:.1f}s")
    dist.barrier(world)
    return report


def check_flags(args) -> None:
    """Bad flag values, refused before anything is read or written."""
    if args.seeds < 1:
        cli.fail(f"--seeds must be at least 1, got {args.seeds}.")
    if args.student not in models.student_names():
        cli.fail(f"--student {args.student!r} is not an architecture this project can build. Valid names: the "
                 f"project's {', '.join(models.ARCHES)}; torchvision's classification models "
                 f"{', '.join(n for n in models.torchvision_students() if n not in models.ARCHES)}.")
    if args.full_data_acc is not None and not 0.0 <= args.full_data_acc <= 100.0:
        cli.fail(f"--full-data-acc {args.full_data_acc:g} is outside [0, 100]: it is the full-data hard-label "
                 "top-1 accuracy in percent (e.g. --full-data-acc 56.5).")


def full_data_source(args, bases: dict):
    """Where HLR's acc(full data, hard) comes from: 'user' (--full-data-acc), 'teacher' (asked for),
    'student' (the full-data student, --baseline full), or None (no HLR, no LRS)."""
    if args.full_data_acc is not None:
        return "user"
    if args.hlr_reference == "teacher":
        return "teacher"
    return "student" if "full" in bases else None


def teacher_arch(teacher_art):
    return (teacher_art or {}).get("model_args", {}).get("arch") if teacher_art else None


@dataclass
class Job:
    """One student to train (or keep, when its file under students/ has this fingerprint)."""
    key: str
    seed: int
    iset: subsets.ImageSet
    source: object          # StoredLabels / OnlineLabels, or None for hard labels
    spec: augment.AugmentSpec
    plan: augment.ReplayPlan
    images_desc: str
    label_desc: str
    path: str = ""
    fingerprint: str = ""


def student_jobs(args, info, syn, bases, seeds, teacher, settings, paths, spec, plain, hard_spec, aug_seed,
                 compression, full_source, upstream) -> list:
    """Every student of this run, grouped by configuration, seeds in order: the distilled set (soft, hard,
    and without augmentation for --ars), each baseline's sets (a new one per seed for `random`), and the
    full-data student once (with --seed) when it is HLR's reference."""
    topk, precision, rank = compression
    comp = softlabels.describe(topk, precision or ("fp16" if topk or rank else "fp32"), rank)
    loss_desc = f"T = {args.temperature:g}" if args.loss == "kl" else f"MSE + {args.gt_weight:g} CE"
    soft_desc = {"stored": "soft, stored", "online": "soft, teacher online", "hard": "hard"}[args.labels]
    hard_desc = "hard, soft recipe's augmentation (--hard-label-aug)" if args.hard_label_aug else \
        "hard, no augmentation (DD-Ranking)"
    online = lambda: OnlineLabels(teacher, info.num_classes, topk, precision, rank)  # noqa: E731
    jobs = []

    def add(key, seed, iset, source, sp, images_desc, label_desc, depends):
        batch = args.full_batch_size if is_full_data(key) else args.batch_size
        plan = augment.ReplayPlan(len(iset), batch, aug_seed)
        jobs.append(Job(key, seed, iset, source, sp, plan, images_desc, label_desc,
                        student_path(paths, key, seed, args.student, args.full_data_dir),
                        student_fingerprint(args, key, seed, depends)))

    soft = args.labels != "hard"
    distilled_soft = (StoredLabels(args.labels_dir or paths.labels, settings, augment.ReplayPlan(len(syn), args.batch_size, aug_seed))
                      if args.labels == "stored" else online) if soft else None
    for s in seeds:
        if soft:
            add("distilled/soft", s, syn, distilled_soft if args.labels == "stored" else online(), spec, "distilled",
                f"{soft_desc} ({comp}), {loss_desc}", upstream)
    for s in seeds:
        add("distilled/hard", s, syn, None, hard_spec, "distilled", hard_desc, upstream)
    if args.ars and soft:
        for s in seeds:
            add("distilled/soft-noaug", s, syn, online(), plain, "distilled",
                f"soft, teacher online ({comp}), no augmentation (ARS), {loss_desc}", upstream)
    for name, base in bases.items():
        if name == "full":
            continue
        sets = {s: base.build(info, args, syn.ipc, s) for s in seeds}
        label_kinds = [k for k in base.labels if soft or k == "hard"]
        for kind in label_kinds + (["soft-noaug"] if args.ars and "soft" in label_kinds else []):
            for s in seeds:
                dep = {**upstream, "images": sets[s].indices}
                if kind == "soft":
                    add(f"{name}/soft", s, sets[s], online(), spec, base.describe,
                        f"soft, teacher online ({comp}, as distilled), {loss_desc}", dep)
                elif kind == "hard":
                    add(f"{name}/hard", s, sets[s], None, hard_spec, base.describe, hard_desc, dep)
                else:
                    add(f"{name}/soft-noaug", s, sets[s], online(), plain, base.describe,
                        f"soft, teacher online ({comp}), no augmentation (ARS), {loss_desc}", dep)
    if full_source == "student":
        full = bases["full"].build(info, args, syn.ipc, args.seed)
        add("full/hard", args.seed, full, None, hard_spec, bases["full"].describe, hard_desc,
            {"augmentation": hard_spec.as_dict(), "images": len(full), "dataset": info.name})
    return jobs


if __name__ == "__main__":
    cli.run(main, get_args_parser())
