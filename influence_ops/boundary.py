"""Distances to the decision boundary, in input space and in weight space (data-audit scores).

Two per-example scores from the later releases of Influenciae (Picard et al. 2023), both
"how little must change before the model's prediction for this example flips":

* :func:`sample_boundary`: the L2 distance in **input space** from ``x`` to the decision
  boundary. Examples near the boundary are ambiguous or mislabeled-looking.
* :func:`weights_boundary`: the L2 norm of the smallest perturbation of the **target weights**
  (``imodel.target_layers``, flattened as :meth:`InfluenceModel.get_flat_params` does) that
  flips the prediction for that example alone. A small value means the model's decision on
  the example hangs on a small change of the weights.

Both find the perturbation with DeepFool (Moosavi-Dezfooli et al. 2016). With ``k`` the
predicted class at the start and ``f_j`` the logits at the current perturbation ``v``, each
step linearises the logit differences ``f_j - f_k`` (gradients ``w_j = grad f_j - grad f_k``),
picks the class ``l`` whose linearised boundary is nearest, ``l = argmin_j |f_j - f_k| /
||w_j||``, and adds the projection onto it, ``r = |f_l - f_k| / ||w_l||^2 * w_l``, to the total
``r_tot``; the next point is ``v = (1 + overshoot) r_tot``. It stops once the predicted class
differs from ``k``. The overshoot only pushes the point across a boundary that the
linearisation reaches just short of; the **reported distance does not include it**: a
bisection (``BISECTION_STEPS`` forward passes) along the straight path from the start to the
first point that flipped finds where the class changes, and the distance is the norm of that
perturbation (just past the boundary, relative precision ``2**-BISECTION_STEPS``). For a model
that is linear in the perturbed quantity, one DeepFool step is exact.

Outputs: the logits are what gets linearised. A last layer with a softmax or sigmoid activation
(a ``Dense``/``Conv2D`` activation, or a ``Softmax``/``Activation`` layer) is split off and
its input used; outputs that are probabilities of an unknown origin (``from_logits=False``
without such a layer) are mapped to logits (``log p``, or ``log(p / (1 - p))`` for one
output). Multi-class models (``C >= 2`` outputs, the prediction is the argmax) and
single-output binary models (the prediction is ``logit > 0``, i.e. ``p > 0.5``; handled as
the two logits ``(0, f)``) are supported; regression and multi-label sigmoid outputs have no
single decision boundary and are refused.

Examples whose prediction does not flip within ``max_iter`` steps, or where the logit
differences have zero gradient (DeepFool cannot move), get ``inf``: "no boundary found
nearby", which ranks them as the least suspicious.

Cost, per batch of ``B`` examples still unflipped, per DeepFool iteration: one forward pass
and ``C`` backward passes (``tape.batch_jacobian`` of the ``C`` logits, vectorised over the
batch; binary models: one), plus ``BISECTION_STEPS`` forward passes once at the end. Points
far from the boundary in a non-linear model take several iterations; a linear model takes
one. :func:`sample_boundary` runs the whole model; :func:`weights_boundary` computes the
frozen layers below the first target layer once and runs only the head. Memory per batch is
the Jacobian, ``B x C x D`` (``D`` = input size or number of target weights, host float64):
lower ``batch_size`` for a large ``D``. For comparison, self-influence costs about one
forward and one backward pass per example on top of the method's fit.

The model's weights are never modified: weight perturbations enter the forward pass as
per-example additive terms of the target layers' pre-activations
(``h (W + dW_i) + b + db_i = h W + b + (h dW_i + db_i)``), so :func:`weights_boundary` needs a
``Sequential`` head whose target layers are ``Dense`` or ``Conv2D`` (an error says so
otherwise).
"""

from __future__ import annotations

from typing import Callable, Tuple

import numpy as np

from influence_ops import gradients as grads
from influence_ops import tf_setup
from influence_ops.model import InfluenceModel

tf = tf_setup.tensorflow()

BISECTION_STEPS = 24


# ------------------------------------------------------------------ logits of the model
def _output_rule(imodel: InfluenceModel) -> str:
    """How to get logits from the model's last layer: ``"identity"`` (the outputs are logits),
    ``"drop"`` (a parameter-free Softmax / Activation layer: take its input), ``"split"`` (a
    Dense / Conv2D with a softmax or sigmoid activation: take its pre-activation) or ``"log"``
    (probabilities from something that cannot be split: map them to logits)."""
    import keras
    if imodel.label_mode == "regression":
        raise ValueError("the model is a regression (loss mse): it has no decision boundary")
    outputs = getattr(imodel.model, "outputs", None)
    if not outputs or len(outputs) != 1 or len(outputs[0].shape) != 2:
        raise ValueError("decision boundaries need a model with one output of shape "
                         f"(batch, classes); got {[tuple(o.shape) for o in outputs or []]}")
    n_out = imodel.n_outputs
    last = imodel.model.layers[-1]
    act = imodel._last_activation()
    if act == "sigmoid" and n_out != 1:
        raise ValueError(f"a sigmoid output with {n_out} units is multi-label: each unit has "
                         "its own boundary, there is no single predicted class to flip")
    if act == "softmax" and n_out == 1:
        raise ValueError("a softmax over one output is constant: the model has no boundary")
    if act in ("softmax", "sigmoid"):
        if isinstance(last, (keras.layers.Softmax, keras.layers.Activation)):
            return "drop"
        if type(last) in (keras.layers.Dense, keras.layers.Conv2D):
            return "split"
        return "log"
    if getattr(imodel._loss_fn, "from_logits", None) is False:
        return "log"
    return "identity"


def _to_logits(out, rule: str):
    """Logits ``(B, C)`` from model outputs under ``rule`` (``identity`` or ``log``)."""
    out = tf.reshape(out, [tf.shape(out)[0], -1])
    if rule != "log":
        return out
    tiny = np.finfo(out.dtype.as_numpy_dtype).tiny
    p = tf.clip_by_value(out, tiny, 1.0 - np.finfo(out.dtype.as_numpy_dtype).eps)
    if out.shape[-1] == 1:
        return tf.math.log(p) - tf.math.log1p(-p)
    return tf.math.log(p)


def _input_logits_fn(imodel: InfluenceModel) -> Callable:
    """``x -> logits (B, C)`` through the whole model."""
    import keras
    rule = _output_rule(imodel)
    model = imodel.model
    if rule in ("identity", "log"):
        return lambda x: _to_logits(model(x, training=False), rule)
    last = model.layers[-1]
    if isinstance(model, keras.Sequential):
        below_layers = model.layers[:-1]

        def below(x):
            for layer in below_layers:
                x = layer(x, training=False)
            return x
    else:
        sub = keras.Model(model.inputs, last.input)

        def below(x):
            return sub(x, training=False)
    if rule == "drop":
        return lambda x: _to_logits(below(x), "identity")
    return lambda x: _to_logits(grads.preactivation(last, below(x)), "identity")


def _weight_offset(layer, h, d_kernel, d_bias):
    """``h dW_i + db_i``: the change of a target layer's pre-activation when example i's copy
    of the kernel and bias is shifted by its own row of the perturbation."""
    import keras
    b = tf.shape(h)[0]
    if type(layer) is keras.layers.Dense:
        n_in, n_out = layer.kernel.shape
        out = tf.einsum("bi,bio->bo", h, tf.reshape(d_kernel, [b, n_in, n_out]))
    else:
        kh, kw, cin, cout = layer.kernel.shape
        patches = grads._patches(layer, h)                         # (B, oh, ow, kdim)
        shape = tf.shape(patches)
        flat = tf.reshape(patches, [b, -1, kh * kw * cin])
        out = tf.matmul(flat, tf.reshape(d_kernel, [b, kh * kw * cin, cout]))
        out = tf.reshape(out, [b, shape[1], shape[2], cout])
    if d_bias is not None:
        out = out + (d_bias if type(layer) is keras.layers.Dense
                     else d_bias[:, None, None, :])
    return out


def _weight_logits_fn(imodel: InfluenceModel) -> Callable:
    """``(h = front(x), delta (B, d)) -> logits (B, C)`` with example i's target weights at
    ``theta + delta_i`` (the model's variables are not touched)."""
    if imodel._head_layers is None or grads._fast_path_layers(imodel) is None:
        raise ValueError(
            "weights_boundary needs a Sequential model whose target layers are Dense or Conv2D "
            "(weight perturbations enter as per-example pre-activation offsets); got target "
            f"layers {[type(l).__name__ for l in imodel.target_layers]} in a "
            f"{type(imodel.model).__name__}")
    rule = _output_rule(imodel)
    targets = {id(l) for l in imodel.target_layers}
    layers = imodel._head_layers

    def fn(h, delta):
        parts = iter(tf.split(delta, imodel.sizes, axis=1))
        for i, layer in enumerate(layers):
            is_last = i == len(layers) - 1
            if id(layer) in targets:
                d_kernel = next(parts)
                d_bias = next(parts) if layer.use_bias else None
                z = grads.preactivation(layer, h) + _weight_offset(layer, h, d_kernel, d_bias)
                if is_last and rule == "split":
                    return _to_logits(z, "identity")
                h = layer.activation(z)
            elif is_last and rule == "drop":
                return _to_logits(h, "identity")
            elif is_last and rule == "split":
                return _to_logits(grads.preactivation(layer, h), "identity")
            else:
                h = layer(h, training=False)
        return _to_logits(h, rule)
    return fn


def _compiled(imodel: InfluenceModel, key: str, logits_of: Callable):
    """``(with_jacobian, logits_only)`` compiled functions of ``(state, v)`` where ``v`` is the
    flat perturbation ``(B, D)`` and ``logits_of(state, v)`` the logits at it."""
    def build():
        @tf.function(reduce_retracing=True)
        def with_jacobian(state, v):
            with tf.GradientTape() as tape:
                tape.watch(v)
                z = logits_of(state, v)
            return z, tape.batch_jacobian(z, v)

        @tf.function(reduce_retracing=True)
        def logits_only(state, v):
            return logits_of(state, v)
        return with_jacobian, logits_only
    return grads._cached(imodel, key, build)


# ------------------------------------------------------------------ DeepFool
def _as_two_columns(z, J=None):
    """Binary models: the one logit f becomes the logits ``(0, f)`` (argmax = ``f > 0``)."""
    if z.shape[1] != 1:
        return z, J
    z = np.concatenate([np.zeros_like(z), z], axis=1)
    if J is not None:
        J = np.concatenate([np.zeros_like(J), J], axis=1)
    return z, J


def _deepfool_step(z, J, k):
    """One linearised step for rows still predicted ``k``: ``(step (b, D), ok (b,))``; ``ok`` is
    False where every logit difference has a zero gradient (no direction to move in)."""
    rows = np.arange(len(z))
    f = z - z[rows, k][:, None]                        # (b, C), <= 0 while k is predicted
    w = J - J[rows, k][:, None, :]                     # (b, C, D)
    norm = np.linalg.norm(w, axis=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.abs(f) / norm
    ratio[~np.isfinite(ratio)] = np.inf
    ratio[rows, k] = np.inf
    nearest = np.argmin(ratio, axis=1)
    ok = np.isfinite(ratio[rows, nearest])
    scale = np.where(ok, np.abs(f[rows, nearest]) / np.where(ok, norm[rows, nearest], 1.0) ** 2,
                     0.0)
    return scale[:, None] * w[rows, nearest], ok


def _deepfool(with_jacobian, logits_only, state, dim: int, max_iter: int, overshoot: float,
              dtype) -> Tuple[np.ndarray, np.ndarray]:
    """DeepFool on one batch: ``(distance (B,), perturbation (B, D))`` (inf / NaN where the
    prediction did not flip). ``state`` is indexed by rows; the functions take
    ``(state[rows], v (rows, D))``."""
    n = len(state)

    def logits(rows, v, jacobian):
        args = (tf.gather(state, rows), tf.constant(v.astype(dtype)))
        if jacobian:
            z, J = with_jacobian(*args)
            return _as_two_columns(np.asarray(z, np.float64), np.asarray(J, np.float64))
        return _as_two_columns(np.asarray(logits_only(*args), np.float64))[0]

    v = np.zeros((n, dim))
    r_tot = np.zeros((n, dim))
    active = np.ones(n, dtype=bool)
    flipped = np.zeros(n, dtype=bool)
    k0 = None
    for it in range(max_iter + 1):
        rows = np.flatnonzero(active)
        if rows.size == 0:
            break
        if it == max_iter:                             # the last step's point: check only
            z = logits(rows, v[rows], jacobian=False)
            flipped[rows[np.argmax(z, axis=1) != k0[rows]]] = True
            break
        z, J = logits(rows, v[rows], jacobian=True)
        if k0 is None:
            k0 = np.argmax(z, axis=1)
        done = np.argmax(z, axis=1) != k0[rows]
        flipped[rows[done]] = True
        active[rows[done]] = False
        rows, z, J = rows[~done], z[~done], J[~done]
        step, ok = _deepfool_step(z, J, k0[rows])
        active[rows[~ok]] = False
        r_tot[rows] += step
        v[rows] = (1.0 + overshoot) * r_tot[rows]

    distance = np.full(n, np.inf)
    perturbation = np.full((n, dim), np.nan)
    rows = np.flatnonzero(flipped)
    if rows.size:
        # Bisection on t in [0, 1] along the path to the first flipped point v: the class is
        # k0 at lo, another at hi.
        lo, hi = np.zeros(rows.size), np.ones(rows.size)
        for _ in range(BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            same = np.argmax(logits(rows, mid[:, None] * v[rows], jacobian=False),
                             axis=1) == k0[rows]
            lo, hi = np.where(same, mid, lo), np.where(same, hi, mid)
        perturbation[rows] = hi[:, None] * v[rows]
        distance[rows] = np.linalg.norm(perturbation[rows], axis=1)
    return distance, perturbation


def _check_args(imodel, max_iter, overshoot, batch_size):
    if not isinstance(imodel, InfluenceModel):
        raise ValueError(f"expected an InfluenceModel, got {type(imodel).__name__}: wrap a Keras "
                         "model as InfluenceModel(model, target_layers=..., loss=...)")
    if int(max_iter) != max_iter or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    if not overshoot >= 0:
        raise ValueError(f"overshoot must be >= 0, got {overshoot!r}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _inputs(imodel: InfluenceModel, x) -> np.ndarray:
    """``x`` as a numeric batch ``(n, ...)``, floating inputs in the model's dtype."""
    x = np.asarray(x)
    if x.ndim < 2 or not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"x must be a numeric batch of examples (n, ...), got shape {x.shape} "
                         f"and dtype {x.dtype}")
    return grads._cast_x(imodel, x)


# ------------------------------------------------------------------ public scores
def sample_boundary(imodel: InfluenceModel, x, max_iter: int = 50, overshoot: float = 0.02,
                    batch_size: int = 256, return_perturbation: bool = False):
    """Distance in input space from each example to the model's decision boundary, ``(n,)``.

    DeepFool steps on the input (see the module docstring), batched over ``batch_size``
    examples; the reported length excludes the overshoot (refined by bisection). ``inf`` where
    the prediction does not flip within ``max_iter`` steps. Inputs must be continuous (a
    gradient with respect to them must exist). Smaller = closer to the boundary = more
    ambiguous.

    ``return_perturbation``: also return the perturbations ``r`` (x's shape; ``x + r`` is
    just across the boundary; NaN rows where nothing flipped).
    """
    _check_args(imodel, max_iter, overshoot, batch_size)
    x = _inputs(imodel, x)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"sample_boundary needs continuous (floating) inputs, got {x.dtype}: "
                         "a distance in input space is not defined for integer features")
    logits = _input_logits_fn(imodel)
    shape = x.shape[1:]

    def logits_of(x0, v):
        return logits(x0 + tf.reshape(v, tf.shape(x0)))

    with_jac, only = _compiled(imodel, "boundary_input", logits_of)
    dim = int(np.prod(shape))
    distance = np.empty(len(x))
    perturbation = np.empty((len(x), dim)) if return_perturbation else None
    for s in grads._batches(len(x), int(batch_size)):
        d, r = _deepfool(with_jac, only, tf.constant(x[s]), dim, int(max_iter),
                         float(overshoot), x.dtype)
        distance[s] = d
        if return_perturbation:
            perturbation[s] = r
    if return_perturbation:
        return distance, perturbation.reshape((len(x),) + shape)
    return distance


def weights_boundary(imodel: InfluenceModel, x, max_iter: int = 50, overshoot: float = 0.02,
                     batch_size: int = 64, return_perturbation: bool = False):
    """Norm of the smallest perturbation of the target weights that flips each example's
    prediction, ``(n,)`` (the L2 norm over the flattened target-layer parameters).

    DeepFool steps in weight space, one perturbation per example (per-example gradients of the
    logit differences with respect to the target weights; see the module docstring); the
    reported norm excludes the overshoot (refined by bisection). ``inf`` where the prediction
    does not flip within ``max_iter`` steps. The model's weights are left unchanged.
    ``batch_size`` is smaller than :func:`sample_boundary`'s: the Jacobian holds
    ``batch_size x C x d`` values.

    ``return_perturbation``: also return the perturbations ``(n, d)`` in the order of
    :meth:`InfluenceModel.get_flat_params` (``theta + delta_i`` is just across example i's
    boundary; NaN rows where nothing flipped).
    """
    _check_args(imodel, max_iter, overshoot, batch_size)
    logits = _weight_logits_fn(imodel)
    x = _inputs(imodel, x)
    with_jac, only = _compiled(imodel, "boundary_weights", logits)
    d = imodel.n_params
    distance = np.empty(len(x))
    perturbation = np.empty((len(x), d)) if return_perturbation else None
    for s in grads._batches(len(x), int(batch_size)):
        h = imodel.front(x[s])
        dist, r = _deepfool(with_jac, only, h, d, int(max_iter), float(overshoot),
                            imodel.dtype.as_numpy_dtype)
        distance[s] = dist
        if return_perturbation:
            perturbation[s] = r
    return (distance, perturbation) if return_perturbation else distance
