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
