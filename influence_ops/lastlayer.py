"""Closed forms for the most common target: the model's last Dense layer under softmax
cross-entropy on logits.

When the only target is the last layer, a Dense ``z = h W + b`` with a linear activation, and
the loss is categorical cross-entropy on logits (sparse or one-hot labels, optionally sample
weighted), every derivative the methods need is a small matrix formula in the layer's input
``h`` (the frozen part of the model, run once) and ``p = softmax(z)``:

* per-example gradient ``g_i = vec(h~_i (outer) r_i)`` with ``h~_i = [h_i, 1]`` and
  ``r_i = w_i (p_i - y_i)``: the flattening order of the layer's ``[kernel, bias]`` is exactly
  that of the ``(a + 1, C)`` matrix ``h~ r^T``;
* Hessian ``sum_i (h~_i h~_i^T) (kron) A_i`` with ``A_i = w_i (diag(p_i) - p_i p_i^T)``, and
  Hessian-vector products from the same factors without forming it;
* per-example losses ``w_i sum_c y_ic (logsumexp(z_i) - z_ic)`` and the outputs ``z``.

Label rows are one-hot or probabilities summing to 1; for rows that do not, these are the
derivatives TensorFlow's own softmax cross-entropy gradient uses (``p - y``), so both paths
agree everywhere.

They run in numpy: no ``tf.function`` is traced, so the first call on a small problem (the
digits-sized exact case: 1,200 x 330) costs milliseconds instead of the ~1 s TensorFlow spends
tracing a jacobian and a projection. :mod:`influence_ops.gradients` dispatches here when
:func:`applicable` holds, which excludes processes where TensorFlow sees a GPU (there the
traced path runs on the device), and for projections only up to
:data:`MAX_PROJECTION_SIZE` (``d k``): the numpy work runs with one BLAS thread (TensorFlow
owns the cores, and OpenBLAS threads spinning against TensorFlow's made small products 5-10x
slower on 2 cores), so a large projection GEMM is faster on TensorFlow's pool (d = 2,570
with 2,570 columns on 4,096 rows: 0.35 s there, 0.7 s here); up to that size the two paths
cost about the same per row (d = 330, k = 330: 0.029 s against 0.025 s for 4,096 rows).
``tests/test_lastlayer.py`` checks every formula against the general TensorFlow path.
"""

from __future__ import annotations

import numpy as np

from influence_ops.model import InfluenceModel
from influence_ops.tf_setup import single_threaded_blas

# Largest projection (d x k entries) computed here; larger ones take the traced GEMM.
MAX_PROJECTION_SIZE = 2 ** 21
HVP_CHUNK = 2 ** 23  # numbers in one HVP intermediate (rows x vectors x classes)


def applicable(imodel: InfluenceModel) -> bool:
    """True when the closed forms apply (see the module docstring) and TensorFlow sees no
    GPU; cached per model."""
    hit = imodel._fns.get("lastlayer")
    if hit is None:
        hit = imodel._fns["lastlayer"] = _check(imodel)
    return hit


def _check(imodel: InfluenceModel) -> bool:
    import keras
    from influence_ops import gradients as grads, loo, tf_setup
    if tf_setup.tensorflow().config.list_logical_devices("GPU"):
        return False
    layers = imodel._head_layers
    if layers is None or len(layers) != 1 or grads._fast_path_layers(imodel) is None:
        return False
    layer = layers[0]
    if type(layer) is not keras.layers.Dense or not layer.use_bias:
        return False
    if layer.kernel.dtype != imodel.dtype.name or \
            getattr(layer, "compute_dtype", imodel.dtype.name) != imodel.dtype.name:
        return False   # mixed precision: leave the rounding to TensorFlow
    return loo._softmax_cross_entropy_on_logits(imodel, layer.activation)


def _forward(imodel: InfluenceModel, x, cached: bool = False):
    """``(h~ (n, a + 1), z (n, C))`` in float64: the layer's input with a ones column, and
    the logits. ``cached``: ``x`` already is the layer's input (front activations)."""
    layer = imodel.target_layers[0]
    h = np.asarray(x if cached else imodel.front(x), np.float64).reshape(len(x), -1)
    h = np.concatenate([h, np.ones((len(h), 1))], axis=1)
    Wb = np.concatenate([np.asarray(layer.kernel.numpy(), np.float64),
                         np.asarray(layer.bias.numpy(), np.float64)[None, :]])
    return h, h @ Wb


def _labels(imodel: InfluenceModel, y, n: int, C: int):
    """``(Y (n, C) float64, w (n,))``: one-hot (or given probability) labels and the sample
    weights (1 when the model is not sample-weighted)."""
    y = np.asarray(y)
    w = np.ones(n)
    if imodel.sample_weighted:
        w, y = y[:, -1].astype(np.float64), y[:, :-1]
    if imodel.label_mode == "sparse":
        Y = np.zeros((n, C))
        Y[np.arange(n), y.reshape(n).astype(np.int64)] = 1.0
    else:
        Y = np.asarray(y, np.float64).reshape(n, C)
    return Y, w


def _parts(imodel: InfluenceModel, x, y, cached: bool = False, record=None):
    """``(h~ (n, a + 1), p (n, C), r (n, C), w (n,))`` in float64, where ``r`` is the loss
    gradient in z and ``A_i = w_i (diag(p_i) - p_i p_i^T)``. ``record`` (a list): append
    ``(losses, logits)`` of this forward pass."""
    h, z = _forward(imodel, x, cached)
    Y, w = _labels(imodel, y, len(z), z.shape[1])
    if record is not None:
        record.append((_losses(z, Y, w), z.copy()))
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    r = (p - Y) * w[:, None]
    return h, p, r, w


def _losses(z, Y, w):
    """Keras's cross-entropy on logits ``sum_c y_c (logsumexp(z) - z_c)``, times ``w``.
    Overflowing inputs give non-finite losses, which the callers dead-letter (no warning)."""
    with np.errstate(over="ignore", invalid="ignore"):
        top = z.max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
        return w * (Y.sum(axis=1) * lse - (Y * z).sum(axis=1))


def _batches(n, batch_size):
    from influence_ops.gradients import _batches as batches
    return batches(n, batch_size)


def per_example_gradients(imodel: InfluenceModel, x, y, batch_size: int) -> np.ndarray:
    dtype = imodel.dtype.as_numpy_dtype
    out = np.empty((len(x), imodel.n_params), dtype=dtype)
    with single_threaded_blas():
        for sl in _batches(len(x), batch_size):
            h, _, r, _ = _parts(imodel, x[sl], y[sl])
            out[sl] = (h[:, :, None] * r[:, None, :]).reshape(len(h), -1)
    return out


def projected_gradients(imodel: InfluenceModel, x, y, projection: np.ndarray,
                        batch_size: int, record=None) -> np.ndarray:
    """``g_i . P_j = sum_c r_ic (h~_i^T P_j)_c``: never builds the ``(n, d)`` block.
    ``record`` (:func:`influence_ops.gradients.record_forward`'s list): append ``(imodel,
    losses, outputs)`` of this pass."""
    dtype = imodel.dtype.as_numpy_dtype
    P = np.ascontiguousarray(projection, dtype)  # the reshape below is then a view
    k = P.shape[1]
    out = np.empty((len(x), k), dtype=dtype)
    parts = [] if record is not None else None
    with single_threaded_blas():
        for sl in _batches(len(x), batch_size):
            h, _, r, _ = _parts(imodel, x[sl], y[sl], record=parts)
            C = r.shape[1]
            t = (h.astype(dtype, copy=False) @ P.reshape(h.shape[1], C * k)
                 ).reshape(len(h), C, k)
            out[sl] = np.einsum("nc,nck->nk", r.astype(dtype, copy=False), t)
    if parts:
        record.append((imodel, np.concatenate([p[0] for p in parts]).astype(dtype),
                       np.concatenate([p[1] for p in parts]).astype(dtype)))
    return out


def hessian_sum(imodel: InfluenceModel, x, y, batch_size: int) -> np.ndarray:
    """``sum_i H_i`` in float64, ``(d, d)`` in the ``[kernel, bias]`` flattening order:
    ``sum_i (h~ h~^T) (kron) w_i diag(p_i)`` minus ``B^T diag(w) B`` with
    ``B_i = vec(h~_i (outer) p_i)``."""
    d = imodel.n_params
    total = np.zeros((d, d), np.float64)
    with single_threaded_blas():
        for sl in _batches(len(x), batch_size):
            h, p, _, w = _parts(imodel, x[sl], y[sl])
            n, a1 = h.shape
            C = p.shape[1]
            B = (h[:, :, None] * p[:, None, :]).reshape(n, a1 * C)
            total -= (B * w[:, None]).T @ B
            view = total.reshape(a1, C, a1, C)
            wp = p * w[:, None]
            for c in range(C):
                view[:, c, :, c] += (h * wp[:, c:c + 1]).T @ h
    return total


def losses_and_outputs(imodel: InfluenceModel, x, y, batch_size: int):
    """``(w_i * cross-entropy (n,), logits (n, C))`` in the model's dtype: Keras's
    ``sum_c y_c (logsumexp(z) - z_c)`` and the model's outputs (its last layer is linear)."""
    dtype = imodel.dtype.as_numpy_dtype
    C = imodel.target_layers[0].units
    losses, outputs = np.empty(len(x), dtype), np.empty((len(x), C), dtype)
    with single_threaded_blas():
        for sl in _batches(len(x), batch_size):
            _, z = _forward(imodel, x[sl])
            Y, w = _labels(imodel, y[sl], len(z), C)
            losses[sl] = _losses(z, Y, w)
            outputs[sl] = z
    return losses, outputs


def front(imodel: InfluenceModel, x, batch_size: int) -> np.ndarray:
    """The target layer's input for every row, run eagerly in batches (nothing traced)."""
    return np.concatenate([np.asarray(imodel.front(x[sl]))
                           for sl in _batches(len(x), batch_size)])


def hessian_vector_products(imodel: InfluenceModel, x, y, vectors: np.ndarray,
                            batch_size: int, cached: bool) -> np.ndarray:
    """``sum_i H_i v`` for the rows v of ``vectors`` ``(m, d)``: with ``V`` a row reshaped to
    ``(a + 1, C)``, ``H_i v = vec(h~_i (outer) A_i V^T h~_i)`` and ``A_i z = w_i p_i * (z -
    p_i . z)``; three GEMM-sized contractions per batch, float64. ``cached``: ``x`` holds the
    front activations."""
    a1 = imodel.target_layers[0].kernel.shape[0] + 1
    C = imodel.target_layers[0].units
    V = np.asarray(vectors, np.float64).reshape(len(vectors), a1, C)
    out = np.zeros((len(V), a1, C))
    # Vectors per pass: the (rows, vectors, C) intermediate stays under HVP_CHUNK numbers.
    per = max(1, HVP_CHUNK // (min(batch_size, max(len(x), 1)) * C))
    with single_threaded_blas():
        for sl in _batches(len(x), batch_size):
            h, p, _, w = _parts(imodel, x[sl], y[sl], cached)
            wp = (w[:, None] * p)[:, None, :]
            for vs in _batches(len(V), per):
                m = vs.stop - vs.start
                Vt = np.ascontiguousarray(V[vs].transpose(1, 0, 2)).reshape(a1, m * C)
                Z = (h @ Vt).reshape(len(h), m, C)                   # z = V^T h~ per example
                AZ = wp * (Z - np.einsum("nmc,nc->nm", Z, p)[:, :, None])
                out[vs] += (h.T @ AZ.reshape(len(h), m * C)).reshape(a1, m, C).transpose(1, 0, 2)
    return out.reshape(len(V), a1 * C)
