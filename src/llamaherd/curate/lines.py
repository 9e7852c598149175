"""RefinedWeb's line-wise corrections (Penedo et al. 2023, §3.2 "Line-wise corrections" and appendix G.2).

§3.2: lines interleaved with undesirable items (social media counters such as "3 likes", navigation buttons) are
corrected by a line-correction filter, and a document that these corrections shorten by more than 5% is removed
entirely. G.2 lists the rules, each kept here as a reason:

- a line "mainly composed of uppercase characters" is discarded ("uppercase": more than `max_uppercase` (0.5) of its
  letters are uppercase; scripts without case never are);
- a line "only composed of numerical characters" is discarded ("numeric": a digit and no letter, e.g. "12.03.2021");
- a line that "is a counter (e.g. 3 likes)" is discarded ("counter": one or more number + social label pairs, in
  either order, e.g. "3 likes", "Comments (12)", "1.2K shares · 40 views");
- a line that "only contains one word" is discarded ("one_word": a single whitespace-separated token);
- a line that "is short (≤ 10 words) and matches a pattern" is edited, the match removed: "at the beginning of the
  line (e.g. sign-in)", "at the end of the line (e.g. Read more...)", "anywhere in the line (e.g. items in cart)"
  ("edited"; a line left with no word is dropped).

G.2's last rule: when the words of the flagged lines are more than 5% of the document's words, the document is
discarded; here the words removed by all rules (whitespace tokens) over the document's words, against
`max_removed_words` (0.05): what the corrections remove, as §3.2 puts it (G.2's wording would also count the words an
edited line keeps). The paper gives each pattern rule one example, found by inspecting the data; the pattern
lists below are ours, English like RefinedWeb, grown from those examples into the calls to action, navigation and
shop widgets that text extraction leaves behind.
"""

from __future__ import annotations

import re

from llamaherd.curate.base import Stage
from llamaherd.curate.document import Document
from llamaherd.curate.extract import BLANK_RUN

_LABEL = (r"(?:(?:like|comment|share|view|repl(?:y|ie)|retweet|tweet|follower|reaction|vote|upvote|point|review|"
          r"answer|post|subscriber|member|download|read|clap|favou?rite|pin|star|fork|heart|love|bookmark|save|repost|"
          r"response|reader|visit|hit|play|listen)s?|following)")
_NUMBER = r"\d[\d.,]*\s*[km]?\+?"
_COUNT = rf"(?:{_NUMBER}\s*{_LABEL}|{_LABEL}\s*[:(\[]?\s*{_NUMBER}[)\]]?)"
COUNTER = re.compile(rf"^\W*{_COUNT}(?:\W+{_COUNT})*\W*$", re.IGNORECASE)
NUMERIC = re.compile(r"^[\W\d_]*\d[\W\d_]*$")
_SEP = r"\s*(?:[:|»›>·•/\-–—]|$)"
# At the beginning of a short line: calls to action and navigation labels, with the rest of the phrase they start.
START = re.compile("|".join((
    r"^(?:sign|log)[\s-]?(?:in|up|on|out)(?![\w-])(?:\s+(?:to|with|or|for)\b[^.!?]*)?",
    r"^(?:register|subscribe)(?![\w-])(?:\s+(?:now|today|here|for|to)\b[^.!?]*)?",
    rf"^(?:share|tweet|pin|e-?mail|print)(?:\s+(?:this|it|on|via|with|to)\b[^.!?|]*)?(?={_SEP})",
    r"^(?:follow|like|join)\s+us\b[^.!?]*",
    r"^(?:skip|jump)\s+to\s+(?:the\s+)?(?:main\s+)?(?:content|navigation|menu|search|footer)",
    r"^(?:back|return|go)\s+to\s+(?:the\s+)?(?:top|home\s*page|homepage|home|start\s*page|main\s+page)",
    r"^(?:advertisement|sponsored(?:\s+content)?|related(?:\s+(?:articles?|posts?|stories|content|links))?|tags?|"
    r"filed\s+under|posted\s+(?:in|by|on)|categor(?:y|ies)|you\s+are\s+here|"
    r"(?:previous|next)(?:\s+(?:post|article|page|story|entry))?)\s*(?:[:|»›>].*|$)",
)), re.IGNORECASE)
# At the end of a short line: "more" links and truncation marks.
END = re.compile("|".join((
    r"(?:\[\s*(?:\.{3}|…)\s*\]\s*|\.{3}\s*|…\s*)?(?:read|see|show|view|load|learn|find\s+out)\s+more"
    r"(?:\s+(?:about\s+\w+|here|stories|articles|posts|news))?\s*(?:\.{3}|…|»|›|>+|→)?\s*$",
    r"continue\s+reading(?:\s*(?:\.{3}|…|»|›|→))?\s*$",
    r"(?:click|tap)\s+here(?:\s+(?:to|for)\b[^.!?]*)?\W*$",
    r"(?:view|see)\s+(?:all|full)(?:\s+\w+){0,2}\s*(?:»|›|>+|→)?\s*$",
    r"\[\s*(?:\.{3}|…)\s*\]\s*$",
    r"\(?opens?\s+in\s+(?:a\s+)?new\s+(?:window|tab)\)?\s*$",
)), re.IGNORECASE)
# Anywhere in a short line: shop widgets and site notices.
ANYWHERE = re.compile("|".join((
    r"\d*\s*items?\s+in\s+(?:your\s+|the\s+)?(?:shopping\s+)?(?:cart|basket|bag)",
    r"add\s+to\s+(?:cart|basket|bag|wish\s?list|favou?rites)",
    r"(?:your\s+)?(?:shopping\s+)?(?:cart|basket)\s+is\s+empty",
    r"all\s+rights\s+reserved\.?",
    r"(?:©|\(c\)|copyright\s*©?)\s*\d{4}(?:\s*[-–]\s*\d{4})?",
    r"(?:this\s+(?:site|website)\s+uses|we\s+use)\s+cookies",
    r"(?:please\s+)?enable\s+javascript|javascript\s+(?:is\s+)?(?:disabled|required)",
)), re.IGNORECASE)
LEFTOVER = " \t|·•:/-–—»›>"


class LineCorrections(Stage):
    """Remove counter, numeric, uppercase and one-word lines, edit short call-to-action lines (RefinedWeb G.2).

    doc.text is rewritten without the removed lines and parts; doc.metadata[name] holds the words before, the words
    removed and the lines per rule. Reasons: "line_corrections:too_many_removed" when more than max_removed_words of
    the document's words went, "line_corrections:empty" when nothing is left (only with max_removed_words = 1).
    """

    name = "line_corrections"

    def __init__(self, max_removed_words: float = 0.05, max_uppercase: float = 0.5, short_line_words: int = 10):
        self.max_removed_words = self.number("max_removed_words", max_removed_words, 0.0, 1.0)
        self.max_uppercase = self.number("max_uppercase", max_uppercase, 0.0, 1.0)
        self.short_line_words = self.count("short_line_words", short_line_words)

    def correct(self, line: str) -> tuple[str | None, str]:
        """(the line as kept, or None to drop it; the rule that fired, or "" for none) for one stripped line."""
        n_words = len(line.split())
        if COUNTER.match(line):
            return None, "counter"
        if NUMERIC.match(line):
            return None, "numeric"
        if n_words == 1:
            return None, "one_word"
        letters = sum(map(str.isalpha, line))
        if letters and sum(map(str.isupper, line)) > self.max_uppercase * letters:
            return None, "uppercase"
        if n_words <= self.short_line_words:
            edited = ANYWHERE.sub(" ", END.sub("", START.sub("", line, count=1), count=1))
            if edited != line:
                edited = " ".join(edited.split()).strip(LEFTOVER)
                return (edited if any(c.isalnum() for c in edited) else None), "edited"
        return line, ""

    def __call__(self, doc: Document) -> str | None:
        kept: list[str] = []
        rules: dict[str, int] = {}
        total = removed = 0
        for raw in doc.text.split("\n"):
            line = raw.strip()
            if not line:
                kept.append("")
                continue
            words = len(line.split())
            total += words
            corrected, rule = self.correct(line)
            if rule:
                rules[rule] = rules.get(rule, 0) + 1
                removed += words - (len(corrected.split()) if corrected is not None else 0)
            if corrected is not None:
                kept.append(corrected)
        fraction = removed / total if total else 0.0
        doc.metadata[self.name] = {"words": total, "removed_words": removed, "fraction": round(fraction, 4),
                                   "lines": rules}
        if fraction > self.max_removed_words:
            return f"{self.name}:too_many_removed"
        doc.text = BLANK_RUN.sub("\n\n", "\n".join(kept)).strip()
        return None if doc.text else f"{self.name}:empty"
