"""Every rank, every step, the same set of gradients (issue 10, item 0).

Two Ray Train workers run the training code's DeepSpeed engine (``setup_model_and_optimizer``) over
hand-built micro-batches: rank 0 gets segmentation questions, rank 1 only VQA (no masks) for every
micro-batch of 3 steps. Before the fix the mask-free rank produced no gradient for the pixel decoder
(209 of 243 trainable tensors) and the gloo all-reduce sizes disagreed across ranks.

Checked under ZeRO-2 and ZeRO-3: training proceeds; on rank 1 every trainable tensor receives a
local gradient at every micro-batch (a tensor hook fires) and the decoder's is exactly zero; each
step's reduced gradient equals a single-process reference (same weights, same samples) to 1e-5.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pixellm.config import Recipe, load_recipe

pytestmark = pytest.mark.integration

TINY = Path(__file__).resolve().parents[2] / "platform" / "recipes" / "tiny.yaml"
STEPS, GRAD_ACCUM, WORLD = 3, 2, 2


def _recipe(zero: int) -> Recipe:
    return load_recipe(
        TINY,
        overrides=[
            f"train.deepspeed_config=platform/deepspeed/zero{zero}.json",
            "train.num_workers=2",
            "train.micro_batch_size=1",
            f"train.grad_accum={GRAD_ACCUM}",
            f"train.steps_per_epoch={STEPS}",
            "train.warmup_steps=1",
            "model.lora.dropout=0.0",  # the reference must see the same forward
        ],
    )


def _batch(proc: Any, seed: int, segment: bool) -> dict[str, Any]:
    """One micro-batch of one question: a square to segment, or a VQA question (no mask)."""
    rng = np.random.default_rng(seed)
    img = np.full((64, 80, 3), 128, np.uint8)
    y, x = (int(v) for v in rng.integers(8, 40, 2))
    img[y : y + 20, x : x + 20] = (220, 30, 30)
    mask = np.zeros((64, 80), np.float32)
    mask[y : y + 20, x : x + 20] = 1
    pixels, valid = proc.transform_image(img)
    if segment:
        conv = [
            {"role": "user", "text": "Please segment the red square."},
            {"role": "assistant", "text": "It is [SEG]."},
        ]
        masks = torch.from_numpy(mask)[None]  # (1, h, w)
    else:
        conv = [
            {"role": "user", "text": "What colour is the square?"},
            {"role": "assistant", "text": "It is red."},
        ]
        masks = torch.zeros(0, 64, 80)
    enc = proc.encode_conversation(conv)
    return {
        "pixel_values": pixels[None],
        "valid_hw": torch.tensor([valid]),
        "input_ids": torch.tensor([enc.input_ids]),
        "attention_mask": torch.ones(1, len(enc.input_ids), dtype=torch.long),
        "labels": torch.tensor([enc.labels]),
        "gt_masks": [masks],
    }


def _plan(proc: Any) -> list[list[list[dict[str, Any]]]]:
    """``plan[step][rank]`` = that rank's GRAD_ACCUM micro-batches; rank 1 never has a mask."""
    return [
        [
            [_batch(proc, 100 * s + 10 * r + i, segment=r == 0) for i in range(GRAD_ACCUM)]
            for r in range(WORLD)
        ]
        for s in range(STEPS)
    ]


def _worker(config: dict[str, Any]) -> None:
    """Drive the training code's engine by hand and record params, gradients and local hooks."""
    import ray.train
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    from pixellm.train.loop import setup_model_and_optimizer

    recipe = Recipe.model_validate(config["recipe"])
    rank = ray.train.get_context().get_world_rank()
    engine, model = setup_model_and_optimizer(recipe, config["ds_config"])
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    calls = {n: 0 for n, _ in named}
    local_max = {n: 0.0 for n, _ in named}

    def hook(name: str):  # noqa: ANN202
        def record(grad: torch.Tensor) -> None:
            calls[name] += 1
            local_max[name] = max(local_max[name], float(grad.abs().max()) if grad.numel() else 0)

        return record

    for n, p in named:
        p.register_hook(hook(n))
    engine.train()
    records = []
    for step in config["plan"]:
        params = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in named}
        grads: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(step[rank]):
            out = engine(**batch)
            engine.backward(out.loss)
            if i == len(step[rank]) - 1:  # reduced gradient of the step, before the update
                grads = {n: safe_get_full_grad(p).detach().clone() for n, p in named}
            engine.step()
        records.append({"params": params, "grads": grads})
    out_dir = Path(config["out"])
    torch.save(
        {"records": records, "calls": calls, "local_max": local_max}, out_dir / f"r{rank}.pt"
    )


def _reference_grads(
    recipe: Recipe, params: dict[str, torch.Tensor], step: list[list[dict[str, Any]]]
) -> dict[str, torch.Tensor]:
    """Single-process gradient of the step: mean over every rank's micro-batches."""
    from pixellm.model import build_pixellm

    model = build_pixellm(recipe.model)
    missing, unexpected = model.load_state_dict(params, strict=False)
    assert not unexpected and not (set(params) & set(missing))
    model.train()
    for rank_batches in step:
        for batch in rank_batches:
            (model(**batch).loss / (GRAD_ACCUM * WORLD)).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("zero", [2, 3])
def test_mask_free_rank_gives_zero_decoder_grads_and_reference_step(
    zero: int, ray_cluster, tmp_path
) -> None:
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pixellm.model.processing import build_processor
    from pixellm.train.ds_config import derive_deepspeed_config

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers can't import tests/
    recipe = _recipe(zero)
    plan = _plan(build_processor(recipe.model))
    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "recipe": recipe.model_dump(mode="json"),
            "ds_config": derive_deepspeed_config(recipe),
            "plan": plan,
            "out": str(tmp_path),
        },
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=WORLD, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(
            name=f"uniform-grads-z{zero}",
            storage_path=str(tmp_path / "ray"),
            worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}},
        ),
    )
    result = trainer.fit()
    assert result.error is None, result.error

    vqa_rank = torch.load(tmp_path / "r1.pt", weights_only=False)
    for name, count in vqa_rank["calls"].items():  # a local gradient at every micro-batch
        assert count == STEPS * GRAD_ACCUM, f"{name}: {count} local gradients on the VQA rank"
    decoder = [n for n in vqa_rank["local_max"] if n.startswith("pixel_decoder.")]
    assert decoder and all(vqa_rank["local_max"][n] == 0.0 for n in decoder)

    rank0 = torch.load(tmp_path / "r0.pt", weights_only=False)
    for s, record in enumerate(rank0["records"]):
        ref = _reference_grads(recipe, record["params"], plan[s])
        assert set(record["grads"]) == set(ref)
        for name, grad in record["grads"].items():
            torch.testing.assert_close(
                grad, ref[name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name, s=s: f"{n} s{s}: {m}"
            )
        decoder_norm = sum(float(record["grads"][n].abs().sum()) for n in decoder)
        assert decoder_norm > 0  # rank 0's masks do train the decoder
