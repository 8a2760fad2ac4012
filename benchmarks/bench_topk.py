"""Score + top-k against the GEMM alone: does the streaming top-k keep up with the matrix products?

For m queries (feature dim 32) and n training rows in blocks of 512, every block does what the
pipeline's Score step does, ``S = Q @ T_block.T`` (float64, a fresh (m, 512) array), followed by
one of these top-k variants (k = 10 by default):

  pipeline   each block makes its own TopKAccumulator(k, m).add(S, ids) and a TopKCombiner merges
             it into the running accumulator (add_input), as the precombine of MergeTopK does; at
             the end compact + extract_output.
  running    one accumulator, acc.add(S, ids) per block (InfluenceCalculator.top_k).
  fanout16   like pipeline with 16 accumulators, block i -> accumulator i % 16, merged at the end
             (what CombineGlobally(...).with_fanout(16) did inside one bundle; MergeTopK no
             longer fans out). Information only.
  eager      like pipeline, but every per-block partial is compacted (fully ranked on its own)
             before it is merged, as when partials are pickled between workers. Information only.
  numpy      like pipeline, on the numpy path of topk.py (what installs without a C compiler
             run), in the same round-robin; only when the compiled scan is there. Information.
  legacy     the implementation before this change (np.unique over the ids + lexsort per block),
             copied below; at m = 100 only, on --legacy-blocks blocks, because it is slow.

The target: score + top-k keeps at least half the GEMM rate, i.e.
``fraction = t_gemm_alone / t_variant >= 0.5``, where ``t_gemm_alone`` is a loop of the same
GEMMs with nothing else and ``t_variant`` the whole loop of the variant (GEMMs included). GEMM
loops and variants run round-robin ``--repeats`` times and the fraction uses the medians. The
table also shows ``in-loop``: the GEMM share of the variant's own loop, timed around each call,
which is less exposed to the load of other processes, and ``top-k CPU``: the seconds of CPU
this thread spent in the variant outside its GEMMs (the top-k's own work; CPU time hardly
changes with other processes' load, unlike the two-thread GEMM's wall time). Only ratios from
one process mean anything on a shared machine; the script always exits 0.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_topk.py            # n = 100,000
    PYTHONPATH=. .venv/bin/python benchmarks/bench_topk.py --quick    # n = 20,000
    PYTHONPATH=. .venv/bin/python benchmarks/bench_topk.py --numpy    # without the compiled scan
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import pathlib
import sys
import time

import numpy as np

BLOCK = 512
DIM = 32
TARGETS = ("pipeline", "running")


def _load_topk():
    """influence_ops/topk.py by path: ``import influence_ops`` would import TensorFlow."""
    path = pathlib.Path(__file__).resolve().parents[1] / "influence_ops" / "topk.py"
    spec = importlib.util.spec_from_file_location("influence_ops_topk_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _blas_info() -> str:
    try:
        from threadpoolctl import threadpool_info
        pools = [f"{p.get('internal_api')} {p.get('version')} threads={p.get('num_threads')}"
                 f" ({p.get('threading_layer', '')}, {p.get('architecture', '')})"
                 for p in threadpool_info() if p.get("user_api") == "blas"]
        if pools:
            return "; ".join(pools)
    except Exception:  # noqa: BLE001 - information only
        pass
    env = {k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
           if k in os.environ}
    return f"threadpoolctl unavailable; env {env or '(unset)'}"


# --- the implementation before this change, for the before/after ratio ----------------------

def _legacy_select(scores, ids, k, largest):
    m, c = scores.shape
    kk = c if 0 < c <= k else k
    if c == 0:
        return scores, ids
    _, rank = np.unique(ids, return_inverse=True)
    rank = rank.reshape(ids.shape)
    key = -scores if largest else scores
    if c > 4 * kk:
        kth = np.partition(key, kk - 1, axis=1)[:, kk - 1:kk]
        cand = key <= kth
        width = int(cand.sum(axis=1).max())
        order = np.argsort(~cand, axis=1, kind="stable")[:, :width]
        key = np.take_along_axis(key, order, 1)
        rank = np.take_along_axis(rank, order, 1)
        scores = np.take_along_axis(scores, order, 1)
        ids = np.take_along_axis(ids, order, 1)
    order = np.lexsort((rank, key), axis=1)[:, :kk]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


class LegacyAccumulator:
    def __init__(self, k):
        self.k, self.state = k, None

    def add(self, scores, ids):
        ids = np.asarray(ids).astype(str)
        block = np.broadcast_to(ids[None, :], scores.shape)
        self._merge(scores, block, scores, block)
        return self

    def merge(self, other):
        if other.state is not None:
            self._merge(*other.state)
        return self

    def _merge(self, ps, pi, os_, oi):
        if self.state is not None:
            a = self.state
            ps, pi = np.concatenate([a[0], ps], 1), np.concatenate([a[1], pi], 1)
            os_, oi = np.concatenate([a[2], os_], 1), np.concatenate([a[3], oi], 1)
        self.state = (*_legacy_select(ps, np.asarray(pi), self.k, True),
                      *_legacy_select(os_, np.asarray(oi), self.k, False))

    def extract(self):
        s = self.state
        return {"pro_scores": s[0], "pro_ids": s[1], "opp_scores": s[2], "opp_ids": s[3]}


# --- timed loops ------------------------------------------------------------------------------

def _faults() -> int:
    """Minor page faults of this process so far (fresh memory touched for the first time)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def gemm_only(Q, blocks) -> float:
    t0 = time.perf_counter()
    for T in blocks:
        S = Q @ T.T
        del S
    return time.perf_counter() - t0


def run_variant(name, topk, Q, blocks, ids, k):
    """Returns (wall time of the whole loop, GEMM time inside it, CPU time of this thread
    outside the GEMMs (the top-k's own work), result)."""
    if name == "numpy":  # pipeline without the compiled scan
        kernel, topk._kernel = topk._kernel, None
        try:
            return run_variant("pipeline", topk, Q, blocks, ids, k)
        finally:
            topk._kernel = kernel
    m = Q.shape[0]
    clock = time.perf_counter
    t_gemm, faults = 0.0, 0
    start, cpu = clock(), time.thread_time()
    if name in ("pipeline", "eager", "fanout16"):
        comb = topk.TopKCombiner(k)
        accs = [comb.create_accumulator() for _ in range(16 if name == "fanout16" else 1)]
    elif name == "running":
        acc = topk.TopKAccumulator(k, m)
    else:
        acc = LegacyAccumulator(k)
    for i, (T, ib) in enumerate(zip(blocks, ids)):
        t0, c0, f0 = clock(), time.thread_time(), _faults()
        S = Q @ T.T
        t_gemm += clock() - t0
        faults += _faults() - f0
        cpu += time.thread_time() - c0  # the GEMM is not the top-k's work
        if name == "running":
            acc.add(S, ib)
        elif name == "legacy":
            acc.merge(LegacyAccumulator(k).add(S, ib))
        else:
            part = topk.TopKAccumulator(k, m).add(S, ib)
            if name == "eager":
                comb.compact(part)
            j = i % len(accs)
            accs[j] = comb.add_input(accs[j], part)
        del S
    if name in ("pipeline", "eager", "fanout16"):
        res = comb.extract_output(comb.compact(comb.merge_accumulators(accs)))
    else:
        res = acc.extract()
    return clock() - start, t_gemm, time.thread_time() - cpu, res, faults / len(blocks)


def same_result(a, b) -> bool:
    return all(np.array_equal(a[key], b[key])
               for key in ("pro_scores", "pro_ids", "opp_scores", "opp_ids"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="n = 20,000 instead of 100,000")
    ap.add_argument("--n", type=int, default=None, help="training rows (overrides --quick)")
    ap.add_argument("--m", type=int, nargs="+", default=[100, 1000, 10000], help="query counts")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--block", type=int, default=BLOCK, help="training rows per block")
    ap.add_argument("--repeats", type=int, default=3, help="for GEMM, pipeline and running")
    ap.add_argument("--info", default="fanout16,eager",
                    help="information-only variants, run once each ('' for none)")
    ap.add_argument("--legacy-blocks", type=int, default=8,
                    help="blocks for the legacy reference at m = 100 (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--numpy", action="store_true",
                    help="the top-k's numpy path even where the compiled scan is built (what an "
                         "install without a C compiler runs)")
    args = ap.parse_args(argv)
    n = args.n or (20_000 if args.quick else 100_000)
    topk = _load_topk()
    if args.numpy:
        topk._kernel = None
    print(f"numpy {np.__version__}; BLAS: {_blas_info()}; cpus={os.cpu_count()}")
    print("top-k: " + ("compiled scan and merge (influence_ops/_topk_scan.c)"
                       if topk._kernel is not None else
                       "numpy path (--numpy)" if args.numpy else
                       f"numpy path, the compiled scan is missing: {topk._KERNEL_MISSING}"))
    bs = args.block
    n_blocks = max(1, n // bs)
    print(f"n_train={n_blocks * bs} in {n_blocks} blocks of {bs}, feature dim {DIM}, "
          f"k={args.k}, repeats={args.repeats}; fraction = t_gemm_alone / t_variant (medians), "
          f"target >= 0.5")
    rng = np.random.default_rng(args.seed)
    blocks = [rng.standard_normal((bs, DIM)) for _ in range(n_blocks)]
    perm = rng.permutation(n_blocks * bs)  # ids in random order: string order != block order
    ids = [np.char.add("ex", np.char.zfill(perm[i * bs:(i + 1) * bs].astype(str), 7))
           for i in range(n_blocks)]
    info = [v for v in args.info.split(",") if v]
    rounds = TARGETS + (("numpy",) if topk._kernel is not None else ())
    header = (f"{'m':>6} {'variant':>9} {'t_gemm_alone':>12} {'t_variant':>10} "
              f"{'fraction':>8} {'in-loop':>8} {'top-k CPU':>9} {'faults':>8}  target")
    print(header)
    print("-" * len(header))
    for m in args.m:
        Q = rng.standard_normal((m, DIM))
        gemm_only(Q, blocks[: min(4, n_blocks)])  # warm up BLAS threads and the allocator
        t_g, results = [], {}
        t_v, t_in, t_cpu, t_flt = ({v: [] for v in rounds} for _ in range(4))
        for _ in range(max(1, args.repeats)):
            t_g.append(gemm_only(Q, blocks))
            for v in rounds:
                wall, g, c, results[v], flt = run_variant(v, topk, Q, blocks, ids, args.k)
                t_v[v].append(wall)
                t_in[v].append(g / wall)
                t_cpu[v].append(c)
                t_flt[v].append(flt)
        for v in info:
            wall, g, c, results[v], flt = run_variant(v, topk, Q, blocks, ids, args.k)
            t_v[v], t_in[v], t_cpu[v], t_flt[v] = [wall], [g / wall], [c], [flt]
        g_med = float(np.median(t_g))
        for v in list(rounds) + info:
            frac = g_med / float(np.median(t_v[v]))
            target = ("PASS" if frac >= 0.5 else "MISS") if v in TARGETS else "info"
            print(f"{m:>6} {v:>9} {g_med:>12.3f} {np.median(t_v[v]):>10.3f} {frac:>8.2f} "
                  f"{np.median(t_in[v]):>8.2f} {np.median(t_cpu[v]):>9.3f} "
                  f"{np.median(t_flt[v]):>8.0f}  {target}")
        agree = all(same_result(results[v], results["pipeline"]) for v in results)
        if m == 100 and args.legacy_blocks > 0:
            lb, li = blocks[: args.legacy_blocks], ids[: args.legacy_blocks]
            g = gemm_only(Q, lb)
            wall_old, _, _, old, _ = run_variant("legacy", topk, Q, lb, li, args.k)
            wall_new, _, _, new, _ = run_variant("pipeline", topk, Q, lb, li, args.k)
            agree = agree and same_result(old, new)
            print(f"{m:>6} {'legacy':>9} {g:>12.3f} {wall_old:>10.3f} {g / wall_old:>8.3f} "
                  f"{'':>8} {'':>9}  info: first {len(lb)} blocks; pipeline on them: "
                  f"{g / wall_new:.2f}, top-k {(wall_old - g) / max(wall_new - g, 1e-9):.0f}x "
                  f"less time")
        print(f"{'':>6} all variants give identical results: {'yes' if agree else 'NO'}")
    return 0


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - a benchmark must not fail CI
        print(f"benchmark error: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(0)
