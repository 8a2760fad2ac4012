"""Newton group influence stage (``--group_key=... --group_order=newton``).

Per group, one ``CombinePerKey`` sums the members' gradients and their explicit ``d x d``
per-example Hessians (one pass over the training blocks); then, on one worker, the Hessian of
all rows is the sum of the groups', each group gets one ``d x d`` solve (the Newton step on the
objective without it), and every query is scored against every group with its gradient and
loss-Hessian factors. The arithmetic lives in ``influence_ops.groups``
(``newton_group_vector``, ``newton_scores_from_vectors``); the ``order`` column holds 3.
Accumulators are ``O(d^2)`` per group: modest d (the last layer) and a modest number of groups.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np

from pipelines.blocks import Block, concat
from pipelines.combine import BeamCombineFn
from pipelines.worker import ModelDoFn

NEWTON_ORDER = 3  # the value of the groups table's int32 `order` column for order "newton"


class _GroupGradientAndHessianSums(ModelDoFn):
    """Per block: ``(group, [sum of member gradients (d,), sum of member Hessians (d, d),
    count])``."""

    def process(self, block: Block, artifact):
        from influence_ops.groups import newton_group_sums
        if block.group is None:
            raise ValueError("--group_key is set but the examples carry no group column")
        im = self.loaded(artifact).imodel
        uniq, gs, hs, counts = newton_group_sums(im, block.x, im.normalize_labels(block.y),
                                                 block.group)
        for j, g in enumerate(uniq.tolist()):
            yield str(g), [gs[j], hs[j], float(counts[j])]


class _NewtonTable(ModelDoFn):
    """All groups' sums -> one Newton step per group -> the (query, group) table."""

    def process(self, items, artifact, query_blocks):
        import pyarrow as pa
        from influence_ops import groups as G, schemas
        if not items:
            yield schemas.GROUP_SCHEMA.empty_table()
            return
        im = self.loaded(artifact).imodel
        items = sorted(items, key=lambda kv: kv[0])
        gids = [g for g, _ in items]
        total = np.sum([v[1] for _, v in items], axis=0)
        n = int(round(sum(float(v[2]) for _, v in items)))
        theta = im.get_flat_params().astype(np.float64)
        V = np.stack([G.newton_group_vector(total, n, h, g, int(round(float(c))), im.l2_vector, theta,
                                            self.config.damping) for _, (g, h, c) in items])
        q = concat(query_blocks)
        q = q.take(np.argsort(q.ids, kind="stable"))
        S = G.newton_scores_from_vectors(V, n, *G.query_terms(im, q.x,
                                                                im.normalize_labels(q.y)))
        m, n_groups = S.shape
        yield pa.table({"query_id": np.tile(q.ids.astype(str), n_groups),
                        "group_id": np.repeat(np.array(gids).astype(str), m),
                        "score": S.T.reshape(-1),
                        "order": np.full(m * n_groups, NEWTON_ORDER, np.int32)},
                       schema=schemas.GROUP_SCHEMA)


class NewtonGroups(beam.PTransform):
    """``train blocks -> group table`` of Newton group influence (see the module docstring)."""

    def __init__(self, config, artifact, query_blocks):
        super().__init__()
        self.config, self.artifact, self.query_blocks = config, artifact, query_blocks

    def expand(self, train_blocks):
        from influence_ops.combiners import ArraySumCombiner
        art = beam.pvalue.AsSingleton(self.artifact)
        return (train_blocks
                | "GradHessSums" >> beam.ParDo(_GroupGradientAndHessianSums(self.config), art)
                | "CombineGroups" >> beam.CombinePerKey(BeamCombineFn(ArraySumCombiner()))
                | "AllGroups" >> beam.combiners.ToList()
                | "NewtonScores" >> beam.ParDo(_NewtonTable(self.config), art,
                                               beam.pvalue.AsList(self.query_blocks)))
