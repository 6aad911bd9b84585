"""Tokenizer loading: the 8 special tokens get the ids the reference's add_tokens calls give them, Llama 3 gets
[PAD] first, and our encoding equals the HF fast tokenizer built from the same tokenizer.json."""

import json

import pytest
import tokenizers

from data_pipeline.tokenizer import (bos_token_id, build_tiny_tokenizer, eos_token_id, load_tokenizer, pad_token_id,
                                     special_token_ids)
from qv_jax.batch import SPECIAL_TOKENS

TEXTS = ["Describe the video in detail.", "The cat sat on the mat at 12.5 seconds.", "Answer: (A) 100.0"] * 5


def plain_tokenizer(path, template):
  """A tokenizer.json as a checkpoint ships it: role tokens, none of the 8 Quicksviewer tokens, no [PAD]."""
  file = build_tiny_tokenizer(TEXTS, path, template=template, vocab_size=300)
  data = json.load(open(file))
  data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in SPECIAL_TOKENS + ("[PAD]",)]
  for name in SPECIAL_TOKENS + ("[PAD]",):
    data["model"]["vocab"].pop(name, None)
  json.dump(data, open(file, "w"))
  return file


@pytest.mark.parametrize("template", ["qwen2", "llama3"])
def test_special_tokens_are_appended_in_order(tmp_path, template):
  file = plain_tokenizer(tmp_path / "tokenizer.json", template)
  base = tokenizers.Tokenizer.from_file(file).get_vocab_size()
  tok = load_tokenizer(file)
  ids = special_token_ids(tok)
  assert list(ids) == list(SPECIAL_TOKENS)
  if template == "llama3":  # [PAD] first (128256 on the real tokenizer), then the 8 tokens
    assert tok.token_to_id("[PAD]") == base and pad_token_id(tok) == base
    assert list(ids.values()) == list(range(base + 1, base + 9))
    assert tok.get_vocab_size() == base + 9
  else:
    assert list(ids.values()) == list(range(base, base + 8))  # 151665..151672 on the real Qwen2.5 tokenizer
    assert pad_token_id(tok) == tok.token_to_id("<|endoftext|>")
    assert tok.get_vocab_size() == base + 8
  again = load_tokenizer(file)  # deterministic, and loading an already-extended file adds nothing
  assert special_token_ids(again) == ids


@pytest.mark.parametrize("template", ["qwen2", "llama3"])
def test_ids_equal_the_reference_procedure_with_hf(tmp_path, template):
  """The reference adds the tokens pairwise with add_tokens(special_tokens=True) (and [PAD] for Llama 3)."""
  from transformers import PreTrainedTokenizerFast
  file = plain_tokenizer(tmp_path / "tokenizer.json", template)
  hf = PreTrainedTokenizerFast(tokenizer_file=file)
  if template == "llama3":
    hf.add_special_tokens({"pad_token": "[PAD]"})
  for pair in zip(SPECIAL_TOKENS[::2], SPECIAL_TOKENS[1::2]):
    hf.add_tokens(list(pair), special_tokens=True)
  ours = load_tokenizer(file)
  assert special_token_ids(ours) == {t: hf.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
  for text in ["<video_start><thumbnail_start>", "<thumbnail_end>12.5", "Hello there!\n\nHow are you? 100.0",
               "<|im_start|>user\nHi<|im_end|>\n", "<im_start><patch_start><patch_end><im_end>\n Q"]:
    assert ours.encode(text).ids == hf(text).input_ids, text


def test_tiny_tokenizer_templates(tmp_path):
  qwen = load_tokenizer(build_tiny_tokenizer(TEXTS, tmp_path / "q.json", "qwen2"))
  llama = load_tokenizer(build_tiny_tokenizer(TEXTS, tmp_path / "l.json", "llama3"))
  assert bos_token_id(qwen) is None and bos_token_id(llama) == llama.token_to_id("<|begin_of_text|>")
  assert eos_token_id(qwen) == qwen.token_to_id("<|im_end|>")
  assert eos_token_id(llama) == llama.token_to_id("<|eot_id|>")
  assert qwen.encode("12.5").tokens == ["1", "2", ".", "5"]  # Qwen: one digit per token
  assert llama.encode("12.5").tokens[0] == "<|begin_of_text|>"
  assert [p for p, _ in llama.pre_tokenizer.pre_tokenize_str("1234")] == ["123", "4"]  # Llama 3: up to 3 digits
  assert [p for p, _ in qwen.pre_tokenizer.pre_tokenize_str("1234")] == ["1", "2", "3", "4"]
  assert qwen.decode(qwen.encode("The cat 12.5").ids) == "The cat 12.5"


def test_missing_tokenizer_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="never downloaded"):
    load_tokenizer(str(tmp_path / "nope.json"))


def test_directory_path(tmp_path):
  build_tiny_tokenizer(TEXTS, tmp_path, "qwen2")
  assert special_token_ids(load_tokenizer(str(tmp_path)))["<patch_start>"] >= 256


def test_special_token_ids_requires_the_tokens(tmp_path):
  file = plain_tokenizer(tmp_path / "t.json", "qwen2")
  with pytest.raises(ValueError, match="load_tokenizer"):
    special_token_ids(tokenizers.Tokenizer.from_file(file))
