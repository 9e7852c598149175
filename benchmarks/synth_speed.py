"""Synthetic-data throughput: rows/s and generated tokens/s of the local teacher batched vs one request at a time,
and of the HTTP teacher against `herd serve` at concurrency 1 and 16, in one run on the same requests.

    .venv/bin/python benchmarks/synth_speed.py [--rows 32] [--max-tokens 96] [--teacher MODEL]

The requests are the explain recipe's (Orca system message + an instruction from
../shared/benchmarks/instructions/alpaca_en_demo.json), sampled with a fixed seed per row and a fixed length
(ignore_eos is not part of the teacher API, so lengths vary with the text; tokens/s is the fair figure).
Run it on a quiet machine: it prints `uptime` before and after. Target (issue 14): batched >= 4x one at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from llamaherd.load import load_model
from llamaherd.synth.explain import explain_items
from llamaherd.synth.sampling import Sampling
from llamaherd.synth.seeds import read_seeds
from llamaherd.synth.teacher_http import HTTPTeacher
from llamaherd.synth.teacher_local import LocalTeacher

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "benchmarks" / "instructions" / "alpaca_en_demo.json"


def requests_for(rows: int, max_tokens: int) -> list:
    items = explain_items(read_seeds(DATA), rows, Sampling(max_tokens=max_tokens, temperature=0.7, seed=3))
    return [next(item.steps())[0] for item in items]


def measure(name: str, teacher, requests, serial: bool = False) -> dict:
    start = time.perf_counter()
    replies = []
    if serial:
        for r in requests:
            replies += list(teacher.run([r]))
    else:
        replies = list(teacher.run(requests))
    wall = time.perf_counter() - start
    failed = sum(not r.ok for r in replies)
    tokens = sum(r.completion_tokens for r in replies if r.ok)
    result = {"setting": name, "rows": len(replies), "failed": failed, "wall_s": round(wall, 2),
              "rows_per_s": round(len(replies) / wall, 3), "tokens": tokens, "tokens_per_s": round(tokens / wall, 1)}
    print(f"{name:34s} {result['rows_per_s']:7.3f} rows/s {result['tokens_per_s']:8.1f} tok/s "
          f"({tokens} tokens in {wall:.1f} s, {failed} failed)", flush=True)
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--teacher", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--out", default="out/synth_speed.json")
    args = p.parse_args()
    print("uptime before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    requests = requests_for(args.rows, args.max_tokens)
    loaded = load_model(args.teacher)
    results = [measure("local, one request at a time", LocalTeacher(loaded, max_batch=1), requests, serial=True),
               measure("local, batched (16 rows)", LocalTeacher(loaded, max_batch=16), requests)]
    del loaded

    port = free_port()
    cmd = [sys.executable, "-m", "llamaherd.cli", "serve", *([args.teacher] if args.teacher else []),
           "--port", str(port), "--max-batch", "16", "--log-level", "warning"]
    server = subprocess.Popen(cmd, env={**os.environ})
    try:
        base = f"http://127.0.0.1:{port}/v1"
        deadline = time.time() + 300
        while True:
            try:
                HTTPTeacher(base, timeout=5, max_retries=0)
                break
            except Exception:
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("herd serve did not start") from None
                time.sleep(1)
        for concurrency in (1, 16):
            teacher = HTTPTeacher(base, concurrency=concurrency, timeout=600)
            results.append(measure(f"herd serve, concurrency {concurrency}", teacher, requests))
    finally:
        server.terminate()
        server.wait()
    ratio = results[1]["tokens_per_s"] / results[0]["tokens_per_s"]
    http_ratio = results[3]["tokens_per_s"] / results[2]["tokens_per_s"]
    print(f"local batched / one at a time: {ratio:.2f}x tokens/s (target >= 4x); "
          f"herd serve 16 / 1: {http_ratio:.2f}x")
    print("uptime after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results, "local_ratio": ratio, "http_ratio": http_ratio}, indent=2))


if __name__ == "__main__":
    main()
