"""TensorFlow import with deliberate thread pools and GPU memory growth.

TensorFlow and the Beam SDK harness share a worker's cores. Left alone, TF sizes both of its
pools to all cores per process, and with several SDK processes per VM that oversubscribes the
CPU. TF reads its pool sizes once, when its runtime context starts (the first op, not the
import), so :func:`configure` must run before anything executes a TF op in the process:

* the CLI and ``pipelines.run.run`` call it first thing, with ``--tf_threads``;
* every worker DoFn calls it in ``setup()`` (``pipelines.worker.ModelDoFn``) before it loads a
  model; on the default in-process runner that is a no-op after the driver's call;
* elsewhere (a notebook) the environment variables below give the defaults, applied at import.

``INFLUENCE_TF_INTRA_THREADS``: threads inside one op (matmul); 0 = all cores (TF's default).
``INFLUENCE_TF_INTER_THREADS``: ops run concurrently; default 1 (our graphs are chains).

When the runtime has already started with other settings, :func:`configure` cannot change
them: it logs a warning naming the setting in effect, and :func:`threads_in_effect` reports
what the process really runs with. On a GPU, memory growth is enabled so several SDK processes
can share one device.
"""

import contextlib
import logging
import os

log = logging.getLogger(__name__)
_IMPORTED = False


def tensorflow():
    """Imports TensorFlow, applies the environment defaults once and returns the module."""
    global _IMPORTED
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    if not _IMPORTED:
        _IMPORTED = True
        configure(int(os.environ.get("INFLUENCE_TF_INTRA_THREADS", "0") or 0),
                  int(os.environ.get("INFLUENCE_TF_INTER_THREADS", "1") or 1), _quiet=True)
        try:
            for gpu in tf.config.list_physical_devices("GPU"):
                tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass
    return tf


def _context_started(tf) -> bool:
    from tensorflow.python.eager import context
    ctx = context.context()
    return getattr(ctx, "_context_handle", None) is not None


def configure(threads: int = 0, inter_threads: int = 1, _quiet: bool = False) -> dict:
    """Sets TF's intra-op (``threads``; 0 = all cores) and inter-op pools; idempotent.

    Returns :func:`threads_in_effect`. Must run before the process executes its first TF op;
    afterwards a different request is not applied and a warning says what is in effect."""
    tf = tensorflow() if _IMPORTED else _import_tf()
    threads, inter_threads = int(threads or 0), int(inter_threads or 0)
    current = threads_in_effect()
    wanted = {"intra_op": threads, "inter_op": inter_threads}
    if current == wanted:
        return current
    if _context_started(tf):
        if not _quiet:
            log.warning("TensorFlow's runtime already started with intra_op=%d, inter_op=%d "
                        "threads: the requested intra_op=%d, inter_op=%d cannot take effect in "
                        "this process (configure threads before the first TF op)",
                        current["intra_op"], current["inter_op"], threads, inter_threads)
        return current
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(inter_threads)
    return threads_in_effect()


def _import_tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    return tf


def threads_in_effect() -> dict:
    """The pool sizes this process's TF runtime uses (or will use when it starts)."""
    tf = _import_tf()
    return {"intra_op": int(tf.config.threading.get_intra_op_parallelism_threads()),
            "inter_op": int(tf.config.threading.get_inter_op_parallelism_threads())}


def single_threaded_blas():
    """A context in which numpy's BLAS (OpenBLAS) runs one thread; a no-op without
    ``threadpoolctl`` (a scikit-learn dependency).

    For numpy linear algebra interleaved with TensorFlow ops on a few cores: once TF has run,
    OpenBLAS's worker threads fight TF's pool for the cores, and small products slow down by
    10-60x (measured on 2 shared cores: a 330 x 330 solve 0.25 s instead of 4 ms, a
    100 x 25k x 100 product 0.1-0.7 s instead of 22 ms). The library scan runs once per
    process; entering the context then costs ~20 us."""
    if not _BLAS:
        try:
            from threadpoolctl import ThreadpoolController
            _BLAS.append(ThreadpoolController())
        except ImportError:
            _BLAS.append(None)
    ctl = _BLAS[0]
    return ctl.limit(limits=1, user_api="blas") if ctl is not None else contextlib.nullcontext()


_BLAS = []  # the process's threadpoolctl controller (None without threadpoolctl)
