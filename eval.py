"""
Trust-Score evaluation of a checkpoint on grounded, cited question answering.

    python eval.py --model builtin --data builtin --n 50
    python eval.py --data ../shared/data/alce/asqa_dev50.json --predictions runs/eval/x/predictions.jsonl
    python eval.py --compare runs/eval/A runs/eval/B   # B - A, with a paired-bootstrap interval
    python eval.py --plot runs/stage1/metrics.jsonl

Reads top to bottom:
  1. coverage and support rules (what the documents say about the gold answers)
  2. per-question scores: answer correctness, citation recall / precision
  3. trust_score(records, predictions): AR, F1_AC, F1_GR, F1_GC, TRUST (percentages)
  4. the CLI: generate, score, write predictions.jsonl / scores.json / report.md; --compare; --plot

This module holds the evaluation and its CLI only; the trainer does not import it. Normalization, substring
matching and the evaluator's refusal rule (text.is_refused) are text.py's; the stage-2 reward in the report is
rewards.py's; the records and the prompt are data.py's; the trainer's per-step reports are metrics.py's.

Every definition follows the Trust-Score evaluator (declare-lab/trust-align, trust_eval/metrics.py), as written
out in docs/METHOD.md ("Evaluation"). Two things differ from the paper's evaluator because its NLI model is not
available offline, and every output says so:
  - citation support is this project's rule: documents support a statement when, for every gold answer group the
    statement contains, one cited document has answers_found = 1 for that group. A statement containing no gold
    answer cannot be checked and counts as unsupported.
  - ELI5 claims ("is this claim entailed by the answer?") are judged by a lexical approximation unless a judge is
    supplied (`--judge module:function`, called as judge(premise, hypothesis) -> bool or probability).
Smaller choices, where the evaluator's code and the spec part ways or the spec is silent:
  - an empty answer is answered (not a refusal) with no statements: citation recall and precision 0, included in
    the means over answered questions (the evaluator's code skips such questions in the citation means).
  - "[0]" is outside 1..k (in the evaluator's code it would index the last document); a repeated citation
    ("[1][1]") counts once (text.parse_citations).
"""

import argparse
import importlib
import json
import random
from pathlib import Path

from rewards import extract_answer, stage_reward
from text import (
    contains_substring,
    is_refused,
    normalize_answer,
    parse_citations,
    remove_citations,
    split_statements,
)

MAX_CITATIONS = 3  # at most the first 3 citations of a statement are counted
QAMPARI_TOP_K = 5  # QAMPARI recall saturates at 5 correct items
CLAIM_SOURCES = ("eli5", "expertqa")  # gold "answers" are claim sentences that need an entailment judge

CITATION_NOTE = (
    "citation support judged by this project's rule (answers_found / substring), not by NLI; "
    "a statement containing no gold answer counts as unsupported"
)

# -----------------------------------------------------------------------------
# 1. Rules: entailment judge, which documents cover which gold group (the refusal rule is text.is_refused)


# Function words ignored by the lexical judge: a claim is about its content words.
STOPWORDS = set(
    """a an the and or but if of to in on at by for with from as into than then so such that this these
those it its is are was were be been being do does did has have had not no can could will would should may might
must they them their there he she his her we our you your i me my what which who whom whose when where why how
also more most very some any all each many much other only own same about over under up down out""".split()
)
LEXICAL_THRESHOLD = 0.6
LEXICAL_JUDGE_NAME = (
    f"lexical approximation (a claim counts as entailed when >= {LEXICAL_THRESHOLD:.0%} of its "
    f"content words occur in the text), not an NLI model"
)


def lexical_judge(premise, hypothesis):
    """Stand-in for an NLI model: share of the hypothesis' content words that occur in the premise >= 0.6."""
    words = [w for w in normalize_answer(hypothesis).split() if w not in STOPWORDS]
    if not words:
        return False
    present = set(normalize_answer(premise).split())
    return sum(w in present for w in words) / len(words) >= LEXICAL_THRESHOLD


def load_judge(spec):
    """'module:function' -> callable(premise, hypothesis); one-line error if it cannot be imported."""
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise SystemExit(f"eval.py: --judge must look like module:function, got {spec!r}")
    try:
        judge = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"eval.py: cannot load judge {spec!r}: {e}")
    if not callable(judge):
        raise SystemExit(f"eval.py: judge {spec!r} is not callable")
    return judge


def entailed(judge, premise, hypothesis):
    """A judge may answer True/False or a probability; >= 0.5 counts as entailed."""
    return float(judge(premise, hypothesis)) >= 0.5


def is_claim_record(record):
    return record.source in CLAIM_SOURCES


def contains_group(record, text, group, judge):
    """Does `text` state gold group `group`? Aliases: normalized substring. Claims (ELI5): the judge."""
    if is_claim_record(record):
        return entailed(judge, text, record.answers[group][0])
    norm = normalize_answer(text)
    return any(contains_substring(norm, normalize_answer(a)) for a in record.answers[group])


def document_coverage(record, judge):
    """covers[d][g] = 1 if document d contains gold group g: its answers_found flag, or the text when it has none."""
    n_groups = len(record.answers)
    covers = []
    for doc in record.docs:
        found = doc.get("answers_found")
        if found is not None and len(found) == n_groups:
            covers.append([int(bool(f)) for f in found])
        else:
            text = f"{doc.get('title', '')} {doc.get('text', '')}"
            covers.append([int(contains_group(record, text, g, judge)) for g in range(n_groups)])
    return covers  # (k docs, G groups)


def answer_text(prediction):
    """The answer block of a completion; without one, the whole text is the answer."""
    prediction = prediction or ""
    answer = extract_answer(prediction)
    return prediction if answer is None else answer


# -----------------------------------------------------------------------------
# 2. Per-question scores


def f1(p, r):
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def correctness(record, answer, supported, judge):
    """Answer correctness of an answerable, answered question, over the gold groups the documents support."""
    text = remove_citations(answer)
    groups = [g for g, s in enumerate(supported) if s]
    if record.is_list:
        # QAMPARI: comma items; precision = items equal to a supported alias; recall saturates at 5 hits
        items = [normalize_answer(x) for x in text.rstrip().rstrip(".").rstrip(",").split(",")]
        items = [x for x in items if x]
        aliases = {normalize_answer(a) for g in groups for a in record.answers[g]}
        precision = sum(x in aliases for x in items) / len(items) if items else 0.0
        hits = sum(any(normalize_answer(a) in items for a in record.answers[g]) for g in groups)
        recall = min(QAMPARI_TOP_K, hits) / min(QAMPARI_TOP_K, len(groups))
        return f1(precision, recall)
    # ASQA-style (and synthetic): share of supported groups with an alias inside the answer; ELI5: claims entailed
    return sum(contains_group(record, text, g, judge) for g in groups) / len(groups)


def supports(covers, doc_ids, groups):
    """Documents doc_ids (0-based) support a statement containing `groups` iff every group is covered by one."""
    return bool(groups) and all(any(covers[d][g] for d in doc_ids) for g in groups)


def citation_scores(record, answer, covers, judge):
    """(recall, precision, n_statements, n_citations) of one answered question.

    recall = supported statements / statements. precision = precise citations / counted citations, where a
    statement's citations are counted only when it has some and all are in 1..k (as in the evaluator); of those,
    the first MAX_CITATIONS count. With one citation it is precise iff the statement is supported; with several,
    only if they support it jointly, and then a citation is imprecise when it does not support the statement
    alone, the others do without it, and it covers no gold group the others also cover.
    """
    statements = split_statements(answer, record.is_list)
    k = len(record.docs)
    n_supported, n_precise, n_citations = 0, 0, 0
    for statement in statements:
        cites = parse_citations(statement)
        if not cites or any(not 1 <= c <= k for c in cites):
            continue  # uncited or out of range: unsupported, and its citations are not counted
        docs = [c - 1 for c in cites[:MAX_CITATIONS]]
        n_citations += len(docs)
        text = remove_citations(statement)
        groups = [g for g in range(len(record.answers)) if contains_group(record, text, g, judge)]
        if not supports(covers, docs, groups):
            continue
        n_supported += 1
        if len(docs) == 1:
            n_precise += 1
            continue
        for i, d in enumerate(docs):
            others = docs[:i] + docs[i + 1 :]
            alone = supports(covers, [d], groups)
            others_suffice = supports(covers, others, groups)
            shares_group = any(
                covers[d][g] and any(covers[o][g] for o in others) for g in range(len(record.answers))
            )
            n_precise += int(alone or not others_suffice or shares_group)
    recall = n_supported / len(statements) if statements else 0.0
    precision = n_precise / n_citations if n_citations else 0.0
    return recall, precision, len(statements), n_citations


def score_question(record, prediction, judge=lexical_judge):
    """Everything the aggregate metrics need about one question, as a flat dict (also written to predictions.jsonl)."""
    answer = answer_text(prediction)
    covers = document_coverage(record, judge)
    supported = [int(any(col)) for col in zip(*covers)] if covers else [0] * len(record.answers)
    answerable = any(supported)
    refused = is_refused(answer)
    row = dict(
        answerable=answerable,
        refused=refused,
        correctness=0.0,
        citation_recall=None,
        citation_precision=None,
        n_statements=0,
        n_citations=0,
    )
    if answerable and not refused:
        row["correctness"] = correctness(record, answer, supported, judge)
    if not refused:
        rec, prec, n_st, n_cit = citation_scores(record, answer, covers, judge)
        row.update(citation_recall=rec, citation_precision=prec, n_statements=n_st, n_citations=n_cit)
    return row


# -----------------------------------------------------------------------------
# 3. Dataset-level Trust-Score


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def ratio(num, den):
    return num / den if den else 0.0  # an empty denominator gives 0


def harmonic_mean(a, b):
    return 2 * a * b / (a + b) if a > 0 and b > 0 else 0.0


def aggregate(rows):
    """AR, F1_GR, F1_AC, F1_GC, TRUST (percentages) and their parts, from score_question rows."""
    n = len(rows)
    answered = [r for r in rows if not r["refused"]]
    answerable = [r for r in rows if r["answerable"]]
    n_refused_right = sum(r["refused"] and not r["answerable"] for r in rows)
    n_answered_right = sum(not r["refused"] and r["answerable"] for r in rows)
    refusal_p = ratio(n_refused_right, n - len(answered))
    refusal_r = ratio(n_refused_right, n - len(answerable))
    answer_p = ratio(n_answered_right, len(answered))
    answer_r = ratio(n_answered_right, len(answerable))
    # correctness is 0 unless answerable and answered, so these two means are the evaluator's "calibrated" EM
    ac_answered = mean(r["correctness"] for r in answered)
    ac_answerable = mean(r["correctness"] for r in answerable)
    cit_recall = mean(r["citation_recall"] for r in answered)
    cit_precision = mean(r["citation_precision"] for r in answered)
    s = dict(
        AR=100 * ratio(len(answered), n),
        F1_AC=100 * harmonic_mean(ac_answered, ac_answerable),
        F1_GR=100 * (f1(refusal_p, refusal_r) + f1(answer_p, answer_r)) / 2,
        F1_GC=100 * f1(cit_recall, cit_precision),
    )
    s["TRUST"] = (s["F1_AC"] + s["F1_GR"] + s["F1_GC"]) / 3
    s.update(
        n=n,
        n_answered=len(answered),
        n_answerable=len(answerable),
        refusal_precision=100 * refusal_p,
        refusal_recall=100 * refusal_r,
        refusal_f1=100 * f1(refusal_p, refusal_r),
        answer_precision=100 * answer_p,
        answer_recall=100 * answer_r,
        answer_f1=100 * f1(answer_p, answer_r),
        AC_answered=100 * ac_answered,
        AC_answerable=100 * ac_answerable,
        citation_recall=100 * cit_recall,
        citation_precision=100 * cit_precision,
    )
    return s


def score_all(records, predictions, judge=None):
    """Per-question rows for (records, predictions); predictions are full completions (str or None)."""
    if len(records) != len(predictions):
        raise ValueError(f"{len(records)} records but {len(predictions)} predictions")
    return [score_question(rec, pred, judge or lexical_judge) for rec, pred in zip(records, predictions)]


def trust_score(records, predictions, judge=None):
    """Trust-Score of completions on records: dict with AR, F1_AC, F1_GR, F1_GC, TRUST (percentages) and parts.

    judge: callable(premise, hypothesis) -> bool | probability, used only for claim (ELI5) records;
    default the lexical approximation. The dict's "notes" say which judge and support rule were used.
    """
    return trust_score_of_rows(records, score_all(records, predictions, judge), judge)


def trust_score_of_rows(records, rows, judge=None):
    """trust_score from rows already scored by score_all: a caller that keeps the rows scores each question once
    (evaluate needs the rows, the scores and the per-source scores)."""
    scores = aggregate(rows)
    notes = [CITATION_NOTE]
    if any(is_claim_record(r) for r in records):
        name = (
            LEXICAL_JUDGE_NAME if judge is None else f"user judge {getattr(judge, '__name__', repr(judge))}"
        )
        notes.append(f"claims judged by {name}")
    scores["notes"] = notes
    return scores


def reward_summary(records, predictions):
    """Format compliance (%), mean tag count and mean stage-2 reward, via rewards.stage_reward."""
    parts = [stage_reward(pred or "", rec, 2) for rec, pred in zip(records, predictions)]
    return dict(
        format_compliance=100 * mean(c["format"] for _, c in parts),
        tag_count=mean(c["tag_count"] for _, c in parts),
        stage2_reward=mean(total for total, _ in parts),
    )


# -----------------------------------------------------------------------------
# 4. The CLI: generate (or read) predictions, score them, write the run; compare two runs; plot a training run

METRICS = ("TRUST", "AR", "F1_AC", "F1_GR", "F1_GC")
DETAILS = (
    "AC_answered",
    "AC_answerable",
    "refusal_precision",
    "refusal_recall",
    "refusal_f1",
    "answer_precision",
    "answer_recall",
    "answer_f1",
    "citation_recall",
    "citation_precision",
    "format_compliance",
    "tag_count",
    "stage2_reward",
)
PREDICTION_KEYS = ("text", "prediction", "output", "completion")  # first present key is the completion


def fail(message):
    """A one-line error: no traceback for bad input."""
    raise SystemExit(f"eval.py: {message}")


def load_eval_records(spec, n=None, holdout=0.0):
    """Records of --data (a file, a directory of them, or 'builtin' -> the synthetic eval split), the first n;
    with holdout > 0 only the part grpo.py --holdout left out of training."""
    from data import holdout_split, load_data

    if spec != "builtin" and not Path(spec).exists():
        fail(f"--data {spec}: no such file")
    if holdout and spec == "builtin":
        fail("--holdout is for --data files (the built-in task has its own eval split)")
    try:
        records = load_data(spec, split="eval")
        if holdout:
            records = holdout_split(records, holdout)[1]
        records = records[:n] if n is not None else records
    except (
        ValueError,
        KeyError,
        TypeError,
        IndexError,
        UnicodeDecodeError,
    ) as e:  # data.DataError is a ValueError
        fail(f"--data {spec}: {e}".splitlines()[0])
    if not records:
        fail(f"--data {spec}: no records")
    return records


def read_jsonl(path):
    """List of JSON values, one per non-empty line; one-line error naming file and line."""
    path = Path(path)
    if not path.is_file():
        fail(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    fail(f"{path}:{i}: not JSON ({e.msg})")
    return rows


def prediction_text(row, where):
    """The completion in one predictions row: a string, or a dict with text / prediction / output / completion."""
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        if "text" not in row and "prefill" in row and "completion" in row:
            return str(row["prefill"] or "") + str(row["completion"] or "")
        for key in PREDICTION_KEYS:
            if key in row:
                return "" if row[key] is None else str(row[key])
    fail(f"{where}: expected a string or an object with one of the fields {', '.join(PREDICTION_KEYS)}")


def load_predictions(path, records):
    """Completions for records from a JSONL file, a JSON list, or an ALCE result file ({"data": [...]}).
    Rows are matched to records by "id" when every row has one, else by order."""
    path = Path(path)
    if not path.is_file():
        fail(f"--predictions {path}: no such file")
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            fail(f"--predictions {path}: not JSON ({e.msg}, line {e.lineno})")
        if isinstance(rows, dict) and isinstance(rows.get("data"), list):
            rows = rows["data"]  # an ALCE / Trust-Score result file: {"args": ..., "data": [{..., "output"}]}
        if not isinstance(rows, list):
            fail(f"--predictions {path}: expected a JSON list (or an object with a 'data' list)")
    else:
        rows = read_jsonl(path)
    if rows and all(isinstance(r, dict) and "id" in r for r in rows):
        by_id = {str(r["id"]): (i, r) for i, r in enumerate(rows, 1)}
        texts = []
        for rec in records:
            if str(rec.id) not in by_id:
                fail(f"--predictions {path}: no prediction for record id {rec.id!r}")
            i, row = by_id[str(rec.id)]
            texts.append(prediction_text(row, f"{path}:{i}"))
        return texts
    if len(rows) < len(records):
        fail(f"--predictions {path}: {len(rows)} predictions for {len(records)} records (and no 'id' field)")
    return [prediction_text(r, f"{path}:{i}") for i, r in enumerate(rows[: len(records)], 1)]


def generate_predictions(
    model_name, records, batch_size=8, max_new_tokens=256, seed=0, examples=False, dtype=None, device=None
):
    """Greedy completions with the KV-cached sampler, batched by prompt length, on the GPU when there is one (in
    bf16 there unless dtype says otherwise; device: default the GPU when there is one), stopping where training
    stops. -> list of dicts per record."""
    import torch
    from tqdm import tqdm

    from builtin import resolve_model_path
    from data import STOP_STRINGS, training_prompt
    from distributed import compute_dtype
    from memory import DTYPES
    from model import Transformer, load_tokenizer
    from sampler import eos_token_ids, generate

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[compute_dtype(dtype, device)]
    try:
        path = resolve_model_path(model_name)
        tokenizer = load_tokenizer(path)
        net = Transformer.from_pretrained(path, dtype=dtype, device=device).eval()
    except (OSError, ValueError) as e:
        fail(f"--model {model_name}: {e}".splitlines()[0])
    try:
        # the training prompt for every model, so runs compare fairly: (prompt_ids, prefill) each
        prompts = [training_prompt(r, tokenizer, examples=examples) for r in records]
    except ValueError as e:  # data.DataError: a prompt over the budget
        fail(str(e).splitlines()[0])
    order = sorted(range(len(records)), key=lambda i: len(prompts[i][0]))  # similar lengths: little padding
    eos = eos_token_ids(net, tokenizer)  # the tokenizer's and the model config's, as in training
    out = [None] * len(records)
    with torch.no_grad(), tqdm(total=len(records), desc="generating", unit="question") as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            ids, mask, _ = generate(
                net,
                [prompts[i][0] for i in rows],
                eos_token_ids=eos,
                group_size=1,
                max_new_tokens=max_new_tokens,
                temperature=0.0,
                seed=seed,
                stop_strings=STOP_STRINGS,
                tokenizer=tokenizer,
            )
            ids, mask = ids.cpu(), mask.cpu()  # decoding is host work
            for r, i in enumerate(rows):  # ids, mask: (len(rows), max_new_tokens)
                n_tokens = int(mask[r].sum())
                completion = tokenizer.decode(ids[r, :n_tokens].tolist(), skip_special_tokens=True)
                prefill = prompts[i][1]
                out[i] = dict(
                    prefill=prefill,
                    completion=completion,
                    text=prefill + completion,
                    n_tokens=n_tokens,
                    prompt_tokens=len(prompts[i][0]),
                )
            bar.update(len(rows))
    return out


def evaluate(records, texts, judge=None):
    """Per-question rows and the scores dict (Trust-Score + reward summary) for completions `texts`."""
    rows = score_all(records, texts, judge)
    scores = trust_score_of_rows(records, rows, judge)
    scores.update(reward_summary(records, texts))
    sources = sorted({r.source for r in records})
    if len(sources) > 1:  # Trust-Score is a per-dataset score: a mixed run is also scored per source
        scores["by_source"] = {}
        for src in sources:
            recs, src_rows = zip(*[(r, row) for r, row in zip(records, rows) if r.source == src])
            scores["by_source"][src] = {
                k: v
                for k, v in trust_score_of_rows(list(recs), list(src_rows), judge).items()
                if k != "notes"
            }
    return rows, scores


def fmt(x):
    return "-" if x is None else f"{x:.2f}" if isinstance(x, float) else str(x)


def report_markdown(scores, examples=()):
    """A short human-readable report of one run (with a column per source when the data mixes datasets)."""
    by_source = scores.get("by_source", {})
    lines = [
        f"# Evaluation: {scores.get('model', '?')} on {scores.get('data', '?')}",
        "",
        f"{scores['n']} questions, {scores['n_answerable']} answerable, {scores['n_answered']} answered.",
        "",
        "| metric | " + " | ".join(["all", *by_source]) + " |",
        "|---" * (2 + len(by_source)) + "|",
    ]
    for k in METRICS + DETAILS:
        if k in scores:
            values = [scores[k]] + [by_source[src].get(k) for src in by_source]
            lines.append(f"| {k} | " + " | ".join(fmt(v) for v in values) + " |")
    lines += [
        "",
        "TRUST = mean(F1_AC, F1_GR, F1_GC); all scores are percentages except tag_count and "
        "stage2_reward (reward units). Definitions: docs/METHOD.md, Evaluation.",
        "",
    ]
    lines += [f"Note: {note}." for note in scores.get("notes", [])]
    for ex in examples:
        lines += [
            "",
            f"## {ex['id']}: {ex['question']}",
            "",
            "```",
            ex["text"].strip(),
            "```",
            f"answerable={ex['answerable']} refused={ex['refused']} correctness={ex['correctness']:.2f} "
            f"citation_recall={fmt(ex['citation_recall'])} citation_precision={fmt(ex['citation_precision'])}",
        ]
    return "\n".join(lines) + "\n"


def write_run(out_dir, records, texts, rows, scores, generations=None):
    """predictions.jsonl (one line per question, with its scores), scores.json, report.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    examples = []
    with open(out_dir / "predictions.jsonl", "w", encoding="utf-8") as f:
        for i, (rec, text, row) in enumerate(zip(records, texts, rows)):
            reward, components = stage_reward(text, rec, 2)
            line = dict(
                id=rec.id,
                question=rec.question,
                **(generations[i] if generations else {"text": text}),
                answer=answer_text(text),
                **row,
                stage2_reward=reward,
                reward_components=components,
            )
            f.write(json.dumps(line) + "\n")
            if len(examples) < 3:
                examples.append(line)
    (out_dir / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    (out_dir / "report.md").write_text(report_markdown(scores, examples))


def load_scores(run):
    """scores.json of a run directory (or the file itself)."""
    path = Path(run)
    path = path / "scores.json" if path.is_dir() else path
    if not path.is_file():
        fail(f"--compare {run}: no scores.json there")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        fail(f"--compare {path}: not JSON ({e.msg}, line {e.lineno})")


ROW_KEYS = ("id", "answerable", "refused", "correctness", "citation_recall", "citation_precision")


def load_rows(run):
    """{question id: score_question row} from a run directory's predictions.jsonl; None when it has none."""
    path = Path(run) / "predictions.jsonl"
    if not path.is_file():
        return None
    rows = read_jsonl(path)
    for i, row in enumerate(rows, 1):
        missing = [k for k in ROW_KEYS if not isinstance(row, dict) or k not in row]
        if missing:
            fail(f"--compare {path}:{i}: no {missing[0]!r} field (eval.py writes it with every question)")
    return {row["id"]: row for row in rows}


def paired_bootstrap(rows_a, rows_b, resamples=2000, level=0.9, seed=0):
    """{metric: (low, high)}: the central `level` interval of metric(B) - metric(A) over `resamples` draws of the
    questions with replacement, the same draw for both runs. On 25 questions a data set it is several points wide:
    how much of a difference the choice of questions alone can make."""
    rng = random.Random(seed)
    n = len(rows_a)
    diffs = {k: [] for k in METRICS}
    for _ in range(resamples):
        draw = [rng.randrange(n) for _ in range(n)]
        a = aggregate([rows_a[i] for i in draw])
        b = aggregate([rows_b[i] for i in draw])
        for k in METRICS:
            diffs[k].append(b[k] - a[k])
    tail = int(resamples * (1 - level) / 2)
    intervals = {}
    for k, d in diffs.items():
        d.sort()
        intervals[k] = (d[tail], d[resamples - 1 - tail])
    return intervals


def compare_markdown(run_a, run_b):
    """Two runs' scores side by side, with the difference B - A and, when both runs scored the same questions
    (predictions.jsonl), its 90% paired-bootstrap interval."""
    a, b = load_scores(run_a), load_scores(run_b)
    rows_a, rows_b = load_rows(run_a), load_rows(run_b)
    intervals = {}
    if rows_a and rows_b and rows_a.keys() == rows_b.keys() and len(rows_a) == a.get("n"):
        ids = list(rows_a)
        intervals = paired_bootstrap([rows_a[i] for i in ids], [rows_b[i] for i in ids])
    lines = [
        f"| metric | A: {a.get('model', run_a)} | B: {b.get('model', run_b)} | B - A | 90% interval |",
        "|---|---|---|---|---|",
        f"| data | {a.get('data', '?')} | {b.get('data', '?')} | | |",
        f"| n | {a.get('n')} | {b.get('n')} | | |",
    ]
    for k in METRICS + DETAILS:
        if k in a or k in b:
            va, vb = a.get(k), b.get(k)
            delta = f"{vb - va:+.2f}" if isinstance(va, (int, float)) and isinstance(vb, (int, float)) else ""
            low_high = f"[{intervals[k][0]:+.2f}, {intervals[k][1]:+.2f}]" if k in intervals else ""
            lines.append(f"| {k} | {fmt(va)} | {fmt(vb)} | {delta} | {low_high} |")
    note = "90% interval: paired bootstrap over the questions both runs scored, 2000 draws, seed 0"
    if not intervals:
        note = "no interval: the two runs did not score the same questions (predictions.jsonl)"
    return f"A = {run_a}, B = {run_b}\n\n" + "\n".join(lines) + f"\n\n{note}\n"


REWARD_COMPONENTS = (
    "tag_count",
    "format",
    "em",
    "citation",
    "refusal",
)  # the summands of rewards.stage_reward


def metric_panels(rows):
    """Group a training log's numeric keys into panels: reward, its components, KL, completion length.
    grpo.py logs reward_mean, reward/<component> (plus diagnostics such as reward/statements, left out here),
    kl, completion_len_mean / _min / _max."""
    keys = sorted(
        {k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    )
    panels = {
        "reward": [k for k in keys if k in ("reward", "reward_mean")],
        "reward components": [
            k
            for k in keys
            if k.partition("/")[0] in ("reward", "rewards") and k.partition("/")[2] in REWARD_COMPONENTS
        ],
        "KL": [k for k in keys if "kl" in k.lower()],
        "completion length": [k for k in keys if "len" in k.lower()],
    }
    return {name: ks for name, ks in panels.items() if ks}


def plot_metrics(metrics_path, out_png):
    """A PNG of a training run's metrics.jsonl over steps. matplotlib is optional: imported only here."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on a server
        import matplotlib.pyplot as plt
    except ImportError:
        fail("--plot needs matplotlib, which is optional: pip install matplotlib")
    rows = [r for r in read_jsonl(metrics_path) if isinstance(r, dict)]
    panels = metric_panels(rows)
    if not panels:
        fail(f"--plot {metrics_path}: nothing to plot (no reward, KL or length fields)")
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True, squeeze=False)
    marker = "." if len(rows) < 50 else None  # short runs: show the points themselves
    for ax, (name, keys) in zip(axes[:, 0], panels.items()):
        for k in keys:
            pts = [(r.get("step", i), r[k]) for i, r in enumerate(rows) if isinstance(r.get(k), (int, float))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, lw=1.2, marker=marker)
        if name == "reward" and "reward_mean" in keys:  # +- one std over the batch's completions
            band = [
                (r.get("step", i), r["reward_mean"], r["reward_std"])
                for i, r in enumerate(rows)
                if isinstance(r.get("reward_mean"), (int, float))
                and isinstance(r.get("reward_std"), (int, float))
            ]
            if band:
                ax.fill_between(
                    [b[0] for b in band],
                    [b[1] - b[2] for b in band],
                    [b[1] + b[2] for b in band],
                    alpha=0.2,
                    label="reward_std",
                )
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def default_out_dir(data, model, holdout=0.0):
    """runs/eval/<data stem>__<model name>; a checkpoint folder (every run names it "checkpoint") is named with its
    run directory, runs/stage2/checkpoint -> <data>__stage2-checkpoint, so two runs' evaluations do not collide;
    a held-out part is named with its share: <data>-holdout0.5__<model>."""
    path = Path(model)
    name = path.name
    if name.startswith("checkpoint"):  # checkpoint, checkpoint.old
        name = f"{path.resolve().parent.name}-{name}"
    part = f"-holdout{holdout:g}" if holdout else ""
    return Path("runs/eval") / f"{Path(data).stem}{part}__{name}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Trust-Score evaluation of a checkpoint (docs/METHOD.md).")
    p.add_argument("--model", default="builtin", help="HF-layout checkpoint dir, or 'builtin'")
    p.add_argument("--data", default="builtin", help="ALCE / Trust-Score JSON or JSONL file, or 'builtin'")
    p.add_argument("--n", type=int, default=None, help="evaluate the first N records")
    p.add_argument(
        "--holdout",
        type=float,
        default=0.0,
        help="evaluate only the share of --data that grpo.py --holdout SHARE left out of training",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output dir (default runs/eval/<data>__<model>; <data>__<run>-checkpoint for a run's checkpoint)",
    )
    p.add_argument(
        "--predictions", default=None, help="score this JSONL of completions instead of generating"
    )
    p.add_argument("--judge", default=None, help="module:function entailment judge for ELI5 claims")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (greedy, KV-cached)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=256,
        help="completion budget; rows also stop at EOS and </answer>",
    )
    p.add_argument("--seed", type=int, default=0, help="sampler seed (greedy decoding does not use it)")
    p.add_argument(
        "--prompt-examples",
        action="store_true",
        help="the prompt of grpo.py --prompt-examples (a worked and a refusal example)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="compute dtype of generation (default: bfloat16 on CUDA, float32 on CPU)",
    )
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("RUN_A", "RUN_B"),
        help="two runs' scores side by side, B - A and its 90%% interval (paired bootstrap)",
    )
    p.add_argument("--plot", metavar="METRICS_JSONL", help="plot a training run's metrics.jsonl as a PNG")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.compare:
        table = compare_markdown(*args.compare)
        print(table)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "compare.md").write_text(table)
        return
    if args.plot:
        out = Path(args.out) / "metrics.png" if args.out else Path(args.plot).with_suffix(".png")
        print(f"wrote {plot_metrics(args.plot, out)}")
        return
    for flag, value in (
        ("--n", args.n),
        ("--batch-size", args.batch_size),
        ("--max-new-tokens", args.max_new_tokens),
    ):
        if value is not None and value < 1:
            fail(f"{flag} must be at least 1, got {value}")
    judge = load_judge(args.judge) if args.judge else None
    records = load_eval_records(args.data, args.n, args.holdout)
    generations = None
    if args.predictions:
        texts = load_predictions(args.predictions, records)
        model_name = args.model if args.model != "builtin" else f"predictions:{args.predictions}"
    else:
        generations = generate_predictions(
            args.model,
            records,
            args.batch_size,
            args.max_new_tokens,
            args.seed,
            args.prompt_examples,
            args.dtype,
        )
        texts = [g["text"] for g in generations]
        model_name = args.model
    rows, scores = evaluate(records, texts, judge)
    scores = dict(model=model_name, data=args.data, **scores)
    if generations:
        scores.update(
            decoding="greedy",
            max_new_tokens=args.max_new_tokens,
            mean_completion_tokens=mean(g["n_tokens"] for g in generations),
            share_at_max_tokens=100 * mean(g["n_tokens"] >= args.max_new_tokens for g in generations),
        )
    out = Path(args.out) if args.out else default_out_dir(args.data, args.model, args.holdout)
    write_run(out, records, texts, rows, scores, generations)
    print(" ".join(f"{k}={scores[k]:.2f}" for k in METRICS + ("format_compliance", "stage2_reward")))
    for note in scores["notes"]:
        print(f"note: {note}")
    print(f"wrote {out}/predictions.jsonl, scores.json, report.md")


if __name__ == "__main__":
    main()
