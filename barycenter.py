"""Stage 2 - barycenter: per-class free-support Wasserstein barycenters of the teacher's features.

    python barycenter.py --dataset digits --ipc 10 --out runs/digits
    python barycenter.py --dataset tiny --data-dir /data/tiny-imagenet-200 --ipc 50 --out runs/tiny/r224
    python barycenter.py --dataset imagenet --data-dir /data/imagenet --ipc 10 --solver sinkhorn
    python barycenter.py ... --classes 0:250       # one shard of the classes
    torchrun --nproc_per_node N barycenter.py ...  # several processes, the same result as one

It loads `<out>/teacher.pt` (squeeze.py), extracts the teacher's penultimate features of every real
training image (cached in `<out>/features.pt` or `--features PATH`, reused while made from the same
teacher), and computes for every class k = --ipc atoms: points [k, d], weights [k] and the exact W2^2 to
the class's features. It writes `<out>/barycenters.pt`: points [C, k, d], weights [C, k], w2 [C],
iters [C] and meta (upstream sha256, settings, kernels, wall time).

Solvers (wmdd/ot.py, wmdd/sinkhorn.py):
    --solver exact      POT's free-support barycenter (network simplex EMD), as released (default)
    --solver sinkhorn   Cuturi & Doucet's entropic alternation, --class-batch classes at once
    --weights uniform   every atom carries 1/k of the mass, as released (default)
    --weights learned   free weights (a k-means solution); --learned-step lloyd, anneal or mirror (sinkhorn)
    --init, --restarts  the atoms' start (k-means++ or the released randn), the best of R starts per class

Shards and resume: every finished block of --class-batch classes is written at once to
`<out>/shards/barycenter_<a>-<b>.pt` (a, b on 5 digits), and every run reuses the shards and the
barycenters.pt made from the same teacher, features and settings, so a killed run rerun with the same
command ends as an uninterrupted one. `--classes a:b` (or `a`) solves classes a..b-1 into their own shard,
which a later run without --classes merges.

Errors (bad --ipc, a teacher of another dataset, a corrupt file) exit with code 2 and a message.
Full manual: docs/barycenter.md
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from tqdm import tqdm

from wmdd import artifacts, cli, data, dist, engine, ops
from wmdd import ot as wot
from wmdd.features import features_path, load_or_extract_features

# The settings a result depends on (a shard is reused only when all of them match).
RESULT_KEYS = ("ipc", "solver", "weights", "learned_step", "reg", "iters", "seed", "barycenter_init", "restarts")
KEY_DEFAULTS = {"restarts": 1}  # files written before the key existed were made with this value
# --learned-step -> wmdd.ot arguments (sinkhorn solver, learned weights)
LEARNED_STEPS = {"lloyd": dict(anneal=None, md_steps=0), "anneal": dict(anneal=True, md_steps=0),
                 "mirror": dict(anneal=None, md_steps=1)}


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


def reusable_shards(paths, args, upstream_sha: dict, log=print) -> list:
    """(a, b, artifact, path) of the shards, and of barycenters.pt, made with the same teacher, features and
    settings (a file that does not load, e.g. corrupt, is ignored: its classes are recomputed)."""
    def same(shard):
        meta = shard["meta"]
        return meta.get("upstream") == upstream_sha and all(
            meta.get("args", {}).get(key, KEY_DEFAULTS.get(key)) == getattr(args, key) for key in RESULT_KEYS)

    def ignoring(why):  # artifacts.reuse says "not reusing <path>: <reason>"
        log(f"[barycenter] ignoring {why.removeprefix('not reusing ')}")

    found = []
    for path in artifacts.shard_files(paths, "barycenter") + [paths.barycenters]:
        shard = artifacts.reuse(path, "barycenter", same, ignoring)
        if shard is not None:
            a, b = shard["meta"]["class_range"]
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
        artifacts.save(artifacts.shard_path(paths, "barycenter", a, b), payload, meta)


def main(args):
    return engine.stage_main(run, args)


def run(args, info, world, device, t0):
    log = world.print
    data.preset_defaults(args, "barycenter")
    args.out = cli.default_out(args)
    cli.seed_everything(args.seed)
    classes = cli.parse_range(args.classes, info.num_classes)
    first, last = classes.start, classes.stop
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
    target = paths.barycenters if args.classes is None else artifacts.shard_path(paths, "barycenter", first, last)
    dist.on_main(lambda: merge(args, info, paths, upstream, upstream_sha, first, last, target, t0, t_solve, world),
                 world, group)
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
