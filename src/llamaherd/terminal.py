"""Text from files, checkpoints, datasets and the leaderboard database, made safe to print on a terminal.

Such text may carry terminal control sequences: `ESC ]0;title BEL` retitles the window, `ESC [2J` clears it,
and the bidi overrides of CVE-2021-42574 ("Trojan Source") reorder what is shown. Every printer passes it
through `printable` (or `printable_text` for rich, whose markup such as "[red]" would otherwise be parsed);
`--json` and `--csv` output stays exact.
"""

from __future__ import annotations

import os
import re

from rich.console import Console
from rich.text import Text

# C0 controls, DEL, C1 controls (CSI 0x9b, OSC 0x9d...), the Unicode bidi controls (LRM, RLM, ALM, LRE..RLO,
# LRI..PDI) and the line/paragraph separators, which some terminals and viewers act on.
CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: object, keep: str = "") -> str:
    """`str(text)` with each control character written as Python writes it in a literal (`\\x1b`, `\\n`, `\\u202e`).

    keep: control characters left as they are, for output whose format needs them (e.g. "\\n" in streamed
    model output); single-line fields keep none.
    """
    def escape(m: re.Match[str]) -> str:
        return m.group() if m.group() in keep else m.group().encode("unicode_escape").decode("ascii")

    return CONTROLS.sub(escape, str(text))


def printable_text(text: object, style: str = "") -> Text:
    """`printable(text)` as a rich `Text`, so rich shows it literally (markup such as "[red]" included)."""
    return Text(printable(text), style=style)


PIPE_WIDTH = 160  # columns for rich output to a pipe or a file


def console(**options) -> Console:
    """A rich Console (options as rich takes them) that does not cut tables at rich's 80 columns when the output
    is a pipe or a file (a log, `| less`): PIPE_WIDTH there unless COLUMNS says otherwise; a terminal keeps its
    own width."""
    out = Console(**options)
    if not out.is_terminal and "COLUMNS" not in os.environ and "width" not in options:
        out.width = max(out.width, PIPE_WIDTH)
    return out
