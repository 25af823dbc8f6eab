"""Stage 3 - recover: optimise synthetic images against the teacher, its per-class BN statistics and the
class barycenters (WMDD §III).

    python recover.py --dataset digits --ipc 10 --out runs/digits
    python recover.py --dataset tiny --data-dir /data/tiny-imagenet-200 --ipc 50 --out runs/tiny/r224
    python recover.py --dataset imagenet --data-dir /data/ILSVRC --ipc 10 --classes 0:250   # one shard
    python recover.py --dataset imagenette --data-dir /data/imagenette2 --ipc 10 --sre2l   # the baseline

Reads teacher.pt, bn_stats.pt (squeeze.py) and barycenters.pt (barycenter.py) from --out; writes
synthetic.pt (uint8 images [C*IPC, channels, H, W], class-major, labels, atom weights, loss curves) and
images/<class>/<class>_<j>.png. Image j of class c is tied to barycenter atom j of class c
(f = the teacher's penultimate feature):

    L = ||f(x) - B||_F + lambda_bn * sum_l m_l * mean_c (||mu_l(x_c) - mu_l[c]||_2 + ||var_l(x_c) - var_l[c]||_2)
        + r_ce * CE(teacher(x), y)

Adam(betas 0.5, 0.9) on the normalised pixels, cosine lr, pixels clamped after each step; each step
shares one RandomResizedCrop + flip + roll over the batch. Batches hold whole classes (a class larger
than --batch-size goes in chunks, with exactly the whole class's gradient). Ablations (paper Table III):
--r-ce 1, --feature none, --bn global, --sre2l. Ours, beyond the paper: --init real/nearest/hardest.

Classes go in groups on a grid fixed by the batch size, each group seeded by (--seed, first class,
image index) and written to its own shard at once: --classes a:b, torchrun ranks and reruns after a
kill (resume) all give the unsplit run's images, bit for bit. Bad input: exit code 2 and a message.

Full manual (every flag, the released protocol, sharding, resume, timing): docs/recover.md.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from wmdd import artifacts, augment, bnstats, cli, coreset, data, dist, engine, models, ops, presets, protocol
from wmdd.shards import (Group, StepClock, check_finite, check_recipe, classes_per_group, load_inputs, merge_shards,
                         pending_groups, write_shard)

TERMS = ("total", "feature", "bn", "ce")
# The settings that make a synthetic set: two shards (or a resumed run) may be combined only when equal.
RECIPE_KEYS = ("ipc", "iterations", "lr", "lambda_bn", "r_ce", "first_bn_mult", "feature", "bn", "global_stats",
               "layout", "batch_size", "init", "jitter", "seed", "amp", "sre2l", "pixel_rounding", "image_format",
               "jpeg_quality", "crop_scale")


def get_args_parser():
    p = argparse.ArgumentParser("recover: optimise synthetic images against the teacher (WMDD)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_common_args(p, ipc=True)
    g = p.add_argument_group("optimisation (unset: the preset's value)")
    g.add_argument("--iterations", type=int, default=None,
                   help="Adam steps per batch (0 with a real --init: the starting images themselves)")
    g.add_argument("--lr", type=float, default=None, help="Adam learning rate (cosine schedule per iteration)")
    g.add_argument("--batch-size", type=int, default=None, help="images per batch; batches hold batch-size // "
                   "ipc whole classes (chunks of a class when ipc > batch-size)")
    g.add_argument("--init", default="noise", choices=["noise", "real", "nearest", "hardest"], help="start from "
                   "Gaussian noise (paper), random real images of the class, the real image nearest to each "
                   "barycenter atom, or the image of each atom's cell the teacher finds hardest (wmdd/coreset.py)")
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
    g.add_argument("--lambda-bn", type=float, default=None, help="weight of the BN term (unset: presets.LAMBDA_BN)")
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
    g.add_argument("--amp", default=None, choices=["auto", "bf16", "fp32"], help="teacher precision; auto: bf16 "
                   "autocast on CUDA, fp32 on CPU (--protocol wmdd: auto; released: fp32)")
    g.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"],
                   help="channels_last memory format for the teacher (auto: on)")
    g.add_argument("--log-every", type=int, default=25, help="progress bar / NaN check every N steps")
    g.add_argument("--no-png", action="store_true", help="skip the images/ tree")
    g.add_argument("--dry-run", action="store_true", help="print the resolved configuration and exit (no data read)")
    protocol.add_image_args(p)
    return p


def resolve_args(args, info, device) -> None:
    """Fill the flags left unset: --sre2l's choices, then the preset's, then the rules in the manual."""
    protocol.resolve(args)  # --protocol's choices (done by dist.stage_main already; idempotent)
    if args.sre2l:
        for key, value in (("feature", "none"), ("bn", "global"), ("r_ce", 1.0), ("first_bn_mult", 10.0)):
            if getattr(args, key) is None:
                setattr(args, key, value)
        if args.layout == "auto":
            args.layout = "ipc-major"
    args.lambda_bn, args.lambda_bn_source = presets.recover_lambda_bn(info.name, args.ipc, info.resolution,
                                                                      args.sre2l, given=args.lambda_bn)
    args.feature = args.feature or "barycenter"
    args.bn = args.bn or "per-class"
    data.preset_defaults(args, "recover")
    if args.first_bn_mult is None:
        args.first_bn_mult = 10.0 if args.bn == "global" else 1.0
    if args.layout == "auto":
        args.layout = "class-major" if args.bn == "per-class" else "ipc-major"
    if args.jitter is None:
        args.jitter = int(round(32 * info.image_size / 224))
    args.crop_scale = [float(v) for v in (info.crop_scale if args.crop_scale is None else args.crop_scale)]
    if args.amp == "auto":
        args.amp = "bf16" if device.type == "cuda" else "fp32"
    if args.channels_last == "auto":
        args.channels_last = "on"
    check_recipe(args)


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
    """The teacher's forward pass, with the per-class (or global) moments of every BN layer's input
    (`bnstats.GroupMomentHooks`), and the loss terms computed from them."""

    def __init__(self, model, args):
        self.model, self.head = model, models.classifier(model)
        self.use_feature, self.bn_mode = args.feature == "barycenter", args.bn
        self.lambda_bn, self.r_ce = float(args.lambda_bn), float(args.r_ce)
        self.hooks = bnstats.GroupMomentHooks(model, enabled=self.bn_mode != "none")
        self.mults = [float(args.first_bn_mult)] + [1.0] * (len(self.hooks.layers) - 1)
        self.amp, self.channels_last = args.amp == "bf16", args.channels_last == "on"

    def remove(self):
        self.hooks.remove()

    def forward(self, x, groups: int, shifts=None):
        """(features [n, d] fp32, logits or None, [(count, mean, var)] per BN layer) of the batch x
        (groups: classes in x for per-class statistics, else 1; shifts: per-layer [groups, C] mean guesses)."""
        self.hooks.start(groups, shifts)
        x = models.as_layout(x, self.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp):
            feats = models.penultimate(self.model, x)
            logits = self.head(feats) if self.r_ce else None
        return feats.float(), (logits.float() if logits is not None else None), self.hooks.take()

    def terms(self, feats, logits, moments, tg: Targets, sl: slice, rest=None) -> dict:
        """The loss terms of images `sl` of the batch. `rest` (a class in chunks) holds the detached
        contributions of its other images: feature residual sum of squares, CE sum, (n, mean, var) per layer."""
        zero = feats.new_zeros(())
        out = {"feature": zero, "bn": zero, "ce": zero}
        if self.use_feature:  # Eq. feature: ||f(x) - B||_F over the batch, image j of class c to atom j
            diff = feats - tg.atoms[sl]
            out["feature"] = torch.linalg.vector_norm(diff) if rest is None \
                else (diff.pow(2).sum() + rest["feature_sq"]).sqrt()
        if self.bn_mode != "none":  # Eq. BN: sum_l m_l * mean_c (per-class moments vs the real ones)
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
        out["total"] = out["feature"] + self.lambda_bn * out["bn"] + self.r_ce * out["ce"]  # Eq. recover loss
        return out

    @torch.no_grad()
    def contribution(self, feats, logits, moments, tg: Targets, sl: slice) -> dict:
        """A chunk's detached share of every term (float64), to be added to the other chunks' gradients."""
        return {"feature_sq": (feats - tg.atoms[sl]).double().pow(2).sum() if self.use_feature else 0.0,
                "ce_sum": F.cross_entropy(logits, tg.labels[sl], reduction="sum").double()
                if logits is not None else 0.0,
                "moments": [(n, mean.double(), var.double()) for n, mean, var in moments]}


class BatchOptimizer:
    """Adam on the pixels of one batch: `step(it, params)` is one iteration of the recover loop."""

    def __init__(self, objective: Objective, x0: torch.Tensor, tg: Targets, args, info):
        self.objective, self.tg, self.info = objective, tg, info
        self.iterations, self.lr, self.size = args.iterations, args.lr, info.image_size
        self.x = x0.clone().requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.x], lr=args.lr, betas=(0.5, 0.9), eps=1e-8)
        mean, std = torch.tensor(info.mean).view(1, -1, 1, 1), torch.tensor(info.std).view(1, -1, 1, 1)
        self.lo, self.hi = ((0 - mean) / std).to(x0.device), ((1 - mean) / std).to(x0.device)
        # a batch larger than --batch-size is one class (ipc > batch size): back-propagated in chunks
        n = x0.shape[0]
        self.chunks = bnstats.chunk_slices(n, args.batch_size) if n > args.batch_size else [slice(None)]

    def step(self, it: int, params: tuple) -> dict:
        """Cosine lr, augment (params from `augment.draw_shared_view`), loss, backward, Adam, clamp.
        Returns the loss terms (device tensors, not synchronised)."""
        obj, tg, x = self.objective, self.tg, self.x
        for group in self.optimizer.param_groups:
            group["lr"] = 0.5 * (1 + math.cos(math.pi * it / self.iterations)) * self.lr
        self.optimizer.zero_grad(set_to_none=True)
        parts = None
        if len(self.chunks) > 1:  # every chunk's detached share first, then each chunk's exact gradient
            with torch.no_grad():
                views = [augment.shared_view(x[sl], params, self.size) for sl in self.chunks]
                parts = [obj.contribution(*obj.forward(v, tg.groups, tg.bn_mean), tg, sl) for v, sl in zip(views, self.chunks)]
        for k, sl in enumerate(self.chunks):
            feats, logits, moments = obj.forward(augment.shared_view(x[sl], params, self.size), tg.groups, tg.bn_mean)
            out = obj.terms(feats, logits, moments, tg, sl, bnstats.rest_of(parts, k) if parts else None)
            out["total"].backward()
        self.optimizer.step()
        with torch.no_grad():
            x.clamp_(self.lo, self.hi)
        return out


def recover_batch(objective: Objective, x0: torch.Tensor, tg: Targets, args, info, gen: torch.Generator,
                  bar=None, where: str = "") -> tuple:
    """Optimise the normalised images x0 [n, channels, S, S] (class-major, matched to tg) for --iterations steps.
    Returns (final images, loss curve [iterations, len(TERMS)] on the device)."""
    opt = BatchOptimizer(objective, x0, tg, args, info)
    curve = torch.zeros(args.iterations, len(TERMS), device=x0.device)
    checked = 0
    for it in range(args.iterations):
        out = opt.step(it, augment.draw_shared_view(gen, info.image_size, args.crop_scale, info.flip, args.jitter))
        curve[it] = torch.stack([out[t].detach().float() for t in TERMS])
        if bar is not None:
            bar.update(1)
        if (it + 1) % args.log_every == 0 or it + 1 == args.iterations:
            values = curve[checked:it + 1].cpu()  # the loop's only host synchronisation
            check_finite(values, checked, TERMS, args.iterations, where)
            checked = it + 1
            if bar is not None:
                bar.set_postfix({t: f"{float(v):.4g}" for t, v in zip(TERMS, values[-1])}, refresh=False)
    return opt.x.detach(), curve


def recover_group(group: Group, objective: Objective, inputs, args, info, device, real, bar) -> dict:
    """Recover every image of the classes of `group`. Returns the shard payload (uint8 images etc.)."""
    _, _, bn, points, weights = inputs
    classes = list(range(group.start, group.stop))
    G, S, ipc, K = len(classes), info.image_size, args.ipc, info.channels
    per_class = args.bn == "per-class"
    out = torch.empty(G, ipc, K, S, S)
    curves, rows = [], []
    for j in group.batches:
        gen = augment.recover_generator(args.seed, group.start, j)
        if j is None:  # class-major: all images of all classes of the group
            labels = torch.tensor(classes).repeat_interleave(ipc)
            atoms = points[group.start:group.stop].reshape(G * ipc, -1) if points is not None else None
            x0 = torch.cat([real.of_class(c) for c in classes]) if real is not None \
                else torch.randn(G * ipc, K, S, S, generator=gen)
        else:  # ipc-major: image j of every class of the group
            labels = torch.tensor(classes)
            atoms = points[group.start:group.stop, j] if points is not None else None
            x0 = torch.stack([real.of_class(c, j) for c in classes]) if real is not None \
                else torch.randn(G, K, S, S, generator=gen)
        bn_mean, bn_var = ([], []) if bn is None else (bn["mean"], bn["var"])
        if per_class:  # the statistics of the group's own classes
            bn_mean, bn_var = [t[group.start:group.stop] for t in bn_mean], [t[group.start:group.stop] for t in bn_var]
        tg = Targets(labels.to(device), atoms, bn_mean, bn_var, G if per_class else 1)
        where = f"classes {group.start}:{group.stop}" + ("" if j is None else f" (image index {j})")
        x, curve = recover_batch(objective, x0.to(device), tg, args, info, gen, bar, where)
        x = x.float().cpu()
        if j is None:
            out[:] = x.view(G, ipc, K, S, S)
        else:
            out[:, j] = x
        curves.append(curve.cpu())
        rows.append([group.start, group.stop, -1 if j is None else j])
    images, encoded = protocol.store_images(info.denormalize(out.view(G * ipc, K, S, S)), args)
    stacked = torch.stack(curves)  # [batches, iterations, terms]
    return {"images": images, "labels": torch.tensor(classes).repeat_interleave(ipc),
            "weights": weights[group.start:group.stop].reshape(-1).float().clone(), "ipc": ipc,
            "classes": [group.start, group.stop],
            "loss_curve": {t: stacked[:, :, i].contiguous() for i, t in enumerate(TERMS)},
            "loss_batches": torch.tensor(rows, dtype=torch.int64), "encoded": encoded}


def main(args):
    return engine.stage_main(run, args)


def run(args, info, world, device, t0):
    resolve_args(args, info, device)
    args.out = cli.default_out(args)
    cli.seed_everything(args.seed)
    classes = cli.parse_range(args.classes, info.num_classes)
    lo, hi = classes.start, classes.stop
    per_group = classes_per_group(args.layout, args.ipc, args.batch_size)
    if world.is_main:
        engine.print_config("recover", args, classes_resolved=f"{lo}:{hi} of {info.num_classes}", flip=info.flip,
                            classes_per_batch=per_group, image_size=info.image_size, device_resolved=str(device),
                            world_size=world.size, kernels=ops.describe(args.impl))
    if args.dry_run:  # the configuration only: nothing read (engine.stage_main resolved no data) or written
        return None
    torch.backends.cudnn.benchmark = device.type == "cuda"
    paths = artifacts.run_paths(args.out)
    inputs = load_inputs(args, info, device, paths)
    model, upstream = inputs[0], inputs[1]
    recipe = {k: getattr(args, k) for k in RECIPE_KEYS}
    upstream_sha = {k: artifacts.sha256_file(p) for k, p in upstream.items()}
    group_sync = dist.wait_group(world)

    todo, mine = pending_groups(lo, hi, args, info, paths, recipe, upstream_sha, world, group_sync)
    real = coreset.starting_images(info, args, paths) if todo else None
    objective = Objective(model, args)
    steps = sum(len(g.batches) for g in mine) * args.iterations
    error = None
    try:
        with tqdm(total=steps, desc=f"recover {lo}:{hi}", unit="it",
                  **({} if world.is_main else {"disable": True})) as bar:
            for group in mine:
                clock = StepClock(device)
                shard = recover_group(group, objective, inputs, args, info, device, real, bar)
                write_shard(paths, group, shard, clock.stop(steps=len(group.batches) * args.iterations),
                            args, info, upstream, recipe)
    except cli.UserError as e:
        error = e
    objective.remove()
    dist.settle(error, world, group_sync)  # every rank is done: rank 0 merges

    merged = dist.on_main(lambda: merge_shards(paths, info, args, recipe, upstream, t0, world_size=world.size,
                                               require_all=(lo, hi) == (0, info.num_classes)), world, group_sync)
    ranks = f" by {world.size} ranks" if world.enabled else ""
    world.print(f"[recover] {len(todo)} group(s) recovered{ranks} in {time.time() - t0:.1f}s")
    return {"synthetic": paths.synthetic if merged else None, "shards": paths.shards}


if __name__ == "__main__":
    cli.run(main, get_args_parser())
