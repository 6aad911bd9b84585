"""Local tokenizers (`tokenizers` library, never downloaded) with the 8 Quicksviewer special tokens (SPEC §1.4).

A tokenizer here is a `tokenizers.Tokenizer` loaded from a tokenizer.json (the fast-tokenizer file that ships
with every Qwen2.5 / Llama-3.1 checkpoint). `Tokenizer.encode(text).ids` equals the reference's
`tokenizer(text).input_ids`: Qwen2 adds nothing, Llama 3's post-processor prepends `<|begin_of_text|>`.
"""

import os
from typing import Iterable

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers

from qv_jax.batch import SPECIAL_TOKENS

TEMPLATE_ALIASES = {"qwen2": "qwen2", "llama3": "llama3", "llama_3_chat": "llama3", "llama_3": "llama3"}

ROLE_TOKENS = {
    "qwen2": ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    "llama3": ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
               "<|eot_id|>"),
}
LLAMA3_PAD = "[PAD]"

# The pre-tokenizer split patterns of Qwen2 (one digit per token) and Llama 3 (up to 3 digits per token).
_SPLIT = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def canonical_template(template: str) -> str:
  """"qwen2" | "llama3" (also accepts the reference's name "llama_3_chat")."""
  try:
    return TEMPLATE_ALIASES[template]
  except KeyError:
    raise ValueError(f"unknown chat template {template!r}; expected one of {sorted(TEMPLATE_ALIASES)}") from None


def _special(token: str) -> AddedToken:
  return AddedToken(token, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)


def load_tokenizer(path: str, template: str | None = None) -> tokenizers.Tokenizer:
  """Load a local tokenizer.json (or a directory holding one) and add, if absent and in this order, `[PAD]`
  (Llama 3 only: the template is "llama3", or the vocabulary has `<|begin_of_text|>`) and the 8 special tokens,
  so ids match the reference (Qwen2.5: 151665..151672; Llama 3.1: [PAD] 128256, then 128257..128264)."""
  path = os.fspath(path)
  file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise FileNotFoundError(f"tokenizer: no tokenizer.json at {path!r} (tokenizers are never downloaded; "
                            "point data.tokenizer_path at a local tokenizer.json)")
  tok = tokenizers.Tokenizer.from_file(file)
  llama3 = (canonical_template(template) == "llama3" if template
            else tok.token_to_id("<|begin_of_text|>") is not None)
  if llama3 and tok.token_to_id(LLAMA3_PAD) is None:
    tok.add_special_tokens([_special(LLAMA3_PAD)])
  for name in SPECIAL_TOKENS:
    if tok.token_to_id(name) is None:
      tok.add_special_tokens([_special(name)])
  return tok


def special_token_ids(tokenizer) -> dict[str, int]:
  """{"<patch_start>": id, ...} for the 8 special tokens of qv_jax.batch.SPECIAL_TOKENS, in order."""
  out = {}
  for name in SPECIAL_TOKENS:
    idx = tokenizer.token_to_id(name)
    if idx is None:
      raise ValueError(f"tokenizer lacks special token {name!r}; load it with data_pipeline.tokenizer.load_tokenizer")
    out[name] = idx
  return out


def pad_token_id(tokenizer) -> int:
  """`[PAD]` if the vocabulary has it (Llama 3), else `<|endoftext|>` (Qwen2's pad token)."""
  for name in (LLAMA3_PAD, "<|endoftext|>"):
    idx = tokenizer.token_to_id(name)
    if idx is not None:
      return idx
  raise ValueError("tokenizer has neither [PAD] nor <|endoftext|>; cannot pick a pad id")


def eos_token_id(tokenizer) -> int:
  """The end-of-turn id generation stops at: `<|im_end|>` (Qwen2) or `<|eot_id|>` (Llama 3)."""
  for name in ("<|im_end|>", "<|eot_id|>"):
    idx = tokenizer.token_to_id(name)
    if idx is not None:
      return idx
  raise ValueError("tokenizer has neither <|im_end|> nor <|eot_id|>")


def bos_token_id(tokenizer) -> int | None:
  """The id the tokenizer prepends to every encoded text (Llama 3's <|begin_of_text|>), or None (Qwen2)."""
  ids = tokenizer.encode("").ids
  return ids[0] if ids else None


def build_tiny_tokenizer(texts: Iterable[str], path: str, template: str = "qwen2", vocab_size: int = 512) -> str:
  """Train a small byte-level BPE on `texts` with the template's pre-tokenizer (Qwen2: one digit per token;
  Llama 3: up to 3), its role tokens after the learned vocabulary (plus `[PAD]` for Llama 3, whose
  post-processor also prepends `<|begin_of_text|>`), then the 8 special tokens. Writes tokenizer.json at `path`
  (a file, or a directory to put it in) and returns the file path. For tests and the CPU demo."""
  template = canonical_template(template)
  tok = tokenizers.Tokenizer(models.BPE())
  tok.normalizer = tokenizers.normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(_SPLIT[template]), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(list(texts), trainer=trainer)
  roles = ROLE_TOKENS[template] + ((LLAMA3_PAD,) if template == "llama3" else ())
  tok.add_special_tokens([_special(t) for t in roles + tuple(SPECIAL_TOKENS)])
  if template == "llama3":
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.token_to_id(bos))])
  else:
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
  path = os.fspath(path)
  file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
  os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
  tok.save(file)
  return file
