"""Cost of per-example gradient features relative to what the hardware must spend anyway.

Every influence method starts from per-example gradients g_i = d loss(z_i) / d theta over the
target weights theta (d parameters), either materialised ``(n, d)`` or projected to ``(n, k)``.
This script times the influence_ops entry points on one batch and divides by a baseline that
any implementation has to pay:

(a) ``per_example_gradients(imodel, x, y)`` / T_fb, where T_fb is ONE plain batched
    forward+backward of the same batch (a warmed-up tf.function: the whole model forward,
    front part included, and a GradientTape over the mean loss w.r.t. ``imodel._tf_vars``).
    Per-example gradients need at least the forward pass and the per-example backward signals;
    a batched backward computes exactly those and only sums them at the end. Target <= 5x.
(b) ``projected_gradients(imodel, x, y, P)``, P float32 ``(d, 32)``, / (T_fb + T_mm), where T_mm
    is one float32 numpy ``(batch, d) @ (d, 32)`` matmul: the cost of projecting gradients that
    were already there. Target <= 2x.

Extra rows: forward-mode ``directional_derivatives(imodel, x, y, P.T)`` against the (b) baseline;
a naive ``GradientTape.jacobian`` of the per-example loss vector (run once, on --jac-batch rows,
against T_fb of that batch size); the in-graph part of (a) without the copy to numpy; and, as
the memory floor of (a), the time to write a fresh float32 (B, d) array (any implementation that
returns materialised gradients must write those 4*B*d bytes at least once).

Models: "dense" = Input(784) -> Dense(128, relu) -> Dense(10), both layers targeted (d = 101,770);
"cnn" = 28x28x1 -> Conv2D(16,3) -> MaxPool -> Conv2D(32,3) -> MaxPool -> Flatten -> Dense(120)
-> Dense(10), ALL four layers with weights targeted (d = 102,130). Both front parts are empty
(the first target layer is the first layer), so T_fb and (a) run the same layers.

Compile/tracing is excluded (every function is called twice before timing); each time is the
median of --repeats runs, taken round-robin over all functions of a model so that load from other
processes hits numerators and baselines alike (the cheap baselines get 3 samples per round).
Only ratios from one process are meaningful. Targets are informational: always exits 0.
Usage: PYTHONPATH=. python benchmarks/bench_gradients.py [--batch 256] [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time

import numpy as np

# TF thread pools are set by influence_ops.tf_setup (INFLUENCE_TF_INTRA_THREADS /
# INFLUENCE_TF_INTER_THREADS) and must be configured before anything else imports TF/Keras.
from influence_ops import tf_setup  # noqa: E402

tf = tf_setup.tensorflow()
import keras  # noqa: E402

from influence_ops import gradients as G  # noqa: E402
from influence_ops.model import InfluenceModel  # noqa: E402

K_PROJ = 32


class _Fallbacks(logging.Handler):
    """Collects pfor 'uses a while_loop' warnings (ops that vectorized_map could not batch)."""

    def __init__(self):
        super().__init__()
        self.msgs = []

    def emit(self, record):
        msg = record.getMessage()
        if "while_loop" in msg or "fallback" in msg.lower():
            self.msgs.append(msg)


def build_model(name: str):
    keras.utils.set_random_seed(0)
    L = keras.layers
    if name == "dense":
        m = keras.Sequential([keras.Input((784,)), L.Dense(128, activation="relu"), L.Dense(10)])
        return m, 2, (784,)
    m = keras.Sequential([keras.Input((28, 28, 1)),
                          L.Conv2D(16, 3, activation="relu"), L.MaxPooling2D(),
                          L.Conv2D(32, 3, activation="relu"), L.MaxPooling2D(), L.Flatten(),
                          L.Dense(120, activation="relu"), L.Dense(10)])
    return m, 4, (28, 28, 1)


def median_ms(fn, repeats: int, warmup: int = 2) -> np.ndarray:
    return median_ms_interleaved({"f": fn}, repeats, warmup)["f"]


def median_ms_interleaved(fns: dict, repeats: int, warmup: int = 2, cheap=()) -> dict:
    """``[median, min]`` ms per callable, timed round-robin so that load from other processes
    hits numerators and baselines alike. ``cheap`` ones get 3 samples per round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            for _ in range(3 if k in cheap else 1):
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * np.array([statistics.median(v), min(v)]) for k, v in times.items()}


def make_fwd_bwd(imodel: InfluenceModel):
    """The baseline: one plain batched forward (whole model) + backward to the target vars."""
    @tf.function(reduce_retracing=True)
    def fn(x, y):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(imodel._tf_vars)
            loss = tf.reduce_mean(imodel.per_example_loss(y, imodel.model(x, training=False)))
        grads = tape.gradient(loss, imodel._tf_vars,
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return imodel.flatten(grads)
    return lambda x, y: fn(x, y).numpy()


def make_jacobian(imodel: InfluenceModel):
    """Naive: jacobian (pfor over the rows) of the per-example loss vector, whole model taped."""
    @tf.function(reduce_retracing=True)
    def fn(x, y):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(imodel._tf_vars)
            losses = imodel.per_example_loss(y, imodel.model(x, training=False))
        jac = tape.jacobian(losses, imodel._tf_vars,
                            unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return tf.concat([tf.reshape(j, [tf.shape(x)[0], -1]) for j in jac], axis=1)
    return lambda x, y: fn(x, y).numpy()


def bench_model(name: str, args, fallbacks: _Fallbacks) -> list:
    keras_model, n_target, in_shape = build_model(name)
    imodel = InfluenceModel(keras_model, target_layers=n_target,
                            loss="sparse_categorical_crossentropy")
    d, B, R = imodel.n_params, args.batch, args.repeats
    print(f"\n[{name}] target layers {[l.name for l in imodel.target_layers]}, d={d:,}, "
          f"front={[l.name for l in (imodel._front or [])]}")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B,) + in_shape).astype(np.float32)
    y = rng.integers(0, 10, B)
    P = G.random_directions(d, K_PROJ, seed=1)
    PT = np.ascontiguousarray(P.T)
    grad_block = rng.standard_normal((B, d)).astype(np.float32)

    fb = make_fwd_bwd(imodel)
    pe_fn = G._per_example_grad_fn(imodel)  # the compiled function (a) calls, no host copy
    n_fall = len(fallbacks.msgs)
    t = median_ms_interleaved({
        "fb": lambda: fb(x, y),
        "mm": lambda: grad_block @ P,
        "write": lambda: np.full((B, d), 1.0, np.float32),
        "a": lambda: G.per_example_gradients(imodel, x, y, batch_size=B),
        "a_graph": lambda: pe_fn(x, y)[0, 0].numpy(),
        "b": lambda: G.projected_gradients(imodel, x, y, P, batch_size=B),
        "jvp": lambda: G.directional_derivatives(imodel, x, y, PT, batch_size=B),
    }, R, cheap=("fb", "mm", "write"))
    fall = fallbacks.msgs[n_fall:]
    del grad_block
    t_fb, base_b = t["fb"], t["fb"] + t["mm"]

    # Cross-checks: projected == per-example @ P == JVP, mean per-example == batched gradient.
    g = G.per_example_gradients(imodel, x[:8], y[:8])
    pg = G.projected_gradients(imodel, x[:8], y[:8], P)
    dd = G.directional_derivatives(imodel, x[:8], y[:8], PT)
    fb_grad = fb(x[:8], y[:8])
    err = max(np.abs(g @ P - pg).max(), np.abs(pg - dd).max(),
              np.abs(g.mean(0) - fb_grad).max()) / max(np.abs(pg).max(), 1e-12)

    Bj = min(args.jac_batch, B)
    xj, yj = x[:Bj], y[:Bj]
    t_fb_j = median_ms(lambda: fb(xj, yj), 3 * R, warmup=3) if Bj != B else t_fb
    jac = make_jacobian(imodel)
    jac(xj, yj)  # trace + compile
    t0 = time.perf_counter()
    jac(xj, yj)
    t_jac = 1e3 * (time.perf_counter() - t0) * np.ones(2)

    print(f"  vectorized_map fallbacks (pfor while_loop) in (a)/(b)/jvp: "
          f"{sorted(set(fall)) or 'none'}; max rel. err of cross-checks {err:.1e}")
    return [
        (name, "fwd+bwd baseline T_fb", B, t_fb, None, None, None),
        (name, f"numpy (B x d)@(d x {K_PROJ}) T_mm", B, t["mm"], None, None, None),
        (name, "ref: write (B x d) f32 to fresh array", B, t["write"], t_fb, None, "T_fb"),
        (name, "(a) per_example_gradients", B, t["a"], t_fb, 5.0, "T_fb"),
        (name, "    in-graph only, no .numpy()", B, t["a_graph"], t_fb, None, "T_fb"),
        (name, f"(b) projected_gradients k={K_PROJ}", B, t["b"], base_b, 2.0, "T_fb+T_mm"),
        (name, "    directional_derivatives (JVP)", B, t["jvp"], base_b, None, "T_fb+T_mm"),
        (name, "    naive tape.jacobian (1 run)", Bj, t_jac, t_fb_j, None, "T_fb(Bj)"),
    ]


def print_table(rows) -> None:
    hdr = (f"{'model':6} {'measurement':37} {'batch':>5} {'ms med':>8} {'ms min':>8} "
           f"{'base med':>8} {'ratio':>6} {'r(min)':>6}  {'base':10} {'target':>6}  verdict")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for model, label, b, ms, base, target, base_name in rows:
        r = ms / base if base is not None else None
        cols = f"{base[0]:8.2f} {r[0]:6.2f} {r[1]:6.2f}" if r is not None else " " * 22
        verdict = ("PASS" if r[0] <= target else "MISS") if target else ""
        tgt = f"<={target:g}x" if target else ""
        print(f"{model:6} {label:37} {b:5d} {ms[0]:8.2f} {ms[1]:8.2f} {cols}  "
              f"{base_name or '':10} {tgt:>6}  {verdict}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--jac-batch", type=int, default=64,
                   help="rows for the naive jacobian row (it costs ~batch^2)")
    p.add_argument("--models", default="dense,cnn")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 32, 2 repeats")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.repeats, args.jac_batch = 32, 2, 8

    intra = tf.config.threading.get_intra_op_parallelism_threads()
    inter = tf.config.threading.get_inter_op_parallelism_threads()
    print(f"TF {tf.__version__}, Keras {keras.__version__}, numpy {np.__version__}; "
          f"cores={os.cpu_count()}; tf intra_op={intra} (0 = TF default, all cores), "
          f"inter_op={inter}; INFLUENCE_TF_INTRA_THREADS="
          f"{os.environ.get('INFLUENCE_TF_INTRA_THREADS', '<unset>')}; "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '<unset>')}")
    print(f"batch={args.batch} repeats={args.repeats} (median) jac_batch={args.jac_batch}")

    fallbacks = _Fallbacks()
    logging.getLogger("tensorflow").addHandler(fallbacks)
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name.strip(), args, fallbacks)
    print_table(rows)
    print("\nratio = median ms / median base ms (the verdict uses it); r(min) = min / min, the "
          "less noise-sensitive view on a loaded machine.\nTargets: (a) <= 5x T_fb, (b) <= 2x "
          "(T_fb + T_mm); informational only.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
