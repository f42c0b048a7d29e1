"""End-to-end training on CPU: real Ray Train V2, real DeepSpeed (gloo), real MLflow server.

Two runs keep the budget under 5 minutes on 2 cores:

1. ZeRO-2, 2 workers, fault drill: rank 1 SIGKILLs itself once after step 3 (checkpoint at step 2);
   FailureConfig restarts the group, it resumes from step 2 and finishes 6 steps (2 epochs of 3);
   one MLflow run, steps 1-6 logged once each; the sample log and every step's loss equal the
   uninterrupted ``reference_run``'s; the export reloads, predicts, and the registered pyfunc
   predicts.
2. ZeRO-3, 2 workers, resubmission: 2 steps, then the same run name with 2 epochs resumes at step 2
   and finishes at 4 (same MLflow run, no duplicate steps); the ZeRO-3 export reloads and predicts.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from tests.train.resume_helpers import RESUME_RUN, metric_history, read_sample_log

pytestmark = pytest.mark.integration


def _client(env: dict):  # noqa: ANN202
    from mlflow.tracking import MlflowClient

    return MlflowClient(env["mlflow_uri"])


def _runs_named(env: dict, name: str) -> list:
    client = _client(env)
    exp = client.get_experiment_by_name("pixellm-tests")
    return client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`pixellm.run_name` = '{name}'"
    )


def _metric_steps(env: dict, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in _client(env).get_metric_history(run_id, key))


def _image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))


def _check_export_predicts(export_dir) -> None:  # noqa: ANN001
    from pixellm.model import PixelLM

    model = PixelLM.from_pretrained(export_dir)
    preds = model.predict(
        [_image()], ["Please segment the circle in this image."], max_new_tokens=8
    )
    assert len(preds) == 1 and isinstance(preds[0].text, str)
    for rle in preds[0].masks:
        assert rle["size"] == [96, 128]


def _names_and_bytes(obj, names: set[str]) -> int:  # noqa: ANN001
    """Collect every string key of nested dicts into ``names``; return the bytes of all tensors."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        names.update(k for k in obj if isinstance(k, str))
        return sum(_names_and_bytes(v, names) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_names_and_bytes(v, names) for v in obj)
    return 0


def _check_light_checkpoint(checkpoint_dir: str, recipe) -> None:  # noqa: ANN001
    """The checkpoint holds the trained tensors and their optimizer state, no frozen base tensor."""
    from pathlib import Path

    import torch

    from pixellm.model import build_pixellm

    model = build_pixellm(recipe.model)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    trainable_bytes = 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen_bytes = 4 * sum(p.numel() for p in model.parameters() if not p.requires_grad)
    names: set[str] = set()
    tensor_bytes = 0
    module_keys: set[str] = set()
    for f in Path(checkpoint_dir).rglob("*.pt"):
        state = torch.load(f, map_location="cpu", weights_only=False)
        tensor_bytes += _names_and_bytes(state, names)
        if f.name.endswith("model_states.pt"):
            module_keys |= set(state["module"])
    assert module_keys == trainable  # by key names: every trained tensor, nothing else
    assert not names & frozen
    # by size: module copy + fp32 master + 2 Adam moments of the trainable tensors at most
    assert tensor_bytes <= 4.1 * trainable_bytes, (tensor_bytes, trainable_bytes, frozen_bytes)
    assert tensor_bytes < 4 * trainable_bytes + frozen_bytes / 2


def test_zero2_two_workers_fault_drill_mlflow_and_pyfunc(
    train_env, ray_cluster, make_recipe, reference_run, tmp_path, monkeypatch
) -> None:
    import mlflow
    import pandas as pd

    from pixellm.train import train

    marker = tmp_path / "killed"
    monkeypatch.setenv("PIXELLM_TRAIN_FAULT", f"3:1:{marker}")
    recipe = make_recipe(train_env, "drill", *RESUME_RUN)
    result = train(recipe)

    assert marker.exists(), "the fault drill did not kill the worker"
    assert result.metrics["step"] == 6
    for rank in range(2):  # exact resume: the same samples, rank by rank, step by step
        assert read_sample_log(result.run_dir, rank) == reference_run["samples"][rank], rank
    loss = metric_history(train_env, result.mlflow_run_id, "loss")
    assert loss.keys() == reference_run["loss"].keys() == set(range(1, 7))
    for step, value in loss.items():
        assert abs(value - reference_run["loss"][step]) <= 1e-5, (step, value)
    runs = _runs_named(train_env, "drill")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == result.mlflow_run_id
    assert run.data.tags["resumed_from_step"] == "2"
    assert run.data.params["train.steps_per_epoch"] == "3"
    assert run.data.params["model.decoder.dim"] == "64"
    assert run.data.tags["git.commit"] and run.data.tags["version.deepspeed"]
    assert run.data.tags["checkpoint.latest"].endswith("checkpoint_step_0000006")
    for key in (
        "loss",
        "loss_txt",
        "loss_ref",
        "loss_dice",
        "loss_align",
        "lr",
        "samples_per_s",
        "tokens_per_s",
    ):
        assert _metric_steps(train_env, run.info.run_id, key) == [1, 2, 3, 4, 5, 6], key
    assert _metric_steps(train_env, run.info.run_id, "val/giou") == [3, 6]

    assert sorted(p.name for p in result.run_dir.glob("checkpoint_step_*")) == [
        "checkpoint_step_0000004",
        "checkpoint_step_0000006",
    ]
    _check_light_checkpoint(result.checkpoint_path, recipe)
    _check_export_predicts(result.export_dir)

    versions = _client(train_env).search_model_versions("name='drill-model'")
    assert len(versions) == 1 and versions[0].run_id == run.info.run_id
    mlflow.set_tracking_uri(train_env["mlflow_uri"])
    pyfunc = mlflow.pyfunc.load_model("models:/drill-model/1")
    buf = io.BytesIO()
    _image().save(buf, format="PNG")
    frame = pd.DataFrame(
        {"image": [base64.b64encode(buf.getvalue()).decode()], "question": ["Segment the circle."]}
    )
    out = pyfunc.predict(frame, params={"max_new_tokens": 8})
    assert list(out.columns) == ["text", "masks", "scores"] and len(out) == 1
    # the default budget is the recipe's derived one: no valid answer is cut
    (param,) = pyfunc.metadata.get_params_schema().params
    assert (param.name, param.default) == ("max_new_tokens", recipe.serve.max_new_tokens)


def test_zero3_resubmission_resumes(train_env, ray_cluster, make_recipe) -> None:
    from pixellm.train import train

    zero3 = "train.deepspeed_config=platform/deepspeed/zero3.json"
    first = train(make_recipe(train_env, "resub", zero3, "train.steps_per_epoch=2"))
    assert first.metrics["step"] == 2
    resumed = make_recipe(train_env, "resub", zero3, "train.steps_per_epoch=2", "train.epochs=2")
    with pytest.warns(UserWarning, match="train.epochs"):
        second = train(resumed)
    assert second.metrics["step"] == 4
    _check_light_checkpoint(second.checkpoint_path, resumed)

    runs = _runs_named(train_env, "resub")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["resumed_from_step"] == "2"
    assert run.data.tags["changed.train.epochs"] == "2"
    assert _metric_steps(train_env, run.info.run_id, "loss") == [1, 2, 3, 4]
    _check_export_predicts(second.export_dir)
