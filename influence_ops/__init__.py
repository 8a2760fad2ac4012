"""influence_ops: training-data influence for Keras models, as a Beam-free numeric core.

Every method is a pair of feature maps fitted once (see ``methods``); the Beam pipeline in
``pipelines/`` applies them at scale. Sign convention: ``influence(z_train, z_test) =
g_test^T H^-1 g_train``, positive = proponent; removing a training example changes the test
loss by about ``influence / n``.
"""

__version__ = "0.1.0"

from influence_ops.model import InfluenceModel, InfluenceModelError, load_keras_model  # noqa
from influence_ops.config import ConfigError, InfluenceConfig  # noqa
from influence_ops.registry import register_curvature, register_method  # noqa
from influence_ops.curvature import Curvature  # noqa
from influence_ops.methods import (FirstOrderInfluence, InfluenceMethod, RelatIF,  # noqa
                                   RepresenterPointsL2, RepresenterPointsLJE, TracIn)
from influence_ops.topk import TopKAccumulator, top_k  # noqa
from influence_ops.api import InfluenceCalculator, build_method  # noqa
from influence_ops.artifacts import load_method, save_method  # noqa
