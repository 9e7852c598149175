"""`herd eval`: score a model on the leaderboard suite, resumably, with per-item records and results.json.

Output directory layout:
    run.json                 what the records were computed with (model fingerprint, protocol, data, ...);
                             a resumed run must match it
    samples_<task>.jsonl     one line per finished doc, appended as docs finish (MMLU: samples_mmlu.jsonl);
                             with log_samples also each request's strings, token ids and per-token values
    results.json             metrics, leaderboard scores, timings, versions (written last, atomically)

Killing a run loses at most the docs in flight: the same command finds the finished docs in the samples
files, scores only the rest, and aggregates over all of them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from llamaherd.errors import InputError
from llamaherd.files import atomic_write, complete_lines
from llamaherd.evaluate.engine import Encoded, LoglikelihoodEngine
from llamaherd.evaluate.metrics import (
    LEADERBOARD_METRICS,
    Score,
    group_score,
    leaderboard_average,
    mean_score,
    pred,
    pred_norm,
    score_doc,
)
from llamaherd.evaluate.tasks import (
    TASK_NAMES,
    Doc,
    Protocol,
    Task,
    build_requests,
    get_protocol,
    resolve_tasks,
)
from llamaherd.train.lineage import model_identity

SCHEMA = 1
# run.json keys added after schema 1, with the value that the runs whose run.json lacks them were made with
RUN_DEFAULTS = {"log_samples": False}
TOKENIZE_CHUNK = 256  # docs per call to the (parallel) tokenizer
Done = dict[str, dict[int, tuple[list[tuple[float, bool]], int]]]  # task -> doc_id -> (results, n truncated)
SCORE_COLUMNS = {"arc_challenge": "arc", "hellaswag": "hellaswag", "mmlu": "mmlu", "truthfulqa_mc2": "truthfulqa"}


@dataclass
class EvalOptions:
    """Everything `herd eval` takes; see `add_eval_parser` for the meaning of each."""

    model: str | None = None
    base: str | None = None
    protocol: str = "leaderboard-2023"
    tasks: Sequence[str] = TASK_NAMES
    limit: int | None = None
    batch_size: int = 16
    output: Path = Path("eval-results")
    data_dir: Path | None = None
    dtype: str = "fp32"
    device: str | None = None
    quantize: str | None = None
    max_length: int | None = None
    hellaswag_form: str | None = None
    progress: bool = True
    log_samples: bool = False


@dataclass
class TaskRun:
    """One task's docs and where its records go (MMLU subjects share their group's file)."""

    task: Task
    docs: list[Doc]

    @property
    def group(self) -> str:
        return self.task.group or self.task.name


def evaluate(opts: EvalOptions) -> dict[str, Any]:
    """Run (or resume) an evaluation and return the results.json content (also written to opts.output)."""
    from llamaherd.load import load_model

    start = time.perf_counter()
    timings: dict[str, float] = {}
    protocol = get_protocol(opts.protocol)
    # Task names, data and --limit are checked before the model is loaded.
    tasks = resolve_tasks(opts.tasks, opts.data_dir, opts.hellaswag_form)
    for task in tasks:
        task.data  # noqa: B018 (loads and checks the data files)
    timings["data_s"] = time.perf_counter() - start
    t = time.perf_counter()
    runs = [TaskRun(task, build_requests(task, protocol, opts.limit)) for task in tasks]
    timings["build_s"] = time.perf_counter() - t

    t = time.perf_counter()
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model(opts.model, dtype=opts.dtype, device=device, quantize=opts.quantize, base=opts.base)
    identity = model_identity(loaded.source)
    add_bos = protocol.add_bos and loaded.tokenizer.add_bos_default
    engine = LoglikelihoodEngine(loaded.model, loaded.tokenizer, add_bos, opts.batch_size, opts.max_length)
    timings["load_s"] = time.perf_counter() - t

    out = Path(opts.output)
    out.mkdir(parents=True, exist_ok=True)
    _claim_output(out, {
        "schema": SCHEMA, "model_fingerprint": identity["fingerprint"],
        **({"base_fingerprint": identity["base"]["fingerprint"]} if "base" in identity else {}),
        "protocol": protocol.name, "add_bos": add_bos,
        "max_length": engine.max_length, "dtype": opts.dtype, "quantize": opts.quantize,
        "log_samples": opts.log_samples,  # a resumed run keeps every record of one kind
        "tasks": {r.task.name: {"version": r.task.versions[protocol.name], "data_form": r.task.data.form}
                  for r in runs},  # the files may move; each record's prompt hash checks the content
    })
    done = _load_samples(out, runs)
    n_resumed = sum(len(v) for v in done.values())
    timings |= _score_pending(engine, runs, done, out, opts.progress, opts.log_samples)

    results = _results(opts, protocol, loaded, identity, runs, done, engine.max_length)
    timings["total_s"] = time.perf_counter() - start
    results["timings"] = {**timings, "resumed_docs": n_resumed}
    atomic_write(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results


def _claim_output(out: Path, run: dict[str, Any]) -> None:
    """Write run.json, or check that the records already there were made the same way."""
    path = out / "run.json"
    if path.exists():
        try:
            previous = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e.msg}); delete the output directory to start over") from None
        changed = [k for k in run if k != "tasks" and previous.get(k, RUN_DEFAULTS.get(k)) != run[k]]
        changed += [f"tasks.{name}" for name, spec in run["tasks"].items()
                    if previous.get("tasks", {}).get(name, spec) != spec]
        if changed:
            raise InputError(
                f"{out} holds records of a different evaluation ({', '.join(changed)} differ); "
                "use another --output directory, or delete this one to start over"
            )
        run = previous | {"tasks": previous.get("tasks", {}) | run["tasks"]}
    atomic_write(path, json.dumps(run, indent=2) + "\n")


def _prompt_hash(doc: Doc) -> str:
    """Identifies the exact requests of a doc, so resumed records are known to match."""
    text = "\x1f".join([doc.context, *(r.context + "\x1e" + r.continuation for r in doc.requests)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _samples_path(out: Path, group: str) -> Path:
    return out / f"samples_{group}.jsonl"


def _load_samples(out: Path, runs: list[TaskRun]) -> Done:
    """Finished docs per task: doc_id -> ((log-likelihood, is_greedy) per request, truncated requests).

    A last line cut short by a kill is dropped (the file is truncated back to its last full line).
    """
    by_task = {r.task.name: {d.doc_id: d for d in r.docs} for r in runs}
    done: Done = {name: {} for name in by_task}
    for path in {_samples_path(out, r.group) for r in runs}:
        if not path.exists():
            continue
        for n, line in enumerate(complete_lines(path), 1):  # a line torn by a kill is cut off
            try:
                rec = json.loads(line)
                task, doc_id = rec["task"], rec["doc_id"]
                results = [(float(r["logprob"]), bool(r["is_greedy"])) for r in rec["requests"]]
                n_truncated = sum(bool(r["truncated"]) for r in rec["requests"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise InputError(f"{path}:{n}: not a samples record ({e}); delete the file to recompute it") from None
            doc = by_task.get(task, {}).get(doc_id)
            if doc is None:
                continue  # a doc beyond this run's --limit, or a task not asked for now
            if rec.get("prompt_sha256") != _prompt_hash(doc) or len(results) != len(doc.requests):
                raise InputError(
                    f"{path}:{n}: {task} doc {doc_id} was recorded with different prompts; "
                    "use another --output directory, or delete this one to start over"
                )
            done[task][doc_id] = (results, n_truncated)
    return done


def _score_pending(engine: LoglikelihoodEngine, runs: list[TaskRun], done: Done, out: Path,
                   progress: bool, log_samples: bool = False) -> dict[str, float]:
    """Score every unfinished doc of every task in one length-sorted stream; append each doc when done
    (`_record`; with log_samples, with what the engine read). Returns the timings."""
    pending = [(run, doc) for run in runs for doc in run.docs if doc.doc_id not in done[run.task.name]]
    t = time.perf_counter()
    owner = [(k, j) for k, (_, doc) in enumerate(pending) for j in range(len(doc.requests))]
    encoded = []
    with tqdm(total=len(pending), desc="tokenizing", unit="doc", disable=not progress) as bar:
        for start in range(0, len(pending), TOKENIZE_CHUNK):
            chunk = pending[start:start + TOKENIZE_CHUNK]
            encoded += engine.encode([(r.context, r.continuation) for _, doc in chunk for r in doc.requests])
            bar.update(len(chunk))
    tokenize_s = time.perf_counter() - t

    t = time.perf_counter()
    files: dict[str, int] = {}
    partial: list[list[Any]] = [[None] * len(doc.requests) for _, doc in pending]
    missing = [len(doc.requests) for _, doc in pending]
    try:
        bar = tqdm(total=len(encoded), desc="scoring", unit="req", disable=not progress)
        for i, result in engine.iter_results(encoded):
            k, j = owner[i]
            partial[k][j] = result
            missing[k] -= 1
            bar.update()
            if missing[k] == 0:
                run, doc = pending[k]
                if run.group not in files:
                    files[run.group] = os.open(_samples_path(out, run.group),
                                             os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                read = encoded[i - j : i - j + len(doc.requests)] if log_samples else None  # doc's requests
                os.write(files[run.group], (json.dumps(_record(run, doc, partial[k], read)) + "\n").encode())
                done[run.task.name][doc.doc_id] = ([(r.logprob, r.is_greedy) for r in partial[k]],
                                                   sum(r.truncated for r in partial[k]))
        bar.close()
    finally:
        for fd in files.values():
            os.close(fd)
    elapsed = time.perf_counter() - t
    return {"tokenize_s": tokenize_s, "score_s": elapsed, "requests": len(encoded),
            "requests_per_s": len(encoded) / elapsed if elapsed > 0 else 0.0,
            "prefix_tokens_reused": engine.prefix_tokens_reused}


def _record(run: TaskRun, doc: Doc, results: list[Any], read: list[Encoded] | None = None) -> dict[str, Any]:
    """One samples line. `prediction` follows the task's headline metric (acc_norm: per-character
    log-likelihood); for mc2 it is the most likely mc2 answer and `correct` says whether it is a true one.

    With `read` (the engine's encoding of each request: --log-samples) the line also holds what lm-eval's
    --log_samples writes, under its names (`arguments`: each request's context and continuation strings,
    `filtered_resps`: [log-likelihood, is_greedy]), and per request the token ids the model read (the
    context after any left-truncation) and each continuation token's log-likelihood.
    """
    logprobs = [r.logprob for r in results]
    metrics = score_doc(doc, [(r.logprob, r.is_greedy) for r in results])
    if "mc2" in doc.metrics:
        prediction = pred(logprobs[: len(doc.true_mask)])
        correct = bool(doc.true_mask[prediction])
    else:
        prediction = pred_norm(logprobs, doc.choices) if "acc_norm" in doc.metrics else pred(logprobs)
        correct = prediction == doc.gold
    record = {
        "task": doc.task, "doc_id": doc.doc_id, "index": doc.index, "prompt_sha256": _prompt_hash(doc),
        "choices": list(doc.choices), "gold": doc.gold, "prediction": prediction, "correct": correct,
        "metrics": metrics,
        "requests": [{"continuation": req.continuation, "logprob": r.logprob, "is_greedy": r.is_greedy,
                      "n_tokens": len(r.token_logprobs), "truncated": r.truncated}
                     for req, r in zip(doc.requests, results, strict=True)],
    }
    if doc.mc1_indices is not None:
        record["mc1_indices"] = list(doc.mc1_indices)  # positions in choices, the correct answer first
    if read is not None:
        record["arguments"] = {f"gen_args_{j}": {"arg_0": req.context, "arg_1": req.continuation}
                               for j, req in enumerate(doc.requests)}
        record["filtered_resps"] = [[r.logprob, r.is_greedy] for r in results]
        for entry, e, r in zip(record["requests"], read, results, strict=True):
            entry |= {"context_ids": list(e.context), "continuation_ids": list(e.continuation),
                      "token_logprobs": list(r.token_logprobs)}
    return record


def _results(opts: EvalOptions, protocol: Protocol, loaded: Any, identity: dict[str, Any], runs: list[TaskRun],
             done: Done, max_length: int) -> dict[str, Any]:
    """results.json content from all finished records."""
    per_task: dict[str, dict[str, Score]] = {}
    for run in runs:
        per_doc = [score_doc(doc, done[run.task.name][doc.doc_id][0]) for doc in run.docs]
        per_task[run.task.name] = {m: mean_score([d[m] for d in per_doc]) for m in run.task.metrics}

    tasks: dict[str, Any] = {}
    for group in dict.fromkeys(r.group for r in runs):
        members = [r for r in runs if r.group == group]
        first = members[0].task
        metric = LEADERBOARD_METRICS.get(group, first.metrics[0])
        if first.group:
            scores = {m: group_score([per_task[r.task.name][m] for r in members], protocol.mmlu_weighted)
                      for m in first.metrics}
        else:
            scores = per_task[first.name]
        entry: dict[str, Any] = {
            "version": first.versions[protocol.name], "n_shot": first.n_shot[protocol.name],
            "n_docs": sum(len(r.docs) for r in members),
            "data_form": ", ".join(dict.fromkeys(r.task.data.form for r in members)),
            "data_source": first.data.source if len(members) == 1 else f"{len(members)} subject files",
            "caveats": list(dict.fromkeys(c for r in members for c in r.task.data.caveats)),
            "metric": metric, "metrics": _metric_dict(scores), "samples": f"samples_{group}.jsonl",
        }
        if first.group:
            entry["aggregation"] = "size-weighted mean" if protocol.mmlu_weighted else "mean of subjects"
            entry["subtasks"] = {r.task.name: {"n_docs": len(r.docs), **_metric_dict(per_task[r.task.name])}
                                 for r in members}
        tasks[group] = entry

    headline = {g: tasks[g]["metrics"][tasks[g]["metric"]] for g in SCORE_COLUMNS if g in tasks}
    scores = {col: (100 * headline[g] if g in headline else None) for g, col in SCORE_COLUMNS.items()}
    scores["average"] = 100 * leaderboard_average(headline) if len(headline) == len(SCORE_COLUMNS) else None
    truncated = sum(done[run.task.name][doc.doc_id][1] for run in runs for doc in run.docs)
    config = loaded.config
    return {
        "schema": SCHEMA,
        "model": {**identity, "family": config.family, "n_params": config.n_params, "dtype": opts.dtype,
                  "quantize": opts.quantize, "max_length": max_length},
        "protocol": protocol.name, "limit": opts.limit, "estimate": opts.limit is not None,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "tasks": tasks, "scores": scores, "batch_size": opts.batch_size,
        "versions": {"llamaherd": importlib.metadata.version("llamaherd"), "torch": torch.__version__,
                     "python": platform.python_version()},
        "truncated_requests": truncated,
    }


def _metric_dict(scores: dict[str, Score]) -> dict[str, float | None]:
    """{"acc": value, "acc_stderr": se, ...} as the harness names them."""
    out: dict[str, float | None] = {}
    for name, score in scores.items():
        out[name] = score.value
        out[f"{name}_stderr"] = score.stderr
    return out


