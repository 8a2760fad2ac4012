"""Stage 2, the reduce step: fit the method once and write its artifact (DESIGN step 2).

A method that offers a combiner (e.g. the exact Hessian as a distributed sum) is fitted from
all training blocks by that combiner; any other fits on a deterministic sample of the
training set gathered on one worker (``--fit_sample_size``, by id hash, independent of the
runner). The output is the artifact's **path**, a one-element PCollection that downstream
stages take as a singleton side input.
"""

from __future__ import annotations

import logging
import time
from typing import List

import apache_beam as beam
import numpy as np

from influence_ops.audit import uniform_from_ids
from pipelines.blocks import Block, concat
from pipelines.combine import BeamCombineFn
from pipelines.constants import NAMESPACE
from pipelines.worker import ModelDoFn, acquire, configure_worker

log = logging.getLogger(__name__)


class SmallestHashes(beam.CombineFn):
    """The ``size`` rows with the smallest id hashes (``uniform_from_ids``), ties by id, as
    one Block (None when no row came); ``size <= 0`` keeps every row.

    Needs no row count up front, so the training blocks reach it without waiting on a side
    input (which would make the runner buffer all of them): memory is about ``1.5 * size``
    rows per accumulator. Once an accumulator holds ``size`` rows, only rows under its
    current threshold are kept."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed

    def create_accumulator(self):
        return [[], 0, None]   # blocks, rows held, threshold (the size-th smallest draw)

    def _trim(self, acc):
        blocks, rows, _ = acc
        if self.size <= 0 or rows <= self.size:
            return acc
        b = concat(blocks)
        u = uniform_from_ids(b.ids, self.seed)
        keep = np.lexsort((b.ids, u))[:self.size]   # by draw, ties by id
        keep.sort()
        b = b.take(keep)
        return [[b], len(b), float(u[keep].max())]

    def add_input(self, acc, block: Block):
        if not len(block):
            return acc
        if acc[2] is not None:
            below = uniform_from_ids(block.ids, self.seed) <= acc[2]
            if not below.any():
                return acc
            block = block.take(below)
        acc[0].append(block)
        acc[1] += len(block)
        if self.size > 0 and acc[1] >= self.size + self.size // 2:
            acc = self._trim(acc)
        return acc

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for a in accs:
            out[0].extend(a[0])
            out[1] += a[1]
            if self.size > 0 and out[1] >= self.size + self.size // 2:
                out = self._trim(out)
        return out

    def compact(self, acc):
        return self._trim(acc)

    def extract_output(self, acc):
        acc = self._trim(acc)
        return concat(acc[0]) if acc[1] else None


def final_sample(blocks: List[Block], size: int, seed: int) -> Block:
    """The fit sample in canonical (id) order: exactly ``size`` rows when there are more."""
    if not any(len(b) for b in blocks):
        raise ValueError("no training examples to fit on: --train is empty or every row was "
                         "dead-lettered")
    b = concat(blocks)
    order = np.argsort(b.ids, kind="stable")  # canonical order: independent of the runner
    b = b.take(order)
    if 0 < size < len(b):
        u = uniform_from_ids(b.ids, seed)
        keep = np.sort(np.argsort(u, kind="stable")[:size])
        b = b.take(keep)
    return b


class _FitDoFn(ModelDoFn):
    """Fits the method (from a sample, or from its combiner's output) and writes the artifact."""

    def __init__(self, config, artifact_dir: str):
        super().__init__(config)
        self.artifact_dir = artifact_dir

    def process(self, payload, queries, guard=None):
        from influence_ops import artifacts
        from influence_ops.api import build_method
        check_guard(guard)
        t0 = time.time()
        imodel = self.loaded().imodel
        method = build_method(imodel, self.config)
        kind, data = payload
        if kind == "combined":
            log.info("fit: %s from its combiner over all training blocks", self.config.method)
            method.fit_from_combined(data)
        else:
            data, total = data
            sample = final_sample([data] if data is not None else [],
                                  self.config.fit_sample_size, self.config.seed)
            log.info("fit: %s on a sample of %d examples", self.config.method, len(sample))
            y = sample.method_labels(imodel)
            if method.needs_queries and any(len(b) for b in queries):
                q = concat(queries)
                q = q.take(np.argsort(q.ids, kind="stable"))
                method.fit(sample.x, y, q.x, q.method_labels(imodel), q.ids)
            else:
                method.fit(sample.x, y)
            if getattr(method, "n_train", None) is not None:
                # The training-set size of the objective (the leave-one-out correction's n),
                # not the sample's.
                method.n_train = int(total)
        sec = time.time() - t0
        extra = {"fit_seconds": round(sec, 3)}
        if imodel.sample_weighted:  # loads weighted (InfluenceCalculator.load, --artifact)
            extra["sample_weighted"] = True
        artifacts.save_method(method, self.config, self.artifact_dir, extra=extra)
        beam.metrics.Metrics.distribution(NAMESPACE, "fit_ms").update(int(sec * 1000))
        log.info("fit: artifact written to %s in %.1fs", self.artifact_dir, sec)
        yield self.artifact_dir


def _reuse(guard, artifact: str) -> str:
    check_guard(guard)
    log.info("fit: reusing the fitted method at %s (--artifact)", artifact)
    return artifact


def check_guard(guard) -> None:
    """Refuses to fit (the expensive part) on input that cannot give a valid result: duplicate
    ids, or no training example left after the checks (the message says why rows were
    rejected: the dead-letter table is only written at the end)."""
    if not guard:
        return
    from pipelines.finalize import RunError, describe_dead
    if guard.get("problems"):
        raise RunError("; ".join(guard["problems"]))
    if guard.get("train_ok") == 0:
        why = describe_dead(guard.get("dead"))
        raise RunError("no training examples to fit on: "
                       + (f"every row of --train was rejected ({why})" if why else
                          "--train is empty"))


def _guarded(block, guard):
    check_guard(guard)
    return block


class _ModelFactory:
    """A picklable ``() -> InfluenceModel`` for combiners (the worker's shared model)."""

    def __init__(self, config):
        self.config = config

    def __call__(self):
        configure_worker(self.config)
        return acquire(self.config).imodel


def _combine_element(block: Block, weighted=None):
    """A training block as a fit combiner's ``(x, y)`` element. ``weighted``: the model
    factory of a ``--weight_key`` job, whose labels are packed with the rows' weights."""
    if weighted is None:
        return block.x, block.y
    return block.x, block.method_labels(weighted())


class FitMethod(beam.PTransform):
    """``blocks -> artifact path`` (a one-element PCollection used as a singleton side input)."""

    def __init__(self, config, artifact_dir: str, queries=None, guard=None, read=None):
        """``guard``: an optional one-element PCollection ``{"problems": [...], "train_ok":
        n, "dead": summary}`` checked before fitting (:func:`check_guard`). ``read``: the
        training input's ``ReadExamples``; when given, a combiner's later passes read it
        again (``featurize.ReadChecked``) instead of waiting with every block buffered."""
        super().__init__()
        self.config, self.artifact_dir, self.queries = config, artifact_dir, queries
        self.guard, self.read = guard, read

    def expand(self, blocks):
        from influence_ops import registry
        config = self.config
        guard = self.guard if self.guard is not None else (
            blocks.pipeline | "NoGuard" >> beam.Create([{}]))
        if config.artifact:
            # --artifact: a method fitted by an earlier run (checked on the driver); the same
            # guard still holds back every later stage.
            return guard | "Reuse" >> beam.Map(_reuse, config.artifact)
        # The guard is checked by the fit step, not on the blocks: a side input on the
        # training blocks would make the runner buffer all of them until it is ready (the
        # job's memory would grow with the training set). So on input the fit refuses
        # (duplicate ids, nothing left), an all-data combiner has summed over it first.
        combiner = registry.get_method(config.method).combiner(config, _ModelFactory(config))
        if combiner is not None:
            # One combine per pass over all training blocks; a later pass receives the
            # previous pass's output as a side input keyword (EK-FAC: factors, then the
            # eigenvalue correction in their eigenbasis).
            passes = combiner if isinstance(combiner, (list, tuple)) else [combiner]
            weighted = _ModelFactory(config) if config.weight_key else None
            elements = blocks | "Elements" >> beam.Map(_combine_element, weighted)
            out = None
            for i, comb in enumerate(passes):
                side = {} if out is None else {
                    getattr(comb, "previous_keyword", "previous"): beam.pvalue.AsSingleton(out)}
                source = elements
                if out is not None and self.read is not None:
                    # A later pass waits on the previous one: its input is read again (the
                    # file elements wait, not the blocks).
                    from pipelines.featurize import ReadChecked
                    source = (blocks.pipeline | f"Reread{i + 1}" >> ReadChecked(
                        self.read, config, out)
                        | f"Elements{i + 1}" >> beam.Map(_combine_element, weighted))
                out = source | f"Combine{'' if i == 0 else i + 1}" >> beam.CombineGlobally(
                    BeamCombineFn(comb), **side)
            payload = out | "Tag" >> beam.Map(lambda out: ("combined", out))
        else:
            total = (blocks | "Count" >> beam.Map(len)
                     | "Total" >> beam.CombineGlobally(sum))
            payload = (blocks
                       | "Sample" >> beam.CombineGlobally(
                           SmallestHashes(config.fit_sample_size, config.seed))
                       | "Tag" >> beam.Map(lambda b, n: ("sample", (b, n)),
                                         beam.pvalue.AsSingleton(total)))
        queries = self.queries if self.queries is not None else (
            blocks.pipeline | "NoQueries" >> beam.Create([]))
        return payload | "Fit" >> beam.ParDo(_FitDoFn(config, self.artifact_dir),
                                              beam.pvalue.AsList(queries),
                                              beam.pvalue.AsSingleton(guard))
