"""The OpenAI request bodies `herd serve` accepts (pydantic models) and OpenAI's error body.

Rules, after OpenAI's API reference: a field of the wrong type, a number out of range, NaN or infinity, and a
field OpenAI does not define (or this server does not implement) are refused with 400 naming the field; an
optional field sent as null takes its default. Fields
are strict: "5" is not a number and 1 is not a boolean. Extensions that vLLM and llama.cpp's server also accept:
`top_k`, `repetition_penalty`, `ignore_eos` (generate past the end-of-sequence token, for benchmarks).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi.responses import Response
from pydantic import (BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator,
                      model_validator)

MAX_N = 128  # OpenAI's limit on n
MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs (vLLM's default limit for the legacy logprobs too)
MAX_STOP = 16  # OpenAI allows 4; lm-eval's generation tasks may send a few more
INT64 = 2**63

StopText = Annotated[str, StringConstraints(min_length=1)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """An optional field sent as null takes its default, as OpenAI reads it (its API reference marks them
        nullable: `"n": null` is n = 1); a required field sent as null stays an error naming it."""
        if not isinstance(data, dict):
            return data
        return {key: value for key, value in data.items()
                if value is not None or key not in cls.model_fields or cls.model_fields[key].is_required()}


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """The fields both endpoints share."""

    model: str | None = None  # None or the served model's id (see app.check_model)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    repetition_penalty: float = Field(1.0, ge=0.01, le=100)  # further out, logits overflow float32
    ignore_eos: bool = False
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)] | None = None  # the limit counts strings
    seed: int | None = Field(None, ge=-INT64, lt=INT64 - MAX_N)  # completion i samples with seed + i
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None

    @field_validator("stream_options")
    @classmethod
    def _streaming_only(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):  # OpenAI's 400 (quoted in litellm issue #5803)
            raise ValueError("only allowed when stream is true")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _zero_only(cls, value: float) -> float:
        if value != 0:
            raise ValueError("not implemented by this server; send 0 or leave it out (repetition_penalty is)")
        return value

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    """POST /v1/completions. prompt: a string, strings, token ids, or lists of token ids (one choice set each)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None

    @field_validator("best_of")
    @classmethod
    def _one_only(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("only 1 is implemented (each choice is one sample); use n for more choices")
        return value


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: str | list[TextPart]
    name: str | None = None

    def as_dict(self) -> dict[str, str]:
        """{"role", "content"} as llamaherd.chat renders it; text parts are joined, developer reads as system."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions. Without max_tokens / max_completion_tokens, the reply may fill the context."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> Response:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}, as ASCII JSON (a message may quote
    a client's text, lone surrogates included)."""
    body: dict[str, Any] = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return Response(json.dumps(body), status_code=status, headers=headers, media_type="application/json")


# What a field that takes several shapes accepts: pydantic reports a failed union once per shape, so name them all.
SHAPES = {
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": f"a non-empty string or a list of at most {MAX_STOP} non-empty strings",
    "content": "a string or a list of {\"type\": \"text\", \"text\": ...} parts",
}
TYPE_TAGS = {"str", "int", "float", "bool"}  # pydantic's names for a union's members in an error's location


def _fields(loc: list[str]) -> list[str]:
    """The parts of an error's location that name fields or list positions (not a union member's type tag)."""
    return [p for p in loc if p.isdigit() or (p.isidentifier() and p not in TYPE_TAGS)]


def validation_message(error: dict[str, Any]) -> tuple[str, str | None]:
    """(message, param) for the first of pydantic's / FastAPI's validation errors, in OpenAI's wording."""
    loc = [str(p) for p in error.get("loc", ())]
    loc = loc[1:] if loc[:1] == ["body"] else loc  # FastAPI's prefix; a client's own key may be "body" too
    fields = _fields(loc)
    param = ".".join(fields) or None
    kind = error.get("type", "")
    if kind == "json_invalid":
        reason = error.get("ctx", {}).get("error", "decode error")
        return f"the body is not valid JSON ({reason}); send a JSON object", None
    if kind == "extra_forbidden":  # the last part is the client's key, whatever it is ("x-y", "str", "")
        param = ".".join(_fields(loc[:-1]) + [json.dumps(loc[-1])[1:-1]]) if loc else None
        return f"Unrecognized request argument supplied: {param} (this server does not implement it)", param
    if not fields:  # the body itself: empty, not an object, or not sent as JSON
        return "the body must be a JSON object (Content-Type: application/json) with the request's fields", None
    if kind == "missing":
        return f"{param}: required field missing", param
    shape = next((SHAPES[f] for f in reversed(fields) if f in SHAPES), None)
    if shape and len(fields) < len(loc):  # a union member failed
        return f"{param}: must be {shape}", param
    return f"{param}: {error.get('msg', 'invalid value').removeprefix('Value error, ')}", param
