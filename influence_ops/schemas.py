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
])
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
