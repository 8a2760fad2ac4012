"""The pipeline's stages as composite PTransforms with stable labels (DESIGN.md steps 2-5).

DoFns are thin: they load the model and the fitted artifact once per worker process
(``apache_beam.utils.shared.Shared``, keyed by the artifact path passed as a singleton side
input) and call ``influence_ops``. TensorFlow is imported lazily in ``setup`` so that the
``--tf_threads`` setting reaches it before its runtime starts.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from typing import List, Optional

import apache_beam as beam
import numpy as np
from apache_beam.utils.shared import Shared

from pipelines.blocks import Block, FeatureBlock, concat

log = logging.getLogger(__name__)
NAMESPACE = "influence"
_SHARED = Shared()


# ============================================================================ model + method
def model_config(opts) -> dict:
    """The picklable subset of options that rebuilds the model wrapper and the method."""
    keys = ("model", "target_layers", "loss", "from_logits", "l2", "method", "solver", "damping",
            "rank", "arnoldi_iter", "negative_eigenvalues", "cg_max_iter", "cg_tol",
            "lissa_scale", "lissa_depth", "lissa_repeats", "lissa_batch", "checkpoints",
            "learning_rates", "projection_dim", "rps_lambda", "lje_step", "fit_sample_size",
            "seed", "batch_size", "tf_threads", "k", "output")
    return {k: getattr(opts, k) for k in keys}


def build_imodel(cfg: dict):
    from influence_ops import InfluenceModel
    tl = cfg["target_layers"]
    target = None if not tl else (int(tl) if tl.isdigit() else tl.split(","))
    fl = {"auto": None, "true": True, "false": False}[cfg["from_logits"]]
    return InfluenceModel(cfg["model"], target_layers=target, loss=cfg["loss"],
                          from_logits=fl, l2=cfg["l2"])


def method_kwargs(cfg: dict) -> dict:
    m = cfg["method"]
    if m in ("influence", "relatif"):
        return dict(solver=cfg["solver"], damping=cfg["damping"], top_k=cfg["rank"],
                    n_iter=cfg["arnoldi_iter"], negative=cfg["negative_eigenvalues"],
                    cg_max_iter=cfg["cg_max_iter"], cg_tol=cfg["cg_tol"],
                    lissa_scale=cfg["lissa_scale"], lissa_depth=cfg["lissa_depth"],
                    lissa_repeats=cfg["lissa_repeats"], lissa_batch=cfg["lissa_batch"],
                    seed=cfg["seed"], batch_size=cfg["batch_size"])
    if m == "tracin":
        ck = [c for c in cfg["checkpoints"].split(",") if c]
        lr = [float(v) for v in cfg["learning_rates"].split(",") if v]
        return dict(checkpoints=ck, learning_rates=lr,
                    projection_dim=cfg["projection_dim"] or None, seed=cfg["seed"],
                    batch_size=cfg["batch_size"])
    if m == "rps_l2":
        return dict(lam=cfg["rps_lambda"])
    if m == "rps_lje":
        solver = cfg["solver"] if cfg["solver"] in ("exact", "arnoldi") else "exact"
        if solver != cfg["solver"]:
            log.warning("rps_lje supports --solver=exact or arnoldi; using exact instead of %s",
                        cfg["solver"])
        return dict(solver=solver, step=cfg["lje_step"], damping=cfg["damping"],
                    top_k=cfg["rank"], n_iter=cfg["arnoldi_iter"], seed=cfg["seed"])
    raise ValueError(f"unknown method {m!r}")


def _configure_tf(cfg):
    if cfg.get("tf_threads"):
        os.environ["INFLUENCE_TF_INTRA_THREADS"] = str(cfg["tf_threads"])


class _Loaded:
    """What a worker process keeps: the model wrapper and, once fitted, the method."""

    def __init__(self, imodel, method=None, load_seconds=0.0):
        self.imodel, self.method, self.load_seconds = imodel, method, load_seconds


def acquire(cfg: dict, artifact: Optional[str] = None) -> _Loaded:
    """Model (+ artifact) loaded once per worker process and shared by all DoFn instances."""
    _configure_tf(cfg)

    def load():
        t = time.time()
        from influence_ops import artifacts
        imodel = build_imodel(cfg)
        method = artifacts.load_method(artifact, imodel) if artifact else None
        sec = time.time() - t
        beam.metrics.Metrics.distribution(NAMESPACE, "model_load_ms").update(int(sec * 1000))
        log.info("loaded model %s%s in %.1fs", cfg["model"],
                 f" and artifact {artifact}" if artifact else "", sec)
        return _Loaded(imodel, method, sec)
    return _SHARED.acquire(load, tag=f"{cfg['model']}|{artifact}")


# ============================================================================ fit (reduce step)
def _uniform_from_ids(ids: np.ndarray, seed: int) -> np.ndarray:
    """A deterministic U(0,1) draw per example id (stable sampling across runners)."""
    return np.array([zlib.crc32(f"{seed}:{i}".encode()) for i in ids.tolist()],
                    dtype=np.float64) / 2.0 ** 32


class _SampleRows(beam.DoFn):
    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed

    def process(self, block: Block, total: int):
        if self.size <= 0 or self.size >= total:
            yield block
            return
        # Oversample by 30% + 64 rows; the fit step keeps exactly `size` smallest draws.
        frac = min(1.0, 1.3 * self.size / total + 64.0 / total)
        keep = _uniform_from_ids(block.ids, self.seed) < frac
        if keep.any():
            yield block.take(keep)


def _final_sample(blocks: List[Block], size: int, seed: int) -> Block:
    if not any(len(b) for b in blocks):
        raise ValueError("no training examples to fit on: --train is empty or every row was "
                         "dead-lettered (see dead_letter/)")
    b = concat(blocks)
    order = np.argsort(b.ids, kind="stable")  # canonical order: independent of the runner
    b = b.take(order)
    if 0 < size < len(b):
        u = _uniform_from_ids(b.ids, seed)
        keep = np.sort(np.argsort(u, kind="stable")[:size])
        b = b.take(keep)
    return b


class _FitDoFn(beam.DoFn):
    """Fits the method on the sample (or from the distributed Hessian) and writes the artifact."""

    def __init__(self, cfg: dict, artifact_dir: str):
        self.cfg, self.artifact_dir = cfg, artifact_dir

    def process(self, payload, queries):
        from influence_ops import artifacts, build_method
        t0 = time.time()
        loaded = acquire(self.cfg)
        imodel = loaded.imodel
        method = build_method(imodel, self.cfg["method"], **method_kwargs(self.cfg))
        kind, data = payload
        if kind == "hessian":
            total, n = data
            if not n:
                raise ValueError("no training examples to fit on: --train is empty or every "
                                 "row was dead-lettered (see dead_letter/)")
            log.info("fit: exact Hessian from %d examples (d=%d)", n, imodel.n_params)
            method.fit_from_hessian(total, n)
        else:
            sample = _final_sample(data, self.cfg["fit_sample_size"], self.cfg["seed"])
            log.info("fit: %s on a sample of %d examples", self.cfg["method"], len(sample))
            if method.needs_queries:
                q = concat(queries)
                q = q.take(np.argsort(q.ids, kind="stable"))
                method.fit(sample.x, sample.y, q.x, q.y, q.ids)
            else:
                method.fit(sample.x, sample.y)
        sec = time.time() - t0
        artifacts.save_method(method, self.artifact_dir, extra={"fit_seconds": round(sec, 3)})
        beam.metrics.Metrics.distribution(NAMESPACE, "fit_ms").update(int(sec * 1000))
        log.info("fit: artifact written to %s in %.1fs", self.artifact_dir, sec)
        yield self.artifact_dir


class _HessianCombineFn(beam.CombineFn):
    """Distributed exact Hessian: ``sum_i Hessian(l(z_i))`` over all training blocks."""

    def __init__(self, cfg):
        self.cfg = cfg

    def setup(self):
        from influence_ops.combiners import HessianSumCombiner
        self._c = HessianSumCombiner(lambda: acquire(self.cfg).imodel)

    def _comb(self):
        if not hasattr(self, "_c"):
            self.setup()
        return self._c

    def create_accumulator(self):
        return self._comb().create()

    def add_input(self, acc, block: Block):
        return self._comb().add(acc, block.x, block.y)

    def merge_accumulators(self, accs):
        accs = list(accs)
        return self._comb().merge(accs[0], *accs[1:])

    def compact(self, acc):
        return self._comb().compact(acc)

    def extract_output(self, acc):
        return self._comb().extract(acc)


class FitMethod(beam.PTransform):
    """``blocks -> artifact path`` (a one-element PCollection used as a singleton side input)."""

    def __init__(self, cfg: dict, artifact_dir: str, queries=None):
        super().__init__()
        self.cfg, self.artifact_dir, self.queries = cfg, artifact_dir, queries

    def expand(self, blocks):
        cfg = self.cfg
        exact_hessian = (cfg["method"] in ("influence", "relatif") and cfg["solver"] == "exact")
        if exact_hessian:
            payload = (blocks | "HessianSum" >> beam.CombineGlobally(_HessianCombineFn(cfg))
                       | "Tag" >> beam.Map(lambda h: ("hessian", h)))
        else:
            total = (blocks | "Count" >> beam.Map(len)
                     | "Total" >> beam.CombineGlobally(sum))
            payload = (blocks
                       | "Sample" >> beam.ParDo(_SampleRows(cfg["fit_sample_size"], cfg["seed"]),
                                                beam.pvalue.AsSingleton(total))
                       | "Gather" >> beam.combiners.ToList()
                       | "Tag" >> beam.Map(lambda bs: ("sample", bs)))
        queries = self.queries if self.queries is not None else (
            blocks.pipeline | "NoQueries" >> beam.Create([]))
        return payload | "Fit" >> beam.ParDo(_FitDoFn(cfg, self.artifact_dir),
                                              beam.pvalue.AsList(queries))


# ============================================================================ validate labels
def label_spec(imodel):
    """``(label_mode, number of model outputs)``: what a label must fit."""
    outputs = getattr(imodel.model, "outputs", None)
    n_out = int(outputs[0].shape[-1]) if outputs else None
    return imodel.label_mode, n_out


def label_problems(label_mode: str, n_out: Optional[int], y) -> np.ndarray:
    """Rows whose label cannot go into the loss (a bad label dead-letters a row, not a block)."""
    y = np.asarray(y)
    bad = np.zeros(len(y), dtype=bool)
    if label_mode == "sparse":
        flat = y.reshape(len(y), -1)
        if flat.shape[1] != 1 or not np.issubdtype(flat.dtype, np.number):
            return np.ones(len(y), dtype=bool)
        v = flat[:, 0].astype(np.float64)
        bad = ~np.isfinite(v) | (v < 0) | (v != np.round(v))
        if n_out is not None:
            bad |= v >= n_out
    elif label_mode == "onehot":
        flat = y.reshape(len(y), -1)
        if n_out is not None and flat.shape[1] != n_out:
            return np.ones(len(y), dtype=bool)
        bad = ~np.isfinite(flat.astype(np.float64)).all(axis=1)
    return bad


class ValidateLabels(beam.DoFn):
    """Dead-letters rows whose label does not fit the model's loss, before anything fits."""

    def __init__(self, label_mode: str, n_out: Optional[int]):
        self.label_mode, self.n_out = label_mode, n_out
        self.dead = beam.metrics.Metrics.counter(NAMESPACE, "examples_dead_lettered")

    def process(self, block: Block):
        bad = label_problems(self.label_mode, self.n_out, block.y)
        if bad.any():
            self.dead.inc(int(bad.sum()))
            for i in np.nonzero(bad)[0]:
                yield beam.pvalue.TaggedOutput("dead", (block.source, str(block.ids[i]), (
                    f"bad label {block.y[i]!r} for a {self.label_mode} loss with "
                    f"{self.n_out} outputs")))
            block = block.take(~bad)
        if len(block):
            yield block


# ============================================================================ featurize
class _FeaturizeDoFn(beam.DoFn):
    """Blocks -> FeatureBlocks: projected per-example gradients (phi, psi), self-influence, loss."""

    def __init__(self, cfg: dict, role: str):
        self.cfg, self.role = cfg, role
        self.count = beam.metrics.Metrics.counter(NAMESPACE, f"{role}_examples_featurized")
        self.ms = beam.metrics.Metrics.distribution(NAMESPACE, f"featurize_{role}_block_ms")

    def setup(self):
        _configure_tf(self.cfg)

    def start_bundle(self):
        self._n = 0

    def finish_bundle(self):
        if self._n:
            log.info("featurize[%s]: %d examples in this bundle", self.role, self._n)

    def process(self, block: Block, artifact: str):
        from influence_ops import gradients as G
        from influence_ops.schemas import labels_as_strings
        t = time.time()
        loaded = acquire(self.cfg, artifact)
        imodel, method = loaded.imodel, loaded.method
        y = _labels(imodel, block.y)  # rows with bad labels were dead-lettered before the fit
        labels = labels_as_strings(y)
        if self.role == "train":
            phi, psi, self_scores = method.featurize_train(block.x, y)
            losses = G.per_example_losses(imodel, block.x, y)
            out = FeatureBlock(block.ids, phi, labels, self_scores, losses, block.group, psi)
        else:
            psi = method.query_features(block.x, y, block.ids)
            out = FeatureBlock(block.ids, psi, labels)
        self.count.inc(len(block))
        self._n += len(block)
        sec = time.time() - t
        self.ms.update(int(sec * 1000))
        yield beam.pvalue.TaggedOutput("timing", (f"featurize_{self.role}", sec))
        yield out


class Featurize(beam.PTransform):
    """``blocks -> (FeatureBlocks, timings)`` with the fitted artifact as a singleton side input.

    Blocks arrive label-checked (``ValidateLabels``), so every row is featurized."""

    def __init__(self, cfg: dict, artifact, role: str):
        super().__init__()
        self.cfg, self.artifact, self.role = cfg, artifact, role

    def expand(self, blocks):
        res = blocks | "Featurize" >> beam.ParDo(
            _FeaturizeDoFn(self.cfg, self.role), beam.pvalue.AsSingleton(self.artifact)
        ).with_outputs("timing", main="features")
        return res.features, res.timing


# ============================================================================ score + top-k
def query_matrix(query_blocks: List[FeatureBlock]):
    """Concatenated query features in id order (the canonical row order of every output)."""
    if not query_blocks:
        raise ValueError("no query examples to score against: --queries is empty or every "
                         "query row was dead-lettered (see dead_letter/)")
    ids = np.concatenate([b.ids for b in query_blocks])
    feats = np.concatenate([b.features for b in query_blocks]).astype(np.float64)
    order = np.argsort(ids, kind="stable")
    return ids[order], feats[order]


class _ScoreDoFn(beam.DoFn):
    """Train feature block x broadcast query features -> per-block top-k (+ optional tables)."""

    def __init__(self, k: int, write_pairwise: bool, write_features: bool):
        self.k, self.write_pairwise, self.write_features = k, write_pairwise, write_features
        self.count = beam.metrics.Metrics.counter(NAMESPACE, "train_examples_scored")
        self.ms = beam.metrics.Metrics.distribution(NAMESPACE, "score_block_ms")
        self._cache = None

    def _queries(self, query_blocks):
        key = id(query_blocks)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key,) + query_matrix(query_blocks)
        return self._cache[1], self._cache[2]

    def process(self, fb: FeatureBlock, query_blocks):
        import pyarrow as pa
        from influence_ops import schemas
        from influence_ops.topk import TopKAccumulator
        t = time.time()
        qids, Q = self._queries(query_blocks)
        S = Q @ fb.features.astype(np.float64).T  # (m, b)
        acc = TopKAccumulator(k=self.k, n_queries=len(qids)).add(S, fb.ids)
        yield acc
        yield beam.pvalue.TaggedOutput("self", pa.table({
            "train_id": fb.ids.astype(str), "score": np.asarray(fb.self_scores, np.float64),
            "label": fb.labels.astype(str), "loss": np.asarray(fb.losses, np.float64),
        }, schema=schemas.SELF_SCHEMA))
        if self.write_pairwise:
            m, b = S.shape
            yield beam.pvalue.TaggedOutput("pairwise", pa.table({
                "query_id": np.repeat(qids.astype(str), b),
                "train_id": np.tile(fb.ids.astype(str), m),
                "score": S.reshape(-1)}, schema=schemas.PAIRWISE_SCHEMA))
        if self.write_features:
            yield beam.pvalue.TaggedOutput("features", features_table(fb, "train"))
        self.count.inc(len(fb))
        sec = time.time() - t
        self.ms.update(int(sec * 1000))
        yield beam.pvalue.TaggedOutput("timing", ("score", sec))


def features_table(fb: FeatureBlock, role: str):
    import pyarrow as pa
    from influence_ops import schemas
    k = fb.features.shape[1]
    flat = pa.array(fb.features.astype(np.float32).reshape(-1))
    return pa.table({"example_id": fb.ids.astype(str), "label": fb.labels.astype(str),
                     "role": np.full(len(fb), role),
                     "features": pa.FixedSizeListArray.from_arrays(flat, k)},
                    schema=schemas.features_schema(k))


class _TopKCombineFn(beam.CombineFn):
    """Merges per-block top-k accumulators; accumulators are O(queries x k)."""

    def create_accumulator(self):
        return None

    def add_input(self, acc, block_acc):
        return block_acc if acc is None else acc.merge(block_acc)

    def merge_accumulators(self, accs):
        first = None
        for a in accs:
            if a is None:
                continue
            first = a if first is None else first.merge(a)
        return first

    def compact(self, acc):
        return acc

    def extract_output(self, acc):
        return acc


class Score(beam.PTransform):
    """``train FeatureBlocks -> {topk accumulators, self tables, pairwise, features}``."""

    def __init__(self, query_features, k, write_pairwise=False, write_features=False):
        super().__init__()
        self.query_features = query_features
        self.k, self.write_pairwise, self.write_features = k, write_pairwise, write_features

    def expand(self, train_features):
        return train_features | "ScoreBlocks" >> beam.ParDo(
            _ScoreDoFn(self.k, self.write_pairwise, self.write_features),
            beam.pvalue.AsList(self.query_features)).with_outputs(
                "self", "pairwise", "features", "timing", main="topk")


class MergeTopK(beam.PTransform):
    """Per-block accumulators -> one pyarrow table (query_id, rank, train_id, score, kind)."""

    def __init__(self, query_features, fanout: int = 16):
        super().__init__()
        self.query_features, self.fanout = query_features, fanout

    def expand(self, accs):
        def to_table(acc, query_blocks):
            from influence_ops import schemas
            qids, _ = query_matrix(query_blocks)
            if acc is None:
                return schemas.TOPK_SCHEMA.empty_table()
            return schemas.topk_table(qids, acc.extract())
        return (accs | "Merge" >> beam.CombineGlobally(_TopKCombineFn()).with_fanout(self.fanout)
                | "ToTable" >> beam.Map(to_table, beam.pvalue.AsList(self.query_features)))


# ============================================================================ groups
class _SumArrays(beam.CombineFn):
    """Elementwise sum of tuples of numpy arrays / numbers (group sums)."""

    def create_accumulator(self):
        return None

    def add_input(self, acc, value):
        if acc is None:
            return [np.array(v, dtype=np.float64, copy=True) for v in value]
        for a, v in zip(acc, value):
            a += v
        return acc

    def merge_accumulators(self, accs):
        out = None
        for a in accs:
            if a is not None:
                out = a if out is None else self.add_input(out, a)
        return out

    def extract_output(self, acc):
        return acc


def _per_group(group: np.ndarray, *arrays):
    """Yields ``(group_id, [sum of each array over the group's rows])`` for one block."""
    uniq, inv = np.unique(group, return_inverse=True)
    sums = []
    for arr in arrays:
        s = np.zeros((len(uniq),) + arr.shape[1:], dtype=np.float64)
        np.add.at(s, inv, arr.astype(np.float64))
        sums.append(s)
    count = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
    for j, g in enumerate(uniq.tolist()):
        yield str(g), [s[j] for s in sums] + [count[j]]


class FirstOrderGroups(beam.PTransform):
    """``train FeatureBlocks -> (group table, group self table)`` (sums of feature maps)."""

    def __init__(self, query_features):
        super().__init__()
        self.query_features = query_features

    def expand(self, train_features):
        def block_sums(fb: FeatureBlock):
            if fb.group is None:
                raise ValueError("--group_key is set but the examples carry no group column")
            # CG / LiSSA have no query-side map for training examples: group self-influence
            # would need one solve per group; it is written as null (NaN marks it here).
            psi = (fb.self_features if fb.self_features is not None
                   else np.full_like(fb.features, np.nan))
            yield from _per_group(fb.group, fb.features, psi)

        def tables(items, query_blocks):
            import pyarrow as pa
            from influence_ops import schemas
            qids, Q = query_matrix(query_blocks)
            items = sorted(items)
            gids = np.array([g for g, _ in items]).astype(str)
            phi = np.stack([v[0] for _, v in items])
            psi = np.stack([v[1] for _, v in items])
            size = np.array([v[2] for _, v in items], dtype=np.int64)
            S = Q @ phi.T
            m, G = S.shape
            scores = pa.table({"query_id": np.repeat(qids.astype(str), G),
                               "group_id": np.tile(gids, m), "score": S.reshape(-1),
                               "order": np.ones(m * G, np.int32)}, schema=schemas.GROUP_SCHEMA)
            self_scores = np.sum(phi * psi, axis=1)
            selfs = pa.table({"group_id": gids,
                              "score": pa.array(self_scores, mask=np.isnan(self_scores)),
                              "size": size}, schema=schemas.GROUP_SELF_SCHEMA)
            return [("scores", scores), ("self", selfs)]

        out = (train_features | "GroupSums" >> beam.FlatMap(block_sums)
               | "CombineGroups" >> beam.CombinePerKey(_SumArrays())
               | "AllGroups" >> beam.combiners.ToList()
               | "GroupTables" >> beam.FlatMap(tables, beam.pvalue.AsList(self.query_features)))
        scores = out | "Scores" >> beam.Filter(lambda kv: kv[0] == "scores") | "S" >> beam.Values()
        selfs = out | "Selfs" >> beam.Filter(lambda kv: kv[0] == "self") | "T" >> beam.Values()
        return scores, selfs


class SecondOrderGroups(beam.PTransform):
    """Basu et al. (2020) second-order group influence in two combine passes per group.

    Pass 1: ``g_U = sum of member gradients`` (CombinePerKey), ``v1 = H^-1 g_U``. Pass 2: member
    Hessian-vector products along v1 (CombinePerKey), ``v2 = H^-1 H_U v1``. Then
    ``v_U = (1-2p)/(1-p)^2 v1 + v2 / ((1-p)^2 n)`` and ``score = g_test^T v_U``
    (see ``influence_ops.groups``). Needs d-dimensional vectors per group: modest d.
    """

    def __init__(self, cfg, artifact, query_blocks, n_train):
        super().__init__()
        self.cfg, self.artifact, self.query_blocks, self.n_train = cfg, artifact, query_blocks, n_train

    def expand(self, train_blocks):
        cfg = self.cfg

        def grad_sums(block: Block, artifact):
            from influence_ops import gradients as G
            if block.group is None:
                raise ValueError("--group_key is set but the examples carry no group column")
            im = acquire(cfg, artifact).imodel
            g = G.per_example_gradients(im, block.x, _labels(im, block.y), cfg["batch_size"])
            yield from _per_group(block.group, g)

        def solve_v1(kv, artifact):
            gid, (gsum, count) = kv
            loaded = acquire(cfg, artifact)
            return gid, (loaded.method.solve(gsum[None, :])[0], count)

        v1 = (train_blocks | "GradSums" >> beam.FlatMap(grad_sums, beam.pvalue.AsSingleton(self.artifact))
              | "CombineGrads" >> beam.CombinePerKey(_SumArrays())
              | "SolveV1" >> beam.Map(solve_v1, beam.pvalue.AsSingleton(self.artifact)))

        def member_hvps(block: Block, artifact, v1s):
            from influence_ops import gradients as G
            im = acquire(cfg, artifact).imodel
            y = _labels(im, block.y)
            for gid in np.unique(block.group).tolist():
                mask = block.group == gid
                v = v1s[str(gid)][0]
                hv = G.hessian_vector_products(im, block.x[mask], y[mask], v[None, :],
                                               include_l2=False, reduce="sum")[0]
                yield str(gid), [hv]

        hv = (train_blocks | "MemberHVPs" >> beam.FlatMap(
                  member_hvps, beam.pvalue.AsSingleton(self.artifact), beam.pvalue.AsDict(v1))
              | "CombineHVPs" >> beam.CombinePerKey(_SumArrays()))

        def finish(kv, artifact, n_train, query_blocks):
            import pyarrow as pa
            from influence_ops import gradients as G, schemas
            gid, parts = kv
            (v1_, count), = parts["v1"]
            (hv_,), = parts["hv"]
            from influence_ops.groups import combine_second_order
            loaded = acquire(cfg, artifact)
            v2 = loaded.method.solve(hv_[None, :])[0]
            v = combine_second_order(v1_, v2, int(count), n_train)
            q = concat(query_blocks)
            order = np.argsort(q.ids, kind="stable")
            q = q.take(order)
            gq = G.per_example_gradients(loaded.imodel, q.x, _labels(loaded.imodel, q.y))
            s = gq.astype(np.float64) @ v
            return pa.table({"query_id": q.ids.astype(str), "group_id": np.full(len(s), gid),
                             "score": s, "order": np.full(len(s), 2, np.int32)},
                            schema=schemas.GROUP_SCHEMA)

        return ({"v1": v1, "hv": hv} | "Join" >> beam.CoGroupByKey()
                | "Scores" >> beam.Map(finish, beam.pvalue.AsSingleton(self.artifact),
                                       beam.pvalue.AsSingleton(self.n_train),
                                       beam.pvalue.AsList(self.query_blocks)))


def _labels(imodel, y):
    y = np.asarray(y)
    if imodel.label_mode == "sparse":
        return y.reshape(len(y)).astype(np.int64)
    return y
