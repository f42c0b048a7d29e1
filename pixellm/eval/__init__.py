"""Scoring of segmentation predictions: referring gIoU / cIoU and the MUSE protocol (paper §4.3).

``evaluate_predictions`` scores a predictions set against a benchmark shards directory,
``write_report`` writes the JSON / Markdown / HTML report with overlay pictures, and the judges
(``OpenAIJudge``) rate matched targets 1–10.
"""

from pixellm.eval.data import (
    PLACEHOLDER,
    BenchmarkSample,
    EvalInputError,
    Prediction,
    decode_rle,
    encode_mask,
    iter_benchmark,
    load_benchmark,
    load_predictions,
)
from pixellm.eval.harness import EvalReport, evaluate_predictions
from pixellm.eval.judge import Judge, JudgeError, JudgeUnreachableError, OpenAIJudge
from pixellm.eval.report import write_report

__all__ = [
    "PLACEHOLDER",
    "BenchmarkSample",
    "EvalInputError",
    "EvalReport",
    "Judge",
    "JudgeError",
    "JudgeUnreachableError",
    "OpenAIJudge",
    "Prediction",
    "decode_rle",
    "encode_mask",
    "evaluate_predictions",
    "iter_benchmark",
    "load_benchmark",
    "load_predictions",
    "write_report",
]
