"""Serve replicas of jobs/score.py and jobs/serve.py: resources from the recipe's serve section or flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster.doc_commands import _job_parser

ROOT = Path(__file__).resolve().parents[2]
R7B = str(ROOT / "platform" / "recipes" / "pixellm-7b.yaml")


def _deployment(app):
    deployment = getattr(app, "_bound_deployment", None)  # Serve's Application (Ray 2.60)
    assert deployment is not None, "ray.serve Application no longer has _bound_deployment"
    return deployment


@pytest.mark.parametrize("name", ["pixellm-7b", "pixellm-13b"])
def test_big_recipes_give_each_replica_one_gpu_and_autoscale(name):
    from pixellm.serve.app import build_app

    recipe = str(ROOT / "platform" / "recipes" / f"{name}.yaml")
    d = _deployment(build_app({"model": "models:/m/1", "recipe": recipe}))
    assert d.ray_actor_options["num_gpus"] == 1 and d.ray_actor_options["num_cpus"] == 8
    scaling = d._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (1, 8)


def test_flags_override_the_recipe_resources():
    from pixellm.serve.app import build_app

    d = _deployment(
        build_app({"model": "models:/m/1", "recipe": R7B, "num_gpus": 0, "num_cpus": 2})
    )
    assert d.ray_actor_options["num_gpus"] == 0 and d.ray_actor_options["num_cpus"] == 2


@pytest.mark.parametrize("job", ["jobs/score.py", "jobs/serve.py"])
def test_score_and_serve_jobs_take_cpu_and_gpu_flags_defaulting_to_the_recipe(job):
    extra = ["--benchmark", "b", "--out", "o"] if job.endswith("score.py") else []
    argv = ["--model", "m", "--recipe", R7B, *extra]
    args = _job_parser(job, argv).parse_args(argv)
    assert args.num_cpus is None and args.num_gpus is None and args.address is None
    args = _job_parser(job, [*argv, "--num-gpus", "1"]).parse_args([*argv, "--num-gpus", "1"])
    assert args.num_gpus == 1.0
