"""Model-wrapper errors a user will hit, and artifact save / load / fingerprint refusal."""

import json
import os

import keras
import numpy as np
import pytest

from influence_ops import InfluenceCalculator, InfluenceModel, InfluenceModelError
from influence_ops import artifacts
from tests import helpers


@pytest.fixture(scope="module")
def small():
    x, y, xq, yq = helpers.classification_data(n=40)
    return helpers.mlp_classifier(x.shape[1], 3), x, y, xq, yq


def test_unknown_layer_name_lists_the_layers(small):
    with pytest.raises(InfluenceModelError, match=r"unknown layer name 'nope'.*hidden"):
        InfluenceModel(small[0], target_layers=["nope"])


def test_reducing_loss_is_rejected(small):
    with pytest.raises(InfluenceModelError, match="reduction=None"):
        InfluenceModel(small[0], loss=keras.losses.SparseCategoricalCrossentropy())


def test_layer_without_weights_is_rejected():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d"),
                              keras.layers.Activation("relu", name="act")])
    with pytest.raises(InfluenceModelError, match="'act' has no trainable weights"):
        InfluenceModel(model, target_layers=["act"])
    # the default picks the last layer that has weights
    assert [l.name for l in InfluenceModel(model).target_layers] == ["d"]


def test_wrong_label_shapes(small):
    model, x, y = small[:3]
    im = InfluenceModel(model)
    with pytest.raises(InfluenceModelError, match=r"integer labels of shape \(n,\)"):
        im.check_labels(np.eye(3)[y][:, :, None], len(x))
    with pytest.raises(InfluenceModelError, match=r"must lie in \[0, 3\)"):
        im.check_labels(y + 5, len(x))
    with pytest.raises(InfluenceModelError, match="labels have 3 rows"):
        im.check_labels(y[:3], len(x))
    onehot = InfluenceModel(model, loss="categorical_crossentropy")
    with pytest.raises(InfluenceModelError, match="one-hot labels"):
        onehot.check_labels(y, len(x))


def test_missing_model_file_and_safe_mode(tmp_path, small):
    with pytest.raises(InfluenceModelError, match="model file not found"):
        InfluenceModel(str(tmp_path / "missing.keras"))
    with pytest.raises(InfluenceModelError, match="'.keras' file"):
        InfluenceModel(str(tmp_path / "model.h5"))
    path = str(tmp_path / "m.keras")
    small[0].save(path)
    im = InfluenceModel(path)
    assert im.fingerprint() == InfluenceModel(small[0]).fingerprint()


def test_artifact_round_trip_and_fingerprint_refusal(tmp_path, small):
    model, x, y, xq, yq = small
    calc = InfluenceCalculator(model, solver="arnoldi", arnoldi_iter=20, rank=8).fit((x, y))
    d = str(tmp_path / "art")
    calc.save(d)
    manifest = json.loads(open(os.path.join(d, "manifest.json")).read())
    assert manifest["method"] == "influence" and manifest["params"]["solver"] == "arnoldi"
    assert manifest["model"]["target_layers"] == ["out"]
    assert set(manifest["versions"]) >= {"tensorflow", "keras", "numpy", "influence_ops"}
    again = InfluenceCalculator.load(d, model)
    np.testing.assert_array_equal(again.influence((xq, yq), (x, y)),
                                  calc.influence((xq, yq), (x, y)))
    other = keras.models.clone_model(model)
    other.set_weights([w + 0.1 for w in model.get_weights()])
    with pytest.raises(artifacts.ArtifactError, match="different model"):
        InfluenceCalculator.load(d, other)
    with pytest.raises(artifacts.ArtifactError, match="manifest.json is missing"):
        InfluenceCalculator.load(str(tmp_path / "nothing"), model)


@pytest.mark.parametrize("method,kwargs", [
    ("exact", {}), ("cg", {"damping": 1.0}), ("rps_l2", {"rps_lambda": 0.01}), ("rps_lje", {}),
])
def test_every_method_round_trips(tmp_path, small, method, kwargs):
    model, x, y, xq, yq = small
    calc = InfluenceCalculator(model, method=method, **kwargs).fit((x, y), queries=(xq, yq))
    calc.save(str(tmp_path / method))
    again = InfluenceCalculator.load(str(tmp_path / method), model)
    np.testing.assert_allclose(again.influence((xq, yq), (x, y)),
                               calc.influence((xq, yq), (x, y)), rtol=1e-12, atol=1e-12)


def test_tracin_artifact_needs_paths(tmp_path, small):
    model, x, y, xq, yq = small
    calc = InfluenceCalculator(model, method="tracin", checkpoints=[model], learning_rates=[0.1])
    with pytest.raises(artifacts.ArtifactError, match="by path"):
        calc.save(str(tmp_path / "t"))
    ck = str(tmp_path / "ck.keras")
    model.save(ck)
    calc = InfluenceCalculator(model, method="tracin", checkpoints=[ck], learning_rates=[0.1],
                               projection_dim=16)
    calc.save(str(tmp_path / "t"))
    again = InfluenceCalculator.load(str(tmp_path / "t"), model)
    np.testing.assert_allclose(again.influence((xq, yq), (x, y)), calc.influence((xq, yq), (x, y)))


def test_tf_dataset_input_equals_arrays(small):
    import tensorflow as tf
    model, x, y, xq, yq = small
    calc = InfluenceCalculator(model, solver="exact").fit((x, y))
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    np.testing.assert_allclose(calc.self_influence(ds), calc.self_influence((x, y)))


def test_topk_parquet(tmp_path, small):
    import pyarrow.parquet as pq
    model, x, y, xq, yq = small
    calc = InfluenceCalculator(model, solver="exact").fit((x, y))
    path = calc.to_parquet(str(tmp_path / "topk.parquet"), (xq, yq), (x, y), k=3)
    t = pq.read_table(path)
    assert t.num_rows == len(xq) * 3 * 2
    scores = calc.influence((xq, yq), (x, y))
    first = t.filter((t["rank"].to_numpy() == 1) & (t["kind"].to_numpy(zero_copy_only=False)
                                                    == "proponent"))
    np.testing.assert_allclose(first["score"].to_numpy(), scores.max(axis=1))


def test_streaming_top_k_equals_full_matrix(small):
    from influence_ops import top_k
    from influence_ops.api import default_ids
    model, x, y, xq, yq = small
    calc = InfluenceCalculator(model, solver="exact").fit((x, y))
    full = top_k(calc.influence((xq, yq), (x, y)), default_ids(len(x)), 5)
    streamed = calc.top_k((xq, yq), (x, y), k=5, block_size=7)
    for key in ("pro_ids", "opp_ids"):
        np.testing.assert_array_equal(streamed[key], full[key])
    for key in ("pro_scores", "opp_scores"):
        np.testing.assert_allclose(streamed[key], full[key], rtol=1e-10)
