"""The real-weights path on CPU: a llava-hf layout checkpoint (tests/fixtures/llava_hf.py) loaded
through ``model.base: llava`` + ``weights_path``: keys, vocabulary sizing, codebook initialisation,
self-contained export that survives moving it and deleting the base checkpoint."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pixellm.config import load_recipe
from tests.fixtures.llava_hf import write_llava_hf


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_llava_hf(tmp_path_factory.mktemp("llava") / "llava-hf")


def _recipe(path):
    return load_recipe(
        "platform/recipes/tiny.yaml", ["model.base=llava", f"model.weights_path={path}"]
    )


def test_load_keeps_hub_weights_pads_to_64_and_sets_codebook_rows_to_the_mean(base):
    from pixellm.model import build_processor
    from pixellm.model.backbone import build_llava

    cfg = _recipe(base.path).model
    proc = build_processor(cfg)
    llava = build_llava(cfg, proc.tokenizer, proc.codebook.ids)
    rows = llava.get_input_embeddings().weight.shape[0]
    assert rows % 64 == 0 and rows >= base.embedding_rows  # never shrunk to len(tokenizer)
    assert len(proc.tokenizer) == base.n_tokens + len(proc.codebook.ids) <= rows
    hub = load_file(str(base.path / "model.safetensors"))
    q = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(llava.model.language_model.layers[0].self_attn.q_proj.weight, hub[q].float())
    ids = proc.codebook.ids
    n = len(proc.tokenizer)
    for weight in (llava.get_input_embeddings().weight, llava.get_output_embeddings().weight):
        others = [i for i in range(n) if i not in ids]
        mean = weight[others].mean(0)
        assert all(torch.allclose(weight[i], mean) for i in ids)
    hub_rows = hub["language_model.model.embed_tokens.weight"]
    assert torch.equal(
        llava.get_input_embeddings().weight[: base.n_tokens], hub_rows[: base.n_tokens].float()
    )


def test_export_is_self_contained_moved_and_base_deleted(base, tmp_path):
    from pixellm.model import PixelLM, build_pixellm

    private = tmp_path / "private-base"
    shutil.copytree(base.path, private)
    model = build_pixellm(_recipe(private).model)
    export = model.save_pretrained(tmp_path / "export")
    img = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    qs = ["Where is the red circle?", "Segment the square."]
    before = model.eval().predict([img, img], qs, max_new_tokens=6)
    moved = tmp_path / "elsewhere" / "model"
    shutil.move(str(export), moved)
    shutil.rmtree(private)
    again = PixelLM.from_pretrained(moved)
    after = again.predict([img, img], qs, max_new_tokens=6)
    assert [(p.text, p.masks, p.scores) for p in after] == [
        (p.text, p.masks, p.scores) for p in before
    ]
    bf16 = PixelLM.from_pretrained(moved, dtype="bf16")
    assert bf16.llava.dtype == torch.bfloat16
    assert next(bf16.pixel_decoder.parameters()).dtype == torch.float32
    assert len(bf16.predict([img], qs[:1], max_new_tokens=4)) == 1


def test_padding_rows_are_never_generated(base):
    from pixellm.model import build_pixellm

    model = build_pixellm(_recipe(base.path).model).eval()
    n = len(model.tokenizer)
    head = model.llava.lm_head

    def favour_padding(_module, _inputs, out):  # the padding rows win every argmax
        out = out.clone()
        out[..., n:] = 1e4
        return out

    seen: list[list[int]] = []
    collect = model._collect_states
    model._collect_states = lambda ids, states: (seen.extend(ids), collect(ids, states))[1]
    handle = head.register_forward_hook(favour_padding)
    try:
        img = np.zeros((32, 32, 3), dtype=np.uint8)
        pred = model.predict([img], ["What is this?"], max_new_tokens=5)[0]
    finally:
        handle.remove()
    assert pred.num_tokens == 5 and len(seen[0]) == 5
    assert all(i < n for i in seen[0]), seen  # generated, but only real tokens
