"""The bundled demo and the command line, run for real."""

import os
import subprocess
import sys

import pyarrow.parquet as pq

from pipelines import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_finds_flipped_labels(tmp_path):
    out = str(tmp_path / "demo")
    found, n_flipped = demo.run_demo(out)
    assert n_flipped == 150
    # Issue bar: >= 80% of flipped labels in the top 10% (the seed library's exact
    # self-influence finds ~85% on the same kind of setup; we measure 91.3% at seed 0, 91-94%
    # over seeds 0-2).
    assert found[0.10] >= 0.80, found
    assert found[0.20] >= found[0.10]
    assert pq.read_table(os.path.join(out, "self_influence")).num_rows == 1500
    assert os.path.exists(os.path.join(out, "_SUCCESS"))


def test_cli_reports_bad_options_with_exit_code(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-m", "pipelines.cli", "--train=npz:x.npz",
                          f"--output={tmp_path}/o"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert res.returncode == 2
    assert "missing required options: --model" in res.stderr  # --queries is optional
