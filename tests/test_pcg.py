"""Preconditioned CG for many queries (influence_ops.pcg), float64 throughout.

Tolerances and why:

* solution error 1e-8 relative (max-abs over the block): the solves run to a residual tolerance
  ``tol`` with ``cond(A) * tol <= 1e-8``, which bounds the relative error of the solution
  (``||e|| / ||x|| <= cond * ||r|| / ||b||``); float64 round-off (~eps * cond ~ 1e-12 here)
  stays far below it. Measured errors are ~1e-13.
* Hutchinson trace 3%: with 4000 Rademacher probes the standard error is ~0.9% of the trace
  for this matrix (computed from the variance formula in the test), so 3% is > 3 sigma; the
  seed is fixed, so the test is deterministic anyway.
* iteration counts: "deflated < plain" is asserted strictly; the counts are printed (run with
  ``-s``) and quoted in the commit message.
"""

import logging

import numpy as np
import pytest

from influence_ops import pcg, solvers

D = 300
K = 10


def rel_err(a, b):
    return np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max()


def spd_matrix(d=D, seed=0):
    """A Hessian-like spectrum: 10 large eigenvalues (1e2 .. 3) and a long tail of 290 small
    ones (1 .. 1e-2), random eigenvectors. Condition number 1e4."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    ev = np.concatenate([np.logspace(2, 0.5, K), np.logspace(0, -2, d - K)])
    H = (Q * ev) @ Q.T
    return 0.5 * (H + H.T), Q, ev


@pytest.fixture(scope="module")
def problem():
    H, Q, ev = spd_matrix()
    B = np.random.default_rng(1).standard_normal((8, D))
    return dict(H=H, Q=Q, ev=ev, B=B, ref=np.linalg.solve(H, B.T).T,
                cond=ev.max() / ev.min())


class CountingHVP:
    """``V @ H`` that records how many rows each call got."""

    def __init__(self, H):
        self.H, self.calls = H, []

    def __call__(self, V):
        self.calls.append(len(V))
        return V @ self.H

    @property
    def rows(self):
        return sum(self.calls)


def test_plain_and_deflated_pcg_reach_the_exact_solution(problem):
    H, B, ref = problem["H"], problem["B"], problem["ref"]
    tol = 1e-8 / problem["cond"]  # 1e-12: bounds the solution error by 1e-8
    hvp = CountingHVP(H)
    X, plain = pcg.block_pcg(hvp, B, tol=tol, max_iter=2000)
    assert plain["converged"].all() and rel_err(X, ref) <= 1e-8
    assert plain["iterations"] == len(hvp.calls) and plain["hvp_rows"] == hvp.rows
    assert plain["hvp_rows"] == plain["row_iterations"].sum()
    assert np.all(plain["rel_residuals"] <= tol)

    # Exact top-k eigenpairs, tau from the exact trace.
    top = np.argsort(-problem["ev"])[:K]
    M = pcg.DeflationPreconditioner.from_eigen(
        solvers.EigenInverse(problem["Q"][:, top], problem["ev"][top]), np.trace(H))
    X, exact_defl = pcg.block_pcg(hvp, B, tol=tol, max_iter=2000, preconditioner=M)
    assert exact_defl["converged"].all() and rel_err(X, ref) <= 1e-8

    # The Arnoldi model the library fits (60 HVPs), tau from the exact trace.
    eig = solvers.arnoldi(lambda V: V @ H, D, n_iter=60, top_k=K)
    M = pcg.DeflationPreconditioner.from_eigen(eig, np.trace(H))
    X, arn_defl = pcg.block_pcg(hvp, B, tol=tol, max_iter=2000, preconditioner=M)
    assert arn_defl["converged"].all() and rel_err(X, ref) <= 1e-8
    print(f"\niterations to tol={tol:.0e} (cond 1e4, d={D}): plain {plain['iterations']}, "
          f"deflated exact top-{K} {exact_defl['iterations']}, deflated Arnoldi top-{K} "
          f"{arn_defl['iterations']}")
    assert exact_defl["iterations"] < plain["iterations"]
    assert arn_defl["iterations"] < plain["iterations"]


def test_generic_preconditioner_callable_kronecker_inverse():
    """An EK-FAC-like model: A = S (x) T + E, preconditioned by the exact (S (x) T)^-1."""
    rng = np.random.default_rng(2)

    def spd(n, lo, hi):
        Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        return (Q * np.logspace(lo, hi, n)) @ Q.T

    S, T = spd(15, -1, 1), spd(20, -1, 1)
    E = rng.standard_normal((300, 30))
    A = np.kron(S, T) + 0.02 * E @ E.T / 30
    A = 0.5 * (A + A.T)
    Si, Ti = np.linalg.inv(S), np.linalg.inv(T)

    def kron_inverse(R):  # (S (x) T)^-1 vec(X) = vec(S^-1 X T^-1) for row-major vec
        return np.einsum("ij,mjk,kl->mil", Si, R.reshape(-1, 15, 20), Ti).reshape(len(R), -1)

    B = rng.standard_normal((4, 300))
    ref = np.linalg.solve(A, B.T).T
    tol = 1e-8 / np.linalg.cond(A)
    X, plain = pcg.block_pcg(lambda V: V @ A, B, tol=tol, max_iter=2000)
    Xp, pre = pcg.block_pcg(lambda V: V @ A, B, tol=tol, max_iter=2000,
                            preconditioner=kron_inverse)
    print(f"\nKronecker-preconditioned: {pre['iterations']} iterations, plain "
          f"{plain['iterations']}")
    assert rel_err(X, ref) <= 1e-8 and rel_err(Xp, ref) <= 1e-8
    assert pre["iterations"] < plain["iterations"]


def test_converged_rows_stop_consuming_hvps(problem):
    H, Q, ev = problem["H"], problem["Q"], problem["ev"]
    B = np.stack([Q[:, 0],                        # an eigenvector: 1 iteration
                  Q[:, 3] + 2 * Q[:, 50] - Q[:, 200],  # three eigenvalues: 3 iterations
                  np.zeros(D),                    # nothing to solve: 0 HVPs
                  problem["B"][0]])               # the full spectrum: many
    hvp = CountingHVP(H)
    X, info = pcg.block_pcg(hvp, B, tol=1e-10, max_iter=2000)
    assert list(info["row_iterations"][:3]) == [1, 3, 0]
    assert info["row_iterations"][3] > 50
    # One call per iteration with only the active rows: 3, 2, 2, then 1 for the rest.
    assert hvp.calls[:4] == [3, 2, 2, 1] and set(hvp.calls[3:]) == {1}
    assert info["hvp_rows"] == hvp.rows == info["row_iterations"].sum()
    assert np.all(X[2] == 0) and info["converged"].all()
    np.testing.assert_allclose(X[0], Q[:, 0] / ev[0], rtol=1e-12, atol=1e-14)


def test_damping_on_a_singular_hessian(problem):
    Q, ev = problem["Q"], problem["ev"].copy()
    ev[-100:] = 0.0  # rank-deficient PSD: only damping makes it invertible
    H = (Q * ev) @ Q.T
    damping = 1e-2
    A = H + damping * np.eye(D)
    ref = np.linalg.solve(A, problem["B"].T).T
    tol = 1e-8 / np.linalg.cond(A)
    X, info = pcg.block_pcg(lambda V: V @ H, problem["B"], damping=damping, tol=tol,
                            max_iter=2000)
    assert info["converged"].all() and rel_err(X, ref) <= 1e-8
    top = np.argsort(-ev)[:K]
    M = pcg.DeflationPreconditioner.from_eigen(
        solvers.EigenInverse(Q[:, top], ev[top] + damping), np.trace(H) + D * damping)
    Xd, infod = pcg.block_pcg(lambda V: V @ H, problem["B"], damping=damping, tol=tol,
                              max_iter=2000, preconditioner=M)
    assert rel_err(Xd, ref) <= 1e-8 and infod["iterations"] < info["iterations"]


def test_non_positive_definite_raises(problem):
    Q = problem["Q"]
    ev = problem["ev"].copy()
    ev[5] = -3.0
    A = (Q * ev) @ Q.T
    with pytest.raises(pcg.NotPositiveDefiniteError, match="increase damping"):
        pcg.block_pcg(lambda V: V @ A, Q[:, 5][None, :])
    with pytest.raises(pcg.NotPositiveDefiniteError):
        pcg.block_pcg(lambda V: V @ A, Q[:, 5][None, :], method="block")
    # enough damping fixes it
    X, info = pcg.block_pcg(lambda V: V @ A, Q[:, 5][None, :], damping=4.0, tol=1e-12)
    np.testing.assert_allclose(X[0], Q[:, 5] / 1.0, rtol=1e-10, atol=1e-12)
    # a preconditioner that is not positive definite is refused as well
    with pytest.raises(pcg.NotPositiveDefiniteError, match="preconditioner"):
        pcg.block_pcg(lambda V: V @ problem["H"], problem["B"], preconditioner=lambda R: -R)
    with pytest.raises(ValueError, match="positive eigenvalues"):
        pcg.DeflationPreconditioner(Q[:, :2], np.array([1.0, -1.0]), 0.1)


def test_hutchinson_trace_and_tau(problem, caplog):
    H = problem["H"]
    n_probes = 4000
    est, err = pcg.hutchinson_trace(lambda V: V @ H, D, n_probes=n_probes, seed=3,
                                    return_stderr=True)
    exact = np.trace(H)
    sigma = np.sqrt(2 * (np.sum(H * H) - np.sum(np.diag(H) ** 2)) / n_probes)
    assert sigma < 0.01 * exact                     # the 3% bar is > 3 sigma
    assert abs(est - exact) <= 0.03 * exact
    assert 0.8 < err / sigma < 1.25                 # the reported standard error is honest
    # tau from an exact trace is exactly the mean of the remaining spectrum
    top = np.argsort(-problem["ev"])[:K]
    eig = solvers.EigenInverse(problem["Q"][:, top], problem["ev"][top])
    M = pcg.DeflationPreconditioner.from_eigen(eig, exact)
    rest = np.sort(problem["ev"])[:D - K]
    assert abs(M.tau - rest.mean()) <= 1e-12 * rest.mean()
    # from_hvp: Hutchinson + damping
    Mh = pcg.DeflationPreconditioner.from_hvp(
        solvers.EigenInverse(eig.U, eig.lam + 0.5), lambda V: V @ H, damping=0.5,
        n_probes=n_probes, seed=3)
    assert abs(Mh.tau - (est + D * 0.5 - eig.lam.sum() - K * 0.5) / (D - K)) <= 1e-9
    # M^-1 is what the docstring says
    R = problem["B"][:2]
    explicit = eig.U @ np.diag(1 / eig.lam) @ eig.U.T + (
        np.eye(D) - eig.U @ eig.U.T) / M.tau
    np.testing.assert_allclose(M(R), R @ explicit, rtol=1e-10, atol=1e-12)
    # guard: a trace below sum(lam) (noise) gives tau <= 0 -> clipped, with a warning
    with caplog.at_level(logging.WARNING, logger="influence_ops.pcg"):
        Mbad = pcg.DeflationPreconditioner.from_eigen(eig, 0.5 * eig.lam.sum())
    assert Mbad.tau == pytest.approx(1e-2 * eig.lam.min())
    assert "not positive" in caplog.text


def test_non_convergence_warns_and_progress_is_reported(problem, caplog):
    calls = []
    with caplog.at_level(logging.WARNING, logger="influence_ops.pcg"):
        X, info = pcg.block_pcg(lambda V: V @ problem["H"], problem["B"], tol=1e-12,
                                max_iter=5, progress=lambda *a: calls.append(a))
    assert "did not reach tol" in caplog.text
    assert info["iterations"] == 5 and not info["converged"].any()
    assert [c[0] for c in calls] == [1, 2, 3, 4, 5]
    assert all(c[1] == 5 and c[2] == 8 for c in calls)
    assert calls[-1][3] == pytest.approx(info["rel_residuals"].max())


def test_block_method_exact_with_fewer_hvps_and_rank_deficiency(problem):
    H, B, ref = problem["H"], problem["B"], problem["ref"]
    tol = 1e-8 / problem["cond"]
    hvp = CountingHVP(H)
    Xb, blk = pcg.block_pcg(hvp, B, tol=tol, max_iter=2000, method="block")
    _, bat = pcg.block_pcg(CountingHVP(H), B, tol=tol, max_iter=2000)
    print(f"\nblock CG: {blk['iterations']} iterations / {blk['hvp_rows']} HVP rows; "
          f"batched: {bat['iterations']} / {bat['hvp_rows']}")
    assert blk["converged"].all() and rel_err(Xb, ref) <= 1e-8
    assert blk["hvp_rows"] == hvp.rows < bat["hvp_rows"]
    # Rank-deficient block: duplicates, a combination, a zero row, a scaled copy.
    Bd = np.stack([B[0], B[0], 2 * B[0] - B[1], np.zeros(D), B[1], 1e-6 * B[1]])
    refd = np.linalg.solve(H, Bd.T).T
    hvp = CountingHVP(H)
    Xd, infod = pcg.block_pcg(hvp, Bd, tol=tol, max_iter=2000, method="block")
    assert infod["converged"].all()
    assert max(hvp.calls) == 2  # the search block has rank 2 (and never grows)
    _, batd = pcg.block_pcg(lambda V: V @ H, Bd, tol=tol, max_iter=2000)
    assert infod["hvp_rows"] < batd["hvp_rows"] / 2
    for i in (0, 1, 2, 4, 5):
        assert rel_err(Xd[i], refd[i]) <= 1e-8
    assert np.all(Xd[3] == 0)
    # preconditioned block method
    eig = solvers.arnoldi(lambda V: V @ H, D, n_iter=60, top_k=K)
    M = pcg.DeflationPreconditioner.from_eigen(eig, np.trace(H))
    Xp, pre = pcg.block_pcg(lambda V: V @ H, B, tol=tol, max_iter=2000, method="block",
                            preconditioner=M)
    assert rel_err(Xp, ref) <= 1e-8 and pre["iterations"] < blk["iterations"]


def _svd_rows(W, rank_tol, max_rank=None):
    """The rank-revealing reference: the top right singular vectors of the unit rows."""
    W = W / np.linalg.norm(W, axis=1)[:, None]
    _, s, Vt = np.linalg.svd(W, full_matrices=False)
    return Vt[s > rank_tol * s[0]][:max_rank]


def test_gram_orthonormalisation_matches_the_svd():
    """The block method's fast orthonormalisation (Gram matrix + one Cholesky QR pass) spans
    the same rows as the SVD and is orthonormal to round-off (1e-12: eps * r after the
    Cholesky pass); near-dependent blocks go to the SVD, which drops the dependent rows."""
    rng = np.random.default_rng(3)
    W = rng.standard_normal((12, D)) * np.logspace(0, 3, 12)[:, None]  # row scales differ
    for max_rank in (None, 7):
        Q = pcg._orthonormal_rows(W, 1e-10, max_rank)
        ref = _svd_rows(W, 1e-10, max_rank)
        assert Q.shape == ref.shape
        assert np.abs(Q @ Q.T - np.eye(len(Q))).max() <= 1e-12
        assert np.abs(Q.T @ Q - ref.T @ ref).max() <= 1e-8  # the same projector
    assert pcg._gram_orthonormal_rows(W / np.linalg.norm(W, axis=1)[:, None], None) is not None
    # A duplicate (dropped) and a row 1e-7 off another (kept: above rank_tol, but below what
    # the Gram matrix resolves): the SVD path, the SVD's rank.
    e = rng.standard_normal(D)
    Wd = np.vstack([W, W[0], W[1] + 1e-7 * np.linalg.norm(W[1]) * e / np.linalg.norm(e)])
    unit = Wd / np.linalg.norm(Wd, axis=1)[:, None]
    assert pcg._gram_orthonormal_rows(unit, None) is None
    Qd = pcg._orthonormal_rows(Wd, 1e-10)
    assert len(Qd) == len(_svd_rows(Wd, 1e-10)) == 13


def test_block_method_in_chunks(problem):
    """``max_block_rows`` solves consecutive chunks: each row's solution as when unchunked (to
    the 1e-8 of the tolerance), HVP rows and iterations summed over the chunks."""
    H, B, ref = problem["H"], problem["B"], problem["ref"]
    tol = 1e-8 / problem["cond"]
    hvp = CountingHVP(H)
    X, info = pcg.block_pcg(hvp, B, tol=tol, max_iter=2000, method="block", max_block_rows=3)
    assert info["converged"].all() and rel_err(X, ref) <= 1e-8
    assert max(hvp.calls) <= 3 and info["hvp_rows"] == hvp.rows
    assert info["iterations"] == len(hvp.calls)
    parts = [pcg.block_pcg(lambda V: V @ H, B[s], tol=tol, max_iter=2000, method="block")[1]
             for s in (slice(0, 3), slice(3, 6), slice(6, 8))]
    assert info["hvp_rows"] == sum(p["hvp_rows"] for p in parts)
    np.testing.assert_array_equal(info["row_iterations"],
                                  np.concatenate([p["row_iterations"] for p in parts]))
    with pytest.raises(ValueError, match="max_block_rows"):
        pcg.block_pcg(hvp, B, method="block", max_block_rows=0)


def test_cost_estimate_and_warning(caplog):
    cost = pcg.estimate_cost(n_queries=500, n_fit=10_000, d=1000, expected_iter=40,
                             seconds_per_query_pass=0.01, k=20)
    assert cost["query_passes"] == 20_000
    assert cost["example_hvps"] == 200_000_000
    assert cost["seconds"] == pytest.approx(200.0)
    assert cost["host_bytes"] == 5 * 500 * 1000 * 8
    with caplog.at_level(logging.WARNING, logger="influence_ops.pcg"):
        pcg.warn_if_large(10, 1000, 100, 50)
        assert caplog.text == ""
        pcg.warn_if_large(500, 10_000, 1000, 40, seconds_per_query_pass=0.01)
    assert "large PCG solve" in caplog.text and "20000 passes" in caplog.text
    H = spd_matrix(50)[0]
    assert pcg.time_hvp(lambda V: V @ H, 50) > 0


# --------------------------------------------------------------------------- a Keras model

@pytest.mark.parametrize("target_layers", [1, 2])
def test_keras_mlp_deflated_pcg_equals_explicit_solve(target_layers):
    """A float64 MLP; HVPs from gradients.hessian_vector_products. The 2-layer head is
    non-convex, so we damp past its most negative eigenvalue (as the CG oracle test does)."""
    from influence_ops import InfluenceModel
    from influence_ops import gradients as G
    from tests import helpers

    x, y, xq, yq = helpers.classification_data()
    im = InfluenceModel(helpers.mlp_classifier(x.shape[1], 3), target_layers=target_layers,
                        l2=0.01)
    H = G.explicit_hessian(im, x, y)
    lo = float(np.linalg.eigvalsh(H).min())
    damping = 0.0 if lo > 0 else 0.05 - lo
    A = H + damping * np.eye(im.n_params)
    Gq = G.per_example_gradients(im, np.concatenate([xq, x[:11]]),
                                 np.concatenate([yq, y[:11]]))
    ref = np.linalg.solve(A, Gq.T).T
    tol = 1e-8 / np.linalg.cond(A)

    def hvp(V):
        return G.hessian_vector_products(im, x, y, V)

    X, plain = pcg.block_pcg(hvp, Gq, damping=damping, tol=tol, max_iter=500)
    eig = solvers.arnoldi(hvp, im.n_params, n_iter=20, top_k=8, damping=damping)
    M = pcg.DeflationPreconditioner.from_hvp(eig, hvp, damping=damping, n_probes=64)
    Xd, defl = pcg.block_pcg(hvp, Gq, damping=damping, tol=tol, max_iter=500,
                             preconditioner=M)
    print(f"\nKeras MLP, {target_layers} layer(s), d={im.n_params}, damping={damping:.3f}, "
          f"cond {np.linalg.cond(A):.0f}: plain {plain['iterations']}, deflated Arnoldi "
          f"top-8 {defl['iterations']}")
    assert plain["converged"].all() and defl["converged"].all()
    assert rel_err(X, ref) <= 1e-8 and rel_err(Xd, ref) <= 1e-8
    assert defl["iterations"] < plain["iterations"]


@pytest.mark.parametrize("target_layers", [1, 2])
def test_featurize_fuses_queries_and_self_influence_in_one_projection(target_layers):
    """pcg's featurize_train projects on [solved queries | the Arnoldi train map] at once:
    phi equals the gradients times Q^T, and self-influence equals the one of the Arnoldi
    preconditioner's own maps (float64, 1e-10)."""
    from influence_ops import InfluenceCalculator
    from influence_ops import gradients as G
    from tests import helpers

    x, y, xq, yq = helpers.classification_data()
    # The two-layer head is not convex: damped past its negative curvature.
    calc = InfluenceCalculator(helpers.mlp_classifier(x.shape[1], 3), solver="pcg",
                               target_layers=target_layers, l2=0.05, rank=4, arnoldi_iter=8,
                               damping=0.0 if target_layers == 1 else 2.0)
    calc.fit((x, y), queries=(xq, yq))
    method = calc.method
    phi, _, self_scores = method.featurize_train(x, y)
    g = G.per_example_gradients(calc.imodel, x, y)
    assert rel_err(phi, g @ method.Q.T) <= 1e-10
    maps = method.curvature.self_curvature.gradient_maps(x, y)
    assert rel_err(self_scores, np.sum(maps["train"] * maps["query"], axis=1)) <= 1e-10
