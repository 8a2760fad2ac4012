"""The method protocol: every influence method as a pair of feature maps.

    score(z_train, z_test) = < train_features(z_train), query_features(z_test) >
    self(z)                = < train_features(z), query_features(z) >

A method is fitted once (:meth:`InfluenceMethod.fit`, the pipeline's reduce step), saved as an
artifact, and then applied to any number of blocks. Sign convention (as in Influenciae):

    influence(z_train, z_test) = g_test^T H^-1 g_train

positive = proponent (removing ``z_train`` would *raise* the test loss), negative = opponent.
Removing ``z_train`` from the n training examples changes the test loss by about
``influence / n``; first-order group scores are sums over members, so removing a group changes
the test loss by about ``group_score / n``.

A new method is one module: a subclass registered with ``@register_method("name")`` that
implements :meth:`from_config` (read its options from the
:class:`~influence_ops.config.InfluenceConfig`), :meth:`fit`, the two feature maps, and
:meth:`arrays` / :meth:`restore` for its artifact.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from influence_ops.model import InfluenceModel


def model_float(imodel: InfluenceModel):
    """The numpy dtype features are returned in (the model's: float32 or float64)."""
    return imodel.dtype.as_numpy_dtype


class InfluenceMethod:
    """Base class: a fitted pair of feature maps."""

    registered_name = "base"
    needs_queries = False          # True when fit() must see the queries (CG, LiSSA)
    self_influence_at_scale = True
    second_order_groups = False    # True when it solves with H (second-order group influence)

    def __init__(self, imodel: InfluenceModel):
        self.imodel = imodel
        self.fitted = False

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, imodel: InfluenceModel, config) -> "InfluenceMethod":
        """The method with the options of ``config`` (an ``InfluenceConfig``)."""
        raise NotImplementedError

    @classmethod
    def validate_config(cls, config) -> None:
        """Raises ``ConfigError`` for option values this method cannot use."""

    @property
    def name(self) -> str:
        return self.registered_name

    # -- fitting (the reduce step) ------------------------------------------------------------
    def fit(self, x, y, query_x=None, query_y=None, query_ids=None) -> "InfluenceMethod":
        raise NotImplementedError

    @classmethod
    def prepare_queries(self, query_x, query_y, query_ids=None) -> None:
        """Work that depends on the queries before scoring them (solving them, for methods
        whose curvature has no feature map); a no-op by default."""

    @classmethod
    def combiner(cls, config, imodel_factory):
        """A combiner whose output fits this method from all training data (see
        :meth:`fit_from_combined`), or None when it fits on a sample. A class method: the
        pipeline builds it from the config before any model is loaded."""
        return None

    def fit_from_combined(self, output) -> "InfluenceMethod":
        raise NotImplementedError

    # -- feature maps -------------------------------------------------------------------------
    def train_features(self, x, y) -> np.ndarray:
        """phi: ``(n, k)``."""
        raise NotImplementedError

    def query_features(self, x, y, ids=None) -> np.ndarray:
        """psi: ``(m, k)``; ``ids`` are needed by methods that fitted on the queries."""
        raise NotImplementedError

    def self_query_features(self, x, y) -> Optional[np.ndarray]:
        """psi of training examples (for self-influence and group self-influence)."""
        return self.query_features(x, y)

    def self_influence(self, x, y) -> np.ndarray:
        """``<phi(z), psi(z)>`` per example, ``(n,)``."""
        return self.featurize_train(x, y)[2]

    def featurize_train(self, x, y):
        """One pass for the pipeline: ``(phi (n, k), psi on itself (n, k) or None, self (n,))``."""
        phi = self.train_features(x, y)
        psi = self.self_query_features(x, y)
        return phi, psi, np.sum(phi.astype(np.float64) * psi.astype(np.float64), axis=1)

    def scores(self, query_x, query_y, train_x, train_y, query_ids=None) -> np.ndarray:
        """``(m, n)`` test x train influence."""
        q = self.query_features(query_x, query_y, query_ids).astype(np.float64)
        t = self.train_features(train_x, train_y).astype(np.float64)
        return q @ t.T

    # -- state --------------------------------------------------------------------------------
    def params(self) -> dict:
        """JSON-able facts about the fit (recorded in the artifact manifest)."""
        return {}

    def arrays(self) -> Dict[str, np.ndarray]:
        """Fitted arrays (saved as ``arrays.npz``)."""
        return {}

    def restore(self, arrays: Dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def _check_fitted(self):
        if not self.fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit() or load it")
