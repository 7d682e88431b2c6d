"""rewards.py (and the text.py functions it uses) against hand-computed values (docs/METHOD.md, "The rewards" and
Algorithm 1).

Every expected number below was worked out by hand from the spec; the comment next to it says how. Shorthand:
tag = R_tag_count, fmt = R_format, em = R_EM, cit = R_citation, ref = R_refusal. A well-formed completion earns
tag + fmt = 1 + 1 = 2 before the answer is looked at.
"""

import json
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rewards as R  # noqa: E402
import text as T  # noqa: E402
from data import Record  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFUSAL = "I apologize, but I couldn't find an answer to your question in the search results."
# normalize(REFUSAL) by hand: lower case, "," "'" "." removed, articles "an" and "the" removed.
REFUSAL_NORM = "i apologize but i couldnt find answer to your question in search results"
L = len(REFUSAL_NORM)  # 72 characters


def rec(question, answers, docs, answerable, is_list=False, source="synthetic"):
    return Record(
        id="t",
        question=question,
        answers=answers,
        docs=docs,
        answerable=answerable,
        source=source,
        is_list=is_list,
    )


def doc(title, text, found=None):
    return {"title": title, "text": text, "answers_found": found}


# A: one gold group, found only in document 2.
A = rec(
    "What is the height of Mount Kel?",
    [["4120"]],
    [
        doc("Lake Oru", "Lake Oru has a depth of 35 meters.", [0]),
        doc("Mount Kel", "Mount Kel has a height of 4120 meters.", [1]),
        doc("Mount Dar", "Mount Dar has a height of 2200 meters.", [0]),
    ],
    answerable=True,
)
# U: A with the evidence removed (answers_found all 0).
U = rec(
    "What is the height of Mount Kel?",
    [["4120"]],
    [
        doc("Lake Oru", "Lake Oru has a depth of 35 meters.", [0]),
        doc("Lake Sim", "Lake Sim has a depth of 90 meters.", [0]),
        doc("Mount Dar", "Mount Dar has a height of 2200 meters.", [0]),
    ],
    answerable=False,
)
# LST: a list question with three gold groups; Cole River is gold but in no document.
LST = rec(
    "Which rivers flow into Lake Oru?",
    [["Arle River", "Arle"], ["Brisk River"], ["Cole River"]],
    [
        doc("Arle River", "The Arle River flows into Lake Oru.", [1, 0, 0]),
        doc("Brisk River", "The Brisk River flows into Lake Oru.", [0, 1, 0]),
        doc("Dove River", "The Dove River flows into Lake Mira.", [0, 0, 0]),
    ],
    answerable=True,
    is_list=True,
)
# M: two gold groups and no answers_found: support falls back to substring match in title + text.
M = rec(
    "Who scored the most goals?",
    [["Josef Bican", "Bican"], ["Ali Daei"]],
    [doc("Josef Bican", "Bican scored 805 goals."), doc("Ali Daei", "Ali Daei scored 109 goals for Iran.")],
    answerable=True,
)
# N: the gold answer is "1", which a citation "[1]" must never match.
N = rec(
    "How many moons does Zed have?",
    [["1", "one"]],
    [doc("Zed", "Zed has 1 moon.", [1]), doc("Kor", "Kor has 4 moons.", [0])],
    answerable=True,
)

# UNI: a list question whose gold alias contains a comma (5 of QAMPARI dev's 750 aliases do).
UNI = rec(
    "Where did X study?",
    [["University of California, Berkeley"], ["Yale Law School", "Yale"]],
    [
        doc("X", "X studied at the University of California, Berkeley.", [1, 0]),
        doc("X", "X went to Yale Law School.", [0, 1]),
    ],
    answerable=True,
    is_list=True,
)


def wrap(answer, think="reasoning"):
    return f"<think>{think}</think><answer>{answer}</answer>"


# (name, completion, record, stage, expected total, expected contribution components) -- all by hand.
CASES = [
    # 1. Right number, right citation: 2 + em 0.5 + cit 0.5 = 3.0.
    (
        "cited correct, stage 1",
        wrap("Mount Kel has a height of 4120 meters [2]."),
        A,
        1,
        3.0,
        dict(tag_count=1, format=1, em=0.5, citation=0.5, refusal=0),
    ),
    # 2. Same in stage 2: answering an answerable question adds ref 0.5 -> 3.5.
    (
        "cited correct, stage 2",
        wrap("Mount Kel has a height of 4120 meters [2]."),
        A,
        2,
        3.5,
        dict(tag_count=1, format=1, em=0.5, citation=0.5, refusal=0.5),
    ),
    # 3. Blocks in the wrong order: all four tags once (tag 1.0) but fmt 0, so nothing else: 1.0.
    (
        "answer before think",
        "<answer>4120 [2]</answer><think>x</think>",
        A,
        1,
        1.0,
        dict(tag_count=1, format=0, em=0, citation=0, refusal=0),
    ),
    # 4. No tags at all: 0.
    (
        "no tags",
        "Mount Kel is 4120 meters high [2].",
        A,
        2,
        0.0,
        dict(tag_count=0, format=0, em=0, citation=0, refusal=0),
    ),
    # 5. </think> missing: 3 of 4 tags once -> 0.75, fmt 0.
    (
        "missing </think>",
        "<think>x <answer>4120 [2].</answer>",
        A,
        1,
        0.75,
        dict(tag_count=0.75, format=0, em=0, citation=0, refusal=0),
    ),
    # 6. Two think blocks: <think> and </think> occur twice -> only 2 of 4 tags once -> 0.5, fmt 0.
    (
        "duplicated think block",
        "<think>a</think><think>b</think><answer>4120 [2].</answer>",
        A,
        1,
        0.5,
        dict(tag_count=0.5, format=0, em=0, citation=0, refusal=0),
    ),
    # 7. Text after </answer> breaks the strict format: tag 1.0 only.
    (
        "trailing commentary",
        wrap("4120 [2].") + " Hope this helps!",
        A,
        1,
        1.0,
        dict(tag_count=1, format=0, em=0, citation=0, refusal=0),
    ),
    # 8. Whitespace around and between the blocks is allowed: same as case 1, 3.0.
    (
        "surrounding whitespace",
        "  <think>a</think>\n\n<answer>4120 [2].</answer>\n",
        A,
        1,
        3.0,
        dict(tag_count=1, format=1, em=0.5, citation=0.5, refusal=0),
    ),
    # 9. A tag inside the think block: <answer> twice -> tag 0.75, fmt 0.
    (
        "nested tag",
        "<think>I will write <answer> later</think><answer>4120 [2].</answer>",
        A,
        1,
        0.75,
        dict(tag_count=0.75, format=0, em=0, citation=0, refusal=0),
    ),
    # 10. Refusal on an answerable question (stage 2): refused, so no ref/em/cit: 2.0.
    (
        "refusal on answerable",
        wrap(REFUSAL),
        A,
        2,
        2.0,
        dict(tag_count=1, format=1, em=0, citation=0, refusal=0),
    ),
    # 11. Correct refusal (stage 2): rscore = 1 (verbatim): 2 + 1 = 3.0.
    (
        "correct refusal, stage 2",
        wrap(REFUSAL),
        U,
        2,
        3.0,
        dict(tag_count=1, format=1, em=0, citation=0, refusal=1.0),
    ),
    # 12. Correct refusal in stage 1: no refusal reward in stage 1: 2.0.
    (
        "correct refusal, stage 1",
        wrap(REFUSAL),
        U,
        1,
        2.0,
        dict(tag_count=1, format=1, em=0, citation=0, refusal=0),
    ),
    # 13. Refusal with extra text: the refusal sentence is inside the answer verbatim, rscore 1 -> 3.0.
    (
        "refusal with extra text",
        wrap(REFUSAL + " Mount Dar is 2200 meters high [3]."),
        U,
        2,
        3.0,
        dict(tag_count=1, format=1, em=0, citation=0, refusal=1.0),
    ),
    # 14. Refusal with one letter changed ("apologise"): answer and refusal have the same normalized length L, so
    # rscore = plain ratio = 2 * (L - 1) / (2L) = 71/72 > 0.85 -> refused; 2 + 71/72.
    (
        "refusal with a typo",
        wrap(REFUSAL.replace("apologize", "apologise")),
        U,
        2,
        2 + (L - 1) / L,
        dict(tag_count=1, format=1, em=0, citation=0, refusal=(L - 1) / L),
    ),
    # 15. A fragment "I apologize." is not a refusal: normalized "i apologize" (11 chars) is a prefix of the
    # refusal, ratio = 2*11/(72+11) = 0.265 < 0.85. It counts as an answer: on U nothing (2.0) ...
    (
        "refusal fragment on unanswerable",
        wrap("I apologize."),
        U,
        2,
        2.0,
        dict(tag_count=1, format=1, em=0, citation=0, refusal=0),
    ),
    # 16. ... and on A it is an answered answerable question: ref 0.5, no EM: 2.5.
    (
        "refusal fragment on answerable",
        wrap("I apologize."),
        A,
        2,
        2.5,
        dict(tag_count=1, format=1, em=0, citation=0, refusal=0.5),
    ),
    # 17. Citation out of range ([7] with 3 documents): EM 0.5, unsupported -0.5: 2.0.
    (
        "citation out of range",
        wrap("Mount Kel is 4120 meters high [7]."),
        A,
        1,
        2.0,
        dict(tag_count=1, format=1, em=0.5, citation=-0.5, refusal=0),
    ),
    # 18. [0] is out of range too (citations are 1-based): 2.0.
    (
        "citation zero",
        wrap("Mount Kel is 4120 meters high [0]."),
        A,
        1,
        2.0,
        dict(tag_count=1, format=1, em=0.5, citation=-0.5, refusal=0),
    ),
    # 19. Cites the wrong document (doc 1 has answers_found 0): em 0.5, cit -0.5: 2.0.
    (
        "unsupported citation",
        wrap("Mount Kel is 4120 meters high [1]."),
        A,
        1,
        2.0,
        dict(tag_count=1, format=1, em=0.5, citation=-0.5, refusal=0),
    ),
    # 20. One wrong and one right citation: one cited document contains the answer -> supported: 3.0.
    (
        "one of two citations supports",
        wrap("Mount Kel is 4120 meters high [1][2]."),
        A,
        1,
        3.0,
        dict(tag_count=1, format=1, em=0.5, citation=0.5, refusal=0),
    ),
    # 21. Correct but uncited: em 0.5, cit 0: 2.5.
    (
        "uncited correct",
        wrap("Mount Kel is 4120 meters high."),
        A,
        1,
        2.5,
        dict(tag_count=1, format=1, em=0.5, citation=0, refusal=0),
    ),
    # 22. The same answer five times: the gold group is credited once: em 0.5, cit 0.5: 3.0.
    (
        "repeated five times",
        wrap("4120 [2]. 4120 [2]. 4120 [2]. 4120 [2]. 4120 [2]."),
        A,
        1,
        3.0,
        dict(tag_count=1, format=1, em=0.5, citation=0.5, refusal=0),
    ),
    # 23. Wrong number: no EM, so its citation is not scored; stage 2 still pays 0.5 for answering: 2.5.
    (
        "wrong answer, stage 2",
        wrap("Mount Kel is 2200 meters high [3]."),
        A,
        2,
        2.5,
        dict(tag_count=1, format=1, em=0, citation=0, refusal=0.5),
    ),
    # 24. "41200" contains "4120" only as characters, not as a word: no EM: 2.0.
    (
        "number inside a longer number",
        wrap("It is 41200 meters [2]."),
        A,
        1,
        2.0,
        dict(tag_count=1, format=1, em=0, citation=0, refusal=0),
    ),
    # 25. Upper case and a thousands comma normalize away ("4,120" -> "4120"): em 0.5 + cit 0.5: 3.0.
    (
        "normalization",
        wrap("THE HEIGHT IS 4,120 METERS [2]!"),
        A,
        1,
        3.0,
        dict(tag_count=1, format=1, em=0.5, citation=0.5, refusal=0),
    ),
    # 26. Answering an unanswerable question in stage 2: no refusal, no EM (unanswerable branch): 2.0.
    (
        "answer on unanswerable",
        wrap("Mount Kel is 4120 meters high [2]."),
        U,
        2,
        2.0,
        dict(tag_count=1, format=1, em=0, citation=0, refusal=0),
    ),
    # 27. Empty answer block: neither a refusal nor an answer: 2.0 on A in stage 2 (no 0.5 for answering) ...
    (
        "empty answer, answerable",
        "<think>x</think><answer></answer>",
        A,
        2,
        2.0,
        dict(tag_count=1, format=1, em=0, citation=0, refusal=0),
    ),
    # 28. ... and 2.0 on U (rscore of an empty answer is 0).
    (
        "empty answer, unanswerable",
        "<think>x</think><answer> </answer>",
        U,
        2,
        2.0,
        dict(tag_count=1, format=1, em=0, citation=0, refusal=0),
    ),
    # 29. List: Arle [1] (doc 1 flag 1) and Brisk [2] (doc 2 flag 1) supported, Dove is not gold:
    # em 2*0.5 + cit 2*0.5 = 2 -> 4.0 in stage 1.
    (
        "list, all supported",
        wrap("Arle River [1], Brisk River [2], Dove River [3]"),
        LST,
        1,
        4.0,
        dict(tag_count=1, format=1, em=1.0, citation=1.0, refusal=0),
    ),
    # 30. List, stage 2: 4.0 + 0.5 = 4.5.
    (
        "list, stage 2",
        wrap("Arle River [1], Brisk River [2], Dove River [3]"),
        LST,
        2,
        4.5,
        dict(tag_count=1, format=1, em=1.0, citation=1.0, refusal=0.5),
    ),
    # 31. List with bad citations: Arle [2] (-0.5), Brisk [2] (+0.5), Cole [3] (gold, in no doc: -0.5):
    # em 3*0.5 = 1.5, cit -0.5: 2 + 1.0 = 3.0.
    (
        "list, mixed citations",
        wrap("Arle River [2], Brisk River [2], Cole River [3]"),
        LST,
        1,
        3.0,
        dict(tag_count=1, format=1, em=1.5, citation=-0.5, refusal=0),
    ),
    # 32. Two aliases of the same group ("Arle", "Arle River"): credited once: em 0.5, cit 0.5: 3.0.
    (
        "list, alias repeated",
        wrap("Arle [1], Arle River [1]"),
        LST,
        1,
        3.0,
        dict(tag_count=1, format=1, em=0.5, citation=0.5, refusal=0),
    ),
    # 33. One sentence with both gold groups: one statement -> em 0.5; support needs both groups in the cited
    # documents; doc 1 (substring fallback) has Bican but not Ali Daei -> -0.5: 2.0.
    (
        "two groups, one doc cited",
        wrap("Josef Bican and Ali Daei hold the records [1]."),
        M,
        1,
        2.0,
        dict(tag_count=1, format=1, em=0.5, citation=-0.5, refusal=0),
    ),
    # 34. Same sentence citing both documents: supported: 3.0.
    (
        "two groups, both docs cited",
        wrap("Josef Bican and Ali Daei hold the records [1][2]."),
        M,
        1,
        3.0,
        dict(tag_count=1, format=1, em=0.5, citation=0.5, refusal=0),
    ),
    # 35. Two sentences, one group each, citation after the period of the first: em 1.0 + cit 1.0: 4.0.
    (
        "two sentences",
        wrap("Bican holds the record. [1] Ali Daei leads for Iran [2]."),
        M,
        1,
        4.0,
        dict(tag_count=1, format=1, em=1.0, citation=1.0, refusal=0),
    ),
    # 36. A comma inside a gold alias does not split the item: two items, both EM and supported: 2 + 1 + 1 = 4.
    (
        "list, comma inside gold alias",
        wrap("University of California, Berkeley [1], Yale [2]"),
        UNI,
        1,
        4.0,
        dict(tag_count=1, format=1, em=1.0, citation=1.0, refusal=0),
    ),
    # 37. Gold "1": the citation "[1]" is removed before matching, and no other "1"/"one" is written: 2.0.
    (
        "citation is not an answer",
        wrap("Zed has moons [1]."),
        N,
        1,
        2.0,
        dict(tag_count=1, format=1, em=0, citation=0, refusal=0),
    ),
    # 38. Gold "1" written out: em 0.5 + cit 0.5: 3.0.
    (
        "small number answer",
        wrap("Zed has 1 moon [1]."),
        N,
        1,
        3.0,
        dict(tag_count=1, format=1, em=0.5, citation=0.5, refusal=0),
    ),
]


@pytest.mark.parametrize("name,completion,record,stage,total,components", CASES, ids=[c[0] for c in CASES])
def test_hand_computed(name, completion, record, stage, total, components):
    got_total, got = R.stage_reward(completion, record, stage)
    assert got_total == pytest.approx(total, abs=1e-12)
    for k, v in components.items():
        assert got[k] == pytest.approx(v, abs=1e-12), k


def test_diagnostics_of_repeated_answer():
    # "4120 [2]." five times: five statements, one earns EM, it is cited, it is supported.
    _, c = R.stage_reward(wrap("4120 [2]. 4120 [2]. 4120 [2]. 4120 [2]. 4120 [2]."), A, 1)
    assert (c["statements"], c["em_statements"], c["cited_em_statements"], c["supported_em_statements"]) == (
        5,
        1,
        1,
        1,
    )
    assert c["answered"] == 1 and c["refused"] == 0


def test_refusal_fragment_score():
    # "i apologize" is the first 11 characters of the normalized refusal: ratio 2*11/(72+11).
    assert T.refusal_score("I apologize.") == pytest.approx(22 / (L + 11))
    assert T.normalize_answer(REFUSAL) == REFUSAL_NORM and L == 72


def test_stage_reward_rejects_bad_stage():
    with pytest.raises(ValueError, match="stage"):
        R.stage_reward(wrap("x"), A, 3)


# ----------------------------------------------------------------------------------------------------------------
# The small functions


def test_normalize_answer():
    assert T.normalize_answer("The  Story of  Qiu Ju!") == "story of qiu ju"
    assert T.normalize_answer("An apple, a pear") == "apple pear"
    assert (
        T.normalize_answer("Bloomberg’s “food” – police") == "bloombergs food police"
    )  # Unicode punctuation
    assert T.normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_citations():
    assert T.parse_citations("Paris [2][1] and Rome [2] [10].") == [2, 1, 10]
    assert T.parse_citations("no citations (1) here") == []
    assert T.remove_citations("Paris [1][2]. Rome [3]") == "Paris. Rome"


def test_split_statements():
    assert T.split_statements("One [1]. Two [2]! Three? ", False) == ["One [1].", "Two [2]!", "Three?"]
    assert T.split_statements("Rain of 12.5 mm fell [1]. Then [2]", False) == [
        "Rain of 12.5 mm fell [1].",
        "Then [2]",
    ]
    assert T.split_statements("Died in 632 A.D. [1][2]. Next.", False) == [
        "Died in 632 A.D. [1][2].",
        "Next.",
    ]
    assert T.split_statements("A [1], B [2],, C.", True) == ["A [1]", "B [2]", "C."]
    assert T.split_statements("", False) == [] and T.split_statements(" , ", True) == []


def test_extract_answer_and_format():
    assert R.extract_answer("<think>a</think><answer> x [1] </answer>") == "x [1]"
    assert R.extract_answer("<think>a</think><answer>unterminated") is None
    assert R.format_reward("<think></think><answer></answer>") == 1.0
    assert R.format_reward("text <think>a</think><answer>b</answer>") == 0.0
    assert R.tag_count_reward("<think><think></answer>") == 0.25  # only </answer> occurs exactly once


def test_partial_ratio():
    # Verbatim substring: 1.0. Same length, 3 of 4 characters matching: 2*3/(4+4) = 0.75.
    assert T.partial_ratio("abc", "xxabcxx") == 1.0
    assert T.partial_ratio("abcd", "abxd") == pytest.approx(0.75)
    assert T.partial_ratio("xxabcxx", "abc") == 1.0  # symmetric: the shorter is searched in the longer
    assert T.partial_ratio("", "abc") == 0.0
    # Best window: "abcd" vs "zzabce": the window "abce" matches 3 of 4: 0.75.
    assert T.partial_ratio("abcd", "zzabce") == pytest.approx(0.75)


def test_is_refusal_threshold():
    def refused(answer):  # stage_reward's rule
        return T.refusal_score(answer) > T.REFUSAL_THRESHOLD

    assert refused(REFUSAL) and refused(REFUSAL.upper())
    assert not refused("Mount Kel is 4120 meters high [2].")
    assert not refused("") and not refused(None)


def test_whole_words_for_the_reward_substrings_for_the_evaluator():
    # whole words: "12" is not in "1200", and "1200 12000 120" collects no "12"; substrings match both
    assert not T.contains_words("it is 1200 meters", "12") and T.contains_substring("it is 1200 meters", "12")
    assert not T.contains_words("1200 12000 120", "12") and T.contains_substring("1200 12000 120", "12")
    assert T.contains_words("it is 12 meters", "12") and T.contains_words("bloombergs food", "bloomberg")
    assert not T.contains_words("12s", "12")  # the optional "s" only after a phrase ending in a letter
    assert not T.contains_words("anything", "") and not T.contains_substring("anything", "")  # empty alias


def test_overlong_penalty_hand_values():
    # DAPO's soft overlong punishment, budget 64, buffer 16: free up to 48 tokens, then -1/16 per token, -1 at 64
    assert R.overlong_penalty(40, 64, 16) == 0.0
    assert R.overlong_penalty(48, 64, 16) == 0.0
    assert R.overlong_penalty(52, 64, 16) == pytest.approx(-0.25)
    assert R.overlong_penalty(56, 64, 16) == pytest.approx(-0.5)
    assert R.overlong_penalty(64, 64, 16) == pytest.approx(-1.0)
    assert R.overlong_penalty(80, 64, 16) == pytest.approx(-1.0)  # beyond the budget: stays at -1
    assert R.overlong_penalty(64, 64, 0) == 0.0  # buffer 0: off


# ----------------------------------------------------------------------------------------------------------------
# The Trust-Score prompt demos: their real cited answers, in the answer format, earn EM and citation reward;
# their refusal demos earn the refusal reward on their (unanswerable) documents.

PROMPTS = SHARED / "data" / "trust_prompts"
needs_prompts = pytest.mark.skipif(not PROMPTS.is_dir(), reason=f"{PROMPTS} not found (../shared absent)")

# Gold answers for the positive demos (the files carry none), chosen by hand from the demo answers, and the stage-1
# total worked out by hand: each statement with a new gold group earns 0.5 EM, and 0.5 more when a cited document
# contains the group (no answers_found in these demos: substring match in title + text, checked by reading them).
DEMO_GOLD = {
    # S1 "...Lloró, Colombia... [3]." (Lloró in doc 3); S2 "...Mawsynram... [3], ...Sohra... Cherrapunji... [1]."
    # (Mawsynram in doc 3, Cherrapunji in doc 1): 2 + 2*0.5 + 2*0.5 = 4.0.
    ("asqa", 0): ([["Mawsynram"], ["Cherrapunji", "Sohra"], ["Lloró"]], 4.0),
    # S1 "July 2, 1776 ... [2]" (doc 2 has it); S2 "September 3, 1783 ... [3]" (doc 3): 4.0.
    ("asqa", 1): ([["July 2, 1776"], ["September 3, 1783"]], 4.0),
    # 11 items, each its own gold group, each found in the cited document: 2 + 11*0.5 + 11*0.5 = 13.0.
    ("qampari", 0): (
        [
            [t]
            for t in [
                "Marazan",
                "Stephen Morris",
                "Beyond the Black Stump",
                "Lonely Road",
                "The Chequer Board",
                "In the Wet",
                "Trustee from the Toolroom",
                "Round the Bend",
                "No Highway",
                "Ruined City",
                "On the Beach",
            ]
        ],
        13.0,
    ),
    # 7 items, all supported: 2 + 7*0.5 + 7*0.5 = 9.0.
    ("qampari", 1): (
        [
            [t]
            for t in [
                "The Story of Qiu Ju",
                "Farewell My Concubine",
                "Flirting Scholar",
                "The Monkey King 2",
                "Mulan",
                "Saturday Fiction",
                "Coming Home",
            ]
        ],
        9.0,
    ),
    # ELI5 gold answers are whole claims, which never occur verbatim; key phrases instead. S1 has "Michael
    # Bloomberg('s)" citing [1][2][3] (doc 3 has "Michael Bloomberg"); S2 "common sense" [2] (doc 2): 4.0.
    ("eli5", 0): ([["Michael Bloomberg"], ["common sense"]], 4.0),
    # S1 "ideological heritage" [1] (doc 1), S2 "632" [1][2] (docs 1, 2), S3 "Ali" [2] (doc 2), S4 no gold:
    # 2 + 3*0.5 + 3*0.5 = 5.0.
    ("eli5", 1): ([["ideological heritage"], ["632"], ["Ali"]], 5.0),
}


def load_prompt_file(name):
    return json.loads((PROMPTS / f"{name}_refusal.json").read_text())


@needs_prompts
@pytest.mark.parametrize("name,i", sorted(DEMO_GOLD))
def test_trust_prompt_positive_demos(name, i):
    demo = load_prompt_file(name)["positive_demos"][i]
    gold, expected = DEMO_GOLD[(name, i)]
    docs = [{"title": d["title"], "text": d["text"]} for d in demo["docs"]]
    record = rec(demo["question"], gold, docs, answerable=True, is_list=name == "qampari", source=name)
    total, c = R.stage_reward(wrap(demo["answer"], think="The documents answer it."), record, 1)
    assert total == pytest.approx(expected)
    assert c["em"] > 0 and c["citation"] == pytest.approx(c["em"])  # every EM statement is supported
    total2, c2 = R.stage_reward(wrap(demo["answer"]), record, 2)
    assert total2 == pytest.approx(expected + 0.5) and c2["refusal"] == 0.5


@needs_prompts
@pytest.mark.parametrize("name", ["asqa", "qampari", "eli5"])
def test_trust_prompt_refusal_demos(name):
    for demo in load_prompt_file(name)["refusal_demos"]:
        docs = [
            {"title": d["title"], "text": d["text"], "answers_found": d["answers_found"]}
            for d in demo["docs"]
        ]
        assert not any(any(d["answers_found"]) for d in docs)  # unanswerable by the data's own labels
        record = rec(demo["question"], [], docs, answerable=False, source=name)
        completion = wrap(demo["answer"])
        total, c = R.stage_reward(completion, record, 2)
        assert total == 3.0 and c["refusal"] == 1.0  # 2 + rscore 1 (the sentence verbatim)
        assert R.stage_reward(completion, record, 1)[0] == 2.0  # no refusal reward in stage 1


# ----------------------------------------------------------------------------------------------------------------
# Property tests: any string, any record -> no exception, total within the documented bounds.

PIECES = [
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "[1]",
    "[2]",
    "[7]",
    "[0]",
    ". ",
    ", ",
    "\n",
    " ",
    REFUSAL,
    "I apologize",
    "4120",
    "Arle River",
    "the",
    "a",
]
completions = st.one_of(
    st.text(max_size=300),
    st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=20)), max_size=25).map("".join),
)
aliases = st.lists(
    st.one_of(st.sampled_from(["4120", "Arle River", "1", "the", ""]), st.text(max_size=12)), max_size=3
)


@st.composite
def records(draw):
    answers = draw(st.lists(aliases, max_size=4))
    n_docs = draw(st.integers(0, 5))
    docs = []
    for _ in range(n_docs):
        found = draw(
            st.one_of(st.none(), st.lists(st.integers(0, 1), max_size=5))
        )  # may not match len(answers)
        docs.append(
            {"title": draw(st.text(max_size=15)), "text": draw(st.text(max_size=60)), "answers_found": found}
        )
    return rec(
        draw(st.text(max_size=30)), answers, docs, answerable=draw(st.booleans()), is_list=draw(st.booleans())
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(completion=completions, record=records(), stage=st.sampled_from([1, 2]))
def test_property_bounds(completion, record, stage):
    total, c = R.stage_reward(completion, record, stage)
    g = len(record.answers)
    upper = 2 + g if stage == 1 else 2 + max(0.5 + g, 1)  # the bounds stated in rewards.py
    assert 0.0 <= total <= upper + 1e-9
    parts = c["tag_count"] + c["format"] + c["em"] + c["citation"] + c["refusal"]
    assert parts == pytest.approx(total)
    assert c["tag_count"] in (0, 0.25, 0.5, 0.75, 1) and c["format"] in (0, 1)
    assert c["em"] + c["citation"] >= 0 and 0 <= c["rscore"] <= 1
    assert not (c["answered"] and c["refused"])


@settings(max_examples=200, deadline=None)
@given(a=st.text(max_size=80), b=st.text(max_size=80))
def test_property_ratios(a, b):
    p = T.partial_ratio(a, b)
    assert 0.0 <= p <= 1.0 and p == T.partial_ratio(b, a)
    assert 0.0 <= T.refusal_score(a) <= 1.0
    T.split_statements(a, True), T.split_statements(a, False), T.parse_citations(a)
