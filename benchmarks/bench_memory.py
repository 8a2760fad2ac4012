"""Peak memory and wall time of the whole job at two training-set sizes, and their ratios.

Issue 9's check that memory is flat in n: the job must not hold the training set whole, so
its peak at 1M rows should be within 1.2x of its peak at 100k rows, and its time within ~11x.

Synthetic 32x32x3 float32 images (uniform in [0, 1), labels uniform in 0..9) through the
benchmark CNN of ``bench_fit.py`` (target = its last two Dense layers, as ``bench_job.py``),
written once as ``.npz`` shards of ``--shard_rows`` rows under ``--data`` (reused by later
runs: 1M rows are 12 GB; ``--dtype=uint8`` writes 3 GB of 0..255 pixels instead, which the
model takes as they are). Each size reads the first ``n / shard_rows`` shards (symlinks in a
folder per size) and runs the CLI job, Arnoldi solver by default, on the default in-process
runner in a fresh subprocess: its peak RSS (``ru_maxrss``) is the whole job's, imports
included. ``--code`` runs another checkout's ``pipelines`` (e.g. the code before the change)
on the same data. Always exits 0.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_memory.py --sizes 100000,1000000
    PYTHONPATH=. .venv/bin/python benchmarks/bench_memory.py --sizes 20000,40000   # a smoke run
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def write_data(data: str, n_max: int, shard_rows: int, queries: int, dtype: str) -> None:
    """Model, queries and ``ceil(n_max / shard_rows)`` train shards under ``data`` (only the
    missing ones are written)."""
    os.makedirs(data, exist_ok=True)
    model_path = os.path.join(data, "model.keras")
    rng = np.random.default_rng(0)

    def images(rng, n):
        if dtype == "uint8":
            return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        return rng.random(size=(n, 32, 32, 3), dtype=np.float32)

    if not os.path.exists(model_path):
        import keras
        from bench_fit import cnn
        x = images(rng, 2000)
        y = rng.integers(0, 10, 2000)
        model = cnn()
        model.compile(optimizer="adam",
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x.astype(np.float32), y, epochs=1, verbose=0)
        model.save(model_path)
    q = os.path.join(data, "queries.npz")
    if not os.path.exists(q):
        r = np.random.default_rng(1)
        np.savez(q, x=images(r, queries), y=r.integers(0, 10, queries))
    for i in range(-(-n_max // shard_rows)):
        path = os.path.join(data, "shards", f"train_{i:05d}.npz")
        if os.path.exists(path):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        r = np.random.default_rng(1000 + i)
        tmp = path + ".tmp.npz"
        np.savez(tmp, x=images(r, shard_rows), y=r.integers(0, 10, shard_rows))
        os.replace(tmp, path)


def size_folder(data: str, n: int, shard_rows: int) -> str:
    """A folder of symlinks to the first ``n / shard_rows`` shards."""
    folder = os.path.join(data, f"n{n}")
    os.makedirs(folder, exist_ok=True)
    want = n // shard_rows
    shards = sorted(glob.glob(os.path.join(data, "shards", "train_*.npz")))[:want]
    if len(shards) < want:
        raise SystemExit(f"{data}: {len(shards)} shards, {want} needed")
    for s in shards:
        link = os.path.join(folder, os.path.basename(s))
        if not os.path.exists(link):
            os.symlink(s, link)
    return folder


def run_job(code: str, out: str, flags) -> dict:
    script = ("import resource, sys, json; from pipelines import run as r; "
              "m = r.run(sys.argv[1:]); "
              "print('ROWS', json.dumps(m['row_counts'])); "
              "print('PEAK_RSS_MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    env = dict(os.environ, PYTHONPATH=code)
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", script, f"--output={out}", "--overwrite"]
                         + flags, capture_output=True, text=True, env=env, cwd=code)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["?"])[-1][:300]
        return {"error": tail}
    lines = res.stdout.splitlines()
    peak = float([ln.split()[1] for ln in lines if ln.startswith("PEAK_RSS_MB")][0])
    rows = json.loads([ln[5:] for ln in lines if ln.startswith("ROWS ")][0])
    with open(os.path.join(out, "run_manifest.json")) as f:
        tm = json.load(f).get("timings", {})
    return {"wall": wall, "peak_mb": peak, "rows": rows, "fit": tm.get("fit_seconds") or 0.0,
            "featurize": tm.get("featurize_train", {}).get("seconds", 0.0)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="100000,1000000",
                    help="training rows, comma-separated (multiples of --shard_rows)")
    ap.add_argument("--shard_rows", type=int, default=10000)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--solver", default="arnoldi")
    ap.add_argument("--fit_sample_size", type=int, default=10000)
    ap.add_argument("--dtype", choices=("float32", "uint8"), default="float32")
    ap.add_argument("--data", default="/tmp/bench_memory_data",
                    help="where the shards are written once (a folder per --dtype)")
    ap.add_argument("--code", default=ROOT, help="checkout whose pipelines/ runs the job")
    ap.add_argument("--out", default="/tmp/bench_memory_out")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    data = os.path.join(args.data, args.dtype)
    t = time.perf_counter()
    write_data(data, max(sizes), args.shard_rows, args.queries, args.dtype)
    print(f"data under {data} ({time.perf_counter() - t:.0f}s to write what was missing); "
          f"code {args.code}; solver {args.solver}, {args.queries} queries, fit sample "
          f"{args.fit_sample_size}, {args.dtype} images, {args.shard_rows} rows a shard",
          flush=True)
    print("\n| n | wall s | fit s | featurize s | peak RSS MB | self_influence rows |")
    print("|---|---|---|---|---|---|", flush=True)
    results = {}
    for n in sizes:
        folder = size_folder(data, n, args.shard_rows)
        flags = [f"--model={data}/model.keras", f"--train=npz:{folder}/train_*.npz",
                 f"--queries=npz:{data}/queries.npz", "--target_layers=2", "--l2=0.001",
                 "--k=10", "--block_size=1024", f"--fit_sample_size={args.fit_sample_size}",
                 f"--solver={args.solver}"]
        r = run_job(args.code, os.path.join(args.out, f"n{n}"), flags)
        results[n] = r
        if "error" in r:
            print(f"| {n:,} | error: {r['error']} | | | | |", flush=True)
            continue
        print(f"| {n:,} | {r['wall']:.1f} | {r['fit']:.1f} | {r['featurize']:.1f} | "
              f"{r['peak_mb']:,.0f} | {r['rows'].get('self_influence', '?'):,} |", flush=True)
    ok = [n for n in sizes if "error" not in results[n]]
    if len(ok) >= 2:
        a, b = ok[0], ok[-1]
        ra, rb = results[a], results[b]
        print(f"\n{b:,} / {a:,} rows: peak memory {rb['peak_mb'] / ra['peak_mb']:.2f}x "
              f"(target <= 1.2x), wall time {rb['wall'] / ra['wall']:.2f}x (target <= "
              f"{1.1 * b / a:.0f}x); slope {(rb['peak_mb'] - ra['peak_mb']) * 1024 / (b - a):.2f}"
              " KB of peak memory per row", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
