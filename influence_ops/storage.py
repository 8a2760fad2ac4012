"""Small file-system layer for artifacts: local paths and ``gs://`` URLs.

``influence_ops`` never imports Beam, so it cannot use Beam's FileSystems. Local paths use the
standard library; ``gs://bucket/key`` uses the google-cloud-storage client, which honours
``STORAGE_EMULATOR_HOST`` (the tests run against a local emulator).
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from typing import List


def is_gcs(path: str) -> bool:
    return str(path).startswith("gs://")


def join(base: str, *parts: str) -> str:
    if is_gcs(base):
        return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts])
    return os.path.join(base, *parts)


def _split_gcs(path: str):
    rest = path[len("gs://"):]
    bucket, _, key = rest.partition("/")
    return bucket, key


_CLIENT = None


def _gcs_client():
    global _CLIENT
    if _CLIENT is None:
        from google.cloud import storage as gcs
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            from google.auth.credentials import AnonymousCredentials
            _CLIENT = gcs.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "test"),
                                 credentials=AnonymousCredentials())
        else:
            _CLIENT = gcs.Client()
    return _CLIENT


class _GcsWriter(io.BytesIO):
    def __init__(self, path):
        super().__init__()
        self._path = path

    def close(self):
        if not self.closed:
            bucket, key = _split_gcs(self._path)
            _gcs_client().bucket(bucket).blob(key).upload_from_string(self.getvalue())
        super().close()


def open_read(path: str):
    if is_gcs(path):
        bucket, key = _split_gcs(path)
        blob = _gcs_client().bucket(bucket).blob(key)
        return io.BytesIO(blob.download_as_bytes())
    return open(path, "rb")


def open_write(path: str):
    if is_gcs(path):
        return _GcsWriter(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return open(path, "wb")


def write_atomic(path: str, data: bytes) -> None:
    """Writes ``path`` so that a reader sees the old content or all of the new, never a part.

    Local: a temporary file in the same folder, flushed and fsynced, then renamed over
    ``path`` (rename is atomic within a file system); when the write fails (no space left,
    read-only) the temporary file is removed and the OSError says why. ``gs://``: one object
    upload, which becomes visible only when complete."""
    if is_gcs(path):
        bucket, key = _split_gcs(path)
        _gcs_client().bucket(bucket).blob(key).upload_from_string(data)
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def create_exclusive(path: str, data: bytes) -> bool:
    """Creates ``path`` holding ``data`` only if it does not exist yet; returns False when it
    already exists. Atomic against concurrent creators: ``O_CREAT | O_EXCL`` locally, a
    generation-0 precondition (``ifGenerationMatch=0``) on ``gs://``."""
    if is_gcs(path):
        from google.api_core import exceptions as gexc
        bucket, key = _split_gcs(path)
        try:
            _gcs_client().bucket(bucket).blob(key).upload_from_string(
                data, if_generation_match=0)
        except gexc.PreconditionFailed:
            return False
        return True
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.remove(path)
        raise
    return True


def delete(path: str) -> None:
    """Removes one file or object (nothing when it is already gone)."""
    if is_gcs(path):
        from google.api_core import exceptions as gexc
        bucket, key = _split_gcs(path)
        try:
            _gcs_client().bucket(bucket).blob(key).delete()
        except gexc.NotFound:
            pass
        return
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def exists(path: str) -> bool:
    if is_gcs(path):
        bucket, key = _split_gcs(path)
        b = _gcs_client().bucket(bucket)
        if b.blob(key).exists():
            return True
        return any(True for _ in _gcs_client().list_blobs(bucket, prefix=key.rstrip("/") + "/",
                                                          max_results=1))
    return os.path.exists(path)


def makedirs(path: str) -> None:
    if not is_gcs(path):  # GCS has no directories
        os.makedirs(path, exist_ok=True)


def listdir(path: str) -> List[str]:
    """Names directly under ``path`` (files and sub-directories)."""
    if is_gcs(path):
        bucket, key = _split_gcs(path)
        prefix = key.rstrip("/") + "/"
        names = set()
        for blob in _gcs_client().list_blobs(bucket, prefix=prefix):
            names.add(blob.name[len(prefix):].split("/")[0])
        return sorted(names)
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def delete_tree(path: str) -> None:
    if is_gcs(path):
        bucket, key = _split_gcs(path)
        for blob in list(_gcs_client().list_blobs(bucket, prefix=key.rstrip("/") + "/")):
            blob.delete()
        return
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def read_text(path: str) -> str:
    with open_read(path) as f:
        return f.read().decode("utf-8")


def write_text(path: str, text: str) -> None:
    f = open_write(path)
    try:
        f.write(text.encode("utf-8"))
    finally:
        f.close()
