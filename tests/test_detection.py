"""The detection curve against hand-counted examples."""

import numpy as np
import pytest

from influence_ops.detection import area_under_curve, detection_curve, found_at


def test_curve_counts_noisy_examples_in_score_order():
    scores = np.array([0.9, 0.1, 0.8, 0.3, 0.5])
    noisy = np.array([True, False, False, True, False])
    inspected, found = detection_curve(scores, noisy)
    # order: 0 (noisy), 2, 4, 3 (noisy), 1
    np.testing.assert_allclose(inspected, [0, .2, .4, .6, .8, 1.0])
    np.testing.assert_allclose(found, [0, .5, .5, .5, 1.0, 1.0])
    assert found_at(scores, noisy, (0.2, 0.6, 0.8)) == {0.2: 0.5, 0.6: 0.5, 0.8: 1.0}
    assert area_under_curve(scores, noisy) == pytest.approx((.5 + .5 + .5 + 1 + 1) / 5)


def test_perfect_and_reversed_rankings():
    noisy = np.array([True] * 3 + [False] * 7)
    perfect = np.arange(10, 0, -1).astype(float)
    assert found_at(perfect, noisy, (0.3,)) == {0.3: 1.0}
    assert found_at(-perfect, noisy, (0.7,)) == {0.7: 0.0}


def test_errors_are_named():
    with pytest.raises(ValueError, match="no example is marked noisy"):
        detection_curve([1.0, 2.0], [False, False])
    with pytest.raises(ValueError, match="same length"):
        detection_curve([1.0, 2.0], [True])
