"""Fixtures: the tiny recipe and a freshly built tiny PixelLM."""

import pytest
import torch

from pixellm.config import load_recipe
from pixellm.model import build_pixellm


@pytest.fixture(scope="module")
def tiny_recipe():
    return load_recipe("platform/recipes/tiny.yaml")


@pytest.fixture()
def tiny_model(tiny_recipe):
    torch.manual_seed(0)
    return build_pixellm(tiny_recipe.model)
