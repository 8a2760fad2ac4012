"""Fitted methods as versioned artifacts: a directory with ``arrays.npz`` and ``manifest.json``.

The manifest records the method, its parameters, the target layers, the model fingerprint and
library versions. Loading refuses an artifact whose fingerprint does not match the model it is
loaded against, because eigenvectors or solutions from another model's Hessian would give
silently wrong scores. Arrays are saved with ``allow_pickle=False`` and loaded the same way: an
artifact never executes code. Paths may be local or ``gs://``.
"""

from __future__ import annotations

import datetime
import io
import json
import platform

import numpy as np

from influence_ops import registry, storage
from influence_ops.config import InfluenceConfig
from influence_ops.methods.base import InfluenceMethod
from influence_ops.model import InfluenceModel

# 2: the method is rebuilt from its registered name and recorded options (one config).
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
ARRAYS = "arrays.npz"


class ArtifactError(ValueError):
    pass


def library_versions() -> dict:
    import keras
    import tensorflow as tf
    from influence_ops import __version__
    return {"influence_ops": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def save_method(method: InfluenceMethod, config: InfluenceConfig, directory: str,
                extra: dict = None) -> str:
    """Writes the artifact; the manifest goes last so a reader never sees half an artifact.

    ``config``: the options the method was built from (its method options are recorded, so
    :func:`load_method` rebuilds the same method)."""
    method._check_fitted()
    if not all(isinstance(c, str) for c in config.checkpoints):
        raise ArtifactError("a TracIn artifact refers to its checkpoints by path: build TracIn "
                            "from .keras paths to save it")
    storage.makedirs(directory)
    buf = io.BytesIO()
    arrays = {k: np.asarray(v) for k, v in method.arrays().items()}
    np.savez(buf, **arrays)
    with storage.open_write(storage.join(directory, ARRAYS)) as f:
        f.write(buf.getvalue())
    manifest = {
        "format_version": FORMAT_VERSION,
        "method": method.registered_name,
        "module": type(method).__module__,
        "options": config.method_options(),
        "params": method.params(),
        "model": method.imodel.describe(),
        "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()},
        "versions": library_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
    if extra:
        manifest.update(extra)
    storage.write_text(storage.join(directory, MANIFEST), json.dumps(manifest, indent=2,
                                                                     sort_keys=True))
    return directory


def read_manifest(directory: str) -> dict:
    path = storage.join(directory, MANIFEST)
    if not storage.exists(path):
        raise ArtifactError(f"no artifact at {directory}: {MANIFEST} is missing")
    return json.loads(storage.read_text(path))


def load_method(directory: str, imodel: InfluenceModel, check_fingerprint: bool = True
                ) -> InfluenceMethod:
    """Rebuilds the fitted method of an artifact for ``imodel`` (refuses another model)."""
    return load_method_and_config(directory, imodel, check_fingerprint)[0]


def load_method_and_config(directory: str, imodel: InfluenceModel,
                           check_fingerprint: bool = True):
    """``(method, config)``: the config holds the recorded method options."""
    manifest = read_manifest(directory)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{directory}: artifact format {manifest.get('format_version')} is "
                            f"not supported (expected {FORMAT_VERSION}): refit the method")
    want = manifest["model"]
    if check_fingerprint:
        have = imodel.fingerprint()
        if have != want["fingerprint"]:
            raise ArtifactError(
                f"{directory} was fitted on a different model (fingerprint {want['fingerprint'][:12]}"
                f"..., this model {have[:12]}...): refit the method for this model")
    if [l.name for l in imodel.target_layers] != want["target_layers"]:
        raise ArtifactError(f"{directory} targets layers {want['target_layers']}, the model "
                            f"wrapper targets {[l.name for l in imodel.target_layers]}")
    options = dict(manifest["options"])
    registry.import_plugins(options.get("plugins"))
    cls = registry.get_method(manifest["method"], manifest.get("module"))
    config = InfluenceConfig.from_mapping(options)
    method = cls.from_config(imodel, config)
    with storage.open_read(storage.join(directory, ARRAYS)) as f:
        data = np.load(io.BytesIO(f.read()), allow_pickle=False)
        arrays = {k: data[k] for k in data.files}
    method.restore(arrays)
    return method, config
