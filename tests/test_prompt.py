"""Prompt strings, chat templates, token ids, label masks and token_frame against hand-worked examples.

The byte-level tokenizer used here has no merges, so every ASCII character is one token and every special token
is one token: the expected sequences below are counted by hand from the rendered strings."""

import numpy as np
import pytest

from data_pipeline.errors import BadSampleError
from data_pipeline.prompt import image_prompt, render_conversation, tokenize_sample, video_prompt
from data_pipeline.tokenizer import build_tiny_tokenizer, load_tokenizer

IGN, IMG = -100, -200


@pytest.fixture(scope="module", params=["qwen2", "llama3"])
def tok(request, tmp_path_factory):
  path = build_tiny_tokenizer(["x"], tmp_path_factory.mktemp("tok") / f"{request.param}.json",
                              template=request.param, vocab_size=256)
  return request.param, load_tokenizer(path)


def chars(tokenizer, text):
  """Ids of `text`, one per character (the tokenizer has no merges)."""
  return [tokenizer.encode(c).ids[-1] for c in text]


def sp(tokenizer, *names):
  return [tokenizer.token_to_id(n) for n in names]


# ------------------------------------------------------------------------------------------------ strings

def test_video_prompt_string():
  assert video_prompt("What happens?", [0.5, 12.5, 100.0]) == (
      "<video_start><thumbnail_start><image><thumbnail_end>0.5<image>12.5<image>100.0<image><video_end>\n"
      "What happens?")
  # the user text "<image>\n{question}" is stripped as a whole: the question's leading spaces stay
  assert video_prompt("  Q  ", [np.float32(0.1)]) == (
      "<video_start><thumbnail_start><image><thumbnail_end>0.1<image><video_end>\n  Q")


def test_image_prompt_string():
  assert image_prompt("<image>\nWhat is this?", [3]) == (
      "<im_start><patch_start><image><patch_end><patch_start><image><patch_end><patch_start><image><patch_end>"
      "<im_end>\nWhat is this?")
  assert image_prompt(" <image>A<image>B ", [1, 2]) == (
      "<im_start><patch_start><image><patch_end><im_end>A<im_start><patch_start><image><patch_end>"
      "<patch_start><image><patch_end><im_end>B")


def test_render_qwen2():
  conv = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
          {"from": "human", "value": "Why?"}, {"from": "gpt", "value": ""}]
  assert render_conversation(conv, "qwen2") == (
      "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
      "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n")


def test_render_llama3_uses_the_system_header_for_the_assistant():
  conv = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]
  assert render_conversation(conv, "llama3") == (
      "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
      "<|start_header_id|>system<|end_header_id|>\n\nHello!<|eot_id|>")
  assert render_conversation(conv, "llama_3_chat") == render_conversation(conv, "llama3")


def test_leading_gpt_turn_is_dropped():
  conv = [{"from": "gpt", "value": "ignored"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]
  assert render_conversation(conv, "qwen2") == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"


# ------------------------------------------------------------------------------------------ token sequences

VIDEO_CONV = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]


def test_video_sample(tok):
  template, t = tok
  out = tokenize_sample(VIDEO_CONV, modality="video", tokenizer=t, template=template, timestamps=[0.5, 1.5])
  video = (sp(t, "<video_start>", "<thumbnail_start>") + [IMG] + sp(t, "<thumbnail_end>") + chars(t, "0.5")
           + [IMG] + chars(t, "1.5") + [IMG] + sp(t, "<video_end>") + chars(t, "\nWhat is it?"))
  if template == "qwen2":
    head = sp(t, "<|im_start|>") + chars(t, "user\n")                                   # 6 tokens
    mid = sp(t, "<|im_end|>") + chars(t, "\n") + sp(t, "<|im_start|>") + chars(t, "assistant\n")  # 13
    answer = chars(t, "A cat.") + sp(t, "<|im_end|>") + chars(t, "\n")                 # 8 supervised
    n_masked = 6 + 25 + 13
  else:
    head = sp(t, "<|begin_of_text|>", "<|start_header_id|>") + chars(t, "user") + sp(t, "<|end_header_id|>") \
        + chars(t, "\n\n")                                                              # 9 tokens
    mid = sp(t, "<|eot_id|>", "<|start_header_id|>") + chars(t, "system") + sp(t, "<|end_header_id|>") \
        + chars(t, "\n\n")                                                              # 11
    answer = chars(t, "A cat.") + sp(t, "<|eot_id|>")                                  # 7 supervised
    n_masked = 9 + 25 + 11
  assert len(video) == 25
  expected_ids = head + video + mid + answer
  assert out["input_ids"].tolist() == expected_ids
  assert out["labels"].tolist() == [IGN] * n_masked + answer
  # token_frame: -1 up to and including <thumbnail_end>; "0.5" and frame 0's placeholder -> 0; "1.5" and
  # frame 1's placeholder -> 1; -1 from <video_end> on
  frame_part = [-1, -1, -1, -1, 0, 0, 0, 0, 1, 1, 1, 1] + [-1] * 13
  assert out["token_frame"].tolist() == [-1] * len(head) + frame_part + [-1] * (len(mid) + len(answer))
  assert all(v.dtype == np.int32 for v in out.values())


def test_text_sample_two_rounds_gets_the_dummy_image(tok):
  template, t = tok
  conv = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
          {"from": "human", "value": "Why?"}, {"from": "gpt", "value": "Because."}]
  out = tokenize_sample(conv, modality="text", tokenizer=t, template=template)
  if template == "qwen2":
    end = sp(t, "<|im_end|>") + chars(t, "\n")
    user = lambda s: sp(t, "<|im_start|>") + chars(t, "user\n" + s) + end + sp(t, "<|im_start|>") \
        + chars(t, "assistant\n")  # noqa: E731
    a1, a2 = chars(t, "Hello!") + end, chars(t, "Because.") + end
    r1, r2 = user("Hi"), user("Why?")
    assert (len(r1), len(a1), len(r2), len(a2)) == (21, 8, 23, 10)
    ids = r1 + a1 + r2 + a2
  else:
    eot = sp(t, "<|eot_id|>")
    hdr = lambda role: sp(t, "<|start_header_id|>") + chars(t, role) + sp(t, "<|end_header_id|>") \
        + chars(t, "\n\n")  # noqa: E731
    r1 = sp(t, "<|begin_of_text|>") + hdr("user") + chars(t, "Hi") + eot + hdr("system")
    a1 = chars(t, "Hello!") + eot
    r2 = hdr("user") + chars(t, "Why?") + eot + hdr("system")
    a2 = chars(t, "Because.") + eot
    assert (len(r1), len(a1), len(r2), len(a2)) == (22, 7, 23, 9)
    ids = r1 + a1 + r2 + a2
  assert out["input_ids"].tolist() == ids + [IMG]
  assert out["labels"].tolist() == [IGN] * len(r1) + a1 + [IGN] * len(r2) + a2 + [IGN]
  assert out["token_frame"].tolist() == [-1] * (len(ids) + 1)


def test_image_sample_with_crops(tok):
  template, t = tok
  conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Dog."}]
  out = tokenize_sample(conv, modality="image", tokenizer=t, template=template, crops_per_image=[3])
  patch = sp(t, "<patch_start>") + [IMG] + sp(t, "<patch_end>")
  image = sp(t, "<im_start>") + patch * 3 + sp(t, "<im_end>") + chars(t, "\nWhat?")
  assert len(image) == 17
  ids = out["input_ids"].tolist()
  assert ids.count(IMG) == 3
  start = ids.index(sp(t, "<im_start>")[0])
  assert ids[start:start + 17] == image
  answer = chars(t, "Dog.") + (sp(t, "<|im_end|>") + chars(t, "\n") if template == "qwen2" else sp(t, "<|eot_id|>"))
  assert out["labels"].tolist() == [IGN] * (len(ids) - len(answer)) + answer
  assert (out["token_frame"] == -1).all()


def test_multi_image_sample_prepends_placeholders_when_missing(tok):
  template, t = tok
  conv = [{"from": "human", "value": "Compare them."}, {"from": "gpt", "value": "Same."}]
  out = tokenize_sample(conv, modality="image", tokenizer=t, template=template, crops_per_image=[2, 3])
  from data_pipeline.prompt import expand_conversation
  user = expand_conversation(conv, modality="image", crops_per_image=[2, 3])[0]["value"]
  assert user == ("<im_start><patch_start><image><patch_end><patch_start><image><patch_end><im_end>"
                  "<im_start><patch_start><image><patch_end><patch_start><image><patch_end><patch_start><image>"
                  "<patch_end><im_end>\nCompare them.")
  assert out["input_ids"].tolist().count(IMG) == 5


def test_llama3_keeps_only_the_first_bos(tok):
  template, t = tok
  out = tokenize_sample(VIDEO_CONV, modality="video", tokenizer=t, template=template, timestamps=[0.5, 1.5, 2.5])
  bos = t.token_to_id("<|begin_of_text|>")
  ids = out["input_ids"].tolist()
  assert ids.count(IMG) == 4
  if template == "llama3":
    assert ids[0] == bos and ids.count(bos) == 1
  else:
    assert bos is None


def test_generation_prompt_has_no_supervised_tokens(tok):
  template, t = tok
  conv = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": ""}]
  out = tokenize_sample(conv, modality="video", tokenizer=t, template=template, timestamps=[0.5, 1.5])
  assert (out["labels"] == IGN).all()
  tail = chars(t, "assistant\n") if template == "qwen2" else chars(t, "system") + sp(t, "<|end_header_id|>") \
      + chars(t, "\n\n")
  assert out["input_ids"].tolist()[-len(tail):] == tail


def test_length_mismatch_masks_the_whole_sample(tok):
  """A human turn holding the separator text breaks the round split; the reference then masks everything."""
  template, t = tok
  sep = "<|im_end|>\n" if template == "qwen2" else "<|eot_id|>"
  conv = [{"from": "human", "value": f"Say{sep}this"}, {"from": "gpt", "value": "OK"}]
  out = tokenize_sample(conv, modality="text", tokenizer=t, template=template)
  assert (out["labels"] == IGN).all()


def test_video_placeholder_is_prepended_and_video_tag_renamed(tok):
  template, t = tok
  for value in ("What is it?", "<video>\nWhat is it?"):
    conv = [{"from": "human", "value": value}, {"from": "gpt", "value": "A cat."}]
    out = tokenize_sample(conv, modality="video", tokenizer=t, template=template, timestamps=[0.5, 1.5])
    ref = tokenize_sample(VIDEO_CONV, modality="video", tokenizer=t, template=template, timestamps=[0.5, 1.5])
    assert out["input_ids"].tolist() == ref["input_ids"].tolist()


# --------------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("conv, modality, reason", [
    ([], "text", "bad_text"),
    ([{"from": "human", "value": "   "}, {"from": "gpt", "value": "\n"}], "text", "bad_text"),
    ([{"from": "human", "value": b"\xff\xfe bad"}, {"from": "gpt", "value": "x"}], "text", "bad_text"),
    ([{"from": "human", "value": "bad \ud800"}, {"from": "gpt", "value": "x"}], "text", "bad_text"),
    ([{"from": "human", "value": None}, {"from": "gpt", "value": "x"}], "text", "bad_text"),
    ([{"from": "system", "value": "x"}], "text", "bad_conversation"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "text", "bad_conversation"),
    ([{"value": "no role"}], "text", "bad_conversation"),
    ([{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}], "video", "bad_conversation"),
    ([{"from": "human", "value": "<image><image><image>"}, {"from": "gpt", "value": "x"}], "image",
     "bad_conversation"),
])
def test_bad_conversations(tok, conv, modality, reason):
  template, t = tok
  with pytest.raises(BadSampleError) as info:
    tokenize_sample(conv, modality=modality, tokenizer=t, template=template, timestamps=[0.5, 1.5],
                    crops_per_image=[2, 2])
  assert info.value.reason == reason


def test_utf8_bytes_values_are_accepted(tok):
  template, t = tok
  conv = [{"from": "human", "value": "Hi".encode()}, {"from": "gpt", "value": "Hello!"}]
  text = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]
  a = tokenize_sample(conv, modality="text", tokenizer=t, template=template)
  b = tokenize_sample(text, modality="text", tokenizer=t, template=template)
  assert a["input_ids"].tolist() == b["input_ids"].tolist()


def test_unknown_modality_and_template(tok):
  template, t = tok
  with pytest.raises(ValueError, match="modality"):
    tokenize_sample(VIDEO_CONV, modality="audio", tokenizer=t, template=template)
  with pytest.raises(ValueError, match="template"):
    tokenize_sample(VIDEO_CONV, modality="text", tokenizer=t, template="vicuna")
