"""The audit report: one self-contained HTML page made from an audit run directory.

    python -m pipelines.report RUN [--noisy_ids FILE] [--title TEXT] [--top 24]

reads ``RUN/audit/*.parquet`` (every training example ranked by self-influence),
``RUN/explain/*.parquet`` (proponents / opponents of the explain queries, optional),
``RUN/examples/*.parquet`` (the features of the examples shown) and
``RUN/audit_manifest.json``, and writes ``RUN/report/index.html``. ``RUN`` is a local path or
a ``gs://`` URL (read and written through Beam's ``FileSystems``).

The page opens offline: plots are inline SVG (matplotlib, Agg), example images are base64
PNG ``<img>`` (Pillow, nearest-neighbour upscaling), the CSS and the one small script are
inline; nothing is fetched. Sections (``<section id=...>``): ``summary``, ``distribution``,
``suspicious``, ``explain``, ``spectrum``, ``spot-check`` and, with known noisy ids,
``detection``. Every string from the data is HTML-escaped.

After ``load`` the script sets ``document.body.dataset.imagesTotal`` and
``dataset.imagesBroken`` (images not decoded), which the browser test reads back.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import html
import io
import json
import logging
import math
import re
import sys
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

AUDIT_REQUIRED = ("train_id", "partition", "rank", "score", "loss", "label", "predicted",
                  "confidence")
BOUNDARY_COLUMNS = ("sample_boundary", "weights_boundary")
EXPLAIN_REQUIRED = ("query_id", "rank", "train_id", "score", "kind")
EXAMPLES_REQUIRED = ("example_id", "role", "label", "predicted", "shape", "values")
SECTIONS = ("summary", "distribution", "suspicious", "explain", "spectrum", "spot-check",
            "detection")
MAX_QUERIES = 4           # explain queries shown
MAX_PER_KIND = 5          # proponents / opponents shown per query
MAX_FEATURES = 12         # feature values shown per row when the inputs are not images
MAX_SCATTER = 5000        # points of the loss vs score scatter (a sample beyond that)
MAX_CURVE = 2000          # points drawn of the detection curve
MAX_LISTED = 20           # partitions listed by name in the summary
MIN_IMAGE_PX = 96         # tiny images are upscaled (nearest neighbour) to at least this
FOUND_AT = (0.05, 0.10, 0.20)


# ---------------------------------------------------------------------------------- reading

def _join(*parts: str) -> str:
    from apache_beam.io.filesystems import FileSystems
    return FileSystems.join(*parts)


def _match(pattern: str) -> List[str]:
    from apache_beam.io.filesystems import FileSystems
    try:
        result = FileSystems.match([pattern])[0]
    except Exception:  # noqa: BLE001 - some file systems raise when nothing matches
        return []
    return sorted(m.path for m in result.metadata_list)


def _read_bytes(path: str) -> bytes:
    from apache_beam.io.filesystems import FileSystems
    with FileSystems.open(path) as f:
        return f.read()


def _read_parquet(path: str, columns=None):
    import pyarrow.parquet as pq
    try:
        return pq.read_table(io.BytesIO(_read_bytes(path)), columns=columns)
    except Exception as e:  # noqa: BLE001 - name the file whatever went wrong
        raise ValueError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def _check_columns(table, path: str, required: Sequence[str]) -> None:
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise ValueError(f"{path} lacks column(s) {', '.join(missing)} "
                         f"(has {', '.join(table.column_names)})")


def _read_audit(run_dir: str, top: int):
    """``(all_rows, top_rows)``: every row's rank / score / loss / train_id as numpy arrays,
    and every column of the rows with rank <= ``top`` as a list of dicts (by rank)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    paths = _match(_join(run_dir, "audit", "*.parquet"))
    if not paths:
        raise ValueError(f"{run_dir} is not an audit run directory: no audit/*.parquet in it")
    parts: Dict[str, list] = {"train_id": [], "rank": [], "score": [], "loss": []}
    top_tables = []
    for path in paths:
        t = _read_parquet(path)
        _check_columns(t, path, AUDIT_REQUIRED)
        for c in parts:
            parts[c].append(t.column(c).to_numpy(zero_copy_only=False))
        top_tables.append(t.filter(pc.less_equal(t.column("rank"), top)))
    rows = {c: np.concatenate(v) if v else np.array([]) for c, v in parts.items()}
    rows["train_id"] = rows["train_id"].astype(str)
    rows["rank"] = rows["rank"].astype(np.int64)
    rows["score"] = rows["score"].astype(np.float64)
    rows["loss"] = rows["loss"].astype(np.float64)
    top_rows = pa.concat_tables(top_tables, promote_options="default").to_pylist()
    top_rows.sort(key=lambda r: (r["rank"], str(r["train_id"])))
    return rows, top_rows[:top], paths


def _read_optional(run_dir: str, sub: str, required: Sequence[str]):
    import pyarrow as pa
    paths = _match(_join(run_dir, sub, "*.parquet"))
    if not paths:
        return None
    tables = []
    for path in paths:
        t = _read_parquet(path)
        _check_columns(t, path, required)
        tables.append(t.select(list(required)))
    return pa.concat_tables(tables, promote_options="default").to_pylist()


def _read_manifest(run_dir: str) -> dict:
    path = _join(run_dir, "audit_manifest.json")
    if not _match(path):
        raise ValueError(f"{run_dir} is not a complete audit run directory: "
                         f"{path} is missing")
    try:
        manifest = json.loads(_read_bytes(path).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return manifest


def read_noisy_ids(path: str) -> List[str]:
    """Ids from a text file, one per line (blank lines and surrounding spaces ignored)."""
    try:
        text = _read_bytes(path).decode("utf-8")
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot read noisy ids from {path}: {type(e).__name__}: {e}") from e
    return [line.strip() for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------- formatting

def esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt(x, digits: int = 4) -> str:
    if x is None:
        return "–"
    try:
        x = float(x)
    except (TypeError, ValueError):
        return esc(x)
    if math.isnan(x):
        return "–"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return f"{x:.{digits}g}"


def _names(values: Iterable, limit: int = MAX_LISTED) -> str:
    values = [str(v) for v in (values or [])]
    if not values:
        return "<em>none</em>"
    shown = ", ".join(f"<code>{esc(v)}</code>" for v in values[:limit])
    more = len(values) - limit
    return f"{len(values)}: {shown}" + (f" and {more} more" if more > 0 else "")


# ---------------------------------------------------------------------------------- plots

_FIG_COUNTER = [0]


def page_head(title: str) -> str:
    """The start of a self-contained page up to ``</head>``: the report's inline CSS, nothing
    loaded from the network (also used by ``benchmarks/mislabel.py``)."""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{CSS}</style>
</head>
"""


def inline_svg(fig) -> str:
    """A matplotlib figure as inline SVG: text as text (no glyph definitions), ids unique
    on the page, no XML prologue, DOCTYPE or metadata (nothing that names a URL).
    Public: ``benchmarks/mislabel.py`` builds its HTML page with it too."""
    import matplotlib
    _FIG_COUNTER[0] += 1
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none",
                                "svg.hashsalt": f"report-fig-{_FIG_COUNTER[0]}"}):
        fig.savefig(buf, format="svg", bbox_inches="tight",
                    metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    # matplotlib numbers its element ids per figure (figure_1, axes_1, ...): prefix every id
    # and every reference to one, so that several figures on one page never clash.
    prefix = f"fig{_FIG_COUNTER[0]}-"
    text = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}{m.group(1)}"', text)
    text = re.sub(r'(href="#|url\(#)([^")]+)', lambda m: m.group(1) + prefix + m.group(2),
                  text)
    # Natural size in CSS pixels (1 pt = 4/3 px), shrunk by CSS on narrow pages.
    def px(m):
        w, h = (float(v) * 4 / 3 for v in m.group(2, 3))
        return f'<svg{m.group(1)} width="{w:.0f}" height="{h:.0f}" class="plot" role="img"'
    return re.sub(r'^<svg([^>]*?) width="([\d.]+)pt" height="([\d.]+)pt"', px, text, count=1)


def new_figure(ncols: int = 1, width: float = 6.4, height: float = 3.6):
    """A figure without pyplot: no global backend state (Agg / SVG canvases only), nothing
    to close, safe in a notebook that uses another backend."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(1, ncols, squeeze=False)
    for ax in axes[0]:
        ax.grid(True, alpha=0.3)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    return fig, list(axes[0])


def _spans_decades(values: np.ndarray) -> bool:
    return values.size > 1 and bool(np.all(values > 0)) and values.max() / values.min() >= 100


def distribution_plot(score: np.ndarray, loss: np.ndarray, cutoff: Optional[float]) -> str:
    finite = np.isfinite(score)
    s = score[finite]
    fig, (ax, ax2) = new_figure(2, width=10, height=3.6)
    log_x = _spans_decades(s)
    if log_x:
        bins = np.logspace(np.log10(s.min()), np.log10(s.max()), 50)
        ax.set_xscale("log")
    else:
        bins = 50
    ax.hist(s, bins=bins, color="#4c72b0")
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.5)  # a bin of one example stays visible on the log axis
    ax.set_xlabel("self-influence" + (" (log scale)" if log_x else ""))
    ax.set_ylabel("training examples (log scale)")
    ax.set_title("Self-influence of every training example")
    if cutoff is not None and np.isfinite(cutoff):
        ax.axvline(cutoff, color="#c44e52", linestyle="--", linewidth=1,
                   label="cut-off of the examples shown")
        ax.legend(loc="upper right", fontsize=8)
    both = finite & np.isfinite(loss)
    idx = np.flatnonzero(both)
    if idx.size > MAX_SCATTER:
        idx = np.sort(np.random.default_rng(0).choice(idx, MAX_SCATTER, replace=False))
    ax2.scatter(score[idx], loss[idx], s=6, alpha=0.5, color="#4c72b0", linewidths=0)
    if _spans_decades(score[idx]):
        ax2.set_xscale("log")
    if _spans_decades(loss[idx]):
        ax2.set_yscale("log")
    ax2.set_xlabel("self-influence")
    ax2.set_ylabel("loss")
    ax2.set_title("Loss against self-influence" +
                  (f" ({MAX_SCATTER} sampled)" if both.sum() > MAX_SCATTER else ""))
    return inline_svg(fig)


def spectrum_plot(eigenvalues: np.ndarray) -> str:
    fig, (ax,) = new_figure()
    i = np.arange(1, len(eigenvalues) + 1)
    pos = eigenvalues > 0
    ax.semilogy(i[pos], eigenvalues[pos], ".-", markersize=3, color="#4c72b0",
                label="positive")
    if (~pos).any():
        ax.semilogy(i[~pos], np.abs(eigenvalues[~pos]) + 1e-300, "x", color="#c44e52",
                    label="|negative or zero|")
        ax.legend(fontsize=8)
    ax.set_xlabel("index (descending)")
    ax.set_ylabel("eigenvalue (log scale)")
    ax.set_title("Eigenvalues of the curvature model")
    return inline_svg(fig)


def spot_check_plot(predicted: np.ndarray, actual: np.ndarray) -> str:
    fig, (ax,) = new_figure(width=5.2, height=4.4)
    ax.scatter(predicted, actual, s=18, color="#4c72b0", zorder=3)
    both = np.concatenate([predicted, actual])
    both = both[np.isfinite(both)]
    lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="#c44e52", linewidth=1,
            label="y = x (prediction exact)")
    ax.set_xlabel("predicted change of loss (influence)")
    ax.set_ylabel("actual change of loss (refit)")
    ax.set_title("Spot check: influence against refitting")
    ax.legend(fontsize=8)
    return inline_svg(fig)


def detection_plot(inspected: np.ndarray, found: np.ndarray) -> str:
    if len(inspected) > MAX_CURVE:
        idx = np.unique(np.linspace(0, len(inspected) - 1, MAX_CURVE).round().astype(int))
        inspected, found = inspected[idx], found[idx]
    fig, (ax,) = new_figure(width=5.2, height=4.4)
    ax.plot(inspected, found, color="#4c72b0", label="self-influence ranking")
    ax.plot([0, 1], [0, 1], color="#999999", linestyle="--", label="random order")
    for f in FOUND_AT:
        ax.axvline(f, color="#dddddd", linewidth=0.8, zorder=0)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("fraction of training examples inspected")
    ax.set_ylabel("fraction of known noisy examples found")
    ax.set_title("Detection curve")
    ax.legend(fontsize=8, loc="lower right")
    return inline_svg(fig)


# ---------------------------------------------------------------------------------- images

def image_layout(shape: Sequence[int], display_shape: Optional[Sequence[int]]):
    """The (h, w) or (h, w, c) shape to draw an example as, or None for a feature table.

    ``display_shape`` (the manifest's ``display.image_shape``) wins when its size matches;
    otherwise a rank-2 example shape is (h, w) and a rank-3 one with 1, 3 or 4 channels is
    channels-last (or channels-first when only the first axis fits)."""
    shape = [int(s) for s in (shape or [])]
    size = int(np.prod(shape)) if shape else 0
    if display_shape:
        ds = [int(s) for s in display_shape]
        if len(ds) in (2, 3) and int(np.prod(ds)) == size and (len(ds) == 2 or
                                                               ds[2] in (1, 3, 4)):
            return tuple(ds)
    if len(shape) == 2 and min(shape) > 1:
        return tuple(shape)
    if len(shape) == 3 and min(shape[:2]) > 1 and shape[2] in (1, 3, 4):
        return tuple(shape)
    if len(shape) == 3 and shape[0] in (1, 3, 4) and min(shape[1:]) > 1:
        return ("chw",) + tuple(shape)
    return None


def _value_range(examples: Iterable[dict]):
    """One intensity range for every image shown, so that images compare: [0, 1] or
    [0, 255] when the values fit, else their min and max."""
    lo, hi = np.inf, -np.inf
    for ex in examples:
        v = np.asarray(ex["values"], dtype=np.float64)
        v = v[np.isfinite(v)]
        if v.size:
            lo, hi = min(lo, v.min()), max(hi, v.max())
    if not np.isfinite(lo):
        return 0.0, 1.0
    if lo >= 0 and hi <= 1:
        return 0.0, 1.0
    if lo >= 0 and hi <= 255:
        return 0.0, 255.0
    return float(lo), float(hi) if hi > lo else float(lo) + 1.0


def png_data_uri(values, layout, value_range) -> str:
    from PIL import Image
    if layout[0] == "chw":
        c, h, w = layout[1:]
        arr = np.asarray(values, dtype=np.float64).reshape(c, h, w).transpose(1, 2, 0)
    else:
        arr = np.asarray(values, dtype=np.float64).reshape(layout)
    lo, hi = value_range
    arr = np.nan_to_num((arr - lo) / (hi - lo), nan=0.0, posinf=1.0, neginf=0.0)
    arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    mode = {2: "L"}.get(arr.ndim) or {3: "RGB", 4: "RGBA"}[arr.shape[2]]
    img = Image.fromarray(arr, mode=mode)
    h, w = arr.shape[:2]
    scale = max(1, math.ceil(MIN_IMAGE_PX / max(h, w)))
    if scale > 1:
        img = img.resize((w * scale, h * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class ExampleRenderer:
    """Renders one stored example as an ``<img>`` or as a truncated row of its values."""

    def __init__(self, examples: Optional[List[dict]], display_shape):
        self.by_id: Dict[tuple, dict] = {}
        self.any_id: Dict[str, dict] = {}
        for ex in examples or []:
            self.by_id[(str(ex["role"]), str(ex["example_id"]))] = ex
            self.any_id.setdefault(str(ex["example_id"]), ex)
        self.display_shape = display_shape
        layouts = {image_layout(ex["shape"], display_shape) for ex in examples or []}
        self.images = bool(examples) and None not in layouts
        self.range = _value_range(examples or []) if self.images else None
        self.rendered = 0   # <img> elements written

    def get(self, example_id, role: str) -> Optional[dict]:
        return self.by_id.get((role, str(example_id))) or self.any_id.get(str(example_id))

    def html(self, example_id, role: str, caption: str = "") -> str:
        ex = self.get(example_id, role)
        if ex is None:
            return '<span class="missing">features not stored</span>'
        if self.images:
            layout = image_layout(ex["shape"], self.display_shape)
            uri = png_data_uri(ex["values"], layout, self.range)
            self.rendered += 1
            alt = f"{role} example {example_id}" + (f", {caption}" if caption else "")
            return (f'<img class="example" src="{uri}" alt="{esc(alt)}" '
                    f'data-example-id="{esc(example_id)}">')
        values = list(ex["values"] or [])
        shown = " ".join(fmt(v, 3) for v in values[:MAX_FEATURES])
        more = len(values) - MAX_FEATURES
        tail = f' <span class="muted">… +{more} more</span>' if more > 0 else ""
        return f'<code class="features">{shown}</code>{tail}'


# ---------------------------------------------------------------------------------- sections

def _section(sid: str, heading: str, body: str) -> str:
    return (f'<section id="{sid}">\n<h2>{esc(heading)}</h2>\n{body}\n</section>\n')


def _summary(manifest: dict, rows: dict, audit_files: int) -> str:
    model = manifest.get("model") or {}
    method = dict(manifest.get("method") or {})
    artifact = manifest.get("artifact") or {}
    parts = manifest.get("partitions") or {}
    counts = manifest.get("counts") or {}
    name = method.pop("method", None)
    solver = method.pop("solver", None)
    others = ", ".join(f"{esc(k)}={esc(json.dumps(v))}" for k, v in sorted(method.items()))
    if artifact.get("reused"):
        art = "reused (fitted by an earlier run)"
    else:
        fs = artifact.get("fit_seconds")
        art = "fitted by this run" + (f" in {fmt(fs, 3)} s" if fs is not None else "")
    items = [
        ("run id", f"<code>{esc(manifest.get('run_id'))}</code>"),
        ("created", esc(manifest.get("created"))),
        ("model", f"<code>{esc(model.get('fingerprint'))}</code> "
                  f"<span class=\"muted\">{esc(model.get('path'))}</span>"),
        ("method", f"{esc(name)}" + (f", solver {esc(solver)}" if solver else "") +
                   (f' <span class="muted">({others})</span>' if others else "")),
        ("curvature artifact", f"{art} <span class=\"muted\">key <code>"
                               f"{esc(artifact.get('key'))}</code>, "
                               f"{esc(artifact.get('path'))}</span>"),
        ("partitions scored now", _names(parts.get("scored"))),
        ("partitions carried over", _names(parts.get("carried"))),
        ("rows", f"{esc(counts.get('rows'))} ranked: {esc(counts.get('scored_now'))} scored "
                 f"by this run, {esc(counts.get('carried'))} carried from earlier runs"),
    ]
    body = "<dl class=\"facts\">\n" + "\n".join(
        f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items) + "\n</dl>"
    n = len(rows["rank"])
    if counts.get("rows") is not None and counts.get("rows") != n:
        body += (f'<p class="warning">The manifest counts {esc(counts.get("rows"))} rows but '
                 f"the {audit_files} audit file(s) hold {n}.</p>")
    return _section("summary", "Summary", body)


def _distribution(rows: dict, top_rows: List[dict]) -> str:
    score = rows["score"]
    finite = score[np.isfinite(score)]
    if not finite.size:
        return _section("distribution", "Distribution of self-influence",
                        "<p>No finite self-influence score in the audit.</p>")
    cutoff = float(top_rows[-1]["score"]) if top_rows else None
    q = np.quantile(finite, [0.5, 0.9, 0.99])
    text = (f"<p>{len(score)} training examples; median self-influence {fmt(q[0])}, "
            f"90th percentile {fmt(q[1])}, 99th {fmt(q[2])}, largest {fmt(finite.max())}. "
            "Examples in the long right tail are the hardest for the model to fit: "
            "mislabeled and atypical examples rank first.</p>")
    if len(finite) < len(score):
        text += f"<p class=\"warning\">{len(score) - len(finite)} non-finite score(s) left " \
                "out of the plots.</p>"
    return _section("distribution", "Distribution of self-influence",
                    text + f'<figure>{distribution_plot(score, rows["loss"], cutoff)}</figure>')


def _suspicious(top_rows: List[dict], renderer: ExampleRenderer, run_id, top: int) -> str:
    if not top_rows:
        return _section("suspicious", "Most suspicious examples", "<p>The audit is empty.</p>")
    bounds = [c for c in BOUNDARY_COLUMNS if c in top_rows[0]]
    show_scored_in = "scored_in" in top_rows[0] and any(
        r.get("scored_in") not in (None, run_id) for r in top_rows)
    head = ["rank", "example", "train id", "given → predicted", "confidence",
            "self-influence", "loss", "partition"] + [b.replace("_", " ") for b in bounds]
    if show_scored_in:
        head.append("scored in")
    out = []
    for r in top_rows:
        disagree = str(r["label"]) != str(r["predicted"])
        cells = [
            f'<span class="rank">{int(r["rank"])}</span>',
            renderer.html(r["train_id"], "train",
                          f"given {r['label']}, predicted {r['predicted']}"),
            f"<code>{esc(r['train_id'])}</code>",
            f"<strong>{esc(r['label'])}</strong> → {esc(r['predicted'])}",
            fmt(r["confidence"], 3),
            fmt(r["score"]),
            fmt(r["loss"]),
            esc(r["partition"]),
        ] + [fmt(r.get(b)) for b in bounds]
        if show_scored_in:
            si = r.get("scored_in")
            cells.append("this run" if si == run_id else f"<code>{esc(si)}</code>")
        cls = ' class="disagree"' if disagree else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    n_dis = sum(str(r["label"]) != str(r["predicted"]) for r in top_rows)
    intro = (f"<p>The {len(top_rows)} training examples with the highest self-influence "
             f"(of the top {top} asked for). In {n_dis} of them the model predicts another "
             "label than the one given (highlighted): likely mislabeled. The others are "
             "atypical or ambiguous examples worth a look.</p>")
    if bounds:
        intro += ("<p class=\"muted\">The boundary columns are shown as the audit wrote "
                  "them (∞: unbounded).</p>")
    table = ("<div class=\"scroll\"><table class=\"ranked\">\n<thead><tr>" +
             "".join(f"<th>{h}</th>" for h in head) + "</tr></thead>\n<tbody>\n" +
             "\n".join(out) + "\n</tbody></table></div>")
    return _section("suspicious", "Most suspicious examples", intro + table)


def _explain(explain: Optional[List[dict]], renderer: ExampleRenderer) -> str:
    if not explain:
        return _section("explain", "Explained predictions",
                        "<p>No explain queries in this run.</p>")
    by_query: Dict[str, Dict[str, list]] = {}
    for r in explain:
        by_query.setdefault(str(r["query_id"]), {"proponent": [], "opponent": []})
        by_query[str(r["query_id"])].setdefault(str(r["kind"]), []).append(r)
    qids = sorted(by_query)
    blocks = [f"<p>Each query with the training examples that most support its prediction "
              f"(proponents: removing them would raise the query's loss) and most oppose it "
              f"(opponents). Showing {min(len(qids), MAX_QUERIES)} of {len(qids)} "
              f"quer{'y' if len(qids) == 1 else 'ies'}.</p>"]
    for qid in qids[:MAX_QUERIES]:
        q = renderer.get(qid, "query")
        qdesc = (f"given <strong>{esc(q['label'])}</strong>, predicted {esc(q['predicted'])}"
                 if q else "")
        lists = []
        for kind, title in (("proponent", "Proponents"), ("opponent", "Opponents")):
            rows = sorted(by_query[qid].get(kind, []), key=lambda r: int(r["rank"]))
            cards = []
            for r in rows[:MAX_PER_KIND]:
                ex = renderer.get(r["train_id"], "train")
                lab = (f"<br>given <strong>{esc(ex['label'])}</strong>, "
                       f"predicted {esc(ex['predicted'])}") if ex else ""
                cards.append(f'<div class="card">{renderer.html(r["train_id"], "train")}'
                             f'<div class="caption">#{int(r["rank"])} '
                             f'<code>{esc(r["train_id"])}</code><br>score {fmt(r["score"])}'
                             f"{lab}</div></div>")
            lists.append(f'<div class="kind {kind}"><h4>{title}</h4><div class="cards">' +
                         ("".join(cards) or "<p class=\"muted\">none</p>") + "</div></div>")
        blocks.append(f'<div class="query"><h3>Query <code>{esc(qid)}</code></h3>'
                      f'<div class="query-row"><div class="card query-card">'
                      f'{renderer.html(qid, "query")}<div class="caption">{qdesc}</div></div>'
                      f'<div class="lists">{"".join(lists)}</div></div></div>')
    return _section("explain", "Explained predictions", "\n".join(blocks))


def _spectrum(manifest: dict) -> str:
    spectrum = manifest.get("spectrum")
    if not spectrum:
        return _section("spectrum", "Curvature spectrum",
                        "<p>The curvature model of this run has no eigenvalues to show "
                        f"(solver {esc((manifest.get('method') or {}).get('solver'))}); "
                        "the manifest records a spectrum only for eigendecompositions.</p>")
    ev = np.asarray(spectrum, dtype=np.float64)
    pos = ev[ev > 0]
    cond = (f", ratio largest / smallest positive {fmt(pos.max() / pos.min(), 3)}"
            if pos.size > 1 else "")
    text = (f"<p>{len(ev)} eigenvalues of the curvature model (H + damping), largest "
            f"{fmt(ev.max())}, smallest {fmt(ev.min())}{cond}. Small eigenvalues dominate "
            "the inverse Hessian: directions the data barely constrains weigh most in the "
            f"scores.</p>")
    if (ev <= 0).any():
        text += (f"<p class=\"warning\">{int((ev <= 0).sum())} eigenvalue(s) are zero or "
                 "negative (a non-convex objective at these weights).</p>")
    return _section("spectrum", "Curvature spectrum",
                    text + f"<figure>{spectrum_plot(ev)}</figure>")


def _spot_check(manifest: dict) -> str:
    sc = manifest.get("spot_check")
    if not sc:
        return _section("spot-check", "Spot check against refitting",
                        "<p>No spot check ran for this run: the influence scores were not "
                        "compared with refitting the model without examples.</p>")
    pts = sc.get("rows") or []
    pred = np.array([float(r["predicted"]) for r in pts], dtype=np.float64)
    act = np.array([float(r["actual"]) for r in pts], dtype=np.float64)
    text = ("<p>A few training examples were each removed and the model refit; each point is "
            "one of them: the change of loss the influence scores predict (x) against the "
            "change measured after refitting (y). Points on the line y = x mean the "
            "estimates are right in size; a Pearson correlation near 1 means the ranking can "
            "be trusted even where the scale is off; sign agreement is the fraction of "
            "examples where prediction and refit agree on the direction of the change.</p>")
    facts = (f'<dl class="facts"><dt>Pearson</dt><dd>{fmt(sc.get("pearson"), 3)}</dd>'
             f'<dt>sign agreement</dt><dd>{fmt(sc.get("sign_agreement"), 3)}</dd>'
             f'<dt>examples refit</dt><dd>{esc(sc.get("n", len(pts)))}</dd>'
             f'<dt>objective rows</dt><dd>{esc(sc.get("objective_rows"))}</dd>'
             f'<dt>time</dt><dd>{fmt(sc.get("seconds"), 3)} s</dd></dl>')
    fig = f"<figure>{spot_check_plot(pred, act)}</figure>" if len(pts) else \
        "<p class=\"muted\">The spot check lists no rows.</p>"
    return _section("spot-check", "Spot check against refitting",
                    text + f'<div class="pair">{fig}{facts}</div>')


def _detection(rows: dict, noisy_ids: Sequence[str]) -> str:
    from influence_ops import detection
    noisy = {str(i) for i in noisy_ids}
    ids = rows["train_id"]
    is_noisy = np.isin(ids, np.array(sorted(noisy), dtype=str)) if noisy else \
        np.zeros(len(ids), dtype=bool)
    matched = int(is_noisy.sum())
    absent = len(noisy) - len(set(ids[is_noisy]))
    head = (f"<p>{len(noisy)} known noisy id(s) given; {matched} of the audited examples "
            f"are among them" + (f" ({absent} given id(s) are not in this audit)" if absent
                                 else "") + ".</p>")
    if matched == 0:
        return _section("detection", "Detection of known noisy examples", head +
                        "<p class=\"warning\">None of the given ids is in the audit: "
                        "no detection curve.</p>")
    # The audit's own order (rank 1 first), not a re-sort of the scores.
    order_score = -rows["rank"].astype(np.float64)
    inspected, found = detection.detection_curve(order_score, is_noisy)
    at = detection.found_at(order_score, is_noisy, FOUND_AT)
    auc = detection.area_under_curve(order_score, is_noisy)
    table = ("<table class=\"small\"><thead><tr><th>inspected</th><th>noisy found</th>"
             "<th>random order</th></tr></thead><tbody>" +
             "".join(f"<tr><td>top {f:.0%}</td><td>{v:.1%}</td><td>{f:.0%}</td></tr>"
                     for f, v in at.items()) +
             f"</tbody></table><p>Area under the curve {auc:.3f} (0.5 = random order, "
             "1 = every noisy example first).</p>")
    text = ("<p>Inspect the training examples in the audit's order, most suspicious "
            "first: the curve is the fraction of the known noisy examples found against the "
            "fraction inspected; the dashed diagonal is a random order.</p>")
    return _section("detection", "Detection of known noisy examples",
                    head + text + f'<div class="pair"><figure>'
                    f"{detection_plot(inspected, found)}</figure><div>{table}</div></div>")


# ---------------------------------------------------------------------------------- page

CSS = """
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --bg:#ffffff; --soft:#f6f8fa;
        --accent:#0969da; --warn:#9a6700; --bad:#fff1f0; }
* { box-sizing: border-box; }
body { margin:0; font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
       sans-serif; color:var(--fg); background:var(--bg); }
header { padding: 1.2rem 2rem .6rem; border-bottom:1px solid var(--line); background:var(--soft); }
header h1 { margin:0 0 .2rem; font-size:1.5rem; }
nav { position: sticky; top:0; z-index:1; background:var(--bg); border-bottom:1px solid var(--line);
      padding:.4rem 2rem; }
nav a { margin-right:1.1rem; color:var(--accent); text-decoration:none; font-weight:500; }
nav a:hover { text-decoration:underline; }
main { max-width: 1280px; padding: 0 2rem 3rem; }
section { padding-top: 1rem; border-bottom:1px solid var(--line); padding-bottom:1.2rem; }
h2 { font-size:1.25rem; margin:.6rem 0; }
h3 { font-size:1.05rem; margin:1rem 0 .4rem; }
h4 { font-size:.9rem; margin:.2rem 0 .3rem; color:var(--muted); text-transform:uppercase;
     letter-spacing:.04em; }
code { font: 13px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
       background:var(--soft); padding:0 .25em; border-radius:3px; word-break: break-all; }
.muted { color:var(--muted); }
.warning { color:var(--warn); }
dl.facts { display:grid; grid-template-columns: max-content 1fr; gap:.25rem 1.2rem;
           margin:.4rem 0; }
dl.facts dt { color:var(--muted); }
dl.facts dd { margin:0; }
figure { margin: .6rem 0; }
svg.plot { max-width:100%; height:auto; }
.pair { display:flex; flex-wrap:wrap; gap:1.5rem; align-items:flex-start; }
.pair figure { flex: 0 1 520px; }
.scroll { overflow-x:auto; }
table { border-collapse: collapse; font-size:14px; }
th, td { border-bottom:1px solid var(--line); padding:.3rem .5rem; text-align:left;
         vertical-align: middle; }
th { background:var(--soft); font-weight:600; }
td { font-variant-numeric: tabular-nums; }
td code { word-break: normal; overflow-wrap: anywhere; background: none; }
td:nth-child(3) { min-width: 8em; max-width: 18em; }
td:nth-child(8) { white-space: nowrap; }
.rank { font-weight: 600; }
tr.disagree td { background: var(--bad); }
img.example { image-rendering: pixelated; image-rendering: crisp-edges; display:block;
              width: 72px; height: auto; border:1px solid var(--line); background:#000; }
.card img.example { width: 84px; }
code.features { white-space: nowrap; }
.missing { color:var(--muted); font-style: italic; font-size: 13px; }
.query { margin: .8rem 0 1.2rem; }
.query-row { display:grid; grid-template-columns: max-content 1fr; gap:1.4rem;
             align-items:start; }
.lists { display:flex; flex-direction:column; gap:.6rem; }
.cards { display:flex; flex-wrap:wrap; gap:.6rem; }
.card { width: 104px; font-size: 12px; line-height: 1.35; }
.card .caption { margin-top:.2rem; color:var(--muted); }
.card code { font-size: 11px; }
.query-card { padding:.4rem; border:2px solid var(--accent); border-radius:4px; width:auto; }
.kind.proponent h4 { color:#1a7f37; }
.kind.opponent h4 { color:#cf222e; }
table.small td, table.small th { padding:.2rem .7rem; }
footer { padding: 1rem 2rem; color: var(--muted); font-size: 13px; }
"""

SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (im) { return !im.complete || im.naturalWidth === 0; });
  document.body.dataset.imagesTotal = String(imgs.length);
  document.body.dataset.imagesBroken = String(broken.length);
});
"""

HEADINGS = {"summary": "Summary", "distribution": "Distribution", "suspicious": "Suspicious",
            "explain": "Explain", "spectrum": "Spectrum", "spot-check": "Spot check",
            "detection": "Detection"}


def render_html(manifest: dict, rows: dict, top_rows: List[dict], explain, examples,
                noisy_ids=None, title: Optional[str] = None, top: int = 24,
                run_dir: str = "", audit_files: int = 0) -> str:
    """The page as a string (no I/O): what :func:`write_report` writes."""
    run_id = manifest.get("run_id")
    title = title or f"Data audit {run_id}"
    display = (manifest.get("display") or {}).get("image_shape")
    renderer = ExampleRenderer(examples, display)
    sections = [_summary(manifest, rows, audit_files), _distribution(rows, top_rows),
                _suspicious(top_rows, renderer, run_id, top), _explain(explain, renderer),
                _spectrum(manifest), _spot_check(manifest)]
    ids = list(SECTIONS[:-1])
    if noisy_ids is not None:
        sections.append(_detection(rows, list(noisy_ids)))
        ids.append("detection")
    nav = "".join(f'<a href="#{s}">{HEADINGS[s]}</a>' for s in ids)
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return page_head(title) + f"""<body data-images-expected="{renderer.rendered}">
<header><h1>{esc(title)}</h1>
<div class="muted">Run <code>{esc(run_id)}</code>, created {esc(manifest.get("created"))};
report generated {now} from <code>{esc(run_dir)}</code>.</div></header>
<nav>{nav}</nav>
<main>
{"".join(sections)}
</main>
<footer>Self-influence g<sup>T</sup>H<sup>-1</sup>g: how much an example's own loss depends on
having it in the training set. Written by <code>pipelines.report</code>; this page loads
nothing from the network.</footer>
<script>{SCRIPT}</script>
</body>
</html>
"""


def _readable(path: str) -> None:
    """The atomic write's temporary file is private (0600); a report is for reading: give a
    local one the usual mode (0644 less the umask)."""
    import os
    from pipelines.finalize import _local, is_local
    if is_local(path):
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(_local(path), 0o644 & ~umask)


def write_report(run_dir: str, noisy_ids=None, title: str = None, top: int = 24) -> str:
    """Writes ``RUN/report/index.html`` from the audit run directory ``run_dir`` (local or
    ``gs://``) and returns its path.

    ``noisy_ids``: ids of examples known to be noisy (e.g. the flipped labels of a benchmark);
    adds the detection section. ``top``: how many of the most suspicious examples to show.
    Raises ValueError naming the problem when ``run_dir`` is not an audit run directory or a
    file in it lacks a column of the layout."""
    from pipelines.finalize import write_atomic
    if int(top) < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    run_dir = str(run_dir).rstrip("/")
    rows, top_rows, audit_paths = _read_audit(run_dir, int(top))
    manifest = _read_manifest(run_dir)
    explain = _read_optional(run_dir, "explain", EXPLAIN_REQUIRED)
    examples = _read_optional(run_dir, "examples", EXAMPLES_REQUIRED)
    page = render_html(manifest, rows, top_rows, explain, examples, noisy_ids=noisy_ids,
                       title=title, top=int(top), run_dir=run_dir,
                       audit_files=len(audit_paths))
    path = _join(run_dir, "report", "index.html")
    write_atomic(path, page.encode("utf-8"))
    _readable(path)
    log.info("report: wrote %s (%d bytes)", path, len(page))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.report",
                                description="Write RUN/report/index.html from an audit run "
                                            "directory (local or gs://).")
    p.add_argument("run_dir", metavar="RUN", help="audit run directory")
    p.add_argument("--noisy_ids", metavar="FILE",
                   help="ids of known noisy examples, one per line: adds the detection curve")
    p.add_argument("--title", default=None, help="page title (default: 'Data audit RUN_ID')")
    p.add_argument("--top", type=int, default=24, help="most suspicious examples shown")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        noisy = read_noisy_ids(args.noisy_ids) if args.noisy_ids else None
        path = write_report(args.run_dir, noisy_ids=noisy, title=args.title, top=args.top)
    except (ValueError, RuntimeError, OSError) as e:  # one line, exit 2, like beam-influence
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
