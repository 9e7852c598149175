"""The peer side of the parity and speed checks: lm-eval's own task files and `hf` model on the same docs.

lm-eval runs offline on the records llamaherd's loaders read (its task yaml with the dataset swapped
for those records), and `--model hf` loads the checkpoint that `export_hf` writes. Needs the test
extras (`lm-eval`, `transformers`, `accelerate`).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llamaherd.evaluate.metrics import pred, pred_norm
from llamaherd.evaluate.tasks import Task

LM_EVAL_YAML = {
    "arc_challenge": "arc/arc_challenge.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "truthfulqa_mc2": "truthfulqa/truthfulqa_mc2.yaml",
}
FEWSHOT_SEED = 1234  # what lm-eval's CLI and simple_evaluate seed the few-shot sampler with


def export_hf(source: str | Path | None, out: Path) -> Path:
    """Write a checkpoint (default: the embedded model) as Hugging Face safetensors + tokenizer, as
    `herd convert` does; reuses `out` when it already holds an export."""
    from llamaherd.load import load_model

    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    return load_model(source).save_hf(out)


def local_data_dir(benchmarks: Path, out: Path, n_validation: int) -> Path:
    """A --data-dir for parity runs: ARC, MMLU and TruthfulQA linked from `benchmarks`, and a HellaSwag
    stand-in (the official files are missing): the last `n_validation` rows of the truncated train file,
    with their original fields, as validation, the rows before them as the few-shot pool."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("arc_challenge", "mmlu", "truthfulqa"):
        if not (out / name).exists():
            (out / name).symlink_to((benchmarks / name).resolve(), target_is_directory=True)
    train_file = next((benchmarks / "hellaswag").glob("hellaswag_train*.jsonl"))
    lines = train_file.read_text().split("\n")
    rows = [line for line in lines[:-1] if line]  # the last line of a truncated copy is cut off
    (out / "hellaswag").mkdir(exist_ok=True)
    (out / "hellaswag" / "hellaswag_val.jsonl").write_text("".join(r + "\n" for r in rows[-n_validation:]))
    (out / "hellaswag" / "hellaswag_train.jsonl").write_text("".join(r + "\n" for r in rows[:-n_validation]))
    return out


def lm_eval_task(task: Task, yaml: str | None = None):
    """lm-eval's ConfigurableTask for a llamaherd task at the harness protocol's shot count, its dataset
    replaced by the records llamaherd read; `yaml` names another of lm-eval's task files for the same data
    (truthfulqa/truthfulqa_mc1.yaml)."""
    import datasets
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    yaml = yaml or LM_EVAL_YAML.get(task.name) or f"mmlu/default/{task.name}.yaml"
    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / yaml, resolve_func=True)
    cfg.pop("tag", None)
    splits = {s: task.data.splits.get(s, []) for s in ("train", "validation", "test", "dev")}
    dataset = datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items() if rows})
    for name in ("training_split", "validation_split", "test_split", "fewshot_split"):
        if cfg.get(name) is not None and cfg[name] not in dataset:  # e.g. ARC's validation split: unused
            cfg[name] = None
    cfg["custom_dataset"] = lambda **_: dataset
    cfg["num_fewshot"] = task.n_shot["harness"]  # what `lm_eval --num_fewshot` sets (yaml default: 0)
    lm_task = ConfigurableTask(config=cfg)
    lm_task.set_fewshot_seed(FEWSHOT_SEED)
    return lm_task


@dataclass
class PeerRun:
    """lm-eval's per-doc log-likelihoods and metrics for each task, and the wall time of the run."""

    logprobs: dict[str, dict[int, list[float]]]  # task -> doc_id -> summed log-likelihood per choice
    doc_metrics: dict[str, dict[int, dict[str, float]]]  # task -> doc_id -> acc / acc_norm / mc2
    metrics: dict[str, dict[str, float]]  # task -> aggregated metrics (lm-eval names; mc2 as "mc2")
    n_requests: int
    seconds: float


def run_lm_eval(tasks: list[Task], model_dir: Path, limit: int | None, batch_size: int, device: str,
                lm: Any = None) -> PeerRun:
    """Evaluate `tasks` with `lm-eval --model hf` (dtype float32) on the first `limit` docs of each."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    lm = lm or HFLM(pretrained=str(model_dir), dtype="float32", device=device, batch_size=batch_size)
    task_dict = {t.name: lm_eval_task(t) for t in tasks}
    start = time.perf_counter()
    out = evaluate(lm, task_dict, limit=limit, bootstrap_iters=0, log_samples=True)
    seconds = time.perf_counter() - start
    logprobs, doc_metrics, metrics, n_requests = {}, {}, {}, 0
    for name in task_dict:
        samples = out["samples"][name]
        logprobs[name] = {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in samples}
        keys = ("acc", "acc_norm")
        doc_metrics[name] = {s["doc_id"]: {("mc2" if name == "truthfulqa_mc2" else k): float(s[k])
                                           for k in keys if k in s} for s in samples}
        n_requests += sum(len(s["filtered_resps"]) for s in samples)
        res = out["results"][name]
        metrics[name] = {("mc2" if name == "truthfulqa_mc2" else k): float(res[f"{k},none"])
                         for k in keys if f"{k},none" in res}
    return PeerRun(logprobs, doc_metrics, metrics, n_requests, seconds)


@dataclass
class Comparison:
    """How llamaherd's records agree with lm-eval's, per task group."""

    n_docs: int
    same_prediction: int  # docs where lm-eval's log-likelihoods give the same prediction as ours
    same_metrics: int  # docs whose per-doc metric values (acc, acc_norm; mc2 to 1e-6) all agree
    max_logprob_diff: float
    metric_diff_points: dict[str, float]  # |ours - theirs| x 100 per metric


def compare(output: Path, results: dict[str, Any], peer: PeerRun) -> dict[str, Comparison]:
    """Per-item agreement, max per-request log-likelihood difference and aggregate metric differences."""
    comparisons = {}
    for group, entry in results["tasks"].items():
        records = [json.loads(x) for x in (output / entry["samples"]).read_text().splitlines()]
        names = list(entry.get("subtasks", {group: None}))
        records = [r for r in records if r["task"] in names]
        same_pred, same_metrics, max_diff = 0, 0, 0.0
        for rec in records:
            theirs = peer.logprobs[rec["task"]][rec["doc_id"]]
            ours = [r["logprob"] for r in rec["requests"]][: len(theirs)]  # TruthfulQA: mc1-only answers last
            max_diff = max(max_diff, float(np.max(np.abs(np.array(ours) - np.array(theirs)))))
            by_char = entry["metric"] == "acc_norm"
            same_pred += rec["prediction"] == (pred_norm(theirs, rec["choices"]) if by_char else pred(theirs))
            their_metrics = peer.doc_metrics[rec["task"]][rec["doc_id"]]
            same_metrics += all(abs(rec["metrics"][k] - v) <= 1e-6 for k, v in their_metrics.items())
        diffs = {}
        for metric, value in entry["metrics"].items():
            if metric.endswith("_stderr") or value is None or metric not in peer.metrics[names[0]]:
                continue  # (TruthfulQA's mc1: lm-eval's truthfulqa_mc2 task does not report it)
            n = [entry["subtasks"][name]["n_docs"] for name in names] if "subtasks" in entry else [1]
            theirs = float(np.average([peer.metrics[name][metric] for name in names], weights=n))
            diffs[metric] = 100 * abs(value - theirs)
        comparisons[group] = Comparison(len(records), same_pred, same_metrics, max_diff, diffs)
    return comparisons


@dataclass
class SideBySide:
    """Both sides on the same docs: agreement per task group, and wall times without model loading
    (llamaherd: building requests + tokenizing + scoring; lm-eval: its whole `evaluate`)."""

    comparisons: dict[str, Comparison]
    seconds: float
    peer_seconds: float
    n_requests: int
    peer_requests: int


def side_by_side(work: Path, benchmarks: Path, task_limits: list[tuple[str, int]], batch_size: int,
                 device: str, progress: bool = False, warmup: bool = False) -> SideBySide:
    """Export the embedded model, then score each (tasks, limit) with `herd eval`'s runner and with
    `lm-eval --model hf`, both loading the export in float32 at the same batch size."""
    from lm_eval.models.huggingface import HFLM

    from llamaherd.evaluate.runner import EvalOptions, evaluate
    from llamaherd.evaluate.tasks import resolve_tasks

    model_dir = export_hf(None, work / "smollm2-135m-instruct-hf")
    data_dir = local_data_dir(benchmarks, work / "data", n_validation=max(100, *(n for _, n in task_limits)))
    lm = HFLM(pretrained=str(model_dir), dtype="float32", device=device, batch_size=batch_size)

    def ours(tasks: str, limit: int, out: Path) -> dict[str, Any]:
        shutil.rmtree(out, ignore_errors=True)  # score everything again, no resume
        return evaluate(EvalOptions(model=str(model_dir), protocol="harness", tasks=tasks.split(","), limit=limit,
                                    batch_size=batch_size, output=out, data_dir=data_dir, device=device,
                                    progress=progress))

    if warmup:  # first calls pay for CUDA context and kernel selection on both sides
        ours("truthfulqa_mc2", 2, work / "warmup")
        run_lm_eval(resolve_tasks("truthfulqa_mc2", data_dir), model_dir, 2, batch_size, device, lm)
    comparisons, seconds, peer_seconds, n_requests, peer_requests = {}, 0.0, 0.0, 0, 0
    for k, (tasks, limit) in enumerate(task_limits):
        out = work / f"llamaherd-{k}"
        results = ours(tasks, limit, out)
        t = results["timings"]
        seconds += t["build_s"] + t["tokenize_s"] + t["score_s"]
        n_requests += t["requests"]
        peer = run_lm_eval(resolve_tasks(tasks, data_dir), model_dir, limit, batch_size, device, lm)
        peer_seconds += peer.seconds
        peer_requests += peer.n_requests
        comparisons |= compare(out, results, peer)
    return SideBySide(comparisons, seconds, peer_seconds, n_requests, peer_requests)
