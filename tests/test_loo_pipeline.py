"""The pipeline with ``--correction=loo`` and ``--group_order=newton`` against the notebook API
(the same float32 model and data as ``tests/test_pipeline.py``; tolerance 2e-3 of the largest
score, as there: float32 model, sums in a different block order)."""

import numpy as np
import pytest

from tests.test_pipeline import (N_QUERY, N_TRAIN, calc, check_against, query_ids, read,
                                 run_pipeline, setup)  # noqa: F401 (setup is a fixture)


@pytest.mark.parametrize("flags,kwargs", [
    (["--solver=exact"], dict(solver="exact")),
    (["--solver=pcg", "--rank=4", "--arnoldi_iter=8", "--damping=0.01", "--cg_tol=1e-6"],
     dict(solver="pcg", rank=4, arnoldi_iter=8, damping=0.01, cg_tol=1e-6)),
])
def test_corrected_scores_and_self_influence(setup, flags, kwargs):  # noqa: F811
    name = "loo_" + "_".join(f.strip("-").replace("=", "-") for f in flags)
    out, manifest = run_pipeline(setup, name, "--correction=loo", *flags)
    c = calc(setup, correction="loo", **kwargs)
    t, q = (setup["x"], setup["y"]), (setup["xq"], setup["yq"])
    c.fit(t, queries=q, query_ids=query_ids(N_QUERY))
    scores = c.influence(q, t, query_ids=query_ids(N_QUERY))
    # The pipeline's tables carry the corrected scores, not first order.
    first = c.influence(q, t, query_ids=query_ids(N_QUERY), correction="none")
    assert np.abs(scores - first).max() > 0.05 * np.abs(scores).max()
    check_against(setup, out, scores, c.self_influence(t))
    assert manifest["row_counts"]["self_influence"] == N_TRAIN


def test_newton_groups(setup):  # noqa: F811
    t, q = (setup["x"], setup["y"]), (setup["xq"], setup["yq"])
    out, _ = run_pipeline(setup, "groups_newton", "--solver=exact", "--group_key=g",
                          "--group_order=newton")
    uniq, ref = calc(setup, solver="exact").fit(t).group_influence(q, t, setup["group"],
                                                                    order="newton")
    got = read(out, "groups")
    assert len(got) == N_QUERY * len(uniq) and set(got.order) == {3}
    mat = got.pivot(index="query_id", columns="group_id", values="score")
    mat = mat.loc[query_ids(N_QUERY), list(uniq)].to_numpy()
    np.testing.assert_allclose(mat, ref, atol=2e-3 * np.abs(ref).max())
