"""Inverse-Hessian-vector products: exact, conjugate gradient, LiSSA and Arnoldi.

All solvers work on ``(H + damping * I)`` where H is the Hessian of the training objective
(see :mod:`influence_ops.model`). They are written against a plain ``hvp(V) -> H V`` callable on
``(m, d)`` row blocks, so they are testable on an explicit matrix and reusable from Beam.

Eigenvalue policy (exact and Arnoldi), one place for the whole library:

* eigenvalues with ``|lambda + damping| <= rel_floor * max|lambda + damping|`` are **dropped**:
  their inverse would amplify noise without bound, and a truncated inverse is what
  Koh & Liang's damping approximates anyway;
* ``negative='keep'`` (default) keeps negative eigenvalues with their sign, so the inverse is
  exact on the kept subspace even for a non-convex model (train and query feature maps then
  differ by the sign, see :class:`EigenInverse`); ``'drop'`` discards them (a positive
  semi-definite model, as in Schioppa et al. 2022); ``'abs'`` uses ``|lambda|`` (a saddle-free
  Newton style model).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

HVP = Callable[[np.ndarray], np.ndarray]  # (m, d) -> (m, d)


@dataclass
class EigenInverse:
    """``(H + damping I)^-1`` restricted to eigenvectors: ``U diag(1/lam) U^T``.

    ``U`` is ``(d, k)`` with orthonormal columns, ``lam`` ``(k,)`` (damping already added).
    Feature maps: ``train_map(g) = |lam|^-1/2 U^T g`` and ``query_map(g) = sign(lam) * train_map``
    so that ``<query_map(g_test), train_map(g_train)> = g_test^T U diag(1/lam) U^T g_train``.
    """
    U: np.ndarray
    lam: np.ndarray

    @property
    def k(self) -> int:
        return int(self.lam.shape[0])

    def coordinates(self, G: np.ndarray) -> np.ndarray:
        """``G U``: ``(n, d) -> (n, k)``."""
        return np.asarray(G, dtype=np.float64) @ self.U

    def train_map_from_coordinates(self, C):
        """``(n, k)`` coordinates ``G U`` -> train features."""
        return C / np.sqrt(np.abs(self.lam))

    def query_map_from_coordinates(self, C):
        return C * (np.sign(self.lam) / np.sqrt(np.abs(self.lam)))

    def inverse_norms_from_coordinates(self, C):
        """``||(H + damping)^-1 g||`` from coordinates (U has orthonormal columns)."""
        return np.linalg.norm(C / self.lam, axis=1)

    def train_map(self, G):
        return self.train_map_from_coordinates(self.coordinates(G))

    def query_map(self, G):
        return self.query_map_from_coordinates(self.coordinates(G))

    def projection(self, side: str = "train") -> np.ndarray:
        """The ``(d, k)`` matrix P with ``train_map(G) = G P`` (fuses with per-example grads)."""
        scale = 1.0 / np.sqrt(np.abs(self.lam))
        if side == "query":
            scale = scale * np.sign(self.lam)
        return self.U * scale[None, :]

    def apply(self, G):
        """``(H + damping)^-1`` applied to rows: ``(n, d) -> (n, d)``."""
        return (self.coordinates(G) / self.lam) @ self.U.T


def select_eigenpairs(evals, evecs, damping=0.0, top_k=None, negative="keep",
                      rel_floor=1e-10) -> EigenInverse:
    """Applies the eigenvalue policy (module docstring) and keeps the top-k by magnitude."""
    if negative not in ("keep", "drop", "abs"):
        raise ValueError(f"negative must be 'keep', 'drop' or 'abs', got {negative!r}")
    lam = np.asarray(evals, dtype=np.float64) + damping
    if negative == "abs":
        lam = np.abs(lam)
    keep = np.ones_like(lam, dtype=bool)
    if negative == "drop":
        keep &= lam > 0
    scale = np.max(np.abs(lam)) if lam.size else 0.0
    tiny = np.abs(lam) <= rel_floor * scale
    if tiny.any():
        log.info("dropping %d eigenvalues below %.1e * max|lambda|", int(tiny.sum()), rel_floor)
    keep &= ~tiny
    idx = np.nonzero(keep)[0]
    idx = idx[np.argsort(-np.abs(lam[idx]), kind="stable")]
    if top_k is not None:
        idx = idx[:top_k]
    if idx.size == 0:
        raise ValueError("no usable eigenvalue left: the Hessian model is zero or all negative "
                         "with negative='drop'; add damping")
    n_neg = int(np.sum(lam[idx] < 0))
    if n_neg and negative == "keep":
        log.warning("H + damping is indefinite: %d of the %d eigenvalues kept are negative "
                    "(most negative %.3g). Policy --negative_eigenvalues=keep uses them with "
                    "their sign (the exact inverse on the kept subspace); 'drop' discards "
                    "them, 'abs' uses their magnitude, more --damping shifts them",
                    n_neg, int(idx.size), float(lam[idx].min()))
    return EigenInverse(U=np.asarray(evecs, np.float64)[:, idx], lam=lam[idx])


SMALL_EIGH = 1024  # explicit Hessians up to this size are decomposed on one BLAS thread


def exact_inverse(hessian: np.ndarray, damping: float = 0.0, negative: str = "keep",
                  rel_floor: float = 1e-10) -> EigenInverse:
    """Full eigendecomposition of an explicit ``(d, d)`` Hessian (float64).

    Up to ``d = SMALL_EIGH`` it runs on one BLAS thread: once TensorFlow's pools are up, a
    multi-threaded ``eigh`` of d = 330 took 0.5 s instead of ~20 ms on 2 cores."""
    from influence_ops.tf_setup import single_threaded_blas
    h = np.asarray(hessian, dtype=np.float64)
    with single_threaded_blas() if h.shape[0] <= SMALL_EIGH else contextlib.nullcontext():
        evals, evecs = np.linalg.eigh(0.5 * (h + h.T))
    return select_eigenpairs(evals, evecs, damping, None, negative, rel_floor)


def arnoldi(hvp: HVP, d: int, n_iter: int, top_k: int, damping: float = 0.0,
            negative: str = "keep", seed: int = 0, rel_floor: float = 1e-10,
            progress: Callable[[int, int], None] = None,
            force_hermitian: bool = True) -> EigenInverse:
    """Top-k eigenpairs of H from a Krylov basis (Schioppa et al. 2022).

    ``n_iter`` HVPs build an orthonormal basis ``Q`` ``(n_iter, d)`` of the Krylov space of a
    random start vector, with full re-orthogonalisation (classical Gram-Schmidt applied twice:
    float32 HVPs lose orthogonality fast otherwise). The projected matrix
    ``A = Q H Q^T`` is diagonalised ("distillation"); the top ``top_k`` Ritz pairs by magnitude
    go through :func:`select_eigenpairs`. The iteration stops early when the Krylov space
    becomes invariant (then the Ritz pairs are exact).

    ``force_hermitian`` (the seed's option, default True): symmetrise ``A`` to
    ``(A + A^T) / 2`` before ``eigh``: real Ritz values and orthonormal Ritz vectors, the
    eigenpairs of the symmetric part of ``Q H Q^T``. (The seed also zeroes the entries outside
    the tridiagonal band first; with full re-orthogonalisation they are the real ``Q H Q^T``,
    so they are kept.) False: ``eig`` of the Hessenberg matrix as it is, as for a non-symmetric
    operator. For a symmetric H in exact arithmetic both give the same pairs. They differ when
    the HVPs are not symmetric (float32 round-off in a deep or non-convex model, non-smooth
    layers) and H has close or indefinite eigenvalues: the asymmetry then turns nearby Ritz
    values into complex pairs and tilts the Ritz vectors off orthogonality, which an inverse of
    the form ``U diag(1/lam) U^T`` cannot represent. With False, complex pairs keep their real
    parts (a warning says how many) and the Ritz vectors are normalised but not orthogonal.
    """
    n_iter = int(min(n_iter, d))
    if top_k > n_iter:
        log.warning("arnoldi: top_k=%d exceeds the %d Krylov steps available (d=%d); keeping %d",
                    top_k, n_iter, d, n_iter)
        top_k = n_iter
    rng = np.random.default_rng(seed)
    Q = np.zeros((n_iter + 1, d), dtype=np.float64)
    A = np.zeros((n_iter + 1, n_iter), dtype=np.float64)
    q = rng.standard_normal(d)
    Q[0] = q / np.linalg.norm(q)
    m = n_iter
    for i in range(n_iter):
        w = np.asarray(hvp(Q[i][None, :]), dtype=np.float64)[0]
        for _ in range(2):
            c = Q[: i + 1] @ w
            w = w - c @ Q[: i + 1]
            A[: i + 1, i] += c
        beta = np.linalg.norm(w)
        A[i + 1, i] = beta
        if progress:
            progress(i + 1, n_iter)
        if beta < 1e-12 * max(1.0, np.abs(A[: i + 1, : i + 1]).max()):
            m = i + 1  # invariant subspace: exact eigenpairs from what we have
            break
        Q[i + 1] = w / beta
    proj = A[:m, :m]
    if force_hermitian:
        evals, evecs = np.linalg.eigh(0.5 * (proj + proj.T))
        U = Q[:m].T @ evecs  # (d, m)
    else:
        evals, evecs = np.linalg.eig(proj)
        scale = max(float(np.abs(evals).max()), 1e-300) if evals.size else 1.0
        complex_ = np.abs(evals.imag) > 1e-10 * scale
        if complex_.any():
            log.warning("arnoldi with force_hermitian=False: %d of %d Ritz values are complex "
                        "(largest imaginary part %.3g): the projected Hessian is not symmetric; "
                        "their real parts are used (force_hermitian=True symmetrises it)",
                        int(complex_.sum()), len(evals), float(np.abs(evals.imag).max()))
        evals, evecs = evals.real, evecs.real
        U = Q[:m].T @ evecs
        U /= np.maximum(np.linalg.norm(U, axis=0), 1e-300)[None, :]
    return select_eigenpairs(evals, U, damping, top_k, negative, rel_floor)


def conjugate_gradient(hvp: HVP, B: np.ndarray, damping: float = 0.0, max_iter: int = 100,
                       tol: float = 1e-8) -> np.ndarray:
    """Solves ``(H + damping I) X = B`` for all rows of ``B`` ``(m, d)`` at once.

    Each right-hand side runs its own CG recursion (its own step sizes); they share the HVP
    calls, which is what makes batching cheap. Stops when every residual norm is below
    ``tol * ||b||``. Needs H + damping positive definite (add damping for non-convex models).
    """
    B = np.atleast_2d(np.asarray(B, dtype=np.float64))
    X = np.zeros_like(B)
    R = B.copy()
    P = R.copy()
    rs = np.sum(R * R, axis=1)
    bnorm = np.sqrt(np.sum(B * B, axis=1))
    active = np.sqrt(rs) > tol * np.maximum(bnorm, 1e-300)
    for it in range(max_iter):
        if not active.any():
            break
        AP = np.zeros_like(P)
        AP[active] = np.asarray(hvp(P[active]), dtype=np.float64) + damping * P[active]
        pap = np.sum(P * AP, axis=1)
        if np.any(pap[active] <= 0):
            raise ValueError("conjugate gradient met non-positive curvature: H + damping is not "
                             "positive definite; increase damping")
        alpha = np.where(active, rs / np.where(pap == 0, 1, pap), 0.0)
        X += alpha[:, None] * P
        R -= alpha[:, None] * AP
        rs_new = np.sum(R * R, axis=1)
        beta = np.where(active, rs_new / np.where(rs == 0, 1, rs), 0.0)
        P = np.where(active[:, None], R + beta[:, None] * P, P)
        rs = rs_new
        active = np.sqrt(rs) > tol * np.maximum(bnorm, 1e-300)
    if active.any():
        log.warning("conjugate gradient: %d of %d systems did not reach tol=%g in %d iterations",
                    int(active.sum()), len(B), tol, max_iter)
    return X


def lissa(hvp_sampler: Callable[[np.ndarray, np.random.Generator], np.ndarray], B: np.ndarray,
          damping: float = 0.0, scale: float = 10.0, depth: int = 200, repeats: int = 1,
          seed: int = 0) -> np.ndarray:
    """LiSSA (Agarwal et al. 2017): ``(H + damping I)^-1 B`` by a truncated Neumann series.

    Recursion per right-hand side v: ``h <- v + h - (H_s + damping I) h / scale`` for ``depth``
    steps, where ``H_s`` is the Hessian of a random mini-batch (``hvp_sampler(V, rng)``); the
    estimate is ``h / scale``, averaged over ``repeats``. Converges when ``scale`` exceeds the
    largest eigenvalue of ``H + damping``; the error after ``depth`` steps shrinks like
    ``(1 - lambda_min / scale) ** depth``. Same damping meaning as the other solvers.
    """
    B = np.atleast_2d(np.asarray(B, dtype=np.float64))
    rng = np.random.default_rng(seed)
    total = np.zeros_like(B)
    for _ in range(repeats):
        h = B.copy()
        for _ in range(depth):
            hv = np.asarray(hvp_sampler(h, rng), dtype=np.float64) + damping * h
            h = B + h - hv / scale
            if not np.all(np.isfinite(h)):
                raise ValueError(f"LiSSA diverged: scale={scale} is below the largest "
                                 "eigenvalue of H + damping; raise scale")
        total += h / scale
    return total / repeats
