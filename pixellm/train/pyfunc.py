"""The trained PixelLM as an ``mlflow.pyfunc`` model, logged and registered at the end of training.

Input: a DataFrame with columns ``image`` (base64 of PNG/JPEG/WebP/BMP bytes) and ``question``;
param ``max_new_tokens`` (int, default the training recipe's derived budget). Output: a DataFrame
with ``text`` (one ``[SEG]`` per target), ``masks`` (JSON list of COCO RLE dicts, one per target,
at the input image size) and ``scores`` (JSON list of floats). The signature and an input example are logged with the model.

The logged artifact is the self-contained export (base LLaVA + LoRA + PixelLM parts + tokenizer),
so ``models:/NAME/VERSION`` loads anywhere. Device and dtype are chosen at load time: CUDA when
available, ``dtype`` ``auto`` (bf16 on CUDA, fp32 on CPU); both can be overridden with
``mlflow.pyfunc.load_model(uri, model_config={"device": "cpu", "dtype": "fp32"})``.
"""

from __future__ import annotations

import base64
import io
import json
from importlib import metadata
from pathlib import Path
from typing import Any

from pixellm.config import DataConfig, ModelConfig, answer_token_budget

__all__ = [
    "PIP_PACKAGES",
    "PixelLMPyfunc",
    "decode_image",
    "log_pyfunc_model",
    "pip_requirements",
    "signature",
]

# Every third-party distribution the logged code imports when loading and predicting
# (tests/train/test_train_llava.py checks this list against the imports of a fresh process).
PIP_PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "accelerate",
    "peft",
    "safetensors",
    "numpy",
    "pandas",
    "pyarrow",  # pandas loads it, and pixellm.train (storage, sample log) imports it
    "pycocotools",
    "pillow",
    "pydantic",
    "pyyaml",
)
# the derived budget of a default recipe (every shipped recipe's; 152 tokens, 9 targets); a logged
# model carries its own recipe's in ``model_config`` (see log_pyfunc_model)
DEFAULT_MAX_NEW_TOKENS = answer_token_budget(ModelConfig(), DataConfig().max_targets)


def decode_image(b64: str) -> Any:
    """Base64 PNG/JPEG/WebP/BMP → ``(H, W, 3)`` uint8 RGB (the Serve API's decoder and checks).

    Raises:
        ValueError: not base64 of an allowed image format, or not decodable.
    """
    from pixellm.serve.api import RequestError
    from pixellm.serve.api import decode_image as decode

    try:
        raw = base64.b64decode(b64, validate=True)
    except ValueError as err:
        raise ValueError(f"image is not valid base64 ({err})") from None
    try:
        return decode(raw, max_pixels=1 << 31)
    except RequestError as err:
        raise ValueError(err.message) from None


try:  # mlflow is a dependency; the guard only keeps this module importable in slim envs
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover
    PythonModel = object  # type: ignore[assignment,misc]


class PixelLMPyfunc(PythonModel):
    """PixelLM behind the MLflow pyfunc interface; loads the exported directory from artifacts."""

    def load_context(self, context: Any) -> None:
        """Load the ``model_dir`` artifact on the device/dtype of ``model_config`` (default auto);
        ``model_config['max_new_tokens']`` (the training recipe's derived budget) is the default
        generation budget."""
        import torch

        from pixellm.model import PixelLM

        conf = dict(getattr(context, "model_config", None) or {})
        self.max_new_tokens = int(conf.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        device = conf.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = PixelLM.from_pretrained(
            context.artifacts["model_dir"], device=device, dtype=conf.get("dtype", "auto")
        )

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        """Answer each row's question about its image.

        Args:
            context: the MLflow context (unused after loading).
            model_input: ``pandas.DataFrame`` with columns ``image`` (base64) and ``question``.
            params: optional ``{"max_new_tokens": int}`` (default: the recipe's derived budget).

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
        max_new = int((params or {}).get("max_new_tokens") or self.max_new_tokens)
        images = [decode_image(b) for b in model_input["image"]]
        preds = self.model.predict(images, [str(q) for q in model_input["question"]], max_new)
        return pd.DataFrame(
            {
                "text": [p.text for p in preds],
                "masks": [json.dumps(p.masks) for p in preds],
                "scores": [json.dumps(p.scores) for p in preds],
            }
        )


def signature(max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Any:
    """The model signature: image + question strings in, text/masks/scores strings out,
    ``max_new_tokens`` as an inference param (default ``max_new_tokens``)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "image"), ColSpec("string", "question")]),
        outputs=Schema(
            [ColSpec("string", "text"), ColSpec("string", "masks"), ColSpec("string", "scores")]
        ),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", max_new_tokens)]),
    )


def _input_example() -> tuple[Any, dict[str, int]]:
    import numpy as np
    import pandas as pd
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((32, 48, 3), 127, dtype=np.uint8)).save(buf, format="PNG")
    frame = pd.DataFrame(
        {
            "image": [base64.b64encode(buf.getvalue()).decode("ascii")],
            "question": ["Please segment the circle."],
        }
    )
    return frame, {"max_new_tokens": 8}


def pip_requirements() -> list[str]:
    """``PIP_PACKAGES`` pinned to the installed versions."""
    reqs = []
    for name in PIP_PACKAGES:
        try:
            reqs.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs


def log_pyfunc_model(
    tracking_uri: str,
    run_id: str,
    model_dir: str | Path,
    registered_model_name: str,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> str:
    """Log the exported model as a pyfunc into ``run_id`` and register it.

    ``max_new_tokens`` (the recipe's ``serve.max_new_tokens``, derived so that no valid answer is
    cut) is the default of the signature's param and of ``predict``.

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
            pip_requirements=pip_requirements(),
            signature=signature(max_new_tokens),
            input_example=_input_example(),
            model_config={"dtype": "auto", "max_new_tokens": max_new_tokens},
            registered_model_name=registered_model_name,
        )
    return info.model_uri
