"""The numpy closed forms for a last Dense layer under softmax cross-entropy on logits
(influence_ops/lastlayer.py) against the general TensorFlow path they replace.

Both compute the same quantities in float64 models, so they agree to ~1e-12 relative (we allow
1e-9: different summation orders). A float32 model agrees to float32 rounding (1e-4 relative).
"""

import numpy as np
import pytest

from influence_ops import InfluenceModel, gradients as grads, lastlayer
from tests import helpers

keras = helpers.keras


def _pair(model, **kw):
    """The same model wrapped twice: closed forms, and forced onto the TensorFlow path."""
    fast = InfluenceModel(model, target_layers=1, from_logits=True, **kw)
    slow = InfluenceModel(model, target_layers=1, from_logits=True, **kw)
    slow._fns["lastlayer"] = False  # the cached applicability: False = general TF path
    assert lastlayer.applicable(fast)
    return fast, slow


def _rel(a, b):
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)


@pytest.mark.parametrize("labels", ["sparse", "onehot", "soft", "weighted"])
def test_closed_forms_equal_the_tensorflow_path(labels, monkeypatch):
    monkeypatch.setattr(lastlayer, "HVP_CHUNK", 50)  # HVPs one vector at a time: chunking
    x, y, _, _ = helpers.classification_data(n=37, p=4, classes=3)
    model = helpers.mlp_classifier(4, 3)
    loss = ("categorical_crossentropy" if labels in ("onehot", "soft")
            else "sparse_categorical_crossentropy")
    fast, slow = _pair(model, loss=loss, l2=0.01)
    if labels == "onehot":
        y = np.eye(3)[y]
    elif labels == "soft":  # rows not summing to 1: both paths take p - y (TF's gradient)
        y = np.random.default_rng(1).random((len(y), 3)) * 0.7
    if labels == "weighted":
        w = np.random.default_rng(2).random(len(y)) * 2
        for im in (fast, slow):
            im.set_sample_weighted(True)
        y = fast.pack_labels(y, w)
    # Batch sizes that split the rows unevenly: the batching must not matter.
    G = grads.per_example_gradients(fast, x, y, batch_size=16)
    assert _rel(G, grads.per_example_gradients(slow, x, y)) < 1e-9
    P = np.random.default_rng(3).normal(size=(fast.n_params, 5))
    assert _rel(grads.projected_gradients(fast, x, y, P, batch_size=10),
                grads.projected_gradients(slow, x, y, P)) < 1e-9
    assert _rel(G @ P, grads.projected_gradients(fast, x, y, P)) < 1e-9
    for got, want in zip(grads.losses_and_outputs(fast, x, y, batch_size=10),
                         grads.losses_and_outputs(slow, x, y)):
        assert _rel(got, want) < 1e-9
    assert _rel(grads.per_example_losses(fast, x, y), grads.per_example_losses(slow, x, y)) < 1e-9
    H = grads.hessian_sum(fast, x, y, batch_size=8)
    assert _rel(H, grads.hessian_sum(slow, x, y)) < 1e-9
    V = np.random.default_rng(4).normal(size=(3, fast.n_params))
    HV = grads.hessian_vector_products(fast, x, y, V, batch_size=16)
    assert _rel(HV, grads.hessian_vector_products(slow, x, y, V)) < 1e-9
    assert _rel(HV, V @ (H / len(x) + np.diag(fast.l2_vector))) < 1e-9   # H symmetric
    acts = grads.front_activations(fast, x)
    assert _rel(grads.hessian_vector_products(fast, acts, y, V, reduce="sum"),
                grads.hessian_vector_products(slow, grads.front_activations(slow, x), y, V,
                                              reduce="sum")) < 1e-9
    assert np.allclose(H, H.T, rtol=0, atol=1e-12 * np.abs(H).max())


def test_float32_model_agrees_to_float32_rounding():
    x, y, _, _ = helpers.classification_data(n=40, p=4, classes=3)
    fast, slow = _pair(helpers.mlp_classifier(4, 3, dtype="float32"),
                       loss="sparse_categorical_crossentropy")
    x = x.astype(np.float32)
    G = grads.per_example_gradients(fast, x, y)
    assert G.dtype == np.float32
    assert _rel(G, grads.per_example_gradients(slow, x, y)) < 1e-4
    assert _rel(grads.hessian_sum(fast, x, y), grads.hessian_sum(slow, x, y)) < 1e-4


@pytest.mark.parametrize("case", ["softmax_activation", "two_targets", "probabilities",
                                  "no_bias", "binary", "label_smoothing", "ignore_class"])
def test_not_applicable_outside_its_assumptions(case):
    dt = "float64"
    kw = dict(loss="sparse_categorical_crossentropy", from_logits=True, target_layers=1)
    last = keras.layers.Dense(3, dtype=dt)
    if case == "softmax_activation":
        last = keras.layers.Dense(3, activation="softmax", dtype=dt)
        kw["from_logits"] = False
    elif case == "probabilities":
        kw["from_logits"] = False
    elif case == "no_bias":
        last = keras.layers.Dense(3, use_bias=False, dtype=dt)
    elif case == "binary":
        last = keras.layers.Dense(1, dtype=dt)
        kw["loss"] = "binary_crossentropy"
    elif case == "two_targets":
        kw["target_layers"] = 2
    elif case == "label_smoothing":  # dl/dz is no longer p - y
        kw["loss"] = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None,
                                                          label_smoothing=0.1)
    elif case == "ignore_class":     # rows of that class have no loss
        kw["loss"] = keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                                reduction=None, ignore_class=0)
    model = keras.Sequential([keras.Input((4,), dtype=dt),
                              keras.layers.Dense(5, activation="tanh", dtype=dt), last])
    assert not lastlayer.applicable(InfluenceModel(model, **kw))



@pytest.mark.parametrize("target_layers", [1, 2, "general"])
def test_record_forward_gives_the_losses_and_outputs_of_the_projection_pass(target_layers):
    """gradients.record_forward: projected_gradients records the per-example losses and the
    model outputs of its own forward pass (last-layer closed form, the per-layer TF path);
    heads outside those paths record nothing (the pipeline then runs a second pass)."""
    x, y, _, _ = helpers.classification_data(n=37, p=4, classes=3)
    model = helpers.mlp_classifier(4, 3)
    if target_layers == "general":   # a target that is not Dense / Conv2D: general path
        model = keras.Sequential([keras.Input((4,), dtype="float64"), model.layers[0],
                                  keras.layers.EinsumDense("ab,bc->ac", output_shape=3,
                                                           bias_axes="c", dtype="float64")])
    im = InfluenceModel(model, target_layers=1 if target_layers == "general" else target_layers,
                        from_logits=True)
    P = np.random.default_rng(3).normal(size=(im.n_params, 4))
    with grads.record_forward() as forward:
        proj = grads.projected_gradients(im, x, y, P, batch_size=10)
    assert _rel(proj, grads.per_example_gradients(im, x, y) @ P) < 1e-9
    if target_layers == "general":
        assert forward == []
        return
    (who, losses, outputs), = forward
    want_losses, want_outputs = grads.losses_and_outputs(im, x, y)
    assert who is im
    assert _rel(losses, want_losses) < 1e-9 and _rel(outputs, want_outputs) < 1e-9
    with grads.record_forward() as inner:
        pass
    grads.projected_gradients(im, x, y, P)   # outside the context: nothing recorded
    assert inner == [] and len(forward) == 1
