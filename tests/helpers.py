"""Small models and data shared by the tests (float64 where an exact oracle is compared)."""

import numpy as np

from influence_ops import tf_setup

tf = tf_setup.tensorflow()
import keras  # noqa: E402


def logistic_data(n=120, p=4, seed=0, n_test=6):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=p)
    x = rng.normal(size=(n + n_test, p))
    prob = 1 / (1 + np.exp(-(x @ w)))
    y = (rng.random(n + n_test) < prob).astype(np.float64)[:, None]
    return x[:n], y[:n], x[n:], y[n:]


def logistic_model(p, dtype="float64"):
    return keras.Sequential([keras.Input((p,), dtype=dtype),
                             keras.layers.Dense(1, dtype=dtype, name="logit")])


def newton_logistic(x, y, l2, weights=None, iters=50):
    """Minimises (1/n) sum_i w_i l_i + l2/2 ||theta||^2 (theta = [w, b]) by Newton, float64.

    ``weights`` (0/1 per example) removes examples while keeping the 1/n of the full set: the
    sum-form objective of leave-one-out retraining, scaled by 1/n.
    """
    n = len(x)
    xa = np.concatenate([x, np.ones((n, 1))], axis=1)
    yv = y[:, 0]
    wts = np.ones(n) if weights is None else weights
    theta = np.zeros(xa.shape[1])
    for _ in range(iters):
        pr = 1 / (1 + np.exp(-(xa @ theta)))
        g = xa.T @ (wts * (pr - yv)) / n + l2 * theta
        H = (xa * (wts * pr * (1 - pr))[:, None]).T @ xa / n + l2 * np.eye(len(theta))
        step = np.linalg.solve(H, g)
        theta -= step
        if np.abs(step).max() < 1e-14:
            break
    return theta


def logistic_loss(theta, x, y):
    xa = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    z = xa @ theta
    return np.logaddexp(0, z) - y[:, 0] * z


def logistic_oracle(theta, x, y, l2):
    """Numpy per-example gradients (n, d) and Hessian (d, d) of the objective."""
    n = len(x)
    xa = np.concatenate([x, np.ones((n, 1))], axis=1)
    pr = 1 / (1 + np.exp(-(xa @ theta)))
    g = xa * (pr - y[:, 0])[:, None]
    H = (xa * (pr * (1 - pr))[:, None]).T @ xa / n + l2 * np.eye(xa.shape[1])
    return g, H


def mlp_classifier(p, classes, hidden=6, dtype="float64", seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((p,), dtype=dtype),
        keras.layers.Dense(hidden, activation="tanh", dtype=dtype, name="hidden"),
        keras.layers.Dense(classes, dtype=dtype, name="out"),
    ])


def classification_data(n=80, p=4, classes=3, n_test=5, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=2.0, size=(classes, p))
    y = rng.integers(0, classes, n + n_test)
    x = centers[y] + rng.normal(size=(n + n_test, p))
    return x[:n], y[:n], x[n:], y[n:]


def train(model, x, y, loss, epochs=200, lr=0.05):
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=loss)
    model.fit(x, y, epochs=epochs, batch_size=len(x), verbose=0)
    return model


def logistic_setup(n: int, l2: float) -> dict:
    """An L2 logistic regression at its optimum (Newton, float64) wrapped for influence, with
    its numpy oracle: per-example gradients of train (``g``) and test (``gq``) examples and
    the Hessian ``H`` of the objective."""
    from influence_ops import InfluenceModel
    x, y, xq, yq = logistic_data(n=n)
    theta = newton_logistic(x, y, l2)
    im = InfluenceModel(logistic_model(x.shape[1]), loss="binary_crossentropy",
                        from_logits=True, l2=l2)
    im.set_flat_params(theta)
    g, H = logistic_oracle(theta, x, y, l2)
    gq, _ = logistic_oracle(theta, xq, yq, l2)
    return dict(im=im, x=x, y=y, xq=xq, yq=yq, g=g, gq=gq, H=H, theta=theta)
