"""Mislabel detection: how many flipped labels each method's ranking finds.

The classic use of self-influence (Koh & Liang 2017; the Influenciae paper's mislabel
experiment): flip some training labels, rank the training set by a per-example score, inspect
the top of the ranking, count the flipped labels found. Here:

* data and model: the demo's (:mod:`pipelines.demo`): scikit-learn's digits (shipped with the
  package, no download), 1,500 training examples with 10% of the labels flipped to another
  class, a float32 MLP 64 -> 32 relu -> 10 logits trained for 30 epochs (``train_model``);
* methods: every built-in method (``influence_ops.registry.method_names()``) through the
  notebook API, :class:`influence_ops.InfluenceCalculator` on the last layer (d = 330) with
  ``l2=1e-3``, scored by ``self_influence`` on the training set: influence with each solver,
  influence with ``correction="loo"``, RelatIF, TracIn (one checkpoint: the final model),
  RPS-L2, RPS-LJE;
* baselines: the per-example loss, the two boundary distances of
  :mod:`influence_ops.boundary` (``sample_boundary``: input space, ``weights_boundary``:
  last-layer weights), ranked by the NEGATIVE distance (closer to the boundary = more
  suspicious; ``inf``, no boundary found, ranks last), and a seeded random ranking.
  The boundary distances do not look at the labels: they measure how ambiguous the model finds
  an example, not whether its label disagrees with the model.

For each: the detection curve (:mod:`influence_ops.detection`: fraction of flipped labels found
against fraction of the training set inspected), the fraction found in the top 5/10/20/30%,
the area under the curve (0.5 = random) and the seconds spent: fit (construction + ``fit``)
and score (``self_influence`` or the baseline's own computation). A method that raises is a
row marked failed with the reason. Informational: always exits 0.

    PYTHONPATH=. python benchmarks/mislabel.py [--quick] [--plot out/mislabel_curves.svg]
        [--update-readme] [--methods exact,loss,...]

``--quick``: 300 training examples, 10 epochs, the slow solvers (cg, lissa) skipped: a smoke
run. ``--update-readme`` rewrites the marked section of ``benchmarks/README.md`` with the
table and the command that produced it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import tempfile
import time
import traceback
from typing import Callable, Optional

import numpy as np

from influence_ops import tf_setup  # noqa: E402  (TF thread settings before Keras)

tf = tf_setup.tensorflow()
tf.get_logger().setLevel("ERROR")  # each method builds fresh tf.functions: retracing notices

from influence_ops import InfluenceCalculator, boundary, registry  # noqa: E402
from influence_ops.detection import area_under_curve, detection_curve, found_at  # noqa: E402
from influence_ops.gradients import per_example_losses  # noqa: E402
from pipelines.demo import make_data, train_model  # noqa: E402

L2 = 1e-3
FRACTIONS = (0.05, 0.10, 0.20, 0.30)
README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
BEGIN, END = "<!-- mislabel:begin -->", "<!-- mislabel:end -->"


@dataclasses.dataclass
class Config:
    """One row: ``InfluenceCalculator(model, method=method, **kwargs)`` scored by
    ``self_influence``, or a baseline (``baseline`` = its name). ``kwargs`` may be a callable
    ``ctx -> dict`` (TracIn's checkpoint path). ``slow``: skipped by ``--quick``."""
    name: str
    method: str = "influence"
    kwargs: object = dataclasses.field(default_factory=dict)
    baseline: Optional[str] = None
    slow: bool = False
    note: str = ""


METHODS = [
    Config("exact", kwargs=dict(solver="exact")),
    Config("pcg", kwargs=dict(solver="pcg"), note="self-influence from its rank-32 Arnoldi "
                                                  "preconditioner"),
    Config("arnoldi", kwargs=dict(solver="arnoldi"), note="library defaults"),
    Config("ekfac", kwargs=dict(solver="ekfac")),
    Config("kfac", kwargs=dict(solver="kfac")),
    Config("lissa", kwargs=dict(solver="lissa"), slow=True,
           note="library defaults; one solve per training example"),
    Config("cg", kwargs=dict(solver="cg"), slow=True,
           note="library defaults; one solve per training example"),
    Config("exact + loo", kwargs=dict(solver="exact", correction="loo"),
           note="leave-one-out corrected"),
    Config("relatif", method="relatif", kwargs=dict(solver="exact"), note="exact solver"),
    Config("tracin", method="tracin",
           kwargs=lambda ctx: dict(checkpoints=[ctx["model_path"]], learning_rates=[1.0]),
           note="one checkpoint (the final model)"),
    Config("rps_l2", method="rps_l2", kwargs=dict(rps_lambda=L2 / 2)),
    Config("rps_lje", method="rps_lje", kwargs=dict(solver="exact")),
    Config("loss", baseline="loss", note="per-example loss"),
    Config("sample_boundary", baseline="sample_boundary",
           note="-distance in input space (label-free)"),
    Config("weights_boundary", baseline="weights_boundary",
           note="-distance in last-layer weights (label-free)"),
    Config("random", baseline="random", note="seeded permutation"),
]


@dataclasses.dataclass
class Result:
    name: str
    status: str = "ok"
    scores: Optional[np.ndarray] = None
    fit_s: float = 0.0
    score_s: float = float("nan")


def _baseline(name: str, model, x, y) -> Callable[[], np.ndarray]:
    """The baseline's scores, higher = more suspicious."""
    from influence_ops import InfluenceModel
    imodel = InfluenceModel(model, loss="sparse_categorical_crossentropy")
    if name == "loss":
        return lambda: per_example_losses(imodel, x, y).astype(np.float64)
    if name == "sample_boundary":
        return lambda: -boundary.sample_boundary(imodel, x)
    if name == "weights_boundary":
        return lambda: -boundary.weights_boundary(imodel, x)
    if name == "random":
        return lambda: np.random.default_rng(0).permutation(len(x)).astype(np.float64)
    raise ValueError(f"unknown baseline {name!r}")


def run_config(cfg: Config, ctx: dict) -> Result:
    model, x, y = ctx["model"], ctx["x"], ctx["y"]
    try:
        t0 = time.perf_counter()
        if cfg.baseline:
            score = _baseline(cfg.baseline, model, x, y)
            fit_s = 0.0
        else:
            kwargs = cfg.kwargs(ctx) if callable(cfg.kwargs) else dict(cfg.kwargs)
            calc = InfluenceCalculator(model, method=cfg.method, target_layers=None,
                                       loss="sparse_categorical_crossentropy", l2=L2, **kwargs)
            calc.fit((x, y))
            fit_s = time.perf_counter() - t0

            def score():
                return calc.self_influence((x, y))
        t1 = time.perf_counter()
        scores = np.asarray(score(), np.float64)
        score_s = time.perf_counter() - t1
        if scores.shape != (len(x),) or np.isnan(scores).any():
            raise ValueError(f"scores of shape {scores.shape} with "
                             f"{int(np.isnan(scores).sum())} NaN")
    except Exception as e:  # noqa: BLE001  (a failing method is a row, not a crash)
        traceback.print_exc()
        return Result(cfg.name, status=f"failed: {type(e).__name__}: {str(e)[:150]}")
    return Result(cfg.name, scores=scores, fit_s=fit_s, score_s=score_s)


def table(results, configs, is_flipped) -> str:
    notes = {c.name: c.note.replace("|", "\\|") for c in configs}
    head = " | ".join(f"top {int(f * 100)}%" for f in FRACTIONS)
    rows = [f"| method | {head} | AUC | fit s | score s | notes |",
            "|---|" + "---|" * (len(FRACTIONS) + 4)]
    for r in results:
        if r.status != "ok":
            dashes = " | ".join("-" for _ in FRACTIONS)
            rows.append(f"| {r.name} | {dashes} | - | - | - | {r.status.replace('|', '/')} |")
            continue
        found = found_at(r.scores, is_flipped, FRACTIONS)
        cells = " | ".join(f"{found[f]:.1%}" for f in FRACTIONS)
        rows.append(f"| {r.name} | {cells} | {area_under_curve(r.scores, is_flipped):.3f} | "
                    f"{r.fit_s:.2f} | {r.score_s:.2f} | {notes[r.name]} |")
    return "\n".join(rows)


def plot(results, is_flipped, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 6))
    n, k = len(is_flipped), int(is_flipped.sum())
    ax.plot([0, k / n, 1], [0, 1, 1], color="black", lw=0.8, ls=":", label="perfect")
    styles = ["-", "--", "-.", ":"]
    for i, r in enumerate(r for r in results if r.status == "ok"):
        inspected, found = detection_curve(r.scores, is_flipped)
        ax.plot(inspected, found, lw=1.2, ls=styles[(i // 10) % len(styles)], label=r.name)
    ax.set_xlabel("fraction of the training set inspected")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="svg", bbox_inches="tight")
    plt.close(fig)


def update_readme(text: str, path: str = README) -> None:
    """Replaces the text between the mislabel markers of ``benchmarks/README.md``."""
    with open(path) as f:
        old = f.read()
    if BEGIN not in old or END not in old:
        raise ValueError(f"{path} has no {BEGIN} ... {END} section to rewrite")
    new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END),
                 lambda _: f"{BEGIN}\n{text}\n{END}", old, flags=re.S)
    with open(path, "w") as f:
        f.write(new)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 300 training examples, 10 epochs, no cg / lissa")
    p.add_argument("--methods", default="", help="comma-separated subset of the row names")
    p.add_argument("--plot", default="out/mislabel_curves.svg", help="SVG of all curves")
    p.add_argument("--update-readme", action="store_true",
                   help="rewrite the table section of benchmarks/README.md")
    a = p.parse_args(argv)
    wanted = [m for m in a.methods.split(",") if m]
    unknown = set(wanted) - {c.name for c in METHODS}
    if unknown:
        raise SystemExit(f"unknown --methods {sorted(unknown)}; rows: "
                         f"{[c.name for c in METHODS]}")
    configs = [c for c in METHODS if not wanted or c.name in wanted]
    untested = set(registry.method_names(builtin_only=True)) - {c.method for c in METHODS}
    if untested:
        print(f"note: registered methods without a row: {sorted(untested)}")

    n_train, epochs = (300, 10) if a.quick else (1500, 30)
    x, y, xq, yq, is_flipped = make_data(n_train=n_train)
    t0 = time.perf_counter()
    model = train_model(x, y, epochs=epochs)
    train_s = time.perf_counter() - t0
    acc = float(np.mean(np.argmax(model.predict(xq, verbose=0), axis=1) == yq))
    fits_flipped = float(np.mean(np.argmax(model.predict(x[is_flipped], verbose=0), axis=1)
                                 == y[is_flipped]))
    header = (f"digits, {n_train} training examples, {int(is_flipped.sum())} flipped labels; "
              f"MLP 64-32-10 trained {epochs} epochs in {train_s:.1f}s, test accuracy {acc:.3f}, "
              f"predicts the flipped label on {fits_flipped:.0%} of the flipped examples; "
              f"last layer (d=330), l2={L2}; TF intra-op threads "
              f"{tf.config.threading.get_intra_op_parallelism_threads()}"
              + (" (quick)" if a.quick else ""))
    print(header, flush=True)
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        ctx = dict(model=model, x=x, y=y, model_path=os.path.join(workdir, "model.keras"))
        model.save(ctx["model_path"])
        for cfg in configs:
            if a.quick and cfg.slow:
                results.append(Result(cfg.name, status="skipped (--quick)"))
                continue
            r = run_config(cfg, ctx)
            print(f"  {cfg.name}: {r.status}" + (
                f", found {found_at(r.scores, is_flipped, (0.1,))[0.1]:.1%} in the top 10%, "
                f"fit {r.fit_s:.1f}s, score {r.score_s:.1f}s" if r.status == "ok" else ""),
                flush=True)
            results.append(r)
    out = table(results, configs, is_flipped)
    print()
    print(out)
    plot(results, is_flipped, a.plot, f"Mislabel detection, digits, {int(is_flipped.sum())} "
                                      f"flipped of {n_train}")
    print(f"\ncurves: {a.plot}")
    if a.update_readme:
        command = ("PYTHONPATH=. .venv/bin/python benchmarks/mislabel.py"
                   + "".join(f" {arg}" for arg in (argv if argv is not None else sys.argv[1:])))
        update_readme(f"```\n{command}\n```\n\n{header}\n\n{out}")
        print(f"updated {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
