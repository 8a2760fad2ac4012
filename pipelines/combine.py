"""One generic Beam wrapper for the Beam-free combiners of ``influence_ops.combiners``."""

from __future__ import annotations

import apache_beam as beam


class BeamCombineFn(beam.CombineFn):
    """A ``beam.CombineFn`` delegating to a combiner with the same method names.

    ``combiner``: the combiner itself (it must pickle: combiners that need the model hold a
    factory and build it lazily on the worker). Side inputs given to ``CombineGlobally`` /
    ``CombinePerKey`` reach every method as extra arguments (a second fit pass receives the
    first pass's output that way)."""

    def __init__(self, combiner):
        self.combiner = combiner

    def create_accumulator(self, *args, **kwargs):
        return self.combiner.create_accumulator(*args, **kwargs)

    def add_input(self, acc, element, *args, **kwargs):
        return self.combiner.add_input(acc, element, *args, **kwargs)

    def add_inputs(self, acc, elements, *args, **kwargs):
        return self.combiner.add_inputs(acc, elements, *args, **kwargs)

    def merge_accumulators(self, accs, *args, **kwargs):
        return self.combiner.merge_accumulators(accs, *args, **kwargs)

    def compact(self, acc, *args, **kwargs):
        return self.combiner.compact(acc, *args, **kwargs)

    def extract_output(self, acc, *args, **kwargs):
        return self.combiner.extract_output(acc, *args, **kwargs)
