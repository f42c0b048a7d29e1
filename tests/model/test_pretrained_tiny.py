"""The quickstart's real-weights path: a pretrained tiny LLaVA in the llava-hf layout, loaded by
PixelLM through ``model.base: llava`` + ``model.weights_path`` exactly as llava-1.5-7b-hf is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pixellm.config import load_recipe
from pixellm.model import PixelLM, build_pixellm
from pixellm.train.pretrain import PretrainOptions, pretrain_tiny
from tests.model.drawing import draw_example, make_batch

# Two steps of each phase: enough to train, save and reload; the cache test reuses the same options.
SMALL = PretrainOptions(
    steps=2,
    batch_size=2,
    mixture={"muse": 1.0, "vqa": 1.0},
    log_every=1,
    text_steps=2,
    text_mixture={"muse": 1.0},
)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from pixellm.data.corpus import generate_corpus
    from pixellm.data.shards import build_shards

    root = tmp_path_factory.mktemp("pretrain")
    generate_corpus(root / "corpus", seed=0, images=9, image_size=64)
    for fmt, rel, name in (("muse", "muse", "muse"), ("llava", "llava/llava_instruct.json", "vqa")):
        images = root / "corpus" / "images"
        build_shards(
            fmt, root / "corpus" / rel, str(root / "shards" / name), images=images, engine="local"
        )
    out = pretrain_tiny(
        load_recipe("platform/recipes/tiny.yaml").model, root / "shards", root / "llava", SMALL
    )
    return out, root / "shards"


def test_pretrained_tiny_llava_is_a_llava_hf_directory_and_is_cached(pretrained, capsys):
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    out, shards = pretrained
    for name in ("config.json", "model.safetensors", "tokenizer.json", "pretrain.json"):
        assert (out / name).is_file(), name
    llava = LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert llava.get_input_embeddings().num_embeddings == len(tok)  # no codebook tokens yet
    assert "<seg_0_0>" not in tok.get_vocab()
    info = json.loads((out / "pretrain.json").read_text())
    assert info["steps"] == 2 and info["loss_lm_first"] > 0
    assert info["text_steps"] == 2 and info["text_loss_lm_first"] > 0
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    model_cfg = load_recipe("platform/recipes/tiny.yaml").model
    pretrain_tiny(model_cfg, shards, out, SMALL)  # same inputs: reused
    assert "reusing" in capsys.readouterr().out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_pixellm_loads_it_via_weights_path_with_clip_and_llm_frozen(pretrained, tmp_path):
    from transformers import LlavaForConditionalGeneration

    out, _ = pretrained
    recipe = load_recipe(
        "platform/recipes/tiny.yaml", ["model.base=llava", f"model.weights_path={out}"]
    )
    torch.manual_seed(0)
    model = build_pixellm(recipe.model)
    saved = LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True)
    ours, theirs = (
        model.llava.model.vision_tower.state_dict(),
        saved.model.vision_tower.state_dict(),
    )
    assert ours.keys() == theirs.keys()
    for key in ours:  # the pretrained CLIP, not a fresh random one
        torch.testing.assert_close(ours[key], theirs[key])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not any("vision_tower" in n for n in trainable), "CLIP must be frozen"
    assert all(
        "lora_" in n or "token_adapter" in n
        for n in trainable
        if "language_model" in n or "lm_head" in n
    ), "LLM base weights must be frozen"
    batch = make_batch(model, [draw_example(0), draw_example(1)])
    model.train()
    out_train = model(**batch)
    out_train.loss.backward()
    model.eval()
    export = model.save_pretrained(tmp_path / "export")
    back = PixelLM.from_pretrained(export)
    with torch.no_grad():
        a = model(**batch).mask_logits
        b = back(**batch).mask_logits
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y)


def test_score_head_gets_gradients_from_the_score_loss(tiny_model):
    batch = make_batch(tiny_model, [draw_example(0), draw_example(1)])
    tiny_model.train()
    out = tiny_model(**batch)
    assert out.loss_score is not None and float(out.loss_score) > 0
    assert [s.shape[0] for s in out.scores] == [m.shape[0] for m in batch["gt_masks"]]
    out.loss_score.backward()
    head = [p for n, p in tiny_model.named_parameters() if "score_head" in n]
    assert head and all(p.grad is not None and p.grad.abs().sum() > 0 for p in head)
    preds = tiny_model.eval().predict([draw_example(0)[0]], ["Please segment the red square."])
    assert all(0.0 <= s <= 1.0 for s in preds[0].scores)
    assert len(preds[0].scores) == len(preds[0].masks)


def test_text_phase_trains_the_llm_alone_on_image_free_conversations(pretrained):
    from pixellm.model.backbone import build_llava
    from pixellm.model.tokenizer import build_tiny_tokenizer
    from pixellm.train.pretrain import _batches, _fit, _text_lm_loss

    _, shards = pretrained
    cfg = load_recipe("platform/recipes/tiny.yaml").model
    model = build_pixellm(cfg)  # only for its processor (image token id, chat template)
    opts = PretrainOptions(
        mixture={"muse": 1.0, "vqa": 1.0},
        text_mixture={"muse": 1.0, "vqa": 1.0},
        log_every=1,
        warmup_steps=1,
    )
    batches = list(_batches(str(shards), opts, model.processor, 3, 4, seed=0, text_only=True))
    assert len(batches) == 3
    image_id = model.processor.image_token_id
    for b in batches:
        assert "pixel_values" not in b and not (b["input_ids"] == image_id).any()
        assert (b["labels"] != -100).any()
    # the same plan with images: the same conversations, less the image tokens
    with_images = next(_batches(str(shards), opts, model.processor, 3, 4, seed=0))
    first = with_images["input_ids"][0][with_images["attention_mask"][0].bool()]
    assert (
        first[first != image_id].tolist()
        == batches[0]["input_ids"][0][batches[0]["attention_mask"][0].bool()].tolist()
    )

    torch.manual_seed(0)
    llava = build_llava(cfg, build_tiny_tokenizer(cfg.tiny.vocab_size))
    before = {n: p.detach().clone() for n, p in llava.named_parameters()}
    losses = _fit(llava, iter(batches), lambda b: _text_lm_loss(llava, b), opts, 3, 4, "t", print)
    assert len(losses) == 3 and all(loss > 0 for loss in losses)
    after = dict(llava.named_parameters())
    vision = [n for n in before if "vision_tower" in n or "multi_modal_projector" in n]
    text = [n for n in before if "language_model" in n]
    assert vision and all(torch.equal(before[n], after[n]) for n in vision)
    assert any(not torch.equal(before[n], after[n]) for n in text)


def test_image_phase_trains_clip_at_its_own_rate(pretrained):
    """``vision_lr_scale`` reaches CLIP only: at 0 CLIP stays put while projector and LLM learn."""
    from pixellm.model.backbone import build_llava
    from pixellm.model.tokenizer import build_tiny_tokenizer
    from pixellm.train.pretrain import _batches, _fit, _lm_loss

    _, shards = pretrained
    cfg = load_recipe("platform/recipes/tiny.yaml").model
    model = build_pixellm(cfg)  # only for its processor
    moved = {}
    for scale in (0.0, 0.5):
        opts = PretrainOptions(
            mixture={"muse": 1.0}, warmup_steps=1, vision_lr_scale=scale, vision_weight_decay=0.0
        )
        batches = list(_batches(str(shards), opts, model.processor, 2, 2, seed=0))
        torch.manual_seed(0)
        llava = build_llava(cfg, build_tiny_tokenizer(cfg.tiny.vocab_size))
        before = {n: p.detach().clone() for n, p in llava.named_parameters()}
        _fit(llava, iter(batches), lambda b, m=llava: _lm_loss(m, cfg, b), opts, 2, 2, "i", print)
        after = dict(llava.named_parameters())
        moved[scale] = {
            part: any(not torch.equal(before[n], after[n]) for n in before if part in n)
            for part in ("vision_tower", "multi_modal_projector", "language_model")
        }
    assert moved[0.0] == {
        "vision_tower": False,
        "multi_modal_projector": True,
        "language_model": True,
    }
    assert all(moved[0.5].values())


def test_image_token_pooling_area_is_block_means_and_bilinear_at_2x():
    from pixellm.model.pixellm import pool_image_tokens

    x = torch.randn(2, 8, 8, 5)  # (B, g, g, Cv)
    area = pool_image_tokens(x, 2, "area")  # (B, 4, Cv)
    blocks = x.reshape(2, 2, 4, 2, 4, 5).mean((2, 4)).reshape(2, 4, 5)
    assert torch.allclose(area, blocks, atol=1e-6)
    bilinear = pool_image_tokens(x, 2, "bilinear")  # 8 -> 2 samples 4 of every 16 patches
    assert not torch.allclose(bilinear, area, atol=1e-3)
    # at an exact 2x ratio (the 7B's 32 -> 16) the two are the same
    assert torch.allclose(
        pool_image_tokens(x, 4, "bilinear"), pool_image_tokens(x, 4, "area"), atol=1e-6
    )
