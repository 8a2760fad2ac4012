"""Faults, concurrency and numerical safety of the job (issue 10).

* Beam's FnApiRunner (the local runner) does **not** retry a failed bundle: an exception in
  featurize or scoring fails the run. What it must do instead: fail clearly, leave no
  ``_SUCCESS`` and no claim, and a rerun (the retry an operator or a scheduler makes) gives
  the same result as a run that never failed. A retrying runner (Dataflow retries a failed
  bundle, Flink restarts from its last checkpoint) relies on the same property, shown here
  for one DoFn: an attempt after a failed one produces what a fresh attempt produces.
* A process killed between the manifest and the marker leaves no marker.
* Two runs into different outputs at the same time do not interfere; two runs into the same
  output: one wins, the other refuses, and the survivor's result is complete.
* One example with a NaN / infinite loss or gradient features is dead-lettered (stage and
  reason), not the job.
"""

import json
import logging
import os
import subprocess
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines import featurize, run as run_lib, score
from tests.reliability_helpers import (N_QUERY, N_TRAIN, base_args, make_inputs,
                                       subprocess_env)


@pytest.fixture(scope="module")
def inp(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def clean(inp, tmp_path_factory):
    """A run that never failed: the reference result."""
    out = str(tmp_path_factory.mktemp("clean") / "out")
    run_lib.run(base_args(inp, out))
    return out


def tables(out):
    si = pq.read_table(os.path.join(out, "self_influence")).to_pandas()
    topk = pq.read_table(os.path.join(out, "topk")).to_pandas()
    return (si.sort_values("train_id").reset_index(drop=True),
            topk.sort_values(["query_id", "kind", "rank"]).reset_index(drop=True))


def assert_same_result(out, ref):
    (si, topk), (si_ref, topk_ref) = tables(out), tables(ref)
    assert list(si.train_id) == list(si_ref.train_id)
    np.testing.assert_array_equal(si.score.to_numpy(), si_ref.score.to_numpy())
    assert list(topk.train_id) == list(topk_ref.train_id)
    np.testing.assert_array_equal(topk.score.to_numpy(), topk_ref.score.to_numpy())


def finished(out):
    return os.path.exists(os.path.join(out, "_SUCCESS"))


# ---------------------------------------------------------------------- transient faults

@pytest.mark.parametrize("stage", ["featurize", "score"])
def test_a_failed_bundle_fails_the_run_cleanly_and_the_rerun_is_identical(
        inp, clean, tmp_path, monkeypatch, stage):
    cls = featurize._FeaturizeDoFn if stage == "featurize" else score._ScoreDoFn
    real = cls.process
    calls = {"n": 0}

    def flaky(self, element, side):  # the first attempt of the first bundle fails
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionResetError(f"injected transient fault in {stage}")
        yield from real(self, element, side)

    monkeypatch.setattr(cls, "process", flaky)
    out = str(tmp_path / "out")
    with pytest.raises(ConnectionResetError, match=f"injected transient fault in {stage}"):
        run_lib.run(base_args(inp, out))
    assert calls["n"] == 1, "FnApiRunner retried the bundle (the docs say it does not)"
    assert not finished(out) and not os.path.exists(os.path.join(out, "run_manifest.json"))
    assert not os.path.exists(os.path.join(out, "_RUNNING")), "claim left behind"
    # The retry: the same job again (the fault was transient).
    run_lib.run(base_args(inp, out, "--overwrite"))
    assert finished(out)
    assert_same_result(out, clean)


def test_an_attempt_after_a_failed_one_gives_what_a_fresh_attempt_gives(inp, clean,
                                                                        monkeypatch):
    """What a retrying runner relies on: no state of a failed attempt leaks into the next."""
    from apache_beam.options.pipeline_options import PipelineOptions
    from influence_ops import gradients as G
    from pipelines.blocks import Block, FeatureBlock
    from pipelines.options import job_config
    config = job_config(PipelineOptions(base_args(inp, clean)))
    block = Block(np.array([f"train.npz:{i:09d}" for i in range(32)]), inp["x"][:32],
                  inp["y"][:32], None, "train.npz")
    artifact = os.path.join(clean, "artifact")

    def attempt(dofn):
        dofn.setup()
        dofn.start_bundle()
        out = [o for o in dofn.process(block, artifact) if isinstance(o, FeatureBlock)]
        dofn.finish_bundle()
        return out[0]

    retried = featurize._FeaturizeDoFn(config, "train")
    real = G.predicted_labels   # runs after the block's gradients: a failure mid-block
    state = {"failed": False}

    def fail_once(*a, **k):
        if not state["failed"]:
            state["failed"] = True
            raise MemoryError("injected: worker ran out of memory mid-bundle")
        return real(*a, **k)
    monkeypatch.setattr(G, "predicted_labels", fail_once)
    with pytest.raises(MemoryError):
        attempt(retried)
    second = attempt(retried)
    fresh = attempt(featurize._FeaturizeDoFn(config, "train"))
    for name in ("ids", "features", "self_scores", "losses", "labels"):
        np.testing.assert_array_equal(getattr(second, name), getattr(fresh, name))
    # Scoring is a pure function of its inputs: twice the same block, the same output.
    q = FeatureBlock(np.array(["q0", "q1"]), np.ones((2, fresh.features.shape[1])),
                     np.array(["0", "1"]))
    dofn = score._ScoreDoFn(3, False, False)
    a, b = list(dofn.process(fresh, [q])), list(dofn.process(fresh, [q]))
    assert a[0].extract()["pro_ids"].tolist() == b[0].extract()["pro_ids"].tolist()


# --------------------------------------------------------- kill between manifest and marker

KILL_SCRIPT = textwrap.dedent("""
    import os, sys
    from pipelines import finalize, run
    def killed(output):  # the process dies after the manifest, before the marker
        os._exit(137)
    finalize.write_marker = killed
    run.run(sys.argv[1:])
""")


def test_a_kill_between_manifest_and_marker_leaves_no_marker(inp, tmp_path):
    env, python = subprocess_env()
    out = str(tmp_path / "out")
    proc = subprocess.run([python, "-c", KILL_SCRIPT] + base_args(inp, out), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 137, proc.stderr[-2000:]
    manifest = json.load(open(os.path.join(out, "run_manifest.json")))
    assert manifest["problems"] == []
    assert not finished(out)
    assert os.path.exists(os.path.join(out, "_RUNNING"))  # the dead run's claim
    # A reader without the marker sees no result; a rerun refuses to mix into it, then
    # replaces it with --overwrite (taking over the dead process's claim).
    with pytest.raises(run_lib.RunError, match="already holds a partial result"):
        run_lib.run(base_args(inp, out))
    run_lib.run(base_args(inp, out, "--overwrite"))
    assert finished(out) and not os.path.exists(os.path.join(out, "_RUNNING"))


# ------------------------------------------------------------------------------ concurrency

def _launch(args):
    env, python = subprocess_env()
    return subprocess.Popen([python, "-m", "pipelines.cli"] + args, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_runs_into_different_outputs_do_not_interfere(inp, clean, tmp_path):
    outs = [str(tmp_path / "a"), str(tmp_path / "b")]
    procs = [_launch(base_args(inp, o)) for o in outs]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
    for o in outs:
        assert finished(o)
        assert_same_result(o, clean)


def test_two_runs_into_the_same_output_one_wins_the_other_refuses(inp, clean, tmp_path):
    out = str(tmp_path / "same")
    procs = [_launch(base_args(inp, out)) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [e[-1500:] for _, e in results]
    loser = results[[p.returncode for p in procs].index(2)][1]
    refusal = [ln for ln in loser.splitlines() if ln.startswith("beam-influence: error")]
    assert len(refusal) == 1 and ("is being written by another run" in refusal[0]
                                  or "already holds a finished result" in refusal[0])
    assert finished(out) and not os.path.exists(os.path.join(out, "_RUNNING"))
    manifest = json.load(open(os.path.join(out, "run_manifest.json")))
    assert manifest["problems"] == []
    assert manifest["counters"]["train_examples_scored"] == N_TRAIN
    assert_same_result(out, clean)


def test_the_claim_is_exclusive_and_released(tmp_path, caplog):
    out = str(tmp_path / "o")
    run_id = run_lib.claim_output(out)
    with pytest.raises(run_lib.RunError, match="is being written by another run"):
        run_lib.claim_output(out)
    from pipelines.finalize import release_claim
    release_claim(out, "someone-else")  # never another run's claim
    assert os.path.exists(os.path.join(out, "_RUNNING"))
    release_claim(out, run_id)
    assert not os.path.exists(os.path.join(out, "_RUNNING"))
    # A claim left by a dead process on this host is taken over, with a warning.
    dead = subprocess.Popen(["true"])
    dead.wait()
    import socket
    with open(os.path.join(out, "_RUNNING"), "w") as f:
        json.dump({"run_id": "old", "host": socket.gethostname(), "pid": dead.pid}, f)
    with caplog.at_level(logging.WARNING):
        run_lib.claim_output(out)
    assert "no longer running" in caplog.text
    # Another host's claim (or a detached Dataflow launch) is never taken over.
    with open(os.path.join(out, "_RUNNING"), "w") as f:
        json.dump({"run_id": "x", "host": "elsewhere", "pid": 1}, f)
    with pytest.raises(run_lib.RunError, match="on elsewhere"):
        run_lib.claim_output(out)


def test_gcs_claim_uses_a_generation_precondition(monkeypatch):
    """On gs:// the claim is one upload with ifGenerationMatch=0: GCS refuses it when the
    object exists. (The local GCS emulator of tests/test_gcs.py ignores preconditions, so
    this checks the call against a stand-in bucket.)"""
    from google.api_core import exceptions as gexc
    from influence_ops import storage
    objects = {}

    class Blob:
        def __init__(self, key):
            self.key = key

        def upload_from_string(self, data, if_generation_match=None):
            if if_generation_match == 0 and self.key in objects:
                raise gexc.PreconditionFailed("exists")
            objects[self.key] = data

    class Client:
        def bucket(self, name):
            return type("B", (), {"blob": lambda self, k: Blob(k)})()

    monkeypatch.setattr(storage, "_gcs_client", lambda: Client())
    assert storage.create_exclusive("gs://b/out/_RUNNING", b"1") is True
    assert storage.create_exclusive("gs://b/out/_RUNNING", b"2") is False
    assert objects["out/_RUNNING"] == b"1"


# ------------------------------------------------------------------------ numerical safety

@pytest.mark.parametrize("scale,stage,reason", [
    (3e38, "check", "non-finite loss"),                  # NaN loss: rejected before the fit
    (1e38, "featurize", "non-finite gradient features"),  # finite loss, features overflow
])
def test_an_example_that_overflows_the_model_is_dead_lettered_not_the_job(
        inp, tmp_path, scale, stage, reason):
    x = inp["x"].copy()
    x[17] *= scale  # finite inputs; the model's activations overflow float32
    np.savez(tmp_path / "t.npz", x=x, y=inp["y"])
    out = str(tmp_path / "out")
    m = run_lib.run(base_args(inp, out, "--max_bad_fraction=0.01",
                              train=f"npz:{tmp_path}/t.npz"))
    dead = pq.read_table(os.path.join(out, "dead_letter")).to_pandas()
    assert list(dead.example_id) == ["t.npz:000000017"]
    assert list(dead.stage) == [stage] and reason in dead.error[0]
    assert m["row_counts"]["self_influence"] == N_TRAIN - 1
    si = pq.read_table(os.path.join(out, "self_influence")).to_pandas()
    assert np.isfinite(si.score).all()
    assert np.isfinite(pq.read_table(os.path.join(out, "topk")).to_pandas().score).all()


def test_non_finite_gradient_features_are_dead_lettered_at_featurize(inp, tmp_path,
                                                                      monkeypatch):
    from influence_ops.methods.influence import FirstOrderInfluence
    real = FirstOrderInfluence.featurize_train
    target = inp["x"][33]

    def nan_for_one(self, x, y):
        phi, psi, self_scores = real(self, x, y)
        hit = np.all(np.asarray(x) == target, axis=1)
        phi, self_scores = phi.copy(), np.array(self_scores, dtype=np.float64)
        phi[hit] = np.inf
        self_scores[hit] = np.nan
        return phi, psi, self_scores

    monkeypatch.setattr(FirstOrderInfluence, "featurize_train", nan_for_one)
    out = str(tmp_path / "out")
    m = run_lib.run(base_args(inp, out, "--max_bad_fraction=0.01"))
    dead = pq.read_table(os.path.join(out, "dead_letter")).to_pandas()
    assert list(dead.example_id) == ["train.npz:000000033"]
    assert list(dead.stage) == ["featurize"] and "non-finite gradient" in dead.error[0]
    assert m["counters"]["train_examples_scored"] == N_TRAIN - 1
    assert m["counters"]["examples_dead_lettered"] == 1
    topk = pq.read_table(os.path.join(out, "topk")).to_pandas()
    assert np.isfinite(topk.score).all() and len(topk) == N_QUERY * 2 * 10


def test_kept_negative_eigenvalues_warn_with_the_policy(caplog):
    from influence_ops.solvers import select_eigenpairs
    with caplog.at_level(logging.WARNING, logger="influence_ops.solvers"):
        inv = select_eigenpairs(np.array([3.0, -1.0, 2.0]), np.eye(3))
    assert (inv.lam < 0).any()
    assert "--negative_eigenvalues=keep" in caplog.text and "1 of the 3" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="influence_ops.solvers"):
        select_eigenpairs(np.array([3.0, -1.0, 2.0]), np.eye(3), negative="drop")
    assert "indefinite" not in caplog.text


@pytest.mark.slow
def test_a_killed_multi_processing_worker_fails_clearly_without_a_marker(tmp_path):
    """An SDK worker process dies mid-featurize (os._exit, as an OOM kill would): the job
    either completes or fails clearly; it never leaves a partial result with _SUCCESS, and it
    does not hang (a hang fails this test by its timeout)."""
    import subprocess
    import sys
    from pipelines import demo
    x, y, xq, yq, _ = demo.make_data(n_train=200)
    demo.train_model(x, y, epochs=2).save(str(tmp_path / "model.keras"))
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez(tmp_path / "queries.npz", x=xq[:5], y=yq[:5])
    out = tmp_path / "out"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import os, sys; os.environ['INFLUENCE_TEST_DRIVER_PID'] = str(os.getpid()); "
            "from pipelines import cli; sys.exit(cli.main(sys.argv[1:]))")
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        res = subprocess.run(
            [sys.executable, "-c", code, f"--model={tmp_path}/model.keras",
             f"--train=npz:{tmp_path}/train.npz", f"--queries=npz:{tmp_path}/queries.npz",
             f"--output={out}", "--method=test_worker_killer", "--plugins=tests.killer_plugin",
             "--block_size=50", "--direct_running_mode=multi_processing",
             "--direct_num_workers=2"],
            capture_output=True, text=True, env=env, cwd=root, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("the job hung after its worker was killed")
    if res.returncode == 0:  # the runner recovered: the result must be whole
        assert (out / "_SUCCESS").exists()
        assert pq.read_table(str(out / "self_influence")).num_rows == 200
    else:
        assert not (out / "_SUCCESS").exists(), res.stderr[-2000:]
        # One line that says what happened (exit 2: a known cause), not "unexpected error".
        assert res.returncode == 2, res.stderr[-2000:]
        assert "a worker process died during the run" in res.stderr, res.stderr[-2000:]
        assert not (out / "_RUNNING").exists()  # the output claim is released
