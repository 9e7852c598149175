"""Evaluation output a user can debug with: `--log-samples` records checked against transformers, their
resume after a cut, TruthfulQA mc1 beside mc2 against lm-eval's truthfulqa_mc1, and the half-precision
batch-size notice."""

from __future__ import annotations

import json
import random

import pytest
import torch
from eval_tiny import TinyEncoder, save_tiny_eval_model

from llamaherd.errors import InputError
from llamaherd.evaluate.cli import print_summary
from llamaherd.evaluate.runner import EvalOptions, evaluate

WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "water", "boils", "ice", "melts", "car")
SMALL_KEYS = {"task", "doc_id", "index", "prompt_sha256", "choices", "gold", "prediction", "correct", "metrics",
              "requests"}  # what every samples line holds (TruthfulQA adds mc1_indices)
SMALL_REQUEST_KEYS = {"continuation", "logprob", "is_greedy", "n_tokens", "truncated"}


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_benchmarks(root) -> None:
    """ARC-Challenge (25-shot prompts overflow the tiny model's 256 tokens) and TruthfulQA whose mc1 answers
    are, as in the real data, some of the mc2 answers in another order; one mc1 answer is not among them."""
    rng = random.Random(1)
    (root / "arc_challenge").mkdir(parents=True)
    for split, n in (("Train", 30), ("Test", 4)):
        rows = [{"id": f"{split}{i}", "answerKey": "B",
                 "question": {"stem": _words(rng, 6) + "?",
                              "choices": [{"text": _words(rng, 2), "label": x} for x in "ABCD"]}}
                for i in range(n)]  # fmt: skip
        path = root / "arc_challenge" / f"ARC-Challenge-{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = []
    for i in range(8):
        mc2 = [f"{_words(rng, 3)} {k}." for k in range(5)]
        labels = [1, 1, 0, 0, 0] if i % 2 else [1, 0, 1, 0, 0]
        mc1 = [mc2[2 if i % 2 == 0 else 1], mc2[4], mc2[0] if i % 2 else mc2[3]]
        mc1 = [mc1[0], *mc1[1:], *(["an answer only mc1 has."] if i == 3 else [])]
        items.append({"question": _words(rng, 5) + "?", "mc1_targets": {a: int(k == 0) for k, a in enumerate(mc1)},
                      "mc2_targets": dict(zip(mc2, labels))})
    (root / "truthfulqa").mkdir()
    (root / "truthfulqa" / "mc_task.json").write_text(json.dumps(items))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-output")
    write_benchmarks(root / "data")
    return save_tiny_eval_model(root / "model"), root / "data"


def _options(setup, out, **kw) -> EvalOptions:
    model_dir, data_dir = setup
    base = {"model": str(model_dir), "protocol": "harness", "tasks": ["arc_challenge", "truthfulqa_mc2"],
            "data_dir": data_dir, "output": out, "batch_size": 4, "device": "cpu", "progress": False}
    return EvalOptions(**(base | kw))


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_log_samples_hold_what_the_model_read(setup, tmp_path):
    """From a logged line alone, transformers recomputes every token's log-likelihood: the strings, ids and
    per-token values are what was scored."""
    from transformers import AutoModelForCausalLM

    model_dir, _ = setup
    evaluate(_options(setup, tmp_path / "small", limit=2))
    evaluate(_options(setup, tmp_path / "full", limit=2, log_samples=True))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    enc = TinyEncoder(model_dir)
    n_truncated = 0
    for name in ("samples_arc_challenge.jsonl", "samples_truthfulqa_mc2.jsonl"):
        small, full = _lines(tmp_path / "small" / name), _lines(tmp_path / "full" / name)
        assert [set(r) - {"mc1_indices"} for r in small] == [SMALL_KEYS] * 2  # no strings or ids without the flag
        assert all(set(q) == SMALL_REQUEST_KEYS for r in small for q in r["requests"])
        for rec in full:
            assert set(rec) - {"mc1_indices"} == SMALL_KEYS | {"arguments", "filtered_resps"}
            assert len(rec["arguments"]) == len(rec["requests"]) == len(rec["filtered_resps"])
            for j, req in enumerate(rec["requests"]):
                context, continuation = rec["arguments"][f"gen_args_{j}"].values()  # lm-eval's arg_0, arg_1
                assert continuation == req["continuation"] and rec["filtered_resps"][j] == [req["logprob"],
                                                                                             req["is_greedy"]]
                # the harness's encoding (BOS: the tiny tokenizer adds one), the context cut from the left
                whole, ctx = enc.encode(context + continuation, True), enc.encode(context, True)
                assert req["continuation_ids"] == whole[len(ctx):] and len(req["continuation_ids"]) == req["n_tokens"]
                assert req["context_ids"] == ctx[len(ctx) - len(req["context_ids"]):]
                assert req["truncated"] == (len(req["context_ids"]) < len(ctx))
                n_truncated += req["truncated"]
                ids = req["context_ids"] + req["continuation_ids"]
                with torch.no_grad():
                    logits = hf(torch.tensor([ids[:-1]])).logits[0, len(req["context_ids"]) - 1:]
                log_probs = logits.double().log_softmax(-1)
                want = torch.tensor(req["continuation_ids"])
                expected = log_probs.gather(1, want[:, None])[:, 0].tolist()
                assert req["token_logprobs"] == pytest.approx(expected, abs=1e-4)
                assert req["logprob"] == pytest.approx(sum(req["token_logprobs"]), abs=1e-9)
                assert req["is_greedy"] == bool((log_probs.argmax(-1) == want).all())
        for a, b in zip(small, full, strict=True):  # the flag adds, it changes nothing
            assert {k: a[k] for k in SMALL_KEYS} == {k: b[k] for k in SMALL_KEYS} | {
                "requests": [{k: q[k] for k in SMALL_REQUEST_KEYS} for q in b["requests"]]}
    assert n_truncated > 0  # ARC's 25-shot prompts were cut to the model's context
    size = {d: sum(p.stat().st_size for p in (tmp_path / d).glob("samples_*.jsonl")) for d in ("small", "full")}
    assert size["full"] > 5 * size["small"]


def test_log_samples_resume_after_a_cut_line(setup, tmp_path):
    """A kill leaves the finished lines and perhaps half a line: the resumed run appends the missing docs
    with the same fields, each doc once, and the same numbers as an uncut run."""
    out = tmp_path / "cut"
    first = evaluate(_options(setup, out, log_samples=True, limit=6, tasks=["truthfulqa_mc2"]))
    path = out / "samples_truthfulqa_mc2.jsonl"
    data = path.read_bytes()
    three = sum(len(line) + 1 for line in data.split(b"\n")[:3])
    path.write_bytes(data[: three + 40])  # three lines and the start of a fourth
    with pytest.raises(InputError, match=r"\(log_samples differ\)"):  # records of one kind per directory
        evaluate(_options(setup, out, limit=6, tasks=["truthfulqa_mc2"]))
    resumed = evaluate(_options(setup, out, log_samples=True, limit=6, tasks=["truthfulqa_mc2"]))
    assert resumed["timings"]["resumed_docs"] == 3
    lines = _lines(path)
    assert sorted(r["doc_id"] for r in lines) == list(range(6))
    assert all("arguments" in r and "context_ids" in r["requests"][0] for r in lines)
    assert resumed["tasks"]["truthfulqa_mc2"]["metrics"] == pytest.approx(
        first["tasks"]["truthfulqa_mc2"]["metrics"], abs=1e-9)


def test_older_run_json_without_log_samples_still_resumes(setup, tmp_path):
    out = tmp_path / "old"
    evaluate(_options(setup, out, limit=2, tasks=["truthfulqa_mc2"]))
    run = json.loads((out / "run.json").read_text())
    del run["log_samples"]  # as written before the option existed
    (out / "run.json").write_text(json.dumps(run))
    again = evaluate(_options(setup, out, limit=3, tasks=["truthfulqa_mc2"]))
    assert again["timings"]["resumed_docs"] == 2


def test_mc1_matches_lm_eval_truthfulqa_mc1(setup, tmp_path):
    """Per doc and in aggregate, mc1 from the same requests as mc2 equals lm-eval 0.4's truthfulqa_mc1 task
    (its own yaml: mc1_targets choices, gold 0, acc) with its hf model on the same checkpoint."""
    pytest.importorskip("lm_eval")
    from lm_eval.evaluator import evaluate as lm_evaluate
    from lm_eval.models.huggingface import HFLM

    from llamaherd.evaluate.reference import lm_eval_task
    from llamaherd.evaluate.tasks import resolve_tasks

    model_dir, data_dir = setup
    ours = evaluate(_options(setup, tmp_path / "o", tasks=["truthfulqa_mc2"]))
    records = {r["doc_id"]: r for r in _lines(tmp_path / "o" / "samples_truthfulqa_mc2.jsonl")}
    task = lm_eval_task(resolve_tasks("truthfulqa_mc2", data_dir)[0], "truthfulqa/truthfulqa_mc1.yaml")
    lm = HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=4)
    theirs = lm_evaluate(lm, {"truthfulqa_mc1": task}, bootstrap_iters=0, log_samples=True)
    samples = theirs["samples"]["truthfulqa_mc1"]
    assert len(samples) == len(records) == 8
    items = json.loads((data_dir / "truthfulqa" / "mc_task.json").read_text())
    for s in samples:
        rec = records[s["doc_id"]]
        assert rec["metrics"]["mc1"] == s["acc"]
        # their log-likelihoods per mc1 answer are ours for the same strings
        ours_by_answer = dict(zip(rec["choices"], (r["logprob"] for r in rec["requests"])))
        mc1 = list(items[rec["index"]]["mc1_targets"])
        assert [rec["choices"][i] for i in rec["mc1_indices"]] == mc1  # the record says which answers mc1 used
        assert [ours_by_answer[a] for a in mc1] == pytest.approx([float(r[0]) for r in s["filtered_resps"]],
                                                                  abs=1e-4)
    mc1 = ours["tasks"]["truthfulqa_mc2"]["metrics"]["mc1"]
    assert mc1 == pytest.approx(theirs["results"]["truthfulqa_mc1"]["acc,none"], abs=1e-12)
    assert 0 < mc1 < 1  # both outcomes occur, so the comparison means something


def test_summary_shows_mc1_and_the_half_precision_notice(setup, tmp_path, capsys):
    for dtype in ("fp32", "bf16"):
        results = evaluate(_options(setup, tmp_path / dtype, dtype=dtype, limit=2, tasks=["truthfulqa_mc2"]))
        print_summary(results)
        out = capsys.readouterr().out
        metrics = results["tasks"]["truthfulqa_mc2"]["metrics"]
        assert set(metrics) == {"mc1", "mc1_stderr", "mc2", "mc2_stderr"}
        assert out.index(f"{100 * metrics['mc2']:.2f}") < out.index("mc1")  # the headline first, mc1 beside it
        notice = "half-precision scores move slightly with --batch-size"
        assert (notice in " ".join(out.split())) == (dtype == "bf16"), out
