"""Adding a method or a curvature model needs no edit outside its own file.

A toy method (plain gradient dot products, i.e. influence with H = I) and a toy curvature
model (a scaled identity) are registered *here*, in the test module, and nothing else in the
project knows them: the CLI accepts them, the pipeline runs them, their artifacts reload, and
the scores equal their definitions (float64 model; tolerance 1e-8 relative: the pipeline
writes float64 scores of float64 features).
"""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from influence_ops import (InfluenceCalculator, InfluenceMethod, InfluenceModel,
                           register_curvature, register_method)
from influence_ops import gradients as grads
from influence_ops.config import ConfigError
from influence_ops.curvature import Curvature
from pipelines import run as run_lib
from tests import helpers

N_TRAIN, N_QUERY = 60, 4


@register_method("toy_gradient_dot")
class GradientDot(InfluenceMethod):
    """score = <g_test, g_train>: the identity curvature, nothing to fit."""

    @classmethod
    def from_config(cls, imodel, config):
        method = cls(imodel)
        method.scale = 1.0 + config.damping
        return method

    def fit(self, x, y, query_x=None, query_y=None, query_ids=None):
        self.fitted = True
        return self

    def train_features(self, x, y):
        return grads.per_example_gradients(self.imodel, x, y) / self.scale

    def query_features(self, x, y, ids=None):
        return grads.per_example_gradients(self.imodel, x, y)

    def params(self):
        return {"scale": self.scale}

    def restore(self, arrays):
        self.fitted = True


@register_curvature("toy_scaled_identity")
class ScaledIdentity(Curvature):
    """H ~ c I with c the mean diagonal of the Hessian, estimated from one HVP per axis."""

    factored = True

    def fit(self, x, y):
        d = self.imodel.n_params
        hv = grads.hessian_vector_products(self.imodel, x, y, np.eye(d))
        self.c = float(np.trace(hv) / d) + self.damping
        self.fitted = True
        return self

    @property
    def feature_dim(self):
        return self.imodel.n_params

    def solve(self, G):
        return np.asarray(G, np.float64) / self.c

    def train_map(self, G):
        return np.asarray(G, np.float64) / np.sqrt(self.c)

    query_map = train_map

    def gradient_maps(self, x, y, train=True, query=True, inverse_norms=False):
        g = grads.per_example_gradients(self.imodel, x, y).astype(np.float64)
        out = {}
        if train:
            out["train"] = self.train_map(g)
        if query:
            out["query"] = self.query_map(g)
        if inverse_norms:
            out["inverse_norms"] = np.linalg.norm(self.solve(g), axis=1)
        return out

    def arrays(self):
        return {"c": np.array(self.c)}

    def restore(self, arrays):
        self.c = float(arrays["c"])
        self.fitted = True


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("extending")
    x, y, xq, yq = helpers.classification_data(n=N_TRAIN, p=4, classes=3, n_test=N_QUERY, seed=3)
    model = helpers.train(helpers.mlp_classifier(4, 3), x, y,
                          helpers.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          epochs=50)
    model.save(str(d / "model.keras"))
    np.savez(d / "train.npz", x=x, y=y)
    np.savez(d / "queries.npz", x=xq, y=yq)
    return dict(dir=d, x=x, y=y, xq=xq, yq=yq, model_path=str(d / "model.keras"))


def _run(setup, name, *flags):
    d = setup["dir"]
    out = str(d / name)
    run_lib.run([f"--model={setup['model_path']}", f"--train=npz:{d}/train.npz",
                 f"--queries=npz:{d}/queries.npz", f"--output={out}", "--k=3",
                 "--write_pairwise", *flags])
    return out


def _pairwise(out):
    t = pq.read_table(os.path.join(out, "pairwise")).to_pandas()
    return t.pivot(index="query_id", columns="train_id", values="score").to_numpy()


def test_toy_method_runs_in_the_pipeline_and_reloads(setup):
    out = _run(setup, "toy_method", "--method=toy_gradient_dot", "--damping=1.0")
    im = InfluenceModel(setup["model_path"])
    gq = grads.per_example_gradients(im, setup["xq"], setup["yq"]).astype(np.float64)
    g = grads.per_example_gradients(im, setup["x"], setup["y"]).astype(np.float64)
    expected = gq @ g.T / 2.0  # damping 1 -> scale 2
    np.testing.assert_allclose(_pairwise(out), expected, rtol=1e-8,
                               atol=1e-8 * np.abs(expected).max())
    assert os.path.exists(os.path.join(out, "_SUCCESS"))
    again = InfluenceCalculator.load(os.path.join(out, "artifact"), im)
    assert isinstance(again.method, GradientDot) and again.method.scale == 2.0
    np.testing.assert_allclose(again.influence((setup["xq"], setup["yq"]),
                                               (setup["x"], setup["y"])), expected, rtol=1e-8)


def test_toy_curvature_serves_influence_and_relatif(setup):
    out = _run(setup, "toy_curvature", "--solver=toy_scaled_identity", "--l2=0.01")
    im = InfluenceModel(setup["model_path"], l2=0.01)
    calc = InfluenceCalculator(im, solver="toy_scaled_identity").fit((setup["x"], setup["y"]))
    c = calc.method.curvature.c
    g = grads.per_example_gradients(im, setup["x"], setup["y"]).astype(np.float64)
    gq = grads.per_example_gradients(im, setup["xq"], setup["yq"]).astype(np.float64)
    np.testing.assert_allclose(_pairwise(out), gq @ g.T / c, rtol=1e-8)
    rel = InfluenceCalculator(im, method="relatif", solver="toy_scaled_identity").fit(
        (setup["x"], setup["y"]))
    norms = np.linalg.norm(g / c, axis=1)
    np.testing.assert_allclose(rel.influence((setup["xq"], setup["yq"]), (setup["x"], setup["y"])),
                               gq @ g.T / c / norms[None, :], rtol=1e-8)


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(ConfigError, match="toy_gradient_dot"):
        InfluenceCalculator(helpers.logistic_model(3), method="nope")
    with pytest.raises(ConfigError, match="toy_scaled_identity"):
        InfluenceCalculator(helpers.logistic_model(3), solver="nope")


def test_unknown_option_names_suggest_the_cli_name():
    with pytest.raises(ConfigError, match="did you mean 'arnoldi_iter'"):
        InfluenceCalculator(helpers.logistic_model(3), arnoldi_itr=10)


def test_cli_form_and_python_form_give_equal_configs():
    from influence_ops import InfluenceConfig
    a = InfluenceConfig(target_layers="hidden,out", checkpoints="a.keras,b.keras",
                        learning_rates="0.1,0.2", from_logits="auto", overwrite="true",
                        rank="8", solver="")
    b = InfluenceConfig(target_layers=("hidden", "out"), checkpoints=("a.keras", "b.keras"),
                        learning_rates=(0.1, 0.2), from_logits=None, overwrite=True, rank=8)
    assert a == b
    assert InfluenceConfig(target_layers="2").target_layers == 2


@pytest.mark.parametrize("option,value", [("damping", -1.0), ("k", 0), ("l2", -0.1),
                                          ("max_bad_fraction", 1.5)])
def test_bad_values_name_the_option(option, value):
    from influence_ops import InfluenceConfig
    with pytest.raises(ConfigError, match=f"--{option}"):
        InfluenceConfig(**{option: value}).validate()
