"""Bundled demo: find flipped labels in scikit-learn's digits data (no download).

Trains a small Keras MLP on 1,500 digits with 10% of training labels flipped, saves it, writes
the data as ``.npz``, runs the full pipeline on the local runner and reports how many flipped
labels the self-influence ranking puts in its top 10% and 20%.

    python -m pipelines.demo [--output out/demo] [--method influence --solver arnoldi] [beam flags]

``--audit`` runs the scheduled-audit product on the same data instead (``make audit-demo``):
the training set arrives as three daily files; a first audit sees two of them, a second one
(after the third file arrived) reuses the fitted method and scores only the new file; each
writes an HTML report with the detection curve of the flipped labels.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import numpy as np

from pipelines.cli import setup_logging

log = logging.getLogger("demo")


def make_data(seed: int = 0, flip_fraction: float = 0.10, n_train: int = 1500):
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    xtr, ytr, xq, yq = x[:n_train], y[:n_train].copy(), x[n_train:], y[n_train:]
    flipped = rng.choice(n_train, size=int(flip_fraction * n_train), replace=False)
    ytr[flipped] = (ytr[flipped] + rng.integers(1, 10, size=len(flipped))) % 10
    is_flipped = np.zeros(n_train, dtype=bool)
    is_flipped[flipped] = True
    return xtr, ytr, xq, yq, is_flipped


def train_model(x, y, seed: int = 0, epochs: int = 30):
    """A small MLP trained briefly: long enough to generalise (~96% test accuracy), not so long
    that it memorises the flipped labels (which would hide them from self-influence)."""
    from influence_ops import tf_setup
    tf_setup.tensorflow()
    import keras
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((x.shape[1],)),
        keras.layers.Dense(32, activation="relu", name="hidden"),
        keras.layers.Dense(10, name="logits"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
    return model


def main(argv=None) -> int:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="out/demo")
    ap.add_argument("--method", default="influence")
    ap.add_argument("--solver", default="exact")
    ap.add_argument("--queries", type=int, default=50, help="query examples to explain")
    ap.add_argument("--audit", action="store_true",
                    help="run two scheduled audits (incremental) instead of the plain job")
    args, beam_args = ap.parse_known_args(argv)
    out = os.path.abspath(args.output)
    if args.audit:
        return run_audit_demo(out, args.solver, args.queries, beam_args)
    found, n_flipped = run_demo(out, args.method, args.solver, args.queries, beam_args)
    print(f"\nParquet results in {out}/ (topk/, self_influence/, artifact/, run_manifest.json)")
    for frac, hit in found.items():
        print(f"flipped labels in the top {int(frac * 100)}% of self-influence: "
              f"{hit:.1%} of {n_flipped}")
    return 0


def run_demo(out: str, method: str = "influence", solver: str = "exact", queries: int = 50,
             beam_args=()):
    """Trains the demo model, runs the pipeline into ``out``; returns (found, n_flipped)."""
    from pipelines import run as run_lib
    data_dir = os.path.join(out, "inputs")  # model + .npz the pipeline reads
    os.makedirs(data_dir, exist_ok=True)
    xtr, ytr, xq, yq, flipped = make_data()
    model = train_model(xtr, ytr)
    model_path = os.path.join(data_dir, "model.keras")
    model.save(model_path)
    np.savez(os.path.join(data_dir, "train.npz"), x=xtr, y=ytr)
    np.savez(os.path.join(data_dir, "queries.npz"), x=xq[:queries], y=yq[:queries])
    acc = float(np.mean(np.argmax(model.predict(xq, verbose=0), axis=1) == yq))
    log.info("demo model: test accuracy %.3f; %d of %d training labels flipped", acc,
             flipped.sum(), len(flipped))
    argv_run = [
        f"--model={model_path}", f"--train=npz:{data_dir}/train.npz",
        f"--queries=npz:{data_dir}/queries.npz", f"--output={out}", "--overwrite",
        f"--method={method}", f"--solver={solver}", "--l2=0.001",
    ] + list(beam_args)
    run_lib.run(argv_run)
    return flipped_found(out, flipped), int(flipped.sum())


def run_audit_demo(out: str, solver: str = "exact", queries: int = 50, beam_args=()) -> int:
    """Two audits under ``out/audits``: day 1-2 files, then day 3 arrives."""
    import shutil
    from pipelines.audit import audit, read_tables
    from pipelines.cli import _audit_summary
    data_dir = os.path.join(out, "inputs")
    daily = os.path.join(data_dir, "daily")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(daily)
    xtr, ytr, xq, yq, flipped = make_data()
    model = train_model(xtr, ytr)
    model.save(os.path.join(data_dir, "model.keras"))
    parts = np.array_split(np.arange(len(xtr)), 3)
    noisy = []
    for day, rows in enumerate(parts, start=1):
        name = f"day-{day}.npz"
        np.savez(os.path.join(data_dir, name), x=xtr[rows], y=ytr[rows])
        noisy += [f"{name}:{i:09d}" for i, r in enumerate(rows) if flipped[r]]
    with open(os.path.join(data_dir, "flipped_ids.txt"), "w") as f:
        f.write("\n".join(noisy) + "\n")
    np.savez(os.path.join(data_dir, "queries.npz"), x=xq[:queries], y=yq[:queries])
    base = [f"--audit_root={out}/audits", f"--model={data_dir}/model.keras",
            f"--train=npz:{daily}/*.npz", f"--queries=npz:{data_dir}/queries.npz",
            f"--solver={solver}", "--l2=0.001", "--image_shape=8,8",
            f"--known_noisy={data_dir}/flipped_ids.txt"] + list(beam_args)
    for day, run_id in ((1, None), (2, "day-2"), (3, "day-3")):
        shutil.copy(os.path.join(data_dir, f"day-{day}.npz"), daily)
        if run_id is None:
            continue
        manifest = audit(base + [f"--run_id={run_id}"])
        print()
        _audit_summary(manifest)
        ranking = read_tables(os.path.join(manifest["path"], "audit"))
        ids = np.asarray(ranking.column("train_id").to_pylist())
        is_noisy = np.isin(ids, noisy)
        top = int(round(0.1 * len(ids)))
        print(f"flipped labels in the top 10% of the audit: "
              f"{is_noisy[:top].sum() / is_noisy.sum():.1%} of {is_noisy.sum()}")
    return 0


def flipped_found(out: str, flipped: np.ndarray) -> dict:
    import pyarrow.parquet as pq
    t = pq.read_table(os.path.join(out, "self_influence"))
    ids = np.asarray(t["train_id"].to_pylist())
    scores = t["score"].to_numpy()
    idx = np.array([int(i.rsplit(":", 1)[1]) for i in ids])
    ranked = idx[np.lexsort((ids, -scores))]
    res = {}
    for frac in (0.10, 0.20):
        top = ranked[: int(round(frac * len(ranked)))]
        res[frac] = float(flipped[top].sum() / flipped.sum())
    return res


if __name__ == "__main__":
    sys.exit(main())
