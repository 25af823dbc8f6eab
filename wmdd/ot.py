"""Free-support Wasserstein barycenters of class feature clouds (DESIGN §1 step 2).

For one class with features Y [n, d] (uniform empirical measure, mass 1/n each) the barycenter with k
atoms is (points X [k, d], weights w [k]) minimising

    W2^2(X, w; Y) = min_{T >= 0, T 1 = w, T^T 1 = 1/n}  sum_ij T_ij ||x_i - y_j||^2.

With a single input measure this is "balanced k-means" when w is fixed to uniform (every atom carries
exactly 1/k of the mass), and plain k-means when w is free: for fixed points the optimal w puts on
each atom the mass of its Voronoi cell, and for a fixed plan the optimal points are the barycentric
projection B = diag(1/w) T Y. `weights="learned"` therefore converges to a k-means local optimum
(its objective equals the k-means inertia / n); the tests check this against scikit-learn's KMeans
started from the same points.

Solvers (`solver=`):

- ``"exact"``: POT's ``ot.lp.free_support_barycenter`` (network-simplex EMD plans, POT defaults:
  100 iterations, stopThr 1e-7), as the released WMDD code did, with uniform weights. With
  ``weights="learned"`` it runs the released learned-weights loop (`released_learned_barycenter`:
  10 outer steps; 100 mirror-descent steps on the max-normalised cost with EMD dual potentials,
  step 10, weights restarted from uniform each outer step; then a full exact location solve, damped
  by theta = 0.2). One class at a time on the CPU; it is the oracle in the tests.
- ``"sinkhorn"``, learned weights (default path, `anneal=None`, `md_steps=0`, `finish="lloyd"`): the
  *exact* alternation, straight from the k-means++ init: Lloyd steps (`_lloyd_finish`): exact weight
  step (each atom gets its Voronoi cell's mass: the optimal plan for fixed atoms and free weights),
  exact location step (cell means = the barycentric projection), until the assignment is stable.
  Why no entropic phase first: it costs 1.5-2.5x the time for a W2^2 only 0.6-3% lower (bench/RESULTS.md,
  "Barycenter"); both are several % below the released learned loop's. `anneal=True` runs the entropic
  alternation below first (the Lloyd finish then needs only a few steps). Lloyd runs a few classes at a
  time (~4 MB of features, kept in cache across steps), one k x N x d product per step (argmin of
  ||x||^2 - 2 x.y: ||y||^2 does not change the nearest atom) and the cells' sums updated with the
  points that changed cell only.
- ``"sinkhorn"`` (uniform weights, learned weights with `anneal=True` or `md_steps > 0`): Cuturi &
  Doucet (2014) alternation with entropic plans, all classes batched.
  Per outer iteration t, for every class still running:
  (a) the plan. Log-domain Sinkhorn through ``ops.sinkhorn_log_batched`` (the compiled kernel when
      built), on the *normalised* cost: coordinates are divided per class by sqrt(s), s = mean squared
      distance between two points of the class (= 2 x total variance), so epsilon is relative to the
      cost scale. epsilon_t = max(reg, eps0 * eps_decay^t) (epsilon scaling: 0.04 -> 0.02 -> 0.01 by
      default), the atoms' dual potential warm-starts the next solve (with the compiled kernel its
      stopping test runs after every iteration, not every 10th as POT's), and the plan used has the data
      marginal exact (g = c-transform of f), so every point carries its mass even before Sinkhorn
      has converged.
  (b) the location update B = diag(1/w) T Y (an atom with numerically no mass keeps its location),
      over-relaxed at the target epsilon: X <- X + theta (B - X), theta = 1.5, back to 1 for good for a
      class whose transport cost rose.
  (c) learned weights only. For fixed atoms the entropic transport cost is minimised over w in closed
      form: P_ij = b_j softmax_i(-C_ij / eps), w = P 1 (no Sinkhorn needed: the column constraint is
      the only one). This is the fixed point that Algorithm 2's mirror descent on w converges to, taken
      in one step (`md_steps=0`, the default). `md_steps=m > 0` runs Algorithm 2's own step instead:
      m multiplicative (KL-prox) steps w <- w exp(-md_step f) / Z with the Sinkhorn dual potential f as
      the subgradient. Measured (bench/RESULTS.md, tests): the mirror-descent path reaches the same
      quality but needs many more outer iterations and Sinkhorn solves; its stable step is ~1/(cost
      gaps), not 1/epsilon (steps ~1/epsilon overshoot and collapse the weights onto few atoms).
  Stop, per class, from the second iteration at the target epsilon on: Sinkhorn met its tolerance and
  the weighted atom displacement or the relative change of the transport cost is below ``tol``
  (default 1e-3 for uniform weights, 3e-4 for learned ones; ~7 outer iterations for uniform weights
  at k = 10-50, N = 500-1300, of which 3 are the epsilon scaling).
  Finish (`finish=`): the entropic plan is blurred by epsilon. Learned weights end with exact Lloyd
  steps ("lloyd", the default for them: Voronoi masses as weights, cell means as points, the
  epsilon -> 0 limit of the same alternation; see above) until the assignment is stable. Uniform weights end as
  they are ("none", default); "emd" adds one exact EMD location update (lowers W2^2 a little, costs
  one network simplex per class), "laguerre" one update with the hard cells of the final potentials.
  Quality and speed against POT are in bench/RESULTS.md ("Barycenter").

Initialisation: greedy k-means++ on the class's own points (2 + log k candidates per atom, as
scikit-learn does; seeded per class, so a class gets the same atoms whether it is solved alone, in a
batch, or on another rank), never Gaussian noise. (The
released code started from ``np.random.randn``: an init far from the data.)

Objective: `w2_squared` is the exact W2^2 between (X, w) and the uniform empirical measure of the
class (POT EMD, float64), reported per class for every solver.

All heavy tensors are [C, ...] with ragged classes padded to N = max n_c (padded features have mass 0).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from wmdd import ops

SOLVERS = ("exact", "sinkhorn")
WEIGHTS = ("uniform", "learned")
FINISHES = ("auto", "laguerre", "lloyd", "emd", "none")

# Defaults, each with its reason.
DEFAULT_REG = 1e-2          # target epsilon relative to the cost scale (see the module docstring)
DEFAULT_EPS0 = 0.04         # first epsilon: smooths the k-means++ init's poor cells, does not merge atoms
DEFAULT_EPS_DECAY = 0.5     # epsilon_t = max(reg, eps0 * decay^t): 3 outer steps down to 1e-2
DEFAULT_RELAX = 1.5         # over-relaxed location step at the target epsilon (~30% fewer outer steps)
DEFAULT_MD_STEP = 0.3       # learned weights: first mirror-descent step, in log-weight units (then / sqrt(t))
DEFAULT_SINKHORN_ITERS = 100  # outer iterations for the entropic solver (stops earlier on convergence)
DEFAULT_EXACT_ITERS = 100   # POT's default numItermax for ot.lp.free_support_barycenter
DEFAULT_INNER_ITERS = 1000  # Sinkhorn iterations per outer step at most (warm-started: usually < 100)
DEFAULT_TOL = 1e-3          # outer stop: weighted atom displacement / relative transport-cost change
                            # (uniform weights: 3e-4 took ~2x the outer steps for a W2^2 only 0.4-1% lower)
DEFAULT_TOL_LEARNED = 3e-4  # learned weights keep the tighter stop (1e-3 cost them 0.2-0.4% of W2^2)
DEFAULT_SINKHORN_TOL = 1e-3  # inner stop: L2 violation of the data marginal (a few % of ||b|| = 1/sqrt(n))
SINKHORN_CHECK_EVERY = 1    # compiled kernel: inner stop tested after every iteration (free there); the
                            # reference path keeps POT's every 10th (POT one iteration per call is slower)


@dataclass
class Barycenter:
    """One class (points [k, d], weights [k], w2 scalar tensor) or a batch ([C, k, d], [C, k], [C])."""

    points: torch.Tensor
    weights: torch.Tensor
    w2: torch.Tensor
    iters: torch.Tensor
    info: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# small helpers


def class_seed(seed: int, class_index: int) -> int:
    """Seed of one class's random choices: independent of batching and sharding."""
    return (int(seed) * 1_000_003 + int(class_index)) % (2**63 - 1)


def restart_seed(seed: int, class_index: int, restart: int) -> int:
    """Seed of one start of one class (barycenter.py --restarts): start 0 is class_seed (one start is the
    plain run), start r > 0 a seed hashed from (seed, class, r); independent of batching and sharding."""
    if restart == 0:
        return class_seed(seed, class_index)
    digest = hashlib.sha256(f"barycenter restart {seed}/{class_index}/{restart}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63 - 1)


def lower_w2(a: Barycenter, b: Barycenter) -> Barycenter:
    """Per class, the result of lower W2^2 of two batched results (a on ties)."""
    take = b.w2 < a.w2

    def pick(x, y):
        return torch.where(take.view(-1, *([1] * (x.ndim - 1))), y, x)

    return Barycenter(points=pick(a.points, b.points), weights=pick(a.weights, b.weights),
                      w2=pick(a.w2, b.w2), iters=pick(a.iters, b.iters), info=a.info)


def pad_classes(features: Sequence[torch.Tensor], dtype=torch.float32):
    """list of [n_c, d] -> Y [C, N, d] (zero padded), b [C, N] (1/n_c, 0 on padding), counts [C]."""
    counts = torch.tensor([len(f) for f in features], dtype=torch.long)
    n_max, d = int(counts.max()), features[0].shape[1]
    y = torch.zeros(len(features), n_max, d, dtype=dtype)
    b = torch.zeros(len(features), n_max, dtype=dtype)
    for c, f in enumerate(features):
        y[c, : len(f)] = torch.as_tensor(f, dtype=dtype)
        b[c, : len(f)] = 1.0 / len(f)
    return y, b, counts


def _centre_and_scale(features: Sequence[torch.Tensor], means: torch.Tensor, dtype):
    """The sinkhorn solver's input: Y [C, N, d], each class centred and divided by sqrt(s_c), s_c = mean
    squared distance between two of its points = 2 x its total variance (1 when that is 0), zero padded;
    b [C, N], counts [C] as `pad_classes`; root [C, 1, 1] = sqrt(s_c). Written in place into the padded
    batch (no per-class float64 copies: at the ImageNet shape those cost ~15% of a solve)."""
    counts = torch.tensor([len(f) for f in features], dtype=torch.long)
    n_max, d = int(counts.max()), features[0].shape[1]
    y = torch.zeros(len(features), n_max, d, dtype=dtype)
    b = torch.zeros(len(features), n_max, dtype=dtype)
    root = torch.ones(len(features), dtype=torch.float64)
    for c, f in enumerate(features):
        out = y[c, : len(f)]
        torch.sub(f, means[c].to(f.dtype), out=out)
        var = float(torch.linalg.vector_norm(out, dtype=torch.float64)) ** 2 / len(f)
        if var > 0:
            root[c] = math.sqrt(2.0 * var)
            out.mul_(1.0 / root[c])
        b[c, : len(f)] = 1.0 / len(f)
    return y, b, counts, root.to(dtype).view(-1, 1, 1)


def sqdist(x: torch.Tensor, y: torch.Tensor, yy: torch.Tensor | None = None) -> torch.Tensor:
    """||x_i - y_j||^2 for x [..., k, d], y [..., n, d] -> [..., k, n] (clamped at 0).
    yy: the precomputed ||y_j||^2 [..., n] (y is fixed across iterations, x moves)."""
    xx = (x * x).sum(-1, keepdim=True)
    if yy is None:
        yy = (y * y).sum(-1)
    return torch.baddbmm((xx + yy.unsqueeze(-2)).reshape(-1, x.shape[-2], y.shape[-2]),
                         x.reshape(-1, x.shape[-2], x.shape[-1]), y.reshape(-1, y.shape[-2], y.shape[-1]).transpose(1, 2),
                         alpha=-2.0).reshape(*x.shape[:-1], y.shape[-2]).clamp_min_(0.0)


def w2_squared(points, weights, features) -> float:
    """Exact W2^2 between sum_i w_i delta_{x_i} and the uniform measure on the rows of `features`
    (POT network simplex, float64)."""
    import ot

    x = np.asarray(torch.as_tensor(points).detach().cpu(), dtype=np.float64)
    y = np.asarray(torch.as_tensor(features).detach().cpu(), dtype=np.float64)
    w = np.asarray(torch.as_tensor(weights).detach().cpu(), dtype=np.float64).clip(min=0)
    w = w / w.sum()
    mu = y.mean(0)
    cost = ot.dist(x - mu, y - mu)  # centred: less cancellation in ||x||^2 + ||y||^2 - 2xy
    return float(ot.emd2(w, np.full(len(y), 1.0 / len(y)), cost, numItermax=10_000_000))


def kmeans_objective(points, features) -> float:
    """Mean squared distance of each feature to its nearest point (= k-means inertia / n)."""
    y = torch.as_tensor(features, dtype=torch.float64)
    x = torch.as_tensor(points, dtype=torch.float64)
    mu = y.mean(0)
    return float(sqdist(x - mu, y - mu).min(0).values.mean())


def randn_init(k: int, d: int, seed: int) -> np.ndarray:
    """The released start (recover/barycenter.py): np.random.randn(k, d), here from a RandomState seeded
    with `seed` (the same stream as np.random.seed(seed); np.random.randn(k, d))."""
    return np.random.RandomState(seed % 2**32).randn(k, d)


def kmeanspp_init(y: torch.Tensor, counts: torch.Tensor, k: int, seeds: Sequence[int],
                  trials: int | None = None) -> torch.Tensor:
    """Greedy k-means++ seeding on each class's own points: atoms [C, k, d] (copies of data points).

    Each new atom is the best (lowest resulting sum of squared distances to the nearest atom) of
    `trials` candidates drawn with probability ~ D^2 (default 2 + log k, as scikit-learn does).
    One generator per class (seeds[c]) draws all uniforms; the sampling itself is batched (inverse CDF
    of D^2 over the class's valid points), so batched and per-class calls choose the same points."""
    num_classes, n_max, _ = y.shape
    trials = trials or 2 + int(math.log(k))
    u = torch.stack([torch.rand(k, trials, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
                     for s in seeds])                                             # [C, k, T]
    valid = torch.arange(n_max).unsqueeze(0) < counts.unsqueeze(1)               # [C, N]
    ar = torch.arange(num_classes)
    yy = (y * y).sum(-1)
    idx = torch.empty(num_classes, k, dtype=torch.long)
    idx[:, 0] = (u[:, 0, 0] * counts).long().clamp_max(counts - 1)
    d2 = sqdist(y[ar, idx[:, 0]].unsqueeze(1), y, yy).squeeze(1).double() * valid    # [C, N]
    for j in range(1, k):
        cdf = d2.cumsum(-1)
        total = cdf[:, -1:]
        cand = torch.searchsorted(cdf, u[:, j] * total, right=True)             # [C, T]
        uniform = (u[:, j] * counts.unsqueeze(1)).long()
        cand = torch.where(total > 0, cand, uniform)  # all points already chosen: any point
        cand = torch.minimum(cand, (counts - 1).unsqueeze(1))
        dc = sqdist(y[ar.unsqueeze(1), cand], y, yy).double() * valid.unsqueeze(1)   # [C, T, N]
        new = torch.minimum(d2.unsqueeze(1), dc)
        best = new.sum(-1).argmin(-1)                                            # [C]
        idx[:, j] = cand[ar, best]
        d2 = new[ar, best]
    return y[ar.unsqueeze(1), idx].clone()


def _check_inputs(features, k: int, solver: str, weights: str):
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; use one of {SOLVERS}")
    if weights not in WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}; use one of {WEIGHTS}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    for c, f in enumerate(features):
        if f.ndim != 2:
            raise ValueError(f"class {c}: features must be [n, d], got shape {tuple(f.shape)}")
        if len(f) < k:
            raise ValueError(f"class {c} has {len(f)} points, fewer than k = {k}")


# ---------------------------------------------------------------------------------------------
# exact (POT) solvers: one class at a time


def exact_uniform_barycenter(y: np.ndarray, x_init: np.ndarray, iters: int = DEFAULT_EXACT_ITERS,
                             stop_thr: float = 1e-7) -> np.ndarray:
    """Released WMDD semantics: ot.lp.free_support_barycenter, uniform atom weights. Returns (X, iters)."""
    import ot

    x, log = ot.lp.free_support_barycenter([y], [np.full(len(y), 1.0 / len(y))], x_init,
                                           numItermax=iters, stopThr=stop_thr, log=True)
    return x, len(log["displacement_square_norms"])


def _md_weights_exact(cost: np.ndarray, eta: float = 10.0, steps: int = 100, stop_thr: float = 1e-9):
    """Released learned-weights inner loop: mirror descent on the simplex from uniform, the EMD dual
    potential of the atoms (on the max-normalised cost) as the subgradient, multiplicative step eta."""
    import ot

    k, n = cost.shape
    c = cost / cost.max()
    b = np.full(n, 1.0 / n)
    w = np.full(k, 1.0 / k)
    for _ in range(steps):
        _, log = ot.emd(w, b, c, log=True, numItermax=10_000_000)
        w_new = w * np.exp(-eta * log["u"])
        w_new = np.clip(w_new, 0, None)
        s = w_new.sum()
        w_new = np.zeros_like(w_new) if s <= 0 else w_new / s
        change = np.abs(w_new - w).sum()
        w = w_new
        if change < stop_thr:
            break
    return w


def released_learned_barycenter(y: np.ndarray, x_init: np.ndarray, outer: int = 10, theta: float = 0.2,
                                md_steps: int = 100, eta: float = 10.0, tol: float = 1e-6):
    """The released learned-weights loop with POT EMD (see the module docstring). Returns (X, w).
    One guard the release lacks: an atom whose weight underflows to 0 keeps its location (POT would
    divide by zero)."""
    import ot

    x = np.array(x_init, dtype=np.float64)
    b = np.full(len(y), 1.0 / len(y))
    w = np.full(len(x), 1.0 / len(x))
    w_old = None
    for _ in range(outer):
        w = _md_weights_exact(ot.dist(x, y), eta=eta, steps=md_steps)
        if w_old is not None and np.linalg.norm(w - w_old) < tol:
            w = w_old
            break
        w_old = w
        with np.errstate(divide="ignore", invalid="ignore"):
            x_new = ot.lp.free_support_barycenter([y], [b], x, b=w)
        bad = ~np.isfinite(x_new).all(1)
        x_new[bad] = x[bad]
        x = (1 - theta) * x + theta * x_new
    return x, w


# ---------------------------------------------------------------------------------------------
# entropic (Sinkhorn) solver: all classes batched


def _sinkhorn_barycenter(y, b, counts, x, w, *, learned: bool, reg: float, iters: int, eps0: float,
                         eps_decay: float, inner_iters: int, sinkhorn_tol: float, tol: float,
                         md_step: float, md_steps: int, relax: float, impl, progress=None):
    """Cuturi & Doucet alternation in normalised coordinates. y [C, N, d], b [C, N], x [C, k, d],
    w [C, k], all already centred and scaled (cost scale 1).
    Returns x, w, f (final atom potentials), outer iterations [C], total Sinkhorn iterations."""
    num_classes, n_max, _ = y.shape
    k = x.shape[1]
    x, w = x.clone(), w.clone()
    f = torch.zeros(num_classes, k, dtype=y.dtype)
    done_at = torch.full((num_classes,), iters, dtype=torch.long)
    abs_tol = sinkhorn_tol  # absolute, so a class converges the same alone or in any batch
    min_weight = 1e-12  # keeps log(w) finite in the log-domain Sinkhorn; Lloyd finishing can zero it
    inner_total = 0
    check_every = SINKHORN_CHECK_EVERY if ops.resolve_impl(impl) == "ext" else 10
    # the working set: the classes still iterating, gathered once per change (not every iteration)
    active = torch.arange(num_classes)
    ya, ba, yya = y, b, (y * y).sum(-1)
    xa, wa, fa = x, w, None
    prev_cost = torch.full((num_classes,), float("inf"), dtype=torch.float64)
    theta = torch.full((num_classes, 1, 1), float(relax), dtype=y.dtype)
    for t in range(iters):
        eps = max(reg, eps0 * eps_decay**t)
        cost = sqdist(xa, ya, yya)
        if learned and md_steps == 0:
            # free weights, weight step solved exactly: for fixed atoms the entropic optimum over w has
            # P_ij = b_j softmax_i(-C_ij / eps) and w = P 1 (the fixed point of the mirror descent)
            plan = torch.softmax(-cost / eps, dim=-2) * ba.unsqueeze(-2)
            wa = plan.sum(-1).clamp_min(min_weight)
            wa = wa / wa.sum(-1, keepdim=True)
            fa = torch.zeros_like(wa)  # the optimum's potentials are constant
            stats = {"err": torch.zeros(len(active), dtype=torch.float64)}
        else:
            fa, _, stats = ops.sinkhorn_log_batched(cost, wa, ba, eps, max_iter=inner_iters, tol=abs_tol,
                                                    f_init=fa, impl=impl, return_info=True,
                                                    check_every=check_every)
            inner_total += int(stats["n_iter"].sum())
            # the plan with the data marginal exact: g <- c-transform of f (one half-iteration), i.e.
            # P_ij = b_j softmax_i((f_i - C_ij) / eps). Converged, this is the Sinkhorn plan; if not
            # yet, every point still carries its mass. (One fused softmax: ~10x faster than
            # logsumexp + exp on the CPU.)
            plan = torch.softmax((fa.unsqueeze(-1) - cost) / eps, dim=-2) * ba.unsqueeze(-2)
        mass = plan.sum(-1)                                               # [Ca, k] (~ wa)
        transport = (plan * cost).sum((-1, -2)).double()
        # location update B = diag(1/w) T Y; an atom without mass keeps its place
        ok = (mass > 1e-12).unsqueeze(-1)
        target = torch.where(ok, (plan @ ya) / mass.clamp_min(1e-30).unsqueeze(-1), xa)
        at_target = eps <= reg
        if at_target and relax != 1.0:
            # over-relaxed fixed-point step X + theta (B - X); a class whose transport cost rose goes
            # back to theta = 1 for good (monotone from there)
            worse = transport > prev_cost * (1 + 1e-7)
            theta[worse.to(theta.device)] = 1.0
            x_new = xa + theta * (target - xa)
        else:
            x_new = target
        disp = (wa * ((x_new - xa) ** 2).sum(-1)).sum(-1).double()
        if learned and md_steps > 0:
            # Algorithm 2's weight step, sharing this outer iteration's Sinkhorn solve: the atoms' dual
            # potential is the subgradient; KL prox = multiplicative update on the simplex.
            for step in range(md_steps):
                if step > 0:
                    fa = ops.sinkhorn_log_batched(cost, wa, ba, eps, max_iter=inner_iters, tol=abs_tol,
                                                  f_init=fa, impl=impl)[0]
                # f is in normalised cost units (cost scale 1): one step size serves every class.
                # (Steps ~ 1/eps overshoot and collapse the weights: the transport part's curvature
                # is ~ the cost gaps, not eps.)
                grad = fa - fa.mean(-1, keepdim=True)
                logw = torch.log(wa) - md_step * grad
                wa = torch.softmax(logw, -1).clamp_min(min_weight)
                wa = wa / wa.sum(-1, keepdim=True)
        rel_change = (prev_cost - transport).abs() / transport.clamp_min(1e-30)
        prev_cost = transport
        xa = x_new
        if progress is not None:
            progress(t, eps, len(active))
        finished = torch.zeros(len(active), dtype=torch.bool)
        if at_target and eps0 * eps_decay ** (t - 1) <= reg:
            # converged (judged from the second iteration at the target epsilon on): feasible plan
            # (Sinkhorn met its tolerance) and atoms / transport cost no longer moving
            feasible = stats["err"].to(disp.device) <= abs_tol
            finished = feasible & ((disp < tol) | (rel_change < tol))
        if t == iters - 1:
            finished[:] = True
        if finished.any():
            idx = active[finished]
            x[idx], w[idx], f[idx] = xa[finished], wa[finished], fa[finished]
            done_at[idx] = t + 1
            keep = ~finished
            active = active[keep]
            if len(active) == 0:
                break
            ya, ba, yya, xa, wa, fa = ya[keep], ba[keep], yya[keep], xa[keep], wa[keep], fa[keep]
            prev_cost, theta = prev_cost[keep], theta[keep]
    return x, w, f, done_at, inner_total


LLOYD_CHUNK_BYTES = 4 << 20  # Lloyd runs on ~4 MB of features at a time: they stay in cache across its
                             # steps (k = 10 is bound by memory traffic otherwise: 1.7x slower batched)


def _lloyd_finish(y, counts, x, max_steps: int = 300):
    """Exact k-means (Lloyd) steps per class: each point to its nearest atom, each atom to its cell's mean
    (an empty cell keeps its atom), until the assignment is stable; weights = the cells' masses.
    Returns x, w, steps [C] (Lloyd steps per class). Classes run in chunks of about LLOYD_CHUNK_BYTES
    of features (`_lloyd_chunk`)."""
    per_class = y.shape[1] * y.shape[2] * y.element_size()
    step = max(1, LLOYD_CHUNK_BYTES // per_class)
    out = [_lloyd_chunk(y[s:s + step], counts[s:s + step], x[s:s + step], max_steps)
           for s in range(0, len(y), step)]
    return tuple(torch.cat([o[i] for o in out]) for i in range(3))


def _lloyd_chunk(y, counts, x, max_steps: int):
    """Lloyd on a few classes batched. Per step one k x N x d product (||y||^2 is the same for every
    atom of a point, so the nearest atom needs only ||x||^2 - 2 x.y); the cells' sums are updated with
    the points that changed cell only. A class is done when its assignment repeats (its atoms are then
    the means of its cells); it stays in the (small) batch until all are done, unchanged."""
    num_classes, n_max, d = y.shape
    k = x.shape[1]
    x, w = x.clone(), torch.zeros(num_classes, k, dtype=torch.float64)
    steps = torch.full((num_classes,), max_steps, dtype=torch.long)
    valid = torch.arange(n_max).unsqueeze(0) < counts.unsqueeze(1)               # [C, N]
    offset = k * torch.arange(num_classes).unsqueeze(1)
    done = torch.zeros(num_classes, dtype=torch.bool)
    assign_old = cell_old = sums = None
    for step in range(max_steps):
        xx = (x * x).sum(-1, keepdim=True)
        assign = torch.baddbmm(xx, x, y.transpose(1, 2), alpha=-2.0).min(1).indices  # [C, N]
        # each point's cell among the C * k cells of the chunk; padding goes to one spare cell at the end
        cell = torch.where(valid, assign + offset, num_classes * k)
        size = torch.bincount(cell.view(-1), minlength=num_classes * k + 1)[:-1].view(-1, k)
        if sums is None:
            sums = torch.zeros(num_classes * k + 1, d, dtype=y.dtype).index_add_(0, cell.view(-1), y.reshape(-1, d))
        else:
            new = (assign == assign_old).all(1) & ~done
            if step == max_steps - 1:
                new = ~done
            w[new] = size[new].double() / counts[new].unsqueeze(1).double()
            steps[new] = step
            done |= new
            if done.all():
                break
            moved = (assign != assign_old) & valid
            c, j = moved.nonzero(as_tuple=True)
            yc = y[c, j]
            sums.index_add_(0, cell[c, j], yc).index_add_(0, cell_old[c, j], yc, alpha=-1)
        means = sums[:-1].view(-1, k, d) / size.clamp_min(1).unsqueeze(-1).to(y.dtype)
        x = torch.where((size > 0).unsqueeze(-1) & ~done.view(-1, 1, 1), means, x)
        assign_old, cell_old = assign, cell
    return x, w.to(y.dtype), steps


def _laguerre_finish(y, counts, x, f):
    """One debiased location update (epsilon -> 0 with the final dual potentials f): each point goes to
    its Laguerre cell argmin_i ||x_i - y_j||^2 - f_i (the cells of the semi-discrete optimal plan, whose
    masses are ~w once f has converged), and each atom moves to its cell's mean; an empty cell keeps its
    atom. Same (normalised) units for x, y and f."""
    num_classes, n_max, _ = y.shape
    k = x.shape[1]
    valid = torch.arange(n_max).unsqueeze(0) < counts.unsqueeze(1)
    assign = (sqdist(x, y) - f.unsqueeze(-1)).argmin(1)                       # [C, N]
    onehot = torch.nn.functional.one_hot(assign, k).to(y.dtype) * valid.unsqueeze(-1)
    size = onehot.sum(1)
    means = onehot.transpose(1, 2) @ y / size.clamp_min(1).unsqueeze(-1)
    return torch.where((size > 0).unsqueeze(-1), means, x)


def _emd_finish(y_list, x, w, steps: int):
    """`steps` exact location updates with EMD plans (uniform weights): each lowers W2^2."""
    import ot

    x = x.clone()
    for c, yc in enumerate(y_list):
        y64 = yc.double().numpy()
        xc = x[c].double().numpy()
        wc = w[c].double().numpy()
        wc = wc / wc.sum()
        b = np.full(len(y64), 1.0 / len(y64))
        for _ in range(steps):
            plan = ot.emd(wc, b, ot.dist(xc, y64), numItermax=10_000_000)
            mass = plan.sum(1)
            ok = mass > 1e-12
            xc = np.where(ok[:, None], plan @ y64 / np.maximum(mass, 1e-300)[:, None], xc)
        x[c] = torch.from_numpy(xc).to(x.dtype)
    return x


# ---------------------------------------------------------------------------------------------
# public API


def free_support_barycenter_batched(features: Sequence[torch.Tensor], k: int, *, solver: str = "exact",
                                    weights: str = "uniform", reg: float = DEFAULT_REG,
                                    iters: int | None = None, seeds: Sequence[int] | None = None,
                                    seed: int = 0, init: Sequence | torch.Tensor | None = None,
                                    eps0: float = DEFAULT_EPS0, eps_decay: float = DEFAULT_EPS_DECAY,
                                    inner_iters: int = DEFAULT_INNER_ITERS,
                                    sinkhorn_tol: float = DEFAULT_SINKHORN_TOL, tol: float | None = None,
                                    md_step: float = DEFAULT_MD_STEP, md_steps: int = 0, relax: float = DEFAULT_RELAX, finish: str = "auto",
                                    anneal: bool | None = None, dtype=torch.float32, impl: str | None = None,
                                    compute_objective: bool = True, progress=None) -> Barycenter:
    """Barycenters of many classes at once (ragged sizes). features: list of [n_c, d] tensors.

    Returns a Barycenter with points [C, k, d], weights [C, k] (>= 0, sum 1), w2 [C] (exact W2^2,
    NaN when compute_objective=False) and iters [C] (outer iterations used; Lloyd steps when the
    entropic phase is skipped). Each class's result is
    the same as solving it alone with seed seeds[c] (default class_seed(seed, c)).
    `finish` (sinkhorn): the epsilon -> 0 step that ends the alternation: "laguerre" (one location
    update with the hard cells of the final dual potentials), "lloyd" (learned default: exact k-means
    steps to convergence), "emd" (one exact EMD location update), "none" (uniform default).
    `anneal` (sinkhorn): run the entropic alternation (epsilon scaling) before the finish. Default: yes,
    except for learned weights with the exact weight step (md_steps=0) and the Lloyd finish, which go
    straight to Lloyd from the k-means++ init (see the module docstring); anneal=True there runs the
    entropic phase first (a slightly lower W2^2, 2-3x the time)."""
    features = [torch.as_tensor(f).detach().cpu() for f in features]
    _check_inputs(features, k, solver, weights)
    if finish not in FINISHES:
        raise ValueError(f"unknown finish {finish!r}; use one of {FINISHES}")
    num_classes = len(features)
    seeds = list(seeds) if seeds is not None else [class_seed(seed, c) for c in range(num_classes)]
    learned = weights == "learned"
    work = torch.float64 if solver == "exact" else dtype

    # centre each class (translation invariance; better conditioned costs), pad, initialise
    means = torch.stack([f.mean(0, dtype=torch.float64) for f in features])   # [C, d]

    def centred(c):  # one class, float64, for POT
        return features[c].double() - means[c]

    if solver == "exact":
        y, b, counts = pad_classes([centred(c) for c in range(num_classes)], dtype=work)
        root = torch.ones(num_classes, 1, 1, dtype=work)
    else:
        y, b, counts, root = _centre_and_scale(features, means, work)
    if init is None:
        x0 = kmeanspp_init(y, counts, k, seeds)  # its choices do not depend on the scale
    else:
        x0 = (torch.stack([torch.as_tensor(i, dtype=torch.float64) for i in init]) - means.unsqueeze(1)).to(work) / root
    w0 = torch.full((num_classes, k), 1.0 / k, dtype=work)
    info = {"solver": solver, "weights": weights}

    if solver == "exact":
        xs, ws, its = [], [], []
        for c in range(num_classes):
            yc = y[c, : counts[c]].numpy()
            if learned:
                (xc, wc), it = released_learned_barycenter(yc, x0[c].numpy()), 10
            else:
                (xc, it), wc = exact_uniform_barycenter(yc, x0[c].numpy(), iters or DEFAULT_EXACT_ITERS), w0[c].numpy()
            xs.append(torch.from_numpy(np.asarray(xc)))
            ws.append(torch.as_tensor(np.asarray(wc)))
            its.append(it)
        x, w, done_at = torch.stack(xs), torch.stack(ws), torch.tensor(its)
    else:
        if finish == "auto":
            finish = "lloyd" if learned else "none"
        lloyd_only = learned and md_steps == 0 and finish == "lloyd"  # k-means: Lloyd is the exact alternation
        anneal = not lloyd_only if anneal is None else anneal
        if not anneal and not lloyd_only:
            raise ValueError("anneal=False needs weights='learned', md_steps=0 and the 'lloyd' finish")
        inner_total = 0
        if anneal:
            x, w, f, done_at, inner_total = _sinkhorn_barycenter(
                y, b, counts, x0, w0, learned=learned, reg=reg,
                iters=iters or DEFAULT_SINKHORN_ITERS, eps0=max(eps0, reg), eps_decay=eps_decay,
                inner_iters=inner_iters, sinkhorn_tol=sinkhorn_tol,
                tol=tol if tol is not None else DEFAULT_TOL_LEARNED if learned else DEFAULT_TOL, md_step=md_step,
                md_steps=md_steps, relax=relax, impl=impl, progress=progress)
        else:
            x = x0
        if finish == "laguerre":
            x = _laguerre_finish(y, counts, x, f)
        elif finish == "lloyd":
            x, w, lloyd_steps = _lloyd_finish(y, counts, x)  # scale-free: same cells and weights in either unit
            info["lloyd_steps"] = lloyd_steps
            if not anneal:
                done_at = lloyd_steps
        x = x * root
        if finish == "emd":
            x = _emd_finish([centred(c) for c in range(num_classes)], x, w, 1)
        info.update(anneal=anneal, sinkhorn_iters=inner_total, reg=reg, eps0=max(eps0, reg), eps_decay=eps_decay,
                    impl=ops.resolve_impl(impl), finish=finish)

    points = (x.double() + means.unsqueeze(1)).float()
    w = w.double().clamp_min(0)
    w = (w / w.sum(-1, keepdim=True)).float()
    if compute_objective:
        w2 = torch.tensor([w2_squared(x[c].double(), w[c], centred(c)) for c in range(num_classes)],
                          dtype=torch.float64)
    else:
        w2 = torch.full((num_classes,), float("nan"), dtype=torch.float64)
    return Barycenter(points=points, weights=w, w2=w2, iters=done_at, info=info)


def free_support_barycenter(features: torch.Tensor, k: int, *, seed: int = 0, class_index: int = 0,
                            **kwargs) -> Barycenter:
    """One class: features [n, d] -> Barycenter(points [k, d], weights [k], w2 scalar). Same options
    as `free_support_barycenter_batched`; the class's seed is class_seed(seed, class_index)."""
    if "init" in kwargs and kwargs["init"] is not None:
        kwargs["init"] = [kwargs["init"]]
    out = free_support_barycenter_batched([features], k, seeds=[class_seed(seed, class_index)], **kwargs)
    return Barycenter(points=out.points[0], weights=out.weights[0], w2=out.w2[0], iters=out.iters[0],
                      info=out.info)
