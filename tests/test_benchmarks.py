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


def _load_benchmark(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                  os.path.join(ROOT, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _lds_method_names():
    return [c.name for c in _load_benchmark("lds").METHODS]


@pytest.mark.slow
def test_lds_quick_runs_and_exact_ranks_like_retraining():
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "benchmarks/lds.py", "--quick"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {}
    for line in res.stdout.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if line.startswith("| ") and len(cells) >= 8:
            rows[cells[0]] = cells
    missing = [name for name in _lds_method_names() if name not in rows]
    assert not missing, f"no table row for {missing}:\n{res.stdout[-3000:]}"
    assert float(rows["exact"][1]) > 0.5, rows["exact"]
    assert not [r for r in rows.values() if r[-1].startswith("error")], res.stdout[-3000:]


@pytest.mark.slow
def test_mislabel_quick_runs_every_row_and_plots(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    svg = tmp_path / "curves.svg"
    res = subprocess.run([sys.executable, "benchmarks/mislabel.py", "--quick", "--plot",
                          str(svg)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {}
    for line in res.stdout.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if line.startswith("| ") and len(cells) == 9 and cells[0] != "method":
            rows[cells[0]] = cells
    names = [c.name for c in _load_benchmark("mislabel").METHODS]
    assert sorted(rows) == sorted(names), res.stdout[-3000:]
    assert not [r for r in rows.values() if r[-1].startswith("failed")], res.stdout[-3000:]
    assert float(rows["exact"][5]) > 0.8, rows["exact"]          # AUC; random is ~0.5
    assert "<svg" in svg.read_text()


def test_mislabel_update_readme_rewrites_only_the_marked_section(tmp_path):
    mod = _load_benchmark("mislabel")
    path = tmp_path / "README.md"
    path.write_text(f"intro\n{mod.BEGIN}\nold table\n{mod.END}\ntail\n")
    mod.update_readme("new table", str(path))
    assert path.read_text() == f"intro\n{mod.BEGIN}\nnew table\n{mod.END}\ntail\n"
    path.write_text("no markers\n")
    with pytest.raises(ValueError, match="no <!-- mislabel:begin -->"):
        mod.update_readme("x", str(path))
