"""The benchmark still runs (smoke run, no timing assertions: timings belong to benchmarks/)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_gradients_quick_runs():
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "benchmarks/bench_gradients.py", "--quick"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "(a) per_example_gradients" in out and "(b) projected_gradients" in out
    assert "fallbacks (pfor while_loop) in (a)/(b)/jvp: none" in out
