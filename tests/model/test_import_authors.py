"""``pixellm import-authors`` on a tiny checkpoint in the authors' layout, and the golden match.

The checkpoint is rebuilt from a seed (``tests/golden/authors_layout.py``); the golden outputs in
``tests/golden/authors_tiny.{json,safetensors}`` were recorded by ``tools/golden_authors.py``
running the authors' own code (transformers 4.31) on the same files. Tolerances (fp32, CPU):
ids exact; LLM codebook states and fused decoder tokens ``atol 1e-5``; 128x128 mask logits
``atol 1e-4`` (measured: states 1.2e-6, fused tokens 3.6e-7, logits 6.5e-6 with |logit| <= 3.2).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pixellm.cli import main as cli_main
from pixellm.model import PixelLM
from pixellm.model.compat_decoder import AuthorsPixelDecoder
from pixellm.model.import_authors import ImportError_, import_authors
from tests.model.drawing import draw_example, make_batch

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
sys.path.insert(0, str(GOLDEN))
from authors_layout import build_authors_layout, golden_image  # noqa: E402

RECORD = json.loads((GOLDEN / "authors_tiny.json").read_text())
STATES_ATOL, LOGITS_ATOL = 1e-5, 1e-4
IMAGE_INDEX = -200  # their placeholder id for the image in prompt ids


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    return build_authors_layout(tmp_path_factory.mktemp("authors"), RECORD["seed"])


@pytest.fixture(scope="module")
def imported(layout, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "model"
    assert (
        cli_main(
            [
                "import-authors",
                "--checkpoint",
                str(layout / "checkpoint"),
                "--clip",
                str(layout / "clip"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def model(imported, tmp_path_factory) -> PixelLM:
    moved = tmp_path_factory.mktemp("moved") / "model"  # an import directory can be moved
    shutil.copytree(imported, moved)
    return PixelLM.from_pretrained(moved)


def test_layout_matches_the_recorded_golden_files(layout):
    for rel, digest in RECORD["layout_sha256"].items():
        assert hashlib.sha256((layout / rel).read_bytes()).hexdigest() == digest, rel


def test_import_builds_the_compat_model(model):
    assert model.config.compat.preset == "authors-release"
    assert isinstance(model.pixel_decoder, AuthorsPixelDecoder)
    assert model.codebook.ids == RECORD["seg_token_ids_by_name"]
    vision = model.llava.model.vision_tower
    assert vision.config.image_size == 448
    assert model.llava.model.multi_modal_projector.linear_1.out_features == 2 * 64


def _collapse_image(ids: list[int], image_id: int) -> list[int]:
    """Our 256 ``<image>`` ids -> their single -200 placeholder."""
    out: list[int] = []
    for i in ids:
        if i == image_id:
            if not out or out[-1] != IMAGE_INDEX:
                out.append(IMAGE_INDEX)
        else:
            out.append(i)
    return out


@pytest.mark.parametrize("case", range(len(RECORD["cases"])))
def test_golden_prompt_and_teacher_forced_ids(model, case):
    c = RECORD["cases"][case]
    p = model.processor
    assert _collapse_image(p.prompt_ids(c["question"]), p.image_token_id) == c["prompt_ids"]
    answer = "Sure, " + " and ".join(["[SEG]"] * c["targets"]) + "."
    enc = p.encode_conversation(
        [{"role": "user", "text": c["question"]}, {"role": "assistant", "text": answer}]
    )
    assert _collapse_image(enc.input_ids, p.image_token_id) == c["teacher_forced_ids"]


def _inputs(model, case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    image = golden_image(case["image_seed"], tuple(case["hw"]))
    pixels, valid = model.processor.transform_image(image)
    assert list(valid) == case["clip_resize"]
    return pixels[None], torch.tensor([valid])


@pytest.mark.parametrize("case", range(len(RECORD["cases"])))
def test_golden_generated_ids(model, case):
    c = RECORD["cases"][case]
    pixels, valid = _inputs(model, c)
    ids = torch.tensor([model.processor.prompt_ids(c["question"])])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        embeds = model.embed_inputs(ids, model.encode_images(pixels, valid)[0])
        mask, positions = model._attention_inputs(ids, mask, valid)
        seq, _, _ = model.generate_greedy(
            embeds, mask, RECORD["max_new_tokens"], position_ids=positions
        )
    assert seq[0] == c["generated_ids"]


@pytest.mark.parametrize("case", range(len(RECORD["cases"])))
def test_golden_states_and_mask_logits(model, case):
    c = RECORD["cases"][case]
    golden = load_file(str(GOLDEN / "authors_tiny.safetensors"))
    pixels, valid = _inputs(model, c)
    answer = "Sure, " + " and ".join(["[SEG]"] * c["targets"]) + "."
    enc = model.processor.encode_conversation(
        [{"role": "user", "text": c["question"]}, {"role": "assistant", "text": answer}]
    )
    ids = torch.tensor([enc.input_ids])
    seen = {}
    hook = model.pixel_decoder.register_forward_hook(
        lambda mod, args, out: seen.update(states=args[2])
    )
    with torch.no_grad():
        out = model(pixels, valid, ids, torch.ones_like(ids))
    hook.remove()
    states = seen["states"]  # (K, 2, 3, H)
    k = c["targets"]
    torch.testing.assert_close(
        states.reshape(6 * k, -1), golden[f"case{case}.states"], atol=STATES_ATOL, rtol=0
    )
    dec = model.pixel_decoder
    with torch.no_grad():
        fused = dec.text_projection(states).sum(2) / 6  # (K, 2, C)
    torch.testing.assert_close(fused, golden[f"case{case}.fused"], atol=STATES_ATOL, rtol=0)
    torch.testing.assert_close(
        out.mask_logits[0], golden[f"case{case}.logits"], atol=LOGITS_ATOL, rtol=0
    )


def test_predict_end_to_end_on_the_import(model):
    img = golden_image(3, (120, 90))
    cfg = model.config
    model.config = cfg.model_copy(
        update={"compat": cfg.compat.model_copy(update={"max_new_tokens": 6})}
    )
    try:
        (pred,) = model.predict([img], ["What is in this image?"])
    finally:
        model.config = cfg
    assert pred.num_tokens <= 6
    assert len(pred.masks) == len(pred.scores)


# ------------------------------------------------------------------------------- bad input
def _copy(layout: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(layout, dst)
    return dst


def _run(root: Path, tmp_path: Path) -> None:
    import_authors(root / "checkpoint", root / "clip", tmp_path / "out")


def test_unknown_key_is_named(layout, tmp_path):
    root = _copy(layout, tmp_path)
    shard = root / "checkpoint" / "pytorch_model-00002-of-00002.bin"
    state = torch.load(shard, weights_only=True)
    state["model.extra_head.weight"] = torch.zeros(2, 2)
    torch.save(state, shard)
    with pytest.raises(
        ImportError_, match=r"model\.extra_head\.weight.*neither mapped nor on the drop list"
    ):
        _run(root, tmp_path)
    assert not (tmp_path / "out").exists()


def test_truncated_shard_fails_before_any_work(layout, tmp_path):
    root = _copy(layout, tmp_path)
    shard = root / "checkpoint" / "pytorch_model-00001-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ImportError_, match="pytorch_model-00001-of-00002.bin is truncated"):
        _run(root, tmp_path)
    assert not (tmp_path / "out").exists()


def test_wrong_clip_is_a_clear_error(layout, tmp_path):
    root = _copy(layout, tmp_path)
    cfg = json.loads((root / "clip" / "config.json").read_text())
    cfg["hidden_size"] = 48
    (root / "clip" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ImportError_, match=r"model\.mm_projector\.0\.weight: shape \(128, 32\)"):
        _run(root, tmp_path)
    with pytest.raises(ImportError_, match="is not a directory"):
        import_authors(root / "checkpoint", root / "no-clip", tmp_path / "out")


def test_checkpoint_of_another_shape_is_a_clear_error(layout, tmp_path):
    root = _copy(layout, tmp_path)
    cfg = json.loads((root / "checkpoint" / "config.json").read_text())
    cfg["hidden_size"] = 96
    (root / "checkpoint" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ImportError_, match=r"model\.embed_tokens\.weight: shape \(408, 64\)"):
        _run(root, tmp_path)


# ------------------------------------------------------------------------------- fine-tuning
def test_fine_tune_from_the_import_with_the_tiny_recipe(imported, tmp_path):
    """``model.base: imported``: the usual recipe trains from the import and exports."""
    from pixellm.config import load_recipe
    from pixellm.model import build_pixellm, build_processor

    recipe = load_recipe(
        "platform/recipes/tiny.yaml",
        [
            "model.base=imported",
            f"model.weights_path={imported}",
            "model.lora.r=4",
            "model.max_length=512",
        ],
    )
    assert build_processor(recipe.model).compat.preset == "authors-release"  # data path too
    torch.manual_seed(0)
    model = build_pixellm(recipe.model)
    assert model.config.base == "llava" and model.config.lora.r == 4
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ref = PixelLM.from_pretrained(imported).state_dict()
    names = {k.replace(".base_layer", ""): k for k in start}  # other LoRA targets than the import
    for k, v in ref.items():  # every tensor of the import, except its LoRA
        if ".lora_" not in k:
            torch.testing.assert_close(start[names[k.replace(".base_layer", "")]], v, msg=k)
    assert "pixel_decoder.level_embed" in model.trainable_state_dict()
    batch = make_batch(model, [draw_example(0, size=96), draw_example(1, size=80)])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(3):
        opt.zero_grad()
        out = model(**batch)
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    out_dir = model.eval().save_pretrained(tmp_path / "finetuned")
    again = PixelLM.from_pretrained(out_dir)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, msg=k)
    assert not torch.equal(
        again.state_dict()["pixel_decoder.level_embed"],
        start["pixel_decoder.level_embed"],
    )
