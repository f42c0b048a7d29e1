"""Per-group learning rates with a schedule floor, and the derived generation budget."""

from __future__ import annotations

import pytest
import torch

from pixellm.config import ConfigError, answer_token_budget, load_recipe
from pixellm.train.ds_config import derive_deepspeed_config
from pixellm.train.optim import GROUPS, group_lrs, param_group_of, param_groups

TINY = "platform/recipes/tiny.yaml"


def test_parameter_names_map_to_their_group():
    assert (
        param_group_of(
            "llm.base_model.model.model.language_model.layers.0.q_proj.lora_A.default.weight"
        )
        == "lora"
    )
    assert (
        param_group_of(
            "llm.base_model.model.model.language_model.embed_tokens.token_adapter.trainable_tokens_delta.default"
        )
        == "codebook"
    )
    assert param_group_of("pixel_decoder.blocks.0.hyper.layers.0.weight") == "decoder"
    assert (
        param_group_of("llm.base_model.model.model.multi_modal_projector.linear_1.weight")
        == "decoder"
    )


def test_groups_cover_every_trainable_parameter_once(tiny_model_and_recipe):
    model, recipe = tiny_model_and_recipe
    groups = param_groups(model, recipe.train)
    assert [g["name"] for g in groups] == list(GROUPS)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(ids) == sorted(trainable) and len(set(ids)) == len(ids)
    assert [g["lr"] for g in groups] == group_lrs(recipe.train)[0]


def test_deepspeed_schedule_warms_up_and_decays_to_each_groups_floor():
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    recipe = load_recipe(
        TINY,
        [
            "train.lr_decoder=0.004",
            "train.lr_lora=0.001",
            "train.lr_codebook=0.002",
            "train.min_lr_ratio=0.1",
            "train.steps_per_epoch=10",
            "train.warmup_steps=2",
        ],
    )
    params = derive_deepspeed_config(recipe)["scheduler"]["params"]
    assert params["warmup_max_lr"] == [0.004, 0.001, 0.002]
    assert params["warmup_min_lr"] == pytest.approx([0.0004, 0.0001, 0.0002])
    opt = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))]} for _ in GROUPS])
    sched = WarmupDecayLR(opt, **params)
    lrs = []
    for _ in range(12):  # lrs[k] is iteration k - 1 (the scheduler counts from -1)
        opt.step()
        sched.step()
        lrs.append([g["lr"] for g in opt.param_groups])
    assert lrs[2] == pytest.approx([0.004, 0.001, 0.002])  # peak at the end of warm-up
    assert lrs[-1] == pytest.approx([0.0004, 0.0001, 0.0002])  # the floor, not 0
    assert all(
        lr >= f * 0.999 for row in lrs for lr, f in zip(row, params["warmup_min_lr"], strict=True)
    )


def test_generation_budget_is_derived_so_no_valid_answer_is_cut():
    recipe = load_recipe(TINY, ["data.max_targets=6"])
    per_target = recipe.model.num_scales * recipe.model.tokens_per_group
    assert recipe.serve.max_new_tokens == answer_token_budget(recipe.model, 6)
    assert recipe.serve.max_new_tokens >= 6 * per_target + 1
    # the longest answer the corpus writes (6 targets) fits, tokenised with the model's tokenizer
    from pixellm.model import build_processor

    proc = build_processor(recipe.model)
    names = ["the large magenta hexagon [SEG]"] * 6
    answer = ", ".join(names[:-1]) + " and " + names[-1] + "."
    ids = proc.tokenizer(proc.codebook.expand(answer), add_special_tokens=False).input_ids
    assert len(ids) + 1 <= recipe.serve.max_new_tokens
    # more targets, larger budget; an explicit value is kept
    assert (
        load_recipe(TINY, ["data.max_targets=9"]).serve.max_new_tokens > recipe.serve.max_new_tokens
    )
    assert load_recipe(TINY, ["serve.max_new_tokens=40"]).serve.max_new_tokens == 40


def test_a_budget_below_one_target_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot hold one target"):
        load_recipe(TINY, ["serve.max_new_tokens=3"])


@pytest.fixture(scope="module")
def tiny_model_and_recipe():
    from pixellm.model import build_pixellm

    recipe = load_recipe(TINY)
    return build_pixellm(recipe.model), recipe
