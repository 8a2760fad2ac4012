"""Group influence stages (``--group_key``): first order as sums of feature maps, second
order (Basu et al. 2020) in two combine passes per group. The arithmetic lives in
``influence_ops.groups``; these stages only distribute it."""

from __future__ import annotations

import apache_beam as beam
import numpy as np

from pipelines.blocks import Block, FeatureBlock, concat
from pipelines.combine import BeamCombineFn
from pipelines.score import query_matrix
from pipelines.worker import ModelDoFn


def _keyed_sums(group_ids, *arrays):
    """``(group id, [sum of each array over the group's rows..., count])`` for one block."""
    from influence_ops.groups import per_group_sums
    if group_ids is None:
        raise ValueError("--group_key is set but the examples carry no group column")
    uniq, sums, counts = per_group_sums(group_ids, *arrays)
    for j, g in enumerate(uniq.tolist()):
        yield str(g), [s[j] for s in sums] + [float(counts[j])]


def _combine_per_group():
    from influence_ops.combiners import ArraySumCombiner
    return beam.CombinePerKey(BeamCombineFn(ArraySumCombiner()))


def _first_order_sums(fb: FeatureBlock):
    # An unfactored curvature (CG / LiSSA) has no query-side map for training examples:
    # group self-influence would need one solve per group; it is written as null (NaN here).
    psi = (fb.self_features if fb.self_features is not None
           else np.full_like(fb.features, np.nan))
    yield from _keyed_sums(fb.group, fb.features, psi)


def _first_order_tables(items, query_blocks):
    import pyarrow as pa
    from influence_ops import schemas
    qids, Q = query_matrix(query_blocks)
    items = sorted(items)
    gids = np.array([g for g, _ in items]).astype(str)
    phi = np.stack([v[0] for _, v in items])
    psi = np.stack([v[1] for _, v in items])
    size = np.array([v[2] for _, v in items], dtype=np.int64)
    S = Q @ phi.T
    m, G = S.shape
    scores = pa.table({"query_id": np.repeat(qids.astype(str), G),
                       "group_id": np.tile(gids, m), "score": S.reshape(-1),
                       "order": np.ones(m * G, np.int32)}, schema=schemas.GROUP_SCHEMA)
    self_scores = np.sum(phi * psi, axis=1)
    selfs = pa.table({"group_id": gids,
                      "score": pa.array(self_scores, mask=np.isnan(self_scores)),
                      "size": size}, schema=schemas.GROUP_SELF_SCHEMA)
    return scores, selfs


class FirstOrderGroups(beam.PTransform):
    """``train FeatureBlocks -> (group table, group self table)`` (sums of feature maps)."""

    def __init__(self, query_features):
        super().__init__()
        self.query_features = query_features

    def expand(self, train_features):
        both = (train_features | "GroupSums" >> beam.FlatMap(_first_order_sums)
                | "CombineGroups" >> _combine_per_group()
                | "AllGroups" >> beam.combiners.ToList()
                | "GroupTables" >> beam.Map(_first_order_tables,
                                            beam.pvalue.AsList(self.query_features)))
        return (both | "Scores" >> beam.Map(lambda t: t[0]),
                both | "Selfs" >> beam.Map(lambda t: t[1]))


class _GradientSums(ModelDoFn):
    """Pass 1 per block: ``(group, [sum of member gradients, count])``."""

    def process(self, block: Block, artifact):
        from influence_ops import gradients as G
        im = self.loaded(artifact).imodel
        g = G.per_example_gradients(im, block.x, im.normalize_labels(block.y),
                                    self.config.batch_size)
        yield from _keyed_sums(block.group, g)


class _SolveFirst(ModelDoFn):
    """``v1 = H^-1 g_U`` per group."""

    def process(self, kv, artifact):
        gid, (gsum, count) = kv
        yield gid, (self.loaded(artifact).method.solve(gsum[None, :])[0], count)


class _MemberHVPs(ModelDoFn):
    """Pass 2 per block: ``(group, [sum of member Hessian-vector products along v1])``."""

    def process(self, block: Block, artifact, v1s):
        from influence_ops import gradients as G
        im = self.loaded(artifact).imodel
        y = im.normalize_labels(block.y)
        for gid in np.unique(block.group).tolist():
            mask = block.group == gid
            hv = G.hessian_vector_products(im, block.x[mask], y[mask], v1s[str(gid)][0][None, :],
                                           include_l2=False, reduce="sum")[0]
            yield str(gid), [hv]


class _GroupVector(ModelDoFn):
    """``v_U`` from ``v1``, the members' HVP sum and the group size."""

    def process(self, kv, artifact, n_train):
        from influence_ops.groups import combine_second_order
        gid, parts = kv
        (v1, count), = parts["v1"]
        (hv,), = parts["hv"]
        v2 = self.loaded(artifact).method.solve(hv[None, :])[0]
        yield gid, combine_second_order(v1, v2, int(count), n_train)


class _SecondOrderTable(ModelDoFn):
    """All groups' vectors against the query gradients (computed once) -> one table."""

    def process(self, vectors, artifact, query_blocks):
        import pyarrow as pa
        from influence_ops import gradients as G, schemas
        if not vectors:
            yield schemas.GROUP_SCHEMA.empty_table()
            return
        im = self.loaded(artifact).imodel
        q = concat(query_blocks)
        q = q.take(np.argsort(q.ids, kind="stable"))
        gq = G.per_example_gradients(im, q.x, im.normalize_labels(q.y)).astype(np.float64)
        vectors = sorted(vectors)
        gids = [g for g, _ in vectors]
        S = gq @ np.stack([v for _, v in vectors]).T  # (m, G)
        m, n_groups = S.shape
        yield pa.table({"query_id": np.tile(q.ids.astype(str), n_groups),
                        "group_id": np.repeat(np.array(gids).astype(str), m),
                        "score": S.T.reshape(-1), "order": np.full(m * n_groups, 2, np.int32)},
                       schema=schemas.GROUP_SCHEMA)


class SecondOrderGroups(beam.PTransform):
    """Basu et al. (2020) second-order group influence in two combine passes per group.

    Pass 1: ``g_U = sum of member gradients`` (CombinePerKey), ``v1 = H^-1 g_U``. Pass 2: member
    Hessian-vector products along v1 (CombinePerKey), ``v2 = H^-1 H_U v1``. Then
    ``v_U = (1-2p)/(1-p)^2 v1 + v2 / ((1-p)^2 n)`` (``influence_ops.groups``) and
    ``score = g_test^T v_U`` for all groups at once. Needs d-dimensional vectors per group:
    modest d and a modest number of groups.
    """

    def __init__(self, config, artifact, query_blocks, n_train, read=None):
        """``read``: the training input's ``ReadExamples``; when given, pass 2 reads it again
        once the v1 are solved (``featurize.ReadChecked``) instead of consuming
        ``train_blocks`` a second time (which the runner would buffer whole until then)."""
        super().__init__()
        self.config, self.artifact = config, artifact
        self.query_blocks, self.n_train, self.read = query_blocks, n_train, read

    def expand(self, train_blocks):
        art = beam.pvalue.AsSingleton(self.artifact)
        v1 = (train_blocks | "GradSums" >> beam.ParDo(_GradientSums(self.config), art)
              | "CombineGrads" >> _combine_per_group()
              | "SolveV1" >> beam.ParDo(_SolveFirst(self.config), art))
        again = train_blocks
        if self.read is not None:
            from pipelines.featurize import ReadChecked
            again = train_blocks.pipeline | "Reread" >> ReadChecked(self.read, self.config, v1)
        hv = (again
              | "MemberHVPs" >> beam.ParDo(_MemberHVPs(self.config), art,
                                           beam.pvalue.AsDict(v1))
              | "CombineHVPs" >> _combine_per_group())
        return ({"v1": v1, "hv": hv} | "Join" >> beam.CoGroupByKey()
                | "GroupVectors" >> beam.ParDo(_GroupVector(self.config), art,
                                               beam.pvalue.AsSingleton(self.n_train))
                | "AllVectors" >> beam.combiners.ToList()
                | "Scores" >> beam.ParDo(_SecondOrderTable(self.config), art,
                                         beam.pvalue.AsList(self.query_blocks)))
