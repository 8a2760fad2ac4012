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


def test_audit_on_gcs_paths(gcs, tmp_path):
    """The whole audit with every input and output on gs://: model, partitions, queries,
    known-noisy ids, the stored fitted method, the run folder, the report and LATEST."""
    import keras
    from influence_ops import storage
    from pipelines.audit import audit, latest, read_tables
    x, y, xq, yq = helpers.classification_data(n=80, p=5, classes=3, n_test=4, seed=4)
    model = helpers.mlp_classifier(5, 3, hidden=4, dtype="float32", seed=4)
    model.compile(optimizer=keras.optimizers.Adam(0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x.astype(np.float32), y, epochs=20, verbose=0)
    model.save(str(tmp_path / "m.keras"))
    for i in range(2):
        np.savez(tmp_path / f"part{i}.npz", x=x[40 * i:40 * (i + 1)].astype(np.float32),
                 y=y[40 * i:40 * (i + 1)])
        _upload(str(tmp_path / f"part{i}.npz"), f"{gcs}/audit-in/parts/part{i}.npz")
    np.savez(tmp_path / "q.npz", x=xq.astype(np.float32), y=yq)
    (tmp_path / "noisy.txt").write_text("part0.npz:000000003\npart1.npz:000000007\n")
    for name in ("m.keras", "q.npz", "noisy.txt"):
        _upload(str(tmp_path / name), f"{gcs}/audit-in/{name}")
    root = f"{gcs}/audits"
    argv = [f"--audit_root={root}", f"--model={gcs}/audit-in/m.keras",
            f"--train=npz:{gcs}/audit-in/parts/*.npz", f"--queries=npz:{gcs}/audit-in/q.npz",
            "--solver=exact", "--l2=0.01", "--k=3", "--spot_check=3",
            f"--known_noisy={gcs}/audit-in/noisy.txt"]
    first = audit(argv + ["--run_id=d1"])
    assert first["path"].startswith(f"{root}/runs/d1/")
    assert storage.exists(f"{first['path']}/_SUCCESS")
    assert storage.exists(f"{root}/artifacts/{first['artifact']['key']}/manifest.json")
    ranking = read_tables(f"{first['path']}/audit")
    assert ranking.num_rows == 80
    assert read_tables(f"{first['path']}/explain").num_rows == 4 * 2 * 3
    html = storage.read_text(first["report"])
    for section in ("summary", "suspicious", "explain", "spectrum", "spot-check", "detection"):
        assert f'id="{section}"' in html
    assert first["spot_check"]["n"] == 3
    second = audit(argv + ["--run_id=d2"])
    assert second["artifact"]["reused"] and second["counts"]["carried"] == 80
    assert latest(root) == second["path"]
    assert read_tables(f"{second['path']}/audit").column("train_id").to_pylist() == \
        ranking.column("train_id").to_pylist()
