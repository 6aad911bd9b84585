"""Prompt text (SPEC §1.5), chat templates (§1.6), tokenization and label masking (§1.7).

Conversations are LLaVA style: `[{"from": "human"|"gpt", "value": str}, ...]`. `tokenize_sample` reproduces the
reference pipeline for one sample: placeholder expansion (`preprocess_multimodal_video` / `_image`), the chat
template (no system prompt), `tokenizer_image_token` (every text chunk between `<image>`s is tokenized on its own
and the chunks are joined with IMAGE_TOKEN_INDEX; Llama 3 keeps only the first chunk's `<|begin_of_text|>`), and
the round-based label masking of `preprocess_qwen_2` / `preprocess_llama_3`, including its quirk of masking the
whole sample when the summed round lengths disagree with the token count.
"""

import numpy as np

from data_pipeline.errors import BadSampleError
from data_pipeline.tokenizer import bos_token_id, canonical_template, pad_token_id
from qv_jax.batch import IGNORE_INDEX, IMAGE_TOKEN_INDEX

IMAGE = "<image>"
MODALITIES = ("video", "image", "text")

# (user role, assistant role, separator) of each template.
_TEMPLATES = {
    "qwen2": ("<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n"),
    "llama3": ("<|start_header_id|>user<|end_header_id|>\n\n",
               "<|start_header_id|>system<|end_header_id|>\n\n",  # sic: the reference's assistant header
               "<|eot_id|>"),
}


def _ts_str(t) -> str:
  """str() of the timestamp as the reference's Python float (float32 values are rounded back first)."""
  if isinstance(t, np.floating) and not isinstance(t, np.float64):
    t = round(float(t), 6)
  return str(float(t))


def video_placeholder(timestamps) -> str:
  """`<video_start><thumbnail_start><image><thumbnail_end>{ts_0}<image>…{ts_N-1}<image><video_end>`."""
  frames = "".join(_ts_str(t) + IMAGE for t in timestamps)
  return f"<video_start><thumbnail_start>{IMAGE}<thumbnail_end>{frames}<video_end>"


def image_placeholder(num_crops: int) -> str:
  """`<im_start>` + (`<patch_start><image><patch_end>` × num_crops) + `<im_end>`."""
  return "<im_start>" + f"<patch_start>{IMAGE}<patch_end>" * num_crops + "<im_end>"


def video_prompt(question: str, timestamps: list[float]) -> str:
  """The user text of a video question after `<image>` expansion (SPEC §1.5):
  `<video_start><thumbnail_start><image><thumbnail_end>{ts_0}<image>…<video_end>\\n{question}`."""
  return f"{IMAGE}\n{question}".strip().replace(IMAGE, video_placeholder(timestamps))


def image_prompt(text: str, crops_per_image: list[int]) -> str:
  """Strip `text` and replace its i-th `<image>` with `image_placeholder(crops_per_image[i])` (SPEC §1.5).
  `<image>`s beyond len(crops_per_image) are left as they are (as the reference does)."""
  text = text.strip()
  out, pos = [], 0
  for n in crops_per_image:
    at = text.find(IMAGE, pos)
    if at < 0:
      break
    out.append(text[pos:at] + image_placeholder(int(n)))
    pos = at + len(IMAGE)
  return "".join(out) + text[pos:]


def _turns(conversations: list[dict], source: str | None = None) -> list[tuple[str, str]]:
  """[(role "human"|"gpt", value)], validated: a leading gpt turn is dropped (as the reference does) and the
  rest must alternate human, gpt, human, ..."""
  if not isinstance(conversations, (list, tuple)) or not conversations:
    raise BadSampleError("bad_text", "conversation is empty", source)
  turns = []
  for i, turn in enumerate(conversations):
    if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
      raise BadSampleError("bad_conversation", f"turn {i} is not a {{'from', 'value'}} dict: {turn!r:.80}", source)
    role, value = turn["from"], turn["value"]
    if isinstance(value, (bytes, bytearray)):
      try:
        value = bytes(value).decode("utf-8")
      except UnicodeDecodeError:
        raise BadSampleError("bad_text", f"turn {i} is not valid UTF-8", source) from None
    if not isinstance(value, str):
      raise BadSampleError("bad_text", f"turn {i} value is {type(value).__name__}, expected str", source)
    try:
      value.encode("utf-8")
    except UnicodeEncodeError:
      raise BadSampleError("bad_text", f"turn {i} holds unpaired surrogates (not UTF-8)", source) from None
    if role not in ("human", "gpt"):
      raise BadSampleError("bad_conversation", f"turn {i} has role {role!r}; expected 'human' or 'gpt'", source)
    turns.append((role, value))
  if turns[0][0] != "human":
    turns = turns[1:]
  for i, (role, _) in enumerate(turns):
    if role != ("human", "gpt")[i % 2]:
      raise BadSampleError("bad_conversation", f"turns do not alternate human/gpt (turn {i} is {role!r})", source)
  if not turns or not any(v.strip() for _, v in turns):
    raise BadSampleError("bad_text", "conversation has no text", source)
  return turns


def render_conversation(conversations: list[dict], template: str) -> str:
  """The chat-template text of LLaVA-style turns (SPEC §1.6; no system prompt). An empty value renders only its
  role string, so ending with `{"from": "gpt", "value": ""}` gives the generation prompt."""
  user, assistant, sep = _TEMPLATES[canonical_template(template)]
  out = []
  for role, value in _turns(conversations):
    out.append((user if role == "human" else assistant) + (value + sep if value else ""))
  return "".join(out)


class _ChunkTokenizer:
  """`tokenizer_image_token`: chunks between `<image>`s tokenized independently, joined with -200."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.bos = bos_token_id(tokenizer)

  def encode_chunks(self, text: str) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """[(ids, offsets)] per chunk, the repeated BOS already removed from chunks after the first."""
    chunks = []
    for k, chunk in enumerate(text.split(IMAGE)):
      enc = self.tokenizer.encode(chunk)
      ids, offsets = list(enc.ids), list(enc.offsets)
      if k > 0 and self.bos is not None and ids and ids[0] == self.bos:
        ids, offsets = ids[1:], offsets[1:]
      chunks.append((ids, offsets))
    return chunks

  def ids(self, text: str, split_images: bool = True) -> list[int]:
    if not split_images:
      return list(self.tokenizer.encode(text).ids)
    out = []
    for k, (ids, _) in enumerate(self.encode_chunks(text)):
      if k:
        out.append(IMAGE_TOKEN_INDEX)
      out.extend(ids)
    return out


def _mask_labels(text: str, input_ids: list[int], template: str, chunker: _ChunkTokenizer, split_images: bool,
                 pad_id: int) -> list[int]:
  """The reference's round-based masking: only assistant answers plus their closing separator are supervised."""
  user, assistant, sep = _TEMPLATES[template]
  labels = list(input_ids)
  total_len = sum(1 for t in input_ids if t != pad_id)
  rounds = text.split(sep)
  re_rounds = [sep.join(rounds[:2])] + [sep.join(rounds[i:i + 2]) for i in range(2, len(rounds), 2)]
  split_at = sep + assistant
  sep_len = len(chunker.ids(sep, split_images=False))
  cur = 0
  for i, rou in enumerate(re_rounds):
    if rou == "":
      break
    parts = rou.split(split_at)
    if len(parts) != 2:
      break
    round_len = len(chunker.ids(rou, split_images))
    instruction_len = len(chunker.ids(parts[0] + split_at, split_images))
    if template == "llama3":
      if i > 0:  # every later round was tokenized with its own BOS
        round_len, instruction_len = round_len - 1, instruction_len - 1
      labels[cur:cur + instruction_len] = [IGNORE_INDEX] * len(labels[cur:cur + instruction_len])
      cur += round_len + 1 if len(re_rounds) > 1 else round_len
    else:
      labels[cur:cur + instruction_len] = [IGNORE_INDEX] * len(labels[cur:cur + instruction_len])
      cur += round_len + sep_len
  labels[cur:] = [IGNORE_INDEX] * len(labels[cur:])
  if cur != total_len:
    labels = [IGNORE_INDEX] * len(labels)
  return labels


def _count_images(turns, human_only: bool = False) -> int:
  return sum(v.count(IMAGE) for k, (r, v) in enumerate(turns) if not human_only or k % 2 == 0)


def expand_conversation(conversations: list[dict], *, modality: str, timestamps=None, crops_per_image=None,
                        source: str | None = None) -> list[dict]:
  """The turns after the reference's placeholder handling: videos get `<video>` -> `<image>`, a leading
  `<image>\\n` when the first turn has none, and the video placeholder string; images get `<image>`×n + `\\n`
  prepended when the human turns' count differs from the number of images, and per-image crop placeholders.
  Raises BadSampleError("bad_conversation") when placeholders cannot match the pixels."""
  turns = _turns(conversations, source)
  if modality == "video":
    if timestamps is None or len(timestamps) == 0:
      raise BadSampleError("bad_conversation", "video sample without timestamps", source)
    turns = [(r, v.replace("<video>", IMAGE)) for r, v in turns]
    if IMAGE not in turns[0][1]:
      turns[0] = (turns[0][0], f"{IMAGE}\n" + turns[0][1])
    if _count_images(turns) != 1:
      raise BadSampleError("bad_conversation", f"a video sample needs exactly one {IMAGE}, found "
                           f"{_count_images(turns)}", source)
    placeholder = video_placeholder(timestamps)
    turns = [(r, v.strip().replace(IMAGE, placeholder) if IMAGE in v else v) for r, v in turns]
  elif modality == "image":
    crops = [int(n) for n in (crops_per_image or [])]
    if not crops or min(crops) < 1:
      raise BadSampleError("bad_conversation", f"image sample needs crops_per_image >= 1, got {crops}", source)
    if _count_images(turns, human_only=True) != len(crops):
      turns[0] = (turns[0][0], IMAGE * len(crops) + "\n" + turns[0][1])
    if _count_images(turns) != len(crops):
      raise BadSampleError("bad_conversation", f"{_count_images(turns)} {IMAGE} placeholders for "
                           f"{len(crops)} images", source)
    out, used = [], 0
    for r, v in turns:
      n = v.count(IMAGE)
      if n:
        v = image_prompt(v, crops[used:used + n])
        used += n
      out.append((r, v))
    turns = out
  elif modality != "text":  # a text sample's literal "<image>" stays text, as in the reference
    raise ValueError(f"modality {modality!r}; expected one of {MODALITIES}")
  return [{"from": r, "value": v} for r, v in turns]


def _token_frames(text: str, chunker: _ChunkTokenizer, timestamps) -> list[int]:
  """token_frame of a video sample (qv_jax/batch.py): frame f on its placeholder (the (f+2)-th `<image>`) and on
  the `{ts_f}` tokens just before it; -1 elsewhere. Chunk c (1 <= c <= N) ends with `{ts_(c-1)}`."""
  out = []
  chunks = chunker.encode_chunks(text)
  num_frames = len(timestamps)
  pieces = text.split(IMAGE)
  for c, (ids, offsets) in enumerate(chunks):
    if c:
      out.append(c - 2 if c >= 2 else -1)  # placeholder c-1: the thumbnail (c=1) or frame c-2
    if 1 <= c <= num_frames:
      start = len(pieces[c]) - len(_ts_str(timestamps[c - 1]))
      out.extend(c - 1 if (e > s and s >= start) else -1 for s, e in offsets)
    else:
      out.extend([-1] * len(ids))
  return out


def tokenize_sample(conversations: list[dict], *, modality: str, tokenizer, template: str,
                    timestamps: list[float] | None = None, crops_per_image: list[int] | None = None,
                    source: str | None = None) -> dict[str, np.ndarray]:
  """Unpadded int32 `input_ids`, `labels`, `token_frame` (qv_jax/batch.py) of one sample (SPEC §1.4-§1.7).

  modality "video" needs `timestamps` (one per frame), "image" needs `crops_per_image` (1 + anyres crops per
  image), "text" gets the trailing dummy `<image>` (label -100) the reference appends. Placeholders are
  IMAGE_TOKEN_INDEX; labels supervise each assistant answer plus its closing `<|im_end|>\\n` (qwen2) or
  `<|eot_id|>` (llama3). Raises BadSampleError("bad_text" | "bad_conversation")."""
  template = canonical_template(template)
  turns = expand_conversation(conversations, modality=modality, timestamps=timestamps,
                              crops_per_image=crops_per_image, source=source)
  text = render_conversation(turns, template)
  chunker = _ChunkTokenizer(tokenizer)
  split_images = modality != "text"
  input_ids = chunker.ids(text, split_images)
  if len(input_ids) == 0:
    raise BadSampleError("bad_text", "conversation tokenizes to nothing", source)
  labels = _mask_labels(text, input_ids, template, chunker, split_images, pad_token_id(tokenizer))
  if modality == "video":
    token_frame = _token_frames(text, chunker, timestamps)
    if input_ids.count(IMAGE_TOKEN_INDEX) != len(timestamps) + 1:
      raise BadSampleError("bad_conversation", f"{input_ids.count(IMAGE_TOKEN_INDEX)} placeholders for "
                           f"{len(timestamps)} frames + thumbnail", source)
  else:
    token_frame = [-1] * len(input_ids)
  if modality == "text":
    input_ids, labels, token_frame = input_ids + [IMAGE_TOKEN_INDEX], labels + [IGNORE_INDEX], token_frame + [-1]
  return {
      "input_ids": np.asarray(input_ids, np.int32),
      "labels": np.asarray(labels, np.int32),
      "token_frame": np.asarray(token_frame, np.int32),
  }
