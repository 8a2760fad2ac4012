"""Cost of the leave-one-out correction against first-order influence, per training example.

For each case the fitted method featurizes the same training rows twice, as the pipeline's
featurize step does (``featurize_train``: train features, query features on itself and
self-influence in one pass), once with ``correction="none"`` and once with
``correction="loo"`` (the C x C Woodbury step per example on top of the same projection, with
the C columns of each example's Hessian factor projected in the same fused pass). Printed:
the median seconds of each over ``--repeats`` round-robin runs and their ratio (target: <= 2).
Only the ratio from one process means anything on a shared machine; the script always exits 0.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_loo.py            # all cases
    PYTHONPATH=. .venv/bin/python benchmarks/bench_loo.py --quick    # smaller n, 2 repeats
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _mlp(n_in, hidden, classes, seed=0):
    import keras
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((n_in,)),
                             keras.layers.Dense(hidden, activation="relu", name="hidden"),
                             keras.layers.Dense(classes, name="logits")])


def cases(quick: bool):
    """``(name, model, x, y, calculator options)``; data are random (timing only)."""
    rng = np.random.default_rng(0)
    n = 1024 if quick else 4096
    out = []
    for name, (n_in, hidden, classes), opts in [
        ("exact, digits MLP last layer (d=330, C=10)", (64, 32, 10), dict(solver="exact")),
        ("exact, last layer d=2570, C=10", (784, 256, 10), dict(solver="exact")),
        ("arnoldi k=32, last layer d=2570, C=10", (784, 256, 10),
         dict(solver="arnoldi", rank=32, arnoldi_iter=48)),
        ("arnoldi k=32, two layers d=101770, C=10", (784, 128, 10),
         dict(solver="arnoldi", rank=32, arnoldi_iter=48, target_layers=2)),
    ]:
        x = rng.normal(size=(n, n_in)).astype(np.float32)
        y = rng.integers(0, classes, n)
        out.append((name, _mlp(n_in, hidden, classes), x, y, opts))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 3)
    from influence_ops import InfluenceCalculator
    print(f"| case | n | first order (s) | loo-corrected (s) | ratio |")
    print("|---|---|---|---|---|")
    for name, model, x, y, opts in cases(args.quick):
        calc = InfluenceCalculator(model, l2=1e-3, batch_size=256, **opts).fit((x, y))
        m = calc.method
        times = {"none": [], "loo": []}
        for c in times:  # warm-up: traces the compiled functions
            with m.corrected(c):
                m.featurize_train(x[:256], y[:256])
        for _ in range(repeats):
            for c in times:
                with m.corrected(c):
                    t0 = time.perf_counter()
                    m.featurize_train(x, y)
                    times[c].append(time.perf_counter() - t0)
        t1, t2 = np.median(times["none"]), np.median(times["loo"])
        print(f"| {name} | {len(x)} | {t1:.3f} | {t2:.3f} | {t2 / t1:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
