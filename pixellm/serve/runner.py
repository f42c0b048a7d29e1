"""Run a batch of validated jobs through a PixelLM (generation or teacher-forced), without Ray.

Shape notation: B = jobs in a group, S = model image side, T = text tokens, K_b = targets of job b,
h x w = original image size.

A Serve batch mixes requests with different ``max_new_tokens`` and, during scoring, teacher-forced
jobs. Generating a group with the largest budget would change the answers of the others (a codebook
run cut by a smaller budget is dropped), so jobs are grouped by mode and budget and each group is one
model call; the outputs are put back in request order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from pycocotools import mask as mask_utils

from pixellm.model import PixelLM, Prediction
from pixellm.model.processing import logits_to_image_size
from pixellm.serve.api import SegmentJob, clean_message

__all__ = ["JobFailure", "prompt_tokens", "run_jobs", "run_jobs_isolated", "teacher_forced_predict"]

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class JobFailure:
    """The model raised on this job alone; ``reason`` is ``"ErrorType: message"``."""

    reason: str


def prompt_tokens(model: PixelLM, question: str) -> int:
    """Number of prompt tokens (system prompt, image tokens, question) of one question."""
    return len(model.processor.prompt_ids(question))


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


@torch.no_grad()
def teacher_forced_predict(
    model: PixelLM, images: list[np.ndarray], questions: list[str], answers: list[str]
) -> list[Prediction]:
    """Masks from one teacher-forced forward pass with the ground-truth answers in the prompt.

    The answer's ``[SEG]`` placeholders become codebook runs; each run's hidden states decode one
    mask (``out.mask_logits``), thresholded at logit 0 at the original image size, and its score
    (``out.scores``, the predicted IoU).

    Args:
        images: B ``(h, w, 3)`` uint8 images.
        questions: B questions.
        answers: B ground-truth answers with one ``[SEG]`` per target.

    Returns:
        B predictions whose ``text`` is the given answer.

    Raises:
        ValueError: a conversation is longer than ``model.max_length`` tokens.
    """
    proc = model.processor
    encoded = [proc.transform_image(im) for im in images]
    convs = [
        proc.encode_conversation([{"role": "user", "text": q}, {"role": "assistant", "text": a}])
        for q, a in zip(questions, answers, strict=True)
    ]
    device = model.device
    pixel_values = torch.stack([e[0] for e in encoded]).to(device)  # (B, 3, S, S)
    valid_hw = torch.tensor([e[1] for e in encoded], dtype=torch.long)  # (B, 2)
    input_ids = proc.pad([c.input_ids for c in convs], model.tokenizer.pad_token_id).to(device)
    attention_mask = proc.pad([[1] * len(c.input_ids) for c in convs], 0).to(device)  # (B, T)
    out = model(pixel_values, valid_hw, input_ids, attention_mask)
    preds = []
    for b, square in enumerate(out.mask_logits):  # (K_b, 4g, 4g) over the padded square
        h, w = images[b].shape[:2]
        full = logits_to_image_size(square.float(), tuple(encoded[b][1]), proc.image_size, (h, w))
        binary = (full > 0).cpu().numpy()  # (K_b, h, w)
        preds.append(
            Prediction(
                text=answers[b],
                masks=[_rle(m) for m in binary],
                scores=[float(s) for s in out.scores[b]],
                num_tokens=len(convs[b].input_ids),
            )
        )
    return preds


def run_jobs(model: PixelLM, jobs: list[SegmentJob]) -> list[Prediction]:
    """Answer jobs in groups of equal mode and ``max_new_tokens``; results in job order.

    Args:
        model: the loaded model.
        jobs: validated jobs (``answer`` set = teacher-forced).

    Returns:
        One prediction per job, same order and length as ``jobs``.
    """
    groups: dict[tuple[bool, int], list[int]] = {}
    for i, job in enumerate(jobs):
        key = (job.answer is not None, 0 if job.answer is not None else job.max_new_tokens)
        groups.setdefault(key, []).append(i)
    out: list[Prediction | None] = [None] * len(jobs)
    for (forced, budget), idx in groups.items():
        images = [jobs[i].image for i in idx]
        questions = [jobs[i].question for i in idx]
        if forced:
            answers = [jobs[i].answer or "" for i in idx]
            preds = teacher_forced_predict(model, images, questions, answers)
        else:
            preds = model.predict(images, questions, max_new_tokens=budget)
        for i, pred in zip(idx, preds, strict=True):
            out[i] = pred
    return [p for p in out if p is not None]


def run_jobs_isolated(model: PixelLM, jobs: list[SegmentJob]) -> list[Prediction | JobFailure]:
    """``run_jobs``, and when that raises, each job again on its own.

    One job that makes the model raise then costs its batch-mates a second pass, not their
    answers: every job that succeeds alone gets its prediction, the others a ``JobFailure``.

    Returns:
        One prediction or failure per job, same order and length as ``jobs``.
    """
    try:
        return list(run_jobs(model, jobs))
    except Exception as err:  # noqa: BLE001 - any model error: isolate the culprit
        if len(jobs) == 1:
            logger.warning("job failed: %s: %s", type(err).__name__, err)
            return [JobFailure(clean_message(f"{type(err).__name__}: {err}"))]
        logger.warning("batch of %d failed (%s); retrying one by one", len(jobs), err)
    out: list[Prediction | JobFailure] = []
    for job in jobs:
        out += run_jobs_isolated(model, [job])
    return out
