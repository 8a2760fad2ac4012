"""Beam-free combiners with ``CombineFn``'s own method names, wrapped once by ``pipelines``.

The protocol (tensorflow/transform and TFDV style)::

    create_accumulator() -> acc
    add_input(acc, element) -> acc            add_inputs(acc, elements) -> acc
    merge_accumulators(accs) -> acc           mutates and returns the first accumulator only
    compact(acc) -> acc                       extract_output(acc) -> result

Accumulators are O(model) or O(queries x k), never O(data). Combiners that need the model
take a factory (combiners are pickled to workers; Keras models are not) and build it lazily.
``pipelines.combine.BeamCombineFn`` turns any of them into a ``beam.CombineFn``; the unit
tests run them without Beam, split over blocks and merged in several orders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np

from influence_ops import gradients as grads
from influence_ops.model import InfluenceModel


class Combiner:
    """Base: ``add_inputs`` and ``merge_accumulators`` in terms of two primitives."""

    def create_accumulator(self):
        raise NotImplementedError

    def add_input(self, acc, element):
        raise NotImplementedError

    def add_inputs(self, acc, elements):
        for e in elements:
            acc = self.add_input(acc, e)
        return acc

    def merge_into(self, first, other):
        """Adds ``other`` into ``first`` (mutating it) and returns it."""
        raise NotImplementedError

    def merge_accumulators(self, accs):
        accs = iter(accs)
        first = next(accs)
        for other in accs:
            first = self.merge_into(first, other)
        return first

    def compact(self, acc):
        return acc

    def extract_output(self, acc):
        return acc


class _ModelCombiner(Combiner):
    """A combiner that needs the model: built lazily from a picklable factory."""

    def __init__(self, imodel_factory: Callable[[], InfluenceModel]):
        self._factory = imodel_factory
        self._imodel: Optional[InfluenceModel] = None

    @property
    def imodel(self) -> InfluenceModel:
        if self._imodel is None:
            self._imodel = self._factory()
        return self._imodel

    def __getstate__(self):  # never pickle a built model
        return {"_factory": self._factory, "_imodel": None}


# ============================================================================ exact Hessian
@dataclass
class HessianAccumulator:
    """``sum_i Hessian(l(z_i))`` ``(d, d)`` float64 and the count n."""
    total: Optional[np.ndarray] = None
    n: int = 0


class HessianSumCombiner(_ModelCombiner):
    """The exact Hessian as a distributed sum. Elements: ``(x, y)`` blocks. Output:
    ``(sum_i Hessian(l(z_i)) (d, d) float64, n)``, what ``ExactCurvature.fit_from_combined``
    takes. The accumulator is ``O(d^2)`` (the model, not the data)."""

    def create_accumulator(self) -> HessianAccumulator:
        return HessianAccumulator()

    def add_input(self, acc: HessianAccumulator, element) -> HessianAccumulator:
        x, y = element
        h = grads.hessian_sum(self.imodel, x, y)
        acc.total = h if acc.total is None else acc.total + h
        acc.n += len(x)
        return acc

    def merge_into(self, first: HessianAccumulator, other: HessianAccumulator):
        if other.total is not None:
            if first.total is None:
                first.total = other.total.copy()
            else:
                first.total += other.total
        first.n += other.n
        return first

    def extract_output(self, acc: HessianAccumulator):
        return acc.total, acc.n


# ============================================================================ group sums
class ArraySumCombiner(Combiner):
    """Elementwise float64 sums of equal-shaped tuples of arrays / numbers (group sums: the
    members' feature sums, gradient sums, Hessian-vector sums and counts). Accumulator:
    a list of float64 arrays, or None before the first element."""

    def create_accumulator(self) -> Optional[List[np.ndarray]]:
        return None

    def add_input(self, acc, element):
        if acc is None:
            return [np.array(v, dtype=np.float64, copy=True) for v in element]
        for a, v in zip(acc, element):
            a += v
        return acc

    def merge_into(self, first, other):
        if other is None:
            return first
        if first is None:
            return [a.copy() for a in other]
        return self.add_input(first, other)


# ============================================================================ top-k
# The top-k merge lives beside its accumulator (influence_ops.topk); re-exported here so every
# combiner of the project is reachable from one module.
from influence_ops.topk import TopKCombiner  # noqa: E402,F401
