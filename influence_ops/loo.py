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
gradients (``a (outer) signal``), so for an eigenbasis (exact, Arnoldi) their projections cost
``C`` extra signals on the same fused projection, and the whole step runs on the device
(:func:`eigen_corrected`). For a low-rank model (Arnoldi) this is the correction restricted to
its kept eigenspace: ``(Lambda - B_i^T A_i B_i / n)^-1`` with ``B_i = J_i E``.

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
    """Per target layer: ``(layer, a, sig, ident)`` with ``sig`` ``(B, 1 + C, *z_l shape)``: row
    0 the loss gradient ``dl/dz_l`` (what per-example gradients use), rows 1.. the Jacobian
    signals ``(dz/dz_l)^T e_c`` (``ident``: they are the unit vectors, z_l = z); and ``A``
    ``(B, C, C)``, the Hessian of the loss in z. The second-order tape runs only when needed
    (deeper target layers, or a loss whose A is not known in closed form)."""
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
        A = tf.reshape(outer.batch_jacobian(dz, z), [b, C, C])
        A = 0.5 * (A + tf.transpose(A, [0, 2, 1]))
    # Directions in z: the loss gradient first, then the unit vectors: (B, 1 + C, C).
    eye = tf.eye(C, batch_shape=[b], dtype=z.dtype)
    dirs = tf.concat([tf.reshape(dz, [b, 1, C]), eye], axis=1)
    out_records = []
    for layer, a, zl in records:
        shape = tf.concat([[b, C + 1], tf.shape(zl)[1:]], axis=0)
        if zl is z:
            sig = tf.reshape(dirs, shape)
        else:
            J = tf.reshape(outer.batch_jacobian(z, zl), [b, C, -1])   # (B, C, |z_l|)
            sig = tf.reshape(tf.matmul(dirs, J), shape)
        # ident: the Jacobian rows are the unit vectors (the last layer's own z).
        out_records.append((layer, a, sig, zl is z))
    return out_records, A


def _blocks(records):
    """Per-example vectors in theta's order, ``(B, 1 + C, d)``: row 0 the gradient."""
    import keras
    blocks = []
    for layer, a, sig, _ in records:
        b, r = tf.shape(sig)[0], tf.shape(sig)[1]
        if type(layer) is keras.layers.Dense:
            blocks.append(tf.reshape(a[:, None, :, None] * sig[:, :, None, :], [b, r, -1]))
            bias = sig
        else:
            kh, kw = layer.kernel_size
            sh, sw = layer.strides
            patches = tf.image.extract_patches(a, sizes=[1, kh, kw, 1], strides=[1, sh, sw, 1],
                                               rates=[1, 1, 1, 1], padding=layer.padding.upper())
            kdim, cout = patches.shape[-1], sig.shape[-1]
            p = tf.reshape(patches, [b, -1, kdim])                    # (B, T, kdim)
            s = tf.reshape(sig, [b, r, -1, cout])                     # (B, R, T, cout)
            blocks.append(tf.reshape(tf.einsum("btk,brto->brko", p, s), [b, r, -1]))
            bias = tf.reduce_sum(s, axis=2)
        if layer.use_bias:
            blocks.append(tf.reshape(bias, [b, r, -1]))
    return tf.concat(blocks, axis=2)


def _projected(records, P):
    """``_blocks(records) @ P`` ``(B, 1 + C, k)``; Dense layers never form the block."""
    import keras
    acc, off = None, 0
    for layer, a, sig, ident in records:
        ksize = int(np.prod(layer.kernel.shape))
        pk = P[off:off + ksize]
        off += ksize
        b, r, k = tf.shape(sig)[0], tf.shape(sig)[1], tf.shape(P)[1]
        dense = type(layer) is keras.layers.Dense
        if dense:
            n_in, n_out = layer.kernel.shape
            t = tf.reshape(tf.matmul(a, tf.reshape(pk, [n_in, n_out * k])), [b, n_out, k])
            if ident:  # the Jacobian rows of a last Dense layer project to t itself
                term = tf.concat([tf.einsum("bo,bok->bk", sig[:, 0], t)[:, None], t], axis=1)
            else:
                term = tf.einsum("bro,bok->brk", sig, t)
            bias = sig
        else:
            blk = _blocks([(layer, a, sig)])
            blk = blk[:, :, :ksize]
            term = tf.einsum("brd,dk->brk", blk, pk)
            bias = tf.reduce_sum(tf.reshape(sig, [b, r, -1, sig.shape[-1]]), axis=2)
        if layer.use_bias:
            nb = layer.bias.shape[0]
            pb = P[off:off + nb]
            if dense and ident:
                term = term + tf.concat([tf.matmul(sig[:, 0], pb)[:, None],
                                         tf.broadcast_to(pb[None], [b, nb, k])], axis=1)
            else:
                term = term + tf.einsum("bro,ok->brk", tf.reshape(bias, [b, r, nb]), pb)
            off += nb
        acc = term if acc is None else acc + term
    return acc


def _factor_fn(imodel: InfluenceModel, projected: bool):
    def build():
        if projected:
            @tf.function(reduce_retracing=True)
            def fn(x, y, P):
                records, A = _signals(imodel, x, y)
                return _projected(records, P), A
        else:
            @tf.function(reduce_retracing=True)
            def fn(x, y):
                records, A = _signals(imodel, x, y)
                return _blocks(records), A
        return fn
    return grads._cached(imodel, "loo_proj" if projected else "loo_full", build)


SINGULAR_RTOL = 1e-12


def _weights_tf(b, K, A, n):
    """``w = (n I - A K)^-1 A b`` per row, float64; rows whose system is singular (relative
    determinant below ``SINGULAR_RTOL``) get ``w = 0`` and a True flag."""
    C = tf.shape(K)[1]
    eye = tf.eye(C, batch_shape=[tf.shape(K)[0]], dtype=tf.float64)
    M = eye - tf.matmul(A, K) / n
    singular = tf.abs(tf.linalg.det(M)) < SINGULAR_RTOL
    M = tf.where(singular[:, None, None], eye, M)
    w = tf.linalg.solve(M, tf.linalg.matvec(A, b)[:, :, None])[:, :, 0] / n
    return tf.where(singular[:, None], tf.zeros_like(w), w), singular


def _eigen_fn(imodel: InfluenceModel):
    """The whole correction for an eigenbasis ``U diag(lam) U^T`` on device: coordinates of
    the gradient and of the Jacobian rows (``c_g`` ``(B, k)``, ``c_J`` ``(B, C, k)``) from one
    fused projection, ``K = c_J diag(1/lam) c_J^T`` and ``b = c_J diag(1/lam) c_g`` in the
    model's dtype, the ``C x C`` systems for ``w`` in float64, then ``e = c_g + c_J^T w`` (the
    coordinates of ``g + J^T w``). Only ``(B, k)`` rows leave the device."""
    def build():
        @tf.function(reduce_retracing=True)
        def fn(x, y, P, inv_lam, n):
            records, A = _signals(imodel, x, y)
            c = _projected(records, P)
            cg, cj = c[:, 0], c[:, 1:]
            cgl = cg * tf.cast(inv_lam, c.dtype)[None, :]
            b = tf.linalg.matvec(cj, cgl)                                  # (B, C)
            K = tf.matmul(cj * tf.cast(inv_lam, c.dtype)[None, None, :], cj,
                          transpose_b=True)                                # (B, C, C)
            w, singular = _weights_tf(tf.cast(b, tf.float64), tf.cast(K, tf.float64),
                                      tf.cast(A, tf.float64), n)
            coords = tf.cast(cg, tf.float64) + tf.cast(
                tf.linalg.matvec(cj, tf.cast(w, c.dtype), transpose_a=True), tf.float64)
            self_scores = tf.cast(tf.reduce_sum(cg * cgl, axis=1), tf.float64) + \
                tf.reduce_sum(tf.cast(b, tf.float64) * w, axis=1)
            return cg, coords, self_scores, singular
        return fn
    return grads._cached(imodel, "loo_eigen", build)


def eigen_corrected(imodel: InfluenceModel, x, y, U: np.ndarray, lam: np.ndarray, n: float,
                    batch_size: int = grads.DEFAULT_BATCH):
    """For ``(H + damping)^-1 = U diag(1/lam) U^T``: ``(U^T g (N, k), U^T (g + J_i^T w_i)
    (N, k), corrected self-influence (N,))`` float64; the train features are the second scaled
    by ``|lam|^-1/2`` (the eigen train map)."""
    _split_last(imodel)
    x = grads._cast_x(imodel, x)
    y = imodel.check_labels(y, len(x))
    fn = _eigen_fn(imodel)
    Pt = tf.constant(np.asarray(U, imodel.dtype.as_numpy_dtype))
    inv_lam = tf.constant(1.0 / np.asarray(lam, np.float64))
    nt = tf.constant(float(n), tf.float64)
    k = Pt.shape[1]
    cg = np.empty((len(x), k))
    coords = np.empty((len(x), k))
    selfs = np.empty(len(x))
    n_singular = 0
    for s in grads._batches(len(x), batch_size):
        a, b, c, sing = fn(x[s], y[s], Pt, inv_lam, nt)
        cg[s], coords[s], selfs[s] = np.asarray(a), np.asarray(b), np.asarray(c)
        n_singular += int(np.sum(sing))
    if n_singular:
        _warn_singular(n_singular, len(x))
    return cg, coords, selfs


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
    return _factors(imodel, x, y, None, batch_size)


def projected_factors(imodel: InfluenceModel, x, y, P: np.ndarray,
                      batch_size: int = grads.DEFAULT_BATCH
                      ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(G P (n, k), J P (n, C, k), A (n, C, C))`` float64 in one fused pass (``P`` ``(d, k)``)."""
    return _factors(imodel, x, y, P, batch_size)


def _factors(imodel, x, y, P, batch_size):
    """The batch loop of both: ``P`` None gives the factors in theta's coordinates."""
    _split_last(imodel)
    x = grads._cast_x(imodel, x)
    y = imodel.check_labels(y, len(x))
    fn = _factor_fn(imodel, projected=P is not None)
    extra = () if P is None else (tf.constant(np.asarray(P, imodel.dtype.as_numpy_dtype)),)
    Gs, Js, As = [], [], []
    for s in grads._batches(len(x), batch_size):
        blk, A = fn(x[s], y[s], *extra)
        blk = np.asarray(blk, np.float64)
        Gs.append(blk[:, 0])
        Js.append(blk[:, 1:])
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
