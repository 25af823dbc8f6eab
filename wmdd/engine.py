"""What runs around every stage's algorithm: its main() (preset, torchrun, allocator), the printed
configuration, and the training-loop pieces squeeze and evaluate share (validation, the epoch seed)."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import time

import torch
from tqdm import tqdm

from wmdd import data, dist, protocol
from wmdd.cli import resolve_device


def stage_main(run, args):
    """A stage's main(): resolve the dataset preset, join torchrun's process group (if any), call
    run(args, info, world, device, t0), and leave the group however run ends. A stage's --dry-run resolves
    the preset without reading the data (run then prints its configuration and stops)."""
    t0 = time.time()
    tune_cpu_allocator()
    protocol.resolve(args)
    info = data.resolve(args, on_disk=not getattr(args, "dry_run", False))
    world, device = dist.setup(resolve_device(args.device))
    try:
        return run(args, info, world, device, t0)
    finally:
        dist.teardown(world)


def print_config(stage: str, args, **extra) -> None:
    """One block at start: the resolved configuration, then anything stage-specific (e.g. kernel impl)."""
    config = {k: v for k, v in sorted(vars(args).items())}
    config.update(extra)
    print(f"[{stage}] configuration:")
    for k, v in config.items():
        print(f"  {k:>18} = {v}")
    print(f"[{stage}] CPU allocator: {tune_cpu_allocator()}")
    for line in protocol.block(stage, args):
        print(f"[{stage}] {line}" if not line.startswith(" ") else line)
    sys.stdout.flush()




@torch.no_grad()
def validate(model, loader, device, progress: bool = True, desc: str = "validate", world=None) -> dict:
    """Top-1 and top-5 accuracy (percent) of `model` over `loader`. Under torchrun (`world`, a
    wmdd.dist.World) each rank passes its own part of the data and the counts are summed over ranks."""
    model.eval()
    correct1 = correct5 = total = 0
    for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        total += y.numel()
    if world is not None and world.enabled:
        counts = dist.all_reduce_sum_(torch.tensor([correct1, correct5, total], dtype=torch.float64, device=device), world)
        correct1, correct5, total = (int(v) for v in counts.tolist())
    return {"top1": 100.0 * correct1 / max(total, 1), "top5": 100.0 * correct5 / max(total, 1)}


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The shuffling generator of one epoch: a resumed run draws the same order as an uninterrupted one."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def in_memory(dataset, max_bytes: int = 1 << 29):
    """`dataset` (items (float tensor, int label)) transformed once and held as tensors when its pixels fit
    in `max_bytes`: a student validated every few epochs then skips the per-image transforms (the
    tensors are the same, so the accuracies are too). Larger datasets are returned as they are."""
    from torch.utils.data import TensorDataset

    if len(dataset) == 0:
        return dataset
    x0 = dataset[0][0]
    if len(dataset) * x0.numel() * x0.element_size() > max_bytes:
        return dataset
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return TensorDataset(torch.stack(xs), torch.as_tensor(ys, dtype=torch.int64))


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
ALLOCATOR_SETTINGS = ((_M_MMAP_THRESHOLD, "mmap threshold", 32 << 20), (_M_TRIM_THRESHOLD, "trim threshold", 1 << 30),
                      (_M_TOP_PAD, "top pad", 256 << 20))
_allocator_note = None


def tune_cpu_allocator() -> str:
    """Keep freed activation buffers in glibc's heap instead of returning them to the kernel.

    By default glibc serves every block over its (dynamic) mmap threshold with a fresh mmap and unmaps it on
    free, so each training step of a CPU model faults in and zeroes its activations' pages again (the
    kernel time of a CPU run). Raising the mmap threshold to its maximum (32 MiB), keeping up to 1 GiB of
    freed memory (trim threshold) and growing the heap 256 MiB at a time (top pad) makes a ConvNet student
    step 1.2-1.4x faster on 2 cores (bench/bench_allocator.py, RESULTS.md "CPU allocator"). Only the
    allocator's policy changes, not a number computed. Not applied where the user chose their own
    (WMDD_MALLOC=default, a MALLOC_*_ variable or glibc.malloc tunable, jemalloc/tcmalloc preloaded) or where
    libc is not glibc. Returns what was done."""
    global _allocator_note
    if _allocator_note is not None:
        return _allocator_note
    chosen = [k for k in os.environ if k.startswith("MALLOC_") and k.endswith("_")]
    preload = os.environ.get("LD_PRELOAD", "")
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (os.environ.get("WMDD_MALLOC", "") == "default" or chosen or "glibc.malloc" in tunables
            or "jemalloc" in preload or "tcmalloc" in preload):
        _allocator_note = "as configured by the user (WMDD_MALLOC / MALLOC_*_ / GLIBC_TUNABLES / LD_PRELOAD)"
        return _allocator_note
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl and macOS have no mallopt with these meanings
        ok = all(libc.mallopt(code, value) == 1 for code, _, value in ALLOCATOR_SETTINGS)
    except (OSError, AttributeError):
        ok = False
    sizes = ", ".join(f"{name} {value >> 30} GiB" if value >= 1 << 30 else f"{name} {value >> 20} MiB"
                      for _, name, value in ALLOCATOR_SETTINGS)
    _allocator_note = (f"glibc malloc: {sizes} (WMDD_MALLOC=default leaves glibc's own)" if ok
                       else "the platform's default")
    return _allocator_note
