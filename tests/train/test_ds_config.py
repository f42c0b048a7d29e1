"""DeepSpeed config derivation and the checks that run before Ray starts (no Ray, fast)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pixellm.config import ConfigError, load_recipe
from pixellm.train.checkpoint import diff_recipes
from pixellm.train.ds_config import derive_deepspeed_config, zero_stage
from pixellm.train.run_tracking import flatten_recipe

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "platform" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("micro,accum,workers", [(1, 1, 1), (2, 10, 8), (3, 4, 2)])
def test_global_batch_is_micro_times_workers_times_accum(
    micro: int, accum: int, workers: int
) -> None:
    r = load_recipe(
        REPO / "platform/recipes/tiny.yaml",
        overrides=[
            f"train.micro_batch_size={micro}",
            f"train.grad_accum={accum}",
            f"train.num_workers={workers}",
        ],
    )
    ds = derive_deepspeed_config(r)
    assert ds["train_micro_batch_size_per_gpu"] == micro
    assert ds["gradient_accumulation_steps"] == accum
    assert ds["train_batch_size"] == micro * accum * workers == r.train.global_batch_size


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipes_derive(recipe: Path) -> None:
    r = load_recipe(recipe)
    ds = derive_deepspeed_config(r)
    sched = ds["scheduler"]["params"]
    assert sched["total_num_steps"] == r.train.epochs * r.train.steps_per_epoch
    assert sched["warmup_num_steps"] == r.train.warmup_steps
    assert ds["optimizer"]["params"]["betas"] == list(r.train.betas)
    assert ds["gradient_clipping"] == r.train.grad_clip
    assert ds["bf16"]["enabled"] is r.train.use_gpu
    assert zero_stage(ds) in (2, 3)


def test_zero3_recipe_and_paper_numbers() -> None:
    r = load_recipe(
        REPO / "platform/recipes/tiny.yaml",
        overrides=["train.deepspeed_config=platform/deepspeed/zero3.json"],
    )
    assert zero_stage(derive_deepspeed_config(r)) == 3
    paper = derive_deepspeed_config(load_recipe(REPO / "platform/recipes/pixellm-7b.yaml"))
    assert paper["train_micro_batch_size_per_gpu"] == 2
    assert paper["gradient_accumulation_steps"] == 10
    assert paper["optimizer"]["params"]["lr"] == pytest.approx(3e-4)


def test_batch_size_in_json_is_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": 16}))
    r = load_recipe(
        REPO / "platform/recipes/tiny.yaml", overrides=[f"train.deepspeed_config={bad}"]
    )
    with pytest.raises(ConfigError, match=r"sets \['train_batch_size'\]"):
        derive_deepspeed_config(r)


def test_missing_json_warmup_and_bf16_on_cpu_are_config_errors() -> None:
    tiny = REPO / "platform/recipes/tiny.yaml"
    with pytest.raises(ConfigError, match="train.deepspeed_config='nope.json': file not found"):
        derive_deepspeed_config(load_recipe(tiny, overrides=["train.deepspeed_config=nope.json"]))
    with pytest.raises(ConfigError, match="train.warmup_steps=50 > total steps 20"):
        derive_deepspeed_config(load_recipe(tiny, overrides=["train.warmup_steps=50"]))
    with pytest.raises(ConfigError, match="train.precision='bf16' needs train.use_gpu=true"):
        derive_deepspeed_config(load_recipe(tiny, overrides=["train.precision=bf16"]))


def test_recipe_diff_names_the_key() -> None:
    tiny = REPO / "platform/recipes/tiny.yaml"
    base = load_recipe(tiny)
    a = flatten_recipe(base)
    b = flatten_recipe(load_recipe(tiny, overrides=[f"train.lr={base.train.lr * 2}"]))
    assert diff_recipes(a, b) == {"train.lr": (base.train.lr, base.train.lr * 2)}


def test_bad_recipe_fails_before_ray(tmp_path: Path) -> None:
    """jobs/train.py and `pixellm train` exit 2 with one message; Ray never starts."""
    for cmd in (
        [sys.executable, str(REPO / "jobs/train.py")],
        [sys.executable, "-m", "pixellm.cli", "train"],
    ):
        proc = subprocess.run(
            [
                *cmd,
                "--recipe",
                str(REPO / "platform/recipes/tiny.yaml"),
                "--set",
                f"data.shards_root={tmp_path}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env={"PATH": "/usr/bin:/bin", "RAY_ADDRESS": "127.0.0.1:1"},
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "error: data: corpus" in proc.stderr
        assert "Started a local Ray instance" not in proc.stderr + proc.stdout
