"""TensorFlow import with deliberate thread pools and GPU memory growth.

TensorFlow and the Beam SDK harness share a worker's cores. Left alone, TF sizes both of its
pools to all cores per process, and with several SDK processes per VM that oversubscribes the
CPU. We set the pools once, before TF creates its runtime, from two environment variables:

* ``INFLUENCE_TF_INTRA_THREADS``: threads inside one op (matmul). Default: all cores.
* ``INFLUENCE_TF_INTER_THREADS``: ops run concurrently. Default: 1 (our graphs are chains).

The pipeline option ``--tf_threads`` sets the intra value on workers. On a GPU, memory growth
is enabled so several SDK processes can share one device.
"""

import os

_CONFIGURED = False


def tensorflow():
    """Imports TensorFlow, configures it once per process and returns the module."""
    global _CONFIGURED
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    if not _CONFIGURED:
        _CONFIGURED = True
        intra = int(os.environ.get("INFLUENCE_TF_INTRA_THREADS", "0") or 0)
        inter = int(os.environ.get("INFLUENCE_TF_INTER_THREADS", "1") or 1)
        try:
            if intra > 0:
                tf.config.threading.set_intra_op_parallelism_threads(intra)
            tf.config.threading.set_inter_op_parallelism_threads(inter)
        except RuntimeError:
            pass  # runtime already initialised by the caller: keep its settings
        try:
            for gpu in tf.config.list_physical_devices("GPU"):
                tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass
    return tf
