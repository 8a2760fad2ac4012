"""Small problems fast: the digits-sized exact case as a library call and as a whole CLI run.

Setup: scikit-learn's digits (shipped with the package, no download), 1,200 training and 100
query examples, a Keras MLP 64 -> 32 relu -> 10 logits (float32) trained briefly and saved;
the target is its last layer (d = 330), exact influence with ``l2 = 1e-3``.

1. **Library call**, in this process, after ``keras.models.load_model``: a fresh
   ``InfluenceCalculator(model, method="influence", solver="exact")``, ``fit`` on the training
   set, ``influence`` of the queries on it ((100, 1,200) scores). ``first`` is the first call
   on a freshly loaded model (whatever tracing or warm-up it needs is included), ``again`` a
   fresh calculator on the same model (median of ``--repeats``). Baseline in the same process:
   the same computation written directly in numpy float64 (features of the frozen part, the
   closed-form Hessian, a solve, the scores), so the ratio is the library's overhead over the
   arithmetic. Target (issue): <= 0.25 s.
2. **CLI run** against **imports alone**, each in a fresh subprocess, round-robin, medians of
   ``--repeats``: ``python -c "import tensorflow, apache_beam, keras"`` and ``beam-influence``
   (``python -m pipelines.cli``) with the same model and data as ``.npz`` files, exact
   influence, top-k and self-influence written to Parquet on the default in-process runner.
   Target (issue): CLI / imports <= 1.3. The CLI imports with Python's cyclic garbage
   collector paused (``pipelines.cli``: its full passes over the growing heap are ~0.9 s of
   the plain import), so a third command, the same imports with the collector paused
   (``gc.disable()`` first), gives the stricter ratio: what the job itself adds to the start.

Absolute times on a shared 2-core machine are noise; compare within one run. Always exits 0.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_small.py [--repeats 3] [--skip-cli]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

N_TRAIN, N_QUERY, L2 = 1200, 100, 1e-3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_problem(workdir: str):
    """Writes ``model.keras``, ``train.npz`` and ``queries.npz``; returns the arrays."""
    from sklearn.datasets import load_digits
    from influence_ops import tf_setup
    tf_setup.tensorflow()
    import keras
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    xt, yt, xq, yq = x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:N_TRAIN + N_QUERY], \
        y[N_TRAIN:N_TRAIN + N_QUERY]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)),
                              keras.layers.Dense(32, activation="relu", name="hidden"),
                              keras.layers.Dense(10, name="logits")])
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(xt, yt, epochs=20, batch_size=64, verbose=0)
    model.save(os.path.join(workdir, "model.keras"))
    np.savez(os.path.join(workdir, "train.npz"), x=xt, y=yt)
    np.savez(os.path.join(workdir, "queries.npz"), x=xq, y=yq)
    return xt, yt, xq, yq


def numpy_reference(model, xt, yt, xq, yq):
    """Exact influence of the last layer written directly in numpy float64: the arithmetic
    the library call cannot avoid."""
    hidden, last = model.layers
    W1, b1 = (np.asarray(v, np.float64) for v in hidden.get_weights())
    W2, b2 = (np.asarray(v, np.float64) for v in last.get_weights())

    def parts(x, y):
        h = np.maximum(x @ W1 + b1, 0)
        h = np.c_[h, np.ones(len(h))]
        z = h @ np.vstack([W2, b2])
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return h, p, p - np.eye(p.shape[1])[y]

    h, p, r = parts(xt, yt)
    n, a1 = h.shape
    C = p.shape[1]
    B = (h[:, :, None] * p[:, None, :]).reshape(n, -1)
    H = -(B.T @ B)
    view = H.reshape(a1, C, a1, C)
    for c in range(C):
        view[:, c, :, c] += (h * p[:, c:c + 1]).T @ h
    H = H / n + L2 * np.eye(a1 * C)
    G = (h[:, :, None] * r[:, None, :]).reshape(n, -1)
    hq, _, rq = parts(xq, yq)
    Gq = (hq[:, :, None] * rq[:, None, :]).reshape(len(hq), -1)
    return Gq @ np.linalg.solve(H, G.T)


def time_library(workdir, xt, yt, xq, yq, repeats):
    from influence_ops import InfluenceCalculator
    import keras
    model = keras.models.load_model(os.path.join(workdir, "model.keras"))

    def call():
        calc = InfluenceCalculator(model, method="influence", solver="exact", l2=L2)
        calc.fit((xt, yt))
        return calc.influence((xq, yq), (xt, yt))

    t0 = time.perf_counter()
    scores = call()
    first = time.perf_counter() - t0
    again, ref_t = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        again.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref = numpy_reference(model, xt, yt, xq, yq)
        ref_t.append(time.perf_counter() - t0)
    err = np.abs(scores - ref).max() / np.abs(ref).max()
    return first, float(np.median(again)), float(np.median(ref_t)), err


def _run(cmd):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed: {proc.stderr[-2000:]}")
    return took


def time_cli(workdir, repeats):
    imports = [sys.executable, "-c", "import tensorflow, apache_beam, keras"]
    paused = [sys.executable, "-c",
              "import gc; gc.disable(); import tensorflow, apache_beam, keras"]
    cli = [sys.executable, "-m", "pipelines.cli", f"--model={workdir}/model.keras",
           f"--train=npz:{workdir}/train.npz", f"--queries=npz:{workdir}/queries.npz",
           f"--output={workdir}/out", "--overwrite", "--method=influence", "--solver=exact",
           f"--l2={L2}"]
    t_imp, t_paused, t_cli = [], [], []
    for _ in range(repeats):
        t_imp.append(_run(imports))
        t_paused.append(_run(paused))
        t_cli.append(_run(cli))
    return float(np.median(t_imp)), float(np.median(t_paused)), float(np.median(t_cli))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-cli", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        xt, yt, xq, yq = make_problem(workdir)
        first, again, ref, err = time_library(workdir, xt, yt, xq, yq, args.repeats)
        print(f"library call, exact, {N_TRAIN} x 330, {N_QUERY} queries: first {first:.3f} s, "
              f"again {again:.3f} s (target <= 0.25 s: "
              f"{'PASS' if first <= 0.25 else 'MISS'}); numpy float64 reference {ref:.3f} s "
              f"(library / reference, again: {again / ref:.1f}x); max relative difference "
              f"of the scores {err:.1e}")
        if not args.skip_cli:
            imp, paused, cli = time_cli(workdir, args.repeats)
            print(f"CLI run {cli:.2f} s, imports alone {imp:.2f} s: ratio {cli / imp:.2f} "
                  f"(target <= 1.3: {'PASS' if cli / imp <= 1.3 else 'MISS'}); imports with "
                  f"the collector paused {paused:.2f} s: ratio {cli / paused:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
