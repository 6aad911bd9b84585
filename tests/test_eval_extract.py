"""Answer extraction: hand-written model outputs -> letter, for the reference's rule (quirks included) and
the standard rule."""

import pytest

from qv_jax.infer.eval.extract import REFERENCE_PREFIXES, extract_reference, extract_standard

OPTIONS = ("a red car", "a blue bus", "two dogs", "nothing")

# output, reference rule, standard rule (4 options)
TABLE = [
  ("B", "B", "B"),
  ("  (C) two dogs  ", "C", "C"),
  ("D. nothing", "D", "D"),
  ("The answer is C.", "C", "C"),
  ("The best answer is D", "D", "D"),
  ("Answer: B", "B", "B"),
  ("I think the answer is B.", "I", "B"),                 # the reference takes the pronoun
  ("It is option C", "I", "C"),
  ("Best option: C", "B", "C"),                          # "Best answer:Best option:" is one prefix: "B" of "Best"
  ("Best answer: D", "B", "D"),
  ("The correct option is D", "D", "D"),                 # glued to "The best option is": not removed, no A-J in it
  ("The best option isThe correct option is C", "C", "C"),  # the glued prefix itself is removed
  ("A man is walking, so (C).", "A", "C"),               # article "A"
  ("Every option mentions a car but the correct one is B", "E", "B"),
  ("two dogs", "", "C"),                                 # the standard rule falls back to the option text
  ("the model could not determine which of these options is right here", "", ""),  # > 10 words, no capital
  ("H", "H", ""),                                        # not one of the 4 options
  ("", "", ""),
  ("J is the answer", "J", ""),
  ("K", "", ""),
]


@pytest.mark.parametrize("text,reference,standard", TABLE)
def test_extraction_table(text, reference, standard):
  assert extract_reference(text) == reference
  assert extract_standard(text, OPTIONS) == standard


def test_reference_prefix_list_has_the_missing_commas():
  assert len(REFERENCE_PREFIXES) == 7
  assert "The best option isThe correct option is" in REFERENCE_PREFIXES
  assert "Best answer:Best option:" in REFERENCE_PREFIXES


def test_reference_long_answer_rule_only_without_capitals():
  long_with_letter = "after watching the whole clip carefully I would say that the second one fits"
  assert extract_reference(long_with_letter) == "I"
  assert extract_reference("the answer is b") == ""


def test_reference_maximum_bounds_the_letters():
  assert extract_reference("Fish", maximum=5) == ""
  assert extract_reference("Fish") == "F"


def test_standard_uses_only_this_items_letters():
  assert extract_standard("E", ["x", "y", "z", "w", "v"]) == "E"
  assert extract_standard("E", ["x", "y"]) == ""
  assert extract_standard("B", []) == ""
