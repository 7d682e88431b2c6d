"""eval.py: Trust-Score metrics on small hand-built record sets, every expected number worked out by hand in the
comments (from the definitions in docs/METHOD.md, "Evaluation"), plus the CLI's error paths
and --predictions / --compare / --plot. No model is needed except in one CLI test, which uses a tiny random one."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import builtin  # noqa: E402
import eval as E  # noqa: E402
import text as T  # noqa: E402
from data import Record  # noqa: E402

SHARED = ROOT.parent / "shared"
REFUSAL = "I apologize, but I couldn't find an answer to your question in the search results."
# Percentages computed by hand: compare to 1e-9 (float rounding of a few divisions, nothing more).
TOL = 1e-9


def doc(found, text="some text"):
    return {"title": "t", "text": text, "answers_found": list(found)}


def record(answers, docs, source="asqa", is_list=False, id="q", question="Which?"):
    answerable = any(any(d.get("answers_found") or []) for d in docs)
    return Record(
        id=id,
        question=question,
        answers=answers,
        docs=docs,
        answerable=answerable,
        source=source,
        is_list=is_list,
    )


def completion(answer):
    return f"<think>reasoning</think><answer>{answer}</answer>"


def approx(x):
    return pytest.approx(x, abs=TOL)


# --------------------------------------------------------------------------------------------------------------
# The refusal rule of the evaluator (not the reward's)


def test_refusal_rule():
    assert T.is_refused(REFUSAL)
    assert T.is_refused("I apologize, but I couldn't find an answer.")  # the flag itself, 100 > 85
    # The eval flag is only the first half of the sentence, so a short refusal counts (the reward's rule, which
    # looks for the whole sentence, does not count it): that is the evaluator's behaviour.
    assert T.is_refused("I couldn't find an answer.")
    assert not T.is_refused("Paris is the capital of France [1].")
    assert not T.is_refused("")  # empty answer: partial ratio 0, so it is "answered"
    # The threshold: the normalized flag is "i apologize but i couldnt find answer" (37 characters). An answer of
    # the same length is compared whole: difflib ratio 2M / (37 + 37), M = matching characters. Replacing 5
    # letters by "q" leaves M = 32: 64/74 = 0.865 > 0.85, a refusal; 6 letters: 62/74 = 0.838, not one.
    assert T.is_refused("q apologqze but q couldnt fqnd answqr")
    assert not T.is_refused("q apologqze but q couldnt fqnd qnswqr")


def test_answer_block_extracted_else_whole_text():
    r = record([["Paris"]], [doc([1])])
    # with an answer block, the think block is ignored: refusal words in it do not make a refusal
    row = E.score_question(r, "<think>" + REFUSAL + "</think><answer>Paris [1].</answer>")
    assert not row["refused"] and row["correctness"] == 1.0 and row["citation_recall"] == 1.0
    # without one, the whole text is the answer
    row = E.score_question(r, "Paris [1].")
    assert row["correctness"] == 1.0 and row["citation_recall"] == 1.0 and row["citation_precision"] == 1.0
    assert E.score_question(r, "<think>x</think>" + REFUSAL)["refused"]


# --------------------------------------------------------------------------------------------------------------
# Dataset-level scores


def test_mixed_set_by_hand():
    # R1 answerable (Paris in doc1, Lyon in doc2), answered: both gold answers present -> correctness 1.
    #   "Paris is one [1]." supported (doc1 covers Paris): 1 precise citation.
    #   "Lyon is another [3]." doc3 covers nothing: unsupported, its one citation imprecise.
    #   recall 1/2, precision 1/2.
    # R2 answerable, refused.  R3 unanswerable, refused.
    # R4 unanswerable, answered "It is Madrid [1]." : no gold answer in it -> unsupported; recall 0, precision 0/1.
    records = [
        record([["Paris"], ["Lyon"]], [doc([1, 0]), doc([0, 1]), doc([0, 0])], id="r1"),
        record([["Berlin"]], [doc([1]), doc([0])], id="r2"),
        record([["Rome"]], [doc([0]), doc([0])], id="r3"),
        record([["Rome"]], [doc([0]), doc([0])], id="r4"),
    ]
    preds = [
        completion("Paris is one [1]. Lyon is another [3]."),
        completion(REFUSAL),
        completion(REFUSAL),
        completion("It is Madrid [1]."),
    ]
    s = E.trust_score(records, preds)
    # answered {R1, R4}: AR = 2/4
    assert s["AR"] == approx(50.0)
    # refusal: refused {R2, R3}, unanswerable {R3, R4}, both {R3}: P = 1/2, R = 1/2, F1 = 1/2
    # answer:  answered {R1, R4}, answerable {R1, R2}, both {R1}: P = 1/2, R = 1/2, F1 = 1/2 -> F1_GR = 50
    assert s["refusal_f1"] == approx(50.0) and s["answer_f1"] == approx(50.0)
    assert s["F1_GR"] == approx(50.0)
    # correctness: R1 = 1, others 0. Over answered (R1, R4) = 1/2, over answerable (R1, R2) = 1/2 -> hmean 1/2
    assert s["AC_answered"] == approx(50.0) and s["AC_answerable"] == approx(50.0)
    assert s["F1_AC"] == approx(50.0)
    # citations over answered: recall mean(1/2, 0) = 1/4, precision mean(1/2, 0) = 1/4 -> F1 = 1/4
    assert s["citation_recall"] == approx(25.0) and s["citation_precision"] == approx(25.0)
    assert s["F1_GC"] == approx(25.0)
    assert s["TRUST"] == approx((50 + 50 + 25) / 3)
    assert s["n"] == 4 and s["n_answered"] == 2 and s["n_answerable"] == 2
    assert any("not by NLI" in note for note in s["notes"])


def test_f1_ac_is_a_harmonic_mean():
    # R1 answerable, answered correctly (1); R2 unanswerable but answered (0).
    # AC over answered = (1 + 0)/2 = 1/2, over answerable = 1/1 = 1: harmonic mean 2*(1/2)*1/(3/2) = 2/3
    # (the arithmetic mean would be 3/4).
    records = [record([["Paris"]], [doc([1])], id="r1"), record([["Rome"]], [doc([0])], id="r2")]
    s = E.trust_score(records, [completion("Paris [1]."), completion("Madrid [1].")])
    assert s["AC_answered"] == approx(50.0) and s["AC_answerable"] == approx(100.0)
    assert s["F1_AC"] == approx(200 / 3)


def test_mixed_sources_scored_per_source():
    # asqa: answered correctly with a supporting citation. qampari: answerable but refused.
    records = [
        record([["Paris"]], [doc([1])], id="a"),
        record([["Heat"]], [doc([1])], source="qampari", is_list=True, id="q"),
    ]
    _, s = E.evaluate(records, [completion("Paris [1]."), completion(REFUSAL)])
    # all: refusal P = 0/1, R = 0/0 -> 0; answer P = 1/1, R = 1/2 -> 2/3: F1_GR = 100/3.
    # AC answered = 1, answerable = 1/2 -> hmean 2/3. Citations (asqa only answered): 1, 1 -> F1_GC = 100.
    assert s["F1_GR"] == approx(100 / 3) and s["F1_AC"] == approx(200 / 3) and s["F1_GC"] == approx(100.0)
    assert s["TRUST"] == approx((200 / 3 + 100 / 3 + 100) / 3)
    # asqa alone: F1_GR = (0 + 1) / 2, F1_AC = 100, F1_GC = 100 -> TRUST 250/3. qampari alone: all 0.
    assert s["by_source"]["asqa"]["TRUST"] == approx(250 / 3)
    assert s["by_source"]["qampari"]["TRUST"] == 0.0


def test_nothing_answered():
    # two answerable and one unanswerable question, every one refused.
    records = [
        record([["Alpha"]], [doc([1])], id="a"),
        record([["Beta"]], [doc([1])], id="b"),
        record([["Gamma"]], [doc([0])], id="c"),
    ]
    s = E.trust_score(records, [completion(REFUSAL)] * 3)
    assert s["AR"] == 0.0
    # refusal P = 1/3 (only c is unanswerable), R = 1/1, F1 = 2*(1/3)*1/(4/3) = 1/2.
    # answer: nothing answered -> P = 0 (empty denominator), R = 0/2 -> F1 0. F1_GR = 25.
    assert s["refusal_f1"] == approx(50.0) and s["answer_f1"] == 0.0
    assert s["F1_GR"] == approx(25.0)
    # no answered question: the answered means are empty -> 0, and the harmonic mean with 0 is 0.
    assert s["F1_AC"] == 0.0 and s["F1_GC"] == 0.0
    assert s["TRUST"] == approx(25.0 / 3)


def test_everything_refused_on_unanswerable_data():
    # the right behaviour everywhere: refusal P = R = 1; but answer P and R have empty denominators -> 0.
    records = [record([["Alpha"]], [doc([0])], id="a"), record([["Beta"]], [doc([0]), doc([0])], id="b")]
    s = E.trust_score(records, [completion(REFUSAL), REFUSAL])
    assert s["AR"] == 0.0 and s["refusal_f1"] == approx(100.0) and s["answer_f1"] == 0.0
    assert s["F1_GR"] == approx(50.0)
    assert s["F1_AC"] == 0.0 and s["F1_GC"] == 0.0 and s["TRUST"] == approx(50.0 / 3)


def test_nothing_answerable():
    # two unanswerable questions: one answered, one refused.
    records = [record([["Alpha"]], [doc([0])], id="a"), record([["Beta"]], [doc([0])], id="b")]
    s = E.trust_score(records, [completion("It is Alpha [1]."), completion(REFUSAL)])
    assert s["AR"] == approx(50.0)
    # refusal P = 1/1, R = 1/2 -> F1 = 2/3. answer P = 0/1, R = 0/0 -> 0. F1_GR = 100 * (2/3) / 2
    assert s["refusal_f1"] == approx(200 / 3) and s["answer_f1"] == 0.0
    assert s["F1_GR"] == approx(100 / 3)
    # no answerable question: AC_answerable is an empty mean -> 0; "It is Alpha [1]." cites doc1 which has
    # answers_found 0 for A -> unsupported: recall 0, precision 0.
    assert s["F1_AC"] == 0.0 and s["F1_GC"] == 0.0
    assert s["TRUST"] == approx(100 / 9)


def test_empty_predictions():
    # an empty completion (or None) is not a refusal: it is an answer with no statements and no citations.
    records = [
        record([["Alpha"]], [doc([1])], id="a"),
        record([["Beta"]], [doc([1])], id="b"),
        record([["Gamma"]], [doc([1])], id="c"),
    ]
    s = E.trust_score(records, ["", None, completion("")])
    assert s["AR"] == approx(100.0)
    # answer P = 3/3, R = 3/3 -> 1; refusal: no refusals, no unanswerable -> 0. F1_GR = 50.
    assert s["F1_GR"] == approx(50.0)
    # correctness 0 everywhere; recall = precision = 0 (no statements, no citations: empty denominators)
    assert s["F1_AC"] == 0.0 and s["F1_GC"] == 0.0
    assert s["TRUST"] == approx(50.0 / 3)
    assert E.trust_score([], [])["TRUST"] == 0.0  # no records at all: zeros, not a ZeroDivisionError


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="1 records but 2 predictions"):
        E.trust_score([record([["Alpha"]], [doc([1])])], ["a", "b"])


# --------------------------------------------------------------------------------------------------------------
# Citation recall and precision


def test_four_citations_only_three_count():
    # five docs; only doc4 contains Paris.
    r = record([["Paris"]], [doc([0]), doc([0]), doc([0]), doc([1]), doc([0])])
    # [1][2][3][4]: counted [1][2][3], none contains Paris -> unsupported (with [4] it would be supported).
    row = E.score_question(r, completion("It is Paris [1][2][3][4]."))
    assert row["n_citations"] == 3 and row["citation_recall"] == 0.0 and row["citation_precision"] == 0.0
    # [4][1][2][3]: counted [4][1][2], jointly supported. [4] supports alone -> precise. [1] does not support
    # alone, the others ([4][2]) do without it, and doc1 covers no gold group -> imprecise; [2] likewise.
    # precision 1/3 (with all four counted it would be 1/4).
    row = E.score_question(r, completion("It is Paris [4][1][2][3]."))
    assert row["n_citations"] == 3 and row["citation_recall"] == 1.0
    assert row["citation_precision"] == approx(1 / 3)


def test_joint_support_and_imprecision():
    # groups Paris (0), France (1). doc1 covers Paris, doc2 France, doc3 both, doc4 nothing.
    r = record([["Paris"], ["France"]], [doc([1, 0]), doc([0, 1]), doc([1, 1]), doc([0, 0])])
    cases = {
        # supported only jointly: neither alone, and without either the other does not suffice -> 2/2 precise
        "Paris is in France [1][2].": (1.0, 1.0),
        # doc3 alone supports -> precise; doc1 alone does not, doc3 suffices without it, BUT doc1 covers Paris
        # which doc3 also covers -> not counted as imprecise. 2/2.
        "Paris is in France [1][3].": (1.0, 1.0),
        # doc3 precise; doc4 does not support alone, doc3 suffices, doc4 shares no group -> imprecise. 1/2.
        "Paris is in France [3][4].": (1.0, 0.5),
        # doc1 alone covers Paris but not France: the pair is not jointly supporting -> unsupported, 0/2.
        "Paris is in France [1][4].": (0.0, 0.0),
        # one citation: precise iff the statement is supported
        "Paris is in France [3].": (1.0, 1.0),
        # citation number outside 1..k: unsupported, and (as in the evaluator) its citations are not counted
        "Paris is in France [3][9].": (0.0, 0.0),
    }
    for answer, (recall, precision) in cases.items():
        row = E.score_question(r, completion(answer))
        assert (row["citation_recall"], row["citation_precision"]) == (approx(recall), approx(precision)), (
            answer
        )
    assert E.score_question(r, completion("Paris is in France [3][9]."))["n_citations"] == 0
    # a second citation covering only a gold group the statement does not contain (Lyon) is imprecise; the
    # "shares a group with the others" exception looks at the other citations only, not at the document itself
    r3 = record([["Paris"], ["Lyon"]], [doc([1, 0]), doc([0, 1])])
    row = E.score_question(r3, completion("Paris is big [1][2]."))
    assert (row["citation_recall"], row["citation_precision"]) == (1.0, approx(0.5))
    # [0] is outside 1..k too (it must not wrap around to the last document, which here covers Paris)
    r2 = record([["Paris"]], [doc([0]), doc([1])])
    row = E.score_question(r2, completion("Paris [0]."))
    assert row["citation_recall"] == 0.0 and row["n_citations"] == 0


def test_citation_recall_over_statements():
    # three statements: supported, uncited, no gold answer (cannot be checked -> unsupported). recall 1/3;
    # citations counted: [1] (precise) and [2] (statement unsupported -> not precise): precision 1/2.
    r = record([["Paris"]], [doc([1]), doc([0])])
    row = E.score_question(r, completion("Paris is the capital [1]. Paris is big. It has a river [2]."))
    assert row["n_statements"] == 3 and row["n_citations"] == 2
    assert row["citation_recall"] == approx(1 / 3) and row["citation_precision"] == approx(1 / 2)


def test_support_from_text_when_no_answers_found():
    # no answers_found: a document covers a group when a normalized alias is a substring of its title + text
    r = record(
        [["Eiffel Tower"]],
        [{"title": "Paris", "text": "The Eiffel tower is tall."}, {"title": "Rome", "text": "Colosseum."}],
    )
    assert E.score_question(r, completion("The Eiffel Tower [1]."))["citation_recall"] == 1.0
    assert E.score_question(r, completion("The Eiffel Tower [2]."))["citation_recall"] == 0.0


# --------------------------------------------------------------------------------------------------------------
# Answer correctness (F1_AC's per-question score)


def test_asqa_correctness_over_supported_groups_only():
    # three groups, the docs support groups 0 and 1 only. The answer has group 0 and group 2 (unsupported):
    # 1 of 2 supported groups -> 1/2. Citations in the answer are removed before matching ("[1]" is not "1").
    r = record([["Daei", "Ali Daei"], ["Bican"], ["Sinclair"]], [doc([1, 0, 0]), doc([0, 1, 0])])
    row = E.score_question(r, completion("Ali Daei [1]. Sinclair [2]."))
    assert row["correctness"] == approx(0.5)
    s = E.trust_score([r], [completion("Ali Daei [1]. Sinclair [2].")])
    assert s["F1_AC"] == approx(50.0)  # hmean(1/2 answered, 1/2 answerable)


def test_qampari_top5_recall():
    names = ["Heat", "Sanctuary", "Crying Freeman", "Strain", "Wounded Man", "Akira", "Nausicaa"]
    found = [1, 1, 1, 1, 1, 1, 0]  # 6 supported groups, Nausicaa not in any document
    r = record([[n] for n in names], [doc(found)], source="qampari", is_list=True)
    # 6 correct + 2 wrong items: precision 6/8; hits 6 -> recall min(5,6)/min(5,6) = 1; F1 = 2*.75/1.75 = 6/7
    pred = "Heat, Sanctuary, Crying Freeman, Strain, Wounded Man, Akira, Naruto, Bleach."
    assert E.score_question(r, completion(pred))["correctness"] == approx(6 / 7)
    # 3 correct + 1 wrong: P = 3/4, R = 3/5 -> F1 = 2*(3/4)*(3/5)/(3/4+3/5) = 0.9/1.35 = 2/3
    assert E.score_question(r, completion("Heat, Strain, Akira, Naruto"))["correctness"] == approx(2 / 3)
    # the unsupported gold item is not an answer here: P = 1/2 (only Heat), R = 1/5 -> F1 = 0.2/0.7 = 2/7
    assert E.score_question(r, completion("Heat, Nausicaa"))["correctness"] == approx(2 / 7)
    # only 2 supported groups: recall denominator is min(5, 2) = 2; one hit, one item -> P 1, R 1/2, F1 2/3
    r2 = record([["Heat"], ["Akira"], ["Strain"]], [doc([1, 1, 0])], source="qampari", is_list=True)
    assert E.score_question(r2, completion("Akira."))["correctness"] == approx(2 / 3)


def test_qampari_citations_per_item():
    # statements are the comma items; "Heat [1]" supported, "Akira [1]" not (doc1 lacks Akira), "Strain" uncited
    r = record(
        [["Heat"], ["Akira"], ["Strain"]], [doc([1, 0, 1]), doc([0, 1, 0])], source="qampari", is_list=True
    )
    row = E.score_question(r, completion("Heat [1], Akira [1], Strain"))
    assert row["n_statements"] == 3 and row["n_citations"] == 2
    assert row["citation_recall"] == approx(1 / 3) and row["citation_precision"] == approx(1 / 2)


def test_eli5_claims_lexical_judge_and_user_judge():
    claims = [
        "Salmonella is a bacteria found in raw eggs.",
        "Raw flour can carry E. coli germs.",
        "Cookie dough bites are pasteurized.",
    ]
    r = record([[c] for c in claims], [doc([1, 1, 0]), doc([0, 1, 0])], source="eli5")
    # claims 0 and 1 are supported; the answer restates claim 0 only.
    # lexical judge: claim 0's content words {salmonella, bacteria, found, raw, eggs} all occur -> entailed;
    # claim 1's {raw, flour, carry, e, coli, germs}: only "raw" occurs (1/6 < 0.6) -> not. correctness 1/2.
    answer = "Raw eggs can contain salmonella, a bacteria found in them [1]."
    assert E.score_question(r, completion(answer))["correctness"] == approx(0.5)
    # the statement "contains" claim 0 (judge), doc1 has answers_found 1 for it -> supported
    assert E.score_question(r, completion(answer))["citation_recall"] == 1.0
    s = E.trust_score([r], [completion(answer)])
    assert any("lexical approximation" in note for note in s["notes"])
    # a user judge that entails everything: both supported claims -> 1
    always = lambda premise, hypothesis: True  # noqa: E731
    assert E.score_question(r, completion(answer), always)["correctness"] == 1.0
    assert any("user judge" in note for note in E.trust_score([r], [completion(answer)], always)["notes"])


def test_evaluate_scores_each_question_once():
    """evaluate() keeps the rows it scored and aggregates from them: the judge runs exactly as often as one pass of
    score_all (not again for the Trust-Score, nor once more per source of a mixed set), with the same results."""
    claims = ["Salmonella is a bacteria found in raw eggs.", "Raw flour can carry E. coli germs."]
    records = [
        record([[c] for c in claims], [doc([1, 1]), doc([0, 1])], source="eli5", id="e"),
        record([["Paris"]], [doc([1])], id="a"),  # asqa: the judge is not asked (aliases: substring)
    ]
    texts = [
        completion("Raw eggs can contain salmonella, a bacteria found in them [1]."),
        completion("Paris [1]."),
    ]
    calls = []

    def counting_judge(premise, hypothesis):
        calls.append(hypothesis)
        return E.lexical_judge(premise, hypothesis)

    one_pass = E.score_all(records, texts, counting_judge)
    n_one_pass = len(calls)
    calls.clear()
    rows, scores = E.evaluate(records, texts, counting_judge)
    assert n_one_pass > 0 and len(calls) == n_one_pass
    assert rows == one_pass
    expected = E.trust_score(records, texts, counting_judge)
    assert all(scores[k] == expected[k] for k in expected)
    assert (
        scores["by_source"]["eli5"]["TRUST"] == E.trust_score(records[:1], texts[:1], counting_judge)["TRUST"]
    )


def test_default_out_dir_names_the_run_of_a_checkpoint(tmp_path, monkeypatch):
    """Every run saves its model as <run>/checkpoint: two runs' evaluations on the same data must not share a
    default output directory (they did: runs/eval/<data>__checkpoint)."""
    data = tmp_path / "asqa.json"
    data.write_text(json.dumps(alce_records()))
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"text": completion(REFUSAL)}) + "\n" for _ in range(2)))
    monkeypatch.chdir(tmp_path)
    for run in ("stage1", "stage2"):
        E.main(["--data", str(data), "--model", f"runs/{run}/checkpoint", "--predictions", str(preds)])
    assert (tmp_path / "runs/eval/asqa__stage1-checkpoint/scores.json").is_file()
    assert (tmp_path / "runs/eval/asqa__stage2-checkpoint/scores.json").is_file()
    assert E.default_out_dir("x/asqa.json", "runs/stage1/checkpoint.old") == Path(
        "runs/eval/asqa__stage1-checkpoint.old"
    )
    assert E.default_out_dir("builtin", "HuggingFaceTB/SmolLM2-135M") == Path(
        "runs/eval/builtin__SmolLM2-135M"
    )
    # the held-out part of a file is not the whole file
    assert E.default_out_dir("x/asqa.json", "builtin", holdout=0.5) == Path(
        "runs/eval/asqa-holdout0.5__builtin"
    )


def test_reward_summary():
    # strict format: the first completion only. stage_reward itself is tested in test_rewards.py; here only the
    # averaging: format compliance = 1/2 -> 50 %, tag count = mean(1, 0) = 0.5.
    records = [record([["Alpha"]], [doc([1])], id="a"), record([["Beta"]], [doc([1])], id="b")]
    s = E.reward_summary(records, [completion("Alpha [1]."), "Alpha [1]."])
    assert s["format_compliance"] == approx(50.0) and s["tag_count"] == approx(0.5)
    from rewards import stage_reward

    expected = (
        stage_reward(completion("Alpha [1]."), records[0], 2)[0]
        + stage_reward("Alpha [1].", records[1], 2)[0]
    ) / 2
    assert s["stage2_reward"] == approx(expected)


# --------------------------------------------------------------------------------------------------------------
# The CLI


def run_cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def one_line_error(proc):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eval.py:"), proc.stderr
    return lines[0]


def alce_records():
    """Two ASQA-format records: q1 answerable (doc1 has the answer), q2 unanswerable."""
    return [
        {
            "sample_id": "q1",
            "question": "Capital of France?",
            "qa_pairs": [{"short_answers": ["Paris"]}],
            "docs": [
                {"title": "France", "text": "Paris is its capital.", "answers_found": [1]},
                {"title": "Spain", "text": "Madrid.", "answers_found": [0]},
            ],
        },
        {
            "sample_id": "q2",
            "question": "Capital of Atlantis?",
            "qa_pairs": [{"short_answers": ["Poseidonia"]}],
            "docs": [
                {"title": "Myths", "text": "Nothing here.", "answers_found": [0]},
                {"title": "Sea", "text": "Water.", "answers_found": [0]},
            ],
        },
    ]


def test_cli_wrong_path_and_unknown_format(tmp_path):
    msg = one_line_error(run_cli("--data", str(tmp_path / "missing.json"), "--predictions", "x.jsonl"))
    assert "missing.json" in msg
    bad = tmp_path / "records.csv"
    bad.write_text("question,answer\nwho,me\n")
    msg = one_line_error(run_cli("--data", str(bad), "--predictions", "x.jsonl"))
    assert "records.csv" in msg
    data = tmp_path / "asqa.json"
    data.write_text(json.dumps(alce_records()))
    msg = one_line_error(run_cli("--data", str(data), "--predictions", str(tmp_path / "nope.jsonl")))
    assert "nope.jsonl" in msg
    preds = tmp_path / "preds.jsonl"
    preds.write_text('{"text": "a"}\nnot json\n')
    msg = one_line_error(run_cli("--data", str(data), "--predictions", str(preds)))
    assert "preds.jsonl:2" in msg
    one_line_error(run_cli("--compare", str(tmp_path / "a"), str(tmp_path / "b")))


def test_cli_scores_predictions_file(tmp_path):
    data = tmp_path / "asqa.json"
    data.write_text(json.dumps(alce_records()))
    preds = tmp_path / "preds.jsonl"
    # q1 answered correctly with a supporting citation; q2 refused: every score is 100 by hand:
    # AR = 1/2 -> 50. refusal P = R = 1, answer P = R = 1 -> F1_GR 100. correctness 1 over answered and
    # answerable -> F1_AC 100. q1: one statement supported, one precise citation -> F1_GC 100. TRUST 100.
    preds.write_text(
        json.dumps({"text": completion("Paris is the capital [1].")})
        + "\n"
        + json.dumps({"text": completion(REFUSAL)})
        + "\n"
    )
    out = tmp_path / "run_a"
    proc = run_cli("--data", str(data), "--predictions", str(preds), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    scores = json.loads((out / "scores.json").read_text())
    assert scores["AR"] == approx(50.0)
    for k in ("F1_AC", "F1_GR", "F1_GC", "TRUST"):
        assert scores[k] == approx(100.0), k
    assert scores["format_compliance"] == approx(100.0)
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [x["refused"] for x in lines] == [False, True]
    assert "TRUST" in (out / "report.md").read_text()
    # the run's own predictions.jsonl scores the same (rows matched by id, in reverse order here), and so does an
    # ALCE-style result file {"data": [{"output": ...}]} (matched by order)
    (tmp_path / "reversed.jsonl").write_text("".join(json.dumps(x) + "\n" for x in reversed(lines)))
    (tmp_path / "alce_result.json").write_text(json.dumps({"data": [{"output": x["text"]} for x in lines]}))
    for name in ("reversed.jsonl", "alce_result.json"):
        proc = run_cli(
            "--data", str(data), "--predictions", str(tmp_path / name), "--out", str(tmp_path / name[:4])
        )
        assert proc.returncode == 0, proc.stderr
        again = json.loads((tmp_path / name[:4] / "scores.json").read_text())
        assert all(again[k] == scores[k] for k in E.METRICS), name

    # a second run where q1 is answered without a citation: F1_GC = 0, TRUST = (100 + 100 + 0) / 3
    preds.write_text(
        json.dumps({"text": completion("Paris is the capital.")})
        + "\n"
        + json.dumps({"text": completion(REFUSAL)})
        + "\n"
    )
    proc = run_cli("--data", str(data), "--predictions", str(preds), "--out", str(tmp_path / "run_b"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "run_b" / "scores.json").read_text())["TRUST"] == approx(200 / 3)

    proc = run_cli("--compare", str(out), str(tmp_path / "run_b"))
    assert proc.returncode == 0, proc.stderr
    trust_row = next(line for line in proc.stdout.splitlines() if line.startswith("| TRUST"))
    assert "100.00" in trust_row and "66.67" in trust_row and "-33.33" in trust_row
    # the interval: a draw of the 2 questions holds q1 with probability 3/4 (TRUST 100 vs 66.67 as above: -33.33)
    # and only q2, the refusal both runs share, with 1/4 (both (0 + 50 + 0) / 3: difference 0)
    assert "[-33.33, +0.00]" in trust_row
    # a predictions.jsonl without the per-question scores: one line naming the file, the line and the field
    lines_b = (tmp_path / "run_b" / "predictions.jsonl").read_text().splitlines()
    row = json.loads(lines_b[1])
    del row["correctness"]
    (tmp_path / "run_b" / "predictions.jsonl").write_text(lines_b[0] + "\n" + json.dumps(row) + "\n")
    proc = run_cli("--compare", str(out), str(tmp_path / "run_b"))
    assert proc.returncode != 0 and "predictions.jsonl:2: no 'correctness' field" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_paired_bootstrap_draws_the_same_questions_for_both_runs():
    def row(correctness):
        return dict(
            answerable=True,
            refused=False,
            correctness=correctness,
            citation_recall=1.0,
            citation_precision=1.0,
        )

    a = [row(c) for c in (0.0, 1.0, 0.5, 0.0, 1.0)]
    assert all(iv == (0.0, 0.0) for iv in E.paired_bootstrap(a, a).values())  # unpaired draws would differ
    # every question answered and answerable: F1_AC = mean correctness in every draw, so B - A is 100 whatever is drawn
    intervals = E.paired_bootstrap([row(0.0)] * 5, [row(1.0)] * 5)
    assert intervals["F1_AC"] == (100.0, 100.0) and intervals["AR"] == (0.0, 0.0)


def test_cli_plot(tmp_path):
    # the fields grpo.py writes (reward_mean, reward/<component> and diagnostics, kl, completion_len_*)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(
        "".join(
            json.dumps(
                {
                    "step": i,
                    "reward_mean": 0.1 * i,
                    "reward_std": 0.3,
                    "reward/format": 0.05 * i,
                    "reward/em": 0.0,
                    "reward/statements": 2.0,
                    "kl": 0.01,
                    "completion_len_mean": 40 - i,
                    "lr": 1e-5,
                }
            )
            + "\n"
            for i in range(5)
        )
    )
    assert E.metric_panels([json.loads(x) for x in metrics.read_text().splitlines()]) == {
        "reward": ["reward_mean"],
        "reward components": ["reward/em", "reward/format"],
        "KL": ["kl"],
        "completion length": ["completion_len_mean"],
    }
    proc = run_cli("--plot", str(metrics), "--out", str(tmp_path / "plots"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # optional dependency: the message must be one clear line
        assert "matplotlib" in one_line_error(proc)
        return
    assert proc.returncode == 0, proc.stderr
    png = tmp_path / "plots" / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one_line_error(run_cli("--plot", str(tmp_path / "missing.jsonl")))
    (tmp_path / "empty.jsonl").write_text(json.dumps({"step": 0, "lr": 1e-5}) + "\n")
    assert "nothing to plot" in one_line_error(run_cli("--plot", str(tmp_path / "empty.jsonl")))


def test_cli_generates_with_a_tiny_random_model(tmp_path):
    # A 2-layer random model with the built-in tokenizer: exercises prompts -> batched greedy generation ->
    # predictions.jsonl / scores.json / report.md. Its answers are noise; only the plumbing is checked.
    import torch

    import model as M
    from data import build_prompt, load_data

    try:
        tokenizer = M.load_tokenizer(builtin.resolve_model_path("builtin"))
    except M.ModelError as e:
        pytest.skip(f"built-in tokenizer unavailable: {e}")
    torch.manual_seed(0)
    cfg = M.ModelConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        eos_token_id=2,
    )
    M.Transformer(cfg).save_pretrained(tmp_path / "tiny", tokenizer=tokenizer)
    out = tmp_path / "run"
    E.main(
        [
            "--model",
            str(tmp_path / "tiny"),
            "--data",
            "builtin",
            "--n",
            "3",
            "--batch-size",
            "2",
            "--max-new-tokens",
            "6",
            "--out",
            str(out),
        ]
    )
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    records = load_data("builtin", split="eval", n=3)
    assert [r["id"] for r in rows] == [r.id for r in records]
    for row, rec in zip(rows, records):
        ids, prefill = build_prompt(rec, tokenizer, worked_example=False)  # eval uses the training prompt
        # batches are sorted by prompt length: each output must still sit with its own record's prompt
        assert row["prompt_tokens"] == len(ids)
        assert row["text"] == prefill + row["completion"] and 1 <= row["n_tokens"] <= 6
    scores = json.loads((out / "scores.json").read_text())
    again = E.trust_score(records, [r["text"] for r in rows])
    assert all(scores[k] == approx(again[k]) for k in E.METRICS)
    assert scores["decoding"] == "greedy" and scores["max_new_tokens"] == 6


def test_load_judge():
    import operator

    assert E.load_judge("operator:eq") is operator.eq
    for spec, words in [
        ("operator", "module:function"),
        ("no_such_module_xyz:f", "cannot load"),
        ("operator:no_such_function", "cannot load"),
        ("math:pi", "not callable"),
    ]:
        with pytest.raises(SystemExit) as e:
            E.load_judge(spec)
        assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(not (SHARED / "data" / "alce").is_dir(), reason="../shared/data/alce not present")
@pytest.mark.parametrize("name", ["asqa", "qampari", "eli5"])
def test_real_dev_sets_refuse_all_and_oracle(name):
    from data import load_records

    path = SHARED / "data" / "alce" / f"{name}_dev50.json"
    raw = json.loads(path.read_text())
    records = load_records(path)
    # answerable counted straight from the raw JSON: some document with a non-zero answers_found
    n = len(raw)
    n_unans = sum(not any(any(d.get("answers_found") or []) for d in r["docs"]) for r in raw)
    assert 0 < n_unans < n
    # refuse everything: AR 0; refusal P = n_unans / n, R = 1; answer F1 0 -> F1_GR = F1(P, 1) / 2; rest 0
    s = E.trust_score(records, [completion(REFUSAL)] * n)
    p = n_unans / n
    assert s["AR"] == 0.0 and s["F1_GR"] == approx(100 * (2 * p / (p + 1)) / 2)
    assert s["F1_AC"] == 0.0 and s["F1_GC"] == 0.0
    # an oracle: refuse the unanswerable, answer each supported gold group once, citing the first document
    # that has it. QAMPARI (comma items) must then score 100 on every part; ASQA and ELI5 come close but not
    # exactly (ASQA: initials like "H. H." split sentences; ELI5: the lexical judge finds extra claims).
    preds = []
    for r in raw:
        if name == "asqa":
            groups = [qa["short_answers"] for qa in r["qa_pairs"]]
        else:
            groups = [[c] for c in r["claims"]] if name == "eli5" else r["answers"]
        parts = []
        for g, aliases in enumerate(groups):
            cite = next((j for j, d in enumerate(r["docs"]) if d["answers_found"][g]), None)
            if cite is not None:
                parts.append(f"{aliases[0].rstrip('.')} [{cite + 1}]")
        sep = ", " if name == "qampari" else ". "
        preds.append(completion(sep.join(parts) + "." if parts else REFUSAL))
    s = E.trust_score(records, preds)
    assert s["F1_GR"] == approx(100.0) and s["AR"] == approx(100 * (n - n_unans) / n)
    if name == "qampari":
        assert all(s[k] == approx(100.0) for k in E.METRICS if k != "AR")
    else:
        assert s["TRUST"] > 95.0
