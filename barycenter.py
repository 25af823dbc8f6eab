"""Stage 2 - barycenter: per-class free-support Wasserstein barycenters of the teacher's features.

    python barycenter.py --dataset digits --ipc 10 --out runs/digits
    python barycenter.py --dataset tiny --data-dir /data/tiny-imagenet-200 --ipc 50 --out runs/tiny/r224
    python barycenter.py --dataset imagenet --data-dir /data/imagenet --ipc 10 --solver sinkhorn
    python barycenter.py ... --classes 0:250      # one shard of the classes (see below)

What it does (DESIGN §1 step 2):
1. Loads `<out>/teacher.pt` (written by squeeze.py; checked against --dataset, its class order and
   --resolution).
2. Extracts the teacher's penultimate features (ResNet avgpool output, 512-d for ResNet-18) of every
   real training image with the eval transform, in one batched pass, and caches them as
   `<out>/features.pt` (features [N, d] float32, labels [N], meta), or at `--features PATH` (one cache
   shared by the runs of several IPCs). The cache is reused when it was made from the same teacher.pt
   (sha256) for the same dataset, class order and resolution; `--recompute-features` ignores it.
3. For every class c, computes the barycenter of the class's feature cloud with k = --ipc atoms:
   points B_c [k, d], weights w_c [k] and the objective W2^2(B_c, w_c; features of c) (exact, EMD).
   Solvers (wmdd/ot.py has the details):
     --solver exact     POT's ot.lp.free_support_barycenter (network simplex), as released. Default.
     --solver sinkhorn  Cuturi & Doucet's alternation with entropic plans, all classes of a batch at
                        once, epsilon (--reg) relative to each class's cost scale, epsilon scaling and
                        warm-started duals; the Sinkhorn kernel is the compiled one when built (--impl).
     --weights uniform  every atom carries 1/k of the mass (released; the paper's runs). Default.
     --weights learned  the weights are optimised too. With one input measure the optimum is a k-means
                        solution (each atom's weight = its cell's mass). With --solver exact it runs the
                        released learned-weights loop (10 x 100 EMD mirror-descent steps). With --solver
                        sinkhorn, --learned-step picks how: lloyd (default: exact Lloyd steps from the
                        k-means++ init), anneal (the entropic alternation with the closed-form weight step,
                        epsilon scaling, then Lloyd: a lower W2^2 for 1.5-2.5x the time), or mirror
                        (Algorithm 2 of Cuturi & Doucet: a mirror-descent step on the weights with the
                        Sinkhorn dual potential as subgradient). bench/RESULTS.md, "Barycenter", compares them.
   Initialisation (--init): k-means++ on the class's own features, seeded per class from --seed (default),
   or `randn`, the released start (recover/barycenter.py): np.random.randn(k, d) standard normal atoms,
   unscaled and uncentred, drawn from numpy's RandomState seeded per class from --seed (the release
   drew them from the unseeded global generator). Part of the result key; recorded in meta.
   --restarts R (ours, not the paper's; default 1): every class is solved from R starts (start 0 is the
   one above, the others from seeds derived from --seed, the class and the start) and keeps the one of
   lowest W2^2. The problem is not convex, so one start lands in one local optimum; on small images the
   lower objective picks better real images for recover --init nearest (bench/RESULTS.md, "Against
   random real images"). Part of the result key; recorded in meta.
4. Writes `<out>/barycenters.pt`: points [C, k, d] float32, weights [C, k] float32, w2 [C] float64,
   iters [C], meta (teacher and features sha256, solver settings, kernels, wall time).

Shards and resume: the classes are cut on a grid of --class-batch classes (block g = classes
[g*B, (g+1)*B), cut to the range; sinkhorn solves a block in one batch). Every finished block is written
at once, atomically, to `<out>/shards/barycenters_<a>_<b>.pt`, and every run (with or without --classes)
reuses the blocks, shards and barycenters.pt made from the same teacher, features and settings
(RESULT_KEYS) and solves only the classes none of them covers. So a run killed at any moment (SIGKILL
included) and rerun with the same command keeps its finished blocks and ends with the same
barycenters.pt as an uninterrupted run: features.pt, shards and barycenters.pt are only ever renamed into
place whole, and a file that does not load is ignored and recomputed. Once the result is written, the
block shards it holds are removed. `--classes a:b` solves classes a..b-1 only and writes their shard
`<out>/shards/barycenters_a_b.pt` (kept); a later run without --classes merges everything into
barycenters.pt.

Several processes: `torchrun --nproc_per_node N barycenter.py ...` (or multi-node torchrun, with --out on
a file system every node sees; nccl on CUDA, gloo on CPU). Each rank extracts the features of a block of
whole batches of the training set (the same batches as one process, so the same features bit for bit);
the blocks are gathered on every rank and rank 0 writes features.pt. The blocks of classes to solve are
then shared out, each rank writes its own shards, and rank 0 merges them into barycenters.pt after every
rank is done (an error on any rank stops every rank with exit code 2 and its message; the shards written
so far are kept). The result equals a one-process run with the same flags.

`--protocol released` (wmdd/protocol.py) sets --init randn; barycenters.pt records the --init it was
made with, and recover refuses one made under the other protocol's start.

Errors (exit code 2, nothing written so far is lost): --ipc <= 0, or larger than a class's number of
training images, stops before any solve with the class and its count named; a teacher.pt from another
dataset, class order or resolution, or a corrupt, truncated or unsafe (pickled code) teacher is refused
with the file named.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import time

import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from wmdd import artifacts, cli, data, dist, engine, models, ops
from wmdd import ot as wot

# The settings a result depends on (a shard is reused only when all of them match).
RESULT_KEYS = ("ipc", "solver", "weights", "learned_step", "reg", "iters", "seed", "barycenter_init", "restarts")
KEY_DEFAULTS = {"restarts": 1}  # files written before the key existed were made with this value
# --learned-step -> wmdd.ot arguments (sinkhorn solver, learned weights)
LEARNED_STEPS = {"lloyd": dict(anneal=None, md_steps=0), "anneal": dict(anneal=True, md_steps=0),
                 "mirror": dict(anneal=None, md_steps=1)}
# How long a rank that is done waits for the others (gathering results, errors, the final barrier):
# the process group's default (10-30 min) is too short when ranks finish far apart.


def get_args_parser():
    p = argparse.ArgumentParser("barycenter: per-class Wasserstein barycenters of teacher features",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_common_args(p, ipc=True)
    g = p.add_argument_group("barycenter (unset: the preset's value)")
    g.add_argument("--teacher", default=None, help="teacher checkpoint (default <out>/teacher.pt)")
    g.add_argument("--solver", default=None, choices=wot.SOLVERS,
                   help="exact: POT EMD (released); sinkhorn: batched entropic alternation")
    g.add_argument("--weights", default=None, choices=wot.WEIGHTS,
                   help="uniform atom weights (released) or learned (k-means-like)")
    g.add_argument("--learned-step", default="lloyd", choices=sorted(LEARNED_STEPS),
                   help="--solver sinkhorn --weights learned: lloyd (exact k-means steps), anneal (entropic "
                        "alternation, then Lloyd) or mirror (Algorithm 2's mirror descent)")
    g.add_argument("--init", dest="barycenter_init", default=None, choices=["kmeans++", "randn"],
                   help="start of the atoms: k-means++ on the class's features (--protocol wmdd), or "
                        "np.random.randn(k, d) from a per-class seed (--protocol released)")
    g.add_argument("--restarts", type=int, default=1,
                   help="solve every class from this many starts and keep the one with the lowest W2^2 (ours, "
                        "not the paper's; 1 = the one start of --seed)")
    g.add_argument("--reg", type=float, default=wot.DEFAULT_REG,
                   help="sinkhorn: target epsilon, relative to each class's cost scale")
    g.add_argument("--iters", type=int, default=None,
                   help=f"outer iterations (exact: POT numItermax, default {wot.DEFAULT_EXACT_ITERS}; "
                        f"sinkhorn: at most, default {wot.DEFAULT_SINKHORN_ITERS})")
    g.add_argument("--batch-size", type=int, default=256, help="images per forward pass (features)")
    g.add_argument("--class-batch", type=int, default=100,
                   help="classes per shard (the unit of resume and of work per rank); sinkhorn solves them "
                        "together (memory ~ class-batch x k x n_max floats)")
    g.add_argument("--classes", default=None, help="class range a:b (a shard); default all classes")
    g.add_argument("--features", default=None,
                   help="the features cache (default <out>/features.pt): share one between IPCs")
    g.add_argument("--recompute-features", action="store_true", help="ignore a cached features.pt")
    return p


def parse_class_range(spec: str | None, num_classes: int) -> tuple:
    if spec is None:
        return 0, num_classes
    try:
        a, b = spec.split(":")
        a = int(a) if a else 0
        b = int(b) if b else num_classes
    except ValueError:
        cli.fail(f"--classes {spec!r} is not a range a:b (e.g. 0:100).")
    if not 0 <= a < b <= num_classes:
        cli.fail(f"--classes {spec} is outside the dataset's classes 0:{num_classes} (or empty).")
    return a, b


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
# features


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


def _cached_features(args, info, path, teacher_sha, log):
    """The features cache at path if it was made from this teacher for this dataset, else None."""
    if not os.path.exists(path) or args.recompute_features:
        return None
    try:
        cached = artifacts.load(path, stage="features")
        meta = cached["meta"]
        artifacts.check_compatible(meta, info, path)
    except cli.UserError as e:
        log(f"[barycenter] not reusing {path}: {e}")
        return None
    if meta.get("upstream", {}).get("teacher") != teacher_sha:
        log(f"[barycenter] {path} was made from another teacher: recomputing")
        return None
    return cached


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
    cached = _cached_features(args, info, cache, teacher_sha, log)
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


def check_ipc(ipc: int, counts: list, classes) -> None:
    if ipc <= 0:
        cli.fail(f"--ipc must be a positive number of images per class, got {ipc}.")
    short = [(classes[c], n) for c, n in enumerate(counts) if n < ipc]
    if short:
        name, n = min(short, key=lambda t: t[1])
        more = f" ({len(short)} classes in all have fewer than {ipc})" if len(short) > 1 else ""
        cli.fail(f"--ipc {ipc} is larger than class {name!r}, which has {n} training images{more}. "
                 f"A class's barycenter has at most as many atoms as it has images: use --ipc {n} or less.")


def solve(args, class_features: list, first_class: int, bar=None) -> wot.Barycenter:
    """Barycenters of consecutive classes first_class, first_class + 1, ... (batched for sinkhorn); with
    --restarts R every class is solved from R starts and keeps the one of lowest W2^2 (the first on ties)."""
    common = dict(solver=args.solver, weights=args.weights, reg=args.reg, iters=args.iters, impl=args.impl)
    if args.solver == "sinkhorn" and args.weights == "learned":
        common.update(LEARNED_STEPS[args.learned_step])
    step = args.class_batch if args.solver == "sinkhorn" else 1
    parts = []
    for s in range(0, len(class_features), step):
        chunk = class_features[s:s + step]
        best = None
        for r in range(args.restarts):
            seeds = [wot.restart_seed(args.seed, first_class + s + i, r) for i in range(len(chunk))]
            init = [wot.randn_init(args.ipc, f.shape[1], sd) for f, sd in zip(chunk, seeds)] \
                if args.barycenter_init == "randn" else None
            got = wot.free_support_barycenter_batched(chunk, args.ipc, seeds=seeds, init=init, **common)
            best = got if best is None else wot.lower_w2(best, got)
        parts.append(best)
        if bar is not None:
            bar.update(len(chunk))
            bar.set_postfix(w2=f"{float(torch.cat([p.w2 for p in parts]).mean()):.4g}")
    return wot.Barycenter(points=torch.cat([p.points for p in parts]),
                          weights=torch.cat([p.weights for p in parts]),
                          w2=torch.cat([p.w2 for p in parts]), iters=torch.cat([p.iters for p in parts]),
                          info=parts[0].info)


def plan_blocks(todo: list, class_batch: int) -> list:
    """The classes `todo` (sorted) cut into blocks (a, b) of consecutive classes on the grid of
    `class_batch` classes: a block never crosses a multiple of class_batch, so a block is solved in the
    same batch whether the run is one process or several, fresh or resumed."""
    blocks = []
    for c in todo:
        if blocks and blocks[-1][1] == c and c % class_batch:
            blocks[-1][1] = c + 1
        else:
            blocks.append([c, c + 1])
    return [tuple(b) for b in blocks]


def shard_path(paths, a: int, b: int) -> str:
    return os.path.join(paths.shards, f"barycenters_{a}_{b}.pt")


def reusable_shards(paths, args, upstream_sha: dict, log=print) -> list:
    """(a, b, artifact, path) of the shards, and of barycenters.pt, made with the same teacher, features and
    settings (a file that does not load, e.g. corrupt, is ignored: its classes are recomputed)."""
    found = []
    candidates = sorted(glob.glob(os.path.join(glob.escape(paths.shards), "barycenters_*_*.pt")))
    for path in candidates + ([paths.barycenters] if os.path.isfile(paths.barycenters) else []):
        try:
            shard = artifacts.load(path, stage="barycenter")
        except cli.UserError as e:
            log(f"[barycenter] ignoring {path}: {e}")
            continue
        meta = shard["meta"]
        same = meta.get("upstream") == upstream_sha and all(
            meta.get("args", {}).get(key, KEY_DEFAULTS.get(key)) == getattr(args, key) for key in RESULT_KEYS)
        if same:
            a, b = meta["class_range"]
            found.append((a, b, shard, path))
    return found


def covered_classes(shards: list) -> dict:
    """class -> (shard, row) over the shards (any of equal shards)."""
    done = {}
    for a, b, shard, _ in shards:
        for c in range(a, b):
            done.setdefault(c, (shard, c - a))
    return done


def stack_results(done: dict, classes) -> dict:
    return {"points": torch.stack([done[c][0]["points"][done[c][1]] for c in classes]).float(),
            "weights": torch.stack([done[c][0]["weights"][done[c][1]] for c in classes]).float(),
            "w2": torch.stack([torch.as_tensor(done[c][0]["w2"][done[c][1]]) for c in classes]).double(),
            "iters": torch.stack([torch.as_tensor(done[c][0]["iters"][done[c][1]]) for c in classes]).long()}


def solve_blocks(blocks: list, args, info, features, per_class, paths, upstream: dict, bar) -> None:
    """Solve each block (a, b) and write it to its shard at once (atomically)."""
    for a, b in blocks:
        t0 = time.time()
        out = solve(args, [features[per_class[c]] for c in range(a, b)], a, bar)
        bad = [info.classes[c] for i, c in enumerate(range(a, b))
               if not (torch.isfinite(out.points[i]).all() and torch.isfinite(out.weights[i]).all())]
        if bad:
            cli.fail(f"the barycenter of class(es) {', '.join(bad[:5])} is not finite (NaN/inf). With "
                     "--solver sinkhorn, raise --reg (e.g. 1e-2); or use --solver exact. The shards of the "
                     f"classes solved before are kept in {paths.shards}.")
        payload = {"points": out.points.float(), "weights": out.weights.float(), "w2": out.w2.double(),
                   "iters": out.iters.long()}
        meta = artifacts.make_meta("barycenter", args, info, upstream=upstream, class_range=[a, b], block=True,
                                   k=int(args.ipc), feature_dim=int(out.points.shape[-1]), solver_info=out.info,
                                   kernels=ops.resolve_impl(args.impl), solve_time_s=time.time() - t0)
        artifacts.save(shard_path(paths, a, b), payload, meta)


def main(args):
    return engine.stage_main(run, args)


def run(args, info, world, device, t0):
    log = world.print
    data.preset_defaults(args, "barycenter")
    args.out = cli.default_out(args)
    cli.seed_everything(args.seed)
    first, last = parse_class_range(args.classes, info.num_classes)
    if args.class_batch < 1 or args.batch_size < 1:
        cli.fail(f"--class-batch ({args.class_batch}) and --batch-size ({args.batch_size}) must be positive.")
    if args.restarts < 1:
        cli.fail(f"--restarts {args.restarts}: the number of starts per class must be at least 1 (1: one start).")
    if world.is_main:
        engine.print_config("barycenter", args, classes=info.num_classes, class_range=f"{first}:{last}",
                         device_resolved=str(device), world_size=world.size, kernels=ops.describe(args.impl))
    paths = artifacts.run_paths(args.out)
    teacher_path = args.teacher or paths.teacher
    group = dist.wait_group(world)

    def check_labels(labels):
        check_ipc(args.ipc, [len(ix) for ix in data.class_indices(labels, info.num_classes)], info.classes)

    if args.ipc <= 0:
        check_ipc(args.ipc, [], info.classes)
    feats = load_or_extract_features(args, info, device, teacher_path, paths, check_labels, world, group)
    features, labels = feats["features"], feats["labels"]
    per_class = data.class_indices(labels.tolist(), info.num_classes)
    upstream = {"teacher": teacher_path, "features": features_path(args, paths)}
    upstream_sha = {name: artifacts.sha256_file(p) for name, p in upstream.items()}

    # classes to compute: the range, less what shards of the same teacher, features and settings hold
    found = reusable_shards(paths, args, upstream_sha, log)
    done = covered_classes(found)
    todo = [c for c in range(first, last) if c not in done]
    if len(todo) < last - first:
        final = {p == paths.barycenters for _, _, _, p in found}
        where = " and ".join(([f"shards in {paths.shards}"] if False in final else []) +
                             ([paths.barycenters] if True in final else []))
        log(f"[barycenter] reusing {last - first - len(todo)} classes from {where}")
    dist.gather_objects(None, world, group)  # every rank has listed the shards before any rank writes one
    blocks = plan_blocks(todo, args.class_batch)
    mine = [blocks[i] for i in dist.rank_slice(len(blocks), world)]

    t_solve = time.time()
    error = None
    bar = tqdm(total=sum(b - a for a, b in mine), desc=f"barycenters ({args.solver}, {args.weights})",
               **({} if world.is_main else {"disable": True}))
    try:
        solve_blocks(mine, args, info, features, per_class, paths, upstream, bar)
    except cli.UserError as e:
        error = e
    bar.close()
    dist.settle(error, world, group)

    # rank 0 merges the shards of the range (its own, the other ranks', earlier runs')
    target = paths.barycenters if args.classes is None else shard_path(paths, first, last)
    error = None
    if world.is_main:
        try:
            merge(args, info, paths, upstream, upstream_sha, first, last, target, t0, t_solve, world)
        except cli.UserError as e:
            error = e
    dist.settle(error, world, group)
    return {"barycenters": target, "features": features_path(args, paths)}


def merge(args, info, paths, upstream, upstream_sha, first, last, target, t0, t_solve, world) -> None:
    shards = reusable_shards(paths, args, upstream_sha, log=lambda *a, **k: None)
    done = covered_classes(shards)
    missing = [c for c in range(first, last) if c not in done]
    if missing:
        cli.fail(f"after every rank finished, no shard in {paths.shards} holds class(es) "
                 f"{', '.join(info.classes[c] for c in missing[:5])}{' ...' if len(missing) > 5 else ''} "
                 "(a shard was removed or replaced by another run writing to the same --out?). Rerun the same "
                 "command: it solves only the missing classes.")
    order = range(first, last)
    payload = stack_results(done, order)
    first_meta = done[first][0]["meta"]
    meta = artifacts.make_meta("barycenter", args, info, upstream=upstream, class_range=[first, last],
                               k=int(args.ipc), feature_dim=int(payload["points"].shape[-1]),
                               solver_info=first_meta.get("solver_info", {}), kernels=ops.resolve_impl(args.impl),
                               world_size=world.size, wall_time_s=time.time() - t0,
                               solve_time_s=time.time() - t_solve)
    artifacts.save(target, payload, meta)
    # the block shards of the range are in the target now: remove them (their only use was resuming)
    for a, b, shard, path in shards:
        if shard["meta"].get("block") and first <= a and b <= last and path != target:
            os.remove(path)
    print(f"[barycenter] wrote {target}: {last - first} classes x {args.ipc} atoms x "
          f"{payload['points'].shape[-1]} dims, mean W2^2 {payload['w2'].mean():.4g} "
          f"(solve {time.time() - t_solve:.1f}s, total {time.time() - t0:.1f}s)")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
