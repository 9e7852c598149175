"""herd curate's speed, per stage and end to end, beside datatrove's equivalent blocks on the same documents.

Corpus: the 851 shared pages (../shared/benchmarks/web) repeated to --docs documents (default 20,000) with planted
duplicates: each copy of a page gets its own URL and has 0% (exact copy), 1, 3, 5, 10, 20 or 30% of its words
replaced, written as 16 WARC.gz shards (warcio, one gzip member per record). Built once under --work.

Times are CPU seconds (this process and its finished children: pool workers, extraction sandboxes) wherever that
can be counted, so that other programs on a shared machine do not skew them; end to end also gives wall time.

1. Per stage, in this process: documents per CPU-second of each of herd curate's stages on a sample (every copy of
   the first pages: --sample documents, duplicates included), and of datatrove's equivalent blocks on the same input:
   Trafilatura extraction (same settings: favour precision, no trafilatura dedup), Gopher repetition and quality (on
   our extracted texts), MinHash signatures (450 bands x 20 rows on word 5-grams); with the share of documents on
   which both make the same decision (and, for extraction, the same text).
2. End to end on the whole corpus, with the recipe datatrove can also run ("equivalent": URL filter, extraction,
   Gopher repetition and quality, MinHash 450 x 20; no language ID, whose datatrove step downloads its model, no
   line-wise corrections, exact or substring dedup, which datatrove does not have in this form): herd curate with 1
   and 2 local workers and Ray at 2, datatrove's LocalPipelineExecutor at 2 workers (spawned, as ours); documents
   per wall second and CPU milliseconds per document, ratios, and the agreement of the kept documents. Then herd
   curate's full refinedweb recipe at 2 local workers.

Run on an otherwise idle machine: .venv/bin/python benchmarks/curate_speed.py [--docs 20000] [--json FILE]
datatrove needs its extras for these blocks:
  pip install spacy pyahocorasick fasteners tldextract faust-cchardet python-magic orjson
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import random
import re
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("LOGURU_LEVEL", "WARNING")  # datatrove's per-task statistics would bury the tables

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT.parent / "shared" / "benchmarks" / "web"
EDITS = (0.0, 0.01, 0.03, 0.05, 0.10, 0.20, 0.30)  # share of words replaced in a copy, in turn
SHARDS = 16
EXTRACT_TIMEOUT = 300  # datatrove's per-page limit (s): generous, so a busy machine does not turn slow pages into drops
EQUIVALENT = """base: refinedweb
stages: {language: false, line_corrections: false}
dedup: {exact: false, substring: false}
"""
WORD = re.compile(r"[^\W\d_]{3,}")
TAG = re.compile(r"(<[^>]*>)")


def pages() -> list[tuple[str, bytes]]:
    """(url, raw HTML) of the shared pages with an http(s) address, one per file, in file order."""
    evaldata = json.loads((WEB / "evaldata.json").read_text())
    by_file: dict[str, str] = {}
    for url, entry in evaldata.items():
        if url.startswith("http"):
            by_file.setdefault(entry["file"], url)
    return [(by_file[f], gzip.decompress((WEB / f).read_bytes())) for f in sorted(by_file)]


def edit(html: bytes, fraction: float, rng: random.Random) -> bytes:
    """The page with `fraction` of the words in its text (outside tags) replaced by other words."""
    if fraction == 0:
        return html
    text = html.decode("utf-8", "surrogateescape")
    parts = TAG.split(text)
    for i in range(0, len(parts), 2):  # even pieces are text between tags
        parts[i] = WORD.sub(lambda m: rng.choice(("alpha", "bravo", "delta", "omega", "sigma")) if
                            rng.random() < fraction else m.group(), parts[i])
    return "".join(parts).encode("utf-8", "surrogateescape")


def build_corpus(work: Path, n_docs: int) -> tuple[Path, dict[str, int]]:
    """WARC.gz shards of n_docs documents; returns the folder and each record id's page index."""
    folder = work / f"corpus-{n_docs}"
    index = folder / "pages.json"
    if index.exists():
        return folder, json.loads(index.read_text())
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    source = pages()
    rng = random.Random(0)
    page_of: dict[str, int] = {}
    writers = [open(folder / f"part-{s:02d}.warc.gz", "wb") for s in range(SHARDS)]
    for i in range(n_docs):
        page, copy = i % len(source), i // len(source)
        url, html = source[page]
        body = edit(html, EDITS[(copy - 1) % len(EDITS)], rng) if copy else html
        if copy:
            url = f"{url}{'&' if '?' in url else '?'}copy={copy}"
        writer = WARCWriter(writers[i % SHARDS], gzip=True)
        headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.1")
        record = writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=headers)
        writer.write_record(record)
        page_of[record.rec_headers.get_header("WARC-Record-ID")] = page
    for f in writers:
        f.close()
    index.write_text(json.dumps(page_of))
    return folder, page_of


def cpu_seconds() -> float:
    """CPU time of this process and of its finished child processes (pool workers, extraction sandboxes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn, *args, **kwargs):
    """(result, CPU seconds): CPU time, not wall time, so that other programs on the machine do not count."""
    start = cpu_seconds()
    result = fn(*args, **kwargs)
    return result, cpu_seconds() - start


# ---- 1. per stage ------------------------------------------------------------------------------------------------


def sample_documents(corpus: Path, page_of: dict[str, int], n: int):
    """Every copy of the first pages, about n documents, read with herd curate's reader (and its speed)."""
    from llamaherd.curate.read import plan_shards, read_shard

    shards, _ = plan_shards(sorted(str(p) for p in corpus.glob("*.warc.gz")))
    n_pages = max(1, n * (max(page_of.values()) + 1) // len(page_of))
    bad: Counter[str] = Counter()
    start = cpu_seconds()
    docs, read = [], 0
    for shard in shards:
        for doc in read_shard(shard, bad):
            read += 1
            if page_of[doc.id] < n_pages:
                docs.append(doc)
    return docs, read / (cpu_seconds() - start)


def our_stages(docs):
    """docs/s of each per-document stage on the documents that reach it, and the extracted texts."""
    import copy

    from llamaherd.curate.recipe import load_recipe

    stages = load_recipe().build_stages()
    warm = copy.deepcopy(docs[0])
    for stage in stages:  # loads happen on first use (blocklist, language model): not part of the per-document cost
        stage(warm)
    rows, texts, alive = {}, {}, [copy.deepcopy(d) for d in docs]
    decisions: dict[str, dict[str, bool]] = {}
    for stage in stages:
        kept, start, decided = [], cpu_seconds(), {}
        for doc in alive:
            reason = stage(doc)
            decided[doc.id] = reason is None
            if reason is None:
                kept.append(doc)
        rows[stage.name] = (len(alive), cpu_seconds() - start)
        decisions[stage.name] = decided
        if stage.name == "extract":
            texts = {d.id: d.text for d in kept}
        alive = kept
    return rows, texts, decisions


def our_dedup(texts: dict[str, str]):
    """docs/s of exact, fuzzy (450 x 20) and substring dedup on the given texts."""
    from llamaherd.curate.dedup import dedup_shard
    from llamaherd.curate.document import Document
    from llamaherd.curate.minhash import MinHashParams
    from llamaherd.curate.substring import substring_apply, substring_find, substring_map

    docs = [Document(id=i, text=t) for i, t in sorted(texts.items())]
    rows = {}
    _, rows["exact_dedup"] = timed(dedup_shard, docs, method="exact")
    _, rows["fuzzy_dedup"] = timed(dedup_shard, docs, method="fuzzy", params=MinHashParams(450, 20))
    with tempfile.TemporaryDirectory() as tmp:
        start = cpu_seconds()
        substring_map(tmp, 0, docs)
        substring_find(tmp, 1)
        substring_apply(tmp, 0, [Document(id=d.id, text=d.text) for d in docs])
        rows["substring_dedup"] = cpu_seconds() - start
    return {k: (len(docs), v) for k, v in rows.items()}


def datatrove_blocks(docs, texts, decisions):
    """datatrove's extraction, Gopher filters and MinHash signatures on the same input: docs/s and agreement."""
    from datatrove.data import Document as DTDocument
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter

    from llamaherd.curate.extract import clean_text

    rows, agree = {}, {}
    extractor = Trafilatura(favour_precision=True, deduplicate=False, timeout=EXTRACT_TIMEOUT)
    inputs = [DTDocument(text=d.html, id=d.id, metadata={"url": d.url}) for d in docs if d.html is not None]
    start = cpu_seconds()
    out = {d.id: d.text for d in extractor.run(iter(inputs))}
    rows["extract"] = (len(inputs), cpu_seconds() - start)
    ours = decisions["extract"]
    same_text = sum(clean_text(out.get(i, "")) == texts.get(i, "") for i in ours)
    same_decision = sum(bool(clean_text(out.get(i, ""))) == ours[i] for i in ours)
    agree["extract"] = (same_decision / len(ours), same_text / len(ours))
    for name, block in (("gopher_repetition", GopherRepetitionFilter()), ("gopher_quality", GopherQualityFilter())):
        ids = list(decisions[name])  # the documents our stage saw, with our extracted text
        batch = [DTDocument(text=texts[i], id=i) for i in ids]
        block.filter(DTDocument(text="warm up the word tokenizer", id="warm-up"))
        start = cpu_seconds()
        kept = [block.filter(d) is True for d in batch]
        rows[name] = (len(batch), cpu_seconds() - start)
        agree[name] = (sum(k == decisions[name][i] for k, i in zip(kept, ids)) / max(len(ids), 1), None)
    return rows, agree


def minhash_signatures(texts: dict[str, str]):
    """Signature docs/s: ours and datatrove's MinhashDedupSignature maths, 450 x 20 on word 5-grams."""
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature

    from llamaherd.curate.minhash import MinHashParams, band_hashes, signature

    params = MinHashParams(450, 20)
    items = list(texts.values())
    signature(items[0], params)
    start = cpu_seconds()
    for t in items:
        band_hashes(signature(t, params), params)
    ours = cpu_seconds() - start
    block = MinhashDedupSignature(output_folder=tempfile.mkdtemp(), config=MinhashConfig(
        n_grams=5, num_buckets=450, hashes_per_bucket=20, seed=1))
    block.get_signature(block.get_shingles(items[0]))
    start = cpu_seconds()
    for t in items:
        shingles = block.get_shingles(t)
        if shingles.size:
            block.get_signature(shingles)
    return (len(items), ours), (len(items), cpu_seconds() - start)


# ---- 2. end to end -------------------------------------------------------------------------------------------------


def run_ours(corpus: Path, out: Path, recipe_text: str, engine: str, workers: int) -> dict:
    """herd curate on the corpus: wall seconds, CPU seconds (local engine: its pool's workers included; Ray's
    workers are not this process's children, so not counted) and the kept ids."""
    from llamaherd.curate.executors import make_executor
    from llamaherd.curate.pipeline import run_curate
    from llamaherd.curate.recipe import load_recipe

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out.parent / f"{out.name}.yaml").write_text(recipe_text)
    recipe = load_recipe(str(out.parent / f"{out.name}.yaml"))
    wall, cpu = time.perf_counter(), cpu_seconds()
    executor = make_executor(engine, workers)
    try:
        run_curate(sorted(str(p) for p in corpus.glob("*.warc.gz")), out, recipe, executor, progress=False)
    finally:
        executor.close()
    kept = {json.loads(line)["id"] for p in (out / "data").glob("*.jsonl") for line in p.open()}
    return {"wall": time.perf_counter() - wall, "cpu": None if engine == "ray" else cpu_seconds() - cpu,
            "kept": kept}


def run_datatrove(corpus: Path, work: Path, workers: int) -> dict:
    """datatrove's equivalent pipeline: WARC reader, URL filter, Trafilatura, Gopher filters, MinHash 450 x 20:
    wall and CPU seconds (its spawned pool workers included), kept ids, wall seconds of its four executor stages.

    One task per worker (each reads SHARDS / workers files): a datatrove task loads its blocklist, word lists and
    tokenizer anew, which herd curate's long-lived workers do once, so more tasks would only add that cost."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter, URLFilter
    from datatrove.pipeline.readers import JsonlReader, WarcReader
    from datatrove.pipeline.writers import JsonlWriter

    shutil.rmtree(work, ignore_errors=True)
    cfg = MinhashConfig(n_grams=5, num_buckets=450, hashes_per_bucket=20, seed=1)
    w = str(work)
    stages = [
        LocalPipelineExecutor([WarcReader(str(corpus), glob_pattern="*.warc.gz"), URLFilter(),
                               Trafilatura(favour_precision=True, deduplicate=False, timeout=EXTRACT_TIMEOUT),
                               GopherRepetitionFilter(), GopherQualityFilter(), JsonlWriter(f"{w}/filtered"),
                               MinhashDedupSignature(output_folder=f"{w}/sigs", config=cfg)],
                              tasks=workers, workers=workers, logging_dir=f"{w}/logs/1", start_method="spawn"),
        LocalPipelineExecutor([MinhashDedupBuckets(f"{w}/sigs", f"{w}/buckets", config=cfg)],
                              tasks=cfg.num_buckets, workers=workers, logging_dir=f"{w}/logs/2",
                              start_method="spawn"),
        LocalPipelineExecutor([MinhashDedupCluster(f"{w}/buckets", f"{w}/remove", config=cfg)],
                              tasks=1, workers=1, logging_dir=f"{w}/logs/3", start_method="spawn"),
        LocalPipelineExecutor([JsonlReader(f"{w}/filtered"), MinhashDedupFilter(f"{w}/remove"),
                               JsonlWriter(f"{w}/out")], tasks=workers, workers=workers, logging_dir=f"{w}/logs/4",
                              start_method="spawn"),
    ]
    wall, cpu, parts = time.perf_counter(), cpu_seconds(), []
    for stage in stages:
        start = time.perf_counter()
        stage.run()
        parts.append(time.perf_counter() - start)
    kept = {json.loads(line)["id"] for p in (work / "out").glob("*.jsonl.gz") for line in gzip.open(p, "rt")}
    return {"wall": time.perf_counter() - wall, "cpu": cpu_seconds() - cpu, "kept": kept, "stages": parts}


def _xxhash64(data: str | bytes) -> int:
    import xxhash

    return xxhash.xxh64_intdigest(data.encode() if isinstance(data, str) else data)


def _datatrove_offline_and_current() -> None:
    """Two patches so datatrove 0.10 runs here: its URL filter would fetch the public suffix list (use the snapshot
    tldextract ships), and its MinHash hashes str, which xxhash 4 refuses (encode first, as xxhash 3 did)."""
    import tldextract
    from datatrove.utils.hashes import xxhash as dt_xxhash

    original = tldextract.TLDExtract.__init__

    def offline(self, *args, **kwargs):
        kwargs["suffix_list_urls"] = ()
        original(self, *args, **kwargs)

    tldextract.TLDExtract.__init__ = offline
    dt_xxhash.xxhash64 = _xxhash64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--sample", type=int, default=1000, help="documents for the per-stage figures")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "curate_speed")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--stages-only", action="store_true", help="the per-stage table only (minutes, not ~40)")
    parser.add_argument("--end-to-end-only", action="store_true", help="skip the per-stage table")
    args = parser.parse_args()
    _datatrove_offline_and_current()
    corpus, page_of = build_corpus(args.work, args.docs)
    print(f"corpus: {len(page_of):,} documents ({len(set(page_of.values()))} distinct pages) in {SHARDS} WARC.gz "
          f"shards; load before: {os.getloadavg()[0]:.2f}", flush=True)

    per_stage: dict = {}
    if not args.end_to_end_only:
        docs, read_rate = sample_documents(corpus, page_of, args.sample)
        stage_rows, texts, decisions = our_stages(docs)
        dedup_rows = our_dedup({i: texts[i] for i in decisions["line_corrections"] if texts.get(i)})
        dt_rows, agree = datatrove_blocks(docs, texts, decisions)
        (n_sig, ours_sig), (_, dt_sig) = minhash_signatures({i: t for i, t in texts.items() if t})
        per_stage = {"read": {"docs": len(page_of), "ours_docs_s": read_rate}}
        for name, (n, seconds) in {**stage_rows, **dedup_rows}.items():
            per_stage[name] = {"docs": n, "ours_docs_s": n / seconds if seconds else None}
        for name, (n, seconds) in dt_rows.items():
            per_stage[name]["datatrove_docs_s"] = n / seconds
            per_stage[name]["agreement"], per_stage[name]["same_text"] = agree[name]
        per_stage["minhash_signature"] = {"docs": n_sig, "ours_docs_s": n_sig / ours_sig,
                                          "datatrove_docs_s": n_sig / dt_sig}
        print(f"\nPer stage, documents per CPU-second, {len(docs):,} sampled documents (every copy of the first "
              "pages)\n")
        print("| stage | documents | herd curate | datatrove | ratio | same decision | same text |")
        print("|---|---|---|---|---|---|---|")
        for name, row in per_stage.items():
            dt = row.get("datatrove_docs_s")
            ratio = f"{row['ours_docs_s'] / dt:.2f}x" if dt else ""
            agreement = f"{row['agreement']:.1%}" if row.get("agreement") is not None else ""
            same = f"{row['same_text']:.1%}" if row.get("same_text") is not None else ""
            print(f"| {name} | {row['docs']:,} | {row['ours_docs_s']:,.1f} | {f'{dt:,.1f}' if dt else ''} | {ratio} | "
                  f"{agreement} | {same} |", flush=True)

    if args.stages_only:
        if args.json:
            args.json.write_text(json.dumps({"documents": len(page_of), "per_stage": per_stage}, indent=2))
        return
    n = len(page_of)
    ends = {}

    def show(label: str, run: dict) -> None:
        cpu = f", {1000 * run['cpu'] / n:.1f} CPU-ms/doc" if run["cpu"] is not None else ""
        print(f"{label}: {n / run['wall']:,.1f} docs/s ({run['wall']:.0f} s wall{cpu}; {len(run['kept']):,} kept)"
              + (f"; its 4 stages {' + '.join(f'{t:.0f}' for t in run['stages'])} s" if "stages" in run else ""),
              flush=True)

    ends["datatrove-2"] = run_datatrove(corpus, args.work / "datatrove", 2)
    show("datatrove 2 workers", ends["datatrove-2"])
    for label, engine, workers in (("local-2", "local", 2), ("local-1", "local", 1), ("ray-2", "ray", 2)):
        ends[label] = run_ours(corpus, args.work / f"ours-{label}", EQUIVALENT, engine, workers)
        show(f"herd curate {label}", ends[label])
    ends["refinedweb-local-2"] = run_ours(corpus, args.work / "ours-refinedweb-2", "base: refinedweb\n", "local", 2)
    show("herd curate, refinedweb recipe, local-2", ends["refinedweb-local-2"])
    ours_kept, dt_kept = ends["local-2"]["kept"], ends["datatrove-2"]["kept"]
    agreement = (n - len(ours_kept ^ dt_kept)) / n
    same = all(ends[k]["kept"] == ours_kept for k in ("local-1", "ray-2"))
    wall, cpu = {k: v["wall"] for k, v in ends.items()}, {k: v["cpu"] for k, v in ends.items()}
    result = {
        "documents": n, "per_stage": per_stage,
        "end_to_end": {k: {"docs_s": n / v["wall"], "wall_s": v["wall"], "cpu_s": v["cpu"], "kept": len(v["kept"])}
                       for k, v in ends.items()},
        "datatrove_stage_wall_s": ends["datatrove-2"]["stages"],
        "kept_agreement_with_datatrove": agreement, "engines_keep_the_same": same,
        "ratios": {"wall: local-2 / local-1": wall["local-1"] / wall["local-2"],
                   "wall: ray-2 / local-1": wall["local-1"] / wall["ray-2"],
                   "wall: local-2 / datatrove-2": wall["datatrove-2"] / wall["local-2"],
                   "wall: ray-2 / datatrove-2": wall["datatrove-2"] / wall["ray-2"],
                   "CPU per doc: datatrove-2 / local-2": cpu["datatrove-2"] / cpu["local-2"],
                   "CPU per doc: local-2 / local-1": cpu["local-2"] / cpu["local-1"]},
        "load_after": os.getloadavg()[0],
    }
    print(f"\nEnd to end, {n:,} documents, equivalent recipe: same kept/removed decision on {agreement:.1%} of "
          f"documents (herd curate local-2 vs datatrove); local-1, local-2 and ray-2 keep the same: {same}")
    for name, ratio in result["ratios"].items():
        print(f"  {name}: {ratio:.2f}x")
    print(f"load after: {result['load_after']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
