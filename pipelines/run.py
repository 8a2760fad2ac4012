"""Builds and runs the influence job; writes the run manifest and the success marker last.

Output layout under ``--output``::

    artifact/            fitted method (arrays.npz + manifest.json)
    topk/                query_id, rank, train_id, score, kind       (Parquet)
    self_influence/      train_id, score, label, loss                 (Parquet)
    pairwise/            query_id, train_id, score                    (--write_pairwise)
    features/            example_id, label, role, features            (--write_features)
    groups/, group_self/ group influence                              (--group_key)
    dead_letter/         source, example_id, error                    (rows that were rejected)
    run_manifest.json    method, options, versions, counters, timings, row counts
    _SUCCESS             written last: a reader that sees it sees a whole result
"""

from __future__ import annotations

import json
import logging
import time
from typing import Dict, List, Optional

import apache_beam as beam
import numpy as np
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
    if opts.k < 1:
        raise RunError("--k must be >= 1")
    if opts.block_size < 1 or opts.batch_size < 1:
        raise RunError("--block_size and --batch_size must be >= 1")
    if not 0.0 <= opts.max_bad_fraction <= 1.0:
        raise RunError("--max_bad_fraction must lie in [0, 1]")


def prepare_output(output: str, overwrite: bool) -> None:
    """Refuses to mix a new result into an old one unless --overwrite (then deletes it first)."""
    existing = [t for t in TABLES + ("artifact", MANIFEST, SUCCESS)
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


def _write(tables, output: str, name: str, schema):
    return tables | f"Write_{name}" >> beam.io.parquetio.WriteToParquetBatched(
        _join(output, name, "part"), schema=schema, file_name_suffix=".parquet")


def _dead_table(rows):
    import pyarrow as pa
    from influence_ops import schemas
    rows = sorted(rows)
    return pa.table({"source": [r[0] for r in rows], "example_id": [r[1] for r in rows],
                     "error": [r[2] for r in rows]}, schema=schemas.DEAD_LETTER_SCHEMA)


def build(p: beam.Pipeline, opts: InfluenceOptions, label_spec=None) -> None:
    """Adds the job's stages to ``p``. ``label_spec``: ``(label_mode, n_outputs)`` of the model
    (from ``stages.label_spec``); rows with labels that do not fit are dead-lettered."""
    from influence_ops import schemas
    cfg = stages.model_config(opts)
    out = opts.output
    if label_spec is None:
        label_spec = stages.label_spec(stages.build_imodel(cfg))
    train, dead_train = p | "ReadTrain" >> ReadExamples(opts.train, opts, "train")
    queries, dead_query = p | "ReadQueries" >> ReadExamples(opts.queries, opts, "query")
    checked = {}
    for role, blocks in (("Train", train), ("Queries", queries)):
        checked[role] = blocks | f"ValidateLabels{role}" >> beam.ParDo(
            stages.ValidateLabels(*label_spec)).with_outputs("dead", main="blocks")
    train, queries = checked["Train"].blocks, checked["Queries"].blocks
    dead_train = (dead_train, checked["Train"].dead) | "DeadTrain" >> beam.Flatten()
    dead_query = (dead_query, checked["Queries"].dead) | "DeadQuery" >> beam.Flatten()
    artifact = train | "FitMethod" >> stages.FitMethod(cfg, _join(out, "artifact"), queries)
    train_f, dead_tf = train | "FeaturizeTrain" >> stages.Featurize(cfg, artifact, "train")
    query_f, dead_qf = queries | "FeaturizeQueries" >> stages.Featurize(cfg, artifact, "query")
    scored = train_f | "Score" >> stages.Score(query_f, opts.k, opts.write_pairwise,
                                               opts.write_features)
    topk = scored.topk | "MergeTopK" >> stages.MergeTopK(query_f)
    _write(topk, out, "topk", schemas.TOPK_SCHEMA)
    _write(scored.self, out, "self_influence", schemas.SELF_SCHEMA)
    if opts.write_pairwise:
        _write(scored.pairwise, out, "pairwise", schemas.PAIRWISE_SCHEMA)
    if opts.write_features:
        k_tables = (scored.features,
                    query_f | "QueryFeatureTables" >> beam.Map(stages.features_table, "query"))
        feats = k_tables | "AllFeatures" >> beam.Flatten()
        # The fixed-size list width is only known at run time: let pyarrow infer the schema.
        feats | "Write_features" >> beam.io.parquetio.WriteToParquetBatched(
            _join(out, "features", "part"), file_name_suffix=".parquet")
    if opts.group_key:
        if opts.group_order == 1:
            g_scores, g_self = train_f | "FirstOrderGroups" >> stages.FirstOrderGroups(query_f)
            _write(g_self, out, "group_self", schemas.GROUP_SELF_SCHEMA)
        else:
            n_train = (train | "CountTrain" >> beam.Map(len)
                       | "NTrain" >> beam.CombineGlobally(sum))
            g_scores = train | "SecondOrderGroups" >> stages.SecondOrderGroups(
                cfg, artifact, queries, n_train)
        _write(g_scores, out, "groups", schemas.GROUP_SCHEMA)
    dead = ((dead_train, dead_query, dead_tf, dead_qf) | "AllDead" >> beam.Flatten()
            | "DeadList" >> beam.combiners.ToList()
            | "DeadTable" >> beam.Map(_dead_table))
    _write(dead, out, "dead_letter", schemas.DEAD_LETTER_SCHEMA)


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


def table_row_counts(output: str) -> Dict[str, int]:
    """Reads back Parquet footers: the real row counts (empty shards included)."""
    import pyarrow.parquet as pq
    counts = {}
    for t in TABLES:
        files = FileSystems.match([_join(output, t, "*.parquet")])[0].metadata_list
        if not files:
            continue
        n = 0
        for m in files:
            with FileSystems.open(m.path) as f:
                import io
                n += pq.ParquetFile(io.BytesIO(f.read())).metadata.num_rows
        counts[t] = n
    return counts


def make_pipeline(opts: PipelineOptions) -> beam.Pipeline:
    std = opts.view_as(StandardOptions)
    if std.runner in (None, "FnApiRunner"):
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner
        std.runner = None
        return beam.Pipeline(runner=FnApiRunner(), options=opts)
    return beam.Pipeline(options=opts)


def run(argv: Optional[List[str]] = None, options: Optional[PipelineOptions] = None) -> dict:
    """Runs the job; returns the run manifest. Raises RunError on invalid results."""
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
    build(p, iopts, stages.label_spec(imodel))
    log.info("running %s/%s on %s", iopts.method, iopts.solver,
             opts.view_as(StandardOptions).runner or "FnApiRunner")
    result = p.run()
    result.wait_until_finish()
    wall = time.time() - t0
    metrics = _metrics(result)
    counts = table_row_counts(iopts.output)
    manifest = _finish(iopts, opts, metrics, counts, wall)
    return manifest


def _finish(iopts, opts, metrics, counts, wall) -> dict:
    from influence_ops import artifacts
    c = metrics["counters"]
    read = c.get("examples_read")
    dead = counts.get("dead_letter", 0)
    problems = []
    featurized = c.get("train_examples_featurized")
    if featurized is not None and counts.get("self_influence", 0) != featurized:
        problems.append(f"self_influence has {counts.get('self_influence', 0)} rows but "
                        f"{featurized} training examples were featurized")
    if read is not None:
        accounted = (counts.get("self_influence", 0) + c.get("query_examples_featurized", 0)
                     + dead)
        if accounted != read:
            problems.append(f"{read} examples read but {accounted} accounted for "
                            "(self_influence + queries + dead letters)")
        if read and dead > iopts.max_bad_fraction * read:
            problems.append(f"{dead} of {read} examples were dead-lettered, above "
                            f"--max_bad_fraction={iopts.max_bad_fraction}; see "
                            f"{_join(iopts.output, 'dead_letter')}")
    if counts.get("topk", 0) == 0:
        problems.append("topk is empty")
    art = artifacts.read_manifest(_join(iopts.output, "artifact"))
    manifest = {
        "method": iopts.method,
        "solver": iopts.solver if iopts.method in ("influence", "relatif") else None,
        "options": {k: v for k, v in sorted(opts.get_all_options(drop_default=False).items())
                    if isinstance(v, (str, int, float, bool, type(None)))},
        "artifact": art,
        "versions": artifacts.library_versions(),
        "counters": c,
        "timings": {"wall_seconds": round(wall, 3), **{
            k: v for k, v in metrics["distributions"].items()}},
        "row_counts": counts,
        "problems": problems,
    }
    FileSystems.mkdirs(iopts.output) if not FileSystems.exists(iopts.output) else None
    with FileSystems.create(_join(iopts.output, MANIFEST)) as f:
        f.write(json.dumps(manifest, indent=2, sort_keys=True, default=str).encode())
    if problems:
        raise RunError("run finished but its result is not valid (no _SUCCESS written): "
                       + "; ".join(problems))
    with FileSystems.create(_join(iopts.output, SUCCESS)) as f:
        f.write(b"")
    log.info("done in %.1fs: %s", wall, ", ".join(f"{k}={v}" for k, v in counts.items()))
    return manifest
