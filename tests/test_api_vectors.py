"""Influence vectors wherever the seed library defines them, through the notebook API, against
float64 numpy definitions: group vectors (first and second order), TracIn vectors,
representer-point vectors and ``predict_with_kernel``."""

import keras
import numpy as np
import pytest

from influence_ops import InfluenceCalculator, InfluenceModel
from influence_ops import gradients as G
from tests import helpers

tf = helpers.tf
L2 = 0.05


@pytest.fixture(scope="module")
def logreg():
    return helpers.logistic_setup(90, L2)


def test_first_order_group_vectors_stream_and_give_the_group_scores(logreg):
    x, y = logreg["x"], logreg["y"]
    gid = np.array(["a", "b", "c", "d"])[np.arange(len(x)) % 4]
    calc = InfluenceCalculator(logreg["im"], solver="exact").fit((x, y))
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(13)
    uniq, V = calc.group_influence_vectors(ds, gid)
    assert list(uniq) == ["a", "b", "c", "d"]
    for j, grp in enumerate(uniq):
        ref = np.linalg.solve(logreg["H"], logreg["g"][gid == grp].sum(axis=0))
        np.testing.assert_allclose(V[j], ref, rtol=1e-8, atol=1e-12)
    _, scores, _ = calc.group_influence((logreg["xq"], logreg["yq"]), (x, y), gid)
    np.testing.assert_allclose(logreg["gq"] @ V.T, scores, rtol=1e-8, atol=1e-12)


def test_relatif_group_vectors_give_relatif_group_scores(logreg):
    x, y = logreg["x"], logreg["y"]
    gid = (np.arange(len(x)) % 3).astype(str)
    calc = InfluenceCalculator(logreg["im"], method="relatif", solver="exact").fit((x, y))
    uniq, V = calc.group_influence_vectors((x, y), gid)
    sol = np.linalg.solve(logreg["H"], logreg["g"].T).T
    sol /= np.linalg.norm(sol, axis=1, keepdims=True)
    for j, grp in enumerate(uniq):
        np.testing.assert_allclose(V[j], sol[gid == grp].sum(axis=0), rtol=1e-8)
    _, scores, _ = calc.group_influence((logreg["xq"], logreg["yq"]), (x, y), gid)
    np.testing.assert_allclose(logreg["gq"] @ V.T, scores, rtol=1e-8, atol=1e-12)


def test_second_order_group_vectors_match_basu_formula(logreg):
    x, y = logreg["x"], logreg["y"]
    n = len(x)
    gid = (np.arange(n) % 3).astype(str)
    calc = InfluenceCalculator(logreg["im"], solver="exact").fit((x, y))
    uniq, V = calc.group_influence_vectors((x, y), gid, order=2)
    xa = np.concatenate([x, np.ones((n, 1))], axis=1)
    pr = 1 / (1 + np.exp(-(xa @ logreg["theta"])))
    Hinv = np.linalg.inv(logreg["H"])
    for j, grp in enumerate(uniq):
        mem = gid == grp
        p = mem.sum() / n
        gU = logreg["g"][mem].sum(axis=0)
        HU = (xa[mem] * (pr[mem] * (1 - pr[mem]))[:, None]).T @ xa[mem]
        v = (1 - 2 * p) / (1 - p) ** 2 * Hinv @ gU + Hinv @ HU @ Hinv @ gU / ((1 - p) ** 2 * n)
        np.testing.assert_allclose(V[j], v, rtol=1e-8)
    _, scores = calc.group_influence((logreg["xq"], logreg["yq"]), (x, y), gid, order=2)
    np.testing.assert_allclose(logreg["gq"] @ V.T, scores, rtol=1e-8)


def test_tracin_vectors_are_scaled_gradients(logreg):
    x, y = logreg["x"], logreg["y"]
    m1 = logreg["im"].model
    m2 = keras.models.clone_model(m1)
    theta2 = logreg["theta"] * 0.5
    m2.set_weights([theta2[:-1].reshape(-1, 1), theta2[-1:]])
    lrs = [0.1, 0.02]
    calc = InfluenceCalculator(logreg["im"], method="tracin", checkpoints=[m1, m2],
                               learning_rates=lrs, loss="binary_crossentropy",
                               from_logits=True)
    V = calc.influence_vectors(tf.data.Dataset.from_tensor_slices((x, y)).batch(32))
    g1, _ = helpers.logistic_oracle(logreg["theta"], x, y, 0.0)
    g2, _ = helpers.logistic_oracle(theta2, x, y, 0.0)
    np.testing.assert_allclose(V, np.concatenate([np.sqrt(0.1) * g1, np.sqrt(0.02) * g2], 1),
                               rtol=1e-10)
    q1, _ = helpers.logistic_oracle(logreg["theta"], logreg["xq"], logreg["yq"], 0.0)
    q2, _ = helpers.logistic_oracle(theta2, logreg["xq"], logreg["yq"], 0.0)
    ref = 0.1 * q1 @ g1.T + 0.02 * q2 @ g2.T
    np.testing.assert_allclose(calc.influence((logreg["xq"], logreg["yq"]), (x, y)), ref,
                               rtol=1e-10)


def test_rps_l2_vectors_and_kernel_prediction_are_the_surrogates(logreg):
    """RPS-L2 guarantees the representer decomposition of its *surrogate* (bias-free, fitted
    to the model's predictions with L2): sum_i alpha_i <f_i, f_t> = f_t W at its optimum. It
    is not the model's own logit (the model has a bias and was fitted to the labels)."""
    x, y = logreg["x"], logreg["y"]
    lam = 1e-2
    calc = InfluenceCalculator(logreg["im"], method="rps_l2", rps_lambda=lam).fit((x, y))
    W = calc.method.W
    t = 1 / (1 + np.exp(-(x @ logreg["theta"][:-1] + logreg["theta"][-1])))
    alpha = -(1 / (1 + np.exp(-(x @ W[:, 0]))) - t) / (2 * lam * len(x))
    V = calc.influence_vectors((x, y))
    np.testing.assert_allclose(V, alpha[:, None] * x, rtol=1e-8, atol=1e-12)
    pred = calc.predict_with_kernel(logreg["xq"], tf.data.Dataset.from_tensor_slices(
        (x, y)).batch(20))
    assert pred.shape == (len(logreg["xq"]), 1)
    # Exact up to the surrogate's stationarity: |grad| ~ fit_gradient_norm.
    assert calc.method.fit_gradient_norm < 1e-8
    np.testing.assert_allclose(pred[:, 0], logreg["xq"] @ W[:, 0], atol=1e-7)
    model_logit = logreg["xq"] @ logreg["theta"][:-1] + logreg["theta"][-1]
    assert np.abs(pred[:, 0] - model_logit).max() > 1e-3  # what is *not* guaranteed


def test_rps_l2_kernel_prediction_multiclass(logreg):
    x, y, xq, _ = helpers.classification_data(n=60, seed=3)
    model = helpers.mlp_classifier(x.shape[1], 3, hidden=5, seed=3)
    calc = InfluenceCalculator(InfluenceModel(model), method="rps_l2",
                               rps_lambda=1e-2).fit((x, y))
    pred = calc.predict_with_kernel(xq, (x, y))
    F = G.penultimate_features(calc.imodel, xq)
    np.testing.assert_allclose(pred, F @ calc.method.W, atol=1e-6)


def test_rps_lje_kernel_prediction_is_the_model_logit_at_the_optimum(logreg):
    """RPS-LJE's decomposition sums to the logits after one Newton step; at the stationary
    point of the L2-regularised objective that step returns to theta: the model's logits."""
    x, y = logreg["x"], logreg["y"]
    calc = InfluenceCalculator(logreg["im"], method="rps_lje", lje_step=1e-3).fit((x, y))
    V = calc.influence_vectors((x, y))
    assert V.shape[1] == calc.method.curvature.feature_dim + 1
    pred = calc.predict_with_kernel(logreg["xq"], (x, y))
    model_logit = logreg["xq"] @ logreg["theta"][:-1] + logreg["theta"][-1]
    np.testing.assert_allclose(pred[:, 0], model_logit, atol=1e-10)
