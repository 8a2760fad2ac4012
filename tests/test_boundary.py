"""Boundary distances against closed forms (linear models) and against the model itself
(a non-linear MLP: the reported perturbation flips the prediction, 0.9 of it does not)."""

import numpy as np
import pytest

from influence_ops import InfluenceCalculator, InfluenceModel
from influence_ops import tf_setup
from influence_ops.boundary import sample_boundary, weights_boundary

tf_setup.tensorflow()
import keras  # noqa: E402


def _linear(n_in, n_out, activation=None, seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((n_in,), dtype="float64"),
                              keras.layers.Dense(n_out, activation=activation, dtype="float64")])
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(n_in, n_out))
    b = rng.normal(size=(n_out,))
    model.layers[0].kernel.assign(W)
    model.layers[0].bias.assign(b)
    return model, W, b


def _points(n, d, seed=1):
    return np.random.default_rng(seed).normal(size=(n, d))


@pytest.mark.parametrize("activation,loss", [(None, "binary_crossentropy"),
                                             ("sigmoid", "binary_crossentropy")])
def test_binary_linear_closed_forms(activation, loss):
    model, W, b = _linear(5, 1, activation)
    imodel = InfluenceModel(model, loss=loss)
    x = _points(40, 5)
    f = x @ W[:, 0] + b[0]
    np.testing.assert_allclose(sample_boundary(imodel, x), np.abs(f) / np.linalg.norm(W),
                               rtol=1e-4)
    # Kernel and bias perturbed: d f / d(w, b) = (x, 1).
    expect_w = np.abs(f) / np.sqrt((x * x).sum(axis=1) + 1.0)
    np.testing.assert_allclose(weights_boundary(imodel, x, batch_size=16), expect_w, rtol=1e-4)


@pytest.mark.parametrize("output", ["dense_softmax", "softmax_layer", "logits"])
def test_multiclass_linear_closed_form(output):
    n_in, C = 6, 4
    if output == "softmax_layer":
        model, W, b = _linear(n_in, C)
        model = keras.Sequential([keras.Input((n_in,), dtype="float64"), model.layers[0],
                                  keras.layers.Softmax(dtype="float64")])
    else:
        model, W, b = _linear(n_in, C, "softmax" if output == "dense_softmax" else None)
    imodel = InfluenceModel(model, target_layers=[model.layers[0].name])
    x = _points(50, n_in)
    z = x @ W + b
    p = z.argmax(axis=1)
    rows = np.arange(len(x))
    gaps = np.abs(z[rows, p][:, None] - z)                          # (n, C)
    wdiff = np.linalg.norm(W[:, p].T[:, :, None] - W[None, :, :], axis=1)   # (n, C)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(np.arange(C)[None] == p[:, None], np.inf, gaps / wdiff)
    np.testing.assert_allclose(sample_boundary(imodel, x, batch_size=16), ratio.min(axis=1),
                               rtol=1e-4)
    # Weight space: grad of (f_j - f_p) w.r.t. (W, b) is (x, 1) in column j and -(x, 1) in
    # column p, norm sqrt(2 (||x||^2 + 1)).
    gap = np.where(np.arange(C)[None] == p[:, None], np.inf, gaps).min(axis=1)
    expect_w = gap / np.sqrt(2.0 * ((x * x).sum(axis=1) + 1.0))
    np.testing.assert_allclose(weights_boundary(imodel, x), expect_w, rtol=1e-4)


def _mlp(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((4,), dtype="float64"),
        keras.layers.Dense(16, activation="tanh", dtype="float64"),
        keras.layers.Dense(8, activation="relu", dtype="float64"),
        keras.layers.Dense(3, activation="softmax", dtype="float64"),
    ])
    return model


def test_mlp_input_perturbation_is_at_the_boundary():
    model = _mlp()
    imodel = InfluenceModel(model)
    x = _points(30, 4, seed=3)
    dist, r = sample_boundary(imodel, x, return_perturbation=True)
    assert np.isfinite(dist).all()
    np.testing.assert_allclose(np.linalg.norm(r, axis=1), dist, rtol=1e-12)

    def cls(a):
        return model(a).numpy().argmax(axis=1)
    before = cls(x)
    assert (cls(x + 1.001 * r) != before).all()
    assert (cls(x + 0.9 * r) == before).all()


def test_mlp_weight_perturbation_is_at_the_boundary_and_weights_are_unchanged():
    model = _mlp(seed=1)
    imodel = InfluenceModel(model, target_layers=2)               # two Dense layers, d = 163
    x = _points(12, 4, seed=4)
    weights_before = [w.numpy().copy() for w in model.weights]
    dist, delta = weights_boundary(imodel, x, batch_size=5, return_perturbation=True)
    for w, w0 in zip(model.weights, weights_before):
        np.testing.assert_array_equal(w.numpy(), w0)
    assert delta.shape == (12, imodel.n_params)
    assert np.isfinite(dist).all()
    np.testing.assert_allclose(np.linalg.norm(delta, axis=1), dist, rtol=1e-12)

    theta = imodel.get_flat_params()
    before = model(x).numpy().argmax(axis=1)
    try:
        for i in range(len(x)):
            imodel.set_flat_params(theta + 1.001 * delta[i])
            assert model(x[i:i + 1]).numpy().argmax() != before[i], i
            imodel.set_flat_params(theta + 0.9 * delta[i])
            assert model(x[i:i + 1]).numpy().argmax() == before[i], i
    finally:
        imodel.set_flat_params(theta)


def test_conv_target_weight_perturbation_flips():
    keras.utils.set_random_seed(2)
    model = keras.Sequential([
        keras.Input((6, 6, 1), dtype="float64"),
        keras.layers.Conv2D(3, 3, activation="tanh", padding="same", dtype="float64"),
        keras.layers.Flatten(dtype="float64"),
        keras.layers.Dense(3, dtype="float64"),
    ])
    imodel = InfluenceModel(model, target_layers=[model.layers[0].name])
    x = np.random.default_rng(5).normal(size=(6, 6, 6, 1))
    dist, delta = weights_boundary(imodel, x, return_perturbation=True)
    assert np.isfinite(dist).all()
    theta = imodel.get_flat_params()
    before = model(x).numpy().argmax(axis=1)
    try:
        for i in range(len(x)):
            imodel.set_flat_params(theta + 1.001 * delta[i])
            assert model(x[i:i + 1]).numpy().argmax() != before[i], i
            imodel.set_flat_params(theta + 0.9 * delta[i])
            assert model(x[i:i + 1]).numpy().argmax() == before[i], i
    finally:
        imodel.set_flat_params(theta)


def test_no_direction_to_move_is_inf():
    # A constant classifier (zero kernel): no perturbation of x changes its prediction.
    model, _, _ = _linear(3, 1)
    model.layers[0].kernel.assign(np.zeros((3, 1)))
    imodel = InfluenceModel(model, loss="binary_crossentropy")
    assert np.isinf(sample_boundary(imodel, _points(4, 3))).all()


def test_refusals_name_the_problem():
    model, _, _ = _linear(3, 2, "sigmoid")
    with pytest.raises(ValueError, match="multi-label"):
        sample_boundary(InfluenceModel(model, loss="binary_crossentropy"), _points(2, 3))
    model, _, _ = _linear(3, 1)
    with pytest.raises(ValueError, match="regression"):
        sample_boundary(InfluenceModel(model, loss="mse"), _points(2, 3))
    imodel = InfluenceModel(_mlp())
    with pytest.raises(ValueError, match="max_iter"):
        sample_boundary(imodel, _points(2, 4), max_iter=0)
    with pytest.raises(ValueError, match="expected an InfluenceModel"):
        weights_boundary(_mlp(), _points(2, 4))
    with pytest.raises(ValueError, match="integer features"):
        sample_boundary(imodel, np.ones((2, 4), dtype=np.int64))


def test_calculator_exposes_both_scores():
    model, W, b = _linear(5, 1)
    x = _points(10, 5)
    y = (x @ W[:, 0] + b[0] > 0).astype(np.float64)[:, None]
    calc = InfluenceCalculator(model, method="influence", solver="exact",
                               loss="binary_crossentropy")
    f = np.abs(x @ W[:, 0] + b[0])
    np.testing.assert_allclose(calc.sample_boundary((x, y)), f / np.linalg.norm(W), rtol=1e-4)
    np.testing.assert_allclose(calc.weights_boundary((x, y)),
                               f / np.sqrt((x * x).sum(axis=1) + 1), rtol=1e-4)
