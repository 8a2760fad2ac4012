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
    non-finite features), ``check`` (a label the loss cannot take, a non-finite loss, before
    the fit), ``featurize`` (non-finite gradient features, self-influence or loss)."""
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
    """``ids`` ``(n,)`` str, ``x`` ``(n, ...)``, ``y`` ``(n, ...)``, optional ``group`` ``(n,)``."""
    ids: np.ndarray
    x: np.ndarray
    y: np.ndarray
    group: Optional[np.ndarray] = None
    source: str = ""

    def __len__(self):
        return len(self.ids)

    def take(self, mask_or_index) -> "Block":
        return Block(self.ids[mask_or_index], self.x[mask_or_index], self.y[mask_or_index],
                     None if self.group is None else self.group[mask_or_index], self.source)


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
    group = (None if any(b.group is None for b in blocks)
             else np.concatenate([b.group for b in blocks]))
    return Block(np.concatenate([b.ids for b in blocks]), np.concatenate([b.x for b in blocks]),
                 np.concatenate([b.y for b in blocks]), group, blocks[0].source)


def split_rows(ids, x, y, group, block_size, source):
    for start in range(0, len(ids), block_size):
        s = slice(start, start + block_size)
        yield Block(np.asarray(ids[s]).astype(str), x[s], y[s],
                    None if group is None else np.asarray(group[s]).astype(str), source)


def row_ids(source: str, start: int, n: int, width: int = 9) -> np.ndarray:
    """Stable ids ``source:000000123``: zero-padded so string order is row order."""
    if n == 0:
        return np.zeros((0,), dtype=str)
    return np.char.add(f"{source}:", np.char.zfill(np.arange(start, start + n).astype(str), width))
