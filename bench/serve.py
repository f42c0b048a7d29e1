"""Benchmark the PixelLM Serve deployment over loopback HTTP.

1. Throughput: the same closed-loop load (C clients, each sending its next request when the last
   one answers, for T seconds) against the deployment with ``@serve.batch`` at ``max_batch_size=B``
   and at ``max_batch_size=1``; requests/s, p50 / p99 latency, and the ratio (goal >= 3x).
2. Load drill: N clients for T seconds against tight admission limits (``max_ongoing_requests`` /
   ``max_queued_requests``); every answer must be 200 or a deliberate 503 (load shedding), with
   zero other 5xx and zero transport errors.
3. Event-loop probe: ``/healthz`` latency while four 4096 x 4096 PNGs are decoded and answered
   (decoding runs off the event loop; goal: every probe < 100 ms).

On a GPU (``--gpus 1``) the replica runs in bf16 (``serve.dtype: auto``).

    .venv/bin/python bench/serve.py [--clients 16 --seconds 20 --batch 16 --drill-clients 48 ...]

The model is the tiny recipe's (random init; the numbers measure serving, not accuracy). Prints a
table and, with ``--out FILE``, writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RECIPE = str(ROOT / "platform" / "recipes" / "tiny.yaml")


def _bodies(n: int, side: int, max_new_tokens: int) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(
            {
                "image": base64.b64encode(buf.getvalue()).decode(),
                "question": f"Segment every shape of colour number {i}.",
                "max_new_tokens": max_new_tokens,
            }
        )
    return out


def _pct(sorted_s: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of sorted latencies, in ms."""
    if not sorted_s:
        return None
    return sorted_s[min(len(sorted_s) - 1, int(q * len(sorted_s)))] * 1000


def _load(url: str, bodies: list[dict], clients: int, seconds: float) -> dict:
    """Closed-loop load: ``clients`` threads, each sending back-to-back for ``seconds``."""
    lat: list[float] = []
    codes: Counter = Counter()
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(k: int) -> None:
        session = requests.Session()
        i = k
        while time.monotonic() < stop:
            t0 = time.monotonic()
            try:
                code = session.post(url, json=bodies[i % len(bodies)], timeout=120).status_code
            except requests.RequestException:
                code = -1  # transport error
            with lock:
                codes[code] += 1
                if code == 200:
                    lat.append(time.monotonic() - t0)
            i += clients

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    lat.sort()
    return {
        "ok": codes[200],
        "codes": dict(codes),
        "seconds": round(wall, 2),
        "rps": codes[200] / wall,
        "p50_ms": _pct(lat, 0.50),
        "p99_ms": _pct(lat, 0.99),
        "mean_ms": statistics.fmean(lat) * 1000 if lat else None,
    }


def _deploy(model_dir: str, overrides: list[str], cpus: float, gpus: float = 0.0) -> None:
    from ray import serve

    from pixellm.serve.app import build_app

    app = build_app(
        {
            "model": model_dir,
            "recipe": RECIPE,
            "set": overrides,
            "num_cpus": cpus,
            "num_gpus": gpus,
        }
    )
    serve.run(app, name="bench", route_prefix="/")


def _big_png(seed: int, side: int = 4096) -> bytes:
    x = np.arange(side, dtype=np.uint16)[None, :]
    y = np.arange(side, dtype=np.uint16)[:, None]
    px = np.empty((side, side, 3), dtype=np.uint8)
    px[..., 0] = (x + seed) % 256
    px[..., 1] = y % 256
    px[..., 2] = (x * 7 + y * 3 + seed) % 256
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _probe_during_decode(base: str, n_images: int = 4) -> dict:
    """``/healthz`` latencies while ``n_images`` 4096² images are in flight."""
    bodies = [
        json.dumps(
            {
                "image": base64.b64encode(_big_png(k)).decode(),
                "question": "What is it?",
                "max_new_tokens": 1,
            }
        )
        for k in range(n_images)
    ]
    lat: list[float] = []
    codes: list[int] = []

    def send(body: str) -> None:
        r = requests.post(
            f"{base}/v1/segment",
            data=body,
            headers={"content-type": "application/json"},
            timeout=600,
        )
        codes.append(r.status_code)

    threads = [threading.Thread(target=send, args=(b,)) for b in bodies]
    start = time.monotonic()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        t0 = time.monotonic()
        requests.get(f"{base}/healthz", timeout=60).raise_for_status()
        lat.append(time.monotonic() - t0)
        time.sleep(0.02)
    for t in threads:
        t.join()
    lat.sort()
    return {
        "images": n_images,
        "seconds": round(time.monotonic() - start, 2),
        "codes": codes,
        "probes": len(lat),
        "p50_ms": _pct(lat, 0.5),
        "max_ms": lat[-1] * 1000 if lat else None,
        "under_100ms": sum(x < 0.1 for x in lat),
    }


def _warm(url: str, bodies: list[dict]) -> None:
    for b in bodies[:2]:
        requests.post(url, json=b, timeout=120).raise_for_status()


def run(args: argparse.Namespace) -> dict:
    """Run both phases and return the figures."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray import serve

    from pixellm.config import load_recipe
    from pixellm.model import build_pixellm
    from pixellm.tracking import free_port

    model_dir = tempfile.mkdtemp(prefix="pixellm-bench-")
    build_pixellm(load_recipe(RECIPE, args.model_set).model).save_pretrained(model_dir)
    bodies = _bodies(16, args.side, args.max_new_tokens)
    ray.init(include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/v1/segment"
    results: dict = {"config": vars(args)}
    try:
        for name, batch in (("batched", args.batch), ("max_batch_size=1", 1)):
            _deploy(
                model_dir,
                [
                    f"serve.max_batch_size={batch}",
                    f"serve.batch_wait_timeout_s={args.wait}",
                    f"serve.max_ongoing_requests={max(batch, args.clients)}",
                    "serve.max_queued_requests=-1",
                ],
                args.cpus,
                args.gpus,
            )
            _warm(url, bodies)
            results[name] = _load(url, bodies, args.clients, args.seconds)
        _deploy(
            model_dir,
            [
                f"serve.max_batch_size={args.batch}",
                f"serve.batch_wait_timeout_s={args.wait}",
                f"serve.max_ongoing_requests={args.drill_ongoing}",
                f"serve.max_queued_requests={args.drill_queued}",
            ],
            args.cpus,
            args.gpus,
        )
        _warm(url, bodies)
        results["drill"] = _load(url, bodies, args.drill_clients, args.drill_seconds)
        if args.probe:
            _deploy(model_dir, ["serve.max_batch_size=4"], args.cpus, args.gpus)
            _warm(url, bodies)
            results["probe"] = _probe_during_decode(f"http://127.0.0.1:{port}")
    finally:
        serve.shutdown()
        ray.shutdown()
    results["speedup"] = results["batched"]["rps"] / max(results["max_batch_size=1"]["rps"], 1e-9)
    codes = results["drill"]["codes"]
    bad = {c: n for c, n in codes.items() if c not in (200, 503)}
    results["drill"]["unexpected"] = bad
    results["drill"]["pass"] = not bad and codes.get(200, 0) > 0
    return results


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(r: dict) -> None:
    """Print the figures as a table."""
    print(
        f"\nPixelLM Serve on loopback — tiny model {' '.join(r['config']['model_set'])}, "
        f"{r['config']['clients']} closed-loop clients, "
        f"{r['config']['seconds']} s, max_new_tokens={r['config']['max_new_tokens']}"
    )
    print(f"{'config':<22}{'ok':>6}{'req/s':>9}{'p50 ms':>10}{'p99 ms':>10}  codes")
    for name in ("batched", "max_batch_size=1", "drill"):
        x = r[name]
        label = f"{name} (B={r['config']['batch']})" if name == "batched" else name
        print(
            f"{label:<22}{x['ok']:>6}{x['rps']:>9.2f}{_fmt(x['p50_ms'], '.0f'):>10}"
            f"{_fmt(x['p99_ms'], '.0f'):>10}  {x['codes']}"
        )
    print(f"batching speedup: {r['speedup']:.2f}x (goal >= 3x)")
    d = r["drill"]
    print(
        f"load drill: {r['config']['drill_clients']} clients x {r['config']['drill_seconds']} s, "
        f"ongoing={r['config']['drill_ongoing']} queued={r['config']['drill_queued']}: "
        f"{'PASS' if d['pass'] else 'FAIL'} (200: {d['codes'].get(200, 0)}, "
        f"503 shed: {d['codes'].get(503, 0)}, other: {d['unexpected'] or 0})"
    )
    if "probe" in r:
        pr = r["probe"]
        print(
            f"/healthz while {pr['images']} x 4096² images decode: {pr['probes']} probes, "
            f"p50 {_fmt(pr['p50_ms'], '.0f')} ms, max {_fmt(pr['max_ms'], '.0f')} ms, "
            f"{pr['under_100ms']}/{pr['probes']} under 100 ms (answers {pr['codes']})"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--clients", type=int, default=16, help="concurrent clients, throughput phase")
    p.add_argument("--seconds", type=float, default=20.0, help="duration of each throughput run")
    p.add_argument("--batch", type=int, default=16, help="max_batch_size of the batched run")
    p.add_argument("--wait", type=float, default=0.02, help="batch_wait_timeout_s")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--side", type=int, default=96, help="image side in pixels")
    p.add_argument("--cpus", type=float, default=1.0, help="CPUs of the replica")
    p.add_argument("--gpus", type=float, default=0.0, help="GPUs of the replica (bf16 when > 0)")
    p.add_argument(
        "--no-probe", dest="probe", action="store_false", help="skip the /healthz probe phase"
    )
    p.add_argument("--drill-clients", type=int, default=48)
    p.add_argument("--drill-seconds", type=float, default=20.0)
    p.add_argument("--drill-ongoing", type=int, default=16)
    p.add_argument("--drill-queued", type=int, default=8)
    p.add_argument(
        "--model-set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="tiny-recipe overrides for the benchmarked model, e.g. model.image_size=64 (CLIP "
        "cheap, decoding dominates as in the 7B/13B models)",
    )
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    results = run(args)
    print_table(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    return 0 if results["drill"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
