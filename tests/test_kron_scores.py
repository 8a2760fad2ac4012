"""Streaming scores against solved queries (gradients.streaming_scores), float64 models.

Reference: ``per_example_gradients(...) @ Psi.T`` (the per-example gradients are themselves
checked against a one-example-at-a-time GradientTape in test_gradients.py). Tolerance 1e-6
relative (max-abs error over max-abs reference), as the brief sets; in float64 both sides are
the same sums in a different order, so the measured error is ~1e-14. Losses must equal
``per_example_losses`` to 1e-12 relative (the same float64 forward pass, batched differently).
"""

import keras
import numpy as np
import pytest

from influence_ops import InfluenceModel
from influence_ops import gradients as G

N = 7        # examples; batch_size=4 leaves a ragged last batch
BATCH = 4


def rel_err(a, b):
    return np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max()


def dense_head(use_bias):
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((6,), dtype="float64"),
        keras.layers.Dense(7, activation="tanh", use_bias=use_bias, dtype="float64",
                           name="h"),
        keras.layers.Dense(3, use_bias=use_bias, dtype="float64", name="out"),
    ])


def conv_head(padding, strides, use_bias):
    """conv1: kdim 18 > cout 4 (Psi applied to patches first); conv2: kdim 16 < cout 24
    (Psi applied to the signals first); then a Dense layer. All three are targets."""
    keras.utils.set_random_seed(1)
    return keras.Sequential([
        keras.Input((9, 9, 2), dtype="float64"),
        keras.layers.Conv2D(4, 3, strides=strides, padding=padding, activation="relu",
                            use_bias=use_bias, dtype="float64", name="c1"),
        keras.layers.Conv2D(24, 2, padding=padding, activation="tanh", use_bias=use_bias,
                            dtype="float64", name="c2"),
        keras.layers.Flatten(dtype="float64"),
        keras.layers.Dense(3, use_bias=use_bias, dtype="float64", name="out"),
    ])


def check(im, x, y, m, mode, seed=0):
    Psi = np.random.default_rng(seed).normal(size=(m, im.n_params))
    ref = G.per_example_gradients(im, x, y) @ Psi.T
    scores, losses = G.streaming_scores(im, x, y, Psi, batch_size=BATCH, return_losses=True,
                                        mode=mode)
    assert scores.shape == (len(x), m) and scores.dtype == np.float64
    assert rel_err(scores, ref) <= 1e-6
    np.testing.assert_allclose(losses, G.per_example_losses(im, x, y), rtol=1e-12, atol=0)
    return scores


def assert_rule(plan):
    for p in plan:
        want = "kron" if p["flops_kron"] <= p["flops_materialize"] else "materialize"
        assert p["mode"] == want, p


@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_head(use_bias):
    im = InfluenceModel(dense_head(use_bias), target_layers=2)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(N, 6)), rng.integers(0, 3, N)
    # Rule for Dense (T = 1): kron iff m * min(n_in, n_out) <= n_in * n_out.
    small, large = G.score_plan(im, 3), G.score_plan(im, 50)
    assert [p["mode"] for p in small] == ["kron", "kron"]
    assert [p["mode"] for p in large] == ["materialize", "materialize"]
    assert [p["order"] for p in small] == ["delta_first", "a_first"]  # 6->7, 7->3
    assert_rule(small), assert_rule(large)
    for m, mode in ((3, "auto"), (50, "auto"), (5, "kron"), (5, "materialize")):
        check(im, x, y, m, mode)
    # a single query as a 1-D vector
    psi = np.random.default_rng(1).normal(size=im.n_params)
    np.testing.assert_allclose(G.streaming_scores(im, x, y, psi)[:, 0],
                               G.per_example_gradients(im, x, y) @ psi, rtol=1e-10)
    # queries prepared once and reused over blocks give the same scores
    Psi = np.random.default_rng(2).normal(size=(4, im.n_params))
    prepared = G.StreamingQueries(im, Psi)
    ref = G.per_example_gradients(im, x, y) @ Psi.T
    for s in (slice(0, 3), slice(3, N)):
        assert rel_err(G.streaming_scores(im, x[s], y[s], prepared), ref[s]) <= 1e-6


@pytest.mark.parametrize("padding,strides", [("valid", 1), ("valid", 2), ("same", 1),
                                             ("same", 2)])
@pytest.mark.parametrize("use_bias", [True, False])
def test_conv2d_head(padding, strides, use_bias):
    im = InfluenceModel(conv_head(padding, strides, use_bias), target_layers=3)
    assert G._fast_path_layers(im) is not None
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(N, 9, 9, 2)), rng.integers(0, 3, N)
    plan1 = G.score_plan(im, 1)
    assert [p["kind"] for p in plan1] == ["conv2d", "conv2d", "dense"]
    assert [p["order"] for p in plan1[:2]] == ["a_first", "delta_first"]
    out = 9 if padding == "same" else 7
    out = -(-out // strides) if padding == "same" else (out - 1) // strides + 1
    assert plan1[0]["T"] == out * out
    assert_rule(plan1)
    plan5 = G.score_plan(im, 5)
    assert_rule(plan5)
    # With T >= 2 and m >= 2 forming the kernel gradient once always wins for Conv2D.
    assert [p["mode"] for p in plan5[:2]] == ["materialize", "materialize"]
    results = {mode: check(im, x, y, 5, mode) for mode in ("auto", "kron", "materialize")}
    np.testing.assert_allclose(results["kron"], results["materialize"], rtol=1e-10, atol=1e-12)
    check(im, x, y, 1, "auto")


def test_conv_rule_picks_kron_for_a_single_query_on_a_small_map():
    # valid, stride 2: c1 has T = 16 < kdim*cout / min(kdim, cout) = 18, so at m = 1 the
    # Kronecker form is cheaper (16*(72+4) = 1216 vs 72*17 = 1224); at m = 2 it is not.
    im = InfluenceModel(conv_head("valid", 2, True), target_layers=3)
    p1, p2 = G.score_plan(im, 1)[0], G.score_plan(im, 2)[0]
    assert (p1["T"], p1["flops_kron"], p1["flops_materialize"]) == (16, 1216, 1224)
    assert p1["mode"] == "kron" and p2["mode"] == "materialize"


def test_general_path_and_float32_output():
    # A functional model with a LayerNormalization target: no per-layer fast path.
    keras.utils.set_random_seed(2)
    inp = keras.Input((4,), dtype="float64")
    h = keras.layers.Dense(5, activation="tanh", dtype="float64")(inp)
    h = keras.layers.LayerNormalization(dtype="float64", name="ln")(h)
    out = keras.layers.Dense(3, dtype="float64")(h)
    im = InfluenceModel(keras.Model(inp, out), target_layers=2)
    assert G.score_plan(im, 4) is None
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(N, 4)), rng.integers(0, 3, N)
    check(im, x, y, 4, "auto")

    # float32 model: float32 output by default, float64 on request (contraction in float64).
    keras.utils.set_random_seed(4)
    m32 = keras.Sequential([keras.Input((6,)), keras.layers.Dense(7, activation="tanh"),
                            keras.layers.Dense(3)])
    im32 = InfluenceModel(m32, target_layers=2)
    x32 = rng.normal(size=(N, 6)).astype(np.float32)
    Psi = rng.normal(size=(4, im32.n_params))
    ref = G.per_example_gradients(im32, x32, y).astype(np.float64) @ Psi.T
    s32 = G.streaming_scores(im32, x32, y, Psi)
    s64, l64 = G.streaming_scores(im32, x32, y, Psi, dtype=np.float64, return_losses=True)
    assert s32.dtype == np.float32 and s64.dtype == np.float64 and l64.dtype == np.float32
    assert rel_err(s32, ref) <= 1e-5 and rel_err(s64, ref) <= 1e-5
    np.testing.assert_allclose(l64, G.per_example_losses(im32, x32, y), rtol=1e-6)


def test_bad_arguments():
    im = InfluenceModel(dense_head(True), target_layers=2)
    x, y = np.zeros((2, 6)), np.zeros(2, dtype=int)
    with pytest.raises(ValueError, match="Psi must be"):
        G.streaming_scores(im, x, y, np.zeros((2, im.n_params + 1)))
    with pytest.raises(ValueError, match="mode"):
        G.streaming_scores(im, x, y, np.zeros((2, im.n_params)), mode="fast")
    other = InfluenceModel(dense_head(True), target_layers=2)
    with pytest.raises(ValueError, match="another InfluenceModel"):
        G.streaming_scores(im, x, y, G.StreamingQueries(other, np.zeros((2, im.n_params))))
