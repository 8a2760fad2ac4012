"""The bundled demo and the command line, run for real."""

import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

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


@pytest.mark.slow
def test_audit_demo_second_run_is_incremental_and_finds_flipped_labels(tmp_path, capsys):
    """make audit-demo: day 1-2 audited, day 3 arrives; the second audit reuses the fitted
    method, scores only day 3, and its ranking puts >= 85% of the flipped labels in its top
    10% (91.3% measured, as the plain demo)."""
    import json
    assert demo.main(["--audit", "--output", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "1500 training examples ranked (500 scored now, 1000 carried over)" in printed
    assert "fitted method reused" in printed
    share = float(printed.rsplit("top 10% of the audit: ", 1)[1].split("%")[0])
    assert share >= 85.0, printed
    latest = json.loads((tmp_path / "a" / "audits" / "LATEST").read_text())
    run = tmp_path / "a" / "audits" / "runs" / latest["run_id"] / latest["attempt"]
    assert (run / "report" / "index.html").exists() and (run / "_SUCCESS").exists()
