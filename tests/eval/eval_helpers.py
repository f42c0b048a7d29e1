"""Hand-made masks, fixture shards and a loopback OpenAI-compatible judge server for eval tests."""

from __future__ import annotations

import io
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pixellm.data.schema import SHARD_SCHEMA
from pixellm.eval import encode_mask

H = W = 4

SCHEMA = SHARD_SCHEMA  # the one row schema the converters write


def box(rows: slice, cols: slice) -> np.ndarray:
    """A (H, W) uint8 mask that is 1 on ``[rows, cols]``."""
    m = np.zeros((H, W), dtype=np.uint8)
    m[rows, cols] = 1
    return m


def empty() -> np.ndarray:
    return np.zeros((H, W), dtype=np.uint8)


def png(colour: tuple[int, int, int] = (200, 200, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (W, H), colour).save(buf, format="PNG")
    return buf.getvalue()


def row(
    sample_id: str,
    split: str,
    targets: list[tuple[str, np.ndarray]],
    question: str = "Which objects?",
    ignore: np.ndarray | None = None,
    user_role: str = "user",
) -> dict[str, Any]:
    """One shard row; ``targets`` are (description, mask) pairs in answer order."""
    answer = " and ".join("[SEG]" for _ in targets) or "There is none."
    return {
        "sample_id": sample_id,
        "corpus": "fixture",
        "split": split,
        "task": "reason",
        "image": png(),
        "height": H,
        "width": W,
        "conversation": [
            {"role": user_role, "text": question},
            {"role": "assistant", "text": answer},
        ],
        "targets": [
            {"name": d.split()[-1], "description": d, "rle": encode_mask(m), "bbox": [0, 0, 1, 1]}
            for d, m in targets
        ],
        "ignore": None if ignore is None else encode_mask(ignore),
        "meta": "{}",
    }


def write_shards(root: Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows to ``root/<split>/part-00000.parquet`` (+ manifest.json); returns root."""
    by_split: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_split.setdefault(r["split"], []).append(r)
    for split, split_rows in by_split.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(split_rows, schema=SCHEMA)
        pq.write_table(table, root / split / "part-00000.parquet")
    counts = {s: len(r) for s, r in by_split.items()}
    (root / "manifest.json").write_text(json.dumps({"splits": counts}))
    return root


def pred_line(sample_id: str, masks: list[np.ndarray], text: str | None = None) -> str:
    text = text if text is not None else " and ".join("[SEG]" for _ in masks)
    return json.dumps(
        {"sample_id": sample_id, "text": text, "masks": [encode_mask(m) for m in masks]}
    )


def write_predictions(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


class JudgeServer:
    """A loopback OpenAI-compatible chat server that rates ``[n: description]`` targets.

    Rating policy: 8 for a description containing "kayak", else 5. ``fail_first`` answers HTTP
    500 to that many requests first; ``delay_s`` sleeps before each answer.
    """

    def __init__(self, fail_first: int = 0, delay_s: float = 0.0) -> None:
        self.requests: list[dict[str, Any]] = []
        self.fail_first = fail_first
        self.delay_s = delay_s
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "body": body})
                time.sleep(server.delay_s)
                if len(server.requests) <= server.fail_first:
                    self._send(500, {"error": "overloaded"})
                    return
                prompt = body["messages"][-1]["content"]
                targets = re.findall(r"\[(\d+): ([^\]]*)\]", prompt.split("Answer:", 1)[1])
                ratings = {n: (8 if "kayak" in d else 5) for n, d in targets}
                content = "Sure.\n```json\n" + json.dumps({"ratings": ratings}) + "\n```"
                self._send(
                    200, {"choices": [{"message": {"role": "assistant", "content": content}}]}
                )

            def _send(self, code: int, obj: dict[str, Any]) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                try:
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client closed the connection first (it timed out or was cancelled)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def n_requests(self) -> int:
        return len(self.requests)


@contextmanager
def judge_server(**kwargs: Any) -> Iterator[JudgeServer]:
    server = JudgeServer(**kwargs)
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        thread.join(timeout=5)


def free_port() -> int:
    """A port nothing listens on (bound then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
