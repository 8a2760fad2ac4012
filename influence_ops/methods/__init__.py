"""Influence methods, each a pair of feature maps (see ``base``).

Importing this package registers the built-in methods: ``influence``, ``relatif``,
``tracin``, ``rps_l2``, ``rps_lje``.
"""

from influence_ops.methods.base import InfluenceMethod  # noqa: F401
from influence_ops.methods.influence import FirstOrderInfluence, RelatIF  # noqa: F401
from influence_ops.methods.representers import (RepresenterPointsL2,  # noqa: F401
                                                RepresenterPointsLJE)
from influence_ops.methods.tracin import TracIn  # noqa: F401
