"""The inputs of selected examples, for people and for the audit's spot check.

``--examples_top=N`` writes ``examples/``: the raw inputs (with given and predicted labels) of
the N training examples of highest self-influence, of the first ``EXPLAIN_QUERIES`` queries
(in id order) and of their top-k proponents and opponents. ``--sample_rows=S`` writes
``sample/``: the S training rows with the smallest id hash
(``influence_ops.audit.uniform_from_ids`` with ``--seed``).

Selections are made without side inputs over the raw data (a side input computed from the
scores would make the raw blocks wait for their own scores): each block offers candidates
(its own N highest self-influence rows, its own k best and worst rows per explain query, its
S smallest hashes) and a global top per selection keeps the winners. The same property makes
the selections merge across audit runs: the N highest of a union are among the N highest of
its parts, so an incremental audit keeps them exact without rereading old partitions.

Cost: the raw inputs travel with the train feature blocks from Featurize to Score (only when
``--examples_top`` is set), and a few candidate rows per block.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np

from pipelines.blocks import Block, FeatureBlock
from pipelines.worker import ModelDoFn

EXPLAIN_QUERIES = 16   # queries whose examples (and listed train examples) are written
CANDIDATES = "candidates"


def _rows(fb: FeatureBlock, idx, role: str):
    from influence_ops.schemas import examples_table
    idx = np.asarray(idx)
    return examples_table(fb.ids[idx], role, fb.x[idx], fb.y[idx], fb.labels[idx],
                          fb.predicted[idx])


def train_candidates(fb: FeatureBlock, top: int, k: int, qids=None, S=None):
    """Candidate rows of one train feature block: ``(key, value, id, table)`` with ``key``
    ``"self"`` (value = self-influence) or ``(query_id, kind)`` (value = score, or minus the
    score for opponents); ``S`` holds the block's scores against the explain queries."""
    n = len(fb)
    tables = {}  # one row table per candidate row, whatever lists it is a candidate of

    def table_of(i):
        if i not in tables:
            tables[i] = _rows(fb, [i], "train")
        return tables[i]
    if top and n:
        for i in np.argsort(-np.asarray(fb.self_scores), kind="stable")[:top]:
            yield ("self", float(fb.self_scores[i]), str(fb.ids[i]), table_of(int(i)))
    if S is not None and n:
        kk = min(k, n)
        for j, qid in enumerate(qids[:EXPLAIN_QUERIES]):
            row = S[j]
            for kind, val in (("proponent", row), ("opponent", -row)):
                for i in np.argpartition(-val, kk - 1)[:kk]:
                    yield ((str(qid), kind), float(val[i]), str(fb.ids[i]), table_of(int(i)))


def query_candidates(fb: FeatureBlock):
    """The block's ``EXPLAIN_QUERIES`` smallest query ids, as candidate rows."""
    order = np.argsort(fb.ids.astype(str), kind="stable")[:EXPLAIN_QUERIES]
    for i in order:
        yield ("query", 0.0, str(fb.ids[i]), _rows(fb, [i], "query"))


def _winners(kv, top: int, k: int):
    key, items = kv
    n = top if key == "self" else (EXPLAIN_QUERIES if key == "query" else k)
    if key == "query":  # the smallest ids
        chosen = sorted(items, key=lambda t: t[1])[:n]
    else:               # the largest values, ties by id
        chosen = sorted(items, key=lambda t: (-t[0], t[1]))[:n]
    for _, i, table in chosen:
        yield i, table


def _one_table(pairs):
    import pyarrow as pa
    from influence_ops.schemas import EXAMPLES_SCHEMA
    seen, tables = set(), []
    for i, table in sorted(pairs, key=lambda p: p[0]):
        key = (i, table.column("role")[0].as_py())
        if key not in seen:
            seen.add(key)
            tables.append(table)
    return pa.concat_tables(tables) if tables else EXAMPLES_SCHEMA.empty_table()


class _Sample(ModelDoFn):
    """Blocks -> (hash, id, table of one row) for the block's ``size`` smallest id hashes."""

    def __init__(self, config, size: int):
        super().__init__(config)
        self.size = size

    def process(self, block: Block):
        from influence_ops import gradients as G
        from influence_ops.schemas import examples_table, labels_as_strings
        from influence_ops.audit import uniform_from_ids
        imodel = self.loaded().imodel
        u = uniform_from_ids(block.ids, self.config.seed)
        keep = np.sort(np.argsort(u, kind="stable")[:self.size])
        sub = block.take(keep)
        y = imodel.normalize_labels(sub.y)
        _, outputs = G.losses_and_outputs(imodel, sub.x, sub.method_labels(imodel))
        predicted, _ = G.predicted_labels(imodel, outputs, y)
        table = examples_table(sub.ids, "sample", sub.x, y, labels_as_strings(y),
                               labels_as_strings(predicted))
        for j, i in enumerate(keep):
            yield float(u[i]), str(sub.ids[j]), table.slice(j, 1)


def example_tables(config, train, candidates, query_f) -> dict:
    """``{"examples": tables, "sample": tables}`` (those asked for) as PCollections.

    ``candidates``: the Score stage's candidate rows (:func:`train_candidates`)."""
    import pyarrow as pa
    out = {}
    if config.examples_top:
        top, k = config.examples_top, config.k
        q = query_f | "ExQueryCandidates" >> beam.FlatMap(query_candidates)
        out["examples"] = ((candidates, q) | "ExAllCandidates" >> beam.Flatten()
                           | "ExByKey" >> beam.Map(lambda t: (t[0], (t[1], t[2], t[3])))
                           | "ExPerKey" >> beam.GroupByKey()
                           | "ExWinners" >> beam.FlatMap(_winners, top, k)
                           | "ExGather" >> beam.combiners.ToList()
                           | "ExOneTable" >> beam.Map(_one_table))
    if config.sample_rows:
        s = config.sample_rows
        out["sample"] = (train
                         | "ExSampleBlocks" >> beam.ParDo(_Sample(config, s))
                         | "ExSampleSmallest" >> beam.combiners.Top.Of(
                             s, key=lambda t: (t[0], t[1]), reverse=True)
                         | "ExSampleTable" >> beam.Map(
                             lambda items: pa.concat_tables([t for _, _, t in items])
                             if items else None)
                         | "ExSampleNonEmpty" >> beam.Filter(lambda t: t is not None))
    return out
