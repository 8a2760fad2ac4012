"""Small file-system layer for artifacts: local paths and ``gs://`` URLs.

``influence_ops`` never imports Beam, so it cannot use Beam's FileSystems. Local paths use the
standard library; ``gs://bucket/key`` uses the google-cloud-storage client, which honours
``STORAGE_EMULATOR_HOST`` (the tests run against a local emulator).
"""

from __future__ import annotations

import io
import os
import shutil
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
