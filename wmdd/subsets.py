"""The small image sets a student trains on, in one format: uint8 images [N, C, S, S] (pixels 0-255,
not normalised, class-major), int64 labels [N], float32 barycenter weights [N] (uniform: 1 / IPC).

More: docs/core.md, "wmdd/subsets.py".
"""
from __future__ import annotations

import os

from dataclasses import dataclass

import torch

from wmdd import artifacts, data, protocol
from wmdd.cli import fail


@dataclass
class ImageSet:
    images: torch.Tensor   # uint8 [N, C, S, S] (C = info.channels)
    labels: torch.Tensor   # int64 [N]
    weights: torch.Tensor  # float32 [N]
    ipc: int
    source: str            # file it came from, or a description
    indices: list | None = None  # dataset indices of a real subset

    def __len__(self):
        return int(self.labels.numel())


def default_batch_size(args) -> None:
    """Fill args.batch_size when unset by the released run.sh rule (wmdd/protocol.py `kd_batch_size`):
    10 * IPC when IPC < 10, except on Tiny-ImageNet and ImageNet-1K, which keep 100 at every IPC; the
    preset fills the rest (100)."""
    if getattr(args, "batch_size", None) is None and getattr(args, "ipc", None) is not None and args.ipc < 10:
        args.batch_size = protocol.kd_batch_size(args.dataset, args.ipc)


def load_synthetic(path, info, ipc: int | None = None, teacher_path=None) -> ImageSet:
    """recover's synthetic.pt, refused with a clear message when it does not fit this run."""
    art = artifacts.load(path, stage="recover")
    upstream = {"teacher": teacher_path} if teacher_path is not None and _exists(teacher_path) else None
    artifacts.check_compatible(art["meta"], info, path, upstream=upstream)
    missing = [k for k in ("images", "labels") if k not in art]
    if missing:
        fail(f"{path} has no {', '.join(missing)} entry: it is not a synthetic set written by recover.py. "
             "Regenerate it with recover.py.")
    images, labels = art["images"], art["labels"].to(torch.int64)
    S = info.image_size
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != info.channels:
        fail(f"{path} holds images {images.dtype} {tuple(images.shape)}; expected uint8 "
             f"[N, {info.channels}, {S}, {S}]. Regenerate it with recover.py.")
    if tuple(images.shape[2:]) != (S, S):
        fail(f"{path} holds {images.shape[2]}x{images.shape[3]} images, but this run's model input is {S}x{S} "
             f"(--dataset {info.name} --resolution {info.resolution}). Pass the --resolution it was made "
             "with, or regenerate it.")
    if labels.numel() != images.shape[0] or labels.min() < 0 or labels.max() >= info.num_classes:
        fail(f"{path} has {labels.numel()} labels for {images.shape[0]} images, or labels outside "
             f"0..{info.num_classes - 1}. Regenerate it with recover.py.")
    counts = torch.bincount(labels, minlength=info.num_classes)
    found_ipc = int(art.get("ipc", counts.max().item()))
    if ipc is not None and found_ipc != ipc:
        fail(f"{path} holds {found_ipc} images per class, but --ipc is {ipc}. Pass --ipc {found_ipc}, or "
             f"run recover.py with --ipc {ipc} (or use another --out).")
    weights = art.get("weights")
    if weights is None:
        weights = torch.full((labels.numel(),), 1.0 / max(found_ipc, 1))
    weights = weights.to(torch.float32).flatten()
    if weights.numel() != labels.numel() or not torch.isfinite(weights).all() or (weights < 0).any() \
            or weights.sum() <= 0:
        fail(f"{path} has {weights.numel()} barycenter weights for {labels.numel()} images, or weights that "
             "are negative or not finite. Regenerate it with recover.py.")
    return ImageSet(images.contiguous(), labels, weights, found_ipc, str(path))


def _exists(path) -> bool:
    return os.path.isfile(path)


def random_indices(targets, num_classes: int, ipc: int, seed: int, class_names=None) -> list:
    """IPC dataset indices of every class (class-major, sorted within a class), drawn by a generator
    seeded with `seed`: the random real subset of seed `seed`."""
    per_class = data.class_indices(targets, num_classes)
    g = torch.Generator().manual_seed(seed * 7919 + 17)
    chosen = []
    for c, idx in enumerate(per_class):
        if len(idx) < ipc:
            name = class_names[c] if class_names else c
            fail(f"class {name} has only {len(idx)} training images, fewer than --ipc {ipc}: the "
                 "random real baseline needs IPC images per class. Lower --ipc or pass --baseline none.")
        pick = torch.randperm(len(idx), generator=g)[:ipc].sort().values
        chosen += [idx[int(i)] for i in pick]
    return chosen


def random_real_subset(info, args, ipc: int, seed: int) -> ImageSet:
    """IPC real training images of every class, chosen by a generator seeded with `seed`."""
    ds = data.build_dataset(info, args, "train", augment=False)
    chosen = random_indices(ds.targets, info.num_classes, ipc, seed, info.classes)
    return images_of(info, args, chosen, ipc, f"random real subset (seed {seed})", ds)


def images_of(info, args, chosen: list, ipc: int, source: str, ds=None) -> ImageSet:
    """The training images `chosen` (class-major, IPC per class) as an ImageSet: eval transform, uint8,
    their class labels, uniform weights."""
    ds = ds if ds is not None else data.build_dataset(info, args, "train", augment=False)
    images = torch.stack([_to_uint8(info, ds[i][0]) for i in chosen])
    labels = torch.tensor([int(ds.targets[i]) for i in chosen], dtype=torch.int64)
    return ImageSet(images, labels, torch.full((len(chosen),), 1.0 / ipc), ipc, source, list(chosen))


class DatasetImages:
    """A dataset's images as uint8 [N, 3, S, S], read on demand: `view[index_tensor]` loads those images
    (eval transform, quantised as `random_real_subset`). Stands in for the image tensor of a set too
    large to hold in memory (augment.apply_batch only indexes it)."""
    device = torch.device("cpu")

    def __init__(self, dataset, info):
        self.dataset, self.info = dataset, info
        self.shape = (len(dataset), info.channels, info.image_size, info.image_size)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return torch.stack([_to_uint8(self.info, self.dataset[int(i)][0]) for i in index.flatten()])


def full_training_set(info, args, in_memory_bytes: int = 1 << 30) -> ImageSet:
    """Every real training image with its class label, uniform weights; in memory up to
    `in_memory_bytes` of uint8 pixels, read from the dataset on demand beyond."""
    ds = data.build_dataset(info, args, "train", augment=False)
    labels = torch.as_tensor(list(ds.targets), dtype=torch.int64)
    view = DatasetImages(ds, info)
    small = len(ds) * info.channels * info.image_size ** 2 <= in_memory_bytes
    images = view[torch.arange(len(ds))] if small else view
    ipc = int(torch.bincount(labels, minlength=info.num_classes).max())
    return ImageSet(images, labels, torch.full((len(ds),), 1.0 / ipc), ipc, "full training set",
                    list(range(len(ds))))


def _to_uint8(info, x: torch.Tensor) -> torch.Tensor:
    return info.denormalize(x).clamp(0, 1).mul(255).round().to(torch.uint8)


def save_as_synthetic(iset: ImageSet, path, info, args, teacher_path=None) -> str:
    """Write any image set in recover's synthetic.pt format (e.g. a random real subset to relabel and
    evaluate like a distilled set; the tests and the label benchmark use this)."""
    upstream = {"teacher": teacher_path} if teacher_path is not None and _exists(teacher_path) else None
    return artifacts.save(path, {"images": iset.images, "labels": iset.labels, "weights": iset.weights,
                                 "ipc": iset.ipc},
                          artifacts.make_meta("recover", args, info, upstream=upstream, source=iset.source))
