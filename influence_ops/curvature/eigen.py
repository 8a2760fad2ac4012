"""Curvature models from eigenpairs of H: exact (explicit Hessian) and Arnoldi (low rank).

Both hold a :class:`~influence_ops.solvers.EigenInverse` ``U diag(1/lam) U^T`` and share its
feature maps: ``phi(g) = |lam|^-1/2 U^T g``, ``psi(g) = sign(lam) phi(g)``, so that
``<psi(g_test), phi(g_train)> = g_test^T U diag(1/lam) U^T g_train`` (the eigenvalue policy is
in :mod:`influence_ops.solvers`). The maps of a block come from one fused projection
``G U`` of its per-example gradients, so the ``(n, d)`` gradients are never materialised.
"""

from __future__ import annotations

import logging

import numpy as np

from influence_ops import gradients as grads
from influence_ops import solvers
from influence_ops.curvature.base import Curvature
from influence_ops.registry import register_curvature

log = logging.getLogger(__name__)

HVP_BATCH = 1024  # examples per Hessian-vector-product call


class EigenCurvature(Curvature):
    """Shared feature maps of the eigen-based curvature models."""

    factored = True

    def __init__(self, imodel, config):
        super().__init__(imodel, config)
        self.negative = config.negative_eigenvalues
        self.eigen = None  # solvers.EigenInverse once fitted

    @property
    def feature_dim(self) -> int:
        return self.eigen.k

    def solve(self, G):
        self._check_fitted()
        return self.eigen.apply(G)

    def gradient_maps(self, x, y, train=True, query=True, inverse_norms=False):
        self._check_fitted()
        c = grads.projected_gradients(self.imodel, x, y, self.eigen.U,
                                      self.batch_size).astype(np.float64)
        out = {}
        if query:
            out["query"] = self.eigen.query_map_from_coordinates(c)
        if train:
            out["train"] = self.eigen.train_map_from_coordinates(c)
        if inverse_norms:
            out["inverse_norms"] = self.eigen.inverse_norms_from_coordinates(c)
        return out

    def loo_maps(self, x, y, n):
        """The fused on-device correction (:func:`influence_ops.loo.eigen_corrected`)."""
        from influence_ops import loo
        self._check_fitted()
        query, train, self_scores = loo.eigen_corrected(self.imodel, x, y, self.eigen, n,
                                                        self.batch_size)
        return {"train": train, "query": query, "self": self_scores}

    def query_maps(self, x, y):
        self._check_fitted()
        return grads.projected_gradients(self.imodel, x, y, self.eigen.projection("query"),
                                         self.batch_size)

    def train_map(self, G):
        return self.eigen.train_map(G)

    def query_map(self, G):
        return self.eigen.query_map(G)

    def train_projection(self) -> np.ndarray:
        """``(d, k)`` P with ``phi(g) = g P`` (fuses with per-example gradients)."""
        return self.eigen.projection("train")

    def params(self):
        return {"kept_eigenvalues": int(self.eigen.k) if self.eigen is not None else 0}

    def arrays(self):
        return {"U": self.eigen.U, "lam": self.eigen.lam}

    def restore(self, arrays):
        self.eigen = solvers.EigenInverse(U=arrays["U"], lam=arrays["lam"])
        self.fitted = True

    def _hvp(self, x, y):
        """``V -> H V`` over ``(x, y)``; the frozen layers below the targets run once."""
        acts = grads.front_activations(self.imodel, x)
        return lambda V: grads.hessian_vector_products(self.imodel, acts, y, V, HVP_BATCH)


@register_curvature("exact")
class ExactCurvature(EigenCurvature):
    """Explicit Hessian (``d`` up to ~1e4), fully eigendecomposed: exact influence.

    Fits from a sample in memory or, in the pipeline, from the distributed sum of per-example
    Hessians over all training blocks (:class:`~influence_ops.combiners.HessianSumCombiner`).
    """

    @classmethod
    def combiner(cls, config, imodel_factory):
        from influence_ops.combiners import HessianSumCombiner
        return HessianSumCombiner(imodel_factory)

    def fit(self, x, y):
        return self.fit_from_combined((grads.hessian_sum(self.imodel, x, y), len(x)))

    def fit_from_combined(self, output):
        """From ``(sum_i Hessian(l(z_i)), n)``: ``H = sum / n`` symmetrised, plus the
        regulariser's diagonal (``l2`` and the target layers' Keras L2 regularisers)."""
        hessian_sum, n = output
        if not n:
            raise ValueError("no training examples to fit on: the training set is empty or "
                             "every row was dead-lettered")
        h = np.asarray(hessian_sum, np.float64) / max(n, 1)
        h = 0.5 * (h + h.T) + np.diag(self.imodel.l2_vector)
        self.eigen = solvers.exact_inverse(h, self.damping, self.negative)
        self.n_fit = int(n)
        self.fitted = True
        return self


@register_curvature("arnoldi")
class ArnoldiCurvature(EigenCurvature):
    """Rank-``rank`` model of H from ``arnoldi_iter`` Hessian-vector products (Schioppa et al.
    2022); the feature dimension is ``rank``."""

    def __init__(self, imodel, config):
        super().__init__(imodel, config)
        self.rank, self.n_iter, self.seed = int(config.rank), int(config.arnoldi_iter), \
            int(config.seed)
        self.force_hermitian = bool(getattr(config, "force_hermitian", True))

    def fit(self, x, y):
        def progress(i, total):
            if i % max(1, total // 8) == 0 or i == total:
                log.info("arnoldi: %d/%d Hessian-vector products", i, total)
        self.eigen = solvers.arnoldi(self._hvp(x, y), self.imodel.n_params, self.n_iter,
                                     self.rank, self.damping, self.negative, self.seed,
                                     progress=progress, force_hermitian=self.force_hermitian)
        self.fitted = True
        return self
