"""ReadExamples: training / query examples from NumPy, Parquet, TFRecord or TFDS into blocks.

Source specs (``--train`` / ``--queries``):

* ``npz:PATH_OR_GLOB``   NumPy ``.npz`` archives with arrays named by ``--x_key``/``--y_key``
  (and optionally ``--id_key``/``--group_key``/``--weight_key``); loaded with
  ``allow_pickle=False``.
* ``parquet:GLOB``       Parquet files; ``--x_key`` is a list column (reshaped with
  ``--input_shape``) or comma-separated scalar columns.
* ``tfrecord:GLOB``      ``tf.train.Example`` records parsed with ``--feature_spec``
  (``.gz`` / ``.zlib`` files are decompressed).
* ``tfds:NAME/SPLIT``    a prepared TFDS dataset under ``--tfds_data_dir`` (never downloads).
  NAME may carry a config and version (``name/config:1.0.0``); SPLIT may be a TFDS split
  expression (``train[:10%]``, ``train+test``).

Ids: the ``--id_key`` column when given, else ``<source>:<zero-padded row index>``, stable
across runs, runners and sharding. ``<source>`` is the file's base name (its path relative to
the files' common folder when two matched files share a base name), or ``NAME/SPLIT`` for TFDS,
where the row index is the example's position in the split read file by file, in order.
Rows with non-finite features, a wrong shape, a missing value or a negative or non-finite
sample weight (``--weight_key``) go to the dead-letter output (tag ``dead``) with the reason,
never silently dropped; they count as read, so that ``examples_read`` = rows passed on + rows
dead-lettered. A weight column that is not numbers fails the job naming the file. Weights
are read for the training side only: a query source never reads ``--weight_key``.

Files that cannot be read are named errors, never short reads: a truncated or corrupt
``.npz`` archive, a Parquet file that is not Parquet, fails a page checksum or holds fewer
rows than its footer says, and a TFRecord file that ends inside a record (its framing is
checked before TensorFlow reads it, because TensorFlow takes a cut record header for the
end of the file) or fails a record checksum.

:func:`peek` reads the first examples of a source on the driver, through the same readers,
so the job can check them against the model before any work starts.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import math
import os
import posixpath
import re
import struct
import tempfile
import zipfile
import zlib
from typing import List, NamedTuple, Optional

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipelines.blocks import Block, concat, dead_letter, dead_rows, row_ids, split_rows
from pipelines.constants import DEAD, NAMESPACE

log = logging.getLogger(__name__)
TFDS_MIN_SHARDS = 8
TFDS_SHARD_EXAMPLES = 65536   # more shards than TFDS_MIN_SHARDS only for larger splits


class SourceError(ValueError):
    pass


def parse_source(spec: str):
    if not spec or ":" not in spec:
        raise SourceError(f"source {spec!r}: expected npz:PATH, parquet:GLOB, tfrecord:GLOB or "
                          "tfds:NAME/SPLIT")
    kind, _, rest = spec.partition(":")
    if kind not in ("npz", "parquet", "tfrecord", "tfds"):
        raise SourceError(f"source {spec!r}: unknown kind {kind!r}")
    if not rest:
        raise SourceError(f"source {spec!r}: nothing after {kind}:")
    return kind, rest


def match_files(pattern: str) -> List[str]:
    try:
        result = FileSystems.match([pattern])[0]
    except Exception as e:  # noqa: BLE001 - e.g. a missing folder raises on some filesystems
        raise SourceError(f"no files match {pattern!r} ({e})") from e
    files = sorted(m.path for m in result.metadata_list)
    if not files:
        raise SourceError(f"no files match {pattern!r}")
    return files


def _source_name(path: str) -> str:
    return posixpath.basename(path.rstrip("/"))


def source_names(files: List[str]) -> List[str]:
    """Base names, or paths relative to the common folder when base names collide."""
    names = [_source_name(f) for f in files]
    if len(set(names)) == len(names):
        return names
    prefix = posixpath.commonprefix(files)
    prefix = prefix[:prefix.rfind("/") + 1]
    return [f[len(prefix):] for f in files]


def _parse_shape(text: str):
    try:
        shape = tuple(int(s) for s in text.split(",") if s.strip()) if text else None
    except ValueError as e:
        raise SourceError(f"--input_shape={text!r}: expected comma-separated ints") from e
    if shape is not None and (not shape or min(shape) <= 0):
        raise SourceError(f"--input_shape={text!r}: expected positive ints")
    return shape


def _as_str(values) -> np.ndarray:
    """1-D str array; bytes (TFRecord / TFDS strings) are decoded as UTF-8."""
    a = np.asarray(values)
    if a.dtype.kind == "O" and a.size and isinstance(a.flat[0], (bytes, np.bytes_)):
        a = a.astype(bytes)
    if a.dtype.kind == "S":
        return np.char.decode(a, "utf-8")
    return a.astype(str)


def _tf_message(e) -> str:
    """A TF error's message without the ``{{function_node ...}}`` / ``[Op:...]`` noise."""
    text = getattr(e, "message", None) or str(e)
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", text)
    return re.sub(r"\s*\[Op:[^\]]*\].*$", "", text, flags=re.S).strip()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _npz_head(fileobj, keys, limit: int):
    """The first ``limit`` rows of the arrays ``keys`` of an ``.npz`` archive, reading only
    those bytes (the driver's look at a source); never unpickles."""
    out = {}
    with zipfile.ZipFile(fileobj) as z:
        names = {n[:-4] if n.endswith(".npy") else n: n for n in z.namelist()}
        for key in keys:
            if key not in names:
                out[key] = None
                continue
            with z.open(names[key]) as m:
                version = np.lib.format.read_magic(m)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(m)
                if dtype.hasobject:
                    raise ValueError(f"array {key!r} holds Python objects (pickled); save it "
                                     "as numbers or fixed-width strings")
                if fortran or not shape:
                    out[key] = np.lib.format.read_array(m, allow_pickle=False)[:limit]
                    continue
                rows = min(limit, shape[0])
                count = rows * int(np.prod(shape[1:], dtype=np.int64))
                buf = m.read(count * dtype.itemsize)
                if len(buf) < count * dtype.itemsize:
                    raise ValueError(f"array {key!r} ends early")
                out[key] = np.frombuffer(buf, dtype=dtype, count=count).reshape(
                    (rows,) + tuple(shape[1:]))
    return out


def optional_keys(cfg: dict) -> List[str]:
    """The optional columns / arrays / features a source must have: ``--id_key``,
    ``--group_key`` and ``--weight_key``, those that are set."""
    return [cfg[k] for k in ("id_key", "group_key", "weight_key") if cfg.get(k)]


def _weights(where: str, values, key: str) -> np.ndarray:
    """The ``--weight_key`` values as float64 ``(n,)``. A column that is not numbers, or holds
    more than one per row, is a SourceError naming the file; negative and non-finite weights
    are rejected row by row (:class:`ValidateBlocks`)."""
    a = np.asarray(values)
    if a.dtype.kind not in "iuf":
        raise SourceError(f"{where}: weight {key!r} (--weight_key) holds {a.dtype} values "
                          "(e.g. " + (repr(a.reshape(-1)[0]) if a.size else "none") +
                          "); expected numbers")
    if a.size != len(a):
        raise SourceError(f"{where}: weight {key!r} (--weight_key) has shape "
                          f"{tuple(a.shape[1:])} per row; expected one number")
    return a.reshape(len(a)).astype(np.float64)


def _check_row_shape(path, x, shape):
    """Reshapes ``x`` to ``(n,) + shape`` when ``--input_shape`` is given."""
    if shape is None or tuple(x.shape[1:]) == shape:
        return x
    if int(np.prod(x.shape[1:])) != int(np.prod(shape)):
        raise SourceError(f"{path}: examples of shape {tuple(x.shape[1:])} cannot be reshaped "
                          f"to --input_shape {shape}")
    return x.reshape((len(x),) + shape)


class _ReadFile(beam.DoFn):
    """Reads one file (or TFDS shard) into blocks; a subclass per format."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.read_counter = beam.metrics.Metrics.counter(NAMESPACE, "examples_read")
        self.dead_counter = beam.metrics.Metrics.counter(NAMESPACE, "examples_dead_lettered")

    def _emit(self, ids, x, y, group, source, weight=None):
        self.read_counter.inc(len(ids))
        for b in split_rows(ids, x, y, group, self.cfg["block_size"], source, weight):
            yield b

    def _dead(self, source, ids, reasons):
        """Dead-letters rows (unhappy path only); they count as read."""
        self.read_counter.inc(len(ids))
        self.dead_counter.inc(len(ids))
        for i, r in zip(ids, reasons):
            yield dead_letter(source, i, r)

    def _keys(self):
        return [self.cfg["x_key"], self.cfg["y_key"]] + optional_keys(self.cfg)


class _ReadNpz(_ReadFile):
    def _load(self, path):
        """{key: array} of the keys we read, with ``allow_pickle=False``; a damaged or
        truncated archive is a SourceError naming the file."""
        limit = self.cfg.get("limit")
        try:
            with FileSystems.open(path) as f:
                raw = io.BytesIO(f.read())
            if limit:
                data = _npz_head(raw, self._keys(), limit)
                files = [k for k, v in data.items() if v is not None]
            else:
                npz = np.load(raw, allow_pickle=False)
                if not hasattr(npz, "files"):
                    raise SourceError(f"{path}: a single .npy array, not an .npz archive "
                                      "(save with np.savez(path, x=..., y=...))")
                files = npz.files
                data = {k: npz[k] for k in self._keys() if k in npz.files}
        except SourceError:
            raise
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError,
                zlib.error) as e:
            raise SourceError(f"{path}: not a readable .npz archive (truncated or damaged?): "
                              f"{type(e).__name__}: {_first_line(e)}") from e
        for key in self._keys():
            if key not in files:
                raise SourceError(f"{path}: array {key!r} missing (has {sorted(files)})")
        return data

    def process(self, element):
        path, source = element
        c = self.cfg
        data = self._load(path)
        x, y = data[c["x_key"]], data[c["y_key"]]
        n = len(x)
        ids = _as_str(data[c["id_key"]]) if c["id_key"] else row_ids(source, 0, n)
        group = _as_str(data[c["group_key"]]) if c["group_key"] else None
        weight = data[c["weight_key"]] if c["weight_key"] else None
        for key, arr in ((c["y_key"], y), (c["id_key"], ids), (c["group_key"], group),
                         (c["weight_key"], weight)):
            if arr is not None and len(arr) != n:
                raise SourceError(f"{path}: array {key!r} has {len(arr)} rows, "
                                  f"{c['x_key']!r} has {n}")
        if weight is not None:
            weight = _weights(path, weight, c["weight_key"])
        x = _check_row_shape(path, x, _parse_shape(c["input_shape"]))
        yield from self._emit(ids, x, y, group, source, weight)


def _is_list(t) -> bool:
    import pyarrow as pa
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_number(t) -> bool:
    import pyarrow as pa
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def _arrow_str(col) -> np.ndarray:
    """An Arrow id / group column as a str array (ints as ``"7"``, not ``"7.0"``)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = pc.cast(col, pa.string())
    return np.asarray(col.fill_null("").to_numpy(zero_copy_only=False)).astype(str)


class _ReadParquet(_ReadFile):
    def process(self, element):
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
        path, source = element
        c = self.cfg
        shape = _parse_shape(c["input_shape"])
        x_cols = [s.strip() for s in c["x_key"].split(",") if s.strip()]
        columns = list(dict.fromkeys(x_cols + [c["y_key"]] + optional_keys(c)))
        try:
            with FileSystems.open(path) as f:
                pf = pq.ParquetFile(io.BytesIO(f.read()), page_checksum_verification=True)
            schema = pf.schema_arrow
        except (pa.ArrowException, OSError, ValueError) as e:
            raise SourceError(f"{path}: not a readable Parquet file (empty, truncated, damaged "
                              f"or another format): {_first_line(e)}") from e
        missing = [k for k in columns if k not in schema.names]
        if missing:
            raise SourceError(f"{path}: column(s) {missing} missing (has {schema.names})")
        list_x = len(x_cols) == 1 and _is_list(schema.field(x_cols[0]).type)
        want = None
        if list_x:
            value_type = schema.field(x_cols[0]).type.value_type
            if not _is_number(value_type):
                raise SourceError(f"{path}: column {x_cols[0]!r} is {schema.field(x_cols[0]).type}"
                                  "; expected a list of numbers (nested lists: flatten them and "
                                  "pass --input_shape)")
            # The list length every row must have: from --input_shape, the fixed-size list
            # type, or the model's input (never guessed from the data: when the first rows
            # are the malformed ones, a guess would reject the good rows).
            model_shape = c.get("example_shape")
            if shape:
                want = int(np.prod(shape))
            elif pa.types.is_fixed_size_list(schema.field(x_cols[0]).type):
                want = schema.field(x_cols[0]).type.list_size
            elif model_shape:
                want = int(np.prod(model_shape))
            if not shape and model_shape and want == int(np.prod(model_shape)):
                shape = tuple(model_shape)  # flat lists take the model's input shape
        else:
            for k in x_cols:
                if not _is_number(schema.field(k).type):
                    raise SourceError(f"{path}: column {k!r} is {schema.field(k).type}; expected "
                                      "numbers (or one list column as --x_key)")
            if shape and int(np.prod(shape)) != len(x_cols):
                raise SourceError(f"{path}: --input_shape {shape} has {int(np.prod(shape))} "
                                  f"values but --x_key names {len(x_cols)} column(s)")
        start = 0
        batches = pf.iter_batches(batch_size=max(c["block_size"], 1024), columns=columns)
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError, ValueError) as e:
                raise SourceError(f"{path}: corrupt Parquet data after row {start} (a page "
                                  f"fails its checksum or cannot be decoded): "
                                  f"{_first_line(e)}") from e
            if batch is None:
                break
            n = batch.num_rows
            if not n:
                continue
            fallback = row_ids(source, start, n)
            start += n
            # Rows to dead-letter: a null id / label / group, or a feature list of wrong length.
            reasons = np.full(n, "", dtype=object)
            if c["id_key"]:
                id_col = batch.column(c["id_key"])
                ids = _arrow_str(id_col)
                if id_col.null_count:
                    null = np.asarray(id_col.is_null())
                    ids = np.where(null, fallback, ids)
                    reasons[null] = f"missing id ({c['id_key']!r} is null)"
            else:
                ids = fallback
            for key, what in ((c["y_key"], "label"), (c["group_key"], "group"),
                              (c["weight_key"], "weight")):
                col = batch.column(key) if key else None
                if col is not None and col.null_count:
                    null = np.asarray(col.is_null()) & (reasons == "")
                    reasons[null] = f"missing {what} ({key!r} is null)"
            if list_x:
                col = batch.column(x_cols[0])
                lengths = np.asarray(pc.list_value_length(col).fill_null(-1))
                if want is None:  # no shape known from the model either: the file's most
                    valid = lengths[lengths >= 0]    # common length (first batch)
                    want = int(np.bincount(valid).argmax()) if len(valid) else None
                bad = (lengths != want) & (reasons == "")
                if bad.any():
                    reasons[bad] = np.where(
                        lengths[bad] < 0, f"feature list {x_cols[0]!r} is null",
                        np.char.add(np.char.add(f"feature list {x_cols[0]!r} has length ",
                                                lengths[bad].astype(str)), f", expected {want}"))
            dead = reasons != ""
            if dead.any():
                yield from self._dead(source, ids[dead], reasons[dead])
                keep = ~dead
                batch = batch.filter(pa.array(keep))
                ids = ids[keep]
                if not batch.num_rows:
                    continue
            m = batch.num_rows
            y = batch.column(c["y_key"]).to_numpy(zero_copy_only=False)
            group = _arrow_str(batch.column(c["group_key"])) if c["group_key"] else None
            weight = (_weights(path, batch.column(c["weight_key"]).to_numpy(
                zero_copy_only=False), c["weight_key"]) if c["weight_key"] else None)
            if list_x:
                values = batch.column(x_cols[0]).flatten()  # honours slice offsets
                x = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float32)
                x = x.reshape((m,) + (shape or (want,)))
            else:
                # Nulls become NaN here and are dead-lettered by ValidateBlocks.
                x = np.stack([np.asarray(batch.column(k).to_numpy(zero_copy_only=False),
                                         dtype=np.float32) for k in x_cols], axis=1)
                if shape:
                    x = x.reshape((m,) + shape)
            yield from self._emit(ids, x, y, group, source, weight)
        if start != pf.metadata.num_rows:
            raise SourceError(f"{path}: read {start} rows but the Parquet footer says "
                              f"{pf.metadata.num_rows}: the file is damaged")


def parse_feature_spec(cfg: dict):
    """``--feature_spec`` JSON -> {key: (shape, dtype name)}, checked against the keys."""
    text = cfg["feature_spec"]
    if not text:
        raise SourceError("tfrecord sources need --feature_spec (JSON), e.g. "
                          '{"x": [[8], "float32"], "y": [[], "int64"]}')
    try:
        raw = json.loads(text)
        spec = {str(k): (tuple(int(d) for d in shape), str(dtype))
                for k, (shape, dtype) in raw.items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise SourceError(f"--feature_spec {text!r}: expected JSON "
                          '{"key": [[dims...], "dtype"], ...}') from e
    for key, (_, dtype) in spec.items():
        if dtype not in ("float32", "int64", "string"):
            raise SourceError(f"--feature_spec: {key!r} has dtype {dtype!r}; tf.train.Example "
                              "holds float32, int64 or string")
    keys = [cfg["x_key"], cfg["y_key"]] + optional_keys(cfg)
    missing = [k for k in keys if k not in spec]
    if missing:
        raise SourceError(f"--feature_spec has no entry for {missing} (has {sorted(spec)})")
    weight_key = cfg.get("weight_key")
    if weight_key and (spec[weight_key][1] == "string" or int(np.prod(spec[weight_key][0])) != 1):
        raise SourceError(f"--feature_spec: the weight {weight_key!r} (--weight_key) is "
                          f"{list(spec[weight_key][0])} {spec[weight_key][1]}; expected one "
                          'number per example, e.g. [[], "float32"]')
    return spec


def _masked_crc(data: bytes) -> Optional[int]:
    """TFRecord's masked CRC32-C of ``data`` (None when no CRC32-C implementation is here)."""
    try:
        import google_crc32c
    except ImportError:  # pragma: no cover - google-cloud-storage brings it
        return None
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class _ZlibReader:
    """``read(n)`` over a zlib stream (TFRecord ``ZLIB`` compression)."""

    def __init__(self, path):
        self._f, self._d, self._buf = open(path, "rb"), zlib.decompressobj(), b""

    def read(self, n):
        while len(self._buf) < n:
            chunk = self._f.read(1 << 20)
            if not chunk:
                if not self._d.eof:
                    raise EOFError("zlib stream ended before its end marker")
                break
            self._buf += self._d.decompress(chunk)
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def tfrecord_frames(path: str, local: str, compression: str = "") -> int:
    """Number of records in a TFRecord file, checking its framing: every record is a length
    (uint64) with its masked CRC32-C, the data and the data's CRC. Raises SourceError when the
    file ends inside a record or a length fails its checksum. TensorFlow's reader takes a
    file cut inside a record header for the end of the file and stops without an error, so
    this is how a truncated file is told from a short one. ``path`` names the file in
    messages, ``local`` is where its bytes are."""
    size = os.path.getsize(local) if not compression else None
    opener = {"": lambda q: open(q, "rb"), "GZIP": gzip.open, "ZLIB": _ZlibReader}[compression]
    n = offset = 0
    try:
        with opener(local) as f:
            while True:
                head = f.read(12)
                if not head:
                    return n
                if len(head) < 12:
                    raise SourceError(
                        f"{path}: truncated TFRecord file: it ends {len(head)} bytes into the "
                        f"header of record {n} (byte {offset}), after {n} complete records")
                crc = _masked_crc(head[:8])
                if crc is not None and crc != struct.unpack("<I", head[8:])[0]:
                    raise SourceError(f"{path}: corrupt TFRecord file: the length of record "
                                      f"{n} (byte {offset}) fails its checksum")
                length = struct.unpack("<Q", head[:8])[0]
                if size is not None:
                    if offset + 16 + length > size:
                        raise SourceError(
                            f"{path}: truncated TFRecord file: record {n} (byte {offset}) "
                            f"needs {length + 16} bytes, the file ends after "
                            f"{size - offset}; {n} complete records before it")
                    f.seek(length + 4, 1)
                else:
                    rest = length + 4
                    while rest:
                        got = len(f.read(min(rest, 1 << 20)))
                        if not got:
                            raise SourceError(
                                f"{path}: truncated TFRecord file: the stream ends inside "
                                f"record {n}, after {n} complete records")
                        rest -= got
                offset += 16 + length
                n += 1
    except SourceError:
        raise
    except (EOFError, OSError, zlib.error) as e:
        raise SourceError(f"{path}: damaged {compression.lower()} TFRecord file "
                          f"({type(e).__name__}: {_first_line(e)}), after {n} complete "
                          "records") from e


class _ReadTFRecord(_ReadFile):
    def process(self, element):
        path, source = element
        from influence_ops import tf_setup
        tf = tf_setup.tensorflow()
        c = self.cfg
        spec = {k: tf.io.FixedLenFeature(shape, getattr(tf, dtype))
                for k, (shape, dtype) in parse_feature_spec(c).items()}
        compression = ("GZIP" if path.endswith(".gz") else
                       "ZLIB" if path.endswith(".zlib") else "")
        local, tmp = path, None
        if "://" in path:
            fd, tmp = tempfile.mkstemp(suffix=".tfrecord")
            with os.fdopen(fd, "wb") as out, FileSystems.open(
                    path, compression_type=CompressionTypes.UNCOMPRESSED) as src:
                out.write(src.read())
            local = tmp
        try:
            yield from self._read(tf, path, local, source, spec, compression)
        finally:
            if tmp:
                os.remove(tmp)

    def _read(self, tf, path, local, source, spec, compression):
        c = self.cfg
        shape = _parse_shape(c["input_shape"])
        # The framing check reads record headers only; a look at the first examples (limit)
        # skips it for compressed files, which would have to be decompressed whole.
        frames = (None if c.get("limit") and compression
                  else tfrecord_frames(path, local, compression))
        ds = tf.data.TFRecordDataset(local, compression_type=compression).batch(c["block_size"])
        start = 0
        try:
            for raw in ds:
                n = int(raw.shape[0])
                fallback = row_ids(source, start, n)
                try:
                    rec = tf.io.parse_example(raw, spec)
                    rec = {k: v.numpy() for k, v in rec.items()}
                    ok = None
                except tf.errors.InvalidArgumentError as e:
                    rec, ok, reasons = self._parse_each(tf, raw, spec)
                    if start == 0 and not ok.any():  # a whole first batch: the spec is wrong
                        raise SourceError(f"{path}: cannot parse records with --feature_spec: "
                                          f"{_tf_message(e)}") from None
                start += n
                if ok is not None:
                    bad_ids = fallback[~ok]
                    if c["id_key"]:  # the record's id where it parsed, else the row index
                        bad_ids = np.array([self._id_of(tf, raw[i], spec) or fallback[i]
                                            for i in np.nonzero(~ok)[0]], dtype=str)
                    yield from self._dead(source, bad_ids, reasons[~ok])
                    fallback = fallback[ok]
                    if not ok.any():
                        continue
                ids = _as_str(rec[c["id_key"]]).reshape(-1) if c["id_key"] else fallback
                group = _as_str(rec[c["group_key"]]).reshape(-1) if c["group_key"] else None
                weight = (_weights(path, rec[c["weight_key"]], c["weight_key"])
                          if c["weight_key"] else None)
                x = _check_row_shape(path, rec[c["x_key"]], shape)
                yield from self._emit(ids, x, rec[c["y_key"]], group, source, weight)
        except tf.errors.DataLossError as e:
            raise SourceError(f"{path}: corrupt TFRecord file ({_tf_message(e)})") from e
        if frames is not None and start != frames and not c.get("limit"):
            raise SourceError(f"{path}: TensorFlow read {start} records but the file holds "
                              f"{frames}")

    def _parse_each(self, tf, raw, spec):
        """Unhappy path: parses record by record, returning the good rows and the reasons."""
        n = int(raw.shape[0])
        ok = np.zeros(n, dtype=bool)
        reasons = np.full(n, "", dtype=object)
        good = []
        for i in range(n):
            try:
                good.append(tf.io.parse_single_example(raw[i], spec))
                ok[i] = True
            except tf.errors.InvalidArgumentError as e:
                reasons[i] = f"unparseable record: {_tf_message(e)}"
        rec = ({k: np.stack([g[k].numpy() for g in good]) for k in spec} if good else {})
        return rec, ok, reasons

    def _id_of(self, tf, record, spec):
        key = self.cfg["id_key"]
        try:
            v = tf.io.parse_single_example(record, {key: spec[key]})[key].numpy()
            return str(_as_str(np.reshape(v, -1))[0])
        except Exception:  # noqa: BLE001 - best effort, for the dead-letter row only
            return None


def _split_tfds_spec(spec: str):
    """``NAME[/CONFIG][:VERSION]/SPLIT`` -> (name, split); a bare NAME reads ``train``."""
    if "/" not in spec:
        return spec, "train"
    name, _, split = spec.rpartition("/")
    return name, split or "train"


def _tfds_builder(name: str, data_dir: str):
    import tensorflow_datasets as tfds
    return tfds.builder(name, data_dir=data_dir or None, try_gcs=False)


def tfds_shards(spec: str, data_dir: str, keys=(), n_shards: int = TFDS_MIN_SHARDS):
    """``[(name, split, start, stop)]``: contiguous ranges of the split(s) in ``spec``.

    Opens only an already prepared dataset under ``data_dir``; never downloads.
    """
    import tensorflow_datasets as tfds
    name, split = _split_tfds_spec(spec)
    where = f"data_dir={data_dir!r}" if data_dir else "the default TFDS data_dir"
    try:
        from tensorflow_datasets.core import naming
        namespace = naming.parse_builder_name_kwargs(name)[0].namespace
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"tfds:{spec}: cannot parse the dataset name {name!r}: {e}") from e
    if namespace:  # community / Hugging Face datasets would be fetched from the network
        raise SourceError(f"tfds:{spec}: namespaced datasets ({namespace}:) are not supported; "
                          "prepare the dataset locally and pass --tfds_data_dir")
    try:
        builder = _tfds_builder(name, data_dir)
        splits = builder.info.splits
        instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(splits)
    except Exception as e:  # noqa: BLE001 - TFDS raises many kinds; name the dataset
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise SourceError(f"tfds:{spec}: cannot open a prepared dataset {name!r} split "
                          f"{split!r} in {where} (this pipeline never downloads; prepare it "
                          f"first): {type(e).__name__}: {first}") from e
    features = builder.info.features
    names = list(features.keys()) if hasattr(features, "keys") else []
    missing = [k for k in keys if k and k not in names]
    if missing:
        raise SourceError(f"tfds:{spec} in {where}: feature(s) {missing} missing (has {names})")
    shards = []
    for ins in instructions:
        a = int(ins.from_ or 0)
        b = int(splits[ins.splitname].num_examples if ins.to is None else ins.to)
        k = min(max(n_shards, math.ceil((b - a) / TFDS_SHARD_EXAMPLES)), max(b - a, 1))
        bounds = np.linspace(a, b, k + 1).astype(int)
        shards += [(name, ins.splitname, int(lo), int(hi))
                   for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
    return shards


class _ReadTfdsShard(_ReadFile):
    def setup(self):
        self._builders = {}

    def process(self, shard):
        import tensorflow_datasets as tfds
        name, split, a, b = shard
        c = self.cfg
        builder = self._builders.get(name)
        if builder is None:
            builder = self._builders[name] = _tfds_builder(name, c["tfds_data_dir"])
        # interleave_cycle_length=1 reads the split's files one after another, so that row
        # a + k of "split[a:b]" is row a + k of the whole split, whatever the sharding.
        read_config = tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False)
        ds = builder.as_dataset(split=f"{split}[{a}:{b}]", shuffle_files=False,
                                read_config=read_config).batch(c["block_size"])
        shape = _parse_shape(c["input_shape"])
        start = a
        source = f"{name}/{split}"
        for rec in ds.as_numpy_iterator():
            n = len(rec[c["x_key"]])
            ids = (_as_str(rec[c["id_key"]]).reshape(-1) if c["id_key"]
                   else row_ids(source, start, n))
            start += n
            group = _as_str(rec[c["group_key"]]).reshape(-1) if c["group_key"] else None
            weight = (_weights(f"tfds:{source}", rec[c["weight_key"]], c["weight_key"])
                      if c["weight_key"] else None)
            x = _check_row_shape(source, rec[c["x_key"]], shape)
            yield from self._emit(ids, x, rec[c["y_key"]], group, source, weight)
        if start != b:
            raise SourceError(f"tfds:{name}/{split}[{a}:{b}]: read {start - a} examples, "
                              f"expected {b - a}")


class ValidateBlocks(beam.DoFn):
    """Dead-letters rows with non-finite features or a sample weight that is negative or not
    finite; passes the rest on."""

    def __init__(self):
        self.bad = beam.metrics.Metrics.counter(NAMESPACE, "examples_dead_lettered")

    def process(self, block: Block):
        x = np.asarray(block.x)
        if np.issubdtype(x.dtype, np.floating):
            finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
            if not finite.all():
                self.bad.inc(int((~finite).sum()))
                yield from dead_rows(block, ~finite, "non-finite feature values")
                block = block.take(finite)
        if block.weight is not None:
            w = block.weight
            ok = np.isfinite(w) & (w >= 0)
            if not ok.all():
                self.bad.inc(int((~ok).sum()))
                yield from dead_rows(block, ~ok, lambda i: (
                    f"sample weight {w[i]} (--weight_key) is negative or not finite; "
                    "weights must be finite and >= 0"))
                block = block.take(ok)
        if len(block):
            yield block


class ReadExamples(beam.PTransform):
    """``PBegin -> (blocks, dead)``: blocks of examples and dead-letter rows (source, id, error).

    Sources are matched / opened at construction, so a bad spec fails early and clearly.
    """

    def __init__(self, spec: str, config, role: str = "train", example_shape=None):
        super().__init__()
        self.kind, self.rest = parse_source(spec)
        self.role = role
        self.cfg = {k: getattr(config, k) for k in (
            "x_key", "y_key", "id_key", "group_key", "weight_key", "input_shape",
            "feature_spec", "tfds_data_dir", "block_size")}
        # The shape of one example the model takes (all dimensions known), or None: the
        # length flat Parquet lists must have.
        self.cfg["example_shape"] = (tuple(int(d) for d in example_shape)
                                     if example_shape and None not in example_shape else None)
        if role == "query":  # queries are unweighted and have no groups
            self.cfg["group_key"] = self.cfg["weight_key"] = ""
        if not self.cfg["block_size"] or self.cfg["block_size"] < 1:
            raise SourceError(f"--block_size={self.cfg['block_size']}: must be >= 1")
        _parse_shape(self.cfg["input_shape"])
        if self.kind == "tfrecord":
            parse_feature_spec(self.cfg)
        if self.kind != "tfds":
            files = match_files(self.rest)  # fail at construction: clear, early error
            self.files = list(zip(files, source_names(files)))
        else:
            keys = [self.cfg["x_key"], self.cfg["y_key"]] + optional_keys(self.cfg)
            self.shards = tfds_shards(self.rest, self.cfg["tfds_data_dir"], keys)

    def partitions(self) -> List[str]:
        """The source's partitions: the names of its files (ids and the ``partition`` column
        use them), or its TFDS spec as one partition."""
        if self.kind == "tfds":
            return [self.rest]
        return [name for _, name in self.files]

    def only(self, names) -> "ReadExamples":
        """Reads only the files named (partition names of :meth:`partitions`); ids stay those
        of the whole source. Used by the audit's incremental runs."""
        if self.kind == "tfds":
            raise SourceError("a TFDS split is one partition: it cannot be read in part")
        names = set(names)
        unknown = names - set(self.partitions())
        if unknown:
            raise SourceError(f"partitions not in the source: {sorted(unknown)[:5]}")
        self.files = [(f, n) for f, n in self.files if n in names]
        return self

    def reader(self, cfg=None) -> _ReadFile:
        cls = {"npz": _ReadNpz, "parquet": _ReadParquet, "tfrecord": _ReadTFRecord,
               "tfds": _ReadTfdsShard}[self.kind]
        return cls(cfg or self.cfg)

    @property
    def elements(self):
        """What the reader is applied to: (path, source name) per file, or TFDS shards."""
        return self.shards if self.kind == "tfds" else self.files

    def spread(self, pbegin):
        """The source's elements as a PCollection, redistributed (a Reshuffle: the runner
        would otherwise read every file in the worker that created the list) when there is
        more than one; a lone file or shard skips the shuffle stage."""
        elems = pbegin | "Files" >> beam.Create(list(self.elements))
        return elems | "Spread" >> beam.Reshuffle() if len(self.elements) > 1 else elems

    def expand(self, pbegin):
        reader = self.reader()
        read = (self.spread(pbegin)
                | "Read" >> beam.ParDo(reader).with_outputs(DEAD, main="blocks"))
        valid = read.blocks | "Validate" >> beam.ParDo(ValidateBlocks()).with_outputs(
            DEAD, main="blocks")
        dead = ((read[DEAD], valid[DEAD]) | "DeadLetters" >> beam.Flatten())
        return valid.blocks, dead


class Peek(NamedTuple):
    """The first examples of a source, read on the driver by the job's own readers."""
    block: Optional[Block]   # rows that passed the reader's checks (None: no such row)
    dead: list               # DeadLetter records among the rows looked at
    where: str               # the file (or TFDS shard) they came from


def peek(read: "ReadExamples", n: int = 64, max_elements: int = 3) -> Peek:
    """Up to ``n`` examples from the first files (or shards) of ``read``, through the same
    reader and row checks the job runs, without Beam. A file that cannot be read raises the
    reader's SourceError here, on the driver."""
    cfg = dict(read.cfg, limit=n)
    reader = read.reader(cfg)
    if hasattr(reader, "setup"):
        reader.setup()
    validate = ValidateBlocks()
    blocks, dead, where, rows = [], [], "", 0
    for element in read.elements[:max_elements]:
        where = element[0] if read.kind != "tfds" else f"tfds:{element[0]}/{element[1]}"
        gen = reader.process(element)
        try:
            for out in gen:
                items = [out] if not isinstance(out, Block) else list(validate.process(out))
                for item in items:
                    if isinstance(item, Block):
                        blocks.append(item)
                        rows += len(item)
                    else:
                        dead.append(item.value)
                        rows += 1
                if rows >= n:
                    break
        finally:
            gen.close()
        if blocks:
            break
    return Peek(concat(blocks) if blocks else None, dead, where)
