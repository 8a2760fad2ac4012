"""Per-example gradients: the per-layer fast path (Dense, Conv2D) and the vectorized_map path
against a one-example-at-a-time GradientTape oracle (float64, so agreement is ~1e-12)."""

import keras
import numpy as np
import pytest

from influence_ops import InfluenceModel
from influence_ops import gradients as G
from influence_ops import tf_setup

tf = tf_setup.tensorflow()


def loop_oracle(im, x, y):
    rows = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(im.per_example_loss(y[i:i + 1], im.model(x[i:i + 1])))
        rows.append(np.concatenate([np.reshape(g, -1) for g in tape.gradient(
            loss, im._tf_vars)]))
    return np.stack(rows)


def cnn(padding, strides):
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((9, 9, 2), dtype="float64"),
        keras.layers.Conv2D(3, 3, strides=strides, padding=padding, activation="relu",
                            dtype="float64", name="c1"),
        keras.layers.Conv2D(4, 2, padding=padding, activation="tanh", dtype="float64",
                            name="c2"),
        keras.layers.Flatten(dtype="float64"),
        keras.layers.Dense(5, activation="relu", dtype="float64", name="d1"),
        keras.layers.Dense(3, dtype="float64", name="d2"),
    ])


@pytest.mark.parametrize("padding,strides", [("valid", 1), ("same", 2)])
def test_conv_and_dense_fast_path_equals_oracle(padding, strides):
    model = cnn(padding, strides)
    im = InfluenceModel(model, target_layers=4)
    assert G._fast_path_layers(im) is not None
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 9, 9, 2))
    y = rng.integers(0, 3, 7)
    ref = loop_oracle(im, x, y)
    np.testing.assert_allclose(G.per_example_gradients(im, x, y, batch_size=4), ref, atol=1e-10)
    P = rng.normal(size=(im.n_params, 6))
    np.testing.assert_allclose(G.projected_gradients(im, x, y, P, batch_size=4), ref @ P,
                               atol=1e-9)


def test_partial_head_and_fallback_path_equal_oracle():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 9, 9, 2))
    y = rng.integers(0, 3, 6)
    # Target only the Dense layers: the conv front runs once without a tape.
    im = InfluenceModel(cnn("valid", 1), target_layers=["d1", "d2"])
    np.testing.assert_allclose(G.per_example_gradients(im, x, y), loop_oracle(im, x, y),
                               atol=1e-10)
    # A functional model (not split) and a LayerNormalization target use vectorized_map.
    keras.utils.set_random_seed(2)
    inp = keras.Input((4,), dtype="float64")
    h = keras.layers.Dense(5, activation="tanh", dtype="float64")(inp)
    h = keras.layers.LayerNormalization(dtype="float64", name="ln")(h)
    out = keras.layers.Dense(3, dtype="float64")(h)
    fm = keras.Model(inp, out)
    im2 = InfluenceModel(fm, target_layers=2)
    assert G._fast_path_layers(im2) is None
    x2 = rng.normal(size=(6, 4))
    np.testing.assert_allclose(G.per_example_gradients(im2, x2, y), loop_oracle(im2, x2, y),
                               atol=1e-10)
    P = rng.normal(size=(im2.n_params, 3))
    np.testing.assert_allclose(G.projected_gradients(im2, x2, y, P),
                               loop_oracle(im2, x2, y) @ P, atol=1e-10)
    # forward-mode JVPs (the non-fast-path route of directional_derivatives)
    np.testing.assert_allclose(G.directional_derivatives(im2, x2, y, P.T),
                               loop_oracle(im2, x2, y) @ P, atol=1e-10)


def test_layers_outside_the_fast_path_use_the_general_path():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 5)
    # Dense on a sequence (weights shared over time) and BatchNormalization targets.
    keras.utils.set_random_seed(3)
    seq = keras.Sequential([keras.Input((7, 4), dtype="float64"),
                            keras.layers.Dense(6, activation="tanh", dtype="float64"),
                            keras.layers.GlobalAveragePooling1D(dtype="float64"),
                            keras.layers.Dense(3, dtype="float64")])
    bn = keras.Sequential([keras.Input((4,), dtype="float64"),
                           keras.layers.Dense(6, dtype="float64"),
                           keras.layers.BatchNormalization(dtype="float64", name="bn"),
                           keras.layers.Dense(3, dtype="float64")])
    for model, shape in ((seq, (5, 7, 4)), (bn, (5, 4))):
        im = InfluenceModel(model, target_layers=2)
        assert G._fast_path_layers(im) is None
        x = rng.normal(size=shape)
        ref = loop_oracle(im, x, y)
        np.testing.assert_allclose(G.per_example_gradients(im, x, y), ref, atol=1e-10)
        P = rng.normal(size=(im.n_params, 4))
        np.testing.assert_allclose(G.projected_gradients(im, x, y, P), ref @ P, atol=1e-10)


def test_softmax_layer_output_is_recognised_as_probabilities():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Softmax()])
    assert InfluenceModel(model, target_layers=1)._loss_fn.from_logits is False
    act = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                            keras.layers.Activation("softmax")])
    assert InfluenceModel(act)._loss_fn.from_logits is False
    logits = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    assert InfluenceModel(logits)._loss_fn.from_logits is True
