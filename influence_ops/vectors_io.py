"""Influence vectors on disk: ``(id, vector)`` rows written one batch at a time.

* ``parquet``: columns ``id`` (string) and ``vector`` (list<double>), one row group per batch;
* ``tfrecord``: one ``tf.train.Example`` per row with ``id`` (bytes) and ``vector`` (the
  float64 little-endian bytes of the row, so the round trip is exact; ``dim`` (int64) says
  its length).

Writers take an iterable of ``(ids (b,), vectors (b, k))`` batches and never hold more than
one; readers return ``(ids (n,), vectors (n, k) float64)``.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional, Tuple

import numpy as np

FORMATS = ("parquet", "tfrecord")


def _format_of(path: str, format: Optional[str]) -> str:
    if format is None:
        format = "tfrecord" if path.endswith((".tfrecord", ".tfrecords")) else "parquet"
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    return format


def write_vectors(path: str, format: str, batches: Iterable[Tuple[np.ndarray, np.ndarray]]
                  ) -> str:
    format = _format_of(path, format)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    if format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        schema = pa.schema([("id", pa.string()), ("vector", pa.list_(pa.float64()))])
        with pq.ParquetWriter(path, schema) as writer:
            for ids, v in batches:
                v = np.asarray(v, np.float64)
                k = v.shape[1] if v.ndim == 2 else 0
                offsets = np.arange(len(v) + 1, dtype=np.int32) * k
                vec = pa.ListArray.from_arrays(pa.array(offsets), pa.array(v.ravel()))
                writer.write_table(pa.Table.from_arrays(
                    [pa.array(np.asarray(ids).astype(str).tolist(), pa.string()), vec],
                    schema=schema))
        return path
    from influence_ops import tf_setup
    tf = tf_setup.tensorflow()
    with tf.io.TFRecordWriter(path) as writer:
        for ids, v in batches:
            v = np.asarray(v, "<f8")
            for i, row in zip(np.asarray(ids).astype(str).tolist(), v):
                ex = tf.train.Example(features=tf.train.Features(feature={
                    "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[i.encode()])),
                    "vector": tf.train.Feature(bytes_list=tf.train.BytesList(
                        value=[row.tobytes()])),
                    "dim": tf.train.Feature(int64_list=tf.train.Int64List(value=[len(row)])),
                }))
                writer.write(ex.SerializeToString())
    return path


def read_vectors(path: str, format: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    format = _format_of(path, format)
    if format == "parquet":
        import pyarrow.parquet as pq
        table = pq.read_table(path)
        ids = np.asarray(table.column("id").to_pylist(), dtype=str)
        col = table.column("vector").combine_chunks()
        flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
        k = len(flat) // max(len(ids), 1)
        return ids, flat.reshape(len(ids), k)
    from influence_ops import tf_setup
    tf = tf_setup.tensorflow()
    ids, rows = [], []
    for rec in tf.data.TFRecordDataset(path).as_numpy_iterator():
        ex = tf.train.Example.FromString(rec)
        f = ex.features.feature
        ids.append(f["id"].bytes_list.value[0].decode())
        rows.append(np.frombuffer(f["vector"].bytes_list.value[0], "<f8"))
    k = len(rows[0]) if rows else 0
    return np.asarray(ids, dtype=str), (np.stack(rows).astype(np.float64) if rows
                                        else np.zeros((0, k)))
