"""Request parsing, limits, model loading, scoring files and the Serve config file (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pixellm.config import ConfigError, ServeConfig, load_recipe
from pixellm.serve.api import (
    Limits,
    RequestError,
    check_bearer,
    decode_image,
    parse_segment_request,
    prediction_to_response,
)
from pixellm.serve.loading import ModelLoadError, resolve_model_dir
from pixellm.serve.scoring_io import append_results, read_done_ids, write_predictions_parquet
from tests.serve.serve_helpers import ROOT, b64, export_tiny_model, png_bytes

LIMITS = Limits(max_image_pixels=10_000, max_question_chars=20, max_new_tokens=8)


def _body(**kw) -> bytes:
    return json.dumps({"image": b64(png_bytes(20, 30)), "question": "where?", **kw}).encode()


def test_parse_good_request_decodes_image_and_defaults_budget():
    job = parse_segment_request(_body(question="  where is it?  "), LIMITS)
    assert job.image.shape == (20, 30, 3) and job.image.dtype == np.uint8
    assert job.question == "where is it?" and job.max_new_tokens == 8 and job.answer is None
    data_url = "data:image/png;base64," + b64(png_bytes(5, 5))
    body = json.dumps({"image": data_url, "question": "q"}).encode()
    assert parse_segment_request(body, LIMITS).image.shape == (5, 5, 3)


@pytest.mark.parametrize(
    ("body", "status", "match"),
    [
        (b"{oops", 400, "not valid JSON"),
        (b'"just a string"', 422, "must be a JSON object"),
        (_body(image="%%%"), 400, "not valid base64"),
        (_body(image=b64(b"GIF89a-not-really")), 415, "a GIF image is not accepted"),
        (_body(image=b64(b"hello, not an image")), 415, "unknown type is not accepted"),
        (_body(image=b64(png_bytes(8, 8)[:40])), 400, "not a decodable PNG image"),
        (b"[" * 50 + b"]" * 50, 400, "deeper than 4 levels"),
        (
            b'{"image": "x", "question": "q", "max_new_tokens": ' + b"9" * 5000 + b"}",
            400,
            "5000-digit",
        ),
        (b'{"image": "x", "question": "\\ud800"}', 422, "not valid Unicode"),
        (b"\xff\xfe{}", 400, "not valid UTF-8"),
        (_body(image=b64(png_bytes(101, 100))), 413, "10100 pixels is over the limit of 10000"),
        (_body(image=""), 400, "'image' is empty"),
        (json.dumps({"image": b64(png_bytes(5, 5))}).encode(), 422, "'question' is required"),
        (_body(question=""), 422, "'question' is empty"),
        (_body(question="x" * 21), 422, "21 characters, over the limit of 20"),
        (_body(question=["a"]), 422, "'question'.*got list"),
        (_body(max_new_tokens=9), 422, r"'max_new_tokens'=9 is out of range \[1, 8\]"),
        (_body(max_new_tokens=-1), 422, "out of range"),
        (_body(max_new_tokens=2.5), 422, "'max_new_tokens'"),
        (_body(max_new_tokens=True), 422, "'max_new_tokens'"),
        (_body(extra=1), 422, "'extra' is not a field"),
    ],
)
def test_bad_requests_raise_with_status_and_message(body, status, match):
    with pytest.raises(RequestError, match=match) as err:
        parse_segment_request(body, LIMITS)
    assert err.value.status == status


def test_control_strings_in_the_question_are_refused():
    control = ["<image>", "<seg_0_0>", "</s>", "USER:", "ASSISTANT:"]
    for bad in control:
        with pytest.raises(RequestError, match="control string") as err:
            parse_segment_request(_body(question=f"find {bad} it"), LIMITS, control)
        assert err.value.status == 422 and repr(bad) in err.value.message
    assert parse_segment_request(_body(question="user: hi"), LIMITS, control).question


def test_error_messages_carry_no_object_repr():
    from pixellm.serve.api import clean_message

    assert clean_message("cannot identify <_io.BytesIO object at 0x7f00aa>") == (
        "cannot identify <object>"
    )
    with pytest.raises(RequestError) as err:
        decode_image(png_bytes(8, 8)[:60], 100)
    assert " at 0x" not in err.value.message


def _encode(img, fmt: str) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def test_image_format_allow_list():
    from PIL import Image

    rgb = Image.fromarray(np.full((6, 9, 3), 200, dtype=np.uint8))
    for fmt in ("PNG", "JPEG", "WEBP", "BMP"):
        assert decode_image(_encode(rgb, fmt), 100).shape == (6, 9, 3), fmt
    for fmt, name in (("GIF", "GIF"), ("TIFF", "TIFF"), ("EPS", "EPS"), ("PDF", "PDF")):
        try:
            data = _encode(rgb, fmt)
        except OSError:  # EPS needs Ghostscript to *write*; the signature is enough to refuse
            data = b"%!PS-Adobe-3.0 EPSF-3.0\n"
        with pytest.raises(RequestError, match=f"a {name} image is not accepted") as err:
            decode_image(data, 100)
        assert err.value.status == 415


def test_16_bit_and_float_images_are_scaled_not_saturated():
    from PIL import Image

    ramp = (np.arange(64, dtype=np.uint16) * 1024).reshape(8, 8)  # 0 .. 64512
    out = decode_image(_encode(Image.fromarray(ramp), "PNG"), 100)
    assert out.shape == (8, 8, 3)
    expected = np.rint(ramp / 257.0).astype(np.uint8)
    assert np.array_equal(out[..., 0], expected)
    assert (out == 255).mean() < 0.05  # saturation would make ~all pixels 255
    from pixellm.serve.api import _to_rgb8

    floats = Image.fromarray(np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4), mode="F")
    assert _to_rgb8(floats)[..., 0].tolist()[-1][-1] == 255 and _to_rgb8(floats).min() == 0


def test_rgba_is_composited_on_white():
    from PIL import Image

    from pixellm.serve.api import ALPHA_BACKGROUND

    px = np.zeros((4, 4, 4), dtype=np.uint8)
    px[..., 0] = 255  # red
    px[:2, :, 3] = 255  # top half opaque, bottom half transparent
    out = decode_image(_encode(Image.fromarray(px, "RGBA"), "PNG"), 100)
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[3, 3].tolist() == list(ALPHA_BACKGROUND)


def test_bearer_token_comes_from_env_or_file_never_config(tmp_path):
    from pixellm.serve.api import TOKEN_ENV, resolve_bearer_token

    assert resolve_bearer_token(ServeConfig(), {}) is None
    assert resolve_bearer_token(ServeConfig(), {TOKEN_ENV: " t0k "}) == "t0k"
    with pytest.raises(ConfigError, match="set but empty"):
        resolve_bearer_token(ServeConfig(), {TOKEN_ENV: "  "})
    f = tmp_path / "token"
    f.write_text("from-file\n")
    cfg = ServeConfig(bearer_token_file=str(f))
    assert resolve_bearer_token(cfg, {TOKEN_ENV: "env"}) == "from-file"
    f.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        resolve_bearer_token(cfg, {})
    with pytest.raises(ConfigError, match="cannot be read"):
        resolve_bearer_token(ServeConfig(bearer_token_file=str(tmp_path / "nope")), {})
    with pytest.raises(ConfigError, match="PIXELLM_SERVE_TOKEN"):
        load_recipe(None, ["serve.bearer_token=abc"])


def test_oversized_payload_is_refused_before_decoding():
    huge = "A" * (20 * LIMITS.max_image_pixels)  # decodes to 150 kB > 4 B/px + 64 kB
    with pytest.raises(RequestError, match="base64 chars, over the") as err:
        parse_segment_request(_body(image=huge), LIMITS)
    assert err.value.status == 413


def test_decode_image_converts_grey_and_rgba_to_rgb():
    from io import BytesIO

    from PIL import Image

    for mode in ("L", "RGBA", "P"):
        buf = BytesIO()
        Image.new(mode, (7, 4)).save(buf, "PNG")
        assert decode_image(buf.getvalue(), 100).shape == (4, 7, 3)


def test_bearer_token():
    check_bearer(None, None)
    check_bearer("Bearer abc", "abc")
    for header, match in ((None, "missing"), ("abc", "missing"), ("Bearer abd", "not valid")):
        with pytest.raises(RequestError, match=match) as err:
            check_bearer(header, "abc")
        assert err.value.status == 401


def test_response_has_bbox_of_each_mask():
    from pixellm.eval import encode_mask

    m = np.zeros((10, 12), dtype=np.uint8)
    m[2:5, 3:9] = 1
    resp = prediction_to_response("a [SEG]", [encode_mask(m)], [0.7])
    assert resp.targets[0].bbox == [3.0, 2.0, 6.0, 3.0] and resp.targets[0].index == 0


def test_resolve_model_dir_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="model directory not found"):
        resolve_model_dir(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match=r"missing \['pixellm_config.json'"):
        resolve_model_dir(str(tmp_path))


def test_build_app_args_and_options_are_validated():
    from pixellm.serve.app import build_app, deployment_options

    with pytest.raises(ConfigError, match="modle"):
        build_app({"modle": "x"})
    with pytest.raises(ConfigError, match="serve.max_queued_requests must be -1"):
        load_recipe(None, ["serve.max_queued_requests=0"])  # Ray Serve rejects 0: caught up front
    opts = deployment_options(ServeConfig(min_replicas=0, max_replicas=3), 1, 0)
    assert opts["autoscaling_config"]["initial_replicas"] == 1
    assert opts["autoscaling_config"]["max_replicas"] == 3
    # The replica admits ongoing + queued itself (JSON 503); Serve's own limit sits above it.
    assert opts["max_ongoing_requests"] > 16 + 64
    assert "bearer_token" not in opts["user_config"]


def test_serve_config_file_is_valid(monkeypatch, tmp_path):
    """platform/serve/pixellm.yaml passes Serve's own schema; its import path is an Application
    built from the env vars the file sets; its knobs are ServeConfig fields."""
    from ray.serve import Application
    from ray.serve.schema import DeploymentSchema, ServeDeploySchema

    import pixellm.serve.app as app_module
    from pixellm.serve.app import DEPLOYMENT_NAME, USER_CONFIG_KEYS

    path = ROOT / "platform" / "serve" / "pixellm.yaml"
    raw = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(raw)
    assert raw["http_options"]["host"] == "127.0.0.1"
    (app,) = raw["applications"]
    assert app["import_path"] == "pixellm.serve.app:app" and "args" not in app
    env = app["runtime_env"]["env_vars"]
    load_recipe(ROOT / env["PIXELLM_RECIPE"])
    for key, value in env.items():
        monkeypatch.setenv(key, value if key != "PIXELLM_RECIPE" else str(ROOT / value))
    module, attr = app["import_path"].split(":")
    assert isinstance(getattr(app_module, attr), Application)
    (dep,) = app["deployments"]
    assert dep["name"] == DEPLOYMENT_NAME
    assert not set(dep) - set(DeploymentSchema.model_fields)  # Serve's schema ignores typos
    assert set(dep["user_config"]) == set(USER_CONFIG_KEYS)
    cfg = ServeConfig.model_validate(dep["user_config"])
    assert cfg.max_ongoing_requests >= cfg.max_batch_size


def test_serve_build_accepts_the_shipped_import_path(tmp_path):
    """`serve build pixellm.serve.app:app` (Serve's CLI) writes a deployable config."""
    import os
    import subprocess
    import sys

    out = tmp_path / "built.yaml"
    env = {**os.environ, "PIXELLM_MODEL": str(tmp_path / "m"), "PYTHONPATH": str(ROOT)}
    serve_cli = Path(sys.executable).with_name("serve")
    proc = subprocess.run(
        [str(serve_cli), "build", "pixellm.serve.app:app", "-o", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    built = yaml.safe_load(out.read_text())
    (app,) = built["applications"]
    assert app["import_path"] == "pixellm.serve.app:app"
    assert app["deployments"][0]["name"] == "PixelLM"


def test_done_ids_survive_a_cut_last_line(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"sample_id": "a"}\n{"sample_id": "b"}\n{"sample_id": "c", "te')
    assert read_done_ids(path) == {"a", "b"}
    assert path.read_text() == '{"sample_id": "a"}\n{"sample_id": "b"}\n'
    assert read_done_ids(tmp_path / "absent.jsonl") == set()


def test_append_results_splits_errors_and_parquet_roundtrip(tmp_path):
    import pyarrow.parquet as pq

    rle = {"size": [2, 2], "counts": "04"}
    rows = [
        {
            "sample_id": "a",
            "text": "x [SEG]",
            "masks_json": json.dumps([rle]),
            "scores": [0.5],
            "num_tokens": 3,
            "error": None,
        },
        {
            "sample_id": "b",
            "text": "",
            "masks_json": "[]",
            "scores": [],
            "num_tokens": 0,
            "error": "b: bytes are not a decodable image",
        },
    ]
    assert append_results(tmp_path, rows, split="val", teacher_forced=False) == (1, 1)
    assert read_done_ids(tmp_path / "predictions.jsonl") == {"a"}
    assert "decodable" in (tmp_path / "errors.jsonl").read_text()
    assert write_predictions_parquet(tmp_path / "predictions.jsonl", tmp_path / "p.parquet") == 1
    row = pq.read_table(tmp_path / "p.parquet").to_pylist()[0]
    assert row["masks"] == [rle] and row["split"] == "val" and row["teacher_forced"] is False


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from pixellm.model import PixelLM

    return PixelLM.from_pretrained(export_tiny_model(tmp_path_factory.mktemp("m") / "model"))


def test_run_jobs_keeps_order_across_modes_and_budgets(tiny):
    from pixellm.serve.api import SegmentJob
    from pixellm.serve.runner import run_jobs

    img = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    jobs = [
        SegmentJob(img, "find the square", 4),
        SegmentJob(img, "find the circle", 4, answer="the [SEG] and the [SEG]."),
        SegmentJob(img, "find the square", 2),
        SegmentJob(img, "find the star", 4, answer="no target here."),
    ]
    preds = run_jobs(tiny, jobs)
    assert len(preds) == 4
    assert preds[1].text == "the [SEG] and the [SEG]." and len(preds[1].masks) == 2
    assert preds[1].masks[0]["size"] == [24, 32] and len(preds[1].scores) == 2
    assert preds[3].text == "no target here." and preds[3].masks == []
    assert preds[0].num_tokens <= 4 and preds[2].num_tokens <= 2
    alone = tiny.predict([img], ["find the square"], max_new_tokens=4)[0]
    assert preds[0].text == alone.text


def test_failed_batch_is_retried_job_by_job(tiny):
    """A job that makes the model raise (here a question holding <image>, which the API refuses
    but run_jobs does not check) fails alone; its batch-mates get the answers they get alone."""
    from pixellm.serve.api import SegmentJob
    from pixellm.serve.runner import JobFailure, run_jobs_isolated

    img = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    good = [SegmentJob(img, f"find the shape {k}", 4) for k in range(3)]
    poisoned = SegmentJob(img, "find <image> here", 4)
    out = run_jobs_isolated(tiny, [good[0], poisoned, good[1], good[2]])
    assert isinstance(out[1], JobFailure) and "ValueError" in out[1].reason
    alone = [run_jobs_isolated(tiny, [j])[0] for j in good]
    assert [p.text for p in (out[0], out[2], out[3])] == [p.text for p in alone]


def test_registry_uri_resolves_to_the_exported_directory(tmp_path):
    """A models:/ URI of a pyfunc carrying artifacts={'model_dir': ...} downloads that directory."""
    import mlflow

    model_dir = export_tiny_model(tmp_path / "export")

    class _Carrier(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input):
            return model_input

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("u", artifact_location=str(tmp_path / "artifacts"))
    with mlflow.start_run(experiment_id=exp):
        mlflow.pyfunc.log_model(
            name="m",
            python_model=_Carrier(),
            artifacts={"model_dir": str(model_dir)},
            registered_model_name="pixellm-unit",
        )
    local = resolve_model_dir("models:/pixellm-unit/1", uri, cache_dir=tmp_path / "dl")
    assert (local / "model.safetensors").read_bytes() == (
        Path(model_dir) / "model.safetensors"
    ).read_bytes()
    with pytest.raises(ModelLoadError, match="cannot read the model from the registry"):
        resolve_model_dir("models:/pixellm-unit/7", uri, cache_dir=tmp_path / "dl2")


def test_request_guard_turns_an_unexpected_error_into_a_json_500():
    """The real middleware, driven over ASGI: a route that raises gives JSON, not a traceback."""
    import asyncio

    from pixellm.serve.guard import RequestGuard

    async def broken(scope, receive, send):
        raise RuntimeError("secret detail <object at 0x1234>")

    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/x", "headers": [], "query_string": b""}
    asyncio.run(RequestGuard(broken)(scope, receive, send))
    assert sent[0]["status"] == 500
    assert dict(sent[0]["headers"])[b"content-type"] == b"application/json"
    body = json.loads(sent[1]["body"])
    assert (
        body["request_id"]
        and "RuntimeError" in body["error"]
        and body["request_id"] in body["error"]
    )
    assert "secret detail" not in body["error"]
