"""pipelines.write: every table in one stage, files moved into place by the last step.

Real parts: Beam's FnApiRunner writes the parts, pyarrow reads the files back. The protocol
under test is Beam's own (temporary files, then a rename of exactly the files the runner
committed): a file a failed bundle attempt left in the temporary folder must not reach the
output, and running the commit again after a partial one must give the same result.
"""

import json
import os

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from pipelines import write

SCHEMA = pa.schema([("id", pa.string()), ("score", pa.float64())])
ROW_SCHEMA = pa.schema([("source", pa.string()), ("n", pa.int64())])


def _table(lo, hi):
    return pa.table({"id": [f"{i:04d}" for i in range(lo, hi)],
                     "score": [float(i) for i in range(lo, hi)]}, schema=SCHEMA)


def _write(tmp_path, tables, rows, schemas):
    out = str(tmp_path / "out")
    temp = write.temp_dir(out, "run1")
    with beam.Pipeline(runner=FnApiRunner(), options=PipelineOptions()) as p:
        pcs = {"scores": p | "T" >> beam.Create(tables),
               "rows": p | "R" >> beam.Create(rows)}
        if "empty" in schemas:
            pcs["empty"] = p | "E" >> beam.Create([])
        facts = pcs | write.WriteTables(temp, schemas)
        _ = facts | beam.combiners.ToList() | beam.Map(_save, str(tmp_path / "facts.json"))
    with open(tmp_path / "facts.json") as f:
        return out, temp, json.load(f)


def _save(facts, path):
    with open(path, "w") as f:
        json.dump(facts, f)


def test_tables_and_rows_are_written_and_committed(tmp_path):
    tables = [_table(0, 5), _table(5, 12), _table(12, 12)]
    rows = [{"source": "b", "n": 2}, {"source": "a", "n": 1}]
    schemas = {"scores": SCHEMA, "rows": ROW_SCHEMA, "empty": SCHEMA}
    out, temp, facts = _write(tmp_path, tables, rows, schemas)
    parts = {}
    for kind, name, (path, n) in facts:
        assert kind == "part" and path.startswith(temp)
        parts.setdefault(name, []).append(path)
    assert set(parts) == {"scores", "rows"}  # nothing arrived for "empty": no part
    # A file a failed attempt left behind: in the temporary folder, never named by a fact.
    orphan = os.path.join(temp, "scores", "orphan.parquet")
    pq.write_table(_table(100, 110), orphan)

    files = write.commit(out, temp, parts, schemas)

    got = pa.concat_tables([pq.read_table(f) for f in files["scores"]]).sort_by("id")
    assert got.equals(_table(0, 12)), "every row once, the orphan's rows not at all"
    assert [os.path.basename(f) for f in files["scores"]] == [
        f"part-{i:05d}-of-{len(files['scores']):05d}.parquet" for i in range(len(files["scores"]))]
    r = pq.read_table(files["rows"][0])
    assert r.schema.equals(ROW_SCHEMA)
    assert r.to_pylist() == [{"source": "a", "n": 1}, {"source": "b", "n": 2}]  # sorted rows
    e = pq.read_table(files["empty"][0])  # a table with no rows still gets its (empty) file
    assert e.num_rows == 0 and e.schema.equals(SCHEMA)
    assert not os.path.exists(os.path.join(out, write.TEMP)), "the temporary folder is removed"
    assert sorted(os.listdir(out)) == ["empty", "rows", "scores"]


def test_commit_again_after_a_partial_one_gives_the_same_files(tmp_path):
    out, temp = str(tmp_path / "out"), write.temp_dir(str(tmp_path / "out"), "t")
    srcs = []
    for i, (lo, hi) in enumerate([(0, 3), (3, 7)]):
        path = os.path.join(temp, "scores", f"p{i}.parquet")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(_table(lo, hi), path)
        srcs.append(path)
    # A first attempt moved only the first part, then died.
    first = os.path.join(out, "scores", "part-00000-of-00002.parquet")
    os.makedirs(os.path.dirname(first))
    os.rename(srcs[0], first)
    files = write.commit(out, temp, {"scores": srcs}, {"scores": SCHEMA})
    got = pa.concat_tables([pq.read_table(f) for f in files["scores"]])
    assert got.sort_by("id").equals(_table(0, 7))
    assert files == write.commit(out, temp, {"scores": srcs}, {"scores": SCHEMA})


def test_a_part_writes_a_row_group_per_threshold_and_keeps_every_row(tmp_path, monkeypatch):
    """Memory per bundle is one row group per table: the buffer is written out once it holds
    ROW_GROUP_ROWS rows or ROW_GROUP_BYTES bytes, whichever comes first."""
    monkeypatch.setattr(write, "ROW_GROUP_ROWS", 10)
    part = write._Part(str(tmp_path / "p.parquet"), SCHEMA)
    for lo in range(0, 35, 5):
        part.add(_table(lo, lo + 5))
    part.close()
    f = pq.ParquetFile(tmp_path / "p.parquet")
    assert f.metadata.num_row_groups == 4 and part.rows == 35  # 10, 10, 10, 5
    assert f.read().equals(_table(0, 35))
    monkeypatch.setattr(write, "ROW_GROUP_BYTES", _table(0, 5).nbytes)
    part = write._Part(str(tmp_path / "q.parquet"), SCHEMA)
    for lo in range(0, 15, 5):
        part.add(_table(lo, lo + 5))
    part.close()
    assert pq.ParquetFile(tmp_path / "q.parquet").metadata.num_row_groups == 3
