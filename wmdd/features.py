"""The teacher's penultimate features of a training set: barycenter.py's step 1 and its cache features.pt.

More: docs/core.md, "wmdd/features.py".
"""
from __future__ import annotations

import math
import os
import time

import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from wmdd import artifacts, cli, data, dist, models

# ---------------------------------------------------------------------------------------------
# several processes (torchrun): feature blocks and gathering them (wait group, errors: wmdd/dist.py)


def feature_block(n: int, batch_size: int, world) -> range:
    """The images of rank `world.rank`: a contiguous block of whole batches of the one-process pass, so
    every image goes through the teacher in the same batch as without torchrun (same features, bit for bit)."""
    batches = dist.rank_slice(math.ceil(n / batch_size), world)
    return range(min(batches.start * batch_size, n), min(batches.stop * batch_size, n))


def gather_blocks(part: torch.Tensor, sizes: list, world, device) -> torch.Tensor:
    """Concatenate every rank's rows (rank order) on every rank; `sizes` are the ranks' row counts."""
    if not world.enabled:
        return part
    padded = part.new_zeros((max(sizes), *part.shape[1:]), device=device)
    padded[:len(part)] = part.to(device)
    pieces = [torch.empty_like(padded) for _ in sizes]
    torch_dist.all_gather(pieces, padded)
    return torch.cat([p[:n].cpu() for p, n in zip(pieces, sizes)])


# ---------------------------------------------------------------------------------------------
# the pass and its cache


@torch.no_grad()
def extract_features(model, dataset, device, batch_size: int, workers: int, progress: bool = True) -> tuple:
    """Penultimate features [N, d] (float32, CPU) and labels [N] of a whole dataset, in dataset order."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    feats, labels = [], []
    for x, y in tqdm(loader, desc="features", **({} if progress else {"disable": True})):
        feats.append(models.penultimate(model, x.to(device)).float().cpu())
        labels.append(torch.as_tensor(y))
    if not feats:  # an empty block (more ranks than batches)
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels).long()


def features_path(args, paths) -> str:
    return args.features or paths.features


def cached_features(args, info, path, teacher_sha, log):
    """The features cache at path if it was made from this teacher for this dataset, else None."""
    def matches(cached):
        try:
            artifacts.check_compatible(cached["meta"], info, path)
        except cli.UserError as e:
            log(f"[barycenter] not reusing {path}: {e}")
            return False
        if cached["meta"].get("upstream", {}).get("teacher") != teacher_sha:
            log(f"[barycenter] {path} was made from another teacher: recomputing")
            return False
        return True

    if args.recompute_features:
        return None
    return artifacts.reuse(path, "features", matches, log=lambda why: log(f"[barycenter] {why}"))


def load_or_extract_features(args, info, device, teacher_path, paths, check_labels=None,
                             world=dist.World(), group=None) -> dict:
    """features.pt when it matches this teacher / dataset, else a fresh extraction (then cached).
    check_labels(labels) runs on the dataset's labels before any image is read. With several ranks each
    extracts a block of batches, every rank gets all features, rank 0 writes the cache."""
    log = world.print
    if not os.path.isfile(teacher_path):
        artifacts.load(teacher_path)  # the "does not exist: run squeeze.py first" message
    teacher_sha = artifacts.sha256_file(teacher_path)
    cache = features_path(args, paths)
    cached = cached_features(args, info, cache, teacher_sha, log)
    if world.enabled and not all(dist.gather_objects(cached is not None, world, group)):
        cached = None  # every rank decides alike
    if cached is not None:
        log(f"[barycenter] reusing {cache} ({tuple(cached['features'].shape)} features)")
        if check_labels is not None:
            check_labels(cached["labels"].tolist())
        return cached
    model, _ = models.load_teacher(teacher_path, info, device)
    dataset = data.build_dataset(info, args, "train")
    if check_labels is not None:
        check_labels(list(dataset.targets))
    t0 = time.time()
    blocks = [feature_block(len(dataset), args.batch_size, dist.World(r, world.size)) for r in range(world.size)]
    mine = Subset(dataset, blocks[world.rank]) if world.enabled else dataset
    part, part_labels = extract_features(model, mine, device, args.batch_size, args.workers, world.is_main)
    if world.enabled:
        d = models.penultimate(model, dataset[0][0].unsqueeze(0).to(device)).shape[1]
        part = part.reshape(len(part), d)
        sizes = [len(b) for b in blocks]
        features = gather_blocks(part, sizes, world, device)
        labels = gather_blocks(part_labels, sizes, world, device)
    else:
        features, labels = part, part_labels
    if not torch.isfinite(features).all():
        cli.fail(f"the teacher {teacher_path} produced non-finite features. Check the teacher (retrain with "
                 "squeeze.py) and the data.")
    payload = {"features": features, "labels": labels}
    meta = artifacts.make_meta("features", args, info, upstream={"teacher": teacher_path},
                               wall_time_s=time.time() - t0, feature_dim=int(features.shape[1]),
                               world_size=world.size)
    if world.is_main:
        artifacts.save(cache, payload, meta)
        log(f"[barycenter] wrote {cache} ({tuple(features.shape)}, {time.time() - t0:.1f}s)")
    dist.gather_objects(None, world, group)  # the others read features.pt's sha256 once it is there
    payload["meta"] = meta
    return payload
