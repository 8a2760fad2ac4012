"""Label checks and stage 3, featurize: blocks of examples -> feature blocks (DESIGN step 3).

Featurize runs the model on workers: projected per-example gradients for both feature maps
(phi, psi), self-influence and per-example losses in one pass; full per-example gradients
never leave the worker that computed them.

Training examples are featurized in a second pass over the input (:class:`ReadAndFeaturize`):
the fitted artifact is a side input, and a main input waiting on a side input is buffered
whole by the runner, so what waits is the list of files (or TFDS shards), not the decoded
examples. Each file is read again, its rows checked again, and its blocks featurized as they
are decoded. Rows the first pass rejected (read errors, labels, non-finite losses) are dropped
silently there: the first pass's dead letters are their record. Queries are few and keep the
one-pass path (:class:`Featurize`).
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
        yield from check_block(self.loaded().imodel, block, self.dead)


def check_block(imodel, block: Block, dead=None):
    """:class:`ValidateLabels` on one block: yields the dead letters (stage ``check``) and
    then the block of rows that pass (if any). ``dead``: a counter of the rows rejected."""
    from influence_ops import gradients as G
    from pipelines.read import SourceError
    problem = imodel.example_problems(block.x, block.y)
    if problem:
        raise SourceError(f"{block.source} (example {block.ids[0]}): {problem}")
    bad = imodel.label_problems(block.y)
    if bad.any():
        if dead is not None:
            dead.inc(int(bad.sum()))
        yield from dead_rows(block, bad, lambda i: (
            f"bad label {block.y[i]!r} for a {imodel.label_mode} loss with "
            f"{imodel.n_outputs} outputs"), stage="check")
        block = block.take(~bad)
    if not len(block):
        return
    losses = G.per_example_losses(imodel, block.x, block.method_labels(imodel))
    finite = np.isfinite(losses)
    if not finite.all():
        if dead is not None:
            dead.inc(int((~finite).sum()))
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
        ym = block.method_labels(imodel)  # what the loss takes: weighted with --weight_key
        labels = labels_as_strings(y)
        if self.role == "train":
            # --weight_key: features, self-influence and loss are those of w_i l_i.
            with G.record_forward() as forward:
                phi, psi, self_scores = method.featurize_train(block.x, ym)
            if len(forward) == 1 and forward[0][0] is imodel and len(forward[0][1]) == len(block):
                _, losses, outputs = forward[0]   # the gradients' own forward pass
            else:
                losses, outputs = G.losses_and_outputs(imodel, block.x, ym)
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
            psi = method.query_features(block.x, ym, block.ids)
            out = FeatureBlock(block.ids, psi, labels)
            if self.config.examples_top:
                _, outputs = G.losses_and_outputs(imodel, block.x, ym)
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


class _Quiet:
    """A counter that counts nothing: the second pass must not count rows twice."""

    def inc(self, n=1):
        pass


def _quiet_reader(reader):
    """The reader and the row check of pass 1, for another pass: they count nothing."""
    from pipelines.read import ValidateBlocks
    reader.read_counter = reader.dead_counter = _Quiet()
    if hasattr(reader, "setup"):
        reader.setup()
    validate = ValidateBlocks()
    validate.bad = _Quiet()
    return reader, validate


def _checked_blocks(reader, validate, imodel, element):
    """The blocks of one file (or TFDS shard) that pass every check of pass 1 (reader,
    ``ValidateBlocks``, :func:`check_block`), as they are decoded; rejected rows are dropped
    without a dead letter (pass 1 wrote theirs)."""
    for out in reader.process(element):
        if not isinstance(out, Block):
            continue
        for valid in validate.process(out):
            if not isinstance(valid, Block):
                continue
            for block in check_block(imodel, valid):
                if isinstance(block, Block):
                    yield block


class _ReadFeaturizeDoFn(_FeaturizeDoFn):
    """Pass 2 over the training input: one file (or TFDS shard) element -> its feature blocks.

    Reads the file with the job's reader, drops the rows the first pass dead-lettered (reader
    and ``ValidateBlocks`` checks, :func:`check_block`) without emitting them again, and
    featurizes each block as it is decoded; only featurize-stage dead letters (non-finite
    features) are emitted. With ``emit_blocks`` the checked blocks also go to the ``blocks``
    output (for stages that need the raw examples after the fit: second-order and Newton
    group influence)."""

    def __init__(self, config, reader, emit_blocks: bool = False):
        super().__init__(config, "train")
        self.reader, self.emit_blocks = reader, emit_blocks

    def setup(self):
        super().setup()
        self.reader, self.validate = _quiet_reader(self.reader)

    def process(self, element, artifact: str):
        imodel = self.loaded(artifact).imodel
        for block in _checked_blocks(self.reader, self.validate, imodel, element):
            if self.emit_blocks:
                yield beam.pvalue.TaggedOutput(BLOCKS, block)
            yield from super().process(block, artifact)


class _ReadCheckedDoFn(ModelDoFn):
    """One file element -> its checked blocks, once ``wait`` (a side input) is ready."""

    def __init__(self, config, reader):
        super().__init__(config)
        self.reader = reader

    def setup(self):
        super().setup()
        self.reader, self.validate = _quiet_reader(self.reader)

    def process(self, element, wait=None):
        yield from _checked_blocks(self.reader, self.validate, self.loaded().imodel, element)


class ReadChecked(beam.PTransform):
    """``PBegin -> checked blocks``: another pass over the training input that starts when the
    PCollection ``wait`` is complete (a fit pass that needs the previous pass's output, group
    influence's second pass: the blocks are read again instead of being buffered until then)."""

    def __init__(self, read, config, wait):
        super().__init__()
        self.read, self.config, self.wait = read, config, wait

    def expand(self, pbegin):
        return (self.read.spread(pbegin)
                | "Read" >> beam.ParDo(_ReadCheckedDoFn(self.config, self.read.reader()),
                                       beam.pvalue.AsIter(self.wait)))


BLOCKS = "blocks"


class ReadAndFeaturize(beam.PTransform):
    """``PBegin -> (FeatureBlocks, timings, dead letters, checked blocks)``: the second pass
    over the training input (see the module docstring). ``read``: the first pass's
    :class:`pipelines.read.ReadExamples`, whose file / shard elements are read again.
    ``artifact``: the fitted artifact's path (a singleton side input). The checked blocks
    output is empty unless ``emit_blocks``."""

    def __init__(self, read, config, artifact, emit_blocks: bool = False):
        super().__init__()
        self.read, self.config, self.artifact = read, config, artifact
        self.emit_blocks = emit_blocks

    def expand(self, pbegin):
        res = (self.read.spread(pbegin)
               | "Featurize" >> beam.ParDo(
                   _ReadFeaturizeDoFn(self.config, self.read.reader(), self.emit_blocks),
                   beam.pvalue.AsSingleton(self.artifact)
               ).with_outputs(TIMING, DEAD, BLOCKS, main="features"))
        return res.features, res[TIMING], res[DEAD], res[BLOCKS]
