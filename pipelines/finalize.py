"""The job's accounting and its last step.

Accounting while the job runs (results gathered by the last step, and by the fit step, which
refuses to start on input that cannot give a valid result):

* :class:`CheckIds`: every example id of a role (train, queries), dead letters included, is
  counted once per distinct value; duplicates are named (the first few, sorted).
* :class:`DeadSummary`: dead letters per stage and reason (a count and a first example), so
  that an error can say *why* rows were rejected, not only how many.

The last step (:func:`finalize`): wait for every table, read the Parquet footers back (Beam
issue 25041: trust the files, not the writer), check that every example id is accounted for
exactly once (``self_influence`` + queries + ``dead_letter`` = distinct ids read, and ids are
unique), check the top-k table's size, write ``run_manifest.json`` atomically and then
``_SUCCESS`` -- or fail the job without a marker. It releases the output's ``_RUNNING``
claim after the marker.
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from typing import List, Optional

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipelines.constants import CLAIM, MANIFEST, SUCCESS

log = logging.getLogger(__name__)
ID_SHARDS = 64          # id uniqueness is checked per hash shard: blocks, not single ids, move
FIRST_DUPLICATES = 5    # duplicate ids named in messages
MAX_REASONS = 20        # distinct dead-letter reasons kept in the summary


class RunError(RuntimeError):
    """The job cannot run or its result is not valid; the message says why."""


def _join(*parts):
    return FileSystems.join(*parts)


def is_local(path: str) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def _local(path: str) -> str:
    return path[len("file://"):] if str(path).startswith("file://") else path


def write_atomic(path: str, data: bytes) -> None:
    """Writes a small file so that no reader ever sees part of it: locally a temporary file in
    the same folder, fsynced and renamed over ``path``; on ``gs://`` one object upload (an
    object appears only once complete), on other file systems Beam's ``create`` (one object
    per close on object stores). A failed write (no space left, read-only, permissions)
    leaves no partial file and raises RunError naming the file and the OS's reason."""
    try:
        if is_local(path) or str(path).startswith("gs://"):
            from influence_ops import storage
            storage.write_atomic(_local(path), data)
        else:
            with FileSystems.create(path) as f:
                f.write(data)
    except OSError as e:
        raise RunError(f"cannot write {path}: {e.strerror or e}") from e
    except Exception as e:  # noqa: BLE001 - Beam and GCS clients wrap OS errors in their own
        raise RunError(f"cannot write {path}: {type(e).__name__}: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def release_claim(output: str, run_id: Optional[str]) -> None:
    """Removes ``output/_RUNNING`` when it holds this run's claim (never another run's)."""
    if not run_id:
        return
    path = _join(output, CLAIM)
    try:
        from influence_ops import storage
        if not (is_local(path) or path.startswith("gs://")):
            if FileSystems.exists(path):
                FileSystems.delete([path])
            return
        if storage.exists(_local(path)) and run_id in storage.read_text(_local(path)):
            storage.delete(_local(path))
    except Exception as e:  # noqa: BLE001 - a claim left behind is reported, not fatal here
        log.warning("could not remove the claim %s: %s", path, e)


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


# ----------------------------------------------------------------------------- id accounting

def _id_shards(ids: np.ndarray):
    """``[(shard, ids)]``: ids split by a stable hash (crc32, the same on every worker)."""
    ids = np.asarray(ids).astype(str)
    shard = np.fromiter((zlib.crc32(i.encode()) % ID_SHARDS for i in ids.tolist()),
                        dtype=np.int64, count=len(ids))
    return [(int(s), ids[shard == s]) for s in np.unique(shard)]


def _shard_stats(kv):
    """One shard's ids -> {"rows", "distinct", "duplicated", "first"}."""
    _, parts = kv
    ids = np.concatenate(list(parts)) if parts else np.zeros((0,), str)
    uniq, counts = np.unique(ids, return_counts=True)
    dup = counts > 1
    first = [(str(i), int(c)) for i, c in zip(uniq[dup][:FIRST_DUPLICATES],
                                             counts[dup][:FIRST_DUPLICATES])]
    return {"rows": int(len(ids)), "distinct": int(len(uniq)), "duplicated": int(dup.sum()),
            "first": first}


class _MergeIdStats(beam.CombineFn):
    def create_accumulator(self):
        return {"rows": 0, "distinct": 0, "duplicated": 0, "first": []}

    def add_input(self, acc, s):
        return self.merge_accumulators([acc, s])

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for a in accs:
            for k in ("rows", "distinct", "duplicated"):
                out[k] += a[k]
            out["first"] = sorted(out["first"] + list(a["first"]))[:FIRST_DUPLICATES]
        return out

    def extract_output(self, acc):
        return acc


class CheckIds(beam.PTransform):
    """``(blocks, dead letters) -> ("ids", role, stats)`` facts, one per hash shard of the ids,
    which :class:`GatherFacts` merges into one dict: rows, distinct ids, ids that occur more
    than once and the first of them (sorted, with their counts) for one role. Ids move in
    blocks per hash shard, so the cost is one shuffle of the ids, not one element per
    example."""

    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def expand(self, pcolls):
        blocks, dead = pcolls
        r = self.role
        ids = ((blocks | f"BlockIds_{r}" >> beam.Map(lambda b: np.asarray(b.ids)),
                dead | f"DeadIds_{r}" >> beam.Map(lambda d: np.array([d.example_id])))
               | f"AllIds_{r}" >> beam.Flatten())
        return (ids
                | f"Shard_{r}" >> beam.FlatMap(_id_shards)
                | f"ByShard_{r}" >> beam.GroupByKey()
                | f"ShardStats_{r}" >> beam.Map(lambda kv: ("ids", r, _shard_stats(kv))))


def id_problem(role: str, stats: dict, id_key: str) -> Optional[str]:
    """The message for duplicate ids of one role, or None when every id is unique."""
    if not stats or not stats["duplicated"]:
        return None
    what = "--train" if role == "train" else "--queries"
    first = ", ".join(f"{i!r} x{c}" for i, c in stats["first"])
    key = f"--id_key={id_key}" if id_key else "the row ids"
    return (f"duplicate example ids in {what} ({key}): {stats['duplicated']} id(s) occur more "
            f"than once ({stats['rows']} rows, {stats['distinct']} distinct ids), first: "
            f"{first}. Every example needs its own id; results keyed by id would be ambiguous")


# ----------------------------------------------------------------------------- dead letters

def _reason_key(error: str) -> str:
    """The reason without the values that differ row by row (numbers, quoted labels)."""
    return re.sub(r"'[^']*'|\"[^\"]*\"|[-+]?\d[\d.e+-]*", "#", error)[:120]


class DeadSummary(beam.CombineFn):
    """Dead letters -> ``{"total": n, "reasons": [{"stage", "reason", "count", "example_id",
    "source"}, ...]}``, most frequent first (at most MAX_REASONS distinct reasons)."""

    def create_accumulator(self):
        return [0, {}]

    def add_input(self, acc, d):
        acc[0] += 1
        key = (d.stage, _reason_key(d.error))
        entry = acc[1].get(key)
        if entry is None:
            if len(acc[1]) < MAX_REASONS:
                acc[1][key] = [1, d.error, d.example_id, d.source]
        else:
            entry[0] += 1
            if d.example_id < entry[2]:
                entry[1:] = [d.error, d.example_id, d.source]
        return acc

    def merge_accumulators(self, accs):
        accs = list(accs)
        out = [0, {}]
        for total, reasons in accs:
            out[0] += total
            for key, e in reasons.items():
                have = out[1].get(key)
                if have is None:
                    if len(out[1]) < MAX_REASONS:
                        out[1][key] = list(e)
                else:
                    have[0] += e[0]
                    if e[2] < have[2]:
                        have[1:] = e[1:]
        return out

    def extract_output(self, acc):
        reasons = [{"stage": k[0], "reason": e[1], "count": e[0], "example_id": e[2],
                    "source": e[3]} for k, e in acc[1].items()]
        reasons.sort(key=lambda r: (-r["count"], r["stage"], r["example_id"]))
        return {"total": acc[0], "reasons": reasons}


class _Sum(beam.CombineFn):
    def create_accumulator(self):
        return 0

    def add_input(self, acc, n):
        return acc + n

    def merge_accumulators(self, accs):
        return sum(accs)

    def extract_output(self, acc):
        return acc


class GatherFacts(beam.CombineFn):
    """Facts ``("kind", name, value)`` -> one list of facts, in one combine.

    Facts of the kinds in :attr:`COMBINE` are combined per ``(kind, name)`` (``count`` and
    ``rows`` summed, ``timing`` seconds summed and counted, ``dead_summary`` dead letters
    summarised, ``ids`` per-shard id stats merged); ``expect`` lists the ``(kind, name)`` pairs
    reported even when no fact of theirs arrived (their empty combine: 0 rows, no dead
    letters, ...). Any other fact passes through as it is. One combine for all the job's
    counters, instead of one each, keeps the job graph small: every ``CombineGlobally`` is a
    shuffle stage of its own, and on the local runner those stages were most of a small job's
    run time.
    """

    COMBINE = {"count": _Sum(), "rows": _Sum(), "timing": SumCount(),
               "dead_summary": DeadSummary(), "ids": _MergeIdStats()}

    def __init__(self, expect=()):
        self.expect = tuple(tuple(e) for e in expect)

    def create_accumulator(self):
        return [{}, []]  # (kind, name) -> the kind's accumulator; facts kept as they are

    def add_input(self, acc, fact):
        kind, name, value = fact
        fn = self.COMBINE.get(kind)
        if fn is None:
            acc[1].append(fact)
        else:
            key = (kind, name)
            have = acc[0].get(key)
            acc[0][key] = fn.add_input(fn.create_accumulator() if have is None else have, value)
        return acc

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for parts, facts in accs:
            for key, a in parts.items():
                have = out[0].get(key)
                out[0][key] = a if have is None else self.COMBINE[key[0]].merge_accumulators(
                    [have, a])
            out[1].extend(facts)
        return out

    def extract_output(self, acc):
        parts = {key: self.COMBINE[key[0]].create_accumulator() for key in self.expect}
        parts.update(acc[0])
        return [(kind, name, self.COMBINE[kind].extract_output(a))
                for (kind, name), a in sorted(parts.items())] + acc[1]


def facts_dict(facts) -> dict:
    """``{(kind, name): value}`` of combined facts (one value per pair)."""
    return {(kind, name): value for kind, name, value in facts}


def describe_dead(summary: Optional[dict], limit: int = 3) -> str:
    """``"1500 x check: bad label ... (first: train.npz:000000000)"; ...`` for messages."""
    if not summary or not summary.get("reasons"):
        return ""
    parts = [f"{r['count']} x {r['stage']}: {r['reason']} (e.g. {r['example_id']})"
             for r in summary["reasons"][:limit]]
    more = len(summary["reasons"]) - limit
    return "; ".join(parts) + (f"; and {more} more reason(s)" if more > 0 else "")


# ----------------------------------------------------------------------------- the last step

def _footer_rows(paths: List[str]) -> int:
    import io
    import pyarrow.parquet as pq
    n = 0
    for path in paths:
        with FileSystems.open(path) as f:
            n += pq.ParquetFile(io.BytesIO(f.read())).metadata.num_rows
    return n


def finalize(facts, output: str, run_options: dict, max_bad_fraction: float, method: str,
             solver: Optional[str], k: Optional[int] = None, id_key: str = "",
             run_id: Optional[str] = None, warnings: Optional[List[str]] = None,
             temp: Optional[str] = None, schemas: Optional[dict] = None) -> str:
    """The job's last step: move the tables' parts into place (:func:`pipelines.write.commit`,
    ``temp`` and ``schemas`` as given to ``WriteTables``), verify, write run_manifest.json,
    then _SUCCESS (or fail the job)."""
    from influence_ops import artifacts
    counts, rows, parts, timings, ids, art = {}, {}, {}, {}, {}, None
    dead_summary, k_exceeds_half = None, False
    for kind, name, value in facts:
        if kind == "count":
            counts[name] = value
        elif kind == "rows":
            rows[name] = value
        elif kind == "part":
            parts.setdefault(name, []).append(value[0])
        elif kind == "timing":
            timings[name] = value
        elif kind == "ids":
            ids[name] = value
        elif kind == "dead_summary":
            dead_summary = value
        elif kind == "topk_flag":
            k_exceeds_half = bool(value)
        else:
            art = value
    problems, warnings = [], list(warnings or [])
    files = {}
    if temp is not None:
        from pipelines import write
        files = write.commit(output, temp, parts, schemas or {})
    on_disk = {name: _footer_rows(files.get(name, [])) for name in rows}
    for name in rows:  # Beam issue 25041: trust the files, not the writer
        if on_disk[name] != rows[name]:
            problems.append(f"{name}: {rows[name]} rows were written but the Parquet files "
                            f"hold {on_disk[name]}")
    # Ids, not rows: each example id of a role once, and accounted for exactly once.
    for role in ("train", "query"):
        p = id_problem(role, ids.get(role), id_key)
        if p:
            problems.append(p)
    dead = on_disk.get("dead_letter", 0)
    read = counts["train_read_valid"] + counts["query_read_valid"] + counts["dead_at_read"]
    distinct = sum(ids[r]["distinct"] for r in ids) if ids else read
    featurized = counts["train_examples_featurized"]
    n_queries = counts["query_examples_featurized"]
    if on_disk.get("self_influence", 0) != featurized:
        problems.append(f"self_influence has {on_disk.get('self_influence', 0)} rows but "
                        f"{featurized} training examples were featurized")
    accounted = on_disk.get("self_influence", 0) + n_queries + dead
    if accounted != distinct or (ids and sum(ids[r]["rows"] for r in ids) != read):
        problems.append(f"{read} examples read ({distinct} distinct ids) but {accounted} "
                        "accounted for (self_influence + queries + dead letters)")
    if read and dead > max_bad_fraction * read:
        reasons = describe_dead(dead_summary)
        problems.append(f"{dead} of {read} examples were dead-lettered, above "
                        f"--max_bad_fraction={max_bad_fraction}"
                        + (f" ({reasons})" if reasons else "")
                        + f"; every rejected row is in {_join(output, 'dead_letter')}")
    if on_disk.get("topk", 0) == 0 and n_queries:
        problems.append("topk is empty")
    elif k is not None:
        want = n_queries * 2 * min(k, featurized)
        if on_disk["topk"] != want:
            problems.append(f"topk has {on_disk['topk']} rows, expected {want} ({n_queries} "
                            f"queries x 2 lists x {min(k, featurized)})")
    if k_exceeds_half:
        warnings.append(k_warning(k, featurized))
        log.warning("%s", warnings[-1])
    if art is None:
        problems.append("no fitted artifact")
    art_manifest = artifacts.read_manifest(art) if art else {}
    if art_manifest.get("options"):
        from pipelines.redact import scrub_options
        art_manifest = dict(art_manifest, options=scrub_options(art_manifest["options"]))
    manifest = {
        "method": method,
        "solver": solver,
        "options": run_options,
        "artifact": art_manifest,
        "versions": artifacts.library_versions(),
        "counters": {"examples_read": read, "distinct_ids_read": distinct,
                     "train_examples_featurized": featurized,
                     "query_examples_featurized": n_queries,
                     "train_examples_scored": on_disk.get("self_influence", 0),
                     "examples_dead_lettered": dead},
        "ids": ids,
        "dead_letter_reasons": (dead_summary or {}).get("reasons", []),
        "topk": {"k": k, "k_exceeds_half": k_exceeds_half},
        "timings": {"fit_seconds": art_manifest.get("fit_seconds"), **timings},
        "row_counts": on_disk,
        "warnings": warnings,
        "problems": problems,
    }
    # Atomic: a reader (and a rerun) sees the whole manifest or none, never a truncated one.
    write_atomic(_join(output, MANIFEST),
                 json.dumps(manifest, indent=2, sort_keys=True, default=str).encode())
    if problems:
        raise RunError("the result is not valid (no _SUCCESS written): " + "; ".join(problems))
    write_marker(output)
    release_claim(output, run_id)
    log.info("finalised %s: %s", output, ", ".join(f"{k}={v}" for k, v in on_disk.items()))
    return output


def k_warning(k: int, n_train: int) -> str:
    return (f"--k={k} exceeds half of the {n_train} scored training examples: each query's "
            "proponent and opponent lists share examples (a 'proponent' row may have a "
            "negative score, an 'opponent' row a positive one). kind says which list a row "
            "is in, the sign of score whether it supports the query; use "
            f"--k={max(n_train // 2, 1)} or less for disjoint lists")


def write_marker(output: str) -> None:
    """``_SUCCESS``, written last (a reader that sees it sees a complete result)."""
    write_atomic(_join(output, SUCCESS), b"")
