"""The offline CLIP tokenizer: every listed word one token, CLIP's vocabulary layout, words outside still tokenize."""

import pytest
from transformers import CLIPTokenizer

from workbench.models.tokenizer import DEFAULT_WORDS, clip_tokenizer, write_clip_tokenizer


def test_tokenizer_makes_each_word_one_token(tmp_path):
    words = [*DEFAULT_WORDS, "zigzag", "café"]
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path, words))
    vocab = tok.get_vocab()
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|startoftext|>", "<|endoftext|>", "<|endoftext|>")
    not_single = [w for w in words if len(tok(w).input_ids) != 3 or tok.decode(tok(w).input_ids[1:2]) != w]
    assert not_single == []
    assert tok("red").input_ids == [tok.bos_token_id, vocab["red</w>"], tok.eos_token_id]
    # CLIP's layout: 256 byte characters, then the same with "</w>", merges, then the two special tokens last
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and tok.eos_token_id == len(vocab) - 1
    # words outside the list still tokenize, case- and whitespace-normalized, without <unk>
    ids = tok("A  Zebra, 3 cats").input_ids
    assert tok.convert_ids_to_tokens(ids)[:3] == ["<|startoftext|>", "a</w>", "z"]
    assert tok.eos_token_id not in ids[1:-1] and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "a zebra , 3 cats"
    padded = tok("a photo of a red circle", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(padded) == 77 and padded[7:] == [tok.pad_token_id] * 70  # bos, 5 words, eos, then padding


@pytest.mark.parametrize("bad", ["Red", "3d", "two words", "x-ray", ""])
def test_tokenizer_rejects_words_that_cannot_be_one_token(tmp_path, bad):
    with pytest.raises(ValueError, match="lowercase letters"):
        write_clip_tokenizer(tmp_path, ["red", bad])


def test_clip_tokenizer_pads_with_the_token_asked_for():
    sd, sdxl_2 = clip_tokenizer(), clip_tokenizer(pad_token="!")
    assert sd.pad_token == "<|endoftext|>" and sdxl_2.pad_token == "!"
    assert sd.get_vocab() == sdxl_2.get_vocab() and sd.model_max_length == 77
    with pytest.raises(ValueError, match="pad_token 'zz' is not in the vocabulary"):
        clip_tokenizer(pad_token="zz")


def test_docstring_example(tmp_path):
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path, ["red", "circle"]))
    tokens = tok.convert_ids_to_tokens(tok("a red circle").input_ids)
    assert tokens == ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "<|endoftext|>"]
