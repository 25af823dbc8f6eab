"""The nearest-real coreset: for every barycenter atom, the real training image of its class whose teacher
feature is nearest to it, each image used at most once.

More: docs/core.md, "wmdd/coreset.py".
"""
from __future__ import annotations

import os

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from wmdd import artifacts, augment, data, models, subsets
from wmdd.cli import fail


def assign_nearest(features: torch.Tensor, labels: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Dataset indices [C, k] (int64): atom j of class c -> the training image assigned to it (distinct
    within a class; across classes the images differ anyway since each belongs to one class).
    features [N, d], labels [N] (class of each training image, dataset order), points [C, k, d]."""
    C, k, _ = points.shape
    chosen = torch.empty(C, k, dtype=torch.int64)
    for c in range(C):
        idx = _class_images(labels, c, k)
        rows, cols = linear_sum_assignment(_cost(points[c], features[idx]))
        chosen[c, torch.as_tensor(rows)] = idx[torch.as_tensor(np.asarray(cols))]
    return chosen


def teacher_margins(features: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    """[N] float64: m_i = z_i[y_i] - max_{y != y_i} z_i[y], z_i = head(features[i]) (the teacher's classifier
    on its own penultimate features: the logits of the unaugmented image). Negative: misclassified."""
    with torch.no_grad():
        logits = head(features.float()).double()
    labels = labels.to(torch.int64)[:, None]
    return (logits.gather(1, labels) - logits.scatter(1, labels, float("-inf")).amax(1, keepdim=True)).squeeze(1)


def atom_cells(points: torch.Tensor, weights: torch.Tensor, features: torch.Tensor) -> np.ndarray:
    """[n] the cell (atom index) of each of one class's n features: the atom carrying the largest share of
    its mass in the optimal coupling (POT's exact `emd`, squared Euclidean cost) between the atoms
    (weights, normalised) and the features (uniform), i.e. the barycenter's own transport plan."""
    import ot

    w = weights.double().numpy()
    plan = ot.emd(w / w.sum(), np.full(len(features), 1.0 / len(features)), _cost(points, features))
    return plan.argmax(0)


def assign_hardest(features: torch.Tensor, labels: torch.Tensor, points: torch.Tensor, weights: torch.Tensor,
                   margins: torch.Tensor) -> torch.Tensor:
    """Dataset indices [C, k]: atom j of class c -> the image of its cell (atom_cells) with the smallest
    teacher margin (teacher_margins); an atom with an empty cell takes its nearest image not yet taken.
    Distinct within a class (the cells are disjoint). features [N, d], labels [N], points [C, k, d],
    weights [C, k], margins [N]."""
    C, k, _ = points.shape
    chosen = torch.empty(C, k, dtype=torch.int64)
    for c in range(C):
        idx = _class_images(labels, c, k)
        cells = atom_cells(points[c], weights[c], features[idx])
        m = margins[idx].numpy()
        empty = []
        for j in range(k):
            members = np.flatnonzero(cells == j)
            if len(members):
                chosen[c, j] = idx[int(members[np.argmin(m[members])])]
            else:
                empty.append(j)
        if empty:
            taken = set(chosen[c, [j for j in range(k) if j not in empty]].tolist())
            cost = _cost(points[c], features[idx])
            for j in empty:
                free = [i for i in np.argsort(cost[j]) if int(idx[i]) not in taken]
                chosen[c, j] = idx[int(free[0])]
                taken.add(int(idx[int(free[0])]))
    return chosen


def _class_images(labels: torch.Tensor, c: int, k: int) -> torch.Tensor:
    idx = (labels.to(torch.int64) == c).nonzero().flatten()
    if len(idx) < k:
        fail(f"class {c} has {len(idx)} training images but the barycenter has {k} atoms (= --ipc): the "
             "real-image choice needs a different image per atom. Use a smaller --ipc.")
    return idx


def _cost(points: torch.Tensor, features: torch.Tensor) -> np.ndarray:
    """[k, n] squared Euclidean distances in float64: the barycenter's W2^2 cost."""
    return torch.cdist(points.double(), features.double()).pow(2).numpy()


PICKS = ("nearest", "hardest")


def load_assignment(info, features_path, barycenters_path, teacher_path=None, pick: str = "nearest") -> torch.Tensor:
    """assign_nearest (pick 'nearest') or assign_hardest ('hardest', needs the teacher) on barycenter.py's
    files, each checked against this run (and against the teacher)."""
    upstream = {"teacher": teacher_path} if teacher_path is not None else None
    feats = artifacts.load(features_path, stage="features")
    artifacts.check_compatible(feats["meta"], info, features_path, upstream=upstream)
    bary = artifacts.load(barycenters_path, stage="barycenter")
    artifacts.check_compatible(bary["meta"], info, barycenters_path,
                               upstream={**(upstream or {}), "features": features_path})
    points = bary["points"].float()
    if points.ndim != 3 or points.shape[0] != info.num_classes:
        fail(f"{barycenters_path} holds barycenters of shape {tuple(points.shape)}, not [{info.num_classes} "
             "classes, k, d]. Rerun barycenter.py.")
    if feats["features"].shape[1] != points.shape[2]:
        fail(f"{features_path} holds {feats['features'].shape[1]}-d features but {barycenters_path} "
             f"{points.shape[2]}-d atoms. Rerun barycenter.py with --recompute-features.")
    if pick == "nearest":
        return assign_nearest(feats["features"].float(), feats["labels"], points)
    if teacher_path is None:
        fail(f"the hardest-in-cell choice needs the teacher (its margins on {features_path}), but there is no "
             "teacher.pt for this run. Pass --teacher PATH.")
    teacher, _ = models.load_teacher(teacher_path, info)
    margins = teacher_margins(feats["features"], feats["labels"], models.classifier(teacher))
    return assign_hardest(feats["features"].float(), feats["labels"], points, bary["weights"], margins)


def coreset_subset(info, args, chosen: torch.Tensor, source: str = "nearest-real coreset") -> subsets.ImageSet:
    """The images of `chosen` [C, k] (eval transform, uint8, class-major, atom order): the coreset baseline."""
    ds = data.build_dataset(info, args, "train", augment=False)
    flat = chosen.flatten().tolist()
    images = torch.stack([subsets._to_uint8(info, ds[i][0]) for i in flat])
    C, k = chosen.shape
    labels = torch.arange(C).repeat_interleave(k)
    return subsets.ImageSet(images, labels, torch.full((C * k,), 1.0 / k), k, source, flat)


def baseline_subset(info, args, ipc: int, pick: str = "nearest") -> subsets.ImageSet:
    """evaluate's `--baseline coreset` (pick 'nearest': the nearest real images of the barycenters in --out,
    features.pt and barycenters.pt) and `--baseline hardest` (the hardest image of each atom's cell).
    Refused when the synthetic set under evaluation was made from other barycenters (its meta records
    their sha256): the two rows would then answer different questions."""

    name = {"nearest": "coreset", "hardest": "hardest"}[pick]
    paths = artifacts.run_paths(args.out)
    teacher = getattr(args, "teacher", None) or paths.teacher
    synthetic = getattr(args, "synthetic", None) or paths.synthetic
    if os.path.isfile(synthetic) and os.path.isfile(paths.barycenters):
        recorded = artifacts.load(synthetic).get("meta", {}).get("upstream", {}).get("barycenters")
        if recorded is not None and recorded != artifacts.sha256_file(paths.barycenters):
            fail(f"--baseline {name}: {synthetic} was recovered from other barycenters than {paths.barycenters} "
                 "(sha256 differs), so the coreset would not be the distilled set's own atoms' images. Rerun "
                 "recover.py with these barycenters, or barycenter.py with the recover run's settings.")
    chosen = load_assignment(info, paths.features, paths.barycenters, teacher if os.path.isfile(teacher) else None,
                             pick)
    if chosen.shape[1] != ipc:
        fail(f"--baseline {name}: {paths.barycenters} holds {chosen.shape[1]} atoms per class, but --ipc is {ipc}. "
             f"Rerun barycenter.py with --ipc {ipc}.")
    what = "nearest-real coreset (barycenter atoms' images" if pick == "nearest" else \
        "hardest-in-cell coreset (the hardest image of each atom's cell"
    return coreset_subset(info, args, chosen, what + ", no recover)")


class RealImages:
    """--init real: random training images of a class (normalised), drawn per class from the seed.
    --init nearest / hardest: `chosen` [C, IPC] dataset indices, image j of class c = atom j's
    (assign_nearest / assign_hardest)."""

    def __init__(self, info, args, chosen: torch.Tensor | None = None):
        self.ds = data.build_dataset(info, args, "train", augment=False)
        self.per_class = data.class_indices(self.ds.targets, info.num_classes)
        self.info, self.seed, self.ipc, self.chosen = info, args.seed, args.ipc, chosen
        if chosen is not None and tuple(chosen.shape) != (info.num_classes, args.ipc):
            fail(f"--init {args.init}: the barycenters hold {chosen.shape[1]} atoms per class, but --ipc is "
                     f"{args.ipc}. Rerun barycenter.py with --ipc {args.ipc}.")
        short = [(info.classes[c], len(ix)) for c, ix in enumerate(self.per_class) if len(ix) < args.ipc]
        if short and chosen is None:  # checked before any work, not when the class's group comes up
            name, n = min(short, key=lambda t: t[1])
            fail(f"--init real needs --ipc {args.ipc} different training images per class, but class {name!r} "
                     f"of {info.data_dir or info.name} has {n} ({len(short)} class(es) in all have fewer). Use "
                     f"--init noise, or --ipc {n} or less.")

    def of_class(self, c: int, index=None) -> torch.Tensor:
        """The IPC starting images of class c [IPC, channels, S, S], or only image `index`."""
        if self.chosen is not None:
            pick = self.chosen[c].tolist()
            return self.ds[pick[index]][0] if index is not None else torch.stack([self.ds[i][0] for i in pick])
        idx = self.per_class[c]
        if len(idx) < self.ipc:
            fail(f"class {self.info.classes[c]} has {len(idx)} training images, fewer than --ipc {self.ipc}, "
                     "so --init real cannot start every image from a different real one. Use --init noise "
                     "or a smaller --ipc.")
        g = augment.recover_generator(self.seed, c, None, purpose=1)
        pick = torch.randperm(len(idx), generator=g)[:self.ipc].tolist()
        if index is not None:
            return self.ds[idx[pick[index]]][0]
        return torch.stack([self.ds[idx[i]][0] for i in pick])


def starting_images(info, args, paths):
    """recover's real starting images for --init real / nearest / hardest (None for --init noise)."""
    if args.init == "real":
        return RealImages(info, args)
    if args.init in PICKS:
        return RealImages(info, args, load_assignment(info, paths.features, args.barycenters or paths.barycenters,
                                                      args.teacher or paths.teacher, args.init))
    return None
