"""The leaderboard in the terminal (a rich table) and as machine-readable JSON or CSV."""

from __future__ import annotations

import csv
import io
import json

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from llamaherd.info import human_count
from llamaherd.leaderboard.ingest import BENCHMARKS
from llamaherd.leaderboard.ranking import LEGEND, BoardRow
from llamaherd.terminal import console as wide_console, printable, printable_text

TITLES = {"arc": "ARC", "hellaswag": "HellaSwag", "mmlu": "MMLU", "truthfulqa": "TruthfulQA"}
SHORT_TITLES = {"arc": "ARC", "hellaswag": "HSwag", "mmlu": "MMLU", "truthfulqa": "TQA"}
CSV_COLUMNS = ("rank", "name", "kind", "protocol", "family", "n_params", *BENCHMARKS, "average", "estimate",
               "parent", "method", "parent_average", "delta", "date", "limit", "source")


def _score(value: float | None, estimate: bool) -> str:
    if value is None:
        return "–"
    return f"{'~' if estimate else ''}{value:.2f}"


def _delta(row: BoardRow) -> Text:
    if row.delta is None:
        return Text("–", style="dim")
    mark = "~" if row.delta_estimate else ""
    return Text(f"{mark}{row.delta:+.2f}", style="green" if row.delta > 0 else "red" if row.delta < 0 else "")


def build_table(rows: list[BoardRow], title: str = "llamaherd leaderboard") -> Table:
    """A rich table of the ranking; user strings go in as `printable_text`, so markup and controls stay literal.

    The protocol and parameter columns appear only when they tell rows apart, to fit narrow terminals.
    """
    protocols = sorted({r.protocol for r in rows})
    show_protocol, show_params = len(protocols) > 1, any(r.n_params for r in rows)
    if not show_protocol and protocols:
        title = f"{title} ({protocols[0]})"
    table = Table(title=printable_text(title, style="table.title"), caption=legend_text(rows), caption_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, show_edge=False)
    table.add_column("#", justify="right")
    table.add_column("model", overflow="fold", min_width=14)
    table.add_column("family", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    if show_protocol:
        table.add_column("protocol")
    if show_params:
        table.add_column("params", justify="right")
    for b in BENCHMARKS:
        table.add_column(SHORT_TITLES[b], justify="right", no_wrap=True)
    table.add_column("avg", justify="right", style="bold", no_wrap=True)
    table.add_column("Δ", justify="right", no_wrap=True)
    for r in rows:
        model = printable_text(r.name)
        if r.parent:
            model.append(f"\n  from {printable(r.parent)} ({printable(r.method)})", style="dim")
        if r.synthetic:
            model.append(f"\n  {printable(r.synthetic)}", style="dim")
        cells: list[str | Text] = [str(r.rank), model, printable_text(r.family or ""),
                                   printable_text(r.kind, style="cyan" if r.kind == "measured" else "")]
        if show_protocol:
            cells.append(printable_text(r.protocol))
        if show_params:
            cells.append(human_count(r.n_params) if r.n_params else "")
        cells += [_score(r.scores[b], r.estimates[b]) for b in BENCHMARKS]
        cells += [_score(r.average, r.estimate), _delta(r)]
        table.add_row(*cells)
    return table


def legend_text(rows: list[BoardRow]) -> str:
    """The caption: what "~", the kinds and the delta mean (the "~" line only when an estimate is shown)."""
    lines = [f"~ {LEGEND['~']}"] if any(r.estimate for r in rows) else []
    lines += [f"{k}: {LEGEND[k]}" for k in ("measured", "reported")]
    names = ", ".join(f"{SHORT_TITLES[b]} = {TITLES[b]}" for b in BENCHMARKS if SHORT_TITLES[b] != TITLES[b])
    lines.append(f"Δ: {LEGEND['delta']}; {names}; – = no score")
    return "\n".join(lines)


def print_table(rows: list[BoardRow], console: Console | None = None, title: str = "llamaherd leaderboard") -> None:
    """Print the ranking (or a hint when it is empty)."""
    console = console or wide_console()
    if not rows:
        console.print("no models match; record one with `herd eval` or `herd leaderboard import-results`")
        return
    console.print(build_table(rows, title))


def to_json(rows: list[BoardRow]) -> str:
    """The rows as a JSON array (scores in percent; null where missing)."""
    return json.dumps([r.to_dict() for r in rows], indent=2, ensure_ascii=False)


def to_csv(rows: list[BoardRow]) -> str:
    """The rows as CSV, one column per benchmark."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        d = r.to_dict()
        writer.writerow({**{k: d.get(k) for k in CSV_COLUMNS if k not in BENCHMARKS}, **r.scores})
    return out.getvalue()
