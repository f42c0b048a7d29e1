"""The PixelLM Ray Serve application: one batched deployment behind a FastAPI ingress.

``serve run platform/serve/pixellm.yaml`` / ``serve build pixellm.serve.app:app`` (the module
attribute ``app`` is an ``Application`` configured from ``$PIXELLM_MODEL``, ``$PIXELLM_RECIPE`` and
``$MLFLOW_TRACKING_URI``) or ``pixellm serve --model DIR_OR_MODELS_URI`` (``build_app(args)``)
deploy ``PixelLMDeployment``:

- ``__init__`` resolves the model (exported directory or MLflow ``models:/`` URI) and loads it once,
  in ``serve.dtype`` (auto = bf16 on GPU, fp32 on CPU).
- Every HTTP request passes ``RequestGuard`` first (a plain ASGI middleware): it gives the request
  an id (``X-Request-ID``), checks the bearer token on every path but ``/healthz`` (``/docs``,
  ``/redoc`` and ``/openapi.json`` included), refuses a body over the limit from its
  ``Content-Length`` or, while streaming, as soon as the limit is crossed (413, nothing buffered
  beyond it), and turns any unexpected error into a JSON 500 carrying the request id.
- Requests are validated one by one off the event loop (JSON limits, image decoding, question
  checks), admitted while the replica holds fewer than ``max_ongoing_requests +
  max_queued_requests`` of them (else a JSON 503 with ``Retry-After``), then queued into one
  ``@serve.batch`` method. When a batch fails, its jobs are rerun one by one
  (``runner.run_jobs_isolated``), so only the job that fails gets an error (a JSON 500 with the
  reason).
- ``reconfigure(user_config)`` applies batch knobs, limits and the token source (a subset of
  ``ServeConfig``, validated with it), so they change without a restart. The token itself comes
  from ``$PIXELLM_SERVE_TOKEN`` or ``serve.bearer_token_file`` on the replica, never from the
  deployment config.

Nothing runs at import.
"""

# No `from __future__ import annotations`: FastAPI must see real types (Request) on the routes.
import asyncio
import logging
import os
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
from pixellm.serve import guard
from pixellm.serve.api import (
    DEPLOYMENT_NAME,
    ROLE_MARKERS,
    ErrorResponse,
    Limits,
    RequestError,
    SegmentJob,
    SegmentResponse,
    check_question,
    decode_image,
    parse_segment_request,
    prediction_to_response,
    resolve_bearer_token,
)
from pixellm.serve.guard import RequestGuard, json_error
from pixellm.serve.loading import is_models_uri, resolve_model_dir
from pixellm.serve.runner import JobFailure, prompt_tokens, run_jobs_isolated

__all__ = [
    "DEPLOYMENT_NAME",
    "USER_CONFIG_KEYS",
    "AppArgs",
    "PixelLMDeployment",
    "RequestGuard",
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
    "max_ongoing_requests",
    "max_queued_requests",
    "retry_after_s",
    "bearer_token_file",
)
# Serve lets this many requests beyond the replica's own admission limit through, so that probes
# (/healthz) are answered while the replica is full and the 503 is ours (JSON), not the proxy's.
PROBE_HEADROOM = 8


fastapi_app = FastAPI(
    title="PixelLM",
    description="Image + question → answer text with one [SEG] per target + one mask per target.",
)
fastapi_app.add_middleware(RequestGuard)


def _request_id(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


@fastapi_app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return json_error(exc.status_code, f"{request.url.path}: {exc.detail}", _request_id(request))


class AppArgs(BaseModel):
    """Arguments of ``build_app`` (the ``args`` of a builder-style Serve config).

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


def _capacity(cfg: ServeConfig) -> int | None:
    """Requests a replica admits at once (None = unbounded queue)."""
    if cfg.max_queued_requests < 0:
        return None
    return cfg.max_ongoing_requests + cfg.max_queued_requests


def deployment_options(cfg: ServeConfig, num_cpus: float, num_gpus: float) -> dict[str, Any]:
    """Deployment options of a serve config: admission, autoscaling, user_config.

    The replica enforces ``max_ongoing_requests + max_queued_requests`` itself (JSON 503); Serve's
    own limit is set ``PROBE_HEADROOM`` above it so that its plain-text 503 is never the answer.
    A replica counts as busy at one full batch: ``target_ongoing_requests = max_batch_size``.
    """
    capacity = _capacity(cfg)
    return {
        "max_ongoing_requests": (capacity or 1_000_000) + PROBE_HEADROOM,
        "max_queued_requests": -1 if capacity is None else PROBE_HEADROOM,
        "autoscaling_config": {
            "min_replicas": cfg.min_replicas,
            "initial_replicas": max(1, cfg.min_replicas),
            "max_replicas": max(cfg.max_replicas, cfg.min_replicas, 1),
            "target_ongoing_requests": min(cfg.max_batch_size, cfg.max_ongoing_requests),
        },
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        "user_config": {k: getattr(cfg, k) for k in USER_CONFIG_KEYS},
    }


def control_strings(model: PixelLM) -> list[str]:
    """Strings a question may not contain: every special/added token and the role markers."""
    tok = model.tokenizer
    strings = set(tok.all_special_tokens) | set(tok.get_added_vocab()) | set(ROLE_MARKERS)
    return sorted(s for s in strings if s.strip())


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(fastapi_app)
class PixelLMDeployment:
    """A PixelLM replica (Ren et al., CVPR 2024): batched generation and teacher-forced scoring.

    Args:
        model: exported model directory or ``models:/`` URI.
        tracking_uri: MLflow tracking URI used to resolve a ``models:/`` URI.
        dtype: ``serve.dtype`` (auto = bf16 on GPU, fp32 on CPU).
    """

    def __init__(self, model: str, tracking_uri: str | None = None, dtype: str = "auto"):
        self.model_ref = model
        self.model_dir = resolve_model_dir(model, tracking_uri)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = PixelLM.from_pretrained(self.model_dir, device=device, dtype=dtype)
        self.control = control_strings(self.model)
        self.limits = Limits.from_config(ServeConfig(), resolve_bearer_token(ServeConfig()))
        guard.set_limits(self.limits)
        self.capacity: int | None = _capacity(ServeConfig())
        self.retry_after_s = ServeConfig().retry_after_s
        self.inflight = 0
        self.batch_knobs: dict[str, float] = {}
        logger.info("PixelLM loaded on %s (%s)", device, self.model.llava.dtype)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply batch knobs, limits, admission and token source (``USER_CONFIG_KEYS``).

        Raises:
            ConfigError: an unknown key, an invalid value, or an empty/unreadable token.
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
        self.limits = Limits.from_config(cfg, resolve_bearer_token(cfg))
        guard.set_limits(self.limits)
        self.capacity = _capacity(cfg)
        self.retry_after_s = cfg.retry_after_s

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _batch(self, jobs: list[SegmentJob]) -> list[Prediction | JobFailure]:
        """One model call (per mode/budget group) for the queued jobs; same length and order.
        A failed call is retried job by job, so only the failing job gets a ``JobFailure``."""
        return await asyncio.to_thread(run_jobs_isolated, self.model, jobs)

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
        result = await self._batch(job)
        if isinstance(result, JobFailure):
            raise RequestError(500, f"{where}: the model failed on this request ({result.reason})")
        return result

    @fastapi_app.post(
        "/v1/segment",
        response_model=SegmentResponse,
        responses={k: {"model": ErrorResponse} for k in (400, 401, 413, 415, 422, 500, 503)},
    )
    async def segment(self, request: Request) -> JSONResponse:
        """Answer one question about one image (JSON body, see ``pixellm.serve.api``)."""
        rid = _request_id(request)
        if self.capacity is not None and self.inflight >= self.capacity:
            return json_error(
                503,
                f"replica is full ({self.capacity} requests in progress or queued); retry later",
                rid,
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self.inflight += 1
        try:
            body = await request.body()  # bounded by RequestGuard
            job = await asyncio.to_thread(parse_segment_request, body, self.limits, self.control)
            pred = await self._answer(job, "request")
        except RequestError as err:
            return json_error(err.status, err.message, rid)
        finally:
            self.inflight -= 1
        out = prediction_to_response(pred.text, pred.masks, pred.scores)
        return JSONResponse(out.model_dump())

    @fastapi_app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """Liveness: the replica is up and its model is loaded (no auth, for probes)."""
        return {"status": "ok"}

    @fastapi_app.get("/v1/model")
    async def model_info(self) -> JSONResponse:
        """The served model: its source (no filesystem path), config summary, codebook, limits."""
        cfg = self.model.config
        registry = is_models_uri(self.model_ref)
        return JSONResponse(
            {
                "model": self.model_ref if registry else Path(self.model_ref).name,
                "source": "mlflow" if registry else "directory",
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
                "dtype": str(self.model.llava.dtype).removeprefix("torch."),
                "batch": self.batch_knobs,
                "limits": {
                    "max_image_pixels": self.limits.max_image_pixels,
                    "max_question_chars": self.limits.max_question_chars,
                    "max_new_tokens": self.limits.max_new_tokens,
                    "max_body_bytes": self.limits.max_body_bytes,
                    "capacity": self.capacity,
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
            check_question(question, self.control, f"{sid}: question")
            pixels = await asyncio.to_thread(
                decode_image, sample["image"], self.limits.max_image_pixels, sid
            )
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
    """Build the Serve application (an application builder: ``pixellm serve``, tests, scoring).

    Args:
        args: see ``AppArgs`` (``model`` is required).

    Returns:
        The bound application, ready for ``serve.run``.

    Raises:
        ConfigError: an unknown or invalid argument, a bad recipe, or auth asked for with an empty
            or unreadable token (checked here too, before anything is deployed).
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
    resolve_bearer_token(cfg)  # fail before deploying when the token is empty or unreadable
    options = deployment_options(
        cfg,
        cfg.num_cpus if parsed.num_cpus is None else parsed.num_cpus,
        cfg.num_gpus if parsed.num_gpus is None else parsed.num_gpus,
    )
    return PixelLMDeployment.options(**options).bind(
        model=_local_or_uri(parsed.model), tracking_uri=parsed.tracking_uri, dtype=cfg.dtype
    )


def app_from_env() -> Application:
    """The application of ``pixellm.serve.app:app``: ``$PIXELLM_MODEL`` (default
    ``runs/quickstart/model``), ``$PIXELLM_RECIPE`` (default: built-in defaults),
    ``$MLFLOW_TRACKING_URI``, ``$PIXELLM_NUM_CPUS`` / ``$PIXELLM_NUM_GPUS`` (default: the
    recipe's ``serve.num_cpus`` / ``serve.num_gpus``)."""
    return build_app(
        {
            "model": os.environ.get("PIXELLM_MODEL", "runs/quickstart/model"),
            "recipe": os.environ.get("PIXELLM_RECIPE") or None,
            "tracking_uri": os.environ.get("MLFLOW_TRACKING_URI") or None,
            "num_cpus": os.environ.get("PIXELLM_NUM_CPUS") or None,
            "num_gpus": os.environ.get("PIXELLM_NUM_GPUS") or None,
        }
    )


def __getattr__(name: str) -> Any:
    """``app`` is built on first access (``serve run`` / ``serve build`` import it), not at import."""
    if name == "app":
        return app_from_env()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
