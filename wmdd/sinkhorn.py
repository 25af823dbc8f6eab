"""The batched entropic barycenter solver (wmdd/ot.py's `solver="sinkhorn"`) and its finishing steps.

More: docs/core.md, "wmdd/sinkhorn.py".
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import ot as pot
import torch

from wmdd import ops

SINKHORN_CHECK_EVERY = 1    # compiled kernel: inner stop tested after every iteration (free there); the
                            # reference path keeps POT's every 10th (POT one iteration per call is slower)
LLOYD_CHUNK_BYTES = 4 << 20  # Lloyd runs on ~4 MB of features at a time: they stay in cache across its
                             # steps (k = 10 is bound by memory traffic otherwise: 1.7x slower batched)


def centre_and_scale(features: Sequence[torch.Tensor], means: torch.Tensor, dtype):
    """The solver's input: Y [C, N, d], each class centred and divided by sqrt(s_c), s_c = mean squared
    distance between two of its points = 2 x its total variance (1 when that is 0), zero padded;
    b [C, N] (1/n_c, 0 on padding), counts [C]; root [C, 1, 1] = sqrt(s_c). Written in place into the
    padded batch (no per-class float64 copies: at the ImageNet shape those cost ~15% of a solve)."""
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
    """The cost C_ij = ||x_i - y_j||^2 for x [..., k, d], y [..., n, d] -> [..., k, n] (clamped at 0).
    yy: the precomputed ||y_j||^2 [..., n] (y is fixed across iterations, x moves)."""
    xx = (x * x).sum(-1, keepdim=True)
    if yy is None:
        yy = (y * y).sum(-1)
    return torch.baddbmm((xx + yy.unsqueeze(-2)).reshape(-1, x.shape[-2], y.shape[-2]),
                         x.reshape(-1, x.shape[-2], x.shape[-1]), y.reshape(-1, y.shape[-2], y.shape[-1]).transpose(1, 2),
                         alpha=-2.0).reshape(*x.shape[:-1], y.shape[-2]).clamp_min_(0.0)


def transport_plan(cost: torch.Tensor, b: torch.Tensor, eps: float, f: torch.Tensor | None = None) -> torch.Tensor:
    """The entropic plan T [C, k, N] of the atoms' dual potential f [C, k] (None: 0) with the data
    marginal b exact."""
    # Eq. transport plan: T_ij = b_j softmax_i((f_i - C_ij) / eps), i.e. g = the c-transform of f (one
    # half-iteration). Converged, this is the Sinkhorn plan; if not yet, every point still carries its
    # mass. With f = 0 it is the optimal plan of free weights. (One fused softmax: ~10x faster than
    # logsumexp + exp on the CPU.)
    logits = -cost / eps if f is None else (f.unsqueeze(-1) - cost) / eps
    return torch.softmax(logits, dim=-2) * b.unsqueeze(-2)


def location_update(plan: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The barycentric projection of a plan [C, k, N] (any scale: its row sums are the atoms' masses)
    onto y [C, N, d]; an atom with numerically no mass keeps its location in x [C, k, d]."""
    # Eq. location update: B = diag(1/w) T Y, w = T 1.
    mass = plan.sum(-1)
    ok = (mass > 1e-12).unsqueeze(-1)
    return torch.where(ok, (plan @ y) / mass.clamp_min(1e-30).unsqueeze(-1), x)


def weight_update(w: torch.Tensor, min_weight: float, plan: torch.Tensor | None = None,
                  f: torch.Tensor | None = None, step: float = 0.0) -> torch.Tensor:
    """The atoms' new weights [C, k] (on the simplex, each >= ~min_weight)."""
    # Eq. weight update: for fixed atoms the entropic transport cost is minimised over w in closed form,
    # w = T 1 with the plan of free weights (transport_plan with f = 0: the fixed point of Algorithm 2's
    # mirror descent). Or (plan None) Algorithm 2's own step: w <- w exp(-step f) / Z, the atoms' dual
    # potential f (centred; normalised cost units, so one step serves every class) as the subgradient.
    if plan is not None:
        new = plan.sum(-1)
    else:
        new = torch.softmax(torch.log(w) - step * (f - f.mean(-1, keepdim=True)), -1)
    new = new.clamp_min(min_weight)
    return new / new.sum(-1, keepdim=True)


def alternation(y, b, counts, x, w, *, learned: bool, reg: float, iters: int, eps0: float, eps_decay: float,
                inner_iters: int, sinkhorn_tol: float, tol: float, md_step: float, md_steps: int, relax: float,
                impl, progress=None):
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
        if learned and md_steps == 0:  # free weights, weight step solved exactly (its potentials are 0)
            plan = transport_plan(cost, ba, eps)
            wa = weight_update(wa, min_weight, plan=plan)
            fa = torch.zeros_like(wa)
            stats = {"err": torch.zeros(len(active), dtype=torch.float64)}
        else:
            fa, _, stats = ops.sinkhorn_log_batched(cost, wa, ba, eps, max_iter=inner_iters, tol=abs_tol,
                                                    f_init=fa, impl=impl, return_info=True,
                                                    check_every=check_every)
            inner_total += int(stats["n_iter"].sum())
            plan = transport_plan(cost, ba, eps, fa)
        transport = (plan * cost).sum((-1, -2)).double()
        target = location_update(plan, ya, xa)
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
            # Algorithm 2's weight step, sharing this outer iteration's Sinkhorn solve. (Steps ~ 1/eps
            # overshoot and collapse the weights: the transport part's curvature is ~ the cost gaps.)
            for step in range(md_steps):
                if step > 0:
                    fa = ops.sinkhorn_log_batched(cost, wa, ba, eps, max_iter=inner_iters, tol=abs_tol,
                                                  f_init=fa, impl=impl)[0]
                wa = weight_update(wa, min_weight, f=fa, step=md_step)
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


# ---------------------------------------------------------------------------------------------
# finishing steps (epsilon -> 0)


def lloyd_finish(y, counts, x, max_steps: int = 300):
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
    the points that changed cell only (the location and weight updates with the hard plan, kept
    incrementally). A class is done when its assignment repeats (its atoms are then the means of its
    cells); it stays in the (small) batch until all are done, unchanged."""
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


def laguerre_finish(y, counts, x, f):
    """One debiased location update (epsilon -> 0 with the final dual potentials f): each point goes to
    its Laguerre cell argmin_i ||x_i - y_j||^2 - f_i (the cells of the semi-discrete optimal plan, whose
    masses are ~w once f has converged), and each atom moves to its cell's mean; an empty cell keeps its
    atom. Same (normalised) units for x, y and f."""
    num_classes, n_max, _ = y.shape
    k = x.shape[1]
    valid = torch.arange(n_max).unsqueeze(0) < counts.unsqueeze(1)
    assign = (sqdist(x, y) - f.unsqueeze(-1)).argmin(1)                       # [C, N]
    onehot = torch.nn.functional.one_hot(assign, k).to(y.dtype) * valid.unsqueeze(-1)
    return location_update(onehot.transpose(1, 2), y, x)  # the hard plan, in point counts


def emd_finish(y_list, x, w, steps: int):
    """`steps` exact location updates with EMD plans (uniform weights): each lowers W2^2. (In float64
    numpy, as POT's: the same B = diag(1/w) T Y as location_update.)"""
    x = x.clone()
    for c, yc in enumerate(y_list):
        y64 = yc.double().numpy()
        xc = x[c].double().numpy()
        wc = w[c].double().numpy()
        wc = wc / wc.sum()
        b = np.full(len(y64), 1.0 / len(y64))
        for _ in range(steps):
            plan = pot.emd(wc, b, pot.dist(xc, y64), numItermax=10_000_000)
            mass = plan.sum(1)
            ok = mass > 1e-12
            xc = np.where(ok[:, None], plan @ y64 / np.maximum(mass, 1e-300)[:, None], xc)
        x[c] = torch.from_numpy(xc).to(x.dtype)
    return x
