"""Kernel routing: the compiled extension `wmdd._C` when it is built, else the reference.

Two operations (DESIGN §5):

- `class_moments(x, y, num_classes)`: per-class, per-channel sum and sum of squares of x over
  (samples of the class, spatial positions), float64 accumulation, and per-class element counts.
  Reference: plain torch (`index_add_`).
- `sinkhorn_log_batched(cost, a, b, reg, ...)`: entropic OT for B problems at once, log domain.
  Reference: POT's `ot.bregman.sinkhorn_log`, one problem at a time, on POT's torch backend.

Conventions (shared by the reference and the kernels):
- cost [B, k, N], a [B, k], b [B, N]; ragged problems pad b with zeros (those columns carry no mass).
- Dual potentials are in cost units: f = reg * log_u, g = reg * log_v (POT's `log_u`, `log_v`), so the
  plan is P[i, j] = exp((f[i] + g[j] - cost[i, j]) / reg). Padded columns get g = -inf (plan exactly 0).
- One iteration updates g then f, as POT does; the stopping error is the L2 violation of the b-marginal,
  checked every 10 iterations.

Implementation choice: `--impl auto|ext|ref` (or $WMDD_IMPL). auto = ext when importable, else ref;
ext without a usable build is a clear error.
"""
from __future__ import annotations

import os

import torch

from wmdd.cli import fail

_ext = None
_ext_error: str | None = None
_ext_tried = False


def _load_ext():
    global _ext, _ext_error, _ext_tried
    if not _ext_tried:
        _ext_tried = True
        if os.environ.get("WMDD_NO_EXT") == "1":
            _ext_error = "disabled by WMDD_NO_EXT=1"
        else:
            try:
                from wmdd import _C  # noqa: F401  (registers torch.ops.wmdd.*)
                _ext = _C
            except Exception as e:  # not built, or built against another torch
                _ext_error = f"{type(e).__name__}: {e}"
    return _ext


def resolve_impl(impl: str | None = None) -> str:
    """'ext' or 'ref'. impl None reads $WMDD_IMPL (default auto)."""
    impl = impl or os.environ.get("WMDD_IMPL", "auto")
    if impl not in ("auto", "ext", "ref"):
        fail(f"unknown kernel implementation {impl!r} (from --impl or $WMDD_IMPL); use auto, ext or ref.")
    if impl == "ref":
        return "ref"
    ext = _load_ext()
    if ext is None:
        if impl == "ext":
            fail("--impl ext was asked for, but the compiled kernels are not usable "
                 f"({_ext_error}). Build them with `pip install -e . --no-build-isolation` "
                 "(or `make install`), or use --impl ref.")
        return "ref"
    return "ext"


def describe(impl: str | None = None) -> str:
    """One line for a stage's start-up banner: which implementation is active and why."""
    active = resolve_impl(impl)
    if active == "ext":
        return "kernels: compiled extension wmdd._C"
    return "kernels: reference (POT / plain torch)" + (f"; extension unavailable: {_ext_error}" if _ext_error else "")


# ---------------------------------------------------------------------------------------------
# class_moments


def class_moments_reference(x: torch.Tensor, y: torch.Tensor, num_classes: int):
    """sum[K, C], sumsq[K, C] (float64) over samples of each class and spatial dims; count[K] (float64)
    = number of elements summed per channel (samples of the class x H x W)."""
    n, c = x.shape[:2]
    x64 = x.detach().to(torch.float64).reshape(n, c, -1)
    per_sample_sum = x64.sum(dim=2)
    per_sample_sumsq = (x64 * x64).sum(dim=2)
    y = y.to(device=x.device, dtype=torch.long)
    total = torch.zeros(num_classes, c, dtype=torch.float64, device=x.device)
    total_sq = torch.zeros_like(total)
    total.index_add_(0, y, per_sample_sum)
    total_sq.index_add_(0, y, per_sample_sumsq)
    count = torch.zeros(num_classes, dtype=torch.float64, device=x.device)
    count.index_add_(0, y, torch.full((n,), float(x64.shape[2]), dtype=torch.float64, device=x.device))
    return total, total_sq, count


def class_moments(x: torch.Tensor, y: torch.Tensor, num_classes: int, impl: str | None = None):
    if resolve_impl(impl) == "ext":
        return torch.ops.wmdd.class_moments(x.detach().contiguous(), y.to(torch.long).contiguous(), num_classes)
    return class_moments_reference(x, y, num_classes)


# ---------------------------------------------------------------------------------------------
# batched log-domain Sinkhorn


def sinkhorn_log_batched_reference(cost, a, b, reg, max_iter=1000, tol=1e-9, f_init=None, g_init=None):
    """POT's sinkhorn_log per problem (torch backend: tensors stay on their device)."""
    import ot

    bsz, k, n = cost.shape
    f = torch.empty(bsz, k, dtype=cost.dtype, device=cost.device)
    g = torch.full((bsz, n), float("-inf"), dtype=cost.dtype, device=cost.device)
    for p in range(bsz):
        cols = b[p] > 0
        warm = None
        if f_init is not None and g_init is not None:
            warm = (f_init[p] / reg, g_init[p][cols] / reg)
        _, log = ot.bregman.sinkhorn_log(a[p], b[p][cols], cost[p][:, cols], reg, numItermax=max_iter,
                                         stopThr=tol, log=True, warn=False, warmstart=warm)
        f[p] = reg * log["log_u"]
        g[p, cols] = reg * log["log_v"]
    return f, g


def sinkhorn_log_batched(cost, a, b, reg: float, max_iter: int = 1000, tol: float = 1e-9,
                         f_init=None, g_init=None, impl: str | None = None):
    """Dual potentials (f [B, k], g [B, N]) of B entropic OT problems; see the module docstring."""
    if resolve_impl(impl) == "ext":
        return torch.ops.wmdd.sinkhorn_log(cost, a, b, float(reg), int(max_iter), float(tol), f_init, g_init)
    return sinkhorn_log_batched_reference(cost, a, b, reg, max_iter, tol, f_init, g_init)


def sinkhorn_plan(cost, f, g, reg):
    """P[b, i, j] = exp((f_i + g_j - C_ij) / reg)."""
    return torch.exp((f.unsqueeze(-1) + g.unsqueeze(-2) - cost) / reg)
