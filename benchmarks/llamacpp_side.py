"""The llama.cpp side of the benchmarks: where benchmarks/setup_llamacpp.sh put things, and the timing worker.

Imported by generate.py and serve_load.py (project venv; this module needs neither torch nor llama_cpp to
import). Run as a script by benchmarks/.venv-llamacpp/bin/python, it times llama.cpp's decode and prefill
through llama-cpp-python (`worker`): reads {"model", "threads", "new_tokens", "short", "long"} as one JSON line
on stdin, then one command per line ("decode" or "prefill"), and answers each with its seconds on stdout.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV_PYTHON = HERE / ".venv-llamacpp" / "bin" / "python"
SERVER = HERE / ".llamacpp" / "llama-server"
SETUP_HINT = "run benchmarks/setup_llamacpp.sh"
# llamaherd precision -> the llama.cpp file type it is compared with (issue 12, part 3).
FTYPES = {"fp32": "F32", "bf16": "F16", "int8": "Q8_0"}


def gguf_path(ftype: str, embedded: Path) -> Path:
    """The embedded model re-saved by llama.cpp at `ftype` (F32, F16 or Q8_0) by setup_llamacpp.sh."""
    return HERE / ".llamacpp" / embedded.name.replace(".Q4_1.gguf", f".{ftype}.gguf")


def missing(*paths: Path) -> str | None:
    """SETUP_HINT when any of `paths` is absent (the set-up has not run), else None."""
    return None if all(p.exists() for p in paths) else SETUP_HINT


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls of fn, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def worker(spec: dict, commands, out) -> None:
    """Time llama.cpp's decode or prefill once per command line ("decode" / "prefill") read from `commands`,
    writing the seconds of each as one line to `out`, after loading the model once ("ready" when loaded).

    Decode: the short prompt evaluated, then new_tokens greedy tokens (argmax of the last logits, EOS ignored),
    each fed back one at a time; generate.py turns seconds into new_tokens / seconds. Prefill: the long prompt in
    one eval (llama.cpp's default batch of 512 tokens per ubatch). The KV cache is cleared before each call.
    Flash attention on: what llama.cpp's default (auto) picks on CPU. The process stays up between commands so
    that generate.py can alternate it with the other peers call by call (the same minutes for all of them).
    """
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(
        spec["model"], n_ctx=len(spec["long"]) + spec["new_tokens"] + len(spec["short"]), n_threads=spec["threads"],
        n_threads_batch=spec["threads"], flash_attn=True, verbose=False,
    )
    n_vocab = llm.n_vocab()

    def last_argmax() -> int:
        return int(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,)).argmax())

    def decode() -> None:
        llm.reset()
        llm.eval(spec["short"])
        token = last_argmax()
        for _ in range(spec["new_tokens"] - 1):
            llm.eval([token])
            token = last_argmax()

    def prefill() -> None:
        llm.reset()
        llm.eval(spec["long"])

    phases = {"decode": decode, "prefill": prefill}
    print("ready", file=out, flush=True)
    for line in commands:
        fn = phases[line.strip()]
        start = time.perf_counter()
        fn()
        print(time.perf_counter() - start, file=out, flush=True)


if __name__ == "__main__":
    worker(json.loads(sys.stdin.readline()), sys.stdin, sys.stdout)
