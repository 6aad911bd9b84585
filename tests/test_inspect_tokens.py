"""`data_pipeline.inspect_video --tokenizer` counts the tokens of exactly the prompt it prints."""

import json

import pytest

from data_pipeline import inspect_video
from data_pipeline.tokenizer import bos_token_id, build_tiny_tokenizer, load_tokenizer
from videos import write_video


def _prompt_tokens(prompt: str, tokenizer) -> int:
  """tokenizer_image_token's count: chunks between `<image>`s on their own, a repeated BOS dropped, 1 per image."""
  bos = bos_token_id(tokenizer)
  total = 0
  for k, chunk in enumerate(prompt.split("<image>")):
    ids = tokenizer.encode(chunk).ids
    if k:
      total += 1 + len(ids) - (1 if ids and ids[0] == bos else 0)
    else:
      total += len(ids)
  return total


@pytest.mark.parametrize("template,ending", [("qwen2", "<|im_start|>assistant\n"),
                                             ("llama3", "<|start_header_id|>system<|end_header_id|>\n\n")])
def test_num_tokens_include_the_generation_prompt(tmp_path, capsys, template, ending):
  video = write_video(tmp_path / "v.mp4", num_frames=90, rate=30)
  tok = build_tiny_tokenizer(["Describe the video.", "at 1.5 s"], tmp_path / "tok.json", template=template,
                             vocab_size=300)
  assert inspect_video.main([video, "--tokenizer", tok, "--template", template, "--num-frames", "0"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["prompt"].endswith(ending)
  assert out["num_placeholders"] == len(out["timestamps"]) + 1 == 4
  assert out["num_tokens"] == _prompt_tokens(out["prompt"], load_tokenizer(tok, template))
