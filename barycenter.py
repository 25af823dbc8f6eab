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
   `<out>/features.pt` (features [N, d] float32, labels [N], meta). The cache is reused when it was made
   from the same teacher.pt (sha256) for the same dataset, class order and resolution;
   `--recompute-features` ignores it.
3. For every class c, computes the barycenter of the class's feature cloud with k = --ipc atoms:
   points B_c [k, d], weights w_c [k] and the objective W2^2(B_c, w_c; features of c) (exact, EMD).
   Solvers (wmdd/ot.py has the details):
     --solver exact     POT's ot.lp.free_support_barycenter (network simplex), as released. Default.
     --solver sinkhorn  Cuturi & Doucet's alternation with entropic plans, all classes of a batch at
                        once, epsilon (--reg) relative to each class's cost scale, epsilon scaling and
                        warm-started duals; the Sinkhorn kernel is the compiled one when built (--impl).
     --weights uniform  every atom carries 1/k of the mass (released; the paper's runs). Default.
     --weights learned  the weights are optimised too (Algorithm 2: mirror descent with the Sinkhorn
                        dual potential; with one input measure this is k-means). With --solver exact
                        it runs the released learned-weights loop (10 x 100 EMD mirror-descent steps).
   Initialisation: k-means++ on the class's own features, seeded per class from --seed.
4. Writes `<out>/barycenters.pt`: points [C, k, d] float32, weights [C, k] float32, w2 [C] float64,
   iters [C], meta (teacher and features sha256, solver settings, kernels, wall time).

Sharding: `--classes a:b` solves classes a..b-1 only and writes `<out>/shards/barycenters_a_b.pt`;
a later run without --classes reuses every shard made with the same teacher, features and settings
and computes the classes no shard covers, then writes barycenters.pt.

Errors: --ipc <= 0, or larger than a class's number of training images, stops before any solve with
the class and its count named (exit code 2).
"""
from __future__ import annotations

import argparse
import glob
import os
import time

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from wmdd import artifacts, cli, data, models, ops
from wmdd import ot as wot

# The settings a result depends on (a shard is reused only when all of them match).
RESULT_KEYS = ("ipc", "solver", "weights", "reg", "iters", "seed")


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
    g.add_argument("--reg", type=float, default=wot.DEFAULT_REG,
                   help="sinkhorn: target epsilon, relative to each class's cost scale")
    g.add_argument("--iters", type=int, default=None,
                   help=f"outer iterations (exact: POT numItermax, default {wot.DEFAULT_EXACT_ITERS}; "
                        f"sinkhorn: at most, default {wot.DEFAULT_SINKHORN_ITERS})")
    g.add_argument("--batch-size", type=int, default=256, help="images per forward pass (features)")
    g.add_argument("--class-batch", type=int, default=100,
                   help="sinkhorn: classes solved together (memory ~ class-batch x k x n_max floats)")
    g.add_argument("--classes", default=None, help="class range a:b (a shard); default all classes")
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


@torch.no_grad()
def extract_features(model, dataset, device, batch_size: int, workers: int) -> tuple:
    """Penultimate features [N, d] (float32, CPU) and labels [N] of a whole dataset, in dataset order."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    feats, labels = [], []
    for x, y in tqdm(loader, desc="features"):
        feats.append(models.penultimate(model, x.to(device)).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels).long()


def load_or_extract_features(args, info, device, teacher_path, paths, check_labels=None) -> dict:
    """features.pt when it matches this teacher / dataset, else a fresh extraction (then cached).
    check_labels(labels) runs on the dataset's labels before any image is read."""
    if not os.path.isfile(teacher_path):
        artifacts.load(teacher_path)  # the "does not exist: run squeeze.py first" message
    teacher_sha = artifacts.sha256_file(teacher_path)
    if os.path.exists(paths.features) and not args.recompute_features:
        try:
            cached = artifacts.load(paths.features, stage="features")
            meta = cached["meta"]
            artifacts.check_compatible(meta, info, paths.features)
            if meta.get("upstream", {}).get("teacher") == teacher_sha:
                print(f"[barycenter] reusing {paths.features} ({tuple(cached['features'].shape)} features)")
                if check_labels is not None:
                    check_labels(cached["labels"].tolist())
                return cached
            print(f"[barycenter] {paths.features} was made from another teacher: recomputing")
        except cli.UserError as e:
            print(f"[barycenter] not reusing {paths.features}: {e}")
    model, _ = models.load_teacher(teacher_path, info, device)
    dataset = data.build_dataset(info, args, "train")
    if check_labels is not None:
        check_labels(list(dataset.targets))
    t0 = time.time()
    features, labels = extract_features(model, dataset, device, args.batch_size, args.workers)
    if not torch.isfinite(features).all():
        cli.fail(f"the teacher {teacher_path} produced non-finite features. Check the teacher (retrain with "
                 "squeeze.py) and the data.")
    payload = {"features": features, "labels": labels}
    meta = artifacts.make_meta("features", args, info, upstream={"teacher": teacher_path},
                               wall_time_s=time.time() - t0, feature_dim=int(features.shape[1]))
    artifacts.save(paths.features, payload, meta)
    print(f"[barycenter] wrote {paths.features} ({tuple(features.shape)}, {time.time() - t0:.1f}s)")
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


def solve(args, class_features: list, first_class: int) -> wot.Barycenter:
    """Barycenters of consecutive classes first_class, first_class + 1, ... (batched for sinkhorn)."""
    common = dict(solver=args.solver, weights=args.weights, reg=args.reg, iters=args.iters, impl=args.impl)
    step = args.class_batch if args.solver == "sinkhorn" else 1
    parts = []
    bar = tqdm(total=len(class_features), desc=f"barycenters ({args.solver}, {args.weights})")
    for s in range(0, len(class_features), step):
        chunk = class_features[s:s + step]
        seeds = [wot.class_seed(args.seed, first_class + s + i) for i in range(len(chunk))]
        parts.append(wot.free_support_barycenter_batched(chunk, args.ipc, seeds=seeds, **common))
        bar.update(len(chunk))
        bar.set_postfix(w2=f"{float(torch.cat([p.w2 for p in parts]).mean()):.4g}")
    bar.close()
    return wot.Barycenter(points=torch.cat([p.points for p in parts]),
                          weights=torch.cat([p.weights for p in parts]),
                          w2=torch.cat([p.w2 for p in parts]), iters=torch.cat([p.iters for p in parts]),
                          info=parts[0].info)


def shard_path(paths, a: int, b: int) -> str:
    return os.path.join(paths.shards, f"barycenters_{a}_{b}.pt")


def reusable_shards(paths, args, upstream_sha: dict) -> list:
    """(a, b, artifact) of shards made with the same teacher, features and settings."""
    found = []
    for path in sorted(glob.glob(os.path.join(paths.shards, "barycenters_*_*.pt"))):
        try:
            shard = artifacts.load(path, stage="barycenter")
        except cli.UserError as e:
            print(f"[barycenter] ignoring shard {path}: {e}")
            continue
        meta = shard["meta"]
        same = meta.get("upstream") == upstream_sha and all(
            meta.get("args", {}).get(key) == getattr(args, key) for key in RESULT_KEYS)
        if same:
            a, b = meta["class_range"]
            found.append((a, b, shard))
    return found


def main(args):
    t0 = time.time()
    info = data.resolve(args)
    data.preset_defaults(args, "barycenter")
    args.out = cli.default_out(args)
    device = cli.resolve_device(args.device)
    cli.seed_everything(args.seed)
    first, last = parse_class_range(args.classes, info.num_classes)
    cli.print_config("barycenter", args, classes=info.num_classes, class_range=f"{first}:{last}",
                     device_resolved=str(device), kernels=ops.describe(args.impl))
    paths = artifacts.run_paths(args.out)
    teacher_path = args.teacher or paths.teacher

    def check_labels(labels):
        check_ipc(args.ipc, [len(ix) for ix in data.class_indices(labels, info.num_classes)], info.classes)

    if args.ipc <= 0:
        check_ipc(args.ipc, [], info.classes)
    feats = load_or_extract_features(args, info, device, teacher_path, paths, check_labels)
    features, labels = feats["features"], feats["labels"]
    per_class = data.class_indices(labels.tolist(), info.num_classes)
    upstream = {"teacher": teacher_path, "features": paths.features}
    upstream_sha = {name: artifacts.sha256_file(p) for name, p in upstream.items()}

    # classes to compute: the range, less what matching shards already hold (full runs only)
    done = {}
    if args.classes is None:
        for a, b, shard in reusable_shards(paths, args, upstream_sha):
            for c in range(a, b):
                done.setdefault(c, (shard, c - a))
        if done:
            print(f"[barycenter] reusing {len(done)} classes from shards in {paths.shards}")
    todo = [c for c in range(first, last) if c not in done]

    t_solve = time.time()
    results = {}
    # consecutive runs of missing classes, each solved in class batches
    runs, start = [], None
    for i, c in enumerate(todo):
        if start is None:
            start = c
        if i + 1 == len(todo) or todo[i + 1] != c + 1:
            runs.append((start, c + 1))
            start = None
    info_solver = {}
    for a, b in runs:
        out = solve(args, [features[per_class[c]] for c in range(a, b)], a)
        info_solver = out.info
        for i, c in enumerate(range(a, b)):
            results[c] = (out.points[i], out.weights[i], out.w2[i], out.iters[i])
    for c, (shard, i) in done.items():
        results[c] = (shard["points"][i], shard["weights"][i], shard["w2"][i], shard["iters"][i])

    order = range(first, last)
    points = torch.stack([results[c][0] for c in order]).float()
    weights = torch.stack([results[c][1] for c in order]).float()
    w2 = torch.stack([torch.as_tensor(results[c][2]) for c in order]).double()
    iters = torch.stack([torch.as_tensor(results[c][3]) for c in order]).long()
    if not (torch.isfinite(points).all() and torch.isfinite(weights).all()):
        bad = [info.classes[c] for c in order
               if not (torch.isfinite(results[c][0]).all() and torch.isfinite(results[c][1]).all())]
        cli.fail(f"the barycenter of class(es) {', '.join(bad[:5])} is not finite (NaN/inf). With "
                 "--solver sinkhorn, raise --reg (e.g. 1e-2); or use --solver exact. Nothing was written.")

    payload = {"points": points, "weights": weights, "w2": w2, "iters": iters}
    meta = artifacts.make_meta("barycenter", args, info, upstream=upstream, class_range=[first, last],
                               k=int(args.ipc), feature_dim=int(points.shape[-1]),
                               solver_info=info_solver, kernels=ops.resolve_impl(args.impl),
                               wall_time_s=time.time() - t0, solve_time_s=time.time() - t_solve)
    target = paths.barycenters if args.classes is None else shard_path(paths, first, last)
    artifacts.save(target, payload, meta)
    print(f"[barycenter] wrote {target}: {last - first} classes x {args.ipc} atoms x {points.shape[-1]} dims, "
          f"mean W2^2 {w2.mean():.4g} (solve {time.time() - t_solve:.1f}s, total {time.time() - t0:.1f}s)")
    return {"barycenters": target, "features": paths.features}


if __name__ == "__main__":
    cli.run(main, get_args_parser())
