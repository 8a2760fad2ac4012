"""Reliability (issue 10): no silent loss, no ambiguous result, every failure named before
the expensive part. One test per cause found by trying the job as a careful new user and as
hostile input would; each reproduces its cause with the demo's model and data (small) and
checks what the user sees (one line, non-zero exit), what is written (no ``_SUCCESS``, no
half manifest) and, where the job runs, that the result is complete. docs/failure-modes.md
lists them.
"""

import gzip
import json
import os
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from influence_ops.config import ConfigError, InfluenceConfig
from pipelines import run as run_lib
from tests.reliability_helpers import (N_QUERY, N_TRAIN, base_args, cli, make_inputs,
                                       record_offset, tfrecord_examples)

SPEC = '--feature_spec={"x": [[64], "float32"], "y": [[], "int64"]}'
SPEC_ID = '--feature_spec={"x": [[64], "float32"], "y": [[], "int64"], "id": [[], "string"]}'


@pytest.fixture(scope="module")
def inp(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("rel"))


def one_line_error(status, lines, *fragments):
    """The CLI failed with a known cause, in one line that holds every fragment."""
    assert status == 2, lines
    assert len(lines) == 1, lines
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def finished(out):
    return os.path.exists(os.path.join(out, "_SUCCESS"))


def read_table(out, name):
    return pq.read_table(os.path.join(out, name)).to_pandas()


# ------------------------------------------------- 1. truncation and corruption are named

def test_truncated_tfrecord_is_a_named_error_not_a_short_read(inp, tmp_path, capsys):
    good = tmp_path / "train.tfrecord"
    tfrecord_examples(good, inp["x"], inp["y"])
    data = good.read_bytes()
    cut = tmp_path / "cut.tfrecord"  # 7 bytes into the header of record 100 (of 200)
    cut.write_bytes(data[:record_offset(data, 100) + 7])
    out = str(tmp_path / "out")
    status, lines = cli(capsys, base_args(inp, out, SPEC, train=f"tfrecord:{cut}"))
    one_line_error(status, lines, "cut.tfrecord", "truncated TFRecord file",
                   "7 bytes into the header of record 100")
    assert not finished(out)
    # Cut inside a record's data, and a gzip stream cut short: named too.
    mid = tmp_path / "mid.tfrecord"
    mid.write_bytes(data[:record_offset(data, 50) + 40])
    status, lines = cli(capsys, base_args(inp, str(tmp_path / "o2"), SPEC,
                                          train=f"tfrecord:{mid}"))
    one_line_error(status, lines, "mid.tfrecord", "truncated TFRecord file", "record 50")
    gz = tmp_path / "cut.tfrecord.gz"
    gz.write_bytes(gzip.compress(data)[:-200])
    status, lines = cli(capsys, base_args(inp, str(tmp_path / "o3"), SPEC,
                                          train=f"tfrecord:{gz}"))
    one_line_error(status, lines, "cut.tfrecord.gz")


def test_tfrecord_length_checksum_is_checked(inp, tmp_path):
    from pipelines.read import SourceError, tfrecord_frames
    path = tmp_path / "t.tfrecord"
    tfrecord_examples(path, inp["x"][:20], inp["y"][:20])
    assert tfrecord_frames(str(path), str(path)) == 20
    data = bytearray(path.read_bytes())
    data[record_offset(bytes(data), 7) + 2] ^= 0x01  # a bit of record 7's length
    path.write_bytes(bytes(data))
    with pytest.raises(SourceError, match=r"t\.tfrecord: corrupt TFRecord file: the length "
                                          r"of record 7 .* fails its checksum"):
        tfrecord_frames(str(path), str(path))


def test_damaged_parquet_among_several_is_named(inp, tmp_path, capsys):
    d = tmp_path / "pq"
    d.mkdir()
    x = pa.array(list(inp["x"].astype(np.float32)), type=pa.list_(pa.float32()))
    pq.write_table(pa.table({"x": x, "y": inp["y"]}), d / "a.parquet")
    (d / "b.parquet").write_bytes(b"garbage " * 20)
    (d / "c.parquet").write_bytes(b"")
    status, lines = cli(capsys, base_args(inp, str(tmp_path / "out"),
                                          train=f"parquet:{d}/*.parquet"))
    line = one_line_error(status, lines, "not a readable Parquet file")
    assert "b.parquet" in line or "c.parquet" in line
    from pipelines.read import SourceError
    for name in ("b.parquet", "c.parquet"):
        with pytest.raises(SourceError, match=rf"{name}: not a readable Parquet file"):
            _read_all(f"parquet:{d}/{name}")


def test_parquet_page_checksum_failure_is_named(inp, tmp_path):
    from pipelines.read import SourceError
    path = tmp_path / "sum.parquet"
    pq.write_table(pa.table({"x": pa.array(list(inp["x"].astype(np.float32)),
                                           type=pa.list_(pa.float32())), "y": inp["y"]}),
                   path, write_page_checksum=True, compression="NONE")
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the x column's data pages
    path.write_bytes(bytes(data))
    with pytest.raises(SourceError, match=r"sum\.parquet: (corrupt Parquet data|not a "
                                          r"readable Parquet file)"):
        _read_all(f"parquet:{path}")


def test_truncated_npz_is_named(inp, tmp_path, capsys):
    raw = open(os.path.join(inp["dir"], "train.npz"), "rb").read()
    (tmp_path / "cut.npz").write_bytes(raw[:len(raw) // 2])
    status, lines = cli(capsys, base_args(inp, str(tmp_path / "out"),
                                          train=f"npz:{tmp_path}/cut.npz"))
    one_line_error(status, lines, "cut.npz: not a readable .npz archive")


def _read_all(spec, *flags):
    """Every block and dead letter of a source, read without Beam (the job's readers)."""
    from apache_beam.options.pipeline_options import PipelineOptions
    from pipelines.options import InfluenceOptions
    from pipelines.read import Block, ReadExamples
    read = ReadExamples(spec, PipelineOptions(list(flags)).view_as(InfluenceOptions))
    blocks, dead = [], []
    for element in read.elements:
        for out in read.reader().process(element):
            (blocks.append(out) if isinstance(out, Block) else dead.append(out.value))
    return blocks, dead


# ---------------------------------------------------------------- 2. ids unique or no run

def test_duplicate_train_ids_fail_before_the_fit(inp, tmp_path, capsys):
    ids = np.array([f"ex-{i:04d}" for i in range(N_TRAIN)])
    ids[150] = ids[120]  # beyond the driver's first look: the job's id check finds it
    np.savez(tmp_path / "train.npz", x=inp["x"], y=inp["y"], id=ids)
    np.savez(tmp_path / "q.npz", x=inp["xq"], y=inp["yq"],
             id=np.array([f"q{i}" for i in range(N_QUERY)]))
    out = str(tmp_path / "out")
    status, lines = cli(capsys, base_args(inp, out, "--id_key=id",
                                          train=f"npz:{tmp_path}/train.npz",
                                          queries=f"npz:{tmp_path}/q.npz"))
    one_line_error(status, lines, "duplicate example ids in --train (--id_key=id)",
                   "'ex-0120' x2", f"{N_TRAIN} rows, {N_TRAIN - 1} distinct ids")
    assert not finished(out)
    assert not os.path.exists(os.path.join(out, "artifact")), "fitted despite duplicates"


def test_duplicate_query_ids_fail(inp, tmp_path, capsys):
    qids = np.array([f"q{i}" for i in range(N_QUERY)])
    qids[1] = "q0"
    np.savez(tmp_path / "q.npz", x=inp["xq"], y=inp["yq"], id=qids)
    np.savez(tmp_path / "train.npz", x=inp["x"], y=inp["y"],
             id=np.array([f"ex-{i}" for i in range(N_TRAIN)]))
    out = str(tmp_path / "out")
    status, lines = cli(capsys, base_args(inp, out, "--id_key=id",
                                          train=f"npz:{tmp_path}/train.npz",
                                          queries=f"npz:{tmp_path}/q.npz"))
    one_line_error(status, lines, "--queries", "duplicate example ids", "'q0' x2")
    assert not finished(out)


def test_duplicate_ids_across_files_are_found_by_the_job(inp, tmp_path, capsys):
    """Each TFRecord file alone has unique ids; together they repeat one. The driver's look
    at the first file cannot see it: the job's id check (hash shards) must."""
    ids = np.array([f"ex-{i:04d}" for i in range(N_TRAIN)])
    tfrecord_examples(tmp_path / "a.tfrecord", inp["x"][:100], inp["y"][:100], ids[:100])
    ids2 = ids[100:].copy()
    ids2[-1] = ids[3]
    tfrecord_examples(tmp_path / "b.tfrecord", inp["x"][100:], inp["y"][100:], ids2)
    np.savez(tmp_path / "q.npz", x=inp["xq"], y=inp["yq"],
             id=np.array([f"q{i}" for i in range(N_QUERY)]))
    out = str(tmp_path / "out")
    status, lines = cli(capsys, base_args(inp, out, SPEC_ID, "--id_key=id",
                                          train=f"tfrecord:{tmp_path}/*.tfrecord",
                                          queries=f"npz:{tmp_path}/q.npz"))
    one_line_error(status, lines, "duplicate example ids in --train", "'ex-0003' x2")
    assert not finished(out)


def test_the_finaliser_counts_distinct_ids_not_rows(tmp_path):
    """finalize() itself refuses a result whose ids repeat, even when rows add up."""
    from pipelines import finalize as fin
    facts = [("count", "train_read_valid", 4), ("count", "query_read_valid", 1),
             ("count", "dead_at_read", 0), ("count", "train_examples_featurized", 4),
             ("count", "query_examples_featurized", 1),
             ("ids", "train", {"rows": 4, "distinct": 3, "duplicated": 1,
                               "first": [("a", 2)]}),
             ("ids", "query", {"rows": 1, "distinct": 1, "duplicated": 0, "first": []})]
    with pytest.raises(fin.RunError, match=r"duplicate example ids in --train.*'a' x2"):
        fin.finalize(facts, str(tmp_path), {}, 0.0, "influence", "exact", k=1)
    assert not os.path.exists(tmp_path / "_SUCCESS")


# ---------------------------------------------------------------- 3. k > half the train set

def test_k_larger_than_the_training_set_warns_and_is_recorded(inp, tmp_path, capsys):
    n = 8
    np.savez(tmp_path / "small.npz", x=inp["x"][:n], y=inp["y"][:n])
    out = str(tmp_path / "out")
    capsys.readouterr()
    from pipelines import cli as cli_lib
    status = cli_lib.main(base_args(inp, out, "--k=20", train=f"npz:{tmp_path}/small.npz"))
    err = capsys.readouterr().err
    assert status == 0 and finished(out)
    assert "warning: --k=20 exceeds half of the 8 scored training examples" in err
    m = json.load(open(os.path.join(out, "run_manifest.json")))
    assert m["topk"] == {"k": 20, "k_exceeds_half": True}
    assert any("--k=4 or less" in w for w in m["warnings"])
    topk = read_table(out, "topk")
    assert len(topk) == N_QUERY * 2 * n  # lists hold min(k, n): documented, not silent


def test_k_within_half_is_not_flagged(inp, tmp_path):
    out = str(tmp_path / "out")
    m = run_lib.run(base_args(inp, out, "--k=3"))
    assert m["topk"] == {"k": 3, "k_exceeds_half": False} and m["warnings"] == []
    assert m["row_counts"]["topk"] == N_QUERY * 2 * 3


# ------------------------------------------------------------------- 4. negative damping

def test_negative_damping_is_refused(inp, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"--damping must be >= 0, got -0.1"):
        InfluenceConfig(damping=-0.1).validate()
    status, lines = cli(capsys, base_args(inp, str(tmp_path / "o"), "--damping=-0.1"))
    one_line_error(status, lines, "--damping must be >= 0")
    assert not os.path.exists(tmp_path / "o")


# ------------------------------------------------------ 5. Parquet list width from the model

def test_parquet_list_width_comes_from_the_model_not_the_first_rows(inp, tmp_path):
    xs = [list(map(float, r)) for r in inp["x"]]
    bad = list(range(0, 120))  # most of the first batch: 10 values instead of 64
    for i in bad:
        xs[i] = xs[i][:10]
    path = tmp_path / "mostly_bad_first.parquet"
    pq.write_table(pa.table({"x": pa.array(xs, type=pa.list_(pa.float32())),
                             "y": inp["y"]}), path)
    out = str(tmp_path / "out")
    m = run_lib.run(base_args(inp, out, "--max_bad_fraction=0.7", train=f"parquet:{path}"))
    dead = read_table(out, "dead_letter")
    assert sorted(dead.example_id) == [f"mostly_bad_first.parquet:{i:09d}" for i in bad]
    assert set(dead.stage) == {"read"} and dead.error.str.contains("expected 64").all()
    assert m["row_counts"]["self_influence"] == N_TRAIN - len(bad)


# -------------------------------------------- 6. shape / loss mismatches: one sentence, early

@pytest.mark.parametrize("case,fragments", [
    ("wide", ["wide.npz", "examples have shape (128,), the model takes (64,)"]),
    ("input_shape", ["examples have shape (8, 8), the model takes (64,)",
                     "--input_shape=64 would reshape them"]),
    ("binary_loss", ["--loss=binary_crossentropy needs labels of width 10",
                     "--loss=sparse_categorical_crossentropy"]),
    ("label_range", ["none of the first 64 labels can go into --loss="
                     "sparse_categorical_crossentropy with 10 outputs"]),
])
def test_data_that_does_not_fit_the_model_is_one_sentence_before_any_work(
        inp, tmp_path, capsys, case, fragments):
    flags, train = [], None
    if case == "wide":
        np.savez(tmp_path / "wide.npz", x=np.concatenate([inp["x"], inp["x"]], 1), y=inp["y"])
        train = f"npz:{tmp_path}/wide.npz"
    elif case == "input_shape":
        flags = ["--input_shape=8,8"]
    elif case == "binary_loss":
        flags = ["--loss=binary_crossentropy"]
    else:
        np.savez(tmp_path / "shifted.npz", x=inp["x"], y=inp["y"] + 10)
        train = f"npz:{tmp_path}/shifted.npz"
    out = str(tmp_path / "out")
    status, lines = cli(capsys, base_args(inp, out, *flags, train=train))
    line = one_line_error(status, lines, "--train", *fragments)
    assert "in user code" not in line and "Traceback" not in line
    assert not os.path.exists(out), "the output was touched before the check"


def test_a_later_file_of_another_shape_is_named_by_the_job(inp, tmp_path, capsys):
    np.savez(tmp_path / "a.npz", x=inp["x"][:100], y=inp["y"][:100])
    np.savez(tmp_path / "b.npz", x=inp["x"][100:, :32], y=inp["y"][100:])
    out = str(tmp_path / "out")
    status, lines = cli(capsys, base_args(inp, out, train=f"npz:{tmp_path}/*.npz"))
    one_line_error(status, lines, "b.npz", "examples have shape (32,), the model takes (64,)")
    assert not finished(out)


# ------------------------------------------------------------------ 7. atomic manifests

def test_disk_full_while_writing_the_manifest_leaves_no_partial_manifest(
        inp, tmp_path, capsys, monkeypatch):
    from influence_ops import storage
    real_mkstemp = storage.tempfile.mkstemp

    def full_disk(*args, **kwargs):  # the manifest's temporary file lives on a full disk
        fd, path = real_mkstemp(*args, **kwargs)
        if ".run_manifest.json" in path:
            os.close(fd)
            fd = os.open("/dev/full", os.O_WRONLY)
        return fd, path
    monkeypatch.setattr(storage.tempfile, "mkstemp", full_disk)
    out = str(tmp_path / "out")
    status, lines = cli(capsys, base_args(inp, out))
    one_line_error(status, lines, "cannot write", "run_manifest.json",
                   "No space left on device")
    assert not os.path.exists(os.path.join(out, "run_manifest.json"))
    assert not finished(out)
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")], "temporary file left"


def test_atomic_write_keeps_the_old_content_on_failure(tmp_path, monkeypatch):
    from influence_ops import storage
    path = tmp_path / "run_manifest.json"
    storage.write_atomic(str(path), b'{"old": 1}')

    def enospc(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(storage.os, "fsync", enospc)
    with pytest.raises(OSError, match="No space left"):
        storage.write_atomic(str(path), b'{"new": 2}')
    assert path.read_bytes() == b'{"old": 1}'
    assert os.listdir(tmp_path) == ["run_manifest.json"]


def test_a_truncated_manifest_is_reported_as_such(tmp_path):
    (tmp_path / "run_manifest.json").write_text('{"method": "infl')
    with pytest.raises(run_lib.RunError, match="run_manifest.json is not valid JSON"):
        run_lib.read_manifest(str(tmp_path))


# -------------------------------------------------- 8. every failure: one or two lines

def test_output_that_cannot_be_written_is_refused_before_the_job(inp, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    status, lines = cli(capsys, base_args(inp, f"{blocker}/out"))
    one_line_error(status, lines, "--output", "cannot write there", "Not a directory")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only folders")
def test_read_only_output_is_refused_before_the_job(inp, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        status, lines = cli(capsys, base_args(inp, f"{ro}/out"))
        one_line_error(status, lines, "cannot write there", "Permission denied")
    finally:
        ro.chmod(0o755)


def test_verbose_keeps_the_traceback(inp, tmp_path, capsys):
    from pipelines import cli as cli_lib
    capsys.readouterr()
    status = cli_lib.main(base_args(inp, str(tmp_path / "o"), "--damping=-1", "--verbose"))
    err = capsys.readouterr().err
    assert status == 2 and "Traceback (most recent call last)" in err
    assert "beam-influence: error: --damping must be >= 0" in err


def test_an_unexpected_error_is_two_lines_and_status_1(inp, tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise KeyError("internal")
    monkeypatch.setattr(run_lib, "preflight", boom)
    status, lines = cli(capsys, base_args(inp, str(tmp_path / "o")))
    assert status == 1 and len(lines) == 2, lines
    assert "KeyError" in lines[0] and "--verbose" in lines[1]


@pytest.mark.parametrize("make,status,fragment", [
    (lambda: __import__("apache_beam.io.filesystem", fromlist=["BeamIOError"]).BeamIOError(
        "Delete operation failed", {"/out/topk": OSError(30, "Read-only file system")}),
     2, "BeamIOError: Delete operation failed"),
    (lambda: zipfile.BadZipFile("File is not a zip file"), 2, "BadZipFile: File is not a zip"),
    (lambda: OSError(28, "No space left on device", "/out/topk/part-0.parquet"), 2,
     "OSError: No space left on device: /out/topk/part-0.parquet"),
    (lambda: ValueError("in user code:\n\n    File \"/x.py\", line 3, in fn\n        "
                        "return f(x)\n\n    ValueError: Input 0 of layer 'hidden' is "
                        "incompatible with the layer [while running 'FitMethod/Fit']"),
     2, "Input 0 of layer 'hidden' is incompatible"),
])
def test_every_exception_becomes_one_line(make, status, fragment):
    from pipelines.cli import describe
    code, lines = describe(make())
    assert code == status and len(lines) == 1 and fragment in lines[0], lines
    assert "\n" not in lines[0] and "in user code" not in lines[0]


def test_help_lists_the_job_options(capsys):
    from pipelines import cli as cli_lib
    assert cli_lib.main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--train", "--queries", "--output", "--solver", "--k",
                 "--id_key", "--max_bad_fraction", "--unsafe_model_loading", "--verbose"):
        assert flag in out, flag
    assert "Exit status" in out


# ------------------------------------------------ 10. everything rejected: say why, early

def test_string_labels_are_refused_with_the_reason(inp, tmp_path, capsys):
    np.savez(tmp_path / "strlab.npz", x=inp["x"], y=inp["y"].astype(str))
    out = str(tmp_path / "out")
    status, lines = cli(capsys, base_args(inp, out, train=f"npz:{tmp_path}/strlab.npz"))
    line = one_line_error(status, lines, "strlab.npz", "labels are strings",
                          "needs integer class indices")
    assert "dead_letter" not in line


def test_no_training_example_left_says_why_without_pointing_at_unwritten_files():
    from pipelines.fit import check_guard
    summary = {"total": 200, "reasons": [{"stage": "check", "reason": "bad label 11 for a "
                                          "sparse loss with 10 outputs", "count": 200,
                                          "example_id": "t.npz:000000000", "source": "t.npz"}]}
    with pytest.raises(run_lib.RunError, match=r"every row of --train was rejected \(200 x "
                                               r"check: bad label 11 .*t\.npz:000000000"):
        check_guard({"problems": [], "train_ok": 0, "dead": summary})


def test_too_many_rejected_rows_name_the_reasons_and_the_written_table(inp, tmp_path,
                                                                       capsys):
    x, y = inp["x"].copy(), inp["y"].copy()
    y[[5, 70]] = 12
    x[9, 0] = np.nan
    np.savez(tmp_path / "bad.npz", x=x, y=y)
    out = str(tmp_path / "out")
    status, lines = cli(capsys, base_args(inp, out, train=f"npz:{tmp_path}/bad.npz"))
    one_line_error(status, lines, "3 of 210 examples were dead-lettered",
                   "2 x check: bad label", "1 x read: non-finite feature values",
                   os.path.join(out, "dead_letter"))
    dead = read_table(out, "dead_letter")  # the table the message points at exists
    assert sorted(dead.stage) == ["check", "check", "read"]
    assert not finished(out)


# ------------------------------------------------------- 11. a file that is not a model

def test_a_file_that_is_not_a_keras_model_is_named_as_such(inp, tmp_path):
    from influence_ops.model import InfluenceModelError, load_keras_model
    (tmp_path / "text.keras").write_text("hello")
    (tmp_path / "empty.keras").write_bytes(b"")
    with zipfile.ZipFile(tmp_path / "other.keras", "w") as z:
        z.writestr("readme.txt", "not a model")
    for name, why in (("text", "not a zip archive"), ("empty", "empty"),
                      ("other", "no config.json")):
        with pytest.raises(InfluenceModelError, match=f"{name}.keras is not a Keras model "
                                                      f"file: .*{why}"):
            load_keras_model(str(tmp_path / f"{name}.keras"))
    with pytest.raises(InfluenceModelError, match="model file not found"):
        load_keras_model(str(tmp_path / "missing.keras"))


# --------------------------------------------------- 12. per-query solvers, many queries

def test_per_query_solver_with_many_queries_warns_before_the_job(inp, tmp_path, caplog):
    import logging
    many = 1001
    np.savez(tmp_path / "many.npz", x=np.repeat(inp["xq"], 101, 0)[:many],
             y=np.repeat(inp["yq"], 101, 0)[:many])
    blocker = tmp_path / "f"
    blocker.write_text("")
    argv = base_args(inp, f"{blocker}/out", queries=f"npz:{tmp_path}/many.npz")
    argv[argv.index("--solver=exact")] = "--solver=cg"
    with caplog.at_level(logging.WARNING), pytest.raises(run_lib.RunError,
                                                         match="cannot write there"):
        run_lib.run(argv)  # stops at the output claim: the warning came before any work
    warned = [r.getMessage() for r in caplog.records if "--solver=cg solves each" in
              r.getMessage()]
    assert warned and f"the {many} queries" in warned[0] and f"over {N_TRAIN} fit" in warned[0]


# ------------------------------------------------------------------------------------ docs

def test_the_failure_modes_table_names_real_tests():
    import glob
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    doc = open(os.path.join(root, "docs", "failure-modes.md")).read()
    named = set(re.findall(r"`(test_\w+)", doc))
    defined = set()
    for path in glob.glob(os.path.join(root, "tests", "test_*.py")):
        defined |= set(re.findall(r"^def (test_\w+)", open(path).read(), re.M))
    assert len(named) > 30 and named <= defined, sorted(named - defined)
