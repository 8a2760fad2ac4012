"""Data-audit building blocks, Beam-free: rankings that merge across runs, and a faithfulness
spot check by real retraining.

A scheduled audit ranks every training example by self-influence (``g_i^T H^-1 g_i``: how
much the example's own loss depends on the example being in the training set; mislabeled
and atypical examples rank first). The pipeline's ``audit`` entry point
(``pipelines/audit.py``) and the notebook API (``InfluenceCalculator.audit``) share what is
here:

* :func:`rank_table` / :func:`merge_rankings`: the audit table (one row per training
  example, ``rank`` 1 = most suspicious, ties by id). Self-influence of an example depends
  only on the fitted method and the example, so rows scored by an earlier run with the same
  fitted method merge with new rows into exactly the ranking a full recompute gives.
* :func:`merge_topk`: the "explain" queries' proponents and opponents, merged the same way
  (the k best of a union are among the k best of its parts).
* :func:`merge_sample`: the spot check's objective rows, the S smallest id hashes.
* :func:`retrain_check` (the spot check): for a few top-ranked examples, refit the target
  layers without each of them (warm start, L-BFGS to convergence on the objective
  ``(1/n) sum_j w_j l_j + 1/2 theta^T diag(l2) theta``, the removed example's weight set to 0 and ``n`` kept: the sum
  form influence functions linearise) and compare the predicted change of the example's own
  loss, ``score / n``, with the actual change. Pearson and sign agreement over the checked
  examples say how far to trust the ranking; ``drift`` says how far the model's weights are
  from a minimum of that objective (influence assumes a minimum: a large drift means the model
  was not trained to convergence on it, e.g. stopped early or trained without the L2 the
  objective states).

Cost of the spot check: ``r + 1`` refits of the target layers over ``n`` cached front
activations (``r`` examples checked; each refit a few dozen to a few hundred L-BFGS steps, one
forward+backward of the target layers over the ``n`` rows each). Cheap when the targets are the
last layer(s); the frozen layers below run once.
"""

from __future__ import annotations

import logging
import time
import zlib
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)

AUDIT_COLUMNS = ("train_id", "partition", "rank", "score", "loss", "label", "predicted",
                 "confidence")


def uniform_from_ids(ids, seed: int) -> np.ndarray:
    """A deterministic U(0,1) draw per example id (stable sampling across runners and runs):
    the fit sample and the audit's spot-check sample are the ids with the smallest draws."""
    return np.array([zlib.crc32(f"{seed}:{i}".encode()) for i in np.asarray(ids).tolist()],
                    dtype=np.float64) / 2.0 ** 32


def audit_schema(boundary=()) -> pa.Schema:
    """One row per training example, most suspicious first (``rank`` 1)."""
    fields = [("train_id", pa.string()), ("partition", pa.string()), ("rank", pa.int64()),
              ("score", pa.float64()), ("loss", pa.float64()), ("label", pa.string()),
              ("predicted", pa.string()), ("confidence", pa.float64())]
    fields += [(b, pa.float64()) for b in boundary]
    fields.append(("scored_in", pa.string()))
    return pa.schema(fields)


def boundary_columns(table: pa.Table) -> tuple:
    return tuple(c for c in ("sample_boundary", "weights_boundary") if c in table.column_names)


def rank_table(rows: pa.Table, scored_in: Optional[str] = None) -> pa.Table:
    """Rows with ``train_id, score, ...`` -> the audit table: sorted by score (descending,
    ties by id), ``rank`` 1..n. ``scored_in`` fills a missing ``scored_in`` column."""
    n = rows.num_rows
    if "scored_in" not in rows.column_names:
        rows = rows.append_column("scored_in", pa.array([scored_in or ""] * n, pa.string()))
    ids = np.asarray(rows.column("train_id").to_pylist(), dtype=object)
    uniq, counts = np.unique(ids.astype(str), return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1]
        raise ValueError(f"{len(dup)} training id(s) occur in more than one partition, first: "
                         f"{', '.join(map(repr, dup[:3]))}: ids must be unique across the "
                         "audited partitions (name files uniquely or use --id_key)")
    score = rows.column("score").to_numpy(zero_copy_only=False)
    order = np.lexsort((ids.astype(str), -score))
    rows = rows.take(pa.array(order))
    if "rank" in rows.column_names:
        rows = rows.drop(["rank"])
    rows = rows.append_column("rank", pa.array(np.arange(1, n + 1, dtype=np.int64)))
    schema = audit_schema(boundary_columns(rows))
    for name in schema.names:
        if name not in rows.column_names:
            rows = rows.append_column(name, pa.nulls(n, schema.field(name).type))
    return rows.select(schema.names).cast(schema)


def merge_rankings(previous: Optional[pa.Table], new: pa.Table, run_id: str,
                   keep_partitions=None) -> pa.Table:
    """The audit table of ``previous`` rows (only those of ``keep_partitions`` when given)
    plus ``new`` rows (scored by ``run_id``), ranked again."""
    new = new.append_column("scored_in", pa.array([run_id] * new.num_rows, pa.string())) \
        if "scored_in" not in new.column_names else new
    parts = [new]
    if previous is not None and previous.num_rows:
        if keep_partitions is not None:
            keep = np.isin(np.asarray(previous.column("partition").to_pylist(), dtype=str),
                           np.asarray(sorted(keep_partitions), dtype=str))
            previous = previous.filter(pa.array(keep))
        parts.append(previous.drop(["rank"]))
    cols = new.column_names
    parts = [p.select([c for c in cols if c in p.column_names]) for p in parts]
    common = [c for c in cols if all(c in p.column_names for p in parts)]
    merged = pa.concat_tables([p.select(common).cast(parts[0].select(common).schema)
                               for p in parts])
    return rank_table(merged)


def merge_topk(tables: List[pa.Table], k: int) -> pa.Table:
    """Top-k tables (query_id, rank, train_id, score, kind) over disjoint training sets ->
    the top-k over their union: proponents by score descending, opponents ascending, ties by
    train id, ranks 1..k per query and kind."""
    from influence_ops.schemas import TOPK_SCHEMA
    tables = [t for t in tables if t is not None and t.num_rows]
    if not tables:
        return TOPK_SCHEMA.empty_table()
    t = pa.concat_tables([x.select(TOPK_SCHEMA.names).cast(TOPK_SCHEMA) for x in tables])
    q = np.asarray(t.column("query_id").to_pylist(), dtype=str)
    tid = np.asarray(t.column("train_id").to_pylist(), dtype=str)
    kind = np.asarray(t.column("kind").to_pylist(), dtype=str)
    s = t.column("score").to_numpy(zero_copy_only=False)
    key = np.where(kind == "proponent", -s, s)
    order = np.lexsort((tid, key, kind, q))
    q, tid, kind, s = q[order], tid[order], kind[order], s[order]
    group = np.concatenate([[True], (q[1:] != q[:-1]) | (kind[1:] != kind[:-1])])
    start = np.maximum.accumulate(np.where(group, np.arange(len(q)), 0))
    rank = np.arange(len(q)) - start + 1
    keep = rank <= k
    out = {"query_id": q[keep], "rank": rank[keep].astype(np.int32), "train_id": tid[keep],
           "score": s[keep], "kind": kind[keep]}
    # The accumulator's layout: per query, proponents then opponents.
    order = np.lexsort((out["rank"], out["kind"] != "proponent", out["query_id"]))
    return pa.table({c: v[order] for c, v in out.items()}, schema=TOPK_SCHEMA)


def merge_sample(tables: List[pa.Table], size: int, seed: int) -> Optional[pa.Table]:
    """The ``size`` rows with the smallest id hash (``--sample_rows``) of several samples."""
    tables = [t for t in tables if t is not None and t.num_rows]
    if not tables:
        return None
    t = pa.concat_tables(tables)
    ids = np.asarray(t.column("example_id").to_pylist(), dtype=str)
    ids, first = np.unique(ids, return_index=True)
    t = t.take(pa.array(first))
    u = uniform_from_ids(ids, seed)
    keep = np.lexsort((ids, u))[:size]
    return t.take(pa.array(np.sort(keep)))


def shown_ids(ranking: pa.Table, explain: Optional[pa.Table], top: int,
              explain_queries: int):
    """``(train ids, query ids)`` whose inputs the report shows: the ``top`` highest-ranked
    training examples, the first ``explain_queries`` queries (in id order) and the train
    examples listed for them."""
    want_train = set(np.asarray(ranking.column("train_id").to_pylist()[:top], dtype=str))
    want_query = []
    if explain is not None and explain.num_rows:
        want_query = sorted(set(explain.column("query_id").to_pylist()))[:explain_queries]
        listed = np.isin(np.asarray(explain.column("query_id").to_pylist(), dtype=str),
                         np.asarray(want_query, dtype=str))
        want_train |= set(np.asarray(explain.column("train_id").to_pylist(),
                                     dtype=str)[listed])
    return sorted(want_train), want_query


def select_examples(tables: List[pa.Table], ranking: pa.Table, explain: Optional[pa.Table],
                    top: int, explain_queries: int) -> Optional[pa.Table]:
    """The example rows the report shows: the ``top`` highest-ranked training examples, the
    first ``explain_queries`` queries and their listed train examples (from the union of the
    examples tables of the runs that scored them)."""
    tables = [t for t in tables if t is not None and t.num_rows]
    if not tables:
        return None
    t = pa.concat_tables(tables)
    ids = np.asarray(t.column("example_id").to_pylist(), dtype=str)
    role = np.asarray(t.column("role").to_pylist(), dtype=str)
    want_train, want_query = shown_ids(ranking, explain, top, explain_queries)
    keep = np.where(role == "query", np.isin(ids, want_query or [""]),
                    np.isin(ids, want_train or [""]))
    # One row per (id, role): the newest table wins (tables are given oldest first).
    seen, rows = set(), []
    for i in range(len(ids) - 1, -1, -1):
        if keep[i] and (ids[i], role[i]) not in seen:
            seen.add((ids[i], role[i]))
            rows.append(i)
    return t.take(pa.array(sorted(rows)))


def examples_arrays(table: pa.Table):
    """``(ids, x, y)`` from an examples table (every row the same shape)."""
    ids = np.asarray(table.column("example_id").to_pylist(), dtype=str)
    shapes = table.column("shape").to_pylist()
    if len({tuple(s) for s in shapes}) > 1:
        raise ValueError("examples of different shapes cannot be stacked")
    shape = tuple(shapes[0]) if shapes else ()
    x = np.stack([np.asarray(v, np.float32).reshape(shape)
                  for v in table.column("values").to_pylist()]) if len(ids) else None
    y = np.stack([np.asarray(v, np.float64) for v in table.column("y_values").to_pylist()]) \
        if len(ids) else None
    return ids, x, y


# ---------------------------------------------------------------------------- spot check

def _objective_fn(imodel, h, y, n):
    """``theta -> (objective, gradient)`` in float64 numpy over cached front activations."""
    import tensorflow as tf
    hv = tf.convert_to_tensor(h)
    yv = tf.convert_to_tensor(imodel.check_labels(y, len(y)))
    l2 = np.asarray(imodel.l2_vector, np.float64)

    @tf.function
    def value_grad(w):
        with tf.GradientTape() as tape:
            losses = imodel.per_example_loss(yv, imodel.head(hv))
            total = tf.reduce_sum(w * tf.cast(losses, w.dtype)) / n
        return total, tape.gradient(total, imodel._tf_vars,
                                    unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def f(theta, weights):
        imodel.set_flat_params(theta)
        val, grads = value_grad(tf.constant(weights, dtype=imodel.dtype))
        g = imodel.flatten(grads).numpy().astype(np.float64)
        return (float(val) + 0.5 * float(np.sum(l2 * theta * theta)), g + l2 * theta)
    return f


def refit(f, theta0: np.ndarray, weights: np.ndarray, tol: float = 1e-10,
          max_iter: int = 2000):
    """Minimises ``f`` (value, gradient) from ``theta0`` with L-BFGS; ``(theta, converged)``."""
    from scipy.optimize import minimize
    res = minimize(lambda t: f(t, weights), theta0.astype(np.float64), jac=True,
                   method="L-BFGS-B", options={"maxiter": max_iter, "gtol": tol, "ftol": 0.0,
                                               "maxcor": 30})
    # float32 models stop at their rounding level, short of gtol: a small gradient counts.
    gnorm = float(np.abs(f(res.x, weights)[1]).max())
    return res.x, bool(res.success or gnorm < 1e-5)


def retrain_check(imodel, x, y, ids, check_ids, scores, max_iter: int = 2000) -> Dict:
    """Predicted (``score / n``) against actual change of each checked example's own loss when
    the target layers are refitted without it; ``x, y, ids`` are the objective's rows (they
    must include ``check_ids``), ``scores`` the self-influence of ``check_ids``.

    Returns ``{"rows": [...], "pearson", "sign_agreement", "n", "objective_rows", "drift",
    "converged", "seconds"}``; the model's weights are restored afterwards."""
    from influence_ops import gradients as G
    t0 = time.time()
    ids = np.asarray(ids).astype(str)
    pos = {i: j for j, i in enumerate(ids)}
    missing = [c for c in check_ids if str(c) not in pos]
    if missing:
        raise ValueError(f"checked examples not among the objective's rows: {missing[:3]}")
    n = len(ids)
    h = G.front_activations(imodel, x).h
    y = imodel.normalize_labels(y)
    f = _objective_fn(imodel, h, y, n)
    theta_hat = imodel.get_flat_params().astype(np.float64)
    all_w = np.ones(n)
    try:
        theta_star, ok = refit(f, theta_hat, all_w, max_iter=max_iter)
        drift = float(np.linalg.norm(theta_star - theta_hat) /
                      max(np.linalg.norm(theta_hat), 1e-30))

        def own_losses(theta, idx):
            imodel.set_flat_params(theta)
            return G.per_example_losses(imodel, x[idx], y[idx]).astype(np.float64)

        rows, converged = [], ok
        for c, s in zip(check_ids, scores):
            j = pos[str(c)]
            w = all_w.copy()
            w[j] = 0.0
            theta_j, ok_j = refit(f, theta_star, w, max_iter=max_iter)
            converged = converged and ok_j
            actual = float(own_losses(theta_j, [j])[0] - own_losses(theta_star, [j])[0])
            rows.append({"train_id": str(c), "predicted": float(s) / n, "actual": actual})
    finally:
        imodel.set_flat_params(theta_hat)
    p = np.array([r["predicted"] for r in rows])
    a = np.array([r["actual"] for r in rows])
    pearson = (float(np.corrcoef(p, a)[0, 1])
               if len(rows) >= 3 and p.std() > 0 and a.std() > 0 else None)
    out = {"rows": rows, "pearson": pearson,
           "sign_agreement": float(np.mean(np.sign(p) == np.sign(a))) if rows else None,
           "n": len(rows), "objective_rows": n, "drift": drift, "converged": bool(converged),
           "seconds": round(time.time() - t0, 3)}
    log.info("spot check: %d examples refitted without each (n=%d): Pearson %s, signs %s, "
             "drift %.3g, %.1fs", len(rows), n,
             "n/a" if pearson is None else f"{pearson:.3f}", out["sign_agreement"], drift,
             out["seconds"])
    return out


def spectrum(method, limit: int = 512) -> Optional[List[float]]:
    """The eigenvalues of the method's curvature model, largest first (None when it has
    none: CG, LiSSA, TracIn, representer points)."""
    curv = getattr(method, "curvature", None)
    for c in (curv, getattr(curv, "self_curvature", None)):
        eigen = getattr(c, "eigen", None)
        lam = getattr(eigen, "lam", None)
        if lam is not None:
            return [float(v) for v in np.sort(np.asarray(lam, np.float64))[::-1][:limit]]
    return None


# ------------------------------------------------------------------ the notebook's audit

def write_table(table: pa.Table, folder: str, name: str = "part-00000.parquet") -> None:
    """One Parquet file under ``folder`` (local or gs://), written atomically."""
    import io
    import pyarrow.parquet as pq
    from influence_ops import storage
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_atomic(storage.join(folder, name), buf.getvalue())


def in_memory(calc, x, y, ids=None, queries=None, query_ids=None, k: int = 10,
              spot_check: int = 8, spot_check_rows: int = 2000, boundary=(), top: int = 24,
              output_dir: Optional[str] = None, noisy_ids=None, image_shape=None,
              explain_queries: int = 16, weights=None) -> Dict:
    """The audit of in-memory arrays with a fitted :class:`InfluenceCalculator` (its
    ``audit`` method): the ranking, the explain lists, the spot check and the spectrum;
    with ``output_dir`` also the run folder the report reads (and the report). ``weights``:
    the training rows' sample weights for a sample-weighted calculator (1 when None)."""
    import datetime
    import json
    from influence_ops import gradients as G
    from influence_ops import schemas, storage
    from influence_ops.api import as_arrays, default_ids
    t0 = time.time()
    imodel = calc.imodel
    x, y = np.asarray(x), np.asarray(y)
    ids = default_ids(len(x)) if ids is None else np.asarray(ids).astype(str)
    yn = imodel.normalize_labels(y)
    train = (x, y) if weights is None else (x, y, weights)
    scores = np.asarray(calc.self_influence(train), np.float64)
    losses, outputs = G.losses_and_outputs(
        imodel, x, imodel.pack_labels(yn, weights) if imodel.sample_weighted else yn)
    predicted, confidence = G.predicted_labels(imodel, outputs, yn)
    cols = {"train_id": ids, "partition": np.full(len(x), "notebook"), "score": scores,
            "loss": np.asarray(losses, np.float64), "label": schemas.labels_as_strings(yn),
            "predicted": schemas.labels_as_strings(predicted),
            "confidence": np.asarray(confidence, np.float64)}
    if boundary:
        from influence_ops import boundary as B
        for name in boundary:
            cols[name] = np.asarray(getattr(B, name)(imodel, x), np.float64)
    ranking = rank_table(pa.table(cols), scored_in="notebook")
    explain = qx = qy = qids = None
    if queries is not None:
        qx, qy = as_arrays(queries)
        qids = (default_ids(len(qx), "query") if query_ids is None
                else np.asarray(query_ids).astype(str))
        res = calc.top_k((qx, qy), train, k=k, train_ids=ids, query_ids=qids)
        explain = merge_topk([schemas.topk_table(qids, res)], k)
    check = None
    order = np.asarray(ranking.column("train_id").to_pylist(), dtype=str)
    if spot_check:
        pos = {i: j for j, i in enumerate(ids)}
        checked = list(order[:spot_check])
        u = uniform_from_ids(ids, calc.config.seed)
        rows = set(np.argsort(u, kind="stable")[:spot_check_rows].tolist())
        rows |= {pos[c] for c in checked}
        rows = np.array(sorted(rows))
        s_of = dict(zip(ids, scores))
        check = retrain_check(imodel, x[rows], y[rows], ids[rows], checked,
                           [s_of[c] for c in checked])
    result = {"ranking": ranking, "explain": explain, "spot_check": check,
              "spectrum": spectrum(calc.method)}
    if output_dir:
        write_table(ranking, storage.join(output_dir, "audit"))
        if explain is not None:
            write_table(explain, storage.join(output_dir, "explain"))
        want, first = shown_ids(ranking, explain, top, explain_queries)
        pick = np.flatnonzero(np.isin(ids, np.asarray(want, dtype=str)))
        parts = [schemas.examples_table(ids[pick], "train", x[pick], yn[pick],
                                        schemas.labels_as_strings(yn[pick]),
                                        schemas.labels_as_strings(predicted[pick]))]
        if explain is not None:
            qpick = np.flatnonzero(np.isin(qids, np.asarray(first, dtype=str)))
            qyn = imodel.normalize_labels(qy[qpick])
            _, qout = G.losses_and_outputs(
                imodel, qx[qpick], imodel.pack_labels(qyn) if imodel.sample_weighted else qyn)
            qpred, _ = G.predicted_labels(imodel, qout, qyn)
            parts.append(schemas.examples_table(qids[qpick], "query", qx[qpick], qyn,
                                                schemas.labels_as_strings(qyn),
                                                schemas.labels_as_strings(qpred)))
        write_table(pa.concat_tables(parts), storage.join(output_dir, "examples"))
        manifest = {
            "run_id": "notebook", "created": datetime.datetime.now(
                datetime.timezone.utc).isoformat(),
            "model": {"path": None, "fingerprint": imodel.fingerprint()},
            "method": {"method": calc.config.method, "solver": getattr(calc.method, "solver",
                                                                        None)},
            "artifact": {"key": None, "path": None, "reused": False, "fit_seconds": None},
            "partitions": {"scored": ["notebook"], "carried": []},
            "counts": {"rows": ranking.num_rows, "scored_now": ranking.num_rows, "carried": 0},
            "display": {"image_shape": list(image_shape) if image_shape else None},
            "spot_check": check, "spectrum": result["spectrum"],
            "seconds": round(time.time() - t0, 3)}
        storage.write_atomic(storage.join(output_dir, "audit_manifest.json"),
                             json.dumps(manifest, indent=2, default=str).encode())
        from pipelines import report
        result["report"] = report.write_report(output_dir, noisy_ids=noisy_ids)
    return result
