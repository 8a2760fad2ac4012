"""The model wrapper: a Keras model, the weights whose influence we trace, and the loss.

Everything in `influence_ops` talks to a model through :class:`InfluenceModel`. It fixes

* the **target weights** theta (the trainable weights of the chosen layers, flattened in layer
  order into one vector of length ``d``; default: the last layer),
* the **per-example loss** ``l(z, theta)`` (a Keras loss built with ``reduction=None``, a loss
  name, or any callable ``(y_true, y_pred) -> (n,)``),
* the **L2 term** of the training objective, ``mean_i l(z_i) + 1/2 theta^T diag(l2_vector) theta``:
  the Hessian gets ``+ diag(l2_vector)`` while per-example gradients stay gradients of ``l``
  alone (removing a training example removes its loss term, not the regulariser).
  ``l2_vector`` is the explicit ``l2`` argument on every parameter (``l2/2 ||theta||^2``) plus
  ``2c`` on each target variable that carries a Keras ``L2(c)`` (or ``L1L2(l1=0, l2=c)``)
  regulariser: Keras adds ``c * sum(w^2)`` to the batch-mean training loss, so reading the
  regularisers makes the objective the one the model was trained with. Other regularisers (L1,
  custom callables, activity regularisers) are an error unless ``regularizers="ignore"``.

For sequential models the network is split at the first target layer: the frozen front part
runs once per batch (no tape), and gradients, Hessian-vector products and Jacobian-vector
products only go through the short head. Functional models that are not chains fall back to
running the whole model under the tape, which is correct but slower.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Callable, Optional, Sequence, Union

import numpy as np

from influence_ops import tf_setup

tf = tf_setup.tensorflow()
import keras  # noqa: E402  (after TF thread settings)

log = logging.getLogger(__name__)

LossLike = Union[str, Callable, "keras.losses.Loss"]

REGULARIZER_MODES = ("include", "ignore")

_LOSS_NAMES = {
    "sparse_categorical_crossentropy": ("sparse", keras.losses.SparseCategoricalCrossentropy),
    "categorical_crossentropy": ("onehot", keras.losses.CategoricalCrossentropy),
    "binary_crossentropy": ("binary", keras.losses.BinaryCrossentropy),
    "mse": ("regression", keras.losses.MeanSquaredError),
    "mean_squared_error": ("regression", keras.losses.MeanSquaredError),
}


class InfluenceModelError(ValueError):
    """A model, layer, loss or label problem, with a message that says what to change."""


def load_keras_model(path: str, safe_mode: bool = True) -> "keras.Model":
    """Loads a ``.keras`` file, in Keras safe mode unless ``safe_mode=False``.

    Safe mode refuses to deserialise Python code stored in the file (``Lambda`` layers holding
    a lambda, arbitrary functions); ``safe_mode=False`` runs that code while loading, so only
    pass it for a file you trust (the pipeline's ``--unsafe_model_loading``). Every failure is
    an :class:`InfluenceModelError` that names the file."""
    if not str(path).endswith(".keras"):
        raise InfluenceModelError(
            f"model path {path!r}: expected a Keras v3 '.keras' file (saved with model.save)")
    local = path
    if "://" in str(path):
        # Keras reads local files only; copy remote models (gs://...) to a temp file first.
        import tempfile
        from influence_ops import storage
        fd, local = tempfile.mkstemp(suffix=".keras")
        os.close(fd)
        try:
            with storage.open_read(path) as src, open(local, "wb") as dst:
                dst.write(src.read())
        except Exception as e:  # noqa: BLE001 - any storage error: name the model
            raise InfluenceModelError(f"model {path}: cannot read it ({_first_line(e)})") from e
    elif not os.path.exists(path):
        raise InfluenceModelError(f"model file not found: {path}")
    elif os.path.isdir(path):
        raise InfluenceModelError(f"model {path} is a directory, not a .keras file")
    problem = _keras_archive_problem(local)
    if problem:
        raise InfluenceModelError(f"model {path} is not a Keras model file: {problem}")
    try:
        return keras.saving.load_model(local, compile=False, safe_mode=safe_mode)
    except Exception as e:  # noqa: BLE001 - Keras raises many kinds; name the file
        text = _first_line(e)
        if safe_mode and "safe_mode" in str(e):
            raise InfluenceModelError(
                f"model {path} holds Python code (e.g. a Lambda layer) that safe mode refuses "
                "to load: loading it would run that code. If you trust the file, pass "
                "--unsafe_model_loading (InfluenceCalculator: load it yourself with "
                "keras.saving.load_model(..., safe_mode=False))") from e
        raise InfluenceModelError(f"model {path}: Keras cannot load it ({text})") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0][:300] if text else type(e).__name__)


def _keras_archive_problem(path: str) -> Optional[str]:
    """Why ``path`` is not a ``.keras`` archive (a zip with config.json), or None."""
    import zipfile
    size = os.path.getsize(path)
    if size == 0:
        return "the file is empty (0 bytes)"
    if not zipfile.is_zipfile(path):
        return (f"the file ({size} bytes) is not a zip archive (a .keras file is a zip with "
                "config.json and the weights; truncated or another format?)")
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        return f"the zip archive is damaged ({e})"
    if "config.json" not in names:
        return f"the zip archive has no config.json (it holds {names[:5]})"
    return None


def model_fingerprint(model: "keras.Model") -> str:
    """sha256 over layer names, weight shapes, dtypes and values: changes when the model does."""
    h = hashlib.sha256()
    # Layer name + variable name, not ``w.path``: the path carries the model's own name,
    # which Keras renames on save/load.
    for layer in model.layers:
        for w in layer.weights:
            arr = np.asarray(w.numpy())
            h.update(f"{layer.name}/{w.name}".encode())
            h.update(str(arr.shape).encode())
            h.update(str(arr.dtype).encode())
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


class InfluenceModel:
    """A Keras model plus the target weights and the per-example loss.

    Args:
      model: a built ``keras.Model`` or a path to a ``.keras`` file (loaded in safe mode).
      target_layers: layer names (list of str), an int N for the last N layers that have
        weights, or None for the last layer with trainable weights.
      loss: a Keras loss with ``reduction=None``, a loss name (``sparse_categorical_crossentropy``,
        ``categorical_crossentropy``, ``binary_crossentropy``, ``mse``) or a callable
        ``(y_true, y_pred) -> (n,)``.
      from_logits: for loss names only; None infers it from the last layer's activation.
      l2: coefficient of an explicit ``l2/2 ||theta||^2`` term of the training objective, on top
        of the regularisers the target layers carry (give it only for a penalty that is not in
        the model, e.g. weight decay applied by the optimiser).
      regularizers: ``"include"`` (default) adds the target variables' Keras L2 regularisers to
        the objective (``L2(c)`` -> ``2c`` on the Hessian diagonal) and rejects any other kind;
        ``"ignore"`` disregards every regulariser of the model.
    """

    def __init__(self, model, target_layers: Union[None, int, Sequence[str]] = None,
                 loss: LossLike = "sparse_categorical_crossentropy",
                 from_logits: Optional[bool] = None, l2: float = 0.0,
                 regularizers: str = "include"):
        if isinstance(model, (str, os.PathLike)):
            model = load_keras_model(str(model))
        if not isinstance(model, keras.Model):
            raise InfluenceModelError(f"expected a keras.Model or a .keras path, got {type(model)}")
        if not model.built:
            raise InfluenceModelError("the model is not built: call it once or give it an Input")
        self.model = model
        self.l2 = float(l2)
        if self.l2 < 0:
            raise InfluenceModelError(f"l2 must be >= 0, got {l2}")
        self.target_layers = self._resolve_target_layers(target_layers)
        self.variables = [w for layer in self.target_layers for w in layer.trainable_weights]
        if not self.variables:
            raise InfluenceModelError(
                f"layers {[l.name for l in self.target_layers]} have no trainable weights")
        self._tf_vars = [w.value for w in self.variables]
        self.shapes = [tuple(v.shape) for v in self._tf_vars]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.n_params = int(sum(self.sizes))
        self.dtype = self._tf_vars[0].dtype
        if regularizers not in REGULARIZER_MODES:
            raise InfluenceModelError(
                f"regularizers must be one of {REGULARIZER_MODES}, got {regularizers!r}")
        self.regularizers = regularizers
        # {"layer/variable": Hessian coefficient 2c} for the regularised target variables.
        self.l2_from_regularizers = (self._read_regularizers() if regularizers == "include"
                                     else {})
        self.l2_vector = self._build_l2_vector()
        self.has_regularization = bool(np.any(self.l2_vector))
        self.loss_spec = loss if isinstance(loss, str) else getattr(loss, "name", repr(loss))
        self.label_mode, self._loss_fn = self._resolve_loss(loss, from_logits)
        self._front, self._head_layers = self._split()
        self._fns = {}
        # Sample-weighted mode (set_sample_weighted): labels carry the example's weight as a
        # last column and the per-example loss is w * l (the seed's and Keras's definition).
        self.sample_weighted = False

    # ------------------------------------------------------------------ construction helpers
    def _resolve_target_layers(self, target_layers):
        with_weights = [l for l in self.model.layers if l.trainable_weights]
        names = [l.name for l in self.model.layers]
        if target_layers is None:
            target_layers = 1
        if isinstance(target_layers, int):
            if target_layers < 1 or target_layers > len(with_weights):
                raise InfluenceModelError(
                    f"target_layers={target_layers}: the model has {len(with_weights)} layers "
                    f"with trainable weights ({[l.name for l in with_weights]})")
            return with_weights[-target_layers:]
        if isinstance(target_layers, slice):
            target_layers = [_range_text(target_layers.start, target_layers.stop)]
        elif isinstance(target_layers, str):
            target_layers = [s for s in target_layers.split(",") if s]
        elif (isinstance(target_layers, (tuple, list)) and len(target_layers) == 2
              and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                      for v in target_layers)):
            target_layers = [_range_text(*target_layers)]  # (first, last) layer indices
        layers = []
        for name in target_layers:
            if isinstance(name, str) and ":" in name:
                layers.extend(l for l in self._layer_range(name) if l not in layers)
                continue
            if name not in names:
                raise InfluenceModelError(
                    f"unknown layer name {name!r}; the model's layers are {names}")
            layer = self.model.get_layer(name)
            if layer not in layers:
                layers.append(layer)
        # Keep model order so the flattening of theta is canonical.
        layers.sort(key=lambda l: names.index(l.name))
        for l in layers:
            if not l.trainable_weights:
                raise InfluenceModelError(f"layer {l.name!r} has no trainable weights")
        return layers

    def _layer_range(self, spec: str):
        """Layers with weights from ``first`` to ``last`` inclusive (``"first:last"``; each a
        layer name or an index into ``model.layers``, negative from the end; empty = the
        first / last layer), as the seed's ``start_layer`` / ``last_layer``."""
        all_layers = list(self.model.layers)
        names = [l.name for l in all_layers]
        first, last = spec.split(":", 1)

        def index(text, default):
            text = text.strip()
            if text == "":
                return default
            if text.lstrip("-").isdigit():
                i = int(text)
                if not -len(all_layers) <= i < len(all_layers):
                    raise InfluenceModelError(
                        f"target_layers={spec!r}: layer index {i} is out of range for "
                        f"{len(all_layers)} layers {names}")
                return i % len(all_layers)
            if text not in names:
                raise InfluenceModelError(f"target_layers={spec!r}: unknown layer name "
                                          f"{text!r}; the model's layers are {names}")
            return names.index(text)
        i0, i1 = index(first, 0), index(last, len(all_layers) - 1)
        if i0 > i1:
            raise InfluenceModelError(f"target_layers={spec!r}: the first layer ({names[i0]}) "
                                      f"comes after the last ({names[i1]})")
        chosen = [l for l in all_layers[i0:i1 + 1] if l.trainable_weights]
        if not chosen:
            raise InfluenceModelError(f"target_layers={spec!r}: no layer with trainable "
                                      f"weights in {names[i0:i1 + 1]}")
        return chosen

    def _variable_key(self, layer, w) -> str:
        return f"{layer.name}/{w.name}"

    def _read_regularizers(self) -> dict:
        """Hessian coefficients ``2c`` of the target variables' Keras L2 regularisers.

        Raises :class:`InfluenceModelError` for any regulariser that is not a plain L2 on a
        target variable, and for activity regularisers on layers the target weights feed.
        """
        unsupported = []
        names = [l.name for l in self.model.layers]
        first = min(names.index(l.name) for l in self.target_layers)
        # Activity regularisers of the target layers and of every layer after them depend on
        # theta through the data: they are not a function of theta alone.
        for layer in self.model.layers[first:]:
            if getattr(layer, "activity_regularizer", None) is not None:
                unsupported.append(f"layer {layer.name!r}: activity_regularizer="
                                   f"{_describe_regularizer(layer.activity_regularizer)}")
        out = {}
        for layer in self.target_layers:
            for w in layer.trainable_weights:
                reg = getattr(w, "regularizer", None)
                if reg is None:
                    continue
                coef = _l2_coefficient(reg)
                if coef is None:
                    unsupported.append(f"layer {layer.name!r}, variable {w.name!r}: "
                                       f"{_describe_regularizer(reg)}")
                elif coef:
                    out[self._variable_key(layer, w)] = 2.0 * coef
        if unsupported:
            raise InfluenceModelError(
                "the target layers carry regularisers that influence functions cannot model "
                "(only L2 on the target weights, keras.regularizers.L2 or L1L2 with l1=0, enters "
                "the Hessian): " + "; ".join(unsupported) + ". Retrain without them, target "
                "other layers, or build InfluenceModel(model, ..., regularizers='ignore') (and "
                "pass it to InfluenceCalculator) to leave every regulariser out of the "
                "objective; add an explicit l2= if you want an L2 term")
        return out

    def _build_l2_vector(self) -> np.ndarray:
        vec = np.full(self.n_params, self.l2, dtype=np.float64)
        if self.l2_from_regularizers:
            if self.l2:
                log.warning("l2=%g is added to the L2 regularisers the model carries (%s): pass "
                            "l2=0 unless the training objective had both", self.l2,
                            self.l2_from_regularizers)
            keys = [self._variable_key(l, w) for l in self.target_layers
                    for w in l.trainable_weights]
            off = 0
            for key, size in zip(keys, self.sizes):
                vec[off:off + size] += self.l2_from_regularizers.get(key, 0.0)
                off += size
        return vec

    def _last_activation(self):
        last = self.model.layers[-1]
        if isinstance(last, keras.layers.Softmax):
            return "softmax"
        act = getattr(last, "activation", None)
        return getattr(act, "__name__", act if isinstance(act, str) else None)

    def _resolve_loss(self, loss, from_logits):
        if isinstance(loss, str):
            key = loss.lower()
            if key not in _LOSS_NAMES:
                raise InfluenceModelError(
                    f"unknown loss name {loss!r}; known: {sorted(_LOSS_NAMES)}")
            mode, cls = _LOSS_NAMES[key]
            # Keras losses compute in floatx unless told: keep the model's precision.
            if mode == "regression":
                return mode, cls(reduction=None, dtype=self.dtype.name)
            if from_logits is None:
                from_logits = self._last_activation() not in ("softmax", "sigmoid")
            return mode, cls(from_logits=from_logits, reduction=None, dtype=self.dtype.name)
        if isinstance(loss, keras.losses.Loss):
            if loss.reduction not in (None, "none"):
                raise InfluenceModelError(
                    f"loss {loss.name!r} reduces over the batch (reduction={loss.reduction!r}); "
                    "influence needs per-example losses: build it with reduction=None")
            mode = {"SparseCategoricalCrossentropy": "sparse", "CategoricalCrossentropy": "onehot",
                    "BinaryCrossentropy": "binary"}.get(type(loss).__name__, "custom")
            return mode, loss
        if callable(loss):
            return "custom", loss
        raise InfluenceModelError(f"loss must be a name, a keras Loss or a callable, got {loss!r}")

    def _split(self):
        """Returns (front, head_layers) for Sequential models, (None, None) otherwise."""
        if not isinstance(self.model, keras.Sequential):
            return None, None
        layers = self.model.layers
        first = layers.index(self.target_layers[0])
        front_layers = layers[:first]
        return front_layers, layers[first:]

    # ------------------------------------------------------------------ forward pieces
    def front(self, x):
        """Runs the frozen part below the first target layer (identity when not split)."""
        x = tf.convert_to_tensor(x)
        if self._front is None:
            return x
        for layer in self._front:
            x = layer(x, training=False)
        return x

    def head(self, h):
        """Maps front activations to model outputs (the whole model when not split)."""
        if self._head_layers is None:
            return self.model(h, training=False)
        for layer in self._head_layers:
            h = layer(h, training=False)
        return h

    def per_example_loss(self, y, y_pred):
        if self.sample_weighted:
            w = tf.cast(y[:, -1], y_pred.dtype)
            y = y[:, :-1]
            if self.label_mode == "sparse":
                y = tf.cast(y[:, 0], tf.int64)
            else:
                y = tf.cast(tf.reshape(y, tf.concat([tf.shape(y)[:1], tf.shape(y_pred)[1:]], 0)),
                            y_pred.dtype)
            return tf.reshape(self._loss_fn(y, y_pred), [-1]) * w
        loss = self._loss_fn(y, y_pred)
        return tf.reshape(loss, [-1])

    # ------------------------------------------------------------------ sample weights
    def set_sample_weighted(self, on: bool) -> None:
        """Sample-weighted mode: every label array passed to this model is
        :meth:`pack_labels` ``(y, w)`` and the per-example loss is ``w_i l_i``, so gradients,
        Hessians and HVPs of the objective ``(1/n) sum_i w_i l_i`` follow unchanged. Traced
        functions are dropped when the mode changes."""
        on = bool(on)
        if on != self.sample_weighted:
            self.sample_weighted = on
            self._fns = {}

    def pack_labels(self, y, w=None) -> np.ndarray:
        """``(n, L + 1)`` float labels: the labels (validated, flattened per row) and the weight
        (1 when ``w`` is None) as the last column (:meth:`set_sample_weighted`)."""
        y = np.asarray(y)
        n = len(y)
        w = np.ones(n) if w is None else np.asarray(w, np.float64).reshape(-1)
        if len(w) != n:
            raise InfluenceModelError(f"sample weights have {len(w)} rows but labels have {n}")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise InfluenceModelError("sample weights must be finite and >= 0")
        was, self.sample_weighted = self.sample_weighted, False
        try:
            y = self.check_labels(y, n)
        finally:
            self.sample_weighted = was
        return np.concatenate([y.reshape(n, -1).astype(np.float64), w[:, None]], axis=1)

    def check_labels(self, y, n: int) -> np.ndarray:
        """Validates labels for this loss; returns them as a numpy array."""
        y = np.asarray(y)
        if self.sample_weighted:
            if y.ndim != 2 or y.shape[0] != n or y.shape[1] < 2:
                raise InfluenceModelError(
                    f"sample-weighted mode takes labels packed with their weights (n, L + 1) "
                    f"(InfluenceModel.pack_labels), got {y.shape}")
            return y
        if y.shape[0] != n:
            raise InfluenceModelError(f"labels have {y.shape[0]} rows but inputs have {n}")
        n_out = self.n_outputs
        if self.label_mode == "sparse":
            if y.ndim == 2 and y.shape[1] == 1:
                y = y[:, 0]
            if y.ndim != 1:
                raise InfluenceModelError(
                    f"sparse_categorical_crossentropy needs integer labels of shape (n,), got "
                    f"{y.shape}; pass loss='categorical_crossentropy' for one-hot labels")
            if n_out is not None and y.size and (y.min() < 0 or y.max() >= n_out):
                raise InfluenceModelError(
                    f"integer labels must lie in [0, {n_out}), got range [{y.min()}, {y.max()}]")
        elif self.label_mode == "onehot":
            if y.ndim != 2 or (n_out is not None and y.shape[1] != n_out):
                raise InfluenceModelError(
                    f"categorical_crossentropy needs one-hot labels of shape (n, {n_out}), got "
                    f"{y.shape}")
        return y

    @property
    def n_outputs(self) -> Optional[int]:
        """Width of the model's (first) output, or None when unknown."""
        outputs = getattr(self.model, "outputs", None)
        if not outputs or outputs[0].shape[-1] is None:
            return None
        return int(outputs[0].shape[-1])

    @property
    def input_shape(self) -> Optional[tuple]:
        """Shape of one example the model takes (``None`` for an unknown dimension), or None
        when the model has no single known input."""
        inputs = getattr(self.model, "inputs", None)
        if not inputs or len(inputs) != 1:
            return None
        return tuple(None if d is None else int(d) for d in inputs[0].shape[1:])

    def example_problems(self, x, y) -> Optional[str]:
        """Why examples ``(x, y)`` cannot go into this model and loss at all (a wrong feature
        shape or dtype, labels of the wrong kind or width for the loss), as one sentence; None
        when they fit. Per-row problems (one bad label) are :meth:`label_problems`."""
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype.kind not in "biuf":
            return (f"features have dtype {x.dtype} (e.g. {x.reshape(-1)[:1].tolist()[0]!r}); "
                    "the model takes numbers")
        want = self.input_shape
        got = tuple(int(d) for d in x.shape[1:])
        if want is not None and (len(got) != len(want) or any(
                w is not None and w != g for w, g in zip(want, got))):
            hint = ""
            if None not in want and int(np.prod(got)) == int(np.prod(want)):
                hint = f"; --input_shape={','.join(map(str, want))} would reshape them"
            elif None not in want:
                hint = (f" ({int(np.prod(got))} values per example, the model takes "
                        f"{int(np.prod(want))}): wrong --x_key or --input_shape, or another "
                        "model's data?")
            return (f"examples have shape {got}, the model takes {_shape_text(want)}{hint}")
        return self._label_kind_problem(y)

    def _label_kind_problem(self, y: np.ndarray) -> Optional[str]:
        mode, n_out, loss = self.label_mode, self.n_outputs, self.loss_spec
        if mode == "custom" or len(y) == 0:
            return None
        if y.dtype.kind not in "biuf":
            what = "strings" if y.dtype.kind in "USO" else f"of dtype {y.dtype}"
            return (f"labels are {what} (e.g. {y.reshape(-1)[:1].tolist()[0]!r}); --loss={loss} "
                    "needs "
                    + ("integer class indices" if mode == "sparse" else "numbers"))
        width = int(np.prod(y.shape[1:])) if y.ndim > 1 else 1
        if mode == "sparse":
            if width != 1:
                return (f"labels have shape {tuple(y.shape[1:])} per example; --loss={loss} "
                        "takes one integer class index per example (one-hot labels: "
                        "--loss=categorical_crossentropy)")
            return None
        if n_out is None or width == n_out:
            return None
        if width == 1 and mode in ("onehot", "binary"):
            return (f"--loss={loss} needs labels of width {n_out} (the model has {n_out} "
                    "outputs) but gets one label per example; for integer class labels use "
                    "--loss=sparse_categorical_crossentropy")
        return (f"labels have {width} values per example but the model has {n_out} outputs "
                f"(--loss={loss})")

    def label_problems(self, y) -> np.ndarray:
        """Rows whose label cannot go into the loss ``(n,)`` bool: the pipeline dead-letters
        those rows (a bad label rejects a row, not a block); :meth:`check_labels` raises."""
        y = np.asarray(y)
        n_out = self.n_outputs
        bad = np.zeros(len(y), dtype=bool)
        if self.label_mode == "sparse":
            flat = y.reshape(len(y), -1)
            if flat.shape[1] != 1 or not np.issubdtype(flat.dtype, np.number):
                return np.ones(len(y), dtype=bool)
            v = flat[:, 0].astype(np.float64)
            bad = ~np.isfinite(v) | (v < 0) | (v != np.round(v))
            if n_out is not None:
                bad |= v >= n_out
        elif self.label_mode in ("onehot", "binary", "regression"):
            flat = y.reshape(len(y), -1)
            if not np.issubdtype(flat.dtype, np.number) and flat.dtype != bool:
                return np.ones(len(y), dtype=bool)
            if n_out is not None and flat.shape[1] != n_out:
                return np.ones(len(y), dtype=bool)
            v = flat.astype(np.float64)
            bad = ~np.isfinite(v).all(axis=1)
            if self.label_mode == "binary":  # probabilities of the positive class
                bad |= ((v < 0) | (v > 1)).any(axis=1)
        return bad

    def normalize_labels(self, y) -> np.ndarray:
        """Labels in the form the loss takes (integer ``(n,)`` for sparse losses)."""
        y = np.asarray(y)
        if self.label_mode == "sparse":
            return y.reshape(len(y)).astype(np.int64)
        return y

    # ------------------------------------------------------------------ flat parameters
    def get_flat_params(self) -> np.ndarray:
        return np.concatenate([np.reshape(v.numpy(), [-1]) for v in self._tf_vars])

    def set_flat_params(self, theta: np.ndarray) -> None:
        parts = np.split(np.asarray(theta), np.cumsum(self.sizes)[:-1])
        for v, p, s in zip(self._tf_vars, parts, self.shapes):
            v.assign(np.reshape(p, s).astype(v.dtype.as_numpy_dtype))

    def flatten(self, tensors):
        return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)

    def unflatten(self, flat):
        parts = tf.split(flat, self.sizes)
        return [tf.reshape(p, s) for p, s in zip(parts, self.shapes)]

    def fingerprint(self) -> str:
        return model_fingerprint(self.model)

    def describe(self) -> dict:
        """What an artifact records about the model."""
        return {
            "target_layers": [l.name for l in self.target_layers],
            "n_params": self.n_params,
            "loss": self.loss_spec,
            "label_mode": self.label_mode,
            "l2": self.l2,
            "regularizers": self.regularizers,
            "l2_from_regularizers": dict(self.l2_from_regularizers),
            "dtype": self.dtype.name,
            "fingerprint": self.fingerprint(),
        }

    def __repr__(self):
        return (f"InfluenceModel(target_layers={[l.name for l in self.target_layers]}, "
                f"d={self.n_params}, loss={self.loss_spec}, l2={self.l2}"
                + (f", l2_from_regularizers={self.l2_from_regularizers}"
                   if self.l2_from_regularizers else "") + ")")


def _range_text(first, last) -> str:
    """``"first:last"`` from two layer names / indices (None: open end)."""
    return f"{'' if first is None else first}:{'' if last is None else last}"


def _shape_text(shape) -> str:
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + \
        ("," if len(shape) == 1 else "") + ")"


def _l2_coefficient(reg) -> Optional[float]:
    """``c`` of a regulariser equal to ``c * sum(w^2)``; None for any other kind."""
    L = keras.regularizers
    if type(reg) is L.L2:
        return float(reg.l2)
    if type(reg) is L.L1L2 and float(reg.l1) == 0.0:
        return float(reg.l2)
    return None


def _describe_regularizer(reg) -> str:
    if isinstance(reg, keras.regularizers.Regularizer):
        try:
            args = ", ".join(f"{k}={v}" for k, v in reg.get_config().items())
        except Exception:  # noqa: BLE001  (a custom get_config may fail)
            args = "..."
        return f"{type(reg).__name__}({args})"
    return f"custom callable {getattr(reg, '__name__', type(reg).__name__)}"
