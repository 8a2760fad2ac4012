"""Exact query solves at scale: preconditioned conjugate gradient (``--solver=pcg``).

``H^-1`` is dominated by the small eigenvalues that a low-rank model drops, so low-rank
influence ranks proponents poorly. The queries are few: solve ``(H + damping) psi_q = g_q``
for all of them at once by block conjugate gradient on the fit sample (one batched
Hessian-vector-product pass per iteration for the whole block of queries, searching the Krylov
space of the whole block), preconditioned by a cheap curvature model fitted first:

* ``--preconditioner=arnoldi`` (default): the top ``--rank`` eigenpairs from
  ``--arnoldi_iter`` HVPs, as a deflation ``U Lambda^-1 U^T + (I - U U^T) / tau`` with
  ``tau`` the mean of the remaining spectrum (Hutchinson trace estimate);
* ``--preconditioner=ekfac``: the EK-FAC inverse (Dense / Conv2D targets);
* ``none``: plain CG.

Then training examples are scored against the solved queries by projecting their gradients
(the unfactored path of :class:`~influence_ops.methods.influence.FirstOrderInfluence`), which
for Dense layers never forms the per-example gradient. The result is the exact influence up
to the stopping tolerance ``--cg_tol`` (relative residual); iteration counts are logged and
recorded in the artifact.
"""

from __future__ import annotations

import logging

import numpy as np

from influence_ops import pcg, solvers, tf_setup
from influence_ops.curvature.iterative import SampleCurvature
from influence_ops.registry import register_curvature

log = logging.getLogger(__name__)
TRACE_PROBES = 16
#: Queries per block of block CG (:func:`influence_ops.pcg.block_pcg`, ``method='block'``).
#: Its host work per iteration grows as ``rows^2 d`` against ``rows`` HVPs over the fit sample.
BLOCK_ROWS = 128
AUTO_DAMPING = 1e-3  # fraction of the mean eigenvalue added when H + damping is not PD
DAMPING_RETRIES = 4  # solves again with more damping after non-positive curvature


@register_curvature("pcg")
class PreconditionedCGCurvature(SampleCurvature):
    """Block-batched PCG on the fit sample with a deflation or EK-FAC preconditioner."""

    def __init__(self, imodel, config):
        super().__init__(imodel, config)
        self.kind = config.preconditioner
        self.rank, self.n_iter, self.seed = int(config.rank), int(config.arnoldi_iter), \
            int(config.seed)
        self.max_iter, self.tol = int(config.cg_max_iter), float(config.cg_tol)
        self.config = config
        self.deflation = None
        self.kronecker = None
        self.added_damping = 0.0
        self.last_info = {}

    def fit(self, x, y):
        super().fit(x, y)
        self._eigen_curvature = None
        self.added_damping, self.damping = 0.0, float(self.config.damping)
        if self.kind == "arnoldi":
            # All Ritz pairs, negatives kept: they show whether H + damping is indefinite.
            steps = min(self.n_iter, self.imodel.n_params)
            ritz = solvers.arnoldi(self.hvp, self.imodel.n_params, steps, steps,
                                   self.damping, "keep", self.seed)
            self._shift_if_indefinite(float(ritz.lam.min()), "the Arnoldi Ritz values")
            eigen = solvers.select_eigenpairs(ritz.lam + self.added_damping, ritz.U, 0.0,
                                              self.rank, "drop")
            self.deflation = pcg.DeflationPreconditioner.from_hvp(
                eigen, self.hvp, self.damping, TRACE_PROBES, self.seed)
        elif self.kind == "ekfac":
            from influence_ops.curvature.kronecker import EKFACCurvature
            self.kronecker = EKFACCurvature(self.imodel, self.config).fit(x, y)
        return self

    @property
    def self_curvature(self):
        """The preconditioner as a factored curvature: self-influence from the top ``--rank``
        eigenpairs (Arnoldi), or from EK-FAC; None for ``--preconditioner=none``."""
        if self.kronecker is not None:
            return self.kronecker
        if self.deflation is None:
            return None
        if getattr(self, "_eigen_curvature", None) is None:
            from influence_ops.curvature.eigen import EigenCurvature
            c = EigenCurvature(self.imodel, self.config)
            c.eigen = solvers.EigenInverse(U=self.deflation.U, lam=self.deflation.lam)
            c.fitted = True
            self._eigen_curvature = c
        return self._eigen_curvature

    def _preconditioner(self):
        if self.deflation is not None:
            return self.deflation
        if self.kronecker is not None:
            return self.kronecker.solve
        return None

    def solve(self, G):
        self._check_fitted()
        G = np.atleast_2d(np.asarray(G, np.float64))
        pcg.warn_if_large(len(G), len(self.fit_x), self.imodel.n_params, self.max_iter)

        def progress(i, total, active, worst):
            if i % 10 == 0:
                log.info("pcg: iteration %d/%d, %d systems left, worst residual %.1e", i,
                         total, active, worst)
        for attempt in range(DAMPING_RETRIES + 1):
            try:
                X, info = self._block_pcg(G, progress)
                break
            except pcg.NotPositiveDefiniteError as e:
                if attempt == DAMPING_RETRIES:
                    raise
                self._add_damping_for(e)
        self.last_info = {"iterations": int(info["iterations"]),
                          "converged": int(np.sum(info["converged"])), "systems": len(G),
                          "max_rel_residual": float(np.max(info["rel_residuals"]))
                          if len(G) else 0.0}
        log.info("pcg (%s preconditioner): %d iterations for %d systems, %d converged",
                 self.kind, self.last_info["iterations"], len(G), self.last_info["converged"])
        return X

    def _shift_if_indefinite(self, lam_min: float, seen_by: str) -> None:
        """Eigenvalue policy of pcg: CG needs ``H + damping`` positive definite. When
        ``lam_min`` (of ``H + damping``) is not positive (a non-convex model, or float32
        rounding), add ``1.1 |lam_min|`` plus ``AUTO_DAMPING`` x the mean eigenvalue to the
        damping and warn; the added damping is recorded in the artifact."""
        if lam_min > 0:
            return
        d = self.imodel.n_params
        mean = abs(pcg.hutchinson_trace(self.hvp, d, TRACE_PROBES, self.seed)) / d
        delta = 1.1 * abs(lam_min) + AUTO_DAMPING * max(mean, 1e-12)
        log.warning("pcg: H + damping is not positive definite (smallest eigenvalue %.3g, from "
                    "%s): adding damping %.3g so conjugate gradient applies; scores are then "
                    "those of H + %.3g I. Pass --damping to choose it yourself.", lam_min,
                    seen_by, delta, self.damping + delta)
        self.added_damping += delta
        self.damping += delta

    def _add_damping_for(self, error):
        """Non-positive curvature met during the solve (rounding, or a negative eigenvalue the
        Ritz values missed): shift by the curvature CG saw and rebuild the preconditioner; the
        caller solves again (up to ``DAMPING_RETRIES`` times: a block direction shows only part
        of the negative curvature)."""
        old = self.damping
        self._shift_if_indefinite(min(getattr(error, "rayleigh", 0.0), 0.0), "the CG iteration")
        if self.deflation is not None:
            delta = self.damping - old
            keep = self.deflation.lam + delta > 0
            self.deflation = pcg.DeflationPreconditioner(
                self.deflation.U[:, keep], self.deflation.lam[keep] + delta,
                self.deflation.tau + delta)
            self._eigen_curvature = None

    def _block_pcg(self, G, progress):
        """Block CG over chunks of ``BLOCK_ROWS`` queries. Why block: the queries share one
        Hessian, and block CG searches the Krylov space of the whole block, so every HVP serves
        every query: on the digits benchmark (d = 330, 100 queries) 3 iterations / 298 HVP rows
        where one recursion per query needs 19 / 1,802; on the benchmark CNN (d = 25k, 100
        queries) 3 / 30 where it needs 4 / 395. The recursion's numpy algebra runs with one BLAS
        thread (:func:`influence_ops.tf_setup.single_threaded_blas`): it alternates with TF's
        HVPs, and OpenBLAS threads fighting TF's pool made it 10x slower on 2 cores."""
        with tf_setup.single_threaded_blas():
            return pcg.block_pcg(self.hvp, G, self.damping, self._preconditioner(),
                                 self.max_iter, self.tol, progress, method="block",
                                 max_block_rows=BLOCK_ROWS)

    def params(self):
        return {"preconditioner": self.kind, "last_solve": self.last_info,
                "added_damping": self.added_damping}

    def arrays(self):
        out = super().arrays()
        out["added_damping"] = np.array(self.added_damping)
        if self.deflation is not None:
            out.update({"U": self.deflation.U, "lam": self.deflation.lam,
                        "tau": np.array(self.deflation.tau)})
        if self.kronecker is not None:
            out.update({f"ekfac.{k}": v for k, v in self.kronecker.arrays().items()})
        return out

    def restore(self, arrays):
        super().restore(arrays)
        self._eigen_curvature = None
        self.added_damping = float(arrays.get("added_damping", 0.0))
        self.damping = float(self.config.damping) + self.added_damping
        if "U" in arrays:
            self.deflation = pcg.DeflationPreconditioner(arrays["U"], arrays["lam"],
                                                         float(arrays["tau"]))
        kron = {k[len("ekfac."):]: v for k, v in arrays.items() if k.startswith("ekfac.")}
        if kron:
            from influence_ops.curvature.kronecker import EKFACCurvature
            self.kronecker = EKFACCurvature(self.imodel, self.config)
            self.kronecker.restore(kron)
