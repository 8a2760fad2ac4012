"""The pipeline's elements: blocks of examples with stable string ids (never one per
example), their featurized form, and the typed side records (dead letters, stage timings)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import apache_beam as beam
import numpy as np

from pipelines.constants import DEAD, TIMING


class DeadLetter(NamedTuple):
    """A rejected row: where it came from, its id, why, and the stage that rejected it (one
    row of ``dead_letter/``). Stages: ``read`` (unparseable, missing value, wrong length,
    non-finite features, a negative or non-finite sample weight), ``check`` (a label the
    loss cannot take, a non-finite loss, before the fit), ``featurize`` (non-finite gradient
    features, self-influence or loss)."""
    source: str
    example_id: str
    error: str
    stage: str = "read"


class Timing(NamedTuple):
    """Seconds one stage spent on one element (summed into the run manifest)."""
    stage: str
    seconds: float


def dead_letter(source: str, example_id, error, stage: str = "read"
                ) -> beam.pvalue.TaggedOutput:
    """The one way a stage rejects a row: a :class:`DeadLetter` on the ``dead`` output."""
    return beam.pvalue.TaggedOutput(DEAD, DeadLetter(str(source), str(example_id), str(error),
                                                     str(stage)))


def dead_rows(block: "Block", mask: np.ndarray, reason, stage: str = "read"):
    """Dead letters for the rows of ``block`` selected by ``mask``; ``reason`` is a string or
    a callable ``(row index) -> str``."""
    for i in np.nonzero(mask)[0]:
        yield dead_letter(block.source, block.ids[i], reason(i) if callable(reason) else reason,
                          stage)


def timing(stage: str, seconds: float) -> beam.pvalue.TaggedOutput:
    return beam.pvalue.TaggedOutput(TIMING, Timing(stage, float(seconds)))


@dataclass
class Block:
    """``ids`` ``(n,)`` str, ``x`` ``(n, ...)``, ``y`` ``(n, ...)``, optional ``group`` ``(n,)``
    and ``weight`` ``(n,)`` float64 (``--weight_key``, training rows only)."""
    ids: np.ndarray
    x: np.ndarray
    y: np.ndarray
    group: Optional[np.ndarray] = None
    source: str = ""
    weight: Optional[np.ndarray] = None

    def __len__(self):
        return len(self.ids)

    def take(self, mask_or_index) -> "Block":
        def take(a):
            return None if a is None else a[mask_or_index]
        return Block(self.ids[mask_or_index], self.x[mask_or_index], self.y[mask_or_index],
                     take(self.group), self.source, take(self.weight))

    def method_labels(self, imodel) -> np.ndarray:
        """The labels the model's loss takes: normalised, or, for a sample-weighted model
        (``--weight_key``, ``InfluenceModel.set_sample_weighted``), packed with the rows'
        weights (1 for rows without: queries). Tables and predictions keep ``y`` as given."""
        if imodel.sample_weighted:
            return imodel.pack_labels(self.y, self.weight)
        return imodel.normalize_labels(self.y)


@dataclass
class FeatureBlock:
    """Featurized training (or query) examples: ``features`` ``(n, k)`` plus per-example extras."""
    ids: np.ndarray
    features: np.ndarray
    labels: np.ndarray                      # strings, for the output tables
    self_scores: Optional[np.ndarray] = None
    losses: Optional[np.ndarray] = None
    group: Optional[np.ndarray] = None
    self_features: Optional[np.ndarray] = None  # psi on the example itself (group self-influence)
    predicted: Optional[np.ndarray] = None      # the model's labels (strings), train side
    confidence: Optional[np.ndarray] = None     # the probability the model gives them
    partition: Optional[np.ndarray] = None      # the source (file) each row was read from
    extra: Optional[dict] = None                # extra per-example columns (boundary distances)
    x: Optional[np.ndarray] = None              # raw inputs and labels, only for --examples_top
    y: Optional[np.ndarray] = None

    def __len__(self):
        return len(self.ids)


def concat(blocks) -> Block:
    blocks = [b for b in blocks if len(b)]
    if not blocks:
        raise ValueError("no examples")
    def joined(name):
        parts = [getattr(b, name) for b in blocks]
        return None if any(p is None for p in parts) else np.concatenate(parts)
    return Block(np.concatenate([b.ids for b in blocks]), np.concatenate([b.x for b in blocks]),
                 np.concatenate([b.y for b in blocks]), joined("group"), blocks[0].source,
                 joined("weight"))


def split_rows(ids, x, y, group, block_size, source, weight=None):
    for start in range(0, len(ids), block_size):
        s = slice(start, start + block_size)
        yield Block(np.asarray(ids[s]).astype(str), x[s], y[s],
                    None if group is None else np.asarray(group[s]).astype(str), source,
                    None if weight is None else weight[s])


def row_ids(source: str, start: int, n: int, width: int = 9) -> np.ndarray:
    """Stable ids ``source:000000123``: zero-padded so string order is row order."""
    if n == 0:
        return np.zeros((0,), dtype=str)
    return np.char.add(f"{source}:", np.char.zfill(np.arange(start, start + n).astype(str), width))
