"""Log-likelihood of (context, continuation) requests, tokenized and truncated as lm-evaluation-harness does.

The harness conditions every continuation on the context's own tokens (it encodes context and
context + continuation, and keeps the tokens of the whole after the context's length), so all requests
with the same context tokens share one prefix. Three things make the engine fast without changing a
number:

- each distinct context runs once; its KV state is copied to one row per continuation (a group);
- contexts are batched longest first, left-padded under an attention mask; continuations are
  right-padded after the shared prefix, where causal attention keeps real tokens from seeing pads;
- logits are computed only at the positions that score a continuation token, log-softmax in fp32.

A request that is left-truncated to the model's context gets a context of its own (its group has one
member), so it takes the same path with no sharing. Batch size changes only the padding, never a result.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from llamaherd.errors import InputError
from llamaherd.model import GPT, KVCache


class TextEncoder(Protocol):
    """What the engine needs from a tokenizer (llamaherd.tokenizer.Tokenizer provides it)."""

    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...


@dataclass(frozen=True)
class Encoded:
    """Token ids of one request as the model sees them: it reads context + continuation[:-1]."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]
    truncated: bool  # context shortened from the left to fit the model's context length


@dataclass(frozen=True)
class Result:
    """Log-likelihood of one continuation: the sum, one value per token, and whether greedy decoding
    would have produced exactly these tokens."""

    logprob: float
    is_greedy: bool
    token_logprobs: tuple[float, ...]
    truncated: bool


def encode_pair(tokenizer: TextEncoder, context: str, continuation: str, add_bos: bool,
                context_cache: dict[str, list[int]] | None = None) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the harness splits them.

    Trailing whitespace of the context moves to the continuation; context + continuation is encoded
    whole and split at the length of the encoded context. An empty context becomes the BOS token
    (EOS when there is none), as in lm-eval 0.4.
    """
    if not context:
        prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        cont = tokenizer.encode(continuation, add_bos=False)
        return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if context_cache is None or context not in context_cache:
        ctx = tokenizer.encode(context, add_bos=add_bos)
        if context_cache is not None:
            context_cache[context] = ctx
    else:
        ctx = context_cache[context]
    whole = tokenizer.encode(context + continuation, add_bos=add_bos)
    return ctx, whole[len(ctx):]


def fit_to_context(context: list[int], continuation: list[int], max_length: int) -> tuple[list[int], bool]:
    """Left-truncate the context so context + continuation[:-1] fits `max_length` (the harness's window)."""
    if len(continuation) > max_length:
        raise InputError(
            f"a continuation of {len(continuation)} tokens is longer than the model's context ({max_length})"
        )
    excess = len(context) + len(continuation) - (max_length + 1)
    return (context[excess:], True) if excess > 0 else (context, False)


class LoglikelihoodEngine:
    """Scores (context, continuation) pairs with a `GPT`; see the module docstring for the method.

    add_bos: prepend BOS to context and whole encodings (the protocol decides).
    batch_size: most sequences per forward pass (contexts in the prefill, continuations after it).
    max_length: the model's context length for truncation (default: config.block_size).
    """

    def __init__(self, model: GPT, tokenizer: TextEncoder, add_bos: bool, batch_size: int = 16,
                 max_length: int | None = None) -> None:
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.add_bos = add_bos
        self.batch_size = batch_size
        self.max_length = max_length or model.config.block_size
        weight = model.output_weight
        self.device = weight.device
        # Log-probabilities in at least fp32, whatever the model's dtype.
        self.score_dtype = torch.promote_types(weight.dtype, torch.float32)

    def encode(self, pairs: Sequence[tuple[str, str]]) -> list[Encoded]:
        """Tokenize and truncate every request."""
        cache: dict[str, list[int]] = {}
        out = []
        for context, continuation in pairs:
            ctx, cont = encode_pair(self.tokenizer, context, continuation, self.add_bos, cache)
            if not cont:
                raise InputError(f"continuation {continuation!r} after context ending {context[-40:]!r} "
                                 "encodes to no tokens")
            ctx, truncated = fit_to_context(ctx, cont, self.max_length)
            out.append(Encoded(tuple(ctx), tuple(cont), truncated))
        return out

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[Result]:
        """Results in request order."""
        results: list[Result | None] = [None] * len(pairs)
        for i, result in self.iter_results(self.encode(pairs)):
            results[i] = result
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def iter_results(self, encoded: Sequence[Encoded]) -> Iterator[tuple[int, Result]]:
        """(request index, result) as each finishes; longest contexts first."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, e in enumerate(encoded):
            groups.setdefault(e.context, []).append(i)
        order = sorted(groups.items(), key=lambda g: (-len(g[0]), g[0]))
        for start in range(0, len(order), self.batch_size):
            yield from self._run_groups(order[start:start + self.batch_size], encoded)

    def _run_groups(self, groups: list[tuple[tuple[int, ...], list[int]]],
                    encoded: Sequence[Encoded]) -> Iterator[tuple[int, Result]]:
        """Prefill the groups' contexts together, then score their continuations in batches."""
        model, dev = self.model, self.device
        ctx_lens = torch.tensor([len(c) for c, _ in groups], device=dev)
        P = int(ctx_lens.max())
        idx = torch.zeros(len(groups), P, dtype=torch.long)
        for g, (ctx, _) in enumerate(groups):
            idx[g, P - len(ctx):] = torch.tensor(ctx)
        pad_mask = torch.arange(P, device=dev)[None, :] >= (P - ctx_lens)[:, None]  # (G, P) True = real token
        cache = model.new_cache(len(groups), P)
        h = model(idx.to(dev), attn_mask=None if bool(pad_mask.all()) else pad_mask, cache=cache,
                  last_only=True, return_hidden=True)  # (G, 1, n_embd)
        first = self._log_probs(h[:, 0])  # (G, vocab): scores every continuation's first token
        first_greedy = first.argmax(-1)

        rows = [(g, i) for g, (_, members) in enumerate(groups) for i in members]
        targets = torch.tensor([encoded[i].continuation[0] for _, i in rows], device=dev)
        row_groups = torch.tensor([g for g, _ in rows], device=dev)
        first_lp = first[row_groups, targets].tolist()
        first_ok = (first_greedy[row_groups] == targets).tolist()
        heads = {i: (lp, ok) for (_, i), lp, ok in zip(rows, first_lp, first_ok, strict=True)}

        for g, i in rows:
            if len(encoded[i].continuation) == 1:
                lp, ok = heads[i]
                yield i, Result(lp, ok, (lp,), encoded[i].truncated)
        longer = sorted(((g, i) for g, i in rows if len(encoded[i].continuation) > 1),
                        key=lambda r: -len(encoded[r[1]].continuation))
        for start in range(0, len(longer), self.batch_size):
            chunk = longer[start:start + self.batch_size]
            tails = self._score_tails(chunk, encoded, cache, pad_mask, ctx_lens)
            for (_, i), (lps, oks) in zip(chunk, tails, strict=True):
                lp0, ok0 = heads[i]
                token_lps = (lp0, *lps)
                yield i, Result(sum(token_lps), ok0 and all(oks), token_lps, encoded[i].truncated)

    def _score_tails(self, chunk: list[tuple[int, int]], encoded: Sequence[Encoded], cache: KVCache,
                     pad_mask: torch.Tensor, ctx_lens: torch.Tensor) -> list[tuple[list[float], list[bool]]]:
        """Continuation tokens after the first: feed continuation[:-1] after each row's cached context."""
        dev = self.device
        conts = [encoded[i].continuation for _, i in chunk]
        n_in = torch.tensor([len(c) - 1 for c in conts], device=dev)
        L = int(n_in.max())
        groups = torch.tensor([g for g, _ in chunk], device=dev)
        inp = torch.zeros(len(chunk), L, dtype=torch.long)
        for r, c in enumerate(conts):
            inp[r, : len(c) - 1] = torch.tensor(c[:-1])
        rows = self._take_rows(cache, groups, cache.length + L)
        positions = ctx_lens[groups, None] + torch.arange(L, device=dev)  # (R, L)
        attn_mask = torch.cat((pad_mask[groups], torch.ones(len(chunk), L, dtype=torch.bool, device=dev)), 1)
        h = self.model(inp.to(dev), positions=positions, attn_mask=attn_mask, cache=rows,
                       return_hidden=True)  # (R, L, n_embd)
        scored = torch.arange(L, device=dev)[None, :] < n_in[:, None]  # right padding is never scored
        log_probs = self._log_probs(h[scored])  # (N, vocab), rows in order, positions ascending
        want = torch.tensor([t for c in conts for t in c[1:]], device=dev)
        token_lps = log_probs.gather(1, want[:, None])[:, 0].tolist()
        greedy = (log_probs.argmax(-1) == want).tolist()
        out, at = [], 0
        for c in conts:
            n = len(c) - 1
            out.append((token_lps[at:at + n], greedy[at:at + n]))
            at += n
        return out

    def _take_rows(self, cache: KVCache, rows: torch.Tensor, max_len: int) -> KVCache:
        """A cache of len(rows) rows copied from `cache` (a group's prefix once per continuation)."""
        new = self.model.new_cache(len(rows), max_len, dtype=cache.k.dtype)
        n = cache.length
        new.k[:, :, :, :n] = cache.k[:, rows, :, :n]
        new.v[:, :, :, :n] = cache.v[:, rows, :, :n]
        new.length = n
        return new

    def _log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, n_embd) final hidden states -> (N, vocab) log-probabilities in >= fp32."""
        return F.log_softmax(F.linear(hidden, self.model.output_weight).to(self.score_dtype), dim=-1)
