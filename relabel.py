"""Stage 4 - relabel: the teacher's soft labels on every augmented batch the student will see (FKD style).

    python relabel.py --dataset digits --ipc 10 --out runs/digits
    python relabel.py --dataset imagenet --data-dir /data/imagenet --ipc 10 --out runs/in1k --topk 100
    python relabel.py ... --epochs-range 0:150     # one shard of the epochs (another runs 150:300)

For each of --epochs epochs, the synthetic images (`synthetic.pt` from recover) are cut into batches
of --batch-size by a seeded permutation; every batch gets RandomResizedCrop (the preset's scale,
0.08-1 for the paper presets) + horizontal flip (when the preset allows it) + CutMix (lambda ~
Beta(1, 1)), all drawn from a generator seeded by (--seed, epoch, batch) (wmdd/augment.py), and the
teacher's logits on that exact batch are stored. evaluate.py recomputes the same batches from the same
seeds, so no crop box, flip, CutMix index or lambda is stored; one 8-byte digest per batch lets the
replay check itself. Defaults are the paper's (300 epochs, batch 100, or 10 * IPC when IPC < 10
except on Tiny-ImageNet and ImageNet-1K, which keep 100: the released run.sh); the digits preset is
shorter. The batch size is printed with the rule (`kd_batch_size`). `--protocol released` refuses a
synthetic.pt made under another --image-format / --pixel-rounding / --amp (exit code 2).

Storage (wmdd/softlabels.py): `labels/manifest.pt` (settings, teacher and synthetic sha256, class
labels, barycenter weights) and one `labels/epoch_XXXX.pt` per epoch with the logits in fp16, or with
--topk K only the K largest per image (+ their class indices and the mean of the others), or with
--rank R a rank-R approximation (the epoch's principal directions + R coefficients per image), and with
--precision int8 as 8-bit codes (bench/RESULTS.md, "Labels": bytes and accuracy of each).

Resume and sharding: each epoch file is written atomically, and a rerun skips every epoch already
written with the same settings, so an interrupted run (even SIGKILLed) resumes where it stopped and
gives the same files as an uninterrupted one. The unit of work is the epoch (a CutMix batch mixes
classes): `torchrun --nproc_per_node N relabel.py ...` gives each rank a contiguous block of the epochs
still to do, and rank 0 then checks that every epoch of the range is stored; --epochs-range a:b shards
by hand across separate jobs that fill one directory.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from wmdd import artifacts, augment, cli, data, dist, engine, models, softlabels, subsets


def get_args_parser():
    p = argparse.ArgumentParser("relabel: FKD-style soft labels on replayable augmented batches",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_common_args(p, ipc=True)
    g = p.add_argument_group("relabel (unset: the preset's value)")
    g.add_argument("--epochs", type=int, default=None, help="label sets: one per student epoch")
    g.add_argument("--batch-size", type=int, default=None,
                   help="images per batch; evaluate must use the same (preset: 100, or 10 * IPC if IPC < 10 "
                        "except tiny and imagenet)")
    g.add_argument("--epochs-range", default=None,
                   help="a:b computes only epochs a..b-1 (0-based) of --epochs, to shard the work")
    g.add_argument("--topk", type=int, default=None,
                   help="store the K largest logits per image and their indices (default: all logits)")
    g.add_argument("--rank", type=int, default=None,
                   help="store a rank-R approximation instead: each epoch's principal directions of the "
                        "(per-image centred) logits and R coefficients per image (default: all logits)")
    g.add_argument("--precision", default="fp16", choices=softlabels.PRECISIONS,
                   help="stored values: fp16, or int8 codes of a per-image affine map")
    g.add_argument("--no-cutmix", action="store_true", help="crops and flips only")
    g.add_argument("--teacher", default=None, help="teacher checkpoint (default <out>/teacher.pt)")
    g.add_argument("--synthetic", default=None, help="synthetic set (default <out>/synthetic.pt)")
    return p


def label_settings(args, info, syn, spec, teacher_path, synthetic_path) -> dict:
    """What the stored labels depend on; evaluate replays from exactly these."""
    return {"epochs": int(args.epochs), "batch_size": int(args.batch_size), "seed": int(args.seed),
            "num_images": len(syn), "num_classes": info.num_classes,
            "augment": spec.as_dict(), "topk": args.topk, "rank": args.rank, "precision": args.precision,
            "teacher_sha256": artifacts.sha256_file(teacher_path),
            "synthetic_sha256": artifacts.sha256_file(synthetic_path)}


@torch.no_grad()
def epochs_to_do(labels_dir, epochs, settings) -> list:
    """The epochs of `epochs` not yet stored with `settings` (a torn or foreign file counts as not stored)."""
    return [e for e in epochs if not softlabels.epoch_is_current(labels_dir, e, settings)]


def relabel_epochs(teacher, dataset, plan, todo, settings, labels_dir, info, device, workers=0, progress=True):
    """Teacher logits on every batch of the epochs `todo`; one compressed file per epoch."""
    if not todo:
        return 0
    loader = DataLoader(dataset, batch_size=None, sampler=augment.ReplaySampler(plan, todo), num_workers=workers)
    logits_epoch, digests, stored_bytes, fidelity = [], [], 0, []
    bar = tqdm(loader, desc="relabel", total=len(todo) * plan.batches_per_epoch, disable=not progress)
    for item in bar:
        logits = teacher(item["x"].to(device, non_blocking=True))
        if not torch.isfinite(logits).all():
            cli.fail(f"the teacher produced non-finite logits on epoch {item['epoch']} batch {item['batch']}. "
                     "Check the teacher checkpoint (squeeze.py) and the synthetic images.")
        logits_epoch.append(logits.float() if settings["rank"] else logits.float().cpu())
        digests.append(item["digest"])
        if item["batch"] == plan.batches_per_epoch - 1:
            full = torch.cat(logits_epoch)
            entry = softlabels.encode(full, settings["topk"], settings["precision"], settings["rank"])
            softlabels.write_epoch(labels_dir, item["epoch"], entry, torch.tensor(digests, dtype=torch.int64),
                                   settings, info.name)
            stored_bytes += softlabels.entry_nbytes(entry) + 8 * len(digests)
            fidelity.append(softlabels.fidelity(full, entry, info.num_classes))
            logits_epoch, digests = [], []
            bar.set_postfix(epoch=item["epoch"] + 1, kib=f"{stored_bytes / 1024:.0f}",
                            argmax_kept=f"{fidelity[-1]['argmax_agreement']:.4f}")
    if fidelity and progress:
        mean = {k: sum(f[k] for f in fidelity) / len(fidelity) for k in fidelity[0]}
        print(f"[relabel] stored vs exact logits, mean over {len(fidelity)} epoch(s): argmax agreement "
              f"{mean['argmax_agreement']:.4f}, KL at T = 20 {mean['kl_t20']:.2e}, relative error of the "
              f"centred logits {mean['relative_error']:.4f}")
    return stored_bytes


def main(args):
    return engine.stage_main(run, args)


def run(args, info, world, device, t0):
    log = world.print
    subsets.default_batch_size(args)
    data.preset_defaults(args, "relabel")
    args.out = cli.default_out(args)
    cli.seed_everything(args.seed)
    paths = artifacts.run_paths(args.out)
    teacher_path = args.teacher or paths.teacher
    synthetic_path = args.synthetic or paths.synthetic
    if args.epochs < 1:
        cli.fail(f"--epochs must be at least 1, got {args.epochs}.")
    epochs = cli.parse_range(args.epochs_range, args.epochs, "--epochs-range", "epoch")
    if args.batch_size < 1:
        cli.fail(f"--batch-size must be at least 1, got {args.batch_size}.")
    if args.topk is not None and args.topk < 1 or args.rank is not None and args.rank < 1:
        cli.fail(f"--topk and --rank must be at least 1 (got {args.topk}, {args.rank}).")
    if args.topk is not None and args.rank is not None:
        cli.fail("--topk and --rank are two ways to compress the logits: pass one of them.")
    if world.is_main:
        engine.print_config("relabel", args, classes=info.num_classes, image_size=info.image_size,
                         crop_scale=info.crop_scale, flip=info.flip, device_resolved=str(device),
                         labels_dir=paths.labels, epochs_here=f"{epochs.start}:{epochs.stop}", world_size=world.size,
                         kernels="none used by this stage (teacher forward passes only)")

    syn = subsets.load_synthetic(synthetic_path, info, args.ipc, teacher_path)
    teacher, _ = models.load_teacher(teacher_path, info, device)
    spec = augment.spec_for(info, source_size=syn.images.shape[-1], cutmix=not args.no_cutmix)
    plan = augment.ReplayPlan(len(syn), args.batch_size, args.seed)
    settings = label_settings(args, info, syn, spec, teacher_path, synthetic_path)
    meta = artifacts.make_meta("relabel", args, info, upstream={"teacher": teacher_path, "synthetic": synthetic_path},
                               batch_size=args.batch_size, epochs=args.epochs, seed=args.seed,
                               barycenter_weights="payload `weights`",
                               weights_uniform=bool(torch.allclose(syn.weights, syn.weights.mean())),
                               augment=spec.as_dict(), topk=args.topk, rank=args.rank, precision=args.precision,
                               world_size=world.size)
    group = dist.wait_group(world)
    todo = None
    if world.is_main:
        softlabels.write_manifest(paths.labels, settings, syn.labels, syn.weights, meta)
        todo = epochs_to_do(paths.labels, epochs, settings)
        if len(todo) < len(epochs):
            print(f"[relabel] resuming: {len(epochs) - len(todo)} of {len(epochs)} epochs already stored with "
                  "these settings: skipped")
    todo = dist.gather_objects(todo, world, group)[0]  # rank 0's list: every rank splits the same one
    mine = [todo[i] for i in dist.rank_slice(len(todo), world)]

    dataset = augment.ReplayDataset(syn.images, plan, spec, info.mean, info.std)
    error, stored = None, 0
    try:
        stored = relabel_epochs(teacher, dataset, plan, mine, settings, paths.labels, info, device, args.workers,
                                progress=world.is_main)
    except cli.UserError as e:
        error = e
    dist.settle(error, world, group)
    stored = sum(dist.gather_objects(stored, world, group))
    if world.is_main:  # epochs stored before this run were checked above; this run's were written atomically
        missing = [e for e in epochs if not os.path.isfile(softlabels.epoch_path(paths.labels, e))]
        if missing:
            cli.fail(f"epochs {missing[:10]}{' ...' if len(missing) > 10 else ''} of {epochs.start}:{epochs.stop} "
                     f"are not stored in {paths.labels} after every rank finished (a file was removed or "
                     "overwritten by another run meanwhile). Rerun the same command: it redoes only those.")
    per_image_epoch = softlabels.bytes_per_image(info.num_classes, args.topk, args.precision, args.rank)
    fkd = softlabels.fkd_bytes_per_batch(info.num_classes, args.batch_size) / args.batch_size
    ranks = f" by {world.size} ranks" if world.enabled else ""
    log(f"[relabel] wrote {len(todo)} epoch(s) x {plan.batches_per_epoch} batch(es) of soft labels{ranks} to "
        f"{paths.labels} ({stored / 1024:.1f} KiB payload this run; {per_image_epoch} B per image-epoch vs "
        f"{fkd:.0f} B in the FKD format); epochs {epochs.start}:{epochs.stop} complete, in {time.time() - t0:.1f}s")
    return {"labels": paths.labels, "settings": settings, "epochs_written": len(todo)}


if __name__ == "__main__":
    cli.run(main, get_args_parser())
