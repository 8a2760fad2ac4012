"""Beam-free combiners (create / add / merge / compact / extract), wrapped by ``pipelines``.

The exact Hessian is a sum over training examples, so it distributes as a combiner whose
accumulator is ``O(d^2)`` float64 (the model, not the data): workers add whole blocks, merges
add matrices in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from influence_ops import gradients as grads
from influence_ops.model import InfluenceModel


@dataclass
class HessianAccumulator:
    """``sum_i Hessian(l(z_i))`` ``(d, d)`` float64 and the count n."""
    total: Optional[np.ndarray] = None
    n: int = 0


class HessianSumCombiner:
    """Adds per-block Hessian sums; ``extract`` returns ``(sum, n)``."""

    def __init__(self, imodel_factory):
        # A factory, not a model: combiners are pickled to workers, Keras models are not.
        self._factory = imodel_factory
        self._imodel: Optional[InfluenceModel] = None

    @property
    def imodel(self) -> InfluenceModel:
        if self._imodel is None:
            self._imodel = self._factory()
        return self._imodel

    def create(self) -> HessianAccumulator:
        return HessianAccumulator()

    def add(self, acc: HessianAccumulator, x, y) -> HessianAccumulator:
        h = grads.hessian_sum(self.imodel, x, y)
        acc.total = h if acc.total is None else acc.total + h
        acc.n += len(x)
        return acc

    @staticmethod
    def merge(first: HessianAccumulator, *others: HessianAccumulator) -> HessianAccumulator:
        for o in others:
            if o.total is not None:
                if first.total is None:
                    first.total = o.total.copy()
                else:
                    first.total += o.total
            first.n += o.n
        return first

    @staticmethod
    def compact(acc: HessianAccumulator) -> HessianAccumulator:
        return acc

    @staticmethod
    def extract(acc: HessianAccumulator):
        return acc.total, acc.n
