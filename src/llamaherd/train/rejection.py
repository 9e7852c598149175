"""Rejection sampling (Llama 2, Touvron et al. 2023, section 3.2.3): k responses per prompt from the policy, scored
by a reward model (or a reward function), the best one kept with its score as SFT data that `herd finetune` reads.

Sampling goes through the one generation engine: the k samples of a prompt are one request with n=k, so the prompt's
prefill is computed once and shared. Sample i of prompt p draws from its own generator seeded with
`prompt_seed(seed, p, k) + i`, so a sample never depends on what else is in the batch; each row records the seeds,
temperature and top-p of its samples and all k scores. The kept sample is the first of the highest score.

Crash-safe as `herd synth` (it reuses synth's journal, run-file pinning and atomic writes): each prompt's outcome is
appended to `journal.jsonl` (fsynced) once its k samples are scored; a rerun of the same command skips journalled
prompts, so nothing is sampled twice; `data.jsonl` is rewritten from the journal in prompt order, so it is the same
file whatever the kills in between. `manifest.json` (kind llamaherd-synth, recipe rejection-sampling) says which
policy wrote the file, so a model fine-tuned on it records method "rejection-sampling" and its teacher in lineage.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from llamaherd.errors import InputError
from llamaherd.terminal import printable

RECIPE = "rejection-sampling"


@dataclass
class RejectionConfig:
    """Every setting of a run (also the keys of its YAML file). model: the policy (None: embedded SmolLM2);
    prompts: files of prompts (data.prompts); exactly one of reward_model (a reward model directory) and reward_fn
    (`module:function`). max_batch: sequences the engine decodes together; rm_batch_size: rows per reward-model pass.
    """

    model: str | None = None
    prompts: list[str] = field(default_factory=list)
    out: str = "out/rejection"
    reward_model: str | None = None
    reward_fn: str | None = None
    k: int = 8
    temperature: float = 1.0
    top_p: float | None = None
    max_new_tokens: int = 256
    seed: int = 0
    chat_format: str | None = None  # None: the policy's own template
    rm_chat_format: str | None = None  # None: the reward model's own
    dtype: str = "fp32"
    max_batch: int = 16
    rm_batch_size: int = 8
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        checks = [
            (self.k >= 1, "k", "must be >= 1"),
            (self.temperature > 0, "temperature", "must be > 0 (greedy decoding gives k identical samples)"),
            (self.top_p is None or 0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1"),
            (self.max_batch >= 1, "max_batch", "must be >= 1"),
            (self.rm_batch_size >= 1, "rm_batch_size", "must be >= 1"),
            ((self.reward_model is None) != (self.reward_fn is None), "reward_model",
             "give exactly one of --rm REWARD_MODEL and --reward module:function"),
        ]
        for ok, name, fix in checks:
            if not ok:
                raise InputError(f"rejection sampling setting {name!r} = {getattr(self, name)!r}: {fix}")

    def pinned(self, prompts_sha256: list[str], policy: dict[str, Any], scorer: dict[str, Any]) -> dict[str, Any]:
        """What run.json pins: everything that decides the rows (not batch sizes or progress bars)."""
        keep = ("k", "temperature", "top_p", "max_new_tokens", "seed", "chat_format", "rm_chat_format", "dtype")
        return {"prompts": [str(Path(p).resolve()) for p in self.prompts], "prompts_sha256": prompts_sha256,
                "policy": policy, "scorer": scorer, **{k: getattr(self, k) for k in keep}}


def prompt_seed(seed: int, index: int, k: int) -> int:
    """The seed of sample 0 of the prompt at `index`; sample i uses this + i (the engine's n=k rule)."""
    return seed * 1_000_003 + index * k


def best_of(scores: Sequence[float]) -> int:
    """Index of the highest score, the first one on ties."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def run_rejection_sampling(cfg: RejectionConfig, loaded=None, scorer=None) -> dict[str, Any]:
    """Run (or resume) rejection sampling; write out/data.jsonl, journal.jsonl, run.json and manifest.json.

    loaded / scorer: an already loaded policy (`load.load_model`) and scorer (`train.scorers`), for tests and
    benchmarks; by default they come from cfg. Returns the manifest.
    """
    import torch

    from llamaherd.chat import get_chat_format
    from llamaherd.data.prompts import load_prompts
    from llamaherd.files import atomic_write
    from llamaherd.engine import Engine, SamplingParams
    from llamaherd.config import DEFAULT_MAX_LEN
    from llamaherd.load import load_model
    from llamaherd.synth.job import _check_run_file
    from llamaherd.synth.runner import DATA_FILE, JOURNAL_FILE, MANIFEST_FILE, Journal, Outcome
    from llamaherd.train.lineage import file_sha256, model_identity
    from llamaherd.train.scorers import make_scorer

    prompts, stats = load_prompts(cfg.prompts)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = loaded or load_model(cfg.model, dtype=cfg.dtype, device=device)
    scorer = scorer or make_scorer(cfg.reward_model, cfg.reward_fn, cfg.rm_chat_format, cfg.rm_batch_size, device)
    tok, model = loaded.tokenizer, loaded.model
    format_name = cfg.chat_format or loaded.chat_format
    if format_name is None:
        raise InputError(f"{loaded.source.path}: the policy has no chat template; pass --chat-format NAME")
    fmt = get_chat_format(format_name, bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
    identity = model_identity(loaded.source)
    policy = {"name": identity["name"], "path": identity["path"], "fingerprint": identity["fingerprint"],
              "chat_format": format_name}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_run_file(out, cfg.pinned([file_sha256(p) for p in cfg.prompts], policy, scorer.identity))

    journal = Journal(out / JOURNAL_FILE)
    encoded = [fmt.encode(p.messages, tok) for p in prompts]
    todo = [(i, p) for i, p in enumerate(prompts) if p.id not in journal.entries]
    limit = min(model.config.block_size, DEFAULT_MAX_LEN)
    # KV rows as long as the longest prompt that fits needs (the cache is max_batch x max_len positions)
    max_len = min(limit, max(len(ids) for ids in encoded) + cfg.max_new_tokens)
    engine = Engine(model.eval(), tok, max_batch=cfg.max_batch, max_len=max_len)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            stop_strings=list(fmt.stop_strings), skip_special_tokens=True)
    window = max(2, 2 * cfg.max_batch // cfg.k)  # prompts in flight: enough to keep every engine row busy
    started, sampled_tokens = time.perf_counter(), 0
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc=RECIPE, unit="prompt",
               disable=not cfg.progress, dynamic_ncols=True)
    queue, running = iter(todo), {}
    try:
        while True:
            while len(running) < window and (nxt := next(queue, None)) is not None:
                index, prompt = nxt
                ids = encoded[index]
                if len(ids) + cfg.max_new_tokens > max_len:
                    journal.append(prompt.id, Outcome("dropped", f"prompt of {len(ids)} tokens + max_new_tokens > "
                                                                 f"{max_len}"))
                    bar.update(1)
                    continue
                seeded = dataclasses.replace(params, seed=prompt_seed(cfg.seed, index, cfg.k))
                handle = engine.add_request(ids, seeded, n=cfg.k)
                running[handle.request_id] = prompt, handle
            if not running:
                break
            engine.step()
            for request_id, (prompt, handle) in list(running.items()):
                if handle.done:
                    del running[request_id]
                    row = _kept_row(prompt, handle, scorer, cfg)
                    sampled_tokens += sum(len(c.token_ids) for c in handle.completions)
                    journal.append(prompt.id, Outcome("kept", row=row))
                    bar.update(1)
    finally:
        bar.close()
        entries = [journal.entries[p.id] for p in prompts if p.id in journal.entries]
        rows = [e["row"] for e in entries if e["status"] == "kept"]
        atomic_write(out / DATA_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        journal.close()
    wall = time.perf_counter() - started
    manifest = {
        "schema": 1, "kind": "llamaherd-synth", "recipe": RECIPE, "output": DATA_FILE,
        "output_sha256": hashlib.sha256((out / DATA_FILE).read_bytes()).hexdigest(),
        "teacher": {"name": identity["name"], "teacher_id": f"local:{identity['name']}#{identity['fingerprint'][:16]}",
                    "kind": "local", **policy},
        "scorer": scorer.identity,
        "sampling": {k: getattr(cfg, k) for k in ("k", "temperature", "top_p", "max_new_tokens", "seed")},
        "prompts": {"files": [str(Path(p).resolve()) for p in cfg.prompts], "read": stats.summary()},
        "counts": {"prompts": len(prompts), "kept": len(rows), "too_long": len(entries) - len(rows)},
        "this_run": {"prompts": len(todo), "sampled_tokens": sampled_tokens, "wall_s": round(wall, 2)},
    }
    atomic_write(out / MANIFEST_FILE, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def _kept_row(prompt, handle, scorer, cfg: RejectionConfig) -> dict[str, Any]:
    """The prompt with its best sample as an SFT row: {"messages", "score", "source", "rejection_sampling": ...}."""
    completions = handle.completions
    scores = scorer([prompt.messages] * len(completions), [c.text for c in completions],
                    [c.token_ids for c in completions])
    best = best_of(scores)
    seed = handle.params.seed
    return {
        "messages": [*prompt.messages, {"role": "assistant", "content": completions[best].text}],
        "score": scores[best],
        "source": prompt.source,
        "rejection_sampling": {"k": len(completions), "chosen": best, "scores": scores,
                               "seeds": [seed + c.index for c in completions],
                               "temperature": cfg.temperature, "top_p": cfg.top_p,
                               "finish_reasons": [c.finish_reason for c in completions]},
    }


def is_rejection_sampled(path: str | Path) -> bool:
    """Whether a data file is the output of rejection sampling: the llamaherd-synth manifest beside it says so."""
    from llamaherd.train.lineage import synthetic_provenance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lineage.json's own reading of the manifest reports a malformed one
        provenance = synthetic_provenance(path, "")
    return provenance is not None and provenance["recipe"] == RECIPE


def summary_line(manifest: dict[str, Any], out: str | Path) -> str:
    """One line for the terminal: prompts kept, this run's share and where the data is."""
    counts, run = manifest["counts"], manifest["this_run"]
    return printable(f"{RECIPE}: {counts['kept']} of {counts['prompts']} prompts kept ({run['prompts']} sampled "
                     f"this run, {run['sampled_tokens']} tokens in {run['wall_s']} s); data: "
                     f"{Path(out) / 'data.jsonl'}")
