"""The curvature protocol: a model of ``H + damping I`` and its inverse, behind one interface.

``H`` is the Hessian of the training objective ``mean_i l(z_i) + l2/2 ||theta||^2`` with
respect to the target weights theta (``d`` numbers, see :class:`InfluenceModel`). Influence
methods hold a :class:`Curvature` object and never branch on its name:

* every curvature **solves**: :meth:`Curvature.solve` applies ``(H + damping)^-1`` to a block
  of vectors ``(n, d)``;
* a **factored** curvature (``factored = True``: exact eigendecomposition, Arnoldi, EK-FAC)
  also offers symmetric feature maps ``phi(g)``/``psi(g)`` with
  ``<psi(g_test), phi(g_train)> = g_test^T (H + damping)^-1 g_train``, computed from the
  per-example gradients of a block in one fused pass (:meth:`Curvature.gradient_maps`). The
  pipeline then scores training blocks against query features without solving anything;
* an unfactored curvature (CG, LiSSA) solves the queries once at fit time, and training
  examples are scored by projecting their gradients on those solutions.

Fitting comes in two forms: :meth:`Curvature.fit` on a sample in memory, or
:meth:`Curvature.fit_from_combined` from the output of the Beam-free combiner returned by
:meth:`Curvature.combiner` (a distributed sum over all training blocks: exact Hessian,
Kronecker factors). A new curvature model is one module with a class registered by
``@register_curvature("name")``; its constructor reads what it needs from the
:class:`~influence_ops.config.InfluenceConfig`.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from influence_ops.model import InfluenceModel


class Curvature:
    """Base class. Subclasses set ``factored`` and implement what their kind needs."""

    registered_name = "base"
    factored = False
    # An unfactored curvature may offer a factored approximation of itself (e.g. PCG's
    # Arnoldi preconditioner) that serves self-influence at scale without per-example solves.
    self_curvature: Optional["Curvature"] = None

    def __init__(self, imodel: InfluenceModel, config):
        self.imodel = imodel
        self.config = config
        self.damping = float(config.damping)
        self.batch_size = int(config.batch_size)
        self.fitted = False

    # -- fitting ------------------------------------------------------------------------------
    @classmethod
    def combiner(cls, config, imodel_factory):
        """A combiner (``influence_ops.combiners`` protocol) whose output fits this curvature
        from all training data (:meth:`fit_from_combined`), or None when it fits on a sample.
        A class method: the pipeline builds the combiner before any model is loaded."""
        return None

    def fit(self, x, y) -> "Curvature":
        raise NotImplementedError

    def fit_from_combined(self, output) -> "Curvature":
        raise NotImplementedError(f"{self.registered_name} has no combiner")

    # -- applying -----------------------------------------------------------------------------
    def solve(self, G: np.ndarray) -> np.ndarray:
        """``(H + damping I)^-1`` applied to the rows of ``G`` ``(n, d)``; float64 ``(n, d)``."""
        raise NotImplementedError

    # Factored curvatures only ---------------------------------------------------------------
    @property
    def feature_dim(self) -> int:
        raise NotImplementedError

    def gradient_maps(self, x, y, train: bool = True, query: bool = True,
                      inverse_norms: bool = False) -> Dict[str, np.ndarray]:
        """From one pass over the per-example gradients ``g`` of a block: ``train`` (phi,
        ``(n, k)``), ``query`` (psi on the same examples) and ``inverse_norms``
        (``||(H + damping)^-1 g||``, ``(n,)``), float64, whichever are asked for."""
        raise NotImplementedError

    def query_maps(self, x, y) -> np.ndarray:
        """psi of query examples ``(m, k)`` in the model's dtype (the cheapest path)."""
        return self.gradient_maps(x, y, train=False, query=True)["query"]

    def train_map(self, G: np.ndarray) -> np.ndarray:
        """phi of explicit vectors ``(n, d)`` (not necessarily gradients), float64."""
        raise NotImplementedError

    def loo_maps(self, x, y, n: float) -> Dict[str, np.ndarray]:
        """Leave-one-out-corrected maps (:mod:`influence_ops.loo`) of a block: ``train``
        (phi' with ``<psi(g_test), phi'_i> = g_test^T (H - H_i/n)^-1 g_i`` in this model's
        terms), ``query`` (psi of the block's own gradients) and ``self`` ``(n,)``. This
        default runs the Woodbury step on :meth:`factor_maps` in chunks of ``batch_size``."""
        from influence_ops import loo
        x = np.asarray(x)
        y = self.imodel.check_labels(y, len(x))
        parts = {"train": [], "query": [], "self": []}
        for start in range(0, len(x), self.batch_size):
            s = slice(start, start + self.batch_size)
            maps = self.factor_maps(x[s], y[s])
            out = loo.corrected_from_maps(maps["g_train"], maps["g_query"], maps["J_train"],
                                          maps["J_query"], maps["A"], n)
            parts["train"].append(out["train"])
            parts["query"].append(maps["g_query"])
            parts["self"].append(out["self"])
        if not len(x):
            k = self.feature_dim
            return {"train": np.zeros((0, k)), "query": np.zeros((0, k)), "self": np.zeros(0)}
        return {key: np.concatenate(v) for key, v in parts.items()}

    def factor_maps(self, x, y) -> Dict[str, np.ndarray]:
        """The maps the leave-one-out correction needs (:mod:`influence_ops.loo`): of the
        per-example gradients (``g_train``, ``g_query`` ``(n, k)``) and of the rows of the
        logits' Jacobians (``J_train``, ``J_query`` ``(n, C, k)``), and the loss Hessians in
        the logits ``A`` ``(n, C, C)``. This default maps the explicit ``(n, C, d)`` Jacobians
        with :meth:`train_map` / :meth:`query_map`."""
        from influence_ops import loo
        G, J, A = loo.hessian_factors(self.imodel, x, y, self.batch_size)
        n, C, d = J.shape
        flat = J.reshape(n * C, d)
        return {"g_train": np.asarray(self.train_map(G), np.float64),
                "g_query": np.asarray(self.query_map(G), np.float64),
                "J_train": np.asarray(self.train_map(flat), np.float64).reshape(n, C, -1),
                "J_query": np.asarray(self.query_map(flat), np.float64).reshape(n, C, -1),
                "A": A}

    def query_map(self, G: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    # -- state --------------------------------------------------------------------------------
    def params(self) -> dict:
        """JSON-able facts about the fitted curvature (recorded in the artifact)."""
        return {}

    def arrays(self) -> Dict[str, np.ndarray]:
        return {}

    def restore(self, arrays: Dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def _check_fitted(self):
        if not self.fitted:
            raise RuntimeError(f"curvature {self.registered_name!r} is not fitted")


def build_curvature(imodel: InfluenceModel, config, name: Optional[str] = None) -> Curvature:
    """The registered curvature model ``name`` (default ``config.solver``)."""
    from influence_ops import registry
    return registry.get_curvature(name or config.solver)(imodel, config)
