"""Evaluation prompts and data.

1. Parity (harness protocol): for the first 50 docs of each task, every (context, continuation) that
   llamaherd builds equals, byte for byte, what the installed lm-eval builds from the same local data
   with its own task yaml, few-shot sampler and whitespace split.
2. leaderboard-2023: few-shot selection and exact strings worked out here from the protocol's rules.
3. Data: every local form loads, bad input fails with file, line, field and a fix.
"""

from __future__ import annotations

import csv
import functools
import json
import random
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from llamaherd.errors import InputError
from llamaherd.evaluate.data import MMLU_SUBJECTS
from llamaherd.evaluate.tasks import PROTOCOLS, build_requests, get_protocol, resolve_tasks

N_DOCS = 50


# Raw data read independently of llamaherd's loaders, in the hub datasets' layout ------------------


@pytest.fixture(scope="module")
def bench(shared_dir: Path) -> Path:
    return shared_dir / "benchmarks"


def arc_rows(bench: Path, split: str) -> list[dict]:
    rows = []
    for line in (bench / f"arc_challenge/ARC-Challenge-{split}.jsonl").read_text().splitlines():
        row = json.loads(line)
        choices = row["question"]["choices"]
        rows.append(
            {
                "id": row["id"],
                "question": row["question"]["stem"],
                "answerKey": row["answerKey"],
                "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
            }
        )
    return rows


def mmlu_rows(bench: Path, subject: str, split: str) -> list[dict]:
    with open(bench / f"mmlu/data/{split}/{subject}_{split}.csv", newline="") as f:
        return [
            {"question": r[0], "subject": subject, "choices": r[1:5], "answer": "ABCD".index(r[5])}
            for r in csv.reader(f)
        ]


def truthfulqa_rows(bench: Path) -> list[dict]:
    items = json.loads((bench / "truthfulqa/mc_task.json").read_text())
    return [
        {
            "question": it["question"],
            **{
                k: {"choices": list(it[k]), "labels": list(it[k].values())}
                for k in ("mc1_targets", "mc2_targets")
            },
        }
        for it in items
    ]


def hellaswag_train_rows(bench: Path) -> list[dict]:
    lines = (bench / "hellaswag/hellaswag_train_TRUNCATED_first3368.jsonl").read_text().split("\n")
    return [json.loads(line) for line in lines[:-1]]  # the last line is cut off mid-row


def write_hellaswag(folder: Path, validation: list[dict], train: list[dict]) -> Path:
    (folder / "hellaswag").mkdir(parents=True)
    for name, rows in (("val", validation), ("train", train)):
        text = "".join(json.dumps(r) + "\n" for r in rows)
        (folder / f"hellaswag/hellaswag_{name}.jsonl").write_text(text)
    return folder


# lm-eval, offline, on the same rows ---------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_eval_docs():
    """build(yaml, splits, n_shot) -> [(context, [(context, continuation)...], gold)] for the first
    50 docs, from lm-eval's own task config with the dataset swapped for the given rows."""
    pytest.importorskip("lm_eval")
    import datasets
    import lm_eval
    import lm_eval.utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.defaults import DEFAULT_OTHER_SEED
    from lm_eval.tasks._yaml_loader import load_yaml

    # A character "tokenizer" makes lm-eval's own _encode_pair return the split strings themselves.
    chars = SimpleNamespace(backend="causal", tok_encode=lambda s, **_: list(s))
    compile_once = functools.lru_cache(maxsize=None)(lm_eval.utils.env.from_string)

    def build(yaml: str, splits: dict[str, list[dict]], n_shot: int, limit: int = N_DOCS) -> list:
        cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / yaml, resolve_func=True)
        cfg.pop("tag", None)
        dataset = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})
        cfg.update(custom_dataset=lambda **_: dataset, num_fewshot=n_shot)
        task = ConfigurableTask(config=cfg)
        task.set_fewshot_seed(DEFAULT_OTHER_SEED)  # what simple_evaluate / the CLI use
        task.build_all_requests(limit=limit)
        per_doc: dict[int, list] = {}
        for inst in task.instances:
            per_doc.setdefault(inst.doc_id, []).append(inst)
        out = []
        for _, insts in sorted(per_doc.items()):
            insts.sort(key=lambda i: i.idx)
            pairs = [tuple("".join(p) for p in TemplateLM._encode_pair(chars, *i.args)) for i in insts]
            out.append((insts[0].args[0], pairs, task.doc_to_target(insts[0].doc)))
        return out

    with pytest.MonkeyPatch.context() as mp:  # same templates, compiled once instead of per call
        mp.setattr(lm_eval.utils, "apply_template", lambda t, doc: compile_once(t).render(**doc))
        yield build


def assert_parity(mine, theirs) -> None:
    assert len(mine) == len(theirs)
    for doc, (context, pairs, gold) in zip(mine, theirs):
        assert doc.context == context, f"{doc.task} doc {doc.doc_id}"
        assert [(r.context, r.continuation) for r in doc.requests] == pairs, f"{doc.task} doc {doc.doc_id}"
        assert doc.gold == gold


@pytest.mark.slow
def test_arc_challenge_matches_lm_eval(bench, lm_eval_docs):
    splits = {
        "train": arc_rows(bench, "Train"),
        "validation": arc_rows(bench, "Dev"),
        "test": arc_rows(bench, "Test"),
    }
    theirs = lm_eval_docs("arc/arc_challenge.yaml", splits, 25)
    assert_parity(build_requests(resolve_tasks("arc_challenge", bench)[0], "harness", N_DOCS), theirs)


@pytest.mark.slow
def test_mmlu_all_subjects_match_lm_eval(bench, lm_eval_docs):
    for task in resolve_tasks("mmlu", bench):
        splits = {s: mmlu_rows(bench, task.subject, s) for s in ("dev", "test")}
        theirs = lm_eval_docs(f"mmlu/default/{task.name}.yaml", splits, 5)
        assert_parity(build_requests(task, "harness", N_DOCS), theirs)


@pytest.mark.slow
def test_truthfulqa_mc2_matches_lm_eval(bench, lm_eval_docs):
    rows = truthfulqa_rows(bench)
    docs = build_requests(resolve_tasks("truthfulqa_mc2", bench)[0], "harness", N_DOCS)
    assert_parity(docs, lm_eval_docs("truthfulqa/truthfulqa_mc2.yaml", {"validation": rows}, 0))
    for doc, row in zip(docs, rows):  # lm-eval's process_results_mc2 counts labels == 1 as true
        assert doc.true_mask == tuple(label == 1 for label in row["mc2_targets"]["labels"])


@pytest.mark.slow
@pytest.mark.parametrize("stand_in", ["disjoint", "overlapping"])
def test_hellaswag_stand_in_matches_lm_eval(bench, lm_eval_docs, tmp_path, stand_in):
    """The official splits are missing; train rows with their original fields stand in for both.
    "overlapping" evaluates docs that are also in the few-shot pool, so lm-eval's sampler (which draws
    k+1 and drops the eval doc for HellaSwag) must drop one: check that it happens here."""
    rows = hellaswag_train_rows(bench)
    if stand_in == "disjoint":
        validation, train = rows[-N_DOCS:], rows[:-N_DOCS]
    else:
        validation, train = rows[:N_DOCS], rows[:200]
        rng = random.Random(1234)
        assert any(i in rng.sample(range(len(train)), 11) for i in range(N_DOCS))
    task = resolve_tasks("hellaswag", write_hellaswag(tmp_path, validation, train))[0]
    theirs = lm_eval_docs("hellaswag/hellaswag.yaml", {"train": train, "validation": validation}, 10)
    assert_parity(build_requests(task, "harness", N_DOCS), theirs)


WIKIHOW_ROWS = [
    {
        "activity_label": "Home and Garden",
        "ctx_a": f"[header] How to fix item {i} [title] Find it.",
        "ctx_b": "then WASH it [step]" if i % 2 else "",
        "label": i % 4,
        "endings": [f"[step] Dry  it {i}.", "Rinse   it. [substeps] Twice.", " [title] Done", "Keep [x] it"],
    }
    for i in range(14)
]


@pytest.mark.slow
def test_hellaswag_tags_and_trailing_space_match_lm_eval(lm_eval_docs, tmp_path):
    """Made-up WikiHow-style rows: tags, double and triple spaces, an upper-case ctx_b, an empty ctx_b,
    and queries that end in a space (which must move to the continuation)."""
    validation, train = WIKIHOW_ROWS[:3], WIKIHOW_ROWS[3:]
    task = resolve_tasks("hellaswag", write_hellaswag(tmp_path, validation, train))[0]
    docs = build_requests(task, "harness", 3)
    assert any(doc.context.endswith(" ") for doc in docs)
    theirs = lm_eval_docs("hellaswag/hellaswag.yaml", {"train": train, "validation": validation}, 10, limit=3)
    assert_parity(docs, theirs)


# leaderboard-2023, worked out from the rules ------------------------------------------------------


PRIMER = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)


def test_protocols_differ_where_the_rules_say():
    old, new = PROTOCOLS["leaderboard-2023"], PROTOCOLS["harness"]
    assert (old.add_bos, new.add_bos) == (False, True)
    assert (old.seed, old.shuffle_docs, new.seed, new.shuffle_docs) == (42, True, 1234, False)
    assert (old.mmlu_weighted, new.mmlu_weighted) == (False, True)
    with pytest.raises(InputError, match="Did you mean 'harness'"):
        get_protocol("harnes")


def arc_answer(row: dict) -> str:
    """2023 rule: numeric answer keys 1-5 map to A-E, then A-E index the choices."""
    key = {"1": "A", "2": "B", "3": "C", "4": "D", "5": "E"}.get(row["answerKey"], row["answerKey"])
    return row["choices"]["text"]["ABCDE".index(key)]


def test_arc_leaderboard_2023_shuffle_and_25_shots_from_the_same_generator(bench):
    test, train = arc_rows(bench, "Test"), arc_rows(bench, "Train")
    rnd = random.Random(42)
    rnd.shuffle(test)
    docs = build_requests(resolve_tasks("arc_challenge", bench)[0], "leaderboard-2023", 4)
    for doc, row in zip(docs, test):
        shots = rnd.sample(train, 25)
        expected = "".join(f"Question: {s['question']}\nAnswer: {arc_answer(s)}\n\n" for s in shots)
        assert doc.context == expected + f"Question: {row['question']}\nAnswer:"
        assert [r.continuation for r in doc.requests] == [" " + t for t in row["choices"]["text"]]
        assert doc.choices[doc.gold] == arc_answer(row)


def test_arc_numeric_keys_and_question_format(bench):
    docs = build_requests(resolve_tasks("arc_challenge", bench)[0], "harness", 1)
    assert docs[0].context.endswith(
        "\n\nQuestion: An astronomer observes that a planet rotates faster after a meteorite impact. "
        "Which is the most likely effect of this increase in rotation?\nAnswer:"
    )
    assert docs[0].gold == 2  # Mercury_7175875, answerKey C
    numeric = [r for r in arc_rows(bench, "Test") if r["answerKey"].isdigit()]
    task = resolve_tasks("arc_challenge", bench)[0]
    by_id = {d["id"]: d for d in task.eval_docs()}
    assert len(numeric) == 22
    for row in numeric:
        assert task.doc_to_target(by_id[row["id"]]) == arc_answer(row)


def test_mmlu_leaderboard_2023_first_five_dev_and_shuffled_test(bench):
    description = "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    prefix = description + (
        "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
        "Statement 1 | If aH is an element of a factor group, then |aH| divides |a|. Statement 2 | If H and "
        "K are subgroups of G then HK is a subgroup of G.\nA. True, True\nB. False, False\nC. True, False\n"
        "D. False, True\nAnswer: B\n\n"
    )
    dev, test = mmlu_rows(bench, "abstract_algebra", "dev"), mmlu_rows(bench, "abstract_algebra", "test")
    random.Random(42).shuffle(test)
    shots = "".join(
        f"{r['question'].strip()}\nA. {r['choices'][0]}\nB. {r['choices'][1]}\nC. {r['choices'][2]}\n"
        f"D. {r['choices'][3]}\nAnswer: {'ABCD'[r['answer']]}\n\n"
        for r in dev
    )
    docs = build_requests(resolve_tasks("mmlu_abstract_algebra", bench)[0], "leaderboard-2023", 5)
    for doc, row in zip(docs, test):
        assert doc.context.startswith(prefix)
        question = (
            f"{row['question'].strip()}\nA. {row['choices'][0]}\nB. {row['choices'][1]}\n"
            f"C. {row['choices'][2]}\nD. {row['choices'][3]}\nAnswer:"
        )
        assert doc.context == description + shots + question
        assert [r.continuation for r in doc.requests] == [" A", " B", " C", " D"]
        assert doc.gold == row["answer"]
    politics = resolve_tasks("mmlu_high_school_government_and_politics", bench)[0]
    assert build_requests(politics, "leaderboard-2023", 1)[0].context.startswith(
        "The following are multiple choice questions (with answers) about high school government and "
        "politics.\n\n"
    )


def test_truthfulqa_leaderboard_2023_primer_order_and_true_answers(bench):
    rows = truthfulqa_rows(bench)
    shuffled = list(rows)
    random.Random(42).shuffle(shuffled)
    task = resolve_tasks("truthfulqa_mc2", bench)[0]
    docs = build_requests(task, "leaderboard-2023", 3)
    for doc, row in zip(docs, shuffled):
        assert doc.context == PRIMER + "\n\nQ: " + row["question"] + "\nA:"
        assert [r.continuation for r in doc.requests] == [" " + c for c in row["mc2_targets"]["choices"]]
    # b281b09 takes the answers before the first false one as the true ones; two v0 items list a true
    # answer after a false one, and only there do the protocols disagree.
    unsorted = [r for r in rows if 1 in r["mc2_targets"]["labels"][r["mc2_targets"]["labels"].index(0) :]]
    assert len(unsorted) == 2
    for row in unsorted:
        labels = row["mc2_targets"]["labels"]
        first_false = labels.index(0)
        assert task.true_mask(row, PROTOCOLS["leaderboard-2023"]) == tuple(
            i < first_false for i in range(len(labels))
        )
        assert task.true_mask(row, PROTOCOLS["harness"]) == tuple(label == 1 for label in labels)


def preprocess(text: str) -> str:
    """The harness rule as issue 3 states it."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def test_hellaswag_leaderboard_2023_ten_shots_from_the_shuffling_generator(bench, tmp_path):
    rows = hellaswag_train_rows(bench)
    validation, train = rows[-20:], rows[:-20]
    task = resolve_tasks("hellaswag", write_hellaswag(tmp_path, validation, train))[0]
    docs = build_requests(task, "leaderboard-2023", 5)

    def query(r):
        return preprocess(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize())

    rnd = random.Random(42)
    order = list(validation)
    rnd.shuffle(order)
    for doc, row in zip(docs, order):
        shots = rnd.sample(train, 10)  # no eval-doc exclusion in 2023: exactly k draws
        expected = "".join(query(s) + " " + preprocess(s["endings"][s["label"]]) + "\n\n" for s in shots)
        assert doc.context == expected + query(row)
        assert [r.continuation for r in doc.requests] == [" " + preprocess(e) for e in row["endings"]]


def test_hellaswag_query_capitalizes_ctx_b(bench, tmp_path):
    rows = hellaswag_train_rows(bench)
    task = resolve_tasks("hellaswag", write_hellaswag(tmp_path, rows[:1], rows[1:]))[0]
    doc = build_requests(task, "harness", 1)[0]
    assert doc.context.endswith(
        "\n\nRemoving ice from car: Then, the man writes over the snow covering the window of a car, and a "
        "woman wearing winter clothes smiles. Then"
    )
    assert doc.requests[3].continuation == " , the man continues removing the snow on his car."
    assert doc.gold == 3


# Data forms ---------------------------------------------------------------------------------------


def test_hellaswag_llama_cpp_form_with_truncated_train_pool(bench):
    task = resolve_tasks("hellaswag", bench, hellaswag_form="llama.cpp-text")[0]
    docs = task.eval_docs()
    assert task.data.form == "llama.cpp-text" and len(docs) == 10042
    assert docs[0]["query"] == "Roof shingle removal: A man is sitting on a roof. he"
    assert docs[0]["gold"] == 3 and docs[1]["gold"] == 3
    assert len(task.fewshot_docs()) == 3368
    caveats = " | ".join(task.data.caveats)
    assert "ctx_b is not capitalized" in caveats and "line 3369 was skipped" in caveats
    assert "3368 of the 39905" in caveats


def test_hellaswag_olmo_form(bench):
    task = resolve_tasks("hellaswag", bench, hellaswag_form="olmo-requests")[0]
    docs = task.eval_docs()
    assert task.data.form == "olmo-requests" and len(docs) == 1000
    assert docs[0]["ind"] == 29519 and docs[0]["gold"] == 3
    assert docs[0]["query"].startswith(
        "Finance and Business: How to apply for a marriage license in florida."
    )
    assert any("1,000-doc subsample" in c for c in task.data.caveats)


def test_local_forms_are_recorded(bench):
    forms = {t.name: t.data.form for t in resolve_tasks("arc_challenge,truthfulqa_mc2,mmlu_anatomy", bench)}
    assert forms == {
        "arc_challenge": "ai2-jsonl",
        "truthfulqa_mc2": "truthfulqa-mc_task-json",
        "mmlu_anatomy": "hendrycks-csv",
    }
    assert len(resolve_tasks("mmlu", bench)) == len(MMLU_SUBJECTS) == 57


@pytest.mark.slow
def test_hub_offline_fails_in_one_line(tmp_path):
    code = "from llamaherd.evaluate.tasks import resolve_tasks\nresolve_tasks('arc_challenge')[0].eval_docs()"
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path), "PATH": "/usr/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=120
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert "OfflineError: offline: cannot load allenai/ai2_arc (ARC-Challenge)" in last
    assert "pass --data-dir with arc_challenge/ARC-Challenge-Test.jsonl" in last


# Bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, suggestion",
    [
        ("arc_chalenge", "arc_challenge"),
        ("hellaswg", "hellaswag"),
        ("mmlu_astronmy", "mmlu_astronomy"),
        ("truthfulqa", "truthfulqa_mc2"),
    ],
)
def test_unknown_task_suggests_the_closest(name, suggestion):
    with pytest.raises(InputError, match=f"unknown task '{name}'. Did you mean '{suggestion}'"):
        resolve_tasks(f"arc_challenge,{name}")


def test_limit_above_the_dataset_size(bench):
    task = resolve_tasks("arc_challenge", bench)[0]
    with pytest.raises(InputError, match=r"--limit 1173 is outside 1\.\.1172.*arc_challenge"):
        build_requests(task, "harness", 1173)
    with pytest.raises(InputError, match="each MMLU subject"):
        build_requests(resolve_tasks("mmlu_anatomy", bench)[0], "harness", 136)
    assert len(build_requests(task, "harness", 1172)) == 1172


def test_missing_data_says_where_it_looked(tmp_path):
    for name, looked in [
        ("arc_challenge", "arc_challenge"),
        ("truthfulqa_mc2", "truthfulqa/mc_task.json"),
        ("mmlu_anatomy", "mmlu/data/test/anatomy_test.csv"),
        ("hellaswag", "hellaswag/hellaswag_val.jsonl"),
    ]:
        with pytest.raises(InputError, match="missing") as err:
            resolve_tasks(name, tmp_path)[0].eval_docs()
        assert str(tmp_path / looked) in str(err.value) and "--data-dir" in str(err.value)
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag/hellaswag_val.jsonl").write_text(json.dumps(WIKIHOW_ROWS[0]) + "\n")
    with pytest.raises(InputError, match="train split, the pool of the 10 few-shot examples"):
        resolve_tasks("hellaswag", tmp_path)[0].eval_docs()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_malformed_rows_name_file_line_and_field(tmp_path):
    good = {
        "id": "x",
        "question": {"stem": "Q?", "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}]},
        "answerKey": "B",
    }
    arc = tmp_path / "arc_challenge/ARC-Challenge-Test.jsonl"
    write(tmp_path / "arc_challenge/ARC-Challenge-Train.jsonl", json.dumps(good) + "\n")
    bad = {k: v for k, v in good.items() if k != "answerKey"}
    write(arc, json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(InputError, match=f"{re.escape(str(arc))}:2: field 'answerKey' is missing"):
        resolve_tasks("arc_challenge", tmp_path)[0].eval_docs()
    write(arc, json.dumps(good) + "\n\n" + json.dumps({**good, "answerKey": "3"}) + "\n")
    with pytest.raises(InputError, match=f"{re.escape(str(arc))}:3: field 'answerKey' '3' does not match"):
        resolve_tasks("arc_challenge", tmp_path)[0].eval_docs()
    write(arc, json.dumps(good) + '\n{"id": \n')
    with pytest.raises(InputError, match=f"{re.escape(str(arc))}:2: not valid JSON"):
        resolve_tasks("arc_challenge", tmp_path)[0].eval_docs()

    mmlu = write(tmp_path / "mmlu/data/test/anatomy_test.csv", '"two\nlines",a,b,c,d,A\nq,a,b,c,d,E\n')
    write(tmp_path / "mmlu/data/dev/anatomy_dev.csv", "q,a,b,c,d,A\n")
    with pytest.raises(
        InputError, match=f"{re.escape(str(mmlu))}:3: field 'answer' should be one of A, B, C, D, got 'E'"
    ):
        resolve_tasks("mmlu_anatomy", tmp_path)[0].eval_docs()
    write(mmlu, "q,a,b,c,A\n")
    with pytest.raises(InputError, match=f"{re.escape(str(mmlu))}:1: field 'answer' row has 5 columns"):
        resolve_tasks("mmlu_anatomy", tmp_path)[0].eval_docs()

    tqa = write(
        tmp_path / "truthfulqa/mc_task.json",
        '[\n  {"question": "q", "mc1_targets": {"a": 1, "b": 0}, "mc2_targets": {"a": 1, "b": 0}},\n'
        '  {"question": "r",\n   "mc1_targets": {"a": 1}}\n]\n',
    )
    with pytest.raises(InputError, match=f"{re.escape(str(tqa))}:3: field 'mc2_targets' is missing"):
        resolve_tasks("truthfulqa_mc2", tmp_path)[0].eval_docs()

    row = WIKIHOW_ROWS[0]
    val = write(
        tmp_path / "hellaswag/hellaswag_val.jsonl",
        json.dumps(row) + "\n" + json.dumps({k: v for k, v in row.items() if k != "ctx_b"}) + "\n",
    )
    write(tmp_path / "hellaswag/hellaswag_train.jsonl", json.dumps(row) + "\n")
    with pytest.raises(InputError, match=f"{re.escape(str(val))}:2: field 'ctx_b' is missing"):
        resolve_tasks("hellaswag", tmp_path)[0].eval_docs()
    val.unlink()
    text = write(tmp_path / "hellaswag/hellaswag_val_full.txt", "q: a\n2\na\nb\nc\nd\nq: b\nx\na\nb\nc\nd\n")
    with pytest.raises(InputError, match=f"{re.escape(str(text))}:8: field 'label' should be 0-3, got 'x'"):
        resolve_tasks("hellaswag", tmp_path)[0].eval_docs()
