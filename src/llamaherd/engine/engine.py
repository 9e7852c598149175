"""The generation engine: continuous batching over a slot-based KV cache, chunked prefill and prefix reuse.

Each `step` (1) gives free cache rows to waiting sequences, (2) prefills up to `prefill_chunk` prompt tokens,
first copying the longest prefix some row already holds (several prompts' chunks in one pass), and (3) decodes
one token for every sequence whose prompt is in its row, all rows in one forward pass, each at its own position.
A prompt's last token is fed by the decode step, so the first sampled token and every later one come from the
same code path.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator

import torch

from llamaherd.engine.cuda_graphs import GraphedDecode, capturable
from llamaherd.engine.request import Completion, Event, Request, TokenLogprob
from llamaherd.engine.sampling import SamplingParams, apply_repetition_penalty, sample_next
from llamaherd.engine.slots import Slots, common_prefix
from llamaherd.engine.text import StopText
from llamaherd.errors import InputError
from llamaherd.kernels import generating, native_ops, prefilling
from llamaherd.model import GPT, SlotCache, prepare_for_decoding

PREFIX_BLOCK = 16  # prompt ids two prompts must share for the later one to wait for the earlier one's keys
# Padding rows a prompt chunk may add to a prefill pass before it gets a pass of its own: on SmolLM2 fp32 (2 cores)
# a row of a long pass costs ~1.1 ms and a pass of 15 rows ~70 ms, most of it streaming the weights.
PAD_ROWS = 48


class _Sequence:
    """One completion in flight: its ids (prompt + output), its cache row and how many ids the row holds."""

    def __init__(self, request: Request, completion: Completion, generator: torch.Generator,
                 text: StopText | None, stop_ids: frozenset[int], scores_prompt: bool) -> None:
        self.request, self.completion, self.generator = request, completion, generator
        self.text, self.stop_ids, self.scores_prompt = text, stop_ids, scores_prompt
        self.ids = list(request.prompt_ids)
        self.slot = -1
        self.computed = 0  # leading ids whose keys/values are in the row
        self.matched = False  # prefix reuse settled (done when its prefill starts, so earlier prompts are in)

    @property
    def prefilling(self) -> bool:
        """Prompt ids except the last still to compute (the decode step feeds the last one)."""
        return not self.matched or self.computed < len(self.request.prompt_ids) - 1


class Engine:
    """Serves many requests at once on one model; see the module docstring for what a step does.

    max_batch rows of max_len positions are preallocated; tokenizer (optional) gives text, stop strings and the
    default stop ids. Not thread-safe: one thread calls add_request / cancel / step (a server's engine loop).
    fuse: run q/k/v and gate/up as one product each (`model.prepare_for_decoding`); pass False for a model whose weights
    train (PPO): fusing makes those weights views of one tensor, new parameters that an optimizer built before
    does not see and that safetensors refuses to save side by side.
    cuda_graphs: on a CUDA device, replay each decode step as a captured graph (`llamaherd.engine.cuda_graphs`);
    ignored elsewhere. PPO passes False: a graph replays the Python paths taken at its capture, and the policy's
    modules (LoRA adapters switched off for the reference, train/eval mode) change between rollouts.
    """

    def __init__(self, model: GPT, tokenizer=None, max_batch: int = 8, max_len: int | None = None,
                 prefill_chunk: int = 512, prefix_reuse: bool = True, isolate_faults: bool = False,
                 fuse: bool = True, cuda_graphs: bool = True) -> None:
        if max_batch < 1 or prefill_chunk < 1:
            raise InputError(f"max_batch and prefill_chunk must be >= 1, got {max_batch} and {prefill_chunk}")
        self.model, self.tokenizer = model, tokenizer
        if fuse:
            prepare_for_decoding(model)  # fused q/k/v and gate/up (fewer, larger products), weights on huge pages
        weight = model.model.embed_tokens.weight  # the model's device and activation dtype
        if weight.device.type == "cpu":
            native_ops()  # built now if it must be (a server's start-up), not in the first request
        self.max_len = max_len or model.config.block_size
        self.prefill_chunk, self.prefix_reuse = prefill_chunk, prefix_reuse
        self.isolate_faults = isolate_faults  # a server's choice: one sequence's exception ends only that sequence
        self.device = weight.device
        graphs = cuda_graphs and capturable(model)
        with torch.inference_mode():  # with graphs, one more row: the scratch row their padding rows write
            self.cache = SlotCache(model.config, max_batch + graphs, self.max_len, weight.dtype, self.device)
        self.graphs = GraphedDecode(model, self.cache, scratch=max_batch) if graphs else None
        self.slots = Slots(max_batch)
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []  # holding a row, in the order they got it
        self.requests: dict[str, Request] = {}  # unfinished, by id
        self.computed_tokens = 0  # token positions run through the model (prefill + decode), for stats and tests
        self._ids = itertools.count()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, n: int = 1) -> Request:
        """Queue a prompt for n completions (n samples of one prompt share its prefill); it joins at the next step.

        With a seed, completion i samples from its own generator seeded with seed + i, so its tokens do not
        depend on what else is in the batch; without one, the seed is drawn from torch's global generator.
        """
        params = params or SamplingParams()
        prompt = self.check_request(prompt_ids, params, n)
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise InputError(f"request_id {request_id!r} is already running; give each request its own id")
        if params.stop_strings and self.tokenizer is None:
            raise InputError("stop_strings need the engine to have a tokenizer; pass Engine(model, tokenizer)")
        stop_ids = frozenset(params.stop_ids if params.stop_ids is not None
                             else getattr(self.tokenizer, "stop_ids", ()))
        request = Request(request_id, prompt, params, [Completion(i) for i in range(n)],
                          [None] if params.prompt_logprobs else None)
        for completion in request.completions:
            seed = (params.seed + completion.index if params.seed is not None
                    else int(torch.randint(2**62, (), dtype=torch.long)))
            generator = torch.Generator(self.device).manual_seed(seed)
            text = StopText(self.tokenizer.stream_decoder(skip_special_tokens=params.skip_special_tokens),
                            params.stop_strings) if self.tokenizer else None
            scores = params.prompt_logprobs and completion.index == 0
            self.waiting.append(_Sequence(request, completion, generator, text, stop_ids, scores))
        self.requests[request_id] = request
        return request

    def check_request(self, prompt_ids, params: SamplingParams, n: int = 1) -> list[int]:
        """The prompt as a list, or InputError for what add_request would refuse; reads only the model's config,
        so another thread (a server's request handler) may call it while the engine steps."""
        params.validate()
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise InputError(f"n must be an integer >= 1, got {n!r}")
        if params.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
        vocab = self.model.config.vocab_size
        prompt = list(prompt_ids)
        if not prompt:
            raise InputError("the prompt is empty; give at least one token id")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in prompt):
            raise InputError(f"prompt ids must be integers in [0, {vocab}); got {prompt[:8]}...")
        if len(prompt) + params.max_new_tokens > self.max_len:
            raise InputError(f"a prompt of {len(prompt)} tokens plus max_new_tokens={params.max_new_tokens} "
                             f"exceeds the engine's max_len of {self.max_len} tokens; shorten the prompt or lower "
                             "max_new_tokens")
        return prompt

    def forget_prefixes(self) -> None:
        """Drop what the rows hold from prefix reuse: after the model's weights change (a PPO update) the keys and
        values kept there are stale. Call it between batches; raises RuntimeError while requests run."""
        if self.has_work:
            raise RuntimeError("forget_prefixes while requests are running; call it once they have finished")
        self.slots = Slots(len(self.slots.tokens))

    def cancel(self, request_id: str) -> bool:
        """Stop a request now and free its rows; False if it is unknown or already finished."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        self.waiting = deque(s for s in self.waiting if s.request is not request)
        for seq in [s for s in self.running if s.request is request]:
            self.running.remove(seq)
            self.slots.release(seq.slot)
        for completion in request.completions:
            completion.finish_reason = completion.finish_reason or "cancelled"
        return True

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Admit, prefill one chunk, decode one token per ready sequence; the events of this step."""
        while self.waiting and self.slots.free:
            seq = self.waiting.popleft()
            seq.slot = self.slots.take()
            self.running.append(seq)
        with generating():  # the row-wise kernels serve prompts too (llamaherd.kernels.generating)
            failed = self._prefill()
            return failed + self._decode()

    def stream(self) -> Iterator[Event]:
        """Step until every request has finished, yielding events as they come."""
        while self.has_work:
            yield from self.step()

    def generate_many(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                      n: int = 1) -> list[Request]:
        """Run prompts to completion (batch users: synthetic data, rejection sampling); one Request per prompt."""
        many = params if isinstance(params, list) else [params] * len(prompts)
        if len(many) != len(prompts):
            raise InputError(f"got {len(prompts)} prompts but {len(many)} sampling params; give one per prompt")
        requests = [self.add_request(p, sp, n=n) for p, sp in zip(prompts, many)]
        while not all(r.done for r in requests):
            self.step()
        return requests

    def _prefill(self) -> list[Event]:
        """Compute up to prefill_chunk prompt positions, oldest sequence first, after reusing a held prefix; the
        events of sequences that failed (isolate_faults).

        The chunks of several sequences run as one forward pass, each row padded to the longest chunk (padding
        counts against the budget): a burst of short prompts costs one pass instead of one per prompt, each of
        which streams every weight (16 prompts of 15 tokens: 0.24 s against 1.1 s on SmolLM2 fp32). A chunk that
        would add more than PAD_ROWS rows of padding to the pass starts a pass of its own instead (a second pass
        streams the weights again, which costs about as much as PAD_ROWS rows of compute). A prompt whose
        log-probabilities are wanted runs alone (every position's logits). A prompt sharing a block
        (PREFIX_BLOCK ids) of its prefix with one already in a pass waits a step, so that it reuses those keys
        and values instead of computing them too (k samples of one prompt compute it once)."""
        budget, passes, failed = self.prefill_chunk, [[]], []
        width = 0  # the longest chunk of the last pass
        for seq in [s for s in self.running if s.prefilling]:
            if budget <= 0:
                break
            if not seq.matched:
                if self.prefix_reuse and any(_shared(seq, other, n) >= PREFIX_BLOCK
                                             for group in passes for other, n in group):
                    continue
                self._reuse_prefix(seq)
                if not seq.prefilling:
                    continue
            remaining = len(seq.request.prompt_ids) - 1 - seq.computed
            if seq.scores_prompt:
                n = min(remaining, budget)
                failed += self._run_chunks([(seq, n)])
                budget -= n
                continue
            group = passes[-1]
            k = len(group)
            n = min(remaining, (budget + k * width) // (k + 1))  # the widest chunk the padded pass has room for
            cost = (k + 1) * max(width, n) - k * width  # its rows and the padding it adds
            if k and cost - n > PAD_ROWS:
                passes.append(group := [])
                k, width = 0, 0
                n = cost = min(remaining, budget)
            if n < 1 or cost > budget:
                break
            group.append((seq, n))
            width, budget = max(width, n), budget - cost
        return failed + [event for group in passes for event in self._run_chunks(group)]

    def _run_chunks(self, group: list[tuple[_Sequence, int]]) -> list[Event]:
        """Prefill these (sequence, chunk length) pairs, together when there are several; with isolate_faults a
        pass that raises is retried one sequence at a time, so that only the sequence that raises ends."""
        try:
            if group:
                self._prefill_rows(group)
            return []
        except Exception as error:
            if not self.isolate_faults:
                raise
            if len(group) == 1:
                return [self._fail(group[0][0], error)]
        return [event for pair in group for event in self._run_chunks([pair])]

    def _reuse_prefix(self, seq: _Sequence) -> None:
        """Start the row with the longest prefix of the prompt (less its last id) that any row holds."""
        seq.matched = True
        src, length = -1, 0
        if self.prefix_reuse and not seq.scores_prompt:
            src, length = self.slots.longest_prefix(seq.ids[: len(seq.request.prompt_ids) - 1])
        if length and src != seq.slot:
            self.cache.copy_prefix(src, seq.slot, length)
        self.slots.tokens[seq.slot] = seq.ids[:length]
        seq.computed = length

    def _prefill_rows(self, group: list[tuple[_Sequence, int]]) -> None:
        """Prompt chunks of one or several sequences in one pass, each row padded to the longest chunk: keys and
        values only, or for a lone sequence that scores its prompt every position's log-probabilities. A padding
        position lies past its row's chunk (clamped into the row): its key is never read, as every later query of
        the row writes its own position before reading it, and `Slots.tokens` (what prefix reuse copies) holds
        only real ids."""
        width = max(n for _, n in group)
        ids, positions = [], []
        for seq, n in group:
            chunk = seq.ids[seq.computed:seq.computed + n]
            ids.append(chunk + chunk[-1:] * (width - n))
            positions.append([min(p, self.max_len - 1) for p in range(seq.computed, seq.computed + width)])
        slots = torch.tensor([seq.slot for seq, _ in group], device=self.device)
        rows = self.cache.rows(slots, torch.tensor(positions, device=self.device))
        idx = torch.tensor(ids, device=self.device)
        seq, n = group[0]
        with prefilling():  # one sum order per position whatever the chunking (`llamaherd.kernels.prompt_pass`)
            if len(group) == 1 and seq.scores_prompt:  # a scoring sequence always runs alone (`_prefill`)
                logprobs = self.model(idx, cache=rows)[0].float().log_softmax(-1)  # (n, V)
                targets = seq.ids[seq.computed + 1:seq.computed + n + 1]
                seq.request.prompt_logprobs.extend(_entries(logprobs, targets, seq.request.params.logprobs))
            else:
                self.model(idx, cache=rows, last_only=True, return_hidden=True)  # keys/values only: skip the head
        for seq, n in group:
            self.slots.tokens[seq.slot].extend(seq.ids[seq.computed:seq.computed + n])
            seq.computed += n
            self.computed_tokens += n

    def _decode(self) -> list[Event]:
        # In row order: a full batch is a range of rows, which attention reads as a view (CacheRows.span).
        ready = sorted((s for s in self.running if not s.prefilling), key=lambda s: s.slot)
        if not ready:
            return []
        ids, slots, positions = [s.ids[s.computed] for s in ready], [s.slot for s in ready], [s.computed for s in ready]
        logits = self.graphs(ids, slots, positions) if self.graphs is not None else None
        if logits is None:
            rows = self.cache.rows(torch.tensor(slots, device=self.device),
                                   torch.tensor(positions, device=self.device)[:, None])
            logits = self.model(torch.tensor(ids, device=self.device)[:, None], cache=rows)[:, 0]
        logits = logits.float()  # (B, V)
        self.computed_tokens += len(ready)
        wanted = any(s.request.params.logprobs is not None for s in ready)
        logprobs = logits.log_softmax(-1) if wanted else None  # (B, V), only when some sequence reports them
        events = []
        for b, seq in enumerate(ready):
            self.slots.tokens[seq.slot].append(seq.ids[seq.computed])
            seq.computed += 1
            try:
                events.append(self._sample(seq, logits[b:b + 1], None if logprobs is None else logprobs[b]))
            except Exception as error:
                if not self.isolate_faults:
                    raise
                events.append(self._fail(seq, error))
        return events

    def _sample(self, seq: _Sequence, row: torch.Tensor, logprobs: torch.Tensor | None) -> Event:
        """Sample the next token from the sequence's logits row (1, V) and record it."""
        params = seq.request.params
        if params.repetition_penalty != 1.0:
            seen = torch.tensor([seq.ids], device=self.device)
            row = apply_repetition_penalty(row, seen, params.repetition_penalty)
        token = int(sample_next(row, params, seq.generator))
        return self._emit(seq, token, logprobs)

    def _emit(self, seq: _Sequence, token: int, logprobs: torch.Tensor | None) -> Event:
        """Record a sampled token; finish the sequence on a stop id, a stop string or max_new_tokens."""
        params, completion = seq.request.params, seq.completion
        seq.ids.append(token)
        completion.token_ids.append(token)
        entries = [] if params.logprobs is None else _entries(logprobs[None], [token], params.logprobs)
        completion.logprobs.extend(entries)
        text, finish = "", None
        if token in seq.stop_ids:
            finish = "stop"
            text = seq.text.flush() if seq.text else ""
        elif seq.text:
            text = seq.text.push(token)
            finish = "stop" if seq.text.stopped else None
        if finish is None and len(completion.token_ids) >= params.max_new_tokens:
            text += seq.text.flush() if seq.text else ""
            finish = "stop" if seq.text and seq.text.stopped else "length"
        completion.text += text
        if finish:
            self._finish(seq, finish)
        return Event(seq.request.request_id, completion.index, [token], text, entries, finish)

    def _fail(self, seq: _Sequence, error: Exception) -> Event:
        """End a sequence whose work raised (isolate_faults): finish_reason "error", the exception kept on its
        completion, its row freed; the other sequences of the batch go on."""
        seq.completion.error = error
        self._finish(seq, "error")
        return Event(seq.request.request_id, seq.completion.index, [], "", [], "error")

    def _finish(self, seq: _Sequence, reason: str) -> None:
        seq.completion.finish_reason = reason
        self.running.remove(seq)
        self.slots.release(seq.slot)  # the row keeps its keys/values for prefix reuse until taken again
        if seq.request.done:
            self.requests.pop(seq.request.request_id, None)


def _shared(seq: _Sequence, other: _Sequence, n: int) -> int:
    """How many leading prompt ids (less the last) seq shares with what other holds after its chunk of n."""
    return common_prefix(seq.ids[:len(seq.request.prompt_ids) - 1], other.ids[:other.computed + n])


def _entries(logprobs: torch.Tensor, targets: list[int], top: int | None) -> list[TokenLogprob]:
    """TokenLogprob per row of logprobs (N, V) for the chosen ids targets (N), with the `top` best tokens."""
    chosen = logprobs.gather(-1, torch.tensor(targets, device=logprobs.device)[:, None])[:, 0].tolist()
    if top:
        values, ids = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
        best = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        best = [[] for _ in targets]
    return [TokenLogprob(t, lp, b) for t, lp, b in zip(targets, chosen, best)]
