"""Top-k accumulator in the style of TFDV combiner tests: split, merge in different orders,
compare with a brute-force sort (score descending, id ascending for proponents)."""

import itertools

import numpy as np
import pytest

from influence_ops.topk import TopKAccumulator, top_k


def brute_force(scores, ids, k, largest):
    out_s, out_i = [], []
    for row in scores:
        pairs = sorted(zip(row, ids), key=lambda p: ((-p[0] if largest else p[0]), p[1]))[:k]
        out_s.append([p[0] for p in pairs])
        out_i.append([p[1] for p in pairs])
    return np.array(out_s), np.array(out_i)


def make(m=4, n=300, seed=0, ties=True):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(m, n))
    if ties:  # many exact ties, including across block boundaries
        scores = np.round(scores, 1)
    ids = np.char.add("ex", np.char.zfill(rng.permutation(n).astype(str), 5))
    return scores, ids


@pytest.mark.parametrize("k", [1, 5, 17])
def test_split_merge_any_order_equals_brute_force(k):
    scores, ids = make()
    ref_ps, ref_pi = brute_force(scores, ids, k, True)
    ref_os, ref_oi = brute_force(scores, ids, k, False)
    bounds = [0, 7, 50, 51, 190, 300]
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        parts.append(TopKAccumulator(k=k, n_queries=4).add(scores[:, a:b], ids[a:b]))
    for order in list(itertools.permutations(range(len(parts))))[:12]:
        accs = [TopKAccumulator(k=k, n_queries=4).merge(parts[i]) for i in order]
        acc = accs[0]
        for other in accs[1:]:
            acc = acc.merge(other)
        res = acc.extract()
        np.testing.assert_array_equal(res["pro_scores"], ref_ps)
        np.testing.assert_array_equal(res["pro_ids"], ref_pi)
        np.testing.assert_array_equal(res["opp_scores"], ref_os)
        np.testing.assert_array_equal(res["opp_ids"], ref_oi)
        assert acc.n_seen == 300


def test_merge_mutates_first_only():
    scores, ids = make(n=40)
    a = TopKAccumulator(k=3, n_queries=4).add(scores[:, :20], ids[:20])
    b = TopKAccumulator(k=3, n_queries=4).add(scores[:, 20:], ids[20:])
    b_before = b.pro_scores.copy()
    out = a.merge(b)
    assert out is a
    np.testing.assert_array_equal(b.pro_scores, b_before)


def test_fewer_examples_than_k_and_empty():
    scores, ids = make(n=3)
    res = top_k(scores, ids, 10)
    assert res["pro_scores"].shape == (4, 3)
    empty = TopKAccumulator(k=5, n_queries=2).extract()
    assert empty["pro_ids"].shape == (2, 0)
    merged = TopKAccumulator(k=5, n_queries=2).merge(TopKAccumulator(k=5, n_queries=2))
    assert merged.extract()["opp_scores"].shape == (2, 0)


def test_bad_shapes_are_rejected():
    acc = TopKAccumulator(k=2, n_queries=3)
    with pytest.raises(ValueError, match="n_queries=3"):
        acc.add(np.zeros((2, 5)), np.arange(5))
    with pytest.raises(ValueError, match="ids must be"):
        acc.add(np.zeros((3, 5)), np.arange(4))
