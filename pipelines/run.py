"""Builds and runs the influence job. The job finalises itself: its last step waits for every
table to be written, reads the Parquet footers back, checks that every example is accounted
for, writes ``run_manifest.json`` and then ``_SUCCESS``. So the marker is written last on every
runner, also when the launcher does not wait for the job (Dataflow flex templates).

Output layout under ``--output``::

    artifact/            fitted method (arrays.npz + manifest.json)
    topk/                query_id, rank, train_id, score, kind       (Parquet)
    self_influence/      train_id, score, label, loss                 (Parquet)
    pairwise/            query_id, train_id, score                    (--write_pairwise)
    features/            example_id, label, role, features            (--write_features)
    groups/, group_self/ group influence                              (--group_key)
    dead_letter/         source, example_id, error                    (rows that were rejected)
    run_manifest.json    method, options, versions, counts, stage timings, row counts
    _SUCCESS             written last: a reader that sees it sees a whole result
    run_metrics.json     Beam metrics, written by a launcher that waited for the job
"""

from __future__ import annotations

import json
import logging
import time
from typing import List, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import (PipelineOptions, SetupOptions,
                                                  StandardOptions)

from pipelines import stages
from pipelines.options import InfluenceOptions
from pipelines.read import ReadExamples

log = logging.getLogger(__name__)
SUCCESS = "_SUCCESS"
MANIFEST = "run_manifest.json"
METRICS = "run_metrics.json"
TABLES = ("topk", "self_influence", "pairwise", "features", "groups", "group_self", "dead_letter")


class RunError(RuntimeError):
    pass


def _join(*parts):
    return FileSystems.join(*parts)


def validate(opts: InfluenceOptions) -> None:
    """Option errors that would otherwise surface deep inside a worker."""
    missing = [f"--{k}" for k in ("model", "train", "queries", "output") if not getattr(opts, k)]
    if missing:
        raise RunError(f"missing required options: {', '.join(missing)}")
    if opts.method == "tracin":
        ck = [c for c in opts.checkpoints.split(",") if c]
        lr = [c for c in opts.learning_rates.split(",") if c]
        if not ck or len(ck) != len(lr):
            raise RunError("--method=tracin needs --checkpoints and one --learning_rates value "
                           f"per checkpoint (got {len(ck)} checkpoints, {len(lr)} rates)")
    if opts.group_key and opts.group_order == 2 and opts.method not in ("influence", "relatif"):
        raise RunError("--group_order=2 (second-order group influence) needs an influence-"
                       f"function method (--method=influence or relatif), not {opts.method}")
    if opts.k < 1:
        raise RunError("--k must be >= 1")
    if opts.block_size < 1 or opts.batch_size < 1:
        raise RunError("--block_size and --batch_size must be >= 1")
    if not 0.0 <= opts.max_bad_fraction <= 1.0:
        raise RunError("--max_bad_fraction must lie in [0, 1]")


def prepare_output(output: str, overwrite: bool) -> None:
    """Refuses to mix a new result into an old one unless --overwrite (then deletes it first)."""
    existing = [t for t in TABLES + ("artifact", MANIFEST, METRICS, SUCCESS)
                if FileSystems.exists(_join(output, t))]
    if not existing:
        return
    if not overwrite:
        state = "a finished result" if SUCCESS in existing else "a partial result"
        raise RunError(f"--output {output} already holds {state} ({', '.join(existing)}); "
                       "pass --overwrite to replace it or choose another directory")
    log.info("--overwrite: removing the previous result at %s", output)
    # Marker first: from here on a reader sees no (stale) finished result.
    if FileSystems.exists(_join(output, SUCCESS)):
        FileSystems.delete([_join(output, SUCCESS)])
    FileSystems.delete([_join(output, t) for t in existing if t != SUCCESS])


def _write(tables, output: str, name: str, schema=None):
    """Writes a PCollection of pyarrow tables; returns the final file names (a PCollection)."""
    return tables | f"Write_{name}" >> beam.io.parquetio.WriteToParquetBatched(
        _join(output, name, "part"), schema=schema, file_name_suffix=".parquet")


def _dead_table(rows):
    import pyarrow as pa
    from influence_ops import schemas
    rows = sorted(rows)
    return pa.table({"source": [r[0] for r in rows], "example_id": [r[1] for r in rows],
                     "error": [r[2] for r in rows]}, schema=schemas.DEAD_LETTER_SCHEMA)


def _total(pcoll, label: str, size=len):
    """``sum(size(element))`` as a one-element PCollection (0 when empty)."""
    return (pcoll | f"Size{label}" >> beam.Map(size)
            | f"Sum{label}" >> beam.CombineGlobally(sum))


def _rows(table):
    return table.num_rows


def build(p: beam.Pipeline, opts: InfluenceOptions, label_spec=None,
          run_options: Optional[dict] = None) -> None:
    """Adds the job's stages to ``p``, finalisation included.

    ``label_spec``: ``(label_mode, n_outputs)`` of the model (from ``stages.label_spec``); rows
    whose labels do not fit are dead-lettered. ``run_options``: the JSON-able options recorded
    in the run manifest.
    """
    from influence_ops import schemas
    cfg = stages.model_config(opts)
    out = opts.output
    if label_spec is None:
        label_spec = stages.label_spec(stages.build_imodel(cfg))
    train, dead_read_t = p | "ReadTrain" >> ReadExamples(opts.train, opts, "train")
    queries, dead_read_q = p | "ReadQueries" >> ReadExamples(opts.queries, opts, "query")
    counts = {"train_read_valid": _total(train, "TrainRead"),
              "query_read_valid": _total(queries, "QueryRead"),
              "dead_at_read": _total((dead_read_t, dead_read_q) | "DeadRead" >> beam.Flatten(),
                                     "DeadAtRead", size=lambda _: 1)}
    checked = {}
    for role, blocks in (("Train", train), ("Queries", queries)):
        checked[role] = blocks | f"ValidateLabels{role}" >> beam.ParDo(
            stages.ValidateLabels(*label_spec)).with_outputs("dead", main="blocks")
    train, queries = checked["Train"].blocks, checked["Queries"].blocks
    artifact = train | "FitMethod" >> stages.FitMethod(cfg, _join(out, "artifact"), queries)
    train_f, time_tf = train | "FeaturizeTrain" >> stages.Featurize(cfg, artifact, "train")
    query_f, time_qf = queries | "FeaturizeQueries" >> stages.Featurize(cfg, artifact, "query")
    counts["train_examples_featurized"] = _total(train_f, "TrainFeaturized")
    counts["query_examples_featurized"] = _total(query_f, "QueryFeaturized")
    scored = train_f | "Score" >> stages.Score(query_f, opts.k, opts.write_pairwise,
                                               opts.write_features)
    topk = scored.topk | "MergeTopK" >> stages.MergeTopK(query_f)
    tables = {"topk": topk, "self_influence": scored.self}
    written = {"topk": _write(topk, out, "topk", schemas.TOPK_SCHEMA),
               "self_influence": _write(scored.self, out, "self_influence",
                                        schemas.SELF_SCHEMA)}
    if opts.write_pairwise:
        tables["pairwise"] = scored.pairwise
        written["pairwise"] = _write(scored.pairwise, out, "pairwise", schemas.PAIRWISE_SCHEMA)
    if opts.write_features:
        feats = ((scored.features, query_f | "QueryFeatureTables" >> beam.Map(
            stages.features_table, "query")) | "AllFeatures" >> beam.Flatten())
        # The fixed-size list width is only known at run time: pyarrow infers the schema.
        tables["features"] = feats
        written["features"] = _write(feats, out, "features")
    if opts.group_key:
        if opts.group_order == 1:
            g_scores, g_self = train_f | "FirstOrderGroups" >> stages.FirstOrderGroups(query_f)
            tables["group_self"] = g_self
            written["group_self"] = _write(g_self, out, "group_self",
                                           schemas.GROUP_SELF_SCHEMA)
        else:
            n_train = _total(train, "TrainForGroups")
            g_scores = train | "SecondOrderGroups" >> stages.SecondOrderGroups(
                cfg, artifact, queries, n_train)
        tables["groups"] = g_scores
        written["groups"] = _write(g_scores, out, "groups", schemas.GROUP_SCHEMA)
    dead = ((dead_read_t, dead_read_q, checked["Train"].dead, checked["Queries"].dead)
            | "AllDead" >> beam.Flatten()
            | "DeadList" >> beam.combiners.ToList()
            | "DeadTable" >> beam.Map(_dead_table))
    tables["dead_letter"] = dead
    written["dead_letter"] = _write(dead, out, "dead_letter", schemas.DEAD_LETTER_SCHEMA)

    # Everything the last step needs, as ("kind", name, value) records in one list: gathering
    # them waits for every writer to finish (their outputs are the final file names).
    facts = [artifact | "FactArtifact" >> beam.Map(lambda a: ("artifact", "path", a))]
    for name, pc in counts.items():
        facts.append(pc | f"Fact_{name}" >> beam.Map(lambda v, n=name: ("count", n, v)))
    for name, pc in tables.items():
        facts.append(_total(pc, f"Rows_{name}", size=_rows)
                     | f"FactRows_{name}" >> beam.Map(lambda v, n=name: ("rows", n, v)))
    for name, pc in written.items():
        facts.append(pc | f"FactFiles_{name}" >> beam.Map(lambda f, n=name: ("file", n, f)))
    timings = ((time_tf, time_qf, scored.timing) | "AllTimings" >> beam.Flatten()
               | "TimingSums" >> beam.CombinePerKey(_SumCount()))
    facts.append(timings | "FactTimings" >> beam.Map(lambda kv: ("timing", kv[0], kv[1])))
    _ = (facts | "AllFacts" >> beam.Flatten() | "Gather" >> beam.combiners.ToList()
         | "Finalize" >> beam.Map(finalize, out, dict(run_options or {}),
                                  opts.max_bad_fraction, opts.method,
                                  opts.solver if opts.method in ("influence", "relatif")
                                  else None))


class _SumCount(beam.CombineFn):
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


def _metrics(result) -> dict:
    """Counters and distributions of our namespace, merged over the steps that report them.

    Runners differ: the local runners report ``committed`` values, Flink and Spark only
    ``attempted`` ones, so we take committed when present and attempted otherwise.
    """
    out = {"counters": {}, "distributions": {}}
    try:
        res = result.metrics().query(MetricsFilter().with_namespace(stages.NAMESPACE))
    except Exception as e:  # noqa: BLE001 - some runners cannot report metrics
        log.warning("metrics unavailable from this runner: %s", e)
        return out

    def value(m):
        return m.committed if m.committed is not None else m.attempted

    for c in res.get("counters", []):
        name = c.key.metric.name
        out["counters"][name] = out["counters"].get(name, 0) + int(value(c) or 0)
    for d in res.get("distributions", []):
        v = value(d)
        if v is None or not v.count:
            continue
        name = d.key.metric.name
        acc = out["distributions"].get(name)
        if acc is None:
            out["distributions"][name] = {"count": v.count, "sum": v.sum, "min": v.min,
                                          "max": v.max}
        else:
            acc["count"] += v.count
            acc["sum"] += v.sum
            acc["min"] = min(acc["min"], v.min)
            acc["max"] = max(acc["max"], v.max)
    for acc in out["distributions"].values():
        acc["mean"] = acc["sum"] / acc["count"]
    return out


def make_pipeline(opts: PipelineOptions) -> beam.Pipeline:
    std = opts.view_as(StandardOptions)
    if std.runner in (None, "FnApiRunner"):
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner
        std.runner = None
        return beam.Pipeline(runner=FnApiRunner(), options=opts)
    return beam.Pipeline(options=opts)


def _json_options(opts: PipelineOptions) -> dict:
    return {k: v for k, v in sorted(opts.get_all_options(drop_default=False).items())
            if isinstance(v, (str, int, float, bool, type(None)))}


def read_manifest(output: str) -> Optional[dict]:
    path = _join(output, MANIFEST)
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as f:
        return json.loads(f.read().decode())


def run(argv: Optional[List[str]] = None, options: Optional[PipelineOptions] = None,
        wait: bool = True):
    """Runs the job and returns its run manifest (plus ``metrics`` from the runner).

    With ``wait=False`` it returns the ``PipelineResult`` right after submission; the job still
    writes its manifest and ``_SUCCESS`` itself. Raises RunError when the result is not valid.
    """
    opts = options or PipelineOptions(argv)
    opts.view_as(SetupOptions).save_main_session = False
    iopts = opts.view_as(InfluenceOptions)
    # Driver-side file operations (output checks, manifest, marker) use the job's options too.
    FileSystems.set_options(opts)
    validate(iopts)
    # Fail fast on the driver: the model must load and the target layers must exist.
    imodel = stages.build_imodel(stages.model_config(iopts))
    prepare_output(iopts.output, iopts.overwrite)
    t0 = time.time()
    p = make_pipeline(opts)
    build(p, iopts, stages.label_spec(imodel), _json_options(opts))
    log.info("running %s/%s on %s", iopts.method, iopts.solver,
             opts.view_as(StandardOptions).runner or "FnApiRunner")
    try:
        result = p.run()
        if not wait:
            return result
        result.wait_until_finish()
    except Exception as e:  # noqa: BLE001 - runners wrap worker errors in their own types
        manifest = read_manifest(iopts.output)
        if manifest and manifest.get("problems"):
            raise RunError("run finished but its result is not valid (no _SUCCESS written): "
                           + "; ".join(manifest["problems"])) from e
        raise
    manifest = read_manifest(iopts.output)
    if manifest is None or not FileSystems.exists(_join(iopts.output, SUCCESS)):
        raise RunError(f"the job ended without finalising {iopts.output}")
    metrics = _metrics(result)
    metrics["wall_seconds"] = round(time.time() - t0, 3)
    with FileSystems.create(_join(iopts.output, METRICS)) as f:
        f.write(json.dumps(metrics, indent=2, sort_keys=True, default=str).encode())
    log.info("done in %.1fs: %s", metrics["wall_seconds"],
             ", ".join(f"{k}={v}" for k, v in manifest["row_counts"].items()))
    return dict(manifest, metrics=metrics)
