"""Every influence method as a pair of feature maps (DESIGN.md, "the one idea").

    score(z_train, z_test) = < train_features(z_train), query_features(z_test) >
    self(z)                = < train_features(z), query_features(z) >

A method is fitted once (:meth:`InfluenceMethod.fit`, the pipeline's reduce step), saved as an
artifact, and then applied to any number of blocks. Sign convention (as in Influenciae):

    influence(z_train, z_test) = g_test^T H^-1 g_train

positive = proponent (removing ``z_train`` would *raise* the test loss), negative = opponent.
Removing ``z_train`` from the n training examples changes the test loss by about
``influence / n``; first-order group scores are sums over members, so removing a group changes
the test loss by about ``group_score / n``.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional, Sequence

import numpy as np

from influence_ops import gradients as grads
from influence_ops import solvers
from influence_ops.model import InfluenceModel, InfluenceModelError

log = logging.getLogger(__name__)

SMALL_N_SELF_SOLVES = 2000


def _float(imodel: InfluenceModel):
    return imodel.dtype.as_numpy_dtype


def _labels_to_class(imodel: InfluenceModel, y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:
        return np.argmax(y, axis=1)
    return y.reshape(-1).astype(np.int64)


class InfluenceMethod:
    """Base class: a fitted pair of feature maps. Subclasses set ``name``."""

    name = "base"
    needs_queries = False  # True when fit() must see the queries (CG, LiSSA)
    self_influence_at_scale = True

    def __init__(self, imodel: InfluenceModel):
        self.imodel = imodel
        self.fitted = False

    # -- the contract -------------------------------------------------------------------------
    def fit(self, x, y, query_x=None, query_y=None, query_ids=None) -> "InfluenceMethod":
        raise NotImplementedError

    def train_features(self, x, y) -> np.ndarray:
        """phi: ``(n, k)``."""
        raise NotImplementedError

    def query_features(self, x, y, ids=None) -> np.ndarray:
        """psi: ``(m, k)``; ``ids`` are needed by methods that fitted on the queries."""
        raise NotImplementedError

    def self_influence(self, x, y) -> np.ndarray:
        """``<phi(z), psi(z)>`` per example, ``(n,)``."""
        return np.sum(self.train_features(x, y).astype(np.float64)
                      * self._self_query_features(x, y).astype(np.float64), axis=1)

    def _self_query_features(self, x, y):
        return self.query_features(x, y)

    def featurize_train(self, x, y):
        """One pass for the pipeline: ``(phi (n, k), psi on itself (n, k) or None, self (n,))``."""
        phi = self.train_features(x, y)
        psi = self._self_query_features(x, y)
        return phi, psi, np.sum(phi.astype(np.float64) * psi.astype(np.float64), axis=1)

    def params(self) -> dict:
        """JSON-able parameters (recorded in the artifact manifest)."""
        return {}

    def arrays(self) -> Dict[str, np.ndarray]:
        """Fitted arrays (saved as ``arrays.npz``)."""
        return {}

    def restore(self, arrays: Dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    # -- conveniences -------------------------------------------------------------------------
    def scores(self, query_x, query_y, train_x, train_y, query_ids=None) -> np.ndarray:
        """``(m, n)`` test x train influence."""
        q = self.query_features(query_x, query_y, query_ids).astype(np.float64)
        t = self.train_features(train_x, train_y).astype(np.float64)
        return q @ t.T

    def _check_fitted(self):
        if not self.fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit() or load it")


# ============================================================================ influence functions
class FirstOrderInfluence(InfluenceMethod):
    """Koh & Liang (2017) influence ``g_test^T (H + damping I)^-1 g_train`` with a chosen solver.

    ``solver``: ``exact`` (explicit Hessian, d up to ~1e4), ``arnoldi`` (Schioppa et al. 2022:
    rank-``top_k`` model from ``n_iter`` HVPs), ``cg`` (Martens 2010) or ``lissa``
    (Agarwal et al. 2017). ``relatif=True`` gives RelatIF (Barshan et al. 2020):
    ``influence / ||(H + damping I)^-1 g_train||``.

    Feature maps: exact/Arnoldi use the eigen-maps of :class:`solvers.EigenInverse`
    (``k = top_k``, or d for exact). CG/LiSSA solve ``Q = (H + damping)^-1 G_test`` at fit time
    (``needs_queries``); then ``phi(z) = Q g(z)`` (k = number of queries) and ``psi`` is the
    one-hot vector of the query. Their self-influence needs one solve per example and is meant
    for small n (a warning says so).
    """

    name = "influence"

    def __init__(self, imodel: InfluenceModel, solver: str = "arnoldi", damping: float = 0.0,
                 relatif: bool = False, top_k: int = 32, n_iter: int = 64,
                 negative: str = "keep", cg_max_iter: int = 100, cg_tol: float = 1e-8,
                 lissa_scale: float = 10.0, lissa_depth: int = 200, lissa_repeats: int = 1,
                 lissa_batch: int = 64, hvp_batch: int = 1024, seed: int = 0,
                 batch_size: int = grads.DEFAULT_BATCH):
        super().__init__(imodel)
        if solver not in ("exact", "arnoldi", "cg", "lissa"):
            raise ValueError(f"solver must be exact, arnoldi, cg or lissa, got {solver!r}")
        self.solver = solver
        self.damping = float(damping)
        self.relatif = bool(relatif)
        self.top_k, self.n_iter, self.negative = int(top_k), int(n_iter), negative
        self.cg_max_iter, self.cg_tol = int(cg_max_iter), float(cg_tol)
        self.lissa_scale, self.lissa_depth = float(lissa_scale), int(lissa_depth)
        self.lissa_repeats, self.lissa_batch = int(lissa_repeats), int(lissa_batch)
        self.hvp_batch, self.seed, self.batch_size = int(hvp_batch), int(seed), int(batch_size)
        self.needs_queries = solver in ("cg", "lissa")
        self.self_influence_at_scale = not self.needs_queries
        self.name = "relatif" if relatif else "influence"
        self.inverse: Optional[solvers.EigenInverse] = None
        self.Q: Optional[np.ndarray] = None          # (m, d) for cg / lissa
        self.query_ids: Optional[np.ndarray] = None
        self._fit_data = None

    # -- fitting ------------------------------------------------------------------------------
    def _hvp(self, x, y):
        return lambda V: grads.hessian_vector_products(self.imodel, x, y, V, self.hvp_batch)

    def _lissa_sampler(self, x, y):
        n = len(x)
        b = min(self.lissa_batch, n)

        def sample(V, rng):
            idx = rng.choice(n, size=b, replace=False)
            return grads.hessian_vector_products(self.imodel, x[idx], np.asarray(y)[idx], V, b)
        return sample

    def solve(self, G: np.ndarray) -> np.ndarray:
        """``(H + damping I)^-1`` applied to the rows of ``G`` ``(m, d)``."""
        if self.inverse is not None:
            return self.inverse.apply(G)
        if self._fit_data is None:
            raise RuntimeError(f"solver {self.solver!r} needs the fit data in memory to solve "
                               "new systems (a loaded artifact only holds the query solutions)")
        x, y = self._fit_data
        if self.solver == "cg":
            return solvers.conjugate_gradient(self._hvp(x, y), G, self.damping,
                                              self.cg_max_iter, self.cg_tol)
        return solvers.lissa(self._lissa_sampler(x, y), G, self.damping, self.lissa_scale,
                             self.lissa_depth, self.lissa_repeats, self.seed)

    def fit(self, x, y, query_x=None, query_y=None, query_ids=None):
        x = np.asarray(x)
        y = self.imodel.check_labels(y, len(x))
        d = self.imodel.n_params
        log.info("fitting %s/%s on %d examples, d=%d", self.name, self.solver, len(x), d)
        if self.solver == "exact":
            self.fit_from_hessian(grads.hessian_sum(self.imodel, x, y), len(x))
            return self
        if self.solver == "arnoldi":
            def progress(i, total):
                if i % max(1, total // 8) == 0 or i == total:
                    log.info("arnoldi: %d/%d Hessian-vector products", i, total)
            self.inverse = solvers.arnoldi(self._hvp(x, y), d, self.n_iter, self.top_k,
                                           self.damping, self.negative, self.seed,
                                           progress=progress)
            self.fitted = True
            return self
        self._fit_data = (x, y)
        if query_x is None:
            raise ValueError(f"solver {self.solver!r} solves one system per query: pass "
                             "query_x/query_y (and query_ids) to fit()")
        gq = grads.per_example_gradients(self.imodel, query_x, query_y, self.batch_size)
        self.Q = self.solve(gq.astype(np.float64))
        self.query_ids = (np.asarray(query_ids) if query_ids is not None
                          else np.arange(len(gq)).astype(str))
        self.fitted = True
        return self

    def fit_from_hessian(self, hessian_sum: np.ndarray, n: int):
        """Exact solver from ``sum_i Hessian(l(z_i))`` over n examples (the combiner output)."""
        h = np.asarray(hessian_sum, np.float64) / max(n, 1)
        h = 0.5 * (h + h.T) + np.diag(self.imodel.l2_vector)
        self.inverse = solvers.exact_inverse(h, self.damping, self.negative)
        self.fitted = True
        return self

    # -- feature maps -------------------------------------------------------------------------
    def _eigen_maps(self, x, y):
        """Exact / Arnoldi: ``(phi, psi)`` float64 from one fused projection ``G U``."""
        c = grads.projected_gradients(self.imodel, x, y, self.inverse.U,
                                      self.batch_size).astype(np.float64)
        psi = self.inverse.query_map_from_coordinates(c)
        phi = self.inverse.train_map_from_coordinates(c)
        if self.relatif:
            phi /= np.maximum(self.inverse.inverse_norms_from_coordinates(c), 1e-30)[:, None]
        return phi, psi

    def _solver_maps(self, x, y, want_self: bool):
        """CG / LiSSA: ``(phi, self or None)``; solves one system per example only when RelatIF
        norms or self-influence need it (the gradients are computed once either way)."""
        if not (self.relatif or want_self):
            phi = grads.projected_gradients(self.imodel, x, y, self.Q.T, self.batch_size)
            return phi.astype(np.float64), None
        g = grads.per_example_gradients(self.imodel, x, y, self.batch_size).astype(np.float64)
        self._warn_per_example_solves(len(g), "RelatIF" if self.relatif else "self-influence")
        phi = g @ self.Q.T
        sol = self.solve(g)
        norms = np.maximum(np.linalg.norm(sol, axis=1), 1e-30)
        self_scores = np.sum(g * sol, axis=1)
        if self.relatif:
            phi /= norms[:, None]
            self_scores /= norms
        return phi, (self_scores if want_self else None)

    def train_features(self, x, y):
        self._check_fitted()
        phi = (self._eigen_maps(x, y)[0] if self.inverse is not None
               else self._solver_maps(x, y, want_self=False)[0])
        return phi.astype(_float(self.imodel))

    def query_features(self, x, y, ids=None):
        self._check_fitted()
        dt = _float(self.imodel)
        if self.inverse is not None:
            return grads.projected_gradients(self.imodel, x, y, self.inverse.projection("query"),
                                             self.batch_size).astype(dt)
        return self._one_hot_queries(len(x), ids).astype(dt)

    def _one_hot_queries(self, m, ids):
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
                        "slow; prefer solver=arnoldi or exact at this scale", what,
                        self.solver, n)

    def self_influence(self, x, y):
        return self.featurize_train(x, y)[2]

    def featurize_train(self, x, y):
        self._check_fitted()
        dt = _float(self.imodel)
        if self.inverse is None:  # CG / LiSSA: no query-side map for training examples
            phi, self_scores = self._solver_maps(x, y, want_self=True)
            return phi.astype(dt), None, self_scores
        phi, psi = self._eigen_maps(x, y)
        return phi.astype(dt), psi.astype(dt), np.sum(phi * psi, axis=1)

    def influence_vectors(self, x, y) -> np.ndarray:
        """``-(H + damping)^-1 g`` per example ``(n, d)``: the first-order change of theta when
        the example is up-weighted (Influenciae's ``compute_influence_vector``); removing it
        moves theta by about ``-vector / n``."""
        self._check_fitted()
        g = grads.per_example_gradients(self.imodel, x, y, self.batch_size).astype(np.float64)
        return -self.solve(g)

    # -- state ----------------------------------------------------------------------------------
    def params(self):
        return {"solver": self.solver, "damping": self.damping, "relatif": self.relatif,
                "top_k": self.top_k, "n_iter": self.n_iter, "negative": self.negative,
                "cg_max_iter": self.cg_max_iter, "cg_tol": self.cg_tol,
                "lissa_scale": self.lissa_scale, "lissa_depth": self.lissa_depth,
                "lissa_repeats": self.lissa_repeats, "lissa_batch": self.lissa_batch,
                "hvp_batch": self.hvp_batch, "seed": self.seed, "batch_size": self.batch_size}

    def arrays(self):
        if self.inverse is not None:
            return {"U": self.inverse.U, "lam": self.inverse.lam}
        # The fit sample travels with the solutions so workers can solve new systems
        # (self-influence, RelatIF norms, group influence); CG/LiSSA fit on small samples.
        x, y = self._fit_data
        return {"Q": self.Q, "query_ids": self.query_ids.astype(str), "fit_x": x, "fit_y": y}

    def restore(self, arrays):
        if "U" in arrays:
            self.inverse = solvers.EigenInverse(U=arrays["U"], lam=arrays["lam"])
        else:
            self.Q, self.query_ids = arrays["Q"], arrays["query_ids"]
            self._fit_data = (arrays["fit_x"], arrays["fit_y"])
        self.fitted = True

    @property
    def feature_dim(self) -> int:
        return self.inverse.k if self.inverse is not None else len(self.query_ids)


# ============================================================================ TracIn
class TracIn(InfluenceMethod):
    """TracIn-CP (Pruthi et al. 2020): ``sum_c eta_c <g_c(z_test), g_c(z_train)>``.

    ``checkpoints``: Keras models or ``.keras`` paths saved during training; ``learning_rates``:
    the step size in force at each one. Feature map ``phi = psi = concat_c sqrt(eta_c) R_c g_c``
    where ``R_c`` is a seeded Gaussian ``(d, projection_dim)`` projection (Johnson-Lindenstrauss:
    inner products are kept in expectation) or the identity when ``projection_dim`` is None.
    Self-influence ``sum_c eta_c ||g_c(z)||^2`` flags mislabeled examples.
    """

    name = "tracin"

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


# ============================================================================ representer points
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

    name = "rps_l2"

    def __init__(self, imodel: InfluenceModel, lam: float = 1e-3, max_iter: int = 2000,
                 batch_size: int = 1024):
        super().__init__(imodel)
        _dense_last_layer(imodel)
        self.lam, self.max_iter, self.batch_size = float(lam), int(max_iter), int(batch_size)
        self.W: Optional[np.ndarray] = None
        self.n_fit = 0
        self.fit_gradient_norm = float("nan")

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
        return (a[:, :, None] * F[:, None, :]).reshape(len(F), -1).astype(_float(self.imodel))

    def query_features(self, x, y, ids=None):
        self._check_fitted()
        F = grads.penultimate_features(self.imodel, x, self.batch_size).astype(np.float64)
        C = self.W.shape[1]
        if C == 1:  # one logit: class 0 is explained by its negative
            return (F * _binary_sign(y, len(F))[:, None]).astype(_float(self.imodel))
        cls = _labels_to_class(self.imodel, y)
        out = np.zeros((len(F), C, F.shape[1]))
        out[np.arange(len(F)), cls] = F
        return out.reshape(len(F), -1).astype(_float(self.imodel))

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
    solver (rank top_k). Query labels choose c (pass predicted labels to explain predictions).
    """

    name = "rps_lje"

    def __init__(self, imodel: InfluenceModel, solver: str = "exact", step: float = 1e-4,
                 damping: float = 0.0, top_k: int = 32, n_iter: int = 64, seed: int = 0,
                 batch_size: int = grads.DEFAULT_BATCH):
        super().__init__(imodel)
        import keras
        layer = _dense_last_layer(imodel)
        if [l.name for l in imodel.target_layers] != [layer.name]:
            raise InfluenceModelError("RPS-LJE targets the last Dense layer only: "
                                      "use target_layers=None")
        if solver not in ("exact", "arnoldi"):
            raise ValueError("RPS-LJE supports solver=exact or arnoldi")
        self.solver, self.step, self.damping = solver, float(step), float(damping)
        self.top_k, self.n_iter, self.seed, self.batch_size = int(top_k), int(n_iter), int(seed), int(batch_size)
        self.has_bias = layer.use_bias
        self.n_fit = 0
        self.theta0: Optional[np.ndarray] = None
        self.inverse: Optional[solvers.EigenInverse] = None
        # A private copy of the model carries the perturbed weights theta0.
        clone = keras.models.clone_model(imodel.model)
        clone.set_weights(imodel.model.get_weights())
        self.perturbed = InfluenceModel(clone, target_layers=[clone.layers[-1].name],
                                        loss=imodel._loss_fn, l2=imodel.l2,
                                        regularizers=imodel.regularizers)

    def fit(self, x, y, query_x=None, query_y=None, query_ids=None):
        x = np.asarray(x)
        y = self.imodel.check_labels(y, len(x))
        theta = self.imodel.get_flat_params().astype(np.float64)
        g = grads.mean_gradient(self.imodel, x, y, self.batch_size)
        self.theta0 = theta + self.step * g
        self.perturbed.set_flat_params(self.theta0)
        inner = FirstOrderInfluence(self.perturbed, solver=self.solver, damping=self.damping,
                                    top_k=self.top_k, n_iter=self.n_iter, seed=self.seed)
        inner.fit(x, y)
        self.inverse = inner.inverse
        self.n_fit = len(x)
        self.fitted = True
        return self

    def _ensure_perturbed(self):
        self.perturbed.set_flat_params(self.theta0)

    def train_features(self, x, y):
        self._check_fitted()
        self._ensure_perturbed()
        phi = grads.projected_gradients(self.perturbed, x, y, self.inverse.projection("train"),
                                        self.batch_size).astype(np.float64)
        return np.concatenate([phi, np.ones((len(phi), 1))], axis=1).astype(_float(self.imodel))

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
        cls = np.zeros(len(F), np.int64) if C == 1 else _labels_to_class(self.imodel, y)
        J = self._logit_jacobian(F, cls)
        z0 = J @ self.theta0
        qmap = self.inverse.query_map(J)
        const = z0
        if self.imodel.has_regularization:
            # The regulariser's part of the Newton step, -J H0^-1 (l2 theta0), is shared
            # equally by the n examples (it belongs to none of them).
            reg = self.inverse.train_map((self.imodel.l2_vector * self.theta0)[None, :])
            const = z0 - (qmap @ reg.T)[:, 0]
        out = np.concatenate([-qmap / self.n_fit, (const / self.n_fit)[:, None]], axis=1)
        if C == 1:  # one logit: class 0 is explained by its negative
            out *= _binary_sign(y, len(F))[:, None]
        return out.astype(_float(self.imodel))

    def params(self):
        return {"solver": self.solver, "step": self.step, "damping": self.damping,
                "top_k": self.top_k, "n_iter": self.n_iter, "seed": self.seed, "n_fit": self.n_fit}

    def arrays(self):
        return {"U": self.inverse.U, "lam": self.inverse.lam, "theta0": self.theta0,
                "n_fit": np.array(self.n_fit)}

    def restore(self, arrays):
        self.inverse = solvers.EigenInverse(U=arrays["U"], lam=arrays["lam"])
        self.theta0, self.n_fit = arrays["theta0"], int(arrays["n_fit"])
        self.perturbed.set_flat_params(self.theta0)
        self.fitted = True


METHODS = {
    "influence": FirstOrderInfluence,
    "relatif": FirstOrderInfluence,
    "tracin": TracIn,
    "rps_l2": RepresenterPointsL2,
    "rps_lje": RepresenterPointsLJE,
}
