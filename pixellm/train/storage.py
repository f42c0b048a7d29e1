"""Run storage that may be local or remote (``s3://…``, ``gs://…``, any pyarrow filesystem URI).

``train.storage_path`` is handed to Ray Train as is (it persists checkpoints through pyarrow);
this module does the same for what PixelLM writes itself (the export): a URI stays a URI (never
``Path(...).resolve()``), a local path is made absolute. Remote endpoints and credentials come from
the standard environment of every process (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, an instance
role, …). The driver forwards the endpoint and region settings it has to the workers
(``storage_env``); credentials are never copied into a Ray runtime environment (it is visible in
the dashboard): give every node its own.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["is_uri", "join", "resolve", "storage_env", "upload_dir"]

# Where-to-connect settings of the S3 client (no secrets); forwarded to Ray Train workers when set.
_FORWARDED = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_EC2_METADATA_DISABLED",
)


def is_uri(path: str) -> bool:
    """Whether ``path`` names a remote filesystem (``scheme://…``) rather than a local path."""
    return "://" in path and not path.startswith("file://")


def resolve(path: str) -> str:
    """A URI unchanged, a local path (or ``file://`` URI) made absolute."""
    if is_uri(path):
        return path.rstrip("/")
    return str(Path(path.removeprefix("file://")).resolve())


def join(base: str, *parts: str) -> str:
    """``base/part/…`` for a URI or a local path."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def upload_dir(local: str | Path, dest: str) -> None:
    """Copy a local directory tree to ``dest`` (a URI; its parent prefixes need not exist)."""
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(dest)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local), path, destination_filesystem=fs)


def storage_env() -> dict[str, str]:
    """The S3 endpoint / region settings of this process's environment (never credentials)."""
    return {k: os.environ[k] for k in _FORWARDED if k in os.environ}
