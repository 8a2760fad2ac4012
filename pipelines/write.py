"""Parquet output of every table of a job in one stage, committed by the job's last step.

``WriteTables`` takes the output tables' PCollections at once; their elements are pyarrow
tables or single rows (dicts of column values, e.g. dead letters). Each bundle streams what
it sees into one Parquet file per table name, under a temporary
folder (``<output>/_temp/<token>/<name>/``), and emits ``("part", name, (path, rows))``
facts. The job's last step (:func:`commit`) renames exactly the files those facts name to
``<output>/<name>/part-NNNNN-of-MMMMM.parquet`` and removes the temporary folder, with the
files of failed bundle attempts in it: the runner only delivers the outputs of the attempt it
committed. This is the protocol of Beam's ``WriteToParquet`` (temporary files, then a
finalising rename), as one ``ParDo`` for all tables instead of ~30 transforms and three
stages per table, which were a quarter of a small job's graph.

Memory: rows are buffered per table name up to :data:`ROW_GROUP_ROWS` rows or
:data:`ROW_GROUP_BYTES` before a row group is written, so a bundle holds at most one row group
per table.
"""

from __future__ import annotations

import uuid
from typing import Dict, List, Optional

import apache_beam as beam
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

from pipelines.finalize import _join

TEMP = "_temp"            # under --output: the parts being written, removed by commit()
ROW_GROUP_ROWS = 65536    # rows buffered per table before a Parquet row group is written
ROW_GROUP_BYTES = 64 << 20  # ... or bytes (tables of images: the examples tables)


def rows(item) -> int:
    """Rows in one element of a table's PCollection (a pyarrow table or one row)."""
    return 1 if isinstance(item, dict) else item.num_rows


def temp_dir(output: str, token: Optional[str] = None) -> str:
    """A fresh temporary folder for one run's parts (``token``: the run's id)."""
    return _join(output, TEMP, token or uuid.uuid4().hex[:16])


class _Part:
    """One open Parquet file of one table in one bundle."""

    def __init__(self, path: str, schema):
        self.path, self.schema = path, schema
        self.file = self.writer = None
        self.rows, self.buffer, self.singles, self.buffered = 0, [], [], 0
        self.buffered_bytes = 0

    def add(self, item):
        if isinstance(item, dict):
            self.singles.append(item)
            n = 1
        else:
            self.buffer.append(item)
            n = item.num_rows
            self.buffered_bytes += item.nbytes
        self.buffered += n
        self.rows += n
        if self.buffered >= ROW_GROUP_ROWS or self.buffered_bytes >= ROW_GROUP_BYTES:
            self.flush()

    def flush(self):
        import pyarrow as pa
        import pyarrow.parquet as pq
        if self.singles:  # sorted: a part's content does not depend on arrival order
            self.singles.sort(key=lambda r: tuple(map(str, r.values())))
            self.buffer.append(pa.Table.from_pylist(self.singles, schema=self.schema))
            self.singles = []
        if not self.buffer:
            return
        table = (self.buffer[0] if len(self.buffer) == 1
                 else pa.concat_tables(self.buffer, promote_options="default"))
        self.buffer, self.buffered, self.buffered_bytes = [], 0, 0
        if self.writer is None:
            self.file = FileSystems.create(self.path)
            self.writer = pq.ParquetWriter(self.file, self.schema or table.schema)
        self.writer.write_table(table)

    def close(self):
        self.flush()
        if self.writer is not None:
            self.writer.close()
            self.file.close()


class _WriteParts(beam.DoFn):
    def __init__(self, temp: str, schemas: Dict[str, object]):
        self.temp, self.schemas = temp, schemas

    def start_bundle(self):
        self.parts: Dict[str, _Part] = {}

    def process(self, item):
        name, table = item
        part = self.parts.get(name)
        if part is None:
            path = _join(self.temp, name, f"{uuid.uuid4().hex}.parquet")
            part = self.parts[name] = _Part(path, self.schemas.get(name))
        part.add(table)

    def finish_bundle(self):
        for name, part in self.parts.items():
            part.close()
            if part.writer is not None:
                yield GlobalWindows.windowed_value(("part", name, (part.path, part.rows)))
        self.parts = {}


class WriteTables(beam.PTransform):
    """``{name: PCollection of pyarrow tables or row dicts}`` -> ``("part", name, (path,
    rows))`` facts for :func:`commit`. ``schemas``: the Parquet schema per table name (None:
    the first table's; rows need one)."""

    def __init__(self, temp: str, schemas: Dict[str, object]):
        super().__init__()
        self.temp, self.schemas = temp, dict(schemas)

    def expand(self, tables):
        tagged = [pc | f"Name_{name}" >> beam.Map(lambda t, n=name: (n, t))
                  for name, pc in tables.items()]
        return (tagged | "AllTables" >> beam.Flatten()
                | "WriteParts" >> beam.ParDo(_WriteParts(self.temp, self.schemas)))


def _write_empty(path: str, schema) -> None:
    import pyarrow.parquet as pq
    with FileSystems.create(path) as f:
        pq.write_table(schema.empty_table(), f)


def commit(output: str, temp: str, parts: Dict[str, List[str]],
           schemas: Dict[str, object]) -> Dict[str, List[str]]:
    """Moves the parts of each table to ``<output>/<name>/part-i-of-n.parquet`` and removes
    ``temp``; returns the final paths per table. A table with no part gets one empty file
    when its schema is known. One batch rename per table, existence checked only for the
    parts it could not move, so it is safe to run again after a partial attempt: a part
    already moved is left where it is."""
    files = {}
    for name in sorted(set(parts) | set(schemas)):
        srcs = sorted(parts.get(name, []))
        if not srcs and schemas.get(name) is not None:
            srcs = [_join(temp, name, "empty.parquet")]
            if not FileSystems.exists(srcs[0]):
                _write_empty(srcs[0], schemas[name])
        n = len(srcs)
        dsts = [_join(output, name, f"part-{i:05d}-of-{n:05d}.parquet") for i in range(n)]
        if srcs:
            _mkdirs(_join(output, name))
            try:
                FileSystems.rename(srcs, dsts)  # one batch (object stores: copy + delete)
            except BeamIOError as e:
                # Parts an earlier attempt of this step moved: gone here and at their place.
                if not all(not FileSystems.exists(s) and FileSystems.exists(d)
                           for s, d in e.exception_details):
                    raise
        files[name] = dsts
    remove_temp(output)
    return files


def _mkdirs(path: str) -> None:
    try:
        FileSystems.mkdirs(path)
    except IOError:  # it exists (object stores have no folders: nothing to do there)
        pass


def remove_temp(output: str) -> None:
    """Removes ``<output>/_temp`` (the parts of this run and of any run that died)."""
    from influence_ops import storage
    storage.delete_tree(_join(output, TEMP))
