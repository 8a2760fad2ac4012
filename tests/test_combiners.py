"""Every combiner without Beam (TFDV style): split over blocks, merged in several orders,
compacted; the output equals a one-pass numpy oracle."""

import itertools

import numpy as np
import pytest

from influence_ops import InfluenceModel
from influence_ops import gradients as grads
from influence_ops.combiners import ArraySumCombiner, HessianSumCombiner, TopKCombiner
from influence_ops.groups import per_group_sums
from influence_ops.topk import TopKAccumulator, top_k
from tests import helpers

BOUNDS = [0, 7, 30, 31, 64, 80]


def _blocks(n):
    return [slice(a, b) for a, b in zip(BOUNDS[:-1], BOUNDS[1:]) if a < n]


def _all_orders(combiner, elements, max_orders=8):
    """Each element in its own accumulator, merged in several orders (and trees)."""
    outs = []
    for order in list(itertools.permutations(range(len(elements))))[:max_orders]:
        accs = [combiner.add_input(combiner.create_accumulator(), elements[i]) for i in order]
        # A two-level tree: merge pairs, then everything, like a combine with fan-out.
        pairs = [combiner.merge_accumulators(accs[i:i + 2]) for i in range(0, len(accs), 2)]
        acc = combiner.compact(combiner.merge_accumulators(pairs))
        outs.append(combiner.extract_output(acc))
    batched = combiner.add_inputs(combiner.create_accumulator(), elements)
    outs.append(combiner.extract_output(batched))
    return outs


@pytest.fixture(scope="module")
def mlp():
    x, y, _, _ = helpers.classification_data(n=80, p=4, classes=3, seed=2)
    model = helpers.mlp_classifier(4, 3, hidden=3)
    return InfluenceModel(model, target_layers=2), x, y


def test_hessian_sum_any_split_and_order(mlp):
    im, x, y = mlp
    ref = grads.hessian_sum(im, x, y)
    comb = HessianSumCombiner(lambda: im)
    for total, n in _all_orders(comb, [(x[s], y[s]) for s in _blocks(len(x))]):
        assert n == len(x)
        np.testing.assert_allclose(total, ref, rtol=1e-10, atol=1e-12)  # float64 sums


def test_hessian_combiner_pickles_without_its_model(mlp):
    import pickle
    im, x, y = mlp
    comb = HessianSumCombiner(_Factory())
    comb.add_input(comb.create_accumulator(), (x[:5], y[:5]))  # builds the model lazily
    again = pickle.loads(pickle.dumps(comb))
    assert again._imodel is None


class _Factory:
    def __call__(self):
        return InfluenceModel(helpers.mlp_classifier(4, 3, hidden=3), target_layers=2)


def test_group_sums_any_split_and_order():
    rng = np.random.default_rng(0)
    feats, other = rng.normal(size=(80, 5)), rng.normal(size=(80, 2))
    groups = np.array(["a", "b", "c", "d", "e"])[rng.integers(0, 5, 80)]
    comb = ArraySumCombiner()
    per_group = {}
    for s in _blocks(80):
        uniq, sums, counts = per_group_sums(groups[s], feats[s], other[s])
        for j, g in enumerate(uniq.tolist()):
            per_group.setdefault(g, []).append([sums[0][j], sums[1][j], float(counts[j])])
    for g, elements in per_group.items():
        mask = groups == g
        for out in _all_orders(comb, elements):
            np.testing.assert_allclose(out[0], feats[mask].sum(axis=0), rtol=1e-12)
            np.testing.assert_allclose(out[1], other[mask].sum(axis=0), rtol=1e-12)
            assert out[2] == mask.sum()
    assert comb.merge_accumulators([None, None]) is None


def test_topk_combiner_any_split_and_order():
    rng = np.random.default_rng(1)
    scores = np.round(rng.normal(size=(3, 80)), 1)  # many exact ties
    ids = np.char.add("t", np.char.zfill(rng.permutation(80).astype(str), 3))
    ref = top_k(scores, ids, 6)
    partials = [TopKAccumulator(k=6, n_queries=3).add(scores[:, s], ids[s]) for s in _blocks(80)]
    for out in _all_orders(TopKCombiner(6), partials):
        for key in ref:
            np.testing.assert_array_equal(out[key], ref[key])
    empty = TopKCombiner(6, n_queries=3)
    assert empty.extract_output(empty.create_accumulator())["pro_ids"].shape == (3, 0)
