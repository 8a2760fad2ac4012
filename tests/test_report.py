"""The audit report (``pipelines/report.py``) on real audit run directories, in headless
Chromium.

The fixtures build run directories in exactly the audit layout from real numbers: a small
Keras model trained on scikit-learn's digits (8x8x1 images, 10% of labels flipped) or on
tabular data, with self-influence, losses, predictions, top-k proponents / opponents and the
exact solver's eigenvalues computed by :class:`InfluenceCalculator` (influence, exact, last
layer). Only the spot check is not computed (no refits): its rows are shaped like the
audit's so that the report's plot of them can be checked (``spot_check_for_rendering``).

The browser test needs Chromium (``chromium``, ``chromium-browser``, ``google-chrome`` or
env ``CHROMIUM``); without it the test skips, unless ``REQUIRE_CHROMIUM=1`` (CI), where it
fails. Its screenshot is kept in ``out/test-artifacts/report.png``.
"""

import io
import json
import os
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import keras, tf  # noqa: F401 - TensorFlow set up as in the other tests

from influence_ops import InfluenceCalculator, schemas
from pipelines import report
from tests.test_gcs import gcs  # noqa: F401 - the GCS emulator fixture

REPO = Path(__file__).resolve().parents[1]
RUN_ID = "audit-2026-11-30T02-00"
EARLIER_RUN = "audit-2026-11-29T02-00"
EVIL_ID = "<script>alert('id')</script>&x"
TOP = 12
K = 5
ALL_SECTIONS = ("summary", "distribution", "suspicious", "explain", "spectrum", "spot-check",
                "detection")


# ------------------------------------------------------------------------------ run writer

def spot_check_for_rendering(train_ids, scores, n_train, objective_rows):
    """Rows shaped like the audit's spot check (predicted vs actual change of loss). NOT a
    refit: ``actual`` is ``predicted`` with a deterministic 20% perturbation, so that the
    scatter, Pearson and sign agreement have something to show."""
    rng = np.random.default_rng(1)
    pred = np.asarray(scores, dtype=np.float64) / n_train
    actual = pred * (1 + 0.2 * rng.normal(size=len(pred)))
    return {"rows": [{"train_id": str(i), "predicted": float(p), "actual": float(a)}
                     for i, p, a in zip(train_ids, pred, actual)],
            "pearson": float(np.corrcoef(pred, actual)[0, 1]),
            "sign_agreement": float(np.mean(np.sign(pred) == np.sign(actual))),
            "n": len(pred), "objective_rows": int(objective_rows), "seconds": 1.25}


def write_run_from_calculator(run_dir, model, calc, x, y, ids, queries=None, top=TOP, k=K,
                              spot_check=True, boundaries=True, display_shape=None):
    """Writes an audit run directory (``audit/``, ``explain/``, ``examples/``,
    ``audit_manifest.json``) from a fitted calculator: real self-influence, loss,
    predictions and top-k. ``queries``: ``(qx, qy, query_ids)`` or None (no ``explain/``)."""
    run_dir = Path(run_dir)
    n = len(x)
    score = calc.self_influence((x, y))
    logits = model.predict(x, verbose=0)
    prob = tf.nn.softmax(logits).numpy()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)(
        y, logits).numpy().astype(np.float64)
    predicted = prob.argmax(axis=1)
    order = np.argsort(-score, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(1, n + 1)
    partition = np.where(np.arange(n) % 2 == 0, "day=2026-11-29", "day=2026-11-30")
    cols = {
        "train_id": pa.array(ids, pa.string()), "partition": pa.array(partition, pa.string()),
        "rank": pa.array(rank, pa.int64()), "score": pa.array(score, pa.float64()),
        "loss": pa.array(loss, pa.float64()), "label": pa.array(y.astype(str), pa.string()),
        "predicted": pa.array(predicted.astype(str), pa.string()),
        "confidence": pa.array(prob.max(axis=1).astype(np.float64), pa.float64()),
        "scored_in": pa.array(np.where(partition == "day=2026-11-30", RUN_ID, EARLIER_RUN),
                              pa.string()),
    }
    if boundaries:
        # Layout-shaped values (the report only prints them): inf where there is none.
        b = np.full(n, np.inf)
        b[order[: top // 2]] = score[order[top]]
        cols["sample_boundary"] = pa.array(b, pa.float64())
        cols["weights_boundary"] = pa.array(np.where(rank <= 3, score * 0.9, np.inf),
                                            pa.float64())
    audit = pa.table(cols)
    (run_dir / "audit").mkdir(parents=True)
    half = n // 2  # two files, as a sharded writer would leave them
    pq.write_table(audit.slice(0, half), run_dir / "audit" / "part-00000-of-00002.parquet")
    pq.write_table(audit.slice(half), run_dir / "audit" / "part-00001-of-00002.parquet")

    shown = {int(i) for i in order[:top]}
    query_rows = []
    if queries is not None:
        qx, qy, qids = queries
        res = calc.top_k((qx, qy), (x, y), k=k, train_ids=ids, query_ids=qids)
        explain = schemas.topk_table(qids, res)
        (run_dir / "explain").mkdir()
        pq.write_table(explain, run_dir / "explain" / "part-00000-of-00001.parquet")
        index = {str(t): i for i, t in enumerate(ids)}
        shown |= {index[t] for t in explain.column("train_id").to_pylist()}
        qpred = model.predict(qx, verbose=0).argmax(axis=1)
        query_rows = [(str(qids[j]), "query", str(qy[j]), str(qpred[j]), qx[j])
                      for j in range(len(qx))]
    ex_rows = [(str(ids[i]), "train", str(y[i]), str(predicted[i]), x[i])
               for i in sorted(shown)] + query_rows
    examples = pa.table({
        "example_id": pa.array([r[0] for r in ex_rows], pa.string()),
        "role": pa.array([r[1] for r in ex_rows], pa.string()),
        "label": pa.array([r[2] for r in ex_rows], pa.string()),
        "predicted": pa.array([r[3] for r in ex_rows], pa.string()),
        "shape": pa.array([list(r[4].shape) for r in ex_rows], pa.list_(pa.int32())),
        "values": pa.array([np.asarray(r[4], np.float32).reshape(-1) for r in ex_rows],
                           pa.list_(pa.float32())),
    })
    (run_dir / "examples").mkdir()
    pq.write_table(examples, run_dir / "examples" / "part-00000-of-00001.parquet")

    eig = getattr(getattr(calc.method.curvature, "eigen", None), "lam", None)
    carried = int((partition == "day=2026-11-29").sum())
    manifest = {
        "run_id": RUN_ID, "created": "2026-11-30T02:00:00+00:00",
        "model": {"fingerprint": "sha256:" + "ab12" * 8, "path": str(run_dir / "model.keras")},
        "method": {"method": "influence", "solver": calc.config.solver, "l2": calc.config.l2},
        "artifact": {"key": "influence-exact-ab12", "path": str(run_dir / "artifact"),
                     "reused": False, "fit_seconds": 0.42},
        "partitions": {"scored": ["day=2026-11-30"], "carried": ["day=2026-11-29"]},
        "counts": {"rows": n, "scored_now": n - carried, "carried": carried},
        "display": {"image_shape": list(display_shape) if display_shape else None},
        "spot_check": (spot_check_for_rendering(ids[order[:8]], score[order[:8]], n, n)
                       if spot_check else None),
        "spectrum": (sorted(map(float, eig), reverse=True) if eig is not None else None),
    }
    (run_dir / "audit_manifest.json").write_text(json.dumps(manifest, indent=1))
    return {"score": score, "rank": rank, "order": order, "ids": np.asarray(ids)}


def _train(model, x, y, epochs):
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    from sklearn.datasets import load_digits
    d = load_digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(d.data))
    x = (d.data[order] / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    y = d.target[order].astype(np.int64)
    xtr, ytr, qx, qy = x[:300], y[:300].copy(), x[300:306], y[300:306]
    flipped = rng.choice(300, size=30, replace=False)
    ytr[flipped] = (ytr[flipped] + rng.integers(1, 10, size=30)) % 10
    ids = np.array([f"digit-{i:04d}" for i in range(300)], dtype=object)
    keras.utils.set_random_seed(0)
    model = _train(keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                                     keras.layers.Dense(16, activation="relu", name="hidden"),
                                     keras.layers.Dense(10, name="logits")]), xtr, ytr, 40)
    calc = InfluenceCalculator(model, method="influence", solver="exact",
                               target_layers="logits", l2=1e-3).fit((xtr, ytr))
    # The most suspicious example gets a hostile id: the page must show it as text.
    top1 = int(np.argmax(calc.self_influence((xtr, ytr))))
    ids[top1] = EVIL_ID
    run = tmp_path_factory.mktemp("image_run") / "run"
    facts = write_run_from_calculator(run, model, calc, xtr, ytr, ids.astype(str),
                                      queries=(qx, qy, [f"query-{j}" for j in range(6)]))
    facts["noisy"] = [str(ids[i]) for i in flipped]
    return run, facts


@pytest.fixture(scope="module")
def tabular_run(tmp_path_factory):
    rng = np.random.default_rng(2)
    p, classes, n = 20, 3, 150
    centers = rng.normal(scale=2.0, size=(classes, p))
    y = rng.integers(0, classes, n).astype(np.int64)
    x = (centers[y] + rng.normal(size=(n, p))).astype(np.float32)
    y[:8] = (y[:8] + 1) % classes
    keras.utils.set_random_seed(0)
    model = _train(keras.Sequential([keras.Input((p,)),
                                     keras.layers.Dense(8, activation="tanh", name="hidden"),
                                     keras.layers.Dense(classes, name="logits")]), x, y, 30)
    calc = InfluenceCalculator(model, method="influence", solver="exact",
                               target_layers="logits", l2=1e-3).fit((x, y))
    run = tmp_path_factory.mktemp("tabular_run") / "run"
    ids = np.array([f"row-{i:03d}" for i in range(n)])
    facts = write_run_from_calculator(run, model, calc, x, y, ids, queries=None,
                                      spot_check=False, boundaries=False)
    manifest = json.loads((run / "audit_manifest.json").read_text())
    manifest["spectrum"] = None
    manifest["method"]["solver"] = "pcg"
    (run / "audit_manifest.json").write_text(json.dumps(manifest))
    return run, facts


# ------------------------------------------------------------------------------ DOM parsing

class _Dom(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.ids, self.sections, self.links, self.srcs, self.imgs = [], [], [], [], []
        self.body, self.scripts, self.text = {}, 0, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "section":
            self.sections.append(a.get("id"))
        if tag == "body":
            self.body = a
        if tag == "script":
            self.scripts += 1
        if tag == "img":
            self.imgs.append(a)
        for name in ("href", "xlink:href"):
            if name in a:
                self.links.append(a[name])
        if "src" in a:
            self.srcs.append(a["src"])

    def handle_data(self, data):
        self.text.append(data)


def parse(text):
    d = _Dom()
    d.feed(text)
    d.text = "".join(d.text)
    return d


def expected_images(run):
    """Examples the page shows as images: every top row and, per shown query, the query and
    its first K proponents and opponents (all stored by the run writer)."""
    ex = pq.read_table(run / "explain").to_pylist()
    qids = sorted({r["query_id"] for r in ex})[:report.MAX_QUERIES]
    listed = sum(min(report.MAX_PER_KIND, sum(r["query_id"] == q and r["kind"] == kind
                                               for r in ex))
                 for q in qids for kind in ("proponent", "opponent"))
    return TOP + len(qids) + listed


# ------------------------------------------------------------------------------ unit tests

def test_sections_escaping_images_and_detection(image_run):
    run, facts = image_run
    t0 = time.perf_counter()
    path = report.write_report(str(run), noisy_ids=facts["noisy"], top=TOP)
    print(f"write_report (images, with detection): {time.perf_counter() - t0:.2f} s")
    assert path == str(run / "report" / "index.html")
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o644 & ~umask   # not the temporary file's 0600
    page = Path(path).read_text()
    d = parse(page)
    assert d.sections == list(ALL_SECTIONS)
    # The hostile id is text, never markup: one <script> element (ours), the id escaped.
    assert d.scripts == 1 and "<script>alert" not in page
    assert "&lt;script&gt;alert(&#x27;id&#x27;)&lt;/script&gt;&amp;x" in page
    assert EVIL_ID in d.text
    # One <img> per example shown, each a PNG data URI.
    assert len(d.imgs) == expected_images(run) == int(d.body["data-images-expected"])
    assert all(i["src"].startswith("data:image/png;base64,") for i in d.imgs)
    shown_ids = [i["data-example-id"] for i in d.imgs]
    top_ids = list(facts["ids"][facts["order"][:TOP]])
    assert shown_ids[:TOP] == top_ids          # the suspicious section, in rank order
    # The detection section: found-at rows and the curve.
    det = page[page.index('<section id="detection">'):]
    for f in ("top 5%", "top 10%", "top 20%"):
        assert f in det
    assert "30 known noisy id(s) given; 30 of the audited examples" in det
    assert "<svg" in det
    # Boundary and scored-in columns, spectrum plot and spot check present.
    assert "sample boundary" in page and "weights boundary" in page and "∞" in page
    assert "scored in" in page and EARLIER_RUN in page
    spec = page[page.index('<section id="spectrum">'):page.index('<section id="spot-check">')]
    assert "<svg" in spec and "170 eigenvalues" in spec     # 16*10 + 10 target weights
    spot = page[page.index('<section id="spot-check">'):page.index('<section id="detection">')]
    assert "<svg" in spot and "Pearson" in spot and "y = x" in spot
    dist = page[page.index('<section id="distribution">'):page.index('<section id="suspic')]
    assert "self-influence (log scale)" in dist      # real scores span four decades


def test_image_layouts_and_pngs():
    from PIL import Image
    layout = report.image_layout
    assert layout([8, 8], None) == (8, 8)
    assert layout([8, 8, 1], None) == (8, 8, 1) and layout([5, 6, 3], None) == (5, 6, 3)
    assert layout([3, 5, 6], None) == ("chw", 3, 5, 6)
    assert layout([64], [8, 8]) == (8, 8)                 # display.image_shape: flat inputs
    assert layout([48], [4, 4, 3]) == (4, 4, 3)
    for shape, display in (([64], None), ([20], [8, 8]), ([1, 7], None), ([8, 8, 2], None)):
        assert layout(shape, display) is None, shape      # drawn as a table of values
    rgb = np.random.default_rng(0).random((3, 5, 6)).astype(np.float32)
    uri = report.png_data_uri(rgb.reshape(-1), layout([3, 5, 6], None), (0.0, 1.0))
    import base64
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
        assert im.mode == "RGB" and im.size == (6 * 16, 5 * 16)   # nearest-neighbour x16
        assert im.getpixel((0, 0)) == tuple(round(v * 255) for v in rgb[:, 0, 0])


def test_without_noisy_ids_no_detection_section(image_run):
    run, _ = image_run
    page = Path(report.write_report(str(run), top=TOP)).read_text()
    d = parse(page)
    assert d.sections == list(ALL_SECTIONS[:-1])
    assert "#detection" not in page


def test_tabular_run_features_table_and_fallbacks(tabular_run):
    run, facts = tabular_run
    page = Path(report.write_report(str(run), top=TOP, title="Tabular <audit>")).read_text()
    d = parse(page)
    assert d.sections == list(ALL_SECTIONS[:-1])
    assert d.imgs == [] and d.body["data-images-expected"] == "0"
    assert "<title>Tabular &lt;audit&gt;</title>" in page
    # Wide rows are truncated: 12 of 20 values, then a count.
    assert page.count('<code class="features">') == TOP and "+8 more" in page
    assert "No explain queries in this run." in page
    assert "curvature model of this run has no eigenvalues" in page
    assert "No spot check ran for this run" in page
    assert "sample boundary" not in page


def test_errors_are_named(tmp_path, image_run):
    with pytest.raises(ValueError, match="is not an audit run directory"):
        report.write_report(str(tmp_path))
    run, _ = image_run
    broken = tmp_path / "broken"
    shutil.copytree(run / "audit", broken / "audit")
    with pytest.raises(ValueError, match="audit_manifest.json is missing"):
        report.write_report(str(broken))
    t = pq.read_table(run / "audit" / "part-00000-of-00002.parquet").drop_columns(["loss"])
    pq.write_table(t, broken / "audit" / "part-00000-of-00002.parquet")
    shutil.copy(run / "audit_manifest.json", broken)
    with pytest.raises(ValueError, match=r"part-00000-of-00002.parquet lacks column\(s\) loss"):
        report.write_report(str(broken))


def test_cli(image_run, tmp_path, capsys):
    run, facts = image_run
    ids_file = tmp_path / "noisy.txt"
    ids_file.write_text("\n".join(facts["noisy"][:10] + ["not-in-audit"]) + "\n")
    assert report.main([str(run), "--noisy_ids", str(ids_file), "--top", "5"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == str(run / "report" / "index.html")
    page = Path(out).read_text()
    assert "11 known noisy id(s) given; 10 of the audited examples" in page
    assert "(1 given id(s) are not in this audit)" in page
    assert report.main([str(tmp_path / "nothing")]) == 2
    assert "is not an audit run directory" in capsys.readouterr().err


def test_run_directory_on_gcs(gcs, image_run):  # noqa: F811 - gcs is the fixture
    """The same run read from and written to ``gs://`` (the local GCS emulator)."""
    from influence_ops import storage
    run, facts = image_run
    remote = f"{gcs}/audits/run-1"
    for f in sorted(run.rglob("*")):
        if f.is_file() and "report" not in f.parts:
            storage.write_atomic(storage.join(remote, str(f.relative_to(run))), f.read_bytes())
    path = report.write_report(remote, noisy_ids=facts["noisy"][:5], top=TOP)
    assert path == f"{remote}/report/index.html"
    d = parse(storage.read_text(path))
    assert d.sections == list(ALL_SECTIONS)
    assert len(d.imgs) == expected_images(run)


# ------------------------------------------------------------------------------ Chromium

def find_chromium():
    names = [os.environ["CHROMIUM"]] if os.environ.get("CHROMIUM") else []
    for name in names + ["chromium", "chromium-browser", "google-chrome"]:
        found = shutil.which(name)
        if found:
            return found
    return None


def run_chromium(binary, *args, timeout=60):
    """Chromium's exit code and stdout; its stderr (dbus and GPU chatter) is ignored."""
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--virtual-time-budget=5000", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}: {proc.stderr[-2000:]}"
    return proc.stdout, seconds


def test_report_in_headless_chromium(request, tmp_path):
    binary = find_chromium()
    if binary is None:
        reason = ("no Chromium found (chromium, chromium-browser, google-chrome or env "
                  "CHROMIUM): the report's browser test cannot run")
        if os.environ.get("REQUIRE_CHROMIUM") == "1":
            pytest.fail(reason + " and REQUIRE_CHROMIUM=1")
        pytest.skip(reason)
    run, facts = request.getfixturevalue("image_run")  # trained only when Chromium is here
    path = Path(report.write_report(str(run), noisy_ids=facts["noisy"], top=TOP))
    url = path.resolve().as_uri()

    dom, t_dom = run_chromium(binary, "--dump-dom", url)
    d = parse(dom)
    assert d.sections == list(ALL_SECTIONS)
    total, broken = d.body.get("data-images-total"), d.body.get("data-images-broken")
    assert total is not None, "the load script did not run"
    assert int(total) == expected_images(run) > 0
    assert int(broken) == 0
    assert EVIL_ID in d.text and d.scripts == 1
    dupes = sorted({i for i in d.ids if d.ids.count(i) > 1})
    assert not dupes, f"duplicate element ids (the inline SVGs must not clash): {dupes[:5]}"
    # No broken links: in-page anchors exist, relative files exist; nothing from the network.
    for link in d.links:
        assert not re.match(r"(?i)^\s*(https?:)?//", link), f"external link {link}"
        if link.startswith("#"):
            assert link[1:] in d.ids, f"anchor {link} has no target"
        else:
            assert (path.parent / link).exists(), f"link {link} points nowhere"
    assert any(link.startswith("#summary") for link in d.links)
    for src in d.srcs:
        assert src.startswith("data:") or (path.parent / src).exists(), src[:80]
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", dom, re.I)
    assert not re.search(r"url\(\s*['\"]?\s*(https?:)?//", dom, re.I)

    shot = tmp_path / "report.png"
    _, t_shot = run_chromium(binary, f"--screenshot={shot}", "--window-size=1280,4000", url)
    from PIL import Image
    with Image.open(shot) as im:
        im.load()
        assert im.size == (1280, 4000)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 1, "the screenshot is blank"
    artifacts = REPO / "out" / "test-artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, artifacts / "report.png")
    print(f"chromium: dump-dom {t_dom:.1f} s, screenshot {t_shot:.1f} s; "
          f"screenshot kept in {artifacts / 'report.png'}")
