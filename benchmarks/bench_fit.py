"""Cost of the fit (reduce) step: Hessian-vector products on cached front activations.

The benchmark CNN of the scale issue (32x32x3 images: conv, conv, pool, dense, dense; target =
the last two layers). Printed ratios, all measured in this process:

(a) one HVP on raw inputs (frozen layers recomputed) / one HVP on cached activations
(b) Arnoldi with n iterations / n HVPs on cached activations             target <= 1.2x
(c) the whole Arnoldi fit (front pass + n HVPs + eigensolve) / one forward+backward of the
    whole model over the sample                                          target <= 20x

Usage: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_fit.py [--quick] [--n 50000]``.
Always exits 0; absolute times on shared machines are noise, compare the ratios.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from influence_ops import tf_setup

tf = tf_setup.tensorflow()
import keras  # noqa: E402

from influence_ops import InfluenceModel, solvers  # noqa: E402
from influence_ops import gradients as grads  # noqa: E402
from influence_ops.config import InfluenceConfig  # noqa: E402
from influence_ops.curvature.eigen import ArnoldiCurvature  # noqa: E402


def forward_backward_seconds(model, x, y, batch: int = 512) -> float:
    """One batched forward+backward of the whole model's mean loss over ``(x, y)`` (traced
    first, then timed once): the baseline every ratio of these benchmarks divides by."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function(reduce_retracing=True)
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=False))
        return tape.gradient(loss, model.trainable_variables)

    def once():
        for s in range(0, len(x), batch):
            step(x[s:s + batch], y[s:s + batch])
    once()
    t = time.perf_counter()
    once()
    return time.perf_counter() - t


def cnn():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.MaxPooling2D(4),
        keras.layers.Flatten(),
        keras.layers.Dense(16, activation="relu", name="feat"),
        keras.layers.Dense(10, name="out"),
    ])


def timed(fn, repeats=3):
    best = float("inf")
    out = None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="2,000 examples, 8 iterations")
    ap.add_argument("--n", type=int, default=20000, help="fit sample size")
    ap.add_argument("--iters", type=int, default=32, help="Arnoldi iterations")
    args = ap.parse_args(argv)
    n, iters = (2000, 8) if args.quick else (args.n, args.iters)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, n)
    model = cnn()
    im = InfluenceModel(model, target_layers=2)
    print(f"threads in effect: {tf_setup.threads_in_effect()}; n={n}, d={im.n_params}, "
          f"Arnoldi iterations={iters}")

    t_fb = forward_backward_seconds(model, x, y)

    v = rng.normal(size=(1, im.n_params)).astype(np.float32)
    acts = grads.front_activations(im, x)
    grads.hessian_vector_products(im, x[:64], y[:64], v)     # trace both paths
    grads.hessian_vector_products(im, acts[:64], y[:64], v)
    t_raw, h_raw = timed(lambda: grads.hessian_vector_products(im, x, y, v), 1)
    t_cached, h_cached = timed(lambda: grads.hessian_vector_products(im, acts, y, v))
    assert np.allclose(h_raw, h_cached, rtol=1e-4, atol=1e-6 * np.abs(h_raw).max())

    hvp = lambda V: grads.hessian_vector_products(im, acts, y, V)  # noqa: E731
    t_arnoldi_only, _ = timed(lambda: solvers.arnoldi(hvp, im.n_params, iters, iters), 1)

    cfg = InfluenceConfig(rank=iters, arnoldi_iter=iters)
    t_fit, _ = timed(lambda: ArnoldiCurvature(im, cfg).fit(x, y), 1)

    rows = [
        ("(a) HVP raw inputs / HVP cached activations", t_raw / t_cached, None),
        ("(b) Arnoldi (n iterations) / n cached HVPs", t_arnoldi_only / (iters * t_cached), 1.2),
        ("(c) whole Arnoldi fit / one forward+backward over the sample", t_fit / t_fb, 20.0),
    ]
    print(f"\nforward+backward over the sample {t_fb:.2f}s; one HVP raw {t_raw:.2f}s, "
          f"cached {t_cached:.3f}s; Arnoldi {t_arnoldi_only:.2f}s; whole fit {t_fit:.2f}s\n")
    print("| ratio | measured | target |")
    print("|---|---|---|")
    for name, r, target in rows:
        verdict = "" if target is None else (" PASS" if r <= target else " MISS")
        print(f"| {name} | {r:.2f}x | {'-' if target is None else f'<= {target}x'}{verdict} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
