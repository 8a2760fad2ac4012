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

from influence_ops.config import ConfigError, InfluenceConfig
from pipelines import featurize, fit, groups, score
from pipelines.constants import ARTIFACT, MANIFEST, METRICS, NAMESPACE, SUCCESS, TABLES
from pipelines.finalize import RunError, SumCount, _join, finalize
from pipelines.options import job_config
from pipelines.read import ReadExamples

log = logging.getLogger(__name__)


def validate(config: InfluenceConfig) -> InfluenceConfig:
    """The job's config, validated (option errors would otherwise surface inside a worker)."""
    try:
        return config.validate(for_job=True)
    except ConfigError as e:
        raise RunError(str(e)) from None


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


def build(p: beam.Pipeline, config: InfluenceConfig,
          run_options: Optional[dict] = None) -> None:
    """Adds the job's stages to ``p``, finalisation included.

    ``config``: the job's validated config, handed to every stage. ``run_options``: the
    JSON-able options recorded in the run manifest.
    """
    from influence_ops import schemas
    opts = config
    out = config.output
    train, dead_read_t = p | "ReadTrain" >> ReadExamples(config.train, config, "train")
    queries, dead_read_q = p | "ReadQueries" >> ReadExamples(config.queries, config, "query")
    counts = {"train_read_valid": _total(train, "TrainRead"),
              "query_read_valid": _total(queries, "QueryRead"),
              "dead_at_read": _total((dead_read_t, dead_read_q) | "DeadRead" >> beam.Flatten(),
                                     "DeadAtRead", size=lambda _: 1)}
    train, dead_label_t = featurize.validate_labels(train, config, "ValidateLabelsTrain")
    queries, dead_label_q = featurize.validate_labels(queries, config, "ValidateLabelsQueries")
    artifact = train | "FitMethod" >> fit.FitMethod(config, _join(out, ARTIFACT), queries)
    train_f, time_tf = train | "FeaturizeTrain" >> featurize.Featurize(config, artifact, "train")
    query_f, time_qf = queries | "FeaturizeQueries" >> featurize.Featurize(config, artifact,
                                                                          "query")
    counts["train_examples_featurized"] = _total(train_f, "TrainFeaturized")
    counts["query_examples_featurized"] = _total(query_f, "QueryFeaturized")
    scored = train_f | "Score" >> score.Score(query_f, opts.k, opts.write_pairwise,
                                              opts.write_features)
    topk = scored.topk | "MergeTopK" >> score.MergeTopK(query_f, opts.k)
    tables = {"topk": topk, "self_influence": scored.self}
    written = {"topk": _write(topk, out, "topk", schemas.TOPK_SCHEMA),
               "self_influence": _write(scored.self, out, "self_influence",
                                        schemas.SELF_SCHEMA)}
    if opts.write_pairwise:
        tables["pairwise"] = scored.pairwise
        written["pairwise"] = _write(scored.pairwise, out, "pairwise", schemas.PAIRWISE_SCHEMA)
    if opts.write_features:
        feats = ((scored.features, query_f | "QueryFeatureTables" >> beam.Map(
            score.features_table, "query")) | "AllFeatures" >> beam.Flatten())
        # The fixed-size list width is only known at run time: pyarrow infers the schema.
        tables["features"] = feats
        written["features"] = _write(feats, out, "features")
    if opts.group_key:
        if opts.group_order == 1:
            g_scores, g_self = train_f | "FirstOrderGroups" >> groups.FirstOrderGroups(query_f)
            tables["group_self"] = g_self
            written["group_self"] = _write(g_self, out, "group_self",
                                           schemas.GROUP_SELF_SCHEMA)
        elif opts.group_order == "newton":
            from pipelines.group_newton import NewtonGroups
            g_scores = train | "NewtonGroups" >> NewtonGroups(config, artifact, queries)
        else:
            n_train = _total(train, "TrainForGroups")
            g_scores = train | "SecondOrderGroups" >> groups.SecondOrderGroups(
                config, artifact, queries, n_train)
        tables["groups"] = g_scores
        written["groups"] = _write(g_scores, out, "groups", schemas.GROUP_SCHEMA)
    dead = ((dead_read_t, dead_read_q, dead_label_t, dead_label_q)
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
               | "TimingSums" >> beam.CombinePerKey(SumCount()))
    facts.append(timings | "FactTimings" >> beam.Map(lambda kv: ("timing", kv[0], kv[1])))
    _ = (facts | "AllFacts" >> beam.Flatten() | "Gather" >> beam.combiners.ToList()
         | "Finalize" >> beam.Map(finalize, out, dict(run_options or {}),
                                  opts.max_bad_fraction, opts.method, _solver_name(config)))


def _solver_name(config: InfluenceConfig) -> Optional[str]:
    """The curvature model the method uses (None for methods without one)."""
    from influence_ops import registry
    cls = registry.get_method(config.method)
    default = getattr(cls, "default_solver", None)
    return (config.solver or default) if default else None


def _metrics(result) -> dict:
    """Counters and distributions of our namespace, merged over the steps that report them.

    Runners differ: the local runners report ``committed`` values, Flink and Spark only
    ``attempted`` ones, so we take committed when present and attempted otherwise.
    """
    out = {"counters": {}, "distributions": {}}
    try:
        res = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
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
    config = validate(job_config(opts))
    # Before anything runs a TF op in this process (the default runner's workers share it).
    from pipelines.worker import configure_worker
    configure_worker(config)
    # Driver-side file operations (output checks, manifest, marker) use the job's options too.
    FileSystems.set_options(opts)
    # Fail fast on the driver: the model must load and the target layers must exist.
    from influence_ops.api import build_imodel
    build_imodel(config)
    prepare_output(config.output, config.overwrite)
    t0 = time.time()
    p = make_pipeline(opts)
    build(p, config, _json_options(opts))
    log.info("running %s/%s on %s", config.method, _solver_name(config) or "-",
             opts.view_as(StandardOptions).runner or "FnApiRunner")
    try:
        result = p.run()
        if not wait:
            return result
        result.wait_until_finish()
    except Exception as e:  # noqa: BLE001 - runners wrap worker errors in their own types
        manifest = read_manifest(config.output)
        if manifest and manifest.get("problems"):
            raise RunError("run finished but its result is not valid (no _SUCCESS written): "
                           + "; ".join(manifest["problems"])) from e
        raise
    manifest = read_manifest(config.output)
    if manifest is None or not FileSystems.exists(_join(config.output, SUCCESS)):
        raise RunError(f"the job ended without finalising {config.output}")
    metrics = _metrics(result)
    metrics["wall_seconds"] = round(time.time() - t0, 3)
    with FileSystems.create(_join(config.output, METRICS)) as f:
        f.write(json.dumps(metrics, indent=2, sort_keys=True, default=str).encode())
    log.info("done in %.1fs: %s", metrics["wall_seconds"],
             ", ".join(f"{k}={v}" for k, v in manifest["row_counts"].items()))
    return dict(manifest, metrics=metrics)
