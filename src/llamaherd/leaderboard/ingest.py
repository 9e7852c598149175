"""Feed the registry from the files other jobs write: `herd eval`'s results.json and fine-tuning's lineage.json.

Both imports are idempotent (importing a file twice changes nothing) and match models by content fingerprint
first, then by name, so the same weights evaluated from two paths land on one model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamaherd.leaderboard.registry import METHODS, LeaderboardError, Registry, opened
from llamaherd.train.lineage import find_lineage

BENCHMARKS = ("arc", "hellaswag", "mmlu", "truthfulqa")
PROTOCOLS = ("leaderboard-2023", "harness")


@dataclass(frozen=True)
class RecordedResults:
    """What one results.json added: the model it was matched to and the tasks recorded."""

    model: str
    protocol: str
    tasks: tuple[str, ...]
    estimate: bool
    lineage: RecordedLineage | None


@dataclass(frozen=True)
class RecordedLineage:
    """One imported lineage edge."""

    parent: str
    child: str
    method: str


def benchmark_of(task: str) -> str | None:
    """The leaderboard column a task feeds (arc_challenge -> arc, hendrycksTest-* -> mmlu...), or None."""
    t = task.lower()
    if t in ("arc", "arc_challenge", "arc-challenge"):
        return "arc"
    if t.startswith("hellaswag"):
        return "hellaswag"
    if t.startswith(("mmlu", "hendryckstest")):
        return "mmlu"
    if t.startswith("truthfulqa"):
        return "truthfulqa"
    return None


class _Doc:
    """A parsed JSON file whose lookups fail with the file and the dotted field name.

    `data` is an object already read from the file at field `prefix` (the lineage a results.json carries at
    `model.lineage.`), so that errors name its fields in full.
    """

    def __init__(self, path: str | Path, kind: str, data: dict[str, Any] | None = None, prefix: str = "") -> None:
        self.path = Path(path).expanduser()
        self.data, self.prefix = data, prefix
        if data is None:
            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise LeaderboardError(f"{self.path}: no such {kind} file") from None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise LeaderboardError(f"{self.path}: not valid JSON ({e}); is it a {kind} file?") from None
            if not isinstance(self.data, dict):
                raise LeaderboardError(f"{self.path}: expected a JSON object at the top of a {kind} file")
        if self.data.get("schema") != 1:
            raise LeaderboardError(f"{self.path}: field '{self.prefix}schema' is {self.data.get('schema')!r}; this "
                                   f"llamaherd reads {kind} schema 1")

    def get(self, field: str | tuple[str, ...], kind: type | tuple[type, ...], *, required: bool = True) -> Any:
        """The value at a dotted field name (or a tuple of keys, for keys that contain dots), type-checked."""
        keys = tuple(field.split(".")) if isinstance(field, str) else field
        dotted = self.prefix + ".".join(keys)
        value: Any = self.data
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value is None and not required:
            return None
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _tuple(kind)):
            want = " or ".join(t.__name__ for t in _tuple(kind))
            raise LeaderboardError(f"{self.path}: field '{dotted}' is {value!r}; expected {want}")
        return value


def _tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def record_results(db: Registry | str | Path | None, results_json_path: str | Path) -> RecordedResults:
    """Record an evaluation's results.json (one run per task), then the model's parent: from the lineage the file
    carries (`model.lineage`), else a lineage.json found by the model, else a PEFT adapter's `model.base`.

    The runs are committed before the lineage import, so a bad lineage never costs the results.
    """
    doc = _Doc(results_json_path, "results.json")
    protocol = doc.get("protocol", str)
    if protocol not in PROTOCOLS:
        raise LeaderboardError(f"{doc.path}: field 'protocol' is {protocol!r}; expected one of {PROTOCOLS}")
    name = doc.get("model.name", str)
    model_path = doc.get("model.path", str, required=False)
    limit = doc.get("limit", int, required=False)
    estimate = bool(doc.get("estimate", bool, required=False)) or limit is not None
    date = doc.get("date", str)
    tasks = doc.get("tasks", dict)
    fingerprint = doc.get("model.fingerprint", str, required=False)
    benchmarks = [benchmark_of(t) for t in tasks]
    with opened(db) as reg:
        with reg.transaction():
            model = reg.upsert_model(
                name, path=model_path, fingerprint=fingerprint,
                family=doc.get("model.family", str, required=False),
                n_params=doc.get("model.n_params", int, required=False))
            for task, benchmark in zip(tasks, benchmarks, strict=True):
                reg.add_run(model.id, fingerprint=fingerprint, protocol=protocol, limit=limit, is_estimate=estimate,
                            date=date, versions=doc.get("versions", dict, required=False),
                            results_path=str(doc.path.resolve()),
                            **_task_run(doc, task, benchmark, benchmarks.count(benchmark) == 1))
        try:
            lineage = _record_parent(reg, doc, model.name)
        except LeaderboardError as e:
            raise LeaderboardError(f"{e} (the results were recorded without a parent; fix the lineage and import "
                                   "the file again)") from None
    return RecordedResults(model.name, protocol, tuple(tasks), estimate, lineage)


def _record_parent(reg: Registry, doc: _Doc, name: str) -> RecordedLineage | None:
    """The lineage edge of a results.json's model (see `record_results`), or None when it names no parent."""
    carried = doc.get("model.lineage", dict, required=False)
    if carried is not None:
        return _import_lineage(reg, _Doc(doc.path, "lineage", carried, "model.lineage."))
    model_path = doc.get("model.path", str, required=False)
    if model_path and (edge := import_lineage_near(reg, model_path)):
        return edge
    if doc.get("model.base", dict, required=False) is None:
        return None
    with reg.transaction():  # an adapter without a run's lineage.json: its base is its parent
        base = reg.upsert_model(doc.get("model.base.name", str), path=doc.get("model.base.path", str, required=False),
                                fingerprint=doc.get("model.base.fingerprint", str, required=False))
        child = reg.find_model(name)
        reg.upsert_edge(base.id, child.id, "lora", source=str(doc.path.resolve()))
    return RecordedLineage(base.name, child.name, "lora")


def _task_run(doc: _Doc, task: str, benchmark: str | None, sole: bool) -> dict[str, Any]:
    """The eval_runs columns one task of a results.json fills.

    The score is the file's own leaderboard column when this is the only task feeding it (`sole`), else the
    task's headline metric, in percent either way.
    """
    spec = ("tasks", task)
    metrics = doc.get((*spec, "metrics"), dict)
    metric = doc.get((*spec, "metric"), str, required=False)
    score = doc.get(("scores", benchmark), (int, float), required=False) if benchmark and sole else None
    if score is None and isinstance(metrics.get(metric), int | float):
        score = 100.0 * metrics[metric]
    samples = doc.get((*spec, "samples"), str, required=False)
    return {
        "task": task, "benchmark": benchmark, "metric": metric, "metrics": metrics,
        "score": score if score is not None and math.isfinite(score) else None,
        "task_version": _str(doc.get((*spec, "version"), (str, int, float), required=False)),
        "n_shot": doc.get((*spec, "n_shot"), int, required=False),
        "n_docs": doc.get((*spec, "n_docs"), int, required=False),
        "data_form": doc.get((*spec, "data_form"), str, required=False),
        "samples_path": str((doc.path.parent / samples).resolve()) if samples else None,
    }


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def import_lineage(db: Registry | str | Path | None, lineage_json_path: str | Path) -> RecordedLineage:
    """Record the parent -> child edge a fine-tuning run's lineage.json describes (creating either model)."""
    with opened(db) as reg:
        return _import_lineage(reg, _Doc(lineage_json_path, "lineage.json"))


def _import_lineage(reg: Registry, doc: _Doc) -> RecordedLineage:
    method = doc.get("method", str)
    if method not in METHODS:
        raise LeaderboardError(f"{doc.path}: field '{doc.prefix}method' is {method!r}; expected one of "
                               f"{', '.join(METHODS)}")
    data_files = doc.get("data_files", list, required=False) or []
    for i, f in enumerate(data_files):
        if not isinstance(f, dict) or not isinstance(f.get("path"), str):
            raise LeaderboardError(f"{doc.path}: field '{doc.prefix}data_files[{i}]' is {f!r}; expected "
                                   '{"path": str, "sha256": str}')
        if "synthetic" in f and not _is_synthetic(f["synthetic"]):
            raise LeaderboardError(f"{doc.path}: field '{doc.prefix}data_files[{i}].synthetic' is {f['synthetic']!r}; "
                                   'expected {"recipe": str, "teacher": {"name": str, ...}, "matches_manifest": bool, '
                                   "...} as herd finetune writes it")
    with reg.transaction():
        parent = reg.upsert_model(doc.get("parent.name", str), path=doc.get("parent.path", str, required=False),
                                  fingerprint=doc.get("parent.fingerprint", str, required=False))
        child = reg.upsert_model(doc.get("child.name", str), path=doc.get("child.path", str, required=False),
                                 fingerprint=doc.get("child.fingerprint", str, required=False),
                                 family=parent.family)
        if child.id == parent.id:
            raise LeaderboardError(f"{doc.path}: child and parent are the same model ({child.name}); "
                                   "check their names and fingerprints")
        reg.upsert_edge(parent.id, child.id, method, data_files=data_files,
                        hyperparameters=doc.get("hyperparameters", dict, required=False),
                        final_metrics=doc.get("final_metrics", dict, required=False),
                        date=doc.get("date", str, required=False), source=str(doc.path.resolve()))
    return RecordedLineage(parent.name, child.name, method)


def _is_synthetic(value: Any) -> bool:
    """Whether a data file's "synthetic" record has the fields the displays read (`train.lineage`'s schema)."""
    return (isinstance(value, dict) and isinstance(value.get("recipe"), str)
            and isinstance(value.get("matches_manifest"), bool)
            and isinstance(value.get("teacher"), dict) and isinstance(value["teacher"].get("name"), str))


def import_lineage_near(db: Registry | str | Path | None, model_path: str | Path) -> RecordedLineage | None:
    """Import the lineage.json that describes a model directory (`train.lineage.find_lineage`), if any."""
    found = find_lineage(model_path)
    return import_lineage(db, found) if found else None
