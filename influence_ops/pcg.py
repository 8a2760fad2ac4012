"""Exact influence queries: preconditioned conjugate gradient over many right-hand sides.

Why: a top-k eigenbasis (Arnoldi) inverts ``H + damping`` only on its k largest directions, but
``H^-1`` is dominated by the *small* eigenvalues it drops, so low-rank influence ranks
proponents poorly against retraining. Queries are few (hundreds to thousands), so we solve
``(H + damping I) psi_q = g_q`` for all of them exactly and reuse the fitted curvature model as
a *preconditioner* instead of as the inverse. The train side then scores each example against
the d-dimensional ``psi_q`` (:func:`influence_ops.gradients.streaming_scores`).

Cost model: every iteration makes ONE batched HVP call for the whole active block of queries,
i.e. one pass over the fit sample per active query. The HVP is the expensive part; the vector
work per row and iteration is ``O(d)`` (plus ``O(d k)`` for a rank-k deflation preconditioner).
Rows that have converged leave the active set and consume no further HVPs.

Pieces:

* :func:`block_pcg` - PCG for all rows of ``B`` at once (``method='batched'``: an independent
  recursion per row sharing the HVP calls; ``method='block'``: block CG on the block Krylov
  space, rank-revealing, fewer HVPs when many queries share a spectrum; what ``--solver=pcg``
  runs, in chunks of ``max_block_rows`` queries).
* :class:`DeflationPreconditioner` - ``M^-1 = U diag(1/lam) U^T + (I - U U^T) / tau`` from an
  Arnoldi/exact eigenbasis; any SPD ``apply_inverse`` callable (e.g. EK-FAC) works as well.
* :func:`hutchinson_trace` - ``trace(H)`` from Rademacher probes, for ``tau``.
* :func:`estimate_cost` / :func:`warn_if_large` - how many HVP passes a solve will take.

Precision: the recursions run in float64 whatever the HVP dtype. With float32 HVPs the *true*
relative residual cannot go much below ~1e-6 times the condition number of the preconditioned
operator; the recursive residual reported in ``info`` keeps falling past that, so a ``tol``
much below ~1e-5 buys nothing for float32 models.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

log = logging.getLogger(__name__)

HVP = Callable[[np.ndarray], np.ndarray]             # (m, d) -> H V, (m, d)
Preconditioner = Callable[[np.ndarray], np.ndarray]  # (m, d) -> M^-1 R, (m, d)
Progress = Callable[[int, int, int, float], None]    # (iteration, max_iter, n_active, max rel)

#: ``warn_if_large`` warns above this many query-HVP passes (one pass = one direction, whole
#: fit sample).
LARGE_SOLVE_PASSES = 10_000


class NotPositiveDefiniteError(ValueError):
    """``H + damping`` (or the preconditioner) met a direction of non-positive curvature."""


def _rowdot(a, b):
    return np.einsum("ij,ij->i", a, b)


def _as_rows(B):
    B = np.asarray(B, dtype=np.float64)
    if B.ndim == 1:
        B = B[None, :]
    if B.ndim != 2:
        raise ValueError(f"right-hand sides must be (m, d), got shape {B.shape}")
    return B


def _operator(hvp: HVP, damping: float):
    def apply(V):
        out = np.asarray(hvp(V), dtype=np.float64)
        if out.shape != V.shape:
            raise ValueError(f"hvp returned shape {out.shape} for input {V.shape}")
        if not np.all(np.isfinite(out)):
            raise FloatingPointError("hvp returned non-finite values")
        return out + damping * V if damping else out
    return apply


def _preconditioner(preconditioner: Optional[Preconditioner]):
    if preconditioner is None:
        return lambda R: np.array(R, dtype=np.float64, copy=True)

    def apply(R):
        Z = np.array(preconditioner(R), dtype=np.float64, copy=True)
        if Z.shape != R.shape:
            raise ValueError(f"preconditioner returned shape {Z.shape} for input {R.shape}")
        return Z
    return apply


def _curvature_error(row, it, rayleigh, damping):
    err = NotPositiveDefiniteError(
        f"block_pcg: non-positive curvature for right-hand side {row} at iteration {it}: "
        f"p^T (H + damping) p / ||p||^2 = {rayleigh:.3e} with damping={damping:g}. "
        "H + damping is not positive definite (a non-convex model, or a singular Hessian with "
        "a right-hand side outside its range): increase damping past the most negative "
        "eigenvalue of H")
    err.rayleigh = float(rayleigh)  # an upper bound on the smallest eigenvalue of H + damping
    return err


def _preconditioner_error(row, it):
    return NotPositiveDefiniteError(
        f"block_pcg: r^T M^-1 r <= 0 for right-hand side {row} at iteration {it}: the "
        "preconditioner is not positive definite (check its eigenvalues / damping)")


def block_pcg(hvp: HVP, B: np.ndarray, damping: float = 0.0,
              preconditioner: Optional[Preconditioner] = None, max_iter: int = 100,
              tol: float = 1e-6, progress: Optional[Progress] = None,
              method: str = "batched", rank_tol: float = 1e-10,
              max_block_rows: Optional[int] = None):
    """Solves ``(H + damping I) X = B`` for all rows of ``B`` ``(m, d)``; returns ``(X, info)``.

    Args:
      hvp: ``(r, d) -> H V`` on row blocks (one call per iteration for all active rows).
      B: right-hand sides (query gradients), ``(m, d)`` or ``(d,)``.
      damping: added to H; ``H + damping`` must be positive definite.
      preconditioner: callable ``(r, d) -> M^-1 R`` with M^-1 symmetric positive definite
        (:class:`DeflationPreconditioner`, an EK-FAC ``apply_inverse``, ...), or None.
      max_iter: iterations (= batched HVP calls) at most.
      tol: stop a row when ``||r|| <= tol * ||b||`` (recursive residual). The solution error is
        then at most ``cond(H + damping) * tol`` relative.
      progress: ``progress(i, max_iter, n_active, max_rel_residual)`` after each iteration.
      method: ``'batched'`` (default): an independent PCG recursion per row, sharing the HVP
        calls; converged rows leave the active set. ``'block'``: block PCG (O'Leary 1980) in
        the breakdown-free form of Ji & Li (2017): the search block is re-orthonormalised each
        iteration and directions that became linearly dependent (singular value below
        ``rank_tol`` after normalising rows) are dropped, so duplicate or dependent queries
        are handled. It searches the *block* Krylov space, so it needs fewer HVP row-products
        when many queries share one spectrum, at ``O(r^2 d)`` extra host work per iteration
        (r = current block rank) - use it for up to a few hundred rows at a time.
      rank_tol: relative singular-value cut-off of the block method.
      max_block_rows: block method only: solve the rows in consecutive chunks of at most this
        many (None: all at once). Its host work per iteration grows with the square of the
        block (``O(r^2 d)``), its HVP calls only linearly, so past a few hundred rows several
        smaller blocks cost less than one large one.

    Returns:
      ``X`` ``(m, d)`` float64 and ``info``: ``iterations`` (HVP calls), ``row_iterations``
      ``(m,)``, ``rel_residuals`` ``(m,)`` (final ``||r|| / ||b||``; 0 for zero rows),
      ``converged`` ``(m,)`` bool, ``hvp_rows`` (row-products done in total), ``method``.

    Raises:
      NotPositiveDefiniteError: on non-positive curvature ``p^T (H + damping) p <= 0`` (add
      damping) or a non-positive-definite preconditioner.
    """
    if method not in ("batched", "block"):
        raise ValueError(f"method must be 'batched' or 'block', got {method!r}")
    if max_iter < 0 or not tol >= 0:
        raise ValueError(f"need max_iter >= 0 and tol >= 0, got {max_iter}, {tol}")
    B = _as_rows(B)
    A = _operator(hvp, float(damping))
    Minv = _preconditioner(preconditioner)
    if method == "batched":
        X, info = _batched_pcg(A, Minv, B, float(damping), int(max_iter), float(tol), progress)
    else:
        X, info = _chunked_block_pcg(A, Minv, B, float(damping), int(max_iter), float(tol),
                                     progress, rank_tol, max_block_rows)
    info["method"] = method
    info["converged"] = info["rel_residuals"] <= tol
    n_bad = int((~info["converged"]).sum())
    if n_bad:
        log.warning("block_pcg(%s): %d of %d systems did not reach tol=%g in %d iterations "
                    "(max relative residual %.2e); raise max_iter or damping, or use a "
                    "better preconditioner", method, n_bad, len(B), tol, info["iterations"],
                    float(info["rel_residuals"].max()))
    return X, info


def _init(B, tol):
    bnorm = np.linalg.norm(B, axis=1)
    rel = np.where(bnorm > 0, 1.0, 0.0)  # a zero right-hand side is solved by X = 0
    return bnorm, rel, rel > tol


def _chunked_block_pcg(A, Minv, B, damping, max_iter, tol, progress, rank_tol, rows):
    """:func:`_block_pcg` on consecutive chunks of at most ``rows`` rows of ``B``, the infos
    combined (``iterations`` = HVP calls over all chunks)."""
    m = len(B)
    rows = m if rows is None else int(rows)
    if rows < 1:
        raise ValueError(f"max_block_rows must be >= 1, got {rows}")
    if m <= rows:
        return _block_pcg(A, Minv, B, damping, max_iter, tol, progress, rank_tol)
    X = np.zeros_like(B)
    info = dict(iterations=0, row_iterations=np.zeros(m, dtype=np.int64),
                rel_residuals=np.zeros(m), hvp_rows=0)
    for start in range(0, m, rows):
        s = slice(start, min(m, start + rows))
        X[s], part = _block_pcg(A, Minv, B[s], damping, max_iter, tol, progress, rank_tol)
        for key in ("iterations", "hvp_rows"):
            info[key] += part[key]
        for key in ("row_iterations", "rel_residuals"):
            info[key][s] = part[key]
    return X, info


def _batched_pcg(A, Minv, B, damping, max_iter, tol, progress):
    m, d = B.shape
    X = np.zeros_like(B)
    R = B.copy()
    bnorm, rel, active = _init(B, tol)
    P = np.zeros_like(B)
    rz = np.zeros(m)
    row_iters = np.zeros(m, dtype=np.int64)
    hvp_rows = it = 0
    idx = np.flatnonzero(active)
    if idx.size:
        Z = Minv(R[idx])
        rz[idx] = _rowdot(R[idx], Z)
        if np.any(rz[idx] <= 0):
            raise _preconditioner_error(int(idx[np.argmax(rz[idx] <= 0)]), 0)
        P[idx] = Z
    while it < max_iter and idx.size:
        Pa = P[idx]
        APa = A(Pa)
        hvp_rows += idx.size
        it += 1
        pap = _rowdot(Pa, APa)
        bad = ~(pap > 0)
        if bad.any():
            j = int(np.argmax(bad))
            raise _curvature_error(int(idx[j]), it, pap[j] / _rowdot(Pa[j:j + 1], Pa[j:j + 1])[0],
                                   damping)
        alpha = rz[idx] / pap
        X[idx] += alpha[:, None] * Pa
        Ra = R[idx] - alpha[:, None] * APa
        R[idx] = Ra
        row_iters[idx] += 1
        rel[idx] = np.linalg.norm(Ra, axis=1) / bnorm[idx]
        still = rel[idx] > tol
        active[idx[~still]] = False
        idx, Ra = idx[still], Ra[still]
        if idx.size:
            Z = Minv(Ra)
            rz_new = _rowdot(Ra, Z)
            if np.any(rz_new <= 0):
                raise _preconditioner_error(int(idx[np.argmax(rz_new <= 0)]), it)
            P[idx] = Z + (rz_new / rz[idx])[:, None] * P[idx]
            rz[idx] = rz_new
        if progress:
            progress(it, max_iter, int(idx.size), float(rel.max()))
    return X, dict(iterations=it, row_iterations=row_iters, rel_residuals=rel, hvp_rows=hvp_rows)


def _orthonormal_rows(W, rank_tol, max_rank=None):
    """Orthonormal rows spanning the rows of ``W``, dropping near-dependent directions.

    Rows are normalised first, so a row is not dropped for being short (a nearly converged
    query), only for being (nearly) a combination of the others. At most ``max_rank`` (the
    largest) directions are kept: in exact arithmetic the block rank never grows, and without
    the cap round-off in residuals that are exact combinations of others (duplicate or
    dependent queries) shows up as new, spurious directions once those residuals are small.
    Those are not A-conjugate to the earlier blocks and slow convergence several-fold.
    """
    norms = np.linalg.norm(W, axis=1)
    W = W[norms > 0] / norms[norms > 0, None]
    if not len(W):
        return W
    fast = _gram_orthonormal_rows(W, max_rank)
    if fast is not None:
        return fast
    _, s, Vt = np.linalg.svd(W, full_matrices=False)
    keep = Vt[s > rank_tol * s[0]]
    return keep if max_rank is None else keep[:max_rank]


#: Below this ratio of its smallest to largest singular value a block goes to the SVD.
GRAM_MIN_SINGULAR = 1e-4


def _gram_orthonormal_rows(W, max_rank):
    """:func:`_orthonormal_rows` from the ``r x r`` Gram matrix when ``W`` (unit rows) is well
    conditioned, else None.

    The SVD of an ``r x d`` block costs ~25x a GEMM of the same size (measured at r = 100,
    d = 25k): most of the block method's host time. The Gram matrix's eigenvalues give the
    singular values to ``~1e-8 s_max`` absolute, so when all of them exceed
    ``GRAM_MIN_SINGULAR s_max`` no direction is near the ``rank_tol`` cut-off (it is far below)
    and every one is kept: the top ``max_rank`` right singular vectors ``diag(1/s) E^T W``
    (orthonormal up to ``~eps kappa^2 <= 1e-8``), made orthonormal to round-off by one
    Cholesky QR pass. Otherwise (dependent or nearly dependent rows) the caller runs the
    rank-revealing SVD."""
    from scipy.linalg import solve_triangular
    w, E = np.linalg.eigh(W @ W.T)
    w, E = w[::-1], E[:, ::-1]
    if not w[-1] > GRAM_MIN_SINGULAR ** 2 * w[0]:
        return None
    k = len(w) if max_rank is None else min(int(max_rank), len(w))
    Q = (E[:, :k] / np.sqrt(w[:k])).T @ W
    try:
        L = np.linalg.cholesky(Q @ Q.T)
    except np.linalg.LinAlgError:
        return None
    return solve_triangular(L, Q, lower=True)


def _block_pcg(A, Minv, B, damping, max_iter, tol, progress, rank_tol):
    m, d = B.shape
    X = np.zeros_like(B)
    R = B.copy()
    bnorm, rel, active = _init(B, tol)
    row_iters = np.zeros(m, dtype=np.int64)
    hvp_rows = it = 0
    idx = np.flatnonzero(active)
    P = np.zeros((0, d))
    if idx.size:
        Z = Minv(R[idx])
        if np.any(_rowdot(R[idx], Z) <= 0):
            raise _preconditioner_error(int(idx[np.argmax(_rowdot(R[idx], Z) <= 0)]), 0)
        P = _orthonormal_rows(Z, rank_tol)
    while it < max_iter and idx.size and len(P):
        Q = A(P)
        hvp_rows += len(P)
        it += 1
        PQ = P @ Q.T
        PQ = 0.5 * (PQ + PQ.T)
        try:
            L = np.linalg.cholesky(PQ)
        except np.linalg.LinAlgError:
            w = np.linalg.eigvalsh(PQ)
            raise _curvature_error("(block)", it, float(w.min()), damping) from None

        def solve_pq(rhs):
            return np.linalg.solve(L.T, np.linalg.solve(L, rhs))

        alpha = solve_pq(P @ R[idx].T)            # (r, n_active): Galerkin P^T R_new = 0
        X[idx] += alpha.T @ P
        Ra = R[idx] - alpha.T @ Q
        R[idx] = Ra
        row_iters[idx] += 1
        rel[idx] = np.linalg.norm(Ra, axis=1) / bnorm[idx]
        still = rel[idx] > tol
        active[idx[~still]] = False
        idx, Ra = idx[still], Ra[still]
        if idx.size:
            Z = Minv(Ra)
            if np.any(_rowdot(Ra, Z) <= 0):
                raise _preconditioner_error(int(idx[np.argmax(_rowdot(Ra, Z) <= 0)]), it)
            beta = solve_pq(Q @ Z.T)              # new block A-conjugate to P
            P = _orthonormal_rows(Z - beta.T @ P, rank_tol, max_rank=len(P))
        if progress:
            progress(it, max_iter, int(idx.size), float(rel.max()))
    if idx.size and not len(P) and it < max_iter:
        log.warning("block_pcg(block): the search block lost all rank with %d rows active",
                    idx.size)
    return X, dict(iterations=it, row_iterations=row_iters, rel_residuals=rel, hvp_rows=hvp_rows)


# --------------------------------------------------------------------------- preconditioners

def hutchinson_trace(hvp: HVP, d: int, n_probes: int = 32, seed: int = 0,
                     batch: Optional[int] = None, return_stderr: bool = False):
    """Hutchinson's estimate of ``trace(H)``: ``mean_j z_j^T H z_j`` over Rademacher probes.

    Unbiased; its variance per probe is ``2 (||H||_F^2 - sum_i H_ii^2)``. ``n_probes`` HVPs in
    calls of ``batch`` rows (default: all at once). With ``return_stderr`` also returns the
    standard error estimated from the probes.
    """
    if n_probes < 1:
        raise ValueError("n_probes must be >= 1")
    rng = np.random.default_rng(seed)
    Z = rng.choice(np.array([-1.0, 1.0]), size=(n_probes, d))
    batch = batch or n_probes
    samples = np.concatenate([
        _rowdot(Z[s:s + batch], np.asarray(hvp(Z[s:s + batch]), dtype=np.float64))
        for s in range(0, n_probes, batch)])
    est = float(samples.mean())
    if not return_stderr:
        return est
    err = float(samples.std(ddof=1) / np.sqrt(n_probes)) if n_probes > 1 else float("inf")
    return est, err


@dataclass
class DeflationPreconditioner:
    """``M^-1 = U diag(1/lam) U^T + (I - U U^T) / tau`` (symmetric positive definite).

    ``U`` ``(d, k)`` orthonormal eigenvectors of H, ``lam`` ``(k,)`` the matching eigenvalues of
    ``H + damping`` (damping included, as in :class:`influence_ops.solvers.EigenInverse`),
    ``tau`` a stand-in for the eigenvalues of the remaining ``d - k`` directions. The
    preconditioned operator has eigenvalue 1 on ``span(U)`` (exactly, if the pairs are exact)
    and ``lambda_i / tau`` on the rest, so CG only has to resolve the tail's condition number
    ``lambda_max,tail / lambda_min,tail`` whenever ``tau`` lies inside the tail's range.

    ``tau <= 0`` (or NaN) is clipped to ``tau_floor * min(lam)`` with a warning: a negative trace
    remainder means the trace estimate is too noisy, and a small positive tau is still SPD.
    """
    U: np.ndarray
    lam: np.ndarray
    tau: float
    tau_floor: float = 1e-2

    def __post_init__(self):
        self.U = np.asarray(self.U, dtype=np.float64)
        self.lam = np.asarray(self.lam, dtype=np.float64).reshape(-1)
        if self.U.ndim != 2 or self.U.shape[1] != self.lam.size:
            raise ValueError(f"U must be (d, k) with k = len(lam); got U {self.U.shape}, "
                             f"lam {self.lam.shape}")
        d, k = self.U.shape
        if k > d:
            raise ValueError(f"U has more columns ({k}) than rows ({d})")
        if k and not np.all(self.lam > 0):
            raise ValueError(
                "deflation preconditioner needs positive eigenvalues of H + damping, got "
                f"min {self.lam.min():.3e}: fit the eigenbasis with negative='drop' or add "
                "damping (PCG needs H + damping positive definite anyway)")
        if k:
            err = float(np.abs(self.U.T @ self.U - np.eye(k)).max())
            if err > 1e-6:
                raise ValueError(f"U must have orthonormal columns (max |U^T U - I| = {err:.1e})")
        tau = float(self.tau)
        if d == k:
            tau = float(self.lam.min())  # no complement: tau is never used
        elif not tau > 0:
            floor = self.tau_floor * float(self.lam.min()) if k else 1.0
            log.warning("deflation preconditioner: tau=%.3e is not positive (the trace of the "
                        "remaining spectrum came out <= 0, a noisy trace estimate?); using "
                        "%.3e = %g * min(lam)", tau, floor, self.tau_floor)
            tau = floor
        elif k and tau > self.lam.min():
            log.info("deflation preconditioner: tau=%.3e exceeds the smallest kept eigenvalue "
                     "%.3e (the kept pairs are not the top ones, or the trace is noisy)",
                     tau, float(self.lam.min()))
        self.tau = tau

    @property
    def d(self) -> int:
        return int(self.U.shape[0])

    @property
    def k(self) -> int:
        return int(self.U.shape[1])

    def __call__(self, R: np.ndarray) -> np.ndarray:
        """``M^-1`` applied to rows: ``(m, d) -> (m, d)``."""
        R = np.asarray(R, dtype=np.float64)
        C = R @ self.U
        return (C * (1.0 / self.lam - 1.0 / self.tau)) @ self.U.T + R / self.tau

    apply = __call__

    @staticmethod
    def tau_from_trace(trace: float, lam: np.ndarray, d: int) -> float:
        """``(trace(H + damping) - sum(lam)) / (d - k)``: the mean of the remaining spectrum."""
        lam = np.asarray(lam, dtype=np.float64)
        k = lam.size
        return float((trace - lam.sum()) / (d - k)) if d > k else float("nan")

    @classmethod
    def from_eigen(cls, eigen, trace: float, tau_floor: float = 1e-2
                   ) -> "DeflationPreconditioner":
        """From an object with ``.U`` ``(d, k)`` and ``.lam`` (e.g. ``solvers.arnoldi(...)``).

        ``trace`` is ``trace(H + damping I)`` of the operator being solved (for an exact
        Hessian ``np.trace(H) + d * damping``); see :meth:`from_hvp` to estimate it.
        """
        U, lam = np.asarray(eigen.U), np.asarray(eigen.lam)
        return cls(U, lam, cls.tau_from_trace(trace, lam, U.shape[0]), tau_floor)

    @classmethod
    def from_hvp(cls, eigen, hvp: HVP, damping: float = 0.0, n_probes: int = 32, seed: int = 0,
                 tau_floor: float = 1e-2) -> "DeflationPreconditioner":
        """:meth:`from_eigen` with ``trace(H)`` from :func:`hutchinson_trace` (``n_probes``
        HVPs) plus ``d * damping``. ``damping`` must be the one inside ``eigen.lam``."""
        d = int(np.asarray(eigen.U).shape[0])
        tr, err = hutchinson_trace(hvp, d, n_probes, seed, return_stderr=True)
        log.info("Hutchinson trace(H) = %.4e +- %.1e (%d probes)", tr, err, n_probes)
        return cls.from_eigen(eigen, tr + d * damping, tau_floor)


# --------------------------------------------------------------------------- cost

def estimate_cost(n_queries: int, n_fit: int, d: int, expected_iter: int,
                  seconds_per_query_pass: Optional[float] = None, k: int = 0) -> dict:
    """A rough, upper-bound cost of ``block_pcg`` (document, don't trust to 2x).

    Model: each iteration runs one HVP per *active* query over the whole fit sample ("a
    query pass"); assuming no row converges early, ``query_passes = n_queries *
    expected_iter`` and ``example_hvps = query_passes * n_fit``. Seconds are
    ``query_passes * seconds_per_query_pass`` when a measured time for one direction over
    the fit sample (at the batching used, see :func:`time_hvp`) is given, else None. Host
    work: ~``12 d`` flops per row-iteration for the CG recursion plus ``4 d k`` for a rank-k
    deflation preconditioner; host memory ~``5 * n_queries * d`` float64 values (X, R, P, the
    HVP block, the preconditioned residual). ``expected_iter``: plain CG needs about
    ``sqrt(kappa) / 2 * ln(2 / tol)`` iterations at condition number ``kappa``; with
    deflation, ``kappa`` of the spectrum left over.
    """
    passes = int(n_queries) * int(expected_iter)
    return {
        "query_passes": passes,
        "example_hvps": passes * int(n_fit),
        "host_flops": passes * (12 * d + 4 * d * int(k)),
        "host_bytes": 5 * int(n_queries) * int(d) * 8,
        "seconds": None if seconds_per_query_pass is None else passes * seconds_per_query_pass,
    }


def warn_if_large(n_queries: int, n_fit: int, d: int, expected_iter: int,
                  seconds_per_query_pass: Optional[float] = None, k: int = 0,
                  max_passes: int = LARGE_SOLVE_PASSES, logger=None) -> dict:
    """Logs a warning with :func:`estimate_cost` when it exceeds ``max_passes`` query passes;
    returns the estimate either way."""
    cost = estimate_cost(n_queries, n_fit, d, expected_iter, seconds_per_query_pass, k)
    if cost["query_passes"] > max_passes:
        secs = "" if cost["seconds"] is None else f", ~{cost['seconds']:.0f} s of HVPs"
        (logger or log).warning(
            "large PCG solve: %d queries x %d iterations = %d passes over %d fit examples "
            "(%.2e example-HVPs%s, ~%.1f GiB of host float64 state); consider fewer queries, a "
            "smaller fit sample or a stronger preconditioner", n_queries, expected_iter,
            cost["query_passes"], n_fit, cost["example_hvps"], secs,
            cost["host_bytes"] / 2 ** 30)
    return cost


def time_hvp(hvp: HVP, d: int, rows: int = 8, repeats: int = 2, seed: int = 0) -> float:
    """Measured seconds per row (one direction over the fit sample) of a batched ``hvp`` call.

    Takes the best of ``repeats`` calls after one warm-up call (which pays for tracing).
    """
    V = np.random.default_rng(seed).standard_normal((rows, d))
    hvp(V)
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        hvp(V)
        best = min(best, time.perf_counter() - t0)
    return best / rows
