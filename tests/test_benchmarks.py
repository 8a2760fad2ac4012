"""The benchmark still runs (smoke run, no timing assertions: timings belong to benchmarks/)."""

import os
import re
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


def _mislabel_tables(stdout):
    """{scenario: {row name: cells}} from the tables the benchmark prints after its runs."""
    tables, current = {}, None
    for line in stdout.splitlines():
        if line.startswith("## scenario: "):
            current = tables.setdefault(line.split(": ", 1)[1].strip(), {})
            current.clear()  # the progress header comes first, the table after the runs
            continue
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if current is not None and line.startswith("| ") and len(cells) == 9 \
                and cells[0] != "method":
            current[cells[0]] = cells
    return tables


@pytest.mark.slow
def test_mislabel_quick_runs_both_scenarios_every_row_and_writes_the_page(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    page = tmp_path / "mislabel.html"
    res = subprocess.run([sys.executable, "benchmarks/mislabel.py", "--quick", "--html",
                          str(page)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    tables = _mislabel_tables(res.stdout)
    assert sorted(tables) == ["brief", "memorised"], res.stdout[-3000:]
    names = [c.name for c in _load_benchmark("mislabel").METHODS]
    for scenario, rows in tables.items():
        assert sorted(rows) == sorted(names), (scenario, res.stdout[-3000:])
        assert not [r for r in rows.values() if r[-1].startswith("failed")], res.stdout[-3000:]
        assert float(rows["exact"][5]) > 0.8, (scenario, rows["exact"])  # AUC; random ~0.5
    # memorised: cg / lissa skipped with the reason, TracIn over several checkpoints
    assert tables["memorised"]["cg"][-1].startswith("skipped"), tables["memorised"]["cg"]
    assert "4 checkpoints" in tables["memorised"]["tracin"][-1]
    assert "predicts the flipped label on" in res.stdout
    text = page.read_text()
    assert text.count("<svg") == 2 and text.count("<table") == 2
    assert 'id="brief"' in text and 'id="memorised"' in text
    # self-contained: nothing fetched (the only URLs are the SVG / XLink namespaces)
    assert "src=" not in text and "<link" not in text and "@import" not in text
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", text))
    assert urls <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}, urls


def test_mislabel_single_scenario_flag_is_checked():
    mod = _load_benchmark("mislabel")
    assert set(mod.SCENARIOS) == {"brief", "memorised"}
    with pytest.raises(SystemExit):
        mod.main(["--scenario", "nope"])


def test_mislabel_update_readme_rewrites_only_the_marked_section(tmp_path):
    mod = _load_benchmark("mislabel")
    path = tmp_path / "README.md"
    path.write_text(f"intro\n{mod.BEGIN}\nold table\n{mod.END}\ntail\n")
    mod.update_readme("new table", str(path))
    assert path.read_text() == f"intro\n{mod.BEGIN}\nnew table\n{mod.END}\ntail\n"
    path.write_text("no markers\n")
    with pytest.raises(ValueError, match="no <!-- mislabel:begin -->"):
        mod.update_readme("x", str(path))
