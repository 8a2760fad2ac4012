"""Security of the job's inputs and records (issue 10): no unpickling of user files, model
loading in Keras safe mode unless the user opts out, and no credentials in logs or the run
manifest."""

import json
import logging
import os
import re

import numpy as np
import pytest

from influence_ops.config import InfluenceConfig
from pipelines import redact
from tests.reliability_helpers import base_args, make_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sources():
    for top in ("influence_ops", "pipelines"):
        for dirpath, _, names in os.walk(os.path.join(ROOT, top)):
            for name in names:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    yield os.path.relpath(path, ROOT), open(path).read()


def test_no_pickle_of_user_supplied_files():
    for rel, text in _sources():
        assert not re.search(r"\b(c?pickle|dill|cloudpickle|joblib)\.loads?\(", text), rel
        assert not re.search(r"allow_pickle\s*=\s*True", text), rel
        for m in re.finditer(r"np\.load\(", text):  # every np.load refuses pickles
            call = text[m.start():m.start() + 160]
            assert "allow_pickle=False" in call, f"{rel}: {call}"
        assert "enable_unsafe_deserialization" not in text, rel


def test_models_load_in_safe_mode_unless_the_flag_says_otherwise():
    unsafe = [(rel, m.start()) for rel, text in _sources()
              for m in re.finditer(r"safe_mode\s*=\s*False", text)]
    # load_keras_model(..., safe_mode=False) exactly once: behind --unsafe_model_loading.
    calls = [(rel, pos) for rel, pos in unsafe
             if "load_keras_model" in open(os.path.join(ROOT, rel)).read()[pos - 80:pos]]
    assert [rel for rel, _ in calls] == [os.path.join("influence_ops", "api.py")]
    api = open(os.path.join(ROOT, "influence_ops", "api.py")).read()
    pos = calls[0][1]
    assert "config.unsafe_model_loading" in api[pos - 200:pos]
    assert InfluenceConfig().unsafe_model_loading is False


def test_object_arrays_in_npz_are_refused(tmp_path):
    from apache_beam.options.pipeline_options import PipelineOptions
    from pipelines.options import InfluenceOptions
    from pipelines.read import ReadExamples, SourceError, peek
    np.savez(tmp_path / "obj.npz", x=np.array([[1.0, 2.0]] * 3),
             y=np.array([{"a": 1}, None, 3], dtype=object))
    read = ReadExamples(f"npz:{tmp_path}/obj.npz", PipelineOptions([]).view_as(
        InfluenceOptions))
    with pytest.raises(SourceError, match=r"obj\.npz: not a readable .npz archive.*"
                                          r"allow_pickle=False"):
        list(read.reader().process(read.elements[0]))
    with pytest.raises(SourceError, match=r"obj\.npz: .*holds Python objects"):
        peek(read)


def test_lambda_model_needs_the_unsafe_flag(tmp_path):
    import keras
    from influence_ops.api import build_imodel
    from influence_ops.model import InfluenceModelError
    model = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(lambda t: t * 2.0),
                              keras.layers.Dense(2, name="out")])
    path = str(tmp_path / "lambda.keras")
    model.save(path)
    with pytest.raises(InfluenceModelError, match="safe mode refuses.*--unsafe_model_loading"):
        build_imodel(InfluenceConfig(model=path))
    imodel = build_imodel(InfluenceConfig(model=path, unsafe_model_loading=True))
    assert [l.name for l in imodel.target_layers] == ["out"]
    from pipelines.options import options_markdown
    row = [ln for ln in options_markdown().splitlines() if "--unsafe_model_loading" in ln][0]
    assert "RISK" in row and "`False`" in row


@pytest.mark.parametrize("text,secret", [
    ("--s3_secret_access_key=wJalrXUtnFEMI", "wJalrXUtnFEMI"),
    ("Discarding unparseable args: ['--api_token', 'tok-8f7e6d5c']", "tok-8f7e6d5c"),
    ("--api_token tok-8f7e6d5c --k=3", "tok-8f7e6d5c"),
    ("gs://user:hunter2@bucket/data", "hunter2"),
    ("https://storage.googleapis.com/b/o?X-Goog-Signature=abcdef0123&x=1", "abcdef0123"),
    ("Authorization: Bearer ya29.a0AfH6SMBx-secret", "ya29.a0AfH6SMBx-secret"),
    ("key AKIAABCDEFGHIJKLMNOP in use", "AKIAABCDEFGHIJKLMNOP"),
])
def test_redact_text(text, secret):
    assert secret not in redact.redact_text(text)
    assert "<redacted>" in redact.redact_text(text)


def test_ordinary_option_values_are_kept():
    opts = {"model": "gs://b/model.keras", "train": "npz:/data/train.npz", "k": 10,
            "id_key": "uid", "s3_access_key_id": None, "overwrite": False}
    assert redact.scrub_options(opts) == opts


def test_credentials_never_reach_the_manifest_or_the_logs(tmp_path, capsys, caplog):
    from pipelines import cli as cli_lib
    inp = make_inputs(tmp_path)
    secrets = ["wJalrXUtnFEMI-K7MDENG", "AKIAABCDEFGHIJKLMNOP", "tok-8f7e6d5c4b3a"]
    out = str(tmp_path / "out")
    argv = base_args(inp, out, f"--s3_secret_access_key={secrets[0]}",
                     f"--s3_access_key_id={secrets[1]}", f"--api_token={secrets[2]}")
    with caplog.at_level(logging.INFO):
        assert cli_lib.main(argv) == 0
    text = open(os.path.join(out, "run_manifest.json")).read()
    for s in secrets:
        assert s not in text, s
    options = json.loads(text)["options"]
    assert options["s3_secret_access_key"] == "<redacted>"
    assert options["s3_access_key_id"] == "<redacted>"
    logged = caplog.text + capsys.readouterr().err
    for s in secrets:
        assert s not in logged, s
    for root, _, names in os.walk(out):  # nor in any other file the job wrote
        for name in names:
            if name.endswith((".json", ".txt")):
                body = open(os.path.join(root, name), errors="replace").read()
                assert not any(s in body for s in secrets), os.path.join(root, name)
