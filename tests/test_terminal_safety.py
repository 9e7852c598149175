"""Text read from files, checkpoints and the leaderboard database reaches the terminal with its control
characters made visible and rich markup kept literal; `--json` and `--csv` keep it exact.

The reference for "control character" is Unicode's own: general categories Cc, Zl and Zp, and the
Bidi_Control property (PropList.txt), read through `unicodedata`, not through llamaherd.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import unicodedata

import pytest
from leaderboard_samples import write_lineage, write_results

from llamaherd.cli import main

# Unicode 15 PropList.txt, Bidi_Control: ALM, LRM, RLM, LRE, RLE, PDF, LRO, RLO, LRI, RLI, FSI, PDI.
BIDI_CONTROL = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# (hostile text, how it must look on the terminal), the second column written by hand.
HOSTILE = [
    ("evil\x1b]0;PWNED\x07\x1b[2Jmodel", r"evil\x1b]0;PWNED\x07\x1b[2Jmodel"),  # retitle + clear screen
    ("c1\x9b2J\x9d0;t\x9cmodel", r"c1\x9b2J\x9d0;t\x9cmodel"),  # 8-bit CSI, OSC, ST
    ("[red]markup[/red] [bold]x[link=http://x]y", "[red]markup[/red] [bold]x[link=http://x]y"),  # rich markup
    ("bidi\u202etxt.exe\u202c\u2066z", r"bidi\u202etxt.exe\u202c\u2066z"),  # right-to-left override
    ("nul\x00del\x7fbs\x08cr\rlf\nend", r"nul\x00del\x7fbs\x08cr\rlf\nend"),  # NUL, DEL, BS, CR, LF
]
NAMES = [name for name, _ in HOSTILE]
SCORES = {"arc": 30.0, "hellaswag": 40.0, "mmlu": 25.0, "truthfulqa": 45.0}


def is_control(c: str) -> bool:
    return unicodedata.category(c) in ("Cc", "Zl", "Zp") or c in BIDI_CONTROL


def raw_controls(output: str) -> list[str]:
    """Control characters in terminal output other than the newlines that end its lines."""
    return sorted({c for c in output if c != "\n" and is_control(c)})


@pytest.fixture
def plain_terminal(monkeypatch):
    """rich writes no styling of its own (not a terminal) and does not wrap long names (a wide page)."""
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("COLUMNS", "400")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_printable_escapes_exactly_the_unicode_controls():
    from llamaherd.terminal import printable

    every = "".join(map(chr, range(0x110000)))
    expected = "".join(c.encode("unicode_escape").decode("ascii") if is_control(c) else c for c in every)
    assert printable(every) == expected
    for raw, shown in HOSTILE:
        assert printable(raw) == shown
    assert printable("e\u0301 家族 👨\u200d👩\u200d👧 C:\\dir") == "e\u0301 家族 👨\u200d👩\u200d👧 C:\\dir"
    assert printable("a\nb\tc\x1b", keep="\n\t") == "a\nb\tc\\x1b"


@pytest.fixture
def board(tmp_path, capsys, plain_terminal) -> str:
    """A leaderboard holding a measured model per hostile name, a lineage edge between two and hostile notes."""
    db = str(tmp_path / "db.sqlite")
    for i, name in enumerate(NAMES):
        results = write_results(tmp_path / f"eval{i}", name, SCORES, family=f"fam{name}",
                                path=str(tmp_path / name.replace("/", "_").replace("\x00", "0")))
        code, out, err = run(capsys, "leaderboard", "import-results", str(results), "--db", db)
        assert code == 0 and not raw_controls(out + err) and HOSTILE[i][1] in out
    lineage = write_lineage(tmp_path / "lineage", NAMES[1], NAMES[0])
    code, out, err = run(capsys, "leaderboard", "import-lineage", str(lineage), "--db", db)
    assert code == 0 and not raw_controls(out + err) and f"{HOSTILE[0][1]} -> {HOSTILE[1][1]}" in out
    code, out, err = run(capsys, "leaderboard", "add", NAMES[2], "--notes", NAMES[3], "--license", NAMES[4],
                         "--db", db)
    assert code == 0 and not raw_controls(out + err)
    return db


def test_leaderboard_table_json_and_csv(board, capsys):
    code, out, err = run(capsys, "leaderboard", "--db", board)
    assert code == 0 and not raw_controls(out + err)
    for _, shown in HOSTILE:
        assert shown in out
        assert f"fam{shown}" in out
    assert f"from {HOSTILE[0][1]} (lora-sft)" in out

    code, out, _ = run(capsys, "leaderboard", "--json", "--db", board)
    rows = {r["name"]: r for r in json.loads(out) if r["kind"] == "measured"}
    assert set(rows) == set(NAMES)  # exact, control characters included
    assert rows[NAMES[1]]["parent"] == NAMES[0] and rows[NAMES[0]]["family"] == f"fam{NAMES[0]}"

    code, out, _ = run(capsys, "leaderboard", "--csv", "--db", board)
    assert {r["name"] for r in csv.DictReader(io.StringIO(out, newline="")) if r["kind"] == "measured"} == set(NAMES)


@pytest.mark.parametrize("index", range(len(HOSTILE)))
def test_leaderboard_show(board, capsys, index):
    name, shown = HOSTILE[index]
    code, out, err = run(capsys, "leaderboard", "show", name, "--db", board)
    assert code == 0 and not raw_controls(out + err)
    assert out.splitlines()[0] == shown
    assert f"family: fam{shown}" in out and "arc_challenge" in out
    if index == 0:
        assert f"parent of {HOSTILE[1][1]} (lora-sft)" in out
    if index == 1:
        assert f"made from {HOSTILE[0][1]} by lora-sft" in out
    if index == 2:
        assert f"notes: {HOSTILE[3][1]}" in out and f"license: {HOSTILE[4][1]}" in out

    code, out, _ = run(capsys, "leaderboard", "show", name, "--json", "--db", board)
    detail = json.loads(out)
    assert detail["model"]["name"] == name and detail["model"]["family"] == f"fam{name}"


def test_missing_model_and_hostile_paths_in_errors(board, tmp_path, capsys):
    code, out, err = run(capsys, "leaderboard", "show", NAMES[0] + "?", "--db", board)
    assert code == 2 and not raw_controls(out + err) and HOSTILE[0][1] + "?" in err
    missing = tmp_path / NAMES[0] / "results.json"
    code, out, err = run(capsys, "leaderboard", "import-results", str(missing), "--db", board)
    assert code == 2 and not raw_controls(out + err) and f"{tmp_path}/{HOSTILE[0][1]}/results.json" in err
    code, out, err = run(capsys, "info", str(tmp_path / NAMES[3]))
    assert code == 2 and not raw_controls(out + err) and HOSTILE[3][1] in err


def test_info_of_a_checkpoint_with_a_hostile_name(tmp_path, capsys, plain_terminal):
    from transformers import LlamaConfig

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2).to_dict()
    (ckpt / "config.json").write_text(json.dumps(config | {"_name_or_path": NAMES[0]}))
    code, out, err = run(capsys, "info", str(ckpt))
    assert code == 0 and not raw_controls(out + err)
    assert out.startswith(HOSTILE[0][1] + ": ")


def test_chat_banner_and_template_error_from_a_hostile_checkpoint(tmp_path, capsys, monkeypatch, plain_terminal):
    """The checkpoint's directory name is its name; its chat template raises with a hostile message."""
    from eval_tiny import save_tiny_eval_model

    ckpt = save_tiny_eval_model(tmp_path / NAMES[3])
    tok_cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (ckpt / "tokenizer_config.json").write_text(json.dumps(tok_cfg | {"chat_template": template}))
    capsys.readouterr()  # transformers' own progress bar while saving
    monkeypatch.setattr("builtins.input", lambda prompt="": (_ for _ in ()).throw(EOFError))
    code, out, err = run(capsys, "chat", str(ckpt))
    assert code == 0 and not raw_controls(out + err) and f"chatting with {HOSTILE[3][1]} " in err

    bad = "{{ raise_exception('" + NAMES[0].replace("\x1b", "\\x1b").replace("\x07", "\\x07") + "') }}"
    (ckpt / "tokenizer_config.json").write_text(json.dumps(tok_cfg | {"chat_template": bad}))
    code, out, err = run(capsys, "chat", str(ckpt), "--prompt", "hi", "--max-new-tokens", "1")
    assert code == 2 and not raw_controls(out + err) and HOSTILE[0][1] in err


def test_streamed_model_output_is_escaped_on_a_terminal_only(capsys, monkeypatch):
    """Generated text keeps its newlines and tabs; a pipe gets the exact text."""
    from llamaherd import cli

    pieces = ["line\n", "\ttab ", "\x1b[2J", "\u202eend"]
    assert cli._stream(iter(pieces)) == "".join(pieces)
    assert capsys.readouterr().out == "".join(pieces) + "\n"
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    cli._stream(iter(pieces))
    assert capsys.readouterr().out == "line\n\ttab \\x1b[2J\\u202eend\n"


def test_eval_summary(capsys, plain_terminal):
    from llamaherd.evaluate.cli import print_summary

    task, data_form, caveat = NAMES[0], NAMES[2], NAMES[3]
    results = {
        "model": {"name": NAMES[1], "max_length": 128, "dtype": "fp32"}, "protocol": "leaderboard-2023", "limit": 5,
        "estimate": True, "truncated_requests": 0, "scores": {"arc": 30.0, "average": None},
        "tasks": {task: {"version": NAMES[4], "n_shot": 25, "n_docs": 5, "data_form": data_form,
                         "metric": "acc_norm", "metrics": {"acc_norm": 0.3, "acc_norm_stderr": 0.01},
                         "caveats": [caveat]}},
    }
    print_summary(results)
    out, err = capsys.readouterr()
    assert not raw_controls(out + err)
    for _, shown in HOSTILE:
        assert shown in out
    assert f"{HOSTILE[0][1]}: {HOSTILE[3][1]}" in out


def test_tables_to_a_pipe_are_not_cut_at_80_columns(capsys, monkeypatch):
    """rich's width for output that is not a terminal is 80 columns, which cut the demo's and the leaderboard's
    tables in logs; terminal.console gives PIPE_WIDTH there unless COLUMNS is set."""
    from rich.table import Table

    from llamaherd.terminal import PIPE_WIDTH, console

    monkeypatch.delenv("COLUMNS", raising=False)
    table = Table(title="wide")
    table.add_column("cell")
    table.add_row("x" * 120)
    console().print(table)
    assert "x" * 120 in capsys.readouterr().out and console().width == PIPE_WIDTH
    monkeypatch.setenv("COLUMNS", "100")
    assert console().width == 100
