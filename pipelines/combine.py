"""One generic Beam wrapper for the Beam-free combiners of ``influence_ops.combiners``."""

from __future__ import annotations

import apache_beam as beam


class BeamCombineFn(beam.CombineFn):
    """A ``beam.CombineFn`` delegating to a combiner with the same method names.

    ``combiner``: the combiner itself (it must pickle: combiners that need the model hold a
    factory and build it lazily on the worker)."""

    def __init__(self, combiner):
        self.combiner = combiner

    def create_accumulator(self):
        return self.combiner.create_accumulator()

    def add_input(self, acc, element):
        return self.combiner.add_input(acc, element)

    def add_inputs(self, acc, elements):
        return self.combiner.add_inputs(acc, elements)

    def merge_accumulators(self, accs):
        return self.combiner.merge_accumulators(accs)

    def compact(self, acc):
        return self.combiner.compact(acc)

    def extract_output(self, acc):
        return self.combiner.extract_output(acc)
