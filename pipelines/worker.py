"""What a worker process keeps: TensorFlow configured once, the model and the fitted method
loaded once (``apache_beam.utils.shared.Shared``) and shared by every DoFn instance."""

from __future__ import annotations

import logging
import time
from typing import Optional

import apache_beam as beam
from apache_beam.utils.shared import Shared

from pipelines.constants import NAMESPACE

log = logging.getLogger(__name__)
_SHARED = Shared()


class Loaded:
    """The model wrapper and, once fitted, the method (with the config it was built from)."""

    def __init__(self, imodel, method=None, load_seconds=0.0):
        self.imodel, self.method, self.load_seconds = imodel, method, load_seconds


def configure_worker(config) -> dict:
    """TensorFlow's thread pools from ``--tf_threads`` and the plugins, before any TF op."""
    from influence_ops import registry, tf_setup
    in_effect = tf_setup.configure(threads=config.tf_threads)
    registry.import_plugins(config.plugins)
    return in_effect


def job_imodel(config):
    """The job's model wrapper, on the driver and on every worker: sample-weighted when
    ``--weight_key`` is set (every label array it takes is ``Block.method_labels``: packed
    with the row's weight, 1 for queries; the per-example loss is ``w_i l_i``)."""
    from influence_ops.api import build_imodel
    imodel = build_imodel(config)
    imodel.set_sample_weighted(bool(config.weight_key))
    return imodel


def acquire(config, artifact: Optional[str] = None) -> Loaded:
    """Model (+ artifact) loaded once per worker process and shared by all DoFn instances."""

    def load():
        t = time.time()
        from influence_ops import artifacts
        imodel = job_imodel(config)
        method = artifacts.load_method(artifact, imodel) if artifact else None
        sec = time.time() - t
        beam.metrics.Metrics.distribution(NAMESPACE, "model_load_ms").update(int(sec * 1000))
        log.info("loaded model %s%s in %.1fs", config.model,
                 f" and artifact {artifact}" if artifact else "", sec)
        return Loaded(imodel, method, sec)
    # Weighted and unweighted wrappers of one model differ (their losses): never shared.
    return _SHARED.acquire(load, tag=f"{config.model}|{artifact}|{config.weight_key}")


class ModelDoFn(beam.DoFn):
    """Base DoFn of every stage that runs the model: ``setup()`` configures TensorFlow (thread
    pools in effect are reported as the ``tf_intra_op_threads`` metric) and the subclass
    reaches the shared model / method through :meth:`loaded`."""

    def __init__(self, config):
        self.config = config

    def setup(self):
        self._threads = configure_worker(self.config)["intra_op"]

    def start_bundle(self):
        # Metrics are only collected inside a bundle, not in setup().
        beam.metrics.Metrics.distribution(NAMESPACE, "tf_intra_op_threads").update(
            self._threads)

    def loaded(self, artifact: Optional[str] = None) -> Loaded:
        return acquire(self.config, artifact)
