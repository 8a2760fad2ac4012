"""The fit sample's combiner (``pipelines.fit.SmallestHashes``) keeps exactly the rows the
previous two-step sample kept (``final_sample`` over all rows): the ``size`` smallest id
hashes, ties by id, whatever the blocks, their order and the accumulators' merge order. It
needs no row count, so the training blocks reach it without a side input (no buffering)."""

import numpy as np
import pytest

from pipelines.blocks import Block
from pipelines.fit import SmallestHashes, final_sample


def _blocks(n, size, rng):
    ids = np.array([f"f.npz:{i:06d}" for i in rng.permutation(n)])
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = rng.integers(0, 5, n)
    cuts = np.sort(rng.choice(np.arange(1, n), size=size - 1, replace=False))
    return [Block(ids[a:b], x[a:b], y[a:b], None, "f.npz")
            for a, b in zip(np.r_[0, cuts], np.r_[cuts, n])]


@pytest.mark.parametrize("size", [0, 1, 37, 500, 5000])
def test_same_rows_as_the_whole_sample(size):
    rng = np.random.default_rng(size)
    blocks = _blocks(3000, 40, rng)
    want = final_sample(blocks, size, seed=7)
    fn = SmallestHashes(size, seed=7)
    for trial in range(3):
        order = rng.permutation(len(blocks))
        parts = np.array_split(order, 1 + trial * 2)  # one or several accumulators
        accs = []
        for part in parts:
            acc = fn.create_accumulator()
            for i in part:
                acc = fn.add_input(acc, blocks[i])
            accs.append(fn.compact(acc))
        got = final_sample([fn.extract_output(fn.merge_accumulators(accs))], size, seed=7)
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_array_equal(got.x, want.x)
        np.testing.assert_array_equal(got.y, want.y)


def test_bounded_memory_and_empty_input():
    fn = SmallestHashes(100, seed=0)
    acc = fn.create_accumulator()
    for b in _blocks(20000, 200, np.random.default_rng(1)):
        acc = fn.add_input(acc, b)
        assert acc[1] < 150 + len(b)  # at most 1.5x size plus one block
    assert len(fn.extract_output(acc)) == 100
    assert fn.extract_output(fn.create_accumulator()) is None
