"""ReadExamples: training / query examples from NumPy, Parquet, TFRecord or TFDS into blocks.

Source specs (``--train`` / ``--queries``):

* ``npz:PATH_OR_GLOB``   NumPy ``.npz`` archives with arrays named by ``--x_key``/``--y_key``
  (and optionally ``--id_key``/``--group_key``); loaded with ``allow_pickle=False``.
* ``parquet:GLOB``       Parquet files; ``--x_key`` is a list column (reshaped with
  ``--input_shape``) or comma-separated scalar columns.
* ``tfrecord:GLOB``      ``tf.train.Example`` records parsed with ``--feature_spec``.
* ``tfds:NAME/SPLIT``    a prepared TFDS dataset under ``--tfds_data_dir`` (never downloads).

Ids: the ``--id_key`` column when given, else ``<file or split>:<zero-padded row index>``, stable
across runs and runners. Rows with non-finite features or a wrong shape go to the dead-letter
output (tag ``dead``) with the reason, never silently dropped.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import tempfile
from typing import List, Optional

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipelines.blocks import Block, row_ids, split_rows

log = logging.getLogger(__name__)
NAMESPACE = "influence"
DEAD = "dead"


class SourceError(ValueError):
    pass


def parse_source(spec: str):
    if not spec or ":" not in spec:
        raise SourceError(f"source {spec!r}: expected npz:PATH, parquet:GLOB, tfrecord:GLOB or "
                          "tfds:NAME/SPLIT")
    kind, _, rest = spec.partition(":")
    if kind not in ("npz", "parquet", "tfrecord", "tfds"):
        raise SourceError(f"source {spec!r}: unknown kind {kind!r}")
    return kind, rest


def match_files(pattern: str) -> List[str]:
    result = FileSystems.match([pattern])[0]
    files = sorted(m.path for m in result.metadata_list)
    if not files:
        raise SourceError(f"no files match {pattern!r}")
    return files


def _source_name(path: str) -> str:
    return posixpath.basename(path.rstrip("/"))


def _parse_shape(text: str):
    return tuple(int(s) for s in text.split(",") if s.strip()) if text else None


class _ReadFile(beam.DoFn):
    """Reads one file into blocks; a subclass per format."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.read_counter = beam.metrics.Metrics.counter(NAMESPACE, "examples_read")

    def _emit(self, ids, x, y, group, source):
        self.read_counter.inc(len(ids))
        for b in split_rows(ids, x, y, group, self.cfg["block_size"], source):
            yield b


class _ReadNpz(_ReadFile):
    def process(self, path):
        c = self.cfg
        with FileSystems.open(path) as f:
            data = np.load(io.BytesIO(f.read()), allow_pickle=False)
        for key in (c["x_key"], c["y_key"]):
            if key not in data.files:
                raise SourceError(f"{path}: array {key!r} missing (has {data.files})")
        x, y = data[c["x_key"]], data[c["y_key"]]
        n = len(x)
        ids = data[c["id_key"]].astype(str) if c["id_key"] else row_ids(_source_name(path), 0, n)
        group = data[c["group_key"]].astype(str) if c["group_key"] else None
        yield from self._emit(ids, x, y, group, _source_name(path))


class _ReadParquet(_ReadFile):
    def process(self, path):
        import pyarrow.parquet as pq
        c = self.cfg
        shape = _parse_shape(c["input_shape"])
        x_cols = [s for s in c["x_key"].split(",") if s]
        with FileSystems.open(path) as f:
            pf = pq.ParquetFile(io.BytesIO(f.read()))
        names = pf.schema_arrow.names
        for col in x_cols + [c["y_key"]] + [k for k in (c["id_key"], c["group_key"]) if k]:
            if col not in names:
                raise SourceError(f"{path}: column {col!r} missing (has {names})")
        start = 0
        source = _source_name(path)
        for batch in pf.iter_batches(batch_size=max(c["block_size"], 1024)):
            n = batch.num_rows
            ids = (batch.column(c["id_key"]).to_numpy(zero_copy_only=False).astype(str)
                   if c["id_key"] else row_ids(source, start, n))
            start += n
            y = batch.column(c["y_key"]).to_numpy(zero_copy_only=False)
            group = (batch.column(c["group_key"]).to_numpy(zero_copy_only=False).astype(str)
                     if c["group_key"] else None)
            if len(x_cols) == 1 and hasattr(batch.column(x_cols[0]).type, "value_type"):
                col = batch.column(x_cols[0])
                lengths = np.asarray(col.value_lengths().fill_null(0))
                want = int(np.prod(shape)) if shape else int(np.bincount(lengths).argmax())
                ok = lengths == want
                if not ok.all():
                    for i in np.nonzero(~ok)[0]:
                        yield beam.pvalue.TaggedOutput(DEAD, (source, ids[i], (
                            f"feature length {lengths[i]} != {want}")))
                col = col.filter(__import__("pyarrow").array(ok))
                ids, y = ids[ok], y[ok]
                group = None if group is None else group[ok]
                x = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
                x = x.reshape((len(ids),) + (shape or (want,)))
            else:
                x = np.stack([batch.column(k).to_numpy(zero_copy_only=False).astype(np.float32)
                              for k in x_cols], axis=1)
                if shape:
                    x = x.reshape((n,) + shape)
            yield from self._emit(ids, x, y, group, source)


class _ReadTFRecord(_ReadFile):
    def process(self, path):
        from influence_ops import tf_setup
        tf = tf_setup.tensorflow()
        c = self.cfg
        if not c["feature_spec"]:
            raise SourceError("tfrecord sources need --feature_spec (JSON)")
        spec = {}
        for key, (shape, dtype) in json.loads(c["feature_spec"]).items():
            spec[key] = tf.io.FixedLenFeature(shape, getattr(tf, dtype))
        local = path
        if "://" in path:
            fd, local = tempfile.mkstemp(suffix=".tfrecord")
            with os.fdopen(fd, "wb") as out, FileSystems.open(path) as src:
                out.write(src.read())
        ds = tf.data.TFRecordDataset(local).batch(c["block_size"]).map(
            lambda r: tf.io.parse_example(r, spec))
        start = 0
        source = _source_name(path)
        try:
            for rec in ds.as_numpy_iterator():
                n = len(rec[c["x_key"]])
                ids = (rec[c["id_key"]].astype(str) if c["id_key"]
                       else row_ids(source, start, n))
                start += n
                group = rec[c["group_key"]].astype(str) if c["group_key"] else None
                yield from self._emit(ids, rec[c["x_key"]], rec[c["y_key"]], group, source)
        except tf.errors.DataLossError as e:
            raise SourceError(f"{path}: corrupt TFRecord file ({e.message})") from e


class _ReadTfdsShard(_ReadFile):
    def process(self, shard):
        import tensorflow_datasets as tfds
        name, split, a, b = shard
        c = self.cfg
        builder = tfds.builder(name, data_dir=c["tfds_data_dir"] or None)
        ds = builder.as_dataset(split=f"{split}[{a}:{b}]", shuffle_files=False)
        ds = ds.batch(c["block_size"])
        start = a
        source = f"{name}/{split}"
        for rec in ds.as_numpy_iterator():
            n = len(rec[c["x_key"]])
            ids = (np.asarray(rec[c["id_key"]]).astype(str) if c["id_key"]
                   else row_ids(source, start, n))
            start += n
            group = np.asarray(rec[c["group_key"]]).astype(str) if c["group_key"] else None
            yield from self._emit(ids, rec[c["x_key"]], rec[c["y_key"]], group, source)


def tfds_shards(spec: str, data_dir: str, n_shards: int = 8):
    import tensorflow_datasets as tfds
    name, _, split = spec.partition("/")
    split = split or "train"
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
        n = builder.info.splits[split].num_examples
    except Exception as e:  # noqa: BLE001 - TFDS raises many kinds; name the dataset
        raise SourceError(f"tfds:{spec}: cannot open a prepared dataset in data_dir="
                          f"{data_dir!r} (this pipeline never downloads): {e}") from e
    bounds = np.linspace(0, n, min(n_shards, max(n, 1)) + 1).astype(int)
    return [(name, split, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


class ValidateBlocks(beam.DoFn):
    """Dead-letters rows with non-finite features; passes the rest on."""

    def __init__(self):
        self.bad = beam.metrics.Metrics.counter(NAMESPACE, "examples_dead_lettered")

    def process(self, block: Block):
        x = np.asarray(block.x)
        if np.issubdtype(x.dtype, np.floating):
            finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
            if not finite.all():
                self.bad.inc(int((~finite).sum()))
                for i in np.nonzero(~finite)[0]:
                    yield beam.pvalue.TaggedOutput(DEAD, (block.source, str(block.ids[i]),
                                                          "non-finite feature values"))
                block = block.take(finite)
        if len(block):
            yield block


class ReadExamples(beam.PTransform):
    """``PBegin -> (blocks, dead)``: blocks of examples and dead-letter rows (source, id, error)."""

    def __init__(self, spec: str, opts, role: str = "train"):
        super().__init__()
        self.kind, self.rest = parse_source(spec)
        self.role = role
        self.cfg = {k: getattr(opts, k) for k in (
            "x_key", "y_key", "id_key", "group_key", "input_shape", "feature_spec",
            "tfds_data_dir", "block_size")}
        if role == "query":
            self.cfg["group_key"] = ""
        if self.kind != "tfds":
            self.files = match_files(self.rest)  # fail at construction: clear, early error
        else:
            self.shards = tfds_shards(self.rest, self.cfg["tfds_data_dir"])

    def expand(self, pbegin):
        if self.kind == "tfds":
            elems = pbegin | "Shards" >> beam.Create(self.shards)
            reader = _ReadTfdsShard(self.cfg)
        else:
            elems = pbegin | "Files" >> beam.Create(self.files)
            reader = {"npz": _ReadNpz, "parquet": _ReadParquet,
                      "tfrecord": _ReadTFRecord}[self.kind](self.cfg)
        read = (elems | "Spread" >> beam.Reshuffle()
                | "Read" >> beam.ParDo(reader).with_outputs(DEAD, main="blocks"))
        valid = read.blocks | "Validate" >> beam.ParDo(ValidateBlocks()).with_outputs(
            DEAD, main="blocks")
        dead = ((read[DEAD], valid[DEAD]) | "DeadLetters" >> beam.Flatten())
        return valid.blocks, dead
