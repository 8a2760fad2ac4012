"""K-FAC and EK-FAC curvature for Dense and Conv2D target layers.

References: K-FAC, Martens & Grosse 2015 ("Optimizing neural networks with Kronecker-factored
approximate curvature"); KFC for convolutions, Grosse & Martens 2016 ("A Kronecker-factored
approximate Fisher matrix for convolution layers"); EK-FAC, George et al. 2018 ("Fast
approximate natural gradient descent in a Kronecker-factored eigenbasis"); its use for influence
functions, Grosse et al. 2023 ("Studying large language model generalization with influence
functions").

**Block form.** A target layer with input ``a`` (``din``) and pre-activation ``z = W^T a + b``
(``dout``) has the per-example gradient ``G = a_aug d^T``, ``(K, dout)`` with ``K = din + 1``
when the layer has a bias: ``a_aug = [a, 1]`` and ``d = dl/dz``. The bias is the LAST row of
the block, so the row-major flattening of ``G`` is exactly theta's order for that layer (kernel
row-major, then bias); without a bias ``K = din``. Conv2D: ``a_t`` is the input patch at output
position ``t`` (``tf.image.extract_patches``, flattened ``(kh, kw, cin)``, the kernel's own
order, so again ``K = kh*kw*cin + 1``), ``d_t = dl/dz_t`` and ``G = sum_t a_aug,t d_t^T``.

**K-FAC factors** (per layer, over n examples):

    A = (1/n) sum_n sum_t a_aug,nt a_aug,nt^T          (K, K)
    S = (1/n) sum_n (1/T) sum_t d_nt d_nt^T            (dout, dout)

with ``T = 1`` for Dense and ``T = Ho*Wo`` output positions for Conv2D (Grosse & Martens'
convention: Omega sums over positions, Gamma averages, so that ``A kron S`` equals
``(1/n) sum_n sum_t (a a^T) kron (d d^T)`` under their spatial homogeneity / uncorrelated
derivative assumptions). Only the K-FAC product ``A kron S`` matters; the 1/T only moves scale
between the two factors. Since ``vec_rowmajor(a d^T) = a kron d``, the K-FAC curvature of a
layer in theta's order is ``kron(A, S)`` with no permutation; layers are independent (block
diagonal). With ``A = QA diag(eA) QA^T`` and ``S = QS diag(eS) QS^T``,
``kron(A, S) = (QA kron QS) diag(eA kron eS) (QA kron QS)^T``.

**Which d.** ``sampling`` chooses the labels the signals d are computed for:

* ``"true_fisher"`` (default): one label per example **sampled from the model's predictive
  distribution**, so ``E[d d^T]`` is the Fisher, which for softmax/sigmoid cross-entropy is the
  generalised Gauss-Newton (GGN) at the logits. Categorical losses sample a class from
  ``p = softmax(logits)`` (or the probability output); binary cross-entropy samples each of the
  k outputs from Bernoulli(p) and scales d by ``sqrt(k)`` (Keras averages the k terms, so
  ``l = NLL / k`` and ``E[grad grad^T] = F / k^2`` while the GGN is ``F / k``); mean squared
  error ``l = ||y - f||^2 / k`` samples ``y = f + sqrt(k/2) eps``, ``eps ~ N(0, I)``, whose
  ``E[d d^T] = J^T (2/k) I J`` is the GGN at the output (the exact Hessian for a linear output).
  The randomness is **keyed on the example's content**: the uniforms of an example are a hash
  of (seed, its input bytes), so the sample does not depend on batching, worker assignment,
  merge order or retries, and the correction pass sees the same labels as the factor pass.
* ``"empirical"``: the given labels (empirical Fisher; the only choice for a custom loss).
* ``"exact_ggn"``: the exact expectation over the output distribution, through a square root
  of the output Hessian: categorical ``sum_c p_c d_c d_c^T`` (``d_c`` for label c); binary
  ``sum_j sum_{b in {0,1}} k P(y_j = b) d_jb d_jb^T`` where ``d_jb`` is the signal for the
  soft label ``p`` with entry j set to b (the other outputs then contribute no gradient); MSE
  ``sum_j d_j d_j^T`` with the label ``f - sqrt(k/2) e_j`` (output cotangent ``sqrt(2/k) e_j``).
  Costs (number of columns m = classes, 2k or k) times a backward pass, and m times the head's
  activation memory per batch (lower ``batch_size`` for wide heads); the front below the first
  target layer runs once. Exact, hence the choice for tests and few-class problems.

**EK-FAC correction** (second pass, George et al. eq. 10): in the K-FAC eigenbasis,

    Lambda[i, j] = (1/n) sum_n E_y[ (QA^T G_n QS)_ij ^ 2 ]                 (K, dout)

(the expectation over y is the sampled label, the given label, or the exact sum over the m
columns above). Dense: ``QA^T a d^T QS = (QA^T a)(QS^T d)^T`` so
``Lambda = (QA^T a)^2^T (QS^T d)^2`` summed over examples, one (K, dout) matmul per batch, no
per-example block; Conv2D: ``R_n = sum_t (QA^T a_t)(QS^T d_t)^T`` per example, then squared.
Without the correction (``Lambda = eA kron eS``) the same object is plain K-FAC.

**The curvature model** per layer is ``H_l = (QA kron QS) diag(Lambda) (QA kron QS)^T``. The
objective's L2 term (``imodel.l2``, or ``imodel.l2_vector`` per parameter when present) is added
as ``diag((QA^2)^T L2_l (QS^2))`` in the eigenbasis, ``L2_l`` the (K, dout) block of the L2
vector: the diagonal of ``(QA kron QS)^T diag(l2) (QA kron QS)``. When l2 is one constant per
layer (a scalar l2 always is) this is exactly ``+ l2 I`` (Q is orthogonal); otherwise it is the
best diagonal approximation in the eigenbasis, like the correction itself.
**Damping** is one global scalar times the identity, the same meaning as the other solvers'
``damping`` (so the EK-FAC operator approximates the same ``H + damping I`` that exact/CG solves
invert, which a preconditioner needs); default ``rel_damping * mean(Lambda)`` over all layers'
entries (the mean eigenvalue of the loss curvature, ``trace / d``), ``rel_damping = 0.1``.
Eigenvalues ``Lambda + l2 + damping <= 1e-10 * max`` are dropped from inverses (pseudo-inverse),
the eigenvalue policy of :mod:`influence_ops.solvers`.

**Dtypes.** Per-batch sums (``a a^T``, ``d d^T``, squared rotated gradients) are computed on the
device in the model's dtype (the precision the activations and gradients have anyway); they are
accumulated across batches, blocks and workers in float64, and eigendecompositions, ``Lambda``
and the numpy operators (``apply_*``, ``diagonal``) are float64. :meth:`EKFAC.features` runs on
the device in the model's dtype (like ``gradients.per_example_gradients``), with QA, QS and the
scales cast to it.

**Beam.** :class:`KFACFactorsCombiner` and :class:`EKFACCorrectionCombiner` use CombineFn's
method names and take ``(x, y)`` blocks; the factor pass's output (:class:`KFACFactors`, numpy
arrays only) is what the correction pass needs, as a constructor argument or a side input
keyword ``factors``.
"""

from __future__ import annotations

import json
import types
from dataclasses import astuple, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from influence_ops import gradients as grads
from influence_ops import tf_setup
from influence_ops.model import InfluenceModel, InfluenceModelError

tf = tf_setup.tensorflow()

SAMPLINGS = ("true_fisher", "empirical", "exact_ggn")
REL_FLOOR = 1e-10  # the eigenvalue policy of influence_ops.solvers


# ================================================================================ model checks
@dataclass(frozen=True)
class LayerLayout:
    """A target layer as a ``(K, dout)`` block (``K`` includes the bias row)."""
    name: str
    kind: str  # "dense" | "conv2d"
    K: int
    dout: int
    has_bias: bool

    @property
    def size(self) -> int:
        return self.K * self.dout


def supported_layers(imodel: InfluenceModel) -> List[LayerLayout]:
    """Layouts of the target layers; a clear error when one is not Dense/Conv2D-like."""
    import keras
    if grads._fast_path_layers(imodel) is None:
        if imodel._head_layers is None:
            raise InfluenceModelError(
                "K-FAC/EK-FAC needs a keras.Sequential model (it reads each target layer's "
                f"input and pre-activation); got a {type(imodel.model).__name__}")
        bad = [l for l in imodel.target_layers if grads._fast_path_layers(types.SimpleNamespace(
            _head_layers=imodel._head_layers, target_layers=[l])) is None]
        raise InfluenceModelError(
            "K-FAC/EK-FAC supports Dense target layers on (batch, features) inputs and Conv2D "
            "(channels_last, no dilation, groups=1, 'valid'/'same' padding) with plain "
            "kernel/bias weights; unsupported target layer(s): "
            + ", ".join(f"{l.name!r} ({type(l).__name__})" for l in bad)
            + ". Use another curvature (exact, Arnoldi, CG) or other target_layers")
    out = []
    for layer in imodel.target_layers:
        shape = tuple(layer.kernel.shape)
        kind = "dense" if type(layer) is keras.layers.Dense else "conv2d"
        out.append(LayerLayout(layer.name, kind, int(np.prod(shape[:-1])) + int(layer.use_bias),
                               int(shape[-1]), bool(layer.use_bias)))
    return out


def _loss_kind(imodel: InfluenceModel) -> str:
    import keras
    if imodel.label_mode in ("sparse", "onehot", "binary", "regression"):
        return imodel.label_mode
    if isinstance(imodel._loss_fn, keras.losses.MeanSquaredError):
        return "regression"
    return "custom"


@dataclass(frozen=True)
class _Spec:
    """What one pass computes: loss kind, sampling, number of label columns m per example."""
    kind: str
    sampling: str
    from_logits: bool
    k: int  # model outputs
    m: int  # label columns per example


def _spec(imodel: InfluenceModel, sampling: str) -> _Spec:
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    kind = _loss_kind(imodel)
    from_logits = bool(getattr(imodel._loss_fn, "from_logits", False))
    if sampling == "empirical":
        return _Spec(kind, sampling, from_logits, 0, 1)
    if kind == "custom":
        raise InfluenceModelError(
            f"sampling={sampling!r} needs the model's predictive distribution, unknown for the "
            f"custom loss {imodel.loss_spec!r}: use sampling='empirical' (the given labels)")
    shape = imodel.model.outputs[0].shape if getattr(imodel.model, "outputs", None) else None
    if shape is None or len(shape) != 2 or shape[-1] is None:
        raise InfluenceModelError(
            f"sampling={sampling!r} needs model outputs of shape (batch, k), got {shape}; use "
            "sampling='empirical'")
    k = int(shape[-1])
    m = 1 if sampling == "true_fisher" else {"binary": 2 * k}.get(kind, k)
    return _Spec(kind, sampling, from_logits, k, m)


# ============================================================================ content-keyed noise
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z):
    """splitmix64's finaliser on uint64 arrays (wraps modulo 2^64)."""
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def example_keys(x: np.ndarray, seed: int) -> np.ndarray:
    """A 64-bit key per row of ``x`` from its bytes and the seed, ``(n,)`` uint64 (vectorised:
    the loop is over 8-byte words, never over examples)."""
    n = len(x)
    b = np.ascontiguousarray(x).reshape(n, -1).view(np.uint8)
    pad = (-b.shape[1]) % 8
    if pad:
        b = np.pad(b, ((0, 0), (0, pad)))
    words = np.ascontiguousarray(b).view(np.uint64)
    with np.errstate(over="ignore"):
        pos = (np.arange(words.shape[1], dtype=np.uint64) + np.uint64(1)) * _GOLDEN
        h = _mix64(words ^ pos).sum(axis=1, dtype=np.uint64)
        return _mix64(h ^ _mix64(np.uint64(seed % 2 ** 64) + _GOLDEN))


def _uniforms(keys: np.ndarray, k: int) -> np.ndarray:
    """``(n, k)`` uniforms in the open interval (0, 1), column j from ``mix(key + (j+1) phi)``."""
    with np.errstate(over="ignore"):
        bits = _mix64(keys[:, None] + np.arange(1, k + 1, dtype=np.uint64)[None, :] * _GOLDEN)
    return ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53


def _noise(spec: _Spec, x: np.ndarray, seed: int) -> np.ndarray:
    """The sampling noise per example: uniforms (categorical: 1, binary: k) or N(0, 1) (MSE: k)."""
    keys = example_keys(x, seed)
    if spec.kind in ("sparse", "onehot"):
        return _uniforms(keys, 1)
    if spec.kind == "binary":
        return _uniforms(keys, spec.k)
    u = _uniforms(keys, 2 * spec.k)  # Box-Muller
    return np.sqrt(-2.0 * np.log(u[:, :spec.k])) * np.cos(2.0 * np.pi * u[:, spec.k:])


# ============================================================================ per-layer signals
class _HeadOnly:
    """An InfluenceModel's head with an identity front, so that the one per-layer forward
    (``gradients._forward_with_preactivations``) runs on front activations that were tiled for
    ``exact_ggn`` without running the front m times."""

    def __init__(self, imodel):
        self.target_layers, self._head_layers = imodel.target_layers, imodel._head_layers

    @staticmethod
    def front(h):
        return h


def _labels_and_weights(spec: _Spec, out0, y, noise):
    """Labels ``(m*B, ...)`` (row ``c*B + i`` = column c of example i) and per-row weights
    (None = 1) such that ``sum_rows w^2 grad l(Y) grad l(Y)^T`` is the chosen curvature."""
    if spec.sampling == "empirical":
        return y, None
    dt, k, m = out0.dtype, spec.k, spec.m
    b = tf.shape(out0)[0]
    if spec.kind in ("sparse", "onehot"):
        p = (tf.nn.softmax(out0, axis=-1) if spec.from_logits
             else out0 / tf.reduce_sum(out0, axis=-1, keepdims=True))
        if spec.sampling == "true_fisher":  # inverse CDF: the first class with cdf >= u
            c = tf.reduce_sum(tf.cast(tf.cumsum(p, axis=1)[:, :-1] < noise, tf.int64), axis=1)
            w = None
        else:
            c = tf.repeat(tf.range(k, dtype=tf.int64), b)
            w = tf.sqrt(tf.reshape(tf.transpose(p), [-1]))
        return (c if spec.kind == "sparse" else tf.one_hot(c, k, dtype=dt)), w
    if spec.kind == "binary":
        p = tf.sigmoid(out0) if spec.from_logits else out0
        if spec.sampling == "true_fisher":
            return tf.cast(noise < p, dt), tf.constant(np.sqrt(k), dt)
        col = tf.repeat(tf.range(m), b)  # column r = bit * k + j
        mask = tf.one_hot(col % k, k, dtype=dt)
        bit = tf.cast(col // k, dt)[:, None]
        pt = tf.tile(p, [m, 1])
        pj = tf.reduce_sum(pt * mask, axis=1, keepdims=True)
        prob = bit * pj + (1 - bit) * (1 - pj)
        return pt * (1 - mask) + bit * mask, tf.sqrt(k * prob[:, 0])
    # regression (Keras MSE averages over the k outputs)
    scale = tf.constant(np.sqrt(k / 2.0), dt)
    if spec.sampling == "true_fisher":
        return out0 + scale * tf.cast(noise, dt), None
    return tf.tile(out0, [k, 1]) - scale * tf.one_hot(tf.repeat(tf.range(k), b), k, dtype=dt), None


def _patches(layer, a):
    kh, kw = layer.kernel_size
    sh, sw = layer.strides
    p = tf.image.extract_patches(a, sizes=[1, kh, kw, 1], strides=[1, sh, sw, 1],
                                 rates=[1, 1, 1, 1], padding=layer.padding.upper())
    return tf.reshape(p, [tf.shape(a)[0], -1, p.shape[-1]])


def _layer_rows(imodel: InfluenceModel, spec: _Spec, x, y, noise):
    """Per target layer ``(layer, a_aug (B, T, K), d (m, B, T, dout))`` for one batch."""
    import keras
    h = imodel.front(x)
    b = tf.shape(h)[0]
    if spec.m > 1:
        h = tf.tile(h, [spec.m] + [1] * (h.shape.rank - 1))
    with tf.GradientTape() as tape:
        out, records = grads._forward_with_preactivations(_HeadOnly(imodel), h)
        zs = [z for _, _, z in records]
        tape.watch(zs)
        labels, w = _labels_and_weights(spec, tf.stop_gradient(out[:b]), y, noise)
        loss = imodel.per_example_loss(labels, out)
        loss = tf.reduce_sum(loss if w is None else loss * w)
    rows = []
    for (layer, a, _), dz in zip(records, tape.gradient(loss, zs)):
        a = a[:b]
        ar = a[:, None, :] if type(layer) is keras.layers.Dense else _patches(layer, a)
        if layer.use_bias:
            ar = tf.concat([ar, tf.ones_like(ar[:, :, :1])], axis=2)
        rows.append((layer, ar, tf.reshape(dz, [spec.m, b, -1, dz.shape[-1]])))
    return rows


def _rotated_blocks(layer, ra, rd):
    """``sum_t (QA^T a_t)(QS^T d_t)^T`` per example and column: ``(m, B, K, dout)``."""
    import keras
    if type(layer) is keras.layers.Dense:
        return ra[None, :, 0, :, None] * rd[:, :, 0, None, :]
    return tf.einsum("btk,cbto->cbko", ra, rd)


def _factor_fn(imodel, spec):
    def build():
        @tf.function(reduce_retracing=True)
        def fn(x, y, noise):
            out = []
            for _, ar, dr in _layer_rows(imodel, spec, x, y, noise):
                a2 = tf.reshape(ar, [-1, ar.shape[-1]])
                d2 = tf.reshape(dr, [-1, dr.shape[-1]])
                t = tf.cast(tf.shape(ar)[1], ar.dtype)
                out.append((tf.matmul(a2, a2, transpose_a=True),
                            tf.matmul(d2, d2, transpose_a=True) / t))
            return out
        return fn
    return grads._cached(imodel, ("kfac_factors", spec), build)


def _correction_fn(imodel, spec):
    def build():
        import keras

        @tf.function(reduce_retracing=True)
        def fn(x, y, noise, qas, qss):
            out = []
            for (layer, ar, dr), qa, qs in zip(_layer_rows(imodel, spec, x, y, noise), qas, qss):
                ra, rd = tf.matmul(ar, qa), tf.matmul(dr, qs)
                if type(layer) is keras.layers.Dense:  # sum_n (QA^T a)^2 (x) sum_c (QS^T d_c)^2
                    out.append(tf.matmul(tf.square(ra[:, 0]),
                                         tf.reduce_sum(tf.square(rd[:, :, 0]), axis=0),
                                         transpose_a=True))
                else:
                    out.append(tf.reduce_sum(tf.square(_rotated_blocks(layer, ra, rd)), [0, 1]))
            return out
        return fn
    return grads._cached(imodel, ("ekfac_correction", spec), build)


def _features_fn(imodel):
    spec = _Spec("custom", "empirical", False, 0, 1)

    def build():
        @tf.function(reduce_retracing=True)
        def fn(x, y, qas, qss, scales):
            b, out = tf.shape(x)[0], []
            for (layer, ar, dr), qa, qs, sc in zip(_layer_rows(imodel, spec, x, y, None),
                                                   qas, qss, scales):
                r = _rotated_blocks(layer, tf.matmul(ar, qa), tf.matmul(dr, qs))[0]
                out.append(tf.reshape(r * sc, [b, -1]))
            return tf.concat(out, axis=1)
        return fn
    return grads._cached(imodel, "ekfac_features", build)


def _prepare(imodel, spec, seed, x, y):
    x = grads._cast_x(imodel, x)
    dt = imodel.dtype.as_numpy_dtype
    if spec.sampling == "empirical":
        y = imodel.check_labels(y, len(x))
    else:
        y = None  # labels come from the model
    noise = (_noise(spec, x, seed) if spec.sampling == "true_fisher"
             else np.zeros((len(x), 1))).astype(dt)
    return x, y, noise


def _batch_sums(imodel, spec, seed, x, y, batch_size, fn, *extra):
    """Runs ``fn`` over batches; returns its outputs summed in float64 and the count."""
    x, y, noise = _prepare(imodel, spec, seed, x, y)
    total = None
    for s in grads._batches(len(x), batch_size):
        out = fn(x[s], None if y is None else y[s], noise[s], *extra)
        out = tf.nest.map_structure(lambda t: np.asarray(t, dtype=np.float64), out)
        total = out if total is None else tf.nest.map_structure(np.add, total, out)
    return total, len(x)


# ================================================================================== combiners
@dataclass
class SumAccumulator:
    """Per-layer float64 sums and the example count: ``O(model)``, never ``O(data)``."""
    n: int = 0
    sums: Optional[list] = None  # per layer: (A_sum, S_sum) or Lambda_sum

    def add(self, sums, n: int) -> "SumAccumulator":
        if sums is not None:
            self.sums = (tf.nest.map_structure(np.copy, sums) if self.sums is None
                         else tf.nest.map_structure(lambda a, b: np.add(a, b, out=a),
                                                    self.sums, sums))
        self.n += int(n)
        return self


class _PassCombiner:
    """Shared CombineFn plumbing: a lazily built model, (x, y) blocks, in-place merges."""

    def __init__(self, imodel_factory: Callable[[], InfluenceModel], sampling: str, seed: int,
                 batch_size: int):
        # A factory, not a model: combiners are pickled to workers, Keras models are not.
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        self._factory = imodel_factory
        self.sampling, self.seed, self.batch_size = sampling, int(seed), int(batch_size)
        self._imodel: Optional[InfluenceModel] = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_imodel"] = None
        state.pop("_tensors", None)
        return state

    @property
    def imodel(self) -> InfluenceModel:
        if self._imodel is None:
            self._imodel = self._factory()
            self.layouts = supported_layers(self._imodel)
            self.spec = _spec(self._imodel, self.sampling)
        return self._imodel

    def create_accumulator(self, *args, **kwargs) -> SumAccumulator:
        return SumAccumulator()

    def add_input(self, acc: SumAccumulator, element, *args, **kwargs) -> SumAccumulator:
        x, y = element
        if len(x):
            acc.add(*self._sums(x, y))
        return acc

    def add_inputs(self, acc: SumAccumulator, elements, *args, **kwargs) -> SumAccumulator:
        for element in elements:
            self.add_input(acc, element, *args, **kwargs)
        return acc

    def merge_accumulators(self, accumulators, *args, **kwargs) -> SumAccumulator:
        it = iter(accumulators)
        first = next(it)
        for other in it:
            first.add(other.sums, other.n)
        return first

    def compact(self, acc: SumAccumulator, *args, **kwargs) -> SumAccumulator:
        return acc

    def _check_nonempty(self, acc):
        if acc.n == 0 or acc.sums is None:
            raise ValueError(f"{type(self).__name__}: no training examples were added")


class KFACFactorsCombiner(_PassCombiner):
    """First pass: ``A`` and ``S`` per layer (module docstring); ``extract_output`` returns
    their eigendecompositions as :class:`KFACFactors`. Elements are ``(x, y)`` blocks (``y`` is
    only read with ``sampling='empirical'``; it may be None otherwise)."""

    def __init__(self, imodel_factory, sampling: str = "true_fisher", seed: int = 0,
                 batch_size: int = grads.DEFAULT_BATCH):
        super().__init__(imodel_factory, sampling, seed, batch_size)

    def _sums(self, x, y):
        im = self.imodel
        return _batch_sums(im, self.spec, self.seed, x, y, self.batch_size,
                           _factor_fn(im, self.spec))

    def extract_output(self, acc: SumAccumulator, *args, **kwargs) -> "KFACFactors":
        self._check_nonempty(acc)
        self.imodel  # noqa: B018  (layouts)
        layers = []
        for lay, (a_sum, s_sum) in zip(self.layouts, acc.sums):
            ea, qa = _eigh(a_sum / acc.n)
            es, qs = _eigh(s_sum / acc.n)
            layers.append(LayerFactors(lay, qa, ea, qs, es))
        return KFACFactors(layers, acc.n, self.sampling, self.seed)


class EKFACCorrectionCombiner(_PassCombiner):
    """Second pass: the corrected eigenvalues ``Lambda`` in the factors' eigenbasis.

    ``factors`` (the first pass's output) is given here or, in Beam, as a side input keyword
    ``factors=`` (Beam hands side inputs to every CombineFn method). ``sampling``/``seed``
    default to the factors' own, so each example gets the same sampled label in both passes.
    ``extract_output`` returns the :class:`EKFAC` (L2 from the model, ``damping`` as in
    :meth:`EKFAC.build`).
    """

    def __init__(self, imodel_factory, factors: Optional["KFACFactors"] = None,
                 sampling: Optional[str] = None, seed: Optional[int] = None,
                 damping: Optional[float] = None, rel_damping: float = 0.1,
                 batch_size: int = grads.DEFAULT_BATCH):
        super().__init__(imodel_factory, sampling or (factors.sampling if factors else
                                                      "true_fisher"),
                         seed if seed is not None else (factors.seed if factors else 0),
                         batch_size)
        self.factors, self.damping, self.rel_damping = factors, damping, rel_damping

    def _use(self, factors):
        if factors is not None and factors is not self.factors:
            self.factors = factors
            self.__dict__.pop("_tensors", None)
        if self.factors is None:
            raise ValueError("EKFACCorrectionCombiner needs the K-FAC factors (constructor "
                             "argument or side input keyword 'factors')")
        return self.factors

    def add_input(self, acc, element, *args, factors=None, **kwargs):
        self._use(factors)
        return super().add_input(acc, element)

    def _sums(self, x, y):
        im = self.imodel
        if "_tensors" not in self.__dict__:
            _check_layouts(self.layouts, [f.layout for f in self.factors.layers])
            dt = im.dtype.as_numpy_dtype
            self._tensors = ([tf.constant(f.QA.astype(dt)) for f in self.factors.layers],
                             [tf.constant(f.QS.astype(dt)) for f in self.factors.layers])
        return _batch_sums(im, self.spec, self.seed, x, y, self.batch_size,
                           _correction_fn(im, self.spec), *self._tensors)

    def extract_output(self, acc, *args, factors=None, **kwargs) -> "EKFAC":
        factors = self._use(factors)
        self._check_nonempty(acc)
        lam = [np.maximum(s / acc.n, 0.0) for s in acc.sums]
        return EKFAC.build(factors, self.imodel, lam=lam, damping=self.damping,
                           rel_damping=self.rel_damping, n=acc.n, sampling=self.sampling,
                           seed=self.seed)


def _eigh(m):
    """Eigendecomposition of a symmetric PSD matrix (float64), roundoff negatives set to 0."""
    evals, evecs = np.linalg.eigh(0.5 * (m + m.T))
    return np.maximum(evals, 0.0), evecs


def _check_layouts(have: Sequence[LayerLayout], want: Sequence[LayerLayout]):
    if list(have) != list(want):
        raise InfluenceModelError(
            f"the curvature was fitted for layers {[astuple(l) for l in want]} (name, kind, K, "
            f"dout, bias) but the model's target layers are {[astuple(l) for l in have]}")


@dataclass
class LayerFactors:
    """``A = QA diag(eA) QA^T`` ``(K, K)`` and ``S = QS diag(eS) QS^T`` ``(dout, dout)``."""
    layout: LayerLayout
    QA: np.ndarray
    eA: np.ndarray
    QS: np.ndarray
    eS: np.ndarray

    @property
    def A(self) -> np.ndarray:
        return (self.QA * self.eA) @ self.QA.T

    @property
    def S(self) -> np.ndarray:
        return (self.QS * self.eS) @ self.QS.T


@dataclass
class KFACFactors:
    """The first pass's output (plain numpy: picklable, a Beam side input)."""
    layers: List[LayerFactors]
    n: int
    sampling: str
    seed: int


# ======================================================================= the curvature model
@dataclass
class EKFACLayer:
    layout: LayerLayout
    QA: np.ndarray   # (K, K)
    QS: np.ndarray   # (dout, dout)
    lam: np.ndarray  # (K, dout) loss-curvature eigenvalues
    l2: np.ndarray   # (K, dout) the L2 term's diagonal in the eigenbasis


@dataclass
class EKFAC:
    """Per layer ``(QA kron QS) diag(lam + l2 + damping) (QA kron QS)^T``, block diagonal over
    layers, acting on flat vectors in theta's order (module docstring)."""
    layers: List[EKFACLayer]
    damping: float
    meta: Dict = field(default_factory=dict)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def build(cls, factors: KFACFactors, imodel: InfluenceModel,
              lam: Optional[Sequence[np.ndarray]] = None, damping: Optional[float] = None,
              rel_damping: float = 0.1, n: Optional[int] = None, sampling: Optional[str] = None,
              seed: Optional[int] = None) -> "EKFAC":
        """From factors and (EK-FAC) corrected eigenvalues, or K-FAC's ``eA kron eS`` when
        ``lam`` is None. ``damping=None``: ``rel_damping * mean(lam)`` (global)."""
        corrected = lam is not None
        if lam is None:
            lam = [np.outer(f.eA, f.eS) for f in factors.layers]
        _check_layouts(supported_layers(imodel), [f.layout for f in factors.layers])
        l2 = _l2_blocks(imodel, factors.layers)
        if damping is None:
            damping = float(rel_damping) * float(np.mean(np.concatenate(
                [np.ravel(v) for v in lam])))
            rel = float(rel_damping)
        else:
            damping, rel = float(damping), None
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        layers = [EKFACLayer(f.layout, f.QA, f.QS, np.asarray(v, np.float64), b)
                  for f, v, b in zip(factors.layers, lam, l2)]
        meta = {"curvature": "ekfac" if corrected else "kfac", "rel_damping": rel,
                "n": int(factors.n if n is None else n),
                "sampling": sampling or factors.sampling,
                "seed": int(factors.seed if seed is None else seed)}
        return cls(layers, damping, meta)

    # -- structure ------------------------------------------------------------------------
    @property
    def d(self) -> int:
        return sum(l.layout.size for l in self.layers)

    def _slices(self):
        off = 0
        for l in self.layers:
            yield l, slice(off, off + l.layout.size)
            off += l.layout.size

    def eigenvalues(self) -> List[np.ndarray]:
        """``lam + l2 + damping`` per layer, ``(K, dout)``: the operator's eigenvalues."""
        return [l.lam + l.l2 + self.damping for l in self.layers]

    def _powers(self, power: float) -> List[np.ndarray]:
        ev = self.eigenvalues()
        if power >= 0:
            return [e ** power for e in ev]
        top = max(float(np.max(e)) for e in ev)
        return [np.where(e > REL_FLOOR * top, np.maximum(e, 1e-300) ** power, 0.0) for e in ev]

    # -- operators on flat vectors (float64) ---------------------------------------------------
    def _rotate(self, G):
        G = np.atleast_2d(np.asarray(G, dtype=np.float64))
        if G.shape[1] != self.d:
            raise ValueError(f"vectors have {G.shape[1]} entries, the curvature has d={self.d}")
        return [l.QA.T @ G[:, s].reshape(-1, l.layout.K, l.layout.dout) @ l.QS
                for l, s in self._slices()], len(G)

    def _apply_power(self, G, power):
        rot, n = self._rotate(G)
        out = [(l.QA @ (r * p) @ l.QS.T).reshape(n, -1)
               for l, r, p in zip(self.layers, rot, self._powers(power))]
        return np.concatenate(out, axis=1)

    def apply(self, G) -> np.ndarray:
        """``(H_ekfac + damping I) G^T`` row-wise: ``(n, d) -> (n, d)``."""
        return self._apply_power(G, 1.0)

    def apply_inverse(self, G) -> np.ndarray:
        """``(H_ekfac + damping I)^-1`` applied to rows: rotate, divide, rotate back."""
        return self._apply_power(G, -1.0)

    def apply_inverse_sqrt(self, G) -> np.ndarray:
        """The symmetric ``(H_ekfac + damping I)^-1/2`` applied to rows."""
        return self._apply_power(G, -0.5)

    def features_from_gradients(self, G) -> np.ndarray:
        """``(lam + l2 + damping)^-1/2 * (QA^T G_n QS)`` flattened per layer, from flat
        gradients ``(n, d)``; ``<f(g1), f(g2)> = g1^T (H_ekfac + damping)^-1 g2``."""
        rot, n = self._rotate(G)
        return np.concatenate([(r * p).reshape(n, -1)
                               for r, p in zip(rot, self._powers(-0.5))], axis=1)

    def features(self, imodel: InfluenceModel, x, y, batch_size: int = grads.DEFAULT_BATCH
                 ) -> np.ndarray:
        """Per-example features ``(n, d)`` for the given labels, in the model's dtype, computed
        from each layer's (a, d) on the device (Dense: rotate a and d, then the outer product;
        the theta-space gradient is never formed). Same numbers as
        ``features_from_gradients(per_example_gradients(imodel, x, y))``."""
        _check_layouts(supported_layers(imodel), [l.layout for l in self.layers])
        dt = imodel.dtype.as_numpy_dtype
        args = ([tf.constant(l.QA.astype(dt)) for l in self.layers],
                [tf.constant(l.QS.astype(dt)) for l in self.layers],
                [tf.constant(p.astype(dt)) for p in self._powers(-0.5)])
        x = grads._cast_x(imodel, x)
        y = imodel.check_labels(y, len(x))
        fn = _features_fn(imodel)
        out = np.empty((len(x), self.d), dtype=dt)
        for s in grads._batches(len(x), batch_size):
            out[s] = np.asarray(fn(x[s], y[s], *args))
        return out

    def diagonal(self) -> np.ndarray:
        """``diag(H_ekfac + damping I)`` ``(d,)`` in theta's order: ``(QA^2) ev (QS^2)^T``."""
        return np.concatenate([(np.square(l.QA) @ e @ np.square(l.QS).T).ravel()
                               for l, e in zip(self.layers, self.eigenvalues())])

    def trace(self) -> float:
        return float(sum(np.sum(e) for e in self.eigenvalues()))

    def to_dense(self) -> np.ndarray:
        """The explicit ``(d, d)`` operator (small d: tests, exact comparisons)."""
        if self.d > grads.MAX_EXPLICIT_D:
            raise ValueError(f"to_dense needs d <= {grads.MAX_EXPLICIT_D}, got {self.d}")
        return self.apply(np.eye(self.d))

    # -- state ------------------------------------------------------------------------------
    def params(self) -> dict:
        """JSON-able description (the artifact manifest)."""
        return dict(self.meta, damping=self.damping, d=self.d, layers=[
            {"name": l.layout.name, "kind": l.layout.kind, "block": [l.layout.K, l.layout.dout],
             "bias": l.layout.has_bias} for l in self.layers])

    def arrays(self) -> Dict[str, np.ndarray]:
        """Plain numpy arrays (``np.savez`` / ``np.load(allow_pickle=False)`` round trip)."""
        out = {"params_json": np.array(json.dumps(self.params(), sort_keys=True))}
        for i, l in enumerate(self.layers):
            out.update({f"layer{i}/QA": l.QA, f"layer{i}/QS": l.QS, f"layer{i}/lam": l.lam,
                        f"layer{i}/l2": l.l2})
        return out

    @classmethod
    def from_arrays(cls, arrays: Dict[str, np.ndarray]) -> "EKFAC":
        params = json.loads(str(np.asarray(arrays["params_json"])))
        layers = []
        for i, p in enumerate(params["layers"]):
            lay = LayerLayout(p["name"], p["kind"], int(p["block"][0]), int(p["block"][1]),
                              bool(p["bias"]))
            layers.append(EKFACLayer(lay, *(np.asarray(arrays[f"layer{i}/{k}"], np.float64)
                                            for k in ("QA", "QS", "lam", "l2"))))
        meta = {k: v for k, v in params.items() if k not in ("damping", "d", "layers")}
        return cls(layers, float(params["damping"]), meta)


def _l2_blocks(imodel: InfluenceModel, layers: Sequence[LayerFactors]) -> List[np.ndarray]:
    """The L2 term in each layer's eigenbasis, ``diag((QA kron QS)^T diag(l2) (QA kron QS))``
    as ``(K, dout)``; exactly ``l2`` everywhere when l2 is constant on the layer."""
    vec = getattr(imodel, "l2_vector", None)
    if vec is None:
        return [np.full((f.layout.K, f.layout.dout), float(imodel.l2)) for f in layers]
    vec = np.asarray(vec, dtype=np.float64).ravel()
    if vec.shape[0] != sum(f.layout.size for f in layers):
        raise InfluenceModelError(f"l2_vector has {vec.shape[0]} entries, theta has "
                                  f"{sum(f.layout.size for f in layers)}")
    out, off = [], 0
    for f in layers:
        block = vec[off:off + f.layout.size].reshape(f.layout.K, f.layout.dout)
        off += f.layout.size
        out.append(np.full(block.shape, block.flat[0]) if np.ptp(block) == 0
                   else np.square(f.QA).T @ block @ np.square(f.QS))
    return out


# ================================================================================ in process
def fit_ekfac(imodel: InfluenceModel, x, y=None, sampling: str = "true_fisher",
              damping: Optional[float] = None, seed: int = 0,
              batch_size: int = grads.DEFAULT_BATCH, rel_damping: float = 0.1,
              correct: bool = True) -> EKFAC:
    """Both passes in-process with the combiners (blocks of ``batch_size``, merged).
    ``correct=False`` stops after the factors: plain K-FAC (``lam = eA kron eS``)."""
    x = np.asarray(x)
    blocks = [(x[s], None if y is None else np.asarray(y)[s])
              for s in grads._batches(len(x), batch_size)]
    if sampling == "empirical" and y is None:
        raise ValueError("sampling='empirical' needs the labels y")
    factory = lambda: imodel  # noqa: E731  (in process: no pickling)

    def run(comb):  # one accumulator per block, merged as they come: memory stays O(model)
        acc = comb.create_accumulator()
        for b in blocks:
            acc = comb.merge_accumulators([acc, comb.add_input(comb.create_accumulator(), b)])
        return comb.extract_output(comb.compact(acc))

    factors = run(KFACFactorsCombiner(factory, sampling, seed, batch_size))
    if not correct:
        return EKFAC.build(factors, imodel, damping=damping, rel_damping=rel_damping)
    return run(EKFACCorrectionCombiner(factory, factors, damping=damping,
                                       rel_damping=rel_damping, batch_size=batch_size))
