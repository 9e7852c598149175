"""The curation pipeline over shards, in phases that an executor runs as tasks, each one resumable.

1. filter, per shard: read -> the recipe's per-document stages in order -> the shard's survivors, stage counts and
   removed examples, each written atomically (temp + rename), then the shard's completion marker.
2. exact and fuzzy deduplication (dedup.py) across ALL shards: per shard a map of its keys into buckets, per bucket
   the candidate edges, once the clusters (one document kept per cluster); fuzzy runs on what exact kept. With
   `per_shard` each shard is deduplicated on its own instead, inside phase 4 (as RefinedWeb did per CommonCrawl part).
3. exact substring deduplication (substring.py) on what fuzzy kept.
4. write, per shard: the final JSONL (`text`, `url`, `id`, and `metadata` with each stage's scores when
   `keep_metadata`), the dedup counts and examples, then the marker; finally the report.

Layout of OUT: data/NNNNN.jsonl (the result), report.{md,html,json,png}, run.json (what was asked: a rerun must ask
the same), work/ (intermediate files and markers). A rerun of the same command after a kill finds the markers and
redoes only the unfinished tasks; every task's output is a function of its inputs alone, so the result is the same
byte for byte, whichever engine, worker count or interruption produced it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llamaherd.curate.dedup import write_json
from llamaherd.curate.document import Document
from llamaherd.curate.executors import Executor
from llamaherd.curate.read import Shard, plan_shards, read_shard
from llamaherd.curate.recipe import Recipe
from llamaherd.curate.report import StageCount, build_report, count_words, pick_examples, snippet, write_report
from llamaherd.errors import InputError
from llamaherd.files import atomic_write

EXAMPLES_PER_REASON = 2  # kept per shard, stage and reason; the report picks a few of all shards'
MAX_BUCKETS = 4096
DEDUP_STAGES = {"exact": "exact_dedup", "fuzzy": "fuzzy_dedup", "substring": "substring_dedup"}


def _mark(path: Path) -> None:
    atomic_write(path, b"")


@dataclass(frozen=True)
class Task:
    """What a task needs: the shard (or bucket) and the run's settings, as plain picklable data."""

    work: str
    recipe: dict[str, Any]
    shard: Shard | None = None
    bucket: int = 0
    n_shards: int = 0
    n_buckets: int = 1
    keep_metadata: bool = False
    per_shard: bool = False
    out: str = ""
    method: str = ""


class Tally:
    """Per-stage counts and a few removed examples for one shard."""

    def __init__(self, names: Sequence[str]):
        self.stages = {name: StageCount(name) for name in names}
        self._per_reason: Counter[tuple[str, str]] = Counter()

    def seen(self, stage: str) -> None:
        self.stages[stage].docs_in += 1

    def kept(self, stage: str, doc: Document) -> None:
        self.stages[stage].words_kept += count_words(doc.text)

    def removed(self, stage: str, reason: str, doc: Document, note: str | None = None) -> None:
        count = self.stages[stage]
        count.reasons[reason] = count.reasons.get(reason, 0) + 1
        self._example(stage, reason, doc, note)

    def edited(self, stage: str, doc: Document, note: str) -> None:
        """A kept document whose text the stage shortened (an example under the reason "STAGE:edited")."""
        self.stages[stage].edited += 1
        self._example(stage, f"{stage}:edited", doc, note)

    def _example(self, stage: str, reason: str, doc: Document, note: str | None) -> None:
        count = self.stages[stage]
        if self._per_reason[stage, reason] < EXAMPLES_PER_REASON:
            self._per_reason[stage, reason] += 1
            example = {"id": doc.id, "url": doc.url, "reason": reason, "text": snippet(doc.text)}
            if note:
                example["note"] = note
            count.examples.append(example)

    def to_dict(self) -> dict[str, Any]:
        return {name: {"in": c.docs_in, "reasons": c.reasons, "edited": c.edited, "words_kept": c.words_kept,
                       "examples": c.examples} for name, c in self.stages.items()}


# ---- phase 1: per-document stages ----------------------------------------------------------------------------------

_STAGE_CACHE: dict[str, list] = {}


def _stages(recipe: dict[str, Any]) -> list:
    """The recipe's stages, built once per worker process (a language model or blocklist loads once)."""
    key = json.dumps(recipe["stages"], sort_keys=True)
    if key not in _STAGE_CACHE:
        _STAGE_CACHE[key] = Recipe.from_dict(recipe).build_stages()
    return _STAGE_CACHE[key]


def _paths(work: str, shard: Shard) -> tuple[Path, Path, Path]:
    root = Path(work) / "filter"
    return root / f"{shard.name}.jsonl", root / f"{shard.name}.stats.json", root / f"{shard.name}.done"


def filter_shard(task: Task) -> None:
    """Phase 1 for one shard (see the module doc); a stage that raises on a document removes it as "stage:error"."""
    shard = task.shard
    stages = _stages(task.recipe)
    tally = Tally([stage.name for stage in stages])
    bad: Counter[str] = Counter()
    lines: list[bytes] = []
    read = 0
    for doc in read_shard(shard, bad):
        read += 1
        for stage in stages:
            tally.seen(stage.name)
            note = None
            try:
                reason = stage(doc)
            except Exception as e:  # one page must not stop a shard; the report shows the count and the error
                reason, note = f"{stage.name}:error", f"{type(e).__name__}: {e}"[:200]
            if reason is not None:
                tally.removed(stage.name, reason, doc, note)
                break
            tally.kept(stage.name, doc)
        else:
            lines.append(_record(doc, metadata=True))
    survivors, stats, done = _paths(task.work, shard)
    atomic_write(survivors, b"".join(lines))
    write_json(stats, {"read": read, "bad": dict(bad), "stages": tally.to_dict()})
    _mark(done)


def _record(doc: Document, metadata: bool) -> bytes:
    data = {"text": doc.text, "url": doc.url, "id": doc.id}
    if metadata:
        data["metadata"] = doc.metadata
    return (json.dumps(data, ensure_ascii=False) + "\n").encode("utf-8")


def _survivors(work: str, shard: Shard) -> list[Document]:
    path = _paths(work, shard)[0]
    docs = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            data = json.loads(line)
            docs.append(Document(id=data["id"], text=data["text"], url=data["url"], metadata=data["metadata"]))
    return docs


# ---- phase 2: exact and fuzzy deduplication across shards --------------------------------------------------------


def _dedup_dir(work: str, method: str) -> Path:
    return Path(work) / method


def _deduplicated(task: Task, recipe: Recipe, docs: list[Document], until: str | None = None,
                  tally: Tally | None = None) -> list[Document]:
    """`docs` after the recipe's global dedup phases that come before `until` (all of them when None), each
    applied to what the previous one kept, as each phase's map saw them."""
    from llamaherd.curate.dedup import dedup_decisions
    from llamaherd.curate.substring import substring_apply

    for method in recipe.dedup:
        if method == until:
            break
        decide = substring_apply if method == "substring" else dedup_decisions
        docs = _apply(docs, decide(_dedup_dir(task.work, method), task.shard.index, docs), method, tally)
    return docs


def _deduplicated_alone(task: Task, recipe: Recipe, docs: list[Document], tally: Tally) -> list[Document]:
    """`docs` after the recipe's dedup phases run within this shard only (`--per-shard`)."""
    from llamaherd.curate.dedup import dedup_shard
    from llamaherd.curate.substring import substring_apply, substring_find, substring_map

    for method, params in recipe.dedup.items():
        if method == "substring":
            root = Path(task.work) / "substring-per-shard" / task.shard.name
            substring_map(root, 0, docs)
            substring_find(root, 1, **params)
            decisions = substring_apply(root, 0, docs)
        else:
            decisions = dedup_shard(docs, method=method, **({"params": recipe.minhash()} if params else {}))
        docs = _apply(docs, decisions, method, tally)
    return docs


def _apply(docs: list[Document], decisions: list[str | None], method: str, tally: Tally | None) -> list[Document]:
    """The documents a dedup phase kept, tallied (with the kept copy of each removed one, the cut of each edited)."""
    stage = DEDUP_STAGES[method]
    kept = []
    for doc, reason in zip(docs, decisions):
        info = doc.metadata.get(stage, {})
        if reason is None:
            kept.append(doc)
        if tally is None:
            continue
        tally.seen(stage)
        if reason is not None:
            tally.removed(stage, reason, doc, f"duplicate of {info['duplicate_of']}" if "duplicate_of" in info
                          else None)
            continue
        tally.kept(stage, doc)
        if "removed_tokens" in info:
            tally.edited(stage, doc, f"{info['removed_tokens']} of {info['tokens']} tokens cut")
    return kept


def dedup_map(task: Task) -> None:
    """Phase 2a/3a for one shard and one dedup method: the keys of what the earlier phases kept, then the marker."""
    from llamaherd.curate.dedup import dedup_map as map_keys
    from llamaherd.curate.substring import substring_map

    recipe = Recipe.from_dict(task.recipe)
    root = _dedup_dir(task.work, task.method)
    docs = _deduplicated(task, recipe, _survivors(task.work, task.shard), until=task.method)
    if task.method == "substring":
        substring_map(root, task.shard.index, docs)
    else:
        params = {"params": recipe.minhash()} if task.method == "fuzzy" else {}
        map_keys(root, task.shard.index, docs, method=task.method, n_buckets=task.n_buckets, **params)
    _mark(root / f"{task.shard.name}.map.done")


def dedup_reduce(task: Task) -> None:
    """Phase 2b for one bucket of exact or fuzzy dedup: its candidate pairs, then the marker."""
    from llamaherd.curate.dedup import dedup_reduce as reduce_bucket

    root = _dedup_dir(task.work, task.method)
    reduce_bucket(root, task.bucket, task.n_shards)
    _mark(root / f"b{task.bucket:04d}.reduce.done")


def dedup_resolve(task: Task) -> None:
    """Phase 2c/3b, once per method: the clusters (exact, fuzzy) or the repeated spans (substring), then the marker."""
    from llamaherd.curate.dedup import dedup_resolve as resolve
    from llamaherd.curate.substring import substring_find

    root = _dedup_dir(task.work, task.method)
    if task.method == "substring":
        substring_find(root, task.n_shards, **Recipe.from_dict(task.recipe).dedup["substring"])
    else:
        resolve(root, task.n_shards, task.n_buckets)
    _mark(root / "resolve.done")


# ---- phase 4: the final shards -------------------------------------------------------------------------------------


def write_shard(task: Task) -> None:
    """Phase 4 for one shard: apply the dedup decisions, write data/NNNNN.jsonl, its dedup tally, then its marker."""
    recipe = Recipe.from_dict(task.recipe)
    tally = Tally([DEDUP_STAGES[m] for m in recipe.dedup])
    docs = _survivors(task.work, task.shard)
    if task.per_shard:
        docs = _deduplicated_alone(task, recipe, docs, tally)
    else:
        docs = _deduplicated(task, recipe, docs, tally=tally)
    out = Path(task.out) / "data" / f"{task.shard.name}.jsonl"
    atomic_write(out, b"".join(_record(doc, task.keep_metadata) for doc in docs))
    write_json(Path(task.work) / "write" / f"{task.shard.name}.stats.json", {"stages": tally.to_dict()})
    _mark(Path(task.work) / "write" / f"{task.shard.name}.done")


# ---- the driver ----------------------------------------------------------------------------------------------------


def _check_run(out: Path, identity: dict[str, Any]) -> None:
    """Record what this run asks for in OUT/run.json; a rerun must ask the same (InputError naming the difference)."""
    path = out / "run.json"
    identity = json.loads(json.dumps(identity))  # as JSON reads it back (integer keys of a parameter become strings)
    if path.exists():
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise InputError(f"{path}: unreadable; remove {out} or pass another --out") from None
        for key, value in identity.items():
            if found.get(key) != value:
                raise InputError(f"{out} holds a run with other {key.replace('_', ' ')} (see {path}); rerun the same "
                                 "command to resume it, or pass another --out")
        return
    write_json(path, identity)


def _phase(executor: Executor, fn: Callable[[Task], None], tasks: list[Task], done: Callable[[Task], Path],
           desc: str, progress: bool) -> None:
    """Run the tasks whose marker is missing, with a progress bar over all of them."""
    from tqdm import tqdm

    todo = [t for t in tasks if not done(t).exists()]
    with tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc=desc, unit="task", disable=not progress,
              dynamic_ncols=True) as bar:
        for _ in executor.map(fn, todo):
            bar.update()


def n_buckets(n_shards: int) -> int:
    """Buckets of the dedup shuffle: one per shard (so a bucket holds about one shard's keys), at most 4096."""
    return max(1, min(n_shards, MAX_BUCKETS))


def run_curate(inputs: list[str], out: str | Path, recipe: Recipe, executor: Executor, *, per_shard: bool = False,
               keep_metadata: bool = False, progress: bool = True) -> Path:
    """Curate INPUT files into OUT (see the module doc); returns the Markdown report's path.

    Raises InputError for a missing input, or an OUT holding a run with other inputs or settings.
    """
    out = Path(out).resolve()
    shards, skipped = plan_shards(inputs, recipe.html_files_per_shard)
    identity = {"inputs": list(inputs), "recipe": recipe.to_dict(), "per_shard": per_shard,
                "keep_metadata": keep_metadata, "shards": [[s.kind, list(s.names)] for s in shards]}
    out.mkdir(parents=True, exist_ok=True)
    _check_run(out, identity)
    work = str(out / "work")
    data = recipe.to_dict()
    buckets = n_buckets(len(shards))
    per = [Task(work, data, shard=s, n_shards=len(shards), n_buckets=buckets, keep_metadata=keep_metadata,
                per_shard=per_shard, out=str(out)) for s in shards]
    _phase(executor, filter_shard, per, lambda t: _paths(work, t.shard)[2], "filter", progress)
    for method in [] if per_shard else recipe.dedup:
        root = _dedup_dir(work, method)
        tasks = [replace(t, method=method) for t in per]
        _phase(executor, dedup_map, tasks, lambda t, r=root: r / f"{t.shard.name}.map.done", f"{method} map", progress)
        if method != "substring":
            buckets_ = [Task(work, data, method=method, bucket=b, n_shards=len(shards), n_buckets=buckets)
                        for b in range(buckets)]
            _phase(executor, dedup_reduce, buckets_, lambda t, r=root: r / f"b{t.bucket:04d}.reduce.done",
                   f"{method} reduce", progress)
        once = [Task(work, data, method=method, n_shards=len(shards), n_buckets=buckets)]
        _phase(executor, dedup_resolve, once, lambda t, r=root: r / "resolve.done", f"{method} resolve", progress)
    _phase(executor, write_shard, per, lambda t: Path(work) / "write" / f"{t.shard.name}.done", "write", progress)
    return _report(out, recipe, shards, skipped)


def _report(out: Path, recipe: Recipe, shards: list[Shard], skipped: Counter[str]) -> Path:
    """Sum every shard's tallies (in shard order) into the report and write it."""
    work = out / "work"
    names = list(recipe.stages) + [DEDUP_STAGES[m] for m in recipe.dedup]
    totals = {name: StageCount(name) for name in names}
    examples: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    bad: Counter[str] = Counter(skipped)
    read = 0
    for shard in shards:
        stats = json.loads(_paths(str(work), shard)[1].read_text(encoding="utf-8"))
        final = json.loads((work / "write" / f"{shard.name}.stats.json").read_text(encoding="utf-8"))
        read += stats["read"]
        bad.update(stats["bad"])
        for name, tally in (stats["stages"] | final["stages"]).items():
            total = totals[name]
            total.docs_in += tally["in"]
            total.words_kept += tally["words_kept"]
            total.edited += tally["edited"]
            for reason, n in tally["reasons"].items():
                total.reasons[reason] = total.reasons.get(reason, 0) + n
            examples[name].extend(tally["examples"])
    for name, total in totals.items():
        total.examples = pick_examples(examples[name])
    minhash = None
    if "fuzzy" in recipe.dedup:
        p = recipe.minhash()
        minhash = f"MinHash {p.bands} bands x {p.rows} rows on word {p.ngram}-grams (seed {p.seed})"
    report = build_report(recipe.name, read, list(totals.values()), dict(bad), minhash)
    return write_report(report, out)

