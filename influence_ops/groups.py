"""Group influence: first order (Koh et al. 2019) and second order (Basu et al. 2020).

First order is linear, so a group's feature vector is the sum of its members' features and
``score(test, group) = <sum_{i in U} phi(z_i), psi(z_test)>``; removing the group changes the
test loss by about ``score / n``. Group self-influence is ``<sum phi, sum psi>``.

Second order adds the interaction of the members. With ``p = |U| / n``, ``g_U = sum_{i in U} g_i``
and ``H_U = sum_{i in U} Hessian(l(z_i))`` (Basu et al. 2020, eq. 7; the same terms as the seed
library's second-order calculator), on the scale of our first-order scores (times n):

    v_U   = (1 - 2p)/(1 - p)^2 * H^-1 g_U  +  1/((1 - p)^2 n) * H^-1 H_U H^-1 g_U
    score = g_test^T v_U

As p -> 0 this reduces to the first-order group score.

**Newton** (``order="newton"``): one Newton step from the fitted weights on the objective that
retraining without the group minimises, the mean over the ``n - m`` remaining rows
(``m = |U|``) plus the regulariser ``1/2 theta^T Lambda theta`` (``Lambda = diag(l2_vector)``):

    L_U(theta) = 1/(n - m) sum_{j not in U} l_j(theta) + 1/2 theta^T Lambda theta

At the fitted ``theta`` (``mean_i g_i + Lambda theta = 0``) its gradient is
``-(g_U + m Lambda theta) / (n - m)`` and its Hessian
``H_U' = (H_sum - H_U) / (n - m) + Lambda + damping I`` (``H_sum`` the sum of all per-example
Hessians, ``H_U`` the group's), so the step is
``delta_U = H_U'^-1 (g_U + m Lambda theta) / (n - m)``. A group of 5-20% of the data moves theta
far enough that the test loss's own curvature matters, so the predicted change of the test
loss is taken to second order along the step (``H_test`` the query's loss Hessian: exact for
last-layer targets, its Gauss-Newton part otherwise, :mod:`influence_ops.loo`), on the scale of
the other orders (``score / n`` ~ change of the test loss)::

    v_U   = n delta_U = n/(n - m) * H_U'^-1 (g_U + m Lambda theta)
    score = g_test^T v_U + v_U^T H_test v_U / (2 n)

It takes the group's own curvature out of H exactly (no expansion in ``p``), which is what large
or coherent groups need (second order underestimates coherent groups): on an L2 logistic
regression against real refits without each group (``tests/test_loo.py``) it reaches Pearson
0.999 with slope ~1 where orders 1 and 2 overestimate coherent groups. Cost: the explicit
``d x d`` Hessian sum of every group (``O(n d^2)`` over the training set; the total is the sum of
the groups') and one ``d x d`` solve per group (``O(G d^3)``): modest d (the last layer), any
curvature model (it does not use the fitted one).
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from influence_ops import gradients as grads


def per_group_sums(group_ids: np.ndarray, *arrays: np.ndarray):
    """Sums the rows of each array per group: ``(unique ids, [sums (G, ...) float64], counts
    (G,))``. The per-block step of the pipeline's group combines and of the in-memory path."""
    uniq, inv = np.unique(np.asarray(group_ids), return_inverse=True)
    sums = []
    for arr in arrays:
        s = np.zeros((len(uniq),) + np.shape(arr)[1:], dtype=np.float64)
        np.add.at(s, inv, np.asarray(arr).astype(np.float64))
        sums.append(s)
    return uniq, sums, np.bincount(inv, minlength=len(uniq))


def group_sums(features: np.ndarray, group_ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sums rows of ``features`` ``(n, k)`` per group; returns (unique ids, sums, counts)."""
    uniq, (sums,), counts = per_group_sums(group_ids, features)
    return uniq, sums, counts


def first_order_group_scores(method, query_x, query_y, train_x, train_y, group_ids,
                             query_ids=None):
    """``(groups, scores (m, G), self (G,))`` for a fitted first-order method."""
    uniq, phi, _ = group_sums(method.train_features(train_x, train_y), group_ids)
    q = method.query_features(query_x, query_y, query_ids).astype(np.float64)
    psi_train = method.self_query_features(train_x, train_y)
    if psi_train is None:
        # No query-side map for training examples (an unfactored curvature: CG, LiSSA):
        # solve per group instead: self(U) = g_U^T H^-1 (sum_i w_i g_i), w_i = 1 (or
        # 1/||H^-1 g_i|| for RelatIF).
        g = grads.per_example_gradients(method.imodel, train_x, train_y).astype(np.float64)
        _, g_sum, _ = group_sums(g, group_ids)
        if method.relatif:
            sol = method.solve(g)
            sol /= np.maximum(np.linalg.norm(sol, axis=1), 1e-30)[:, None]
            _, v, _ = group_sums(sol, group_ids)
        else:
            v = method.solve(g_sum)
        return uniq, q @ phi.T, np.sum(g_sum * v, axis=1)
    _, psi, _ = group_sums(psi_train, group_ids)
    return uniq, q @ phi.T, np.sum(phi * psi, axis=1)


def first_order_group_vectors(method, batches):
    """Per-group influence vectors of a fitted influence-function method, streamed:
    ``(groups, V (G, d))`` with ``score(U, z_test) = g_test . V_U`` equal to the first-order
    group score (the sum of the members' scores): ``V_U = (H + damping)^-1 sum_{i in U} g_i``
    (RelatIF: ``sum_{i in U} (H + damping)^-1 g_i / ||(H + damping)^-1 g_i||``). ``batches``
    yields ``(x, y, group_ids)``; memory ``O(G d)`` plus one batch."""
    sums = {}
    for x, y, gid in batches:
        g = grads.per_example_gradients(method.imodel, x, y).astype(np.float64)
        if method.relatif:
            g = method.solve(g)
            g /= np.maximum(np.linalg.norm(g, axis=1), 1e-30)[:, None]
        uniq, (s,), _ = per_group_sums(gid, g)
        for u, row in zip(uniq.tolist(), s):
            if u in sums:
                sums[u] += row
            else:
                sums[u] = row
    uniq = np.array(sorted(sums))
    V = np.stack([sums[u] for u in uniq.tolist()]) if len(uniq) else np.zeros((0, 0))
    if not method.relatif and len(uniq):
        V = method.solve(V)
    return uniq, V


def second_order_group_vectors(method, imodel, train_x, train_y, group_ids):
    """``(groups, V (G, d))`` of second-order group influence (Basu et al. 2020): score
    ``g_test . v_U`` (module docstring); n = len(train_x), members in memory per group."""
    train_x, train_y, group_ids = np.asarray(train_x), np.asarray(train_y), np.asarray(group_ids)
    uniq = np.unique(group_ids)
    V = np.stack([second_order_vector(method, imodel, train_x[group_ids == g],
                                      train_y[group_ids == g], len(train_x)) for g in uniq])
    return uniq, V


def combine_second_order(v1: np.ndarray, v2: np.ndarray, size: int, n_train: int) -> np.ndarray:
    """``v_U`` from ``v1 = H^-1 g_U`` and ``v2 = H^-1 H_U v1`` for a group of ``size`` members.

    The one place the Basu et al. coefficients live (the pipeline's two-pass version calls it).
    """
    p = size / float(n_train)
    if p >= 1.0:
        raise ValueError(f"a group of {size} holds the whole training set (p = 1): "
                         "second-order group influence is undefined for it")
    return (1 - 2 * p) / (1 - p) ** 2 * v1 + v2 / ((1 - p) ** 2 * n_train)


def second_order_vector(method, imodel, x_group, y_group, n_train: int) -> np.ndarray:
    """``v_U`` ``(d,)`` of the module docstring for one group (members ``x_group``)."""
    g_sum = grads.per_example_gradients(imodel, x_group, y_group).astype(np.float64).sum(axis=0)
    v1 = method.solve(g_sum[None, :])[0]
    hv = grads.hessian_vector_products(imodel, x_group, y_group, v1[None, :], include_l2=False,
                                       reduce="sum")[0]
    v2 = method.solve(hv[None, :])[0]
    return combine_second_order(v1, v2, len(x_group), n_train)


def second_order_group_scores(method, imodel, query_x, query_y, train_x, train_y, group_ids):
    """``(groups, scores (m, G))`` of second-order group influence; n = len(train_x)."""
    train_x = np.asarray(train_x)
    train_y = np.asarray(train_y)
    group_ids = np.asarray(group_ids)
    uniq = np.unique(group_ids)
    gq = grads.per_example_gradients(imodel, query_x, query_y).astype(np.float64)
    V = np.stack([second_order_vector(method, imodel, train_x[group_ids == g],
                                      train_y[group_ids == g], len(train_x)) for g in uniq])
    return uniq, gq @ V.T


def newton_group_vector(hessian_total: np.ndarray, n_train: int, hessian_group: np.ndarray,
                        grad_group: np.ndarray, size: int, l2_vector: np.ndarray,
                        theta: np.ndarray, damping: float = 0.0) -> np.ndarray:
    """``v_U = n/(n - m) H_U'^-1 (g_U + m Lambda theta)`` ``(d,)`` (module docstring) from the
    sums of per-example Hessians over all rows (``hessian_total``) and over the group's
    (``hessian_group``), the group's gradient sum and size. The one place the Newton group
    formula lives (the pipeline's stage calls it)."""
    n, m = int(n_train), int(size)
    if m >= n:
        raise ValueError(f"a group of {m} holds the whole training set: removing it leaves "
                         "no objective (Newton group influence is undefined for it)")
    d = len(grad_group)
    lam = np.asarray(l2_vector, np.float64)
    h = (np.asarray(hessian_total, np.float64) - np.asarray(hessian_group, np.float64)) / (n - m)
    h = 0.5 * (h + h.T)
    h[np.diag_indices(d)] += lam + float(damping)
    rhs = np.asarray(grad_group, np.float64) + m * lam * np.asarray(theta, np.float64)
    return n / (n - m) * np.linalg.solve(h, rhs)


def newton_group_sums(imodel, x, y, group_ids):
    """Per group ``(unique ids, gradient sums (G, d), Hessian sums (G, d, d), counts (G,))``."""
    x, y, group_ids = np.asarray(x), np.asarray(y), np.asarray(group_ids)
    uniq, inv = np.unique(group_ids, return_inverse=True)
    g = grads.per_example_gradients(imodel, x, y).astype(np.float64)
    d = imodel.n_params
    gs = np.zeros((len(uniq), d))
    hs = np.zeros((len(uniq), d, d))
    for j in range(len(uniq)):
        rows = inv == j
        gs[j] = g[rows].sum(axis=0)
        hs[j] = grads.hessian_sum(imodel, x[rows], y[rows])
    return uniq, gs, hs, np.bincount(inv, minlength=len(uniq))


def query_terms(imodel, query_x, query_y):
    """``(G (m, d), J (m, C, d) or None, A (m, C, C) or None)``: query gradients and their
    loss Hessians' factors ``H_t = J_t^T A_t J_t`` (None, with a warning, for heads the
    factors do not support: the Newton score is then linear in the step)."""
    from influence_ops import loo
    try:
        return loo.hessian_factors(imodel, query_x, query_y)
    except loo.LooUnsupportedError as e:
        import logging
        logging.getLogger(__name__).warning("Newton group influence: no query Hessian factors "
                                            "(%s); the test loss is linearised", e)
        gq = grads.per_example_gradients(imodel, query_x, query_y).astype(np.float64)
        return gq, None, None


def newton_scores_from_vectors(V: np.ndarray, n_train: int, Gq: np.ndarray, Jq=None, Aq=None
                               ) -> np.ndarray:
    """``(m, G)`` scores ``g_t . v_U + v_U^T H_t v_U / (2n)`` from the groups' vectors ``V``
    ``(G, d)`` and the queries' gradients and Hessian factors (``H_t = J_t^T A_t J_t``)."""
    out = Gq @ V.T
    if Jq is not None:
        proj = np.einsum("tcd,gd->tcg", Jq, V)                  # J_t v_U
        out = out + np.einsum("tcg,tce,teg->tg", proj, Aq, proj) / (2.0 * n_train)
    return out


def newton_group_scores(imodel, query_x, query_y, train_x, train_y, group_ids,
                        damping: float = 0.0):
    """``(groups, scores (m, G))`` of Newton group influence (module docstring); every
    training row belongs to a group, n = len(train_x)."""
    uniq, gs, hs, counts = newton_group_sums(imodel, train_x, train_y, group_ids)
    total = hs.sum(axis=0)
    theta = imodel.get_flat_params().astype(np.float64)
    n = len(np.asarray(train_x))
    V = np.stack([newton_group_vector(total, n, hs[j], gs[j], counts[j], imodel.l2_vector,
                                      theta, damping) for j in range(len(uniq))])
    return uniq, newton_scores_from_vectors(V, n, *query_terms(imodel, query_x, query_y))
