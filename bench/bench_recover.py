"""Recover step speed and memory: this repo's loop (recover.BatchOptimizer) against a port of the released
WMDD loop, side by side on the same device, teacher, batch, targets and augmentation draws.

    python bench/bench_recover.py            # CPU (or CUDA when available): ~1-3 min on 2 cores
    python bench/bench_recover.py --steps 20 --device cuda
    python bench/bench_recover.py --threads 1       # steadier on a machine shared with other jobs

The port follows the released per-class recover (recover/data_synthesis_new.py + utils.py of the WMDD
code as it ran with --wb --per-class-bn): fp32 NCHW teacher; one forward hook per BatchNorm layer that
views its input as [classes, ipc, C, H, W] and computes the barycenter-weighted per-class mean and variance
(the branch taken whenever barycenter weights are passed, i.e. every WMDD run) and its loss term in Python;
a forward hook on the penultimate layer for the feature; `loss = r_wb * CE + ||f - B|| + r_bn * sum(...)`;
torchvision's resized_crop / hflip on the batch, torch.roll; Adam(0.5, 0.9); a per-channel clamp loop;
`loss.item()` every step (the released best-image bookkeeping) with a clone of the pixels.

Both loops start from the same pixels and get the same crop / flip / roll each step; the loss terms of
step 0 (identical inputs) must agree (fp32: 1e-4 relative; bf16: 3e-2), and the largest relative
difference over all steps is reported. Times are medians of interleaved steps (fair under a busy CPU).
Peak memory of a step: on CUDA torch.cuda.max_memory_allocated minus the memory allocated before the step;
on CPU the resident set size sampled every 0.5 ms during the step minus the RSS before it, with glibc's mmap
threshold fixed at 64 KiB so that freed tensors leave the RSS at once (largest over the timed steps).
"""
from __future__ import annotations

import argparse
import math
import os
import ctypes
import statistics
import threading
import sys
import time
from types import SimpleNamespace

import torch
import torchvision
import torchvision.transforms.functional as TF
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import recover  # noqa: E402
from wmdd import augment, models  # noqa: E402
from wmdd.presets import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

CASES = {
    # name: (arch, stem, image size, classes in the batch, ipc, lambda_bn, mean, std, flip, crop scale)
    "resnet18-32px": ("resnet18", "small", 32, 2, 10, 10.0, IMAGENET_MEAN, IMAGENET_STD, True, (0.08, 1.0)),
    "convnet-digits-16px": ("convnet", "small", 16, 10, 10, 10.0, (0.305,) * 3, (0.376,) * 3, False, (0.25, 1.0)),
}
VARIANTS = ("released", "ours-fp32", "ours-bf16")


# ---------------------------------------------------------------------------------------------
# the released loop, ported


class ReleasedBNHook:
    """Per-class BN loss of one layer, as the released BNFeatureHook_new with barycenter weights."""

    def __init__(self, module, ipc, mean_pc, var_pc, weights):
        self.hook = module.register_forward_hook(self.hook_fn)
        self.ipc, self.mean_pc, self.var_pc, self.weights = ipc, mean_pc, var_pc, weights

    def hook_fn(self, module, input, output):
        num_cls = self.mean_pc.shape[0]
        _, nch, h, w = input[0].shape
        wts = self.weights.view(num_cls, self.ipc, 1, 1, 1).to(input[0].device)
        wts = wts / wts.sum(dim=1, keepdim=True)
        inp = input[0].view(num_cls, self.ipc, nch, h, w)
        mean = (inp * wts).sum(dim=1).mean(dim=[2, 3])
        centered = inp - mean.view(num_cls, 1, nch, 1, 1)
        var = (wts * centered ** 2).sum(dim=1).mean(dim=[2, 3])
        diff_var = self.var_pc - var
        diff_mean = self.mean_pc - mean
        self.r_feature = torch.norm(diff_var, dim=1).mean() + torch.norm(diff_mean, dim=1).mean()


class EmbedderHook:
    def __init__(self, module):
        self.hook = module.register_forward_hook(self.hook_fn)

    def hook_fn(self, module, input, output):
        self.feature = output.view(output.shape[0], -1)


class ReleasedLoop:
    def __init__(self, model, x0, case, targets, lr, iterations, r_wb=0.0, first_bn_multiplier=1.0):
        _, _, size, ncls, ipc, r_bn, mean, std, _, _ = case
        self.model, self.size, self.r_bn, self.r_wb = model, size, r_bn, r_wb
        self.lr, self.iterations, self.first_bn_multiplier = lr, iterations, first_bn_multiplier
        self.mean, self.std = mean, std
        self.inputs = x0.clone().requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.inputs], lr=lr, betas=[0.5, 0.9], eps=1e-8)
        self.criterion = nn.CrossEntropyLoss()
        self.targets, self.bary = targets["labels"], targets["atoms"]
        weights = torch.full((ncls, ipc), 1.0 / ipc)  # uniform barycenter weights, as in the paper's runs
        self.bn_hooks = [ReleasedBNHook(m, ipc, mu, var, weights)
                         for (_, m), mu, var in zip(models.bn_layers(model), targets["mean"], targets["var"])]
        feature_module = model.avgpool if isinstance(model, torchvision.models.ResNet) else model.features
        self.feature_hook = EmbedderHook(feature_module)
        self.best_cost = 1e4

    def clip(self, image_tensor):
        for c in range(3):
            m, s = self.mean[c], self.std[c]
            image_tensor[:, c] = torch.clamp(image_tensor[:, c], -m / s, (1 - m) / s)
        return image_tensor

    def step(self, iteration, params):
        top, left, h, w, flip, dy, dx = params
        lr = 0.5 * (1 + math.cos(math.pi * iteration / self.iterations)) * self.lr
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = lr
        inputs_jit = TF.resized_crop(self.inputs, top, left, h, w, [self.size, self.size])
        if flip:
            inputs_jit = TF.hflip(inputs_jit)
        inputs_jit = torch.roll(inputs_jit, shifts=(dy, dx), dims=(2, 3))
        self.optimizer.zero_grad()
        outputs = self.model(inputs_jit)
        loss_ce = self.criterion(outputs, self.targets) * self.r_wb
        loss_feature = torch.norm(self.feature_hook.feature - self.bary, 2)
        loss_main = loss_ce + loss_feature
        rescale = [self.first_bn_multiplier] + [1.0 for _ in range(len(self.bn_hooks) - 1)]
        loss_r_bn_feature = sum([mod.r_feature * rescale[idx] for (idx, mod) in enumerate(self.bn_hooks)])
        loss = loss_main + self.r_bn * loss_r_bn_feature
        loss.backward()
        self.optimizer.step()
        self.inputs.data = self.clip(self.inputs.data)
        if self.best_cost > loss.item() or iteration == 1:
            self.best_inputs = self.inputs.data.clone()
        return {"total": loss.item(), "feature": loss_feature.item(), "bn": loss_r_bn_feature.item(),
                "ce": loss_ce.item() / self.r_wb if self.r_wb else 0.0}


# ---------------------------------------------------------------------------------------------
# the shared setup


def build(case_name: str, device, seed: int = 0):
    """Teacher (random weights, random BN running statistics), pixels, targets: identical per call."""
    case = CASES[case_name]
    arch, stem, size, ncls, ipc, *_ = case
    torch.manual_seed(seed)
    model = models.build_model(arch, 10, stem, size)
    for _, m in models.bn_layers(model):
        m.running_mean.normal_(0, 0.2)
        m.running_var.uniform_(0.5, 2.0)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed + 1)
    x0 = torch.randn(ncls * ipc, 3, size, size, generator=g)
    with torch.no_grad():
        d = models.penultimate(model, x0[:1].to(device)).shape[1]
    layers = models.bn_layers(model)
    targets = {"labels": torch.arange(ncls).repeat_interleave(ipc).to(device),
               "atoms": (torch.randn(ncls * ipc, d, generator=g) * 0.5).abs().to(device),
               "mean": [(torch.randn(ncls, m.num_features, generator=g) * 0.3).to(device) for _, m in layers],
               "var": [(torch.rand(ncls, m.num_features, generator=g) + 0.5).to(device) for _, m in layers]}
    return case, model, x0.to(device), targets


def make_variant(variant: str, case_name: str, device, iterations: int, lr: float = 0.1):
    case, model, x0, targets = build(case_name, device)
    if variant == "released":
        return ReleasedLoop(model, x0, case, targets, lr, iterations)
    _, _, size, ncls, ipc, lam, mean, std, flip, scale = case
    amp = "bf16" if variant == "ours-bf16" else "fp32"
    args = SimpleNamespace(feature="barycenter", bn="per-class", lambda_bn=lam, r_ce=0.0, first_bn_mult=1.0,
                           amp=amp, channels_last="on", iterations=iterations, lr=lr, batch_size=ncls * ipc)
    model.to(memory_format=torch.channels_last)
    info = SimpleNamespace(mean=mean, std=std, image_size=size)
    tg = recover.Targets(targets["labels"], targets["atoms"], targets["mean"], targets["var"], ncls)
    opt = recover.BatchOptimizer(recover.Objective(model, args), x0, tg, args, info)

    class Ours:
        def step(self, it, params):
            out = opt.step(it, params)
            return {k: float(v.detach()) for k, v in out.items()}  # read back for the comparison only
    return Ours()


def draw(case_name: str, steps: int, seed: int = 0) -> list:
    _, _, size, *_, flip, scale = CASES[case_name]
    g = torch.Generator().manual_seed(seed)
    return [augment.draw_shared_view(g, size, scale, flip, int(round(32 * size / 224))) for _ in range(steps)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fix_mmap_threshold() -> bool:
    """glibc: serve every allocation >= 64 KiB by mmap and unmap it on free, so RSS follows live memory."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024))  # M_MMAP_THRESHOLD
    except OSError:
        return False


class PeakMeter:
    """Peak memory growth during a block: CUDA allocator statistics, or sampled RSS on CPU."""

    def __init__(self, device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base, self.top, self.running = rss_bytes(), 0, True
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.top = max(self.top, rss_bytes())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.top, rss_bytes()) - self.base


def run_case(case_name: str, device, steps: int, warmup: int) -> dict:
    loops = {v: make_variant(v, case_name, device, steps + warmup) for v in VARIANTS}
    params = draw(case_name, steps + warmup)
    times = {v: [] for v in VARIANTS}
    losses = {v: [] for v in VARIANTS}
    peaks = {v: 0 for v in VARIANTS}
    for it in range(steps + warmup):
        for v in VARIANTS:  # interleaved: a busy machine slows every variant alike
            sync(device)
            t = time.perf_counter()
            with PeakMeter(device) as meter:
                losses[v].append(loops[v].step(it, params[it]))
            sync(device)
            if it >= warmup:
                times[v].append(time.perf_counter() - t)
                peaks[v] = max(peaks[v], meter.peak)
    ref = losses["released"]
    result = {"case": case_name, "steps": steps}
    for v in VARIANTS:
        rel0 = max(abs(losses[v][0][k] - ref[0][k]) / max(abs(ref[0][k]), 1e-12) for k in ("total", "feature", "bn"))
        rel_all = max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-12)
                      for a, b in zip(losses[v], ref) for k in ("total", "feature", "bn"))
        tol = 3e-2 if v == "ours-bf16" else 1e-4
        if rel0 > tol:
            raise SystemExit(f"{case_name} {v}: step-0 loss differs from the released loop's by {rel0:.2e} "
                             f"(> {tol}): {losses[v][0]} vs {ref[0]}")
        result[v] = {"ms": 1e3 * statistics.median(times[v]), "it_s": 1.0 / statistics.median(times[v]),
                     "rel_loss_step0": rel0, "rel_loss_max": rel_all, "loss_step0": ref[0]["total"],
                     "mem_mib": peaks[v] / 2**20}
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          (args.device if args.device != "auto" else "cpu"))
    if device.type == "cpu" and not fix_mmap_threshold():
        print("note: could not fix glibc's mmap threshold; CPU peak memory is approximate")
    print(f"device {device} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"{args.steps} timed steps after {args.warmup} warm-up, interleaved")
    rows = []
    t0 = time.time()
    for case_name in args.cases.split(","):
        r = run_case(case_name, device, args.steps, args.warmup)
        rows.append(r)
        _, _, size, ncls, ipc, *_ = CASES[case_name]
        print(f"\n{case_name}: batch {ncls} classes x {ipc} images at {size} px")
        print("| loop | ms / step | it/s | speed-up | peak step memory (MiB) | loss rel. diff step 0 / max |")
        print("|---|---|---|---|---|---|")
        for v in VARIANTS:
            print(f"| {v} | {r[v]['ms']:.1f} | {r[v]['it_s']:.2f} | {r[v]['it_s'] / r['released']['it_s']:.2f}x | "
                  f"{r[v]['mem_mib']:.0f} | {r[v]['rel_loss_step0']:.1e} / {r[v]['rel_loss_max']:.1e} |")
    print(f"\nbench_recover: {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
