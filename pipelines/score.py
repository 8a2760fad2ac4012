"""Stages 4-5: score training feature blocks against the broadcast query features and merge
the per-block top-k into the global top-k (DESIGN steps 4-5)."""

from __future__ import annotations

import time
from typing import List

import apache_beam as beam
import numpy as np

from pipelines.blocks import FeatureBlock, timing
from pipelines.combine import BeamCombineFn
from pipelines.constants import NAMESPACE, TIMING


def query_matrix(query_blocks: List[FeatureBlock]):
    """Concatenated query features in id order (the canonical row order of every output)."""
    if not query_blocks:
        raise ValueError("no query examples to score against: --queries is empty or every "
                         "query row was dead-lettered")
    ids = np.concatenate([b.ids for b in query_blocks])
    feats = np.concatenate([b.features for b in query_blocks]).astype(np.float64)
    order = np.argsort(ids, kind="stable")
    return ids[order], feats[order]


def features_table(fb: FeatureBlock, role: str):
    import pyarrow as pa
    from influence_ops import schemas
    k = fb.features.shape[1]
    flat = pa.array(fb.features.astype(np.float32).reshape(-1))
    return pa.table({"example_id": fb.ids.astype(str), "label": fb.labels.astype(str),
                     "role": np.full(len(fb), role),
                     "features": pa.FixedSizeListArray.from_arrays(flat, k)},
                    schema=schemas.features_schema(k))


def self_table(fb: FeatureBlock, boundary=()):
    """The self-influence rows of one train feature block (``schemas.self_schema``)."""
    import pyarrow as pa
    from influence_ops import schemas
    n = len(fb)
    cols = {"train_id": fb.ids.astype(str), "score": np.asarray(fb.self_scores, np.float64),
            "label": fb.labels.astype(str), "loss": np.asarray(fb.losses, np.float64),
            "predicted": (fb.predicted.astype(str) if fb.predicted is not None
                          else np.full(n, None, dtype=object)),
            "confidence": (np.asarray(fb.confidence, np.float64) if fb.confidence is not None
                           else np.full(n, np.nan)),
            "partition": (fb.partition.astype(str) if fb.partition is not None
                          else np.full(n, "", dtype=object))}
    for name in boundary:
        cols[name] = np.asarray((fb.extra or {})[name], np.float64)
    return pa.table(cols, schema=schemas.self_schema(boundary))


class _ScoreDoFn(beam.DoFn):
    """Train feature block x broadcast query features -> per-block top-k (+ optional tables)."""

    def __init__(self, k: int, write_pairwise: bool, write_features: bool, boundary=(),
                 examples_top: int = 0):
        self.k, self.write_pairwise, self.write_features = k, write_pairwise, write_features
        self.boundary, self.examples_top = tuple(boundary), examples_top
        self.count = beam.metrics.Metrics.counter(NAMESPACE, "train_examples_scored")
        self.ms = beam.metrics.Metrics.distribution(NAMESPACE, "score_block_ms")
        self._cache = None

    def _queries(self, query_blocks):
        key = id(query_blocks)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key,) + query_matrix(query_blocks)
        return self._cache[1], self._cache[2]

    def process(self, fb: FeatureBlock, query_blocks):
        import pyarrow as pa
        from influence_ops import schemas
        from influence_ops.topk import TopKAccumulator
        t = time.time()
        qids = S = None
        if query_blocks:  # no queries (--queries empty): self-influence only
            qids, Q = self._queries(query_blocks)
            S = Q @ fb.features.astype(np.float64).T  # (m, b)
            yield TopKAccumulator(k=self.k, n_queries=len(qids)).add(S, fb.ids)
        yield beam.pvalue.TaggedOutput("self", self_table(fb, self.boundary))
        if self.examples_top:
            from pipelines.examples import EXPLAIN_QUERIES, train_candidates
            for c in train_candidates(fb, self.examples_top, self.k, qids,
                                      None if S is None else S[:EXPLAIN_QUERIES]):
                yield beam.pvalue.TaggedOutput("candidates", c)
        if self.write_pairwise and query_blocks:
            m, b = S.shape
            yield beam.pvalue.TaggedOutput("pairwise", pa.table({
                "query_id": np.repeat(qids.astype(str), b),
                "train_id": np.tile(fb.ids.astype(str), m),
                "score": S.reshape(-1)}, schema=schemas.PAIRWISE_SCHEMA))
        if self.write_features:
            yield beam.pvalue.TaggedOutput("features", features_table(fb, "train"))
        self.count.inc(len(fb))
        sec = time.time() - t
        self.ms.update(int(sec * 1000))
        yield timing("score", sec)


class Score(beam.PTransform):
    """``train FeatureBlocks -> {topk partials, self tables, pairwise, features, timing}``."""

    def __init__(self, query_features, k, write_pairwise=False, write_features=False,
                 boundary=(), examples_top: int = 0):
        super().__init__()
        self.query_features = query_features
        self.k, self.write_pairwise, self.write_features = k, write_pairwise, write_features
        self.boundary, self.examples_top = tuple(boundary), examples_top

    def expand(self, train_features):
        return train_features | "ScoreBlocks" >> beam.ParDo(
            _ScoreDoFn(self.k, self.write_pairwise, self.write_features, self.boundary,
                       self.examples_top),
            beam.pvalue.AsList(self.query_features)).with_outputs(
                "self", "pairwise", "features", "candidates", TIMING, main="topk")


def _topk_table(result, query_blocks):
    from influence_ops import schemas
    if result is None or result["pro_scores"].size == 0:
        return schemas.TOPK_SCHEMA.empty_table()
    qids, _ = query_matrix(query_blocks)
    return schemas.topk_table(qids, result)


class MergeTopK(beam.PTransform):
    """Per-block accumulators -> ``(table, k_exceeds_half)``: one pyarrow table (query_id,
    rank, train_id, score, kind) and a one-element flag, True when ``2 k`` exceeds the
    training examples scored, i.e. each query's two lists share examples (the last step
    records it in the manifest and warns).

    No ``with_fanout``: the runner already combines each bundle's partials where they are
    made (combiner lifting), so a fan-out only adds a shuffle, and inside a bundle it splits
    the running lists 16 ways, each paying for its own first blocks (2-3x the top-k cost in
    ``benchmarks/bench_topk.py``)."""

    def __init__(self, query_features, k: int):
        super().__init__()
        self.query_features, self.k = query_features, k

    def expand(self, partials):
        from influence_ops.combiners import TopKCombiner
        merged = (partials
                  | "Merge" >> beam.CombineGlobally(BeamCombineFn(TopKCombiner(self.k))))
        table = merged | "ToTable" >> beam.Map(_topk_table,
                                               beam.pvalue.AsList(self.query_features))
        flag = merged | "KExceedsHalf" >> beam.Map(
            lambda r: bool(r is not None and r.get("k_exceeds_half")))
        return table, flag
