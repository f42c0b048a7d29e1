import pytest

from pixellm.config import load_recipe
from pixellm.model import PLACEHOLDER, SegCodebook, build_tokenizer
from pixellm.model.codebook import codebook_tokens


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(load_recipe().model)


def test_codebook_tokens_are_distinct_single_ids(tokenizer):
    cb = SegCodebook(tokenizer, num_scales=2, tokens_per_group=3)
    assert cb.tokens == codebook_tokens(2, 3)
    assert len(set(cb.ids)) == 6
    for tok, i in zip(cb.tokens, cb.ids, strict=False):
        assert tokenizer(tok, add_special_tokens=False).input_ids == [i]


def test_expand_render_round_trip(tokenizer):
    cb = SegCodebook(tokenizer, 2, 3)
    text = f"The red circle {PLACEHOLDER}, the blue square {PLACEHOLDER} and none else."
    expanded = cb.expand(text)
    assert PLACEHOLDER not in expanded and expanded.count("<seg_0_0>") == 2
    ids = tokenizer(expanded, add_special_tokens=False).input_ids
    groups = cb.find_groups(ids)
    assert len(groups) == 2 and all(len(g) == 6 for g in groups)
    assert [ids[p] for p in groups[0]] == cb.ids
    assert cb.render(tokenizer.decode(ids)) == text


def test_incomplete_run_is_not_a_target(tokenizer):
    cb = SegCodebook(tokenizer, 2, 3)
    ids = tokenizer("a <seg_0_0><seg_0_1> b", add_special_tokens=False).input_ids
    assert cb.find_groups(ids) == []
    assert cb.render("a <seg_0_0><seg_0_1> b") == "a  b"


def test_missing_codebook_tokens_raise():
    from pixellm.model.tokenizer import build_tiny_tokenizer

    with pytest.raises(ValueError, match="not all distinct tokens"):
        SegCodebook(build_tiny_tokenizer(512), 2, 3)
