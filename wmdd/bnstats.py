"""Per-class BatchNorm statistics (WMDD §III-C): collect, store, and (in recover) match.

For every BatchNorm layer l and class c, the mean and biased variance of the layer's *input* over
(images of c, H, W), from per-class float64 sums and sums of squares (`ops.class_moments`, fused kernel
when built, plain torch otherwise) accumulated over one eval-mode pass of the teacher:

    mu[l][c]  = S1[l][c] / n[l][c]          var[l][c] = S2[l][c] / n[l][c] - mu[l][c]^2

Global statistics (what SRe2L matches, and the running statistics of an ideal BN) come from the same sums.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from wmdd import ops
from wmdd.models import bn_layers


class ClassMomentHooks:
    """Forward pre-hooks on every BN layer that add the per-class moments of its input.

    Set `labels` before each forward pass; sums accumulate in float64 on the model's device."""

    def __init__(self, model, num_classes: int, impl: str | None = None):
        self.num_classes, self.impl = num_classes, impl
        self.layers = bn_layers(model)
        self.sums = [None] * len(self.layers)
        self.sumsqs = [None] * len(self.layers)
        self.counts = [None] * len(self.layers)
        self.labels = None
        self._handles = [m.register_forward_pre_hook(self._hook(i)) for i, (_, m) in enumerate(self.layers)]

    def _hook(self, i):
        def hook(module, inputs):
            s, sq, n = ops.class_moments(inputs[0], self.labels, self.num_classes, impl=self.impl)
            if self.sums[i] is None:
                self.sums[i], self.sumsqs[i], self.counts[i] = s, sq, n
            else:
                self.sums[i] += s
                self.sumsqs[i] += sq
                self.counts[i] += n
        return hook

    def remove(self):
        for h in self._handles:
            h.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


@torch.no_grad()
def collect(model, loader, num_classes: int, device, impl: str | None = None, progress: bool = True,
            forward=None) -> dict:
    """One eval-mode pass over `loader` ((x, y) batches). Returns the bn_stats payload (float64 sums).

    `forward(model, x)` defaults to `model(x)`; the per-class sums can be all-reduced across ranks
    before `finalize` (they are plain sums)."""
    model.eval()
    forward = forward or (lambda m, x: m(x))
    with ClassMomentHooks(model, num_classes, impl) as hooks:
        for x, y in tqdm(loader, desc="BN statistics", disable=not progress, leave=False):
            hooks.labels = y.to(device, non_blocking=True)
            forward(model, x.to(device, non_blocking=True))
        if hooks.sums[0] is None:
            raise ValueError("the statistics pass saw no data")
        return {"layers": [name for name, _ in hooks.layers],
                "sum": [s.cpu() for s in hooks.sums], "sumsq": [s.cpu() for s in hooks.sumsqs],
                "count": [n.cpu() for n in hooks.counts]}


def finalize(sums: dict) -> dict:
    """Add per-class and global mean / biased variance (float64) to a dict of sums."""
    out = dict(sums)
    out["mean"], out["var"], out["global_mean"], out["global_var"] = [], [], [], []
    for s, sq, n in zip(sums["sum"], sums["sumsq"], sums["count"]):
        n_ = n.clamp_min(1).unsqueeze(1)
        mean = s / n_
        out["mean"].append(mean)
        out["var"].append((sq / n_ - mean * mean).clamp_min(0))
        total = n.sum().clamp_min(1)
        g_mean = s.sum(0) / total
        out["global_mean"].append(g_mean)
        out["global_var"].append((sq.sum(0) / total - g_mean * g_mean).clamp_min(0))
    return out
