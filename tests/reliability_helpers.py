"""Shared inputs for the reliability tests: the demo's model and data, small.

A digits MLP (64 inputs, 10 classes) trained for a few epochs on 200 examples, ``train.npz``
(200 rows) and ``queries.npz`` (10 rows), written once per test module. ``cli`` runs the
command line in this process and returns its exit status and the lines it printed.
"""

from __future__ import annotations

import os
import struct
import sys

import numpy as np

N_TRAIN, N_QUERY = 200, 10


def make_inputs(root) -> dict:
    from pipelines import demo
    xtr, ytr, xq, yq, _ = demo.make_data(seed=0, n_train=N_TRAIN)
    model = demo.train_model(xtr, ytr, seed=0, epochs=3)
    root = str(root)
    model_path = os.path.join(root, "model.keras")
    model.save(model_path)
    np.savez(os.path.join(root, "train.npz"), x=xtr, y=ytr)
    np.savez(os.path.join(root, "queries.npz"), x=xq[:N_QUERY], y=yq[:N_QUERY])
    return {"dir": root, "model": model_path, "x": xtr, "y": ytr, "xq": xq[:N_QUERY],
            "yq": yq[:N_QUERY], "train": f"npz:{root}/train.npz",
            "queries": f"npz:{root}/queries.npz"}


def base_args(inp, output, *flags, train=None, queries=None):
    return [f"--model={inp['model']}", f"--train={train or inp['train']}",
            f"--queries={queries or inp['queries']}", f"--output={output}", "--solver=exact",
            "--block_size=64"] + list(flags)


def cli(capsys, argv):
    """Runs ``beam-influence argv`` in this process: ``(status, stderr lines it printed)``."""
    from pipelines import cli as cli_lib
    capsys.readouterr()
    status = cli_lib.main(list(argv))
    err = capsys.readouterr().err
    return status, [ln for ln in err.splitlines() if ln.startswith("beam-influence")]


def tfrecord_examples(path, x, y, ids=None):
    from influence_ops import tf_setup
    tf = tf_setup.tensorflow()
    with tf.io.TFRecordWriter(str(path)) as w:
        for i in range(len(x)):
            f = {"x": tf.train.Feature(float_list=tf.train.FloatList(value=list(x[i]))),
                 "y": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(y[i])]))}
            if ids is not None:
                f["id"] = tf.train.Feature(bytes_list=tf.train.BytesList(
                    value=[str(ids[i]).encode()]))
            w.write(tf.train.Example(features=tf.train.Features(feature=f))
                    .SerializeToString())


def record_offset(data: bytes, index: int) -> int:
    """Byte offset of record ``index`` in an uncompressed TFRecord file."""
    off = 0
    for _ in range(index):
        off += 16 + struct.unpack("<Q", data[off:off + 8])[0]
    return off


def subprocess_env():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="2")
    return env, sys.executable
