"""Sample weights in the pipeline (``--weight_key``): the objective (1/n) sum_i w_i l_i of the
notebook API's ``fit(sample_weight=...)``, on the training side only.

* An L2 logistic regression (float64 model and npz features) against its float64 oracle:
  scores ``g_test^T H_w^-1 w_i g_i`` with ``H_w = (1/n) sum_i w_i H_i + l2 I``, self-influence
  ``w_i^2 g_i^T H_w^-1 g_i``, the loss column ``w_i l_i``, and the notebook API on the same
  data. Tolerance 1e-9 relative: float64 end to end, only summation order differs.
* Integer weights == duplicated rows: weights 0..3 summing to n give the same objective as
  the unweighted data with row i repeated w_i times (same n, same Hessian), so each row's
  weighted score is the first-order group score of its copies and its weighted
  self-influence is their group self-influence.
* Parquet (float32 features, so the oracle uses the float32-rounded inputs) with bad weights:
  null, negative, NaN and inf rows are dead-lettered, a weight-0 row is kept and scores 0.
* A small float32 MLP with an iterative solver (pcg) and first-order groups against the
  notebook API, at the float32 tolerance of tests/test_pipeline.py; in process, and (slow)
  in two SDK worker processes.
* Clear errors before the job: a missing or non-numeric weight column, methods and group
  orders that take no weights, an artifact fitted with the other objective, the audit's
  spot check.
"""

import json
import os

import keras
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from influence_ops import InfluenceCalculator, InfluenceModel
from pipelines import audit as audit_lib
from pipelines import run as run_lib
from tests import helpers
from tests.test_pipeline import K, N_QUERY, N_TRAIN, check_against, query_ids, read

L2 = 0.05
N = 64
# Integer weights with sum n (mean 1): the weighted objective is the unweighted one of the
# data with row i repeated w_i times, without changing n.
INT_WEIGHTS = np.tile([0, 2, 1, 3, 0, 1, 1, 0], N // 8).astype(np.float64)
RTOL = 1e-9


@pytest.fixture(scope="module")
def logistic(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    x, y, xq, yq = helpers.logistic_data(n=N, seed=4)
    theta = helpers.newton_logistic(x, y, L2, weights=INT_WEIGHTS)
    model = helpers.logistic_model(x.shape[1])
    im = InfluenceModel(model, loss="binary_crossentropy", from_logits=True, l2=L2)
    im.set_flat_params(theta)
    model.save(d / "model.keras")
    ids = np.array([f"r{i:03d}" for i in range(N)])
    qids = np.array([f"q{i}" for i in range(len(xq))])
    np.savez(d / "train.npz", x=x, y=y, w=INT_WEIGHTS, id=ids)
    # The queries carry a weight array too (negative): ignored, queries are unweighted.
    np.savez(d / "queries.npz", x=xq, y=yq, w=-np.ones(len(xq)), id=qids)
    return dict(dir=d, x=x, y=y, xq=xq, yq=yq, theta=theta, ids=ids, qids=qids)


def oracle(d, w, x=None, keep=None):
    """Float64 weighted scores ``(m, n)`` and self-influence ``(n,)`` of the rows ``keep``
    (all by default) at the model's parameters; ``x``: the training inputs as the job reads
    them."""
    x = d["x"] if x is None else x
    keep = np.ones(len(x), bool) if keep is None else keep
    x, y, w = x[keep], d["y"][keep], w[keep]
    g, _ = helpers.logistic_oracle(d["theta"], x, y, L2)
    gq, _ = helpers.logistic_oracle(d["theta"], d["xq"], d["yq"], L2)
    xa = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    pr = 1 / (1 + np.exp(-(xa @ d["theta"])))
    H = (xa * (w * pr * (1 - pr))[:, None]).T @ xa / len(x) + L2 * np.eye(xa.shape[1])
    wg = w[:, None] * g
    return gq @ np.linalg.solve(H, wg.T), np.sum(wg * np.linalg.solve(H, wg.T).T, axis=1)


def job(d, name, *flags, train="npz:{dir}/train.npz"):
    out = str(d["dir"] / name)
    argv = [f"--model={d['dir']}/model.keras", "--train=" + train.format(dir=d["dir"]),
            f"--queries=npz:{d['dir']}/queries.npz", "--id_key=id", f"--output={out}",
            "--loss=binary_crossentropy", "--from_logits=true", f"--l2={L2}",
            "--solver=exact", f"--k={K}", "--block_size=16", "--write_pairwise",
            "--overwrite"] + list(flags)
    return out, run_lib.run(argv)


def pairwise(out, row_ids, col_ids):
    pw = read(out, "pairwise")
    m = pw.pivot(index="query_id", columns="train_id", values="score")
    return m.loc[list(row_ids), list(col_ids)].to_numpy()


def self_scores(out, ids, column="score"):
    return read(out, "self_influence").set_index("train_id").loc[list(ids), column].to_numpy()


@pytest.fixture(scope="module")
def weighted_run(logistic):
    return job(logistic, "weighted", "--weight_key=w")


def test_weighted_exact_influence_equals_the_float64_oracle_and_the_notebook(logistic,
                                                                              weighted_run):
    d, (out, manifest) = logistic, weighted_run
    ref, ref_self = oracle(d, INT_WEIGHTS)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(pairwise(out, d["qids"], d["ids"]), ref, atol=RTOL * scale)
    np.testing.assert_allclose(self_scores(out, d["ids"]), ref_self,
                               atol=RTOL * np.abs(ref_self).max())
    # the loss column is the example's term of the objective, w_i l_i
    np.testing.assert_allclose(
        self_scores(out, d["ids"], "loss"),
        INT_WEIGHTS * helpers.logistic_loss(d["theta"], d["x"], d["y"]), rtol=1e-9, atol=1e-12)
    # top-k in the oracle's order (ties between duplicate scores broken by the job's rule:
    # no ties here except the weight-0 rows, all scoring exactly 0)
    topk = read(out, "topk")
    for q, qid in enumerate(d["qids"]):
        pro = topk[(topk.query_id == qid) & (topk.kind == "proponent")].sort_values("rank")
        np.testing.assert_allclose(pro.score, np.sort(ref[q])[::-1][:K], atol=RTOL * scale)
    assert manifest["row_counts"]["dead_letter"] == 0  # the queries' weights were not read
    # the notebook API with sample_weight= on the same data
    im = InfluenceModel(d["dir"] / "model.keras", loss="binary_crossentropy",
                        from_logits=True, l2=L2)
    calc = InfluenceCalculator(im, solver="exact").fit((d["x"], d["y"]),
                                                       sample_weight=INT_WEIGHTS)
    train = (d["x"], d["y"], INT_WEIGHTS)
    np.testing.assert_allclose(calc.influence((d["xq"], d["yq"]), train), ref,
                               atol=RTOL * scale)
    # the job's artifact reloads weighted in the notebook
    back = InfluenceCalculator.load(os.path.join(out, "artifact"), im)
    assert back.weighted
    np.testing.assert_allclose(back.self_influence(train), ref_self,
                               atol=RTOL * np.abs(ref_self).max())


def test_integer_weights_equal_duplicated_rows(logistic, weighted_run):
    """Row i repeated w_i times (w_i = 0: left out), unweighted, copies grouped by row: the
    same objective, so each group's score is the weighted row's score and its group
    self-influence (the copies' summed gradient 2 g_i, ...) the weighted self-influence."""
    d = logistic
    rep = INT_WEIGHTS.astype(int)
    src = np.repeat(np.arange(N), rep)
    copy = np.concatenate([np.arange(k) for k in rep])
    np.savez(d["dir"] / "dup.npz", x=d["x"][src], y=d["y"][src], g=d["ids"][src],
             id=np.char.add(np.char.add(d["ids"][src], "_"), copy.astype(str)))
    out, _ = job(d, "dup", "--group_key=g", train="npz:{dir}/dup.npz")
    w_out = weighted_run[0]
    kept = d["ids"][rep > 0]
    groups = read(out, "groups").pivot(index="query_id", columns="group_id", values="score")
    want = pairwise(w_out, d["qids"], kept)
    np.testing.assert_allclose(groups.loc[list(d["qids"]), list(kept)].to_numpy(), want,
                               atol=RTOL * np.abs(want).max())
    gself = read(out, "group_self").set_index("group_id")
    want_self = self_scores(w_out, kept)
    np.testing.assert_allclose(gself.loc[list(kept), "score"].to_numpy(), want_self,
                               atol=RTOL * np.abs(want_self).max())
    np.testing.assert_array_equal(gself.loc[list(kept), "size"].to_numpy(), rep[rep > 0])


def test_parquet_bad_weights_are_dead_lettered_and_the_rest_weighted(logistic):
    d = logistic
    w = np.random.default_rng(1).uniform(0.2, 3.0, N)
    w[5] = 0.0                                   # valid: kept, scores exactly 0
    bad = {7: None, 9: -1.0, 11: np.nan, 13: np.inf}
    col = [None if i in bad and bad[i] is None else float(bad.get(i, v))
           for i, v in enumerate(w)]
    x32 = d["x"].astype(np.float32)
    pq.write_table(pa.table({"x": pa.array(list(x32), type=pa.list_(pa.float32())),
                             "y": d["y"][:, 0], "w": pa.array(col, pa.float64()),
                             "id": d["ids"]}), d["dir"] / "train.parquet")
    out, manifest = job(d, "parquet", "--weight_key=w", "--max_bad_fraction=0.1",
                        train="parquet:{dir}/train.parquet")
    dead = read(out, "dead_letter").set_index("example_id")
    assert sorted(dead.index) == sorted(d["ids"][list(bad)])
    assert "missing weight ('w' is null)" in dead.loc["r007", "error"]
    for i in (9, 11, 13):
        assert "negative or not finite" in dead.loc[d["ids"][i], "error"]
    keep = ~np.isin(np.arange(N), list(bad))
    ref, ref_self = oracle(d, w, x=x32.astype(np.float64), keep=keep)
    np.testing.assert_allclose(pairwise(out, d["qids"], d["ids"][keep]), ref,
                               atol=RTOL * np.abs(ref).max())
    np.testing.assert_allclose(self_scores(out, d["ids"][keep]), ref_self,
                               atol=RTOL * np.abs(ref_self).max())
    assert self_scores(out, ["r005"])[0] == 0.0
    assert manifest["row_counts"]["self_influence"] == N - len(bad)


def test_errors_before_the_job(logistic, weighted_run, tmp_path):
    d = logistic
    with pytest.raises(Exception, match=r"array 'wt' missing"):
        job(d, "missing", "--weight_key=wt")
    np.savez(tmp_path / "text.npz", x=d["x"], y=d["y"], w=np.full(N, "heavy"), id=d["ids"])
    with pytest.raises(Exception, match=r"weight 'w' \(--weight_key\) holds <U5 values .*"
                                        r"expected numbers"):
        job(d, "text", "--weight_key=w", train=f"npz:{tmp_path}/text.npz")
    with pytest.raises(run_lib.RunError, match="sample weights are supported .* not "
                                               "solver=ekfac"):
        job(d, "ekfac", "--weight_key=w", "--solver=ekfac")
    with pytest.raises(run_lib.RunError, match="not method=rps_l2"):
        job(d, "rps", "--weight_key=w", "--method=rps_l2")
    with pytest.raises(run_lib.RunError, match="--group_order=newton does not take sample"):
        job(d, "newton", "--weight_key=w", "--group_key=id", "--group_order=newton")
    art = os.path.join(weighted_run[0], "artifact")
    assert json.load(open(os.path.join(art, "manifest.json")))["sample_weighted"] is True
    with pytest.raises(run_lib.RunError, match="fitted with sample weights and this run is "
                                               "unweighted"):
        job(d, "reuse", f"--artifact={art}")
    with pytest.raises(run_lib.RunError, match="it is off with --weight_key"):
        audit_lib.audit([f"--audit_root={tmp_path}/audit", f"--model={d['dir']}/model.keras",
                         f"--train=npz:{d['dir']}/train.npz", "--weight_key=w",
                         "--loss=binary_crossentropy", "--solver=exact", "--spot_check=4"])


def test_weighted_audit_runs_without_spot_check_and_scores_weighted(logistic, tmp_path):
    """A weighted audit (no --spot_check given: off with --weight_key) ranks by the weighted
    self-influence of the oracle."""
    d = logistic
    manifest = audit_lib.audit([
        f"--audit_root={tmp_path}/audit", f"--model={d['dir']}/model.keras",
        f"--train=npz:{d['dir']}/train.npz", "--id_key=id", "--weight_key=w",
        "--loss=binary_crossentropy", "--from_logits=true", f"--l2={L2}", "--solver=exact",
        "--no_report"])
    assert manifest["spot_check"] is None
    table = read(manifest["path"], "audit")
    got = dict(zip(table["train_id"], table["score"]))
    _, want_self = oracle(d, INT_WEIGHTS)
    for i, rid in enumerate(d["ids"]):
        assert got[rid] == pytest.approx(want_self[i], rel=RTOL, abs=1e-12)


# ------------------------------------------------------------------ float32 MLP, iterative

@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    """tests/test_pipeline.py's shapes and file names (its check_against reads them)."""
    d = tmp_path_factory.mktemp("mlp")
    x, y, xq, yq = helpers.classification_data(n=N_TRAIN, p=6, classes=3, n_test=N_QUERY,
                                               seed=5)
    x, xq = x.astype(np.float32), xq.astype(np.float32)
    model = helpers.mlp_classifier(6, 3, hidden=8, dtype="float32", seed=5)
    model.compile(optimizer=keras.optimizers.Adam(0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=25, batch_size=32, verbose=0)
    model.save(d / "model.keras")
    w = np.random.default_rng(2).uniform(0.2, 3.0, N_TRAIN).astype(np.float32)
    group = np.array(["a", "b", "c", "d"])[np.arange(N_TRAIN) % 4]
    np.savez(d / "train.npz", x=x, y=y, w=w, g=group)
    np.savez(d / "queries.npz", x=xq, y=yq)
    return dict(dir=d, x=x, y=y, xq=xq, yq=yq, w=w, group=group)


@pytest.mark.parametrize("mode", [
    "in_process", pytest.param("multi_processing", marks=pytest.mark.slow)])  # 26 s
def test_pcg_and_groups_equal_the_notebook(mlp, monkeypatch, mode):
    """Also in two SDK worker processes (``multi_processing``): the weights reach the
    readers of both passes, the fit sample, the query solves and the groups there."""
    d = mlp
    out = str(d["dir"] / mode)
    opts = dict(solver="pcg", rank=4, arnoldi_iter=8, damping=0.01)
    flags = []
    if mode == "multi_processing":
        flags = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
        # The worker subprocesses inherit os.environ: they must import our packages.
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
            [repo] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    manifest = run_lib.run(
        [f"--model={d['dir']}/model.keras", f"--train=npz:{d['dir']}/train.npz",
         f"--queries=npz:{d['dir']}/queries.npz", f"--output={out}", f"--k={K}",
         "--block_size=50", "--batch_size=32", "--l2=0.01", "--write_pairwise",
         "--weight_key=w", "--group_key=g"] + flags + [f"--{k}={v}" for k, v in opts.items()])
    if flags:
        assert manifest["options"]["direct_running_mode"] == "multi_processing"
    calc = InfluenceCalculator(InfluenceModel(str(d["dir"] / "model.keras"), l2=0.01), **opts)
    train, q = (d["x"], d["y"], d["w"]), (d["xq"], d["yq"])
    calc.fit(train, queries=q, query_ids=query_ids(N_QUERY))
    scores = calc.influence(q, train, query_ids=query_ids(N_QUERY))
    check_against(d, out, scores, calc.self_influence(train))
    uniq, g_scores, g_self = calc.group_influence(q, train, d["group"],
                                                  query_ids=query_ids(N_QUERY))
    got = read(out, "groups").pivot(index="query_id", columns="group_id", values="score")
    np.testing.assert_allclose(got.loc[list(query_ids(N_QUERY)), list(uniq)].to_numpy(),
                               g_scores, atol=2e-3 * np.abs(g_scores).max())
