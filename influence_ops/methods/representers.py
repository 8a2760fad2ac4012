"""Representer points: RPS-L2 (Yeh et al. 2018) and RPS-LJE (Sui et al. 2021).

Both explain the pre-activation output of the model's last Dense layer as a sum of one term
per training example (the representer value); positive = the example pushes the explained
logit up. Query labels choose the explained class (pass predicted labels to explain
predictions).
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from influence_ops import gradients as grads
from influence_ops.config import ConfigError
from influence_ops.curvature import build_curvature
from influence_ops.methods.base import InfluenceMethod, model_float
from influence_ops.model import InfluenceModel, InfluenceModelError
from influence_ops.registry import register_method

log = logging.getLogger(__name__)


def _labels_to_class(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:
        return np.argmax(y, axis=1)
    return y.reshape(-1).astype(np.int64)


def _binary_sign(y, n: int) -> np.ndarray:
    """+1 to explain class 1, -1 to explain class 0 of a one-unit (sigmoid) output."""
    y = np.asarray(y, dtype=np.float64).reshape(n, -1)[:, 0]
    return np.where(y >= 0.5, 1.0, -1.0)


def _dense_last_layer(imodel: InfluenceModel):
    import keras
    layer = imodel.model.layers[-1]
    if not isinstance(layer, keras.layers.Dense):
        raise InfluenceModelError(
            f"representer points need a Dense last layer, got {type(layer).__name__}")
    return layer


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@register_method("rps_l2")
class RepresenterPointsL2(InfluenceMethod):
    """RPS-L2 (Yeh et al. 2018): representer values from an L2-regularised last layer.

    Fit: with ``f_i`` the inputs of the last Dense layer ``(n, p)`` and ``t_i`` the model's own
    predicted probabilities, fit a bias-free surrogate ``W`` ``(p, C)`` minimising
    ``1/n sum_i CE(softmax(f_i W), t_i) + lam ||W||^2`` (sigmoid CE for one output). At its
    optimum the representer theorem gives ``f_t W = sum_i alpha_i f_i^T f_t`` with
    ``alpha_i = -1/(2 lam n) dCE_i/d(f_i W)`` ``(C,)``.

    Score of ``z_train`` for query ``z_test`` with label c: ``alpha_ic <f_i, f_t>``; positive =
    the example pushes the logit of class c up. Feature maps: ``phi = alpha (x) f``,
    ``psi = e_c (x) f`` (k = C * p). Pass predicted labels as query labels to explain the
    prediction. Self-influence ``alpha_{i,y_i} ||f_i||^2``.
    """

    def __init__(self, imodel: InfluenceModel, lam: float = 1e-3, max_iter: int = 2000,
                 batch_size: int = 1024):
        super().__init__(imodel)
        _dense_last_layer(imodel)
        self.lam, self.max_iter, self.batch_size = float(lam), int(max_iter), int(batch_size)
        self.W: Optional[np.ndarray] = None
        self.n_fit = 0
        self.fit_gradient_norm = float("nan")

    @classmethod
    def from_config(cls, imodel, config):
        return cls(imodel, lam=config.rps_lambda)

    @classmethod
    def validate_config(cls, config):
        if config.rps_lambda <= 0:
            raise ConfigError(f"--rps_lambda must be > 0, got {config.rps_lambda}")

    def _targets(self, x):
        out = grads.predictions(self.imodel, x, self.batch_size).astype(np.float64)
        act = getattr(self.imodel.model.layers[-1].activation, "__name__", "linear")
        if out.shape[1] == 1:
            return out if act == "sigmoid" else 1 / (1 + np.exp(-out))
        return out if act == "softmax" else _softmax(out)

    def _dloss(self, F, W, T):
        z = F @ W
        p = 1 / (1 + np.exp(-z)) if W.shape[1] == 1 else _softmax(z)
        return p - T  # d CE / d z, (n, C)

    def fit(self, x, y=None, query_x=None, query_y=None, query_ids=None):
        from scipy.optimize import minimize
        F = grads.penultimate_features(self.imodel, x, self.batch_size).astype(np.float64)
        T = self._targets(x)
        n, p = F.shape
        C = T.shape[1]
        lam = self.lam

        def objective(w):
            W = w.reshape(p, C)
            z = F @ W
            if C == 1:
                ce = np.logaddexp(0, z) - T * z
            else:
                zmax = z.max(axis=1, keepdims=True)
                lse = zmax[:, 0] + np.log(np.exp(z - zmax).sum(axis=1))
                ce = lse * T.sum(axis=1) - np.sum(T * z, axis=1)
            val = ce.sum() / n + lam * np.sum(W * W)
            grad = F.T @ self._dloss(F, W, T) / n + 2 * lam * W
            return val, grad.ravel()
        w0 = np.asarray(self.imodel.model.layers[-1].kernel.numpy(), np.float64).ravel()
        res = minimize(objective, w0, jac=True, method="L-BFGS-B",
                       options={"maxiter": self.max_iter, "gtol": 1e-12, "ftol": 1e-15})
        self.W = res.x.reshape(p, C)
        self.fit_gradient_norm = float(np.linalg.norm(res.jac))
        self.n_fit = n
        log.info("rps_l2 surrogate: %d L-BFGS iterations, |grad|=%.2e", res.nit,
                 self.fit_gradient_norm)
        self.fitted = True
        return self

    def alpha(self, x):
        """Representer weights ``(n, C)``."""
        self._check_fitted()
        F = grads.penultimate_features(self.imodel, x, self.batch_size).astype(np.float64)
        return F, -self._dloss(F, self.W, self._targets(x)) / (2 * self.lam * self.n_fit)

    def train_features(self, x, y=None):
        F, a = self.alpha(x)
        return (a[:, :, None] * F[:, None, :]).reshape(len(F), -1).astype(model_float(self.imodel))

    def query_features(self, x, y, ids=None):
        self._check_fitted()
        F = grads.penultimate_features(self.imodel, x, self.batch_size).astype(np.float64)
        C = self.W.shape[1]
        if C == 1:  # one logit: class 0 is explained by its negative
            return (F * _binary_sign(y, len(F))[:, None]).astype(model_float(self.imodel))
        cls = _labels_to_class(y)
        out = np.zeros((len(F), C, F.shape[1]))
        out[np.arange(len(F)), cls] = F
        return out.reshape(len(F), -1).astype(model_float(self.imodel))

    def influence_vectors(self, x, y=None):
        """``alpha_i (x) f_i`` ``(n, C * p)``: its inner product with ``e_c (x) f_t`` (the
        query features) is the representer value of class c; summed over the training set
        it is ``F W``, the surrogate's logits (:meth:`InfluenceCalculator.predict_with_kernel`)."""
        return self.train_features(x, y)

    @property
    def n_explained(self) -> int:
        """Number of explained outputs C (logits of the last Dense layer)."""
        return int(self.W.shape[1])

    def surrogate_logits(self, x):
        F = grads.penultimate_features(self.imodel, x, self.batch_size).astype(np.float64)
        return F @ self.W

    def params(self):
        return {"lam": self.lam, "max_iter": self.max_iter, "n_fit": self.n_fit,
                "fit_gradient_norm": self.fit_gradient_norm}

    def arrays(self):
        return {"W": self.W, "n_fit": np.array(self.n_fit)}

    def restore(self, arrays):
        self.W, self.n_fit = arrays["W"], int(arrays["n_fit"])
        self.fitted = True


@register_method("rps_lje")
class RepresenterPointsLJE(InfluenceMethod):
    """RPS-LJE (Sui et al. 2021): representer points by a local Jacobian (Newton) expansion.

    The last Dense layer's weights theta are perturbed by one gradient-ascent step,
    ``theta0 = theta + step * grad L(theta)``; one Newton step from theta0 recovers the trained
    weights: ``theta ~ theta0 - H0^-1 (1/n) sum_i g_i(theta0)``. The pre-activation output of
    class c at a test point is linear in theta, so it splits over training examples:

        z_c(t) ~ sum_i [ z0_c(t)/n - (1/n) (dz_c/dtheta)^T H0^-1 g_i(theta0) ]

    and the i-th term is the representer value of ``z_i`` (positive = supports class c). With an
    L2 term the Newton step also holds ``-H0^-1 l2 theta0``, shared equally by the n examples.
    In feature-map form ``phi_i = [eigen-map of g_i(theta0), 1]`` and
    ``psi_t = [-(1/n) eigen-map of dz_c/dtheta, (z0_c(t) - dz_c/dtheta^T H0^-1 l2 theta0)/n]``, with H0 from the exact or Arnoldi
    curvature model (``--solver``, default exact). Query labels choose c (pass predicted labels to explain predictions).
    """

    default_solver = "exact"

    def __init__(self, imodel: InfluenceModel, config):
        super().__init__(imodel)
        import keras
        layer = _dense_last_layer(imodel)
        if [l.name for l in imodel.target_layers] != [layer.name]:
            raise InfluenceModelError("RPS-LJE targets the last Dense layer only: "
                                      "use target_layers=None")
        self.step, self.batch_size = float(config.lje_step), int(config.batch_size)
        self.has_bias = layer.use_bias
        self.n_fit = 0
        self.theta0: Optional[np.ndarray] = None
        # A private copy of the model carries the perturbed weights theta0; H0 is its Hessian.
        clone = keras.models.clone_model(imodel.model)
        clone.set_weights(imodel.model.get_weights())
        self.perturbed = InfluenceModel(clone, target_layers=[clone.layers[-1].name],
                                        loss=imodel._loss_fn, l2=imodel.l2,
                                        regularizers=imodel.regularizers)
        self.curvature = build_curvature(self.perturbed, config,
                                         config.solver or self.default_solver)
        if not self.curvature.factored:
            raise ConfigError(f"RPS-LJE needs a factored curvature model (exact or arnoldi), "
                              f"not --solver={self.curvature.registered_name}")

    @classmethod
    def from_config(cls, imodel, config):
        return cls(imodel, config)

    @property
    def solver(self) -> str:
        return self.curvature.registered_name

    def fit(self, x, y, query_x=None, query_y=None, query_ids=None):
        x = np.asarray(x)
        y = self.imodel.check_labels(y, len(x))
        theta = self.imodel.get_flat_params().astype(np.float64)
        g = grads.mean_gradient(self.imodel, x, y, self.batch_size)
        self.theta0 = theta + self.step * g
        self.perturbed.set_flat_params(self.theta0)
        self.curvature.fit(x, y)
        self.n_fit = len(x)
        self.fitted = True
        return self

    def _ensure_perturbed(self):
        self.perturbed.set_flat_params(self.theta0)

    def train_features(self, x, y):
        self._check_fitted()
        self._ensure_perturbed()
        phi = self.curvature.gradient_maps(x, y, train=True, query=False)["train"]
        return np.concatenate([phi, np.ones((len(phi), 1))], axis=1).astype(model_float(self.imodel))

    def influence_vectors(self, x, y):
        """``[eigen-map of g_i(theta0), 1]`` ``(n, k + 1)``: the train features, whose inner
        product with the query features is the representer value (class docstring)."""
        return self.train_features(x, y)

    @property
    def n_explained(self) -> int:
        return int(self.perturbed.shapes[0][1])

    def _logit_jacobian(self, F, cls):
        """``dz_c/dtheta`` ``(n, d)`` for a Dense layer: kernel ``(p, C)`` row-major, then bias."""
        n, p = F.shape
        C = self.perturbed.shapes[0][1]
        J = np.zeros((n, p, C))
        J[np.arange(n), :, cls] = F
        J = J.reshape(n, p * C)
        if self.has_bias:
            b = np.zeros((n, C))
            b[np.arange(n), cls] = 1.0
            J = np.concatenate([J, b], axis=1)
        return J

    def query_features(self, x, y, ids=None):
        self._check_fitted()
        F = grads.penultimate_features(self.imodel, x, self.batch_size).astype(np.float64)
        C = self.perturbed.shapes[0][1]
        cls = np.zeros(len(F), np.int64) if C == 1 else _labels_to_class(y)
        J = self._logit_jacobian(F, cls)
        z0 = J @ self.theta0
        qmap = self.curvature.query_map(J)
        const = z0
        if self.imodel.has_regularization:
            # The regulariser's part of the Newton step, -J H0^-1 (l2 theta0), is shared
            # equally by the n examples (it belongs to none of them).
            reg = self.curvature.train_map((self.imodel.l2_vector * self.theta0)[None, :])
            const = z0 - (qmap @ reg.T)[:, 0]
        out = np.concatenate([-qmap / self.n_fit, (const / self.n_fit)[:, None]], axis=1)
        if C == 1:  # one logit: class 0 is explained by its negative
            out *= _binary_sign(y, len(F))[:, None]
        return out.astype(model_float(self.imodel))

    def params(self):
        return {"solver": self.solver, "n_fit": self.n_fit, "curvature": self.curvature.params()}

    def arrays(self):
        out = {f"curvature.{k}": v for k, v in self.curvature.arrays().items()}
        out.update({"theta0": self.theta0, "n_fit": np.array(self.n_fit)})
        return out

    def restore(self, arrays):
        prefix = "curvature."
        self.curvature.restore({k[len(prefix):]: v for k, v in arrays.items()
                                if k.startswith(prefix)})
        self.theta0, self.n_fit = arrays["theta0"], int(arrays["n_fit"])
        self.perturbed.set_flat_params(self.theta0)
        self.fitted = True
