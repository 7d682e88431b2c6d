"""Rule-based rewards for grounded, cited answers (Ground-GRPO, arXiv 2506.15522), plus one generic reward.

Everything here is a plain function of strings and a data.Record; no model is involved. The rules are written out
in docs/METHOD.md ("The rewards"); where the paper is silent, the choice made here is stated in a comment.
This module holds what a completion earns: the format rewards, exact match, citation support, the refusal reward
and their combination per stage. Normalization, statement splitting, whole-word matching and the refusal score are
text.py's; the records are data.py's; the evaluation metrics (Trust-Score) are eval.py's.

A completion is expected to look like

    <think> reasoning </think><answer> Statement one [1]. Statement two [2][3]. </answer>

and is scored with the paper's Algorithm 1 (see `stage_reward`):

    R = R_tag_count
    if R_format == 1 and R_tag_count == 1:
        R += R_format
        if answerable:
            if not refused: R += R_refusal (0.5, stage 2 only) + R_EM + R_citation
        else:
            R += R_refusal (rscore, stage 2 only)

Bounds (checked by the property test): with G = len(record.answers) gold groups,
    0 <= total <= 2 + G                      in stage 1
    0 <= total <= 2 + max(0.5 + G, 1)        in stage 2   (= 2.5 + G when G >= 1)
because each statement that earns +0.5 EM gets at worst -0.5 citation (EM + citation >= 0 per statement) and at
most G statements earn EM (each gold group is credited once).
"""

import re

from text import (
    REFUSAL_THRESHOLD,
    contains_words,
    normalize_answer,
    parse_citations,
    refusal_score,
    remove_citations,
    split_statements,
)

TAGS = ("<think>", "</think>", "<answer>", "</answer>")

EM_REWARD = 0.5  # per statement that contains a not-yet-credited gold answer
CITATION_REWARD = 0.5  # supported citation; -0.5 for an unsupported one ("bad citation penalty")
ANSWERED_REWARD = 0.5  # stage 2: answering an answerable question


# ----------------------------------------------------------------------------------------------------------------
# Format


def tag_count_reward(completion: str) -> float:
    """R_tag_count = (1/4) * number of tags in T that occur exactly once."""
    return sum(completion.count(tag) == 1 for tag in TAGS) / 4


# One think block then one answer block, nothing else but whitespace around them. The inner parts may not contain
# any of the four tags (a nested or repeated tag is not "exactly one block").
_NO_TAG = r"(?:(?!</?think>|</?answer>).)*"
_FORMAT_RE = re.compile(rf"\s*<think>{_NO_TAG}</think>\s*<answer>{_NO_TAG}</answer>\s*", re.DOTALL)


def format_reward(completion: str) -> float:
    """R_format = 1 if the completion is exactly `<think>...</think><answer>...</answer>` (whitespace allowed
    around and between the blocks), else 0."""
    return 1.0 if _FORMAT_RE.fullmatch(completion) else 0.0


_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(completion: str) -> str | None:
    """The text inside the first <answer>...</answer> block (stripped), or None when there is no closed block."""
    m = _ANSWER_RE.search(completion)
    return m.group(1).strip() if m else None


# ----------------------------------------------------------------------------------------------------------------
# Exact match and citations


def matched_groups(statement: str, answers: list[list[str]]) -> list[int]:
    """Indices of the gold groups with an alias inside the statement (citations removed first, so "[1]" can never
    match a gold "1")."""
    text = normalize_answer(remove_citations(statement))
    return [
        g
        for g, aliases in enumerate(answers)
        if any(contains_words(text, normalize_answer(a)) for a in aliases)
    ]


def doc_has_group(doc: dict, g: int, aliases: list[str]) -> bool:
    """Does this document contain gold group g? Its `answers_found[g]` flag when present, else a whole-word match
    of a normalized alias in the normalized title + text."""
    found = doc.get("answers_found")
    if isinstance(found, (list, tuple)) and g < len(found):
        return bool(found[g])
    text = normalize_answer(f"{doc.get('title') or ''} {doc.get('text') or ''}")
    return any(contains_words(text, normalize_answer(a)) for a in aliases)


def citations_support(cites: list[int], groups: list[int], record) -> bool:
    """A citation set supports a statement when every gold group credited to it is found in at least one cited
    document (for one group: "at least one cited document contains the matched gold answer"). Numbers outside
    1..k point at no document and support nothing."""
    docs = [record.docs[n - 1] for n in cites if 1 <= n <= len(record.docs)]
    return all(any(doc_has_group(d, g, record.answers[g]) for d in docs) for g in groups)


def protect_commas(answer: str, answers: list[list[str]]) -> str:
    """List answers are split on commas, which would cut a gold alias like "University of California, Berkeley"
    in two. Where such an alias occurs in the answer (ignoring case), its commas become spaces before splitting."""
    for aliases in answers:
        for a in aliases:
            if "," in a and a.strip(", "):
                answer = re.sub(
                    re.escape(a), lambda m: m.group(0).replace(",", " "), answer, flags=re.IGNORECASE
                )
    return answer


def score_statements(answer: str, record) -> dict:
    """R_EM and R_citation of an answer, statement by statement.

    EM: +0.5 for a statement containing a gold group not credited to an earlier statement; all groups it contains
    are then credited to it (the spec gives no cap; this one means repeating an answer earns nothing more).
    Citation, only for statements that earned EM: +0.5 supported, -0.5 cited but unsupported, 0 uncited."""
    credited: set[int] = set()
    em = citation = 0.0
    n_em = n_cited = n_supported = 0
    if record.is_list:
        answer = protect_commas(answer, record.answers)
    statements = split_statements(answer, record.is_list)
    for s in statements:
        new = [g for g in matched_groups(s, record.answers) if g not in credited]
        if not new:
            continue
        credited.update(new)
        em += EM_REWARD
        n_em += 1
        cites = parse_citations(s)
        if not cites:
            continue
        n_cited += 1
        if citations_support(cites, new, record):
            citation += CITATION_REWARD
            n_supported += 1
        else:
            citation -= CITATION_REWARD
    return dict(
        em=em,
        citation=citation,
        statements=len(statements),
        em_statements=n_em,
        cited_em_statements=n_cited,
        supported_em_statements=n_supported,
    )


def record_answerable(record) -> bool:
    """Answerable = at least one document has a non-zero answers_found (docs/METHOD.md)."""
    return bool(getattr(record, "answerable", False))


# ----------------------------------------------------------------------------------------------------------------
# The entry point: hierarchical combination (Algorithm 1)


def stage_reward(completion: str, record, stage: int) -> tuple[float, dict]:
    """Reward of one completion (scored as prefill + generated text) for a record in training stage 1 or 2.

    Returns (total, components). The components `tag_count, format, em, citation, refusal` are the amounts added
    to the total (they sum to it; gated pieces are 0). The other keys are diagnostics computed on the answer block
    whether or not the gate let its reward through: answered (0/1: non-empty answer that is not a refusal),
    refused (0/1), rscore, statements, em_statements, cited_em_statements, supported_em_statements.

    Choice where the spec is silent: an empty answer block is neither a refusal nor an answer, so in stage 2 it
    earns no refusal reward on either kind of question (otherwise "<answer></answer>" would collect the 0.5).

    Bounds: 0 <= total <= 2 + G (stage 1), <= 2 + max(0.5 + G, 1) (stage 2), G = len(record.answers).
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    completion = completion if isinstance(completion, str) else ""
    answer = extract_answer(completion) or ""
    rscore = refusal_score(answer)
    refused = rscore > REFUSAL_THRESHOLD
    answered = bool(normalize_answer(remove_citations(answer))) and not refused
    scores = (
        score_statements(answer, record)
        if answered
        else dict(
            em=0.0,
            citation=0.0,
            statements=0,
            em_statements=0,
            cited_em_statements=0,
            supported_em_statements=0,
        )
    )

    c = dict(tag_count=tag_count_reward(completion), format=0.0, em=0.0, citation=0.0, refusal=0.0)
    if format_reward(completion) == 1.0 and c["tag_count"] == 1.0:
        c["format"] = 1.0
        if record_answerable(record):
            if answered:  # "not refused", and not empty either (see docstring)
                c["refusal"] = ANSWERED_REWARD if stage == 2 else 0.0
                c["em"], c["citation"] = scores["em"], scores["citation"]
        elif stage == 2 and refused:
            c["refusal"] = rscore
    total = c["tag_count"] + c["format"] + c["em"] + c["citation"] + c["refusal"]
    c.update(
        answered=float(answered),
        refused=float(refused),
        rscore=rscore,
        **{k: float(v) for k, v in scores.items() if k not in ("em", "citation")},
    )
    return total, c


def overlong_penalty(length: int, max_len: int, buffer: int) -> float:
    """DAPO's soft overlong punishment (arXiv 2503.14476), a reward added to the total: 0 up to max_len - buffer
    tokens, then falling linearly to -1 at max_len (and -1 beyond): R = clip((max_len - buffer - length) / buffer,
    -1, 0). buffer <= 0: off (0)."""
    if buffer <= 0:
        return 0.0
    return max(-1.0, min(0.0, (max_len - buffer - length) / buffer))
