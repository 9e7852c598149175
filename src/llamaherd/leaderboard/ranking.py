"""The ranking the terminal table and the web page both show: one row per model, kind and protocol.

"measured" rows come from the newest evaluation run of each task; "reported" rows are published figures.
A derivative's delta is its average minus its parent's, taken from the parent's row of the same kind and
protocol only (a local `--limit` estimate is never compared with a published full run).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from llamaherd.leaderboard.ingest import BENCHMARKS
from llamaherd.leaderboard.registry import ModelRecord, Registry, utc_now

KINDS = ("measured", "reported")
LEGEND = {
    "~": "estimate: evaluated on a --limit subset of the items, not the full benchmark",
    "measured": "evaluated here with llamaherd",
    "reported": "published Open LLM Leaderboard figure (2023), with its source",
    "delta": "average minus the parent's average (same kind and protocol)",
}


@dataclass
class BoardRow:
    """One line of the leaderboard."""

    name: str
    kind: str
    protocol: str
    family: str | None
    n_params: int | None
    scores: dict[str, float | None]
    estimates: dict[str, bool]
    average: float | None
    estimate: bool
    parent: str | None = None
    method: str | None = None
    synthetic: str | None = None  # `synthetic_note` of the edge from the parent
    parent_average: float | None = None
    delta: float | None = None
    delta_estimate: bool = False
    date: str | None = None
    limit: int | None = None
    source: str | None = None
    notes: str | None = None
    rank: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _measured_rows(reg: Registry, models: dict[int, ModelRecord]) -> dict[tuple[int, str, str], BoardRow]:
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for run in reg.runs():
        if run["benchmark"] in BENCHMARKS and run["score"] is not None:
            groups.setdefault((run["model_id"], run["protocol"]), []).append(run)
    rows = {}
    for (model_id, protocol), runs in groups.items():
        scores: dict[str, float | None] = {}
        estimates: dict[str, bool] = {}
        for b in BENCHMARKS:
            mine = [r for r in runs if r["benchmark"] == b]
            scores[b] = _mean([r["score"] for r in mine]) if mine else None
            estimates[b] = any(r["is_estimate"] for r in mine)
        complete = all(v is not None for v in scores.values())
        limits = [r["limit"] for r in runs if r["limit"] is not None]
        m = models[model_id]
        rows[model_id, "measured", protocol] = BoardRow(
            name=m.name, kind="measured", protocol=protocol, family=m.family, n_params=m.n_params, scores=scores,
            estimates=estimates, average=_mean(list(scores.values())) if complete else None,
            estimate=any(estimates.values()), date=max(r["date"] for r in runs), limit=max(limits, default=None),
            source=m.path, notes=m.notes)
    return rows


def _reported_rows(reg: Registry, models: dict[int, ModelRecord]) -> dict[tuple[int, str, str], BoardRow]:
    rows = {}
    for rep in reg.reported():
        m = models[rep["model_id"]]
        rows[m.id, "reported", rep["protocol"]] = BoardRow(
            name=m.name, kind="reported", protocol=rep["protocol"], family=m.family, n_params=m.n_params,
            scores={b: rep[b] for b in BENCHMARKS}, estimates=dict.fromkeys(BENCHMARKS, False),
            average=rep["average"], estimate=False, date=rep["source_date"], source=rep["source"],
            notes=rep["notes"])
    return rows


def board_rows(reg: Registry, *, family: str | None = None, protocol: str | None = None,
               kind: str | None = None) -> list[BoardRow]:
    """The ranking, best average first (rows without a full average last), optionally filtered."""
    models = {m.id: m for m in reg.models()}
    parents: dict[int, dict[str, Any]] = {}
    for edge in reg.edges():  # oldest edge first: a merge's first parent is its primary one
        parents.setdefault(edge["child_id"], edge)
    rows = _measured_rows(reg, models) | _reported_rows(reg, models)
    for (model_id, row_kind, row_protocol), row in rows.items():
        if model_id not in parents:
            continue
        edge = parents[model_id]
        parent_id, row.method, row.synthetic = edge["parent_id"], edge["method"], synthetic_note(edge["data_files"])
        row.parent = models[parent_id].name
        parent_row = rows.get((parent_id, row_kind, row_protocol))
        if parent_row is not None:
            row.parent_average = parent_row.average
            if row.average is not None and parent_row.average is not None:
                row.delta = round(row.average - parent_row.average, 2)
                row.delta_estimate = row.estimate or parent_row.estimate
    selected = [r for r in rows.values()
                if (family is None or (r.family or "").lower() == family.lower())
                and (protocol is None or r.protocol == protocol) and (kind is None or r.kind == kind)]
    selected.sort(key=lambda r: (r.average is None, -(r.average or 0.0), r.name.lower(), r.kind))
    for i, r in enumerate(selected, start=1):
        r.rank = i
    return selected


def model_detail(reg: Registry, name: str) -> dict[str, Any]:
    """Everything known about one model: fields, parents, children, latest runs, run history, reported rows."""
    m = reg.get_model(name)
    edges = reg.edges()
    return {
        "model": asdict(m),
        "parents": [_edge(e, "parent") for e in edges if e["child_id"] == m.id],
        "children": [_edge(e, "child") for e in edges if e["parent_id"] == m.id],
        "latest": reg.runs(m.id),
        "history": reg.runs(m.id, latest=False),
        "reported": reg.reported(m.id),
    }


def _edge(edge: dict[str, Any], side: str) -> dict[str, Any]:
    keep = ("method", "data_files", "hyperparameters", "final_metrics", "date", "source")
    return {"name": edge[side], **{k: edge[k] for k in keep}, "synthetic": synthetic_note(edge["data_files"])}


def synthetic_note(data_files: list[dict[str, Any]]) -> str | None:
    """The line "trained on synthetic data from TEACHER (recipe)" for an edge whose data files `herd synth` wrote
    (their "synthetic" record, see `train.lineage`), or None; a file changed since its run finished says so."""
    sources = []
    for f in data_files:
        if (s := f.get("synthetic")) is not None:
            edited = "" if s["matches_manifest"] else ", edited after generation"
            sources.append(f"{s['teacher']['name']} ({s['recipe']}{edited})")
    return f"trained on synthetic data from {', '.join(dict.fromkeys(sources))}" if sources else None


def board_data(reg: Registry) -> dict[str, Any]:
    """The JSON document the web page renders: ranking, lineage and every model's detail."""
    rows = board_rows(reg)
    return {
        "generated": utc_now(),
        "benchmarks": list(BENCHMARKS),
        "legend": LEGEND,
        "rows": [r.to_dict() for r in rows],
        "models": {m.name: model_detail(reg, m.name) for m in reg.models()},
    }
