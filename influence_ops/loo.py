"""Leave-one-out-corrected influence: the example's own curvature taken out of H.

First-order influence predicts the removal of ``z_i`` with the Hessian of the *full* data. When
``z_i`` is removed, the objective becomes ``(1/n) sum_{j != i} l_j + regulariser`` (the sum form
of leave-one-out that ``tests/test_leave_one_out.py`` retrains), whose Hessian is
``H - H_i / n``. One Newton step from the fitted weights on that objective (approximate
leave-one-out, Rad & Maleki 2018; the infinitesimal jackknife's correction, Giordano et al.
2019) moves theta by ``(H - H_i/n)^-1 g_i / n``, so on the scale of this project's scores
(removal changes the test loss by about ``score / n``)::

    corrected(z_i, z_test) = g_test^T (H - H_i / n)^-1 g_i          (H includes l2 and damping)

**Low rank.** With ``z`` the pre-activation of the model's last layer (the logits) and
``A_i = d^2 l_i / dz^2`` (``C x C``), ``H_i = J_i^T A_i J_i`` with ``J_i = dz_i/dtheta``: exact for
last-layer targets (z is linear in theta), the Gauss-Newton part of ``H_i`` for deeper ones
(the network's own second derivative is dropped). Writing ``A_i = R_i S_i R_i^T`` (its
eigendecomposition, ``S_i = sign`` of the eigenvalues, ``R_i`` scaled by ``|eig|^1/2``) and
``U_i = J_i^T R_i`` ``(d, C)``, Woodbury gives, per example, one ``C x C`` system::

    (H - U_i S_i U_i^T / n)^-1 = H^-1 + H^-1 U_i M_i^-1 U_i^T H^-1,   M_i = n S_i - U_i^T H^-1 U_i

so ``v_i = (H - H_i/n)^-1 g_i = H^-1 g_i + H^-1 U_i w_i`` with ``w_i = M_i^-1 U_i^T H^-1 g_i``.

**As feature maps.** For any curvature with maps phi/psi (``<psi(a), phi(b)> = a^T H^-1 b``) the
corrected train feature is ``phi'_i = phi(g_i) + sum_c w_ic phi(u_ic)``, scored against the
*usual* query features: ``<psi(g_test), phi'_i> = g_test^T v_i``. Self-influence is
``g_i^T v_i = g_i^T H^-1 g_i + b_i . w_i`` with ``b_i = U_i^T H^-1 g_i``. The columns ``u_ic``
share the per-layer structure of gradients (``a (outer) signal``), so for an eigenbasis
(exact, Arnoldi) their projections cost about ``C`` extra rows of the same projection, fused
in one pass. For a low-rank model (Arnoldi) this is the correction restricted to its kept
eigenspace: ``(Lambda - B_i S_i B_i^T / n)^-1`` with ``B_i = U^T U_i``.

``M_i`` is singular exactly when ``H - H_i/n`` is (the example alone determines some direction
of theta and there is no L2 / damping on it): leave-one-out is undefined there; those rows
fall back to a pseudo-inverse and a warning says how many.
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


def _preactivation(layer, h):
    import keras
    if type(layer) is keras.layers.Dense:
        z = tf.matmul(h, layer.kernel.value)
    else:
        z = tf.nn.conv2d(h, layer.kernel.value, strides=layer.strides,
                         padding=layer.padding.upper())
    if layer.use_bias:
        z = z + layer.bias.value
    return z


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
            z = _preactivation(layer, h)
            records.append((layer, h, z))
            if is_last:
                z_out, act = z, layer.activation
            else:
                h = layer.activation(z)
            continue
        if is_last and kind == "layer":
            z_out, act = h, layer
        elif is_last and kind == "split":
            z_out, act = _preactivation(layer, h), layer.activation
        elif is_last:
            z_out = layer(h, training=False)
            act = None
        else:
            h = layer(h, training=False)
    return records, z_out, act


def _signals(imodel: InfluenceModel, x, y):
    """Per target layer: ``(layer, a, sig)`` with ``sig`` ``(B, 1 + C, *z_l shape)``: row 0 the
    loss gradient ``dl/dz_l`` (what per-example gradients use), rows 1.. the factor signals
    ``(dz/dz_l)^T R[:, c]``; and the signs ``(B, C)`` of the output Hessian's eigenvalues."""
    with tf.GradientTape(persistent=True) as outer:
        outer.watch(imodel._tf_vars)
        with tf.GradientTape() as inner:
            inner.watch(imodel._tf_vars)
            records, z, act = _forward(imodel, x)
            inner.watch(z)
            outer.watch(z)
            out = z if act is None else act(z)
            loss = tf.reduce_sum(imodel.per_example_loss(y, out))
        dz = inner.gradient(loss, z)
    b = tf.shape(z)[0]
    zf_shape = [b, -1]
    A = outer.batch_jacobian(dz, z)                      # (B, *zs, *zs)
    C = int(np.prod(z.shape[1:]))
    A = tf.reshape(A, [b, C, C])
    A = 0.5 * (A + tf.transpose(A, [0, 2, 1]))
    e, V = tf.linalg.eigh(A)
    # Round-off negatives of a PSD output Hessian (softmax: the all-ones direction) count as
    # positive; their columns are ~0 either way.
    tol = 1e-10 * tf.reduce_max(tf.abs(e), axis=1, keepdims=True)
    signs = tf.where(e < -tol, -tf.ones_like(e), tf.ones_like(e))
    R = V * tf.sqrt(tf.abs(e))[:, None, :]               # A = R diag(signs) R^T
    # Directions in z: the loss gradient first, then the columns of R: (B, 1 + C, C).
    dirs = tf.concat([tf.reshape(dz, zf_shape)[:, None, :], tf.transpose(R, [0, 2, 1])], axis=1)
    out_records = []
    for layer, a, zl in records:
        if zl is z:
            sig = tf.reshape(dirs, tf.concat([[b, C + 1], tf.shape(zl)[1:]], axis=0))
        else:
            J = outer.batch_jacobian(z, zl)              # (B, *zs, *zl shape)
            J = tf.reshape(J, [b, C, -1])
            sig = tf.reshape(tf.matmul(dirs, J), tf.concat([[b, C + 1], tf.shape(zl)[1:]],
                                                           axis=0))
        out_records.append((layer, a, sig))
    del outer
    return out_records, signs


def _blocks(records):
    """Per-example vectors in theta's order, ``(B, 1 + C, d)``: row 0 the gradient."""
    import keras
    blocks = []
    for layer, a, sig in records:
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
    for layer, a, sig in records:
        ksize = int(np.prod(layer.kernel.shape))
        pk = P[off:off + ksize]
        off += ksize
        b, r, k = tf.shape(sig)[0], tf.shape(sig)[1], tf.shape(P)[1]
        if type(layer) is keras.layers.Dense:
            n_in, n_out = layer.kernel.shape
            t = tf.reshape(tf.matmul(a, tf.reshape(pk, [n_in, n_out * k])), [b, n_out, k])
            term = tf.einsum("bro,bok->brk", sig, t)
            bias = sig
        else:
            blk = _blocks([(layer, a, sig)])
            blk = blk[:, :, :ksize]
            term = tf.einsum("brd,dk->brk", blk, pk)
            bias = tf.reduce_sum(tf.reshape(sig, [b, r, -1, sig.shape[-1]]), axis=2)
        if layer.use_bias:
            nb = layer.bias.shape[0]
            term = term + tf.einsum("bro,ok->brk", tf.reshape(bias, [b, r, nb]),
                                    P[off:off + nb])
            off += nb
        acc = term if acc is None else acc + term
    return acc


def _factor_fn(imodel: InfluenceModel, projected: bool):
    def build():
        if projected:
            @tf.function(reduce_retracing=True)
            def fn(x, y, P):
                records, signs = _signals(imodel, x, y)
                return _projected(records, P), signs
        else:
            @tf.function(reduce_retracing=True)
            def fn(x, y):
                records, signs = _signals(imodel, x, y)
                return _blocks(records), signs
        return fn
    return grads._cached(imodel, "loo_proj" if projected else "loo_full", build)


def check_supported(imodel: InfluenceModel) -> None:
    """Raises :class:`LooUnsupportedError` when the model's head is not supported."""
    _split_last(imodel)


def hessian_factors(imodel: InfluenceModel, x, y, batch_size: int = grads.DEFAULT_BATCH
                    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(G (n, d), U (n, C, d), S (n, C))``, float64: per-example gradients and factors with
    ``Hessian(l_i) = U_i^T diag(S_i) U_i`` (rows of ``U_i`` are the columns ``u_ic``)."""
    _split_last(imodel)
    x = grads._cast_x(imodel, x)
    y = imodel.check_labels(y, len(x))
    fn = _factor_fn(imodel, projected=False)
    Gs, Us, Ss = [], [], []
    for s in grads._batches(len(x), batch_size):
        blk, signs = fn(x[s], y[s])
        blk = np.asarray(blk, np.float64)
        Gs.append(blk[:, 0])
        Us.append(blk[:, 1:])
        Ss.append(np.asarray(signs, np.float64))
    return np.concatenate(Gs), np.concatenate(Us), np.concatenate(Ss)


def projected_factors(imodel: InfluenceModel, x, y, P: np.ndarray,
                      batch_size: int = grads.DEFAULT_BATCH
                      ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(G P (n, k), U P (n, C, k), S (n, C))`` float64 in one fused pass (``P`` ``(d, k)``)."""
    _split_last(imodel)
    x = grads._cast_x(imodel, x)
    y = imodel.check_labels(y, len(x))
    fn = _factor_fn(imodel, projected=True)
    Pt = tf.constant(np.asarray(P, imodel.dtype.as_numpy_dtype))
    Gs, Us, Ss = [], [], []
    for s in grads._batches(len(x), batch_size):
        blk, signs = fn(x[s], y[s], Pt)
        blk = np.asarray(blk, np.float64)
        Gs.append(blk[:, 0])
        Us.append(blk[:, 1:])
        Ss.append(np.asarray(signs, np.float64))
    k = Pt.shape[1]
    if not Gs:
        return np.zeros((0, k)), np.zeros((0, 0, k)), np.zeros((0, 0))
    return np.concatenate(Gs), np.concatenate(Us), np.concatenate(Ss)


# ------------------------------------------------------------------ the Woodbury step
def woodbury_weights(b: np.ndarray, K: np.ndarray, signs: np.ndarray, n: float) -> np.ndarray:
    """``w_i = (n S_i - K_i)^-1 b_i`` per example: ``b`` ``(N, C)`` = ``U_i^T H^-1 g_i``,
    ``K`` ``(N, C, C)`` = ``U_i^T H^-1 U_i``, ``signs`` ``(N, C)``. Rows whose system is
    singular (leave-one-out undefined) use a pseudo-inverse, with a warning."""
    if len(b) == 0:
        return np.zeros_like(b)
    K = 0.5 * (K + np.swapaxes(K, 1, 2))
    M = n * (signs[:, :, None] * np.eye(signs.shape[1])[None]) - K
    # Relative conditioning per example: a singular M means H - H_i/n is singular.
    scale = np.maximum(np.abs(M).max(axis=(1, 2)), 1e-300)
    try:
        cond_ok = np.linalg.cond(M / scale[:, None, None]) < 1e12
    except np.linalg.LinAlgError:
        cond_ok = np.zeros(len(M), bool)
    w = np.zeros_like(b)
    if cond_ok.any():
        w[cond_ok] = np.linalg.solve(M[cond_ok], b[cond_ok][:, :, None])[:, :, 0]
    bad = ~cond_ok
    if bad.any():
        log.warning("leave-one-out correction: for %d of %d examples H - H_i/n is singular "
                    "(the example alone determines some direction of theta; add l2 or "
                    "damping); used a pseudo-inverse there", int(bad.sum()), len(b))
        w[bad] = np.einsum("nij,nj->ni", np.linalg.pinv(M[bad], hermitian=True), b[bad])
    return w


def corrected_from_maps(phi_g: np.ndarray, psi_g: np.ndarray, phi_U: np.ndarray,
                        psi_U: np.ndarray, signs: np.ndarray, n: float
                        ) -> Dict[str, np.ndarray]:
    """Corrected features from the curvature's maps of the gradients (``(N, k)``) and of the
    factor columns (``(N, C, k)``): ``train`` phi' ``(N, k)``, ``self`` ``(N,)``, ``weights``
    ``w`` ``(N, C)`` and ``first_order_self`` ``(N,)``."""
    b = np.einsum("nck,nk->nc", psi_U, phi_g)
    K = np.einsum("nck,njk->ncj", psi_U, phi_U)
    w = woodbury_weights(b, K, signs, n)
    train = phi_g + np.einsum("nc,nck->nk", w, phi_U)
    first = np.sum(psi_g * phi_g, axis=1)
    return {"train": train, "self": first + np.sum(b * w, axis=1), "weights": w,
            "first_order_self": first}


def solved_weights(solve, G: np.ndarray, U: np.ndarray, signs: np.ndarray, n: float
                   ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(w (N, C), b (N, C), H^-1 U (N, C, d))`` with ``solve`` applying ``H^-1`` to rows: the
    path of curvature models without feature maps (``C`` solves per example)."""
    N, C, d = U.shape
    XU = np.asarray(solve(U.reshape(N * C, d)), np.float64).reshape(N, C, d)
    b = np.einsum("ncd,nd->nc", XU, G)
    K = np.einsum("ncd,njd->ncj", U, XU)
    return woodbury_weights(b, K, signs, n), b, XU


def corrected_solutions(solve, G: np.ndarray, U: np.ndarray, signs: np.ndarray, n: float
                        ) -> np.ndarray:
    """``v_i = (H - H_i/n)^-1 g_i`` ``(N, d)`` by Woodbury from ``C + 1`` solves per example."""
    w, _, XU = solved_weights(solve, G, U, signs, n)
    return np.asarray(solve(G), np.float64) + np.einsum("nc,ncd->nd", w, XU)


def direct_corrected_solutions(H: np.ndarray, G: np.ndarray, U: np.ndarray, signs: np.ndarray,
                               n: float) -> np.ndarray:
    """Oracle: ``(H - H_i/n)^-1 g_i`` by a direct solve per example (tests; small d)."""
    out = np.empty_like(G, dtype=np.float64)
    for i in range(len(G)):
        Hi = U[i].T @ (signs[i][:, None] * U[i])
        out[i] = np.linalg.solve(H - Hi / n, G[i])
    return out
