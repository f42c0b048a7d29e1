"""Resolve a model reference (exported directory or MLflow ``models:/`` URI) to a local directory.

The training export logs the exported model directory as an ``mlflow.pyfunc`` model with
``artifacts={"model_dir": <dir>}``. MLflow stores that directory under ``artifacts/<basename of the
source dir>`` inside the model (checked against MLflow 3.17: *not* ``artifacts/model_dir``), and
records the real path in the ``MLmodel`` file under ``flavors.python_function.artifacts.model_dir.path``.
So a URI is resolved in two steps: download ``MLmodel`` (a few hundred bytes), read that path, then
download only that sub-directory.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml

__all__ = ["MODEL_DIR_ARTIFACT", "ModelLoadError", "is_models_uri", "resolve_model_dir"]

MODEL_DIR_ARTIFACT = "model_dir"
_REQUIRED_FILES = ("pixellm_config.json", "model.safetensors")


class ModelLoadError(RuntimeError):
    """The model reference does not lead to a PixelLM model directory."""


def is_models_uri(ref: str) -> bool:
    """Whether ``ref`` is an MLflow registry URI (``models:/NAME/VERSION|latest|@alias``)."""
    return ref.startswith("models:/")


def _check_model_dir(path: Path, ref: str) -> Path:
    missing = [name for name in _REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise ModelLoadError(
            f"{ref}: {path} is not an exported PixelLM model directory (missing {missing}); "
            "pass the directory written by the training export or a models:/NAME/VERSION URI"
        )
    return path


def _download_from_registry(uri: str, tracking_uri: str | None, dst: Path) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    base = uri.rstrip("/")
    try:
        mlmodel = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/MLmodel", dst_path=str(dst))
        )
    except MlflowException as err:
        raise ModelLoadError(
            f"{uri}: cannot read the model from the registry at {mlflow.get_tracking_uri()} "
            f"({err.message}); check the name/version and MLFLOW_TRACKING_URI"
        ) from err
    flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {})
    artifacts = flavor.get("python_function", {}).get("artifacts") or {}
    entry = artifacts.get(MODEL_DIR_ARTIFACT)
    if not entry or "path" not in entry:
        raise ModelLoadError(
            f"{uri}: the pyfunc model has artifacts {sorted(artifacts)}, not "
            f"{MODEL_DIR_ARTIFACT!r}; log it with artifacts={{'{MODEL_DIR_ARTIFACT}': <export dir>}}"
        )
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{base}/{entry['path']}", dst_path=str(dst)
    )
    return Path(local)


def resolve_model_dir(
    ref: str, tracking_uri: str | None = None, cache_dir: str | Path | None = None
) -> Path:
    """Local directory of a model reference.

    Args:
        ref: an exported model directory, or ``models:/NAME/VERSION`` (``latest`` and ``@alias``
            work too).
        tracking_uri: MLflow tracking URI for ``models:/`` (None = ``$MLFLOW_TRACKING_URI``).
        cache_dir: where a registry model is downloaded (None = a new temporary directory).

    Returns:
        A directory holding ``pixellm_config.json`` and ``model.safetensors``.

    Raises:
        ModelLoadError: the directory or registry model is missing or is not a PixelLM export.
    """
    if not is_models_uri(ref):
        path = Path(ref).expanduser().resolve()
        if not path.is_dir():
            raise ModelLoadError(f"{ref}: model directory not found; pass an exported directory")
        return _check_model_dir(path, ref)
    dst = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="pixellm-model-"))
    dst.mkdir(parents=True, exist_ok=True)
    return _check_model_dir(_download_from_registry(ref, tracking_uri, dst), ref)
