"""Streaming top-k of proponents and opponents per query, mergeable in any order.

The combiner interface of tensorflow/transform and TFDV, without Beam: ``create``, ``add``
(a whole ``(m, b)`` score block), ``merge`` (mutates and returns the first accumulator),
``extract``. Example ids are strings (zero-pad numeric ids so that string order is numeric order).
Order is by score, **ties broken by example id** (ascending), so the result does
not depend on how the training set was split into blocks or in which order blocks merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


def _select(scores: np.ndarray, ids: np.ndarray, k: int, largest: bool):
    """Per row, the k best (score, id) pairs: ``scores`` ``(m, c)``, ``ids`` ``(m, c)``."""
    m, c = scores.shape
    if c <= k and c > 0:
        kk = c
    else:
        kk = k
    if c == 0:
        return scores, ids
    # id ranks keep string order and let lexsort run on numbers.
    _, rank = np.unique(ids, return_inverse=True)
    rank = rank.reshape(ids.shape)
    key = -scores if largest else scores
    # Cheap pre-selection keeps ties: everything at least as good as the k-th best value.
    if c > 4 * kk:
        kth = np.partition(key, kk - 1, axis=1)[:, kk - 1:kk]
        cand = key <= kth
        width = int(cand.sum(axis=1).max())
        order = np.argsort(~cand, axis=1, kind="stable")[:, :width]
        key = np.take_along_axis(key, order, 1)
        rank = np.take_along_axis(rank, order, 1)
        scores = np.take_along_axis(scores, order, 1)
        ids = np.take_along_axis(ids, order, 1)
    order = np.lexsort((rank, key), axis=1)[:, :kk]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


@dataclass
class TopKAccumulator:
    """Top-k proponents (largest scores) and opponents (smallest) for m queries.

    Arrays: ``pro_scores``/``pro_ids`` and ``opp_scores``/``opp_ids`` of shape ``(m, <=k)``.
    """
    k: int
    n_queries: int
    pro_scores: Optional[np.ndarray] = None
    pro_ids: Optional[np.ndarray] = None
    opp_scores: Optional[np.ndarray] = None
    opp_ids: Optional[np.ndarray] = None
    n_seen: int = 0

    def add(self, scores: np.ndarray, ids: np.ndarray) -> "TopKAccumulator":
        """Adds a block: ``scores`` ``(m, b)`` for train examples ``ids`` ``(b,)``."""
        scores = np.asarray(scores, dtype=np.float64)
        if scores.ndim != 2 or scores.shape[0] != self.n_queries:
            raise ValueError(f"scores must be (n_queries={self.n_queries}, b), got {scores.shape}")
        ids = np.asarray(ids).astype(str)  # ids are strings everywhere (Parquet schema)
        if ids.shape != (scores.shape[1],):
            raise ValueError(f"ids must be ({scores.shape[1]},), got {ids.shape}")
        id_block = np.broadcast_to(ids[None, :], scores.shape)
        self._merge_arrays(scores, id_block, scores, id_block)
        self.n_seen += scores.shape[1]
        return self

    def _merge_arrays(self, ps, pi, os_, oi):
        if self.pro_scores is not None:
            ps = np.concatenate([self.pro_scores, ps], axis=1)
            pi = np.concatenate([self.pro_ids, pi], axis=1)
            os_ = np.concatenate([self.opp_scores, os_], axis=1)
            oi = np.concatenate([self.opp_ids, oi], axis=1)
        self.pro_scores, self.pro_ids = _select(ps, np.asarray(pi), self.k, largest=True)
        self.opp_scores, self.opp_ids = _select(os_, np.asarray(oi), self.k, largest=False)

    def merge(self, other: "TopKAccumulator") -> "TopKAccumulator":
        """Merges ``other`` into self (self is mutated and returned)."""
        if other.pro_scores is None:
            return self
        if (other.k, other.n_queries) != (self.k, self.n_queries):
            raise ValueError("cannot merge accumulators of different k or query count")
        self._merge_arrays(other.pro_scores, other.pro_ids, other.opp_scores, other.opp_ids)
        self.n_seen += other.n_seen
        return self

    def extract(self):
        """Returns dict of arrays: proponents and opponents, best first."""
        if self.pro_scores is None:
            empty = np.zeros((self.n_queries, 0))
            return {"pro_scores": empty, "pro_ids": empty.astype(str),
                    "opp_scores": empty, "opp_ids": empty.astype(str)}
        return {"pro_scores": self.pro_scores, "pro_ids": self.pro_ids,
                "opp_scores": self.opp_scores, "opp_ids": self.opp_ids}


def top_k(scores: np.ndarray, ids: np.ndarray, k: int):
    """One-shot top-k over a full ``(m, n)`` score matrix."""
    return TopKAccumulator(k=k, n_queries=scores.shape[0]).add(scores, ids).extract()
