"""TracIn-CP (Pruthi et al. 2020): influence as gradient agreement along training."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from influence_ops import gradients as grads
from influence_ops.config import ConfigError
from influence_ops.methods.base import InfluenceMethod
from influence_ops.model import InfluenceModel
from influence_ops.registry import register_method


@register_method("tracin")
class TracIn(InfluenceMethod):
    """TracIn-CP (Pruthi et al. 2020): ``sum_c eta_c <g_c(z_test), g_c(z_train)>``.

    ``checkpoints``: Keras models or ``.keras`` paths saved during training; ``learning_rates``:
    the step size in force at each one. Feature map ``phi = psi = concat_c sqrt(eta_c) R_c g_c``
    where ``R_c`` is a seeded Gaussian ``(d, projection_dim)`` projection (Johnson-Lindenstrauss:
    inner products are kept in expectation) or the identity when ``projection_dim`` is None.
    Self-influence ``sum_c eta_c ||g_c(z)||^2`` flags mislabeled examples.
    """

    def __init__(self, imodel: InfluenceModel, checkpoints: Sequence, learning_rates: Sequence[float],
                 projection_dim: Optional[int] = None, seed: int = 0,
                 batch_size: int = grads.DEFAULT_BATCH):
        super().__init__(imodel)
        if len(checkpoints) != len(learning_rates) or not checkpoints:
            raise ValueError("TracIn needs one learning rate per checkpoint (and >= 1 checkpoint)")
        self.checkpoint_paths = [c if isinstance(c, str) else None for c in checkpoints]
        self.learning_rates = [float(e) for e in learning_rates]
        self.projection_dim = int(projection_dim) if projection_dim else None
        self.seed, self.batch_size = int(seed), int(batch_size)
        target = [l.name for l in imodel.target_layers]
        self.checkpoint_models = [
            InfluenceModel(c, target_layers=target, loss=imodel._loss_fn, l2=imodel.l2,
                           regularizers=imodel.regularizers)
            for c in checkpoints]
        self.fitted = True  # nothing to fit beyond the seeded projections

    @classmethod
    def from_config(cls, imodel, config):
        return cls(imodel, list(config.checkpoints), list(config.learning_rates),
                   config.projection_dim or None, config.seed, config.batch_size)

    @classmethod
    def validate_config(cls, config):
        ck, lr = config.checkpoints, config.learning_rates
        if not ck or len(ck) != len(lr):
            raise ConfigError("--method=tracin needs --checkpoints and one --learning_rates "
                              f"value per checkpoint (got {len(ck)} checkpoints, {len(lr)} "
                              "rates)")

    def _projection(self, c: int):
        if self.projection_dim is None:
            return None
        im = self.checkpoint_models[c]
        return grads.random_directions(im.n_params, self.projection_dim, self.seed + c,
                                       im.dtype.as_numpy_dtype)

    def fit(self, x=None, y=None, query_x=None, query_y=None, query_ids=None):
        return self

    def train_features(self, x, y):
        parts = []
        for c, (im, eta) in enumerate(zip(self.checkpoint_models, self.learning_rates)):
            proj = self._projection(c)
            g = (grads.per_example_gradients(im, x, y, self.batch_size) if proj is None
                 else grads.projected_gradients(im, x, y, proj, self.batch_size))
            parts.append(np.sqrt(eta) * g)
        return np.concatenate(parts, axis=1)

    def query_features(self, x, y, ids=None):
        return self.train_features(x, y)

    def influence_vectors(self, x, y):
        """``concat_c sqrt(eta_c) R_c g_c(z)`` ``(n, k)`` (Influenciae's TracIn influence
        vector): its inner product with the same vector of a query is the TracIn score."""
        return self.train_features(x, y)

    def self_influence(self, x, y):
        f = self.train_features(x, y).astype(np.float64)
        return np.sum(f * f, axis=1)

    def featurize_train(self, x, y):
        f = self.train_features(x, y)
        return f, f, np.sum(f.astype(np.float64) ** 2, axis=1)

    def params(self):
        return {"checkpoints": self.checkpoint_paths, "learning_rates": self.learning_rates,
                "projection_dim": self.projection_dim, "seed": self.seed,
                "checkpoint_fingerprints": [m.fingerprint() for m in self.checkpoint_models]}

    def restore(self, arrays):
        self.fitted = True
