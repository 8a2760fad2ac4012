"""A test-only method whose featurize kills its SDK worker process (``--plugins``).

Registered as ``test_worker_killer``: gradient dot products, except that in a process other
than the one named by ``INFLUENCE_TEST_DRIVER_PID`` the first ``train_features`` call ends
the process at once (``os._exit``), as an OOM kill or a preempted VM would.
"""

import os

from influence_ops import gradients as grads
from influence_ops import register_method
from influence_ops.methods.base import InfluenceMethod


@register_method("test_worker_killer")
class WorkerKiller(InfluenceMethod):

    @classmethod
    def from_config(cls, imodel, config):
        return cls(imodel)

    def fit(self, x, y, query_x=None, query_y=None, query_ids=None):
        self.fitted = True
        return self

    def train_features(self, x, y):
        if str(os.getpid()) != os.environ.get("INFLUENCE_TEST_DRIVER_PID"):
            os._exit(9)
        return grads.per_example_gradients(self.imodel, x, y)

    def query_features(self, x, y, ids=None):
        return grads.per_example_gradients(self.imodel, x, y)

    def restore(self, arrays):
        self.fitted = True
