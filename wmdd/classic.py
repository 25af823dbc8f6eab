"""The classic evaluation recipe of dataset distillation (DC, DSA, DM: every published Fashion-MNIST / CIFAR
number of that line), evaluate `--recipe dc|dsa`: a ConvNet with instance norm trained from scratch with SGD
on the class labels, DSA's augmentation, top-1 on the real test set after the last epoch. And DC's two
coreset baselines, herding and k-center (evaluate `--baseline herding,kcenter`).

More: docs/evaluate.md, "The classic recipe" and "Honest comparison".
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wmdd import artifacts, data, engine, features, models, subsets
from wmdd.cli import fail

DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"  # DSA's and DM's evaluation strategy (ParamDiffAug, mode 'S')


@dataclass(frozen=True)
class Recipe:
    """One classic recipe. `epochs` is the papers' epoch_eval_train E: E + 1 passes over the set are run
    (passes 0..E), the lr is multiplied by 0.1 after pass E // 2 + 1 with a fresh optimiser (momentum reset)."""
    name: str
    epochs: int
    augment: str              # "none" or a DSA strategy (one transform per batch)
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256


RECIPES = {
    # DC: 300 epochs; get_daparam's strategy is 'none' for every dataset but MNIST (and ConvNetBN students)
    "dc": Recipe("dc", 300, "none"),
    # DSA / DM: 1000 epochs with DiffAugment's six transforms, one chosen per batch
    "dsa": Recipe("dsa", 1000, DSA_STRATEGY),
}
RECIPE_NAMES = ("kd",) + tuple(RECIPES)
STUDENTS = ("convnet_in",)  # the classic student; any project / torchvision student also trains under dc / dsa


# ---------------------------------------------------------------------------------------------
# the student: ConvNet-128, depth 3, instance norm, ReLU, 2x2 average pooling, linear head


class ConvNetIN(nn.Module):
    """depth x [conv 3x3 (width) -> GroupNorm(width, width) (= instance norm, affine) -> ReLU -> avgpool 2],
    flatten, linear. A 1-channel input gets padding 3 in its first conv (28 px -> 32 px maps, as DC's)."""

    def __init__(self, channels: int, num_classes: int, image_size: int, width: int = 128, depth: int = 3):
        super().__init__()
        layers, size, c_in = [], image_size, channels
        for d in range(depth):
            pad = 3 if channels == 1 and d == 0 else 1
            layers += [nn.Conv2d(c_in, width, kernel_size=3, padding=pad), nn.GroupNorm(width, width, affine=True),
                       nn.ReLU(inplace=True), nn.AvgPool2d(kernel_size=2, stride=2)]
            size, c_in = (size + 2 * pad - 2) // 2, width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * size * size, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def build_student(name: str, info, channels: int, image_size: int) -> nn.Module:
    if name in STUDENTS:
        return ConvNetIN(channels, info.num_classes, image_size)
    return models.build_model(name, info.num_classes, info.stem, info.image_size)


# ---------------------------------------------------------------------------------------------
# DSA's differentiable augmentation on normalised images [B, C, H, W]; every draw from `g`, one value per image


def _u(g: torch.Generator, n: int) -> torch.Tensor:
    return torch.rand(n, generator=g)


def brightness(x, g, ratio: float = 1.0):
    """x + (u - 0.5) * ratio."""
    return x + ((_u(g, x.shape[0]) - 0.5) * ratio).to(x).view(-1, 1, 1, 1)


def saturation(x, g, ratio: float = 2.0):
    """(x - mean over channels) * (u * ratio) + that mean (the identity on one channel)."""
    m = x.mean(dim=1, keepdim=True)
    return (x - m) * (_u(g, x.shape[0]) * ratio).to(x).view(-1, 1, 1, 1) + m


def contrast(x, g, ratio: float = 0.5):
    """(x - the image's mean) * (u + ratio) + that mean."""
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * (_u(g, x.shape[0]) + ratio).to(x).view(-1, 1, 1, 1) + m


def translate(x, dy: torch.Tensor, dx: torch.Tensor):
    """out[b, :, i, j] = x[b, :, i + dy_b, j + dx_b], zero where that falls outside the image."""
    B, _, H, W = x.shape
    rows = torch.arange(H).view(1, H) + dy.view(B, 1)
    cols = torch.arange(W).view(1, W) + dx.view(B, 1)
    keep = ((rows >= 0) & (rows < H)).view(B, 1, H, 1) & ((cols >= 0) & (cols < W)).view(B, 1, 1, W)
    picked = x[torch.arange(B).view(B, 1, 1), :, rows.clamp(0, H - 1).view(B, H, 1), cols.clamp(0, W - 1).view(B, 1, W)]
    return picked.permute(0, 3, 1, 2) * keep.to(x)


def crop(x, g, ratio: float = 0.125):
    """A random translation by up to round(ratio * size) pixels per axis, zero filled (pad + crop)."""
    sy, sx = int(x.shape[2] * ratio + 0.5), int(x.shape[3] * ratio + 0.5)
    dy = torch.randint(-sy, sy + 1, (x.shape[0],), generator=g)
    dx = torch.randint(-sx, sx + 1, (x.shape[0],), generator=g)
    return translate(x, dy, dx)


def cutout_size(h: int, w: int, ratio: float = 0.5) -> tuple:
    return int(h * ratio + 0.5), int(w * ratio + 0.5)


def cutout(x, g, ratio: float = 0.5):
    """Zero a square of side round(ratio * size) whose top-left corner is (c - side // 2) for a centre c
    uniform in [0, size] (even side; [0, size - 1] odd), clipped to the image."""
    B, _, H, W = x.shape
    ch, cw = cutout_size(H, W, ratio)
    cy = torch.randint(0, H + (1 - ch % 2), (B,), generator=g) - ch // 2
    cx = torch.randint(0, W + (1 - cw % 2), (B,), generator=g) - cw // 2
    r, c = torch.arange(H).view(1, H), torch.arange(W).view(1, W)
    in_r = (r >= cy.view(B, 1)) & (r < cy.view(B, 1) + ch)
    in_c = (c >= cx.view(B, 1)) & (c < cx.view(B, 1) + cw)
    return x * (~(in_r.view(B, 1, H, 1) & in_c.view(B, 1, 1, W))).to(x)


def flip(x, g, prob: float = 0.5):
    """Each image mirrored left-right with probability `prob`."""
    return torch.where((_u(g, x.shape[0]) < prob).view(-1, 1, 1, 1), x.flip(3), x)


def warp(x, theta: torch.Tensor):
    """grid_sample(x, affine_grid(theta)): bilinear, zeros outside, align_corners False."""
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def scale_matrices(g, n: int, ratio: float = 1.2) -> torch.Tensor:
    sx = _u(g, n) * (ratio - 1.0 / ratio) + 1.0 / ratio
    sy = _u(g, n) * (ratio - 1.0 / ratio) + 1.0 / ratio
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = sx, sy
    return theta


def rotate_matrices(g, n: int, degrees: float = 15.0) -> torch.Tensor:
    a = (_u(g, n) - 0.5) * 2 * degrees / 180 * math.pi
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
    return theta


def scale(x, g, ratio: float = 1.2):
    """Sampling grid scaled by s_x, s_y ~ U[1 / ratio, ratio] each."""
    return warp(x, scale_matrices(g, x.shape[0], ratio))


def rotate(x, g, degrees: float = 15.0):
    """Sampling grid rotated by an angle ~ U[-degrees, degrees]."""
    return warp(x, rotate_matrices(g, x.shape[0], degrees))


TRANSFORMS = {"color": (brightness, saturation, contrast), "crop": (crop,), "cutout": (cutout,), "flip": (flip,),
              "scale": (scale,), "rotate": (rotate,)}


def dsa(x: torch.Tensor, g: torch.Generator, strategy: str = DSA_STRATEGY) -> torch.Tensor:
    """DSA's single mode ('S'): one of the strategy's transforms chosen uniformly for the batch, drawn anew
    for each image ('color' is brightness, saturation and contrast in turn)."""
    if strategy in ("", "none"):
        return x
    names = strategy.split("_")
    for op in TRANSFORMS[names[int(torch.randint(len(names), (1,), generator=g))]]:
        x = op(x, g)
    return x.contiguous()


# ---------------------------------------------------------------------------------------------
# training: evaluate_synset's loop


def lr_at(step: int, recipe: Recipe) -> float:
    """The lr of pass `step` (0..epochs): lr up to pass epochs // 2 + 1, lr / 10 after it."""
    return recipe.lr if step <= recipe.epochs // 2 + 1 else recipe.lr * 0.1


def optimizer(params, lr: float, recipe: Recipe) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


def generators(seed: int) -> tuple:
    """(batch order, augmentation) generators of one student: every random choice follows from its seed."""
    return torch.Generator().manual_seed(seed * 1_000_003 + 11), torch.Generator().manual_seed(seed * 1_000_003 + 29)


def normalised(images: torch.Tensor, index: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 images (a tensor or subsets.DatasetImages) -> float, normalised per channel."""
    x = images[index].float().div(255)
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def train(model: nn.Module, images, labels: torch.Tensor, recipe: Recipe, seed: int, mean, std, device,
          validate=None, eval_every: int | None = None, batch_size: int | None = None, log=None) -> dict:
    """Train `model` on uint8 `images` / class `labels` for recipe.epochs + 1 passes (shuffled batches,
    cross-entropy, SGD, the lr step of `lr_at`); validate() -> {top1, top5} after pass `epochs` (and every
    `eval_every` passes). Returns the student's record (evaluate's format)."""
    t0 = time.time()
    g_order, g_aug = generators(seed)
    n, bs = len(labels), batch_size or recipe.batch_size
    model.to(device)
    lr = lr_at(0, recipe)
    opt = optimizer(model.parameters(), lr, recipe)
    history, running, seen = [], 0.0, 0
    for step in range(recipe.epochs + 1):
        if lr_at(step, recipe) != lr:  # the step: a new optimiser, as evaluate_synset builds one
            lr = lr_at(step, recipe)
            opt = optimizer(model.parameters(), lr, recipe)
        model.train()
        order = torch.randperm(n, generator=g_order)
        for start in range(0, n, bs):
            idx = order[start:start + bs]
            x = normalised(images, idx, mean, std)
            if recipe.augment != "none":
                x = dsa(x, g_aug, recipe.augment)
            loss = F.cross_entropy(model(x.to(device)), labels[idx].to(device))
            if not math.isfinite(loss.item()):
                fail(f"the classic-recipe student's loss became {loss.item()} in pass {step}: check the images.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running, seen = running + loss.item() * len(idx), seen + len(idx)
        if validate is not None and (step == recipe.epochs or (eval_every and step and step % eval_every == 0)):
            history.append({"epoch": step, "train_loss": running / max(seen, 1), **validate(model)})
            running, seen = 0.0, 0
            if log:
                log(f"  pass {step}: top-1 {history[-1]['top1']:.2f}")
    final = history[-1] if history else {"top1": float("nan"), "top5": float("nan"), "epoch": recipe.epochs}
    best = max(history, key=lambda h: h["top1"]) if history else final
    return {"seed": seed, "top1": final["top1"], "top5": final["top5"], "best_top1": best["top1"],
            "best_epoch": best["epoch"], "history": history, "wall_s": round(time.time() - t0, 2), "world_size": 1,
            "recipe": {**recipe.__dict__, "passes": recipe.epochs + 1, "lr_step_after_pass": recipe.epochs // 2 + 1}}


# ---------------------------------------------------------------------------------------------
# evaluate's side: flags, and one job's student


def recipe_of(args) -> Recipe:
    """The --recipe, with --epochs / --lr / --weight-decay / --batch-size given on the command line."""
    base = RECIPES[args.recipe]
    return Recipe(base.name, args.epochs, base.augment, args.lr, base.momentum, args.weight_decay, args.batch_size)


def resolve(args) -> None:
    """--recipe dc|dsa: hard labels; the recipe's epochs, lr, weight decay and batch where unset; the
    ConvNet-IN student unless --student names another; validation only after the last epoch by default."""
    if args.recipe == "kd":
        if args.student in STUDENTS:
            fail(f"--student {args.student} is the classic recipe's student: pass --recipe dc or --recipe dsa.")
        return
    if args.labels == "online":
        fail(f"--recipe {args.recipe} trains on the class labels (hard), as DC / DSA / DM do: drop --labels online, "
             "or use --recipe kd for soft labels.")
    if args.ars or args.hard_label_aug:
        fail(f"--ars and --hard-label-aug belong to the KD recipe; --recipe {args.recipe} has its own augmentation.")
    r = RECIPES[args.recipe]
    args.labels = "hard"
    args.student = args.student or STUDENTS[0]
    for flag, value in (("epochs", r.epochs), ("lr", r.lr), ("weight_decay", r.weight_decay),
                        ("batch_size", r.batch_size)):
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    args.eval_every = args.eval_every or args.epochs


def describe(args) -> str:
    r = recipe_of(args)
    aug = "no augmentation" if r.augment == "none" else f"DSA {r.augment}, one per batch"
    return (f"hard, {r.name.upper()} recipe ({args.student}, SGD lr {r.lr:g} mom {r.momentum:g} wd {r.weight_decay:g}, "
            f"{r.epochs} ep, lr/10 after {r.epochs // 2 + 1}, batch {r.batch_size}, {aug})")


def train_job(job, args, info, device, val_loader, world) -> dict:
    """One evaluate job (students.Job) under the classic recipe."""
    if world.enabled:
        fail(f"--recipe {args.recipe} trains each student in one process: run evaluate.py without torchrun.")
    torch.manual_seed(job.seed)
    channels, size = job.iset.images.shape[1], job.iset.images.shape[-1]
    model = build_student(args.student, info, channels, size)
    batch = args.full_batch_size if job.key.startswith("full/") else args.batch_size
    return train(model, job.iset.images, job.iset.labels, recipe_of(args), job.seed, info.mean, info.std, device,
                 validate=lambda m: engine.validate(m, val_loader, device, progress=False),
                 eval_every=args.eval_every, batch_size=batch)


# ---------------------------------------------------------------------------------------------
# DC's coreset baselines on a feature matrix [n, d] of one class; indices into its rows, in pick order


def herding(feats: torch.Tensor, k: int) -> list:
    """Welling's herding as DC / iCaRL use it: pick t (t = 1..k) minimises || mu - (sum of the t - 1 picked +
    f_i) / t || over the points not yet picked, mu the class mean."""
    f = feats.double()
    mu, acc, chosen = f.mean(0), torch.zeros(f.shape[1], dtype=torch.float64), []
    free = torch.ones(len(f), dtype=torch.bool)
    for t in range(1, k + 1):
        gap = (mu - (acc + f) / t).norm(dim=1).masked_fill(~free, math.inf)
        i = int(gap.argmin())
        chosen.append(i)
        free[i], acc = False, acc + f[i]
    return chosen


def kcenter(feats: torch.Tensor, k: int) -> list:
    """Greedy k-center (Sener & Savarese's farthest-point rule): the first center is the point nearest the
    class mean, each next one the point farthest from its nearest chosen center."""
    f = feats.double()
    first = int((f - f.mean(0)).norm(dim=1).argmin())
    chosen, nearest = [first], (f - f[first]).norm(dim=1)
    for _ in range(k - 1):
        i = int(nearest.argmax())
        chosen.append(i)
        nearest = torch.minimum(nearest, (f - f[i]).norm(dim=1))
    return chosen


SELECTORS = {"herding": herding, "kcenter": kcenter}


_FEATURES: dict = {}  # (file, its mtime and size, dataset, resolution) -> (features, labels): one pass per process


def training_features(info, args):
    """The project teacher's penultimate features of the training set: barycenter.py's features.pt in --out
    (checked against this dataset), else extracted now with --teacher / <out>/teacher.pt."""
    paths = artifacts.run_paths(args.out)
    teacher_path = getattr(args, "teacher", None) or paths.teacher
    source = paths.features if os.path.isfile(paths.features) else teacher_path
    if not os.path.isfile(source):
        fail(f"--baseline herding / kcenter needs the teacher's features of the training set: no {paths.features} "
             f"(barycenter.py writes it) and no teacher at {teacher_path} (squeeze.py) to compute them.")
    key = (os.path.abspath(source), os.stat(source).st_mtime_ns, os.stat(source).st_size, info.name, info.resolution)
    if key not in _FEATURES:
        if source == paths.features:
            feats = artifacts.load(paths.features, stage="features")
            artifacts.check_compatible(feats["meta"], info, paths.features)
            found = feats["features"].float(), feats["labels"].long()
        else:
            teacher, _ = models.load_teacher(teacher_path, info)
            ds = data.build_dataset(info, args, "train", augment=False)
            found = features.extract_features(teacher, ds, torch.device("cpu"), 256, args.workers, progress=False)
        _FEATURES.clear()
        _FEATURES[key] = found
    return _FEATURES[key]


def coreset_baseline(info, args, ipc: int, method: str) -> subsets.ImageSet:
    """evaluate's `--baseline herding|kcenter`: per class, IPC real training images chosen by `method` on
    the teacher's features (one set for every seed)."""
    feats, labels = training_features(info, args)
    chosen = []
    for c in range(info.num_classes):
        rows = (labels == c).nonzero().flatten()
        if len(rows) < ipc:
            fail(f"class {info.classes[c]} has {len(rows)} training images, fewer than --ipc {ipc} ({method}).")
        chosen += rows[SELECTORS[method](feats[rows], ipc)].tolist()
    return subsets.images_of(info, args, chosen, ipc, f"{method} coreset (teacher features)")
