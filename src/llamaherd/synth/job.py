"""One `herd synth` run as a library call: settings in (`SynthJob`), data.jsonl + manifest.json out.

The out directory holds `run.json` (the settings of the first run; a rerun with other settings is refused, so a
resumed run never mixes two recipes), `journal.jsonl`, `cache.jsonl`, `data.jsonl` and `manifest.json`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamaherd.errors import InputError
from llamaherd.files import atomic_write
from llamaherd.synth import templates
from llamaherd.synth.runner import (CACHE_FILE, DATA_FILE, JOURNAL_FILE, MANIFEST_FILE, Asker, Item, Journal,
                                    OutputFilters, run_items, write_data)
from llamaherd.synth.sampling import Sampling
from llamaherd.synth.seeds import Seed, read_seeds

RECIPES = ("self-chat", "explain", "self-instruct")
RUN_FILE = "run.json"
CHARS_PER_TOKEN = 4  # the dry run's estimate for an endpoint whose tokenizer we lack (OpenAI's rule of thumb)


@dataclass
class SynthJob:
    """Everything a run depends on. teacher: a model name/path for the local engine, ignored when base_url is set
    (an OpenAI-compatible endpoint; its key comes from the environment variable api_key_env, never a file).

    n: rows wanted (explain: default every instruction). price_in/price_out: USD per million prompt/completion
    tokens, for the manifest's cost. near_dup: MinHash Jaccard at which a row counts as a near duplicate (None:
    keep them).
    """

    recipe: str
    seeds: str
    out: str
    n: int | None = None
    sampling: Sampling = field(default_factory=Sampling)
    teacher: str | None = None
    base_url: str | None = None
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    chat_format: str | None = None
    max_batch: int = 16
    concurrency: int = 8
    max_retries: int = 5
    timeout: float = 120.0
    max_turns: int | None = None
    system_map: str | None = None
    variant: str = "self-instruct"
    requests_per_round: int = 5
    completion_api: bool | None = None  # None: the recipe's default (self-instruct: completion; self-chat: chat)
    near_dup: float | None = 0.8
    keep_refusals: bool = False
    price_in: float | None = None
    price_out: float | None = None

    def check(self) -> None:
        if self.completion_api is None:
            self.completion_api = self.recipe == "self-instruct"
        if self.recipe not in RECIPES:
            raise InputError(f"unknown recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        if self.n is not None and self.n < 1:
            raise InputError(f"-n must be >= 1, got {self.n}")
        if self.n is None and self.recipe != "explain":
            raise InputError(f"herd synth {self.recipe} needs -n N, the number of rows to produce")
        if self.max_turns is not None and self.max_turns < 2:
            raise InputError(f"--max-turns must be >= 2 (a dialogue needs two exchanges), got {self.max_turns}")
        if self.near_dup is not None and not 0 < self.near_dup <= 1:
            raise InputError(f"--near-dup must be in (0, 1], got {self.near_dup}")
        if self.variant not in ("self-instruct", "alpaca"):
            raise InputError(f"--variant must be self-instruct or alpaca, got {self.variant!r}")
        for name in ("max_batch", "concurrency", "requests_per_round"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    def settings(self, seeds_sha256: str) -> dict[str, Any]:
        """What run.json pins: everything that decides the rows (not prices, retries or batch sizes)."""
        keep = ("recipe", "n", "teacher", "base_url", "model", "chat_format", "max_turns", "system_map", "variant",
                "requests_per_round", "completion_api")
        return {"seeds": str(Path(self.seeds).resolve()), "seeds_sha256": seeds_sha256,
                "sampling": self.sampling.as_dict(), **{k: getattr(self, k) for k in keep}}


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _items(job: SynthJob, seeds: list[Seed]) -> list[Item]:
    """The recipe's items (self-instruct: its instance items need the instruction rounds first; see run_job)."""
    if job.recipe == "self-chat":
        from llamaherd.synth.self_chat import self_chat_items
        return self_chat_items(seeds, job.n, job.sampling, job.max_turns, job.completion_api)
    from llamaherd.synth.explain import explain_items, read_system_map
    system_map = read_system_map(job.system_map) if job.system_map else None
    return explain_items(seeds, job.n, job.sampling, system_map)


def make_teacher(job: SynthJob):
    """The local engine teacher, or the HTTP teacher when base_url is set."""
    if job.base_url:
        from llamaherd.synth.teacher_http import HTTPTeacher
        return HTTPTeacher(job.base_url, model=job.model, api_key_env=job.api_key_env,
                           concurrency=job.concurrency, max_retries=job.max_retries, timeout=job.timeout)
    from llamaherd.load import load_model
    from llamaherd.synth.teacher_local import LocalTeacher
    return LocalTeacher(load_model(job.teacher), max_batch=job.max_batch, chat_format=job.chat_format)


def _check_run_file(out: Path, settings: dict[str, Any]) -> None:
    """Pin the settings on the first run; refuse a rerun into the same folder with other settings."""
    path = out / RUN_FILE
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        if before != settings:
            changed = sorted(k for k in settings.keys() | before.keys() if before.get(k) != settings.get(k))
            raise InputError(f"{path}: this folder holds a run with other settings ({', '.join(changed)}); rerun "
                             "with the same command to resume, or pass a new --out")
    else:
        atomic_write(path, json.dumps(settings, indent=2) + "\n")


def run_job(job: SynthJob, teacher=None) -> dict[str, Any]:
    """Run (or resume) the job; returns the manifest it wrote. teacher: an already built Teacher (tests, benchmarks)."""
    job.check()
    seeds = read_seeds(job.seeds)
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_run_file(out, job.settings(_sha256(job.seeds)))
    teacher = teacher or make_teacher(job)
    from llamaherd.synth.cache import RequestCache

    started = time.perf_counter()
    journal = Journal(out / JOURNAL_FILE)
    asker = Asker(teacher, RequestCache(out / CACHE_FILE))
    generation: dict[str, Any] = {}
    items: list[Item] = []
    try:
        if job.recipe == "self-instruct":
            items, generation = _self_instruct(job, seeds, asker, journal)
        else:
            items = _items(job, seeds)
        run_items(items, asker, journal, desc=f"synth {job.recipe}")
    finally:
        counts = write_data(out, items, journal, OutputFilters(job.near_dup, job.keep_refusals))
        journal.close()
    manifest = _manifest(job, teacher, counts, generation, asker, out, time.perf_counter() - started)
    atomic_write(out / MANIFEST_FILE, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def _self_instruct(job: SynthJob, seeds: list[Seed], asker: Asker, journal: Journal):
    from llamaherd.synth.self_instruct import InstructionRounds, instance_items
    rounds = InstructionRounds(seeds, job.sampling, job.variant, job.requests_per_round,
                               completion=job.completion_api)
    max_rounds = 20 * math.ceil(job.n / job.requests_per_round) + 20
    tasks = rounds.run(asker, journal, job.n, max_rounds)
    generation = {"instructions_kept": len(tasks), "instructions_dropped": dict(sorted(rounds.counts.items())),
                  "rounds_limit": max_rounds}
    return instance_items(tasks, job.sampling, job.variant, job.completion_api), generation


def _templates(job: SynthJob) -> dict[str, Any]:
    """The published prompts this run used (for the manifest)."""
    if job.recipe == "self-chat":
        return {"baize": templates.BAIZE_TEMPLATE, "mode": "turn-by-turn" if job.max_turns else "transcript"}
    if job.recipe == "explain":
        return {"orca_system_messages": list(templates.ORCA_SYSTEM_MESSAGES), "system_map": job.system_map}
    if job.variant == "alpaca":
        return {"variant": "alpaca", "alpaca_prompt_header": templates.ALPACA_PROMPT_HEADER}
    return {"variant": "self-instruct", "instruction_prompt": "self_instruct_prompt (Come up with a series of tasks)"}


def _manifest(job: SynthJob, teacher, counts: dict, generation: dict, asker: Asker, out: Path,
              wall: float) -> dict[str, Any]:
    identity = dict(teacher.identity)
    name = identity.get("name") or identity.get("model")
    previous = out / MANIFEST_FILE
    before = json.loads(previous.read_text(encoding="utf-8")) if previous.is_file() else {}
    u = asker.usage
    tokens = {"prompt": u.prompt_tokens, "completion": u.completion_tokens,
              "paid_prompt": u.paid_prompt_tokens, "paid_completion": u.paid_completion_tokens}
    totals = before.get("totals", {})
    paid_in = totals.get("paid_prompt_tokens", 0) + u.paid_prompt_tokens
    paid_out = totals.get("paid_completion_tokens", 0) + u.paid_completion_tokens
    manifest = {
        "schema": 1, "kind": "llamaherd-synth", "recipe": job.recipe,
        "output": DATA_FILE, "output_sha256": _sha256(out / DATA_FILE),
        "teacher": {"name": name, "teacher_id": teacher.teacher_id, **identity},
        "templates": _templates(job),
        "sampling": job.sampling.as_dict(), "seeds": {"file": str(Path(job.seeds).resolve()),
                                                      "sha256": _sha256(job.seeds)},
        "counts": counts, "generation": generation,
        "this_run": {"requests": u.requests, "cached": u.cached, "failed": u.failed,
                     "failures": dict(u.failures), "tokens": tokens, "wall_s": round(wall, 2)},
        "totals": {"paid_prompt_tokens": paid_in, "paid_completion_tokens": paid_out,
                   "wall_s": round(totals.get("wall_s", 0.0) + wall, 2), "runs": totals.get("runs", 0) + 1},
        "filters": {"near_dup_jaccard": job.near_dup, "refusals_kept": job.keep_refusals},
    }
    if job.price_in is not None and job.price_out is not None:
        manifest["totals"]["cost_usd"] = round((paid_in * job.price_in + paid_out * job.price_out) / 1e6, 6)
    return manifest


def dry_run(job: SynthJob) -> dict[str, Any]:
    """Requests and tokens a run would spend, before anything is: prompt tokens exactly as a local teacher encodes
    them (chat template included), len/4 for an endpoint; completion tokens at most max_tokens per request.
    Self-Instruct's rounds are a lower bound (filters drop instructions); turn-by-turn self-chat an upper one."""
    job.check()
    seeds = read_seeds(job.seeds)
    count = _prompt_tokens(job)
    if job.recipe == "self-instruct":
        from llamaherd.synth.self_instruct import EXAMPLES_PER_PROMPT, InstructionRounds
        rounds_ = InstructionRounds(seeds, job.sampling, job.variant, completion=job.completion_api)
        per_reply = {"self-instruct": 16 - EXAMPLES_PER_PROMPT["self-instruct"], "alpaca": 20 - 3}[job.variant]
        rounds = math.ceil(job.n / (job.requests_per_round * per_reply))
        request = rounds_.request("dry-run", rounds_.prompt(random.Random(job.sampling.seed)), 0)
        first = rounds * job.requests_per_round
        instance_requests = 0 if job.variant == "alpaca" else 2 * job.n
        requests = first + instance_requests
        prompt_tokens = count(request) * requests  # an instance prompt is about the size of a round's prompt
        note = (f"at least {rounds} instruction rounds of {job.requests_per_round} requests (more when the filters "
                "drop instructions), then the instance requests")
    else:
        first = [request for item in _items(job, seeds) for request in next(item.steps())]
        turns = 2 * job.max_turns if job.max_turns else 1
        requests = len(first) * turns
        prompt_tokens = sum(count(r) for r in first) * turns
        note = "turn by turn: at most 2 requests per exchange" if job.max_turns else "one request per row"
    estimate = {"requests": requests, "prompt_tokens": prompt_tokens,
                "completion_tokens_at_most": requests * job.sampling.max_tokens, "note": note}
    if job.price_in is not None and job.price_out is not None:
        estimate["cost_usd_at_most"] = round((prompt_tokens * job.price_in
                                              + estimate["completion_tokens_at_most"] * job.price_out) / 1e6, 4)
    return estimate


def _prompt_tokens(job: SynthJob):
    """A request's prompt token count: the local teacher's own encoding, or characters / 4 for an endpoint."""
    if job.base_url:
        return lambda r: math.ceil(len(r.prompt or "".join(c for _, c in r.messages)) / CHARS_PER_TOKEN)
    from llamaherd.load import load_tokenizer
    from llamaherd.synth.teacher_local import encode_request, teacher_chat_format
    tokenizer, name = load_tokenizer(job.teacher)
    chat_format = teacher_chat_format(tokenizer, job.chat_format or name)
    return lambda r: len(encode_request(r, tokenizer, chat_format)[0])
