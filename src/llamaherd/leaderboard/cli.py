"""`herd leaderboard ...`: the ranking table, manual registry work, the web page and the demo's summary."""

from __future__ import annotations

import argparse
import json
import sys
import webbrowser
from pathlib import Path

from rich.console import Console
from rich.table import Table

from llamaherd.leaderboard.ingest import PROTOCOLS, import_lineage, import_lineage_near, record_results
from llamaherd.leaderboard.ranking import KINDS, board_rows, model_detail
from llamaherd.leaderboard.reference import load_reference
from llamaherd.leaderboard.registry import ENV_VAR, METHODS, LeaderboardError, Registry, opened
from llamaherd.leaderboard.table import print_table, to_csv, to_json
from llamaherd.leaderboard.web import DEFAULT_HOST, DEFAULT_PORT, export_html, make_server
from llamaherd.terminal import console as wide_console, printable, printable_text

DB_HELP = f"leaderboard database (default: ${ENV_VAR}, else $XDG_DATA_HOME/llamaherd/leaderboard.sqlite)"


def add_leaderboard_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `leaderboard` and its sub-commands to `herd`'s sub-parsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", default=argparse.SUPPRESS, help=DB_HELP)
    p = subparsers.add_parser("leaderboard", help="rank evaluated models beside the 2023 Open LLM Leaderboard",
                              description="Without a sub-command: print the ranking.")
    p.add_argument("--db", default=None, help=DB_HELP)
    p.add_argument("--family", default=None, help="only this family (llama1, llama2, falcon, ...)")
    p.add_argument("--protocol", default=None, choices=PROTOCOLS)
    p.add_argument("--kind", default=None, choices=KINDS, help="measured here or reported (published)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the rows as JSON")
    out.add_argument("--csv", action="store_true", help="print the rows as CSV")
    p.set_defaults(func=run_leaderboard, lb_command=None)
    sub = p.add_subparsers(dest="lb_command", metavar="{add,remove,show,import-results,import-lineage,export,serve}")

    s = sub.add_parser("add", parents=[common], help="register a model (a local checkpoint or just a name)")
    s.add_argument("model", help="local checkpoint path (fingerprinted, its lineage.json imported) or a name")
    s.add_argument("--name", default=None, help="registry name (default: the checkpoint's name)")
    s.add_argument("--family", default=None)
    s.add_argument("--n-params", type=int, default=None)
    s.add_argument("--license", default=None)
    s.add_argument("--chat-format", default=None)
    s.add_argument("--notes", default=None)
    s.add_argument("--parent", default=None, help="registered model this one was made from")
    s.add_argument("--method", default=None, choices=METHODS, help="how it was made from --parent")

    s = sub.add_parser("remove", parents=[common], help="delete a model with its runs and lineage edges")
    s.add_argument("name")

    s = sub.add_parser("show", parents=[common], help="one model: fields, lineage, per-task results, history")
    s.add_argument("name")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("import-results", parents=[common], help="record results.json files written by herd eval")
    s.add_argument("files", nargs="+", type=Path)

    s = sub.add_parser("import-lineage", parents=[common], help="record lineage.json files of fine-tuning runs")
    s.add_argument("files", nargs="+", type=Path)

    s = sub.add_parser("export", parents=[common], help="write the ranking as a self-contained HTML page")
    s.add_argument("--html", required=True, type=Path, help="output file")

    s = sub.add_parser("serve", parents=[common], help="serve the web page (read-only) on this machine")
    s.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default: loopback only)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    s.add_argument("--open", action="store_true", help="open the page in a browser")
    s.add_argument("--verbose", action="store_true", help="log each request")
    return p


def run_leaderboard(args: argparse.Namespace) -> None:
    """Run `herd leaderboard` with the parsed arguments."""
    command = args.lb_command
    if command == "serve":
        return _serve(args)
    if command == "export":
        print(f"wrote {printable(export_html(args.db, args.html))}")
        return None
    with Registry(args.db) as reg:
        load_reference(reg)
        if command is None:
            rows = board_rows(reg, family=args.family, protocol=args.protocol, kind=args.kind)
            if args.json or args.csv:
                sys.stdout.write((to_json(rows) + "\n") if args.json else to_csv(rows))
            else:
                print_table(rows)
        elif command == "add":
            _add(reg, args)
        elif command == "remove":
            print(f"removed {printable(reg.remove_model(args.name).name)} (with its runs and lineage edges)")
        elif command == "show":
            _show(reg, args.name, args.json)
        elif command == "import-results":
            for f in args.files:
                done = record_results(reg, f)
                lineage = f"; lineage {done.lineage.parent} -> {done.lineage.child}" if done.lineage else ""
                estimate = " (estimate)" if done.estimate else ""
                tasks = ", ".join(done.tasks)
                print(printable(f"recorded {done.model}: {done.protocol}{estimate}, {tasks}{lineage}"))
        elif command == "import-lineage":
            for f in args.files:
                edge = import_lineage(reg, f)
                print(printable(f"recorded {edge.parent} -> {edge.child} ({edge.method})"))
    return None


def _add(reg: Registry, args: argparse.Namespace) -> None:
    path = Path(args.model).expanduser()
    name = args.name or args.model
    if path.exists():
        from llamaherd.fingerprint import model_fingerprint
        from llamaherd.load import read_config, resolve

        source = resolve(path)
        config = read_config(source)
        name = args.name or source.name
        reg.upsert_model(name, path=str(path.resolve()), fingerprint=model_fingerprint(path),
                         family=config.family, n_params=config.n_params, chat_format=config.chat_format)
    explicit = {"family": args.family, "n_params": args.n_params, "license": args.license,
                "chat_format": args.chat_format, "notes": args.notes}
    model = reg.upsert_model(name, overwrite=True, **explicit)
    print(printable(f"registered {model.name}" + (f" ({model.fingerprint})" if model.fingerprint else "")))
    if args.parent or args.method:
        if not (args.parent and args.method):
            raise LeaderboardError("--parent and --method go together")
        parent = reg.get_model(args.parent)
        reg.upsert_edge(parent.id, model.id, args.method, source="herd leaderboard add")
        print(printable(f"recorded {parent.name} -> {model.name} ({args.method})"))
    if path.exists() and (edge := import_lineage_near(reg, path)):
        print(printable(f"recorded {edge.parent} -> {edge.child} ({edge.method}) from lineage.json"))


def _show(reg: Registry, name: str, as_json: bool) -> None:
    detail = model_detail(reg, name)
    if as_json:
        print(json.dumps(detail, indent=2, ensure_ascii=False))
        return
    console = wide_console(soft_wrap=True)
    m = detail["model"]
    console.print(printable_text(m["name"], style="bold"))
    for key in ("family", "n_params", "source", "path", "fingerprint", "license", "chat_format", "notes", "added"):
        if m[key] is not None:
            console.print(printable_text(f"  {key}: {m[key]}"))
    for e in detail["parents"]:
        date = f" ({e['date']})" if e["date"] else ""
        console.print(printable_text(f"  made from {e['name']} by {e['method']}{date}"))
        if e["synthetic"]:
            console.print(printable_text(f"    {e['synthetic']}"))
    for e in detail["children"]:
        console.print(printable_text(f"  parent of {e['name']} ({e['method']})"))
    if detail["latest"]:
        table = Table(title=f"latest runs ({len(detail['history'])} in history)")
        for col in ("task", "protocol", "n-shot", "metric", "score %", "± stderr %", "limit", "date"):
            table.add_column(col)
        for r in detail["latest"]:
            stderr = r["metrics"].get(f"{r['metric']}_stderr")
            table.add_row(printable_text(r["task"]), printable_text(r["protocol"]), str(r["n_shot"]),
                          printable_text(r["metric"]),
                          f"{'~' if r['is_estimate'] else ''}{r['score']:.2f}" if r["score"] is not None else "–",
                          f"{100 * stderr:.2f}" if isinstance(stderr, int | float) else "",
                          "full" if r["limit"] is None else str(r["limit"]), printable_text(r["date"]))
        console.print(table)
    for r in detail["reported"]:
        scores = ", ".join(f"{b} {r[b]}" for b in ("arc", "hellaswag", "mmlu", "truthfulqa", "average"))
        console.print(printable_text(f"  reported ({r['protocol']}, {r['source_date']}): {scores}"))
        console.print(printable_text(f"    source: {r['source']}"))


def _serve(args: argparse.Namespace) -> None:
    server = make_server(args.db, args.host, args.port, verbose=args.verbose)
    print(f"serving the leaderboard (read-only) at {server.url} — Ctrl-C stops", file=sys.stderr)
    if args.open:
        webbrowser.open(server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def story_summary(db: Registry | str | Path | None, results_json: str | Path, html_out: str | Path,
                  console: Console | None = None) -> Path:
    """For the demo: record an evaluation, print it ranked beside the reported 2023 rows, export the page.

    Returns the path of the exported HTML file.
    """
    console = console or wide_console()
    with opened(db) as reg:
        done = record_results(reg, results_json)
        load_reference(reg)
        print_table(board_rows(reg), console, title=f"{done.model} beside the 2023 Open LLM Leaderboard")
        out = export_html(reg, html_out)
    console.print(printable_text(f"leaderboard page: {out}"), soft_wrap=True)
    return out
