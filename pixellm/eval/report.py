"""Report files of one evaluation: ``report.json``, ``report.md``, ``report.html``, ``overlays/``.

``extra`` holds anything the caller wants shown next to the metrics (training-curve image path,
throughput, commands to reproduce); each key becomes a section. A string value ending in an image
suffix is shown as an image (relative paths resolve from ``out_dir``), a dict as a two-column
table, a list as a code block (one item per line), anything else as a paragraph.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

from pixellm.eval.data import BenchmarkSample, Prediction, load_predictions
from pixellm.eval.harness import EvalReport, prediction_masks
from pixellm.eval.overlay import render_overlay

__all__ = ["format_table", "write_report"]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg", ".gif", ".webp")
_COLUMNS = (
    ("giou", "gIoU (%)"),
    ("ciou", "cIoU (%)"),
    ("n_questions", "questions"),
    ("n_targets", "targets"),
    ("n_pred_masks", "pred masks"),
    ("no_target_accuracy", "no-target acc (%)"),
    ("n_missing_predictions", "missing preds"),
)


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if key in ("giou", "ciou", "no_target_accuracy"):
        return f"{100 * value:.1f}"
    return str(value)


def _rows(report: dict[str, Any]) -> list[list[str]]:
    return [[name] + [_cell(k, m[k]) for k, _ in _COLUMNS] for name, m in report["splits"].items()]


def format_table(report: EvalReport) -> str:
    """Plain-text table of the metrics per split (what ``pixellm evaluate`` prints)."""
    header = ["split"] + [title for _, title in _COLUMNS]
    rows = [header] + _rows(report.to_dict())
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _is_image(value: Any) -> bool:
    return isinstance(value, str) and value.lower().endswith(_IMAGE_SUFFIXES)


def _extra_md(extra: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in extra.items():
        out += ["", f"## {key}", ""]
        if _is_image(value):
            out.append(f"![{key}]({value})")
        elif isinstance(value, dict):
            out += _md_table(["key", "value"], [[str(k), str(v)] for k, v in value.items()])
        elif isinstance(value, list):
            out += ["```"] + [str(v) for v in value] + ["```"]
        else:
            out.append(str(value))
    return out


def _extra_html(extra: dict[str, Any]) -> str:
    parts = []
    for key, value in extra.items():
        parts.append(f"<h2>{html.escape(str(key))}</h2>")
        if _is_image(value):
            parts.append(f'<img src="{html.escape(value)}" alt="{html.escape(str(key))}">')
        elif isinstance(value, dict):
            parts.append(
                _html_table(["key", "value"], [[str(k), str(v)] for k, v in value.items()])
            )
        elif isinstance(value, list):
            parts.append("<pre>" + html.escape("\n".join(str(v) for v in value)) + "</pre>")
        else:
            parts.append(f"<p>{html.escape(str(value))}</p>")
    return "\n".join(parts)


def _choose_overlays(scored: list[BenchmarkSample], n_overlays: int) -> list[BenchmarkSample]:
    """``n_overlays`` samples shared out over the splits; in each split first a no-target
    question and the question with the most targets (when the split has them), then evenly spaced
    ones, so every split and difficulty shows up."""
    if n_overlays <= 0 or not scored:
        return []
    splits = list(dict.fromkeys(s.split for s in scored))
    chosen: list[BenchmarkSample] = []
    for i, split in enumerate(splits):
        quota = n_overlays // len(splits) + (i < n_overlays % len(splits))
        pool = [s for s in scored if s.split == split]
        picks = [s for s in pool if s.masks.shape[0] == 0][:1]
        most = max(pool, key=lambda s: s.masks.shape[0])
        if most.masks.shape[0] and most not in picks:
            picks.append(most)
        rest = [s for s in pool if s not in picks]
        step = max(1, len(rest) // max(1, quota - len(picks)))
        chosen += (picks + rest[::step])[:quota]
    return chosen


def _write_overlays(
    out: Path,
    report: EvalReport,
    samples: list[BenchmarkSample],
    preds: dict[str, Prediction],
    n_overlays: int,
) -> list[dict[str, Any]]:
    chosen = _choose_overlays([s for s in samples if s.sample_id in report.questions], n_overlays)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    entries = []
    for sample in chosen:
        pred = preds.get(sample.sample_id) or Prediction(sample_id=sample.sample_id)
        q = report.questions[sample.sample_id]
        name = re.sub(r"[^A-Za-z0-9._-]", "_", f"{sample.split}_{sample.sample_id}") + ".png"
        render_overlay(sample, pred.text, prediction_masks(pred, sample), q, pred.scores).save(
            out / "overlays" / name
        )
        entries.append(
            {
                "sample_id": sample.sample_id,
                "split": sample.split,
                "path": f"overlays/{name}",
                "question": sample.question,
                "text": pred.text,
                "giou": q.score / q.denom if q.denom else None,
                "scores": pred.scores,
            }
        )
    return entries


def _markdown(data: dict[str, Any]) -> str:
    judge = data["judge"]
    lines = [
        "# PixelLM evaluation report",
        "",
        f"Protocol `{data['protocol']}` (matching `{data['matching']}`), judge `{judge['name']}`"
        + (f" model `{judge['model']}`" if "model" in judge else "")
        + f"; unknown predictions skipped: {data['n_unknown_predictions']}.",
        "",
        "## Metrics",
        "",
    ]
    lines += _md_table(["split"] + [t for _, t in _COLUMNS], _rows(data))
    lines += ["", "## Examples"]
    for e in data["overlays"]:
        score = "–" if e["giou"] is None else f"{e['giou']:.3f}"
        lines += ["", f"### {e['split']} / {e['sample_id']} (gIoU {score})", ""]
        lines += [f"![{e['sample_id']}]({e['path']})", "", f"**Q:** {e['question']}  "]
        lines.append(f"**A:** {e['text']}")
    return "\n".join(lines + _extra_md(data["extra"])) + "\n"


def _html(data: dict[str, Any]) -> str:
    judge = data["judge"]
    examples = "".join(
        f'<figure><img src="{html.escape(e["path"])}" alt="{html.escape(e["sample_id"])}">'
        f"<figcaption>{html.escape(e['split'])} / {html.escape(e['sample_id'])}: "
        f"<b>Q:</b> {html.escape(e['question'])} <b>A:</b> {html.escape(e['text'])}"
        "</figcaption></figure>"
        for e in data["overlays"]
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>PixelLM evaluation</title>"
        "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}"
        "td,th{border:1px solid #ccc;padding:4px 8px}table{border-collapse:collapse}"
        "figure{margin:16px 0}</style></head><body><h1>PixelLM evaluation report</h1>"
        f"<p>Protocol <code>{html.escape(data['protocol'])}</code> (matching "
        f"<code>{html.escape(data['matching'])}</code>), judge "
        f"<code>{html.escape(str(judge.get('name')))}</code> "
        f"{html.escape(str(judge.get('model', '')))}</p><h2>Metrics</h2>"
        + _html_table(["split"] + [t for _, t in _COLUMNS], _rows(data))
        + f"<h2>Examples</h2>{examples}{_extra_html(data['extra'])}</body></html>\n"
    )


def write_report(
    out_dir: str | Path,
    report: EvalReport,
    samples: list[BenchmarkSample],
    predictions: dict[str, Prediction] | str | Path,
    n_overlays: int = 8,
    extra: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``report.html`` and ``overlays/*.png``.

    Args:
        out_dir: directory to write into (created).
        report: the harness's result.
        samples: the scored samples, loaded with images (``load_benchmark(..., with_images=True)``).
        predictions: predictions keyed by sample id, or a predictions JSONL path.
        n_overlays: number of questions drawn, evenly spaced over the scored samples.
        extra: additional sections (see module docstring); stored under ``"extra"`` in the JSON.

    Returns:
        Paths of ``json``, ``md`` and ``html`` files and the ``overlays`` directory.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    preds = load_predictions(predictions) if isinstance(predictions, str | Path) else predictions
    data = report.to_dict()
    data["overlays"] = _write_overlays(out, report, samples, preds, n_overlays)
    data["extra"] = dict(extra or {})
    paths = {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
    paths["json"].write_text(json.dumps(data, indent=2, default=str) + "\n")
    paths["md"].write_text(_markdown(data))
    paths["html"].write_text(_html(data))
    return {**paths, "overlays": out / "overlays"}
