"""``beam-influence audit``: a scheduled data audit with reuse, incremental runs, a
faithfulness spot check and an HTML report.

    beam-influence audit --audit_root=gs://bucket/audits --model=gs://.../model.keras \\
        --train='parquet:gs://bucket/data/*.parquet' [--queries=...] [--run_id=2026-11-30] \\
        [job options: --solver, --rank, --boundary, runner flags ...]

Layout under ``--audit_root`` (local or ``gs://``)::

    artifacts/<key>/             fitted methods, key = hash(model fingerprint, method options)
    runs/<run_id>/CURRENT        {"attempt": ...}: which attempt of the run is the result
    runs/<run_id>/<attempt>/     one attempt:
        job/                     the pipeline's output for the partitions scored by this run
        audit/                   the ranking: train_id, partition, rank, score, loss, label,
                                 predicted, confidence, [boundary columns], scored_in
        explain/                 top-k proponents / opponents of the queries (when given)
        examples/, sample/       inputs of the shown examples; the spot check's rows
        audit_manifest.json      what ran: reuse, partitions scored and carried, spot check
        report/index.html        the report (pipelines/report.py)
        _SUCCESS                 written last
    LATEST                       {"run_id", "attempt"} of the newest finished audit

**Reuse**: the fitted method is stored under a key of the model fingerprint (weights and
architecture) and the method options; a run with an unchanged model and options loads it
(``--artifact``, no fit step; ``artifact.reused`` in the manifest). **Incremental**: each file
of ``--train`` is a partition (fingerprinted by size and modification time); when the
previous audit used the same fitted method, queries and output options, only partitions it
did not score (or that changed) are scored and the rest are carried over; the merged ranking
equals a full recompute because an example's self-influence depends only on the fitted method
and the example (tested). A partition that disappeared, other queries or options, or a new
model make the run score everything. **Atomic reruns**: a rerun of the same ``--run_id``
refuses unless ``--replace``; it then writes a new attempt and switches ``CURRENT`` only when
the attempt is complete, so readers see the old result or the new one, never a mix.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import logging
import time
import uuid
from typing import List, Optional

import numpy as np

from influence_ops import audit as A
from influence_ops import storage
from pipelines.finalize import RunError

log = logging.getLogger(__name__)

MANIFEST = "audit_manifest.json"
SUCCESS = "_SUCCESS"
DEFAULT_EXAMPLES_TOP = 24
DEFAULT_SPOT_CHECK_ROWS = 2000
DEFAULT_SPOT_CHECK = 8
# Options that change what a run writes (beyond the fitted method): carrying rows over from a
# previous audit needs them equal.
CARRY_OPTIONS = ("k", "boundary", "examples_top", "sample_rows", "correction", "x_key",
                 "y_key", "id_key", "input_shape", "feature_spec", "seed")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="beam-influence audit", formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # job flags pass through: --k must not match --known_noisy
        description="Scheduled data audit: self-influence of every training example (most "
                    "likely mislabeled first), optional explain queries, a spot check by "
                    "retraining, and an HTML report, under --audit_root/runs/<run_id>/. Other "
                    "flags are the job's (beam-influence --help).")
    ap.add_argument("--audit_root", required=True, help="folder of all audits (local or gs://)")
    ap.add_argument("--run_id", default="",
                    help="name of this run (default: the UTC time, e.g. 20261130T030000Z)")
    ap.add_argument("--replace", action="store_true",
                    help="replace a finished run of the same --run_id (otherwise refuse)")
    ap.add_argument("--refit", action="store_true",
                    help="fit the method again even when a fitted one for this model exists")
    ap.add_argument("--full", action="store_true",
                    help="score every partition (no rows carried over from the previous audit)")
    ap.add_argument("--spot_check", type=int, default=None,
                    help="top-ranked examples retrained without (0 = no spot check; default "
                         f"{DEFAULT_SPOT_CHECK}, 0 with --weight_key)")
    ap.add_argument("--spot_check_rows", type=int, default=DEFAULT_SPOT_CHECK_ROWS,
                    help="training rows of the spot check's objective (the smallest id hashes)")
    ap.add_argument("--known_noisy", default="",
                    help="file with ids known to be mislabeled, one per line: the report adds "
                         "the detection curve")
    ap.add_argument("--image_shape", default="",
                    help="show inputs as images of this shape in the report (e.g. 8,8)")
    ap.add_argument("--no_report", action="store_true", help="do not write report/")
    return ap


# ------------------------------------------------------------------------------ small I/O

def _json(path: str) -> Optional[dict]:
    if not storage.exists(path):
        return None
    return json.loads(storage.read_text(path))


def _write_json(path: str, obj) -> None:
    storage.write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_tables(folder: str):
    """All ``*.parquet`` under ``folder`` as one table (None when there are none)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems
    try:
        files = sorted(m.path for m in FileSystems.match([storage.join(folder, "*.parquet")])[0]
                       .metadata_list)
    except Exception:  # noqa: BLE001 - a missing folder matches nothing
        return None
    tables = []
    for f in files:
        with storage.open_read(f) as fh:
            tables.append(pq.read_table(io.BytesIO(fh.read())))
    tables = [t for t in tables if t.num_rows] or tables
    return pa.concat_tables(tables, promote_options="default") if tables else None


def copy_tree(src: str, dst: str, last: Optional[str] = None) -> None:
    """Copies the files under ``src`` (one level) to ``dst``; ``last`` is copied last."""
    names = storage.listdir(src)
    for name in sorted(names, key=lambda n: n == last):
        with storage.open_read(storage.join(src, name)) as f:
            storage.write_atomic(storage.join(dst, name), f.read())


# ------------------------------------------------------------------------------ decisions

def artifact_key(fingerprint: str, method_options: dict) -> str:
    text = json.dumps({"model": fingerprint, "options": method_options}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def partition_fingerprints(read) -> dict:
    """``{partition name: "size:mtime"}`` of the files of a source (TFDS: its spec)."""
    from apache_beam.io.filesystems import FileSystems
    if read.kind == "tfds":
        return {read.rest: "tfds"}
    # One match of the source's pattern (not one call per file: slow on gs:// with many).
    meta = {m.path: m for m in FileSystems.match([read.rest])[0].metadata_list}
    out = {}
    for path, name in read.files:
        m = meta.get(path) or FileSystems.match([path])[0].metadata_list[0]
        out[name] = f"{m.size_in_bytes}:{int(getattr(m, 'last_updated_in_seconds', 0))}"
    return out


def queries_fingerprint(read) -> Optional[dict]:
    return None if read is None else {"spec": read.rest, "files": partition_fingerprints(read)}


def plan(previous: Optional[dict], key: str, partitions: dict, queries: Optional[dict],
         carry: dict, full: bool) -> dict:
    """Which partitions this run scores and which it carries from ``previous`` (its audit
    manifest), with the reason when it must score everything."""
    why = None
    if full:
        why = "--full"
    elif previous is None:
        why = "no previous audit"
    elif previous["artifact"]["key"] != key:
        why = "the model or the method options changed"
    elif previous.get("queries") != queries:
        why = "the queries changed"
    elif previous.get("carry_options") != carry:
        why = "output options changed"
    else:
        before = previous["partitions"]["fingerprints"]
        gone = sorted(set(before) - set(partitions))
        if gone:
            why = f"partition(s) no longer in --train: {', '.join(gone[:3])}"
    if why:
        return {"score": sorted(partitions), "carry": [], "why_full": why}
    before = previous["partitions"]["fingerprints"]
    carry_names = sorted(p for p in partitions if before.get(p) == partitions[p])
    return {"score": sorted(set(partitions) - set(carry_names)), "carry": carry_names,
            "why_full": None}


# ------------------------------------------------------------------------------ the audit

def _run_dir(root: str, run_id: str) -> str:
    return storage.join(root, "runs", run_id)


def current_attempt(root: str, run_id: str) -> Optional[str]:
    """The finished attempt folder of a run (None when the run has none)."""
    cur = _json(storage.join(_run_dir(root, run_id), "CURRENT"))
    return storage.join(_run_dir(root, run_id), cur["attempt"]) if cur else None


def latest(root: str) -> Optional[str]:
    """The attempt folder of the newest finished audit under ``root``."""
    lat = _json(storage.join(root, "LATEST"))
    return storage.join(_run_dir(root, lat["run_id"]), lat["attempt"]) if lat else None


def audit(argv: Optional[List[str]] = None) -> dict:
    """Runs one audit; returns its manifest (``path`` added: the attempt folder)."""
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions
    from pipelines import run as run_lib
    from pipelines.options import job_config
    from pipelines.read import ReadExamples
    args, job_argv = parser().parse_known_args(argv)
    t0 = time.time()
    root = args.audit_root.rstrip("/")
    run_id = args.run_id or datetime.datetime.now(datetime.timezone.utc).strftime(
        "%Y%m%dT%H%M%SZ")
    if "/" in run_id or run_id.startswith("."):
        raise RunError(f"--run_id {run_id!r}: must be a plain name (no '/')")
    opts = PipelineOptions(job_argv)
    FileSystems.set_options(opts)
    config = job_config(opts)
    if config.output:
        raise RunError("--output is set by the audit (under --audit_root/runs/<run_id>/): "
                       "drop it")
    if not config.examples_top:
        config = config.replace(examples_top=DEFAULT_EXAMPLES_TOP)
    if args.spot_check is None:
        # The spot check retrains on the examples tables, which carry no sample weights: it
        # would check weighted scores against unweighted refits.
        args.spot_check = 0 if config.weight_key else DEFAULT_SPOT_CHECK
        if config.weight_key:
            log.info("audit: no spot check with --weight_key (its refits are unweighted)")
    if args.spot_check and not config.sample_rows:
        config = config.replace(sample_rows=args.spot_check_rows)
    try:
        config.replace(output=root).validate(for_job=True)
    except Exception as e:  # noqa: BLE001 - ConfigError names the option
        raise RunError(str(e)) from None
    if config.weight_key and args.spot_check:
        raise RunError("--spot_check retrains on the examples tables, which do not carry the "
                       "sample weights: drop --spot_check (it is off with --weight_key)")
    run_dir = _run_dir(root, run_id)
    if storage.exists(storage.join(run_dir, "CURRENT")) and not args.replace:
        raise RunError(f"audit run {run_id!r} already exists under {root}; pass --replace to "
                       "replace it (atomically) or choose another --run_id")

    # The model and what identifies its fitted method.
    from pipelines.worker import configure_worker, job_imodel
    configure_worker(config)
    imodel = job_imodel(config)
    fingerprint = imodel.fingerprint()
    # A weighted fit is of another objective: stored under its own key (unweighted keys are
    # those of earlier versions).
    key = artifact_key(fingerprint, dict(config.method_options(), weight_key=config.weight_key)
                       if config.weight_key else config.method_options())
    stored = storage.join(root, "artifacts", key)
    reuse = (not args.refit) and storage.exists(storage.join(stored, "manifest.json"))

    # Partitions, the previous audit and the plan.
    read_t = ReadExamples(config.train, config, "train", imodel.input_shape)
    read_q = (ReadExamples(config.queries, config, "query", imodel.input_shape)
              if config.queries else None)
    parts = partition_fingerprints(read_t)
    queries = queries_fingerprint(read_q)
    carry_opts = {k: getattr(config, k) for k in CARRY_OPTIONS}
    carry_opts = json.loads(json.dumps(carry_opts, default=str))
    prev_dir = latest(root)
    previous = _json(storage.join(prev_dir, MANIFEST)) if prev_dir else None
    if previous and previous["run_id"] == run_id:  # --replace: compare with what it carried
        prev_dir = previous.get("previous_path")
        previous = _json(storage.join(prev_dir, MANIFEST)) if prev_dir else None
    p = plan(previous, key, parts, queries, carry_opts, args.full)
    if not reuse and not p["why_full"]:
        p = {"score": sorted(parts), "carry": [],
             "why_full": "--refit" if args.refit else "no fitted method stored for this model "
                                                        "and options (fit needed)"}
    if read_t.kind == "tfds" and p["carry"]:
        p = {"score": sorted(parts), "carry": [], "why_full": "a TFDS split is one partition"}
    log.info("audit %s: %s; scoring %d partition(s), carrying %d%s", run_id,
             f"reusing fitted method {key}" if reuse else "fitting the method",
             len(p["score"]), len(p["carry"]),
             f" (everything: {p['why_full']})" if p["why_full"] else "")

    attempt = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S") + \
        "-" + uuid.uuid4().hex[:8]
    out = storage.join(run_dir, attempt)
    storage.makedirs(out)
    job_dir = storage.join(out, "job")
    job_manifest = None
    if p["score"]:
        job_args = list(job_argv) + [f"--output={job_dir}",
                                     f"--examples_top={config.examples_top}",
                                     f"--sample_rows={config.sample_rows}"]
        if reuse:
            job_args.append(f"--artifact={stored}")
        only = None if read_t.kind == "tfds" or not p["carry"] else p["score"]
        job_manifest = run_lib.run(job_args, train_files=only)
        if not reuse:
            copy_tree(storage.join(job_dir, "artifact"), stored, last="manifest.json")
            log.info("audit %s: fitted method stored as %s", run_id, stored)

    # Merge with what the previous audit carried over.
    new_self = read_tables(storage.join(job_dir, "self_influence")) if p["score"] else None
    prev_audit = read_tables(storage.join(prev_dir, "audit")) if p["carry"] else None
    if new_self is None and prev_audit is None:
        raise RunError("nothing to audit: no training examples were scored or carried over")
    try:
        if new_self is None:
            ranking = A.rank_table(prev_audit.drop(["rank"]))
        else:
            ranking = A.merge_rankings(prev_audit, new_self, run_id, keep_partitions=p["carry"])
    except ValueError as e:
        raise RunError(str(e)) from None
    A.write_table(ranking, storage.join(out, "audit"))
    explain = None
    if read_q is not None:
        parts_k = [read_tables(storage.join(prev_dir, "explain")) if p["carry"] else None,
                   read_tables(storage.join(job_dir, "topk")) if p["score"] else None]
        explain = A.merge_topk(parts_k, config.k)
        A.write_table(explain, storage.join(out, "explain"))
    from pipelines.examples import EXPLAIN_QUERIES
    ex_parts = [read_tables(storage.join(prev_dir, "examples")) if p["carry"] else None,
                read_tables(storage.join(job_dir, "examples")) if p["score"] else None]
    examples = A.select_examples(ex_parts, ranking, explain, config.examples_top,
                                 EXPLAIN_QUERIES)
    if examples is not None:
        A.write_table(examples, storage.join(out, "examples"))
    sample = None
    if config.sample_rows:
        sample = A.merge_sample(
            [read_tables(storage.join(prev_dir, "sample")) if p["carry"] else None,
             read_tables(storage.join(job_dir, "sample")) if p["score"] else None],
            config.sample_rows, config.seed)
        if sample is not None:
            A.write_table(sample, storage.join(out, "sample"))

    # What the fitted method says about itself, and the spot check.
    from influence_ops import artifacts
    art_dir = stored if storage.exists(storage.join(stored, "manifest.json")) else \
        storage.join(job_dir, "artifact")
    method = artifacts.load_method(art_dir, imodel)
    art_manifest = artifacts.read_manifest(art_dir)
    check = None
    if args.spot_check and sample is not None and examples is not None:
        check = _spot_check(imodel, ranking, examples, sample, args.spot_check)

    manifest = {
        "run_id": run_id, "attempt": attempt, "path": out,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "model": {"path": str(config.model), "fingerprint": fingerprint},
        "method": {"method": config.method, "solver": run_lib._solver_name(config),
                   "options": config.method_options()},
        "artifact": {"key": key, "path": stored, "reused": reuse,
                     "fit_seconds": art_manifest.get("fit_seconds")},
        "fit_step": not reuse,
        "partitions": {"scored": p["score"], "carried": p["carry"], "why_full": p["why_full"],
                       "fingerprints": parts},
        "queries": queries, "carry_options": carry_opts,
        "counts": {"rows": ranking.num_rows,
                   "scored_now": 0 if new_self is None else new_self.num_rows,
                   "carried": ranking.num_rows - (0 if new_self is None else new_self.num_rows),
                   "dead_lettered": (job_manifest or {}).get("row_counts", {}).get(
                       "dead_letter", 0)},
        "display": {"image_shape": [int(v) for v in args.image_shape.split(",") if v.strip()]
                    or None},
        "spot_check": check,
        "spectrum": A.spectrum(method),
        "previous_path": prev_dir if p["carry"] else None,
        "seconds": None,
    }
    if not args.no_report:
        _write_json(storage.join(out, MANIFEST), manifest)
        from pipelines import report
        noisy = _read_ids(args.known_noisy) if args.known_noisy else None
        manifest["report"] = report.write_report(out, noisy_ids=noisy)
    manifest["seconds"] = round(time.time() - t0, 3)
    _write_json(storage.join(out, MANIFEST), manifest)
    storage.write_atomic(storage.join(out, SUCCESS), b"")
    # The switch: readers follow CURRENT / LATEST, each one atomic write.
    old = current_attempt(root, run_id)
    _write_json(storage.join(run_dir, "CURRENT"), {"attempt": attempt})
    _write_json(storage.join(root, "LATEST"), {"run_id": run_id, "attempt": attempt})
    if old and old != out:
        storage.delete_tree(old)
    log.info("audit %s done in %.1fs: %d rows (%d scored now, %d carried), %s", run_id,
             manifest["seconds"], manifest["counts"]["rows"], manifest["counts"]["scored_now"],
             manifest["counts"]["carried"], out)
    return manifest


def _read_ids(path: str) -> List[str]:
    return [line.strip() for line in storage.read_text(path).splitlines() if line.strip()]


def _spot_check(imodel, ranking, examples, sample, r: int) -> Optional[dict]:
    """Refits without each of the ``r`` top-ranked examples (those whose inputs are in
    ``examples``) on the objective of the sample's rows plus them."""
    import pyarrow as pa
    top_ids = np.asarray(ranking.column("train_id").to_pylist(), dtype=str)
    train_ex = examples.filter(pa.compute.equal(examples.column("role"), "train"))
    have = set(train_ex.column("example_id").to_pylist())
    check = [i for i in top_ids[:max(r * 4, r)] if i in have][:r]
    if not check:
        return None
    sid, sx, sy = A.examples_arrays(sample)
    cid, cx, cy = A.examples_arrays(train_ex)
    pick = np.isin(cid, check) & ~np.isin(cid, sid)
    ids = np.concatenate([sid, cid[pick]])
    x = np.concatenate([sx, cx[pick]]) if pick.any() else sx
    y = np.concatenate([sy, cy[pick]]) if pick.any() else sy
    if y.ndim == 2 and y.shape[1] == 1 and imodel.label_mode == "sparse":
        y = y[:, 0]
    scores = dict(zip(top_ids, ranking.column("score").to_pylist()))
    try:
        return A.retrain_check(imodel, x, y, ids, check, [scores[c] for c in check])
    except Exception as e:  # noqa: BLE001 - the audit's result stands without its check
        log.warning("spot check failed: %s", e)
        return {"error": f"{type(e).__name__}: {e}", "rows": [], "n": 0}


def main(argv=None) -> int:
    from pipelines.cli import main as cli_main
    return cli_main(["audit"] + list(argv or []))
