"""PPO from a reward (Ziegler et al. 2019; InstructGPT, Ouyang et al. 2022; Llama 2, Touvron et al. 2023, 3.2.3),
run by the shared training loop.

One iteration: (1) rollout: `rollout_batch_size` prompts (a seeded order of the prompt files, epoch after epoch)
get one response each from the one generation engine, sampled at `temperature`; (2) the reward model or reward
function scores each response; one forward pass of the policy gives the log-probabilities of the sampled tokens and
the value head's values, one of the reference (the policy with its LoRA adapters disabled, or a frozen copy of it
for full fine-tuning) its log-probabilities; (3) rewards and advantages (below); (4) `ppo_epochs` passes over the
rollout in minibatches of `batch_size` responses, each minibatch one optimizer step of the shared `Trainer`
(accumulation, checkpoints, metrics). `PPOTrainer` is that Trainer with its batches made by rollouts instead of read
from a dataset, and the rollout buffer and KL coefficient saved in each checkpoint, so a run resumes exactly
whether it was killed mid-rollout or mid-update.

Rewards, per response token t = 1..L (Ziegler et al. eq. 2 with the KL term taken per token, as InstructGPT's and
TRL's implementations do):
    r_t = -beta * k1_t  (+ score on t = L),   k1_t = log pi(y_t | s_t) - log ref(y_t | s_t)
score: the reward model's (or function's) value, minus `missing_eos_penalty` for a response cut at max_new_tokens,
then whitened over the rollout when `whiten_scores` is set. KL is logged three ways, per response (summed over its
tokens) and averaged over the rollout: `kl` = k1, the penalised estimator: unbiased, but negative on single tokens;
`kl_k3` = (rho - 1) - log rho with rho = ref / pi per token (Schulman's k3, never negative); `kl_exact` = the KL
between the two next-token distributions at each position (never negative). A negative mean `kl` is reported, never
silent. beta is `kl_coef`, or adaptive with `target_kl` (Ziegler et al. 2.2, lm-human-preferences' controller):
beta *= 1 + clip(kl / target_kl - 1, -0.2, 0.2) * rollout_batch_size / kl_horizon after each rollout.
Advantages: GAE (Schulman et al. 2016), delta_t = r_t + gamma V_{t+1} - V_t with V_{L+1} = 0 and
A_t = delta_t + gamma lam A_{t+1}; returns A_t + V_t; advantages whitened over the rollout's tokens.
Losses, averaged over a minibatch's response tokens (PPO's clipped objective, Schulman et al. 2017 eq. 7; the value
clipped as in InstructGPT's and TRL's code):
    policy  max(-A ratio, -A clip(ratio, 1 - cliprange, 1 + cliprange)),   ratio = pi(y_t) / pi_old(y_t)
    value   0.5 max((V - R)^2, (V_old + clip(V - V_old, -cliprange_value, cliprange_value) - R)^2)
    loss    policy + vf_coef * value
The policy is the sampling distribution softmax(logits / temperature) in every pass (sampling, rollout and training
log-probabilities, the reference, the KL): scoring other probabilities than the ones sampled from is what drives a
KL estimate negative, hence also no top-k / top-p. The engine's own log-probabilities of the sampled tokens are
compared with the training pass's (`logprob_gap`); above LOGPROB_TOLERANCE in fp32 the run stops.

A run stops with one line, its checkpoints kept, when the reward (model or function) fails, when the KL to the
reference passes `max_kl` nats per response, when the loss is not finite, or when the policy collapses (every response
the same, or nothing but one repeated token).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llamaherd.errors import HerdError, InputError
from llamaherd.model import GPT, Linear, linear
from llamaherd.train import distributed as D
from llamaherd.train.config import TrainConfig
from llamaherd.train.core import Batch, LossOutput, Objective, Trainer
from llamaherd.train.head_loss import SLICE_BYTES, head_log_probs
from llamaherd.train.run import Log, Recipe, run_training

if TYPE_CHECKING:
    from llamaherd.engine import Engine
    from llamaherd.load import Loaded

LOGPROB_TOLERANCE = 1e-3  # nats: engine vs training log-probabilities of a sampled token, fp32 without autocast
STATE_FILE = "ppo_state.json"
RESTART = "the checkpoints are kept; settings cannot change on --resume: start a new out_dir"


class PPOStopped(HerdError):
    """PPO stopped on purpose (KL exploded, policy collapsed, loss not finite); the checkpoints are kept."""


# ---- the maths --------------------------------------------------------------------------------------------------
def token_rewards(score: float, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards (L,) of one response: -kl_coef * (log pi - log ref) on every token, plus the score on the
    last (see the module docstring). logprobs, ref_logprobs: (L,) of the sampled tokens."""
    rewards = -kl_coef * (logprobs - ref_logprobs)
    rewards[-1] += score
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each (L,), of one response: generalized advantage estimation (Schulman et al. 2016,
    eq. 16) with V = 0 after the last token; returns = advantages + values."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros((), dtype=rewards.dtype)
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        last = rewards[t] + gamma * next_value - values[t] + gamma * lam * last
        advantages[t] = last
    return advantages, advantages + values


def whiten(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over all entries (unbiased variance, + 1e-8 as TRL's masked_whiten)."""
    return (x - x.mean()) * torch.rsqrt(x.var() + 1e-8) if x.numel() > 1 else x - x.mean()


def k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: (rho - 1) - log rho, rho = ref / pi; never negative."""
    log_rho = ref_logprobs - logprobs
    return log_rho.exp() - 1 - log_rho


@dataclass
class KLController:
    """beta, fixed, or adaptive toward `target` nats per response (Ziegler et al. 2019, 2.2; lm-human-preferences'
    AdaptiveKLController): value *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_responses / horizon."""

    value: float
    target: float | None = None
    horizon: int = 10000

    def update(self, kl: float, n_responses: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_responses / self.horizon


def collapse(responses: Sequence[Sequence[int]], stop_ids: frozenset[int] | set[int]) -> str | None:
    """Why a rollout looks collapsed, or None: every response identical, or all of them one repeated token."""
    if len(responses) < 2:
        return None
    if all(list(r) == list(responses[0]) for r in responses):
        return f"all {len(responses)} responses of the rollout are the same {len(responses[0])} tokens"
    content = {t for r in responses for t in r if t not in stop_ids}
    if len(content) == 1:
        return f"every response repeats one token (id {next(iter(content))})"
    return None


# ---- rollouts and their batches ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptIds:
    """A prompt ready to sample from: its messages (for the reward), ids (chat format applied) and source."""

    messages: list[dict]
    ids: list[int]
    source: str


@dataclass
class Rollout:
    """One sampled response and what PPO's update needs of it, per response token (JSON-safe for checkpoints):
    the policy's log-probabilities and values at sampling time, the advantages and the returns."""

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    values: list[float]
    advantages: list[float]
    returns: list[float]


def collate_rollouts(samples: Sequence[Rollout]) -> Batch:
    """A micro-batch of rollouts as one unpadded row: input_ids, positions, segment_ids (1, N) of each prompt +
    response (its last token is never an input); pred_index (M,) the positions whose hidden states predict the
    M response tokens, targets (M,); old_logprobs, old_values, advantages, returns (M,) fp32."""
    ids, positions, segments, pred, per_token = [], [], [], [], {k: [] for k in ("logprobs", "values", "advantages",
                                                                                 "returns")}
    for s, sample in enumerate(samples, 1):
        row = sample.prompt_ids + sample.response_ids[:-1]
        pred.extend(range(len(ids) + len(sample.prompt_ids) - 1, len(ids) + len(row)))
        ids += row
        positions += range(len(row))
        segments += [s] * len(row)
        for key, values in per_token.items():
            values.extend(getattr(sample, key))
    f32 = torch.float32
    return {"input_ids": torch.tensor([ids]), "positions": torch.tensor([positions]),
            "segment_ids": torch.tensor([segments]), "pred_index": torch.tensor(pred),
            "targets": torch.tensor([t for sample in samples for t in sample.response_ids]),
            "old_logprobs": torch.tensor(per_token["logprobs"], dtype=f32),
            "old_values": torch.tensor(per_token["values"], dtype=f32),
            "advantages": torch.tensor(per_token["advantages"], dtype=f32),
            "returns": torch.tensor(per_token["returns"], dtype=f32)}


def add_value_head(model: GPT) -> GPT:
    """Give the policy its value head, in place: `value_head`, Linear(n_embd, 1) on the final-norm hidden states,
    trainable, initialised to zero (every value starts at 0). It is trained, checkpointed, never exported."""
    ref = model.model.embed_tokens.weight
    model.value_head = nn.Linear(model.config.n_embd, 1, device=ref.device, dtype=ref.dtype)
    nn.init.zeros_(model.value_head.weight)
    nn.init.zeros_(model.value_head.bias)
    return model


def _hidden(model: GPT, batch: Batch) -> torch.Tensor:
    """(M, n_embd) final-norm hidden states at the positions that predict the response tokens."""
    h = model(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"], return_hidden=True)
    return h.flatten(0, 1)[batch["pred_index"]]


def _head_logits(model: GPT, h: torch.Tensor) -> torch.Tensor:
    """fp32 logits (S, V) of hidden states h (S, n_embd), the output head computed as `head_log_probs` does."""
    if model.config.tie_embeddings or type(model.lm_head) is Linear:
        weight = model.output_weight
        with torch.autocast(h.device.type, enabled=False):
            return linear(h.to(weight.dtype), weight).float()
    return model.head(h).float()


class PPOObjective(Objective):
    """PPO's clipped policy loss plus vf_coef times the clipped value loss, summed over the response tokens of a
    micro-batch of rollouts (`collate_rollouts`); the shared loop divides by the minibatch's token count.

    reference: a frozen copy of the policy (full fine-tuning), or None for the policy with its adapters disabled.
    """

    loss_label = "PPO loss: clipped policy + vf_coef x value (per response token)"

    def __init__(self, model: GPT, reference: GPT | None, cfg: TrainConfig) -> None:
        super().__init__(model)
        self.reference = reference
        self.temperature, self.cliprange, self.cliprange_value = cfg.temperature, cfg.cliprange, cfg.cliprange_value
        self.vf_coef = cfg.vf_coef

    def count(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(batch["targets"].numel())

    def n_tokens(self, batch: Batch) -> int:
        return batch["input_ids"].numel()

    def forward(self, batch: Batch) -> LossOutput:
        h = _hidden(self.model, batch)
        logprobs = head_log_probs(self.model, h / self.temperature, batch["targets"])
        values = self.model.value_head(h).squeeze(-1).float()
        old_logprobs, old_values = batch["old_logprobs"], batch["old_values"]
        advantages, returns = batch["advantages"], batch["returns"]
        log_ratio = logprobs - old_logprobs
        ratio = log_ratio.exp()
        policy = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - self.cliprange, 1 + self.cliprange))
        clipped = old_values + (values - old_values).clamp(-self.cliprange_value, self.cliprange_value)
        value = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
        with torch.no_grad():
            metrics = {"policy_loss": policy.sum(), "value_loss": value.sum(),
                       "clipfrac": ((ratio - 1).abs() > self.cliprange).float().sum(),
                       "value_clipfrac": ((values - old_values).abs() > self.cliprange_value).float().sum(),
                       "approx_kl": (0.5 * log_ratio**2).sum(), "ratio": ratio.sum()}
        return LossOutput((policy + self.vf_coef * value).sum(), metrics)

    @torch.no_grad()
    def score(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Per response token (M,) of a rollout micro-batch: the policy's log-probabilities at `temperature`
        (`logprobs`) and at temperature 1 (`raw_logprobs`, what the engine reports), its values and entropy, the
        reference's log-probabilities and the exact KL(pi || ref) of the next-token distributions."""
        from llamaherd.lora import adapters_disabled, lora_layers

        h = _hidden(self.model, batch)
        values = self.model.value_head(h).squeeze(-1).float()
        reference = self.model if self.reference is None else self.reference
        adapters = self.reference is None and bool(lora_layers(self.model))

        def as_reference():
            return adapters_disabled(self.model) if adapters else nullcontext()

        with as_reference():
            h_ref = _hidden(reference, batch)
        targets = batch["targets"][:, None]
        out = {k: torch.empty(len(h), device=h.device) for k in ("logprobs", "raw_logprobs", "entropy",
                                                                 "ref_logprobs", "kl_exact")}
        rows = max(1, SLICE_BYTES // (8 * self.model.config.vocab_size))
        for s in range(0, len(h), rows):
            sl = slice(s, s + rows)
            logits = _head_logits(self.model, h[sl] / self.temperature)
            with as_reference():
                ref_logits = _head_logits(reference, h_ref[sl] / self.temperature)
            logp, ref_logp = logits.log_softmax(-1), ref_logits.log_softmax(-1)
            out["logprobs"][sl] = logp.gather(1, targets[sl])[:, 0]
            out["raw_logprobs"][sl] = (logits * self.temperature).log_softmax(-1).gather(1, targets[sl])[:, 0]
            out["ref_logprobs"][sl] = ref_logp.gather(1, targets[sl])[:, 0]
            p = logp.exp()
            out["entropy"][sl] = -(p * logp).sum(-1)
            out["kl_exact"][sl] = (p * (logp - ref_logp)).sum(-1)
        out["values"] = values
        return out


class PPOTrainer(Trainer):
    """The shared Trainer whose step-`s` batches are minibatches of a rollout it makes itself (module docstring).

    Iteration i covers optimizer steps [i U, (i + 1) U), U = ppo_epochs x rollout_batch_size / batch_size: its first
    step samples the rollout of the i-th group of prompts (`rollout`), then each step takes one minibatch of it
    (`_micro_batches`), epoch by epoch in a seeded order. A checkpoint carries the rollout and beta, so resuming at
    any step continues exactly.
    """

    def __init__(self, objective: PPOObjective, prompts: Sequence[PromptIds], collate: Callable, cfg: TrainConfig,
                 info: D.DistInfo, model_fingerprint: str | None, engine: Engine, scorer: Callable,
                 stop_strings: Sequence[str]) -> None:
        self.engine, self.scorer = engine, scorer
        self.updates = cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.batch_size)  # optimizer steps per rollout
        self.kl = KLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
        self.buffer: list[Rollout] = []
        self.buffer_iteration = -1
        from llamaherd.engine import SamplingParams

        self.params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                     stop_strings=list(stop_strings), logprobs=0, skip_special_tokens=True)
        super().__init__(objective, prompts, [], collate, cfg, info, model_fingerprint)

    def epoch_steps(self) -> int:
        rollouts = len(self.train_set) // self.cfg.rollout_batch_size
        if rollouts == 0:
            raise InputError(f"the prompt files hold {len(self.train_set)} prompts, fewer than "
                             f"rollout_batch_size={self.cfg.rollout_batch_size}")
        return rollouts * self.updates

    # ---- checkpoints: the rollout being trained on and beta ----------------------------------------------------
    def checkpoint_extras(self) -> dict[str, str]:
        mid = self.step % self.updates != 0  # the next step still trains on this rollout
        state = {"kl_coef": self.kl.value, "buffer_iteration": self.buffer_iteration if mid else -1,
                 "buffer": [dataclasses.asdict(r) for r in self.buffer] if mid else []}
        return {STATE_FILE: json.dumps(state)}

    def restore_extras(self, path: Path) -> None:
        state = json.loads((path / STATE_FILE).read_text())
        self.kl.value = state["kl_coef"]
        self.buffer_iteration = state["buffer_iteration"]
        self.buffer = [Rollout(**r) for r in state["buffer"]]

    # ---- steps -------------------------------------------------------------------------------------------------
    def should_log(self, record: dict[str, float]) -> bool:
        """Also every step that made a rollout: its score, KL and lengths are logged on that step only."""
        return "score" in record or super().should_log(record)

    def train_step(self) -> dict[str, float]:
        iteration = self.step // self.updates
        stats = self.rollout(iteration) if iteration != self.buffer_iteration else {}
        started = time.perf_counter()
        record = super().train_step()
        if not math.isfinite(record["loss"]):
            raise PPOStopped(f"the PPO loss is {record['loss']} at step {self.step}: the update diverged; lower lr "
                             f"({RESTART})")
        record["update_s"] = time.perf_counter() - started
        self.history |= {k: stats[k] for k in ("score", "reward", "kl", "kl_exact") if k in stats}
        return record | stats

    def _micro_batches(self, step: int) -> list[Batch]:
        iteration, j = divmod(step, self.updates)
        epoch, m = divmod(j, self.updates // self.cfg.ppo_epochs)
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + iteration * self.cfg.ppo_epochs + epoch)
        order = torch.randperm(len(self.buffer), generator=g).tolist()
        bs, mb = self.cfg.batch_size, self.cfg.micro_batch_size
        mine = order[m * bs:(m + 1) * bs]
        return [self._to_device(self.collate([self.buffer[i] for i in mine[k:k + mb]])) for k in range(0, bs, mb)]

    def _prompts(self, iteration: int) -> list[PromptIds]:
        """The rollout_batch_size prompts of an iteration: a seeded order of the prompts per epoch over them."""
        per_epoch = len(self.train_set) // self.cfg.rollout_batch_size
        epoch, k = divmod(iteration, per_epoch)
        order = self._epoch_order(epoch)
        n = self.cfg.rollout_batch_size
        return [self.train_set[i] for i in order[k * n:(k + 1) * n]]

    # ---- the rollout -------------------------------------------------------------------------------------------
    def rollout(self, iteration: int) -> dict[str, float]:
        """Sample, score and prepare the rollout of `iteration` into `self.buffer`; its statistics for the log."""
        cfg, objective = self.cfg, self.objective
        prompts = self._prompts(iteration)
        started = time.perf_counter()
        objective.eval()
        self.engine.forget_prefixes()  # the weights changed since the last rollout
        base_seed = cfg.seed * 1_000_003 + iteration * len(prompts)
        requests = [self.engine.add_request(p.ids, dataclasses.replace(self.params, seed=base_seed + j))
                    for j, p in enumerate(prompts)]
        while self.engine.has_work:
            self.engine.step()
        completions = [r.completions[0] for r in requests]
        generated = time.perf_counter()
        responses = [c.token_ids for c in completions]
        scores = torch.tensor(self.scorer([p.messages for p in prompts], [c.text for c in completions], responses),
                              dtype=torch.float64)
        raw_scores = scores.clone()
        stopped = torch.tensor([c.finish_reason == "stop" for c in completions])
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~stopped).double()
        if cfg.whiten_scores:
            scores = whiten(scores)

        scored = self._score([Rollout(p.ids, r, [], [], [], []) for p, r in zip(prompts, responses)])
        engine_logprobs = torch.tensor([e.logprob for c in completions for e in c.logprobs])
        gap = (engine_logprobs - torch.cat(scored["raw_logprobs"])).abs().max().item()
        if gap > LOGPROB_TOLERANCE and not cfg.bf16 and objective.model.output_weight.dtype == torch.float32:
            raise PPOStopped(f"the engine's log-probabilities of the sampled tokens differ from the training pass's "
                             f"by {gap:.2e} nats (tolerance {LOGPROB_TOLERANCE:g}): the rollout did not sample from "
                             "the policy being trained; please report this with the command")
        beta = self.kl.value
        per_response = {"kl": [], "kl_k3": [], "kl_exact": [], "reward": []}
        advantages, samples = [], []
        for i, response in enumerate(responses):
            logp, ref_logp = scored["logprobs"][i].double(), scored["ref_logprobs"][i].double()
            values = scored["values"][i].double()
            rewards = token_rewards(scores[i].item(), logp, ref_logp, beta)
            adv, ret = gae(rewards, values, cfg.gamma, cfg.lam)
            advantages.append(adv)
            samples.append(Rollout(prompts[i].ids, list(response), logp.tolist(), values.tolist(), [], ret.tolist()))
            per_response["kl"].append((logp - ref_logp).sum().item())
            per_response["kl_k3"].append(k3(logp, ref_logp).sum().item())
            per_response["kl_exact"].append(scored["kl_exact"][i].double().sum().item())
            per_response["reward"].append(rewards.sum().item())
        flat = whiten(torch.cat(advantages))
        start = 0
        for sample, adv in zip(samples, advantages):
            sample.advantages = flat[start:start + len(adv)].tolist()
            start += len(adv)
        self.buffer, self.buffer_iteration = samples, iteration
        objective.train()

        mean = {k: sum(v) / len(v) for k, v in per_response.items()}
        n_tokens = sum(len(r) for r in responses)
        stats = {"score": raw_scores.mean().item(), "score_std": raw_scores.std().item() if len(prompts) > 1 else 0.0,
                 "reward": mean["reward"], "kl": mean["kl"], "kl_k3": mean["kl_k3"], "kl_exact": mean["kl_exact"],
                 "kl_coef": beta, "entropy": torch.cat(scored["entropy"]).mean().item(),
                 "response_length": n_tokens / len(responses), "eos_fraction": stopped.float().mean().item(),
                 "logprob_gap": gap, "generate_s": generated - started, "rollout_s": time.perf_counter() - started,
                 "generate_tokens_per_s": n_tokens / max(generated - started, 1e-9)}
        self.kl.update(mean["kl"], len(responses))
        self._check(stats, responses, iteration)
        return stats

    @torch.no_grad()
    def _score(self, samples: list[Rollout]) -> dict[str, list[torch.Tensor]]:
        """`PPOObjective.score` of each sample, micro-batch by micro-batch: {name: [per-sample (L,) CPU tensors]}."""
        out: dict[str, list[torch.Tensor]] = {}
        mb = self.cfg.micro_batch_size
        for start in range(0, len(samples), mb):
            chunk = samples[start:start + mb]
            with self._autocast():
                scored = self.objective.score(self._to_device(collate_rollouts(chunk)))
            lengths = [len(s.response_ids) for s in chunk]
            for k, v in scored.items():
                out.setdefault(k, []).extend(v.float().cpu().split(lengths))
        return out

    def _check(self, stats: dict[str, float], responses: list[list[int]], iteration: int) -> None:
        """Stop on a KL explosion or a collapsed policy; report a negative mean KL estimate."""
        where = f"at step {self.step + 1} (rollout {iteration})"
        if self.cfg.max_kl is not None and not stats["kl_exact"] <= self.cfg.max_kl:
            raise PPOStopped(f"KL to the reference is {stats['kl_exact']:.3g} nats per response {where}, above "
                             f"max_kl={self.cfg.max_kl:g}: the policy is running away from the reference (reward "
                             "hacking?); lower lr, raise kl_coef or set target_kl "
                             f"({RESTART})")
        reason = collapse(responses, getattr(self.engine.tokenizer, "stop_ids", set()))
        if reason is not None:
            raise PPOStopped(f"the policy collapsed {where}: {reason}; lower lr or raise kl_coef "
                             f"({RESTART})")
        if stats["kl"] < 0 and self.info.is_main:
            print(f"warning: the mean KL estimate (k1) is negative {where}: {stats['kl']:.4g} nats per response "
                  f"(k3 {stats['kl_k3']:.4g}, exact {stats['kl_exact']:.4g}); k1 is negative on single tokens, "
                  "so a small negative mean is sampling noise, a large one means the samples do not come from the "
                  "policy", file=sys.stderr, flush=True)

    def fit(self) -> dict[str, float]:
        metrics = super().fit()
        if self.info.is_main and self.cfg.plot:
            plot_ppo(self.out / "metrics.jsonl", self.out / "ppo.png", self.cfg.target_kl)
        return metrics


def plot_ppo(metrics_path: Path, out: Path, target_kl: float | None = None) -> Path:
    """Score, reward and KL per rollout as a PNG (two panels), with the KL target when there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llamaherd.train.metrics import read_metrics

    records = [r for r in read_metrics(metrics_path) if "kl" in r]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), dpi=100, sharex=True)
    steps = [r["step"] for r in records]
    for key, label in (("score", "score (reward model / function)"), ("reward", "reward (score - beta KL)")):
        top.plot(steps, [r[key] for r in records], label=label)
    for key, label in (("kl", "KL, k1 estimate"), ("kl_exact", "KL, exact per token")):
        bottom.plot(steps, [r[key] for r in records], label=label)
    if target_kl is not None:
        bottom.axhline(target_kl, color="gray", linestyle="--", label="target_kl")
    top.set_ylabel("per response")
    bottom.set_ylabel("nats per response")
    bottom.set_xlabel("optimizer step (first step of each rollout)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


# ---- the recipe -------------------------------------------------------------------------------------------------
class PPORecipe(Recipe):
    """`herd ppo`: the policy (any model and method) with a value head, trained by PPO on prompts from `cfg.data`
    against `cfg.reward_model` or `cfg.reward_fn`; exported as SFT exports (the value head left out)."""

    task = "ppo"

    def datasets(self, cfg: TrainConfig, tokenizer: Any, chat_format: str, log: Log) -> tuple[list, list]:
        from llamaherd.chat import get_chat_format
        from llamaherd.data.prompts import load_prompts

        if D.init_distributed().enabled:
            raise InputError("herd ppo runs in one process (its rollouts use the one generation engine); run it "
                             "without torchrun")
        if not cfg.data:
            raise InputError("no prompts: pass --prompts FILE (or `data:` in the config)")
        self.tokenizer = tokenizer
        self.format = get_chat_format(chat_format, tokenizer.bos_token or "", tokenizer.eos_token or "")
        prompts, stats = load_prompts(cfg.data)
        budget = cfg.max_seq_len - cfg.max_new_tokens
        encoded = [PromptIds(p.messages, self.format.encode(p.messages, tokenizer), p.source) for p in prompts]
        kept = [p for p in encoded if len(p.ids) <= budget]
        log(f"prompts: {stats.summary()}; {len(encoded) - len(kept)} longer than max_seq_len - max_new_tokens = "
            f"{budget} tokens left out")
        if not kept:
            raise InputError(f"every prompt is longer than max_seq_len - max_new_tokens = {budget} tokens; raise "
                             "max_seq_len")
        return kept, []

    def prepare(self, model: GPT, cfg: TrainConfig) -> GPT:
        model = super().prepare(model, cfg)
        self.reference = None
        if cfg.method == "full":  # the reference: a frozen copy of the starting policy (LoRA: adapters disabled)
            self.reference = copy.deepcopy(model).requires_grad_(False).eval()
        return add_value_head(model)

    def objective(self, model: GPT, cfg: TrainConfig) -> PPOObjective:
        return PPOObjective(model, self.reference, cfg)

    def collate(self, cfg: TrainConfig, pad_id: int) -> Callable[[list], Batch]:
        return collate_rollouts

    def trainer(self, objective: Objective, train: Sequence, val: Sequence, collate: Callable, cfg: TrainConfig,
                info: D.DistInfo, model_fingerprint: str | None) -> PPOTrainer:
        from llamaherd.engine import Engine
        from llamaherd.train.scorers import make_scorer

        context = objective.model.config.block_size
        if cfg.max_seq_len > context:
            raise InputError(f"config field 'max_seq_len' = {cfg.max_seq_len}: longer than the policy's context "
                             f"({context} tokens); set max_seq_len <= {context}")
        scorer = make_scorer(cfg.reward_model, cfg.reward_fn, cfg.rm_chat_format, device=info.device)
        objective.to(info.device)  # before the engine sizes its cache on the model's device
        engine = Engine(objective.model, self.tokenizer, max_batch=cfg.generation_batch_size, max_len=cfg.max_seq_len,
                        fuse=cfg.method != "full", cuda_graphs=False)
        return PPOTrainer(objective, train, collate, cfg, info, model_fingerprint, engine, scorer,
                          self.format.stop_strings)

    def export(self, model: GPT, state: dict[str, torch.Tensor], cfg: TrainConfig, loaded: Loaded, out: Path) -> Path:
        del model.value_head
        policy = {k: v for k, v in state.items() if not k.startswith(("value_head.", "reference."))}
        return super().export(model, policy, cfg, loaded, out)

    def lineage_method(self, cfg: TrainConfig) -> str:
        return "rlhf"


def run_ppo(cfg: TrainConfig) -> dict[str, Any]:
    """PPO on `cfg.model` with prompts `cfg.data`; write the policy, metrics, plots and lineage to `out_dir`."""
    return run_training(cfg, PPORecipe())
