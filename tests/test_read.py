"""ReadExamples on every source format (npz, Parquet, TFRecord, TFDS) with the same data.

1,000 examples x 8 float32 features, int64 labels, a string group and a string id column,
split over two files (one split for TFDS), read in blocks of 128 on the in-process
FnApiRunner. A few rows hold NaN and must come out as dead letters. Everything is generated
under tmp_path; nothing is downloaded (TFDS datasets are built with store_as_tfds_dataset).
"""

import contextlib
import importlib
import json
import re
import sys

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import BeamAssertException, assert_that

from influence_ops import tf_setup
from pipelines.options import InfluenceOptions
from pipelines.read import ReadExamples, SourceError, tfds_shards

tf = tf_setup.tensorflow()

N, P, BLOCK, FILES = 1000, 8, 128, 2
PER_FILE = N // FILES
NAN_ROWS = (3, 500, 777)          # non-finite features: dead-lettered by ValidateBlocks
FEATURE_SPEC = {"x": [[P], "float32"], "y": [[], "int64"], "g": [[], "string"],
                "uid": [[], "string"]}


# ------------------------------------------------------------------------------------ data

@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(N, P)).astype(np.float32)
    x[list(NAN_ROWS), 2] = np.nan
    y = rng.integers(0, 5, N).astype(np.int64)
    g = np.char.add("grp", (np.arange(N) % 13).astype(str))
    uid = np.array([f"ex-{i:04d}" for i in range(N)])
    return {"x": x, "y": y, "g": g, "uid": uid}


def _parts(d):
    for k in range(FILES):
        s = slice(k * PER_FILE, (k + 1) * PER_FILE)
        yield k, {key: v[s] for key, v in d.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory, data):
    """The same examples as npz, Parquet (list column + scalar columns) and TFRecord files."""
    root = tmp_path_factory.mktemp("read")
    for k, part in _parts(data):
        np.savez(root / f"part-{k}.npz", **part)
        cols = {"x": pa.array(list(part["x"]), type=pa.list_(pa.float32())),
                "y": part["y"], "g": part["g"], "uid": part["uid"]}
        cols.update({f"f{j}": part["x"][:, j] for j in range(P)})
        pq.write_table(pa.table(cols), root / f"part-{k}.parquet", row_group_size=200)
        with tf.io.TFRecordWriter(str(root / f"part-{k}.tfrecord")) as w:
            for i in range(PER_FILE):
                w.write(_example(part["x"][i], part["y"][i], part["g"][i],
                                 part["uid"][i]).SerializeToString())
    return root


def _example(x, y=None, g=None, uid=None):
    f = {"x": tf.train.Feature(float_list=tf.train.FloatList(value=list(x)))}
    if y is not None:
        f["y"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(y)]))
    if g is not None:
        f["g"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[str(g).encode()]))
    if uid is not None:
        f["uid"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[str(uid).encode()]))
    return tf.train.Example(features=tf.train.Features(feature=f))


@contextlib.contextmanager
def _importlib_resources_shim():
    """TFDS 4.9.10's builder imports the ``importlib_resources`` backport, which it only
    declares for Python < 3.9; the standard library's ``importlib.resources`` is equivalent."""
    try:
        importlib.import_module("importlib_resources")
        yield
        return
    except ImportError:
        pass
    resources = importlib.import_module("importlib.resources")
    importlib.import_module("importlib.resources.abc")  # makes .abc an attribute
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "importlib_resources", resources)
        yield


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory, data):
    """Two local TFDS datasets of the same examples, 3 shard files each, built offline:
    ``toy_ordered`` keeps generation order, ``toy_shuffled`` has TFDS's write-time shuffle."""
    import tensorflow_datasets as tfds
    root = tmp_path_factory.mktemp("tfds")
    features = tfds.features.FeaturesDict({
        "x": tfds.features.Tensor(shape=(P,), dtype=np.float32), "y": np.int64,
        "g": tfds.features.Text(), "uid": tfds.features.Text()})
    with _importlib_resources_shim():
        for name, ordered in (("toy_ordered", True), ("toy_shuffled", False)):
            ds = tf.data.Dataset.from_tensor_slices(dict(data))
            tfds.dataset_builders.store_as_tfds_dataset(
                name=name, version="1.0.0", features=features, split_datasets={"train": ds},
                data_dir=str(root), disable_shuffling=ordered,
                download_config=tfds.download.DownloadConfig(num_shards=3))
    return root


# ---------------------------------------------------------------------------------- running

def _opts(*flags):
    return PipelineOptions([f"--block_size={BLOCK}", *flags]).view_as(InfluenceOptions)


def run_read(spec, flags, check_blocks, check_dead, role="train"):
    """Runs ReadExamples on the FnApiRunner; returns the examples_read counter."""
    p = beam.Pipeline(runner=FnApiRunner())
    blocks, dead = p | ReadExamples(spec, _opts(*flags), role)
    assert_that(blocks, check_blocks, label="CheckBlocks")
    assert_that(dead, check_dead, label="CheckDead")
    result = p.run()
    result.wait_until_finish()
    counters = result.metrics().query(beam.metrics.MetricsFilter().with_name("examples_read"))
    return sum(c.committed for c in counters["counters"])


def _beam_check(fn):
    def check(actual):
        try:
            fn(list(actual))
        except AssertionError as e:
            raise BeamAssertException(f"{type(e).__name__}: {e}") from e
    return check


def blocks_match(data, expected, sources, x_shape=(P,), with_group=True, skip=NAN_ROWS):
    """Checker: every id of ``expected`` (id -> row) arrives once, except the rows in
    ``skip``; blocks hold <= BLOCK rows; x / y / group equal the source row for row."""
    want = {i: r for i, r in expected.items() if r not in skip}

    def check(blocks):
        assert blocks, "no blocks"
        for b in blocks:
            assert 0 < len(b) <= BLOCK, f"block of {len(b)} rows"
            assert len(b.x) == len(b.y) == len(b.ids), "ragged block"
            assert b.x.shape[1:] == tuple(x_shape), b.x.shape
            assert b.source in sources, b.source
            assert b.ids.dtype.kind == "U", b.ids.dtype
            assert (b.group is not None) == with_group
        ids = np.concatenate([b.ids for b in blocks])
        assert len(ids) == len(set(ids)), "duplicate ids"
        assert set(ids) == set(want), (f"missing {sorted(set(want) - set(ids))[:5]}, "
                                       f"unexpected {sorted(set(ids) - set(want))[:5]}")
        rows = np.array([want[i] for i in ids])
        x = np.concatenate([b.x for b in blocks])
        np.testing.assert_array_equal(x.reshape(len(x), -1), data["x"][rows])
        np.testing.assert_array_equal(np.concatenate([b.y for b in blocks]), data["y"][rows])
        if with_group:
            np.testing.assert_array_equal(np.concatenate([b.group for b in blocks]),
                                          data["g"][rows])
    return _beam_check(check)


def dead_match(expected):
    """Checker: dead letters are exactly ``expected`` {(source, id): reason regex}."""
    def check(dead):
        got = {(s, i): e for s, i, e, *_ in dead}
        assert len(got) == len(dead), f"duplicate dead letters {dead}"
        assert set(got) == set(expected), f"dead letters {sorted(got)} != {sorted(expected)}"
        for key, pattern in expected.items():
            assert re.search(pattern, got[key]), f"{key}: {got[key]!r} !~ {pattern!r}"
    return _beam_check(check)


def _file_ids(ext):
    """Default ids of the two-file formats: ``part-K.EXT:<index in file>`` -> row."""
    return {f"part-{r // PER_FILE}.{ext}:{r % PER_FILE:09d}": r for r in range(N)}


def _uid_ids(data):
    return {u: r for r, u in enumerate(data["uid"])}


def _nan_dead(expected):
    """The NaN rows' dead letters: (source, id) -> reason."""
    by_row = {r: i for i, r in expected.items()}
    return {(_source_of(by_row[r]), by_row[r]): "non-finite" for r in NAN_ROWS}


def _source_of(example_id):
    return example_id.rpartition(":")[0]


# ------------------------------------------------------------------- every format, same data

FORMATS = {
    "npz": ("npz:{files}/part-*.npz", []),
    "parquet": ("parquet:{files}/part-*.parquet", []),
    "tfrecord": ("tfrecord:{files}/part-*.tfrecord", [f"--feature_spec={json.dumps(FEATURE_SPEC)}"]),
    "tfds": ("tfds:toy_ordered/train", ["--tfds_data_dir={tfds}"]),
}


@pytest.mark.parametrize("use_id_key", [False, True], ids=["row_ids", "id_key"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_reads_every_example_once(request, data, fmt, use_id_key):
    where = {"files": request.getfixturevalue("files") if fmt != "tfds" else None,
             "tfds": request.getfixturevalue("tfds_dir") if fmt == "tfds" else None}
    spec, flags = FORMATS[fmt]
    fill = lambda text: text.replace("{files}", str(where["files"])).replace(  # noqa: E731
        "{tfds}", str(where["tfds"]))
    spec = fill(spec)
    flags = [fill(f) for f in flags] + ["--group_key=g"]
    if fmt == "tfds":
        default_ids = {f"toy_ordered/train:{r:09d}": r for r in range(N)}
    else:
        default_ids = _file_ids(fmt)
    sources = {_source_of(i) for i in default_ids}
    if use_id_key:
        flags.append("--id_key=uid")
        expected = _uid_ids(data)
        by_row = {r: i for i, r in default_ids.items()}
        nan_dead = {(_source_of(by_row[r]), data["uid"][r]): "non-finite" for r in NAN_ROWS}
    else:
        expected = default_ids
        nan_dead = _nan_dead(expected)
    read = run_read(spec, flags, blocks_match(data, expected, sources), dead_match(nan_dead))
    assert read == N


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_weight_key_reaches_every_reader(request, data, fmt):
    """``--weight_key`` (here the int64 labels, as numbers) comes out as float64 block
    weights of the right rows through each reader (the driver's peek runs the job's reader
    and row checks); a query source never reads it; a column of strings is a clear error."""
    from pipelines.read import peek
    where = {"files": request.getfixturevalue("files") if fmt != "tfds" else None,
             "tfds": request.getfixturevalue("tfds_dir") if fmt == "tfds" else None}
    spec, flags = FORMATS[fmt]
    fill = lambda text: text.replace("{files}", str(where["files"])).replace(  # noqa: E731
        "{tfds}", str(where["tfds"]))
    spec, flags = fill(spec), [fill(f) for f in flags] + ["--id_key=uid"]
    look = peek(ReadExamples(spec, _opts("--weight_key=y", *flags)), 40)
    rows = [_uid_ids(data)[i] for i in look.block.ids]
    assert look.block.weight.dtype == np.float64
    np.testing.assert_array_equal(look.block.weight, data["y"][rows])
    assert peek(ReadExamples(spec, _opts("--weight_key=g", *flags), "query"), 8
                ).block.weight is None
    with pytest.raises(SourceError, match=r"'g' \(--weight_key\) .*expected (numbers|one "
                                          r"number per example)"):
        peek(ReadExamples(spec, _opts("--weight_key=g", *flags)), 8)


def test_ids_do_not_depend_on_block_size(files, data):
    """Same ids and rows with another block size; query role drops the group."""
    flags = ["--block_size=7", "--group_key=g"]
    expected = _file_ids("npz")
    p = beam.Pipeline(runner=FnApiRunner())
    blocks, dead = p | ReadExamples(f"npz:{files}/part-*.npz",
                                    PipelineOptions(flags).view_as(InfluenceOptions), "query")
    check = blocks_match(data, expected, {"part-0.npz", "part-1.npz"}, with_group=False)

    def small_blocks(bs):
        assert max(len(b) for b in bs) == 7
        check(bs)
    assert_that(blocks, _beam_check(small_blocks), label="CheckBlocks")
    assert_that(dead, dead_match(_nan_dead(expected)), label="CheckDead")
    p.run().wait_until_finish()


# ------------------------------------------------------------------------------------- TFDS

def _tfds_canonical_uids(tfds_dir, name):
    """The split's examples read file by file, in order: what the row index refers to."""
    import tensorflow_datasets as tfds
    builder = tfds.builder(name, data_dir=str(tfds_dir))
    ds = builder.as_dataset(split="train", shuffle_files=False,
                            read_config=tfds.ReadConfig(interleave_cycle_length=1))
    return np.concatenate([r["uid"] for r in ds.batch(N).as_numpy_iterator()]).astype(str)


def test_tfds_row_ids_follow_the_split_order_whatever_the_sharding(tfds_dir, data):
    """On a shuffled multi-file dataset, ``toy_shuffled/train:K`` is the K-th example of the
    split (files in order), so ids do not change with the number of Beam shards."""
    uids = _tfds_canonical_uids(tfds_dir, "toy_shuffled")
    row_of = _uid_ids(data)
    assert [row_of[u] for u in uids] != list(range(N))  # the write-time shuffle happened
    expected = {f"toy_shuffled/train:{k:09d}": row_of[u] for k, u in enumerate(uids)}
    for n_shards in (1, 5):
        shards = tfds_shards("toy_shuffled/train", str(tfds_dir), n_shards=n_shards)
        assert sum(b - a for _, _, a, b in shards) == N and len(shards) == n_shards
    read = run_read("tfds:toy_shuffled/train", [f"--tfds_data_dir={tfds_dir}", "--group_key=g"],
                    blocks_match(data, expected, {"toy_shuffled/train"}),
                    dead_match(_nan_dead(expected)))
    assert read == N


def test_tfds_split_slice(tfds_dir, data):
    expected = {f"toy_ordered/train:{r:09d}": r for r in range(100, 300)}
    run_read("tfds:toy_ordered/train[100:300]", [f"--tfds_data_dir={tfds_dir}"],
             blocks_match(data, expected, {"toy_ordered/train"}, with_group=False),
             dead_match({}))


def test_tfds_missing_dataset_is_a_clear_error_without_download(tmp_path, tfds_dir, monkeypatch):
    import tensorflow_datasets as tfds

    def no_download(*a, **k):
        raise AssertionError("tried to download")
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    empty = tmp_path / "empty"
    empty.mkdir()
    for name in ("no_such_dataset", "mnist"):  # unknown, and registered but not prepared
        with pytest.raises(SourceError, match=re.escape(str(empty))) as e:
            ReadExamples(f"tfds:{name}/train", _opts(f"--tfds_data_dir={empty}"))
        assert "never downloads" in str(e.value) and name in str(e.value)
    with pytest.raises(SourceError, match="'test'"):  # a split the dataset lacks
        ReadExamples("tfds:toy_ordered/test", _opts(f"--tfds_data_dir={tfds_dir}"))
    with pytest.raises(SourceError, match=r"\['nope'\] missing"):
        ReadExamples("tfds:toy_ordered/train", _opts(f"--tfds_data_dir={tfds_dir}", "--x_key=nope"))
    assert not list(empty.iterdir())


# --------------------------------------------------------------------------------- TFRecord

def test_tfrecord_bad_records_and_corrupt_files(tmp_path, files, data):
    spec = f"--feature_spec={json.dumps(FEATURE_SPEC)}"
    # A record with 7 features instead of 8 is dead-lettered; the others pass.
    path = tmp_path / "short.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as w:
        for i in range(10):
            x = data["x"][i][:7] if i == 4 else data["x"][i]
            w.write(_example(x, data["y"][i], data["g"][i], data["uid"][i]).SerializeToString())
    expected = {f"ex-{i:04d}": i for i in range(10)}
    run_read(f"tfrecord:{path}", [spec, "--id_key=uid", "--group_key=g"],
             blocks_match(data, expected, {"short.tfrecord"}, skip=(3, 4)),
             dead_match({("short.tfrecord", "ex-0004"): "unparseable record.*x",
                         ("short.tfrecord", "ex-0003"): "non-finite"}))

    # GZIP-compressed records (by the .gz suffix).
    gz = tmp_path / "small.tfrecord.gz"
    with tf.io.TFRecordWriter(str(gz), options="GZIP") as w:
        for i in range(20, 30):
            w.write(_example(data["x"][i], data["y"][i]).SerializeToString())
    xy = {"x": FEATURE_SPEC["x"], "y": FEATURE_SPEC["y"]}
    run_read(f"tfrecord:{gz}", [f"--feature_spec={json.dumps(xy)}"],
             blocks_match(data, {f"small.tfrecord.gz:{i:09d}": i + 20 for i in range(10)},
                          {"small.tfrecord.gz"}, with_group=False),
             dead_match({}))

    # A corrupt file names the file.
    good = (files / "part-0.tfrecord").read_bytes()
    bad = tmp_path / "corrupt.tfrecord"
    bad.write_bytes(good[:5000] + bytes([good[5000] ^ 0xFF]) + good[5001:])
    with pytest.raises(Exception, match=r"corrupt\.tfrecord: corrupt TFRecord file"):
        run_read(f"tfrecord:{bad}", [spec], _beam_check(lambda b: None),
                 _beam_check(lambda d: None))

    # Records without a feature the spec requires: an error naming the file and feature.
    nolabel = tmp_path / "nolabel.tfrecord"
    with tf.io.TFRecordWriter(str(nolabel)) as w:
        for i in range(5):
            w.write(_example(data["x"][i]).SerializeToString())
    with pytest.raises(Exception, match=r"nolabel\.tfrecord: cannot parse.*Feature: y"):
        run_read(f"tfrecord:{nolabel}", [f"--feature_spec={json.dumps(xy)}"], _beam_check(lambda b: None),
                 _beam_check(lambda d: None))

    # A spec that lacks --x_key, or no spec at all: clear errors before running.
    with pytest.raises(SourceError, match=r"no entry for \['x'\]"):
        ReadExamples(f"tfrecord:{path}", _opts('--feature_spec={"y": [[], "int64"]}'))
    with pytest.raises(SourceError, match="--feature_spec"):
        ReadExamples(f"tfrecord:{path}", _opts())


# ---------------------------------------------------------------------------------- Parquet

def test_parquet_scalar_columns_and_input_shape(files, data):
    cols = ",".join(f"f{j}" for j in range(P))
    expected = _file_ids("parquet")
    sources = {"part-0.parquet", "part-1.parquet"}
    run_read(f"parquet:{files}/part-*.parquet", [f"--x_key={cols}", "--input_shape=2,4"],
             blocks_match(data, expected, sources, x_shape=(2, 4), with_group=False),
             dead_match(_nan_dead(expected)))


def test_parquet_wrong_list_lengths_are_dead_lettered(tmp_path, data):
    n = 40
    xs = [list(map(float, data["x"][i])) for i in range(n)]
    xs[2] = xs[2][:7]
    xs[5] = xs[5] + [1.0]
    xs[7] = None
    labels = pa.array([int(v) for v in data["y"][:n]], type=pa.int64())
    labels = pa.array([None if i == 11 else v for i, v in enumerate(labels.to_pylist())],
                      type=pa.int64())
    path = tmp_path / "lists.parquet"
    pq.write_table(pa.table({"x": pa.array(xs, type=pa.list_(pa.float64())), "y": labels,
                             "uid": pa.array(np.arange(n, dtype=np.int64))}), path,
                   row_group_size=16)
    ok = {f"lists.parquet:{i:09d}": i for i in range(n)}
    bad = {2: r"has length 7, expected 8", 5: r"has length 9, expected 8",
           7: r"'x' is null", 11: r"missing label", 3: "non-finite"}
    dead = {("lists.parquet", f"lists.parquet:{i:09d}"): why for i, why in bad.items()}
    read = run_read(f"parquet:{path}", ["--input_shape=4,2"],
                    blocks_match(data, ok, {"lists.parquet"}, x_shape=(4, 2),
                                 with_group=False, skip=tuple(bad)),
                    dead_match(dead))
    assert read == n  # dead-lettered rows count as read (the run's accounting relies on it)
    # Without --input_shape the common length (8) is expected; int ids become "7", not "7.0".
    dead = {("lists.parquet", str(i)): why for i, why in bad.items()}
    run_read(f"parquet:{path}", ["--id_key=uid"],
             blocks_match(data, {str(i): i for i in range(n)}, {"lists.parquet"},
                          with_group=False, skip=tuple(bad)),
             dead_match(dead))


# ---------------------------------------------------------------------------- clear errors

def test_missing_columns_and_arrays_name_the_file_and_column(files):
    with pytest.raises(Exception, match=r"part-0\.parquet: column\(s\) \['nope'\] missing"):
        run_read(f"parquet:{files}/part-0.parquet", ["--y_key=nope"],
                 _beam_check(lambda b: None), _beam_check(lambda d: None))
    with pytest.raises(Exception, match=r"part-0\.npz: array 'nope' missing"):
        run_read(f"npz:{files}/part-0.npz", ["--group_key=nope"],
                 _beam_check(lambda b: None), _beam_check(lambda d: None))


def test_glob_matching_nothing(tmp_path):
    for kind in ("npz", "parquet", "tfrecord"):
        flags = [f"--feature_spec={json.dumps(FEATURE_SPEC)}"] if kind == "tfrecord" else []
        with pytest.raises(SourceError, match=re.escape(f"no files match '{tmp_path}/*.{kind}'")):
            ReadExamples(f"{kind}:{tmp_path}/*.{kind}", _opts(*flags))
    with pytest.raises(SourceError, match="unknown kind 'csv'"):
        ReadExamples(f"csv:{tmp_path}/x.csv", _opts())


def test_duplicate_base_names_keep_ids_unique(tmp_path, data):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        np.savez(tmp_path / d / "train.npz", x=data["x"][:10], y=data["y"][:10])
    expected = {f"{d}/train.npz:{i:09d}": (i if d == "a" else i + 1000)
                for d in ("a", "b") for i in range(10)}
    doubled = {k: np.concatenate([v[:10], np.zeros_like(v[:990]), v[:10]]) for k, v in data.items()}
    run_read(f"npz:{tmp_path}/*/train.npz", [],
             blocks_match(doubled, expected, {"a/train.npz", "b/train.npz"}, with_group=False,
                          skip=(3, 1003)),
             dead_match({(f"{d}/train.npz", f"{d}/train.npz:{3:09d}"): "non-finite"
                         for d in ("a", "b")}))
