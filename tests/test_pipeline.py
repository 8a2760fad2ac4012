"""The Beam pipeline on FnApiRunner against the in-process influence_ops result, per method.

Each run reads real ``.npz`` inputs, writes real Parquet, and we read the Parquet back. Scores
must match the notebook API to float32 tolerance (the model is float32; the pipeline sums HVPs
and Hessians in a different block order), and the top-k train ids must be identical.
"""

import json
import os

import keras
import numpy as np
import pyarrow.parquet as pq
import pytest

from influence_ops import InfluenceCalculator, InfluenceModel
from pipelines import run as run_lib
from tests import helpers

K = 4
N_TRAIN, N_QUERY = 160, 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe")
    x, y, xq, yq = helpers.classification_data(n=N_TRAIN, p=6, classes=3, n_test=N_QUERY, seed=5)
    x, xq = x.astype(np.float32), xq.astype(np.float32)
    model = helpers.mlp_classifier(6, 3, hidden=8, dtype="float32", seed=5)
    model.compile(optimizer=keras.optimizers.Adam(0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=5, batch_size=32, verbose=0)
    ck1 = str(d / "ck1.keras")
    model.save(ck1)
    model.fit(x, y, epochs=20, batch_size=32, verbose=0)
    path = str(d / "model.keras")
    model.save(path)
    group = np.array(["src_a", "src_b", "src_c", "src_d"])[np.arange(N_TRAIN) % 4]
    np.savez(d / "train.npz", x=x, y=y, g=group)
    np.savez(d / "queries.npz", x=xq, y=yq)
    return dict(dir=d, model_path=path, ck1=ck1, x=x, y=y, xq=xq, yq=yq, group=group)


def run_pipeline(setup, name, *flags):
    out = str(setup["dir"] / name)
    argv = [f"--model={setup['model_path']}", f"--train=npz:{setup['dir']}/train.npz",
            f"--queries=npz:{setup['dir']}/queries.npz", f"--output={out}", f"--k={K}",
            "--block_size=50", "--batch_size=32", "--l2=0.01", "--write_pairwise",
            "--overwrite"] + list(flags)
    manifest = run_lib.run(argv)
    return out, manifest


def read(out, table):
    return pq.read_table(os.path.join(out, table)).to_pandas()


def train_ids(n):
    return np.char.add("train.npz:", np.char.zfill(np.arange(n).astype(str), 9))


def query_ids(n):
    return np.char.add("queries.npz:", np.char.zfill(np.arange(n).astype(str), 9))


def check_against(setup, out, scores, self_scores=None, rtol=2e-3):
    """Pipeline Parquet vs an in-process ``(n_query, n_train)`` score matrix."""
    scale = np.abs(scores).max()
    pw = read(out, "pairwise")
    pw_mat = np.zeros_like(scores)
    qi = {q: i for i, q in enumerate(query_ids(N_QUERY))}
    ti = {t: i for i, t in enumerate(train_ids(N_TRAIN))}
    pw_mat[pw.query_id.map(qi), pw.train_id.map(ti)] = pw.score
    assert len(pw) == N_QUERY * N_TRAIN
    np.testing.assert_allclose(pw_mat, scores, atol=rtol * scale)
    topk = read(out, "topk")
    for q, qid in enumerate(query_ids(N_QUERY)):
        pro = topk[(topk.query_id == qid) & (topk.kind == "proponent")].sort_values("rank")
        opp = topk[(topk.query_id == qid) & (topk.kind == "opponent")].sort_values("rank")
        assert list(pro.train_id) == list(train_ids(N_TRAIN)[np.argsort(-scores[q])[:K]])
        assert list(opp.train_id) == list(train_ids(N_TRAIN)[np.argsort(scores[q])[:K]])
    si = read(out, "self_influence")
    assert len(si) == N_TRAIN and si.train_id.is_unique  # every example exactly once
    if self_scores is not None:
        got = si.set_index("train_id").loc[train_ids(N_TRAIN), "score"].to_numpy()
        np.testing.assert_allclose(got, self_scores, atol=rtol * np.abs(self_scores).max())
    assert os.path.exists(os.path.join(out, "_SUCCESS"))


def calc(setup, method="influence", **kw):
    im = InfluenceModel(setup["model_path"], l2=0.01)
    return InfluenceCalculator(im, method=method, **kw)


@pytest.mark.parametrize("flags,method,kwargs", [
    (["--solver=exact"], "influence", dict(solver="exact")),
    (["--solver=arnoldi", "--rank=10", "--arnoldi_iter=20"], "influence",
     dict(solver="arnoldi", rank=10, arnoldi_iter=20)),
    (["--method=relatif", "--solver=exact"], "relatif", dict(solver="exact")),
    (["--solver=cg", "--damping=0.1"], "influence", dict(solver="cg", damping=0.1)),
    (["--solver=lissa", "--damping=0.1", "--lissa_scale=20", "--lissa_depth=100"], "influence",
     dict(solver="lissa", damping=0.1, lissa_scale=20.0, lissa_depth=100)),
    (["--method=rps_l2", "--rps_lambda=0.01"], "rps_l2", dict(rps_lambda=0.01)),
    (["--method=rps_lje", "--solver=exact"], "rps_lje", dict()),
    (["--solver=ekfac"], "influence", dict(solver="ekfac")),
    (["--solver=pcg", "--rank=4", "--arnoldi_iter=8", "--damping=0.01"], "influence",
     dict(solver="pcg", rank=4, arnoldi_iter=8, damping=0.01)),
])
def test_pipeline_equals_in_process(setup, flags, method, kwargs):
    name = "_".join(f.strip("-").replace("=", "-") for f in flags)
    out, manifest = run_pipeline(setup, name, *flags)
    c = calc(setup, method, **kwargs)
    t, q = (setup["x"], setup["y"]), (setup["xq"], setup["yq"])
    c.fit(t, queries=q, query_ids=query_ids(N_QUERY))
    scores = c.influence(q, t, query_ids=query_ids(N_QUERY))
    check_against(setup, out, scores, c.self_influence(t))
    assert manifest["row_counts"]["self_influence"] == N_TRAIN
    assert manifest["counters"]["examples_read"] == N_TRAIN + N_QUERY
    assert manifest["artifact"]["method"] == c.method.name


def test_tracin_over_checkpoints(setup):
    out, _ = run_pipeline(setup, "tracin", "--method=tracin",
                          f"--checkpoints={setup['ck1']},{setup['model_path']}",
                          "--learning_rates=0.05,0.01")
    c = calc(setup, "tracin", checkpoints=[setup["ck1"], setup["model_path"]],
             learning_rates=[0.05, 0.01])
    t, q = (setup["x"], setup["y"]), (setup["xq"], setup["yq"])
    check_against(setup, out, c.influence(q, t), c.self_influence(t))


def test_first_and_second_order_groups(setup):
    t, q = (setup["x"], setup["y"]), (setup["xq"], setup["yq"])
    c = calc(setup, solver="exact").fit(t)
    for order in (1, 2):
        out, _ = run_pipeline(setup, f"groups{order}", "--solver=exact", "--group_key=g",
                              f"--group_order={order}")
        res = c.group_influence(q, t, setup["group"], order=order)
        uniq, ref = res[0], res[1]
        got = read(out, "groups")
        assert len(got) == N_QUERY * len(uniq) and set(got.order) == {order}
        mat = got.pivot(index="query_id", columns="group_id", values="score")
        mat = mat.loc[query_ids(N_QUERY), list(uniq)].to_numpy()
        np.testing.assert_allclose(mat, ref, atol=2e-3 * np.abs(ref).max())
        if order == 1:
            gs = read(out, "group_self").set_index("group_id").loc[list(uniq)]
            np.testing.assert_allclose(gs.score.to_numpy(), res[2], rtol=2e-3)
            assert gs["size"].sum() == N_TRAIN


def test_rerun_refuses_then_overwrites(setup):
    out, _ = run_pipeline(setup, "rerun", "--solver=exact")
    argv = [f"--model={setup['model_path']}", f"--train=npz:{setup['dir']}/train.npz",
            f"--queries=npz:{setup['dir']}/queries.npz", f"--output={out}"]
    with pytest.raises(run_lib.RunError, match="already holds a finished result"):
        run_lib.run(argv)
    manifest = json.load(open(os.path.join(out, "run_manifest.json")))
    assert manifest["counters"]["train_examples_scored"] == N_TRAIN


def test_bad_rows_go_to_dead_letters(setup, tmp_path):
    x, y = setup["x"].copy(), setup["y"].copy()
    x[3, 0] = np.nan
    y[7] = 11  # out of range for 3 classes
    np.savez(tmp_path / "bad.npz", x=x, y=y)
    base = [f"--model={setup['model_path']}", f"--train=npz:{tmp_path}/bad.npz",
            f"--queries=npz:{setup['dir']}/queries.npz", "--solver=exact"]
    with pytest.raises(run_lib.RunError, match="dead-lettered, above --max_bad_fraction=0.0"):
        run_lib.run(base + [f"--output={tmp_path}/strict"])
    assert not os.path.exists(tmp_path / "strict" / "_SUCCESS")
    run_lib.run(base + [f"--output={tmp_path}/lenient", "--max_bad_fraction=0.05"])
    dead = read(str(tmp_path / "lenient"), "dead_letter")
    assert sorted(dead.example_id) == ["bad.npz:000000003", "bad.npz:000000007"]
    assert any("non-finite" in e for e in dead.error) and any("bad label" in e for e in dead.error)
    si = read(str(tmp_path / "lenient"), "self_influence")
    assert len(si) == N_TRAIN - 2


def test_clear_errors_for_bad_options(setup, tmp_path):
    base = [f"--train=npz:{setup['dir']}/train.npz", f"--queries=npz:{setup['dir']}/queries.npz",
            f"--output={tmp_path}/o"]
    with pytest.raises(run_lib.RunError, match="--model"):
        run_lib.run(base)
    with pytest.raises(ValueError, match="unknown layer name 'nope'"):
        run_lib.run(base + [f"--model={setup['model_path']}", "--target_layers=nope"])
    with pytest.raises(run_lib.RunError, match="learning_rates"):
        run_lib.run(base + [f"--model={setup['model_path']}", "--method=tracin",
                            f"--checkpoints={setup['ck1']}"])


def test_edge_inputs_fail_with_clear_errors(setup, tmp_path):
    base = [f"--model={setup['model_path']}", f"--queries=npz:{setup['dir']}/queries.npz",
            "--solver=exact"]
    train = f"--train=npz:{setup['dir']}/train.npz"
    # second-order groups need an influence-function method: refused before anything runs
    with pytest.raises(run_lib.RunError, match="--group_order=2"):
        run_lib.run(base + [train, "--method=tracin", f"--checkpoints={setup['ck1']}",
                            "--learning_rates=0.1", "--group_key=g", "--group_order=2",
                            f"--output={tmp_path}/g2"])
    # a group holding the whole training set has no second-order influence
    np.savez(tmp_path / "one_group.npz", x=setup["x"], y=setup["y"],
             g=np.full(N_TRAIN, "all"))
    with pytest.raises(Exception, match="whole training set"):
        run_lib.run(base + [f"--train=npz:{tmp_path}/one_group.npz", "--group_key=g",
                            "--group_order=2", f"--output={tmp_path}/one"])
    assert not os.path.exists(tmp_path / "one" / "_SUCCESS")
    # every training label out of range: refused on the driver, before the job
    np.savez(tmp_path / "all_bad.npz", x=setup["x"], y=np.full(N_TRAIN, 9))
    with pytest.raises(run_lib.RunError, match="none of the first 64 labels can go into"):
        run_lib.run(base + [f"--train=npz:{tmp_path}/all_bad.npz", "--max_bad_fraction=1",
                            f"--output={tmp_path}/dead"])
