"""LLM judges that rate matched targets 1–10 (paper §4.3, steps two and three).

For one question, the generated answer is rewritten so that each ``[SEG]`` whose mask was matched
shows the matched ground-truth target's description in brackets, numbered ``[1: a red kayak]``;
the judge rates every numbered target from 1 to 10. Unmatched predictions are never sent (they
score 0). ``OpenAIJudge`` talks to any OpenAI-compatible ``/v1/chat/completions`` endpoint and
caches each answer on disk under a hash of (model, prompt), so a rerun sends nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Protocol

import requests

from pixellm.eval.data import PLACEHOLDER

__all__ = [
    "Judge",
    "JudgeError",
    "JudgeUnreachableError",
    "OpenAIJudge",
    "build_rating_prompt",
    "chat_completions_url",
    "default_cache_dir",
    "openai_judge_from_env",
    "parse_ratings",
]

SYSTEM_PROMPT = "You grade answers to questions about images. Reply with JSON only."

_INSTRUCTIONS = (
    "Below is a question about an image and a model's answer. Each object the answer segmented is "
    "shown in brackets as [n: description], where the description is the ground-truth description "
    "of the object that the answer's mask actually covers. Rate each numbered object from 1 to 10: "
    "10 means the object is exactly what the answer needs at that point to answer the question "
    "correctly and sensibly; 1 means it is wrong or irrelevant."
)


class JudgeError(RuntimeError):
    """The judge answered with something that cannot be used (HTTP error, no ratings)."""


class JudgeUnreachableError(JudgeError):
    """The judge endpoint did not answer within the timeouts and retries."""


class Judge(Protocol):
    """Rates the matched targets of one answer; see the module docstring."""

    def rate(self, question: str, answer: str, targets: list[tuple[int, str]]) -> list[int]:
        """Ratings 1–10, one per ``(prediction_index, ground_truth_description)`` in ``targets``."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-ready description of the judge for reports (name, model, request counts)."""
        ...


def build_rating_prompt(question: str, answer: str, targets: list[tuple[int, str]]) -> str:
    """The user prompt asking for one rating per matched target.

    Args:
        question: the benchmark question.
        answer: generated text with one ``[SEG]`` per predicted mask, in order.
        targets: ``(prediction_index, description)`` of each matched prediction; target ``n``
            (1-based position in this list) replaces placeholder ``prediction_index``.

    Returns:
        The prompt text.
    """
    number = {pred: n for n, (pred, _) in enumerate(targets, start=1)}
    described = dict(targets)
    pieces = answer.split(PLACEHOLDER)
    text = pieces[0]
    for i, piece in enumerate(pieces[1:]):
        text += f"[{number[i]}: {described[i]}]" if i in number else "[unmatched]"
        text += piece
    # Masks the text never placed (fewer placeholders than masks) are still rated.
    orphans = [f"[{number[p]}: {described[p]}]" for p in sorted(number) if p >= len(pieces) - 1]
    if orphans:
        text += "\n(Objects segmented without a place in the text: " + ", ".join(orphans) + ")"
    example = ", ".join(f'"{n}": <1-10>' for n in range(1, len(targets) + 1))
    return (
        f"{_INSTRUCTIONS}\n\nQuestion: {question}\nAnswer: {text}\n\n"
        f'Reply with JSON only, in the form {{"ratings": {{{example}}}}}.'
    )


def _ratings_from_json(content: str) -> Any:
    for candidate in (content, content[content.find("{") : content.rfind("}") + 1]):
        try:
            obj = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        return obj.get("ratings", obj) if isinstance(obj, dict) else obj
    return None


def parse_ratings(content: str, n: int) -> list[int]:
    """Read ``n`` ratings from a judge's reply.

    Accepts ``{"ratings": {"1": 7, ...}}``, ``{"ratings": [7, ...]}``, a bare dict or list, JSON
    wrapped in prose or code fences, and ``1: 7`` lines.

    Args:
        content: the reply text.
        n: number of targets rated.

    Returns:
        ``n`` integers in 1..10.

    Raises:
        JudgeError: when a rating is missing or outside 1..10.
    """
    found = _ratings_from_json(content)
    if isinstance(found, dict):
        by_id = {str(k).strip(): v for k, v in found.items()}
        values = [by_id.get(str(i)) for i in range(1, n + 1)]
    elif isinstance(found, list):
        values = list(found)
    else:
        pairs = dict(re.findall(r"(?<!\d)(\d+)\s*[:=)\-]\s*(\d+(?:\.\d+)?)", content))
        values = [pairs.get(str(i)) for i in range(1, n + 1)]
    try:
        ratings = [round(float(v)) for v in values]
    except (TypeError, ValueError):
        ratings = []
    if len(ratings) != n or any(not 1 <= r <= 10 for r in ratings):
        raise JudgeError(f"judge reply has no {n} ratings in 1..10: {content[:200]!r}")
    return ratings


def chat_completions_url(url: str) -> str:
    """Full endpoint from a base URL (``http://h:p``, ``…/v1`` or ``…/v1/chat/completions``)."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/pixellm/judge`` (``~/.cache/pixellm/judge`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pixellm" / "judge"


class OpenAIJudge:
    """Judge backed by an OpenAI-compatible chat endpoint, with an on-disk answer cache.

    Args:
        url: base URL or full ``/v1/chat/completions`` URL.
        model: model name sent in each request (part of the cache key).
        api_key: bearer token, or None for endpoints without auth.
        cache_dir: directory of cached answers (one JSON file per (model, prompt) hash).
        timeout_s: per-request timeout.
        max_retries: retries after a connection error, timeout, HTTP 429 or 5xx.
        backoff_s: first retry delay; doubles on each retry.
    """

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key: str | None = None,
        cache_dir: str | Path | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
    ) -> None:
        self.url = chat_completions_url(url)
        self.model = model
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.n_requests = 0
        self.n_cache_hits = 0
        self._session = requests.Session()
        if api_key:
            self._session.headers["Authorization"] = f"Bearer {api_key}"

    def describe(self) -> dict[str, Any]:
        """Name, model, endpoint and request / cache-hit counts."""
        return {
            "name": "openai",
            "model": self.model,
            "url": self.url,
            "n_requests": self.n_requests,
            "n_cache_hits": self.n_cache_hits,
        }

    def rate(self, question: str, answer: str, targets: list[tuple[int, str]]) -> list[int]:
        """Ratings 1–10 for each matched target (cached; see class docstring).

        Raises:
            JudgeUnreachableError: when the endpoint does not answer after all retries.
            JudgeError: for another HTTP error or a reply without usable ratings.
        """
        if not targets:
            return []
        prompt = build_rating_prompt(question, answer, targets)
        key = hashlib.sha256(json.dumps([self.model, prompt]).encode()).hexdigest()
        path = self.cache_dir / f"{key}.json"
        if path.is_file():
            self.n_cache_hits += 1
            return parse_ratings(json.loads(path.read_text())["reply"], len(targets))
        reply = self._complete(prompt)
        ratings = parse_ratings(reply, len(targets))
        # Cache only usable replies; write-then-rename so a crash never leaves half a file.
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"model": self.model, "prompt": prompt, "reply": reply}))
        os.replace(tmp, path)
        return ratings

    def _post(self, prompt: str) -> requests.Response:
        body = {
            "model": self.model,
            "temperature": 0,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": prompt},
            ],
        }
        self.n_requests += 1
        return self._session.post(self.url, json=body, timeout=self.timeout_s)

    def _complete(self, prompt: str) -> str:
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                resp = self._post(prompt)
            except (requests.ConnectionError, requests.Timeout) as err:
                last = f"{type(err).__name__}: {err}"
                continue
            if resp.status_code == 429 or resp.status_code >= 500:
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                continue
            if resp.status_code != 200:
                raise JudgeError(
                    f"judge endpoint {self.url} answered HTTP {resp.status_code}: "
                    f"{resp.text[:200]} (check --judge-model and the API key variable)"
                )
            try:
                return str(resp.json()["choices"][0]["message"]["content"])
            except (ValueError, KeyError, IndexError, TypeError) as err:
                raise JudgeError(
                    f"judge endpoint {self.url} sent no choices[0].message.content: "
                    f"{resp.text[:200]!r}"
                ) from err
        raise JudgeUnreachableError(
            f"judge endpoint {self.url} unreachable after {self.max_retries + 1} attempt(s) "
            f"(timeout {self.timeout_s}s): {last}"
        )


def openai_judge_from_env(
    url: str | None = None,
    model: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    cache_dir: str | Path | None = None,
    timeout_s: float = 60.0,
    max_retries: int = 3,
    backoff_s: float = 1.0,
) -> OpenAIJudge:
    """An ``OpenAIJudge`` from explicit values, falling back to the environment.

    URL from ``OPENAI_BASE_URL``, model from ``PIXELLM_JUDGE_MODEL``, key from ``api_key_env``.

    Raises:
        JudgeError: when no URL or no model is given either way.
    """
    url = url or os.environ.get("OPENAI_BASE_URL")
    model = model or os.environ.get("PIXELLM_JUDGE_MODEL")
    if not url:
        raise JudgeError("openai judge needs an endpoint: pass --judge-url or set OPENAI_BASE_URL")
    if not model:
        raise JudgeError(
            "openai judge needs a model: pass --judge-model or set PIXELLM_JUDGE_MODEL"
        )
    return OpenAIJudge(
        url,
        model,
        api_key=os.environ.get(api_key_env),
        cache_dir=cache_dir,
        timeout_s=timeout_s,
        max_retries=max_retries,
        backoff_s=backoff_s,
    )
