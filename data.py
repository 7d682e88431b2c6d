"""Grounded-QA data: one record type, the ALCE / Trust-Score loaders, the prompt, and a built-in synthetic task.

    Record            question, gold answer groups, 5 documents with answers_found flags, answerable, source
    load_records      ALCE / Trust-Score JSON (a list) or JSONL (one record a line): ASQA, QAMPARI, ELI5
    synthetic_records the built-in task: fictional lakes, mountains, rivers and cities, one number per document
    load_data         "builtin" -> synthetic task, else a file (or a directory of .json / .jsonl files)
    holdout_split     (train, held out) of real records, stratified by dataset and answerability, by id
    stage_records     stage 1: answerable only; stages 0, 2: a 50/50 mix of answerable and unanswerable (or all)
    training_records  a stage's records: --data less the held-out share, then stage_records
    next_records      the training order: a seeded permutation per epoch, resumable from (epoch, index)
    build_prompt      Trust-Score prompt + one format sentence, chat template, token budget, "<think>" prefill
    training_prompt   the one prompt of training (both stages) and of eval.py

The task, the data format and the prompt are described in docs/METHOD.md. Text normalization, matching and the
refusal sentence are text.py's; what a completion earns is rewards.py's; the evaluation is eval.py's.
"""

import json
import random
import re
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from rewards import matched_groups
from text import REFUSAL_SENTENCE, contains_words, normalize_answer, split_statements


@dataclass
class Record:
    id: str
    question: str
    answers: list[list[str]]  # gold groups of aliases; ELI5: each claim is a group of one
    docs: list[dict]  # {"title", "text", "answers_found": [0/1 per gold group]}
    answerable: bool  # some document has a non-zero answers_found
    source: str  # "asqa" | "qampari" | "eli5" | "synthetic"
    is_list: bool = False  # list questions (QAMPARI): statements are comma-separated items
    meta: dict = field(
        default_factory=dict
    )  # extra facts (the synthetic task's question type, evidence docs)


class DataError(ValueError):
    """Bad input; the message names the file, the record index or line, and the field."""


# ----------------------------------------------------------------------------------------------------------------
# Loading ALCE / Trust-Score files


def read_raw_records(path: Path) -> list[tuple[str, object]]:
    """(where, raw record) pairs: "record i" (0-based) for a JSON list, "line n" (1-based) for JSONL. A .jsonl file
    is always read line by line; another file is a JSON list if it starts with "[", else JSONL. A malformed JSON
    list raises DataError; a JSONL line that does not parse is returned as a DataError value (so skip_bad can skip
    it)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: byte {e.start}: not UTF-8 text") from None
    if path.suffix != ".jsonl" and text.lstrip().startswith("["):  # a JSON list (ALCE's own files)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from None
        return [(f"record {i}", r) for i, r in enumerate(data)]
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            out.append((f"line {n}", DataError(f"{path}: line {n}: invalid JSON: {e.msg}")))
    return out


def gold_groups(raw: dict) -> tuple[str, list[list[str]]]:
    """(source, gold groups) of one raw record, by schema:
    ASQA qa_pairs[].short_answers, QAMPARI answers (alias lists), ELI5 claims (each its own group)."""
    if "qa_pairs" in raw:
        pairs = raw["qa_pairs"]
        if not isinstance(pairs, list) or not all(isinstance(p, dict) for p in pairs):
            raise ValueError("qa_pairs: expected a list of objects")
        groups = [p.get("short_answers") for p in pairs]
        return "asqa", check_groups(groups, "qa_pairs[].short_answers")
    if "answers" in raw:
        if not isinstance(raw["answers"], list):
            raise ValueError("answers: expected a list of alias lists")
        groups = [[a] if isinstance(a, str) else a for a in raw["answers"]]  # a bare string is a group of one
        return "qampari", check_groups(groups, "answers")
    if "claims" in raw:
        claims = raw["claims"]
        if not isinstance(claims, list) or not all(isinstance(c, str) for c in claims):
            raise ValueError("claims: expected a list of strings")
        return "eli5", [[c] for c in claims]
    raise ValueError("schema: unknown record schema (none of qa_pairs, answers, claims)")


def check_groups(groups, name: str) -> list[list[str]]:
    if not isinstance(groups, list):
        raise ValueError(f"{name}: expected a list")
    for g in groups:
        if not isinstance(g, list) or not all(isinstance(a, str) for a in g):
            raise ValueError(f"{name}: expected lists of strings, got {str(g)[:40]!r}")
    return [list(g) for g in groups]


def parse_docs(raw_docs, n_groups: int) -> list[dict]:
    """Documents as {"title", "text", "answers_found"}; answers_found is checked to have one 0/1 per gold group.
    Files without answers_found get it from a whole-word normalized match of the gold aliases in title + text."""
    if not isinstance(raw_docs, list) or not raw_docs:
        raise ValueError("docs: missing or empty (expected a non-empty list of documents)")
    docs = []
    for j, d in enumerate(raw_docs):
        if not isinstance(d, dict) or not isinstance(d.get("text"), str):
            raise ValueError(f"docs[{j}].text: missing or not a string")
        title = d.get("title") or ""
        if not isinstance(title, str):
            raise ValueError(f"docs[{j}].title: not a string")
        found = d.get("answers_found")
        if found is not None:
            if not isinstance(found, list) or not all(isinstance(x, (int, float, bool)) for x in found):
                raise ValueError(f"docs[{j}].answers_found: expected a list of 0/1")
            if len(found) != n_groups:
                raise ValueError(f"docs[{j}].answers_found: {len(found)} flags for {n_groups} gold groups")
            found = [int(bool(x)) for x in found]
        docs.append({"title": title, "text": d["text"], "answers_found": found})
    return docs


def fill_answers_found(docs: list[dict], answers: list[list[str]]):
    for d in docs:
        if d["answers_found"] is None:
            text = normalize_answer(f"{d['title']} {d['text']}")
            d["answers_found"] = [
                int(any(contains_words(text, normalize_answer(a)) for a in g)) for g in answers
            ]


def parse_record(raw, where: str, path: Path) -> Record:
    if not isinstance(raw, dict):
        raise ValueError("record: expected a JSON object")
    question = raw.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question: missing or empty")
    source, answers = gold_groups(raw)
    docs = parse_docs(raw.get("docs"), len(answers))
    fill_answers_found(docs, answers)
    answerable = any(any(d["answers_found"]) for d in docs)
    rid = str(raw.get("id") or raw.get("sample_id") or f"{path.stem}:{where.replace(' ', '')}")
    return Record(rid, question.strip(), answers, docs, answerable, source, is_list=source == "qampari")


def load_records(path, skip_bad: bool = False) -> list[Record]:
    """Records of an ALCE / Trust-Score JSON or JSONL file. A bad record raises DataError naming the file, the
    record index (JSON) or line (JSONL) and the field; with skip_bad=True bad records are counted, reported on
    stderr, and left out."""
    path = Path(path)
    records, bad = [], []
    for where, raw in read_raw_records(path):
        try:
            if isinstance(raw, DataError):
                raise raw
            records.append(parse_record(raw, where, path))
        except ValueError as e:
            err = e if isinstance(e, DataError) else DataError(f"{path}: {where}: {e}")
            if not skip_bad:
                raise err from None
            bad.append(str(err))
    if bad:
        print(f"load_records: skipped {len(bad)} bad record(s) in {path}; first: {bad[0]}", file=sys.stderr)
    return records


# ----------------------------------------------------------------------------------------------------------------
# The built-in synthetic task
#
# Fictional entities (names built from syllables) with one numeric fact each, one short sentence per document, five
# documents per question. One-hop: "What is the height of Mount Kalo?" answered by Mount Kalo's document; two-hop:
# "What is the depth of the lake next to Veri?" needs Veri's document (which names the lake) and the lake's.
# Distractors: one entity of the same kind with the same attribute (so the name has to be matched), the rest
# random. Unanswerable variant: the document holding the answer is replaced by another distractor. Each entity
# name belongs to exactly one split (a hash of the name), so train and eval never share an entity, and the facts
# are drawn fresh for every question: nothing can be memorized, everything must be read.

SYLLABLES = (
    "ka",
    "lo",
    "ve",
    "ri",
    "ta",
    "mo",
    "su",
    "de",
    "ni",
    "pa",
    "ro",
    "fe",
    "ga",
    "zu",
    "be",
    "ti",
    "ha",
    "mi",
    "no",
    "sa",
    "ku",
    "le",
    "vo",
    "dra",
    "sel",
    "tor",
    "vin",
    "bar",
    "quel",
    "osk",
)

# kind: (name pattern, attribute, value range, document sentence patterns)
KINDS = {
    "lake": (
        "Lake {}",
        "depth",
        (8, 950),
        ("{name} has a depth of {v} meters.", "{name} is {v} meters deep."),
    ),
    "mountain": (
        "Mount {}",
        "height",
        (1200, 8800),
        ("{name} has a height of {v} meters.", "{name} is {v} meters high."),
    ),
    "river": (
        "{} River",
        "length",
        (15, 4900),
        ("{name} has a length of {v} kilometers.", "{name} is {v} kilometers long."),
    ),
    "city": (
        "{}",
        "founding year",
        (1050, 1990),
        ("{name} was founded in {v}.", "{name} is a city founded in {v}."),
    ),
}
# Two-hop bridge: a city that lies next to a lake, mountain or river (the document carries no number).
BRIDGE = {
    "lake": ("{city} is a city on the shore of {name}.", "the lake next to {city}"),
    "mountain": ("{city} is a city at the foot of {name}.", "the mountain next to {city}"),
    "river": ("{city} is a city on the banks of {name}.", "the river next to {city}"),
}
EVAL_SHARE = 5  # one name in 5 belongs to the eval split


def name_split(base: str) -> str:
    return "eval" if zlib.crc32(base.encode()) % EVAL_SHARE == 0 else "train"


def base_names(split: str) -> list[str]:
    """All two- and three-syllable names of one split, sorted (so the list is the same on every machine)."""
    names = {(a + b).capitalize() for a in SYLLABLES for b in SYLLABLES if a != b}
    names |= {
        (a + b + c).capitalize()
        for a in SYLLABLES[:12]
        for b in SYLLABLES[:12]
        for c in SYLLABLES[:12]
        if len({a, b, c}) == 3
    }
    return sorted(n for n in names if name_split(n) == split)


def fact_doc(rng: random.Random, kind: str, base: str, value: int) -> dict:
    pattern, _, _, sentences = KINDS[kind]
    name = pattern.format(base)
    return {"title": name, "text": rng.choice(sentences).format(name=name, v=value)}


def synthetic_record(
    rng: random.Random, names: list[str], rid: str, answerable: bool, two_hop: bool, k: int = 5
) -> Record:
    """One question with k documents (see the comment above)."""
    kind = rng.choice(["lake", "mountain", "river"] if two_hop else list(KINDS))
    pattern, attribute, (lo, hi), _ = KINDS[kind]
    bases = rng.sample(names, k)  # target, same-kind distractor, [bridge city,] random distractors
    values = rng.sample(range(lo, hi), 2)  # (gold, the same-kind distractor's value)
    target = bases[0]
    gold = str(values[0])

    evidence = fact_doc(rng, kind, target, values[0])
    docs = [fact_doc(rng, kind, bases[1], values[1])]
    if two_hop:
        city = bases[2]
        bridge_sentence, phrase = BRIDGE[kind]
        docs.append({"title": city, "text": bridge_sentence.format(city=city, name=pattern.format(target))})
        question = f"What is the {attribute} of {phrase.format(city=city)}?"
    else:
        question = f"What is the {attribute} of {pattern.format(target)}?"
    random_bases = bases[3:] if two_hop else bases[2:]
    used = {values[0], values[1]}  # every number in the record is distinct, so answers_found is unambiguous
    distractor_kinds = [kk for kk in KINDS if kk != kind]
    docs += [random_distractor(rng, b, distractor_kinds, used) for b in random_bases]
    if answerable:
        docs.append(evidence)
    else:  # the evidence is removed: one more distractor, about an entity not yet in the record, takes its place
        extra = rng.choice([b for b in rng.sample(names, k + 1) if b not in bases])
        docs.append(random_distractor(rng, extra, distractor_kinds, used))
    rng.shuffle(docs)
    answers = [[gold]]
    for d in docs:
        d["answers_found"] = [int(contains_words(normalize_answer(f"{d['title']} {d['text']}"), gold))]
    evidence_ids = [i + 1 for i, d in enumerate(docs) if d["answers_found"][0]]
    assert answerable == bool(evidence_ids), (rid, docs)
    meta = {
        "two_hop": two_hop,
        "evidence": evidence_ids,
        "target": pattern.format(target),
        "attribute": attribute,
    }
    return Record(rid, question, answers, docs, answerable, "synthetic", is_list=False, meta=meta)


def random_distractor(rng: random.Random, base: str, kinds: list[str], used: set) -> dict:
    """A fact about `base` of a random kind, with a number not yet used in the record."""
    kind = rng.choice(kinds)
    v = rng.randrange(*KINDS[kind][2])
    while v in used:
        v = rng.randrange(*KINDS[kind][2])
    used.add(v)
    return fact_doc(rng, kind, base, v)


def synthetic_records(
    split: str = "train",
    n: int = 1000,
    seed: int = 0,
    two_hop_share: float = 0.2,
    unanswerable_share: float = 0.5,
) -> list[Record]:
    """n seeded records of the built-in task. About `unanswerable_share` of them have the evidence removed and
    `two_hop_share` need two documents. Same (split, n, seed) -> same records."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"ground-grpo-synthetic/{split}/{seed}")
    names = base_names(split)
    out = []
    for i in range(n):
        answerable = rng.random() >= unanswerable_share
        two_hop = rng.random() < two_hop_share
        out.append(synthetic_record(rng, names, f"synthetic-{split}-{seed}-{i}", answerable, two_hop))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Choosing data


def load_data(
    spec: str, split: str = "train", n: int | None = None, seed: int = 0, skip_bad: bool = False
) -> list[Record]:
    """ "builtin" -> the synthetic task (n records of `split`; default 1000 train / 200 eval); otherwise a JSON /
    JSONL file, or a directory whose .json / .jsonl files are all read (`split` is then ignored: pass the eval
    file as the spec). n keeps the first n records."""
    if spec == "builtin":
        return synthetic_records(split, n if n is not None else (1000 if split == "train" else 200), seed)
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl"))
        if not files:
            raise DataError(f"{path}: no .json or .jsonl files")
        records = [r for p in files for r in load_records(p, skip_bad=skip_bad)]
    elif path.is_file():
        records = load_records(path, skip_bad=skip_bad)
    else:
        raise DataError(f"{spec}: no such file or directory (use 'builtin' for the built-in task)")
    return records[:n] if n is not None else records


def holdout_split(records: list[Record], share: float) -> tuple[list[Record], list[Record]]:
    """(train, held out): within each (source, answerable) stratum, the round(share * n) records with the
    smallest crc32(id) are held out. A record's side depends only on its id and its stratum's records, so a file
    split alone and the same file inside a directory split alike (grpo.py --holdout and eval.py --holdout agree)."""
    if not 0 <= share < 1:
        raise DataError(f"--holdout must be in [0, 1), got {share!r}")
    strata: dict[tuple[str, bool], list[int]] = {}  # stratum -> indices into records
    for i, r in enumerate(records):
        strata.setdefault((r.source, r.answerable), []).append(i)
    held = set()
    for members in strata.values():
        ranked = sorted(members, key=lambda i: (zlib.crc32(records[i].id.encode()), records[i].id))
        held.update(ranked[: round(share * len(members))])
    train_part = [r for i, r in enumerate(records) if i not in held]
    held_part = [r for i, r in enumerate(records) if i in held]
    return train_part, held_part


MIXES = ("balanced", "natural")  # stage_records' mix of stages 0 and 2


def stage_records(records: list[Record], stage: int, seed: int = 0, mix: str = "balanced") -> list[Record]:
    """Stage 1: the answerable records. Stages 0 (the warm-up) and 2, mix "balanced": equally many answerable and
    unanswerable records (as many as the smaller side has); mix "natural": every record, the data's own share of
    unanswerable ones. Shuffled, seeded."""
    rng = random.Random(seed)
    pos = [r for r in records if r.answerable]
    neg = [r for r in records if not r.answerable]
    if mix not in MIXES:
        raise ValueError(f"mix must be one of {MIXES}, got {mix!r}")
    if stage == 1:
        if not pos:
            raise DataError("stage 1 needs answerable records; the data has none")
        rng.shuffle(pos)
        return pos
    if stage in (0, 2) and mix == "natural":
        mix_records = list(records)
        rng.shuffle(mix_records)
        return mix_records
    if stage in (0, 2):
        if not pos or not neg:
            raise DataError(
                f"stage {stage} needs answerable and unanswerable records; the data has {len(pos)} "
                f"answerable and {len(neg)} unanswerable"
            )
        m = min(len(pos), len(neg))
        mix = rng.sample(pos, m) + rng.sample(neg, m)
        rng.shuffle(mix)
        return mix
    raise ValueError(f"stage must be 0, 1 or 2, got {stage!r}")


def training_records(spec: str, holdout: float, stage: int, seed: int, mix: str) -> list[Record]:
    """The records a training stage draws from: --data less the share --holdout keeps for eval.py --holdout, then
    stage_records' selection."""
    records = load_data(spec, split="train", seed=seed)
    if holdout:
        records = holdout_split(records, holdout)[0]
    return stage_records(records, stage, seed, mix)


# ----------------------------------------------------------------------------------------------------------------
# Prompts
#
# Templates and instructions of the Trust-Score evaluation prompts (../shared/data/trust_prompts/*_refusal.json;
# a test checks these copies against the files). The synthetic task uses a shorter instruction in the same style
# (the probe: ~200-300 token prompts for a 135M model on a CPU), keeping the refusal sentence verbatim.

DEMO_PROMPT = "{INST}\n\nQuestion: {Q}\n\n{D}\nAnswer: {A}"
DOC_PROMPT = "Document [{ID}](Title: {T}): {P}\n"
DEMO_SEP = "\n\n\n"
_REFUSE = f'If none of the provided documents contain the answer, only respond with "{REFUSAL_SENTENCE}".'
INSTRUCTION = (
    "Instruction: Write an accurate, engaging, and concise answer for the given question using only the provided "
    "search results (some of which might be irrelevant) and cite them properly. Use an unbiased and journalistic "
    "tone. Always cite for any factual claim. When citing several search results, use [1][2][3]. Cite at least one "
    "document and at most three documents in each sentence. If multiple documents support the sentence, only cite "
    f"a minimum sufficient subset of the documents. {_REFUSE} Do not add further explanation as to why an answer "
    "cannot be provided, just state the response above as-is."
)
LIST_INSTRUCTION = (
    "Instruction: Provide a list of accurate answers for the given question using only the provided search results "
    "(some of which might be irrelevant) and cite them properly. Always cite one and only one document for each "
    "answer. Separate answers by commas. For questions that have more than 5 answers, write at least 5 answers. "
    f"{_REFUSE} Do not add further explanation as to why an answer cannot be provided, just state the response "
    "above as-is."
)
SYNTHETIC_INSTRUCTION = (
    "Instruction: Answer the question in one sentence using only the provided search results and cite the "
    f"document that contains the answer, like [2]. {_REFUSE}"
)
INSTRUCTIONS = {
    "asqa": INSTRUCTION,
    "eli5": INSTRUCTION,
    "qampari": LIST_INSTRUCTION,
    "synthetic": SYNTHETIC_INSTRUCTION,
}
# The paper does not publish its GRPO system prompt: one short sentence asks for the format.
FORMAT_SENTENCE = (
    "First think inside <think> </think>, then write only the final answer with its citation inside "
    "<answer> </answer>."
)
PREFILL = "<think>"
STOP_STRINGS = ["</answer>"]  # the model keeps writing after its answer block: the sampler stops a row there

# Worked examples (fictional names, outside both synthetic splits): the untrained 135M model writes neither the
# tags nor a citation without one. The answer is short because the model then cites instead of copying a whole
# document sentence, and the think names the target before the document number because that makes the right number
# likelier (both measured: docs/EXPERIMENTS.md). The evidence moves between the example's three documents from
# question to question (worked_example), so the citation cannot be learned as "always [2]".
EXAMPLE = dict(
    question="What is the height of Mount Ashgrove?",
    evidence=("Mount Ashgrove", "Mount Ashgrove has a height of 2310 meters."),
    distractors=[
        ("Mount Pellor", "Mount Pellor has a height of 4075 meters."),
        ("Lake Quenby", "Lake Quenby has a depth of 61 meters."),
    ],
    answer="<think>The question asks about Mount Ashgrove. Mount Ashgrove is in Document [{K}].</think>"
    "<answer>2310 meters [{K}].</answer>",
)
LIST_EXAMPLE = dict(
    question="Which rivers flow into Lake Quenby?",
    docs=[
        ("Arle River", "The Arle River flows into Lake Quenby."),
        ("Brisk River", "The Brisk River flows into Lake Quenby."),
    ],
    answer="<think>Documents [1] and [2] name rivers that flow into Lake Quenby.</think><answer>Arle River [1], "
    "Brisk River [2]</answer>",
)

# The refusal example (training_prompt shows it in both stages and in eval.py): without it the untrained model
# never writes the refusal sentence, so the refusal reward would have nothing to reinforce.
REFUSAL_EXAMPLE = dict(
    question="What is the depth of Lake Varrow?",
    docs=[
        ("Lake Quenby", "Lake Quenby has a depth of 61 meters."),
        ("Mount Pellor", "Mount Pellor has a height of 4075 meters."),
    ],
    answer=f"<think>The question asks about Lake Varrow. No document is about Lake Varrow.</think>"
    f"<answer>{REFUSAL_SENTENCE}</answer>",
)


def fill(template: str, values: dict) -> str:
    """Replace {KEY} placeholders in one pass (a question containing "{D}" stays as written)."""
    return re.sub(r"\{(\w+)\}", lambda m: str(values.get(m.group(1), m.group(0))), template)


def render_docs(docs: list[tuple[str, str]]) -> str:
    return "".join(fill(DOC_PROMPT, {"ID": i, "T": t, "P": p}) for i, (t, p) in enumerate(docs, start=1))


def render_demo(question: str, docs: list[tuple[str, str]], answer: str) -> str:
    """The Trust-Score demo template without its instruction: "Question: {Q}\\n\\n{D}\\nAnswer: {A}"."""
    return fill(DEMO_PROMPT, {"INST": "", "Q": question, "D": render_docs(docs), "A": answer}).strip()


def worked_example(record: Record) -> dict:
    """The worked example shown with this record: the list example for list questions, else EXAMPLE with its
    evidence at position k = 1 + crc32(record id) % 3 among its three documents, cited as [k]."""
    if record.is_list:
        return LIST_EXAMPLE
    k = zlib.crc32(record.id.encode()) % 3
    docs = EXAMPLE["distractors"][:k] + [EXAMPLE["evidence"]] + EXAMPLE["distractors"][k:]
    return dict(question=EXAMPLE["question"], docs=docs, answer=fill(EXAMPLE["answer"], {"K": k + 1}))


def render_user(
    record: Record,
    texts: list[str],
    instruction: str,
    worked_example_shown: bool,
    refusal_example: bool = False,
) -> str:
    """The one user turn: the instruction, optional worked examples, then the question and its documents."""
    target = render_demo(record.question, [(d["title"], t) for d, t in zip(record.docs, texts)], "")
    examples = []
    if worked_example_shown:
        examples.append(worked_example(record))
    if refusal_example:
        examples.append(REFUSAL_EXAMPLE)
    if not examples:
        return f"{instruction}\n\n{target}"
    demos = DEMO_SEP.join(render_demo(ex["question"], ex["docs"], ex["answer"]) for ex in examples)
    return f"{instruction}\n\n{'Examples' if len(examples) > 1 else 'Example'}:\n{demos}{DEMO_SEP}{target}"


def chat_ids(tokenizer, user: str) -> list[int]:
    messages = [{"role": "system", "content": FORMAT_SENTENCE}, {"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text + PREFILL, add_special_tokens=False)["input_ids"]


def build_prompt(
    record: Record,
    tokenizer,
    max_prompt_tokens: int = 1024,
    worked_example: bool = True,
    instruction: str | None = None,
    refusal_example: bool = False,
) -> tuple[list[int], str]:
    """(prompt_ids, prefill): the chat-templated prompt, ending inside the assistant turn with `prefill`
    ("<think>") already in it; score prefill + decoded completion. The system message is the one format sentence.
    worked_example adds a short cited example (tags and citation shown: the 135M model writes neither without
    one); refusal_example adds a second one whose answer is the refusal sentence (for stage 2: the untrained model
    never refuses, so without it the refusal reward has nothing to reinforce).

    Fits max_prompt_tokens by cutting document texts to a common token cap (longest first; titles, question,
    instruction and example are never cut). Raises DataError if even empty documents do not fit."""
    instruction = instruction if instruction is not None else INSTRUCTIONS.get(record.source, INSTRUCTION)
    texts = [d["text"] for d in record.docs]
    ids = chat_ids(tokenizer, render_user(record, texts, instruction, worked_example, refusal_example))
    if len(ids) <= max_prompt_tokens:
        return ids, PREFILL
    doc_tokens = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]  # per doc (L_i,)
    over = len(ids) - max_prompt_tokens
    for _ in range(10):  # re-tokenizing the joined text can differ by a token or two: tighten and retry
        cap = water_level(lengths=[len(t) for t in doc_tokens], remove=over)
        texts = [tokenizer.decode(t[:cap]).strip() for t in doc_tokens]
        ids = chat_ids(tokenizer, render_user(record, texts, instruction, worked_example, refusal_example))
        if len(ids) <= max_prompt_tokens:
            return ids, PREFILL
        if cap == 0:
            break
        over += len(ids) - max_prompt_tokens
    raise DataError(
        f"record {record.id}: field question: the prompt needs {len(ids)} tokens with document texts "
        f"cut to {cap} tokens, more than max_prompt_tokens={max_prompt_tokens} (the question, "
        "instruction and examples are never cut)"
    )


def water_level(lengths: list[int], remove: int) -> int:
    """Largest cap c with sum(max(0, L_i - c)) >= remove: cutting every text to c tokens removes enough, taking
    from the longest texts first."""
    for c in range(max(lengths, default=0), -1, -1):
        if sum(max(0, n - c) for n in lengths) >= remove:
            return c
    return 0


def training_prompt(
    record: Record, tokenizer, max_prompt_tokens: int = 1024, examples: bool = False
) -> tuple[list[int], str]:
    """(prompt_ids, prefill) of one record: the same prompt in every stage and in eval.py. The warm-up teaches the
    format, so by default the prompt holds no examples (less than half the tokens); examples=True adds the worked
    and the refusal example, which a model that skipped the warm-up needs to write the format at all."""
    return build_prompt(
        record, tokenizer, max_prompt_tokens, worked_example=examples, refusal_example=examples
    )


# ----------------------------------------------------------------------------------------------------------------
# The training order: a seeded permutation per epoch, so a position (epoch, index) is all a resume needs


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = random.Random(seed * 1_000_003 + epoch)
    order = list(range(n))
    g.shuffle(order)
    return order


def next_records(
    records: list[Record], pos: list[int], count: int, seed: int
) -> tuple[list[Record], list[int]]:
    """Take `count` records from position pos = [epoch, index]; returns (records, new pos)."""
    epoch, idx = pos
    out = []
    while len(out) < count:
        order = epoch_order(len(records), seed, epoch)
        take = min(count - len(out), len(records) - idx)
        out += [records[order[i]] for i in range(idx, idx + take)]
        idx += take
        if idx == len(records):
            epoch, idx = epoch + 1, 0
    return out, [epoch, idx]


# ----------------------------------------------------------------------------------------------------------------
# Gold completions for the supervised warm-up (grpo.py --stage 0): what the assistant writes after the prefilled
# "<think>", written by rule from what the record knows about its evidence, or read from a file


def gold_completion(record: Record) -> str:
    """The completion a grounded model writes for this record. The think names the entity the answer is about and
    the document about it (or says that no document is about it); the answer copies that document's sentence with
    its citation, or is the refusal sentence. Built-in records know their evidence (meta); ALCE-style records state
    each gold answer the documents support (answers_found) as a statement citing one document that has it."""
    if record.source == "synthetic":
        target, docs = record.meta["target"], record.docs
        think = f"The question asks about {record.question.split(' of ', 1)[1].rstrip('?')}."
        if record.meta[
            "two_hop"
        ]:  # the bridge document names the target: "<city> is a city on the shore of X."
            bridge = next(i for i, d in enumerate(docs, 1) if d["text"].endswith(f" {target}."))
            think += f" Document [{bridge}] says it is {target}."
        if not record.answerable:
            return f"{think} No document is about {target}.</think><answer>{REFUSAL_SENTENCE}</answer>"
        k = record.meta["evidence"][0]
        return (
            f"{think} {target} is in Document [{k}].</think>"
            f"<answer>{docs[k - 1]['text'].rstrip('.')} [{k}].</answer>"
        )
    parts, stated = [], set()
    for g, aliases in enumerate(record.answers):
        docs = [i for i, d in enumerate(record.docs, 1) if d["answers_found"][g]]
        if (
            docs and g not in stated
        ):  # a group an earlier statement already holds ("8" in "season 8") is not repeated
            # an alias the statement splitter keeps whole ("H. H. Asquith" is cut at its periods), else the first
            alias = next(
                (a for a in aliases if len(split_statements(a + ".", record.is_list)) == 1), aliases[0]
            )
            parts.append((f"{alias.rstrip('.')} [{docs[0]}]", docs[0]))
            stated.update(matched_groups(alias, record.answers))
    if not parts:
        return f"No document answers the question.</think><answer>{REFUSAL_SENTENCE}</answer>"
    cited = [f"[{k}]" for k in sorted({k for _, k in parts})]
    think = (
        f"Document {cited[0]} answers"
        if len(cited) == 1
        else f"Documents {', '.join(cited[:-1])} and {cited[-1]} answer"
    ) + " the question."
    answer = ", ".join(p for p, _ in parts) if record.is_list else " ".join(p + "." for p, _ in parts)
    return f"{think}</think><answer>{answer}</answer>"


def load_gold_completions(path) -> dict[str, str]:
    """{record id: completion} from a JSONL file of {"id": ..., "completion": ...} lines (a leading "<think>",
    the prompt's prefill, is dropped). DataError names the file, line and field."""
    path, out = Path(path), {}
    for where, raw in read_raw_records(path):
        if isinstance(raw, DataError):
            raise raw
        if not isinstance(raw, dict) or not isinstance(raw.get("id"), (str, int)):
            raise DataError(f"{path}: {where}: id: missing (expected a string naming the record)")
        if not isinstance(raw.get("completion"), str) or not raw["completion"].strip():
            raise DataError(f"{path}: {where}: completion: missing or not a string")
        out[str(raw["id"])] = raw["completion"].removeprefix(PREFILL)
    return out
