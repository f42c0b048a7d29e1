"""The trained PixelLM as an ``mlflow.pyfunc`` model, logged and registered at the end of training.

Input: a DataFrame with columns ``image`` (base64-encoded PNG/JPEG) and ``question``. Output: a
DataFrame with ``text`` (one ``[SEG]`` per target), ``masks`` (JSON list of COCO RLE dicts, one per
target, at the input image size) and ``scores`` (JSON list of floats).
"""

from __future__ import annotations

import base64
import io
import json
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["PixelLMPyfunc", "decode_image", "log_pyfunc_model"]

_PIP = (
    "torch",
    "transformers",
    "peft",
    "safetensors",
    "pycocotools",
    "pillow",
    "pydantic",
    "pyyaml",
)


def decode_image(b64: str) -> Any:
    """Base64 PNG/JPEG → RGB ``PIL.Image``.

    Raises:
        ValueError: the string is not base64 of an image PIL can open.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(b64, validate=True)
        with Image.open(io.BytesIO(raw)) as im:
            return im.convert("RGB")
    except (ValueError, UnidentifiedImageError) as err:
        raise ValueError(f"image is not a base64 PNG/JPEG: {err}") from None


try:  # mlflow is a dependency; the guard only keeps this module importable in slim envs
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover
    PythonModel = object  # type: ignore[assignment,misc]


class PixelLMPyfunc(PythonModel):
    """PixelLM behind the MLflow pyfunc interface; loads the exported directory from artifacts."""

    def load_context(self, context: Any) -> None:
        """Load the ``model_dir`` artifact with ``PixelLM.from_pretrained`` (CPU)."""
        from pixellm.model import PixelLM

        self.model = PixelLM.from_pretrained(context.artifacts["model_dir"], device="cpu")

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        """Answer each row's question about its image.

        Args:
            context: the MLflow context (unused after loading).
            model_input: ``pandas.DataFrame`` with columns ``image`` (base64) and ``question``.
            params: optional ``{"max_new_tokens": int}``.

        Returns:
            ``pandas.DataFrame`` with columns ``text``, ``masks`` (JSON) and ``scores`` (JSON).

        Raises:
            ValueError: a column is missing or an image cannot be decoded.
        """
        import pandas as pd

        missing = {"image", "question"} - set(model_input.columns)
        if missing:
            raise ValueError(
                f"input DataFrame lacks columns {sorted(missing)}; need image, question"
            )
        max_new = int((params or {}).get("max_new_tokens", 64))
        images = [decode_image(b) for b in model_input["image"]]
        preds = self.model.predict(images, [str(q) for q in model_input["question"]], max_new)
        return pd.DataFrame(
            {
                "text": [p.text for p in preds],
                "masks": [json.dumps(p.masks) for p in preds],
                "scores": [json.dumps(p.scores) for p in preds],
            }
        )


def _pip_requirements() -> list[str]:
    reqs = []
    for name in _PIP:
        try:
            reqs.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs


def log_pyfunc_model(
    tracking_uri: str, run_id: str, model_dir: str | Path, registered_model_name: str
) -> str:
    """Log the exported model as a pyfunc into ``run_id`` and register it.

    The ``pixellm`` package is shipped with the model (``code_paths``) so the model loads where
    only the pip requirements are installed.

    Returns:
        The model URI (``models:/<id>``) of the logged model.
    """
    import mlflow

    import pixellm

    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=PixelLMPyfunc(),
            artifacts={"model_dir": str(model_dir)},
            code_paths=[str(Path(pixellm.__file__).parent)],
            pip_requirements=_pip_requirements(),
            registered_model_name=registered_model_name,
        )
    return info.model_uri
