"""Top-k accumulator in the style of TFDV combiner tests: split, merge in different orders,
compare with a brute-force sort (score descending, id ascending for proponents)."""

import itertools
import os
import pickle
import string

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from influence_ops import topk
from influence_ops.topk import TopKAccumulator, TopKCombiner, top_k


def require_kernel():
    """Skips (or, with REQUIRE_TOPK_KERNEL=1 as in CI, fails) when the compiled scan is not
    built, so that CI never passes on the numpy path alone without saying so."""
    if topk._kernel is None:
        msg = f"influence_ops._topk_scan is not built: {topk._KERNEL_MISSING}"
        if os.environ.get("REQUIRE_TOPK_KERNEL") == "1":
            pytest.fail(msg + " (REQUIRE_TOPK_KERNEL=1)")
        pytest.skip(msg)


@pytest.fixture(autouse=True, scope="module", params=["compiled", "numpy"])
def scan_path(request):
    """Every test of this module runs on both paths: with the compiled scan, and with the
    numpy fallback that installs without a C compiler get. Module scope: hypothesis refuses
    function-scoped fixtures."""
    kernel = topk._kernel
    if request.param == "compiled":
        require_kernel()
    else:
        topk._kernel = None
    yield request.param
    topk._kernel = kernel


def brute_force(scores, ids, k, largest):
    """Sort by score (descending for proponents), NaN after every number, ties by id."""
    def order(p):
        nan = bool(np.isnan(p[0]))
        return nan, 0.0 if nan else (-p[0] if largest else p[0]), p[1]

    out_s, out_i = [], []
    for row in scores:
        pairs = sorted(zip(row, ids), key=order)[:k]
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


# --- streaming implementation: property test against brute force, combiner, edge cases -------

ID_CHARS = string.ascii_letters + string.digits + "-_."  # no NUL: numpy str drops trailing NULs


def assert_matches(res, scores, ids, k):
    for side, largest in (("pro", True), ("opp", False)):
        ref_s, ref_i = brute_force(scores, ids, k, largest)
        kk = min(k, len(ids))
        np.testing.assert_array_equal(res[f"{side}_scores"], ref_s.reshape(len(scores), kk))
        np.testing.assert_array_equal(res[f"{side}_ids"], ref_i.reshape(len(scores), kk))


@settings(max_examples=100, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_property_any_blocks_any_merge_tree_equals_brute_force(data):
    m = data.draw(st.integers(1, 20), label="m")
    n = data.draw(st.integers(0, 400), label="n")
    k = data.draw(st.integers(1, 30), label="k")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    ids = np.array(data.draw(st.lists(st.text(ID_CHARS, min_size=1, max_size=6), min_size=n,
                                      max_size=n, unique=True), label="ids"), dtype=str)
    check_blocks_and_merge_tree(data, m, n, k, seed, ids)


def draw_scores(data, rng, m, n):
    """Scores with many exact ties; some draws: all equal, a few distinct values, NaN and
    infinite entries (NaN ranks after every number), columns sorted (nothing can be skipped)."""
    kind = data.draw(st.sampled_from(["ties", "equal", "few", "nan"]), label="scores")
    if kind == "equal":
        scores = np.full((m, n), 0.5)
    elif kind == "few":
        scores = rng.integers(-1, 2, size=(m, n)).astype(float)
    else:
        scores = np.round(rng.normal(size=(m, n)), 1)
    if kind == "nan":
        scores[rng.random((m, n)) < 0.2] = np.nan
        scores[rng.random((m, n)) < 0.02] = np.inf
        scores[rng.random((m, n)) < 0.02] = -np.inf
        if m > 1:
            scores[0] = np.nan  # a query with no numbers at all
    if data.draw(st.booleans(), label="sorted columns"):
        scores = np.sort(scores, axis=1)  # adversarial order (NaN last)
    return scores


def check_blocks_and_merge_tree(data, m, n, k, seed, ids):
    rng = np.random.default_rng(seed)
    scores = draw_scores(data, rng, m, n)
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=8), label="cuts"))
    bounds = [0, *cuts, n]
    parts = [TopKAccumulator(k=k, n_queries=m).add(scores[:, a:b], ids[a:b])
             for a, b in zip(bounds[:-1], bounds[1:])]
    for i in range(len(parts)):  # some partials travel between workers (pickled)
        if data.draw(st.booleans(), label=f"pickle {i}"):
            parts[i] = pickle.loads(pickle.dumps(parts[i]))
    pool = list(parts)
    while len(pool) > 1:  # random merge tree
        i = data.draw(st.integers(0, len(pool) - 1), label="into")
        j = data.draw(st.integers(0, len(pool) - 2), label="from")
        j += j >= i
        pool[i].merge(pool[j])
        del pool[j]
    acc = pool[0]
    assert acc.n_seen == n
    res = acc.extract()
    assert_matches(res, scores, ids, k)
    assert res["k_exceeds_half"] == (2 * min(k, n) > n)
    # The same blocks added to one running accumulator.
    run = TopKAccumulator(k=k, n_queries=m)
    for a, b in zip(bounds[:-1], bounds[1:]):
        run.add(scores[:, a:b], ids[a:b])
    assert_matches(run.extract(), scores, ids, k)


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_property_streaming_blocks_equal_reference(data):
    """Long streams in the pipeline's pattern (one accumulator per block, merged into a running
    one) and into one running accumulator: large enough that lists fill and the streaming paths
    run (blocks skipped per query, staged entries, single insertions, threshold passes)."""
    m = data.draw(st.integers(1, 40), label="m")
    block = data.draw(st.integers(1, 700), label="block")
    n = data.draw(st.integers(1, 6000), label="n")  # n = 0: the test above
    k = data.draw(st.integers(1, 40), label="k")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    scores = draw_scores(data, rng, m, n)
    ids = np.array([f"t{i}" for i in rng.permutation(n)])  # string order != numeric order
    # Column slices of one array, or fresh arrays (as the Score step's products are).
    fresh = data.draw(st.booleans(), label="contiguous blocks")
    comb = TopKCombiner(k)
    acc = comb.create_accumulator()
    running = TopKAccumulator(k, m)
    for a in range(0, n, block):
        S = np.ascontiguousarray(scores[:, a:a + block]) if fresh else scores[:, a:a + block]
        acc = comb.add_input(acc, TopKAccumulator(k, m).add(S, ids[a:a + block]))
        running.add(S, ids[a:a + block])
    kk = min(k, n)
    for res in (comb.extract_output(comb.compact(acc)), running.extract()):
        for side, largest in (("pro", True), ("opp", False)):
            ref_s, ref_i = fast_reference(scores, ids, kk, largest)
            np.testing.assert_array_equal(res[f"{side}_scores"], ref_s.reshape(m, kk))
            np.testing.assert_array_equal(res[f"{side}_ids"], ref_i.reshape(m, kk))


def fast_reference(scores, ids, k, largest):
    """Like brute_force with numpy: lexsort puts NaN last, ties by id."""
    idb = np.broadcast_to(ids, scores.shape)
    order = np.lexsort((idb, -scores if largest else scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(idb, order, 1)


@pytest.mark.parametrize("decimals,sort_cols", [(2, False), (12, False), (1, True)])
def test_many_queries_wide_blocks_equals_reference(decimals, sort_cols):
    """Large enough for every internal path: threshold pass, argmax skipping and staged entries,
    single insertions, exact ties at the k-th place, long rows split from short ones."""
    rng = np.random.default_rng(decimals)
    m, n, k = 120, 6000, 12
    scores = np.round(rng.normal(size=(m, n)), decimals)
    if sort_cols:
        scores = np.sort(scores, axis=1)
    ids = np.array([f"t{i}" for i in rng.permutation(n)])  # unpadded: string order != numeric
    comb = TopKCombiner(k)
    acc = comb.create_accumulator()
    running = TopKAccumulator(k, m)
    for a in range(0, n, 512):
        acc = comb.add_input(acc, TopKAccumulator(k, m).add(scores[:, a:a + 512], ids[a:a + 512]))
        running.add(scores[:, a:a + 512], ids[a:a + 512])
    for res in (comb.extract_output(comb.compact(acc)), running.extract()):
        for side, largest in (("pro", True), ("opp", False)):
            ref_s, ref_i = fast_reference(scores, ids, k, largest)
            np.testing.assert_array_equal(res[f"{side}_scores"], ref_s)
            np.testing.assert_array_equal(res[f"{side}_ids"], ref_i)


def test_combiner_any_order_compact_equals_brute_force():
    scores, ids = make(m=5, n=600, seed=3)
    k = 7
    bounds = [0, 64, 65, 300, 301, 512, 600]
    comb = TopKCombiner(k)  # n_queries taken from the first partial

    def partials():
        return [TopKAccumulator(k, 5).add(scores[:, a:b], ids[a:b])
                for a, b in zip(bounds[:-1], bounds[1:])]

    for order in ([0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [2, 5, 0, 3, 1, 4]):
        ps = partials()
        accs = [comb.create_accumulator() for _ in range(3)]
        for slot, i in enumerate(order):  # three "fanout" accumulators, then a final merge
            accs[slot % 3] = comb.add_input(accs[slot % 3], ps[i])
        accs = [comb.compact(pickle.loads(pickle.dumps(comb.compact(a)))) for a in accs]
        rest = [a.extract()["pro_ids"].copy() for a in accs[1:]]
        merged = comb.merge_accumulators(accs)
        assert merged is accs[0]
        for a, before in zip(accs[1:], rest):  # the others are not modified
            np.testing.assert_array_equal(a.extract()["pro_ids"], before)
        assert merged.n_seen == 600 and merged.n_queries == 5
        assert_matches(comb.extract_output(merged), scores, ids, k)
    acc = comb.add_inputs(comb.create_accumulator(), partials())
    assert_matches(comb.extract_output(comb.compact(acc)), scores, ids, k)
    empty = comb.merge_accumulators([])
    assert empty.n_seen == 0 and comb.extract_output(empty)["pro_ids"].shape == (0, 0)


def test_k_exceeds_half_flag():
    scores, ids = make(m=2, n=30)
    assert top_k(scores, ids, 10)["k_exceeds_half"] is False
    assert top_k(scores, ids, 15)["k_exceeds_half"] is False
    res = top_k(scores, ids, 16)  # 2 * 16 > 30: the lists share 2 examples per query
    assert res["k_exceeds_half"] is True and res["pro_ids"].shape == (2, 16)
    assert all(len(set(res["pro_ids"][q]) & set(res["opp_ids"][q])) == 2 for q in range(2))
    res = top_k(scores[:, :3], ids[:3], 10)  # fewer examples than k: each list holds all 3
    assert res["k_exceeds_half"] is True and res["opp_scores"].shape == (2, 3)
    assert TopKAccumulator(k=3, n_queries=2).extract()["k_exceeds_half"] is False


def test_nan_ranks_last_and_ids_of_any_length_survive():
    rng = np.random.default_rng(1)
    scores = np.round(rng.normal(size=(3, 200)), 1)
    scores[0, ::3] = np.nan
    scores[1] = np.nan
    ids = np.array([f"x{i:03d}" + "y" * (i // 50) * 4 for i in range(200)])  # longer per block
    whole = top_k(scores, ids, 8)
    for order in ((150, 100, 0, 50), (0, 50, 100, 150)):  # short ids first: widen, not truncate
        acc = TopKAccumulator(k=8, n_queries=3)
        for a in order:
            block_ids = ids[a:a + 50].tolist()  # a fresh array per block: its own str width
            acc.merge(TopKAccumulator(k=8, n_queries=3).add(scores[:, a:a + 50], block_ids))
        res = acc.extract()
        for key in ("pro_ids", "opp_ids"):
            np.testing.assert_array_equal(res[key], whole[key])
    assert not np.isnan(whole["pro_scores"][0]).any() and not np.isnan(whole["opp_scores"][2]).any()
    np.testing.assert_array_equal(whole["pro_ids"][1], np.sort(ids)[:8])  # all NaN: by id
    assert set(whole["opp_ids"][0]) <= set(ids[np.isfinite(scores[0])])
    assert max(map(len, whole["pro_ids"].ravel())) > 10


def test_extracted_arrays_do_not_change_when_accumulator_continues():
    scores, ids = make(m=3, n=400, seed=5, ties=False)
    acc = TopKAccumulator(k=4, n_queries=3).add(scores[:, :200], ids[:200])
    first = acc.extract()
    snap = {key: np.array(v, copy=True) for key, v in first.items()}
    acc.add(scores[:, 200:], ids[200:])
    for key, v in snap.items():
        np.testing.assert_array_equal(first[key], v)
    assert_matches(acc.extract(), scores, ids, 4)
    # Lists passed to the constructor (the old dataclass fields) are used, and not written into.
    again = TopKAccumulator(4, 3, snap["pro_scores"], snap["pro_ids"], snap["opp_scores"],
                            snap["opp_ids"], n_seen=200).add(scores[:, 200:], ids[200:])
    assert_matches(again.extract(), scores, ids, 4)
    np.testing.assert_array_equal(snap["pro_ids"], first["pro_ids"])
    with pytest.raises(ValueError, match="k must be"):
        TopKAccumulator(k=0, n_queries=3)
    with pytest.raises(ValueError, match="different k"):
        acc.merge(TopKAccumulator(k=5, n_queries=3).add(scores[:, :5], ids[:5]))


def test_long_stream_with_nan_rows_compacts_ids():
    """Many small blocks: the id table is compacted along the way; NaN k-th best values make
    whole rows compete; pickling after extract keeps the result."""
    rng = np.random.default_rng(7)
    m, n, k = 3, 30000, 4
    scores = np.round(rng.normal(size=(m, n)), 2)
    scores[1, rng.random(n) < 0.9997] = np.nan  # row 1: fewer numbers than k for a long time
    scores[2, :20000] = np.nan
    ids = np.array([f"i{i}" for i in rng.permutation(n)])
    acc = TopKAccumulator(k, m)
    for a in range(0, n, 100):
        acc.add(scores[:, a:a + 100], ids[a:a + 100])
    res = acc.extract()
    again = pickle.loads(pickle.dumps(acc)).extract()
    for side, largest in (("pro", True), ("opp", False)):
        ref_s, ref_i = fast_reference(scores, ids, k, largest)
        for r in (res, again):
            np.testing.assert_array_equal(r[f"{side}_scores"], ref_s)
            np.testing.assert_array_equal(r[f"{side}_ids"], ref_i)


def test_benchmark_smoke_run(capsys, scan_path):
    """benchmarks/bench_topk.py still runs (tiny sizes; timings belong to the benchmark), and
    its copy of topk.py, loaded by path, finds the compiled scan too."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "benchmarks", "bench_topk.py")
    spec = importlib.util.spec_from_file_location("bench_topk_smoke", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--n", "3072", "--m", "100", "7", "--repeats", "1", "--legacy-blocks",
                       "2"] + (["--numpy"] if scan_path == "numpy" else [])) == 0
    out = capsys.readouterr().out
    assert out.count("all variants give identical results: yes") == 2 and "legacy" in out
    assert ("top-k: compiled scan" if scan_path == "compiled" else "top-k: numpy path") in out


# --- the compiled scan itself -----------------------------------------------------------------

def scan_cases():
    """Blocks with exact ties at the thresholds, NaN and +-inf scores, widths around the
    kernel's 16-entry chunks, and thresholds that are NaN (whole rows) or infinite."""
    rng = np.random.default_rng(11)
    for m, b in [(1, 1), (3, 15), (4, 16), (5, 17), (7, 100), (40, 512), (2, 0)]:
        S = np.round(rng.normal(size=(m, b)), 1)
        S[rng.random((m, b)) < 0.05] = np.nan
        S[rng.random((m, b)) < 0.02] = np.inf
        S[rng.random((m, b)) < 0.02] = -np.inf
        S[rng.random((m, b)) < 0.05] = -0.0
        t = np.round(rng.normal(1.0, 1.0, size=2 * m), 1)  # many exact ties with S
        t[rng.random(2 * m) < 0.2] = np.nan
        t[rng.random(2 * m) < 0.1] = np.inf
        t[rng.random(2 * m) < 0.1] = -np.inf
        yield S, t


def bits(a):
    """Entries as raw bits: -0.0 differs from 0.0, and NaN's sign counts."""
    return a.view(np.uint64) if a.dtype == np.float64 else a


def test_compiled_scan_equals_numpy_mask_entries(scan_path):
    """_scan returns exactly ``_entries(S, _key_mask(S, None, t, nan))`` (same rows, columns,
    key bits, order): contiguous blocks, column slices (strided rows), transposed arrays (copied),
    and outputs too small at first (the scan runs again)."""
    if scan_path == "numpy":
        pytest.skip("the compiled scan only")
    for S, t in scan_cases():
        m, b = S.shape
        wide = np.concatenate([S, S, S], axis=1)
        views = [S, wide[:, b:2 * b], np.asfortranarray(S)]
        for view, nan, expect in itertools.product(views, (True, False), (0, 1, 10**6)):
            want = topk._entries(view, topk._key_mask(view, None, t, nan))
            r, col, key, hit = topk._scan(view, t, nan, expect)
            for got, ref in zip((r, col, key), want):
                assert got.dtype == ref.dtype
                np.testing.assert_array_equal(bits(got), bits(ref))
            assert hit == np.count_nonzero(np.bincount(want[0], minlength=2 * m))
        # A strided threshold column, as the accumulator passes (keys[:, k - 1]).
        tt = np.stack([t, t], axis=1)[:, 1]
        r, col, key, _ = topk._scan(S, tt, True, 0)
        np.testing.assert_array_equal(r, topk._entries(S, topk._key_mask(S, None, t, True))[0])


def test_compiled_scan_rejects_wrong_arrays(scan_path):
    if scan_path == "numpy":
        pytest.skip("the compiled scan only")
    S, t = np.zeros((3, 20)), np.zeros(6)
    out = [np.empty(4, np.int64), np.empty(4, np.int64), np.empty(4)]
    assert topk._kernel.scan(S, t, True, *out) == (120, 6)  # counted, not all written
    with pytest.raises(ValueError, match="contiguous"):
        topk._kernel.scan(np.asfortranarray(S), t, True, *out)
    with pytest.raises(ValueError, match="2m = 6"):
        topk._kernel.scan(S, t[:5], True, *out)
    with pytest.raises(ValueError, match="float64"):
        topk._kernel.scan(S.astype(np.float32), t, True, *out)
    with pytest.raises(ValueError, match="int64"):
        topk._kernel.scan(S, t, True, out[0].astype(np.int32), out[1], out[2])
    with pytest.raises(TypeError, match="6 arguments"):
        topk._kernel.scan(S, t)


def test_flush_equals_best_on_all_candidates():
    """A merge of staged entries (compiled: in place, then _best on the lists it leaves; numpy:
    insertions, then _best) equals _best on each list's candidates at once: lists holding ties
    decided by id, NaN and infinite keys, new entries that tie with the lists and with each
    other, rows in any order."""
    rng = np.random.default_rng(5)
    names = np.array([f"n{i:05d}" for i in rng.permutation(20000)])
    for trial in range(40):
        n, k = int(rng.integers(1, 30)), int(rng.integers(1, 12))
        pool = np.round(rng.normal(size=(n, 3 * k)), int(rng.integers(0, 3)))
        pool[rng.random(pool.shape) < 0.03] = np.inf
        pool[rng.random(pool.shape) < 0.03] = -np.inf
        if trial % 4 == 0:
            pool[rng.random(pool.shape) < 0.2] = np.nan
        codes = rng.permutation(names.size)[:pool.size].reshape(pool.shape)
        base_key, base_code = topk._best(
            np.empty((n, 0)), np.empty((n, 0), dtype=np.int64), np.repeat(np.arange(n), 2 * k),
            codes[:, :2 * k].ravel(), pool[:, :2 * k].ravel(), k, lambda: names)
        ne = int(rng.integers(0, 3 * n))
        r = rng.integers(0, n, ne)
        ecode = rng.permutation(np.setdiff1d(np.arange(names.size), codes))[:ne]
        ekey = np.where(rng.random(ne) < 0.5, pool[r, rng.integers(0, 3 * k, ne)],  # ties
                        np.round(rng.normal(size=ne), 1))
        o = np.argsort(r, kind="stable")
        want_key, want_code = topk._best(base_key, base_code, r[o], ecode[o], ekey[o], k,
                                         lambda: names)
        acc = TopKAccumulator(k, n)
        acc._key, acc._code = base_key.copy(), base_code.copy()
        acc._add_names(names)
        acc._stage, acc._staged = [(r[:ne // 2], ekey[:ne // 2], ecode[:ne // 2]),
                                   (r[ne // 2:], ekey[ne // 2:], ecode[ne // 2:])], ne
        acc._flush()
        np.testing.assert_array_equal(bits(acc._key), bits(want_key))
        np.testing.assert_array_equal(acc._table()[acc._code], names[want_code])
