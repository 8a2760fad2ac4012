"""The same job gives the same result on three local runners.

1. FnApiRunner in-process (the baseline, what ``run_lib.run`` uses without ``--runner``).
2. FnApiRunner with ``--direct_running_mode=multi_processing --direct_num_workers=2``: the DoFns
   run in two ``sdk_worker_main`` subprocesses (``FnApiRunner.run_pipeline`` reads both flags).
3. ``PortableRunner`` against a local job service (``local_job_service_main``, the stand-in for a
   Flink job server) whose SDK workers come from an external worker pool (``worker_pool_main``,
   ``--environment_type=EXTERNAL``): job submission, artifact staging, pipeline-proto round trip
   and metrics over the Job API, as on a real portable cluster.

Per runner: topk (query_id, rank, train_id, kind identical; scores rtol 1e-6), self_influence
(per train_id; every training example exactly once), and the user counters in
``run_manifest.json`` (queried from ``result.metrics()``) equal the baseline's.

Two regression tests pin ``pipelines/run.py:_metrics`` behaviour that once was wrong: (a) a job
server that reports metrics as ``attempted`` only, as Flink's and Spark's do, must still fill the
counters (they once all read 0 and the run failed); (b) a distribution reported by several steps
is merged over the steps, not overwritten.
"""

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipelines import run as run_lib

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TRAIN, N_FILES, N_QUERY, K = 300, 3, 10, 5
RTOL = 1e-6
# One run takes 5-25 s here. A runner that never gets an SDK worker waits forever (e.g. a worker
# pool whose `python` cannot import apache_beam): fail after this many seconds instead.
RUN_DEADLINE_S = 180
COUNTERS = {"examples_read": N_TRAIN + N_QUERY, "train_examples_featurized": N_TRAIN,
            "query_examples_featurized": N_QUERY, "train_examples_scored": N_TRAIN}


def _pythonpath() -> str:
    old = os.environ.get("PYTHONPATH")
    return REPO + (os.pathsep + old if old else "")


# ============================================================================ job + baseline
def _read(out, table):
    df = pq.read_table(os.path.join(out, table)).to_pandas()
    keys = ["query_id", "kind", "rank"] if table == "topk" else ["train_id"]
    return df.sort_values(keys).reset_index(drop=True)


@contextlib.contextmanager
def _deadline(seconds, what):
    """SIGALRM -> TimeoutError in the main thread (the runners' waits are Python-level polls)."""
    def fire(signum, frame):
        raise TimeoutError(f"{what} did not finish within {seconds}s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _run(job, name, *flags):
    out = str(job["dir"] / name)
    t0 = time.time()
    with _deadline(RUN_DEADLINE_S, f"the {name} run"):
        manifest = run_lib.run(job["argv"] + [f"--output={out}"] + list(flags))
    logging.getLogger(__name__).info("%s: run took %.1fs", name, time.time() - t0)
    with open(os.path.join(out, run_lib.MANIFEST)) as f:
        on_disk = json.load(f)
    return dict(out=out, manifest=manifest, on_disk=on_disk,
                topk=_read(out, "topk"), self=_read(out, "self_influence"))


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Digits subset: 300 training examples in 3 .npz files, 10 queries, a 5-epoch MLP; and the
    in-process FnApiRunner result every other runner is compared with."""
    from pipelines import demo
    d = tmp_path_factory.mktemp("runners")
    xtr, ytr, xq, yq, _ = demo.make_data(seed=0, n_train=N_TRAIN)
    model = demo.train_model(xtr, ytr, seed=0, epochs=5)
    model.save(str(d / "model.keras"))
    per = N_TRAIN // N_FILES
    for i in range(N_FILES):
        np.savez(d / f"train_{i}.npz", x=xtr[i * per:(i + 1) * per], y=ytr[i * per:(i + 1) * per])
    np.savez(d / "queries.npz", x=xq[:N_QUERY], y=yq[:N_QUERY])
    argv = [f"--model={d}/model.keras", f"--train=npz:{d}/train_*.npz",
            f"--queries=npz:{d}/queries.npz", "--method=influence", "--solver=exact",
            "--l2=0.001", f"--k={K}", "--block_size=40", "--batch_size=64"]
    train_ids = sorted(f"train_{i}.npz:{j:09d}" for i in range(N_FILES) for j in range(per))
    job = dict(dir=d, argv=argv, train_ids=train_ids)
    job["base"] = _run(job, "in_process")
    return job


def _check_complete(job, res):
    """Every training example exactly once in self_influence; full top-k; counters reached the
    manifest (in memory and on disk); a finished result."""
    ids = res["self"].train_id.tolist()
    assert len(ids) == len(set(ids)) == N_TRAIN
    assert sorted(ids) == job["train_ids"]
    assert len(res["topk"]) == N_QUERY * 2 * K
    assert os.path.exists(os.path.join(res["out"], run_lib.SUCCESS))
    for m in (res["manifest"], res["on_disk"]):
        assert m["problems"] == []
        assert {k: m["counters"].get(k) for k in COUNTERS} == COUNTERS, m["counters"]
        assert m["row_counts"]["self_influence"] == N_TRAIN
        assert m["row_counts"].get("dead_letter", 0) == 0


def _check_same(base, other):
    a, b = base["topk"], other["topk"]
    cols = ["query_id", "rank", "train_id", "kind"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    np.testing.assert_allclose(b.score.to_numpy(), a.score.to_numpy(), rtol=RTOL)
    a, b = base["self"], other["self"]
    pd.testing.assert_frame_equal(a[["train_id", "label"]], b[["train_id", "label"]])
    for col in ("score", "loss"):
        np.testing.assert_allclose(b[col].to_numpy(), a[col].to_numpy(), rtol=RTOL, err_msg=col)
    assert other["manifest"]["counters"] == base["manifest"]["counters"]
    # The fitted artifact: same manifest (but its creation and fit times), same eigenvalues.
    drop = lambda m: {k: v for k, v in m["artifact"].items()  # noqa: E731
                      if k not in ("created", "fit_seconds")}
    assert drop(other["manifest"]) == drop(base["manifest"])
    lam_a, lam_b = (np.load(os.path.join(r["out"], "artifact", "arrays.npz"))["curvature.lam"]
                    for r in (base, other))
    np.testing.assert_allclose(lam_b, lam_a, rtol=RTOL, atol=RTOL * np.abs(lam_a).max())


# ============================================================================ 1. baseline
def test_in_process_baseline(job):
    base = job["base"]
    _check_complete(job, base)
    assert base["manifest"]["options"].get("runner") is None
    # Sanity of the result itself: ranks 1..K per query and kind, proponents sorted descending.
    t = base["topk"]
    assert set(t.kind) == {"proponent", "opponent"}
    for (_, kind), g in t.groupby(["query_id", "kind"]):
        assert g["rank"].tolist() == list(range(1, K + 1))
        s = g.sort_values("rank").score.to_numpy()
        assert np.all(np.diff(s) <= 0) if kind == "proponent" else np.all(np.diff(s) >= 0)


# ============================================================================ 2. multi_processing
def test_fnapi_multi_processing_matches(job, monkeypatch, caplog):
    from apache_beam.runners.portability import local_job_service
    # The SDK worker subprocesses inherit os.environ: they must import pipelines/influence_ops.
    monkeypatch.setenv("PYTHONPATH", _pythonpath())
    # Record the SDK worker subprocesses the runner starts (SubprocessSdkWorkerHandler looks the
    # class up on this module at start time).
    started = []

    class Recording(local_job_service.SubprocessSdkWorker):
        def __init__(self, command, *args, **kwargs):
            started.append(command)
            super().__init__(command, *args, **kwargs)

    monkeypatch.setattr(local_job_service, "SubprocessSdkWorker", Recording)
    # Subprocess workers' logs come back through the runner's logging service under this logger.
    caplog.set_level(logging.INFO, logger="apache_beam.runners.portability.local_job_service")
    res = _run(job, "multi_processing", "--direct_running_mode=multi_processing",
               "--direct_num_workers=2")
    worker_logs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Worker:")]
    # Evidence that the DoFns really ran in two SDK worker subprocesses, not in this process.
    assert len(started) == 2 and all(b"sdk_worker_main" in c for c in started), started
    assert any("loaded model" in m for m in worker_logs), worker_logs[:5]
    assert res["manifest"]["options"]["direct_running_mode"] == "multi_processing"
    assert res["manifest"]["options"]["direct_num_workers"] == 2
    _check_complete(job, res)
    _check_same(job["base"], res)


@pytest.mark.parametrize("solver", ["pcg", "ekfac"])
def test_at_scale_solvers_multi_processing_match_in_process(job, monkeypatch, solver):
    """The at-scale paths (pcg: sample fit + query solves on one worker; ekfac: two combine
    passes over all blocks, the second with the first's factors as a side input) give the
    same result in two SDK worker processes as in process."""
    monkeypatch.setenv("PYTHONPATH", _pythonpath())
    flags = [f"--solver={solver}", "--damping=0.001"]
    base = _run(job, f"{solver}_in_process", *flags)
    multi = _run(job, f"{solver}_multi", *flags, "--direct_running_mode=multi_processing",
                 "--direct_num_workers=2")
    _check_complete(job, multi)
    a, b = base["topk"], multi["topk"]
    cols = ["query_id", "rank", "train_id", "kind"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    np.testing.assert_allclose(b.score.to_numpy(), a.score.to_numpy(), rtol=RTOL)
    np.testing.assert_allclose(multi["self"].score.to_numpy(), base["self"].score.to_numpy(),
                               rtol=RTOL)


# ============================================================================ 3. portable + pool
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _wait_for_port(port, proc, log_path, what, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{open(log_path).read()}")
        with contextlib.suppress(OSError), socket.create_connection(("localhost", port), 0.5):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not accept connections on {port} within {timeout}s:\n"
                       f"{open(log_path).read()}")


def _stop(proc, sig):
    """A graceful signal first (job service: SIGTERM -> sys.exit; worker pool: SIGINT ->
    KeyboardInterrupt -> server stop, and its atexit hook stops the SDK worker processes it
    started), then SIGKILL to the process group we created for it (stragglers only)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers in our own session, if any
    proc.wait(timeout=15)


# Flink's and Spark's portable job servers return user metrics as `attempted` only
# (FlinkPortableRunnerResult.portableMetrics: MetricResults.newBuilder().addAllAttempted(...));
# Beam's Python local job service returns them as `committed` only. This job service reports
# them the Flink way, so the test also covers what run.py sees from a real Flink job server.
_ATTEMPTED_ONLY_JOB_SERVICE = """
import logging, signal, sys
from apache_beam.portability.api import beam_job_api_pb2
from apache_beam.runners.portability import local_job_service, local_job_service_main

_committed = local_job_service.LocalJobServicer.GetJobMetrics

def attempted_only(self, request, context=None):
    response = _committed(self, request, context)
    return beam_job_api_pb2.GetJobMetricsResponse(
        metrics=beam_job_api_pb2.MetricResults(attempted=response.metrics.committed))

local_job_service.LocalJobServicer.GetJobMetrics = attempted_only
signal.signal(signal.SIGTERM, lambda *args: sys.exit(0))
logging.basicConfig(level=logging.INFO)
local_job_service_main.run(sys.argv[1:])
"""


@pytest.fixture
def portable_services(request, tmp_path):
    """A local job service (``request.param``: how it reports metrics, "committed" as Beam's or
    "attempted_only" as Flink's) and an external worker pool, as real subprocesses."""
    metrics_mode = getattr(request, "param", "committed")
    env = dict(os.environ, PYTHONPATH=_pythonpath())
    # worker_pool_main starts each SDK worker as a bare `python -c ...` (found on PATH, not
    # sys.executable): put this interpreter's directory first so workers get this environment.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    procs = []

    def start(args, log_name, stop_signal):
        log_path = str(tmp_path / log_name)
        with open(log_path, "wb") as log:
            p = subprocess.Popen([sys.executable] + args, env=env, cwd=str(tmp_path),
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append((p, stop_signal))
        return p, log_path

    try:
        # Job service: the job API and artifact staging share one gRPC port (no separate
        # --artifact_port/--expansion_port in Beam's local job service); --port=0 + --port_file
        # avoids a free-port race.
        if metrics_mode == "committed":
            main = ["-m", "apache_beam.runners.portability.local_job_service_main"]
        else:
            script = tmp_path / "attempted_only_job_service.py"
            script.write_text(_ATTEMPTED_ONLY_JOB_SERVICE)
            main = [str(script)]
        port_file = str(tmp_path / "job.port")
        js, js_log = start(main + ["--port=0", f"--port_file={port_file}",
                                   f"--staging_dir={tmp_path / 'staging'}"],
                           "job_service.log", signal.SIGTERM)
        pool_port = _free_port()
        pool, pool_log = start(["-m", "apache_beam.runners.worker.worker_pool_main",
                                f"--service_port={pool_port}"], "worker_pool.log", signal.SIGINT)
        deadline = time.time() + 60
        while not os.path.exists(port_file):
            if js.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"job service did not start:\n{open(js_log).read()}")
            time.sleep(0.2)
        job_port = int(open(port_file).read())
        _wait_for_port(job_port, js, js_log, "job service")
        _wait_for_port(pool_port, pool, pool_log, "worker pool")
        yield dict(job_port=job_port, pool_port=pool_port, js_log=js_log, pool_log=pool_log,
                   metrics_mode=metrics_mode)
    finally:
        for p, sig in reversed(procs):
            _stop(p, sig)


@pytest.mark.parametrize("portable_services", [
    "committed",
    "attempted_only",  # as Flink's and Spark's job servers report metrics
], indirect=True)
def test_portable_runner_external_pool_matches(job, portable_services):
    s = portable_services
    try:
        res = _run(job, f"portable_{s['metrics_mode']}", "--runner=PortableRunner",
                   f"--job_endpoint=localhost:{s['job_port']}", "--environment_type=EXTERNAL",
                   f"--environment_config=localhost:{s['pool_port']}")
    except TimeoutError as e:
        pytest.fail(f"{e}\n--- worker pool log (tail) ---\n{open(s['pool_log']).read()[-3000:]}"
                    f"\n--- job service log (tail) ---\n{open(s['js_log']).read()[-3000:]}")
    # The work ran in SDK workers the external pool started, for a job of the job service.
    pool_log = open(s["pool_log"]).read()
    js_log = open(s["js_log"]).read()
    assert "Starting worker with command" in pool_log, pool_log
    assert f"Requesting worker at localhost:{s['pool_port']}" in js_log, js_log[-3000:]
    assert "with state DONE" in js_log, js_log[-3000:]
    assert res["manifest"]["options"]["runner"] == "PortableRunner"
    _check_complete(job, res)
    _check_same(job["base"], res)


# ============================================================================ metrics -> manifest
def test_manifest_merges_a_distribution_over_steps():
    """What every runner hands ``_metrics``: one MetricResult per (step, metric)."""
    from apache_beam.metrics import monitoring_infos as mi
    from apache_beam.metrics.cells import DistributionData
    from apache_beam.portability.api import beam_job_api_pb2
    from apache_beam.runners.portability.portable_runner import PortableMetrics

    infos = [mi.int64_user_distribution("influence", "model_load_ms",
                                        DistributionData(23, 1, 23, 23), ptransform="FitMethod"),
             mi.int64_user_distribution("influence", "model_load_ms",
                                        DistributionData(32, 1, 32, 32), ptransform="Featurize")]

    class Result:
        def metrics(self):
            return PortableMetrics(beam_job_api_pb2.GetJobMetricsResponse(
                metrics=beam_job_api_pb2.MetricResults(committed=infos)))

    d = run_lib._metrics(Result())["distributions"]["model_load_ms"]
    assert (d["count"], d["sum"], d["min"], d["max"]) == (2, 55, 23, 32)
