"""Mislabel detection: how many flipped labels each method's ranking finds.

The classic use of self-influence (Koh & Liang 2017; the Influenciae paper's mislabel
experiment): flip some training labels, rank the training set by a per-example score, inspect
the top of the ranking, count the flipped labels found. Two scenarios on the same data,
scikit-learn's digits (shipped with the package, no download): 1,500 training examples with 10%
of the labels flipped to another class (:func:`pipelines.demo.make_data`):

* ``brief``: the demo's model (:func:`pipelines.demo.train_model`), a float32 MLP
  64 -> 32 relu -> 10 logits trained for 30 epochs. It generalises and does NOT fit the flipped
  labels (it predicts the flipped label on ~1% of them): their loss is high and the loss alone
  finds them;
* ``memorised``: a wider MLP 64 -> 64 relu -> 10 trained for 300 epochs (Adam 3e-3, batch 64,
  no regularisation, no early stopping) until it fits almost every flipped label, as in the
  seed library's mislabel experiments: the loss of a flipped example is then low, and what
  still finds it is how much the model had to bend to fit it. TracIn sums over 4 checkpoints
  along training (epochs 75, 150, 225, 300; row ``tracin final``: the final model alone);
  ``cg`` and ``lissa`` are skipped here (one iterative solve per training example at d = 650:
  72 s and 22 s measured once, more than the rest of the scenario together, for exact's ranking).

Methods: every built-in method (``influence_ops.registry.method_names()``) through the notebook
API, :class:`influence_ops.InfluenceCalculator` on the last layer with ``l2=1e-3``, scored by
``self_influence`` on the training set: influence with each solver, influence with
``correction="loo"``, RelatIF, TracIn, RPS-L2, RPS-LJE. Baselines: the per-example loss, the
two boundary distances of :mod:`influence_ops.boundary` (``sample_boundary``: input space,
``weights_boundary``: last-layer weights), ranked by the NEGATIVE distance (closer to the
boundary = more suspicious; ``inf``, no boundary found, ranks last), and a seeded random
ranking. The boundary distances do not look at the labels: they measure how ambiguous the
model finds an example, not whether its label disagrees with the model.

For each: the detection curve (:mod:`influence_ops.detection`: fraction of flipped labels found
against fraction of the training set inspected), the fraction found in the top 5/10/20/30%,
the area under the curve (0.5 = random) and the seconds spent: fit (construction + ``fit``)
and score (``self_influence`` or the baseline's own computation). A method that raises is a
row marked failed with the reason. Informational: always exits 0.

    PYTHONPATH=. python benchmarks/mislabel.py [--scenario brief|memorised|both] [--quick]
        [--html out/mislabel.html] [--update-readme] [--methods exact,loss,...]

``--html``: one self-contained page (inline SVG, nothing loaded from the network) with, per
scenario, the setup, the table and all detection curves. ``--quick``: 300 training examples,
fewer epochs, the slow solvers (cg, lissa) skipped: a smoke run. ``--update-readme`` rewrites
the marked section of ``benchmarks/README.md`` with the tables and the command that produced
them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import os
import re
import sys
import tempfile
import time
import traceback
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from influence_ops import tf_setup  # noqa: E402  (TF thread settings before Keras)

tf = tf_setup.tensorflow()
tf.get_logger().setLevel("ERROR")  # each method builds fresh tf.functions: retracing notices

from influence_ops import InfluenceCalculator, boundary, registry  # noqa: E402
from influence_ops.detection import area_under_curve, detection_curve, found_at  # noqa: E402
from influence_ops.gradients import per_example_losses  # noqa: E402
from pipelines import report  # noqa: E402  (inline SVG, page style)
from pipelines.demo import make_data, train_model  # noqa: E402

L2 = 1e-3
FRACTIONS = (0.05, 0.10, 0.20, 0.30)
MAX_CURVE_POINTS = 400    # points drawn per detection curve (the page stays small)
README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
BEGIN, END = "<!-- mislabel:begin -->", "<!-- mislabel:end -->"


@dataclasses.dataclass
class Config:
    """One row: ``InfluenceCalculator(model, method=method, **kwargs)`` scored by
    ``self_influence``, or a baseline (``baseline`` = its name). ``kwargs`` may be a callable
    ``ctx -> dict`` (TracIn's checkpoint paths). ``slow``: skipped by ``--quick``."""
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
           kwargs=lambda ctx: dict(checkpoints=list(ctx["checkpoints"]),
                                   learning_rates=[ctx["lr"]] * len(ctx["checkpoints"])),
           note="{tracin}"),
    Config("tracin final", method="tracin",
           kwargs=lambda ctx: dict(checkpoints=[ctx["checkpoints"][-1]],
                                   learning_rates=[ctx["lr"]]),
           note="one checkpoint: the final model"),
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
class Scenario:
    """One model on the same data. ``hidden``: width of the MLP's hidden layer (last layer
    d = 10 * hidden + 10); ``epochs`` / ``quick_epochs``: training; ``checkpoints``: how many
    evenly spaced checkpoints TracIn sums over (1 = the final model); ``skip``: rows not run
    in this scenario, with the reason."""
    name: str
    hidden: int
    epochs: int
    quick_epochs: int
    lr: float = 3e-3
    checkpoints: int = 1
    skip: Dict[str, str] = dataclasses.field(default_factory=dict)
    description: str = ""


SLOW_SKIP = ("skipped: one iterative solve per training example (measured once at d = 650: "
             "cg 72 s, lissa 22 s, ranking as exact does)")
SCENARIOS = {
    "brief": Scenario(
        "brief", hidden=32, epochs=30, quick_epochs=10,
        skip={"tracin final": "skipped: the tracin row above (its one checkpoint is the "
                              "final model)"},
        description="the demo's model (pipelines.demo.train_model): trained briefly, it "
                    "generalises and does not fit the flipped labels"),
    "memorised": Scenario(
        "memorised", hidden=64, epochs=300, quick_epochs=150, checkpoints=4,
        skip={"cg": SLOW_SKIP, "lissa": SLOW_SKIP},
        description="a wider MLP trained long (Adam, no regularisation, no early stopping) "
                    "until it fits most flipped labels"),
}


@dataclasses.dataclass
class Result:
    name: str
    status: str = "ok"
    scores: Optional[np.ndarray] = None
    fit_s: float = 0.0
    score_s: float = float("nan")


@dataclasses.dataclass
class ScenarioRun:
    """What one scenario produced: the setup line, the rows, the flipped mask."""
    scenario: Scenario
    header: str
    results: List[Result]
    configs: List[Config]
    is_flipped: np.ndarray
    notes: Dict[str, str]


def train_memorising(x, y, hidden: int, epochs: int, lr: float, checkpoints: int,
                     workdir: str, seed: int = 0) -> Tuple[object, List[Tuple[int, str]]]:
    """The demo's MLP made wider and trained long enough to fit (memorise) the flipped labels:
    Adam, batch 64, no regularisation, no early stopping. Saves ``checkpoints`` evenly spaced
    checkpoints (the last one is the final model) and returns (model, [(epoch, path)])."""
    import keras
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((x.shape[1],)),
        keras.layers.Dense(hidden, activation="relu", name="hidden"),
        keras.layers.Dense(10, name="logits"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    ends = sorted({int(round(epochs * (i + 1) / checkpoints)) for i in range(checkpoints)})
    saved, done = [], 0
    for end in ends:
        model.fit(x, y, epochs=end - done, batch_size=64, verbose=0)
        done = end
        saved.append((end, os.path.join(workdir, f"epoch{end:04d}.keras")))
        model.save(saved[-1][1])
    return model, saved


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


def table_rows(results, is_flipped, notes: Dict[str, str]) -> List[List[str]]:
    """One list of cells per result: name, found at each fraction, AUC, fit s, score s, notes
    (the status in place of the notes for a row that did not run)."""
    rows = []
    for r in results:
        if r.status != "ok":
            rows.append([r.name] + ["-"] * (len(FRACTIONS) + 3) + [r.status])
            continue
        found = found_at(r.scores, is_flipped, FRACTIONS)
        rows.append([r.name] + [f"{found[f]:.1%}" for f in FRACTIONS]
                    + [f"{area_under_curve(r.scores, is_flipped):.3f}", f"{r.fit_s:.2f}",
                       f"{r.score_s:.2f}", notes.get(r.name, "")])
    return rows


TABLE_HEAD = (["method"] + [f"top {int(f * 100)}%" for f in FRACTIONS]
              + ["AUC", "fit s", "score s", "notes"])


def table(results, configs, is_flipped, notes: Optional[Dict[str, str]] = None) -> str:
    """The markdown table (``notes``: per row name; default each config's ``note``)."""
    if notes is None:
        notes = {c.name: c.note for c in configs}
    lines = ["| " + " | ".join(TABLE_HEAD) + " |", "|---|" + "---|" * (len(TABLE_HEAD) - 1)]
    for cells in table_rows(results, is_flipped, notes):
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def curves_figure(results, is_flipped, title: str):
    """All detection curves of one scenario, the perfect ranking and the random diagonal,
    in one matplotlib figure (no pyplot: :func:`pipelines.report.new_figure`)."""
    fig, (ax,) = report.new_figure(width=8.4, height=6.2)
    n, k = len(is_flipped), int(is_flipped.sum())
    ax.plot([0, k / n, 1], [0, 1, 1], color="black", lw=0.8, ls=":", label="perfect")
    ax.plot([0, 1], [0, 1], color="#999999", lw=1.0, ls="--", label="random (diagonal)")
    ok = [r for r in results if r.status == "ok"]
    colors = [f"C{i % 10}" for i in range(len(ok))]
    styles = ["-", "--", "-.", ":"]
    for i, r in enumerate(ok):
        inspected, found = detection_curve(r.scores, is_flipped)
        if len(inspected) > MAX_CURVE_POINTS:
            idx = np.unique(np.linspace(0, len(inspected) - 1, MAX_CURVE_POINTS)
                            .round().astype(int))
            inspected, found = inspected[idx], found[idx]
        lw = 2.2 if r.name == "loss" else 1.2
        ax.plot(inspected, found, lw=lw, ls=styles[(i // 10) % len(styles)], color=colors[i],
                label=r.name)
    ax.set_xlabel("fraction of the training set inspected")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    return fig


def render_html(runs: List[ScenarioRun], command: str) -> str:
    """The comparison as one self-contained page (no I/O): per scenario, the setup line, the
    table and the detection curves as inline SVG (:func:`pipelines.report.inline_svg`)."""
    esc = report.esc
    nav = "".join(f'<a href="#{esc(r.scenario.name)}">{esc(r.scenario.name)}</a>' for r in runs)
    sections = []
    for run in runs:
        n, k = len(run.is_flipped), int(run.is_flipped.sum())
        head = "".join(f"<th>{esc(h)}</th>" for h in TABLE_HEAD)
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>"
                       for cells in table_rows(run.results, run.is_flipped, run.notes))
        fig = curves_figure(run.results, run.is_flipped,
                            f"{run.scenario.name}: {k} flipped labels of {n}")
        sections.append(
            f'<section id="{esc(run.scenario.name)}"><h2>Scenario <code>'
            f"{esc(run.scenario.name)}</code></h2>"
            f'<p class="muted">{esc(run.scenario.description)}.</p><p>{esc(run.header)}</p>'
            f'<div class="scroll"><table class="small"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>"
            f"<figure>{report.inline_svg(fig)}</figure></section>")
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = "Mislabel detection: every method's ranking of flipped labels"
    return report.page_head(title) + f"""<body>
<header><h1>{esc(title)}</h1>
<div class="muted">Generated {now} by <code>{esc(command)}</code>. Top x%: the fraction of the
flipped labels among the x% highest-ranked training examples; AUC: mean of the detection curve
(0.5 = random); seconds on this machine (fit = construction + fit; score = self-influence or the
baseline).</div></header>
<nav>{nav}</nav>
<main>
{"".join(sections)}
</main>
<footer>Written by <code>benchmarks/mislabel.py</code>; this page loads nothing from the
network.</footer>
</body>
</html>
"""


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


def run_scenario(sc: Scenario, configs: List[Config], quick: bool) -> ScenarioRun:
    n_train = 300 if quick else 1500
    epochs = sc.quick_epochs if quick else sc.epochs
    x, y, xq, yq, is_flipped = make_data(n_train=n_train)
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        if sc.name == "brief":  # exactly the demo's model
            model = train_model(x, y, epochs=epochs)
            model_path = os.path.join(workdir, "model.keras")
            model.save(model_path)
            saved = [(epochs, model_path)]
        else:
            model, saved = train_memorising(x, y, sc.hidden, epochs, sc.lr, sc.checkpoints,
                                            workdir)
        checkpoints = [path for _, path in saved]
        train_s = time.perf_counter() - t0
        acc = float(np.mean(np.argmax(model.predict(xq, verbose=0), axis=1) == yq))
        pred = np.argmax(model.predict(x, verbose=0), axis=1)
        fits_flipped = float(np.mean(pred[is_flipped] == y[is_flipped]))
        fits_clean = float(np.mean(pred[~is_flipped] == y[~is_flipped]))
        d = 10 * sc.hidden + 10
        tracin_note = ("one checkpoint (the final model)" if len(checkpoints) == 1 else
                       f"{len(checkpoints)} checkpoints (epochs "
                       f"{', '.join(str(e) for e, _ in saved)}), learning rate {sc.lr:g} each")
        notes = {c.name: c.note.format(tracin=tracin_note) for c in configs}
        header = (f"[{sc.name}] digits, {n_train} training examples, {int(is_flipped.sum())} "
                  f"flipped labels; MLP 64-{sc.hidden}-10 trained {epochs} epochs in "
                  f"{train_s:.1f}s, test accuracy {acc:.3f}, training accuracy on the clean "
                  f"labels {fits_clean:.3f}, predicts the flipped label on {fits_flipped:.0%} "
                  f"of the flipped examples; last layer (d={d}), l2={L2}; TF intra-op threads "
                  f"{tf.config.threading.get_intra_op_parallelism_threads()}"
                  + (" (quick)" if quick else ""))
        print(header, flush=True)
        ctx = dict(model=model, x=x, y=y, checkpoints=checkpoints, lr=sc.lr)
        for cfg in configs:
            if cfg.name in sc.skip:
                results.append(Result(cfg.name, status=sc.skip[cfg.name]))
            elif quick and cfg.slow:
                results.append(Result(cfg.name, status="skipped (--quick)"))
            else:
                results.append(run_config(cfg, ctx))
            r = results[-1]
            print(f"  {cfg.name}: {r.status}" + (
                f", found {found_at(r.scores, is_flipped, (0.1,))[0.1]:.1%} in the top 10%, "
                f"fit {r.fit_s:.1f}s, score {r.score_s:.1f}s" if r.status == "ok" else ""),
                flush=True)
    return ScenarioRun(sc, header, results, configs, is_flipped, notes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenario", choices=["brief", "memorised", "both"], default="both",
                   help="brief: the demo's model (does not fit the flipped labels); "
                        "memorised: trained until it fits them; both (default)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 300 training examples, fewer epochs, no cg / lissa")
    p.add_argument("--methods", default="", help="comma-separated subset of the row names")
    p.add_argument("--html", default="out/mislabel.html",
                   help="self-contained HTML page: per scenario the table and all curves")
    p.add_argument("--update-readme", action="store_true",
                   help="rewrite the table section of benchmarks/README.md")
    a = p.parse_args(argv)
    argv = list(argv if argv is not None else sys.argv[1:])
    wanted = [m for m in a.methods.split(",") if m]
    unknown = set(wanted) - {c.name for c in METHODS}
    if unknown:
        raise SystemExit(f"unknown --methods {sorted(unknown)}; rows: "
                         f"{[c.name for c in METHODS]}")
    configs = [c for c in METHODS if not wanted or c.name in wanted]
    untested = set(registry.method_names(builtin_only=True)) - {c.method for c in METHODS}
    if untested:
        print(f"note: registered methods without a row: {sorted(untested)}")

    names = ["brief", "memorised"] if a.scenario == "both" else [a.scenario]
    t_start = time.perf_counter()
    runs = []
    for name in names:
        print(f"\n## scenario: {name}", flush=True)
        runs.append(run_scenario(SCENARIOS[name], configs, a.quick))
    total_s = time.perf_counter() - t_start
    command = ("PYTHONPATH=. .venv/bin/python benchmarks/mislabel.py"
               + "".join(f" {arg}" for arg in argv))
    parts = []
    for run in runs:
        out = table(run.results, run.configs, run.is_flipped, run.notes)
        print(f"\n## scenario: {run.scenario.name}\n\n{run.header}\n\n{out}")
        parts.append(f"### `{run.scenario.name}`\n\n{run.header}\n\n{out}")
    print(f"\ntotal {total_s:.0f}s")
    if a.html:
        page = render_html(runs, command)
        os.makedirs(os.path.dirname(os.path.abspath(a.html)), exist_ok=True)
        with open(a.html, "w", encoding="utf-8") as f:
            f.write(page)
        print(f"page: {a.html}")
    if a.update_readme:
        update_readme(f"```\n{command}\n```\n\nTotal {total_s:.0f} s.\n\n" + "\n\n".join(parts))
        print(f"updated {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
