"""`herd curate` end to end: readers and bad input, recipes, the local and Ray engines, resume after SIGKILL.

Inputs are real pages from ../shared/benchmarks/web (HTML files and a WARC written here with warcio, an independent
writer), LIMA answers as JSONL with planted exact and near duplicates, and planted bad input whose counts are known
by construction.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from llamaherd.cli import main
from llamaherd.curate.read import plan_shards, read_shard, read_warc

N_PAGES = 16  # HTML files copied from the shared pages
N_WARC_PAGES = 6  # shared pages written into the WARC
RECIPE = "base: refinedweb\nread:\n  html_files_per_shard: 5\nstages:\n  language: {languages: [en, de]}\n"
DUPLICATED_PAGE = 2  # an English page that passes every filter; a copy of it is planted
EXPECTED_BAD = {"read:bad_json": 1, "read:no_text": 1, "read:empty": 2, "read:truncated_gzip": 2,
                "read:corrupt_gzip": 1, "read:not_html": 1, "read:http_status": 1, "read:skipped_file": 1}


def _warc_bytes(records: list[tuple[str, bytes, str, str]], warcinfo: bool = False) -> list[bytes]:
    """Each record as its own gzip member (warcio): (url, body, content type, HTTP status line)."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    members = []
    if warcinfo:
        buf = io.BytesIO()
        writer = WARCWriter(buf, gzip=True)
        writer.write_record(writer.create_warcinfo_record("test.warc.gz", {"software": "test"}))
        members.append(buf.getvalue())
    for url, body, content_type, status in records:
        buf = io.BytesIO()
        writer = WARCWriter(buf, gzip=True)
        headers = StatusAndHeaders(status, [("Content-Type", content_type)], protocol="HTTP/1.1")
        writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(body),
                                                      http_headers=headers))
        members.append(buf.getvalue())
    return members


def _pages(shared: Path) -> list[tuple[str, Path]]:
    """(url, file) of the shared pages with an http(s) address, in file-name order."""
    web = shared / "benchmarks" / "web"
    evaldata = json.loads((web / "evaldata.json").read_text())
    by_file = {}
    for url, entry in evaldata.items():
        if url.startswith("http"):
            by_file.setdefault(entry["file"], url)
    return [(by_file[f], web / f) for f in sorted(by_file)]


def _lima(shared: Path, n: int) -> list[str]:
    return [item["output"] for item in json.loads((shared / "benchmarks/instructions/lima.json").read_text())[:n]]


def build_inputs(shared: Path, root: Path) -> list[str]:
    """The test inputs (see the module doc); the bad input planted is exactly EXPECTED_BAD."""
    pages = _pages(shared)
    html = root / "html"
    html.mkdir(parents=True)
    for _, path in pages[:N_PAGES]:
        shutil.copy(path, html / path.name)
    shutil.copy(pages[DUPLICATED_PAGE][1], html / f"zz-copy-{pages[DUPLICATED_PAGE][1].name}")  # exact duplicate
    (html / "empty.html").write_bytes(b"  \n")  # read:empty
    (html / "broken.html.gz").write_bytes(pages[1][1].read_bytes()[:300])  # read:truncated_gzip
    (html / "notes.txt").write_text("not a page")  # read:skipped_file

    records = [(url, gzip.decompress(path.read_bytes()), "text/html", "200 OK")
               for url, path in pages[N_PAGES:N_PAGES + N_WARC_PAGES]]
    records.append(("http://example.com/logo.png", b"\x89PNG\r\n", "image/png", "200 OK"))  # read:not_html
    records.append(("http://example.com/gone", b"<html>gone</html>", "text/html", "404 Not Found"))  # http_status
    (root / "crawl.warc.gz").write_bytes(b"".join(_warc_bytes(records, warcinfo=True)))

    good = [(url, gzip.decompress(path.read_bytes()), "text/html", "200 OK")
            for url, path in pages[N_PAGES + N_WARC_PAGES:N_PAGES + N_WARC_PAGES + 4]]
    members = _warc_bytes(good)
    corrupt = bytearray(members[1])
    corrupt[len(corrupt) // 2:len(corrupt) // 2 + 16] = b"\x00" * 16  # read:corrupt_gzip
    members[1] = bytes(corrupt)
    members[3] = members[3][: len(members[3]) // 2]  # read:truncated_gzip
    (root / "broken.warc.gz").write_bytes(b"".join(members))

    texts = _lima(shared, 12)
    texts[8] += "\n\n" + " ".join(texts[11].split()[:60])  # a 60-word span repeated: cut by substring dedup
    lines = [json.dumps({"id": f"lima-{i:02d}", "text": t, "url": f"https://lima.example/{i}"})
             for i, t in enumerate(texts)]
    exact = texts[0][0].lower() + texts[0][1:].replace(" ", "  ", 1).replace("?", "!")  # same normalized text
    lines.append(json.dumps({"id": "lima-90", "text": exact}))
    words = texts[5].split()
    rng = random.Random(0)
    for i in rng.sample(range(len(words)), max(1, len(words) // 100)):
        words[i] = "changed"
    lines.append(json.dumps({"id": "lima-91", "text": " ".join(words)}))  # near duplicate of 05
    lines.append(json.dumps({"id": "no-text", "url": "https://lima.example/x"}))  # read:no_text
    lines.append('{"id": "broken", "text": "unterminated')  # read:bad_json
    lines.append(json.dumps({"id": "blank", "text": "   "}))  # read:empty
    (root / "lima.jsonl").write_text("\n".join(lines) + "\n")
    (root / "recipe.yaml").write_text(RECIPE)
    return [str(html), str(root / "crawl.warc.gz"), str(root / "broken.warc.gz"), str(root / "lima.jsonl")]


def _outputs(out: Path) -> dict[str, bytes]:
    """Every file a run delivers (data shards and the report), by relative path."""
    files = sorted((out / "data").glob("*.jsonl")) + sorted(out.glob("report.*"))
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for p in sorted((out / "data").glob("*.jsonl")) for line in p.read_text().splitlines()]


@pytest.fixture(scope="module")
def inputs(shared_dir, tmp_path_factory) -> tuple[list[str], Path]:
    root = tmp_path_factory.mktemp("curate-inputs")
    return build_inputs(shared_dir, root), root


@pytest.fixture(scope="module")
def local_run(inputs, tmp_path_factory) -> Path:
    """One uninterrupted run on the local engine with 2 workers: the reference the others must equal."""
    from llamaherd.curate.executors import LocalExecutor
    from llamaherd.curate.pipeline import run_curate
    from llamaherd.curate.recipe import load_recipe

    paths, root = inputs
    out = tmp_path_factory.mktemp("curate-local") / "out"
    executor = LocalExecutor(2)
    try:
        run_curate(paths, out, load_recipe(str(root / "recipe.yaml")), executor, progress=False)
    finally:
        executor.close()
    return out


@pytest.mark.slow
def test_local_run_counts_bad_input_and_removes_planted_duplicates(local_run, shared_dir):
    report = json.loads((local_run / "report.json").read_text())
    assert report["bad_input"] == EXPECTED_BAD
    # read: 16 + 1 copy HTML pages, 6 WARC pages, 2 pages of the broken WARC, 14 JSONL records
    assert report["documents_read"] == N_PAGES + 1 + N_WARC_PAGES + 2 + 14
    stages = {row["stage"]: row for row in report["stages"]}
    assert list(stages) == ["url_filter", "extract", "language", "gopher_repetition", "gopher_quality",
                            "line_corrections", "exact_dedup", "fuzzy_dedup", "substring_dedup"]
    for before, after in zip(report["stages"], report["stages"][1:]):
        assert after["in"] == before["kept"]
        assert before["kept"] == before["in"] - before["removed"] == before["in"] - sum(before["reasons"].values())
    records = _records(local_run)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == report["stages"][-1]["kept"]
    assert all(list(r) == ["text", "url", "id"] for r in records)
    # the planted pairs: one copy each stays, the smaller id (the rule), and the report says which it duplicates
    name = _pages(shared_dir)[DUPLICATED_PAGE][1].name
    page, copy = f"html/{name}", f"html/zz-copy-{name}"
    assert {"lima-00", "lima-05", page} <= set(ids) and not {"lima-90", "lima-91", copy} & set(ids)
    notes = {ex["id"]: ex.get("note") for row in report["stages"] for ex in row["examples"]}
    assert notes["lima-90"] == "duplicate of lima-00" and notes["lima-91"] == "duplicate of lima-05"
    assert notes[copy] == f"duplicate of {page}"
    assert stages["exact_dedup"]["reasons"] == {"exact_dedup:duplicate": 2}
    assert stages["fuzzy_dedup"]["reasons"] == {"fuzzy_dedup:duplicate": 1}
    # the repeated 60-word span is cut from lima-08 (and from lima-11, where it comes from), the rest kept
    text = {r["id"]: r["text"] for r in records}
    span = " ".join(_lima(shared_dir, 12)[11].split()[:60])
    assert stages["substring_dedup"]["edited"] == 2 and span not in text["lima-08"] and span not in text["lima-11"]
    assert _lima(shared_dir, 12)[8].split()[:20] == text["lima-08"].split()[:20]
    for name in ("report.md", "report.html", "report.png"):
        assert (local_run / name).stat().st_size > 0
    assert "read:corrupt_gzip: 1" in (local_run / "report.md").read_text()


@pytest.mark.slow
def test_ray_engine_gives_byte_identical_output_and_report(inputs, local_run, tmp_path):
    pytest.importorskip("ray")
    from llamaherd.curate.executors import RayExecutor
    from llamaherd.curate.pipeline import run_curate
    from llamaherd.curate.recipe import load_recipe

    paths, root = inputs
    executor = RayExecutor(2)
    try:
        run_curate(paths, tmp_path / "out", load_recipe(str(root / "recipe.yaml")), executor, progress=False)
    finally:
        executor.close()
    reference = _outputs(local_run)
    assert len(reference) > 4 and _outputs(tmp_path / "out") == reference


@pytest.mark.slow
def test_per_shard_dedup_keeps_copies_in_other_shards_and_metadata_is_kept(inputs, shared_dir, tmp_path):
    from llamaherd.curate.executors import LocalExecutor
    from llamaherd.curate.pipeline import run_curate
    from llamaherd.curate.recipe import load_recipe

    paths, root = inputs
    executor = LocalExecutor(2)
    try:
        run_curate(paths, tmp_path / "out", load_recipe(str(root / "recipe.yaml")), executor, per_shard=True,
                   keep_metadata=True, progress=False)
    finally:
        executor.close()
    records = {r["id"]: r for r in _records(tmp_path / "out")}
    name = _pages(shared_dir)[DUPLICATED_PAGE][1].name
    assert {f"html/{name}", f"html/zz-copy-{name}"} <= set(records)  # in two shards: both kept
    assert "lima-00" in records and not {"lima-90", "lima-91"} & set(records)  # one shard: removed
    metadata = records["lima-00"]["metadata"]
    assert list(records["lima-00"]) == ["text", "url", "id", "metadata"]
    assert metadata["language"]["language"] == "en" and metadata["gopher_quality"]["words"] > 50


def _curate_command(paths: list[str], out: Path, root: Path) -> list[str]:
    return [sys.executable, "-m", "llamaherd.cli", "curate", *paths, "--out", str(out), "--recipe",
            str(root / "recipe.yaml"), "--workers", "1"]


def _kill_when(command: list[str], ready, timeout: float = 120.0) -> None:
    """Start `command` in its own process group and SIGKILL the whole group as soon as `ready()` holds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, "the run ended before the kill point"
            assert time.monotonic() < deadline, "the kill point was never reached"
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_sigkill_then_rerun_redoes_only_unfinished_work_and_matches(inputs, local_run, tmp_path):
    paths, root = inputs
    out = tmp_path / "out"
    command = _curate_command(paths, out, root)
    n_shards = len(json.loads((local_run / "run.json").read_text())["shards"])

    def filter_done() -> list[Path]:
        return sorted((out / "work" / "filter").glob("*.done"))

    _kill_when(command, lambda: len(filter_done()) >= 2)  # killed in the per-shard stages
    finished = {p: p.stat().st_mtime_ns for p in filter_done()}
    assert 2 <= len(finished) < n_shards and not (out / "report.md").exists()

    _kill_when(command, lambda: any((out / "work" / "fuzzy").glob("*.map.done")))  # killed in global dedup
    assert not (out / "report.md").exists() and not (out / "work" / "fuzzy" / "resolve.done").exists()
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # finished shards were not redone

    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Report:" in result.stdout and "450 bands x 20 rows" in result.stdout
    assert _outputs(out) == _outputs(local_run)


def test_ray_engine_without_ray_installed_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError, as when it is not installed
    (tmp_path / "in.jsonl").write_text('{"text": "hello"}\n')
    assert main(["curate", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out"), "--engine", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'llamaherd[ray]'" in err


def test_missing_input_is_a_one_line_error(tmp_path, capsys):
    missing = tmp_path / "nowhere.warc.gz"
    assert main(["curate", str(missing), "--out", str(tmp_path / "out"), "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(missing) in err and "no such file" in err


@pytest.mark.parametrize("text, expected", [
    ("stages:\n  gopher_quality: {min_word: 10}\n", ["stages.gopher_quality.min_word", "min_words"]),
    ("stages:\n  spam_filter: {}\n", ["stages.spam_filter", "url_filter"]),
    ("dedup:\n  fuzzy: {bands: 0}\n", ["dedup.fuzzy", "bands"]),
    ("stages: [url_filter\n", ["not valid YAML", "line"]),
    ("recipes:\n  a: 1\n", ["unknown key 'recipes'", "stages"]),
    ("stages:\n  language: {min_score: 2}\n", ["stages.language", "min_score"]),
])
def test_bad_recipe_is_a_one_line_error_naming_file_and_key(tmp_path, capsys, text, expected):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(text)
    (tmp_path / "in.jsonl").write_text('{"text": "hello"}\n')
    assert main(["curate", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out"), "--recipe", str(recipe),
                 "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(recipe) in err
    for piece in expected:
        assert piece in err


def test_rerun_resumes_the_same_run_and_refuses_another_into_the_same_out(tmp_path, capsys):
    text = " ".join(["the cat and the dog sat with a hat that they have"] * 8)
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": text, "id": "a"}) + "\n")
    recipe = tmp_path / "mine.yaml"  # integer keys come back from run.json as strings: still the same recipe
    recipe.write_text("stages:\n  gopher_repetition: {max_top_ngram_chars: {2: 0.9, 3: 0.9, 4: 0.9}}\n")
    command = ["curate", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out"), "--workers", "1"]
    assert main([*command, "--recipe", str(recipe)]) == 0
    first = _outputs(tmp_path / "out")
    assert main([*command, "--recipe", str(recipe)]) == 0 and _outputs(tmp_path / "out") == first
    capsys.readouterr()
    assert main([*command, "--recipe", "fineweb"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds a run with other recipe" in err and "--out" in err


def test_recipes_override_and_switch_off(tmp_path):
    from llamaherd.curate.recipe import load_recipe

    default = load_recipe()
    assert list(default.stages) == ["url_filter", "extract", "language", "gopher_repetition", "gopher_quality",
                                    "line_corrections"]
    assert default.minhash().bands == 450 and default.minhash().rows == 20
    fineweb = load_recipe("fineweb")
    assert (fineweb.minhash().bands, fineweb.minhash().rows) == (14, 8) and fineweb.stages == default.stages
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: fineweb\nstages:\n  url_filter: false\n  language: {min_score: 0.5}\n"
                    "dedup:\n  substring: false\n")
    recipe = load_recipe(str(mine))
    assert "url_filter" not in recipe.stages and recipe.stages["language"] == {"min_score": 0.5}
    assert list(recipe.dedup) == ["exact", "fuzzy"] and recipe.minhash().bands == 14
    assert recipe.with_languages(["de", "fr"]).build_stages()[1].languages == {"de", "fr"}


def test_a_stage_that_raises_removes_that_document_only(tmp_path, monkeypatch):
    from llamaherd.curate import pipeline
    from llamaherd.curate.recipe import Recipe

    class Picky:
        name = "picky"

        def __call__(self, doc):
            if "boom" in doc.text:
                raise ValueError("cannot parse")
            return None

    (tmp_path / "a.jsonl").write_text('{"text": "fine", "id": "a"}\n{"text": "boom", "id": "b"}\n')
    shards, _ = plan_shards([str(tmp_path / "a.jsonl")])
    recipe = Recipe("test", {"picky": {}}, {}).to_dict()
    monkeypatch.setitem(pipeline._STAGE_CACHE, json.dumps(recipe["stages"], sort_keys=True), [Picky()])
    pipeline.filter_shard(pipeline.Task(str(tmp_path / "work"), recipe, shard=shards[0]))
    survivors, stats, done = pipeline._paths(str(tmp_path / "work"), shards[0])
    assert [json.loads(line)["id"] for line in survivors.read_text().splitlines()] == ["a"] and done.exists()
    tally = json.loads(stats.read_text())["stages"]["picky"]
    assert tally["reasons"] == {"picky:error": 1} and tally["examples"][0]["note"] == "ValueError: cannot parse"


def _probe(task) -> tuple[bool, str | None, bool]:
    """Runs in a pool worker: one shard's stages, then what the worker loaded."""
    from llamaherd.curate.pipeline import filter_shard

    filter_shard(task)
    return "torch" in sys.modules, os.environ.get("OMP_NUM_THREADS"), "numpy" in sys.modules


def test_workers_run_one_thread_each_and_never_import_torch(tmp_path):
    from llamaherd.curate.executors import LocalExecutor
    from llamaherd.curate.pipeline import Task
    from llamaherd.curate.recipe import load_recipe

    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one two three " * 30, "id": "a"}) + "\n")
    shards, _ = plan_shards([str(tmp_path / "a.jsonl")])
    task = Task(str(tmp_path / "work"), load_recipe().to_dict(), shard=shards[0])
    executor = LocalExecutor(2)
    try:
        results = [r for _, r in executor.map(_probe, [task, task])]
    finally:
        executor.close()
    assert results == [(False, "1", True)] * 2


def test_warc_reader_counts_bad_records_and_goes_on(tmp_path):
    page = "<html><head><title>t</title></head><body><p>café crème</p></body></html>"
    records = [
        ("http://a.example/latin", page.encode("latin-1"), "text/html; charset=ISO-8859-1", "200 OK"),
        ("http://a.example/undeclared", page.encode("utf-8"), "text/html", "200 OK"),
        ("http://a.example/bogus-label", page.encode("utf-8"), "text/html; charset=x-nonsense", "200 OK"),
        ("http://a.example/one-bad-byte", page.encode("utf-8") + b"\xff", "text/html; charset=utf-8", "200 OK"),
        ("http://a.example/binary", b"<html>" + bytes(range(128, 256)) * 20, "text/html", "200 OK"),  # no decoder
        ("http://a.example/empty", b"", "text/html", "200 OK"),
        ("http://a.example/redirect", b"", "text/html", "301 Moved Permanently"),
        ("http://a.example/data.json", b"{}", "application/json", "200 OK"),
        ("http://a.example/after-corrupt", page.encode("utf-8"), "text/html", "200 OK"),
        ("http://a.example/last", page.encode("utf-8"), "text/html", "200 OK"),
    ]
    members = _warc_bytes(records)
    bad_member = bytearray(_warc_bytes([("http://a.example/corrupt", b"<html>" + b"x" * 4000, "text/html",
                                          "200 OK")])[0])
    bad_member[40:60] = b"\xff" * 20
    members.insert(8, bytes(bad_member))
    members[-1] = members[-1][:-30]  # truncated last member
    path = tmp_path / "t.warc.gz"
    path.write_bytes(b"".join(members))
    bad: Counter[str] = Counter()
    docs = list(read_warc(str(path), "t.warc.gz", bad))
    assert [d.url for d in docs] == ["http://a.example/latin", "http://a.example/undeclared",
                                     "http://a.example/bogus-label", "http://a.example/one-bad-byte",
                                     "http://a.example/after-corrupt"]
    assert all("café crème" in d.html for d in docs)
    assert docs[3].html.endswith("</html>\ufffd")  # the declared charset wins, a bad byte is replaced (as browsers)
    assert bad == {"read:unknown_encoding": 1, "read:empty": 1, "read:http_status": 1, "read:not_html": 1,
                   "read:corrupt_gzip": 1, "read:truncated_gzip": 1}
    assert docs[0].id.startswith("<urn:uuid:") and docs[0].source == "t.warc.gz:0"
    assert list(d.id for d in read_warc(str(path), "t.warc.gz", Counter())) == [d.id for d in docs]  # stable


def test_html_and_jsonl_readers(tmp_path):
    (tmp_path / "site").mkdir()
    page = '<html><head><meta charset="windows-1251"><link rel="canonical" href="https://ru.example/p"></head>' \
           "<body>Привет</body></html>"
    (tmp_path / "site" / "a.html").write_bytes(page.encode("cp1251"))
    (tmp_path / "site" / "b.html.gz").write_bytes(gzip.compress(b"<html><body>plain</body></html>"))
    (tmp_path / "in.jsonl").write_text('{"text": "x", "id": 7}\n\n{"text": "y", "url": "u"}\n[1]\n')
    shards, skipped = plan_shards([str(tmp_path / "site"), str(tmp_path / "in.jsonl")], html_files_per_shard=1)
    assert [s.kind for s in shards] == ["html", "html", "jsonl"] and not skipped
    bad: Counter[str] = Counter()
    docs = [d for s in shards for d in read_shard(s, bad)]
    assert [(d.id, d.url) for d in docs] == [("site/a.html", "https://ru.example/p"), ("site/b.html.gz", None),
                                             ("7", None), (f"{tmp_path / 'in.jsonl'}:3", "u")]
    assert "Привет" in docs[0].html and bad == {"read:bad_json": 1}
