"""The job end to end on ``gs://`` paths against a real local GCS emulator.

``gcp-storage-emulator`` runs as a subprocess serving the GCS JSON API on loopback;
``STORAGE_EMULATOR_HOST`` points both google-cloud-storage (our artifacts) and Beam's GCS
filesystem (inputs, Parquet outputs, manifest, marker) at it. Model, data, artifact and every
output table live in the emulated bucket.
"""

import io
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests import helpers

BUCKET = "influence-test"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host=127.0.0.1",
         f"--port={port}", "--in-memory", f"--default-bucket={BUCKET}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("GCS emulator did not start")
            time.sleep(0.2)
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    from influence_ops import storage
    storage._CLIENT = None
    # Beam looks for Google default credentials with 4 exponential-backoff retries (~25 s)
    # before connecting anonymously, as the emulator needs. Record "no credentials" up front.
    from apache_beam.internal.gcp import auth
    saved = (auth._Credentials._credentials_init, auth._Credentials._credentials)
    auth._Credentials._credentials_init, auth._Credentials._credentials = True, None
    yield f"gs://{BUCKET}"
    auth._Credentials._credentials_init, auth._Credentials._credentials = saved
    storage._CLIENT = None
    if old is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = old
    proc.terminate()
    proc.wait(10)


def _upload(local, remote):
    from influence_ops import storage
    with open(local, "rb") as src, storage.open_write(remote) as dst:
        dst.write(src.read())


def test_pipeline_on_gcs_paths(gcs, tmp_path):
    import keras
    from influence_ops import storage
    from pipelines import run as run_lib
    x, y, xq, yq = helpers.classification_data(n=60, p=5, classes=3, n_test=4, seed=2)
    model = helpers.mlp_classifier(5, 3, hidden=4, dtype="float32", seed=2)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    model.fit(x.astype(np.float32), y, epochs=2, verbose=0)
    model.save(str(tmp_path / "m.keras"))
    np.savez(tmp_path / "train.npz", x=x.astype(np.float32), y=y)
    np.savez(tmp_path / "q.npz", x=xq.astype(np.float32), y=yq)
    for name in ("m.keras", "train.npz", "q.npz"):
        _upload(str(tmp_path / name), f"{gcs}/in/{name}")
    out = f"{gcs}/runs/r1"
    argv = [f"--model={gcs}/in/m.keras", f"--train=npz:{gcs}/in/train.npz",
            f"--queries=npz:{gcs}/in/q.npz", f"--output={out}", "--solver=exact", "--k=3"]
    manifest = run_lib.run(argv)
    assert manifest["row_counts"]["self_influence"] == 60
    assert storage.exists(f"{out}/_SUCCESS")
    assert storage.exists(f"{out}/artifact/manifest.json")
    names = storage.listdir(f"{out}/self_influence")
    rows = 0
    for n in names:
        with storage.open_read(f"{out}/self_influence/{n}") as f:
            rows += pq.read_table(io.BytesIO(f.read())).num_rows
    assert rows == 60
    # a rerun refuses, --overwrite replaces
    with pytest.raises(run_lib.RunError, match="already holds"):
        run_lib.run(argv)
    again = run_lib.run(argv + ["--overwrite"])
    assert again["row_counts"] == manifest["row_counts"]
