"""Exact query solves at scale: preconditioned conjugate gradient (``--solver=pcg``).

``H^-1`` is dominated by the small eigenvalues that a low-rank model drops, so low-rank
influence ranks proponents poorly. The queries are few: solve ``(H + damping) psi_q = g_q``
for all of them at once by conjugate gradient on the fit sample (one batched
Hessian-vector-product pass per iteration for the whole block), preconditioned by a cheap
curvature model fitted first:

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

from influence_ops import gradients as grads
from influence_ops import pcg, solvers
from influence_ops.curvature.eigen import HVP_BATCH
from influence_ops.curvature.iterative import SampleCurvature
from influence_ops.registry import register_curvature

log = logging.getLogger(__name__)
TRACE_PROBES = 16


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
        self.last_info = {}

    def _hvp(self):
        return lambda V: grads.hessian_vector_products(self.imodel, self.fit_x, self.fit_y, V,
                                                       HVP_BATCH)

    def fit(self, x, y):
        super().fit(x, y)
        if self.kind == "arnoldi":
            eigen = solvers.arnoldi(self._hvp(), self.imodel.n_params, self.n_iter, self.rank,
                                    self.damping, "drop", self.seed)
            self.deflation = pcg.DeflationPreconditioner.from_hvp(
                eigen, self._hvp(), self.damping, TRACE_PROBES, self.seed)
        elif self.kind == "ekfac":
            from influence_ops.curvature.kronecker import EKFACCurvature
            self.kronecker = EKFACCurvature(self.imodel, self.config).fit(x, y)
        return self

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
        X, info = pcg.block_pcg(self._hvp(), G, self.damping, self._preconditioner(),
                                self.max_iter, self.tol, progress)
        self.last_info = {"iterations": int(info["iterations"]),
                          "converged": int(np.sum(info["converged"])), "systems": len(G),
                          "max_rel_residual": float(np.max(info["rel_residuals"]))
                          if len(G) else 0.0}
        log.info("pcg (%s preconditioner): %d iterations for %d systems, %d converged",
                 self.kind, self.last_info["iterations"], len(G), self.last_info["converged"])
        return X

    def params(self):
        return {"preconditioner": self.kind, "last_solve": self.last_info}

    def arrays(self):
        out = super().arrays()
        if self.deflation is not None:
            out.update({"U": self.deflation.U, "lam": self.deflation.lam,
                        "tau": np.array(self.deflation.tau)})
        if self.kronecker is not None:
            out.update({f"ekfac.{k}": v for k, v in self.kronecker.arrays().items()})
        return out

    def restore(self, arrays):
        super().restore(arrays)
        if "U" in arrays:
            self.deflation = pcg.DeflationPreconditioner(arrays["U"], arrays["lam"],
                                                         float(arrays["tau"]))
        kron = {k[len("ekfac."):]: v for k, v in arrays.items() if k.startswith("ekfac.")}
        if kron:
            from influence_ops.curvature.kronecker import EKFACCurvature
            self.kronecker = EKFACCurvature(self.imodel, self.config)
            self.kronecker.restore(kron)
