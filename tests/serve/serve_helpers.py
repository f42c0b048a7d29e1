"""Helpers for the Serve tests: a tiny exported model, PNG bytes, a loopback Ray + Serve."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
TINY_RECIPE = ROOT / "platform" / "recipes" / "tiny.yaml"


def export_tiny_model(directory: Path) -> Path:
    """Build the tiny (random) PixelLM and save it as an exported model directory."""
    from pixellm.config import load_recipe
    from pixellm.model import build_pixellm

    return build_pixellm(load_recipe(TINY_RECIPE).model).save_pretrained(directory)


def png_bytes(h: int, w: int, seed: int = 0) -> bytes:
    """PNG bytes of an ``h x w`` RGB noise image."""
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def start_ray_and_serve(num_cpus: int = 4) -> int:
    """Start a loopback-only local Ray and Serve's proxy on a free port; returns the port."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray import serve

    from pixellm.tracking import free_port

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


def stop_ray_and_serve() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
