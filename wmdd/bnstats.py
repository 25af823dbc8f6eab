"""Per-class BatchNorm statistics (WMDD §III-C): collect, store, and (in recover) match.

More: docs/core.md, "wmdd/bnstats.py".
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


def finalize(sums: dict, batch_class: torch.Tensor | None = None) -> dict:
    """Add per-class and global mean / biased variance (float64) to a dict of sums.

    batch_class [B] (--class-var batch-mean): the sums are per batch of `release_batches`, batch b of class
    batch_class[b]. Each class's variance is then the released one, the mean over its batches of each batch's
    biased variance weighted by the batch's size (the between-batch part dropped); its mean and the stored
    sums are the class's own (the release's mean is the exact one too)."""
    out = {k: list(v) if k in ("sum", "sumsq", "count") else v for k, v in sums.items()}
    out["mean"], out["var"], out["global_mean"], out["global_var"] = [], [], [], []
    for i, (s, sq, n) in enumerate(zip(sums["sum"], sums["sumsq"], sums["count"])):
        n_ = n.clamp_min(1).unsqueeze(1)  # Eq. per-class BN statistics (real data, from float64 sums)
        mean = s / n_
        var = (sq / n_ - mean * mean).clamp_min(0)
        if batch_class is not None:  # batches -> classes: the released sum_b n_b var_b / n_c
            classes = int(batch_class.max()) + 1
            weighted = torch.zeros(classes, s.shape[1], dtype=s.dtype).index_add_(0, batch_class, var * n.unsqueeze(1))
            s, sq, n = (torch.zeros(classes, *t.shape[1:], dtype=t.dtype).index_add_(0, batch_class, t)
                        for t in (s, sq, n))
            out["sum"][i], out["sumsq"][i], out["count"][i] = s, sq, n
            n_ = n.clamp_min(1).unsqueeze(1)
            mean, var = s / n_, weighted / n_
        out["mean"].append(mean)
        out["var"].append(var)
        total = n.sum().clamp_min(1)
        g_mean = s.sum(0) / total
        out["global_mean"].append(g_mean)
        out["global_var"].append((sq.sum(0) / total - g_mean * g_mean).clamp_min(0))
    return out


def release_batches(targets, num_classes: int, size: int) -> tuple:
    """The released statistics pass's batches (recover/data_synthesis_new.py main_syn: one DataLoader per
    class over its samples in dataset order, batch_size = recover's 100, shuffle off, the last batch partial).
    Returns (the batch of every sample [N], the class of every batch [B]), batches numbered class by class."""
    y = torch.as_tensor(list(targets), dtype=torch.long)
    counts = torch.bincount(y, minlength=num_classes)
    rank = torch.empty_like(y)  # each sample's position among its class's samples, in dataset order
    order = torch.argsort(y, stable=True)
    rank[order] = torch.arange(len(y)) - (torch.cumsum(counts, 0) - counts)[y[order]]
    per_class = (counts + size - 1) // size
    first = torch.cumsum(per_class, 0) - per_class
    return first[y] + rank // size, torch.repeat_interleave(torch.arange(num_classes), per_class)


class Relabelled(torch.utils.data.Dataset):
    """`dataset`'s images with other labels (the statistics pass's batch ids)."""

    def __init__(self, dataset, labels: torch.Tensor):
        self.dataset, self.labels = dataset, labels

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i][0], int(self.labels[i])


# ---------------------------------------------------------------------------------------------
# recover: the differentiable per-class (or global) moments of a batch and the matching loss


class _GroupMoments(torch.autograd.Function):
    """(mean, biased var) [G, C] of x [G*m, C, *] over (the m samples of each group, spatial positions),
    float32 whatever x's dtype. Forward: sums of d = x - shift and d^2 (fast vectorised reductions; the shift,
    any per-group guess of the mean, removes the cancellation of E[x^2] - E[x]^2; CPU var_mean is ~10x slower).
    Backward: the closed form dx = gmean/n + 2 gvar (x - mean)/n as one fused multiply-add."""

    @staticmethod
    def forward(ctx, x, groups: int, shift):
        channels = x.shape[1]
        xg = x.view(groups, x.shape[0] // groups, channels, -1)
        n = xg.shape[1] * xg.shape[3]
        if shift is None:
            d = xg.float()
        else:
            d = xg - shift.view(groups, 1, channels, 1).to(torch.float32)
        s1 = d.sum(dim=(1, 3))
        s2 = (d * d).sum(dim=(1, 3))
        dm = s1 / n  # Eq. per-class BN statistics (the synthetic batch's classes, differentiable)
        var = (s2 / n - dm * dm).clamp_min_(0)
        mean = dm if shift is None else dm + shift.view(groups, channels).to(torch.float32)
        ctx.save_for_backward(x, mean)
        ctx.groups = groups
        return mean, var

    @staticmethod
    def backward(ctx, grad_mean, grad_var):
        x, mean = ctx.saved_tensors
        groups, channels = ctx.groups, x.shape[1]
        xg = x.view(groups, x.shape[0] // groups, channels, -1)
        n = xg.shape[1] * xg.shape[3]
        if grad_mean is None:
            grad_mean = torch.zeros_like(mean)
        if grad_var is None:
            grad_var = torch.zeros_like(mean)
        a = grad_var * (2.0 / n)
        b = grad_mean / n - a * mean
        gx = torch.addcmul(b.view(groups, 1, channels, 1), xg, a.view(groups, 1, channels, 1))
        return gx.view(x.shape).to(x.dtype), None, None


def group_moments(x: torch.Tensor, groups: int = 1, shift: torch.Tensor | None = None):
    """Differentiable per-group BatchNorm-input statistics, for recover's BN matching loss.

    x: a BN layer's input [N, C, *] whose N samples form `groups` consecutive equal groups (recover's
    class-major batches: group g = the images of the g-th class of the batch; groups=1: the whole batch,
    SRe2L's global statistics). Returns (mean, var) [groups, C] float32: the mean and biased variance of
    each channel over (samples of the group, spatial positions), as `finalize` defines them for real data.
    `shift` [groups, C] (constant, e.g. the target means) only improves precision when |mean| >> std.
    """
    if x.shape[0] % groups:
        raise ValueError(f"a batch of {x.shape[0]} samples does not split into {groups} equal groups")
    if shift is not None:
        shift = shift.detach()
    return _GroupMoments.apply(x, groups, shift)


class GroupMomentHooks:
    """Forward pre-hooks on every BN layer collecting `group_moments` of its input during one forward pass
    (recover): `start(groups, shifts)` before it, `take()` after it gives [(count, mean, var)] per layer."""

    def __init__(self, model, enabled: bool = True):
        self.layers = bn_layers(model)
        self.groups, self.shifts, self.moments = 1, None, []
        self._handles = [m.register_forward_pre_hook(self._hook) for _, m in self.layers] if enabled else []

    def _hook(self, module, inputs):
        x = inputs[0]
        shift = self.shifts[len(self.moments)] if self.shifts else None  # target means: precise sums
        mean, var = group_moments(x, self.groups, shift)
        self.moments.append((x.numel() // (self.groups * x.shape[1]), mean, var))

    def start(self, groups: int, shifts=None) -> None:
        self.groups, self.shifts, self.moments = groups, shifts, []

    def take(self) -> list:
        moments, self.moments = self.moments, []
        return moments

    def remove(self):
        for h in self._handles:
            h.remove()


def merge_moments(n_a, mean_a, var_a, n_b, mean_b, var_b):
    """(mean, var) of the union of two sample sets given each one's count, mean and biased variance
    (Chan et al.'s pairwise update). Differentiable; recover uses it to add the detached statistics of a
    class's other chunks to the chunk being back-propagated, so per-class statistics cover all its images."""
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = var_a * n_a + var_b * n_b + delta * delta * (n_a * n_b / n)
    return mean, m2 / n


def bn_match_loss(mean, var, target_mean, target_var):
    """WMDD's BN term for one layer: mean over groups of ||mean_g - target_g||_2 + ||var_g - target_g||_2
    (mean, var, targets [G, C]). With G = 1 and the global statistics this is SRe2L's R_BN term."""
    # Eq. BN, layer l: mean_c ||mu_l(x_c) - mu_l[c]||_2 + ||var_l(x_c) - var_l[c]||_2
    return (torch.linalg.vector_norm(mean - target_mean, dim=1).mean()
            + torch.linalg.vector_norm(var - target_var, dim=1).mean())


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
            mean, var = merge_moments(float(n), mean, var, float(n2), mean2, var2)
            n = n + n2
        rest["moments"].append((n, mean, var))
    return rest
