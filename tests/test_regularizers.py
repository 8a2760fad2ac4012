"""Keras weight regularisers of the target layers are part of the training objective.

Keras adds ``c * sum(w^2)`` for ``kernel_regularizer=L2(c)`` to the batch-mean training loss, so
the Hessian of the objective gets ``2c`` on that variable's diagonal (``imodel.l2_vector``).
Before, such regularisers were silently dropped: on an L2 logistic regression the correlation of
influence with leave-one-out retraining fell from ~0.99 to ~0.6.
"""

import numpy as np
import pytest

from influence_ops import InfluenceCalculator, InfluenceModel, InfluenceModelError
from influence_ops import gradients as G
from influence_ops import tf_setup
from tests import helpers

tf = tf_setup.tensorflow()
import keras  # noqa: E402

R = keras.regularizers


def regularised_logistic(p, kernel_reg=None, bias_reg=None, activity_reg=None):
    return keras.Sequential([
        keras.Input((p,), dtype="float64"),
        keras.layers.Dense(1, dtype="float64", name="logit", kernel_regularizer=kernel_reg,
                           bias_regularizer=bias_reg, activity_regularizer=activity_reg)])


# ---------------------------------------------------------------------------- (a) Hessian oracle
C_KERNEL, C_BIAS = 0.03, 0.2


@pytest.fixture(scope="module")
def logreg():
    x, y, _, _ = helpers.logistic_data(n=60, p=4, seed=3)
    model = regularised_logistic(x.shape[1], R.L2(C_KERNEL), R.L2(C_BIAS))
    im = InfluenceModel(model, loss="binary_crossentropy", from_logits=True)
    theta = np.random.default_rng(0).normal(size=im.n_params)
    im.set_flat_params(theta)
    g, H0 = helpers.logistic_oracle(theta, x, y, 0.0)
    reg = np.array([2 * C_KERNEL] * x.shape[1] + [2 * C_BIAS])
    return dict(im=im, model=model, x=x, y=y, theta=theta, g=g, H=H0 + np.diag(reg), reg=reg)


def test_l2_vector_reads_the_regularisers(logreg):
    im = logreg["im"]
    assert im.l2 == 0.0 and im.has_regularization
    np.testing.assert_array_equal(im.l2_vector, logreg["reg"])
    assert im.l2_vector.dtype == np.float64 and im.l2_vector.shape == (im.n_params,)
    desc = im.describe()
    assert desc["l2"] == 0.0 and desc["regularizers"] == "include"
    assert desc["l2_from_regularizers"] == pytest.approx(
        {"logit/kernel": 2 * C_KERNEL, "logit/bias": 2 * C_BIAS})


def test_l2_vector_is_the_hessian_of_keras_own_regularisation_loss(logreg):
    """Against Keras itself: d/dtheta sum(model.losses) == l2_vector * theta."""
    im, model = logreg["im"], logreg["model"]
    with tf.GradientTape() as tape:
        model(logreg["x"][:2], training=False)  # model.losses are recomputed from the weights
        penalty = tf.add_n(model.losses)
    grad = im.flatten(tape.gradient(penalty, im._tf_vars)).numpy()
    # rtol 1e-6: Keras rounds the coefficient through float32 (0.03 -> 0.0299999993).
    np.testing.assert_allclose(grad, im.l2_vector * logreg["theta"], rtol=1e-6)


def test_explicit_hessian_and_hvp_include_the_regularisers(logreg):
    im, x, y, H = logreg["im"], logreg["x"], logreg["y"], logreg["H"]
    Hk = G.explicit_hessian(im, x, y)
    np.testing.assert_allclose(Hk, H, atol=1e-12)
    V = np.random.default_rng(1).normal(size=(5, im.n_params))
    np.testing.assert_allclose(G.hessian_vector_products(im, x, y, V, batch_size=7), V @ Hk,
                               atol=1e-12)
    np.testing.assert_allclose(G.hessian_vector_products(im, x, y, V, include_l2=False),
                               V @ (H - np.diag(logreg["reg"])), atol=1e-12)
    np.testing.assert_allclose(G.mean_gradient(im, x, y),
                               logreg["g"].mean(axis=0) + logreg["reg"] * logreg["theta"],
                               atol=1e-12)


def test_explicit_l2_adds_to_the_regularisers(logreg):
    x, y = logreg["x"], logreg["y"]
    im = InfluenceModel(logreg["model"], loss="binary_crossentropy", from_logits=True, l2=0.5)
    np.testing.assert_allclose(im.l2_vector, logreg["reg"] + 0.5)
    np.testing.assert_allclose(G.explicit_hessian(im, x, y), logreg["H"] + 0.5 * np.eye(5),
                               atol=1e-12)


def test_only_target_layers_count():
    """A regulariser below the target layers is frozen: neither read nor rejected."""
    model = keras.Sequential([
        keras.Input((3,), dtype="float64"),
        keras.layers.Dense(4, activation="tanh", dtype="float64", name="hidden",
                           kernel_regularizer=R.L1(0.1), activity_regularizer=R.L2(0.1)),
        keras.layers.Dense(2, dtype="float64", name="out", kernel_regularizer=R.L1L2(0, 0.25)),
    ])
    im = InfluenceModel(model)
    np.testing.assert_array_equal(im.l2_vector, [0.5] * 8 + [0.0] * 2)
    with pytest.raises(InfluenceModelError, match="hidden"):
        InfluenceModel(model, target_layers=2)


# ---------------------------------------------------------------------------- (b) leave-one-out
def _loo_fit(im, x, y, xq, yq, theta, l2):
    """(Pearson, slope) of actual on predicted change of the test loss, influence / n against
    Newton leave-one-out retraining, as in test_leave_one_out.py (the 40 largest |influence|
    per test point)."""
    n = len(x)
    scores = InfluenceCalculator(im, solver="exact").fit((x, y)).influence((xq, yq), (x, y))
    predicted, actual = [], []
    for t in range(len(xq)):
        base = helpers.logistic_loss(theta, xq[t:t + 1], yq[t:t + 1])[0]
        for i in np.argsort(-np.abs(scores[t]))[:40]:
            w = np.ones(n)
            w[i] = 0.0
            theta_i = helpers.newton_logistic(x, y, l2, weights=w)
            actual.append(helpers.logistic_loss(theta_i, xq[t:t + 1], yq[t:t + 1])[0] - base)
            predicted.append(scores[t, i] / n)
    return np.corrcoef(predicted, actual)[0, 1], np.polyfit(predicted, actual, 1)[0]


@pytest.mark.parametrize("l2, n, p", [
    (0.01, 200, 5),   # the setting of test_leave_one_out.py
    (0.3, 100, 20),   # a regulariser that matters: ignoring it predicts a third of the effect
])
def test_keras_l2_regularisers_predict_leave_one_out_like_a_hand_given_l2(l2, n, p):
    x, y, xq, yq = helpers.logistic_data(n=n, p=p, seed=7, n_test=2)
    theta = helpers.newton_logistic(x, y, l2)  # minimises mean l + l2/2 ||[w, b]||^2
    hand = InfluenceModel(helpers.logistic_model(p), loss="binary_crossentropy",
                          from_logits=True, l2=l2)
    # Keras L2(c) adds c ||w||^2: c = l2/2 on kernel and bias is the same objective.
    keras_reg = InfluenceModel(regularised_logistic(p, R.L2(l2 / 2), R.L2(l2 / 2)),
                               loss="binary_crossentropy", from_logits=True)
    ignored = InfluenceModel(regularised_logistic(p, R.L2(l2 / 2), R.L2(l2 / 2)),
                             loss="binary_crossentropy", from_logits=True,
                             regularizers="ignore")
    np.testing.assert_allclose(keras_reg.l2_vector, hand.l2_vector, rtol=1e-15)
    r, slope = {}, {}
    for name, im in (("hand", hand), ("keras", keras_reg), ("ignored", ignored)):
        im.set_flat_params(theta)
        r[name], slope[name] = _loo_fit(im, x, y, xq, yq, theta, l2)
    print(f"\nl2={l2} n={n} p={p}: Pearson (slope) with leave-one-out: l2 by hand "
          f"{r['hand']:.4f} ({slope['hand']:.3f}), Keras L2 regularisers {r['keras']:.4f} "
          f"({slope['keras']:.3f}), regularisers ignored {r['ignored']:.4f} "
          f"({slope['ignored']:.3f})")
    assert r["keras"] >= r["hand"] - 0.005, r
    assert r["keras"] >= 0.95, r
    assert 0.8 < slope["keras"] < 1.25, slope
    if l2 >= 0.3:
        assert slope["ignored"] < 0.6, slope


# ---------------------------------------------------------------------------- (c) unsupported
@pytest.mark.parametrize("kw, what", [
    (dict(kernel_reg=R.L1(0.01)), "L1"),
    (dict(bias_reg=R.L1L2(l1=0.01, l2=0.01)), "L1L2"),
    (dict(kernel_reg=lambda w: 0.1 * tf.reduce_sum(w ** 4)), "custom callable"),
    (dict(activity_reg=R.L2(0.01)), "activity_regularizer"),
])
def test_unsupported_regulariser_is_a_clear_error(kw, what):
    model = regularised_logistic(3, **kw)
    with pytest.raises(InfluenceModelError) as err:
        InfluenceModel(model, loss="binary_crossentropy", from_logits=True)
    msg = str(err.value)
    assert "'logit'" in msg and what in msg and "regularizers='ignore'" in msg
    im = InfluenceModel(model, loss="binary_crossentropy", from_logits=True, l2=0.1,
                        regularizers="ignore")
    np.testing.assert_array_equal(im.l2_vector, [0.1] * 4)
    assert im.describe()["l2_from_regularizers"] == {}


def test_ignore_carries_to_the_models_methods_build():
    """TracIn and RPS-LJE build InfluenceModels of their own on the same layers."""
    x, y, _, _ = helpers.logistic_data(n=30, p=3)
    model = regularised_logistic(3, kernel_reg=R.L1(0.01))
    im = InfluenceModel(model, loss="binary_crossentropy", from_logits=True,
                        regularizers="ignore")
    InfluenceCalculator(im, method="tracin", checkpoints=[model], learning_rates=[0.1])
    InfluenceCalculator(im, method="rps_lje").fit((x, y))
    with pytest.raises(ValueError, match="regularizers must be"):
        InfluenceModel(model, regularizers="drop")


def test_rps_lje_reads_the_regularisers_like_a_hand_given_l2():
    x, y, xq, yq = helpers.logistic_data(n=80, p=3, seed=2)
    theta = helpers.newton_logistic(x, y, 0.2)
    hand = InfluenceModel(helpers.logistic_model(3), loss="binary_crossentropy",
                          from_logits=True, l2=0.2)
    keras_reg = InfluenceModel(regularised_logistic(3, R.L2(0.1), R.L2(0.1)),
                               loss="binary_crossentropy", from_logits=True)
    out = []
    for im in (hand, keras_reg):
        im.set_flat_params(theta)
        calc = InfluenceCalculator(im, method="rps_lje", lje_step=1e-3).fit((x, y))
        assert calc.method.perturbed.has_regularization
        out.append(calc.influence((xq, yq), (x, y)))
    np.testing.assert_allclose(out[1], out[0], rtol=1e-9, atol=1e-12)
    # At the optimum the representer values sum to the logit (the regulariser's share included).
    np.testing.assert_allclose(out[1].sum(axis=1), (np.c_[xq, np.ones(len(xq))] @ theta)
                               * np.where(yq[:, 0] >= 0.5, 1, -1), atol=1e-10)


# ---------------------------------------------------------------------------- (d) save / load
def test_saved_model_keeps_its_regularisers(tmp_path, logreg):
    path = str(tmp_path / "reg.keras")
    logreg["model"].save(path)
    im = InfluenceModel(path, loss="binary_crossentropy", from_logits=True)  # safe-mode load
    np.testing.assert_array_equal(im.l2_vector, logreg["reg"])
    assert im.describe()["l2_from_regularizers"] == logreg["im"].describe()[
        "l2_from_regularizers"]
    np.testing.assert_allclose(G.explicit_hessian(im, logreg["x"], logreg["y"]), logreg["H"],
                               atol=1e-12)
