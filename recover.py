"""Stage 3 - recover: optimise synthetic images against the teacher, its per-class BN statistics and the
class barycenters (WMDD §III, DESIGN §1 step 3).

    python recover.py --dataset digits --ipc 10 --out runs/digits
    python recover.py --dataset tiny --data-dir /data/tiny-imagenet-200 --ipc 50 --out runs/tiny/r224
    python recover.py --dataset imagenet --data-dir /data/ILSVRC --ipc 10 --classes 0:250   # one shard
    python recover.py --dataset imagenette --data-dir /data/imagenette2 --ipc 10 --sre2l   # the baseline

Reads from --out: `teacher.pt`, `bn_stats.pt` (squeeze.py) and `barycenters.pt` (barycenter.py; not needed
with --feature none). Writes: `synthetic.pt` (uint8 images [C*IPC, 3, H, W] in [0, 255], class-major;
labels; barycenter weight of each image's atom; ipc; per-iteration loss curves) and
`images/<class>/<class>_<j>.png` (an ImageFolder tree; `.jpg` with --image-format jpeg).

Stored pixels (wmdd/protocol.py; `--protocol released` sets the released values): --pixel-rounding round
(default) or floor (the released `(x * 255).astype(np.uint8)`); --image-format png (default, lossless) or
jpeg: each image is JPEG-encoded by PIL at --jpeg-quality (75, PIL's default, as the released save) and
decoded before synthetic.pt is written, so relabel, evaluate and the images/ tree (the JPEG bytes
themselves) all hold the same pixels. `--protocol released` also runs the teacher in fp32 (--amp fp32).
barycenters.pt made under another --init than this run's protocol expects is refused (exit code 2).

The loss (image j of class c is tied to barycenter atom j of class c; f = penultimate feature):

    L = ||f(x) - B||_F  +  lambda_bn * sum_l m_l * mean_c ( ||mu_l(x_c) - mu_l[c]||_2 + ||var_l(x_c) - var_l[c]||_2 )
        + r_ce * CE(teacher(x), y)

over the images of one batch: the Frobenius norm is neither squared nor averaged (as released); the BN
term runs over every BatchNorm layer of the teacher (downsample BNs included), m_1 = --first-bn-mult and
m_l = 1 after; mu_l(x_c), var_l(x_c) are the mean and biased variance of layer l's input over the images of
class c in the batch and their positions, matched to the real per-class statistics of bn_stats.pt.
Adam(betas 0.5, 0.9) on the pixels (in the normalised input space), cosine learning rate per iteration,
pixels clamped to the valid range after every step. Each step augments the whole batch with one
RandomResizedCrop (scale: the preset's, 0.08-1 for the paper's datasets) and, if the preset allows, one
horizontal flip, then rolls it by (dy, dx) uniform in [0, jitter] (32 px at 224, scaled with the input size).
The teacher stays frozen in eval mode: its weights and running statistics never change.

Batches hold whole classes, class-major: batch size // IPC classes of IPC images each. When IPC exceeds
the batch size a batch is one class, split into chunks of --batch-size images that share the step's
augmentation: a no-grad pass first records every chunk's BN statistics, feature residual and CE; then each
chunk is back-propagated with the other chunks' statistics added as constants (`bnstats.merge_moments`),
so the gradient is exactly that of the loss over all the class's images, at the memory of one chunk.

Ablations (paper Table III; every flag can also be combined by hand):

    WMDD                          (defaults)                       feature + per-class BN
    + CE                          --r-ce 1                         feature + per-class BN + CE
    CE, per-class BN              --feature none --r-ce 1
    barycenter, global BN         --bn global                      (first-BN x10, released layout)
    SRe2L                         --sre2l                          CE + global BN, SRe2L's recover

Levers beyond the paper (ours, not the paper's; none changes a default; bench/RESULTS.md "Against random
real images" measures them):

    --init nearest        image j of class c starts from the real training image whose teacher feature
                          (barycenter.py's features.pt) is nearest to atom j of class c, each image used at
                          most once: an optimal assignment per class (wmdd/coreset.py says why). The loss then
                          refines it; the start depends on features.pt and barycenters.pt, so both are part of
                          every shard's upstream key. (--init real: random real images of the class instead.)
    --init hardest        image j of class c starts from the image of atom j's cell (the class's images that
                          the barycenter's transport plan gives atom j) with the smallest teacher margin
                          (own-class logit minus the largest other): the barycenter's coverage of the class,
                          the image nearest a decision boundary from each region (wmdd/coreset.py). Needs
                          features.pt, barycenters.pt and the teacher, all part of every shard's key.
    --crop-scale LO HI    the area range of recover's RandomResizedCrop (default: the preset's, 0.08-1 for
                          the paper's datasets, 0.25-1 for digits); part of the recipe.
    --iterations 0        with a real start (--init real / nearest / hardest): no step, synthetic.pt holds
                          the starting real images themselves (the coreset a start picks, in the format
                          relabel and evaluate read).
    --iterations, --lr, --lambda-bn   from a real start fewer, smaller steps keep the image close to the real one.
                          Adam moves a pixel by up to about --lr per step whatever the gradient's size, so
                          the preset's lr (0.1-0.25) leaves a real image within a few steps. The README's
                          best configuration: --init nearest --iterations 20 --lr 0.02 --crop-scale 0.5 1,
                          from barycenters made with `barycenter.py --restarts 8` (the lowest-W2 of 8 starts
                          per class picks better real images to start from); at IPC 50, and with hard
                          labels from IPC 25, instead --init hardest --iterations 0 (hard examples help
                          when data is abundant).
                          --lambda-bn trades the label regimes from such a start: the BN term pulls it toward
                          its class's statistics, which costs hard-label accuracy (digits) and gives the
                          soft-label gain (photos); 1 instead of the presets' 10 favours hard labels.

evaluate's `--baseline coreset` trains on those nearest real images themselves (no recover), `--baseline
hardest` on the hardest-in-cell ones.

`--bn global` matches the teacher's BN running statistics (what the released code matched; `--global-stats
data` matches the exact training-set statistics of bn_stats.pt instead). With global BN the released code
built batches "ipc-major", one image of each of --batch-size classes per batch, one batch per image index
j: `--layout auto` follows it (class-major for per-class BN, ipc-major otherwise). `--first-bn-mult`
defaults to the released scripts' values: 1 with per-class BN, 10 with global BN.

`--sre2l` is SRe2L's recover (released data_synthesis.py / recover_tiny.py): CE weight 1, global BN on the
running statistics, first-BN multiplier 10, no feature term, ipc-major batches, and SRe2L's R_BN weight
(0.01 for its ImageNet run, 1 for its Tiny-ImageNet run; 0.01 for every other preset) unless --lambda-bn
is given. lr and iterations stay the preset's (SRe2L's own: lr 0.25 ImageNet / 0.1 Tiny, like the presets;
it ran 1K-4K iterations), and the jitter follows the rule above (SRe2L: 32 px at 224, +-4 px at 64).

Sharding: `--classes a:b` recovers classes a..b-1. Classes are grouped on a grid fixed by the batch size
(group g = classes [g*k, (g+1)*k), k = classes per batch), each group's random draws come from a generator
seeded by (--seed, the group's first class, image index), and each finished group is written to
`shards/recover_<a>-<b>.pt` at once. So any split of the classes along the grid (e.g. several GPUs, or
0:5 + 5:10 with 5 classes per batch) reproduces the unsplit run exactly; a rerun skips groups whose shard
is already there from the same recipe and upstream files (resume); and whenever the shards of this recipe
cover every class, they are merged into synthetic.pt (wmdd/shards.py: the grid, the shards, the merge).

Several processes: `torchrun --nproc_per_node N recover.py ...` (or multi-node torchrun, with --out on a
file system every node sees; nccl on CUDA, gloo on CPU). The groups not yet done are shared out round
robin, each rank writes the shards (and PNGs) of its groups, and after every rank is done rank 0 merges
the shards into synthetic.pt and checks that every class is there. The images are those of one process
with the same flags, bit for bit. Only rank 0 prints the configuration and a progress bar (of its own
groups). An error on one rank (e.g. a non-finite loss) lets the others finish their groups, then every
rank stops with exit code 2 and the message.

Resume: the run can be killed at any moment (SIGKILL included) and rerun with the same command. Shards
and synthetic.pt are written to a temporary file and renamed into place, a group's PNGs are written before
its shard, and a shard that does not load (or comes from another recipe or other upstream files) is
recomputed, never read: the rerun redoes only the unfinished groups and ends with the same synthetic.pt
as an uninterrupted run.

Bad input stops before any work with exit code 2 and a message naming the file and the fix: upstream
files from another dataset, class order, resolution or teacher (sha256), corrupt, truncated or unsafe
(pickled code) files, --ipc < 1, barycenters made for another --ipc, --init real with a class smaller
than --ipc.

Timing (paper Table IV): each group's optimisation time, its number of Adam steps (batches x iterations)
and the peak memory (CUDA's max_memory_allocated on a GPU, the process's peak RSS on CPU) are kept in its
shard; synthetic.pt's meta `timing` holds their sums, seconds per iteration and the maximum peak.

Speed: bf16 autocast (--amp auto, the default on CUDA under --protocol wmdd; not yet shown equal to fp32 on a GPU) and channels_last (--channels-last, default on) for the
teacher; statistics, features and losses are computed in float32. The iteration loop never waits on the
device except for the progress bar (every --log-every steps), where a non-finite loss also stops the run
with the class range and iteration (exit 2; the shards written so far are kept).
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from wmdd import artifacts, bnstats, cli, coreset, data, dist, models, ops, protocol
from wmdd.shards import (Group, StepClock, batch_generator, classes_per_group, current_shard, merge_shards, parse_classes,
                         plan_groups, shard_groups, shard_path)

TERMS = ("total", "feature", "bn", "ce")
# SRe2L's released R_BN weights (recover.sh: ImageNet 0.01; recover_tiny.sh: Tiny-ImageNet 1).
SRE2L_LAMBDA = {"tiny": 1.0}
SRE2L_LAMBDA_DEFAULT = 0.01
# The settings that make a synthetic set: two shards (or a resumed run) may be combined only when equal.
RECIPE_KEYS = ("ipc", "iterations", "lr", "lambda_bn", "r_ce", "first_bn_mult", "feature", "bn", "global_stats",
               "layout", "batch_size", "init", "jitter", "seed", "amp", "sre2l", "pixel_rounding", "image_format",
               "jpeg_quality", "crop_scale")
# How long a rank that is done waits for the others (ranks finish a group or more apart): the process
# group's default timeout (10-30 min) is too short for that.


def get_args_parser():
    p = argparse.ArgumentParser("recover: optimise synthetic images against the teacher (WMDD)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_common_args(p, ipc=True)
    g = p.add_argument_group("optimisation (unset: the preset's value)")
    g.add_argument("--iterations", type=int, default=None,
                   help="Adam steps per batch (0 with a real --init: the starting images themselves)")
    g.add_argument("--lr", type=float, default=None, help="Adam learning rate (cosine schedule per iteration)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="images per batch; batches hold batch-size // ipc whole classes (chunks of a class "
                        "when ipc > batch-size)")
    g.add_argument("--init", default="noise", choices=["noise", "real", "nearest", "hardest"],
                   help="start from Gaussian noise (paper), from random real images of the class, from the "
                        "real image nearest to each barycenter atom, or from the image of each atom's cell "
                        "the teacher finds hardest (wmdd/coreset.py)")
    g.add_argument("--crop-scale", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="RandomResizedCrop area range of recover's augmentation (default: the preset's)")
    g.add_argument("--jitter", type=int, default=None,
                   help="max roll in pixels (default: 32 at 224 px, scaled with the input size)")
    g = p.add_argument_group("loss terms and ablations (paper Table III)")
    g.add_argument("--feature", default=None, choices=["barycenter", "none"],
                   help="feature term ||f(x) - B||_F to the barycenter atoms (default barycenter)")
    g.add_argument("--bn", default=None, choices=["per-class", "global", "none"],
                   help="BN statistics matched (default per-class)")
    g.add_argument("--global-stats", default="running", choices=["running", "data"],
                   help="--bn global: the teacher's running statistics (released) or bn_stats.pt's exact ones")
    g.add_argument("--lambda-bn", type=float, default=None, help="weight of the BN term")
    g.add_argument("--first-bn-mult", type=float, default=None,
                   help="multiplier of the first BN layer's term (default 1 per-class, 10 global)")
    g.add_argument("--r-ce", type=float, default=None, help="weight of the cross-entropy term")
    g.add_argument("--layout", default="auto", choices=["auto", "class-major", "ipc-major"],
                   help="batch layout; auto: class-major with per-class BN, ipc-major (released) otherwise")
    g.add_argument("--sre2l", action="store_true", help="SRe2L's recover (baseline): see the manual")
    g = p.add_argument_group("run")
    g.add_argument("--classes", default=None, help="class range a:b to recover (a shard); default all")
    g.add_argument("--teacher", default=None, help="teacher checkpoint (default <out>/teacher.pt)")
    g.add_argument("--bn-stats", default=None, help="BN statistics (default <out>/bn_stats.pt)")
    g.add_argument("--barycenters", default=None, help="barycenters (default <out>/barycenters.pt)")
    g.add_argument("--amp", default=None, choices=["auto", "bf16", "fp32"],
                   help="teacher precision; auto: bf16 autocast on CUDA, fp32 on CPU (--protocol wmdd: auto; "
                        "released: fp32)")
    g.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"],
                   help="channels_last memory format for the teacher (auto: on)")
    g.add_argument("--log-every", type=int, default=25, help="progress bar / NaN check every N steps")
    g.add_argument("--no-png", action="store_true", help="skip the images/ tree")
    g = p.add_argument_group("stored images (--protocol wmdd: png, round; released: jpeg, floor)")
    g.add_argument("--image-format", default=None, choices=["png", "jpeg"],
                   help="png: the pixels as optimised (lossless); jpeg: each image JPEG-encoded by PIL at "
                        "--jpeg-quality and decoded, before synthetic.pt is written (relabel, evaluate and "
                        "the images/ tree, .jpg files, all read the decoded pixels)")
    g.add_argument("--jpeg-quality", type=int, default=75, help="--image-format jpeg: PIL quality (75: PIL's "
                   "default, which the released save used)")
    g.add_argument("--pixel-rounding", default=None, choices=["round", "floor"],
                   help="[0, 1] -> uint8: round to nearest, or floor (the released astype(np.uint8))")
    return p


# ---------------------------------------------------------------------------------------------
# configuration


def resolve_args(args, info, device) -> None:
    """Fill the flags left unset: --sre2l's choices, then the preset's, then the rules in the manual."""
    protocol.resolve(args)  # --protocol's choices (done by dist.stage_main already; idempotent)
    if args.sre2l:
        for key, value in (("feature", "none"), ("bn", "global"), ("r_ce", 1.0), ("first_bn_mult", 10.0),
                           ("lambda_bn", SRE2L_LAMBDA.get(info.name, SRE2L_LAMBDA_DEFAULT))):
            if getattr(args, key) is None:
                setattr(args, key, value)
        if args.layout == "auto":
            args.layout = "ipc-major"
    args.feature = args.feature or "barycenter"
    args.bn = args.bn or "per-class"
    data.preset_defaults(args, "recover")
    if args.first_bn_mult is None:
        args.first_bn_mult = 10.0 if args.bn == "global" else 1.0
    if args.layout == "auto":
        args.layout = "class-major" if args.bn == "per-class" else "ipc-major"
    if args.jitter is None:
        args.jitter = int(round(32 * info.image_size / 224))
    if args.crop_scale is None:
        args.crop_scale = list(info.crop_scale)
    args.crop_scale = [float(v) for v in args.crop_scale]
    if not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        cli.fail(f"--crop-scale {args.crop_scale[0]:g} {args.crop_scale[1]:g} is not an area range: pass "
                 "LO HI with 0 < LO <= HI <= 1 (e.g. 0.5 1).")
    if args.amp == "auto":
        args.amp = "bf16" if device.type == "cuda" else "fp32"
    if args.channels_last == "auto":
        args.channels_last = "on"
    if args.ipc < 1 or args.batch_size < 1 or args.iterations < 0:
        cli.fail(f"--ipc ({args.ipc}), --batch-size ({args.batch_size}) and --iterations ({args.iterations}) "
                 "must be positive (--iterations 0: only with a real start).")
    if args.iterations == 0 and args.init == "noise":
        cli.fail("--iterations 0 keeps the starting images as they are, and --init noise starts from noise: pass "
                 "--init real / nearest / hardest (a set of real images in synthetic.pt's format) or "
                 "--iterations 1 or more.")
    if args.bn == "per-class" and args.layout != "class-major":
        cli.fail("--bn per-class needs class-major batches (whole classes per batch); drop --layout ipc-major.")
    if args.feature == "none" and args.bn == "none" and args.r_ce == 0:
        cli.fail("every loss term is off (--feature none --bn none --r-ce 0): nothing to optimise.")


def recipe_of(args) -> dict:
    return {k: getattr(args, k) for k in RECIPE_KEYS}


# ---------------------------------------------------------------------------------------------
# augmentation: one crop + flip + roll for the whole batch


def draw_augmentation(gen: torch.Generator, size: int, scale, flip: bool, jitter: int,
                      ratio=(3 / 4, 4 / 3)) -> tuple:
    """(top, left, height, width, flip, dy, dx): RandomResizedCrop's box (10 tries of an area fraction
    uniform in `scale` and a log-uniform aspect ratio, else the whole image), a coin flip, a roll."""
    u = torch.rand(30, generator=gen).tolist()
    box = (0, 0, size, size)
    area = size * size
    for t in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[3 * t])
        aspect = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[3 * t + 1])
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= size and 0 < h <= size:
            top = min(int(u[3 * t + 2] * (size - h + 1)), size - h)
            left = int(torch.randint(0, size - w + 1, (1,), generator=gen))
            box = (top, left, h, w)
            break
    rest = torch.randint(0, 2**30, (3,), generator=gen).tolist()
    do_flip = flip and rest[0] % 2 == 1
    dy, dx = rest[1] % (jitter + 1), rest[2] % (jitter + 1)
    return box + (do_flip, dy, dx)


def augment(x: torch.Tensor, params: tuple, size: int) -> torch.Tensor:
    top, left, h, w, do_flip, dy, dx = params
    x = x[..., top:top + h, left:left + w]
    if (h, w) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if do_flip:
        x = x.flip(-1)
    if dy or dx:
        x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    return x


# ---------------------------------------------------------------------------------------------
# the loss


@dataclass
class Targets:
    """What one batch is matched to: labels [n], atoms [n, d] and per-layer BN statistics [G, C]."""
    labels: torch.Tensor
    atoms: torch.Tensor | None
    bn_mean: list
    bn_var: list
    groups: int


class Objective:
    """Forward pass of the teacher with pre-hooks on every BN layer collecting the (per-class or global)
    moments of its input, and the loss terms computed from them."""

    def __init__(self, model, args):
        self.model, self.head = model, models.classifier(model)
        self.layers = models.bn_layers(model)
        self.use_feature, self.bn_mode = args.feature == "barycenter", args.bn
        self.lambda_bn, self.r_ce = float(args.lambda_bn), float(args.r_ce)
        self.mults = [float(args.first_bn_mult)] + [1.0] * (len(self.layers) - 1)
        self.amp = args.amp == "bf16"
        self.channels_last = args.channels_last == "on"
        self.groups, self.shifts = 1, None
        self.moments: list = []
        self._handles = []
        if self.bn_mode != "none":
            self._handles = [m.register_forward_pre_hook(self._hook) for _, m in self.layers]

    def _hook(self, module, inputs):
        x = inputs[0]
        shift = self.shifts[len(self.moments)] if self.shifts else None  # target means: precise sums
        mean, var = bnstats.group_moments(x, self.groups, shift)
        self.moments.append((x.numel() // (self.groups * x.shape[1]), mean, var))

    def remove(self):
        for h in self._handles:
            h.remove()

    def forward(self, x, groups: int, shifts=None):
        """(features [n, d] fp32, logits or None, [(count, mean, var)] per BN layer) of the batch x
        (groups: classes in x for per-class statistics, else 1; shifts: per-layer [groups, C] mean guesses)."""
        self.groups, self.moments, self.shifts = groups, [], shifts
        x = models.as_layout(x, self.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp):
            feats = models.penultimate(self.model, x)
            logits = self.head(feats) if self.r_ce else None
        moments, self.moments = self.moments, []
        return feats.float(), (logits.float() if logits is not None else None), moments

    def terms(self, feats, logits, moments, tg: Targets, sl: slice, rest=None) -> dict:
        """The loss terms of images `sl` of the batch. `rest` (a class in chunks) holds the detached
        contributions of its other images: feature residual sum of squares, CE sum, (n, mean, var) per layer."""
        zero = feats.new_zeros(())
        out = {"feature": zero, "bn": zero, "ce": zero}
        if self.use_feature:
            diff = feats - tg.atoms[sl]
            out["feature"] = torch.linalg.vector_norm(diff) if rest is None \
                else (diff.pow(2).sum() + rest["feature_sq"]).sqrt()
        if self.bn_mode != "none":
            bn = zero
            for l, ((n, mean, var), t_mean, t_var, mult) in enumerate(zip(moments, tg.bn_mean, tg.bn_var, self.mults)):
                if rest is not None:
                    n_r, mean_r, var_r = rest["moments"][l]
                    mean, var = bnstats.merge_moments(float(n), mean, var, float(n_r), mean_r.float(), var_r.float())
                bn = bn + mult * bnstats.bn_match_loss(mean, var, t_mean, t_var)
            out["bn"] = bn
        if self.r_ce:
            ce = F.cross_entropy(logits, tg.labels[sl], reduction="sum")
            if rest is not None:
                ce = ce + rest["ce_sum"]
            out["ce"] = ce / tg.labels.numel()
        out["total"] = out["feature"] + self.lambda_bn * out["bn"] + self.r_ce * out["ce"]
        return out

    @torch.no_grad()
    def contribution(self, feats, logits, moments, tg: Targets, sl: slice) -> dict:
        """A chunk's detached share of every term (float64), to be added to the other chunks' gradients."""
        return {"feature_sq": (feats - tg.atoms[sl]).double().pow(2).sum() if self.use_feature else 0.0,
                "ce_sum": F.cross_entropy(logits, tg.labels[sl], reduction="sum").double()
                if logits is not None else 0.0,
                "moments": [(n, mean.double(), var.double()) for n, mean, var in moments]}


def chunk_slices(n: int, batch_size: int) -> list:
    return [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def rest_of(parts: list, k: int) -> dict:
    """Everything but chunk k's contribution, merged (float64)."""
    others = [p for i, p in enumerate(parts) if i != k]
    rest = {"feature_sq": sum(p["feature_sq"] for p in others), "ce_sum": sum(p["ce_sum"] for p in others),
            "moments": []}
    for l in range(len(parts[k]["moments"])):
        n, mean, var = others[0]["moments"][l]
        for p in others[1:]:
            n2, mean2, var2 = p["moments"][l]
            mean, var = bnstats.merge_moments(float(n), mean, var, float(n2), mean2, var2)
            n = n + n2
        rest["moments"].append((n, mean, var))
    return rest


class BatchOptimizer:
    """Adam on the pixels of one batch: `step(it, params)` is one iteration of the recover loop."""

    def __init__(self, objective: Objective, x0: torch.Tensor, tg: Targets, args, info):
        self.objective, self.tg, self.info = objective, tg, info
        self.iterations, self.lr, self.size = args.iterations, args.lr, info.image_size
        self.x = x0.clone().requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.x], lr=args.lr, betas=(0.5, 0.9), eps=1e-8)
        mean, std = torch.tensor(info.mean).view(1, 3, 1, 1), torch.tensor(info.std).view(1, 3, 1, 1)
        self.lo, self.hi = ((0 - mean) / std).to(x0.device), ((1 - mean) / std).to(x0.device)
        # a batch larger than --batch-size is one class (ipc > batch size): back-propagated in chunks
        n = x0.shape[0]
        self.chunks = chunk_slices(n, args.batch_size) if n > args.batch_size else [slice(None)]

    def step(self, it: int, params: tuple) -> dict:
        """Cosine lr, augment (params from `draw_augmentation`), loss, backward, Adam, clamp.
        Returns the loss terms (device tensors, not synchronised)."""
        obj, tg, x = self.objective, self.tg, self.x
        for group in self.optimizer.param_groups:
            group["lr"] = 0.5 * (1 + math.cos(math.pi * it / self.iterations)) * self.lr
        self.optimizer.zero_grad(set_to_none=True)
        parts = None
        if len(self.chunks) > 1:  # every chunk's detached share first, then each chunk's exact gradient
            with torch.no_grad():
                parts = [obj.contribution(*obj.forward(augment(x[sl], params, self.size), tg.groups, tg.bn_mean),
                                          tg, sl) for sl in self.chunks]
        for k, sl in enumerate(self.chunks):
            feats, logits, moments = obj.forward(augment(x[sl], params, self.size), tg.groups, tg.bn_mean)
            out = obj.terms(feats, logits, moments, tg, sl, rest_of(parts, k) if parts else None)
            out["total"].backward()
        self.optimizer.step()
        with torch.no_grad():
            x.clamp_(self.lo, self.hi)
        return out


def recover_batch(objective: Objective, x0: torch.Tensor, tg: Targets, args, info, gen: torch.Generator,
                  bar=None, where: str = "") -> tuple:
    """Optimise the normalised images x0 [n, 3, S, S] (class-major, matched to tg) for --iterations steps.
    Returns (final images, loss curve [iterations, len(TERMS)] on the device)."""
    opt = BatchOptimizer(objective, x0, tg, args, info)
    curve = torch.zeros(args.iterations, len(TERMS), device=x0.device)
    checked = 0
    for it in range(args.iterations):
        out = opt.step(it, draw_augmentation(gen, info.image_size, args.crop_scale, info.flip, args.jitter))
        curve[it] = torch.stack([out[t].detach().float() for t in TERMS])
        if bar is not None:
            bar.update(1)
        if (it + 1) % args.log_every == 0 or it + 1 == args.iterations:
            values = curve[checked:it + 1].cpu()  # the loop's only host synchronisation
            bad = (~torch.isfinite(values)).any(dim=1).nonzero()
            if len(bad):
                first = checked + int(bad[0])
                terms = ", ".join(f"{t} {float(v):.4g}" for t, v in zip(TERMS, values[int(bad[0])]))
                cli.fail(f"the recover loss became non-finite ({terms}) at iteration {first + 1} of "
                         f"{args.iterations} for {where}. Lower --lr or --lambda-bn (or check the teacher and "
                         "bn_stats.pt). Shards already written are kept: rerunning the same command resumes "
                         "from them.")
            checked = it + 1
            if bar is not None:
                bar.set_postfix({t: f"{float(v):.4g}" for t, v in zip(TERMS, values[-1])}, refresh=False)
    return opt.x.detach(), curve


# ---------------------------------------------------------------------------------------------
# inputs


def load_inputs(args, info, device, paths):
    """Teacher, BN targets and barycenters, checked against this run and against each other.
    Returns (model, upstream {name: path}, bn {"mean", "var"} lists of [K, C] or None, points, weights)."""
    teacher_path = args.teacher or paths.teacher
    model, _ = models.load_teacher(teacher_path, info, device)
    upstream = {"teacher": teacher_path}
    layers = models.bn_layers(model)
    if args.bn != "none" and not layers:
        cli.fail(f"the teacher in {teacher_path} has no BatchNorm layer, so there are no statistics to match. "
                 "Use a BN teacher (resnet18 / convnet) or pass --bn none.")
    bn = None
    if args.bn == "per-class" or (args.bn == "global" and args.global_stats == "data"):
        path = args.bn_stats or paths.bn_stats
        stats = artifacts.load(path, stage="squeeze-stats")
        artifacts.check_compatible(stats["meta"], info, path, upstream={"teacher": teacher_path})
        names = [n for n, _ in layers]
        if list(stats["layers"]) != names:
            cli.fail(f"{path} holds statistics of {len(stats['layers'])} BN layers that are not this teacher's "
                     f"{len(names)} ({teacher_path}). Rerun `squeeze.py --stats-only` for this teacher.")
        key_m, key_v = ("mean", "var") if args.bn == "per-class" else ("global_mean", "global_var")
        bn = {"mean": [t.to(device, torch.float32) for t in stats[key_m]],
              "var": [t.to(device, torch.float32) for t in stats[key_v]]}
        upstream["bn_stats"] = path
    elif args.bn == "global":  # the teacher's running statistics, as SRe2L and the released WMDD code
        bn = {"mean": [m.running_mean.detach().float().clone() for _, m in layers],
              "var": [m.running_var.detach().float().clone() for _, m in layers]}
    if bn is not None and args.bn == "global":
        bn = {k: [t.view(1, -1) for t in v] for k, v in bn.items()}
    points = weights = None
    if args.feature == "barycenter":
        path = args.barycenters or paths.barycenters
        bary = artifacts.load(path, stage="barycenter")
        artifacts.check_compatible(bary["meta"], info, path, upstream={"teacher": teacher_path})
        points, weights = bary["points"].float(), bary["weights"].float()
        if points.ndim != 3 or points.shape[0] != info.num_classes or points.shape[1] != args.ipc:
            cli.fail(f"{path} holds barycenters of shape {tuple(points.shape)}; this run needs "
                     f"[{info.num_classes} classes, {args.ipc} atoms (= --ipc), d]. Rerun barycenter.py with "
                     f"--ipc {args.ipc} (or pass the --ipc it was made with).")
        with torch.no_grad():
            probe = torch.zeros(1, 3, info.image_size, info.image_size, device=device)
            d = models.penultimate(model, probe).shape[1]
        if points.shape[2] != d:
            cli.fail(f"{path} holds {points.shape[2]}-d atoms, but this teacher's penultimate feature is {d}-d. "
                     "Rerun barycenter.py with this teacher.")
        points = points.to(device)
        upstream["barycenters"] = path
    if weights is None:
        weights = torch.full((info.num_classes, args.ipc), 1.0 / args.ipc)
    return model, upstream, bn, points, weights.float()


# ---------------------------------------------------------------------------------------------
# one group of classes


def recover_group(group: Group, objective: Objective, inputs, args, info, device, real, bar) -> dict:
    """Recover every image of the classes of `group`. Returns the shard payload (uint8 images etc.)."""
    _, _, bn, points, weights = inputs
    classes = list(range(group.start, group.stop))
    G, S, ipc = len(classes), info.image_size, args.ipc
    per_class = args.bn == "per-class"
    out = torch.empty(G, ipc, 3, S, S)
    curves, rows = [], []
    for j in group.batches:
        gen = batch_generator(args.seed, group.start, j)
        if j is None:  # class-major: all images of all classes of the group
            labels = torch.tensor(classes).repeat_interleave(ipc)
            atoms = points[group.start:group.stop].reshape(G * ipc, -1) if points is not None else None
            if real is not None:
                x0 = torch.cat([real.of_class(c) for c in classes])
            else:
                x0 = torch.randn(G * ipc, 3, S, S, generator=gen)
        else:  # ipc-major: image j of every class of the group
            labels = torch.tensor(classes)
            atoms = points[group.start:group.stop, j] if points is not None else None
            x0 = torch.stack([real.of_class(c, j) for c in classes]) if real is not None \
                else torch.randn(G, 3, S, S, generator=gen)
        if bn is None:
            bn_mean = bn_var = []
        elif per_class:
            bn_mean = [t[group.start:group.stop] for t in bn["mean"]]
            bn_var = [t[group.start:group.stop] for t in bn["var"]]
        else:
            bn_mean, bn_var = bn["mean"], bn["var"]
        tg = Targets(labels.to(device), atoms, bn_mean, bn_var, G if per_class else 1)
        where = f"classes {group.start}:{group.stop}" + ("" if j is None else f" (image index {j})")
        x, curve = recover_batch(objective, x0.to(device), tg, args, info, gen, bar, where)
        x = x.float().cpu()
        if j is None:
            out[:] = x.view(G, ipc, 3, S, S)
        else:
            out[:, j] = x
        curves.append(curve.cpu())
        rows.append([group.start, group.stop, -1 if j is None else j])
    images = protocol.quantise(info.denormalize(out.view(G * ipc, 3, S, S)), args.pixel_rounding)
    encoded = None
    if args.image_format == "jpeg":  # what the released relabel / training read back from the .jpg files
        images, encoded = protocol.jpeg_round_trip(images, args.jpeg_quality)
    stacked = torch.stack(curves)  # [batches, iterations, terms]
    return {"images": images, "labels": torch.tensor(classes).repeat_interleave(ipc),
            "weights": weights[group.start:group.stop].reshape(-1).float().clone(), "ipc": ipc,
            "classes": [group.start, group.stop],
            "loss_curve": {t: stacked[:, :, i].contiguous() for i, t in enumerate(TERMS)},
            "loss_batches": torch.tensor(rows, dtype=torch.int64), "encoded": encoded}


def write_pngs(images: torch.Tensor, labels: torch.Tensor, info, ipc: int, root: str, encoded=None) -> None:
    """images/<class>/<class>_<j>.png (j zero-padded so that file order is image order); with `encoded`
    (--image-format jpeg: each image's JPEG bytes, which decode to `images`) <class>_<j>.jpg instead."""
    from torchvision.utils import save_image

    width = len(str(ipc - 1))
    index = torch.arange(labels.numel())
    for c in labels.unique().tolist():
        name = info.classes[c]
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        for ext in ("png", "jpg"):
            for old in glob.glob(os.path.join(glob.escape(folder), f"{glob.escape(name)}_*.{ext}")):
                os.remove(old)
        for j, i in enumerate(index[labels == c].tolist()):
            path = os.path.join(folder, f"{name}_{j:0{width}d}")
            if encoded is not None:
                with open(path + ".jpg", "wb") as fh:
                    fh.write(encoded[i])
            else:
                save_image(images[i].float().div(255), path + ".png")


def main(args):
    return dist.stage_main(run, args)


def run(args, info, world, device, t0):
    log = world.print
    resolve_args(args, info, device)
    args.out = cli.default_out(args)
    cli.seed_everything(args.seed)
    lo, hi = parse_classes(args.classes, info.num_classes)
    per_group = classes_per_group(args.layout, args.ipc, args.batch_size)
    if world.is_main:
        cli.print_config("recover", args, classes_resolved=f"{lo}:{hi} of {info.num_classes}",
                         classes_per_batch=per_group, image_size=info.image_size,
                         flip=info.flip, device_resolved=str(device), world_size=world.size,
                         kernels=ops.describe(args.impl))
    if lo % per_group or (hi % per_group and hi != info.num_classes):
        log(f"note: --classes {lo}:{hi} is not on the grid of {per_group} classes per batch, so the cut "
            "groups are recovered on their own and will not equal an unsplit run.")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    paths = artifacts.run_paths(args.out)
    inputs = load_inputs(args, info, device, paths)
    model, upstream = inputs[0], inputs[1]
    if args.init in coreset.PICKS:  # the starting images depend on both files: part of every shard's key
        upstream = {**upstream, "features": paths.features, "barycenters": args.barycenters or paths.barycenters}
    if args.channels_last == "on":
        model.to(memory_format=torch.channels_last)
    recipe = recipe_of(args)
    upstream_sha = {k: artifacts.sha256_file(p) for k, p in upstream.items()}
    group_sync = dist.wait_group(world)

    groups = plan_groups(lo, hi, info.num_classes, args.ipc, args.batch_size, args.layout)
    todo = [g for g in groups if current_shard(shard_path(paths, g), recipe, upstream_sha, info) is None]
    if len(todo) < len(groups):
        log(f"[recover] resuming: {len(groups) - len(todo)} of {len(groups)} groups already in {paths.shards}")
    dist.gather_objects(None, world, group_sync)  # every rank has listed the finished groups before any writes one
    mine = shard_groups(todo, world.rank, world.size)
    real = None
    if args.init == "real" and todo:
        real = coreset.RealImages(info, args)
    elif args.init in coreset.PICKS and todo:
        real = coreset.RealImages(info, args, coreset.load_assignment(
            info, paths.features, args.barycenters or paths.barycenters, args.teacher or paths.teacher, args.init))
    objective = Objective(model, args)
    steps = sum(len(g.batches) for g in mine) * args.iterations
    error = None
    try:
        with tqdm(total=steps, desc=f"recover {lo}:{hi}", unit="it",
                  **({} if world.is_main else {"disable": True})) as bar:
            for group in mine:
                clock = StepClock(device)
                shard = recover_group(group, objective, inputs, args, info, device, real, bar)
                encoded = shard.pop("encoded")
                shard["timing"] = clock.stop(steps=len(group.batches) * args.iterations)
                if not args.no_png:  # before the shard: a shard on disk means its PNGs are complete
                    write_pngs(shard["images"], shard["labels"], info, args.ipc, paths.images, encoded)
                artifacts.save(shard_path(paths, group), dict(shard, recipe=recipe),
                               artifacts.make_meta("recover-shard", args, info, upstream=upstream, recipe=recipe))
    except cli.UserError as e:
        error = e
    objective.remove()
    dist.settle(error, world, group_sync)  # every rank is done: rank 0 merges

    merged, error = False, None
    if world.is_main:
        try:
            merged = merge_shards(paths, info, args, recipe, upstream, t0,
                                  require_all=(lo, hi) == (0, info.num_classes), world_size=world.size)
        except cli.UserError as e:
            error = e
    dist.settle(error, world, group_sync)
    merged = dist.gather_objects(merged, world, group_sync)[0]
    ranks = f" by {world.size} ranks" if world.enabled else ""
    log(f"[recover] {len(todo)} group(s) recovered{ranks} in {time.time() - t0:.1f}s")
    return {"synthetic": paths.synthetic if merged else None, "shards": paths.shards}


if __name__ == "__main__":
    cli.run(main, get_args_parser())
