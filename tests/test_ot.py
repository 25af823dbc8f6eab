"""wmdd.ot and wmdd.sinkhorn: free-support barycenters against POT's exact solver and scikit-learn's k-means.

Small random point clouds (non-negative Gaussian mixtures, like post-ReLU features) keep every test
to a fraction of a second to a few seconds on the reference (POT) Sinkhorn.
"""
from __future__ import annotations

import numpy as np
import ot as pot
import pytest
import torch

from wmdd import ops, sinkhorn
from wmdd import ot as wot


def blobs(n: int, d: int = 8, modes: int = 4, seed: int = 0, spread: float = 0.5) -> torch.Tensor:
    """A class-like cloud: `modes` Gaussian blobs of unequal size, shifted positive, ReLU'd."""
    rng = np.random.default_rng(seed)
    centres = rng.gamma(2.0, 1.0, size=(modes, d))
    z = rng.choice(modes, size=n, p=rng.dirichlet(np.full(modes, 3.0)))
    x = centres[z] + spread * rng.normal(size=(n, d))
    return torch.tensor(np.maximum(x, 0.0), dtype=torch.float32)


CLOUDS = [blobs(90, seed=1), blobs(60, seed=2, modes=3), blobs(120, d=8, seed=3, modes=6)]


# ---------------------------------------------------------------------------------------------
# objective and initialisation


def test_w2_squared_is_emd2_and_kmeans_objective_for_voronoi_weights():
    y = CLOUDS[0]
    x = y[:5].clone() + 0.1
    w = torch.full((5,), 0.2)
    direct = pot.emd2(np.full(5, 0.2), np.full(len(y), 1 / len(y)), pot.dist(x.double().numpy(), y.double().numpy()))
    assert wot.w2_squared(x, w, y) == pytest.approx(direct, rel=1e-9)
    # with the Voronoi masses as weights, the optimal plan is the nearest-atom assignment
    assign = torch.cdist(x.double(), y.double()).argmin(0)
    voronoi = torch.bincount(assign, minlength=5).double() / len(y)
    assert wot.w2_squared(x, voronoi, y) == pytest.approx(wot.kmeans_objective(x, y), rel=1e-9)


def test_kmeanspp_init_picks_distinct_data_points_deterministically():
    ys = CLOUDS
    y, b, counts = wot.pad_classes(ys)
    seeds = [wot.class_seed(0, c) for c in range(len(ys))]
    x = wot.kmeanspp_init(y, counts, 7, seeds)
    assert x.shape == (3, 7, 8)
    for c, yc in enumerate(ys):
        d = torch.cdist(x[c].double(), yc.double())
        assert torch.all(d.min(1).values < 1e-5), "every atom is one of the class's points"
        assert len({tuple(r.tolist()) for r in x[c]}) == 7, "distinct points"
    again = wot.kmeanspp_init(y, counts, 7, seeds)
    assert torch.equal(x, again)
    # one class alone (no padding) picks the same points as inside the batch
    y1, _, c1 = wot.pad_classes([ys[1]])
    assert torch.equal(wot.kmeanspp_init(y1, c1, 7, seeds[1:2])[0], x[1])
    assert not torch.equal(wot.kmeanspp_init(y, counts, 7, [s + 1 for s in seeds]), x)


# ---------------------------------------------------------------------------------------------
# exact solver = POT


def test_exact_is_pot_free_support_barycenter():
    y = CLOUDS[0]
    k = 6
    res = wot.free_support_barycenter(y, k, solver="exact", seed=3)
    yy, _, cnt = wot.pad_classes([y])
    x0 = wot.kmeanspp_init(yy, cnt, k, [wot.class_seed(3, 0)])[0].double().numpy()
    y64 = y.double().numpy()
    direct = pot.lp.free_support_barycenter([y64], [np.full(len(y), 1 / len(y))], x0)
    assert np.allclose(res.points.double().numpy(), direct, atol=1e-4)
    assert torch.allclose(res.weights, torch.full((k,), 1 / k))
    assert float(res.w2) == pytest.approx(wot.w2_squared(direct, np.full(k, 1 / k), y64), rel=1e-5)


def test_released_learned_loop_gives_simplex_weights():
    """The released loop (EMD mirror descent restarted from uniform, theta = 0.2 damping) is a weak
    optimiser: it only has to be valid here; the Sinkhorn learned-weights path must beat it."""
    y = CLOUDS[2]
    res = wot.free_support_barycenter(y, 5, solver="exact", weights="learned", seed=0)
    assert torch.all(res.weights >= 0) and float(res.weights.sum()) == pytest.approx(1.0, abs=1e-5)
    assert torch.isfinite(res.points).all()
    assert not torch.allclose(res.weights, torch.full((5,), 0.2)), "weights moved"
    assert float(res.w2) == pytest.approx(wot.w2_squared(res.points, res.weights, y), rel=1e-5)
    ours = wot.free_support_barycenter(y, 5, solver="sinkhorn", weights="learned", seed=0)
    assert float(ours.w2) <= float(res.w2)


# ---------------------------------------------------------------------------------------------
# entropic solver


def assert_close_to_exact(res, exact):
    """Within 1% of POT exact over the clouds (sum of W2^2), and no cloud more than 3% above.
    Both are local optimisers from the same k-means++ init; per cloud, either may land in the better
    local optimum, so a single cloud may differ by a little either way."""
    assert float(res.w2.sum()) <= 1.01 * float(exact.w2.sum()), (res.w2, exact.w2)
    assert torch.all(res.w2 <= 1.03 * exact.w2), (res.w2, exact.w2)


def test_location_and_weight_updates_of_one_plan():
    """The updates of the alternation, on POT's EMD plan: location_update is B = diag(1/w) T Y (an atom
    without mass keeps its place; a plan in point counts gives the same cell means), weight_update's
    closed form is T 1, and its mirror step with constant potentials leaves the weights as they are."""
    y = CLOUDS[0].double()
    x = y[:4] + 0.1
    plan = torch.from_numpy(pot.emd(np.full(4, 0.25), np.full(len(y), 1 / len(y)), pot.dist(x.numpy(), y.numpy())))
    moved = sinkhorn.location_update(plan[None], y[None], x[None])[0]
    assert torch.allclose(moved, torch.from_numpy(pot.lp.free_support_barycenter([y.numpy()], [np.full(len(y), 1 / len(y))],
                                                                                x.numpy(), numItermax=1)))
    plan[2] = 0
    moved = sinkhorn.location_update(plan[None], y[None], x[None])[0]
    assert torch.equal(moved[2], x[2])
    assert torch.allclose(sinkhorn.location_update(plan[None] * len(y), y[None], x[None])[0], moved)
    w = sinkhorn.weight_update(torch.full((1, 4), 0.25, dtype=torch.float64), 1e-12, plan=plan[None])[0]
    assert torch.allclose(w, plan.sum(1) / plan.sum()) and 0 < float(w[2]) <= 1e-11
    same = sinkhorn.weight_update(w[None], 1e-12, f=torch.full((1, 4), 3.0, dtype=torch.float64), step=0.5)[0]
    assert torch.allclose(same, w)


@pytest.mark.parametrize("k", [3, 6])
def test_sinkhorn_uniform_within_1pct_of_exact(k):
    res = wot.free_support_barycenter_batched(CLOUDS, k, solver="sinkhorn", seed=0)
    exact = wot.free_support_barycenter_batched(CLOUDS, k, solver="exact", seed=0)
    assert_close_to_exact(res, exact)
    assert torch.allclose(res.weights, torch.full_like(res.weights, 1 / k))


@pytest.mark.parametrize("finish", ["emd", "laguerre"])
def test_sinkhorn_uniform_finishing_steps(finish):
    res = wot.free_support_barycenter_batched(CLOUDS, 4, solver="sinkhorn", finish=finish, seed=1)
    exact = wot.free_support_barycenter_batched(CLOUDS, 4, solver="exact", seed=1)
    assert_close_to_exact(res, exact)


@pytest.mark.parametrize("anneal", [False, True])
@pytest.mark.parametrize("k", [3, 5])
def test_learned_weights_reach_kmeans_objective(k, anneal):
    """Free weights + one input measure = k-means. From the same k-means++ start, scikit-learn's KMeans
    (Lloyd to convergence) reaches a local optimum; the learned-weights barycenter reaches it within 1%
    (annealing usually finds a lower one). Its W2^2 is the k-means objective of its atoms, and its
    weights are the atoms' Voronoi masses. Default (anneal=False): Lloyd straight from the init;
    anneal=True: the entropic alternation first, then Lloyd."""
    from sklearn.cluster import KMeans

    res = wot.free_support_barycenter_batched(CLOUDS, k, solver="sinkhorn", weights="learned", seed=0,
                                              anneal=anneal)
    assert res.info["anneal"] == anneal
    y, _, counts = wot.pad_classes(CLOUDS)
    init = wot.kmeanspp_init(y, counts, k, [wot.class_seed(0, c) for c in range(len(CLOUDS))])
    for c, cloud in enumerate(CLOUDS):
        km = KMeans(k, init=init[c].double().numpy(), n_init=1).fit(cloud.double().numpy())
        target = km.inertia_ / len(cloud)
        assert float(res.w2[c]) <= target * 1.01, (c, float(res.w2[c]), target)
        assert float(res.w2[c]) == pytest.approx(wot.kmeans_objective(res.points[c], cloud), rel=1e-4)
        assign = torch.cdist(res.points[c].double(), cloud.double()).argmin(0)
        voronoi = torch.bincount(assign, minlength=k).double() / len(cloud)
        assert torch.allclose(res.weights[c].double(), voronoi, atol=1e-6)


def test_learned_weights_entropic_alternation_alone():
    """Without the exact Lloyd finish: the entropic (soft k-means) solution, blurred by epsilon = 1e-2
    of the cost scale, is within 10% of the same alternation finished by Lloyd (anneal=True); weights
    moved away from uniform."""
    k = 4
    soft = wot.free_support_barycenter_batched(CLOUDS, k, solver="sinkhorn", weights="learned", finish="none")
    hard = wot.free_support_barycenter_batched(CLOUDS, k, solver="sinkhorn", weights="learned", anneal=True)
    assert torch.all(soft.w2 <= hard.w2 * 1.10) and torch.all(hard.w2 <= soft.w2 * (1 + 1e-9))
    assert not torch.allclose(soft.weights, torch.full_like(soft.weights, 1 / k)), "weights moved"


def test_learned_weights_mirror_descent_with_sinkhorn_potentials():
    """md_steps > 0: Algorithm 2's mirror-descent step (Sinkhorn dual potential as the subgradient,
    multiplicative update) instead of the exact weight step: valid, and after the Lloyd finish it is
    a k-means local optimum too (checked loosely: it is slow to converge, see wmdd/ot.py)."""
    res = wot.free_support_barycenter_batched(CLOUDS[:2], 4, solver="sinkhorn", weights="learned", md_steps=1,
                                              iters=25, seed=0)
    assert torch.all(res.weights >= 0) and torch.allclose(res.weights.sum(-1), torch.ones(2), atol=1e-6)
    for c, cloud in enumerate(CLOUDS[:2]):
        assert float(res.w2[c]) == pytest.approx(wot.kmeans_objective(res.points[c], cloud), rel=1e-4)
    exact = wot.free_support_barycenter_batched(CLOUDS[:2], 4, solver="exact", seed=0)
    assert torch.all(res.w2 <= exact.w2 * 1.01)  # free weights beat uniform ones


@pytest.mark.parametrize("solver,weights", [("exact", "uniform"), ("sinkhorn", "uniform"), ("sinkhorn", "learned")])
def test_k1_is_the_class_mean(solver, weights):
    """(Not the released learned loop: its theta = 0.2 damping over 10 steps stops short of the mean.)"""
    y = CLOUDS[1]
    res = wot.free_support_barycenter(y, 1, solver=solver, weights=weights)
    assert torch.allclose(res.points[0].double(), y.double().mean(0), atol=1e-4)
    assert float(res.weights[0]) == pytest.approx(1.0)
    var = float(((y.double() - y.double().mean(0)) ** 2).sum(1).mean())
    assert float(res.w2) == pytest.approx(var, rel=1e-5)


@pytest.mark.parametrize("solver,weights", [("exact", "uniform"), ("sinkhorn", "uniform"),
                                            ("sinkhorn", "learned")])
def test_weights_on_simplex(solver, weights):
    res = wot.free_support_barycenter_batched(CLOUDS, 5, solver=solver, weights=weights)
    assert res.points.shape == (3, 5, 8) and res.weights.shape == (3, 5) and res.w2.shape == (3,)
    assert res.points.dtype == torch.float32 and res.weights.dtype == torch.float32
    assert torch.all(res.weights >= 0)
    assert torch.allclose(res.weights.sum(-1), torch.ones(3), atol=1e-6)


@pytest.mark.parametrize("weights,md_steps", [("uniform", 0), ("learned", 0), ("learned", 1)])
@pytest.mark.parametrize("reg", [1e-3, 1e-4])
def test_no_nan_at_small_epsilon(weights, md_steps, reg):
    res = wot.free_support_barycenter_batched(CLOUDS[:2], 4, solver="sinkhorn", weights=weights, reg=reg,
                                              md_steps=md_steps, finish="none", iters=12, inner_iters=300)
    assert torch.isfinite(res.points).all() and torch.isfinite(res.weights).all() and torch.isfinite(res.w2).all()
    assert torch.all(res.weights >= 0)


def test_duplicate_points_and_k_equal_n():
    """Degenerate clouds: repeated points (k-means++ runs out of distinct points), k = n."""
    y = torch.cat([torch.ones(6, 3), torch.zeros(6, 3)])
    for solver in ("exact", "sinkhorn"):
        res = wot.free_support_barycenter(y, 4, solver=solver, finish="none")
        assert torch.isfinite(res.points).all() and torch.isfinite(res.w2)
        assert float(res.w2) < 0.75  # below the spread of the two groups (0.75); 0 when split 2 + 2
    z = CLOUDS[1][:7]
    res = wot.free_support_barycenter(z, 7, solver="sinkhorn")
    assert float(res.w2) < 1e-3 * float(((z - z.mean(0)) ** 2).sum(1).mean())


@pytest.mark.parametrize("solver,weights", [("sinkhorn", "uniform"), ("sinkhorn", "learned"), ("exact", "uniform")])
def test_batched_equals_per_class(solver, weights):
    """Ragged classes solved together give each class the result it gets alone."""
    batched = wot.free_support_barycenter_batched(CLOUDS, 4, solver=solver, weights=weights, seed=5)
    for c, y in enumerate(CLOUDS):
        alone = wot.free_support_barycenter(y, 4, solver=solver, weights=weights, seed=5, class_index=c)
        assert torch.allclose(alone.points, batched.points[c], atol=1e-3, rtol=1e-4), c
        assert torch.allclose(alone.weights, batched.weights[c], atol=1e-5), c
        assert float(alone.w2) == pytest.approx(float(batched.w2[c]), rel=1e-4)


def test_float64_agrees_with_float32():
    a = wot.free_support_barycenter_batched(CLOUDS, 4, solver="sinkhorn", seed=2)
    b = wot.free_support_barycenter_batched(CLOUDS, 4, solver="sinkhorn", seed=2, dtype=torch.float64)
    assert torch.allclose(a.w2, b.w2, rtol=2e-3)


def test_translation_and_scale_equivariance():
    """Epsilon is relative to the cost scale: shifting and scaling a cloud shifts and scales the atoms."""
    y = CLOUDS[0]
    a = wot.free_support_barycenter(y, 4, solver="sinkhorn", finish="none")
    b = wot.free_support_barycenter(y * 30.0 + 7.0, 4, solver="sinkhorn", finish="none")
    assert torch.allclose(b.points, a.points * 30.0 + 7.0, rtol=1e-3, atol=1e-2)
    assert float(b.w2) == pytest.approx(float(a.w2) * 900.0, rel=1e-3)


@pytest.mark.skipif(not ops.ext_available(), reason="compiled kernels not built")
def test_ext_and_reference_kernels_agree():
    a = wot.free_support_barycenter_batched(CLOUDS, 4, solver="sinkhorn", impl="ref", seed=1)
    b = wot.free_support_barycenter_batched(CLOUDS, 4, solver="sinkhorn", impl="ext", seed=1)
    assert torch.allclose(a.w2, b.w2, rtol=1e-3)
    assert a.info["impl"] == "ref" and b.info["impl"] == "ext"


def test_bad_inputs():
    with pytest.raises(ValueError, match="fewer than k"):
        wot.free_support_barycenter(CLOUDS[1], 61)
    with pytest.raises(ValueError, match="positive"):
        wot.free_support_barycenter(CLOUDS[1], 0)
    with pytest.raises(ValueError, match="solver"):
        wot.free_support_barycenter(CLOUDS[1], 2, solver="lp")
    with pytest.raises(ValueError, match="weights"):
        wot.free_support_barycenter(CLOUDS[1], 2, weights="free")
