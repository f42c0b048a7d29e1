"""The PixelLM Ray Serve application: one batched deployment behind a FastAPI ingress.

``serve run platform/serve/pixellm.yaml`` (import path ``pixellm.serve.app:build_app``) or
``pixellm serve --model DIR_OR_MODELS_URI`` deploys ``PixelLMDeployment``:

- ``__init__`` resolves the model (exported directory or MLflow ``models:/`` URI) and loads it once.
- Requests (HTTP ``POST /v1/segment`` and handle calls ``score``) are validated one by one, then
  queued into one ``@serve.batch`` method that maps ``list[SegmentJob]`` → ``list[Prediction]`` (same
  length) and runs the model in a worker thread, so ``/healthz`` answers while a batch computes.
- ``reconfigure(user_config)`` applies the batch knobs and request limits (a subset of
  ``ServeConfig``, validated with it), so they change without a restart.
- ``max_ongoing_requests`` / ``max_queued_requests`` / autoscaling come from ``ServeConfig``; a full
  queue is answered 503 by Serve's proxy before it reaches the replica.

Nothing runs at import: ``build_app(args)`` returns the bound application.
"""

# No `from __future__ import annotations`: FastAPI must see real types (Request) on the routes.
import asyncio
import logging
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from pixellm.config import ConfigError, ServeConfig, load_recipe
from pixellm.model import PixelLM, Prediction
from pixellm.serve.api import (
    DEPLOYMENT_NAME,
    ErrorResponse,
    Limits,
    RequestError,
    SegmentJob,
    SegmentResponse,
    check_bearer,
    decode_image,
    parse_segment_request,
    prediction_to_response,
)
from pixellm.serve.loading import is_models_uri, resolve_model_dir
from pixellm.serve.runner import prompt_tokens, run_jobs

__all__ = [
    "DEPLOYMENT_NAME",
    "USER_CONFIG_KEYS",
    "AppArgs",
    "PixelLMDeployment",
    "build_app",
    "deployment_options",
]

logger = logging.getLogger("ray.serve")

# ServeConfig fields a replica applies in reconfigure() (the rest are deployment options).
USER_CONFIG_KEYS = (
    "max_batch_size",
    "batch_wait_timeout_s",
    "max_image_pixels",
    "max_question_chars",
    "max_new_tokens",
    "bearer_token",
)

fastapi_app = FastAPI(
    title="PixelLM",
    description="Image + question → answer text with one [SEG] per target + one mask per target.",
)


@fastapi_app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": f"{request.url.path}: {exc.detail}"}, status_code=exc.status_code)


def _error(err: RequestError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse({"error": err.message}, status_code=err.status, headers=headers)


class AppArgs(BaseModel):
    """Arguments of ``build_app`` (the ``args`` of the Serve config file).

    Attributes:
        model: exported model directory or ``models:/NAME/VERSION|latest`` URI.
        recipe: recipe YAML whose ``serve`` section sets the defaults (None = built-in defaults).
        set: dotted recipe overrides, e.g. ``["serve.max_batch_size=1"]``.
        tracking_uri: MLflow tracking URI for ``models:/`` (None = ``$MLFLOW_TRACKING_URI``).
        num_cpus: CPUs reserved per replica (Ray also sets torch's thread count from it);
            None = the recipe's ``serve.num_cpus``.
        num_gpus: GPUs per replica, the model goes on CUDA when > 0; None = ``serve.num_gpus``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1)
    recipe: str | None = None
    set: list[str] = Field(default_factory=list)
    tracking_uri: str | None = None
    num_cpus: float | None = Field(None, ge=0)
    num_gpus: float | None = Field(None, ge=0)


def deployment_options(cfg: ServeConfig, num_cpus: float, num_gpus: float) -> dict[str, Any]:
    """Deployment options of a serve config: admission control, autoscaling, user_config.

    A replica counts as busy at one full batch: ``target_ongoing_requests = max_batch_size``.
    ``ServeConfig`` already rejects values Ray Serve would refuse (e.g. ``max_queued_requests=0``).
    """
    return {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "autoscaling_config": {
            "min_replicas": cfg.min_replicas,
            "initial_replicas": max(1, cfg.min_replicas),
            "max_replicas": max(cfg.max_replicas, cfg.min_replicas, 1),
            "target_ongoing_requests": min(cfg.max_batch_size, cfg.max_ongoing_requests),
        },
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        "user_config": {k: getattr(cfg, k) for k in USER_CONFIG_KEYS},
    }


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(fastapi_app)
class PixelLMDeployment:
    """A PixelLM replica (Ren et al., CVPR 2024): batched generation and teacher-forced scoring.

    Args:
        model: exported model directory or ``models:/`` URI.
        tracking_uri: MLflow tracking URI used to resolve a ``models:/`` URI.
    """

    def __init__(self, model: str, tracking_uri: str | None = None):
        self.model_ref = model
        self.model_dir = resolve_model_dir(model, tracking_uri)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = PixelLM.from_pretrained(self.model_dir, device=device)
        self.limits = Limits.from_config(ServeConfig())
        self.batch_knobs: dict[str, float] = {}
        logger.info("PixelLM loaded from %s on %s", self.model_dir, device)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply batch knobs and limits (``ServeConfig`` keys in ``USER_CONFIG_KEYS``).

        Raises:
            ConfigError: an unknown key or an invalid value.
        """
        unknown = sorted(set(user_config) - set(USER_CONFIG_KEYS))
        if unknown:
            raise ConfigError(f"user_config keys {unknown} unknown; allowed: {USER_CONFIG_KEYS}")
        try:
            cfg = ServeConfig.model_validate(user_config)
        except ValidationError as err:
            raise ConfigError(f"user_config: {err}") from None
        self._batch.set_max_batch_size(cfg.max_batch_size)
        self._batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.batch_knobs = {
            "max_batch_size": cfg.max_batch_size,
            "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
        }
        self.limits = Limits.from_config(cfg)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _batch(self, jobs: list[SegmentJob]) -> list[Prediction]:
        """One model call (per mode/budget group) for the queued jobs; same length and order."""
        return await asyncio.to_thread(run_jobs, self.model, jobs)

    def _check_length(self, job: SegmentJob, where: str) -> None:
        """Refuse a job whose token sequence would not fit ``model.max_length`` (before batching,
        so one bad job cannot fail the batch it would have joined)."""
        limit = self.model.config.max_length
        if job.answer is not None:
            conv = [
                {"role": "user", "text": job.question},
                {"role": "assistant", "text": job.answer},
            ]
            try:
                self.model.processor.encode_conversation(conv)
            except ValueError as err:
                raise RequestError(422, f"{where}: {err}") from err
            return
        used = prompt_tokens(self.model, job.question) + job.max_new_tokens
        if used > limit:
            raise RequestError(
                422,
                f"{where}: prompt + max_new_tokens = {used} tokens, over the model's "
                f"max_length={limit}; shorten the question or lower max_new_tokens",
            )

    async def _answer(self, job: SegmentJob, where: str) -> Prediction:
        """Answer one validated job through the batch queue (``__call__`` is the ASGI ingress)."""
        self._check_length(job, where)
        return await self._batch(job)

    @fastapi_app.post(
        "/v1/segment",
        response_model=SegmentResponse,
        responses={k: {"model": ErrorResponse} for k in (400, 401, 413, 422, 503)},
    )
    async def segment(self, request: Request) -> JSONResponse:
        """Answer one question about one image (JSON body, see ``pixellm.serve.api``)."""
        try:
            check_bearer(request.headers.get("authorization"), self.limits.bearer_token)
            job = parse_segment_request(await request.body(), self.limits)
            pred = await self._answer(job, "request")
        except RequestError as err:
            return _error(err)
        body = prediction_to_response(pred.text, pred.masks, pred.scores)
        return JSONResponse(body.model_dump())

    @fastapi_app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """Liveness: the replica is up and its model is loaded (no auth, for probes)."""
        return {"status": "ok"}

    @fastapi_app.get("/v1/model")
    async def model_info(self, request: Request) -> JSONResponse:
        """The served model: where it came from, its config summary, codebook L x N, limits."""
        try:
            check_bearer(request.headers.get("authorization"), self.limits.bearer_token)
        except RequestError as err:
            return _error(err)
        cfg = self.model.config
        return JSONResponse(
            {
                "model": self.model_ref,
                "model_dir": str(self.model_dir),
                "source": "mlflow" if is_models_uri(self.model_ref) else "directory",
                "config": {
                    "base": cfg.base,
                    "image_size": cfg.image_size,
                    "feature_layers": list(cfg.feature_layers),
                    "llm_image_grid": cfg.llm_image_grid,
                    "max_length": cfg.max_length,
                },
                "codebook": {
                    "scales": cfg.num_scales,
                    "tokens_per_group": cfg.tokens_per_group,
                    "shape": f"{cfg.num_scales}x{cfg.tokens_per_group}",
                },
                "device": str(self.model.device),
                "batch": self.batch_knobs,
                "limits": {
                    "max_image_pixels": self.limits.max_image_pixels,
                    "max_question_chars": self.limits.max_question_chars,
                    "max_new_tokens": self.limits.max_new_tokens,
                    "auth": self.limits.bearer_token is not None,
                },
            }
        )

    async def score(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Score one benchmark row (handle call from batch scoring).

        Args:
            sample: ``{"sample_id", "image": bytes, "question", "answer": str | None,
                "max_new_tokens": int}``; ``answer`` set = teacher-forced.

        Returns:
            ``{"sample_id", "text", "masks", "scores", "num_tokens", "error": None}``, or the
            same keys with ``"error"`` naming the problem (the row is then not predicted).
        """
        sid = str(sample["sample_id"])
        try:
            question = str(sample["question"]).strip()
            if not question:
                raise RequestError(422, f"{sid}: the row has no question (first user turn)")
            pixels = decode_image(sample["image"], self.limits.max_image_pixels, sid)
            job = SegmentJob(pixels, question, int(sample["max_new_tokens"]), sample.get("answer"))
            pred = await self._answer(job, sid)
        except RequestError as err:
            empty: dict[str, Any] = {"text": "", "masks": [], "scores": [], "num_tokens": 0}
            return {"sample_id": sid, **empty, "error": err.message}
        return {
            "sample_id": sid,
            "text": pred.text,
            "masks": pred.masks,
            "scores": [float(s) for s in pred.scores],
            "num_tokens": int(pred.num_tokens),
            "error": None,
        }


def _local_or_uri(ref: str) -> str:
    # Replicas may run in another working directory: pin a local path before it leaves the driver.
    return ref if is_models_uri(ref) else str(Path(ref).expanduser().resolve())


def build_app(args: dict[str, Any]) -> Application:
    """Build the Serve application (``import_path: pixellm.serve.app:build_app``).

    Args:
        args: see ``AppArgs`` (``model`` is required).

    Returns:
        The bound application, ready for ``serve.run`` / ``serve run``.

    Raises:
        ConfigError: an unknown or invalid argument, or a bad recipe.
    """
    try:
        parsed = AppArgs.model_validate(args)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'args'}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(
            f"serve app args: {problems} (fields: {list(AppArgs.model_fields)})"
        ) from None
    cfg = load_recipe(parsed.recipe, parsed.set).serve
    options = deployment_options(
        cfg,
        cfg.num_cpus if parsed.num_cpus is None else parsed.num_cpus,
        cfg.num_gpus if parsed.num_gpus is None else parsed.num_gpus,
    )
    return PixelLMDeployment.options(**options).bind(
        model=_local_or_uri(parsed.model), tracking_uri=parsed.tracking_uri
    )
