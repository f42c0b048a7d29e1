import numpy as np
import pytest
import torch

from pixellm.config import load_recipe
from pixellm.model import build_processor
from pixellm.model.processing import IGNORE_INDEX, logits_to_image_size, resize_longest_side


@pytest.fixture(scope="module")
def processor():
    return build_processor(load_recipe().model)


def test_resize_longest_side():
    assert resize_longest_side(100, 200, 448) == (224, 448)
    assert resize_longest_side(300, 150, 224) == (224, 112)


def test_transform_pads_bottom_right(processor):
    img = np.full((60, 120, 3), 255, np.uint8)
    x, hw = processor.transform_image(img)
    s = processor.image_size
    assert x.shape == (3, s, s) and hw == (s // 2, s)
    assert torch.all(x[:, hw[0] :, :] == 0)  # padding below the image
    assert torch.all(x[:, : hw[0], :] > 0)  # white normalises to > 0


def test_mask_resize_pad_crop_back_round_trip(processor):
    # A mask drawn at the original size, placed in the padded square as the model sees it, comes
    # back to the original size unchanged (up to interpolation at the edges).
    h, w, s = 60, 120, processor.image_size
    mask = np.zeros((h, w), np.float32)
    mask[10:40, 30:90] = 1
    vh, vw = resize_longest_side(h, w, s)
    square = torch.zeros(1, s, s)
    square[0, :vh, :vw] = torch.nn.functional.interpolate(
        torch.from_numpy(mask)[None, None], size=(vh, vw), mode="nearest"
    )[0, 0]
    logits = square * 20 - 10  # logits over the padded square
    back = logits_to_image_size(logits, (vh, vw), s, (h, w))[0] > 0
    inter = np.logical_and(back.numpy(), mask > 0).sum()
    union = np.logical_or(back.numpy(), mask > 0).sum()
    assert back.shape == (h, w) and inter / union > 0.97


def test_labels_only_on_assistant_tokens(processor):
    conv = [
        {"role": "user", "text": "Segment the red circle."},
        {"role": "assistant", "text": "Sure, [SEG]."},
    ]
    enc = processor.encode_conversation(conv)
    assert enc.num_targets == 1
    labelled = [t for t, lab in zip(enc.input_ids, enc.labels, strict=False) if lab != IGNORE_INDEX]
    answer = processor.tokenizer.decode(labelled, skip_special_tokens=False)
    assert answer.strip().startswith("Sure,") and answer.endswith("</s>")
    assert enc.input_ids.count(processor.image_token_id) == processor.num_image_tokens
    assert len(processor.codebook.find_groups(enc.input_ids)) == 1


def test_too_long_is_rejected_not_truncated(processor):
    conv = [{"role": "user", "text": "red " * 400}, {"role": "assistant", "text": "[SEG]"}]
    with pytest.raises(ValueError, match="over model.max_length"):
        processor.encode_conversation(conv)


def test_bad_roles_raise(processor):
    with pytest.raises(ValueError, match="expected roles user, assistant"):
        processor.encode_conversation(
            [{"role": "assistant", "text": "a"}, {"role": "user", "text": "b"}]
        )


def _llama_style_tokenizer():
    """A sentencepiece-style BPE like Llama-2's (▁ word starts, a prepended ▁), built offline."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Llama-2's tokenizer.json: prepend "▁" and turn spaces into "▁"; pieces start at each "▁"
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    text = [
        "USER: <image> Please segment the small red circle. ASSISTANT: the small red circle."
    ] * 8
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "<image>"], show_progress=False
    )
    tok.train_from_iterator(text, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def test_answer_ids_are_the_joint_tokenisation_with_a_llama_style_tokenizer():
    from pixellm.model.codebook import SegCodebook
    from pixellm.model.processing import PixelLMProcessor

    tok = _llama_style_tokenizer()
    SegCodebook.add_to(tok, 2, 1)
    proc = PixelLMProcessor(tok, SegCodebook(tok, 2, 1), 64, 4, 256)
    question, answer = "Please segment the small red circle.", "the small red circle."
    enc = proc.encode_conversation(
        [{"role": "user", "text": question}, {"role": "assistant", "text": answer}]
    )
    prompt = proc.prompt_ids(question)  # what generation continues from
    assert enc.input_ids[: len(prompt)] == prompt
    answer_ids = enc.input_ids[len(prompt) : -1]
    joint = tok(
        proc._user_prefix(True) + question + " ASSISTANT: " + answer, add_special_tokens=False
    )
    assert [tok.bos_token_id, *joint.input_ids] == enc.input_ids[:-1]
    # the separately tokenised " " + answer starts with a lone "▁" that the joint ids never hold
    separate = tok(" " + answer, add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(separate[0]) == "▁" and separate != answer_ids
    assert tok.convert_ids_to_tokens(answer_ids[0]) == "▁the"
    assert enc.labels[len(prompt) : -1] == answer_ids


def test_masks_to_grid_keeps_area_fractions_and_zero_padding() -> None:
    from pixellm.model.processing import masks_to_grid

    # a 64x32 image (h x w) inside a 64-px square -> a 4x4 grid holds it in 4 rows x 2 columns
    mask = torch.zeros(1, 64, 32)
    mask[0, :16, :16] = 1  # the top-left grid cell, wholly
    mask[0, 16:24, 16:32] = 1  # half of the cell in row 1, column 1
    grid = masks_to_grid(mask, (64, 32), 64, 4)
    want = torch.zeros(1, 4, 4)
    want[0, 0, 0], want[0, 1, 1] = 1.0, 0.5
    torch.testing.assert_close(grid, want)
    assert masks_to_grid(mask[:0], (64, 32), 64, 4).shape == (0, 4, 4)
