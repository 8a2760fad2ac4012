"""Curvature models (the strategy behind every inverse-Hessian product); see ``base``.

Importing this package registers the built-in models: ``exact``, ``arnoldi``, ``cg``,
``lissa``, ``ekfac``, ``kfac``, ``pcg``.
"""

from influence_ops.curvature.base import Curvature, build_curvature  # noqa: F401
from influence_ops.curvature import eigen, iterative, kronecker, preconditioned  # noqa: F401,E501  (registration)
from influence_ops.curvature.eigen import ArnoldiCurvature, ExactCurvature  # noqa: F401
from influence_ops.curvature.iterative import (ConjugateGradientCurvature,  # noqa: F401
                                               LissaCurvature)
