"""PixelLM end to end on the tiny config: gradient flow, KV-cache vs teacher-forced, save/load, learning."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from pixellm.model import PixelLM
from pixellm.model.pixel_decoder import stability_scores
from tests.model.drawing import draw_example, make_batch

TRAINABLE_GROUPS = {
    "lora": "lora_",
    "codebook input rows": "embed_tokens.token_adapter",
    "codebook output rows": "lm_head.token_adapter",
    "p_V->T": "multi_modal_projector",
    "pixel decoder": "pixel_decoder.",
}


def test_trainable_set_is_exactly_the_paper_set(tiny_model):
    names = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    for group, key in TRAINABLE_GROUPS.items():
        assert any(key in n for n in names), f"nothing trainable in {group}"
    frozen = [n for n, p in tiny_model.named_parameters() if not p.requires_grad]
    assert all("pixel_decoder." not in n for n in frozen), "a decoder part is frozen"
    assert all("vision_tower" not in n for n in names), "CLIP must be frozen"
    assert all(
        "lora_" in n or "token_adapter" in n
        for n in names
        if "language_model" in n or "lm_head" in n
    ), "LLM base weights must be frozen"


def test_gradient_flow_reaches_every_trainable_group_and_no_frozen(tiny_model):
    batch = make_batch(tiny_model, [draw_example(0), draw_example(1)])
    tiny_model.train()
    out = tiny_model(**batch)
    assert out.num_masks == sum(m.shape[0] for m in batch["gt_masks"])
    out.loss.backward()
    trainable = {n: p for n, p in tiny_model.named_parameters() if p.requires_grad}
    # LoRA B starts at zero, so LoRA A gets no gradient on the very first step by construction;
    # every other trainable tensor (and LoRA B) must get a non-zero gradient.
    for name, p in trainable.items():
        if "lora_A" in name:
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient: {name}"
    for name, p in tiny_model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"frozen parameter got a gradient: {name}"


def test_mask_count_mismatch_raises_before_forward(tiny_model):
    batch = make_batch(tiny_model, [draw_example(0)])
    batch["gt_masks"] = [batch["gt_masks"][0][:1]]
    with pytest.raises(ValueError, match="target groups in the text but 1 masks"):
        tiny_model(**batch)


def _train(model, examples, steps: int, lr: float = 3e-3) -> list[float]:
    batch = make_batch(model, examples)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        out = model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(out.loss))
    model.eval()
    return losses


def test_kv_cache_generation_matches_teacher_forced_masks(tiny_model):
    examples = [draw_example(3)]
    _train(tiny_model, examples, steps=40)  # enough for the model to emit codebook runs
    img, _, names = examples[0]
    question = "Please segment the " + " and the ".join(names) + " shapes."
    with torch.no_grad():
        cached = tiny_model.predict([img], [question], max_new_tokens=48)[0]
        uncached = tiny_model.predict([img], [question], max_new_tokens=48, use_cache=False)[0]
    assert cached.text == uncached.text
    assert len(cached.masks) >= 1, f"model emitted no target: {cached.text!r}"
    # Teacher-forced pass over the prompt + generated ids must give the same masks.
    proc = tiny_model.processor
    gen_ids = tiny_model.tokenizer(
        tiny_model.codebook.expand(cached.text), add_special_tokens=False
    ).input_ids
    ids = proc.prompt_ids(question) + gen_ids
    x, hw = proc.transform_image(img)
    with torch.no_grad():
        out = tiny_model(
            pixel_values=x[None],
            valid_hw=torch.tensor([hw]),
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        )
    from pixellm.model.processing import logits_to_image_size

    tf = logits_to_image_size(out.mask_logits[0], hw, proc.image_size, img.shape[:2]) > 0
    pred = np.stack([mask_utils.decode(r) for r in cached.masks]).astype(bool)
    assert tf.shape[0] == pred.shape[0]
    agree = (tf.numpy() == pred).mean()
    assert agree > 0.999, f"KV-cache and teacher-forced masks differ on {1 - agree:.4%} of pixels"
    for r, m in zip(cached.masks, uncached.masks, strict=False):
        assert r == m


def test_save_load_round_trip_is_bit_identical(tiny_model, tmp_path):
    examples = [draw_example(4), draw_example(5)]
    _train(tiny_model, examples, steps=3)
    tiny_model.save_pretrained(tmp_path / "m")
    reloaded = PixelLM.from_pretrained(tmp_path / "m")
    batch = make_batch(tiny_model, examples)
    with torch.no_grad():
        a, b = tiny_model.eval()(**batch), reloaded(**batch)
    assert torch.equal(a.logits, b.logits)
    for x, y in zip(a.mask_logits, b.mask_logits, strict=False):
        assert torch.equal(x, y)
    imgs = [e[0] for e in examples]
    qs = ["Please segment the shapes."] * 2
    pa, pb = (
        tiny_model.predict(imgs, qs, max_new_tokens=24),
        reloaded.predict(imgs, qs, max_new_tokens=24),
    )
    assert [p.text for p in pa] == [p.text for p in pb]
    assert [p.masks for p in pa] == [p.masks for p in pb]


def test_from_pretrained_names_a_bad_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a PixelLM model directory"):
        PixelLM.from_pretrained(tmp_path)


def test_tiny_model_overfits_multi_target_examples(tiny_model):
    """Proof that gradients reach the decoder through the codebook states: IoU > 0.9."""
    examples = [draw_example(s) for s in range(10, 14)]
    start = time.monotonic()
    losses = _train(tiny_model, examples, steps=300, lr=1e-3)
    batch = make_batch(tiny_model, examples)
    with torch.no_grad():
        out = tiny_model(**batch)
    ious = []
    for logits, gt in zip(out.mask_logits, batch["gt_masks"], strict=False):
        pred = logits > 0
        inter = (pred & (gt > 0)).sum(dim=(1, 2)).float()
        union = (pred | (gt > 0)).sum(dim=(1, 2)).float()
        ious += (inter / union).tolist()
    elapsed = time.monotonic() - start
    assert losses[-1] < losses[0] * 0.5
    assert min(ious) > 0.8 and float(np.mean(ious)) > 0.9, f"IoUs {ious} after {elapsed:.0f}s"


def _force_tokens(model, sequence):
    """Make the LM head emit ``sequence`` step by step (one lm_head call per generated token)."""
    calls = {"n": 0}

    def hook(_module, _inputs, out):
        forced = torch.full_like(out, -1e4)
        forced[..., sequence[min(calls["n"], len(sequence) - 1)]] = 0.0
        calls["n"] += 1
        return forced

    return model.llava.lm_head.register_forward_hook(hook)


def test_codebook_run_completed_by_the_last_token_is_kept(tiny_model):
    """Budget = exactly one codebook run: the run is kept (its last state needs one more forward);
    one token less and the incomplete run is dropped."""
    model = tiny_model.eval()
    run = model.codebook.ids
    img = np.zeros((40, 40, 3), dtype=np.uint8)
    handle = _force_tokens(model, run)
    try:
        full = model.predict([img], ["Segment it."], max_new_tokens=len(run))[0]
        cut = model.predict([img], ["Segment it."], max_new_tokens=len(run) - 1)[0]
    finally:
        handle.remove()
    assert full.text == "[SEG]" and len(full.masks) == 1 and len(full.scores) == 1
    assert cut.text == "" and cut.masks == []


def test_generated_score_is_head_iou_times_stability_times_the_answers_confidence(tiny_model):
    """Same tokens and states twice; the second time the description token ties with another id
    (p = 0.5): the mask, the head's IoU and the stability are unchanged, the score halves."""
    model = tiny_model.eval()
    word = 5  # an ordinary id below the codebook and the special tokens
    sequence = [word, *model.codebook.ids, model.tokenizer.eos_token_id]
    img = np.zeros((40, 40, 3), dtype=np.uint8)
    runs, decoded = [], []

    def soft_edge(_module, _inputs, out):
        """Mask logits -3 .. 3 along the width: a soft edge, so the stability is in (0, 1)."""
        ramp = torch.linspace(-3.0, 3.0, out.mask_logits.shape[-1]).expand_as(out.mask_logits)
        decoded.append(dataclasses.replace(out, mask_logits=ramp.contiguous()))
        return decoded[-1]

    for tie in (False, True):
        calls = {"n": 0}

        def hook(_module, _inputs, out, tie=tie, calls=calls):
            forced = torch.full_like(out, -1e4)
            step = min(calls["n"], len(sequence) - 1)
            forced[..., sequence[step]] = 0.0
            if tie and step == 0:
                forced[..., word + 1] = 0.0  # argmax keeps the first: still `word`, at p = 0.5
            calls["n"] += 1
            return forced

        handle = model.llava.lm_head.register_forward_hook(hook)
        seen = model.pixel_decoder.register_forward_hook(soft_edge)
        try:
            runs.append(model.predict([img], ["Segment it."], max_new_tokens=len(sequence))[0])
        finally:
            handle.remove()
            seen.remove()
    sure, unsure = runs
    assert sure.masks == unsure.masks and len(sure.scores) == 1
    out = decoded[0]  # the decoder's output of the sure run
    head, stability = float(out.scores[0]), float(stability_scores(out.mask_logits)[0])
    assert 0.0 < stability < 1.0 and 0.0 < head < 1.0
    assert sure.scores[0] == pytest.approx(head * stability, rel=1e-4)  # the answer is sure: p = 1
    assert unsure.scores[0] == pytest.approx(sure.scores[0] * 0.5, rel=1e-4)


def test_target_text_confidence_takes_the_least_sure_token_of_each_target(tiny_model):
    run = tiny_model.codebook.ids
    ids = [7, 8, *run, 9, *run]
    lp = [np.log(0.9), np.log(0.4)] + [0.0] * len(run) + [np.log(0.7)] + [np.log(0.6)] * len(run)
    assert tiny_model.target_text_confidence(ids, lp) == pytest.approx([0.4, 0.6])


def test_uncached_baseline_recomputes_the_sequence_and_cached_feeds_one_token(tiny_model):
    """The bench/generate.py baseline: forward inputs grow by one token per step without the
    cache; with it every step after the prompt is one token long."""
    model = tiny_model.eval()
    lengths: list[int] = []
    lm = model.llava.model.language_model
    handle = lm.register_forward_pre_hook(
        lambda _m, _a, kw: lengths.append(kw["inputs_embeds"].shape[1]), with_kwargs=True
    )
    img = np.zeros((40, 40, 3), dtype=np.uint8)
    eos = model.tokenizer.eos_token_id
    word = model.tokenizer("the", add_special_tokens=False).input_ids[0]
    assert word != eos
    forced = _force_tokens(model, [word] * 8)
    try:
        for use_cache in (True, False):
            model.predict([img], ["Segment it."], max_new_tokens=6, use_cache=use_cache)
    finally:
        handle.remove()
        forced.remove()
    cached, uncached = lengths[:6], lengths[6:]
    prompt = cached[0]
    assert cached == [prompt] + [1] * 5
    assert uncached == [prompt + k for k in range(6)]


def test_alignment_loss_is_weighted_into_the_loss_and_reaches_the_llm(tiny_recipe):
    # λ_align = 0 (the paper's loss): no alignment term is computed; λ_align = 1: it is added
    # and its gradient alone reaches the LoRA matrices through the target tokens.
    from pixellm.model import build_pixellm

    def build(lam: float):
        loss = tiny_recipe.model.loss.model_copy(update={"lambda_align": lam})
        torch.manual_seed(0)
        return build_pixellm(tiny_recipe.model.model_copy(update={"loss": loss}))

    paper, ours = build(0.0), build(1.0)
    batch = make_batch(paper, [draw_example(0), draw_example(1)])
    out0, out1 = paper(**batch), ours(**batch)
    assert float(out1.loss_align) > 0 and float(out0.loss_align) == 0.0  # off: not computed
    torch.testing.assert_close(out1.loss, out0.loss + out1.loss_align)
    out1.loss_align.backward()
    lora = [p for n, p in ours.named_parameters() if "lora_B" in n and p.grad is not None]
    assert lora and any(float(p.grad.abs().sum()) > 0 for p in lora)
