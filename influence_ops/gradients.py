"""Derivatives of the per-example loss with respect to the target weights theta.

All functions take numpy inputs, run compiled TensorFlow functions over mini-batches of
``batch_size`` rows and return numpy arrays in the model's dtype (float32 for ordinary models,
float64 for the exact-oracle tests). None loops over examples in Python:

* :func:`per_example_gradients` ``(n, d)``. Fast path (sequential heads whose target layers are
  Dense or Conv2D): one batched forward and ONE batched backward to each target layer's
  pre-activations ``z`` give the per-example signals ``delta_i = dl_i/dz_i`` (rows are
  independent: the summed loss is a sum of per-example losses and inference-mode layers do not
  mix examples); then Dense: ``g_W[i] = a_i (outer) delta_i``, Conv2D:
  ``g_W[i] = sum_p patch_ip (outer) delta_ip`` (``extract_patches`` + a batched matmul). General
  path: ``tf.vectorized_map`` over the batch, each lane a ``GradientTape`` through the head
  (pfor turns it into batched ops, but falls back to a per-example loop for conv filters).
* :func:`projected_gradients` ``(n, k)``: per-example gradients times a ``(d, k)`` matrix, fused in
  one compiled function. For Dense layers the projection is factored,
  ``g_W[i] . P = sum_o delta_io (a_i^T P_W)_o``, so the ``(n, d)`` block is never built.
* :func:`hessian_vector_products` ``(m, d)``: forward-over-backward (a ``ForwardAccumulator``
  around a ``GradientTape``) of the mean loss over a data set, plus ``l2_vector * v`` (the
  regulariser's diagonal Hessian, see :class:`InfluenceModel`).
* :func:`directional_derivatives` ``(n, k)``: JVPs ``<g_i, v_j>`` along k directions, forward mode,
  no per-example gradient materialised.
* :func:`explicit_hessian` ``(d, d)``: for small d (exact oracle / exact solver).
* When the only target is the last Dense layer under softmax cross-entropy on logits (the
  most common case) and no GPU is in use, :func:`per_example_gradients`,
  :func:`projected_gradients` (up to ``d k = 2^21``), :func:`hessian_sum`,
  :func:`hessian_vector_products`, the front activations and the per-example losses use the
  numpy closed forms of :mod:`influence_ops.lastlayer`: the same numbers without tracing
  anything (small problems answer in milliseconds).
* :func:`streaming_scores` ``(n, m)``: ``<g_i, psi_q>`` against solved queries ``Psi`` ``(m, d)``
  per layer in the cheaper of a materialized or a Kronecker form, with the per-example losses
  of the same forward pass (see the section at the end of this module).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Optional

import numpy as np

from influence_ops import lastlayer, tf_setup
from influence_ops.model import InfluenceModel

tf = tf_setup.tensorflow()

DEFAULT_BATCH = 256

# The open record_forward() list of this thread, or None.
_FORWARD = contextvars.ContextVar("influence_ops_forward", default=None)


@contextlib.contextmanager
def record_forward():
    """Within it, each :func:`projected_gradients` call appends ``(imodel, losses (n,), model
    outputs (n, ...))`` of its OWN forward pass to the yielded list (the gradients' forward
    computes them anyway), so a caller that also needs the losses (the pipeline's loss column
    and predicted labels) takes them from there instead of a second pass. Heads outside the
    per-layer and last-layer fast paths record nothing; the caller then computes them."""
    record = []
    token = _FORWARD.set(record)
    try:
        yield record
    finally:
        _FORWARD.reset(token)


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def _cached(imodel: InfluenceModel, key, build):
    fn = imodel._fns.get(key)
    if fn is None:
        fn = build()
        imodel._fns[key] = fn
    return fn


def _cast_x(imodel, x):
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.floating):
        return x.astype(imodel.dtype.as_numpy_dtype, copy=False)
    return x


def _fast_path_layers(imodel: InfluenceModel):
    """Target layers if every one allows the per-layer formulas, else None."""
    import keras
    if imodel._head_layers is None:
        return None
    for layer in imodel.target_layers:
        if type(layer) not in (keras.layers.Dense, keras.layers.Conv2D):
            return None
        if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
            return None
        expect = [layer.kernel] + ([layer.bias] if layer.use_bias else [])
        if [id(w) for w in layer.trainable_weights] != [id(w) for w in expect]:
            return None
        try:
            in_rank = len(layer.input.shape)
        except (AttributeError, ValueError):
            return None
        if type(layer) is keras.layers.Dense:
            # Dense on (batch, time, features) shares weights over time: general path.
            if len(layer.kernel.shape) != 2 or in_rank != 2:
                return None
        else:
            if (layer.data_format != "channels_last" or tuple(layer.dilation_rate) != (1, 1)
                    or layer.groups != 1 or layer.padding not in ("valid", "same")
                    or in_rank != 4):
                return None
    return imodel.target_layers


def preactivation(layer, h):
    """``z = h W + b`` of a Dense or Conv2D target layer (before its activation)."""
    import keras
    if type(layer) is keras.layers.Dense:
        z = tf.matmul(h, layer.kernel.value)
    else:
        z = tf.nn.conv2d(h, layer.kernel.value, strides=layer.strides,
                         padding=layer.padding.upper())
    if layer.use_bias:
        z = z + layer.bias.value
    return z


def _forward_with_preactivations(imodel: InfluenceModel, x):
    """Head forward exposing ``(layer, input a, pre-activation z)`` for each target layer."""
    targets = {id(l) for l in imodel.target_layers}
    h, records = imodel.front(x), []
    for layer in imodel._head_layers:
        if id(layer) not in targets:
            h = layer(h, training=False)
            continue
        z = preactivation(layer, h)
        records.append((layer, h, z))
        h = layer.activation(z)
    return h, records


def _per_layer_signals(imodel: InfluenceModel, x, y):
    """``(records, dl/dz per target layer)`` (:func:`_per_layer_signals_and_losses` without
    the losses and outputs, which a traced graph drops when unused)."""
    return _per_layer_signals_and_losses(imodel, x, y)[:2]


def _conv_patch_grads(layer, a, dz):
    """Per-example conv kernel gradients ``(B, kh*kw*cin, cout)``."""
    kh, kw = layer.kernel_size
    sh, sw = layer.strides
    patches = tf.image.extract_patches(a, sizes=[1, kh, kw, 1], strides=[1, sh, sw, 1],
                                       rates=[1, 1, 1, 1], padding=layer.padding.upper())
    b = tf.shape(a)[0]
    kdim, cout = patches.shape[-1], dz.shape[-1]
    return tf.matmul(tf.reshape(patches, [b, -1, kdim]), tf.reshape(dz, [b, -1, cout]),
                     transpose_a=True)


def _per_layer_blocks(imodel: InfluenceModel, x, y):
    """Per-example gradient blocks in the flattening order of ``imodel._tf_vars``."""
    import keras
    records, deltas = _per_layer_signals(imodel, x, y)
    b, blocks = tf.shape(x)[0], []
    for (layer, a, _), dz in zip(records, deltas):
        if type(layer) is keras.layers.Dense:
            blocks.append(tf.reshape(a[:, :, None] * dz[:, None, :], [b, -1]))
            bias = dz
        else:
            blocks.append(tf.reshape(_conv_patch_grads(layer, a, dz), [b, -1]))
            bias = tf.reduce_sum(dz, axis=[1, 2])
        if layer.use_bias:
            blocks.append(bias)
    return blocks


def _per_layer_projection(imodel: InfluenceModel, x, y, P, with_outputs: bool = False):
    """``per_example_gradients @ P`` without building the ``(B, d)`` block for Dense layers;
    with ``with_outputs`` also the per-example losses and model outputs of the same pass."""
    import keras
    records, deltas, losses, outputs = _per_layer_signals_and_losses(imodel, x, y)
    b, k = tf.shape(x)[0], tf.shape(P)[1]
    acc, off = None, 0
    for (layer, a, _), dz in zip(records, deltas):
        ksize = int(np.prod(layer.kernel.shape))
        pk = P[off:off + ksize]
        off += ksize
        if type(layer) is keras.layers.Dense:
            n_in, n_out = layer.kernel.shape
            t = tf.reshape(tf.matmul(a, tf.reshape(pk, [n_in, n_out * k])), [b, n_out, k])
            term = tf.einsum("bo,bok->bk", dz, t)
            db = dz
        else:
            term = tf.matmul(tf.reshape(_conv_patch_grads(layer, a, dz), [b, -1]), pk)
            db = tf.reduce_sum(dz, axis=[1, 2])
        if layer.use_bias:
            nb = layer.bias.shape[0]
            term = term + tf.matmul(db, P[off:off + nb])
            off += nb
        acc = term if acc is None else acc + term
    return (acc, losses, outputs) if with_outputs else acc


def _one_example_gradient(imodel: InfluenceModel, h, y):
    """``(flat gradient (d,), loss)`` of one example from its front activations ``h`` (a lane
    of ``tf.vectorized_map``: the general path for heads without per-layer formulas)."""
    with tf.GradientTape() as tape:
        tape.watch(imodel._tf_vars)
        loss = tf.reduce_sum(imodel.per_example_loss(y[None], imodel.head(h[None])))
    grads = tape.gradient(loss, imodel._tf_vars,
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return imodel.flatten(grads), loss


def _per_example_grad_fn(imodel: InfluenceModel):
    def build():
        def one(args):
            return _one_example_gradient(imodel, *args)[0]

        if _fast_path_layers(imodel) is not None:
            @tf.function(reduce_retracing=True)
            def fn(x, y):
                return tf.concat(_per_layer_blocks(imodel, x, y), axis=1)
        else:
            @tf.function(reduce_retracing=True)
            def fn(x, y):
                h = imodel.front(x)
                return tf.vectorized_map(one, (h, y))
        return fn
    return _cached(imodel, "pe_grad", build)


def per_example_gradients(imodel: InfluenceModel, x, y, batch_size: int = DEFAULT_BATCH
                          ) -> np.ndarray:
    """Gradients of each example's loss w.r.t. theta, shape ``(n, d)``."""
    x = _cast_x(imodel, x)
    y = imodel.check_labels(y, len(x))
    if lastlayer.applicable(imodel):
        return lastlayer.per_example_gradients(imodel, x, y, batch_size)
    fn = _per_example_grad_fn(imodel)
    out = np.empty((len(x), imodel.n_params), dtype=imodel.dtype.as_numpy_dtype)
    for s in _batches(len(x), batch_size):
        out[s] = np.asarray(fn(x[s], y[s]))  # a view: .numpy() would copy once more
    return out


def projected_gradients(imodel: InfluenceModel, x, y, projection: np.ndarray,
                        batch_size: int = DEFAULT_BATCH) -> np.ndarray:
    """``per_example_gradients(x, y) @ projection``, shape ``(n, k)``, fused on device.

    ``projection`` is ``(d, k)``. The ``(batch, d)`` gradient block lives only inside the
    compiled function, so host memory stays ``O(batch * k)``.
    """
    x = _cast_x(imodel, x)
    y = imodel.check_labels(y, len(x))
    record = _FORWARD.get()
    if lastlayer.applicable(imodel) and \
            imodel.n_params * np.shape(projection)[1] <= lastlayer.MAX_PROJECTION_SIZE:
        return lastlayer.projected_gradients(imodel, x, y, projection, batch_size, record)
    proj = tf.constant(np.asarray(projection, dtype=imodel.dtype.as_numpy_dtype))
    grad_fn = _per_example_grad_fn(imodel)
    fast = _fast_path_layers(imodel) is not None
    with_outputs = fast and record is not None

    def build():
        if fast:
            @tf.function(reduce_retracing=True)
            def fn(xb, yb, p):
                return _per_layer_projection(imodel, xb, yb, p, with_outputs)
        else:
            @tf.function(reduce_retracing=True)
            def fn(xb, yb, p):
                return tf.matmul(grad_fn(xb, yb), p)
        return fn
    fn = _cached(imodel, "pe_proj_outputs" if with_outputs else "pe_proj", build)
    out = np.empty((len(x), proj.shape[1]), dtype=imodel.dtype.as_numpy_dtype)
    losses, outputs = [], []
    for s in _batches(len(x), batch_size):
        res = fn(x[s], y[s], proj)
        if with_outputs:
            res, ls, os_ = res
            losses.append(np.asarray(ls))
            outputs.append(np.asarray(os_))
        out[s] = np.asarray(res)
    if with_outputs and losses:
        record.append((imodel, np.concatenate(losses), np.concatenate(outputs)))
    return out


def per_example_losses(imodel: InfluenceModel, x, y, batch_size: int = 1024) -> np.ndarray:
    x = _cast_x(imodel, x)
    y = imodel.check_labels(y, len(x))
    if lastlayer.applicable(imodel):
        return lastlayer.losses_and_outputs(imodel, x, y, batch_size)[0]

    def build():
        @tf.function(reduce_retracing=True)
        def fn(xb, yb):
            return imodel.per_example_loss(yb, imodel.head(imodel.front(xb)))
        return fn
    fn = _cached(imodel, "losses", build)
    return np.concatenate([fn(x[s], y[s]).numpy() for s in _batches(len(x), batch_size)]
                          ) if len(x) else np.zeros((0,), imodel.dtype.as_numpy_dtype)


def losses_and_outputs(imodel: InfluenceModel, x, y, batch_size: int = 1024):
    """``(per-example losses, model outputs)`` from one forward pass (the audit's given vs
    predicted label comes from the same pass as the loss)."""
    x = _cast_x(imodel, x)
    y = np.asarray(imodel.check_labels(y, len(x)))
    if lastlayer.applicable(imodel):
        return lastlayer.losses_and_outputs(imodel, x, y, batch_size)
    # One trace per input kind, whatever the batch size (blocks, tails and single rows).
    spec = (tf.TensorSpec((None,) + x.shape[1:], x.dtype),
            tf.TensorSpec((None,) + y.shape[1:], y.dtype))

    def build():
        @tf.function(input_signature=spec)
        def fn(xb, yb):
            out = imodel.head(imodel.front(xb))
            return imodel.per_example_loss(yb, out), out
        return fn
    fn = _cached(imodel, ("losses_outputs",) + tuple(str(s) for s in spec), build)
    if not len(x):
        return np.zeros((0,), imodel.dtype.as_numpy_dtype), None
    parts = [fn(x[s], y[s]) for s in _batches(len(x), batch_size)]
    return (np.concatenate([p[0].numpy() for p in parts]),
            np.concatenate([p[1].numpy() for p in parts]))


def predicted_labels(imodel: InfluenceModel, outputs: np.ndarray, y_like: np.ndarray):
    """``(predicted labels in the form of y, confidence)`` from model outputs.

    Classification: the arg-max class (binary: the positive class when its probability is
    above 0.5) and the probability the model gives it; regression and custom losses: the
    output itself and NaN confidence."""
    out = np.asarray(outputs, dtype=np.float64)
    n = len(out)
    out2 = out.reshape(n, -1)
    logits = bool(getattr(imodel._loss_fn, "from_logits", False))
    mode = imodel.label_mode
    if mode in ("sparse", "onehot") and out2.shape[1] > 1:
        if logits:
            z = out2 - out2.max(axis=1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(axis=1, keepdims=True)
        else:
            p = out2
        cls = p.argmax(axis=1)
        conf = p[np.arange(n), cls]
        if mode == "onehot":
            return np.eye(out2.shape[1], dtype=np.asarray(y_like).dtype)[cls], conf
        return cls.astype(np.asarray(y_like).dtype), conf
    if mode == "binary" and out2.shape[1] == 1:
        p = 1.0 / (1.0 + np.exp(-out2[:, 0])) if logits else out2[:, 0]
        pred = (p > 0.5)
        return pred.astype(np.asarray(y_like).dtype).reshape(np.shape(y_like)), \
            np.where(pred, p, 1.0 - p)
    return out.reshape(np.shape(y_like)), np.full(n, np.nan)


def predictions(imodel: InfluenceModel, x, batch_size: int = 1024) -> np.ndarray:
    x = _cast_x(imodel, x)
    return np.concatenate([imodel.model(x[s], training=False).numpy()
                           for s in _batches(len(x), batch_size)])


class FrontActivations:
    """The inputs of the first target layer for a set of examples, ``front(x)`` computed once.

    Iterative curvature fits (Arnoldi, CG, LiSSA, PCG, trace estimates) run hundreds of
    Hessian-vector products over the same fit sample; the frozen layers below the targets do
    not change, so their output is cached here and every HVP runs only the head. Indexing
    (``acts[idx]``) gives the activations of a subset. Holds one copy of the sample, in the
    shape of the first target layer's input.
    """

    def __init__(self, h: np.ndarray):
        self.h = h

    def __len__(self):
        return len(self.h)

    def __getitem__(self, idx) -> "FrontActivations":
        return FrontActivations(self.h[idx])


def front_activations(imodel: InfluenceModel, x, batch_size: int = 1024) -> FrontActivations:
    """``front(x)`` in batches (the identity for models that are not split)."""
    if isinstance(x, FrontActivations):
        return x
    x = _cast_x(imodel, x)
    if imodel._front is None or not imodel._front:
        return FrontActivations(x)
    if lastlayer.applicable(imodel):
        return FrontActivations(lastlayer.front(imodel, x, batch_size))

    def build():
        @tf.function(reduce_retracing=True)
        def fn(xb):
            return imodel.front(xb)
        return fn
    fn = _cached(imodel, "front", build)
    return FrontActivations(np.concatenate([fn(x[s]).numpy() for s in
                                            _batches(len(x), batch_size)]))


def _hvp_fn(imodel: InfluenceModel, x, y, on_activations: bool = False):
    """The compiled batched HVP, traced once per input kind: iterative solvers call it with
    one direction (Arnoldi), a few (trace probes) and blocks of queries (CG), on full batches
    and a tail, and each new shape would otherwise cost a retrace of the forward-over-backward
    graph (hundreds of ms)."""
    spec = (tf.TensorSpec((None,) + x.shape[1:], x.dtype),
            tf.TensorSpec((None,) + y.shape[1:], y.dtype),
            tf.TensorSpec((None, imodel.n_params), imodel.dtype))

    def build():
        def one(x, y, v):
            with tf.autodiff.ForwardAccumulator(imodel._tf_vars, imodel.unflatten(v)) as acc:
                with tf.GradientTape() as tape:
                    tape.watch(imodel._tf_vars)
                    h = x if on_activations else imodel.front(x)
                    loss = tf.reduce_sum(imodel.per_example_loss(y, imodel.head(h)))
                grads = tape.gradient(loss, imodel._tf_vars,
                                      unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return imodel.flatten(acc.jvp(grads, unconnected_gradients=tf.UnconnectedGradients.ZERO))

        @tf.function(input_signature=spec)
        def fn(x, y, V):
            # Several directions per call: pfor batches the forward-over-backward pass.
            return tf.vectorized_map(lambda v: one(x, y, v), V)
        return fn
    return _cached(imodel, ("hvp_head" if on_activations else "hvp",)
                   + tuple(str(s) for s in spec), build)


HVP_VECTORS_PER_CALL = 32


def hessian_vector_products(imodel: InfluenceModel, x, y, vectors: np.ndarray,
                            batch_size: int = 1024, include_l2: bool = True,
                            reduce: str = "mean") -> np.ndarray:
    """``H v`` for each row v of ``vectors`` ``(m, d)``; returns ``(m, d)``.

    ``H`` is the Hessian of ``mean_i l(z_i)`` over the given examples (``reduce='sum'`` for the
    sum, as second-order group influence needs), plus the regulariser's
    ``diag(imodel.l2_vector)`` when ``include_l2``. ``x`` may be :class:`FrontActivations`
    (then only the head runs: what repeated products over one fit sample should pass).
    """
    cached = isinstance(x, FrontActivations)
    x = x.h if cached else _cast_x(imodel, x)
    y = imodel.check_labels(y, len(x))
    vectors = np.atleast_2d(np.asarray(vectors, dtype=imodel.dtype.as_numpy_dtype))
    n = len(x)
    if lastlayer.applicable(imodel):
        out = lastlayer.hessian_vector_products(imodel, x, y, vectors, batch_size, cached
                                                ).astype(vectors.dtype)
    else:
        fn = _hvp_fn(imodel, x, y, on_activations=cached)
        out = np.zeros_like(vectors)
        batches = list(_batches(n, batch_size))
        for vs in _batches(len(vectors), HVP_VECTORS_PER_CALL):
            tv = tf.constant(vectors[vs])
            acc = None
            for s in batches:
                r = fn(x[s], y[s], tv)
                acc = r if acc is None else acc + r
            out[vs] = acc.numpy() if acc is not None else 0.0
    if reduce == "mean" and n:
        out /= n
    if include_l2 and imodel.has_regularization:
        out += (imodel.l2_vector * vectors).astype(out.dtype, copy=False)
    return out


def _hessian_fn(imodel: InfluenceModel):
    def build():
        @tf.function(reduce_retracing=True)
        def fn(x, y):
            with tf.GradientTape(persistent=True) as outer:
                outer.watch(imodel._tf_vars)
                with tf.GradientTape() as inner:
                    inner.watch(imodel._tf_vars)
                    loss = tf.reduce_sum(imodel.per_example_loss(y, imodel.head(imodel.front(x))))
                g = imodel.flatten(inner.gradient(
                    loss, imodel._tf_vars, unconnected_gradients=tf.UnconnectedGradients.ZERO))
            jac = outer.jacobian(g, imodel._tf_vars,
                                 unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return tf.concat([tf.reshape(j, [tf.shape(g)[0], -1]) for j in jac], axis=1)
        return fn
    return _cached(imodel, "hessian", build)


MAX_EXPLICIT_D = 20000


def hessian_sum(imodel: InfluenceModel, x, y, batch_size: int = 512) -> np.ndarray:
    """``sum_i Hessian(l(z_i))`` in float64, ``(d, d)``, without the L2 term.

    The building block of the distributed exact Hessian (a sum is what combiners add up).
    """
    if imodel.n_params > MAX_EXPLICIT_D:
        raise ValueError(
            f"explicit Hessian needs d <= {MAX_EXPLICIT_D}, the target layers have "
            f"d={imodel.n_params}: use an Arnoldi, CG or LiSSA solver instead")
    x = _cast_x(imodel, x)
    y = imodel.check_labels(y, len(x))
    if lastlayer.applicable(imodel):
        return lastlayer.hessian_sum(imodel, x, y, batch_size)
    fn = _hessian_fn(imodel)
    total = np.zeros((imodel.n_params, imodel.n_params), dtype=np.float64)
    for s in _batches(len(x), batch_size):
        total += fn(x[s], y[s]).numpy().astype(np.float64)
    return total


def explicit_hessian(imodel: InfluenceModel, x, y, batch_size: int = 512) -> np.ndarray:
    """Hessian of the training objective ``mean_i l(z_i) + 1/2 theta^T diag(l2_vector) theta``,
    ``(d, d)``."""
    h = hessian_sum(imodel, x, y, batch_size) / max(len(x), 1)
    h = 0.5 * (h + h.T)
    return h + np.diag(imodel.l2_vector)


def directional_derivatives(imodel: InfluenceModel, x, y, directions: np.ndarray,
                            batch_size: int = DEFAULT_BATCH) -> np.ndarray:
    """``<grad l(z_i), v_j>`` for k directions ``(k, d)``; returns ``(n, k)``.

    Fast-path models use the factored per-layer projection (all k directions in one pass).
    Otherwise forward mode: one JVP of the per-example loss vector per direction (~k forward
    passes of the head, no ``(n, d)`` gradient matrix); measured slower than
    :func:`projected_gradients` at k = 32 (benchmarks/), so it only pays for very small k.
    """
    if _fast_path_layers(imodel) is not None:
        # Same numbers, cheaper: the factored per-layer projection handles all k at once.
        return projected_gradients(imodel, x, y, np.atleast_2d(directions).T, batch_size)
    x = _cast_x(imodel, x)
    y = imodel.check_labels(y, len(x))
    dirs = tf.constant(np.atleast_2d(np.asarray(directions, imodel.dtype.as_numpy_dtype)))

    def build():
        @tf.function(reduce_retracing=True)
        def fn(xb, yb, V):
            h = imodel.front(xb)

            def one(v):
                with tf.autodiff.ForwardAccumulator(imodel._tf_vars, imodel.unflatten(v)) as acc:
                    loss = imodel.per_example_loss(yb, imodel.head(h))
                return acc.jvp(loss, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return tf.transpose(tf.map_fn(one, V, fn_output_signature=imodel.dtype))
        return fn
    fn = _cached(imodel, "jvp", build)
    out = np.empty((len(x), dirs.shape[0]), dtype=imodel.dtype.as_numpy_dtype)
    for s in _batches(len(x), batch_size):
        out[s] = fn(x[s], y[s], dirs).numpy()
    return out


def penultimate_features(imodel: InfluenceModel, x, batch_size: int = 1024) -> np.ndarray:
    """Inputs of the model's last layer ``(n, p)``: the features of representer points."""
    import keras
    model = imodel.model
    key = "penultimate"
    fn = imodel._fns.get(key)
    if fn is None:
        if isinstance(model, keras.Sequential):
            layers = model.layers[:-1]

            @tf.function(reduce_retracing=True)
            def fn(xb):
                h = xb
                for layer in layers:
                    h = layer(h, training=False)
                return h
        else:
            sub = keras.Model(model.inputs, model.layers[-1].input)

            @tf.function(reduce_retracing=True)
            def fn(xb):
                return sub(xb, training=False)
        imodel._fns[key] = fn
    x = _cast_x(imodel, x)
    return np.concatenate([fn(x[s]).numpy() for s in _batches(len(x), batch_size)])


def mean_gradient(imodel: InfluenceModel, x, y, batch_size: int = 1024,
                  include_l2: bool = True) -> np.ndarray:
    """Gradient of the training objective over the given examples, ``(d,)``."""
    g = per_example_gradients(imodel, x, y, batch_size).astype(np.float64).mean(axis=0)
    if include_l2 and imodel.has_regularization:
        g = g + imodel.l2_vector * imodel.get_flat_params().astype(np.float64)
    return g


def random_directions(d: int, k: int, seed: int, dtype=np.float32) -> Optional[np.ndarray]:
    """Seeded Gaussian ``(d, k)`` matrix scaled by 1/sqrt(k) (Johnson-Lindenstrauss)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((d, k)) / np.sqrt(k)).astype(dtype)


# ------------------------------------------------------------------ streaming scores
#
# Scores of training examples against d-dimensional solved queries ``Psi`` ``(m, d)`` (e.g.
# ``psi_q = (H + damping)^-1 g_q`` from :func:`influence_ops.pcg.block_pcg`):
# ``scores[i, q] = <g_i, psi_q>``, without per-example gradients in host memory. Per target
# layer (fast path) with input patches ``a_t`` (``kdim`` = kh*kw*cin for Conv2D, n_in for
# Dense), output signals ``delta_t`` (``cout``) at ``T`` output positions (T = 1 for Dense):
#
# * ``materialize``: ``G_i = sum_t a_t (outer) delta_t`` per batch (``B x kdim x cout``, on
#   device), then one GEMM with ``Psi^T``. Multiply-adds per example: ``kdim*cout*(T + m)``.
# * ``kron``: ``sum_t delta_t^T Psi_q^T a_t`` as batched matrix products: first
#   ``a_t Psi_q`` (or ``delta_t Psi_q^T``, whichever leaves the smaller ``min(kdim, cout)``
#   factor), then a contraction over t. Multiply-adds: ``T*m*(kdim*cout + min(kdim, cout))``.
#
# Rule (:func:`score_plan`): the cheaper count wins, ties go to ``kron`` (no B x d block).
# Consequence: ``kron`` wins when ``T*m*(kdim*cout + min) <= kdim*cout*(T + m)``, i.e. for a
# Dense layer when ``m * min(n_in, n_out) <= n_in * n_out`` (m up to ~max(n_in, n_out)) and
# for a Conv2D layer essentially only at m = 1 or T = 1; for T, m >= 2 forming the per-example
# kernel gradient once and reusing it for all m queries is cheaper. Peak device memory
# differs too (materialize: ``B*kdim*cout``; kron: ``B*T*m*min(kdim, cout)``): when memory,
# not FLOPs, is the limit, lower ``batch_size``. Unknown T (spatial dims None) -> materialize.

SCORE_MODES = ("auto", "kron", "materialize")


def _layer_geometry(layer):
    """``(kind, T, kdim, cout)`` of a fast-path target layer (T None when unknown)."""
    import keras
    if type(layer) is keras.layers.Dense:
        n_in, n_out = layer.kernel.shape
        return "dense", 1, int(n_in), int(n_out)
    kh, kw, cin, cout = layer.kernel.shape
    try:
        oh, ow = layer.output.shape[1:3]
    except (AttributeError, ValueError):
        oh = ow = None
    T = int(oh) * int(ow) if oh is not None and ow is not None else None
    return "conv2d", T, int(kh * kw * cin), int(cout)


def layer_score_flops(T, kdim, cout, m):
    """Multiply-adds per example of the two scoring forms (bias terms are equal, left out)."""
    if T is None:
        return None, None
    materialize = kdim * cout * (T + m)
    kron = T * m * (kdim * cout + min(kdim, cout))
    return materialize, kron


def score_plan(imodel: InfluenceModel, m: int, mode: str = "auto"):
    """Per target layer: geometry, both FLOP counts and the chosen form (see the rule above).

    Returns a list of dicts, or None for models outside the per-layer fast path (those use the
    general path: per-batch gradient block on device, then a GEMM).
    """
    if mode not in SCORE_MODES:
        raise ValueError(f"mode must be one of {SCORE_MODES}, got {mode!r}")
    layers = _fast_path_layers(imodel)
    if layers is None:
        return None
    plan = []
    for layer in layers:
        kind, T, kdim, cout = _layer_geometry(layer)
        fm, fk = layer_score_flops(T, kdim, cout, m)
        if mode == "auto":
            choice = "kron" if fm is not None and fk <= fm else "materialize"
        else:
            choice = mode
        plan.append(dict(layer=layer.name, kind=kind, T=T, kdim=kdim, cout=cout,
                         flops_materialize=fm, flops_kron=fk, mode=choice,
                         order=("a_first" if cout <= kdim else "delta_first")))
    return plan


def _arrange_psi(imodel, Psi, plan, np_dtype):
    """Per-layer query tensors laid out for the chosen forms (done once per call, on host)."""
    m = Psi.shape[0]
    out, off = [], 0
    for layer, p in zip(imodel.target_layers, plan):
        kdim, cout = p["kdim"], p["cout"]
        w = Psi[:, off:off + kdim * cout]
        off += kdim * cout
        if p["mode"] == "materialize":
            w = w.T                                                      # (kdim*cout, m)
        elif p["order"] == "a_first":
            w = w.reshape(m, kdim, cout).transpose(1, 0, 2).reshape(kdim, m * cout)
        else:
            w = w.reshape(m, kdim, cout).transpose(2, 0, 1).reshape(cout, m * kdim)
        parts = [np.ascontiguousarray(w, dtype=np_dtype)]
        if layer.use_bias:
            parts.append(np.ascontiguousarray(Psi[:, off:off + cout].T, dtype=np_dtype))
            off += cout
        out.append(parts)
    return out


def _per_layer_signals_and_losses(imodel: InfluenceModel, x, y):
    """:func:`_per_layer_signals` plus the per-example losses and the model outputs of the
    same forward pass."""
    with tf.GradientTape() as tape:
        out, records = _forward_with_preactivations(imodel, x)
        zs = [z for _, _, z in records]
        tape.watch(zs)
        losses = imodel.per_example_loss(y, out)
        loss = tf.reduce_sum(losses)
    return records, tape.gradient(loss, zs), losses, out


def _patches(layer, a):
    kh, kw = layer.kernel_size
    sh, sw = layer.strides
    return tf.image.extract_patches(a, sizes=[1, kh, kw, 1], strides=[1, sh, sw, 1],
                                    rates=[1, 1, 1, 1], padding=layer.padding.upper())


def _per_layer_scores(imodel: InfluenceModel, x, y, psis, plan, dtype):
    """``(scores (B, m), losses (B,))`` from one forward and one backward pass."""
    records, deltas, losses, _ = _per_layer_signals_and_losses(imodel, x, y)
    b = tf.shape(x)[0]
    acc = None
    for (layer, a, _), dz, p, parts in zip(records, deltas, plan, psis):
        a, dz = tf.cast(a, dtype), tf.cast(dz, dtype)
        kdim, cout = p["kdim"], p["cout"]
        if p["kind"] == "conv2d":
            a = tf.reshape(_patches(layer, a), [b, -1, kdim])      # (B, T, kdim)
            dz = tf.reshape(dz, [b, -1, cout])                      # (B, T, cout)
            db = tf.reduce_sum(dz, axis=1)
        else:
            a, dz = a[:, None, :], dz[:, None, :]                   # T = 1
            db = dz[:, 0, :]
        w = parts[0]
        if p["mode"] == "materialize":
            g = tf.reshape(tf.matmul(a, dz, transpose_a=True), [b, kdim * cout])
            term = tf.matmul(g, w)
        elif p["order"] == "a_first":                               # (a_t Psi_q) . delta_t
            t = tf.matmul(tf.reshape(a, [-1, kdim]), w)
            t = tf.reshape(t, [b, -1, tf.shape(w)[1] // cout, cout])
            term = tf.einsum("btmc,btc->bm", t, dz)
        else:                                                       # (delta_t Psi_q^T) . a_t
            t = tf.matmul(tf.reshape(dz, [-1, cout]), w)
            t = tf.reshape(t, [b, -1, tf.shape(w)[1] // kdim, kdim])
            term = tf.einsum("btmk,btk->bm", t, a)
        if layer.use_bias:
            term = term + tf.matmul(db, parts[1])
        acc = term if acc is None else acc + term
    return acc, losses


def _general_grads_and_losses_fn(imodel: InfluenceModel):
    def build():
        def one(args):
            return _one_example_gradient(imodel, *args)

        @tf.function(reduce_retracing=True)
        def fn(x, y):
            return tf.vectorized_map(one, (imodel.front(x), y))
        return fn
    return _cached(imodel, "pe_grad_loss", build)


class StreamingQueries:
    """Solved queries ``Psi`` ``(m, d)`` laid out for :func:`streaming_scores`, on device.

    Build once and reuse for every training block (a Beam DoFn's ``setup``): arranging and
    uploading ``Psi`` is ``O(m d)`` per call otherwise.
    """

    def __init__(self, imodel: InfluenceModel, Psi: np.ndarray, dtype=None, mode: str = "auto"):
        if mode not in SCORE_MODES:
            raise ValueError(f"mode must be one of {SCORE_MODES}, got {mode!r}")
        Psi = np.atleast_2d(np.asarray(Psi))
        if Psi.ndim != 2 or Psi.shape[1] != imodel.n_params:
            raise ValueError(f"Psi must be (m, {imodel.n_params}), got {Psi.shape}")
        model_np = np.dtype(imodel.dtype.as_numpy_dtype)
        self.out_dtype = np.dtype(dtype or model_np)
        if self.out_dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {self.out_dtype}")
        # Contract in the wider of the model's and the requested precision.
        self.work = (tf.as_dtype(self.out_dtype) if self.out_dtype.itemsize > model_np.itemsize
                     else imodel.dtype)
        self.imodel, self.m, self.mode = imodel, int(Psi.shape[0]), mode
        self.plan = score_plan(imodel, self.m, mode)
        wnp = self.work.as_numpy_dtype
        if self.plan is not None:
            self.tensors = [[tf.constant(t) for t in parts]
                            for parts in _arrange_psi(imodel, Psi, self.plan, wnp)]
        else:
            self.tensors = tf.constant(np.ascontiguousarray(Psi.T, dtype=wnp))

    def _fn(self):
        imodel, plan, work = self.imodel, self.plan, self.work
        if plan is not None:
            def build():
                @tf.function(reduce_retracing=True)
                def fn(xb, yb, ps):
                    return _per_layer_scores(imodel, xb, yb, ps, plan, work)
                return fn
            key = ("stream", tuple((p["mode"], p["order"]) for p in plan), work.name)
            return _cached(imodel, key, build)
        grad_loss = _general_grads_and_losses_fn(imodel)

        def build_general():
            @tf.function(reduce_retracing=True)
            def fn(xb, yb, p):
                g, losses = grad_loss(xb, yb)
                return tf.matmul(tf.cast(g, p.dtype), p), losses
            return fn
        return _cached(imodel, ("stream_general", work.name), build_general)


def streaming_scores(imodel: InfluenceModel, x, y, Psi, batch_size: int = DEFAULT_BATCH,
                     return_losses: bool = False, dtype=None, mode: str = "auto"):
    """``scores[i, q] = <grad l(z_i), psi_q>`` for query solutions ``Psi`` ``(m, d)``: ``(n, m)``.

    Per-example gradients never reach host memory: fast-path models (Dense/Conv2D targets)
    score each layer in the cheaper of the materialize / Kronecker forms (:func:`score_plan`,
    ``mode`` forces one), other models build the ``(batch, d)`` gradient block on device and
    multiply it there. With ``return_losses`` also returns the per-example losses ``(n,)``
    (model dtype) of the SAME forward pass, so no second pass is needed for them.

    ``Psi``: an array ``(m, d)`` (or ``(d,)``), or a :class:`StreamingQueries` built once for
    many blocks (then ``dtype`` and ``mode`` are its own). ``dtype``: output dtype, default the
    model's; ``np.float64`` on a float32 model also does the contraction with ``Psi`` in
    float64 (activations and signals stay float32-accurate).
    """
    queries = Psi if isinstance(Psi, StreamingQueries) else StreamingQueries(
        imodel, Psi, dtype, mode)
    if queries.imodel is not imodel:
        raise ValueError("these StreamingQueries were built for another InfluenceModel")
    x = _cast_x(imodel, x)
    y = imodel.check_labels(y, len(x))
    fn = queries._fn()
    scores = np.empty((len(x), queries.m), dtype=queries.out_dtype)
    losses = np.empty((len(x),), dtype=imodel.dtype.as_numpy_dtype)
    for s in _batches(len(x), batch_size):
        sc, ls = fn(x[s], y[s], queries.tensors)
        scores[s] = np.asarray(sc)
        losses[s] = np.asarray(ls)
    return (scores, losses) if return_losses else scores
