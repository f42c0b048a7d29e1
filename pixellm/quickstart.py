"""``pixellm quickstart``: the whole platform end to end on the generated default corpus.

Stages (each prints its progress and wall time):

1. corpus   — ``generate_corpus``: the shapes world in MUSE / COCO / refer / ReasonSeg / LLaVA formats;
2. shards   — every format → Parquet shards with Ray Data (the converters users run on real corpora);
3. pretrain — ``pretrain_tiny``: a pretrained tiny LLaVA in the llava-hf layout (cached: reused when
              its inputs are unchanged); PixelLM then loads it as a user loads llava-1.5-7b-hf
              (``model.base: llava`` + ``model.weights_path``), CLIP and LLM frozen;
4. mlflow   — ``mlflow server`` with a SQLite backend store on a free loopback port;
5. train    — Ray Train + DeepSpeed (ZeRO-2, CPU) on the mixed stream; export + registered model;
6. score    — the registered model deployed with Ray Serve; val, test_less and test_many streamed
              through the deployment with Ray Data; predictions scored by the MUSE protocol;
7. report   — ``report.md`` / ``report.json`` / ``report.html`` with per-split gIoU/cIoU, no-target
              accuracy, training curves, the score-vs-IoU plot, throughput, overlays and the commands
              to reproduce.

The terminal shows only the stage lines and the progress lines (steps, samples/s, ETA, losses);
everything else Ray, Ray Data and the libraries print goes to ``OUT/logs/quickstart.log``.

Everything started here (Ray, Serve, the MLflow server) is stopped on success, failure and Ctrl-C.
Each run gets its own run name and free ports, so a second run does not collide with the first.
"""

from __future__ import annotations

import atexit
import io
import json
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, field, replace
from pathlib import Path
from typing import Annotated, Any

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from pixellm.config import Recipe, command_options, load_recipe
from pixellm.train.pretrain import PretrainOptions

__all__ = ["QuickstartOptions", "run_quickstart"]

FORMATS = {
    "muse": "muse",
    "coco": "sem_seg",
    "refer": "refer_seg",
    "llava": "vqa",
    "reasonseg": "reason_seg",
}
SCORE_SPLITS = ("val", "test_less", "test_many")


@dataclass(config=ConfigDict(extra="forbid"))
class QuickstartOptions:
    """Knobs of the quickstart; the defaults finish in about 10 minutes on a 2-core CPU machine.
    Validated on construction (pydantic ``ValidationError`` naming each bad field)."""

    out: str = "runs/quickstart"
    recipe: str = "platform/recipes/tiny.yaml"
    overrides: list[str] = field(default_factory=list)
    # >= 3: one per split. 1,200 = 1,128 training images against 168 at 240: the same test gIoU,
    # Spearman(score, IoU) higher on both test splits in every run (README); ~30 s more data prep
    images: Annotated[int, Field(ge=3)] = 1200
    # val (24 images) and test (48) are drawn from the first 240 images; the rest are train
    held_out_pool: Annotated[int, Field(ge=3)] = 240
    image_size: Annotated[int, Field(ge=64)] = 128  # as generate_corpus: shapes stay >= ~6 px
    seed: int = 0
    steps: Annotated[int, Field(ge=1)] = 700
    micro_batch_size: Annotated[int, Field(ge=1)] = 4
    workers: Annotated[int, Field(ge=1)] = 1
    # None = the recipe's (derived: no valid answer is cut)
    max_new_tokens: Annotated[int, Field(ge=1)] | None = None
    n_overlays: Annotated[int, Field(ge=0)] = 12  # shared out over val, test_less, test_many
    # the tiny LLaVA pretraining's steps (0 = skip it: the random tiny LLaVA of the recipe)
    pretrain_steps: Annotated[int, Field(ge=0)] = PretrainOptions.steps
    # language pretraining of the tiny LLM first (0 = none)
    pretrain_text_steps: Annotated[int, Field(ge=0)] = PretrainOptions.text_steps


_TERMINAL = sys.stdout  # the real terminal, kept before ``_quiet_terminal`` redirects


def say(*parts: Any) -> None:
    """Print one of the quickstart's own lines on the terminal (and into the log)."""
    line = " ".join(str(p) for p in parts)
    print(line, file=_TERMINAL, flush=True)
    if sys.stdout is not _TERMINAL:
        print(line, file=sys.stdout, flush=True)


class _FilteredStream(io.TextIOBase):
    """Everything to the log file; on the terminal only the training progress lines of workers
    (``[pixellm.…]``, their Ray ``(pid=…)`` prefix stripped)."""

    def __init__(self, log: Any, terminal: Any) -> None:
        self.log, self.terminal, self.pending = log, terminal, ""
        self.shown: deque[str] = deque(maxlen=8)  # the last lines shown

    def write(self, text: str) -> int:
        self.log.write(text)
        self.pending += text
        *lines, self.pending = re.split(r"[\r\n]", self.pending)
        for line in lines:
            m = re.search(r"\[pixellm\.[a-z_]+\] .*", line)
            # Ray may forward a worker's lines twice, a group at a time (at an eval step the val
            # line and the step line came as A B A B): show each once. Every step line differs.
            if m and m.group(0) not in self.shown:
                self.shown.append(m.group(0))
                self.terminal.write("    " + m.group(0) + "\n")
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        self.terminal.flush()


@contextmanager
def _quiet_terminal(log_path: Path) -> Iterator[None]:
    """Send stdout/stderr (Ray's forwarded worker output, progress bars, warnings) to a log file."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out, err = sys.stdout, sys.stderr
    with open(log_path, "a", buffering=1) as log:
        # Ray's C++ core worker writes its warnings straight to file descriptor 2: into the log too
        err.flush()
        saved_fd = os.dup(2)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = _FilteredStream(log, out)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = out, err
            os.dup2(saved_fd, 2)
            os.close(saved_fd)


class _Progress:
    """One line per stage with its wall time, and the elapsed total."""

    def __init__(self, total_stages: int):
        self.total = total_stages
        self.start = time.monotonic()
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, index: int, name: str, what: str) -> Iterator[None]:
        say(f"\n[{index}/{self.total}] {name}: {what}")
        t0 = time.monotonic()
        yield
        self.timings[name] = round(time.monotonic() - t0, 1)
        say(
            f"[{index}/{self.total}] {name} done in {self.timings[name]:.1f}s "
            f"(total {time.monotonic() - self.start:.0f}s)"
        )


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _start_ray(recipe: Any) -> None:
    """Connect to ``$RAY_ADDRESS``, or start a local Ray on 127.0.0.1 for every stage.

    The local cluster gets 2 logical CPUs on top of what training needs: the Serve replica holds
    one CPU while scoring's Ray Data tasks and caller actor need theirs, which a 2-core machine
    would otherwise never free (scoring would wait forever; Ray 2.60's V2 Parquet listing task,
    which scoring no longer uses, asked for a whole CPU whatever ``num_cpus`` said).
    """
    import math

    import ray

    from pixellm.train.driver import init_ray

    if os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        init_ray(recipe)
        return
    t = recipe.train
    need = t.num_workers * (t.cpus_per_worker + 2 * recipe.data.preprocess_cpus)
    ray.init(
        num_cpus=max(os.cpu_count() or 1, math.ceil(need)) + 2,
        include_dashboard=False,
        runtime_env={
            "env_vars": {
                "DS_ACCELERATOR": "cuda" if t.use_gpu else "cpu",
                "RAY_DATA_DISABLE_PROGRESS_BARS": "1",  # worker-side bars: noise in the log
            }
        },
    )


def _build_all_shards(corpus: Path, shards: Path) -> dict[str, Any]:
    from pixellm.data.shards import build_shards

    rows = {}
    for fmt, name in FORMATS.items():
        result = build_shards(fmt, corpus / fmt, str(shards / name), engine="ray")
        manifest = result.manifest
        rows[name] = {split: info["rows"] for split, info in manifest["splits"].items()}
        rejected = manifest["rejected"]["count"]
        say(f"    {fmt:9s} → {name:10s} rows {rows[name]}  rejected {rejected}")
    return rows


def _training_overrides(opts: QuickstartOptions, out: Path, run_name: str) -> list[str]:
    base = load_recipe(opts.recipe, opts.overrides)
    # a short run keeps a short warm-up (DeepSpeed needs at least one warm-up step)
    warmup = max(1, min(base.train.warmup_steps, opts.steps // 5))
    weights = []
    if opts.pretrain_steps:  # the real-weights path: the pretrained tiny LLaVA of stage 3
        weights = ["model.base=llava", f"model.weights_path={_pretrained_dir(out)}"]
    return [
        *weights,
        *cpu_overrides(base, opts.workers, opts.overrides),
        f"train.warmup_steps={warmup}",
        f"data.shards_root={out / 'shards'}",
        f"train.storage_path={out / 'ray_results'}",
        f"train.run_name={run_name}",
        f"train.steps_per_epoch={opts.steps}",
        f"train.micro_batch_size={opts.micro_batch_size}",
        f"train.num_workers={opts.workers}",
        f"train.checkpoint_every={max(1, opts.steps // 2)}",
        f"train.eval_every={max(1, opts.steps // 8)}",  # val/giou: 8 points on the curves
        f"mlflow.registered_model_name={run_name}",
        *opts.overrides,
    ]


def cpu_overrides(base: Recipe, workers: int, overrides: list[str]) -> list[str]:
    """``train.cpus_per_worker`` and ``data.preprocess_actors`` for ``workers`` training workers on
    this machine: every core to the training workers (a worker's torch threads = its CPUs), and
    one preprocessing actor per core left over, at least one.

    Preprocessing is ~4% of a step's compute, and the local cluster has 2 logical CPUs more than
    the machine (for Serve, see ``_start_ray``), which would otherwise become more actors competing
    with training. Measured on 2 cores: train stage 552 s with 1 CPU per worker and 6 actors, 406 s
    with 2 actors, 260 s with 2 CPUs per worker and 1 actor. A ``train.cpus_per_worker=…`` in
    ``overrides`` still wins (``base`` is the recipe with them applied).
    """
    cores = os.cpu_count() or 1
    user_set = any(o.partition("=")[0].strip() == "train.cpus_per_worker" for o in overrides)
    cpus = base.train.cpus_per_worker if user_set else max(1, cores // workers)
    free = cores - workers * cpus
    actors = max(1, int(free / base.data.preprocess_cpus))
    return [f"train.cpus_per_worker={cpus}", f"data.preprocess_actors={actors}"]


def _pretrained_dir(out: Path) -> Path:
    return out / "pretrained" / "tiny-llava"


def _tree_hash(root: Path) -> str:
    """sha256 over the relative paths and bytes of every file under ``root``."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _pretrain(opts: QuickstartOptions, out: Path) -> Path:
    from pixellm.train.pretrain import pretrain_tiny

    model = load_recipe(opts.recipe, opts.overrides).model
    popts = PretrainOptions(
        steps=opts.pretrain_steps, text_steps=opts.pretrain_text_steps, seed=opts.seed
    )
    return pretrain_tiny(
        model,
        out / "shards",
        _pretrained_dir(out),
        popts,
        log=say,
        data_key=_tree_hash(out / "corpus"),
    )


def _plot_curves(tracking_uri: str, run_id: str, path: Path) -> dict[str, list[float]]:
    """Training curves (each loss term, smoothed; ``val/giou`` when logged) from the MLflow run →
    PNG; returns the series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    series = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    val = sorted(client.get_metric_history(run_id, "val/giou"), key=lambda m: m.step)
    if val:
        series["val/giou"] = [m.value for m in val]
        right = ax.twinx()
        right.plot([m.step for m in val], series["val/giou"], "k.-", label="val/giou")
        right.set_ylabel("val gIoU")
        right.set_ylim(0, 1)
        right.legend(loc="upper right")
    for key in ("loss", "loss_txt", "loss_ref", "loss_dice", "loss_score", "loss_align"):
        hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        if not hist:
            continue
        steps, values = [m.step for m in hist], [m.value for m in hist]
        k = max(1, len(values) // 50)
        smooth = [
            sum(values[max(0, i - k + 1) : i + 1]) / len(values[max(0, i - k + 1) : i + 1])
            for i in range(len(values))
        ]
        series[key] = values
        ax.plot(steps, smooth, label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (moving average)")
    ax.set_yscale("log")
    ax.legend(loc="lower left")
    ax.set_title("PixelLM tiny: training losses")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return series


def _first_last(values: list[float], frac: float = 0.1) -> tuple[float, float]:
    n = max(1, int(len(values) * frac))
    return sum(values[:n]) / n, sum(values[-n:]) / n


def _commands(opts: QuickstartOptions, out: Path, run_name: str, overrides: list[str]) -> list[str]:
    sets = " ".join(overrides)
    cmds = [
        "make quickstart   # = make env + the next line",
        f"pixellm quickstart --out {opts.out} --images {opts.images} --held-out-pool {opts.held_out_pool}"
        f" --steps {opts.steps} --micro-batch-size {opts.micro_batch_size}"
        f" --pretrain-steps {opts.pretrain_steps} --pretrain-text-steps {opts.pretrain_text_steps}"
        + (f" --set {' '.join(opts.overrides)}" if opts.overrides else ""),
        "# or stage by stage:",
        f"pixellm corpus generate --out {out / 'corpus'} --seed {opts.seed} --images {opts.images} --image-size {opts.image_size} --held-out-pool {opts.held_out_pool}",
    ]
    cmds += [
        f"pixellm shards build --format {fmt} --input {out / 'corpus' / fmt} --out {out / 'shards' / name}"
        for fmt, name in FORMATS.items()
    ]
    cmds += [
        f"pixellm pretrain-tiny --recipe {opts.recipe} --shards {out / 'shards'} --out {_pretrained_dir(out)} --steps {opts.pretrain_steps} --text-steps {opts.pretrain_text_steps}"
        + (f" --set {' '.join(opts.overrides)}" if opts.overrides else ""),
        _mlflow_command("server", out, 5000),
        "export MLFLOW_TRACKING_URI=http://127.0.0.1:5000",
        f"pixellm train --recipe {opts.recipe} --set {sets}",
    ]
    cmds += [
        f"pixellm score --model models:/{run_name}/latest --benchmark {out / 'shards' / 'muse'} --split {s} --out {out / 'score' / s}"
        for s in SCORE_SPLITS
    ]
    cmds += [
        f"pixellm score --model models:/{run_name}/latest --benchmark {out / 'shards' / 'muse'} --split {s} --out {out / 'score' / s}-teacher-forced --teacher-forced"
        for s in SCORE_SPLITS
    ]
    return cmds


def _mlflow_command(kind: str, out: Path, port: int) -> str:
    """``mlflow ui|server`` over this run's store, artifacts included (``--artifacts-destination``:
    the runs' artifacts were written through the server to ``OUT/mlflow/artifacts``)."""
    return (
        f"mlflow {kind} --backend-store-uri sqlite:///{out / 'mlflow' / 'mlflow.db'} "
        f"--artifacts-destination {out / 'mlflow' / 'artifacts'} --host 127.0.0.1 --port {port} --workers 1"
    )


def _deploy(
    model_uri: str, recipe: str, overrides: list[str], app_name: str, tracking_uri: str
) -> str:
    """Start Serve on a free loopback port and deploy the model; returns the endpoint URL."""
    from ray import serve

    from pixellm.serve.app import build_app
    from pixellm.tracking import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"model": model_uri, "recipe": recipe, "set": overrides, "num_cpus": 1.0}
    app = build_app({**args, "tracking_uri": tracking_uri})
    serve.run(app, name=app_name, route_prefix=f"/{app_name}")
    return f"http://127.0.0.1:{port}/{app_name}"


def _score_splits(
    opts: QuickstartOptions,
    out: Path,
    model_uri: str,
    overrides: list[str],
    app_name: str,
    tracking_uri: str,
    run_name: str,
) -> dict[str, Any]:
    from pixellm.serve.score import ScoreOptions, score_benchmark

    throughput = {}
    forced_lines: list[str] = []
    scores = out / "score" / run_name  # per run: a rerun never resumes another model's predictions
    merged = scores / "predictions.jsonl"
    merged.parent.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    for split in SCORE_SPLITS:
        generated = ScoreOptions(
            model=model_uri,
            benchmark=str(out / "shards" / "muse"),
            split=split,
            out=str(scores / split),
            recipe=opts.recipe,
            overrides=overrides,
            max_new_tokens=opts.max_new_tokens,
            app_name=app_name,
            use_running=True,
            tracking_uri=tracking_uri,
            n_overlays=2,
        )
        result = score_benchmark(generated)
        # the ground-truth answer in the prompt: mask quality alone, without answer generation
        forced = score_benchmark(
            replace(
                generated,
                out=str(scores / f"{split}-teacher-forced"),
                teacher_forced=True,
                n_overlays=0,
            )
        )
        giou = result.report["splits"][split]["giou"]
        forced_giou = forced.report["splits"][split]["giou"]
        say(
            f"    {split:9s} {result.n_samples} questions in {result.seconds:.1f}s  gIoU {giou:.3f}"
            f"  (teacher-forced {forced_giou:.3f}, {forced.seconds:.1f}s)"
        )
        forced_lines += Path(forced.files["predictions.jsonl"]).read_text().splitlines()
        throughput[f"serve_{split}_questions_per_s"] = round(
            result.n_samples / max(result.seconds, 1e-9), 2
        )
        lines += Path(result.files["predictions.jsonl"]).read_text().splitlines()
    merged.write_text("\n".join(lines) + "\n")
    merged_forced = scores / "teacher_forced_predictions.jsonl"
    merged_forced.write_text("\n".join(forced_lines) + "\n")
    return {
        "predictions": merged,
        "teacher_forced_predictions": merged_forced,
        "throughput": throughput,
    }


def _final_report(
    opts: QuickstartOptions,
    out: Path,
    predictions: Path,
    extra: dict[str, Any],
) -> dict[str, Any]:
    from pixellm.eval import evaluate_predictions, load_benchmark, write_report

    bench = str(out / "shards" / "muse")
    report = evaluate_predictions(bench, predictions, "muse", splits=list(SCORE_SPLITS))
    samples = load_benchmark(bench, list(SCORE_SPLITS), with_images=True)
    write_report(
        out / "report", report, samples, predictions, n_overlays=opts.n_overlays, extra=extra
    )
    return report.to_dict()


def run_quickstart(opts: QuickstartOptions) -> dict[str, Any]:
    """Run every stage; returns the summary also written to ``OUT/report/report.json``.

    Raises:
        ConfigError: the recipe or an override is invalid (before anything starts).
    """
    out = Path(opts.out).resolve()
    run_name = f"quickstart-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    overrides = _training_overrides(opts, out, run_name)
    recipe = load_recipe(opts.recipe, overrides)  # a bad recipe fails before anything starts
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    progress = _Progress(7)
    started: dict[str, Any] = {}  # the MLflow server, once started
    with _quiet_terminal(out / "logs" / "quickstart.log"):
        say(f"PixelLM quickstart → {out}  (full log: {out / 'logs' / 'quickstart.log'})")
        try:
            return _run_stages(opts, out, run_name, overrides, recipe, progress, started)
        finally:
            signal.signal(signal.SIGTERM, previous)
            _cleanup(started.get("server"))


def _run_stages(
    opts: QuickstartOptions,
    out: Path,
    run_name: str,
    overrides: list[str],
    recipe: Any,
    progress: _Progress,
    started: dict[str, Any],
) -> dict[str, Any]:
    """Stages 1-7; what needs stopping afterwards is put in ``started``."""
    with progress.stage(1, "corpus", f"generating {opts.images} images → {out / 'corpus'}"):
        from pixellm.data.corpus import generate_corpus

        generate_corpus(
            out / "corpus",
            seed=opts.seed,
            images=opts.images,
            image_size=opts.image_size,
            held_out_pool=opts.held_out_pool,
        )
    with progress.stage(2, "shards", "converting every format to Parquet shards with Ray Data"):
        _start_ray(recipe)
        _build_all_shards(out / "corpus", out / "shards")
    if opts.pretrain_steps:
        with progress.stage(
            3,
            "pretrain",
            f"tiny LLaVA ({opts.pretrain_text_steps} LLM text steps, then {opts.pretrain_steps} "
            "CLIP + LLM steps), llava-hf layout",
        ):
            _pretrain(opts, out)
    with progress.stage(4, "mlflow", "starting mlflow server (SQLite backend) on 127.0.0.1"):
        from pixellm.tracking import start_mlflow_server

        server = start_mlflow_server(out / "mlflow")
        started["server"] = server
        atexit.register(server.stop)  # backstop if the interpreter exits past ``finally``
        # ray.init installs its own SIGTERM handler; ours raises KeyboardInterrupt so that
        # ``finally`` stops Ray, Serve and this server.
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        os.environ["MLFLOW_TRACKING_URI"] = server.uri
        say(f"    tracking URI {server.uri}")
    with progress.stage(5, "train", f"{opts.steps} steps of Ray Train + DeepSpeed ({run_name})"):
        from pixellm.train.driver import train

        result = train(recipe)
        say(f"    exported {result.export_dir}; MLflow run {result.mlflow_run_id}")
    model_uri = f"models:/{run_name}/latest"
    with progress.stage(
        6, "score", f"Ray Serve deployment of {model_uri}; MUSE splits via Ray Data"
    ):
        endpoint = _deploy(model_uri, opts.recipe, overrides, "quickstart", server.uri)
        say(f"    endpoint {endpoint}/v1/segment")
        scored = _score_splits(opts, out, model_uri, overrides, "quickstart", server.uri, run_name)
    with progress.stage(7, "report", f"writing {out / 'report'}"):
        summary = _summarise(opts, out, server.uri, result, scored, run_name, overrides, progress)
    _print_final(out, server.uri, endpoint, summary)
    return summary


def _summarise(
    opts, out, tracking_uri, result, scored, run_name, overrides, progress
) -> dict[str, Any]:
    report_dir = out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    series = _plot_curves(tracking_uri, result.mlflow_run_id, report_dir / "training_curves.png")
    learning = {}
    for key, values in series.items():
        first, last = _first_last(values)
        learning[key] = f"{first:.4f} → {last:.4f} (mean of first / last 10% of steps)"
    throughput = {
        **_train_throughput(tracking_uri, result.mlflow_run_id),
        **scored["throughput"],
    }
    confidence = _confidence(out, scored["predictions"], report_dir / "score_vs_iou.png")
    forced = _teacher_forced(out, scored["teacher_forced_predictions"])
    extra = {
        "Training curves": "training_curves.png",
        "Score vs IoU (val)": "score_vs_iou.png",
        "Confidence (per-mask score vs IoU)": confidence,
        TEACHER_FORCED: forced,
        "Learning (loss terms)": learning,
        "Throughput": throughput,
        "Stage wall times (s)": dict(progress.timings),
        "Run": {
            "run_name": run_name,
            "mlflow_run_id": result.mlflow_run_id,
            "export_dir": str(result.export_dir),
        },
        "Commands to reproduce": _commands(opts, out, run_name, overrides),
    }
    report = _final_report(opts, out, scored["predictions"], extra)
    summary = {
        "options": asdict(opts),
        "report": report,
        **{k: v for k, v in extra.items() if not str(v).endswith(".png")},
    }
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    from mlflow.tracking import MlflowClient

    # the report (plots, overlays) becomes an artifact of the training run, next to its model
    MlflowClient(tracking_uri).log_artifacts(result.mlflow_run_id, str(report_dir), "report")
    return summary


def _train_throughput(tracking_uri: str, run_id: str) -> dict[str, float | None]:
    """Median training samples/s and tokens/s over the logged steps (the first 10% skipped)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    out: dict[str, float | None] = {}
    for key in ("samples_per_s", "tokens_per_s"):
        values = [
            m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        ]
        values = values[len(values) // 10 :]
        out[f"train_{key}"] = round(float(sorted(values)[len(values) // 2]), 2) if values else None
    return out


TEACHER_FORCED = "Teacher-forced (ground-truth answer in the prompt: mask quality alone)"


def _teacher_forced(out: Path, predictions: Path) -> dict[str, str]:
    """gIoU / cIoU per split of the teacher-forced predictions: the masks the model draws when the
    answer is given, i.e. what is left to gain by generating the right answer."""
    from pixellm.eval import evaluate_predictions

    bench = str(out / "shards" / "muse")
    splits = evaluate_predictions(bench, predictions, "muse", list(SCORE_SPLITS)).to_dict()
    return {
        f"{split} gIoU / cIoU": f"{m['giou']:.3f} / {m['ciou']:.3f}"
        for split, m in splits["splits"].items()
    }


def _confidence(out: Path, predictions: Path, plot: Path) -> dict[str, Any]:
    """Spearman(score, IoU) per split and the val scatter plot."""
    from pixellm.eval import load_benchmark
    from pixellm.eval.confidence import plot_score_vs_iou, score_iou_pairs
    from pixellm.eval.data import load_predictions

    samples = load_benchmark(str(out / "shards" / "muse"), list(SCORE_SPLITS), with_images=False)
    preds = load_predictions(predictions)
    table: dict[str, Any] = {}
    for split in SCORE_SPLITS:
        res = score_iou_pairs(samples, preds, split)
        rho = res.spearman
        table[f"{split} Spearman(score, IoU)"] = "–" if rho is None else round(rho, 3)
        table[f"{split} masks"] = len(res.ious)
        if split == "val":
            plot_score_vs_iou(res, plot, "val: per-mask score vs IoU")
    return table


def _print_final(out: Path, tracking_uri: str, endpoint: str, summary: dict[str, Any]) -> None:
    say("\n=== PixelLM quickstart finished ===")
    forced = summary[TEACHER_FORCED]
    for split, m in summary["report"]["splits"].items():
        say(
            f"  {split:10s} gIoU {m['giou']:.3f}  cIoU {m['ciou']:.3f}  "
            f"questions {m['n_questions']}  no-target acc {m['no_target_accuracy']}  "
            f"(teacher-forced gIoU / cIoU {forced.get(f'{split} gIoU / cIoU', '–')})"
        )
    say(f"  report      {out / 'report' / 'report.md'}  (HTML: {out / 'report' / 'report.html'})")
    say(f"  MLflow UI   {_mlflow_command('ui', out, 5000)}")
    say(f"  Serve       {endpoint}/v1/segment was live during scoring; serve it again with:")
    say(f"              pixellm serve --model {summary['Run']['export_dir']}")


def _cleanup(server: Any) -> None:
    """Stop Serve, Ray and the MLflow server this run started (errors here never mask the cause)."""
    try:
        import ray

        if ray.is_initialized():
            try:
                from ray import serve

                serve.shutdown()
            finally:
                ray.shutdown()
    except Exception as err:  # noqa: BLE001 - best effort during teardown
        print(f"warning: Ray shutdown: {err}", file=sys.stderr)
    if server is not None:
        server.stop()


def register_arguments(p: Any, on_run: Callable[[Any], int]) -> None:
    """CLI flags of ``pixellm quickstart`` (defaults from ``QuickstartOptions``)."""
    d = QuickstartOptions()
    p.add_argument("--out", default=d.out, help="output directory")
    p.add_argument("--recipe", default=d.recipe)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides")
    p.add_argument("--images", type=int, default=d.images, help="generated images (corpus size)")
    p.add_argument("--image-size", type=int, default=d.image_size, help="longest image side, px")
    p.add_argument(
        "--held-out-pool",
        type=int,
        default=d.held_out_pool,
        help="val/test are drawn from the first N images; the rest are train",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps of training")
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size)
    p.add_argument("--workers", type=int, default=d.workers, help="Ray Train workers")
    p.add_argument(
        "--max-new-tokens", type=int, default=d.max_new_tokens, help="default: the recipe's"
    )
    p.add_argument(
        "--pretrain-steps",
        type=int,
        default=d.pretrain_steps,
        help="steps of the tiny LLaVA pretraining (0 = train on the random tiny LLaVA)",
    )
    p.add_argument(
        "--pretrain-text-steps",
        type=int,
        default=d.pretrain_text_steps,
        help="steps of language pretraining of the tiny LLM before the LLaVA steps (0 = none)",
    )
    p.add_argument("--n-overlays", type=int, default=d.n_overlays)
    p.set_defaults(func=on_run)


def options_from_args(args: Any) -> QuickstartOptions:
    """``QuickstartOptions`` of the parsed flags.

    Raises:
        ConfigError: a flag out of range, naming each one (before any work starts).
    """
    return command_options(
        "pixellm quickstart",
        QuickstartOptions,
        out=args.out,
        recipe=args.recipe,
        overrides=list(args.set),
        images=args.images,
        image_size=args.image_size,
        held_out_pool=args.held_out_pool,
        seed=args.seed,
        steps=args.steps,
        micro_batch_size=args.micro_batch_size,
        workers=args.workers,
        max_new_tokens=args.max_new_tokens,
        n_overlays=args.n_overlays,
        pretrain_steps=args.pretrain_steps,
        pretrain_text_steps=args.pretrain_text_steps,
    )
