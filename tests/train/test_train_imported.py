"""Fine-tuning from an import the way a user runs it: ``pixellm import-authors`` on a tiny
checkpoint in the authors' layout → ``model.base: imported`` + ``weights_path`` → Ray Train +
DeepSpeed on the tiny recipe → a self-contained export that reloads and keeps the release's
structure (its decoder variant and compat preset)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def test_pixellm_train_fine_tunes_from_an_import(train_env, ray_cluster, make_recipe, tmp_path):
    sys.path.insert(0, str(GOLDEN))
    from authors_layout import build_authors_layout

    from pixellm.model import PixelLM
    from pixellm.model.compat_decoder import AuthorsPixelDecoder
    from pixellm.model.import_authors import import_authors
    from pixellm.train import train

    seed = json.loads((GOLDEN / "authors_tiny.json").read_text())["seed"]
    layout = build_authors_layout(tmp_path / "authors", seed)
    imported = import_authors(layout / "checkpoint", layout / "clip", tmp_path / "imported")
    start = PixelLM.from_pretrained(imported).state_dict()

    recipe = make_recipe(
        train_env,
        "imported",
        "model.base=imported",
        f"model.weights_path={imported}",
        "model.max_length=512",  # the release's 256 image tokens + system prompt
        "train.num_workers=1",
        "train.cpus_per_worker=1",
        "train.steps_per_epoch=2",
    )
    result = train(recipe)
    assert result.metrics["step"] == 2

    tuned = PixelLM.from_pretrained(result.export_dir)
    assert isinstance(tuned.pixel_decoder, AuthorsPixelDecoder)
    assert tuned.config.compat.preset == "authors-release"
    state = tuned.state_dict()
    key = "pixel_decoder.level_embed"
    assert not torch.equal(state[key], start[key]), "the decoder did not train"
    frozen = [k for k in start if "vision_tower" in k and k in state]
    assert frozen, "no vision-tower tensor to compare"
    for k in frozen:  # CLIP stays frozen
        torch.testing.assert_close(state[k], start[k], msg=k)
