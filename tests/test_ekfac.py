"""K-FAC / EK-FAC (influence_ops.ekfac) against numpy oracles on float64 models.

Tolerances: unless a test says otherwise, the library and the oracle compute the same float64
sums in a different order, so they agree to ~1e-14 relative; we assert rtol=1e-9 (atol=1e-12
for entries that are zero in exact arithmetic), far above roundoff and far below any real error.
"""

import copy
import functools
import io
import json
import pickle

import keras
import numpy as np
import pytest

from influence_ops import InfluenceModel, InfluenceModelError
from influence_ops import ekfac as E
from influence_ops import gradients as G
from tests import helpers

RTOL, ATOL = 1e-9, 1e-12


# ------------------------------------------------------------------------------ models, oracles
def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def aug(a):
    return np.concatenate([a, np.ones(a.shape[:-1] + (1,))], axis=-1)


def make_mlp(l2=0.0):
    return InfluenceModel(helpers.mlp_classifier(4, 3, hidden=5, seed=0), target_layers=2,
                          l2=l2)


def conv_net(padding, strides, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((6, 6, 2), dtype="float64"),
        keras.layers.Conv2D(3, 3, strides=strides, padding=padding, activation="tanh",
                            dtype="float64", name="conv"),
        keras.layers.Flatten(dtype="float64"),
        keras.layers.Dense(3, dtype="float64", name="out"),
    ])


def make_conv(padding="valid", strides=1):
    return InfluenceModel(conv_net(padding, strides), target_layers=2)


def mlp_oracle(model, x, labels):
    """[(a_aug (n, 1, K), d (n, 1, dout))] per layer and p, from a numpy forward/backward."""
    W1, b1, W2, b2 = model.get_weights()
    h = np.tanh(x @ W1 + b1)
    p = softmax(h @ W2 + b2)
    d2 = p - np.eye(3)[labels]
    d1 = (d2 @ W2.T) * (1 - h ** 2)
    return [(aug(x)[:, None], d1[:, None]), (aug(h)[:, None], d2[:, None])], p


def np_patches(x, k, s, padding):
    """``(n, T, k*k*C)`` patches in (row, col, channel) order, TF's 'same'/'valid' geometry."""
    n, H, W, C = x.shape
    if padding == "same":
        Ho, Wo = -(-H // s), -(-W // s)
        ph, pw = max((Ho - 1) * s + k - H, 0), max((Wo - 1) * s + k - W, 0)
        x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    else:
        Ho, Wo = (H - k) // s + 1, (W - k) // s + 1
    return np.stack([x[:, i * s:i * s + k, j * s:j * s + k, :].reshape(n, -1)
                     for i in range(Ho) for j in range(Wo)], axis=1)


def conv_oracle(model, x, labels, padding, strides):
    K, b, W2, b2 = model.get_weights()
    P = np_patches(x, 3, strides, padding)                     # (n, T, 18)
    h = np.tanh(P @ K.reshape(-1, K.shape[-1]) + b)             # (n, T, 3)
    p = softmax(h.reshape(len(x), -1) @ W2 + b2)
    d2 = p - np.eye(3)[labels]
    dz = (d2 @ W2.T).reshape(h.shape) * (1 - h ** 2)
    return [(aug(P), dz), (aug(h.reshape(len(x), -1))[:, None], d2[:, None])], p


def oracle_factors(oracle, x, labels, sampling, n_classes=3):
    """A = mean_n sum_t a a^T, S = mean_n (1/T) sum_t d d^T (exact_ggn: sum_c p_c d_c d_c^T)."""
    rows, p = oracle(x, labels)
    cols = ([(labels, np.ones(len(x)))] if sampling == "empirical"
            else [(np.full(len(x), c), p[:, c]) for c in range(n_classes)])
    out = []
    for li, (a, _) in enumerate(rows):
        A = np.einsum("ntk,ntl->kl", a, a) / len(x)
        S = sum(np.einsum("n,nto,ntq->oq", w, r[li][1], r[li][1])
                for lab, w in cols for r in [oracle(x, lab)[0]]) / (len(x) * a.shape[1])
        out.append((A, S))
    return out


def layer_blocks(imodel, g, layouts):
    """Split flat per-example gradients (n, d) into (n, K, dout) blocks, theta order."""
    out, off = [], 0
    for lay in layouts:
        out.append(g[:, off:off + lay.size].reshape(len(g), lay.K, lay.dout))
        off += lay.size
    return out


@pytest.fixture(scope="module")
def data():
    x, y, xt, yt = helpers.classification_data(n=40, p=4, classes=3, n_test=5)
    return x, y, xt, yt


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(3)
    return rng.normal(size=(12, 6, 6, 2)), rng.integers(0, 3, 12)


def assert_factors(factors, expected):
    assert len(factors.layers) == len(expected)
    for f, (A, S) in zip(factors.layers, expected):
        np.testing.assert_allclose(f.A, A, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(f.S, S, rtol=RTOL, atol=ATOL)


def factors_of(imodel, x, y, sampling, batch_size=16, seed=0):
    c = E.KFACFactorsCombiner(lambda: imodel, sampling, seed, batch_size)
    return c.extract_output(c.add_input(c.create_accumulator(), (x, y)))


# ------------------------------------------------------------------------------ factors
@pytest.mark.parametrize("sampling", ["empirical", "exact_ggn"])
def test_mlp_factors_equal_numpy(data, sampling):
    x, y, _, _ = data
    im = make_mlp()
    expected = oracle_factors(functools.partial(mlp_oracle, im.model), x, y, sampling)
    assert_factors(factors_of(im, x, y, sampling), expected)


@pytest.mark.parametrize("padding,strides", [("valid", 1), ("same", 1), ("same", 2)])
def test_conv_factors_equal_numpy(images, padding, strides):
    x, y = images
    im = make_conv(padding, strides)
    oracle = functools.partial(conv_oracle, im.model, padding=padding, strides=strides)
    for sampling in ("empirical", "exact_ggn"):
        assert_factors(factors_of(im, x, y, sampling, batch_size=5),
                       oracle_factors(oracle, x, y, sampling))


def test_probability_output_gives_the_logit_ggn(data):
    """A softmax output layer with categorical_crossentropy (one-hot labels) and the same
    weights as logits + sparse labels: the sampled and exact curvatures are the GGN at the
    logits either way (the gradient flows through the softmax), and the same seed samples the
    same classes. rtol 1e-9: the two losses differ by log-softmax vs log(softmax) roundoff."""
    x, _, _, _ = data
    logits = make_mlp()
    probs = helpers.mlp_classifier(4, 3, hidden=5, seed=0)
    probs.layers[-1].activation = keras.activations.softmax
    im = InfluenceModel(probs, target_layers=2, loss="categorical_crossentropy")
    assert im._loss_fn.from_logits is False
    for sampling in ("true_fisher", "exact_ggn"):
        want = factors_of(logits, x, None, sampling)
        assert_factors(factors_of(im, x, None, sampling), [(f.A, f.S) for f in want.layers])


def theta_rows_cols(imodel):
    """For every theta index: (layer, row of the augmented block, column), built from the
    variables' own shapes (kernel row-major, then bias), independent of the library."""
    out = []
    for li, layer in enumerate(imodel.target_layers):
        kshape = tuple(layer.kernel.shape)
        K = int(np.prod(kshape[:-1])) + 1
        for idx in np.ndindex(*kshape):
            if len(kshape) == 2:
                row = idx[0]
            else:  # conv (r, s, c, o): the numpy patch order (r, s, c)
                row = (idx[0] * kshape[1] + idx[1]) * kshape[2] + idx[2]
            out.append((li, row, idx[-1]))
        out += [(li, K - 1, o) for o in range(kshape[-1])]
    return out


@pytest.mark.parametrize("which", ["mlp", "conv"])
def test_kfac_curvature_is_kron_in_theta_order(data, images, which):
    if which == "mlp":
        x, y, _, _ = data
        im = make_mlp(l2=0.03)
        oracle = functools.partial(mlp_oracle, im.model)
    else:
        x, y = images
        im = InfluenceModel(conv_net("same", 2), target_layers=2, l2=0.03)
        oracle = functools.partial(conv_oracle, im.model, padding="same", strides=2)
    expected = oracle_factors(oracle, x, y, "empirical")
    kfac = E.fit_ekfac(im, x, y, sampling="empirical", damping=0.2, correct=False)
    rc = theta_rows_cols(im)
    assert len(rc) == im.n_params == kfac.d
    H = np.zeros((im.n_params, im.n_params))
    for p, (lp, ip, jp) in enumerate(rc):
        for q, (lq, iq, jq) in enumerate(rc):
            if lp == lq:
                H[p, q] = expected[lp][0][ip, iq] * expected[lp][1][jp, jq]
    H += (0.03 + 0.2) * np.eye(im.n_params)  # l2 (scalar: exact) + damping
    np.testing.assert_allclose(kfac.to_dense(), H, rtol=1e-9, atol=1e-12)
    assert kfac.meta["curvature"] == "kfac"


# ------------------------------------------------------------------------------ EK-FAC eigenvalues
@pytest.mark.parametrize("which", ["mlp", "conv"])
@pytest.mark.parametrize("sampling", ["empirical", "exact_ggn"])
def test_corrected_eigenvalues_equal_definition(data, images, which, sampling):
    x, y = (data[0], data[1]) if which == "mlp" else images
    im = make_mlp() if which == "mlp" else make_conv("same", 1)
    ek = E.fit_ekfac(im, x, y, sampling=sampling, batch_size=7)
    layouts = [l.layout for l in ek.layers]
    if sampling == "empirical":
        cols = [(y, np.ones(len(x)))]
    else:
        p = softmax(G.predictions(im, x))
        cols = [(np.full(len(x), c), p[:, c]) for c in range(3)]
    lam = [0.0] * len(layouts)
    for labels, w in cols:
        g = G.per_example_gradients(im, x, labels)
        for i, (blk, layer) in enumerate(zip(layer_blocks(im, g, layouts), ek.layers)):
            lam[i] = lam[i] + np.einsum("n,nkd->kd", w, (layer.QA.T @ blk @ layer.QS) ** 2)
    for layer, want in zip(ek.layers, lam):
        np.testing.assert_allclose(layer.lam, want / len(x), rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------ exact case
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("correct", [True, False])
def test_single_dense_mse_influence_is_exact(use_bias, correct):
    """One linear Dense layer, squared loss: H = A kron (2/k) I exactly, so K-FAC and EK-FAC
    influence equal g_test^T (H + damping)^-1 g_train. Tolerance 1e-8 relative to the largest
    score: two different float64 inverses of a matrix with condition number < 1e3."""
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(30, 3)) + 0.5, rng.normal(size=(30, 2))
    xt, yt = rng.normal(size=(4, 3)), rng.normal(size=(4, 2))
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((3,), dtype="float64"),
                              keras.layers.Dense(2, use_bias=use_bias, dtype="float64",
                                                 name="lin")])
    im = InfluenceModel(model, loss="mse", l2=0.05)
    H = G.explicit_hessian(im, x, y)
    gtr = G.per_example_gradients(im, x, y)
    gte = G.per_example_gradients(im, xt, yt)
    for damping in (0.0, 0.3):
        ek = E.fit_ekfac(im, x, y, sampling="exact_ggn", damping=damping, correct=correct)
        exact = gte @ np.linalg.solve(H + damping * np.eye(im.n_params), gtr.T)
        got = ek.features(im, xt, yt) @ ek.features(im, x, y).T
        np.testing.assert_allclose(got, exact, rtol=0, atol=1e-8 * np.abs(exact).max())
    # A per-parameter L2 vector (another engineer's extension) wins over the scalar; constant
    # on the layer it is exact again.
    im.l2_vector = np.full(im.n_params, 0.2)
    ek = E.fit_ekfac(im, x, y, sampling="exact_ggn", damping=0.0, correct=correct)
    H2 = H + (0.2 - 0.05) * np.eye(im.n_params)
    np.testing.assert_allclose(ek.to_dense(), H2, rtol=0, atol=1e-10 * np.abs(H2).max())


def test_non_constant_l2_vector_is_the_eigenbasis_diagonal(data):
    x, y, _, _ = data
    im = make_mlp()
    im.l2_vector = np.random.default_rng(0).uniform(0.0, 1.0, im.n_params)
    ek = E.fit_ekfac(im, x, y, sampling="exact_ggn")
    off = 0
    for layer in ek.layers:
        Q = np.kron(layer.QA, layer.QS)  # theta order = row-major block: Q = QA kron QS
        v = im.l2_vector[off:off + layer.layout.size]
        off += layer.layout.size
        want = np.diag(Q.T @ np.diag(v) @ Q).reshape(layer.lam.shape)
        np.testing.assert_allclose(layer.l2, want, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------ combiners
def build_conv_im():  # module level: the combiners travel pickled, with this factory
    return make_conv("valid", 1)


def test_combiners_split_merge_orders_equal_one_pass(images):
    """TFDV combiner-test style: blocks added by separate (pickled) combiner copies, merged in
    several orders and compacted, give the one-pass result. true_fisher sampling is keyed on
    each example's content, so even the sampled labels do not depend on the split."""
    x, y = images
    comb = E.KFACFactorsCombiner(build_conv_im, "true_fisher", seed=3, batch_size=4)
    one = comb.extract_output(comb.add_input(comb.create_accumulator(), (x, y)))
    blocks = [(x[:2], y[:2]), (x[2:7], y[2:7]), (x[7:], y[7:])]

    def accs(c):  # each block on its own (unpickled) copy, as on workers; merges mutate
        done = [pickle.loads(pickle.dumps(c)).add_input(c.create_accumulator(), b)
                for b in blocks]
        return lambda: copy.deepcopy(done)

    orders = [lambda a: comb.merge_accumulators(a),
              lambda a: comb.merge_accumulators([a[2], a[0], a[1]]),
              lambda a: comb.merge_accumulators([comb.compact(comb.merge_accumulators(
                  [a[1], a[2]])), comb.create_accumulator(), a[0]])]
    fresh = accs(comb)
    for merge in orders:
        got = comb.extract_output(comb.compact(merge(fresh())))
        assert got.n == len(x)
        assert_factors(got, [(f.A, f.S) for f in one.layers])

    corr = E.EKFACCorrectionCombiner(build_conv_im, one, batch_size=3)
    ref = corr.extract_output(corr.add_inputs(corr.create_accumulator(), blocks))
    assert ref.meta["sampling"] == "true_fisher" and ref.meta["seed"] == 3
    fresh = accs(corr)
    for merge in orders:
        got = corr.extract_output(corr.compact(merge(fresh())))
        for a, b in zip(got.layers, ref.layers):
            np.testing.assert_allclose(a.lam, b.lam, rtol=RTOL, atol=ATOL)
    # Beam style: the factors as a side-input keyword instead of a constructor argument.
    side = E.EKFACCorrectionCombiner(build_conv_im, batch_size=3, sampling="true_fisher", seed=3)
    acc = side.add_input(side.create_accumulator(), (x, y), factors=one)
    got = side.extract_output(acc, factors=one)
    for a, b in zip(got.layers, ref.layers):
        np.testing.assert_allclose(a.lam, b.lam, rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="no training examples"):
        comb.extract_output(comb.create_accumulator())


# ------------------------------------------------------------------------------ operators
def test_operators_inverse_sqrt_features_diagonal_and_round_trip(data):
    x, y, xt, yt = data
    im = make_mlp(l2=0.01)
    ek = E.fit_ekfac(im, x, y, sampling="exact_ggn")
    M = ek.to_dense()
    d = im.n_params
    np.testing.assert_allclose(M, M.T, rtol=0, atol=1e-13 * np.abs(M).max())
    # ||M|| ||M^-1|| is ~1e2 here (damping 0.1 * mean eigenvalue), so identities hold to ~1e-12.
    np.testing.assert_allclose(ek.apply_inverse(M), np.eye(d), rtol=0, atol=1e-10)
    np.testing.assert_allclose(ek.apply_inverse(np.eye(d)), np.linalg.inv(M), rtol=1e-9,
                               atol=1e-10 * np.abs(np.linalg.inv(M)).max())
    g = G.per_example_gradients(im, x, y)
    gt = G.per_example_gradients(im, xt, yt)
    np.testing.assert_allclose(ek.apply_inverse_sqrt(ek.apply_inverse_sqrt(g)),
                               ek.apply_inverse(g), rtol=1e-9, atol=1e-12)
    f_tr, f_te = ek.features(im, x, y, batch_size=9), ek.features(im, xt, yt)
    assert f_tr.dtype == np.float64 and f_tr.shape == (len(x), d)
    np.testing.assert_allclose(f_tr, ek.features_from_gradients(g), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(f_te @ f_tr.T, gt @ ek.apply_inverse(g).T, rtol=1e-9,
                               atol=1e-12)
    np.testing.assert_allclose(ek.diagonal(), np.diag(M), rtol=1e-12)
    assert ek.trace() == pytest.approx(np.trace(M), rel=1e-12)
    # Serialisation: plain arrays through np.savez / allow_pickle=False, JSON params.
    buf = io.BytesIO()
    np.savez(buf, **ek.arrays())
    buf.seek(0)
    back = E.EKFAC.from_arrays(dict(np.load(buf, allow_pickle=False)))
    json.dumps(ek.params())
    assert back.params() == ek.params()
    np.testing.assert_array_equal(back.apply_inverse(gt), ek.apply_inverse(gt))


def test_damping_default_is_global_relative_and_absolute_wins(data):
    x, y, _, _ = data
    im = make_mlp()
    ek = E.fit_ekfac(im, x, y, sampling="exact_ggn")
    mean = np.mean(np.concatenate([l.lam.ravel() for l in ek.layers]))
    assert ek.damping == pytest.approx(0.1 * mean, rel=1e-14)
    assert ek.meta["rel_damping"] == 0.1
    # The damping is one scalar for all layers: every eigenvalue is lam + l2 + damping.
    for layer, ev in zip(ek.layers, ek.eigenvalues()):
        np.testing.assert_allclose(ev, layer.lam + ek.damping, rtol=1e-15)
    ek2 = E.fit_ekfac(im, x, y, sampling="exact_ggn", damping=0.5)
    assert ek2.damping == 0.5 and ek2.meta["rel_damping"] is None
    assert E.fit_ekfac(im, x, y, sampling="exact_ggn", rel_damping=1.0).damping == \
        pytest.approx(mean, rel=1e-14)


# ------------------------------------------------------------------------------ sampling
def test_sampling_is_seeded_and_independent_of_batching(data):
    x, y, _, _ = data
    im = make_mlp()
    a = factors_of(im, x, None, "true_fisher", batch_size=40, seed=0)
    b = factors_of(im, x, y, "true_fisher", batch_size=7, seed=0)  # y is not read
    c = factors_of(im, x, None, "true_fisher", batch_size=40, seed=1)
    for fa, fb, fc in zip(a.layers, b.layers, c.layers):
        np.testing.assert_allclose(fa.S, fb.S, rtol=RTOL, atol=ATOL)
        assert np.abs(fa.S - fc.S).max() > 1e-3 * np.abs(fa.S).max()
    # The empirical Fisher reads the given labels (the oracle tests pin the values).
    e1 = factors_of(im, x, y, "empirical")
    e2 = factors_of(im, x, (y + 1) % 3, "empirical")
    assert np.abs(e1.layers[1].S - e2.layers[1].S).max() > 1e-3
    with pytest.raises(ValueError, match="labels"):
        E.fit_ekfac(im, x, None, sampling="empirical")


def binary_im():
    keras.utils.set_random_seed(4)
    return InfluenceModel(keras.Sequential([
        keras.Input((3,), dtype="float64"),
        keras.layers.Dense(4, activation="tanh", dtype="float64", name="h"),
        keras.layers.Dense(2, activation="sigmoid", dtype="float64", name="out")]),
        loss="binary_crossentropy", target_layers=["out"])


def mse_im():
    keras.utils.set_random_seed(4)
    return InfluenceModel(keras.Sequential([
        keras.Input((3,), dtype="float64"),
        keras.layers.Dense(4, activation="tanh", dtype="float64", name="h"),
        keras.layers.Dense(2, dtype="float64", name="out")]), loss="mse", target_layers=["out"])


@pytest.mark.parametrize("kind", ["sparse", "binary", "mse"])
def test_sampled_fisher_converges_to_exact_ggn(kind):
    """Monte Carlo: one sampled label per example over n = 4000 distinct inputs. The relative
    error of S is ~1/sqrt(n) = 1.6%; 8% is a 5-sigma bound that still catches a wrong scale
    (binary's sqrt(k), the MSE noise scale sqrt(k/2), both off by a factor 2 here)."""
    rng = np.random.default_rng(11)
    n = 4000
    if kind == "sparse":
        im = make_mlp()
        x = rng.normal(size=(n, 4)) * 2
    else:
        im = binary_im() if kind == "binary" else mse_im()
        x = rng.normal(size=(n, 3)) * 2
    S_mc = factors_of(im, x, None, "true_fisher", batch_size=1000).layers[-1].S
    S_ex = factors_of(im, x, None, "exact_ggn", batch_size=1000).layers[-1].S
    assert np.linalg.norm(S_mc - S_ex) < 0.08 * np.linalg.norm(S_ex)
    if kind == "binary":  # GGN at the logits, Keras' mean over k=2 outputs: diag(p(1-p)) / 2
        p = G.predictions(im, x)
        np.testing.assert_allclose(S_ex, np.diag(np.mean(p * (1 - p), axis=0)) / 2,
                                   rtol=RTOL, atol=ATOL)
    if kind == "mse":  # output Hessian of ||y - f||^2 / k is (2/k) I = I
        np.testing.assert_allclose(S_ex, np.eye(2), rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------ errors
def test_unsupported_target_layers_are_named():
    f = "float64"
    bn = keras.Sequential([keras.Input((4,), dtype=f), keras.layers.Dense(3, dtype=f),
                           keras.layers.BatchNormalization(dtype=f, name="bn"),
                           keras.layers.Dense(2, dtype=f, name="last")])
    emb = keras.Sequential([keras.Input((5,), dtype="int32"),
                            keras.layers.Embedding(10, 3, dtype=f, name="emb"),
                            keras.layers.Flatten(dtype=f), keras.layers.Dense(2, dtype=f)])
    lstm = keras.Sequential([keras.Input((4, 3), dtype=f),
                             keras.layers.LSTM(2, dtype=f, name="lstm"),
                             keras.layers.Dense(2, dtype=f)])
    for model, target, what in ((bn, ["bn", "last"], "'bn' (BatchNormalization)"),
                                (emb, ["emb"], "'emb' (Embedding)"),
                                (lstm, ["lstm"], "'lstm' (LSTM)")):
        im = InfluenceModel(model, target_layers=target)
        with pytest.raises(InfluenceModelError, match=r"unsupported target layer\(s\): " +
                           what.replace("(", r"\(").replace(")", r"\)") + r"\."):
            E.fit_ekfac(im, np.zeros((2,) + tuple(model.inputs[0].shape[1:])), None)
    inp = keras.Input((4,), dtype=f)
    functional = keras.Model(inp, keras.layers.Dense(2, dtype=f)(inp))
    with pytest.raises(InfluenceModelError, match="Sequential"):
        E.supported_layers(InfluenceModel(functional))
    custom = InfluenceModel(helpers.logistic_model(3),
                            loss=lambda yt, yp: keras.ops.mean((yt - yp) ** 4, axis=-1))
    with pytest.raises(InfluenceModelError, match="sampling='empirical'"):
        E.fit_ekfac(custom, np.zeros((2, 3)))
    assert E.fit_ekfac(custom, np.ones((2, 3)), np.ones((2, 1)), sampling="empirical").d == 4


@pytest.mark.parametrize("fisher", ["empirical", "exact_ggn", "true_fisher"])
def test_pipeline_passes_use_the_configured_fisher_in_both_passes(data, fisher):
    """The curvature's combiner passes (what the pipeline and the notebook's streaming fit
    run, factors then the correction with the factors arriving as a side-input keyword) give
    the EK-FAC of fit_ekfac with the same --fisher. A correction pass built without the
    factors once defaulted to the true Fisher whatever --fisher said."""
    from influence_ops.config import InfluenceConfig
    from influence_ops.curvature.kronecker import EKFACCurvature
    x, y = data[0], data[1]
    im = make_mlp()
    config = InfluenceConfig(solver="ekfac", fisher=fisher, batch_size=16)
    factors_pass, correction_pass = EKFACCurvature.combiner(config, lambda: im)
    factors = factors_pass.extract_output(
        factors_pass.add_input(factors_pass.create_accumulator(), (x, y)))
    acc = correction_pass.create_accumulator(factors=factors)
    acc = correction_pass.add_input(acc, (x, y), factors=factors)
    got = correction_pass.extract_output(acc, factors=factors)
    want = E.fit_ekfac(im, x, y, sampling=fisher, batch_size=16)
    for a, b in zip(got.layers, want.layers):
        np.testing.assert_allclose(a.lam, b.lam, rtol=RTOL, atol=ATOL)
