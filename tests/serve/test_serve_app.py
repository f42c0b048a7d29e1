"""The Serve application over real HTTP on loopback: good and bad requests, auth, load shedding.

One Ray + Serve per module with two applications:
- ``main`` at ``/``: small limits so that the limit checks are cheap to hit (loading from a
  ``models:/`` URI is covered in test_serve_units.py).
- ``tight`` at ``/tight``: bearer token, ``max_ongoing_requests=1``, ``max_queued_requests=1`` and a
  3 s batch wait, so one request deterministically holds the only slot for >= 3 s.
"""

from __future__ import annotations

import concurrent.futures as cf
import time

import pytest
import requests
from pycocotools import mask as mask_utils

from tests.serve.serve_helpers import (
    b64,
    export_tiny_model,
    png_bytes,
    start_ray_and_serve,
    stop_ray_and_serve,
)

pytestmark = pytest.mark.integration

TOKEN = "s3cret-token"
MAIN_SET = [
    "serve.max_image_pixels=20000",
    "serve.max_question_chars=1000",
    "serve.max_new_tokens=32",
    "serve.max_batch_size=4",
]
TIGHT_SET = [
    "serve.max_ongoing_requests=1",
    "serve.max_queued_requests=1",
    "serve.max_batch_size=2",
    "serve.batch_wait_timeout_s=3",
    f"serve.bearer_token={TOKEN}",
    "serve.max_new_tokens=4",
]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    from ray import serve

    from pixellm.serve.app import build_app

    model_dir = export_tiny_model(tmp_path_factory.mktemp("serve") / "model")
    port = start_ray_and_serve()
    try:
        common = {"recipe": "platform/recipes/tiny.yaml", "num_cpus": 0.5}
        serve.run(
            build_app({**common, "model": str(model_dir), "set": MAIN_SET}),
            name="main",
            route_prefix="/",
        )
        serve.run(
            build_app({**common, "model": str(model_dir), "set": TIGHT_SET}),
            name="tight",
            route_prefix="/tight",
        )
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_ray_and_serve()


def _healthy(url: str) -> None:
    r = requests.get(f"{url}/healthz", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_good_request_returns_the_schema(url):
    body = {
        "image": b64(png_bytes(60, 80)),
        "question": "Where is the red circle?",
        "max_new_tokens": 32,
    }
    r = requests.post(f"{url}/v1/segment", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"text", "targets"} and isinstance(out["text"], str)
    assert out["text"].count("[SEG]") == len(out["targets"])
    for k, t in enumerate(out["targets"]):
        assert set(t) == {"index", "rle", "bbox", "score"} and t["index"] == k
        assert t["rle"]["size"] == [60, 80]
        m = mask_utils.decode({"size": [60, 80], "counts": t["rle"]["counts"].encode()})
        assert len(t["bbox"]) == 4 and (m.sum() == 0) == (t["bbox"][2] == 0)
        assert 0.0 <= t["score"] <= 1.0


def test_concurrent_requests_are_batched_and_equal_to_single(url):
    """Same image + question answered alone and inside a concurrent batch gives the same answer."""
    body = {
        "image": b64(png_bytes(40, 40, seed=3)),
        "question": "Segment the blue square.",
        "max_new_tokens": 16,
    }
    alone = requests.post(f"{url}/v1/segment", json=body, timeout=60).json()
    with cf.ThreadPoolExecutor(6) as pool:
        outs = list(
            pool.map(lambda _: requests.post(f"{url}/v1/segment", json=body, timeout=60), range(6))
        )
    assert all(o.status_code == 200 for o in outs)
    # Identical prompts need no padding; masks may differ by a pixel at logit ~0, text must not.
    assert all(o.json()["text"] == alone["text"] for o in outs)
    assert all(len(o.json()["targets"]) == len(alone["targets"]) for o in outs)


def test_model_info_reports_source_and_codebook(url):
    info = requests.get(f"{url}/v1/model", timeout=10).json()
    assert info["source"] == "directory" and info["model_dir"].endswith("model")
    assert info["codebook"] == {"scales": 2, "tokens_per_group": 3, "shape": "2x3"}
    assert info["batch"] == {"max_batch_size": 4, "batch_wait_timeout_s": 0.05}
    assert info["limits"]["max_image_pixels"] == 20000 and info["limits"]["auth"] is False


GOOD = b64(png_bytes(50, 50))
BAD_REQUESTS = {
    "bad base64": ({"image": "not*base64!", "question": "q"}, 400, "not valid base64"),
    "not an image": ({"image": b64(b"hello, not a png"), "question": "q"}, 400, "not a decodable"),
    "over pixel limit": (
        {"image": b64(png_bytes(150, 150)), "question": "q"},
        413,
        "over the limit of 20000",
    ),
    "missing question": ({"image": GOOD}, 422, "'question' is required"),
    "missing image": ({"question": "q"}, 422, "'image' is required"),
    "empty question": ({"image": GOOD, "question": "   "}, 422, "'question' is empty"),
    "over-long question": ({"image": GOOD, "question": "x" * 1001}, 422, "over the limit of 1000"),
    "prompt over max_length": ({"image": GOOD, "question": "word " * 190}, 422, "max_length=256"),
    "question not a string": ({"image": GOOD, "question": 5}, 422, "'question'"),
    "image not a string": ({"image": [1, 2], "question": "q"}, 422, "'image'"),
    "max_new_tokens zero": (
        {"image": GOOD, "question": "q", "max_new_tokens": 0},
        422,
        r"out of range \[1, 32\]",
    ),
    "max_new_tokens too large": (
        {"image": GOOD, "question": "q", "max_new_tokens": 33},
        422,
        "out of range",
    ),
    "max_new_tokens a string": (
        {"image": GOOD, "question": "q", "max_new_tokens": "5"},
        422,
        "'max_new_tokens'",
    ),
    "unknown field": ({"image": GOOD, "question": "q", "questoin": "q"}, 422, "'questoin'"),
    "body not an object": ([1, 2], 422, "must be a JSON object"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_is_4xx_json_and_server_stays_up(url, name):
    import re

    body, status, pattern = BAD_REQUESTS[name]
    r = requests.post(f"{url}/v1/segment", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert re.search(pattern, r.json()["error"]), r.json()
    _healthy(url)


def test_invalid_json_and_unknown_route(url):
    r = requests.post(
        f"{url}/v1/segment",
        data=b"{not json",
        timeout=30,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = requests.get(f"{url}/v1/nope", timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    _healthy(url)


def test_bearer_token_and_queue_full_503(url):
    tight = f"{url}/tight/v1/segment"
    body = {"image": GOOD, "question": "Where is it?"}
    r = requests.post(tight, json=body, timeout=30)
    assert r.status_code == 401 and "Authorization" in r.json()["error"]
    r = requests.post(tight, json=body, headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert r.status_code == 401 and "not valid" in r.json()["error"]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with cf.ThreadPoolExecutor(3) as pool:
        # A holds the only slot >= 3 s (batch wait), B fills the queue of 1, C is shed.
        start = time.monotonic()
        a = pool.submit(requests.post, tight, json=body, headers=auth, timeout=60)
        time.sleep(0.8)
        b = pool.submit(requests.post, tight, json=body, headers=auth, timeout=60)
        time.sleep(0.8)
        c = requests.post(tight, json=body, headers=auth, timeout=60)
        assert c.status_code == 503, c.text
        assert time.monotonic() - start < 3.0  # C was refused while A still held the slot
        assert a.result().status_code == 200 and b.result().status_code == 200
    assert "text" in a.result().json()
    _healthy(url)
