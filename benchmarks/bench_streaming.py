"""Peak memory of the notebook API over a generator-backed tf.data.Dataset: independent of n?

For each size n (50,000 and 200,000 by default) a fresh Python process builds a small float32
MLP (32 inputs, 64 tanh hidden units, 10 classes; influence on the last layer, d = 650, exact
curvature), a ``tf.data.Dataset.from_generator`` that synthesises the n training rows batch by
batch (seeded per batch, never held whole), fits on a reservoir sample of ``--fit-sample`` rows,
and runs through ``InfluenceCalculator``:

  self_influence(train_ds)                       (n,) scores, streamed per batch
  top_k(queries, train_ds, k=10, return_examples=True) for 100 queries

It reports the process's peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) after the
fit and at the end, and the wall time of each step. The parent prints the ratio of the peaks
(largest n / smallest n); the target is <= 1.2 (memory independent of n: the only O(n)
array is the (n,) self-influence result, 1.6 MB at n = 200,000).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_streaming.py            # 50k and 200k
    PYTHONPATH=. .venv/bin/python benchmarks/bench_streaming.py --quick    # 5k and 20k
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

P, HIDDEN, CLASSES, BATCH, QUERIES = 32, 64, 10, 1024, 100


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def child(n: int, fit_sample: int) -> dict:
    import numpy as np
    from influence_ops import tf_setup
    tf = tf_setup.tensorflow()
    import keras
    from influence_ops import InfluenceCalculator

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((P,)), keras.layers.Dense(HIDDEN, activation="tanh"),
                              keras.layers.Dense(CLASSES, name="out")])
    centers = np.random.default_rng(123).normal(scale=2.0, size=(CLASSES, P)).astype(np.float32)

    def batch(i, size):
        rng = np.random.default_rng(1000 + i)
        y = rng.integers(0, CLASSES, size)
        return centers[y] + rng.normal(size=(size, P)).astype(np.float32), y.astype(np.int64)

    def gen():
        for i, start in enumerate(range(0, n, BATCH)):
            yield batch(i, min(BATCH, n - start))

    sig = (tf.TensorSpec((None, P), tf.float32), tf.TensorSpec((None,), tf.int64))
    train = tf.data.Dataset.from_generator(gen, output_signature=sig)
    queries = batch(10 ** 6, QUERIES)
    out = {"n": n}
    t = time.perf_counter()
    calc = InfluenceCalculator(model, solver="exact", damping=1e-3, fit_sample_size=fit_sample)
    calc.fit(train)
    out["fit_s"] = time.perf_counter() - t
    out["rss_after_fit_mb"] = peak_rss_mb()
    t = time.perf_counter()
    s = calc.self_influence(train)
    out["self_s"] = time.perf_counter() - t
    assert s.shape == (n,) and np.isfinite(s).all()
    t = time.perf_counter()
    top = calc.top_k(queries, train, k=10, return_examples=True)
    out["topk_s"] = time.perf_counter() - t
    assert top["pro_x"].shape == (QUERIES, 10, P)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="50000,200000")
    ap.add_argument("--fit-sample", type=int, default=5000)
    ap.add_argument("--quick", action="store_true", help="sizes 5000,20000")
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.fit_sample)))
        return
    sizes = [5000, 20000] if args.quick else [int(s) for s in args.sizes.split(",")]
    rows = []
    for n in sizes:
        res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(n),
                              "--fit-sample", str(args.fit_sample)], capture_output=True,
                             text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        if res.returncode != 0:
            sys.stderr.write(res.stderr[-3000:])
            sys.exit(1)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(f"{'n':>9} {'fit s':>7} {'self s':>7} {'top-k s':>8} {'RSS after fit MB':>17} "
          f"{'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['n']:>9} {r['fit_s']:>7.1f} {r['self_s']:>7.1f} {r['topk_s']:>8.1f} "
              f"{r['rss_after_fit_mb']:>17.0f} {r['peak_rss_mb']:>12.0f}")
    ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    print(f"peak RSS ratio n={rows[-1]['n']} / n={rows[0]['n']}: {ratio:.3f} (target <= 1.2)")


if __name__ == "__main__":
    main()
