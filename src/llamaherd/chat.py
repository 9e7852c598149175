"""Chat formats: the built-in prompt layouts of the LLaMA era and a checkpoint's own Jinja chat template.

A conversation is a list of `{"role": "system" | "user" | "assistant", "content": str}` messages; a
`ChatFormat` turns it into the one string the model was trained on, says which strings end an assistant
turn (`stop_strings`) and whether that string already carries the BOS token (`includes_bos`), so callers
tokenize with `add_bos=not fmt.includes_bos` and never feed a double BOS. A BOS written as text only becomes
the BOS id with a tokenizer that parses special tokens in text (Hugging Face tokenizers do; raw
SentencePiece does not).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, NamedTuple

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llamaherd.errors import InputError

ROLES = ("system", "user", "assistant")

Message = Mapping[str, Any]
Span = tuple[int, int]


class _Turn(NamedTuple):
    """One user or assistant message after validation; `input` is Alpaca's optional context block."""

    role: str
    content: str
    input: str | None


# A rendered conversation is a list of pieces: (text, is it an assistant response that training learns).
Piece = tuple[str, bool]
Builder = Callable[[str | None, list[_Turn], bool, str, str], list[Piece]]


class ChatFormat(ABC):
    """How a model family lays a conversation out as text."""

    name: str
    default_system: str | None  # used when the conversation has no system message
    stop_strings: list[str]  # text that ends the assistant turn during generation
    includes_bos: bool  # the rendered text already holds the BOS token string: tokenize with add_bos=False

    @abstractmethod
    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The conversation as one string; with add_generation_prompt, ready for the assistant to answer."""

    @abstractmethod
    def render_with_spans(self, messages: Sequence[Message]) -> tuple[str, list[Span]]:
        """The finished conversation and the [start, end) character spans of each assistant response."""

    def encode(self, messages: Sequence[Message], tokenizer) -> list[int]:
        """Token ids of the conversation, ready for the assistant to answer (llamaherd.tokenizer.Tokenizer): the
        tokenizer's BOS is added only when it adds one by default and the rendered text does not already hold it."""
        text = self.render(messages, add_generation_prompt=True)
        return tokenizer.encode(text, add_bos=not self.includes_bos and tokenizer.add_bos_default)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _check_messages(messages: Sequence[Message]) -> None:
    """Every message is a dict with a known role and a str content."""
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        raise InputError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}"
        )
    if not messages:
        raise InputError("messages is empty; pass at least one {'role': 'user', 'content': ...} message")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InputError(
                f"message {i} is a {type(m).__name__}, expected a dict like {{'role': 'user', 'content': '...'}}"
            )
        role = m.get("role")
        if role not in ROLES:
            raise InputError(f"message {i} has role {role!r}; use one of 'system', 'user', 'assistant'")
        if "content" not in m:
            raise InputError(f"message {i} ({role}) has no 'content' key; add the message text as 'content'")
        if not isinstance(m["content"], str):
            raise InputError(
                f"message {i} ({role}) has content of type {type(m['content']).__name__}; "
                "content must be a str (join multi-part content into one string)"
            )


@dataclass(frozen=True)
class _Spec:
    """What a built-in format needs besides its builder."""

    build: Builder
    default_system: str | None
    stop_strings: tuple[str, ...]  # besides the EOS token string
    alternating: bool = True  # user/assistant turns must alternate, starting with user
    accepts_input: bool = False  # user messages may carry an "input" field (Alpaca)


class BuiltinChatFormat(ChatFormat):
    """A format whose layout is known piece by piece, so it can also report the assistant spans."""

    def __init__(self, name: str, spec: _Spec, bos_token: str, eos_token: str) -> None:
        self.name = name
        self.default_system = spec.default_system
        self.stop_strings = list(dict.fromkeys(s for s in (eos_token, *spec.stop_strings) if s))
        self._spec = spec
        self._bos, self._eos = bos_token, eos_token
        probe = self.render([{"role": "user", "content": "?"}])
        self.includes_bos = bool(bos_token) and bos_token in probe

    def _turns(
        self, messages: Sequence[Message], add_generation_prompt: bool
    ) -> tuple[str | None, list[_Turn]]:
        """Validate; return the system text (None to leave it out) and the user/assistant turns."""
        _check_messages(messages)
        system, start = self.default_system, 0
        if messages[0]["role"] == "system":
            system, start = messages[0]["content"], 1
        turns: list[_Turn] = []
        for i, m in enumerate(messages[start:], start):
            role = m["role"]
            if role == "system":
                raise InputError(
                    f"message {i} is a system message, but only message 0 may be one; merge it into message 0"
                )
            expected = "user" if not turns or turns[-1].role == "assistant" else "assistant"
            if self._spec.alternating and role != expected:
                raise InputError(
                    f"message {i} has role {role!r} but the {self.name} format needs user/assistant turns that "
                    f"alternate, starting with user (expected {expected!r}); merge consecutive {role} messages "
                    f"or insert the missing {expected} message"
                )
            turns.append(_Turn(role, m["content"], self._input(i, m)))
        if not any(t.role == "user" for t in turns):
            raise InputError(f"messages hold no user message; the {self.name} format needs at least one")
        if add_generation_prompt and self._spec.alternating and turns[-1].role == "assistant":
            raise InputError(
                f"add_generation_prompt=True asks for a new assistant turn, but message {len(messages) - 1} "
                "already is one; end with a user message or pass add_generation_prompt=False"
            )
        return system or None, turns

    def _input(self, i: int, m: Message) -> str | None:
        """Alpaca's optional "input" field of a user message ("" means none)."""
        if "input" not in m:
            return None
        if not self._spec.accepts_input:
            raise InputError(
                f"message {i} has an 'input' field, which only the alpaca format reads; "
                f"append it to the content for {self.name}"
            )
        if m["role"] != "user" or not isinstance(m["input"], str):
            raise InputError(f"message {i}: 'input' must be a str on a user message")
        return m["input"] or None

    def _pieces(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[Piece]:
        system, turns = self._turns(messages, add_generation_prompt)
        return self._spec.build(system, turns, add_generation_prompt, self._bos, self._eos)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The conversation as one string; with add_generation_prompt, ready for the assistant to answer."""
        return "".join(text for text, _ in self._pieces(messages, add_generation_prompt))

    def render_with_spans(self, messages: Sequence[Message]) -> tuple[str, list[Span]]:
        """The finished conversation and the spans of each assistant response plus its end-of-turn text."""
        spans, pos = [], 0
        pieces = self._pieces(messages, add_generation_prompt=False)
        for text, is_response in pieces:
            if is_response:
                spans.append((pos, pos + len(text)))
            pos += len(text)
        if not spans:
            raise InputError(
                "render_with_spans needs at least one assistant message: without one nothing is trained"
            )
        return "".join(text for text, _ in pieces), spans


def _llama2(system: str | None, turns: list[_Turn], agp: bool, bos: str, eos: str) -> list[Piece]:
    """Meta's llama generation.py: `{bos}[INST] {user} [/INST] {answer} {eos}`, system folded into turn 1.

    The prompt already ends at `[/INST]`, so add_generation_prompt adds nothing.
    """
    pieces: list[Piece] = []
    for i, t in enumerate(turns):
        if t.role == "user":
            text = f"<<SYS>>\n{system}\n<</SYS>>\n\n{t.content}" if i == 0 and system else t.content
            pieces.append((f"{bos}[INST] {text.strip()} [/INST]", False))
        else:
            pieces += [(" ", False), (f"{t.content.strip()} {eos}", True)]
    return pieces


def _colon_turns(user: str, assistant: str, sep: str, sep_after_answer: str) -> Builder:
    """`{system}{sep}USER: ...{sep}ASSISTANT: ...{eos}{sep_after_answer}USER: ...` (FastChat's colon styles)."""

    def build(system: str | None, turns: list[_Turn], agp: bool, bos: str, eos: str) -> list[Piece]:
        pieces: list[Piece] = [(system, False)] if system else []
        lead = sep if system else ""
        for t in turns:
            if t.role == "user":
                pieces.append((f"{lead}{user}: {t.content}", False))
            else:
                pieces += [(f"{sep}{assistant}: ", False), (t.content + eos, True)]
                lead = sep_after_answer
        if agp:
            pieces.append((f"{sep}{assistant}:", False))
        return pieces

    return build


def _sections(system_header: str, user_header: str, assistant_header: str) -> Builder:
    """Header-led sections joined by a blank line: `### User:\\n...\\n\\n### Assistant:\\n...{eos}`."""

    def build(system: str | None, turns: list[_Turn], agp: bool, bos: str, eos: str) -> list[Piece]:
        pieces: list[Piece] = []

        def section(text: str) -> None:
            pieces.append((f"\n\n{text}" if pieces else text, False))

        if system:
            section(system_header + system)
        for t in turns:
            if t.role == "user":
                section(user_header + t.content)
                if t.input:
                    section(f"### Input:\n{t.input}")
            else:
                section(assistant_header)
                pieces.append((t.content + eos, True))
        if agp:
            section(assistant_header)
        return pieces

    return build


def _chatml(system: str | None, turns: list[_Turn], agp: bool, bos: str, eos: str) -> list[Piece]:
    """`<|im_start|>{role}\\n{content}<|im_end|>\\n` per message; the answer is trained up to <|im_end|>."""
    pieces: list[Piece] = [(f"<|im_start|>system\n{system}<|im_end|>\n", False)] if system else []
    for t in turns:
        if t.role == "user":
            pieces.append((f"<|im_start|>user\n{t.content}<|im_end|>\n", False))
        else:
            pieces += [("<|im_start|>assistant\n", False), (f"{t.content}<|im_end|>", True), ("\n", False)]
    if agp:
        pieces.append(("<|im_start|>assistant\n", False))
    return pieces


_ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
_ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)

_alpaca_sections = _sections("", "### Instruction:\n", "### Response:\n")


def _alpaca(system: str | None, turns: list[_Turn], agp: bool, bos: str, eos: str) -> list[Piece]:
    """Stanford Alpaca: preamble, `### Instruction:`, optional `### Input:`, `### Response:` sections."""
    if system == _ALPACA_PREAMBLE and any(t.input for t in turns):
        system = _ALPACA_PREAMBLE_INPUT  # the default preamble has its own wording for prompts with input
    return _alpaca_sections(system, turns, agp, bos, eos)


_BUILTINS: dict[str, _Spec] = {
    "llama-2": _Spec(_llama2, None, ("[INST]",)),
    "alpaca": _Spec(_alpaca, _ALPACA_PREAMBLE, ("### Instruction:",), accepts_input=True),
    "vicuna": _Spec(
        _colon_turns("USER", "ASSISTANT", " ", ""),
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        ("USER:",),
    ),
    "koala": _Spec(_colon_turns("USER", "GPT", " ", ""), "BEGINNING OF CONVERSATION:", ("USER:",)),
    "falcon": _Spec(_colon_turns("User", "Assistant", "\n", "\n"), None, ("\nUser:",)),
    "chatml": _Spec(_chatml, None, ("<|im_end|>",), alternating=False),
    "stablebeluga": _Spec(
        _sections("### System:\n", "### User:\n", "### Assistant:\n"),
        "You are Stable Beluga, an AI that follows instructions extremely well. Help as much as you can. "
        "Remember, be safe, and don't do anything illegal.",
        ("### User:",),
    ),
}


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """JSON without Jinja's HTML escaping, with the options chat templates pass (as transformers does)."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    """The sandbox chat templates run in: no attribute tricks, no mutation of the messages."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    return _environment().from_string(template)


class JinjaChatFormat(ChatFormat):
    """A checkpoint's own chat template (tokenizer_config.json or GGUF `tokenizer.chat_template`)."""

    def __init__(self, template: str, bos_token: str, eos_token: str, variables: Mapping[str, Any]) -> None:
        try:
            self._template = _compile(template)
        except jinja2.TemplateSyntaxError as e:
            raise InputError(
                f"chat template does not parse (line {e.lineno}: {e.message}); fix the template"
            ) from e
        self.name = "jinja"
        self.template = template
        self.default_system = None  # a template carries its own default, if any
        self.stop_strings = [eos_token] if eos_token else []
        self.includes_bos = bool(bos_token) and ("bos_token" in template or bos_token in template)
        # tools/documents are None unless given, as transformers passes them.
        self._variables = {
            "tools": None,
            "documents": None,
            **variables,
            "bos_token": bos_token,
            "eos_token": eos_token,
        }

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The conversation through the template, with the same variables transformers passes."""
        _check_messages(messages)
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                **self._variables,
            )
        except jinja2.TemplateError as e:
            raise InputError(f"chat template failed: {e}") from e

    def render_with_spans(self, messages: Sequence[Message]) -> tuple[str, list[Span]]:
        """Not available: a template's text does not say where an answer ends and the next turn begins."""
        raise InputError(
            "render_with_spans needs a built-in chat format (one of "
            f"{', '.join(list_formats())}); a Jinja template gives no response spans"
        )


def list_formats() -> list[str]:
    """Names of the built-in chat formats."""
    return list(_BUILTINS)


def get_chat_format(
    name_or_template: str, bos_token: str = "<s>", eos_token: str = "</s>", **template_vars: Any
) -> ChatFormat:
    """A built-in format by name, or a Jinja chat template (any text with `{%` or `{{`).

    bos_token/eos_token are the tokenizer's special-token strings; template_vars are extra variables a Jinja
    template reads (e.g. `date_string`).
    """
    if name_or_template in _BUILTINS:
        if template_vars:
            raise InputError(
                f"template variables {sorted(template_vars)} only apply to Jinja templates, "
                f"not the built-in {name_or_template!r} format"
            )
        return BuiltinChatFormat(name_or_template, _BUILTINS[name_or_template], bos_token, eos_token)
    if "{%" in name_or_template or "{{" in name_or_template:
        return JinjaChatFormat(name_or_template, bos_token, eos_token, template_vars)
    raise InputError(
        f"unknown chat format {name_or_template!r}; use one of {', '.join(list_formats())} "
        "or pass a Jinja chat template"
    )
