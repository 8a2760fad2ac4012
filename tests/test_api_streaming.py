"""The notebook API streams the training side: tuples of arrays and tf.data.Datasets (batched
or not) give the same numbers as a float64 numpy definition (explicit Hessian, explicit
per-example gradients), one batch in memory at a time.

The seed library's usage pattern, translated: ``calc.fit(train_ds)``, then
``influence_blocks`` / ``self_influence`` / ``top_k`` over a batched ``tf.data.Dataset``, top-k
returning the training examples themselves, influence vectors saved and loaded."""

import numpy as np
import pytest

from influence_ops import InfluenceCalculator
from influence_ops.api import iter_batches, reservoir_sample
from tests import helpers

tf = helpers.tf
L2 = 0.05


@pytest.fixture(scope="module")
def logreg():
    s = helpers.logistic_setup(150, L2)
    s["ref"] = s["gq"] @ np.linalg.solve(s["H"], s["g"].T)
    s["self"] = np.sum(s["g"] * np.linalg.solve(s["H"], s["g"].T).T, axis=1)
    return s


def _datasets(x, y):
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    return {"tuple": (x, y), "unbatched": ds, "batched": ds.batch(37)}


class CountingData:
    """A generator-backed dataset that records the largest batch it ever handed out."""

    def __init__(self, x, y, batch):
        self.x, self.y, self.batch, self.largest = x, y, batch, 0

    def dataset(self):
        def gen():
            for s in range(0, len(self.x), self.batch):
                xb, yb = self.x[s:s + self.batch], self.y[s:s + self.batch]
                self.largest = max(self.largest, len(xb))
                yield xb, yb
        sig = (tf.TensorSpec((None, self.x.shape[1]), tf.float64),
               tf.TensorSpec((None, 1), tf.float64))
        return tf.data.Dataset.from_generator(gen, output_signature=sig)


@pytest.mark.parametrize("kind", ["tuple", "unbatched", "batched"])
def test_influence_self_and_topk_equal_numpy_for_every_input_kind(logreg, kind):
    x, y = logreg["x"], logreg["y"]
    train = _datasets(x, y)[kind]
    calc = InfluenceCalculator(logreg["im"], solver="exact", l2=L2)
    calc.fit(train)
    queries = _datasets(logreg["xq"], logreg["yq"])[kind]
    S = calc.influence(queries, train)
    np.testing.assert_allclose(S, logreg["ref"], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(calc.self_influence(train), logreg["self"], rtol=1e-8)
    top = calc.top_k(queries, train, k=4, block_size=16, return_examples=True)
    order = np.argsort(-logreg["ref"], axis=1, kind="stable")[:, :4]
    np.testing.assert_allclose(top["pro_scores"], np.take_along_axis(logreg["ref"], order, 1),
                               rtol=1e-8)
    rows = np.array([[int(i.split(":")[1]) for i in r] for r in top["pro_ids"]])
    np.testing.assert_array_equal(rows, order)
    # The examples themselves, gathered during the streaming pass.
    np.testing.assert_array_equal(top["pro_x"], x[order])
    np.testing.assert_array_equal(top["pro_y"], y[order])
    opp = np.argsort(logreg["ref"], axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(top["opp_x"], x[opp])


def test_influence_blocks_tile_the_matrix_and_stream(logreg):
    x, y = logreg["x"], logreg["y"]
    calc = InfluenceCalculator(logreg["im"], solver="exact", l2=L2).fit((x, y))
    data = CountingData(x, y, batch=25)
    out = np.full(logreg["ref"].shape, np.nan)
    seen = []
    for qs, ts, block in calc.influence_blocks((logreg["xq"], logreg["yq"]), data.dataset(),
                                               query_batch_size=4):
        assert block.shape == (qs.stop - qs.start, ts.stop - ts.start)
        assert block.shape[1] <= 25 and block.shape[0] <= 4
        out[qs, ts] = block
        seen.append((qs.start, ts.start))
    assert len(seen) == len(set(seen)) == 6 * 2
    np.testing.assert_allclose(out, logreg["ref"], rtol=1e-8, atol=1e-10)
    assert data.largest == 25  # the dataset's own batches were used, never concatenated


def test_topk_streams_a_generator_dataset_with_bounded_memory(logreg):
    x, y = logreg["x"], logreg["y"]
    calc = InfluenceCalculator(logreg["im"], solver="exact", l2=L2).fit((x, y))
    data = CountingData(x, y, batch=10)
    top = calc.top_k((logreg["xq"], logreg["yq"]), data.dataset(), k=3, return_examples=True)
    assert data.largest == 10
    order = np.argsort(-logreg["ref"], axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(top["pro_x"], x[order])
    # ids: given per row, streamed by position
    ids = np.array([f"ex{i}" for i in range(len(x))])
    top2 = calc.top_k((logreg["xq"], logreg["yq"]), data.dataset(), k=3, train_ids=ids)
    np.testing.assert_array_equal(top2["pro_ids"], ids[order])


@pytest.mark.parametrize("fmt", ["parquet", "tfrecord"])
def test_influence_vectors_round_trip_through_disk(logreg, tmp_path, fmt):
    x, y = logreg["x"], logreg["y"]
    calc = InfluenceCalculator(logreg["im"], solver="exact", l2=L2).fit((x, y))
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(40)
    path = str(tmp_path / f"vectors.{fmt}")
    calc.save_influence_vectors(ds, path, format=fmt)
    ids, V = InfluenceCalculator.load_influence_vectors(path, format=fmt)
    assert ids[0] == "train:000000" and len(ids) == len(x) == len(set(ids))
    # -(H)^-1 g per example, float64 definition; the round trip is exact
    np.testing.assert_allclose(V, -np.linalg.solve(logreg["H"], logreg["g"].T).T, rtol=1e-8)
    np.testing.assert_array_equal(V, calc.influence_vectors((x, y)))


def test_fit_takes_at_most_fit_sample_size_rows_and_records_n(logreg):
    x, y = logreg["x"], logreg["y"]
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    # Arnoldi at full rank (d = 6) fits on the sample and reproduces its Hessian exactly.
    d = x.shape[1] + 1
    calc = InfluenceCalculator(logreg["im"], solver="arnoldi", rank=d, arnoldi_iter=d, l2=L2,
                               fit_sample_size=50)
    calc.fit(ds)
    assert calc.method.n_train == len(x)
    # the sample is the seeded reservoir's: the Hessian of exactly those rows
    xs, ys, _, seen = reservoir_sample(iter_batches((x, y), 16), 50, seed=0)
    assert seen == len(x)
    rows = [int(np.nonzero((x == r).all(axis=1))[0][0]) for r in xs]
    assert len(set(rows)) == 50
    _, Hs = helpers.logistic_oracle(im_theta(logreg), x[rows], y[rows], L2)
    U, lam = calc.method.curvature.eigen.U, calc.method.curvature.eigen.lam
    np.testing.assert_allclose(U @ np.diag(lam) @ U.T, Hs, atol=1e-10)
    # The exact solver sums the Hessian over every row (its combiner), as the pipeline does.
    exact = InfluenceCalculator(logreg["im"], solver="exact", l2=L2, fit_sample_size=50)
    exact.fit(ds)
    assert exact.method.curvature.n_fit == len(x) and exact.method.n_train == len(x)
    _, H = helpers.logistic_oracle(im_theta(logreg), x, y, L2)
    U, lam = exact.method.curvature.eigen.U, exact.method.curvature.eigen.lam
    np.testing.assert_allclose(U @ np.diag(lam) @ U.T, H, atol=1e-10)


def im_theta(logreg):
    return logreg["im"].get_flat_params().astype(np.float64)


def test_reservoir_sample_is_uniform():
    x = np.arange(100.0)[:, None]
    counts = np.zeros(100)
    for seed in range(400):
        xs, _, _, seen = reservoir_sample(iter_batches((x, x), 7), 10, seed)
        counts[xs[:, 0].astype(int)] += 1
    assert seen == 100
    # each row is kept with probability 0.1: 40 of 400 draws, sd ~6
    assert counts.min() > 15 and counts.max() < 70
