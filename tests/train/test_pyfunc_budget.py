"""The pyfunc's fallback generation budget is the recipes' derived one, not a literal."""

from __future__ import annotations

from pathlib import Path

import pytest

from pixellm.config import load_recipe
from pixellm.train.pyfunc import DEFAULT_MAX_NEW_TOKENS, signature

RECIPES = sorted((Path(__file__).parents[2] / "platform" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_default_budget_is_every_shipped_recipes_derived_budget(recipe):
    assert load_recipe(recipe).serve.max_new_tokens == DEFAULT_MAX_NEW_TOKENS


def test_signature_declares_the_budget_as_its_default_param():
    (param,) = signature().params.params
    assert param.name == "max_new_tokens" and param.default == DEFAULT_MAX_NEW_TOKENS
    assert signature(40).params.params[0].default == 40
