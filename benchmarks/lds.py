"""Ranking quality against retraining: the linear datamodeling score (LDS).

An influence method is only as good as its ranking of training examples, and the ground truth
for that is retraining, not another approximation. LDS (Park et al. 2023, TRAK): draw many
random halves S of the training set, retrain on each, and record every test point's loss. A
method predicts the loss of the model trained on S as ``const - sum_{i in S} influence[t, i] / n``
(positive influence = removing i raises the test loss, so including it lowers it). LDS of test
point t is the Spearman correlation, over the subsets, of predicted and actual loss; we report
its mean (and std) over test points.

Setup (all shipped with scikit-learn, no download): ``load_digits`` (1,797 x 64, 10 classes),
standardised, a seeded split of 1,200 train / 597 test, of which ``--n-test`` test points are
evaluated. Model: float64 Keras MLP 64 -> 32 tanh -> 10 logits, trained with Adam; then its
LAST layer (d = 330) is refit to the exact optimum of ``mean CE + l2/2 ||theta_last||^2``
(Newton in float64 on the frozen penultimate features, l2 = 1e-3) and written back, so the
influence assumptions (optimum, convex objective in theta) hold. Ground truth: for each of
``--subsets`` random halves (seeded), the last layer is refit by Newton to convergence on the
half only (objective: mean CE over the half + the same L2), warm-started at the full-data
optimum, and every test point's loss is recorded.

Predictions: every method is an :class:`influence_ops.InfluenceCalculator` on the same model
(``target_layers=None`` = the last layer, ``l2=L2``), fitted on the full training set
(CG / LiSSA also get the test points as ``queries=``), giving ``(n_test, n_train)`` scores.
Columns: LDS mean and std over test points; overlap of the top-10 proponents with the exact
method's (mean over test points); fit time (construction + ``fit``) and score time
(``influence``); peak memory = tracemalloc peak over construction + fit + score, i.e. Python
and numpy allocations (TensorFlow's own C++ buffers are not counted).

Methods are the named configurations in ``METHODS``: one line each. A method or solver that
``InfluenceCalculator`` rejects is skipped with a note.
``--quick`` (the ``make bench`` smoke run): 20 subsets, 30 test points, shorter training, and
the configurations marked slow are skipped. ``--repeats R`` runs every method R times, round
robin (method after method, R rounds: load changes on a shared machine hit all methods alike),
each time on a fresh wrapper, and reports the minimum of each time; scores and memory come from
the first round. Informational: always exits 0 (a method that fails
is reported as a row). Usage:

    PYTHONPATH=. python benchmarks/lds.py [--quick] [--subsets 100] [--n-test 100] [--repeats 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
import tracemalloc
import traceback
from typing import Callable, Optional, Union

import numpy as np

from influence_ops import tf_setup  # noqa: E402  (TF thread settings before Keras)
# The numpy-only refits run with one BLAS thread (its docstring says why); the methods are
# timed as users run them.
from influence_ops.tf_setup import single_threaded_blas  # noqa: E402

tf = tf_setup.tensorflow()
tf.get_logger().setLevel("ERROR")  # each method builds fresh tf.functions: retracing notices
import keras  # noqa: E402

from influence_ops import InfluenceCalculator  # noqa: E402

L2 = 1e-3
N_TRAIN = 1200
HIDDEN = 32
SEED = 0
TOP = 10


# ============================================================================ configurations
@dataclasses.dataclass
class Config:
    """One row of the table: ``InfluenceCalculator(model, method=method, **kwargs)``.

    ``kwargs`` may be a callable ``ctx -> dict`` for arguments that need the setup (TracIn's
    checkpoint path). ``slow``: skipped by ``--quick``. ``note``: the table's notes column.
    """
    name: str
    method: str
    kwargs: Union[dict, Callable[["Setup"], dict]] = dataclasses.field(default_factory=dict)
    slow: bool = False
    note: str = ""


METHODS = [
    Config("exact", "influence", dict(solver="exact")),
    Config("cg", "influence", dict(solver="cg", cg_max_iter=500, cg_tol=1e-8),
           note="500 iterations max, tol 1e-8"),
    # lambda_max of H is ~0.04 here and most eigenvalues sit at l2 = 1e-3: scale 0.5 keeps the
    # Neumann series convergent on mini-batch Hessians, depth 1000 shrinks the error on the
    # smallest direction to (1 - 1e-3/0.5)^1000 ~ 0.14. The library defaults (scale 10, depth
    # 200) barely leave the gradient: (1 - 1e-4)^200 ~ 0.98.
    Config("lissa", "influence", dict(solver="lissa", lissa_scale=0.5, lissa_depth=1000,
                                      lissa_batch=200), slow=True,
           note="scale 0.5, depth 1000, mini-batches of 200"),
    Config("lissa-defaults", "influence", dict(solver="lissa"), slow=True,
           note="library defaults: scale 10, depth 200, mini-batches of 64"),
    Config("arnoldi-32", "influence", dict(solver="arnoldi", rank=32, arnoldi_iter=64),
           note="rank 32 from 64 HVPs"),
    Config("arnoldi-128", "influence", dict(solver="arnoldi", rank=128, arnoldi_iter=256), slow=True,
           note="rank 128 from 256 HVPs"),
    Config("relatif", "relatif", dict(solver="exact"), note="exact solver"),
    Config("rps_lje", "rps_lje", dict(solver="exact"), note="exact solver, true test labels"),
    Config("rps_l2", "rps_l2", dict(rps_lambda=L2 / 2),
           note="surrogate lam = l2/2 (its penalty is lam * sum W^2)"),
    Config("tracin", "tracin",
           lambda ctx: dict(checkpoints=[ctx.model_path], learning_rates=[1.0]),
           note="one checkpoint (the final model): a gradient dot product"),
    # The at-scale curvature models: Kronecker-factored, and exact query solves by PCG.
    Config("ekfac", "influence", dict(solver="ekfac"), note="true Fisher, damping 0.1 x mean"),
    Config("kfac", "influence", dict(solver="kfac"), note="true Fisher, damping 0.1 x mean"),
    Config("pcg-arnoldi32", "influence", dict(solver="pcg", rank=32, arnoldi_iter=64,
                                              cg_max_iter=500, cg_tol=1e-8),
           note="CG deflated by the rank-32 Arnoldi model"),
    Config("pcg-ekfac", "influence", dict(solver="pcg", preconditioner="ekfac", cg_max_iter=500,
                                          cg_tol=1e-8), note="CG preconditioned by EK-FAC"),
]


# ============================================================================ data and model
@dataclasses.dataclass
class Setup:
    model: "keras.Model"
    model_path: str
    x: np.ndarray        # (n, 64) training inputs
    y: np.ndarray        # (n,) labels
    xq: np.ndarray       # (m, 64) evaluated test inputs
    yq: np.ndarray
    F: np.ndarray        # (n, 33) penultimate features with a ones column (bias)
    Fq: np.ndarray       # (m, 33)
    theta: np.ndarray    # (33, 10): the last layer at the exact optimum, kernel rows then bias
    grad_norm: float


def load_data(n_test: int):
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(SEED)
    perm = rng.permutation(len(x))
    tr, te = perm[:N_TRAIN], perm[N_TRAIN:]
    mu, sd = x[tr].mean(axis=0), x[tr].std(axis=0)
    x = (x - mu) / np.where(sd > 0, sd, 1.0)
    return x[tr], y[tr].astype(np.int64), x[te][:n_test], y[te][:n_test].astype(np.int64)


def softmax_ce(F, theta, y):
    """Per-example cross-entropy ``(m,)`` and probabilities ``(m, C)`` of logits ``F theta``."""
    z = F @ theta
    z = z - z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    return lse - z[np.arange(len(y)), y], np.exp(z - lse[:, None])


def newton_last_layer(F, y, theta0, l2=L2, tol=1e-10, max_iter=100):
    """Minimises ``mean_i CE(F_i theta, y_i) + l2/2 ||theta||^2`` over theta ``(p, C)`` by
    Newton with backtracking, float64. Returns ``(theta, |grad|_max, iterations)``."""
    m, p = F.shape
    C = theta0.shape[1]
    Y = np.eye(C)[y]

    def objective(th):
        return softmax_ce(F, th, y)[0].mean() + 0.5 * l2 * np.sum(th * th)

    theta = theta0.copy()
    f = objective(theta)
    for it in range(1, max_iter + 1):
        _, P = softmax_ce(F, theta, y)
        g = F.T @ (P - Y) / m + l2 * theta                       # (p, C)
        if np.abs(g).max() < tol:
            return theta, float(np.abs(g).max()), it - 1
        # H[(j,c),(k,d)] = mean_i F_ij F_ik (delta_cd P_ic - P_ic P_id) + l2 delta
        B = (F[:, :, None] * P[:, None, :]).reshape(m, p * C)
        H = -(B.T @ B) / m
        D = np.einsum("ij,ik,ic->cjk", F, F, P) / m
        H = H.reshape(p, C, p, C)
        for c in range(C):
            H[:, c, :, c] += D[c]
        H = H.reshape(p * C, p * C) + l2 * np.eye(p * C)
        step = np.linalg.solve(H, g.ravel()).reshape(p, C)
        t = 1.0
        while True:
            f_new = objective(theta - t * step)
            if f_new <= f - 1e-4 * t * np.sum(g * step) or t < 1e-8:
                break
            t *= 0.5
        theta, f = theta - t * step, f_new
    _, P = softmax_ce(F, theta, y)
    g = F.T @ (P - Y) / m + l2 * theta
    return theta, float(np.abs(g).max()), max_iter


def build_setup(quick: bool, n_test: int, workdir: str) -> Setup:
    x, y, xq, yq = load_data(n_test)
    keras.utils.set_random_seed(SEED)
    model = keras.Sequential([
        keras.Input((x.shape[1],), dtype="float64"),
        keras.layers.Dense(HIDDEN, activation="tanh", dtype="float64", name="hidden"),
        keras.layers.Dense(10, dtype="float64", name="logits"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    t0 = time.perf_counter()
    hist = model.fit(x, y, epochs=15 if quick else 100, batch_size=32, verbose=0)
    train_s = time.perf_counter() - t0
    hidden = model.get_layer("hidden")
    W1, b1 = hidden.kernel.numpy(), hidden.bias.numpy()
    F, Fq = (np.c_[np.tanh(a @ W1 + b1), np.ones(len(a))] for a in (x, xq))
    last = model.layers[-1]
    theta0 = np.vstack([last.kernel.numpy(), last.bias.numpy()[None, :]])
    with single_threaded_blas():
        theta, gmax, it = newton_last_layer(F, y, theta0)
    last.kernel.assign(theta[:-1])
    last.bias.assign(theta[-1])
    acc = (np.argmax(Fq @ theta, axis=1) == yq).mean()
    print(f"model: 64 -> {HIDDEN} tanh -> 10, float64; Adam {len(hist.epoch)} epochs in "
          f"{train_s:.1f}s (final train loss {hist.history['loss'][-1]:.4f}); last layer refit "
          f"by Newton ({it} steps, |grad|_max {gmax:.1e}); test accuracy {acc:.3f} on "
          f"{len(yq)} evaluated test points")
    path = os.path.join(workdir, "digits_mlp.keras")
    model.save(path)
    return Setup(model, path, x, y, xq, yq, F, Fq, theta, gmax)


# ============================================================================ ground truth
def ground_truth(s: Setup, n_subsets: int):
    """``(masks (S, n) bool, losses (S, m))``: test losses after refitting on random halves."""
    n = len(s.x)
    masks = np.zeros((n_subsets, n), dtype=bool)
    losses = np.zeros((n_subsets, len(s.yq)))
    worst, t0 = 0.0, time.perf_counter()
    with single_threaded_blas():
        for k in range(n_subsets):
            idx = np.random.default_rng(1000 + k).permutation(n)[: n // 2]
            masks[k, idx] = True
            th, gmax, _ = newton_last_layer(s.F[idx], s.y[idx], s.theta)
            worst = max(worst, gmax)
            losses[k] = softmax_ce(s.Fq, th, s.yq)[0]
    print(f"ground truth: {n_subsets} halves of {n} refit in {time.perf_counter() - t0:.1f}s "
          f"(worst |grad|_max {worst:.1e})")
    return masks, losses


def spearman_columns(a, b):
    """Spearman correlation of each column of ``a`` with the same column of ``b`` ``(m,)``."""
    from scipy.stats import rankdata
    ra, rb = rankdata(a, axis=0), rankdata(b, axis=0)
    ra -= ra.mean(axis=0)
    rb -= rb.mean(axis=0)
    den = np.sqrt((ra * ra).sum(axis=0) * (rb * rb).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(axis=0) / den, np.nan)


def lds(scores, masks, losses):
    """Per test point LDS: Spearman over subsets of ``-sum_{i in S} scores[t, i]`` (the
    predicted loss up to a constant and the positive factor 1/n) with the actual loss."""
    predicted = -(masks.astype(np.float64) @ scores.T)  # (S, m)
    return spearman_columns(predicted, losses)


def top_overlap(scores, ref, k=TOP):
    a = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    b = np.argsort(-ref, axis=1, kind="stable")[:, :k]
    return np.array([len(set(u) & set(v)) / k for u, v in zip(a, b)])


# ============================================================================ methods
@dataclasses.dataclass
class Result:
    name: str
    lds: Optional[np.ndarray] = None
    overlap: Optional[np.ndarray] = None
    fit_s: float = float("nan")
    warm_fit_s: float = float("nan")
    score_s: float = float("nan")
    peak_mib: float = float("nan")
    scores: Optional[np.ndarray] = None
    status: str = ""
    reason: str = ""


def run_method(cfg: Config, s: Setup) -> Result:
    kwargs = cfg.kwargs(s) if callable(cfg.kwargs) else dict(cfg.kwargs)
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        try:
            calc = InfluenceCalculator(s.model, method=cfg.method, target_layers=None,
                                       loss="sparse_categorical_crossentropy", from_logits=True,
                                       l2=L2, **kwargs)
        except ValueError as e:  # an unknown method or solver name (a bad kwarg is an error)
            return Result(cfg.name, status="skipped: InfluenceCalculator rejects it",
                          reason=str(e))
        def fit():
            if calc.method.needs_queries:
                calc.fit((s.x, s.y), queries=(s.xq, s.yq))
            else:
                calc.fit((s.x, s.y))
        fit()
        t1 = time.perf_counter()
        fit()  # again on the same wrapper: without tf.function tracing
        warm = time.perf_counter() - t1
        t1 = time.perf_counter()
        scores = calc.influence((s.xq, s.yq), (s.x, s.y))
        t2 = time.perf_counter()
        peak = tracemalloc.get_traced_memory()[1]
    except Exception as e:  # noqa: BLE001  (a failing method is a row, not a crash)
        traceback.print_exc()
        return Result(cfg.name, status=f"error: {type(e).__name__}: {str(e)[:120]}")
    finally:
        tracemalloc.stop()
    return Result(cfg.name, fit_s=t1 - t0 - warm, warm_fit_s=warm, score_s=t2 - t1,
                  peak_mib=peak / 2 ** 20,
                  scores=np.asarray(scores, np.float64), status="ok")


def table(results, configs) -> str:
    notes = {c.name: c.note.replace("|", "\\|") for c in configs}
    rows = ["| method | LDS mean | LDS std | top-10 overlap with exact | fit s | fit s (warm) "
            "| score s | peak MiB (tracemalloc) | notes |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.status != "ok":
            rows.append(f"| {r.name} | - | - | - | - | - | - | - | {r.status} |")
            continue
        ov = f"{np.nanmean(r.overlap):.2f}" if r.overlap is not None else "-"
        rows.append(f"| {r.name} | {np.nanmean(r.lds):.3f} | {np.nanstd(r.lds):.3f} | {ov} | "
                    f"{r.fit_s:.2f} | {r.warm_fit_s:.2f} | {r.score_s:.2f} | {r.peak_mib:.1f} | "
                    f"{notes[r.name]} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 20 subsets, 30 test points, 15 epochs, no slow methods "
                        "(lissa, arnoldi-128)")
    p.add_argument("--subsets", type=int, default=None, help="random halves (default 100)")
    p.add_argument("--n-test", type=int, default=None, help="test points (default 100)")
    p.add_argument("--methods", default="", help="comma-separated subset of method names")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds over the methods; times are the minimum over rounds")
    a = p.parse_args(argv)
    n_subsets = a.subsets or (20 if a.quick else 100)
    n_test = a.n_test or (30 if a.quick else 100)
    configs = [c for c in METHODS if not a.methods or c.name in a.methods.split(",")]
    print(f"LDS benchmark: load_digits, {N_TRAIN} train, {n_test} test points, {n_subsets} "
          f"random halves, l2={L2}, TF threads: intra "
          f"{tf.config.threading.get_intra_op_parallelism_threads()}, inter "
          f"{tf.config.threading.get_inter_op_parallelism_threads()}"
          + (" (quick)" if a.quick else "")
          + (f"; times: min of {a.repeats} rounds" if a.repeats > 1 else ""))
    with tempfile.TemporaryDirectory() as workdir:
        s = build_setup(a.quick, n_test, workdir)
        masks, losses = ground_truth(s, n_subsets)
        results, exact = [], None
        for cfg in configs:
            if a.quick and cfg.slow:
                results.append(Result(cfg.name, status="skipped (--quick)"))
                continue
            r = run_method(cfg, s)
            if r.status == "ok":
                r.lds = lds(r.scores, masks, losses)
                if cfg.name == "exact":
                    exact = r.scores
                if exact is not None:
                    r.overlap = top_overlap(r.scores, exact)
            print(f"  {cfg.name}: {r.status}" + (
                f", LDS {np.nanmean(r.lds):.3f}, fit {r.fit_s:.1f}s, score {r.score_s:.1f}s"
                if r.status == "ok" else ""), flush=True)
            results.append(r)
        for _ in range(a.repeats - 1):  # more rounds: times only
            for r, cfg in zip(results, configs):
                if r.status == "ok":
                    again = run_method(cfg, s)
                    for key in ("fit_s", "warm_fit_s", "score_s"):
                        setattr(r, key, min(getattr(r, key), getattr(again, key)))
    print()
    print(table(results, configs))
    fits = {r.name: r for r in results if r.status == "ok"}
    base = fits.get("arnoldi-32")
    for name in ("pcg-arnoldi32", "pcg-ekfac"):
        if base is not None and name in fits:  # the cost target: <= 3x Arnoldi's fit
            print(f"{name} fit / arnoldi-32 fit: {fits[name].fit_s / base.fit_s:.2f}x first "
                  f"use, {fits[name].warm_fit_s / base.warm_fit_s:.2f}x warm")
    for r in results:
        if r.reason:
            print(f"note: {r.name} skipped, InfluenceCalculator rejected it: {r.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
