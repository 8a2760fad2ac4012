"""Kronecker-factored curvature: EK-FAC (George et al. 2018) and K-FAC (Martens & Grosse 2015;
Grosse & Martens 2016 for Conv2D) over Dense / Conv2D target layers.

Per layer, ``H ~ (Q_A kron Q_S) diag(Lambda) (Q_A kron Q_S)^T`` with ``Q_A``/``Q_S`` the
eigenvectors of the input and output-gradient covariances and ``Lambda`` the EK-FAC corrected
eigenvalues (K-FAC: their Kronecker products); the numerics are in :mod:`influence_ops.ekfac`.
Feature maps ``phi = psi = (Lambda + damping)^-1/2 (Q_A^T G Q_S)``, computed from each
layer's inputs and output gradients without forming the per-example gradient. Damping:
``--damping`` when > 0 (absolute, as for every solver), otherwise
``--ekfac_relative_damping`` (default 0.1) times the mean eigenvalue. Labels for the output
gradients come from ``--fisher``: sampled from the model (``true_fisher``, the GGN for
cross-entropy), the given labels (``empirical``) or the exact expectation (``exact_ggn``).
"""

from __future__ import annotations

import numpy as np

from influence_ops import ekfac
from influence_ops.curvature.base import Curvature
from influence_ops.registry import register_curvature


class _CorrectionPass(ekfac.EKFACCorrectionCombiner):
    """The correction pass as the pipeline's second combine: the first pass's factors arrive
    as the side input keyword ``factors``."""

    previous_keyword = "factors"


@register_curvature("ekfac")
class EKFACCurvature(Curvature):
    """EK-FAC: Kronecker eigenbasis with corrected eigenvalues (a second pass over the data)."""

    factored = True
    corrected = True

    def __init__(self, imodel, config):
        super().__init__(imodel, config)
        ekfac.supported_layers(imodel)  # a clear error for unsupported target layers now
        self.sampling, self.seed = config.fisher, int(config.seed)
        self.relative_damping = float(config.ekfac_relative_damping)
        self.model = None

    @classmethod
    def combiner(cls, config, imodel_factory):
        """Fit over all training blocks: the factors' pass, then (EK-FAC) the correction pass."""
        damping = float(config.damping) or None
        passes = [ekfac.KFACFactorsCombiner(imodel_factory, config.fisher, int(config.seed),
                                            int(config.batch_size))]
        if cls.corrected:
            # The factors arrive later (a side input): the sampling must be given here, or
            # the correction pass would default to the true Fisher whatever --fisher says.
            passes.append(_CorrectionPass(imodel_factory, sampling=config.fisher,
                                          seed=int(config.seed), damping=damping,
                                          rel_damping=float(config.ekfac_relative_damping),
                                          batch_size=int(config.batch_size)))
        return passes

    def fit_from_combined(self, output):
        """From the last pass: an EKFAC (corrected) or the K-FAC factors."""
        if isinstance(output, ekfac.EKFAC):
            self.model = output
        else:
            self.model = ekfac.EKFAC.build(output, self.imodel, damping=self.damping or None,
                                           rel_damping=self.relative_damping)
        self.fitted = True
        return self

    def fit(self, x, y):
        self.model = ekfac.fit_ekfac(
            self.imodel, x, y, sampling=self.sampling, damping=self.damping or None,
            seed=self.seed, batch_size=self.batch_size, rel_damping=self.relative_damping,
            correct=self.corrected)
        self.fitted = True
        return self

    @property
    def feature_dim(self) -> int:
        return self.model.d

    def solve(self, G):
        self._check_fitted()
        return self.model.apply_inverse(G)

    def gradient_maps(self, x, y, train=True, query=True, inverse_norms=False):
        self._check_fitted()
        f = self.model.features(self.imodel, x, y, self.batch_size).astype(np.float64)
        out = {}
        if train:
            out["train"] = f
        if query:
            out["query"] = f
        if inverse_norms:
            # ||H^-1 g|| = ||(Lambda + damping)^-1/2 f||: the rotation is orthogonal.
            inv_sqrt = np.concatenate([p.reshape(-1) for p in self.model._powers(-0.5)])
            out["inverse_norms"] = np.linalg.norm(f * inv_sqrt[None, :], axis=1)
        return out

    def query_maps(self, x, y):
        self._check_fitted()
        return self.model.features(self.imodel, x, y, self.batch_size)

    def train_map(self, G):
        return self.model.features_from_gradients(G)

    query_map = train_map

    def params(self):
        return self.model.params() if self.model is not None else {}

    def arrays(self):
        return self.model.arrays()

    def restore(self, arrays):
        self.model = ekfac.EKFAC.from_arrays(arrays)
        self.fitted = True


@register_curvature("kfac")
class KFACCurvature(EKFACCurvature):
    """K-FAC: the same Kronecker eigenbasis, eigenvalues the products of the factors'
    (one pass over the data, no correction)."""

    corrected = False
