"""Leave-one-out-corrected influence: the example's own curvature taken out of H.

First-order influence predicts the removal of ``z_i`` with the Hessian of the *full* data. When
``z_i`` is removed, the objective becomes ``(1/n) sum_{j != i} l_j + regulariser`` (the sum form
of leave-one-out that ``tests/test_leave_one_out.py`` retrains), whose Hessian is
``H - H_i / n``. One Newton step from the fitted weights on that objective (approximate
leave-one-out, Rad & Maleki 2018; the infinitesimal jackknife's correction, Giordano et al.
2019) moves theta by ``(H - H_i/n)^-1 g_i / n``, so on the scale of this project's scores
(removal changes the test loss by about ``score / n``)::

    corrected(z_i, z_test) = g_test^T (H - H_i / n)^-1 g_i          (H includes l2 and damping)

**Low rank.** With ``z`` the pre-activation of the model's last layer (the logits, ``C``
numbers) and ``A_i = d^2 l_i / dz^2`` (``C x C``), ``H_i = J_i^T A_i J_i`` with
``J_i = dz_i/dtheta``: exact for last-layer targets (z is linear in theta), the Gauss-Newton
part of ``H_i`` for deeper ones (the network's own second derivative is dropped). Woodbury
(in the form that needs no inverse or square root of ``A_i``, which is singular for softmax)
gives, per example, one ``C x C`` system::

    (H - J_i^T A_i J_i / n)^-1 = H^-1 + H^-1 J_i^T (n I - A_i K_i)^-1 A_i J_i H^-1,
    K_i = J_i H^-1 J_i^T

so ``v_i = (H - H_i/n)^-1 g_i = H^-1 (g_i + J_i^T w_i)`` with
``w_i = (n I - A_i K_i)^-1 A_i b_i`` and ``b_i = J_i H^-1 g_i``.

**As feature maps.** For any curvature with maps phi/psi (``<psi(a), phi(b)> = a^T H^-1 b``) the
corrected train feature is ``phi'_i = phi(g_i + J_i^T w_i)``, scored against the *usual* query
features: ``<psi(g_test), phi'_i> = g_test^T v_i``. Self-influence is
``g_i^T v_i = g_i^T H^-1 g_i + b_i . w_i``. The rows of ``J_i`` share the per-layer structure of
gradients (``a (outer) signal``), and the gradient itself is ``g_i = J_i^T dz_i`` (``dz`` the
loss gradient in z), so for an eigenbasis (exact, Arnoldi) one fused projection of the ``C``
rows gives everything: ``K_i`` is their Gram matrix, ``b_i = K_i dz_i``, and the query and
corrected train features are ``dz_i`` and ``dz_i + w_i`` applied to the same projected rows.
The whole step runs on the device (:func:`eigen_corrected`). For a low-rank model (Arnoldi)
this is the correction restricted to its kept eigenspace: ``(Lambda - B_i^T A_i B_i / n)^-1``
with ``B_i = J_i E``.

``n I - A_i K_i`` is singular exactly when ``H - H_i/n`` is (the example alone determines some
direction of theta and there is no L2 / damping on it): leave-one-out is undefined there;
those rows keep their first-order score (``w_i = 0``) and a warning says how many.
"""

from __future__ import annotations

import logging
from typing import Dict, Tuple

import numpy as np

from influence_ops import gradients as grads
from influence_ops import tf_setup
from influence_ops.model import InfluenceModel

tf = tf_setup.tensorflow()
log = logging.getLogger(__name__)

CORRECTIONS = ("none", "loo")


class LooUnsupportedError(ValueError):
    """The model's head is outside what the leave-one-out factors support."""


# ------------------------------------------------------------------ the output of the head
def _split_last(imodel: InfluenceModel):
    """``(pre-activation fn, activation)`` of the model's last layer, or raises.

    The last layer is Dense / Conv2D (its activation splits off), or a parameter-free Softmax /
    Activation layer (its input is z)."""
    import keras
    layers = imodel._head_layers
    if layers is None or grads._fast_path_layers(imodel) is None:
        raise LooUnsupportedError(
            "correction='loo' needs a Sequential model whose target layers are Dense or Conv2D "
            "(the per-example Hessian factors use the per-layer gradient formulas); "
            f"got target layers {[type(l).__name__ for l in imodel.target_layers]}")
    last = layers[-1]
    if isinstance(last, (keras.layers.Softmax, keras.layers.Activation)):
        return "layer", last
    if type(last) in (keras.layers.Dense, keras.layers.Conv2D):
        return "split", last
    return "identity", last




def _forward(imodel: InfluenceModel, x):
    """Head forward: ``(records [(layer, a, z_l)] per target layer, z, activation(z))`` where z
    is the last layer's pre-activation (the logits) flattened per example."""
    kind, last = _split_last(imodel)
    targets = {id(l) for l in imodel.target_layers}
    h, records = imodel.front(x), []
    layers = imodel._head_layers
    z_out, act = None, None
    for idx, layer in enumerate(layers):
        is_last = idx == len(layers) - 1
        if id(layer) in targets:
            z = grads.preactivation(layer, h)
            records.append((layer, h, z))
            if is_last:
                z_out, act = z, layer.activation
            else:
                h = layer.activation(z)
            continue
        if is_last and kind == "layer":
            z_out, act = h, layer
        elif is_last and kind == "split":
            z_out, act = grads.preactivation(layer, h), layer.activation
        elif is_last:
            z_out = layer(h, training=False)
            act = None
        else:
            h = layer(h, training=False)
    return records, z_out, act


def _softmax_cross_entropy_on_logits(imodel: InfluenceModel, act) -> bool:
    """Plain categorical cross-entropy on logits (no activation after z, over the last axis,
    no label smoothing, no ignored class): ``dl/dz = p - y``, ``A = diag(p) - p p^T``."""
    import keras
    linear = act is None or act is keras.activations.linear or \
        getattr(act, "__name__", "") == "linear"
    get_config = getattr(imodel._loss_fn, "get_config", None)
    cfg = get_config() if callable(get_config) else {}
    plain = (not cfg.get("label_smoothing") and cfg.get("ignore_class") is None
             and cfg.get("axis", -1) in (-1, None))
    return (imodel.label_mode in ("sparse", "onehot") and linear and plain
            and bool(getattr(imodel._loss_fn, "from_logits", False)))


def _signals(imodel: InfluenceModel, x, y):
    """``(records, dz, A, p)``: per target layer ``(layer, a, sig, ident)`` with ``sig``
    ``(B, C, *z_l shape)`` the Jacobian signals ``(dz/dz_l)^T e_c`` (``ident``: they are the
    unit vectors, z_l = z); ``dz`` ``(B, C)`` the loss gradient in z and ``A`` ``(B, C, C)``
    the Hessian of the loss in z; ``p`` ``(B, C)`` the softmax probabilities where
    ``A = diag(p) - p p^T`` (cross-entropy on logits, see :func:`_hessian_times`), else None.
    The gradient is not formed separately: ``g_i = J_i^T dz_i`` (the chain rule, exact for
    every target layer), so the C Jacobian rows and dz carry it. The second-order tape runs
    only when needed (deeper target layers, or a loss whose A is not known in closed form)."""
    kind, last = _split_last(imodel)
    last_only = (len(imodel.target_layers) == 1 and imodel.target_layers[0] is last)
    act_last = getattr(last, "activation", None) if kind != "layer" else last
    closed_form = _softmax_cross_entropy_on_logits(imodel, act_last if kind != "identity"
                                                   else None)
    outer = None if (last_only and closed_form) else tf.GradientTape(persistent=True)
    if outer is not None:
        outer.__enter__()
        outer.watch(imodel._tf_vars)
    try:
        with tf.GradientTape() as inner:
            inner.watch(imodel._tf_vars)
            records, z, act = _forward(imodel, x)
            inner.watch(z)
            if outer is not None:
                outer.watch(z)
            out = z if act is None else act(z)
            loss = tf.reduce_sum(imodel.per_example_loss(y, out))
        dz = inner.gradient(loss, z)
    finally:
        if outer is not None:
            outer.__exit__(None, None, None)
    b = tf.shape(z)[0]
    C = int(np.prod(z.shape[1:]))
    if closed_form and len(z.shape) == 2:
        p = tf.nn.softmax(z)                      # the same A as autodiff, without C passes
        A = tf.linalg.diag(p) - p[:, :, None] * p[:, None, :]
    else:
        p = None
        A = tf.reshape(outer.batch_jacobian(dz, z), [b, C, C])
        A = 0.5 * (A + tf.transpose(A, [0, 2, 1]))
    out_records = []
    for layer, a, zl in records:
        shape = tf.concat([[b, C], tf.shape(zl)[1:]], axis=0)
        if zl is z:  # the unit vectors (pruned from the graph where the projection skips them)
            sig = tf.reshape(tf.eye(C, batch_shape=[b], dtype=z.dtype), shape)
        else:
            sig = tf.reshape(outer.batch_jacobian(z, zl), shape)
        out_records.append((layer, a, sig, zl is z))
    return out_records, tf.reshape(dz, [b, C]), A, p


def _conv_rows(layer, a, sig):
    """Conv layer: ``(kernel rows (B, R, kdim * cout), bias rows (B, R, cout))`` of the ``R``
    signals ``sig`` ``(B, R, oh, ow, cout)``."""
    b, r = tf.shape(sig)[0], tf.shape(sig)[1]
    patches = grads._patches(layer, a)
    kdim, cout = patches.shape[-1], sig.shape[-1]
    s = tf.reshape(sig, [b, r, -1, cout])                                 # (B, R, T, cout)
    kern = tf.einsum("btk,brto->brko", tf.reshape(patches, [b, -1, kdim]), s)
    return tf.reshape(kern, [b, r, -1]), tf.reduce_sum(s, axis=2)


def _blocks(records):
    """The Jacobian rows in theta's order, ``(B, C, d)``."""
    import keras
    blocks = []
    for layer, a, sig, _ in records:
        b, r = tf.shape(sig)[0], tf.shape(sig)[1]
        if type(layer) is keras.layers.Dense:
            blocks.append(tf.reshape(a[:, None, :, None] * sig[:, :, None, :], [b, r, -1]))
            bias = sig
        else:
            kern, bias = _conv_rows(layer, a, sig)
            blocks.append(kern)
        if layer.use_bias:
            blocks.append(tf.reshape(bias, [b, r, -1]))
    return tf.concat(blocks, axis=2)


def _projected(records, P):
    """``_blocks(records) @ P`` ``(B, C, k)``; Dense layers never form the block. A Dense
    layer's kernel and bias rows are contiguous in ``P`` (``(n_in, n_out)`` row-major, then
    ``n_out``), so ``P`` viewed as ``(n_in + 1, n_out * k)`` projects both in one GEMM of
    ``[a, 1]``; for the last layer (``ident``) that product is already the answer."""
    import keras
    acc, off = None, 0
    for layer, a, sig, ident in records:
        b, k = tf.shape(sig)[0], tf.shape(P)[1]
        size = int(np.prod(layer.kernel.shape)) + (layer.bias.shape[0] if layer.use_bias else 0)
        rows = P[off:off + size]
        off += size
        if type(layer) is keras.layers.Dense:
            n_out = layer.kernel.shape[1]
            if layer.use_bias:
                a = tf.concat([a, tf.ones([b, 1], a.dtype)], axis=1)
            t = tf.reshape(tf.matmul(a, tf.reshape(rows, [-1, n_out * k])), [b, n_out, k])
            term = t if ident else tf.matmul(sig, t)
        else:
            kern, bias = _conv_rows(layer, a, sig)
            full = tf.concat([kern, bias], axis=2) if layer.use_bias else kern
            term = tf.einsum("brd,dk->brk", full, rows)
        acc = term if acc is None else acc + term
    return acc


def _factor_fn(imodel: InfluenceModel):
    """``(G, J, A)`` per block, the gradient as ``J^T dz`` (the chain rule)."""
    def build():
        @tf.function(reduce_retracing=True)
        def fn(x, y):
            records, dz, A, _ = _signals(imodel, x, y)
            J = _blocks(records)
            return tf.linalg.matvec(J, dz, transpose_a=True), J, A
        return fn
    return grads._cached(imodel, "loo_full", build)


SINGULAR_RTOL = 1e-12


def _hessian_times(A, p, X):
    """``A X`` for ``X`` ``(B, C, m)``. With the softmax probabilities ``p``
    (``A = diag(p) - p p^T``) it is ``p * (X - p^T X)``: a few elementwise operations instead
    of forming ``A`` and a batched product of ``C x C`` matrices."""
    if p is None:
        return tf.matmul(A, X)
    p = p[:, :, None]
    return p * (X - tf.reduce_sum(p * X, axis=1, keepdims=True))


def _weights_tf(b, K, A, p, n):
    """``w = (n I - A K)^-1 A b`` per row, float64 (``A`` or ``p`` as in
    :func:`_hessian_times`); rows whose system is singular (relative determinant of
    ``M = I - A K / n`` below ``SINGULAR_RTOL``) get ``w = 0`` and a True flag. Their matrix is
    swapped for I before the solve, which raises on an exactly singular one (by arithmetic on
    the flag: a broadcast ``tf.where`` over ``(B, C, C)`` measured slower).

    The determinants are taken only when some row needs them: every eigenvalue of
    ``M = I - E`` is at least ``1 - ||E||_inf`` in modulus, so ``|det M| >= (1 - ||E||_inf)^C``,
    which exceeds ``SINGULAR_RTOL`` for ``||E||_inf < 1 - SINGULAR_RTOL^(1/C)``; rows under half
    that bound (a margin for rounding) are certainly regular. With ``n`` in the thousands that
    is every row, and the flags equal those of the determinant test."""
    C = tf.shape(K)[1]
    eye = tf.eye(C, dtype=tf.float64)
    E = _hessian_times(A, p, K) / n
    M = eye - E
    bound = 0.5 * (1.0 - tf.pow(tf.constant(SINGULAR_RTOL, tf.float64),
                                1.0 / tf.cast(C, tf.float64)))
    regular = tf.reduce_max(tf.reduce_sum(tf.abs(E), axis=2), axis=1) < bound
    singular = tf.cond(tf.reduce_all(regular), lambda: tf.zeros_like(regular),
                       lambda: tf.abs(tf.linalg.det(M)) < SINGULAR_RTOL)
    flag = tf.cast(singular, tf.float64)[:, None, None]
    w = tf.linalg.solve(M + flag * (eye - M), _hessian_times(A, p, b[:, :, None]) / n)
    return w[:, :, 0] * (1.0 - flag[:, :, 0]), singular


def _eigen_fn(imodel: InfluenceModel, negative: bool):
    """The whole correction for an eigenbasis on device, from ``P = U |lam|^-1/2`` (the train
    projection) and ``s = sign(lam)``: the train-map rows of the Jacobian ``c_J = J P``
    ``(B, C, k)`` from one fused projection, ``K = c_J diag(s) c_J^T`` (``= J H^-1 J^T``) and
    ``b = K dz`` (``= J H^-1 g``, as ``g = J^T dz``) in the model's dtype, the ``C x C``
    systems for ``w`` in float64, then one batched product ``[dz, dz + w] c_J`` ``(B, 2, k)``:
    the train map of ``g`` (times ``s``: its query map) and of ``g + J^T w``. Self-influence
    ``g^T H^-1 g + b . w = b . (dz + w)``. Only these rows leave the device. ``negative``:
    some ``lam < 0`` (else the sign multiplication is left out of K)."""
    def build():
        @tf.function(reduce_retracing=True)
        def fn(x, y, P, sign, n):
            records, dz, A, p = _signals(imodel, x, y)
            cj = _projected(records, P)                                    # (B, C, k)
            K = tf.matmul(cj * sign[None, None, :] if negative else cj, cj,
                          transpose_b=True)                                # (B, C, C)
            b64 = tf.cast(tf.reduce_sum(K * dz[:, None, :], axis=2), tf.float64)   # K dz
            A64, p64 = (tf.cast(A, tf.float64), None) if p is None else \
                (None, tf.cast(p, tf.float64))
            w, singular = _weights_tf(b64, tf.cast(K, tf.float64), A64, p64, n)
            u = tf.cast(dz, tf.float64) + w
            phi = tf.matmul(tf.stack([dz, tf.cast(u, dz.dtype)], axis=1), cj)   # (B, 2, k)
            return phi, tf.reduce_sum(b64 * u, axis=1), singular
        return fn
    return grads._cached(imodel, ("loo_eigen", negative), build)


def eigen_corrected(imodel: InfluenceModel, x, y, eigen, n: float,
                    batch_size: int = grads.DEFAULT_BATCH):
    """For an :class:`~influence_ops.solvers.EigenInverse` ``U diag(1/lam) U^T``: its maps
    ``(psi(g) (N, k), phi(g + J_i^T w_i) (N, k), corrected self-influence (N,))``, float64: the
    query features of the examples' own gradients, their corrected train features and
    ``g_i^T v_i``."""
    _split_last(imodel)
    x = grads._cast_x(imodel, x)
    y = imodel.check_labels(y, len(x))
    dt = imodel.dtype.as_numpy_dtype
    negative = bool(np.any(eigen.lam < 0))
    fn = _eigen_fn(imodel, negative)
    Pt = tf.constant(np.asarray(eigen.projection("train"), dt))
    sign = tf.constant(np.sign(eigen.lam).astype(dt))
    nt = tf.constant(float(n), tf.float64)
    k = Pt.shape[1]
    psi = np.empty((len(x), k))
    phi = np.empty((len(x), k))
    selfs = np.empty(len(x))
    n_singular = 0
    for s in grads._batches(len(x), batch_size):
        maps, c, sing = fn(x[s], y[s], Pt, sign, nt)
        maps = np.asarray(maps)
        psi[s], phi[s], selfs[s] = maps[:, 0], maps[:, 1], np.asarray(c)
        n_singular += int(np.sum(sing))
    if n_singular:
        _warn_singular(n_singular, len(x))
    if negative:
        psi *= np.sign(eigen.lam)[None, :]
    return psi, phi, selfs


def _warn_singular(bad: int, total: int) -> None:
    log.warning("leave-one-out correction: for %d of %d examples H - H_i/n is singular "
                "(the example alone determines some direction of theta; add l2 or "
                "damping); their first-order scores are kept", bad, total)


def check_supported(imodel: InfluenceModel) -> None:
    """Raises :class:`LooUnsupportedError` when the model's head is not supported."""
    _split_last(imodel)


def hessian_factors(imodel: InfluenceModel, x, y, batch_size: int = grads.DEFAULT_BATCH
                    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(G (n, d), J (n, C, d), A (n, C, C))``, float64: per-example gradients, Jacobians of
    the logits and the loss Hessians in the logits, ``Hessian(l_i) ~ J_i^T A_i J_i`` (exact for
    last-layer targets)."""
    _split_last(imodel)
    x = grads._cast_x(imodel, x)
    y = imodel.check_labels(y, len(x))
    fn = _factor_fn(imodel)
    Gs, Js, As = [], [], []
    for s in grads._batches(len(x), batch_size):
        G, J, A = fn(x[s], y[s])
        Gs.append(np.asarray(G, np.float64))
        Js.append(np.asarray(J, np.float64))
        As.append(np.asarray(A, np.float64))
    if not Gs:
        raise ValueError("no examples")
    return np.concatenate(Gs), np.concatenate(Js), np.concatenate(As)


# ------------------------------------------------------------------ the Woodbury step
def woodbury_weights(b: np.ndarray, K: np.ndarray, A: np.ndarray, n: float) -> np.ndarray:
    """``w_i = (n I - A_i K_i)^-1 A_i b_i`` per example: ``b`` ``(N, C)`` = ``J_i H^-1 g_i``,
    ``K`` ``(N, C, C)`` = ``J_i H^-1 J_i^T``, ``A`` ``(N, C, C)``. Rows whose system is
    singular (leave-one-out undefined) get ``w = 0`` (first order), with a warning."""
    if len(b) == 0:
        return np.zeros_like(b)
    C = b.shape[1]
    M = np.eye(C)[None] - np.matmul(A, K) / n
    singular = np.abs(np.linalg.det(M)) < SINGULAR_RTOL
    M[singular] = np.eye(C)
    w = np.linalg.solve(M, np.matmul(A, b[:, :, None]))[:, :, 0] / n
    w[singular] = 0.0
    if singular.any():
        _warn_singular(int(singular.sum()), len(b))
    return w


def corrected_from_maps(phi_g: np.ndarray, psi_g: np.ndarray, phi_J: np.ndarray,
                        psi_J: np.ndarray, A: np.ndarray, n: float) -> Dict[str, np.ndarray]:
    """Corrected features from the curvature's maps of the gradients (``(N, k)``) and of the
    Jacobian rows (``(N, C, k)``): ``train`` phi' ``(N, k)``, ``self`` ``(N,)``, ``weights``
    ``w`` ``(N, C)`` and ``first_order_self`` ``(N,)``. (phi is linear, so
    ``phi(g + J^T w) = phi(g) + w . phi(J)``.)"""
    b = np.matmul(psi_J, phi_g[:, :, None])[:, :, 0]
    K = np.matmul(psi_J, np.swapaxes(phi_J, 1, 2))
    w = woodbury_weights(b, K, A, n)
    train = phi_g + np.matmul(w[:, None, :], phi_J)[:, 0]
    first = np.sum(psi_g * phi_g, axis=1)
    return {"train": train, "self": first + np.sum(b * w, axis=1), "weights": w,
            "first_order_self": first}


def solved_weights(solve, G: np.ndarray, J: np.ndarray, A: np.ndarray, n: float
                   ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(w (N, C), b (N, C), H^-1 J^T (N, C, d))`` with ``solve`` applying ``H^-1`` to rows:
    the path of curvature models without feature maps (``C`` solves per example)."""
    N, C, d = J.shape
    XJ = np.asarray(solve(J.reshape(N * C, d)), np.float64).reshape(N, C, d)
    b = np.matmul(XJ, G[:, :, None])[:, :, 0]
    K = np.matmul(J, np.swapaxes(XJ, 1, 2))
    return woodbury_weights(b, K, A, n), b, XJ


def corrected_solutions(solve, G: np.ndarray, J: np.ndarray, A: np.ndarray, n: float
                        ) -> np.ndarray:
    """``v_i = (H - H_i/n)^-1 g_i`` ``(N, d)`` by Woodbury from ``C + 1`` solves per example."""
    w, _, XJ = solved_weights(solve, G, J, A, n)
    return np.asarray(solve(G), np.float64) + np.matmul(w[:, None, :], XJ)[:, 0]


def direct_corrected_solutions(H: np.ndarray, G: np.ndarray, J: np.ndarray, A: np.ndarray,
                               n: float) -> np.ndarray:
    """Oracle: ``(H - J_i^T A_i J_i / n)^-1 g_i`` by a direct solve per example (tests)."""
    out = np.empty_like(G, dtype=np.float64)
    for i in range(len(G)):
        out[i] = np.linalg.solve(H - J[i].T @ A[i] @ J[i] / n, G[i])
    return out
