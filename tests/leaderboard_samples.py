"""Writers for the files the leaderboard imports (results.json, lineage.json), as other jobs write them."""

from __future__ import annotations

import json
from pathlib import Path

TASKS = {"arc": ("arc_challenge", 25, "acc_norm"), "hellaswag": ("hellaswag", 10, "acc_norm"),
         "mmlu": ("mmlu", 5, "acc"), "truthfulqa": ("truthfulqa_mc2", 0, "mc2")}


def write_results(out_dir: Path, name: str, scores: dict[str, float], *, fingerprint: str | None = None,
                  path: str | None = None, date: str = "2024-01-01T00:00:00+00:00", limit: int | None = None,
                  protocol: str = "leaderboard-2023", family: str = "llama", n_params: int = 135_000_000) -> Path:
    """A results.json in `herd eval`'s schema 1 with the given percent scores (average = their mean)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = {}
    for bench, (task, n_shot, metric) in TASKS.items():
        if bench not in scores:
            continue
        tasks[task] = {"version": "1", "n_shot": n_shot, "n_docs": limit or 1000, "data_form": "local",
                       "metric": metric, "metrics": {metric: scores[bench] / 100, f"{metric}_stderr": 0.0123},
                       "samples": f"samples_{task}.jsonl", "caveats": []}
        if bench == "mmlu":  # a group, as herd eval writes it; a one-item subject has no stderr
            tasks[task]["subtasks"] = {"mmlu_anatomy": {"n_docs": 1, "acc": 1.0, "acc_stderr": None}}
    full = all(b in scores for b in TASKS)
    data = {
        "schema": 1,
        "model": {"name": name, "path": path or str(out_dir / "model"),
                  "fingerprint": fingerprint or f"sha256:{name.encode().hex():0<64}"[:71],
                  "family": family, "n_params": n_params},
        "protocol": protocol, "limit": limit, "estimate": limit is not None, "date": date, "tasks": tasks,
        "scores": {**{b: scores.get(b) for b in TASKS}, "average": sum(scores.values()) / 4 if full else None},
        "timings": {"total_s": 1.0}, "versions": {"llamaherd": "0.1.0", "torch": "2.x"},
    }
    path_out = out_dir / "results.json"
    path_out.write_text(json.dumps(data))
    return path_out


def write_lineage(out_dir: Path, child: str, parent: str, *, method: str = "lora-sft",
                  parent_fingerprint: str = "sha256:" + "ab" * 32, child_fingerprint: str | None = None,
                  child_path: str | None = None, data_files: list[dict] | None = None) -> Path:
    """A lineage.json in the fine-tuning schema 1 (data_files: default one plain Alpaca file)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "schema": 1,
        "child": {"name": child, "path": child_path or str(out_dir), "fingerprint": child_fingerprint},
        "parent": {"name": parent, "path": f"/models/{parent}", "fingerprint": parent_fingerprint},
        "method": method,
        "data_files": data_files or [{"path": "data/alpaca.jsonl", "sha256": "cd" * 32}],
        "hyperparameters": {"lr": 2e-4, "lora_r": 8}, "final_metrics": {"val_loss": 1.23},
        "date": "2024-01-02T00:00:00+00:00",
    }
    path = out_dir / "lineage.json"
    path.write_text(json.dumps(data))
    return path
