# Two commands set up a fresh machine: `make demo` and `make test`. Both build .venv/ first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo audit-demo test test-all bench bench-lds bench-mislabel docs clean

# CPU TensorFlow for CI and laptops (no multi-GB CUDA wheels); the GPU build belongs in the
# worker container (deploy/). The project itself installs without re-resolving its deps.
$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip wheel setuptools >/dev/null
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m pipelines.demo --output out/demo

# Two scheduled audits on the demo data (the second incremental), each with an HTML report.
audit-demo: $(STAMP)
	$(PY) -m pipelines.demo --audit --output out/audit-demo

# Fast suite (well under 15 minutes on 2 cores): everything but tests marked slow.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Everything, including the multi-process / portable-runner end-to-end runs.
test-all: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_gradients.py
	$(PY) benchmarks/lds.py --quick

# Ranking quality against retraining (LDS), full size: ~1.5-3 minutes on 2 cores.
bench-lds: $(STAMP)
	$(PY) benchmarks/lds.py

# Flipped-label detection by every method's self-influence and the baselines, two scenarios
# (brief / memorised), with an HTML page of the tables and detection curves in out/:
# ~1-3 minutes on 2 cores (cg takes about half of it).
bench-mislabel: $(STAMP)
	$(PY) benchmarks/mislabel.py --html out/mislabel.html

docs: $(STAMP)
	$(PY) -m pipelines.options --update-readme > docs/options.md

clean:
	rm -rf $(VENV) out
