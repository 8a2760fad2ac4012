"""The job's last step: wait for every table, read the Parquet footers back (Beam issue
25041: trust the files, not the writer), check that every example is accounted for, write
``run_manifest.json`` and then ``_SUCCESS`` -- or fail the job without a marker."""

from __future__ import annotations

import json
import logging
from typing import List, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from pipelines.constants import MANIFEST, SUCCESS

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    """The job cannot run or its result is not valid; the message says why."""


def _join(*parts):
    return FileSystems.join(*parts)


class SumCount(beam.CombineFn):
    """(seconds) -> {"seconds": total, "blocks": count}."""

    def create_accumulator(self):
        return [0.0, 0]

    def add_input(self, acc, sec):
        acc[0] += sec
        acc[1] += 1
        return acc

    def merge_accumulators(self, accs):
        accs = list(accs)
        return [sum(a[0] for a in accs), sum(a[1] for a in accs)]

    def extract_output(self, acc):
        return {"seconds": round(acc[0], 3), "blocks": acc[1]}


def _footer_rows(paths: List[str]) -> int:
    import io
    import pyarrow.parquet as pq
    n = 0
    for path in paths:
        with FileSystems.open(path) as f:
            n += pq.ParquetFile(io.BytesIO(f.read())).metadata.num_rows
    return n


def finalize(facts, output: str, run_options: dict, max_bad_fraction: float, method: str,
             solver: Optional[str]) -> str:
    """The job's last step: verify, write run_manifest.json, then _SUCCESS (or fail the job)."""
    from influence_ops import artifacts
    counts, rows, files, timings, art = {}, {}, {}, {}, None
    for kind, name, value in facts:
        if kind == "count":
            counts[name] = value
        elif kind == "rows":
            rows[name] = value
        elif kind == "file":
            files.setdefault(name, []).append(value)
        elif kind == "timing":
            timings[name] = value
        else:
            art = value
    problems = []
    on_disk = {name: _footer_rows(files.get(name, [])) for name in rows}
    for name in rows:  # Beam issue 25041: trust the files, not the writer
        if on_disk[name] != rows[name]:
            problems.append(f"{name}: {rows[name]} rows were written but the Parquet files "
                            f"hold {on_disk[name]}")
    dead = on_disk.get("dead_letter", 0)
    read = counts["train_read_valid"] + counts["query_read_valid"] + counts["dead_at_read"]
    featurized = counts["train_examples_featurized"]
    if on_disk.get("self_influence", 0) != featurized:
        problems.append(f"self_influence has {on_disk.get('self_influence', 0)} rows but "
                        f"{featurized} training examples were featurized")
    accounted = on_disk.get("self_influence", 0) + counts["query_examples_featurized"] + dead
    if accounted != read:
        problems.append(f"{read} examples read but {accounted} accounted for "
                        "(self_influence + queries + dead letters)")
    if read and dead > max_bad_fraction * read:
        problems.append(f"{dead} of {read} examples were dead-lettered, above "
                        f"--max_bad_fraction={max_bad_fraction}; see "
                        f"{_join(output, 'dead_letter')}")
    if on_disk.get("topk", 0) == 0:
        problems.append("topk is empty")
    art_manifest = artifacts.read_manifest(art)
    manifest = {
        "method": method,
        "solver": solver,
        "options": run_options,
        "artifact": art_manifest,
        "versions": artifacts.library_versions(),
        "counters": {"examples_read": read, "train_examples_featurized": featurized,
                     "query_examples_featurized": counts["query_examples_featurized"],
                     "train_examples_scored": on_disk.get("self_influence", 0),
                     "examples_dead_lettered": dead},
        "timings": {"fit_seconds": art_manifest.get("fit_seconds"), **timings},
        "row_counts": on_disk,
        "problems": problems,
    }
    with FileSystems.create(_join(output, MANIFEST)) as f:
        f.write(json.dumps(manifest, indent=2, sort_keys=True, default=str).encode())
    if problems:
        raise RunError("the result is not valid (no _SUCCESS written): " + "; ".join(problems))
    with FileSystems.create(_join(output, SUCCESS)) as f:
        f.write(b"")
    log.info("finalised %s: %s", output, ", ".join(f"{k}={v}" for k, v in on_disk.items()))
    return output
