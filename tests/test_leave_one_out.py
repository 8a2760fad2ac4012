"""Influence against real leave-one-out retraining on a convex model.

L2-regularised logistic regression on generated data is retrained to convergence (Newton,
float64) without each of the 40 training examples with the largest |influence| on each of
two test points. Retraining minimises ``(1/n) sum_{j != i} l_j + l2/2 ||theta||^2``: the
sum-form objective of leave-one-out, scaled by 1/n, which is the perturbation the influence
function linearises. Predicted change of the test loss: ``influence / n``. We require
Pearson >= 0.95 and matching signs on the examples whose effect is clearly non-zero.
"""

import numpy as np

from influence_ops import InfluenceCalculator, InfluenceModel
from tests import helpers

L2 = 0.01


def test_influence_predicts_leave_one_out_retraining():
    x, y, xq, yq = helpers.logistic_data(n=200, p=5, seed=7, n_test=2)
    n = len(x)
    theta = helpers.newton_logistic(x, y, L2)
    im = InfluenceModel(helpers.logistic_model(x.shape[1]), loss="binary_crossentropy",
                        from_logits=True, l2=L2)
    im.set_flat_params(theta)
    calc = InfluenceCalculator(im, solver="exact").fit((x, y))
    scores = calc.influence((xq, yq), (x, y))
    predicted, actual = [], []
    for t in range(len(xq)):
        base = helpers.logistic_loss(theta, xq[t:t + 1], yq[t:t + 1])[0]
        for i in np.argsort(-np.abs(scores[t]))[:40]:
            w = np.ones(n)
            w[i] = 0.0
            theta_i = helpers.newton_logistic(x, y, L2, weights=w)
            actual.append(helpers.logistic_loss(theta_i, xq[t:t + 1], yq[t:t + 1])[0] - base)
            predicted.append(scores[t, i] / n)
    predicted, actual = np.array(predicted), np.array(actual)
    r = np.corrcoef(predicted, actual)[0, 1]
    assert r >= 0.95, f"Pearson {r:.3f}"
    clear = np.abs(actual) > 0.1 * np.abs(actual).max()
    assert np.all(np.sign(predicted[clear]) == np.sign(actual[clear]))
    # Scale, not just correlation: the slope of actual on predicted is close to 1.
    slope = np.polyfit(predicted, actual, 1)[0]
    assert 0.8 < slope < 1.25, slope
