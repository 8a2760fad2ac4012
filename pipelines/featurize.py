"""Label checks and stage 3, featurize: blocks of examples -> feature blocks (DESIGN step 3).

Featurize runs the model on workers: projected per-example gradients for both feature maps
(phi, psi), self-influence and per-example losses in one pass; full per-example gradients
never leave the worker that computed them.
"""

from __future__ import annotations

import logging
import time

import apache_beam as beam
import numpy as np

from pipelines.blocks import Block, FeatureBlock, dead_rows, timing
from pipelines.constants import DEAD, NAMESPACE, TIMING
from pipelines.worker import ModelDoFn

log = logging.getLogger(__name__)


class ValidateLabels(ModelDoFn):
    """Dead-letters rows whose label does not fit the model's loss, before anything fits
    (``InfluenceModel.label_problems`` decides)."""

    def __init__(self, config):
        super().__init__(config)
        self.dead = beam.metrics.Metrics.counter(NAMESPACE, "examples_dead_lettered")

    def process(self, block: Block):
        imodel = self.loaded().imodel
        bad = imodel.label_problems(block.y)
        if bad.any():
            self.dead.inc(int(bad.sum()))
            yield from dead_rows(block, bad, lambda i: (
                f"bad label {block.y[i]!r} for a {imodel.label_mode} loss with "
                f"{imodel.n_outputs} outputs"))
            block = block.take(~bad)
        if len(block):
            yield block


class _FeaturizeDoFn(ModelDoFn):
    """Blocks -> FeatureBlocks: projected per-example gradients (phi, psi), self-influence, loss."""

    def __init__(self, config, role: str):
        super().__init__(config)
        self.role = role
        self.count = beam.metrics.Metrics.counter(NAMESPACE, f"{role}_examples_featurized")
        self.ms = beam.metrics.Metrics.distribution(NAMESPACE, f"featurize_{role}_block_ms")

    def start_bundle(self):
        super().start_bundle()
        self._n = 0

    def finish_bundle(self):
        if self._n:
            log.info("featurize[%s]: %d examples in this bundle", self.role, self._n)

    def process(self, block: Block, artifact: str):
        from influence_ops import gradients as G
        from influence_ops.schemas import labels_as_strings
        t = time.time()
        loaded = self.loaded(artifact)
        imodel, method = loaded.imodel, loaded.method
        y = imodel.normalize_labels(block.y)  # bad labels were dead-lettered before the fit
        labels = labels_as_strings(y)
        if self.role == "train":
            phi, psi, self_scores = method.featurize_train(block.x, y)
            losses = G.per_example_losses(imodel, block.x, y)
            out = FeatureBlock(block.ids, phi, labels, self_scores, losses, block.group, psi)
        else:
            psi = method.query_features(block.x, y, block.ids)
            out = FeatureBlock(block.ids, psi, labels)
        self.count.inc(len(block))
        self._n += len(block)
        sec = time.time() - t
        self.ms.update(int(sec * 1000))
        yield timing(f"featurize_{self.role}", sec)
        yield out


class Featurize(beam.PTransform):
    """``blocks -> (FeatureBlocks, timings)`` with the fitted artifact as a singleton side input.

    Blocks arrive label-checked (``ValidateLabels``), so every row is featurized."""

    def __init__(self, config, artifact, role: str):
        super().__init__()
        self.config, self.artifact, self.role = config, artifact, role

    def expand(self, blocks):
        res = blocks | "Featurize" >> beam.ParDo(
            _FeaturizeDoFn(self.config, self.role), beam.pvalue.AsSingleton(self.artifact)
        ).with_outputs(TIMING, main="features")
        return res.features, res[TIMING]


def validate_labels(blocks, config, label: str):
    """``blocks -> (checked blocks, dead letters)``."""
    res = blocks | label >> beam.ParDo(ValidateLabels(config)).with_outputs(DEAD, main="blocks")
    return res.blocks, res[DEAD]
