"""Curvature models that solve systems iteratively from Hessian-vector products: conjugate
gradient (Martens 2010) and LiSSA (Agarwal et al. 2017).

They keep the fit sample (``fit_x``, ``fit_y``) and solve ``(H + damping) X = G`` on demand;
they have no feature map (``factored = False``), so influence methods solve the queries once
at fit time. The sample travels inside the artifact so workers can solve new systems
(self-influence, RelatIF norms, group influence); these solvers are meant for small samples.
"""

from __future__ import annotations

import numpy as np

from influence_ops import gradients as grads
from influence_ops import solvers
from influence_ops.curvature.base import Curvature
from influence_ops.curvature.eigen import HVP_BATCH
from influence_ops.registry import register_curvature


class SampleCurvature(Curvature):
    """Holds the fit sample; subclasses implement :meth:`solve`."""

    _acts = None

    def fit(self, x, y):
        self.fit_x, self.fit_y = np.asarray(x), np.asarray(y)
        self._acts = None
        self.fitted = True
        return self

    @property
    def activations(self) -> grads.FrontActivations:
        """The fit sample through the frozen layers, computed once per process (every
        Hessian-vector product of every solve runs only the head on it)."""
        if self._acts is None:
            self._acts = grads.front_activations(self.imodel, self.fit_x)
        return self._acts

    def hvp(self, V):
        return grads.hessian_vector_products(self.imodel, self.activations, self.fit_y, V,
                                             HVP_BATCH)

    def arrays(self):
        return {"fit_x": self.fit_x, "fit_y": self.fit_y}

    def restore(self, arrays):
        self.fit_x, self.fit_y = arrays["fit_x"], arrays["fit_y"]
        self._acts = None
        self.fitted = True


@register_curvature("cg")
class ConjugateGradientCurvature(SampleCurvature):
    """Batched conjugate gradient: one recursion per right-hand side, shared HVP calls."""

    def __init__(self, imodel, config):
        super().__init__(imodel, config)
        self.max_iter, self.tol = int(config.cg_max_iter), float(config.cg_tol)

    def solve(self, G):
        self._check_fitted()
        return solvers.conjugate_gradient(self.hvp, G, self.damping, self.max_iter, self.tol)


@register_curvature("lissa")
class LissaCurvature(SampleCurvature):
    """Truncated Neumann series on mini-batch Hessians (``lissa_*`` options)."""

    def __init__(self, imodel, config):
        super().__init__(imodel, config)
        self.scale, self.depth = float(config.lissa_scale), int(config.lissa_depth)
        self.repeats, self.batch = int(config.lissa_repeats), int(config.lissa_batch)
        self.seed = int(config.seed)

    def solve(self, G):
        self._check_fitted()
        x, y = self.activations, self.fit_y
        n = len(x)
        b = min(self.batch, n)

        def sample(V, rng):
            idx = rng.choice(n, size=b, replace=False)
            return grads.hessian_vector_products(self.imodel, x[idx], np.asarray(y)[idx], V, b)
        return solvers.lissa(sample, G, self.damping, self.scale, self.depth, self.repeats,
                             self.seed)
