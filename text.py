"""Text normalization and matching for grounded QA: one definition of each, shared by data, rewards and eval.

    normalize_answer     SQuAD / ALCE normalization (lower case, punctuation and articles removed)
    remove_citations     drop "[n]" markers; parse_citations reads them
    split_statements     an answer's statements: sentences, or comma items for list questions
    contains_words       whole-word containment (the training reward, data.fill_answers_found)
    contains_substring   substring containment (the Trust-Score evaluator, eval.py)
    partial_ratio(_in)   a fuzzy partial ratio written with difflib (fuzzywuzzy's idea)
    refusal_score        the reward's refusal score (directional: the refusal sentence inside the answer)
    is_refused           the evaluator's refusal rule (symmetric partial ratio against REFUSAL_FLAG)

Everything here is a plain function of strings. What a match earns is left to rewards.py, what it scores to
eval.py, and the records and prompts (which quote REFUSAL_SENTENCE) to data.py.
"""

import re
import string
import unicodedata
from difflib import SequenceMatcher

REFUSAL_SENTENCE = "I apologize, but I couldn't find an answer to your question in the search results."
# The evaluator's refusal flag is the first half of the refusal sentence.
REFUSAL_FLAG = "I apologize, but I couldn't find an answer"
REFUSAL_THRESHOLD = 0.85  # the Trust-Score evaluator calls an answer a refusal above 85 (on a 0-100 scale)


# ----------------------------------------------------------------------------------------------------------------
# Normalization, citations, statements


def normalize_answer(s: str) -> str:
    """SQuAD / ALCE normalization: lower case, punctuation removed, articles (a, an, the) removed, whitespace
    collapsed. Punctuation = ASCII punctuation plus any Unicode punctuation (curly quotes, dashes), so that
    "Bloomberg’s" and "Bloomberg's" normalize alike."""
    s = s.lower()
    s = "".join(ch for ch in s if not is_punctuation(ch))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def is_punctuation(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


_CITATION_RE = re.compile(r"\[(\d+)\]")


def remove_citations(text: str) -> str:
    """Drop `[n]` markers and the whitespace before them: "Paris [1][2]." -> "Paris."."""
    return re.sub(r"\s*\[\d+\]", "", text)


def parse_citations(statement: str) -> list[int]:
    """Citation numbers as written (1-based), in order of first appearance, duplicates dropped."""
    seen = []
    for m in _CITATION_RE.finditer(statement):
        n = int(m.group(1))
        if n not in seen:
            seen.append(n)
    return seen


# A sentence ends at . ! or ?, optionally followed by citations and more end punctuation ("... 1783 [3]." or
# "... 1783. [3]" or "632 A.D. [1][2]."), then whitespace or the end of the text. "12.5" does not end a sentence
# (no whitespace after the period); an abbreviation before a space ("Dr. Kim") does: a rule-based splitter's limit.
_SENTENCE_END_RE = re.compile(r"[.!?]+(?:\s*\[\d+\])*[.!?]*(?=\s|$)")


def split_statements(answer: str, is_list: bool) -> list[str]:
    """Statements of an answer: comma-separated items for list questions (QAMPARI), else sentences.
    Empty statements are dropped; citations stay attached to their statement."""
    if is_list:
        pieces = answer.split(",")
    else:
        pieces, start = [], 0
        for m in _SENTENCE_END_RE.finditer(answer):
            pieces.append(answer[start : m.end()])
            start = m.end()
        pieces.append(answer[start:])
    return [p.strip() for p in pieces if p.strip()]


# ----------------------------------------------------------------------------------------------------------------
# Containment of a gold answer in a text (both arguments already normalized)

# rewards.py and data.fill_answers_found use contains_words (stricter than eval on purpose: the reward must not be
# gameable); eval.py uses contains_substring, the Trust-Score evaluator's definition, which its metric reproduces.


def contains_words(text_norm: str, phrase_norm: str) -> bool:
    """Whole-word containment of one normalized string in another, so that a gold "12" does not match "1200" and a
    string of digits cannot collect every number answer. A phrase ending in a letter may be followed by "s"
    (possessive or plural once punctuation is gone: "bloombergs" contains "bloomberg")."""
    if not phrase_norm:
        return False
    plural = "s?" if phrase_norm[-1].isalpha() else ""
    return re.search(rf"(?<!\S){re.escape(phrase_norm)}{plural}(?!\S)", text_norm) is not None


def contains_substring(text_norm: str, phrase_norm: str) -> bool:
    """Substring containment, as in the Trust-Score evaluator; an empty phrase matches nothing (it would match
    everything)."""
    return bool(phrase_norm) and phrase_norm in text_norm


# ----------------------------------------------------------------------------------------------------------------
# Refusal: a fuzzy partial ratio written with difflib (same idea as fuzzywuzzy's partial_ratio)


def _ratio(a: str, b: str) -> float:
    """difflib similarity 2*M / (len(a) + len(b)), M = matched characters."""
    return SequenceMatcher(None, a, b, autojunk=False).ratio()


def partial_ratio_in(needle: str, haystack: str) -> float:
    """Best similarity between `needle` and a window of `haystack` of the needle's length, in [0, 1].

    As in fuzzywuzzy: the candidate windows start where difflib's matching blocks align the needle with the
    haystack; 1.0 when the needle occurs verbatim. If the haystack is shorter than the needle, it is compared whole
    (plain ratio), so a short fragment of the needle scores low."""
    if not needle or not haystack:
        return 0.0
    if len(haystack) <= len(needle):
        return _ratio(needle, haystack)
    if needle in haystack:
        return 1.0
    best = 0.0
    blocks = SequenceMatcher(None, needle, haystack, autojunk=False).get_matching_blocks()
    for i, j, _ in blocks:
        start = max(0, j - i)
        best = max(best, _ratio(needle, haystack[start : start + len(needle)]))
    return best


def partial_ratio(a: str, b: str) -> float:
    """Symmetric partial ratio in [0, 1]: the shorter string searched in the longer one (fuzzywuzzy semantics,
    which the Trust-Score evaluator uses). Note: a short fragment such as "i" scores 1.0 against any text that
    contains it; `refusal_score` therefore uses the directional `partial_ratio_in`."""
    if (len(a), a) > (len(b), b):  # the shorter (ties: a fixed order, so the result is symmetric)
        a, b = b, a
    if not a:
        return 0.0
    return partial_ratio_in(a, b)


_REFUSAL_NORM = normalize_answer(REFUSAL_SENTENCE)
_REFUSAL_FLAG_NORM = normalize_answer(REFUSAL_FLAG)


def refusal_score(answer: str | None) -> float:
    """The reward's rscore in [0, 1]: how well the normalized refusal sentence occurs inside the normalized answer
    (a refusal when above REFUSAL_THRESHOLD).

    Directional on purpose (the refusal sentence is always the needle): with the symmetric ratio an answer "I" or
    "apologize" would be a perfect refusal and RL would find that shortcut at once."""
    if not answer:
        return 0.0
    return partial_ratio_in(_REFUSAL_NORM, normalize_answer(remove_citations(answer)))


def is_refused(answer: str) -> bool:
    """The evaluator's refusal rule: fuzzy partial ratio of the normalized flag inside the normalized answer > 85.

    partial_ratio searches the shorter string in the longer one (fuzzywuzzy's semantics, which the evaluator
    uses), so an answer that is a fragment of the flag ("I couldn't find an answer.", or just "find") is a refusal
    here, unlike in refusal_score, which looks for the whole refusal sentence."""
    return partial_ratio(_REFUSAL_FLAG_NORM, normalize_answer(answer)) > REFUSAL_THRESHOLD
