"""The compiled kernels (wmdd._C) against the references in wmdd/ops.py and against POT's sinkhorn_log
(the oracle), at awkward shapes; the reference path and the routing. Extension tests skip when wmdd._C
is not built (or WMDD_NO_EXT=1); CUDA tests are marked `gpu` and skip without a GPU."""
from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

from wmdd import ops
from wmdd.cli import UserError

HAVE_EXT = ops.ext_available()
needs_ext = pytest.mark.skipif(not HAVE_EXT, reason=f"wmdd._C not usable: {ops._ext_error}")
_cuda_missing = ("no CUDA device" if not torch.cuda.is_available() else
                 None if ops.ext_has_cuda() else f"wmdd._C has no CUDA kernels ({ops._ext_error or 'CPU-only build'})")
needs_cuda = pytest.mark.skipif(_cuda_missing is not None, reason=str(_cuda_missing))
ISAS = ["default", "avx2", "avx512"]


@pytest.fixture
def isa(request):
    """Run with the CPU kernels of one instruction set; skip where this CPU / build lacks it."""
    from wmdd import _C
    before = _C.cpu_isa()
    if not _C.set_cpu_isa(request.param):
        pytest.skip(f"CPU kernels for {request.param} not runnable here")
    yield request.param
    _C.set_cpu_isa(before)


def naive_moments(x, y, num_classes):
    """The definition, one class at a time."""
    x = x.double().reshape(x.shape[0], x.shape[1], -1)
    k, c = num_classes, x.shape[1]
    s, q, n = torch.zeros(k, c, dtype=torch.float64), torch.zeros(k, c, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    for cls in range(k):
        xc = x[y == cls]
        s[cls] = xc.sum((0, 2))
        q[cls] = (xc * xc).sum((0, 2))
        n[cls] = xc.shape[0] * xc.shape[2]
    return s, q, n


def assert_moments_equal(got, want):
    for g, w in zip(got, want):
        assert g.dtype == torch.float64 and g.shape == w.shape
        torch.testing.assert_close(g.cpu(), w.cpu(), rtol=1e-11, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# class_moments

# (shape, num_classes, memory format): one image, one channel, channel counts off the vector width,
# 2-D [N, C], S = 1, the channel-parallel and the sample-parallel paths, channels_last in both paths.
MOMENT_CASES = [
    ((1, 3, 4, 4), 2, None),
    ((5, 1, 7), 3, None),
    ((9, 17, 3, 5), 4, None),
    ((12, 33), 5, None),
    ((6, 10, 1, 1), 3, None),
    ((40, 70, 6, 6), 7, None),
    ((3000, 3, 4, 4), 6, None),
    ((16, 40, 5, 5), 3, torch.channels_last),
    ((200, 9, 6, 6), 4, torch.channels_last),
    ((7, 19, 1, 3), 2, torch.channels_last),
]


@pytest.fixture(params=["serial", "threads"])
def moments_threads(request):
    """Both the single-thread path and the threaded paths (normally only from 2^24 values on)."""
    from wmdd import _C
    before = _C.set_moments_parallel_min(0 if request.param == "threads" else 2**62)
    yield request.param
    _C.set_moments_parallel_min(before)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,num_classes,fmt", MOMENT_CASES)
def test_class_moments_matches_reference(shape, num_classes, fmt, dtype, moments_threads):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g, dtype=dtype) * 3 + 1)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    y = torch.randint(0, num_classes, (shape[0],), generator=g)
    y[y == num_classes - 1] = 0  # the last class has no samples: zeros
    got = torch.ops.wmdd.class_moments(x, y, num_classes)
    assert_moments_equal(got, ops.class_moments_reference(x, y, num_classes))
    assert got[0][num_classes - 1].abs().sum() == 0 and got[2][num_classes - 1] == 0


@needs_ext
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_class_moments_every_isa(isa, dtype):
    x = torch.randn(50, 37, 5, 5, dtype=dtype)
    y = torch.randint(0, 4, (50,))
    for inp in (x, x.contiguous(memory_format=torch.channels_last), x[:, :, 0, 0]):
        assert_moments_equal(torch.ops.wmdd.class_moments(inp, y, 4), naive_moments(inp, y, 4))


@needs_ext
def test_class_moments_other_inputs():
    x = torch.randn(10, 6, 4, 4)
    y = torch.randint(0, 3, (10,), dtype=torch.int32)  # int32 labels are converted
    want = naive_moments(x, y.long(), 3)
    assert_moments_equal(ops.class_moments(x, y, 3, impl="ext"), want)
    xt = x.transpose(2, 3)  # neither NCHW- nor channels_last-contiguous: copied
    assert_moments_equal(ops.class_moments(xt, y, 3, impl="ext"), naive_moments(xt, y.long(), 3))
    xh = x.to(torch.bfloat16)  # half / bfloat16 on the CPU: exact upcast
    assert_moments_equal(ops.class_moments(xh, y, 3, impl="ext"), naive_moments(xh, y.long(), 3))
    s, q, n = ops.class_moments(torch.zeros(0, 6, 4, 4), torch.zeros(0, dtype=torch.long), 3, impl="ext")
    assert s.shape == (3, 6) and s.abs().sum() == 0 and n.sum() == 0
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.wmdd.class_moments(x, torch.full((10,), 3), 3)
    with pytest.raises(RuntimeError, match="y must be"):
        torch.ops.wmdd.class_moments(x, torch.zeros(9, dtype=torch.long), 3)


@needs_ext
def test_opcheck_class_moments():
    x = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 2, 0, 2])
    torch.library.opcheck(torch.ops.wmdd.class_moments.default, (x, y, 3))
    torch.library.opcheck(torch.ops.wmdd.class_moments.default, (x.float()[:, :, 0, 0], y, 4))


def test_reference_moments_match_definition():
    x = torch.randn(20, 7, 3, 2)
    y = torch.randint(0, 5, (20,))
    assert_moments_equal(ops.class_moments(x, y, 5, impl="ref"), naive_moments(x, y, 5))


# ---------------------------------------------------------------------------------------------
# Sinkhorn


def make_problems(bsz, k, n, dtype=torch.float64, ragged=True, seed=0):
    """Squared-Euclidean costs between k atoms and N points in 8-d, scaled to mean 1; random positive
    weights; with ragged, problem p keeps only its first N - 3p columns (b zero-padded)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bsz, k, 8, generator=g, dtype=torch.float64)
    y = torch.randn(bsz, n, 8, generator=g, dtype=torch.float64)
    cost = torch.cdist(x, y) ** 2
    cost = cost / cost.mean()
    a = torch.rand(bsz, k, generator=g, dtype=torch.float64) + 0.5
    b = torch.rand(bsz, n, generator=g, dtype=torch.float64) + 0.5
    if ragged:
        for p in range(bsz):
            b[p, max(2, n - 3 * p):] = 0
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    return cost.to(dtype), a.to(dtype), b.to(dtype)


def pot_oracle(cost, a, b, reg, max_iter, tol, f_init=None, g_init=None):
    """POT's numpy sinkhorn_log per problem: potentials in cost units, plan, iterations."""
    bsz, k, n = cost.shape
    f, g = np.zeros((bsz, k)), np.full((bsz, n), -np.inf)
    plans, iters = np.zeros((bsz, k, n)), []
    for p in range(bsz):
        cols = (b[p] > 0).numpy()
        warm = None
        if f_init is not None:
            warm = (f_init[p].double().numpy() / reg, g_init[p].double().numpy()[cols] / reg)
        plan, log = ot.bregman.sinkhorn_log(a[p].double().numpy(), b[p].double().numpy()[cols],
                                            cost[p].double().numpy()[:, cols], reg, numItermax=max_iter,
                                            stopThr=tol, log=True, warn=False, warmstart=warm)
        f[p], g[p, cols] = reg * log["log_u"], reg * log["log_v"]
        plans[p][:, cols] = plan
        iters.append(log["niter"] + 1)
    return torch.from_numpy(f), torch.from_numpy(g), torch.from_numpy(plans), torch.tensor(iters)


def assert_potentials_close(f, g, f_ref, g_ref, rtol, atol):
    torch.testing.assert_close(f.double(), f_ref, rtol=rtol, atol=atol)
    assert torch.equal(torch.isinf(g), torch.isinf(g_ref))  # padded columns: -inf exactly
    fin = torch.isfinite(g_ref)
    torch.testing.assert_close(g.double()[fin], g_ref[fin], rtol=rtol, atol=atol)


@needs_ext
@pytest.mark.parametrize("reg", [0.05, 0.5])
def test_sinkhorn_matches_pot_converged(reg):
    cost, a, b = make_problems(5, 7, 30)
    f, g, info = ops.sinkhorn_log_batched(cost, a, b, reg, max_iter=5000, tol=1e-10, impl="ext", return_info=True)
    f_ref, g_ref, plan_ref, iters = pot_oracle(cost, a, b, reg, 5000, 1e-10)
    assert_potentials_close(f, g, f_ref, g_ref, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(ops.sinkhorn_plan(cost, f, g, reg), plan_ref, rtol=1e-7, atol=1e-12)
    assert torch.equal(info["n_iter"], iters)
    assert (info["err"] < 1e-10).all()


@needs_ext
def test_sinkhorn_same_iterates_as_pot():
    """A fixed number of iterations (tol 0): the update order (g then f) and arithmetic match POT."""
    cost, a, b = make_problems(4, 6, 25, seed=1)
    for max_iter in (1, 2, 37):
        f, g = ops.sinkhorn_log_batched(cost, a, b, 0.1, max_iter=max_iter, tol=0.0, impl="ext")
        f_ref, g_ref, _, _ = pot_oracle(cost, a, b, 0.1, max_iter, 0.0)
        assert_potentials_close(f, g, f_ref, g_ref, rtol=1e-11, atol=1e-12)


@needs_ext
def test_sinkhorn_warm_start_matches_pot():
    cost, a, b = make_problems(3, 5, 20, seed=2)
    f0, g0 = ops.sinkhorn_log_batched(cost, a, b, 0.5, max_iter=200, tol=1e-6, impl="ext")
    f, g, info = ops.sinkhorn_log_batched(cost, a, b, 0.1, max_iter=13, tol=0.0, f_init=f0, g_init=g0, impl="ext",
                                          return_info=True)
    f_ref, g_ref, _, _ = pot_oracle(cost, a, b, 0.1, 13, 0.0, f0, g0)
    assert_potentials_close(f, g, f_ref, g_ref, rtol=1e-11, atol=1e-12)
    assert (info["n_iter"] == 13).all()
    # warm-started from its own solution, a solve stops at the first check
    _, _, info = ops.sinkhorn_log_batched(cost, a, b, 0.1, max_iter=1000, tol=1e-8, impl="ext", return_info=True)
    f1, g1 = ops.sinkhorn_log_batched(cost, a, b, 0.1, max_iter=1000, tol=1e-8, impl="ext")
    _, _, info2 = ops.sinkhorn_log_batched(cost, a, b, 0.1, max_iter=1000, tol=1e-8, f_init=f1, g_init=g1,
                                           impl="ext", return_info=True)
    assert (info2["n_iter"] == 1).all() and (info["n_iter"] > 1).all()


@needs_ext
def test_sinkhorn_check_every():
    """check_every=m tests after iterations 1, 1 + m, ...: the first passing test ends the solve, with
    the same potentials as that many plain iterations; the reference (POT one iteration per call) agrees."""
    cost, a, b = make_problems(4, 6, 25, seed=3)
    _, _, every10 = ops.sinkhorn_log_batched(cost, a, b, 0.1, max_iter=1000, tol=1e-6, impl="ext", return_info=True)
    f, g, every1 = ops.sinkhorn_log_batched(cost, a, b, 0.1, max_iter=1000, tol=1e-6, impl="ext", return_info=True,
                                            check_every=1)
    assert (every1["err"] < 1e-6).all() and (every1["n_iter"] <= every10["n_iter"]).all()
    assert (every1["n_iter"] < every10["n_iter"]).any()
    for p in range(len(cost)):
        n = int(every1["n_iter"][p])
        f_ref, g_ref, _, _ = pot_oracle(cost[p:p + 1], a[p:p + 1], b[p:p + 1], 0.1, n, 0.0)
        assert_potentials_close(f[p:p + 1], g[p:p + 1], f_ref, g_ref, rtol=1e-10, atol=1e-11)
        if n > 1:  # the test after iteration n - 1 did not pass
            _, _, before = ops.sinkhorn_log_batched(cost[p:p + 1], a[p:p + 1], b[p:p + 1], 0.1, max_iter=n - 1,
                                                    tol=0.0, impl="ext", return_info=True)
            assert float(before["err"][0]) >= 1e-6
    f_r, g_r, ref = ops.sinkhorn_log_batched(cost, a, b, 0.1, max_iter=1000, tol=1e-6, impl="ref", return_info=True,
                                             check_every=1)
    assert torch.equal(ref["n_iter"], every1["n_iter"])
    assert_potentials_close(f, g, f_r.double(), g_r.double(), rtol=1e-9, atol=1e-10)
    with pytest.raises(RuntimeError, match="check_every"):
        ops.sinkhorn_log_batched(cost, a, b, 0.1, impl="ext", check_every=0)


@needs_ext
@pytest.mark.parametrize("reg", [0.002, 20.0])
def test_sinkhorn_extreme_reg_matches_pot(reg):
    """Tiny reg: C / reg beyond exp's range and large moves between iterations (the one-pass shifted
    sums fall back to the exact two-pass); large reg: an almost uniform plan."""
    cost, a, b = make_problems(3, 8, 40, seed=8)
    for max_iter in (3, 60):
        f, g = ops.sinkhorn_log_batched(cost, a, b, reg, max_iter=max_iter, tol=0.0, impl="ext")
        f_ref, g_ref, _, _ = pot_oracle(cost, a, b, reg, max_iter, 0.0)
        assert_potentials_close(f, g, f_ref, g_ref, rtol=1e-9, atol=1e-10 * max(reg, 1.0))


@needs_ext
def test_sinkhorn_max_iter_zero_returns_start():
    cost, a, b = make_problems(2, 4, 9)
    f, g = ops.sinkhorn_log_batched(cost, a, b, 0.1, max_iter=0, impl="ext")
    assert (f == 0).all() and ((g == 0) | ((g == -np.inf) & (b == 0))).all()


@needs_ext
def test_sinkhorn_float32_close_to_pot():
    cost, a, b = make_problems(4, 10, 40, dtype=torch.float32, seed=3)
    f, g = ops.sinkhorn_log_batched(cost, a, b, 0.1, max_iter=300, tol=0.0, impl="ext")
    assert f.dtype == torch.float32 and g.dtype == torch.float32
    f_ref, g_ref, _, _ = pot_oracle(cost, a, b, 0.1, 300, 0.0)
    assert_potentials_close(f, g, f_ref, g_ref, rtol=0, atol=2e-4)


@needs_ext
def test_sinkhorn_one_large_problem_threads_share_it():
    """Fewer problems than threads and k * N >= 2^16: rows and columns are split across threads."""
    cost, a, b = make_problems(1, 64, 1100, ragged=False, seed=4)
    f, g = ops.sinkhorn_log_batched(cost, a, b, 0.2, max_iter=40, tol=0.0, impl="ext")
    f_ref, g_ref, _, _ = pot_oracle(cost, a, b, 0.2, 40, 0.0)
    assert_potentials_close(f, g, f_ref, g_ref, rtol=1e-10, atol=1e-11)


@needs_ext
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sinkhorn_every_isa(isa, dtype):
    cost, a, b = make_problems(3, 9, 70, dtype=dtype, seed=5)
    f, g = ops.sinkhorn_log_batched(cost, a, b, 0.1, max_iter=50, tol=0.0, impl="ext")
    f_ref, g_ref, _, _ = pot_oracle(cost, a, b, 0.1, 50, 0.0)
    tol = 1e-11 if dtype == torch.float64 else 1e-4
    assert_potentials_close(f, g, f_ref, g_ref, rtol=tol, atol=tol)


@needs_ext
def test_sinkhorn_rejects_bad_arguments():
    cost, a, b = make_problems(2, 3, 5)
    with pytest.raises(RuntimeError, match="reg must be"):
        torch.ops.wmdd.sinkhorn_log(cost, a, b, 0.0, 10, 1e-9)
    with pytest.raises(RuntimeError, match="a must be"):
        torch.ops.wmdd.sinkhorn_log(cost, a[:, :2], b, 0.1, 10, 1e-9)
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.ops.wmdd.sinkhorn_log(cost, a.float(), b, 0.1, 10, 1e-9)


@needs_ext
def test_opcheck_sinkhorn():
    cost, a, b = make_problems(2, 3, 6)
    f0, g0 = torch.zeros_like(a), torch.zeros_like(b)
    for op in (torch.ops.wmdd.sinkhorn_log.default, torch.ops.wmdd.sinkhorn_log_ex.default):
        torch.library.opcheck(op, (cost, a, b, 0.2, 30, 1e-9, None, None))
        torch.library.opcheck(op, (cost.float(), a.float(), b.float(), 0.2, 30, 1e-6, f0.float(), g0.float()))


def test_reference_sinkhorn_is_pot():
    cost, a, b = make_problems(3, 5, 16, seed=6)
    f, g, info = ops.sinkhorn_log_batched(cost, a, b, 0.1, max_iter=2000, tol=1e-10, impl="ref", return_info=True)
    f_ref, g_ref, _, iters = pot_oracle(cost, a, b, 0.1, 2000, 1e-10)
    assert_potentials_close(f, g, f_ref, g_ref, rtol=1e-9, atol=1e-10)
    assert torch.equal(info["n_iter"], iters) and (info["err"] < 1e-10).all()
    # warm start with f only (the first update reads only f)
    f2, g2 = ops.sinkhorn_log_batched(cost, a, b, 0.1, max_iter=5, tol=0.0, f_init=f, impl="ref")
    f3, g3, _, _ = pot_oracle(cost, a, b, 0.1, 5, 0.0, f, torch.zeros_like(g))
    assert_potentials_close(f2, g2, f3, g3, rtol=1e-11, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# routing


def test_impl_routing(monkeypatch):
    monkeypatch.setenv("WMDD_IMPL", "ref")
    assert ops.resolve_impl() == "ref"
    assert ops.resolve_impl("auto") == ("ext" if HAVE_EXT else "ref")
    monkeypatch.setenv("WMDD_IMPL", "bogus")
    with pytest.raises(UserError, match="unknown kernel implementation"):
        ops.resolve_impl()
    monkeypatch.delenv("WMDD_IMPL")
    assert ops.describe().startswith("kernels: ")
    assert ops.describe("ref").startswith("kernels: reference")
    if HAVE_EXT:
        assert "compiled extension" in ops.describe("ext")
    else:
        with pytest.raises(UserError, match="not usable"):
            ops.resolve_impl("ext")


@needs_ext
def test_cuda_tensors_with_cpu_only_build(monkeypatch):
    from wmdd import _C
    monkeypatch.setattr(_C, "with_cuda", lambda: False)
    cuda = torch.device("cuda")
    assert ops._impl_for("auto", cuda) == "ref"
    with pytest.raises(UserError, match="only CPU kernels"):
        ops._impl_for("ext", cuda)
    assert ops._impl_for("ext", torch.device("cpu")) == "ext"


@needs_ext
def test_extension_built_for_another_torch_is_refused(monkeypatch):
    monkeypatch.setattr(ops, "_ext", None)
    monkeypatch.setattr(ops, "_ext_error", None)
    monkeypatch.setattr(ops, "_ext_tried", False)
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert ops.resolve_impl("auto") == "ref"
    assert "built for torch" in ops._ext_error and "--no-build-isolation" in ops._ext_error
    with pytest.raises(UserError, match="built for torch"):
        ops.resolve_impl("ext")


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,num_classes,fmt", MOMENT_CASES)
def test_cuda_class_moments(shape, num_classes, fmt, dtype):
    x = torch.randn(shape, dtype=dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    y = torch.randint(0, num_classes, (shape[0],))
    got = ops.class_moments(x.cuda(), y.cuda(), num_classes, impl="ext")
    assert all(t.is_cuda for t in got)
    assert_moments_equal(got, ops.class_moments_reference(x, y, num_classes))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_sinkhorn(dtype):
    cost, a, b = make_problems(6, 9, 300, dtype=dtype, seed=7)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    f_ref, g_ref, _, _ = pot_oracle(cost, a, b, 0.1, 60, 0.0)
    f, g = ops.sinkhorn_log_batched(cost.cuda(), a.cuda(), b.cuda(), 0.1, max_iter=60, tol=0.0, impl="ext")
    assert f.is_cuda
    assert_potentials_close(f.cpu(), g.cpu(), f_ref, g_ref, rtol=tol, atol=tol)
    f_ref, g_ref, _, iters = pot_oracle(cost, a, b, 0.1, 5000, 1e-7)
    f, g, info = ops.sinkhorn_log_batched(cost.cuda(), a.cuda(), b.cuda(), 0.1, max_iter=5000, tol=1e-7,
                                          impl="ext", return_info=True)
    assert_potentials_close(f.cpu(), g.cpu(), f_ref, g_ref, rtol=10 * tol, atol=10 * tol)
    if dtype == torch.float64:
        assert torch.equal(info["n_iter"], iters)
        f0, g0 = f, g  # warm start from its own solution: stops at the first check
        _, _, info = ops.sinkhorn_log_batched(cost.cuda(), a.cuda(), b.cuda(), 0.1, max_iter=5000, tol=1e-7,
                                              f_init=f0, g_init=g0, impl="ext", return_info=True)
        assert (info["n_iter"] == 1).all()
    torch.library.opcheck(torch.ops.wmdd.sinkhorn_log_ex.default,
                          (cost.cuda(), a.cuda(), b.cuda(), 0.1, 30, 1e-9, None, None))
