"""The curation report: per stage, documents in / removed / kept as counts and as shares of the documents read (the
shape of RefinedWeb's Figure 2), words kept, the removal reasons with a few examples each, and bad input per reason.

Written as report.json (machine-readable), report.md, report.html and report.png (a bar chart). Everything in it
is a function of the run's data, not of the engine or the number of workers, so reruns and engines agree byte
for byte. "Tokens" are words: whitespace-separated pieces of the document's text (`str.split()`), a cheap count
that needs no tokenizer; an HTML page has text only after the extract stage, so earlier stages count 0 for it.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOKENS = "words (whitespace-separated, str.split)"
EXAMPLES_PER_STAGE = 5
SNIPPET_CHARS = 300


@dataclass
class StageCount:
    """One stage's tally: documents that reached it, removals per reason, words in the documents it kept."""

    name: str
    docs_in: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    edited: int = 0  # kept documents whose text the stage shortened (substring dedup's cuts)
    words_kept: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def removed(self) -> int:
        return sum(self.reasons.values())

    @property
    def kept(self) -> int:
        return self.docs_in - self.removed


def count_words(text: str) -> int:
    """The report's token count for a text (see the module doc)."""
    return len(text.split())


def snippet(text: str, limit: int = SNIPPET_CHARS) -> str:
    """The start of a text on one line, for showing an example."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "…"


def pick_examples(candidates: Iterable[dict[str, Any]], limit: int = EXAMPLES_PER_STAGE) -> list[dict[str, Any]]:
    """Up to `limit` examples, one per reason in turn (reasons in sorted order), so each rule shows; candidates
    come in a stable order (shard, then position), which makes the choice the same on every run."""
    by_reason: dict[str, list[dict[str, Any]]] = {}
    for example in candidates:
        by_reason.setdefault(example["reason"], []).append(example)
    picked: list[dict[str, Any]] = []
    depth = 0
    while len(picked) < limit and any(depth < len(v) for v in by_reason.values()):
        for reason in sorted(by_reason):
            if depth < len(by_reason[reason]) and len(picked) < limit:
                picked.append(by_reason[reason][depth])
        depth += 1
    return picked


def build_report(recipe: str, documents_read: int, stages: list[StageCount], bad: dict[str, int],
                 minhash: str | None) -> dict[str, Any]:
    """The report as plain data (what report.json holds)."""
    def pct(n: int) -> float:
        return round(100.0 * n / documents_read, 2) if documents_read else 0.0

    rows = []
    for stage in stages:
        rows.append({"stage": stage.name, "in": stage.docs_in, "removed": stage.removed, "kept": stage.kept,
                     "removed_pct_of_input": pct(stage.removed), "kept_pct_of_input": pct(stage.kept),
                     "edited": stage.edited, "words_kept": stage.words_kept,
                     "reasons": dict(sorted(stage.reasons.items())),
                     "examples": stage.examples})
    return {"recipe": recipe, "documents_read": documents_read, "tokens": TOKENS, "minhash": minhash,
            "bad_input": dict(sorted(bad.items())), "stages": rows}


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    """Write report.json, report.png, report.md and report.html into `out_dir`; returns the Markdown's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    _plot(report, out_dir / "report.png")
    md = out_dir / "report.md"
    md.write_text(_markdown(report), encoding="utf-8")
    (out_dir / "report.html").write_text(_html(report), encoding="utf-8")
    return md


def _plot(report: dict[str, Any], path: Path) -> None:
    """Bars of the share of documents kept after each stage, with the share each stage removed on top (Fig. 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["stage"] for row in report["stages"]]
    kept = [row["kept_pct_of_input"] for row in report["stages"]]
    removed = [row["removed_pct_of_input"] for row in report["stages"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 4.2), dpi=100)
    ax.bar(names, kept, color="#3b6ea5", label="kept (% of documents read)")
    ax.bar(names, removed, bottom=kept, color="#e07b39", label="removed by this stage")
    for i, (k, r) in enumerate(zip(kept, removed)):
        ax.text(i, k + r + 1, f"{k:.1f}%", ha="center", fontsize=8)
    ax.set_ylim(0, 112)
    ax.set_ylabel("% of documents read")
    ax.set_title(f"Documents kept per stage ({report['recipe']}; {report['documents_read']:,} read)")
    ax.legend(loc="lower left", fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)


def _reasons(row: dict[str, Any]) -> dict[str, int]:
    """A stage's removal counts per reason, then its edited documents (kept, text shortened)."""
    return {**row["reasons"], **({f"{row['stage']}:edited (kept, text shortened)": row["edited"]}
                                 if row["edited"] else {})}


def _table_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for row in report["stages"]:
        rows.append([row["stage"], f"{row['in']:,}", f"{row['removed']:,}", f"{row['removed_pct_of_input']:.2f}%",
                     f"{row['kept']:,}", f"{row['kept_pct_of_input']:.2f}%", f"{row['words_kept']:,}"])
    return rows


HEADER = ["stage", "in", "removed", "removed % of read", "kept", "kept % of read", "words kept"]


def _markdown(report: dict[str, Any]) -> str:
    lines = [f"# Curation report ({report['recipe']})", "",
             f"{report['documents_read']:,} documents read. Shares are of the documents read; words are "
             f"{report['tokens']}.", ""]
    if report["minhash"]:
        lines += [f"Fuzzy deduplication: {report['minhash']}.", ""]
    lines += ["![documents kept per stage](report.png)", "",
              "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cells) + " |" for cells in _table_rows(report)]
    lines += ["", "## Bad input", ""]
    if report["bad_input"]:
        lines += [f"- {reason}: {n:,}" for reason, n in report["bad_input"].items()]
    else:
        lines.append("None.")
    lines += ["", "## Removals by reason, with examples", ""]
    for row in report["stages"]:
        if not row["examples"]:
            continue
        lines += [f"### {row['stage']}", ""]
        lines += [f"- {reason}: {n:,}" for reason, n in _reasons(row).items()]
        lines.append("")
        for ex in row["examples"]:
            where = f" <{ex['url']}>" if ex.get("url") else ""
            note = f" ({ex['note']})" if ex.get("note") else ""
            lines.append(f"- `{ex['reason']}`{note} — {ex['id']}{where}: {ex['text'] or '(no text)'}")
        lines.append("")
    return "\n".join(lines)


def _html(report: dict[str, Any]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in HEADER)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>" for cells in _table_rows(report))
    bad = "".join(f"<li>{e(r)}: {n:,}</li>" for r, n in report["bad_input"].items()) or "<li>None.</li>"
    sections = []
    for row in report["stages"]:
        if not row["examples"]:
            continue
        reasons = "".join(f"<li>{e(r)}: {n:,}</li>" for r, n in _reasons(row).items())
        examples = "".join(
            f"<li><code>{e(ex['reason'])}</code>" + (f" ({e(ex['note'])})" if ex.get("note") else "")
            + f" {e(ex['id'])}" + (f" &lt;{e(ex['url'])}&gt;" if ex.get("url") else "")
            + f": {e(ex['text'] or '(no text)')}</li>" for ex in row["examples"])
        sections.append(f"<h3>{e(row['stage'])}</h3><ul>{reasons}</ul><ul class=ex>{examples}</ul>")
    minhash = f"<p>Fuzzy deduplication: {e(report['minhash'])}.</p>" if report["minhash"] else ""
    return (
        "<!doctype html><html><head><meta charset=utf-8>"
        f"<title>Curation report ({e(report['recipe'])})</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
        ".ex li{font-size:90%;margin-bottom:.4em}</style></head><body>"
        f"<h1>Curation report ({e(report['recipe'])})</h1>"
        f"<p>{report['documents_read']:,} documents read. Shares are of the documents read; words are "
        f"{e(report['tokens'])}.</p>{minhash}"
        "<img src=report.png alt='documents kept per stage'>"
        f"<table><tr>{head}</tr>{body}</table><h2>Bad input</h2><ul>{bad}</ul>"
        f"<h2>Removals by reason, with examples</h2>{''.join(sections)}</body></html>\n"
    )
