"""The notebook user's API: one object, numpy arrays or ``tf.data.Dataset`` in, numpy out.

The training side streams: ``(x, y)`` / ``(x, y, sample_weight)`` arrays or a (batched or
unbatched) dataset of such tuples is read one batch at a time by ``self_influence``,
``top_k``, ``influence_blocks``, ``save_influence_vectors``, ``predict_with_kernel`` and
first-order ``group_influence_vectors``; queries and the fit sample (at most
``fit_sample_size`` rows) are held in memory.

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
from typing import Iterator, Optional, Tuple

import numpy as np

from influence_ops import artifacts, groups, registry
from influence_ops import vectors_io
from influence_ops import topk as topk_lib
from influence_ops.config import ConfigError, InfluenceConfig
from influence_ops.methods.base import InfluenceMethod
from influence_ops.model import InfluenceModel

log = logging.getLogger(__name__)


STREAM_BATCH = 4096  # rows per streamed batch of arrays or of an unbatched dataset


def _is_dataset(data) -> bool:
    if isinstance(data, (tuple, list, np.ndarray)):
        return False
    import tensorflow as tf
    return isinstance(data, tf.data.Dataset)


def _dataset_is_batched(data, x_rank: Optional[int] = None) -> bool:
    """Whether a ``tf.data.Dataset``'s elements are batches: by the rank of x against the
    model's example rank when known, else by an unknown leading dimension."""
    spec = data.element_spec[0]
    rank = spec.shape.rank
    if x_rank is not None and rank is not None:
        return rank == x_rank + 1
    return bool(rank) and spec.shape[0] is None


def _check_tuple(data):
    if not isinstance(data, (tuple, list)) or len(data) not in (2, 3):
        raise TypeError("data must be an (x, y) or (x, y, sample_weight) tuple of arrays or a "
                        "tf.data.Dataset of such tuples")
    out = [np.asarray(a) for a in data]
    if any(len(a) != len(out[0]) for a in out[1:]):
        raise ValueError(f"x, y (and sample_weight) must have the same length, got "
                         f"{[len(a) for a in out]}")
    return out


def iter_batches(data, batch_size: Optional[int] = None, x_rank: Optional[int] = None
                 ) -> Iterator[Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]]:
    """``(x, y, w or None)`` numpy batches of a tuple of arrays or of a ``tf.data.Dataset``.

    Arrays are sliced (views, nothing copied); a batched dataset keeps its own batches, an
    unbatched one is batched by ``batch_size`` (default :data:`STREAM_BATCH`). Only one batch
    is in memory at a time (plus whatever the dataset pipeline prefetches). ``x_rank``: the
    model's example rank, to tell batched from unbatched datasets."""
    batch_size = int(batch_size or STREAM_BATCH)
    if not _is_dataset(data):
        arrays = _check_tuple(data)
        n = len(arrays[0])
        for start in range(0, n, batch_size):
            s = slice(start, start + batch_size)
            parts = [a[s] for a in arrays]
            yield parts[0], parts[1], (parts[2] if len(parts) == 3 else None)
        return
    if not isinstance(data.element_spec, tuple) or len(data.element_spec) not in (2, 3):
        raise TypeError("a tf.data.Dataset must yield (x, y) or (x, y, sample_weight) tuples")
    if not _dataset_is_batched(data, x_rank):
        data = data.batch(batch_size)
    for elem in data.as_numpy_iterator():
        x, y = np.asarray(elem[0]), np.asarray(elem[1])
        w = np.asarray(elem[2]).reshape(-1) if len(elem) == 3 else None
        yield x, y, w


def as_arrays(data, x_rank: Optional[int] = None, with_weights: bool = False):
    """``(x, y)`` (``(x, y, w or None)`` with ``with_weights``) numpy arrays of a tuple or a
    (batched or unbatched) ``tf.data.Dataset``: the whole data in memory (queries, fit
    samples, groups); the training side of scoring streams with :func:`iter_batches`."""
    if not _is_dataset(data):
        arrays = _check_tuple(data)
        w = arrays[2] if len(arrays) == 3 else None
    else:
        xs, ys, ws = [], [], []
        for x, y, w in iter_batches(data, x_rank=x_rank):
            xs.append(x)
            ys.append(y)
            ws.append(w)
        if not xs:
            raise ValueError("the dataset is empty")
        arrays = [np.concatenate(xs), np.concatenate(ys)]
        w = None if ws[0] is None else np.concatenate(ws)
    if with_weights:
        return arrays[0], arrays[1], w
    return arrays[0], arrays[1]


def _has_weights(data) -> bool:
    if _is_dataset(data):
        return isinstance(data.element_spec, tuple) and len(data.element_spec) == 3
    return isinstance(data, (tuple, list)) and len(data) == 3


def n_examples(data) -> Optional[int]:
    """Rows of a tuple of arrays or of a dataset of known finite cardinality (else None)."""
    if not _is_dataset(data):
        return len(_check_tuple(data)[0])
    import tensorflow as tf
    card = int(data.cardinality().numpy())
    if card < 0:
        return None
    if _dataset_is_batched(data):
        return None  # batches, not rows
    return card


def default_ids(n: int, prefix: str = "train") -> np.ndarray:
    width = max(6, len(str(max(n - 1, 0))))
    return np.char.add(f"{prefix}:", np.char.zfill(np.arange(n).astype(str), width))


def _stream_ids(start: int, count: int, width: int, prefix: str = "train") -> np.ndarray:
    return np.char.add(f"{prefix}:", np.char.zfill(np.arange(start, start + count).astype(str),
                                                   width))


def reservoir_sample(batches, size: int, seed: int = 0):
    """A uniform sample of ``size`` rows (all rows when fewer, in order) of a stream of
    ``(x, y, w)`` batches in one pass with ``O(size)`` memory (Algorithm R, seeded):
    ``(x, y, w or None, rows seen)``. Until ``size`` rows have been seen the batches are only
    collected, so a small training set is not copied into a ``size``-row buffer."""
    rng = np.random.default_rng(seed)
    parts = []          # batches while filling
    buf = None          # [x, y, w] arrays of exactly ``size`` rows once full
    seen = 0
    for x, y, w in batches:
        b = len(x)
        take = min(b, max(size - seen, 0))
        if take:
            parts.append((x[:take], y[:take], None if w is None else w[:take]))
            if seen + take == size:
                buf = [np.concatenate([p[0] for p in parts]),
                       np.concatenate([p[1] for p in parts]),
                       None if parts[0][2] is None else np.concatenate([p[2] for p in parts])]
                parts = []
        if take < b:  # row t (0-based) replaces a random slot with probability size/(t+1)
            t = seen + np.arange(take, b)
            slots = (rng.random(b - take) * (t + 1)).astype(np.int64)
            for r, slot in zip(np.nonzero(slots < size)[0] + take, slots[slots < size]):
                buf[0][slot], buf[1][slot] = x[r], y[r]
                if buf[2] is not None:
                    buf[2][slot] = w[r]
        seen += b
    if seen == 0:
        raise ValueError("no training examples to fit on: the dataset is empty")
    if buf is None:  # fewer rows than ``size``: all of them
        if len(parts) == 1:
            return parts[0][0], parts[0][1], parts[0][2], seen
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                None if parts[0][2] is None else np.concatenate([p[2] for p in parts]), seen)
    return buf[0], buf[1], buf[2], seen


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

    # -- data -------------------------------------------------------------------------------
    @property
    def _x_rank(self) -> Optional[int]:
        shape = self.imodel.input_shape
        return None if shape is None else len(shape)

    @property
    def weighted(self) -> bool:
        """Whether the calculator was fitted with sample weights (see :meth:`fit`)."""
        return self.imodel.sample_weighted

    def _batches(self, data, batch_size=None, sample_weight=None):
        """``(x, y for the method, w or None, y as given)`` per batch. Weighted: the labels go
        to the method packed with their weights (1 where none are given)."""
        start = 0
        for x, y, w in iter_batches(data, batch_size, self._x_rank):
            if sample_weight is not None:
                w = np.asarray(sample_weight, np.float64).reshape(-1)[start:start + len(x)]
                if len(w) != len(x):
                    raise ValueError("sample_weight has fewer entries than training rows")
            start += len(x)
            ym = self.imodel.pack_labels(y, w) if self.weighted else y
            yield x, ym, w, y

    def _arrays(self, data):
        x, y, w = as_arrays(data, self._x_rank, with_weights=True)
        return x, (self.imodel.pack_labels(y, w) if self.weighted else y)

    def fit(self, train, queries=None, query_ids=None, sample_weight=None
            ) -> "InfluenceCalculator":
        """Fits the method on ``train``: ``(x, y)`` or ``(x, y, sample_weight)`` arrays or a
        ``tf.data.Dataset`` of such tuples.

        Sample weights (a third element, or ``sample_weight=`` aligned with the rows): the
        objective becomes ``(1/n) sum_i w_i l_i`` plus the regulariser, the seed's and Keras's
        definition (Keras divides the weighted sum by the batch size, not by the weights'
        sum; scale the weights to mean 1 for ``sum_i w_i l_i / sum_i w_i``). The Hessian is
        ``(1/n) sum_i w_i H_i``, a training example's gradient is ``w_i g_i`` (so its score
        is ``g_test^T H^-1 w_i g_i`` and removing it changes the test loss by about
        ``score / n``; self-influence is ``w_i^2 g_i^T H^-1 g_i``, the change of its own
        weighted loss), and queries weigh 1 unless they carry weights too. Later calls
        take training data with or without weights (missing weights are 1).

        Methods whose fit is a sum over the training set (``solver="exact"``, ``"ekfac"``,
        ``"kfac"``, unweighted) stream every batch through their combiner, as the pipeline
        does. Any other fit needs its sample in memory: at most ``fit_sample_size`` rows (the
        config's option, 50000 by default, 0 = all), drawn uniformly by a seeded one-pass reservoir
        sample when the data has more (arrays and datasets alike, ``O(fit_sample_size)``
        memory). The training-set size ``n`` of the leave-one-out correction is the number of
        rows seen, not the sample's."""
        weighted = sample_weight is not None or _has_weights(train)
        if weighted:
            self.config.check_sample_weights()  # the one rule, shared with --weight_key
        self.imodel.set_sample_weighted(weighted)
        if not weighted and self._fit_by_combiner(train):
            return self
        size = int(self.config.fit_sample_size)
        raw = ((x, y, w) for x, y, w, _ in self._batches(train, None, sample_weight))
        if size:
            x, y, _, n_seen = reservoir_sample(raw, size, self.config.seed)
            if n_seen > size:
                log.info("fit on a uniform sample of %d of %d training examples "
                         "(fit_sample_size)", size, n_seen)
        else:
            xs, ys = zip(*[(x, y) for x, y, _ in raw])
            x, y = np.concatenate(xs), np.concatenate(ys)
            n_seen = len(x)
        if self.method.needs_queries and queries is not None:
            qx, qy = self._arrays(queries)
            self.method.fit(x, y, qx, qy, query_ids)
        else:
            # Methods that solve their queries do it when they first see them (prepare_queries).
            self.method.fit(x, y)
        if hasattr(self.method, "n_train"):
            self.method.n_train = int(n_seen)
        return self

    def _fit_by_combiner(self, train) -> bool:
        """Methods whose fit is a sum over all training examples (exact Hessian, K-FAC /
        EK-FAC factors) fit from the stream of batches, as the pipeline does: every row,
        ``O(d^2)`` (or factor-sized) memory, no sample. Returns False for the others."""
        combiner = registry.get_method(self.config.method).combiner(self.config,
                                                                    lambda: self.imodel)
        if combiner is None:
            return False
        out, n_seen = None, 0
        for i, comb in enumerate(combiner if isinstance(combiner, (list, tuple))
                                 else [combiner]):
            side = {} if out is None else {getattr(comb, "previous_keyword", "previous"): out}
            acc = comb.create_accumulator(**side)
            for x, y, _, _ in self._batches(train):
                acc = comb.add_input(acc, (x, y), **side)
                n_seen += len(x) if i == 0 else 0
            out = comb.extract_output(acc, **side)
        self.method.fit_from_combined(out)
        if hasattr(self.method, "n_train"):
            self.method.n_train = int(n_seen)
        return True

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

    def _query_features(self, queries, query_ids):
        qx, qy = self._arrays(queries)
        self.method.prepare_queries(qx, qy, query_ids)
        return self.method.query_features(qx, qy, query_ids).astype(np.float64)

    def influence_blocks(self, queries, train, query_ids=None, correction: Optional[str] = None,
                         batch_size: Optional[int] = None, query_batch_size: Optional[int] = None
                         ) -> Iterator[Tuple[slice, slice, np.ndarray]]:
        """Yields ``(query_slice, train_slice, scores)`` blocks of the ``(m, n)`` score matrix,
        ``scores`` ``(len(query_slice), len(train_slice))``, streaming over the training set.

        Queries are held in memory (their features are computed once); the training side is
        read one batch at a time (``train``: arrays or a batched / unbatched
        ``tf.data.Dataset``; slices are row positions in its order), so memory is
        ``O(m * batch)``, never ``O(m * n)``. ``query_batch_size`` splits the queries too."""
        q = self._query_features(queries, query_ids)
        qb = int(query_batch_size or max(len(q), 1))
        start = 0
        with self._corrected(correction):
            for x, y, *_ in self._batches(train, batch_size):
                t = self.method.train_features(x, y).astype(np.float64)
                ts = slice(start, start + len(x))
                for q0 in range(0, len(q), qb):
                    yield slice(q0, min(q0 + qb, len(q))), ts, q[q0:q0 + qb] @ t.T
                start += len(x)

    def influence(self, queries, train, query_ids=None, correction: Optional[str] = None
                  ) -> np.ndarray:
        """``(n_queries, n_train)`` scores. ``correction="loo"``: leave-one-out corrected,
        ``g_test^T (H - H_i/n)^-1 g_i`` (None: the config's ``correction``). The result is the
        whole matrix; :meth:`influence_blocks` streams it."""
        cols = [block for _, _, block in self.influence_blocks(queries, train, query_ids,
                                                               correction)]
        if not cols:
            m = len(self._arrays(queries)[0])
            return np.zeros((m, 0))
        return np.concatenate(cols, axis=1)

    def self_influence(self, train, correction: Optional[str] = None,
                       batch_size: Optional[int] = None) -> np.ndarray:
        """``(n_train,)``, streamed over the training batches; ``correction="loo"``:
        ``g_i^T (H - H_i/n)^-1 g_i``."""
        out = []
        with self._corrected(correction):
            for x, y, *_ in self._batches(train, batch_size):
                out.append(np.asarray(self.method.self_influence(x, y), np.float64))
        return np.concatenate(out) if out else np.zeros(0)

    def _train_ids(self, train, train_ids):
        """A function ``(start, count) -> ids`` of the streamed rows."""
        if train_ids is not None:
            train_ids = np.asarray(train_ids).astype(str)
            return lambda start, count: train_ids[start:start + count]
        n = n_examples(train)
        width = max(6, len(str(max((n or 1) - 1, 0))))
        return lambda start, count: _stream_ids(start, count, width)

    def top_k(self, queries, train, k: int = 10, train_ids=None, query_ids=None,
              block_size: Optional[int] = None, correction: Optional[str] = None,
              return_examples: bool = False) -> dict:
        """Proponents (largest scores) and opponents (smallest) per query, ties by id.

        Streams over the training set one batch at a time (``block_size`` rows of arrays or
        of an unbatched dataset; a batched dataset's own batches) with a
        :class:`TopKAccumulator`, so memory is ``O(m * (k + block_size))``, not ``O(m * n)``.
        ``return_examples``: also ``pro_x``/``pro_y``/``opp_x``/``opp_y`` ``(m, k, ...)``, the
        training examples themselves, gathered in the same pass (only the current top-k
        examples are kept: ``O(m * k)`` examples at most).
        """
        q = self._query_features(queries, query_ids)
        ids_of = self._train_ids(train, train_ids)
        acc = topk_lib.TopKAccumulator(k=k, n_queries=len(q))
        kept = {}  # id -> (x row, y row) of the examples in the current lists
        start = 0
        with self._corrected(correction):
            for x, y, _, y_given in self._batches(train, block_size):
                ids = ids_of(start, len(x))
                if len(ids) != len(x):
                    raise ValueError(f"train_ids has {start + len(ids)} ids, fewer than the "
                                     "training rows")
                t = self.method.train_features(x, y).astype(np.float64)
                acc.add(q @ t.T, ids)
                start += len(x)
                if return_examples:
                    cur = acc.extract()
                    live = set(cur["pro_ids"].ravel().tolist()) | \
                        set(cur["opp_ids"].ravel().tolist())
                    kept = {i: v for i, v in kept.items() if i in live}
                    for j, i in enumerate(ids.tolist()):
                        if i in live and i not in kept:
                            kept[i] = (np.array(x[j]), np.array(y_given[j]))
        res = acc.extract()
        if return_examples:
            for side in ("pro", "opp"):
                sel = res[f"{side}_ids"]
                flat = sel.ravel().tolist()
                if flat:
                    res[f"{side}_x"] = np.stack([kept[i][0] for i in flat]).reshape(
                        sel.shape + kept[flat[0]][0].shape)
                    res[f"{side}_y"] = np.stack([kept[i][1] for i in flat]).reshape(
                        sel.shape + kept[flat[0]][1].shape)
                else:
                    res[f"{side}_x"] = res[f"{side}_y"] = np.zeros(sel.shape)
        return res

    def _vector_batches(self, train, correction=None, batch_size=None):
        if not hasattr(self.method, "influence_vectors"):
            raise ValueError(f"influence vectors are not defined for {self.method.name}")
        with self._corrected(correction):
            for x, y, *_ in self._batches(train, batch_size):
                yield x, np.asarray(self.method.influence_vectors(x, y))

    def influence_vectors(self, train, correction: Optional[str] = None) -> np.ndarray:
        """One vector per training example ``(n, k)`` whose inner product with the query side
        gives the score (the method's ``influence_vectors``; for influence functions
        ``-(H + damping)^-1 g``). Whole in memory: :meth:`save_influence_vectors` streams."""
        parts = [v for _, v in self._vector_batches(train, correction)]
        return np.concatenate(parts) if parts else np.zeros((0, 0))

    def save_influence_vectors(self, train, path: str, format: str = "parquet", train_ids=None,
                               correction: Optional[str] = None,
                               batch_size: Optional[int] = None) -> str:
        """Writes ``(id, vector)`` rows to one file, one training batch at a time (memory
        ``O(batch * k)``). ``format``: ``"parquet"`` (columns ``id`` string, ``vector``
        list<double>, one row group per batch) or ``"tfrecord"`` (``tf.train.Example`` with
        ``id`` bytes and ``vector`` the float64 little-endian bytes, exact). Read back with
        :func:`load_influence_vectors`."""
        return vectors_io.write_vectors(
            path, format, ((ids, v) for ids, v in self._id_vector_batches(
                train, train_ids, correction, batch_size)))

    def _id_vector_batches(self, train, train_ids, correction, batch_size):
        ids_of = self._train_ids(train, train_ids)
        start = 0
        for x, v in self._vector_batches(train, correction, batch_size):
            yield ids_of(start, len(x)), v
            start += len(x)

    def group_influence_vectors(self, train, group_ids, order=1,
                                batch_size: Optional[int] = None):
        """``(groups, V (G, d))``: one vector per group whose inner product with a query's
        gradient ``g_test`` is the group's score of :meth:`group_influence` of that order.

        ``order=1``: ``V_U = (H + damping)^-1 sum_{i in U} g_i`` (RelatIF: the sum of the
        members' normalised solutions), streamed over the training batches (``group_ids`` is
        an array aligned with the training rows; memory ``O(G d)``). ``order=2``:
        ``v_U`` of Basu et al. (2020) (:func:`influence_ops.groups.combine_second_order`; the
        training set in memory). Unlike :meth:`influence_vectors` (the seed's sign: the
        parameter change ``-(H + damping)^-1 g`` of up-weighting), these carry the score's
        sign: ``score = g_test . V_U``."""
        if not getattr(self.method, "second_order_groups", False):
            raise ValueError("group influence vectors are defined for influence-function "
                             f"methods (influence, relatif), not {self.method.name}")
        group_ids = np.asarray(group_ids)
        if order == 1:
            def batches():
                start = 0
                for x, y, *_ in self._batches(train, batch_size):
                    gid = group_ids[start:start + len(x)]
                    if len(gid) != len(x):
                        raise ValueError("group_ids has fewer entries than training rows")
                    yield x, y, gid
                    start += len(x)
            with self._corrected("none"):
                return groups.first_order_group_vectors(self.method, batches())
        if order == 2:
            if self.weighted:
                raise ValueError("order=2 group influence does not take sample weights")
            x, y = self._arrays(train)
            return groups.second_order_group_vectors(self.method, self.imodel, x, y, group_ids)
        raise ValueError(f"order must be 1 or 2, got {order!r}")

    def predict_with_kernel(self, queries, train, batch_size: Optional[int] = None
                            ) -> np.ndarray:
        """Representer points: the explained outputs rebuilt from the training set,
        ``z_c(x_t) = sum_i alpha_ic k(x_i, x_t)`` ``(m, C)`` (the seed's
        ``predict_with_kernel``), streamed: the train features are summed over the batches
        and met by each query's features for every class c.

        ``rps_l2``: ``sum_i alpha_ic <f_i, f_t> = f_t W``, the L2 surrogate's logits, exactly
        at the surrogate's optimum (the representer theorem; off by its fit error otherwise).
        They are *not* the model's own logits: the surrogate is a bias-free last layer fitted
        to the model's predictions with an L2 penalty. ``rps_lje``: the class-c logits after
        one Newton step from the perturbed weights, which are the model's own pre-activation
        logits when the model sits at a stationary point of its (L2-regularised) training
        objective. ``queries``: x, or anything :meth:`influence` takes (labels ignored).
        One output (sigmoid): the logit of class 1."""
        if not hasattr(self.method, "n_explained"):
            raise ValueError(f"predict_with_kernel is defined for representer points "
                             f"(rps_l2, rps_lje), not {self.method.name}")
        if isinstance(queries, (tuple, list)) or _is_dataset(queries):
            qx = self._arrays(queries)[0]
        else:
            qx = np.asarray(queries)
        total = None
        for x, y, *_ in self._batches(train, batch_size):
            f = np.asarray(self.method.train_features(x, y), np.float64).sum(axis=0)
            total = f if total is None else total + f
        if total is None:
            raise ValueError("the training set is empty")
        C = self.method.n_explained
        if C == 1:
            labels = [np.ones((len(qx), 1))]
        else:
            labels = [np.full(len(qx), c, np.int64) for c in range(C)]
        return np.stack([np.asarray(self.method.query_features(qx, lab), np.float64) @ total
                         for lab in labels], axis=1)

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
        qx, qy = self._arrays(queries)
        x, y = self._arrays(train)
        if order == 1:
            self.method.prepare_queries(qx, qy, query_ids)
            # Sums of first-order features: a leave-one-out correction of the members
            # would not be the group's (use order="newton" for that).
            with self._corrected("none"):
                return groups.first_order_group_scores(self.method, qx, qy, x, y, group_ids,
                                                       query_ids)
        if order == 2:
            if self.weighted:
                raise ValueError("order=2 group influence does not take sample weights (its "
                                 "coefficients count members, p = |U| / n)")
            if not self.method.second_order_groups:
                raise ValueError("second-order group influence needs an influence-function method")
            return groups.second_order_group_scores(self.method, self.imodel, qx, qy, x, y,
                                                    group_ids)
        if order == "newton":
            if self.weighted:
                raise ValueError("order='newton' group influence does not take sample weights")
            return groups.newton_group_scores(self.imodel, qx, qy, x, y, group_ids,
                                              self.config.damping)
        raise ValueError(f"order must be 1, 2 or 'newton', got {order!r}")

    def save(self, directory: str) -> str:
        # A weighted fit reloads weighted: its Hessian and features are of the weighted loss.
        extra = {"sample_weighted": True} if self.weighted else None
        return artifacts.save_method(self.method, self.config, directory, extra)

    @staticmethod
    def load_influence_vectors(path: str, format: Optional[str] = None):
        """``(ids (n,), vectors (n, k))`` written by :meth:`save_influence_vectors`."""
        return vectors_io.read_vectors(path, format)

    @classmethod
    def load(cls, directory: str, model, target_layers=None,
             loss="sparse_categorical_crossentropy", l2: float = 0.0, from_logits=None):
        obj = cls.__new__(cls)
        manifest = artifacts.read_manifest(directory)
        if target_layers is None:
            target_layers = manifest["model"]["target_layers"]
        obj.imodel = model if isinstance(model, InfluenceModel) else InfluenceModel(
            model, target_layers=target_layers, loss=loss, from_logits=from_logits, l2=l2)
        obj.imodel.set_sample_weighted(bool(manifest.get("sample_weighted", False)))
        obj.method, obj.config = artifacts.load_method_and_config(directory, obj.imodel)
        return obj

    def to_parquet(self, path: str, queries, train, k: int = 10, train_ids=None,
                   query_ids=None) -> str:
        """Writes the top-k table (query_id, rank, train_id, score, kind) to one Parquet file."""
        import pyarrow.parquet as pq
        from influence_ops import schemas
        qx, _ = self._arrays(queries)
        qids = default_ids(len(qx), "query") if query_ids is None else np.asarray(query_ids)
        res = self.top_k(queries, train, k, train_ids, query_ids)
        table = schemas.topk_table(qids, res)
        pq.write_table(table, path)
        return path

    def audit(self, train, ids=None, queries=None, query_ids=None, k: int = 10,
              spot_check: Optional[int] = None, spot_check_rows: int = 2000, boundary=(),
              top: int = 24,
              output_dir: Optional[str] = None, noisy_ids=None, image_shape=None) -> dict:
        """A data audit of ``train`` with the fitted method (see :mod:`influence_ops.audit`):
        ``{"ranking": table (rank 1 = highest self-influence: train_id, score, loss, label,
        predicted, confidence, [boundary columns]), "explain": top-k table of ``queries`` or
        None, "spot_check": {"rows", "pearson", "sign_agreement", "drift", ...} or None,
        "spectrum": eigenvalues or None}``. ``boundary``: ``("sample_boundary",
        "weights_boundary")`` or a subset. ``output_dir``: also write the run folder and its
        HTML report there (``result["report"]``); ``noisy_ids`` adds the detection curve.
        A sample-weighted calculator takes ``(x, y, sample_weight)`` (the ranking and the
        ``loss`` column are of the weighted objective) and runs no spot check (its refits are
        unweighted): ``spot_check`` defaults to 8, or 0 when weighted."""
        from influence_ops import audit as audit_lib
        x, y, w = as_arrays(train, with_weights=True)
        if spot_check is None:
            spot_check = 0 if self.weighted else 8
        if self.weighted and spot_check:
            raise ValueError("the audit's spot check refits without sample weights: leave "
                             "spot_check unset (it is 0 for a sample-weighted calculator)")
        if w is not None and not self.weighted:
            raise ValueError("train carries sample weights but the calculator was fitted "
                             "without them: fit with the weights, or pass (x, y)")
        return audit_lib.in_memory(self, x, y, ids, queries, query_ids, k, spot_check,
                                   spot_check_rows, tuple(boundary), top, output_dir,
                                   noisy_ids, image_shape, weights=w)
