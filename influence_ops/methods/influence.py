"""Influence functions (Koh & Liang 2017) and RelatIF (Barshan et al. 2020) over any
curvature model (exact, Arnoldi, CG, LiSSA, ... see :mod:`influence_ops.curvature`).

    influence(z_train, z_test) = g_test^T (H + damping I)^-1 g_train
    relatif(z_train, z_test)   = influence / ||(H + damping I)^-1 g_train||

Feature maps: a factored curvature gives ``phi``/``psi`` directly (``k`` = its feature
dimension). Otherwise the queries are solved at fit time, ``Q = (H + damping)^-1 G_test``
(``needs_queries``); then ``phi(z) = Q g(z)`` (k = number of queries) and ``psi`` is the
one-hot vector of the query. Self-influence and RelatIF norms then need one solve per
training example, meant for small n (a warning says so).

``correction="loo"`` (``--correction=loo``) replaces the train features by their
leave-one-out-corrected form (:mod:`influence_ops.loo`): ``<psi(g_test), phi'(z_i)> =
g_test^T (H - H_i/n)^-1 g_i`` with n = the training-set size, against the *same* query
features, so top-k, pairwise and self-influence tables carry corrected scores unchanged. A
factored curvature corrects in its own terms (exact: exactly; Arnoldi: within its kept
eigenspace; EK-FAC: against its Kronecker model of H). An unfactored one (CG, LiSSA, PCG)
solves ``C + 1`` systems per training example (C = model outputs); PCG's self-influence
comes from its preconditioner's eigenpairs, corrected in that model's terms.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from contextlib import contextmanager

from influence_ops import gradients as grads
from influence_ops import loo
from influence_ops.curvature import build_curvature
from influence_ops.methods.base import InfluenceMethod, model_float
from influence_ops.registry import register_method

log = logging.getLogger(__name__)

SMALL_N_SELF_SOLVES = 2000


@register_method("influence")
class FirstOrderInfluence(InfluenceMethod):
    """First-order influence with the curvature model named by ``config.solver``."""

    relatif = False
    second_order_groups = True
    loo_correction = True   # supports correction="loo" (influence_ops.loo)
    # Exact-quality test x train answers at any d: queries solved by preconditioned CG
    # (benchmarks/lds.py: LDS equal to exact influence's, where Arnoldi rank 32 loses ~0.22).
    default_solver = "pcg"

    def __init__(self, imodel, curvature, batch_size: int = grads.DEFAULT_BATCH,
                 correction: str = "none"):
        super().__init__(imodel)
        self.curvature = curvature
        self.batch_size = int(batch_size)
        if correction not in loo.CORRECTIONS:
            raise ValueError(f"correction must be one of {loo.CORRECTIONS}, got {correction!r}")
        if correction != "none" and not self.loo_correction:
            raise ValueError(f"correction={correction!r} is not defined for {self.name}")
        self.correction = correction
        # Training-set size n of the objective mean_i l_i (the leave-one-out correction's
        # n): the examples the fit saw, unless the pipeline's sampled fit records the total.
        self.n_train: Optional[int] = None
        self.needs_queries = not curvature.factored
        self.Q: Optional[np.ndarray] = None          # (m, d) query solutions (unfactored)
        self.query_ids: Optional[np.ndarray] = None

    @classmethod
    def from_config(cls, imodel, config):
        return cls(imodel, build_curvature(imodel, config, cls._solver(config)),
                   config.batch_size, getattr(config, "correction", "none"))

    @classmethod
    def _solver(cls, config) -> str:
        return config.solver or cls.default_solver

    @property
    def solver(self) -> str:
        return self.curvature.registered_name

    @property
    def self_influence_at_scale(self) -> bool:
        return self.curvature.factored or (self.curvature.self_curvature is not None
                                           and not self.relatif)

    # -- fitting ------------------------------------------------------------------------------
    @classmethod
    def combiner(cls, config, imodel_factory):
        from influence_ops import registry
        return registry.get_curvature(cls._solver(config)).combiner(config, imodel_factory)

    def fit_from_combined(self, output):
        self.curvature.fit_from_combined(output)
        self.n_train = getattr(self.curvature, "n_fit", None)
        self.fitted = True
        return self

    @contextmanager
    def corrected(self, correction: Optional[str]):
        """Temporarily score with ``correction`` (``"none"`` / ``"loo"``; None: unchanged).
        The fit does not depend on it: only the train features change."""
        if correction is None or correction == self.correction:
            yield self
            return
        if correction not in loo.CORRECTIONS:
            raise ValueError(f"correction must be one of {loo.CORRECTIONS}, got {correction!r}")
        if correction != "none" and not self.loo_correction:
            raise ValueError(f"correction={correction!r} is not defined for {self.name}")
        old, self.correction = self.correction, correction
        try:
            yield self
        finally:
            self.correction = old

    def _loo_n(self) -> float:
        if not self.n_train:
            raise ValueError("correction='loo' needs the training-set size n, which this "
                             "artifact does not record: refit the method")
        return float(self.n_train)

    def fit(self, x, y, query_x=None, query_y=None, query_ids=None):
        x = np.asarray(x)
        y = self.imodel.check_labels(y, len(x))
        log.info("fitting %s/%s on %d examples, d=%d", self.name, self.solver, len(x),
                 self.imodel.n_params)
        self.curvature.fit(x, y)
        self.n_train = len(x)
        self.fitted = True
        self.Q, self.query_ids = None, None  # solutions of a previous fit are stale
        if not self.curvature.factored and query_x is not None:
            self.prepare_queries(query_x, query_y, query_ids)
        return self

    def prepare_queries(self, query_x, query_y, query_ids=None) -> None:
        """Unfactored curvature: solves ``Q = (H + damping)^-1 G_test`` for these queries
        (all at once) unless they are the ones already solved. A no-op when factored."""
        self._check_fitted()
        if self.curvature.factored:
            return
        ids = (np.asarray(query_ids).astype(str) if query_ids is not None
               else np.arange(len(query_x)).astype(str))
        if self.Q is not None and len(ids) == len(self.query_ids) and \
                np.array_equal(ids, np.asarray(self.query_ids).astype(str)):
            return
        gq = grads.per_example_gradients(self.imodel, query_x, query_y, self.batch_size)
        self.Q = self.solve(gq.astype(np.float64))
        self.query_ids = ids

    def solve(self, G: np.ndarray) -> np.ndarray:
        """``(H + damping I)^-1`` applied to the rows of ``G`` ``(m, d)``."""
        return self.curvature.solve(G)

    # -- feature maps -------------------------------------------------------------------------
    def _factored_maps(self, x, y, query: bool):
        if self.correction == "loo":
            return self._loo_factored_maps(self.curvature, x, y)
        maps = self.curvature.gradient_maps(x, y, train=True, query=query,
                                            inverse_norms=self.relatif)
        if self.relatif:
            maps["train"] /= np.maximum(maps["inverse_norms"], 1e-30)[:, None]
        return maps

    def _loo_factored_maps(self, curvature, x, y):
        """Leave-one-out-corrected maps of a factored curvature: ``train`` phi' (scored
        against the usual query features), ``query`` psi(g) and ``self`` ``g^T v``."""
        return curvature.loo_maps(x, y, self._loo_n())

    def _solved_maps_loo(self, x, y, want_self: bool):
        """Unfactored curvature, corrected: ``phi'_i = Q (g_i + J_i^T w_i)`` (C solves per
        example for ``H^-1 J_i^T``); self-influence from the curvature's factored approximation
        (corrected in its terms) when it has one, else one more solve per example."""
        n = self._loo_n()
        approx = self.curvature.self_curvature
        exact_self = want_self and approx is None
        phi = self_scores = None
        if self.Q is not None or exact_self:
            x = np.asarray(x)
            y = self.imodel.check_labels(y, len(x))
            self._warn_per_example_solves(len(x), "the leave-one-out correction")
            phis, selfs = [], []
            for start in range(0, len(x), self.batch_size):
                s = slice(start, start + self.batch_size)
                G, J, A = loo.hessian_factors(self.imodel, x[s], y[s], self.batch_size)
                w, b, _ = loo.solved_weights(self.solve, G, J, A, n)
                if self.Q is not None:
                    phis.append((G + np.matmul(w[:, None, :], J)[:, 0]) @ self.Q.T)
                if exact_self:
                    selfs.append(np.sum(G * self.solve(G), axis=1) + np.sum(b * w, axis=1))
            if self.Q is not None:
                phi = (np.concatenate(phis) if phis else np.zeros((0, len(self.Q))))
            if exact_self:
                self_scores = np.concatenate(selfs) if selfs else np.zeros(0)
        if want_self and approx is not None:
            self_scores = self._loo_factored_maps(approx, x, y)["self"]
        return phi, self_scores

    def _solved_maps(self, x, y, want_self: bool):
        """Unfactored: ``(phi or None, self or None)``. Self-influence comes from the
        curvature's factored approximation when it has one; otherwise (and for RelatIF norms)
        one system is solved per example (the gradients are computed once either way). phi
        needs the solved queries; it is None before they are known (self-influence only)."""
        if self.Q is None and not want_self:
            self._one_hot_queries(0, None)  # the error that says what to do
        if self.correction == "loo":
            return self._solved_maps_loo(x, y, want_self)

        def project():
            if self.Q is None:
                return None
            return grads.projected_gradients(self.imodel, x, y, self.Q.T,
                                             self.batch_size).astype(np.float64)
        if not (self.relatif or want_self):
            return project(), None
        approx = self.curvature.self_curvature
        if approx is not None and not self.relatif:
            # Self-influence at scale from the factored approximation (e.g. the Arnoldi model
            # that preconditions PCG): no per-example solves.
            from influence_ops.curvature.eigen import EigenCurvature
            if self.Q is not None and isinstance(approx, EigenCurvature):
                eigen = approx.eigen
                # One fused projection on [solved queries | the eigenbasis's train map]: one
                # forward and backward pass per block instead of two. psi = sign(lam) phi.
                m = len(self.Q)
                c = grads.projected_gradients(
                    self.imodel, x, y, np.concatenate([self.Q.T, eigen.projection("train")],
                                                      axis=1), self.batch_size
                ).astype(np.float64)
                t = c[:, m:]
                return c[:, :m], np.sum(t * t * np.sign(eigen.lam), axis=1)
            maps = approx.gradient_maps(x, y, train=True, query=True)
            return project(), np.sum(maps["train"] * maps["query"], axis=1)
        g = grads.per_example_gradients(self.imodel, x, y, self.batch_size).astype(np.float64)
        self._warn_per_example_solves(len(g), "RelatIF" if self.relatif else "self-influence")
        phi = None if self.Q is None else g @ self.Q.T
        sol = self.solve(g)
        norms = np.maximum(np.linalg.norm(sol, axis=1), 1e-30)
        self_scores = np.sum(g * sol, axis=1)
        if self.relatif:
            if phi is not None:
                phi /= norms[:, None]
            self_scores /= norms
        return phi, (self_scores if want_self else None)

    def train_features(self, x, y):
        self._check_fitted()
        phi = (self._factored_maps(x, y, query=False)["train"] if self.curvature.factored
               else self._solved_maps(x, y, want_self=False)[0])
        return phi.astype(model_float(self.imodel))

    def query_features(self, x, y, ids=None):
        self._check_fitted()
        dt = model_float(self.imodel)
        if self.curvature.factored:
            return self.curvature.query_maps(x, y).astype(dt)
        return self._one_hot_queries(len(x), ids).astype(dt)

    def self_query_features(self, x, y):
        if not self.curvature.factored:
            return None  # no query-side map for training examples: solve per example
        return self._factored_maps(x, y, query=True)["query"]

    def _one_hot_queries(self, m, ids):
        if self.Q is None:
            raise ValueError(f"solver {self.solver!r} solves its queries: call "
                             "prepare_queries(query_x, query_y, query_ids) (or pass the queries "
                             "to fit) before scoring")
        if ids is None:
            if m != len(self.query_ids):
                raise ValueError(f"{self.solver} was fitted on {len(self.query_ids)} queries; pass "
                                 "the query ids to query_features() to pick among them")
            return np.eye(m)
        pos = {q: i for i, q in enumerate(self.query_ids.tolist())}
        ids = np.asarray(ids).tolist()
        missing = [q for q in ids if q not in pos]
        if missing:
            raise ValueError(f"query ids {missing[:5]} were not in the fitted queries: "
                             f"{self.solver} must be fitted on every query it scores")
        out = np.zeros((len(ids), len(self.query_ids)))
        out[np.arange(len(ids)), [pos[q] for q in ids]] = 1.0
        return out

    def _warn_per_example_solves(self, n, what):
        if n > SMALL_N_SELF_SOLVES:
            log.warning("%s with solver=%s solves one system per training example (n=%d): "
                        "slow; prefer a factored solver (exact, arnoldi) at this scale", what,
                        self.solver, n)

    def featurize_train(self, x, y):
        self._check_fitted()
        dt = model_float(self.imodel)
        if not self.curvature.factored:
            phi, self_scores = self._solved_maps(x, y, want_self=True)
            return (None if phi is None else phi.astype(dt)), None, self_scores
        maps = self._factored_maps(x, y, query=True)
        phi, psi = maps["train"], maps["query"]
        return phi.astype(dt), psi.astype(dt), np.sum(phi * psi, axis=1)

    def influence_vectors(self, x, y) -> np.ndarray:
        """``-(H + damping)^-1 g`` per example ``(n, d)``: the first-order change of theta when
        the example is up-weighted (Influenciae's ``compute_influence_vector``); removing it
        moves theta by about ``-vector / n``."""
        self._check_fitted()
        if self.correction == "loo":
            # -(H - H_i/n)^-1 g_i: removing the example moves theta by about -vector / n
            # (one Newton step on the leave-one-out objective).
            G, J, A = loo.hessian_factors(self.imodel, x, y, self.batch_size)
            return -loo.corrected_solutions(self.solve, G, J, A, self._loo_n())
        g = grads.per_example_gradients(self.imodel, x, y, self.batch_size).astype(np.float64)
        return -self.solve(g)

    # -- state ----------------------------------------------------------------------------------
    def params(self):
        return {"solver": self.solver, "curvature": self.curvature.params(),
                "n_train": self.n_train}

    def arrays(self):
        out = {f"curvature.{k}": v for k, v in self.curvature.arrays().items()}
        if self.n_train:
            out["n_train"] = np.asarray(self.n_train, np.int64)
        if not self.curvature.factored and self.Q is not None:  # None: fitted without queries
            out.update({"Q": self.Q, "query_ids": self.query_ids.astype(str)})
        return out

    def restore(self, arrays):
        prefix = "curvature."
        self.curvature.restore({k[len(prefix):]: v for k, v in arrays.items()
                                if k.startswith(prefix)})
        if not self.curvature.factored:
            self.Q, self.query_ids = arrays.get("Q"), arrays.get("query_ids")
        self.n_train = int(arrays["n_train"]) if "n_train" in arrays else None
        self.fitted = True

    @property
    def feature_dim(self) -> int:
        if self.curvature.factored:
            return self.curvature.feature_dim
        return 0 if self.query_ids is None else len(self.query_ids)


@register_method("relatif")
class RelatIF(FirstOrderInfluence):
    """RelatIF (Barshan et al. 2020): influence divided by ``||(H + damping)^-1 g_train||``."""

    relatif = True
    loo_correction = False
