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
    """The job's check of every example against the model, before anything fits.

    * A block whose examples cannot go into the model at all (another feature shape, labels
      of the wrong kind or width for the loss: ``InfluenceModel.example_problems``) fails the
      job with one sentence naming the file; the driver made the same check on the first
      examples before the job started.
    * Rows whose label does not fit the loss are dead-lettered (``InfluenceModel.
      label_problems``), stage ``check``.
    * Rows whose loss is not finite (inputs that overflow the model) are dead-lettered, stage
      ``check``: their gradients would be NaN or infinite and would poison the fit.
    """

    def __init__(self, config):
        super().__init__(config)
        self.dead = beam.metrics.Metrics.counter(NAMESPACE, "examples_dead_lettered")

    def process(self, block: Block):
        from influence_ops import gradients as G
        from pipelines.read import SourceError
        imodel = self.loaded().imodel
        problem = imodel.example_problems(block.x, block.y)
        if problem:
            raise SourceError(f"{block.source} (example {block.ids[0]}): {problem}")
        bad = imodel.label_problems(block.y)
        if bad.any():
            self.dead.inc(int(bad.sum()))
            yield from dead_rows(block, bad, lambda i: (
                f"bad label {block.y[i]!r} for a {imodel.label_mode} loss with "
                f"{imodel.n_outputs} outputs"), stage="check")
            block = block.take(~bad)
        if not len(block):
            return
        losses = G.per_example_losses(imodel, block.x, imodel.normalize_labels(block.y))
        finite = np.isfinite(losses)
        if not finite.all():
            self.dead.inc(int((~finite).sum()))
            yield from dead_rows(block, ~finite, lambda i: (
                f"non-finite loss ({losses[i]}) at the model's output: its gradient would be "
                "NaN or infinite (inputs that overflow the model?)"), stage="check")
            block = block.take(finite)
        if len(block):
            yield block


def _nonfinite_rows(*arrays) -> np.ndarray:
    """``(n,)`` True where any of the per-row arrays (None skipped) holds NaN or inf."""
    bad = None
    for a in arrays:
        if a is None:
            continue
        a = np.asarray(a, dtype=np.float64)
        rows = ~np.isfinite(a.reshape(len(a), -1)).all(axis=1)
        bad = rows if bad is None else bad | rows
    return bad


class _FeaturizeDoFn(ModelDoFn):
    """Blocks -> FeatureBlocks: projected per-example gradients (phi, psi), self-influence, loss."""

    def __init__(self, config, role: str):
        super().__init__(config)
        self.role = role
        self.count = beam.metrics.Metrics.counter(NAMESPACE, f"{role}_examples_featurized")
        self.dead = beam.metrics.Metrics.counter(NAMESPACE, "examples_dead_lettered")
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
            losses, outputs = G.losses_and_outputs(imodel, block.x, y)
            predicted, confidence = G.predicted_labels(imodel, outputs, y)
            extra = {}
            if self.config.boundary != "none":
                from influence_ops import boundary
                for name in self.config.boundary_columns:
                    extra[name] = getattr(boundary, name)(imodel, block.x)
            out = FeatureBlock(block.ids, phi, labels, self_scores, losses, block.group, psi,
                               labels_as_strings(predicted), confidence,
                               np.full(len(block), block.source or ""), extra)
            if self.config.examples_top:
                out.x, out.y = block.x, y
            bad = _nonfinite_rows(phi, psi, self_scores, losses)
        else:
            psi = method.query_features(block.x, y, block.ids)
            out = FeatureBlock(block.ids, psi, labels)
            if self.config.examples_top:
                _, outputs = G.losses_and_outputs(imodel, block.x, y)
                out.predicted = labels_as_strings(G.predicted_labels(imodel, outputs, y)[0])
                out.x, out.y = block.x, y
            bad = _nonfinite_rows(psi)
        if bad is not None and bad.any():
            # One example's NaN / inf gradient features must not take the job (or the scores
            # of every query) with it: dead-letter the example, score the rest.
            yield from dead_rows(block, bad, "non-finite gradient features, self-influence or "
                                 "loss (NaN or inf)", stage="featurize")
            self.dead.inc(int(bad.sum()))
            out = _take_features(out, ~bad)
        self.count.inc(len(out))
        self._n += len(out)
        sec = time.time() - t
        self.ms.update(int(sec * 1000))
        yield timing(f"featurize_{self.role}", sec)
        if len(out):
            yield out


def _take_features(fb: FeatureBlock, keep: np.ndarray) -> FeatureBlock:
    def take(a):
        return None if a is None else np.asarray(a)[keep]
    return FeatureBlock(fb.ids[keep], take(fb.features), take(fb.labels), take(fb.self_scores),
                        take(fb.losses), take(fb.group), take(fb.self_features),
                        take(fb.predicted), take(fb.confidence), take(fb.partition),
                        None if fb.extra is None else {k: take(v) for k, v in fb.extra.items()},
                        take(fb.x), take(fb.y))


class Featurize(beam.PTransform):
    """``blocks -> (FeatureBlocks, timings, dead letters)`` with the fitted artifact as a
    singleton side input.

    Blocks arrive checked (``ValidateLabels``); a row whose features come out non-finite is
    dead-lettered here (stage ``featurize``)."""

    def __init__(self, config, artifact, role: str):
        super().__init__()
        self.config, self.artifact, self.role = config, artifact, role

    def expand(self, blocks):
        res = blocks | "Featurize" >> beam.ParDo(
            _FeaturizeDoFn(self.config, self.role), beam.pvalue.AsSingleton(self.artifact)
        ).with_outputs(TIMING, DEAD, main="features")
        return res.features, res[TIMING], res[DEAD]


def validate_labels(blocks, config, label: str):
    """``blocks -> (checked blocks, dead letters)`` (:class:`ValidateLabels`)."""
    res = blocks | label >> beam.ParDo(ValidateLabels(config)).with_outputs(DEAD, main="blocks")
    return res.blocks, res[DEAD]
