"""recover.py's class grid, shards and resume (DESIGN §1 step 3; recover.py's manual, "Sharding" and "Resume").

Classes are grouped on a grid fixed by the batch size (group g = classes [g*k, (g+1)*k), k = classes per
batch); every random draw of a batch comes from a generator seeded by (--seed, the group's first class,
image index) alone, so any split of the classes along the grid (ranks, --classes shards, a resumed run)
reproduces the unsplit run bit for bit. Each finished group is one shard file; a shard counts only if it
was made by this run's recipe from these upstream files (sha256), and the shards of one recipe that cover
every class are merged into synthetic.pt. Each shard also keeps its group's wall time and peak memory
(the paper's Table IV).
"""
from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from wmdd import artifacts, cli, ops

def parse_classes(spec, num_classes: int) -> tuple:
    """'a:b' (half-open, either side may be empty) or 'a' -> (a, b) within [0, num_classes]."""
    if spec is None:
        return 0, num_classes
    try:
        if ":" in spec:
            a, b = spec.split(":", 1)
            lo, hi = int(a) if a.strip() else 0, int(b) if b.strip() else num_classes
        else:
            lo = int(spec)
            hi = lo + 1
    except ValueError:
        cli.fail(f"--classes {spec!r} is not a class range; write a:b (classes a to b-1), e.g. 0:100.")
    if not 0 <= lo < hi <= num_classes:
        cli.fail(f"--classes {spec} is outside the dataset's {num_classes} classes (or empty); "
                 f"use a range within 0:{num_classes}.")
    return lo, hi


# batches: a grid of class groups fixed by the batch size, so any split along it reproduces


@dataclass
class Group:
    """Classes [start, stop) recovered together; `batches` lists the image index j of each batch
    (None: one class-major batch of all IPC images of every class of the group)."""
    start: int
    stop: int
    batches: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"recover_{self.start:05d}-{self.stop:05d}"


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


def batch_generator(seed: int, first_class: int, index, purpose: int = 0) -> torch.Generator:
    """The CPU generator of one batch: depends only on the seed, the group's first class and j
    (purpose 1: the choice of real images for --init real, per class)."""
    words = [seed % 2**32, purpose, first_class, 0 if index is None else index + 1]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


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
    return os.path.join(paths.shards, group.name + ".pt")


def current_shard(path, recipe: dict, upstream_sha: dict, info):
    """The shard at path if it was made by this recipe from these upstream files, else None."""
    if not os.path.isfile(path):
        return None
    try:
        shard = artifacts.load(path, stage="recover-shard")
    except cli.UserError:
        return None
    meta = shard["meta"]
    if shard.get("recipe") != recipe or meta.get("upstream") != upstream_sha \
            or list(meta.get("classes", [])) != list(info.classes) or meta.get("resolution") != info.resolution:
        return None
    return shard


def merge_shards(paths, info, args, recipe: dict, upstream: dict, t0: float, require_all: bool = False,
                 world_size: int = 1) -> bool:
    """Write synthetic.pt when the shards of this recipe cover every class; returns whether it did.
    require_all: a run over all classes has just finished every group, so a gap is an error."""
    upstream_sha = {k: artifacts.sha256_file(p) for k, p in upstream.items()}
    shards = []
    for path in sorted(glob.glob(os.path.join(glob.escape(paths.shards), "recover_*.pt"))):
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
