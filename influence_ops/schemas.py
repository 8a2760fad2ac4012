"""Output tables (pyarrow) shared by the notebook API and the pipeline writers."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

TOPK_SCHEMA = pa.schema([
    ("query_id", pa.string()), ("rank", pa.int32()), ("train_id", pa.string()),
    ("score", pa.float64()), ("kind", pa.string()),  # kind: proponent | opponent
])
SELF_SCHEMA = pa.schema([
    ("train_id", pa.string()), ("score", pa.float64()), ("label", pa.string()),
    ("loss", pa.float64()),
    # From the same forward pass as the loss: the model's label and the probability it gives
    # it (NaN for regression), and the input partition (file) the row was read from.
    ("predicted", pa.string()), ("confidence", pa.float64()), ("partition", pa.string()),
])
BOUNDARY_COLUMNS = ("sample_boundary", "weights_boundary")


def self_schema(boundary=()) -> pa.Schema:
    """The self-influence table, with the boundary-distance columns asked for (``--boundary``)."""
    schema = SELF_SCHEMA
    for name in boundary:
        schema = schema.append(pa.field(name, pa.float64()))
    return schema
PAIRWISE_SCHEMA = pa.schema([
    ("query_id", pa.string()), ("train_id", pa.string()), ("score", pa.float64()),
])
GROUP_SCHEMA = pa.schema([
    ("query_id", pa.string()), ("group_id", pa.string()), ("score", pa.float64()),
    ("order", pa.int32()),
])
GROUP_SELF_SCHEMA = pa.schema([
    ("group_id", pa.string()), ("score", pa.float64()), ("size", pa.int64()),
])
DEAD_LETTER_SCHEMA = pa.schema([
    ("source", pa.string()), ("example_id", pa.string()), ("error", pa.string()),
    ("stage", pa.string()),  # read | check | featurize
])


def features_schema(k: int) -> pa.Schema:
    return pa.schema([("example_id", pa.string()), ("label", pa.string()),
                      ("role", pa.string()), ("features", pa.list_(pa.float32(), k))])


def topk_table(query_ids, res: dict) -> pa.Table:
    """Long-format top-k from an extracted :class:`TopKAccumulator` result."""
    cols = {"query_id": [], "rank": [], "train_id": [], "score": [], "kind": []}
    query_ids = np.asarray(query_ids).astype(str)
    for kind, s_key, i_key in (("proponent", "pro_scores", "pro_ids"),
                               ("opponent", "opp_scores", "opp_ids")):
        scores, ids = res[s_key], res[i_key]
        m, k = scores.shape
        cols["query_id"].append(np.repeat(query_ids, k))
        cols["rank"].append(np.tile(np.arange(1, k + 1, dtype=np.int32), m))
        cols["train_id"].append(ids.reshape(-1).astype(str))
        cols["score"].append(scores.reshape(-1).astype(np.float64))
        cols["kind"].append(np.full(m * k, kind))
    return pa.table({c: np.concatenate(v) for c, v in cols.items()}, schema=TOPK_SCHEMA)


def labels_as_strings(y) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:
        y = np.argmax(y, axis=1)
    return y.reshape(len(y), -1)[:, 0].astype(str) if y.ndim > 1 else y.astype(str)

# Raw inputs of selected examples (``--examples_top``, ``--sample_rows``): what the audit
# report shows and what its spot check retrains on. ``values`` is the example's features in
# row-major order, ``shape`` their shape; ``y_values`` the label as given (flattened).
EXAMPLES_SCHEMA = pa.schema([
    ("example_id", pa.string()), ("role", pa.string()),  # train | query | sample
    ("label", pa.string()), ("predicted", pa.string()),
    ("shape", pa.list_(pa.int32())), ("values", pa.list_(pa.float32())),
    ("y_values", pa.list_(pa.float64())),
])


def examples_table(ids, role: str, x, y, labels, predicted) -> pa.Table:
    """Rows of :data:`EXAMPLES_SCHEMA` for examples ``x`` (any shape per example)."""
    x = np.asarray(x)
    n = len(x)
    shape = list(x.shape[1:])
    flat = x.reshape(n, -1).astype(np.float32)
    yv = np.asarray(y, dtype=np.float64).reshape(n, -1)
    return pa.table({
        "example_id": np.asarray(ids).astype(str), "role": np.full(n, role),
        "label": np.asarray(labels).astype(str), "predicted": np.asarray(predicted).astype(str),
        "shape": pa.array([shape] * n, type=pa.list_(pa.int32())),
        "values": pa.array(list(flat), type=pa.list_(pa.float32())),
        "y_values": pa.array(list(yv), type=pa.list_(pa.float64())),
    }, schema=EXAMPLES_SCHEMA)
