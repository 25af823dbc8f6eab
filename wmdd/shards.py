"""recover.py's plumbing: its checked inputs, the class grid, shards, resume and the merge into synthetic.pt
(docs/recover.md, "Sharding" and "Resume").

More: docs/core.md, "wmdd/shards.py".
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from wmdd import artifacts, cli, coreset, dist, models, ops

# batches: a grid of class groups fixed by the batch size, so any split along it reproduces


@dataclass
class Group:
    """Classes [start, stop) recovered together; `batches` lists the image index j of each batch
    (None: one class-major batch of all IPC images of every class of the group)."""
    start: int
    stop: int
    batches: list = field(default_factory=list)


def classes_per_group(layout: str, ipc: int, batch_size: int) -> int:
    return max(1, batch_size // ipc) if layout == "class-major" else batch_size


def plan_groups(lo: int, hi: int, num_classes: int, ipc: int, batch_size: int, layout: str) -> list:
    """The groups of classes [lo, hi): the grid cells of `classes_per_group` classes, cut to the range."""
    k = classes_per_group(layout, ipc, batch_size)
    groups = []
    for cell in range((lo // k) * k, hi, k):
        start, stop = max(cell, lo), min(cell + k, hi, num_classes)
        batches = [None] if layout == "class-major" else list(range(ipc))
        groups.append(Group(start, stop, batches))
    return groups


def shard_groups(groups: list, rank: int, world: int) -> list:
    """The groups rank `rank` of `world` recovers (round robin; every group once over all ranks)."""
    return groups[rank::world]


# ---------------------------------------------------------------------------------------------
# timing (the paper's Table IV: time per iteration and peak memory)


class StepClock:
    """Wall time and peak memory of one group's optimisation: CUDA's peak allocated memory on a GPU, the
    process's peak resident set size (getrusage) on CPU."""

    def __init__(self, device):
        self.device, self.t0 = device, time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def stop(self, steps: int) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak, kind = torch.cuda.max_memory_allocated(self.device), "cuda max_memory_allocated"
            name = torch.cuda.get_device_name(self.device)
        else:
            import resource  # Unix only; CUDA runs never need it

            peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"
            name = "cpu"
        return {"seconds": time.perf_counter() - self.t0, "steps": int(steps), "peak_memory_bytes": int(peak),
                "memory_kind": kind, "device": name}


def merge_timings(timings: list):
    """The groups' timings summed (seconds, steps) and maxed (peak memory); None if a shard has none."""
    if not timings or any(t is None for t in timings):
        return None
    seconds, steps = sum(t["seconds"] for t in timings), sum(t["steps"] for t in timings)
    return {"seconds": seconds, "steps": steps, "seconds_per_iteration": seconds / max(steps, 1),
            "peak_memory_bytes": max(t["peak_memory_bytes"] for t in timings),
            "memory_kind": timings[0]["memory_kind"], "device": timings[0]["device"]}


# ---------------------------------------------------------------------------------------------
# shards and the merged synthetic set


def shard_path(paths, group: Group) -> str:
    return artifacts.shard_path(paths, "recover", group.start, group.stop)


def current_shard(path, recipe: dict, upstream_sha: dict, info):
    """The shard at path if it was made by this recipe from these upstream files, else None."""
    def matches(shard):
        meta = shard["meta"]
        return (shard.get("recipe") == recipe and meta.get("upstream") == upstream_sha
                and list(meta.get("classes", [])) == list(info.classes) and meta.get("resolution") == info.resolution)
    return artifacts.reuse(path, "recover-shard", matches)


def pending_groups(lo: int, hi: int, args, info, paths, recipe: dict, upstream_sha: dict, world, group) -> tuple:
    """(the groups of classes [lo, hi) without a current shard, this rank's share of them)."""
    k = classes_per_group(args.layout, args.ipc, args.batch_size)
    if lo % k or (hi % k and hi != info.num_classes):
        world.print(f"note: --classes {lo}:{hi} is not on the grid of {k} classes per batch, so the cut "
                    "groups are recovered on their own and will not equal an unsplit run.")
    groups = plan_groups(lo, hi, info.num_classes, args.ipc, args.batch_size, args.layout)
    todo = [g for g in groups if current_shard(shard_path(paths, g), recipe, upstream_sha, info) is None]
    if len(todo) < len(groups):
        world.print(f"[recover] resuming: {len(groups) - len(todo)} of {len(groups)} groups already in {paths.shards}")
    dist.gather_objects(None, world, group)  # every rank has listed the finished groups before any writes one
    return todo, shard_groups(todo, world.rank, world.size)


def write_shard(paths, group: Group, shard: dict, timing: dict, args, info, upstream: dict, recipe: dict) -> None:
    """A finished group: its PNGs first (a shard on disk means its PNGs are complete), then its shard."""
    encoded = shard.pop("encoded")
    shard["timing"] = timing
    if not args.no_png:
        artifacts.write_images(shard["images"], shard["labels"], info, args.ipc, paths.images, encoded)
    artifacts.save(shard_path(paths, group), dict(shard, recipe=recipe),
                   artifacts.make_meta("recover-shard", args, info, upstream=upstream, recipe=recipe))


def check_recipe(args) -> None:
    """recover's resolved flags that cannot make a synthetic set: exit code 2 before any work."""
    if not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        cli.fail(f"--crop-scale {args.crop_scale[0]:g} {args.crop_scale[1]:g} is not an area range: pass "
                 "LO HI with 0 < LO <= HI <= 1 (e.g. 0.5 1).")
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


def check_finite(values: torch.Tensor, first: int, terms: tuple, iterations: int, where: str) -> None:
    """Stop with exit code 2 at the first non-finite loss of `values` [steps, terms] (steps first, first+1, ...)."""
    bad = (~torch.isfinite(values)).any(dim=1).nonzero()
    if len(bad):
        shown = ", ".join(f"{t} {float(v):.4g}" for t, v in zip(terms, values[int(bad[0])]))
        cli.fail(f"the recover loss became non-finite ({shown}) at iteration {first + int(bad[0]) + 1} of "
                 f"{iterations} for {where}. Lower --lr or --lambda-bn (or check the teacher and "
                 "bn_stats.pt). Shards already written are kept: rerunning the same command resumes "
                 "from them.")


def merge_shards(paths, info, args, recipe: dict, upstream: dict, t0: float, require_all: bool = False,
                 world_size: int = 1) -> bool:
    """Write synthetic.pt when the shards of this recipe cover every class; returns whether it did.
    require_all: a run over all classes has just finished every group, so a gap is an error."""
    upstream_sha = {k: artifacts.sha256_file(p) for k, p in upstream.items()}
    shards = []
    for path in artifacts.shard_files(paths, "recover"):
        shard = current_shard(path, recipe, upstream_sha, info)
        if shard is not None:
            shards.append(shard)
    shards.sort(key=lambda s: s["classes"][0])
    covered, chosen = 0, []
    for s in shards:  # the grid makes shards of one recipe disjoint; take them in class order
        if s["classes"][0] == covered:
            chosen.append(s)
            covered = s["classes"][1]
    if covered != info.num_classes:
        if require_all:
            cli.fail(f"every group was recovered, yet the shards of this recipe in {paths.shards} cover classes "
                     f"0:{covered} of {info.num_classes} only (a shard was removed, or replaced by another run "
                     "writing to the same --out). Rerun the same command: it recovers only the missing groups.")
        print(f"[recover] classes 0:{covered} of {info.num_classes} are done in {paths.shards}; synthetic.pt is "
              "written once shards of the remaining classes exist (run them with --classes a:b, same flags).")
        return False
    timing = merge_timings([s.get("timing") for s in chosen])
    payload = {"images": torch.cat([s["images"] for s in chosen]),
               "labels": torch.cat([s["labels"] for s in chosen]),
               "weights": torch.cat([s["weights"] for s in chosen]), "ipc": args.ipc,
               "loss_curve": {t: torch.cat([s["loss_curve"][t] for s in chosen]) for t in chosen[0]["loss_curve"]},
               "loss_batches": torch.cat([s["loss_batches"] for s in chosen]), "recipe": recipe}
    artifacts.save(paths.synthetic, payload,
                   artifacts.make_meta("recover", args, info, upstream=upstream, recipe=recipe, world_size=world_size,
                                       wall_time_s=time.time() - t0, kernels=ops.resolve_impl(args.impl),
                                       timing=timing))
    print(f"[recover] wrote {paths.synthetic}: {payload['images'].shape[0]} images "
          f"({info.num_classes} classes x {args.ipc}) and {paths.images}/")
    return True


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
            probe = torch.zeros(1, info.channels, info.image_size, info.image_size, device=device)
            d = models.penultimate(model, probe).shape[1]
        if points.shape[2] != d:
            cli.fail(f"{path} holds {points.shape[2]}-d atoms, but this teacher's penultimate feature is {d}-d. "
                     "Rerun barycenter.py with this teacher.")
        points = points.to(device)
        upstream["barycenters"] = path
    if weights is None:
        weights = torch.full((info.num_classes, args.ipc), 1.0 / args.ipc)
    if args.init in coreset.PICKS:  # the starting images depend on both files: part of every shard's key
        upstream = {**upstream, "features": paths.features, "barycenters": args.barycenters or paths.barycenters}
    if args.channels_last == "on":
        model.to(memory_format=torch.channels_last)
    return model, upstream, bn, points, weights.float()
