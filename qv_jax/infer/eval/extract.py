"""Answer extraction: a model's free-form output -> one option letter ("" when none is found).

`extract_reference` is the reference's `extract_characters_regex` (SPEC §10), quirks included: its prefix
list lacks two commas, so "The best option isThe correct option is" and "Best answer:Best option:" are single
(never matching) prefixes; any capital A-J counts, so "I think it is B" gives "I". `extract_standard` is the
rule the standard metrics use: only this item's option letters, standing alone, with the article "A" and the
pronoun "I" ignored, falling back to the text of an option.
"""

import re
from collections.abc import Sequence

REFERENCE_PREFIXES = (
  "The best answer is",
  "The correct answer is",
  "The answer is",
  "The answer",
  "The best option is" "The correct option is",
  "Best answer:" "Best option:",
  "Answer:",
)
STANDARD_PREFIXES = (
  "The best answer is", "The correct answer is", "The answer is", "The best option is",
  "The correct option is", "The correct choice is", "Best answer:", "Best option:", "Answer:", "The answer",
)


def extract_reference(text: str, maximum: int = 10) -> str:
  """The reference rule: strip, delete each prefix (substring replace), then "" if more than 10 words and no
  letter, else the first of the first `maximum` capital letters anywhere."""
  s = text.strip()
  for prefix in REFERENCE_PREFIXES:
    s = s.replace(prefix, "")
  letters = "[" + "".join(chr(ord("A") + i) for i in range(maximum)) + "]"
  found = re.search(letters, s)
  if len(s.split()) > 10 and not found:
    return ""
  return found[0] if found else ""


def option_letters(num_options: int) -> str:
  return "".join(chr(ord("A") + i) for i in range(num_options))


def _normalise(s: str) -> str:
  return re.sub(r"[\s.,;:!?\"'()]+", " ", s).strip().lower()


def extract_standard(text: str, options: Sequence[str]) -> str:
  """The first standalone option letter of `text` for a question with these option texts (no "A. " labels).

  In order: a leading "X", "(X)", "X." / "X)" / "X:"; the first "(X)"; the first standalone X that is not
  the article "A" / pronoun "I" (a capital followed by a space and a lowercase word); the option whose text
  the answer equals or starts with (case and punctuation ignored)."""
  letters = option_letters(len(options))
  if not letters:
    return ""
  s = text.strip()
  for prefix in STANDARD_PREFIXES:
    if s.lower().startswith(prefix.lower()):
      s = s[len(prefix):].strip()
      break
  s = s.lstrip("*# ").strip()
  cls = f"[{letters}]"
  lead = re.match(rf"\(?({cls})\)?(?=$|[\s.,:;)!*\]])", s)
  if lead and not re.match(r"[AI] [a-z]", s):
    return lead[1]
  paren = re.search(rf"\(({cls})\)", s)
  if paren:
    return paren[1]
  for m in re.finditer(rf"(?<![A-Za-z0-9'])({cls})(?![A-Za-z0-9'])", s):
    if m[1] in "AI" and re.match(r" [a-z]", s[m.end():m.end() + 2]):
      continue
    return m[1]
  norm = _normalise(s)
  if norm:
    for i, option in enumerate(options):
      o = _normalise(option)
      if o and (norm == o or norm.startswith(o + " ")):
        return letters[i]
  return ""
