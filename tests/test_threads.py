"""``--tf_threads`` takes effect in the workers, not only in the options they receive.

TensorFlow fixes its thread pools when its runtime starts (the first op), so each run is a
fresh CLI process; every worker DoFn reports the intra-op pool its TensorFlow runtime really
uses as the ``tf_intra_op_threads`` distribution (``run_metrics.json``). A value other than
TF's default (0 = all cores) shows that the setting reached the runtime in time. The
multi-process case (workers are separate SDK processes) is in the slow suite.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from pipelines import demo
    d = tmp_path_factory.mktemp("threads")
    x, y, xq, yq, _ = demo.make_data(n_train=200)
    demo.train_model(x, y, epochs=2).save(str(d / "model.keras"))
    np.savez(d / "train.npz", x=x, y=y)
    np.savez(d / "queries.npz", x=xq[:5], y=yq[:5])
    return d


def _run_cli(d, name, *flags):
    out = d / name
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("INFLUENCE_TF_INTRA_THREADS", None)
    res = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", f"--model={d}/model.keras",
         f"--train=npz:{d}/train.npz", f"--queries=npz:{d}/queries.npz", f"--output={out}",
         "--solver=exact", "--block_size=64", *flags],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(out / "run_metrics.json") as f:
        return json.load(f)["distributions"]["tf_intra_op_threads"]


@pytest.mark.parametrize("threads", [1, 3])
def test_tf_threads_in_effect_on_the_default_runner(inputs, threads):
    dist = _run_cli(inputs, f"default_{threads}", f"--tf_threads={threads}")
    assert dist["min"] == dist["max"] == threads, dist
    assert dist["count"] >= 2  # several DoFns reported (fit, featurize, label checks)


@pytest.mark.slow
def test_multi_processing_workers_share_the_cores_by_default(inputs):
    """No --tf_threads: each of the 2 worker processes gets half the cores (the explicit
    setting travels the same way, in the job's config)."""
    dist = _run_cli(inputs, "multi", "--direct_running_mode=multi_processing",
                    "--direct_num_workers=2")
    assert dist["min"] == dist["max"] == max(1, (os.cpu_count() or 1) // 2), dist


def test_the_thread_default_divides_the_cores_among_worker_processes():
    from apache_beam.options.pipeline_options import PipelineOptions
    from pipelines.options import job_config
    base = ["--model=m.keras", "--train=npz:t.npz", "--output=o"]
    mp = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
    assert job_config(PipelineOptions(base)).tf_threads == 0  # one process: all cores
    assert job_config(PipelineOptions(base + mp)).tf_threads == max(1, os.cpu_count() // 2)
    assert job_config(PipelineOptions(base + mp + ["--tf_threads=3"])).tf_threads == 3
