"""Target layers as a range (the seed's start_layer / last_layer): "first:last" by name or
index, a (first, last) tuple of indices or a slice; the CLI takes the same text."""

import keras
import numpy as np
import pytest

from influence_ops import InfluenceCalculator, InfluenceConfig, InfluenceModel
from influence_ops import InfluenceModelError
from influence_ops import gradients as G
from tests import helpers


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((4,), dtype="float64"),
        keras.layers.Dense(5, activation="tanh", dtype="float64", name="dense_1"),
        keras.layers.Dropout(0.0, dtype="float64", name="drop"),
        keras.layers.Dense(4, activation="tanh", dtype="float64", name="dense_2"),
        keras.layers.Dense(3, dtype="float64", name="dense_3"),
    ])


@pytest.mark.parametrize("spec, expected", [
    ("dense_1:dense_2", ["dense_1", "dense_2"]),
    ("drop:dense_3", ["dense_2", "dense_3"]),          # layers without weights are skipped
    ("dense_2:", ["dense_2", "dense_3"]),
    (":dense_1", ["dense_1"]),
    ("1:-1", ["dense_2", "dense_3"]),                  # indices into model.layers
    ((0, 2), ["dense_1", "dense_2"]),
    (slice("dense_1", "dense_3"), ["dense_1", "dense_2", "dense_3"]),
    ("dense_1,dense_2:dense_3", ["dense_1", "dense_2", "dense_3"]),
    (("dense_1", "dense_3"), ["dense_1", "dense_3"]),  # two names stay two names
])
def test_ranges_resolve(model, spec, expected):
    im = InfluenceModel(model, target_layers=spec)
    assert [l.name for l in im.target_layers] == expected
    cfg = InfluenceConfig(target_layers=spec)
    assert [l.name for l in InfluenceModel(model, target_layers=cfg.target_layers)
            .target_layers] == expected


def test_cli_text_equals_python_forms():
    assert InfluenceConfig(target_layers="dense_1:dense_3") == \
        InfluenceConfig(target_layers=slice("dense_1", "dense_3"))
    assert InfluenceConfig(target_layers="0:2") == InfluenceConfig(target_layers=(0, 2))
    from pipelines.options import InfluenceOptions
    from apache_beam.options.pipeline_options import PipelineOptions
    opts = PipelineOptions(["--target_layers=dense_1:dense_3"]).view_as(InfluenceOptions)
    assert opts.target_layers == "dense_1:dense_3"


@pytest.mark.parametrize("spec, match", [
    ("dense_3:dense_1", "comes after"),
    ("nope:dense_2", "unknown layer name 'nope'"),
    ("drop:drop", "no layer with trainable weights"),
    ("0:9", "out of range"),
])
def test_bad_ranges_say_why(model, spec, match):
    with pytest.raises(InfluenceModelError, match=match):
        InfluenceModel(model, target_layers=spec)


def test_influence_over_a_range_equals_the_explicit_hessian_definition(model):
    x, y, xq, yq = helpers.classification_data(n=40)
    calc = InfluenceCalculator(model, solver="exact", target_layers="dense_2:dense_3",
                               l2=0.1).fit((x, y))
    im = calc.imodel
    assert im.n_params == (5 * 4 + 4) + (4 * 3 + 3)
    H = G.explicit_hessian(im, x, y)
    g, gq = G.per_example_gradients(im, x, y), G.per_example_gradients(im, xq, yq)
    ref = gq @ np.linalg.solve(H, g.T)
    np.testing.assert_allclose(calc.influence((xq, yq), (x, y)), ref, rtol=1e-6, atol=1e-9)
