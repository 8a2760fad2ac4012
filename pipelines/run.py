"""Builds and runs the influence job. The job finalises itself: its last step waits for every
table to be written (one ``WriteTables`` stage writes them all to ``_temp/``), moves the
files into place, reads the Parquet footers back, checks that every example is accounted
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
    _RUNNING             the claim of the run writing the output (removed when it ends)
    _temp/               the tables' files while the job writes them (removed by the last step)

Before the job starts, on the driver (:func:`run`): the options are validated, the model is
loaded, the first examples of ``--train`` and ``--queries`` are read by the job's own readers
and checked against the model (feature shape and dtype, label kind and width for the loss,
label range, a loss and a gradient on two examples), and the output is claimed with an
exclusive create of ``_RUNNING``, which also proves it is writable. Every failure there is one
sentence that names the file, the example or the option (:class:`RunError`).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import socket
import time
import uuid
from typing import List, Optional

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import (PipelineOptions, SetupOptions,
                                                  StandardOptions)

from influence_ops.config import ConfigError, InfluenceConfig
from pipelines import featurize, fit, groups, score, write
from pipelines.constants import (ARTIFACT, CLAIM, MANIFEST, METRICS, NAMESPACE, SUCCESS,
                                 TABLES)
from pipelines.finalize import (CheckIds, GatherFacts, RunError, _join, facts_dict, finalize,
                                id_problem, is_local, release_claim, write_atomic)
from pipelines.options import job_config
from pipelines.read import ReadExamples, peek
from pipelines.redact import scrub_options

log = logging.getLogger(__name__)
PEEK_ROWS = 64              # examples per source checked against the model on the driver
QUERY_SOLVE_WARN = 1000     # queries above which per-query solvers (cg, lissa, pcg) warn


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
    write.remove_temp(output)


# ------------------------------------------------------------------------------ the claim

def _claim_path(output: str) -> str:
    return _join(output, CLAIM)


def _claim_holder(path: str) -> dict:
    try:
        with FileSystems.open(path) as f:
            return json.loads(f.read().decode() or "{}")
    except Exception:  # noqa: BLE001 - an unreadable claim is still a claim
        return {}


def _claim_is_stale(holder: dict) -> bool:
    """A claim left by a dead process on this host (a driver that was killed). Detached runs
    (``wait=False``: the job outlives its launcher) and other hosts' claims are never stale."""
    if holder.get("detached") or holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):
        return False
    return False


def claim_output(output: str, detached: bool = False) -> str:
    """Claims ``output`` for this run: ``_RUNNING`` created with exclusive-create semantics
    (``O_EXCL`` locally, an ``ifGenerationMatch=0`` upload on ``gs://``). Returns the run id.

    A second run into the same output finds the claim and refuses; a claim left by a killed
    process on this host is taken over with a warning. Creating the claim is also the check
    that the output is writable. Other file systems get a best effort (exists, then create)."""
    from influence_ops import storage
    run_id = uuid.uuid4().hex
    body = json.dumps({"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
                       "detached": bool(detached),
                       "started": datetime.datetime.now(datetime.timezone.utc).isoformat()}
                      ).encode()
    path = _claim_path(output)
    exclusive = is_local(path) or path.startswith("gs://")
    for attempt in range(2):
        try:
            if exclusive:
                local = path[len("file://"):] if path.startswith("file://") else path
                created = storage.create_exclusive(local, body)
            else:
                created = not FileSystems.exists(path)
                if created:
                    write_atomic(path, body)
        except RunError:
            raise
        except OSError as e:
            raise RunError(f"--output {output}: cannot write there "
                           f"({e.strerror or e}{': ' + e.filename if e.filename else ''})"
                           ) from None
        except Exception as e:  # noqa: BLE001 - storage clients raise their own kinds
            raise RunError(f"--output {output}: cannot write there ({type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})"
                           ) from None
        if created:
            return run_id
        holder = _claim_holder(path)
        if attempt == 0 and _claim_is_stale(holder):
            log.warning("taking over %s: it was left by process %s on this host, which is no "
                        "longer running", path, holder.get("pid"))
            FileSystems.delete([path])
            continue
        who = (f"run {holder.get('run_id', '?')[:12]} (process {holder.get('pid', '?')} on "
               f"{holder.get('host', '?')}, started {holder.get('started', '?')})")
        raise RunError(f"--output {output} is being written by another {who}; wait for it to "
                       f"finish or choose another --output. If no run is writing there (one "
                       f"was killed), delete {path}")
    raise RunError(f"--output {output}: could not claim it")


# ------------------------------------------------------------------- checks before the job

def _role_flag(role: str) -> str:
    return "--train" if role == "train" else "--queries"


def tf_error_text(e: BaseException) -> str:
    """The last line that says what went wrong in a TensorFlow / Keras error."""
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception):", ln)]
    line = errors[-1] if errors else (lines[0] if lines else type(e).__name__)
    return re.sub(r"^[A-Za-z_.]*(Error|Exception):\s*", "", line)[:400]


def check_examples(config: InfluenceConfig, imodel, role: str, read: ReadExamples) -> int:
    """The first examples of one source against the model, on the driver; returns how many
    were looked at. Raises RunError naming the file, an example id and the option to change."""
    from influence_ops import gradients as G
    look = peek(read, PEEK_ROWS)
    flag = _role_flag(role)
    if look.block is None:
        if look.dead:
            log.warning("%s: none of the first %d rows of %s passed the reader's checks (%s: "
                        "%s); the job dead-letters such rows", flag, len(look.dead),
                        look.where, look.dead[0].example_id, look.dead[0].error)
        return len(look.dead)
    b = look.block
    where = f"{flag} {look.where}"
    problem = imodel.example_problems(b.x, b.y)
    if problem:
        raise RunError(f"{where} (example {b.ids[0]}): {problem}")
    uniq, counts = np.unique(b.ids, return_counts=True)
    if (counts > 1).any():
        first = ", ".join(f"{str(i)!r} x{c}" for i, c in zip(uniq[counts > 1][:5],
                                                         counts[counts > 1][:5]))
        raise RunError(f"{where}: duplicate example ids "
                       f"({'--id_key=' + config.id_key if config.id_key else 'row ids'}) "
                       f"among its first {len(b)} rows: {first}")
    bad = imodel.label_problems(b.y)
    if bad.all():
        raise RunError(f"{where}: none of the first {len(b)} labels can go into --loss="
                       f"{imodel.loss_spec} with {imodel.n_outputs} outputs (e.g. example "
                       f"{b.ids[0]}: label {np.asarray(b.y[0]).tolist()!r}); wrong --y_key "
                       "or --loss?")
    ok = b.take(~bad)
    try:
        # (the gradient function computes the loss: one trace, not two)
        two = ok.take(slice(0, 2))
        G.per_example_gradients(imodel, two.x, two.method_labels(imodel))
    except Exception as e:  # noqa: BLE001 - anything TF raises: one sentence, not a trace
        raise RunError(f"{where} (example {ok.ids[0]}): the model cannot compute the loss "
                       f"--loss={imodel.loss_spec} or its gradient: {tf_error_text(e)}") from e
    return len(b)


def count_rows(read: ReadExamples) -> Optional[int]:
    """Examples in a source from metadata only (npz array headers, Parquet footers, TFDS
    split sizes); None when that would mean reading the data (TFRecord)."""
    import zipfile
    try:
        if read.kind == "tfds":
            return sum(b - a for _, _, a, b in read.shards)
        total = 0
        for path, _ in read.files:
            with FileSystems.open(path) as f:  # seekable: only headers and footers are read
                if read.kind == "parquet":
                    import pyarrow.parquet as pq
                    total += pq.ParquetFile(f).metadata.num_rows
                elif read.kind == "npz":
                    with zipfile.ZipFile(f) as z, z.open(read.cfg["x_key"] + ".npy") as m:
                        version = np.lib.format.read_magic(m)
                        header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                  else np.lib.format.read_array_header_2_0)
                        total += header(m)[0][0]
                else:
                    return None
        return total
    except Exception:  # noqa: BLE001 - a count for a warning only; readers name real errors
        return None


def query_cost_warning(config: InfluenceConfig, n_queries: Optional[int],
                       n_train: Optional[int] = None) -> Optional[str]:
    """A warning when a per-query solver meets many queries (they are solved at fit time)."""
    solver = _solver_name(config)
    if solver not in ("cg", "lissa", "pcg") or not n_queries or n_queries <= QUERY_SOLVE_WARN:
        return None
    sample = config.fit_sample_size
    if n_train:
        fit_n = str(min(sample, n_train) if sample else n_train)
    else:
        fit_n = f"up to {sample}" if sample else "all the"
    steps = (f"up to {config.cg_max_iter} conjugate-gradient steps" if solver != "lissa" else
             f"{config.lissa_depth * config.lissa_repeats} LiSSA steps")
    return (f"--solver={solver} solves each of the {n_queries} queries at fit time, on one "
            f"worker: {steps}, each a Hessian-vector product over {fit_n} fit examples for "
            f"every query; expect minutes to hours before any result. A factored solver "
            f"(--solver=arnoldi or ekfac) serves any number of queries from one fit; fewer "
            f"queries or a smaller --fit_sample_size also help")


def check_artifact(config: InfluenceConfig, imodel) -> None:
    """``--artifact``: it must load for this model (fingerprint, target layers, format) and
    have been fitted with this run's method options."""
    from influence_ops import artifacts
    try:
        manifest = artifacts.read_manifest(config.artifact)
        artifacts.load_method_and_config(config.artifact, imodel)
    except artifacts.ArtifactError as e:
        raise RunError(f"--artifact: {e}") from None
    if bool(manifest.get("sample_weighted")) != bool(config.weight_key):
        raise RunError(f"--artifact {config.artifact} was fitted "
                       + ("with" if manifest.get("sample_weighted") else "without")
                       + " sample weights and this run is "
                       + (f"weighted (--weight_key={config.weight_key})" if config.weight_key
                          else "unweighted (no --weight_key)")
                       + ": its Hessian is of another objective; drop --artifact to refit")
    want = config.method_options()
    have = manifest.get("options", {})
    differ = [f"--{k}={have.get(k)!r} (this run: {want[k]!r})" for k in sorted(want)
              if k != "plugins" and have.get(k) != want[k]]
    if differ:
        raise RunError(f"--artifact {config.artifact} was fitted with other method options: "
                       + ", ".join(differ[:6]) + "; pass the same options or drop --artifact "
                       "to refit")


def preflight(config: InfluenceConfig, imodel, reads: dict) -> List[str]:
    """Checks both sources against the model before anything runs; returns warnings (also
    logged) for the run manifest."""
    for role, read in reads.items():
        if read is not None:
            check_examples(config, imodel, role, read)
    if config.artifact:
        check_artifact(config, imodel)
    warnings = []
    n_queries = count_rows(reads["query"]) if reads.get("query") is not None else 0
    if query_cost_warning(config, n_queries):
        warnings.append(query_cost_warning(config, n_queries, count_rows(reads["train"])))
    for w in warnings:
        log.warning("%s", w)
    return warnings


_GUARD_FACTS = [("ids", "train"), ("ids", "query"), ("count", "train_ok"),
                ("dead_summary", "train")]


def _make_guard(facts, id_key):
    f = facts_dict(facts)
    problems = [p for p in (id_problem("train", f["ids", "train"], id_key),
                            id_problem("query", f["ids", "query"], id_key)) if p]
    return {"problems": problems, "train_ok": f["count", "train_ok"],
            "dead": f["dead_summary", "train"]}


def _total(pcoll, label: str, size=len):
    """``sum(size(element))`` as a one-element PCollection (0 when empty)."""
    return (pcoll | f"Size{label}" >> beam.Map(size)
            | f"Sum{label}" >> beam.CombineGlobally(sum))


def build(p: beam.Pipeline, config: InfluenceConfig,
          run_options: Optional[dict] = None, reads: Optional[dict] = None,
          run_id: Optional[str] = None, warnings: Optional[List[str]] = None) -> None:
    """Adds the job's stages to ``p``, finalisation included.

    ``config``: the job's validated config, handed to every stage. ``run_options``: the
    JSON-able options recorded in the run manifest. ``reads``: the ``ReadExamples`` of
    ``{"train", "query"}`` (built here when not given). ``run_id``: the output claim the last
    step releases. ``warnings``: the driver's, recorded in the manifest.
    """
    from influence_ops import schemas
    opts = config
    out = config.output
    reads = reads or {"train": ReadExamples(config.train, config, "train"),
                      "query": (ReadExamples(config.queries, config, "query")
                                if config.queries else None)}
    train, dead_read_t = p | "ReadTrain" >> reads["train"]
    if reads.get("query") is not None:
        queries, dead_read_q = p | "ReadQueries" >> reads["query"]
    else:  # no --queries: self-influence only
        queries = p | "NoQueries" >> beam.Create([])
        dead_read_q = p | "NoQueryDead" >> beam.Create([])
    # Counters are facts summed by the last step's one combine (GatherFacts), not one
    # combine each: every CombineGlobally is a shuffle stage of its own.
    counts = {"train_read_valid": train, "query_read_valid": queries,
              "dead_at_read": (dead_read_t, dead_read_q) | "DeadRead" >> beam.Flatten()}
    count_size = {"dead_at_read": lambda _: 1}
    # Ids are counted as read (dead letters included): unique per role, or no fit.
    ids_t = (train, dead_read_t) | "CheckIdsTrain" >> CheckIds("train")
    ids_q = (queries, dead_read_q) | "CheckIdsQueries" >> CheckIds("query")
    train, dead_label_t = featurize.validate_labels(train, config, "ValidateLabelsTrain")
    queries, dead_label_q = featurize.validate_labels(queries, config, "ValidateLabelsQueries")
    # What the fit checks first (unique ids, training examples left), in one combine.
    guard = ((ids_t, ids_q,
              train | "FactTrainChecked" >> beam.Map(lambda b: ("count", "train_ok", len(b))),
              (dead_read_t, dead_label_t) | "DeadTrain" >> beam.Flatten()
              | "FactDeadTrain" >> beam.Map(lambda d: ("dead_summary", "train", d)))
             | "GuardFacts" >> beam.Flatten()
             | "GuardGather" >> beam.CombineGlobally(GatherFacts(expect=_GUARD_FACTS))
             | "Guard" >> beam.Map(_make_guard, config.id_key))
    artifact = train | "FitMethod" >> fit.FitMethod(config, _join(out, ARTIFACT), queries,
                                                    guard, reads["train"])
    # Pass 2 over the training input: the files (not the decoded examples) wait for the
    # artifact, then each is read, checked and featurized again (featurize.ReadAndFeaturize).
    # Group influence beyond first order takes its checked blocks from pass 2 (they need the
    # artifact, so they come after it).
    group_blocks = bool(opts.group_key) and opts.group_order != 1
    train_f, time_tf, dead_feat_t, train_again = p | "FeaturizeTrain" >> (
        featurize.ReadAndFeaturize(reads["train"], config, artifact, emit_blocks=group_blocks))
    query_f, time_qf, dead_feat_q = queries | "FeaturizeQueries" >> featurize.Featurize(
        config, artifact, "query")
    counts["train_examples_featurized"] = train_f
    counts["query_examples_featurized"] = query_f
    scored = train_f | "Score" >> score.Score(query_f, opts.k, opts.write_pairwise,
                                              opts.write_features, config.boundary_columns,
                                              config.examples_top)
    topk, k_flag = scored.topk | "MergeTopK" >> score.MergeTopK(query_f, opts.k)
    tables = {"topk": topk, "self_influence": scored.self}
    # The Parquet schema of every table written (None: inferred from its first table).
    table_schemas = {"topk": schemas.TOPK_SCHEMA,
                     "self_influence": schemas.self_schema(config.boundary_columns)}
    if opts.examples_top or opts.sample_rows:
        from pipelines import examples as examples_lib
        for name, pc in examples_lib.example_tables(config, train, scored.candidates,
                                                    query_f).items():
            tables[name] = pc
            table_schemas[name] = schemas.EXAMPLES_SCHEMA
    if opts.write_pairwise:
        tables["pairwise"] = scored.pairwise
        table_schemas["pairwise"] = schemas.PAIRWISE_SCHEMA
    if opts.write_features:
        feats = ((scored.features, query_f | "QueryFeatureTables" >> beam.Map(
            score.features_table, "query")) | "AllFeatures" >> beam.Flatten())
        # The fixed-size list width is only known at run time: pyarrow infers the schema.
        tables["features"] = feats
        table_schemas["features"] = None
    if opts.group_key:
        if opts.group_order == 1:
            g_scores, g_self = train_f | "FirstOrderGroups" >> groups.FirstOrderGroups(query_f)
            tables["group_self"] = g_self
            table_schemas["group_self"] = schemas.GROUP_SELF_SCHEMA
        elif opts.group_order == "newton":
            from pipelines.group_newton import NewtonGroups
            g_scores = train_again | "NewtonGroups" >> NewtonGroups(config, artifact, queries)
        else:
            # Order 2's second pass (Hessian-vector products along the per-group solves of
            # the first) reads the input a third time.
            n_train = _total(train, "TrainForGroups")
            g_scores = train_again | "SecondOrderGroups" >> groups.SecondOrderGroups(
                config, artifact, queries, n_train, reads["train"])
        tables["groups"] = g_scores
        table_schemas["groups"] = schemas.GROUP_SCHEMA
    all_dead = ((dead_read_t, dead_read_q, dead_label_t, dead_label_q, dead_feat_t, dead_feat_q)
                | "AllDead" >> beam.Flatten())
    tables["dead_letter"] = all_dead | "DeadRows" >> beam.Map(lambda d: d._asdict())
    table_schemas["dead_letter"] = schemas.DEAD_LETTER_SCHEMA
    temp = write.temp_dir(out, run_id)
    parts = tables | "WriteTables" >> write.WriteTables(temp, table_schemas)

    # Everything the last step needs, as ("kind", name, value) records in one list: gathering
    # them waits for every writer to finish (their outputs are the final file names).
    facts = [artifact | "FactArtifact" >> beam.Map(lambda a: ("artifact", "path", a)),
             ids_t, ids_q,
             k_flag | "FactKFlag" >> beam.Map(lambda v: ("topk_flag", "k_exceeds_half", v)),
             all_dead | "FactDead" >> beam.Map(lambda d: ("dead_summary", "all", d))]
    for name, pc in counts.items():
        facts.append(pc | f"Fact_{name}" >> beam.Map(
            lambda e, n=name, size=count_size.get(name, len): ("count", n, size(e))))
    for name, pc in tables.items():
        facts.append(pc | f"FactRows_{name}" >> beam.Map(lambda t, n=name: ("rows", n, write.rows(t))))
    facts.append(parts)
    facts.append((time_tf, time_qf, scored.timing) | "AllTimings" >> beam.Flatten()
                 | "FactTimings" >> beam.Map(lambda kv: ("timing", kv[0], kv[1])))
    _ = (facts | "AllFacts" >> beam.Flatten()
         | "Gather" >> beam.CombineGlobally(GatherFacts(
             expect=[("count", n) for n in counts] + [("rows", n) for n in tables]
             + [("ids", "train"), ("ids", "query"), ("dead_summary", "all")]))
         | "Finalize" >> beam.Map(finalize, out, dict(run_options or {}),
                                  opts.max_bad_fraction, opts.method, _solver_name(config),
                                  opts.k, opts.id_key, run_id, list(warnings or []), temp,
                                  table_schemas))


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
    """The options recorded in the run manifest, credentials scrubbed."""
    return scrub_options({k: v for k, v in sorted(opts.get_all_options(drop_default=False).items())
                          if isinstance(v, (str, int, float, bool, type(None)))})


def read_manifest(output: str) -> Optional[dict]:
    path = _join(output, MANIFEST)
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as f:
        text = f.read().decode(errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        raise RunError(f"{path} is not valid JSON ({len(text)} bytes; written by an older "
                       "version that did not write it atomically, or edited?): the result "
                       "there is not usable") from None


def run(argv: Optional[List[str]] = None, options: Optional[PipelineOptions] = None,
        wait: bool = True, train_files: Optional[List[str]] = None):
    """Runs the job and returns its run manifest (plus ``metrics`` from the runner).

    With ``wait=False`` it returns the ``PipelineResult`` right after submission; the job still
    writes its manifest and ``_SUCCESS`` itself. Raises RunError when the result is not valid.
    ``train_files``: read only these files of ``--train`` (their ids as in the whole source:
    the audit's incremental runs).
    """
    opts = options or PipelineOptions(argv)
    opts.view_as(SetupOptions).save_main_session = False
    config = validate(job_config(opts))
    # Before anything runs a TF op in this process (the default runner's workers share it).
    from pipelines.worker import configure_worker, job_imodel
    configure_worker(config)
    # Driver-side file operations (output checks, manifest, marker) use the job's options too.
    FileSystems.set_options(opts)
    # Fail fast on the driver: the model must load, the target layers must exist, and the
    # first examples of each source must fit the model (before the output is touched).
    imodel = job_imodel(config)
    reads = {"train": ReadExamples(config.train, config, "train", imodel.input_shape),
             "query": (ReadExamples(config.queries, config, "query", imodel.input_shape)
                       if config.queries else None)}
    if train_files is not None:
        reads["train"].only(train_files)
    warnings = preflight(config, imodel, reads)
    run_id = claim_output(config.output, detached=not wait)
    detached = False
    try:
        prepare_output(config.output, config.overwrite)
        t0 = time.time()
        p = make_pipeline(opts)
        # A detached job releases the claim in its last step; otherwise this process does,
        # after it wrote run_metrics.json.
        build(p, config, _json_options(opts), reads, None if wait else run_id, warnings)
        log.info("running %s/%s on %s", config.method, _solver_name(config) or "-",
                 opts.view_as(StandardOptions).runner or "FnApiRunner")
        try:
            result = p.run()
            if not wait:
                detached = True  # the job's last step releases the claim
                return result
            result.wait_until_finish()
        except Exception as e:  # noqa: BLE001 - runners wrap worker errors in their own types
            manifest = read_manifest(config.output)
            if manifest and manifest.get("problems"):
                raise RunError("run finished but its result is not valid (no _SUCCESS "
                               "written): " + "; ".join(manifest["problems"])) from e
            raise
        manifest = read_manifest(config.output)
        if manifest is None or not FileSystems.exists(_join(config.output, SUCCESS)):
            raise RunError(f"the job ended without finalising {config.output}")
        metrics = _metrics(result)
        metrics["wall_seconds"] = round(time.time() - t0, 3)
        write_atomic(_join(config.output, METRICS),
                     json.dumps(metrics, indent=2, sort_keys=True, default=str).encode())
        log.info("done in %.1fs: %s", metrics["wall_seconds"],
                 ", ".join(f"{k}={v}" for k, v in manifest["row_counts"].items()))
        return dict(manifest, metrics=metrics)
    finally:
        if not detached:
            release_claim(config.output, run_id)
