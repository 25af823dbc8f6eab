"""Free-support Wasserstein barycenters of class feature clouds: the problem, W2, the start, the exact solver.

More: docs/core.md, "wmdd/ot.py".
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import ot as pot
import torch

from wmdd import ops, sinkhorn
from wmdd.sinkhorn import sqdist

SOLVERS = ("exact", "sinkhorn")
WEIGHTS = ("uniform", "learned")
FINISHES = ("auto", "laguerre", "lloyd", "emd", "none")

# Defaults, each with its reason.
DEFAULT_REG = 1e-2          # target epsilon relative to the cost scale (docs/barycenter.md, "Solvers")
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


def w2_squared(points, weights, features) -> float:
    """Exact W2^2 between sum_i w_i delta_{x_i} and the uniform measure on the rows of `features`
    (POT network simplex, float64)."""
    x = np.asarray(torch.as_tensor(points).detach().cpu(), dtype=np.float64)
    y = np.asarray(torch.as_tensor(features).detach().cpu(), dtype=np.float64)
    w = np.asarray(torch.as_tensor(weights).detach().cpu(), dtype=np.float64).clip(min=0)
    w = w / w.sum()
    mu = y.mean(0)
    cost = pot.dist(x - mu, y - mu)  # centred: less cancellation in ||x||^2 + ||y||^2 - 2xy
    # Eq. W2: W2^2 = min_{T >= 0, T 1 = w, T^T 1 = 1/n} sum_ij T_ij ||x_i - y_j||^2 (exact, EMD).
    return float(pot.emd2(w, np.full(len(y), 1.0 / len(y)), cost, numItermax=10_000_000))


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
    """Released WMDD semantics: ot.lp.free_support_barycenter, uniform atom weights. Returns (X, iters).
    POT computes the EMD plans and the location update B = diag(1/w) T Y itself."""
    x, log = pot.lp.free_support_barycenter([y], [np.full(len(y), 1.0 / len(y))], x_init,
                                           numItermax=iters, stopThr=stop_thr, log=True)
    return x, len(log["displacement_square_norms"])


def _md_weights_exact(cost: np.ndarray, eta: float = 10.0, steps: int = 100, stop_thr: float = 1e-9):
    """Released learned-weights inner loop: mirror descent on the simplex from uniform, the EMD dual
    potential of the atoms (on the max-normalised cost) as the subgradient, multiplicative step eta."""
    # Eq. weight update (the released EMD mirror descent): w <- w exp(-eta u) / Z, u = the atoms' EMD
    # potential. (numpy, EMD potentials: not sinkhorn.weight_update's torch step, whose bits differ.)
    k, n = cost.shape
    c = cost / cost.max()
    b = np.full(n, 1.0 / n)
    w = np.full(k, 1.0 / k)
    for _ in range(steps):
        _, log = pot.emd(w, b, c, log=True, numItermax=10_000_000)
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
    """The released learned-weights loop with POT EMD: `outer` steps of `md_steps` mirror-descent steps
    on the max-normalised cost (weights restarted from uniform each step), then a full exact location
    solve damped by theta. Returns (X, w). One guard the release lacks: an atom whose weight underflows
    to 0 keeps its location (POT would divide by zero)."""
    x = np.array(x_init, dtype=np.float64)
    b = np.full(len(y), 1.0 / len(y))
    w = np.full(len(x), 1.0 / len(x))
    w_old = None
    for _ in range(outer):
        w = _md_weights_exact(pot.dist(x, y), eta=eta, steps=md_steps)
        if w_old is not None and np.linalg.norm(w - w_old) < tol:
            w = w_old
            break
        w_old = w
        with np.errstate(divide="ignore", invalid="ignore"):  # POT's EMD plans and location update
            x_new = pot.lp.free_support_barycenter([y], [b], x, b=w)
        bad = ~np.isfinite(x_new).all(1)
        x_new[bad] = x[bad]
        x = (1 - theta) * x + theta * x_new
    return x, w


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
    entropic phase is skipped). Each class's result is the same as solving it alone with seed seeds[c]
    (default class_seed(seed, c)).
    `finish` (sinkhorn): the epsilon -> 0 step that ends the alternation: "laguerre" (one location
    update with the hard cells of the final dual potentials), "lloyd" (learned default: exact k-means
    steps to convergence), "emd" (one exact EMD location update), "none" (uniform default).
    `anneal` (sinkhorn): run the entropic alternation (epsilon scaling) before the finish. Default: yes,
    except for learned weights with the exact weight step (md_steps=0) and the Lloyd finish, which go
    straight to Lloyd from the k-means++ init (k-means: Lloyd is the exact alternation); anneal=True
    there runs the entropic phase first (a slightly lower W2^2, 2-3x the time)."""
    # Eq. barycenter: per class c, (X_c, w_c) = argmin over k atoms of W2^2(X, w; Y_c), w = 1/k fixed for
    # uniform weights; solved by `solver`, reported as the exact W2^2 of the result.
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
        y, b, counts, root = sinkhorn.centre_and_scale(features, means, work)
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
            x, w, f, done_at, inner_total = sinkhorn.alternation(
                y, b, counts, x0, w0, learned=learned, reg=reg,
                iters=iters or DEFAULT_SINKHORN_ITERS, eps0=max(eps0, reg), eps_decay=eps_decay,
                inner_iters=inner_iters, sinkhorn_tol=sinkhorn_tol,
                tol=tol if tol is not None else DEFAULT_TOL_LEARNED if learned else DEFAULT_TOL, md_step=md_step,
                md_steps=md_steps, relax=relax, impl=impl, progress=progress)
        else:
            x = x0
        if finish == "laguerre":
            x = sinkhorn.laguerre_finish(y, counts, x, f)
        elif finish == "lloyd":
            x, w, lloyd_steps = sinkhorn.lloyd_finish(y, counts, x)  # scale-free: same cells and weights in either unit
            info["lloyd_steps"] = lloyd_steps
            if not anneal:
                done_at = lloyd_steps
        x = x * root
        if finish == "emd":
            x = sinkhorn.emd_finish([centred(c) for c in range(num_classes)], x, w, 1)
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
