"""Arnoldi's force_hermitian (the seed's option): symmetrise the projected Hessian before its
eigendecomposition (default) or diagonalise the non-symmetric projection as it is."""

import logging

import numpy as np
import pytest

from influence_ops import InfluenceCalculator, InfluenceConfig, InfluenceModel, solvers
from tests import helpers


def _matrix(eigs, seed=0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(len(eigs), len(eigs))))
    return (Q * np.asarray(eigs)) @ Q.T


def _inverse(e):
    return e.U @ np.diag(1 / e.lam) @ e.U.T


@pytest.mark.parametrize("force", [True, False])
def test_both_agree_on_a_symmetric_indefinite_operator(force):
    H = _matrix([-2.0, -0.5, 0.7, 1.0, 3.0, 5.0])
    e = solvers.arnoldi(lambda V: V @ H.T, 6, 6, 6, force_hermitian=force)
    np.testing.assert_allclose(_inverse(e), np.linalg.inv(H), atol=1e-8)


def test_it_matters_when_the_projection_is_not_symmetric(caplog):
    """An indefinite H with two close eigenvalues (1 and 1 + 1e-4) seen through HVPs with a
    small antisymmetric error (1e-3, what float32 round-off does to a non-convex model's HVPs
    at scale): the error couples the close pair into complex Ritz values. Symmetrising
    recovers the symmetric H exactly (the error is antisymmetric); the non-symmetric
    eigendecomposition does not, and says so."""
    H = _matrix([-2.0, -0.5, 1.0, 1.0 + 1e-4, 3.0, 5.0], seed=1)
    R = np.random.default_rng(2).normal(size=(6, 6))
    E = 1e-3 * (R - R.T)
    hvp = lambda V: V @ (H + E).T  # noqa: E731
    ref = np.linalg.inv(H)
    sym = solvers.arnoldi(hvp, 6, 6, 6, force_hermitian=True)
    assert np.abs(_inverse(sym) - ref).max() <= 1e-8 * np.abs(ref).max()
    with caplog.at_level(logging.WARNING, logger="influence_ops.solvers"):
        raw = solvers.arnoldi(hvp, 6, 6, 6, force_hermitian=False)
    assert "Ritz values are complex" in caplog.text
    err = np.abs(_inverse(raw) - ref).max() / np.abs(ref).max()
    assert err > 1e-2, err
    # the Ritz vectors are not orthonormal any more
    assert np.abs(raw.U.T @ raw.U - np.eye(raw.U.shape[1])).max() > 1e-3


def test_option_reaches_the_solver_and_the_cli():
    assert InfluenceConfig().force_hermitian is True
    assert InfluenceConfig(force_hermitian="false").force_hermitian is False
    x, y, xq, yq = helpers.classification_data(n=60)
    model = helpers.mlp_classifier(x.shape[1], 3)
    im = InfluenceModel(model, target_layers=1, l2=0.1)
    d = im.n_params
    exact = InfluenceCalculator(im, solver="exact").fit((x, y))
    ref = exact.influence((xq, yq), (x, y))
    for force in (True, False):
        calc = InfluenceCalculator(im, solver="arnoldi", rank=d, arnoldi_iter=d,
                                   force_hermitian=force).fit((x, y))
        assert calc.method.curvature.force_hermitian is force
        np.testing.assert_allclose(calc.influence((xq, yq), (x, y)), ref, rtol=1e-6,
                                   atol=1e-8 * np.abs(ref).max())
