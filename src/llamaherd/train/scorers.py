"""What rates a sampled response for rejection sampling and PPO: a reward model, or a Python function.

A scorer is called with a batch: `scorer(prompts, responses, response_ids) -> list[float]`, prompts as message lists
(ending with the user's), responses as text, response_ids as the policy's token ids. The reward model always reads
the text, rendered with its own chat format and tokenized with its own tokenizer, so a policy and a reward model
with different tokenizers work together (the response is re-tokenized, never passed as ids).

A programmatic reward, `--reward module:function` (or `path/to/file.py:function`), is called as TRL's reward
functions are: `function(prompts=..., completions=..., completion_ids=...)` returning one number per completion.
A function that raises, returns the wrong count, or a NaN / infinite value stops the run with one line naming it.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from llamaherd.errors import HerdError, InputError

Messages = list[dict]

RERUN = "finished work is kept: rerun (herd ppo with --resume) to continue"


class RewardError(HerdError):
    """A reward function (or model) gave no usable reward; the run stops, its checkpoints stay."""


class FunctionScorer:
    """A programmatic reward `module:function` or `file.py:function` (see the module docstring).

    A module name is imported with the current directory on the path (as `python -m` would), a `.py` path is
    loaded from that file. Raises InputError when the spec does not name a callable.
    """

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.fn = load_function(spec)
        self.identity: dict[str, Any] = {"kind": "function", "name": spec}

    def __call__(self, prompts: Sequence[Messages], responses: Sequence[str],
                 response_ids: Sequence[Sequence[int]]) -> list[float]:
        try:
            values = self.fn(prompts=list(prompts), completions=list(responses),
                             completion_ids=[list(ids) for ids in response_ids])
        except Exception as e:  # the user's code: any failure is reported as its own, in one line
            raise RewardError(f"--reward {self.spec} raised {type(e).__name__}: {e}; fix the function; "
                              f"{RERUN}") from None
        return checked_rewards(values, len(responses), f"--reward {self.spec}")


class RewardModelScorer:
    """A reward model (`train.reward.load_reward_model`) scoring the text of each response, rendered with
    `chat_format` if given, else the reward model's own (its training run's, else its tokenizer's template);
    batch_size rows per forward pass."""

    def __init__(self, loaded, chat_format: str | None = None, batch_size: int = 8) -> None:
        from llamaherd.train.lineage import model_identity

        self.loaded, self.batch_size = loaded, batch_size
        self.chat_format = chat_format or loaded.chat_format
        if self.chat_format is None:
            raise InputError(f"{loaded.source.path}: the reward model has no chat template; pass --rm-chat-format")
        identity = model_identity(loaded.source)
        self.identity = {"kind": "reward-model", "name": identity["name"], "path": identity["path"],
                         "fingerprint": identity["fingerprint"], "chat_format": self.chat_format}

    def __call__(self, prompts: Sequence[Messages], responses: Sequence[str],
                 response_ids: Sequence[Sequence[int]]) -> list[float]:
        from llamaherd.train.reward import score_texts

        scores = score_texts(self.loaded.model, self.loaded.tokenizer, prompts, responses, self.chat_format,
                             batch_size=self.batch_size)
        return checked_rewards(scores, len(responses), f"reward model {self.identity['name']}")


def checked_rewards(values: Any, n: int, who: str) -> list[float]:
    """`values` as n finite floats, or RewardError naming `who` and the first bad entry."""
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError) as e:
        raise RewardError(f"{who} returned {type(values).__name__} ({e}); return one number per completion") from None
    if len(out) != n:
        raise RewardError(f"{who} returned {len(out)} rewards for {n} completions; return one per completion")
    bad = next((i for i, v in enumerate(out) if not math.isfinite(v)), None)
    if bad is not None:
        raise RewardError(f"{who} returned {out[bad]} for completion {bad} of {n}; rewards must be finite numbers; "
                          f"{RERUN}")
    return out


def load_function(spec: str) -> Callable[..., Any]:
    """The callable named by `module:function` or `path/to/file.py:function`; InputError naming the spec otherwise."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise InputError(f"--reward {spec!r}: expected module:function or path/to/file.py:function")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise InputError(f"--reward {spec}: file {where} not found")
            module_spec = importlib.util.spec_from_file_location(f"llamaherd_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(where)
    except InputError:
        raise
    except Exception as e:  # importing runs the user's module: report any failure on one line
        raise InputError(f"--reward {spec}: cannot import {where} ({type(e).__name__}: {e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise InputError(f"--reward {spec}: {where} has no function {name!r}")
    return fn


def make_scorer(reward_model: str | None, reward_fn: str | None, chat_format: str | None = None,
                batch_size: int = 8, device: str | torch.device = "cpu"):
    """The scorer for `--rm PATH` or `--reward module:function` (exactly one of them); a reward model is loaded
    on `device` (the policy's)."""
    if (reward_model is None) == (reward_fn is None):
        raise InputError("give exactly one of --rm REWARD_MODEL and --reward module:function")
    if reward_fn is not None:
        return FunctionScorer(reward_fn)
    from llamaherd.train.reward import load_reward_model

    return RewardModelScorer(load_reward_model(reward_model, device=str(device)), chat_format, batch_size)
