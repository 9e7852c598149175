"""Log-likelihood of (context, continuation) requests, tokenized and truncated as lm-evaluation-harness does.

The harness conditions every continuation on the context's own tokens (it encodes context and
context + continuation, and keeps the tokens of the whole after the context's length), so all requests
with the same context tokens share one prefix. Three things make the engine fast without changing a
number:

- each distinct context runs once, and every continuation reads its KV state in place: the
  continuations of a context are packed one after another in its row, under a mask that lets each
  token see the context and the earlier tokens of its own continuation only;
- contexts are batched longest first and right-padded, so the context pass needs no mask (causal
  attention keeps real tokens from seeing later pads); a batch of up to batch_size contexts takes two
  forward passes, one for the contexts and one for all their continuations;
- contexts that share a long prefix (MMLU: the description and the same five dev examples for every
  question of a subject) are batched together, and the batch's common prefix runs once, its KV state
  copied to every row;
- logits are computed only at the positions that score a continuation token, log-softmax in fp32.

A request that is left-truncated to the model's context gets a context of its own (its group has one
member), so it takes the same path with no sharing. Batch size changes only the padding, never a result
beyond fp32 kernel rounding; in bf16/fp16 the padded shapes round differently (docs/herd-eval.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from llamaherd.errors import InputError
from llamaherd.model import GPT, KVCache


# Contexts sharing at least this many leading tokens are batched together and the prefix runs once;
# shorter common prefixes are not worth the separate pass.
SHARED_PREFIX_MIN = 64

Group = tuple[tuple[int, ...], list[int]]  # a context and the requests (indices) that share it


def common_prefix_len(contexts: Sequence[Sequence[int]]) -> int:
    return len(os.path.commonprefix(list(contexts)))


def plan_batches(groups: list[Group], batch_size: int) -> list[list[Group]]:
    """Batches of up to batch_size groups, longest contexts first.

    Sorted lexicographically, contexts with a long common prefix sit next to each other; each such run
    is batched on its own (so its prefix can run once), the remaining contexts by length (least padding).
    """
    lex = sorted(groups, key=lambda g: g[0])
    runs, run = [], lex[:1]
    for prev, g in zip(lex, lex[1:]):
        if common_prefix_len([prev[0], g[0]]) >= SHARED_PREFIX_MIN:
            run.append(g)
        else:
            runs.append(run)
            run = [g]
    runs.append(run)
    singles = sorted((g for r in runs if len(r) == 1 for g in r), key=lambda g: (-len(g[0]), g[0]))
    batches = []
    for r in [r for r in runs if len(r) > 1] + [singles]:
        r.sort(key=lambda g: (-len(g[0]), g[0]))
        batches += [r[i:i + batch_size] for i in range(0, len(r), batch_size)]
    return sorted(batches, key=lambda b: (-len(b[0][0]), b[0][0]))


class TextEncoder(Protocol):
    """What the engine needs from a tokenizer (llamaherd.tokenizer.Tokenizer provides it)."""

    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...


def encode_texts(tokenizer: TextEncoder, texts: list[str], add_bos: bool) -> list[list[int]]:
    """Token ids of each text; in parallel through the tokenizer's `encode_batch` when it has one."""
    batch = getattr(tokenizer, "encode_batch", None)
    if batch is not None:
        return batch(texts, add_bos=add_bos)
    return [tokenizer.encode(t, add_bos=add_bos) for t in texts]


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


def harness_split(context: str, continuation: str) -> tuple[str, str]:
    """Move trailing whitespace of the context to the front of the continuation, as the harness does."""
    kept = context.rstrip()
    return kept, context[len(kept):] + continuation


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
    batch_size: most rows per forward pass: contexts, then the same rows holding their continuations.
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
        self.prefix_tokens_reused = 0  # context tokens not recomputed thanks to shared prefixes
        weight = model.output_weight
        self.device = weight.device
        # Log-probabilities in at least fp32, whatever the model's dtype.
        self.score_dtype = torch.promote_types(weight.dtype, torch.float32)

    def encode(self, pairs: Sequence[tuple[str, str]]) -> list[Encoded]:
        """Tokenize and truncate every request, as the harness does.

        The context and context + continuation are encoded (BOS per `add_bos`) and the continuation is
        the whole's tokens after the context's length. An empty context becomes the BOS token (EOS when
        there is none) before the continuation encoded alone, as in lm-eval 0.4.
        """
        split = [harness_split(c, k) if c else (c, k) for c, k in pairs]
        texts = list(dict.fromkeys(t for c, k in split if c for t in (c, c + k)))
        ids = dict(zip(texts, encode_texts(self.tokenizer, texts, self.add_bos), strict=True))
        alone = list(dict.fromkeys(k for c, k in split if not c))
        ids_alone = dict(zip(alone, encode_texts(self.tokenizer, alone, False), strict=True))
        prefix = self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id
        shared: dict[tuple[int, ...], tuple[int, ...]] = {}  # one copy of a context for all its choices
        out = []
        for (context, continuation), (c, k) in zip(pairs, split, strict=True):
            if c:
                ctx = ids[c]
                cont = ids[c + k][len(ctx):]
            else:
                cont = ids_alone[k]
                ctx, cont = ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
            if not cont:
                raise InputError(f"continuation {continuation!r} after context ending {context[-40:]!r} "
                                 "encodes to no tokens")
            ctx, truncated = fit_to_context(ctx, cont, self.max_length)
            key = tuple(ctx)
            out.append(Encoded(shared.setdefault(key, key), tuple(cont), truncated))
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
        by_context: dict[tuple[int, ...], list[int]] = {}
        for i, e in enumerate(encoded):
            by_context.setdefault(e.context, []).append(i)
        # A row packs a context's continuations up to max_length tokens; more continuations (many
        # requests after one short shared prefix) take more rows.
        groups = []
        for ctx, members in by_context.items():
            part, packed = [], 0
            for i in members:
                n = len(encoded[i].continuation) - 1
                if part and packed + n > self.max_length:
                    groups.append((ctx, part))
                    part, packed = [], 0
                part.append(i)
                packed += n
            groups.append((ctx, part))
        for batch in plan_batches(groups, self.batch_size):
            yield from self._run_groups(batch, encoded)

    def _run_groups(self, groups: list[Group],
                    encoded: Sequence[Encoded]) -> Iterator[tuple[int, Result]]:
        """Two forward passes for up to batch_size groups: their contexts, then all their continuations."""
        model, dev = self.model, self.device
        G = len(groups)
        ctx_lens = torch.tensor([len(c) for c, _ in groups], device=dev)
        P = int(ctx_lens.max())
        # Continuation inputs (continuation[:-1]) of each group packed one after another in its row.
        segments = [[] for _ in groups]  # per row: (request index, start, length)
        for g, (_, members) in enumerate(groups):
            at = 0
            for i in members:
                segments[g].append((i, at, len(encoded[i].continuation) - 1))
                at += len(encoded[i].continuation) - 1
        T = max(start + n for row in segments for _, start, n in row)
        # A prefix common to every context runs once; each row keeps at least its last context token.
        L = min(common_prefix_len([c for c, _ in groups]), int(ctx_lens.min()) - 1) if G > 1 else 0
        if L >= SHARED_PREFIX_MIN:
            one = model.new_cache(1, P + T)
            model(torch.tensor([groups[0][0][:L]], device=dev), cache=one, last_only=True, return_hidden=True)
            cache = one.expand(G)
            self.prefix_tokens_reused += L * (G - 1)
        else:
            L, cache = 0, model.new_cache(G, P + T)

        # The rest of the contexts right-padded: causal attention keeps every real token from seeing the
        # padding, so this pass needs no padding mask (fast causal kernels).
        idx = torch.zeros(G, P - L, dtype=torch.long)
        for g, (ctx, _) in enumerate(groups):
            idx[g, : len(ctx) - L] = torch.tensor(ctx[L:])
        h = model(idx.to(dev), cache=cache, return_hidden=True)  # (G, P - L, n_embd)
        first = self._log_probs(h[torch.arange(G, device=dev), ctx_lens - 1 - L])  # (G, vocab): first tokens
        rows = [(g, i) for g, row in enumerate(segments) for i, _, _ in row]
        targets = torch.tensor([encoded[i].continuation[0] for _, i in rows], device=dev)
        row_of = torch.tensor([g for g, _ in rows], device=dev)
        head_lp = first[row_of, targets].tolist()
        head_ok = (first.argmax(-1)[row_of] == targets).tolist()
        heads = {i: (lp, ok) for (_, i), lp, ok in zip(rows, head_lp, head_ok, strict=True)}
        for _, i in rows:
            if len(encoded[i].continuation) == 1:
                lp, ok = heads[i]
                yield i, Result(lp, ok, (lp,), encoded[i].truncated)
        if T == 0:
            return
        for i, (lps, oks) in self._score_tails(segments, encoded, cache, ctx_lens, T):
            lp0, ok0 = heads[i]
            token_lps = (lp0, *lps)
            yield i, Result(sum(token_lps), ok0 and all(oks), token_lps, encoded[i].truncated)

    def _score_tails(self, segments: list[list[tuple[int, int, int]]], encoded: Sequence[Encoded],
                     cache: KVCache, ctx_lens: torch.Tensor, T: int) -> list[tuple[int, tuple[list, list]]]:
        """Every continuation token after the first, in one pass over the packed continuations.

        Each token sees its row's context (not the padding after it) and the earlier tokens of its own
        continuation, never another continuation: the same attention as one row per request.
        """
        dev = self.device
        G, P = len(segments), cache.length
        inp = torch.zeros(G, T, dtype=torch.long)
        offset = torch.zeros(G, T, dtype=torch.long)  # position within the continuation
        segment = torch.full((G, T), -1)  # which continuation a position belongs to; -1 = padding
        for g, row in enumerate(segments):
            for k, (i, start, n) in enumerate(row):
                inp[g, start:start + n] = torch.tensor(encoded[i].continuation[:-1])
                offset[g, start:start + n] = torch.arange(n)
                segment[g, start:start + n] = k
        inp, offset, segment = inp.to(dev), offset.to(dev), segment.to(dev)
        real = segment >= 0  # (G, T)
        sees_context = (torch.arange(P, device=dev)[None, :] < ctx_lens[:, None])[:, None, :] & real[:, :, None]
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        sees_own = (segment[:, :, None] == segment[:, None, :]) & causal & real[:, :, None]
        mask = torch.cat((sees_context, sees_own), dim=-1)  # (G, T, P + T)
        h = self.model(inp, positions=ctx_lens[:, None] + offset, attn_mask=mask, cache=cache,
                       return_hidden=True)  # (G, T, n_embd)
        log_probs = self._log_probs(h[real])  # (N, vocab): rows in order, positions ascending
        want = torch.tensor([t for row in segments for i, _, _ in row for t in encoded[i].continuation[1:]],
                            device=dev)
        token_lps = log_probs.gather(1, want[:, None])[:, 0].tolist()
        greedy = (log_probs.argmax(-1) == want).tolist()
        out, at = [], 0
        for row in segments:
            for i, _, n in row:
                if n:
                    out.append((i, (token_lps[at:at + n], greedy[at:at + n])))
                    at += n
        return out

    def _log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, n_embd) final hidden states -> (N, vocab) log-probabilities in >= fp32.

        The head is GPT.head (an untied head as a module, so LoRA takes part)."""
        logits = self.model.head(hidden)
        return F.log_softmax(logits.to(self.score_dtype), dim=-1)
