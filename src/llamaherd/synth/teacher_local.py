"""A local model as a teacher: many requests at once through the one generation engine (continuous batching).

Requests are encoded as `herd serve` encodes them (chat: the model's chat format plus its stop strings;
completion: the tokenizer's default BOS; control tokens left out of the text), so a recipe gives the same rows
against this teacher and against `herd serve` of the same model with greedy decoding.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from llamaherd.chat import get_chat_format
from llamaherd.engine import Engine, SamplingParams
from llamaherd.config import DEFAULT_MAX_LEN
from llamaherd.errors import InputError
from llamaherd.synth.teacher import TeacherReply, TeacherRequest


class LocalTeacher:
    """Answers TeacherRequests with a loaded model (`llamaherd.load.load_model`).

    max_batch: sequences decoded together (rows of the engine's KV cache). max_len: positions per row, prompt +
    reply (default: the model's context, at most DEFAULT_MAX_LEN, as herd serve: the cache is max_batch x max_len).
    chat_format: a format name that overrides the model's own (needed for chat requests when the model has none).
    """

    def __init__(self, loaded, max_batch: int = 16, chat_format: str | None = None,
                 max_len: int | None = None) -> None:
        from llamaherd.train.lineage import model_identity

        self.tokenizer = loaded.tokenizer
        max_len = max_len or min(loaded.model.config.block_size, DEFAULT_MAX_LEN)
        self.engine = Engine(loaded.model, loaded.tokenizer, max_batch=max_batch, max_len=max_len,
                             isolate_faults=True)
        self.max_batch = max_batch
        name = chat_format or loaded.chat_format
        self.chat_format = teacher_chat_format(self.tokenizer, name)
        identity = model_identity(loaded.source)
        self.identity: dict[str, Any] = {"kind": "local", "name": identity["name"], "path": identity["path"],
                                         "fingerprint": identity["fingerprint"], "chat_format": name}
        self.teacher_id = f"local:{identity['name']}#{identity['fingerprint'].split(':')[-1][:12]}"

    def encode(self, request: TeacherRequest) -> tuple[list[int], SamplingParams]:
        """The prompt ids and engine settings of a request; InputError when it cannot run on this model."""
        ids, params = encode_request(request, self.tokenizer, self.chat_format)
        self.engine.check_request(ids, params)
        return ids, params

    def run(self, requests: Iterable[TeacherRequest]) -> Iterator[TeacherReply]:
        """Feed the engine a window of requests (twice its rows) and yield each reply as its sequence ends."""
        todo, running = iter(requests), {}
        while True:
            while len(running) < 2 * self.max_batch and (request := next(todo, None)) is not None:
                try:
                    ids, params = self.encode(request)
                except InputError as e:
                    yield TeacherReply(request, None, error=f"refused: {e}")
                    continue
                handle = self.engine.add_request(ids, params)
                running[handle.request_id] = request, handle
            if not running:
                return
            self.engine.step()
            for request_id, (request, handle) in list(running.items()):
                if not handle.done:
                    continue
                del running[request_id]
                yield self._reply(request, handle)

    def _reply(self, request: TeacherRequest, handle) -> TeacherReply:
        completion = handle.completions[0]
        if completion.finish_reason == "error":
            return TeacherReply(request, None, error=f"engine error: {completion.error}")
        return TeacherReply(request, completion.text, finish_reason=completion.finish_reason,
                            prompt_tokens=len(handle.prompt_ids), completion_tokens=len(completion.token_ids))


def teacher_chat_format(tokenizer, name: str | None):
    """The ChatFormat of a format name or template for this tokenizer's BOS/EOS, or None."""
    return None if name is None else get_chat_format(name, bos_token=tokenizer.bos_token or "",
                                                     eos_token=tokenizer.eos_token or "")


def encode_request(request: TeacherRequest, tokenizer, chat_format) -> tuple[list[int], SamplingParams]:
    """Prompt ids and engine settings as herd serve makes them: a chat through the chat format, its stop strings
    added; a completion with the tokenizer's default BOS; a temperature below 1e-5 greedy; text without control
    tokens. InputError for a chat request when there is no chat format."""
    stops = list(request.stop)
    if request.messages is not None:
        if chat_format is None:
            raise InputError("the teacher model has no chat template; pass --chat-format NAME")
        ids = chat_format.encode([{"role": r, "content": c} for r, c in request.messages], tokenizer)
        stops = list(dict.fromkeys([*chat_format.stop_strings, *stops]))
    else:
        ids = tokenizer.encode(request.prompt, add_bos=tokenizer.add_bos_default)
    params = SamplingParams(max_new_tokens=request.max_tokens,
                            temperature=request.temperature if request.temperature >= 1e-5 else 0.0,
                            top_p=None if request.top_p in (None, 1.0) else request.top_p,
                            stop_strings=stops, seed=request.seed, skip_special_tokens=True)
    return ids, params
