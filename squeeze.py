"""Stage 1 - squeeze: train the teacher on the real data, then record per-class BatchNorm statistics.

    python squeeze.py --dataset digits --out runs/digits
    python squeeze.py --dataset tiny --data-dir /data/tiny-imagenet-200 --resolution 224 --out runs/tiny/r224
    python squeeze.py --dataset imagenette --data-dir /data/imagenette2 --stats-only --teacher resnet18.pth

Teacher recipe (the paper's, from the released run logs): ResNet-18, 50 epochs, SGD(momentum 0.9)
lr 0.025, batch 32, cosine, weight decay 1e-4, RandomResizedCrop(0.08-1) + flip; Tiny-ImageNet at the
224 protocol upsamples its 64 px images and uses a 3x3 s2 stem without maxpool. Tiny-ImageNet at
`--resolution 64` is SRe2L's teacher (zeyuanyin/tiny-imagenet script/train_rn18.sh): 3x3 s1 stem, no
maxpool, SGD lr 0.2, batch 256, 50 epochs, wd 1e-4, cosine after 5 linear warm-up epochs
(--warmup-epochs) from 0.01 x lr, SRe2L's Tiny normalisation. The schedule steps per iteration
(--lr-step epoch: once per epoch, as the release's pretrain.py). Every value is a flag;
flags left unset take the `--dataset` preset's value (digits: a ConvNet and a one-minute recipe).

After training (validated every epoch), one eval-mode pass over the training set with the eval
transform records, for every BatchNorm layer and every class, the per-channel mean and biased
variance of the layer's input (float64 sums: wmdd/bnstats.py). --class-var batch-mean (--protocol
released) stores instead the release's variance: the mean of the variances of one-class batches of 100.

Writes to --out: `teacher.pt` (state_dict, model spec, val top-1 in meta) and `bn_stats.pt` (per-layer
per-class sums, counts, mean, var; global mean/var). A per-epoch `squeeze_checkpoint.pt` makes an
interrupted run resume where it stopped when rerun with the same command.

`--stats-only --teacher PATH` skips training and recomputes the statistics for an existing teacher
(a teacher.pt, or a plain torchvision-format state_dict, e.g. from torchvision's own ImageNet training
script; the architecture then comes from --arch or the preset).
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from wmdd import artifacts, bnstats, cli, data, dist, engine, models, ops


def get_args_parser():
    p = argparse.ArgumentParser("squeeze: train the teacher and record per-class BN statistics",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_common_args(p)
    g = p.add_argument_group("teacher (unset: the preset's value)")
    g.add_argument("--arch", default=None, choices=models.ARCHES, help="teacher architecture")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--lr", type=float, default=None, help="SGD learning rate (cosine schedule)")
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--warmup-epochs", type=int, default=None,
                   help="linear warm-up from 0.01 x lr over these epochs, then cosine (preset: 0; tiny at 64 px: 5)")
    g.add_argument("--lr-step", default=None, choices=["iteration", "epoch"], help="step the warm-up and cosine "
                   "schedule after every iteration or once per epoch (--protocol wmdd: iteration; released: epoch)")
    g = p.add_argument_group("statistics")
    g.add_argument("--stats-only", action="store_true", help="skip training; statistics for --teacher")
    g.add_argument("--teacher", default=None, help="teacher checkpoint for --stats-only (default <out>/teacher.pt)")
    g.add_argument("--stats-batch-size", type=int, default=256)
    g.add_argument("--class-var", default=None, choices=["exact", "batch-mean"], help="per-class variance: exact "
                   "(float64 sums over the class), or the mean of the variances of one-class batches of "
                   "--class-var-batch in dataset order (--protocol wmdd: exact; released: batch-mean)")
    g.add_argument("--class-var-batch", type=int, default=100, help="--class-var batch-mean: the batch size "
                   "(the release's: recover's batch size, 100)")
    return p


def train_teacher(args, info, device, paths, world) -> tuple:
    """SGD + cosine, validated every epoch; resumes from squeeze_checkpoint.pt. Returns (model, val top-1).
    Under torchrun: DistributedDataParallel, --batch-size split across ranks, rank 0 validates and saves."""
    model = models.build_model(args.arch, info.num_classes, info.stem, info.image_size).to(device)
    channels_last = models.training_layout(model, device)
    train_set = data.build_dataset(info, args, "train", augment=True)
    val_loader = DataLoader(data.build_dataset(info, args, "val"), batch_size=args.stats_batch_size,
                            num_workers=args.workers)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    per_iteration = args.lr_step == "iteration"  # --lr-step epoch: the schedule counts epochs (pretrain.py)
    steps_per_epoch = math.ceil(len(train_set) / args.batch_size) if per_iteration else 1
    warmup = min(args.warmup_epochs, args.epochs) * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, args.epochs * steps_per_epoch - warmup))
    if warmup:  # torchvision's reference recipe (SRe2L's Tiny teacher): LinearLR(0.01) then cosine, per step here
        scheduler = torch.optim.lr_scheduler.SequentialLR(
            optimizer, [torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup), scheduler],
            milestones=[warmup])
    criterion = nn.CrossEntropyLoss()
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world.enabled else model

    # What must match for a checkpoint to be resumed.
    recipe = {k: getattr(args, k) for k in ("arch", "epochs", "lr", "batch_size", "weight_decay", "momentum", "seed",
                                            "warmup_epochs")}
    if not per_iteration:  # (only then: checkpoints from before --lr-step resume as they were)
        recipe["lr_step"] = args.lr_step
    start_epoch, val = 0, {"top1": float("nan")}
    ckpt = artifacts.reuse(paths.squeeze_checkpoint, "squeeze-checkpoint", log=print)  # torn: start over
    if ckpt is not None:
        artifacts.check_compatible(ckpt["meta"], info, paths.squeeze_checkpoint)
        if ckpt["recipe"] != recipe:
            cli.fail(f"{paths.squeeze_checkpoint} is from a run with another recipe ({ckpt['recipe']}) than this "
                     f"one ({recipe}). Rerun with the same flags to resume, or delete the checkpoint to start over.")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, val = ckpt["epoch"], ckpt["val"]
        print(f"[squeeze] resuming from {paths.squeeze_checkpoint} after epoch {start_epoch}")

    epochs = tqdm(range(start_epoch, args.epochs), desc="teacher epochs", initial=start_epoch, total=args.epochs,
                  disable=not world.is_main)
    for epoch in epochs:
        net.train()
        torch.manual_seed(args.seed * 100_003 + epoch * world.size + world.rank)  # this epoch's augmentation
        if world.enabled:
            sampler = DistributedSampler(train_set, world.size, world.rank, shuffle=True, seed=args.seed)
            sampler.set_epoch(epoch)
            loader = DataLoader(train_set, batch_size=max(1, args.batch_size // world.size), sampler=sampler,
                                num_workers=args.workers)
        else:
            loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                generator=engine.epoch_generator(args.seed, epoch))
        running, seen = 0.0, 0
        for x, y in tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not world.is_main):
            x, y = models.as_layout(x.to(device, non_blocking=True), channels_last), y.to(device, non_blocking=True)
            loss = criterion(net(x), y)
            if not torch.isfinite(loss):
                cli.fail(f"the teacher's loss became {loss.item()} in epoch {epoch + 1}. Lower --lr; the last "
                         f"finished epoch is kept in {paths.squeeze_checkpoint}.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if per_iteration:
                scheduler.step()
            running += loss.item() * y.numel()
            seen += y.numel()
        if not per_iteration:
            scheduler.step()
        if world.is_main:
            val = engine.validate(model, val_loader, device)
            epochs.set_postfix(loss=f"{running / seen:.3f}", val_top1=f"{val['top1']:.2f}")
            print(f"[squeeze] epoch {epoch + 1}/{args.epochs} train loss {running / seen:.4f} "
                  f"val top-1 {val['top1']:.2f} top-5 {val['top5']:.2f}")
            artifacts.save(paths.squeeze_checkpoint,
                           {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "val": val, "recipe": recipe},
                           artifacts.make_meta("squeeze-checkpoint", args, info))
        dist.barrier(world)
    # back to NCHW: the statistics pass and the saved teacher then equal those of a reloaded teacher
    return model.to(memory_format=torch.contiguous_format), val["top1"]


def main(args):
    return engine.stage_main(run, args)


def run(args, info, world, device, t0):
    data.preset_defaults(args, "squeeze")
    args.arch = args.arch or info.arch
    if args.class_var_batch < 1:
        cli.fail(f"--class-var-batch must be at least 1, got {args.class_var_batch}.")
    args.out = cli.default_out(args)
    cli.seed_everything(args.seed)
    if world.is_main:
        engine.print_config("squeeze", args, classes=info.num_classes, stem=info.stem, image_size=info.image_size,
                         device_resolved=str(device), world_size=world.size, kernels=ops.describe(args.impl))
    paths = artifacts.run_paths(args.out)

    if args.stats_only:
        teacher_path = args.teacher or paths.teacher
        model, teacher = models.load_teacher(teacher_path, info, device, arch=args.arch)
        if teacher["meta"] is None and world.is_main:  # a plain state_dict: give the run a teacher.pt with meta
            artifacts.save(paths.teacher, {"model": model.state_dict(), "model_args": teacher["model_args"]},
                           artifacts.make_meta("squeeze", args, info, source=os.path.abspath(teacher_path),
                                               val_top1=None, arch=teacher["model_args"]["arch"]))
            teacher_path = paths.teacher
    else:
        model, val_top1 = train_teacher(args, info, device, paths, world)
        spec = models.model_spec(args.arch, info.num_classes, info.stem, info.image_size)
        if world.is_main:
            artifacts.save(paths.teacher, {"model": model.state_dict(), "model_args": spec},
                           artifacts.make_meta("squeeze", args, info, val_top1=val_top1, arch=args.arch,
                                               wall_time_s=time.time() - t0))
            print(f"[squeeze] wrote {paths.teacher} (val top-1 {val_top1:.2f}%)")
        teacher_path = paths.teacher
    dist.barrier(world)

    # Statistics pass: each rank sums its contiguous block of the training set; the sums add up exactly.
    train_eval, groups, batch_class = data.build_dataset(info, args, "train"), info.num_classes, None
    if args.class_var == "batch-mean":  # the released pass: per-class batches, each batch a group of its own
        ids, batch_class = bnstats.release_batches(train_eval.targets, info.num_classes, args.class_var_batch)
        train_eval, groups = bnstats.Relabelled(train_eval, ids), len(batch_class)
    shard = Subset(train_eval, dist.rank_slice(len(train_eval), world)) if world.enabled else train_eval
    stats_loader = DataLoader(shard, batch_size=args.stats_batch_size, shuffle=False, num_workers=args.workers)
    t_stats = time.time()
    sums = bnstats.collect(model, stats_loader, groups, device, impl=args.impl, progress=world.is_main)
    for key in ("sum", "sumsq", "count"):
        sums[key] = [dist.all_reduce_sum_(t.to(device), world).cpu() for t in sums[key]]
    if world.is_main:
        stats = bnstats.finalize(sums, batch_class)
        artifacts.save(paths.bn_stats, stats,
                       artifacts.make_meta("squeeze-stats", args, info, upstream={"teacher": teacher_path},
                                           wall_time_s=time.time() - t_stats, world_size=world.size,
                                           kernels=ops.resolve_impl(args.impl)))
        print(f"[squeeze] wrote {paths.bn_stats} ({len(stats['layers'])} BN layers, "
              f"{time.time() - t_stats:.1f}s statistics pass, {time.time() - t0:.1f}s total)")
    dist.barrier(world)
    return {"teacher": teacher_path, "bn_stats": paths.bn_stats}


if __name__ == "__main__":
    cli.run(main, get_args_parser())
