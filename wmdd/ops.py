"""Kernel routing: the compiled extension `wmdd._C` when it is built, else the reference.

More: docs/core.md, "wmdd/ops.py".
"""
from __future__ import annotations

import os

import torch

from wmdd.cli import fail

_ext = None
_ext_error: str | None = None
_ext_tried = False
BUILD_HINT = "pip install -e . --no-build-isolation"


def _load_ext():
    global _ext, _ext_error, _ext_tried
    if not _ext_tried:
        _ext_tried = True
        if os.environ.get("WMDD_NO_EXT") == "1":
            _ext_error = "disabled by WMDD_NO_EXT=1"
        else:
            try:
                from wmdd import _C  # registers torch.ops.wmdd.*
            except Exception as e:  # not built, or built against another torch (missing symbols)
                _ext_error = f"{type(e).__name__}: {e}"
            else:
                built_for = _C.torch_version()
                if built_for != torch.__version__:
                    _ext_error = (f"wmdd._C was built for torch {built_for} but torch {torch.__version__} is "
                                  f"running; rebuild it with `{BUILD_HINT}`")
                else:
                    _register_fakes()
                    _ext = _C
    return _ext


def _register_fakes():
    """Shape-only implementations, so torch.compile / opcheck can trace the operators."""
    @torch.library.register_fake("wmdd::class_moments")
    def _(x, y, num_classes):
        c = x.shape[1]
        return (x.new_empty((num_classes, c), dtype=torch.float64), x.new_empty((num_classes, c), dtype=torch.float64),
                x.new_empty((num_classes,), dtype=torch.float64))

    @torch.library.register_fake("wmdd::sinkhorn_log")
    def _(cost, a, b, reg, max_iter, tol, f_init=None, g_init=None):
        return a.new_empty(a.shape), b.new_empty(b.shape)

    @torch.library.register_fake("wmdd::sinkhorn_log_ex")
    def _(cost, a, b, reg, max_iter, tol, f_init=None, g_init=None, check_every=10):
        bsz = cost.shape[0]
        return (a.new_empty(a.shape), b.new_empty(b.shape), a.new_empty((bsz,), dtype=torch.long),
                a.new_empty((bsz,), dtype=torch.float64))


def ext_available() -> bool:
    """True when the compiled kernels are importable and match the running torch."""
    return _load_ext() is not None


def ext_has_cuda() -> bool:
    """True when the compiled kernels include the CUDA ones."""
    ext = _load_ext()
    return ext is not None and bool(ext.with_cuda())


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
                 f"({_ext_error}). Build them with `{BUILD_HINT}` "
                 "(or `make install`), or use --impl ref.")
        return "ref"
    return "ext"


def _impl_for(impl: str | None, device: torch.device) -> str:
    """resolve_impl, and then: a CUDA tensor with a CPU-only build takes the reference under auto and
    is an error under an explicit ext."""
    active = resolve_impl(impl)
    if active == "ext" and device.type != "cpu" and not (device.type == "cuda" and _ext.with_cuda()):
        if (impl or os.environ.get("WMDD_IMPL", "auto")) == "ext":
            fail(f"--impl ext was asked for on a {device.type} tensor, but this build of wmdd._C has only "
                 f"CPU kernels. Rebuild with a CUDA toolkit and a visible GPU (or FORCE_CUDA=1): "
                 f"`{BUILD_HINT}`; or use --impl auto / ref.")
        return "ref"
    return active


def describe(impl: str | None = None) -> str:
    """One line for a stage's start-up banner: which implementation is active and why."""
    active = resolve_impl(impl)
    if active == "ext":
        cuda = "CUDA kernels" if _ext.with_cuda() else "no CUDA kernels (CUDA tensors use the reference)"
        return f"kernels: compiled extension wmdd._C (CPU: {_ext.cpu_isa()}; {cuda})"
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
    """sum[K, C], sumsq[K, C], count[K] (float64) of x [N, C, *] per class y [N]; no gradient.
    The kernel reads NCHW-contiguous and channels_last inputs as they are (no copy)."""
    if _impl_for(impl, x.device) == "ext":
        return torch.ops.wmdd.class_moments(x.detach(), y.to(device=x.device, dtype=torch.long), num_classes)
    return class_moments_reference(x, y, num_classes)


# ---------------------------------------------------------------------------------------------
# batched log-domain Sinkhorn


def sinkhorn_log_batched_reference(cost, a, b, reg, max_iter=1000, tol=1e-9, f_init=None, g_init=None,
                                   return_info=False, check_every: int = 10):
    """POT's sinkhorn_log per problem (torch backend: tensors stay on their device). check_every != 10:
    POT one iteration at a time (its error after each is POT's own), stopping on the same schedule as
    the kernels."""
    import ot

    bsz, k, n = cost.shape
    f = torch.empty(bsz, k, dtype=cost.dtype, device=cost.device)
    g = torch.full((bsz, n), float("-inf"), dtype=cost.dtype, device=cost.device)
    n_iter = torch.zeros(bsz, dtype=torch.long)
    for p in range(bsz):
        cols = b[p] > 0
        warm = None
        if f_init is not None or g_init is not None:  # the first update (of v) only reads u
            u0 = f_init[p] / reg if f_init is not None else torch.zeros_like(a[p])
            v0 = g_init[p][cols] / reg if g_init is not None else torch.zeros_like(b[p][cols])
            warm = (u0, v0)
        if check_every == 10:
            _, log = ot.bregman.sinkhorn_log(a[p], b[p][cols], cost[p][:, cols], reg, numItermax=max_iter,
                                             stopThr=tol, log=True, warn=False, warmstart=warm)
            f[p] = reg * log["log_u"]
            g[p, cols] = reg * log["log_v"]
            n_iter[p] = log["niter"] + 1
            continue
        it = 0
        while it < max_iter:
            _, log = ot.bregman.sinkhorn_log(a[p], b[p][cols], cost[p][:, cols], reg, numItermax=1,
                                             stopThr=0.0, log=True, warn=False, warmstart=warm)
            it += 1
            warm = (log["log_u"], log["log_v"])
            if (it - 1) % check_every == 0 and log["err"][-1] < tol:
                break
        f[p] = reg * log["log_u"] if max_iter > 0 else (warm[0] * reg if warm else torch.zeros_like(a[p]))
        g[p, cols] = reg * log["log_v"] if max_iter > 0 else (warm[1] * reg if warm else torch.zeros_like(b[p][cols]))
        n_iter[p] = it
    if not return_info:
        return f, g
    err = torch.linalg.vector_norm(sinkhorn_plan(cost, f, g, reg).sum(1) - b, dim=-1).double().cpu()
    return f, g, {"n_iter": n_iter, "err": err}


def sinkhorn_log_batched(cost, a, b, reg: float, max_iter: int = 1000, tol: float = 1e-9,
                         f_init=None, g_init=None, impl: str | None = None, return_info: bool = False,
                         check_every: int = 10):
    """Dual potentials (f [B, k], g [B, N]) of B entropic OT problems; see the module docstring.

    return_info=True adds a dict: n_iter [B] (iterations run) and err [B] (L2 b-marginal violation of
    the returned potentials), both on the CPU."""
    if _impl_for(impl, cost.device) == "ext":
        f, g, n_iter, err = torch.ops.wmdd.sinkhorn_log_ex(cost, a, b, float(reg), int(max_iter), float(tol),
                                                           f_init, g_init, int(check_every))
        return (f, g, {"n_iter": n_iter.cpu(), "err": err.cpu()}) if return_info else (f, g)
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    return sinkhorn_log_batched_reference(cost, a, b, reg, max_iter, tol, f_init, g_init, return_info,
                                          check_every)


def sinkhorn_plan(cost, f, g, reg):
    """P[b, i, j] = exp((f_i + g_j - C_ij) / reg)."""
    return torch.exp((f.unsqueeze(-1) + g.unsqueeze(-2) - cost) / reg)
