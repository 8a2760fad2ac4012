"""The notebook user's API: one object, numpy arrays or ``tf.data.Dataset`` in, numpy out.

    calc = InfluenceCalculator(model, method="influence", solver="arnoldi", rank=32, l2=1e-3)
    calc.fit((x_train, y_train))
    scores = calc.influence((x_test, y_test), (x_train, y_train))   # (n_test, n_train)
    top = calc.top_k((x_test, y_test), (x_train, y_train), k=10)    # proponents / opponents
    self_scores = calc.self_influence((x_train, y_train))           # (n_train,)

Sign convention: ``influence(z_train, z_test) = g_test^T H^-1 g_train``; positive = proponent
(removing the training example would raise the test loss), negative = opponent. Removing a
training example changes the test loss by about ``influence / n`` (n = training-set size).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
from typing import Optional, Tuple

import numpy as np

from influence_ops import artifacts, groups, registry
from influence_ops import topk as topk_lib
from influence_ops.config import ConfigError, InfluenceConfig
from influence_ops.methods.base import InfluenceMethod
from influence_ops.model import InfluenceModel

log = logging.getLogger(__name__)


def as_arrays(data) -> Tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` numpy arrays from a tuple or a (batched or unbatched) ``tf.data.Dataset``."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return np.asarray(data[0]), np.asarray(data[1])
    import tensorflow as tf
    if isinstance(data, tf.data.Dataset):
        xs, ys = [], []
        batched = len(data.element_spec[0].shape) > 0 and data.element_spec[0].shape[0] is None
        for x, y in data.as_numpy_iterator():
            xs.append(x if batched else x[None])
            ys.append(y if batched else np.asarray(y)[None])
        return np.concatenate(xs), np.concatenate(ys)
    raise TypeError("data must be an (x, y) tuple of arrays or a tf.data.Dataset of (x, y)")


def default_ids(n: int, prefix: str = "train") -> np.ndarray:
    width = max(6, len(str(max(n - 1, 0))))
    return np.char.add(f"{prefix}:", np.char.zfill(np.arange(n).astype(str), width))


def build_imodel(config: InfluenceConfig, model=None) -> InfluenceModel:
    """The model wrapper of ``config`` (``model`` overrides ``config.model``)."""
    model = config.model if model is None else model
    if isinstance(model, InfluenceModel):
        return model
    if isinstance(model, str) and config.unsafe_model_loading:
        from influence_ops.model import load_keras_model
        model = load_keras_model(model, safe_mode=False)
    return InfluenceModel(model, target_layers=config.target_layers, loss=config.loss,
                          from_logits=config.from_logits, l2=config.l2,
                          regularizers=config.regularizers)


def build_method(imodel: InfluenceModel, config: InfluenceConfig) -> InfluenceMethod:
    """The registered method ``config.method`` with the options of ``config``."""
    return registry.get_method(config.method).from_config(imodel, config)


def make_config(method: str = "influence", **options) -> InfluenceConfig:
    """An :class:`InfluenceConfig` from keyword options (the CLI's names), validated.

    ``method`` may also name a curvature model (``"exact"``, ``"arnoldi"``, ``"cg"``, ...): that
    is influence with that solver."""
    if method not in registry.method_names() and method in registry.curvature_names():
        options.setdefault("solver", method)
        method = "influence"
    known = {f.name for f in dataclasses.fields(InfluenceConfig)}
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            raise ConfigError(f"unknown option {name!r}" +
                              (f"; did you mean {close[0]!r}?" if close else "") +
                              " (options have the command line's names, see InfluenceConfig)")
    return InfluenceConfig(method=method, **options).validate()


class InfluenceCalculator:
    """Fits one influence method on a model and answers the usual questions.

    Options are those of :class:`~influence_ops.config.InfluenceConfig`, under the command
    line's names (``solver``, ``rank``, ``arnoldi_iter``, ``damping``, ``rps_lambda``, ...);
    ``config=`` passes a whole config instead.
    """

    def __init__(self, model, method: str = "influence", config: InfluenceConfig = None,
                 **options):
        if config is None:
            config = make_config(method, **options)
        else:
            config = (config.replace(**options) if options else config).validate()
        self.config = config
        self.imodel = build_imodel(config, model)
        self.method = build_method(self.imodel, config)

    def fit(self, train, queries=None, query_ids=None) -> "InfluenceCalculator":
        x, y = as_arrays(train)
        if self.method.needs_queries and queries is not None:
            qx, qy = as_arrays(queries)
            self.method.fit(x, y, qx, qy, query_ids)
        else:
            # Methods that solve their queries do it when they first see them (prepare_queries).
            self.method.fit(x, y)
        return self

    def _corrected(self, correction):
        """The method scoring with ``correction`` (None: the config's)."""
        if correction is None:
            return contextlib.nullcontext()
        if not hasattr(self.method, "corrected"):
            if correction == "none":
                return contextlib.nullcontext()
            raise ValueError(f"correction={correction!r} is defined for method='influence', "
                             f"not {self.method.name}")
        return self.method.corrected(correction)

    def influence(self, queries, train, query_ids=None, correction: Optional[str] = None
                  ) -> np.ndarray:
        """``(n_queries, n_train)`` scores. ``correction="loo"``: leave-one-out corrected,
        ``g_test^T (H - H_i/n)^-1 g_i`` (None: the config's ``correction``)."""
        qx, qy = as_arrays(queries)
        x, y = as_arrays(train)
        self.method.prepare_queries(qx, qy, query_ids)
        with self._corrected(correction):
            return self.method.scores(qx, qy, x, y, query_ids)

    def self_influence(self, train, correction: Optional[str] = None) -> np.ndarray:
        """``(n_train,)``; ``correction="loo"``: ``g_i^T (H - H_i/n)^-1 g_i``."""
        x, y = as_arrays(train)
        with self._corrected(correction):
            return self.method.self_influence(x, y)

    def top_k(self, queries, train, k: int = 10, train_ids=None, query_ids=None,
              block_size: int = 4096, correction: Optional[str] = None) -> dict:
        """Proponents (largest scores) and opponents (smallest) per query, ties by id.

        Streams over the training set in blocks of ``block_size`` with a
        :class:`TopKAccumulator`, so memory is ``O(m * (k + block_size))``, not ``O(m * n)``.
        """
        qx, qy = as_arrays(queries)
        x, y = as_arrays(train)
        ids = default_ids(len(x)) if train_ids is None else np.asarray(train_ids)
        self.method.prepare_queries(qx, qy, query_ids)
        q = self.method.query_features(qx, qy, query_ids).astype(np.float64)
        acc = topk_lib.TopKAccumulator(k=k, n_queries=len(q))
        with self._corrected(correction):
            for start in range(0, len(x), block_size):
                s = slice(start, start + block_size)
                t = self.method.train_features(x[s], y[s]).astype(np.float64)
                acc.add(q @ t.T, ids[s])
        return acc.extract()

    def influence_vectors(self, train, correction: Optional[str] = None) -> np.ndarray:
        if not hasattr(self.method, "influence_vectors"):
            raise ValueError("influence vectors are defined for influence-function methods")
        x, y = as_arrays(train)
        with self._corrected(correction):
            return self.method.influence_vectors(x, y)

    def sample_boundary(self, data) -> np.ndarray:
        """``(n,)`` input-space distances to the decision boundary (no fit needed; inf: no
        boundary found), see :func:`influence_ops.boundary.sample_boundary`."""
        from influence_ops import boundary
        return boundary.sample_boundary(self.imodel, as_arrays(data)[0])

    def weights_boundary(self, data) -> np.ndarray:
        """``(n,)`` norms of the smallest target-weight change flipping each prediction, see
        :func:`influence_ops.boundary.weights_boundary`."""
        from influence_ops import boundary
        return boundary.weights_boundary(self.imodel, as_arrays(data)[0])

    def group_influence(self, queries, train, group_ids, order=1, query_ids=None):
        """``(groups, scores (m, G))``; first order also returns group self-influence.

        ``order``: 1 (Koh et al. 2019: sums of first-order scores), 2 (Basu et al. 2020) or
        ``"newton"`` (one Newton step on the objective without the group, with the group's
        own Hessian taken out: exact for any group size up to the step; explicit d x d
        Hessians, modest d). ``score / n`` ~ change of the test loss in every order."""
        qx, qy = as_arrays(queries)
        x, y = as_arrays(train)
        if order == 1:
            self.method.prepare_queries(qx, qy, query_ids)
            # Sums of first-order features: a leave-one-out correction of the members
            # would not be the group's (use order="newton" for that).
            with self._corrected("none"):
                return groups.first_order_group_scores(self.method, qx, qy, x, y, group_ids,
                                                       query_ids)
        if order == 2:
            if not self.method.second_order_groups:
                raise ValueError("second-order group influence needs an influence-function method")
            return groups.second_order_group_scores(self.method, self.imodel, qx, qy, x, y,
                                                    group_ids)
        if order == "newton":
            return groups.newton_group_scores(self.imodel, qx, qy, x, y, group_ids,
                                              self.config.damping)
        raise ValueError(f"order must be 1, 2 or 'newton', got {order!r}")

    def save(self, directory: str) -> str:
        return artifacts.save_method(self.method, self.config, directory)

    @classmethod
    def load(cls, directory: str, model, target_layers=None,
             loss="sparse_categorical_crossentropy", l2: float = 0.0, from_logits=None):
        obj = cls.__new__(cls)
        manifest = artifacts.read_manifest(directory)
        if target_layers is None:
            target_layers = manifest["model"]["target_layers"]
        obj.imodel = model if isinstance(model, InfluenceModel) else InfluenceModel(
            model, target_layers=target_layers, loss=loss, from_logits=from_logits, l2=l2)
        obj.method, obj.config = artifacts.load_method_and_config(directory, obj.imodel)
        return obj

    def to_parquet(self, path: str, queries, train, k: int = 10, train_ids=None,
                   query_ids=None) -> str:
        """Writes the top-k table (query_id, rank, train_id, score, kind) to one Parquet file."""
        import pyarrow.parquet as pq
        from influence_ops import schemas
        qx, _ = as_arrays(queries)
        qids = default_ids(len(qx), "query") if query_ids is None else np.asarray(query_ids)
        res = self.top_k(queries, train, k, train_ids, query_ids)
        table = schemas.topk_table(qids, res)
        pq.write_table(table, path)
        return path

    def audit(self, train, ids=None, queries=None, query_ids=None, k: int = 10,
              spot_check: int = 8, spot_check_rows: int = 2000, boundary=(), top: int = 24,
              output_dir: Optional[str] = None, noisy_ids=None, image_shape=None) -> dict:
        """A data audit of ``train`` with the fitted method (see :mod:`influence_ops.audit`):
        ``{"ranking": table (rank 1 = highest self-influence: train_id, score, loss, label,
        predicted, confidence, [boundary columns]), "explain": top-k table of ``queries`` or
        None, "spot_check": {"rows", "pearson", "sign_agreement", "drift", ...} or None,
        "spectrum": eigenvalues or None}``. ``boundary``: ``("sample_boundary",
        "weights_boundary")`` or a subset. ``output_dir``: also write the run folder and its
        HTML report there (``result["report"]``); ``noisy_ids`` adds the detection curve."""
        from influence_ops import audit as audit_lib
        x, y = as_arrays(train)
        return audit_lib.in_memory(self, x, y, ids, queries, query_ids, k, spot_check,
                                   spot_check_rows, tuple(boundary), top, output_dir,
                                   noisy_ids, image_shape)
