"""CUDA graphs of the engine's decode step: on a GPU, a step is one graph replay instead of hundreds of launches.

A decode step of a small model on a GPU is bound by kernel launches, not by memory: SmolLM2-135M launches some
15 kernels per layer x 30 layers, each a few microseconds of Python and driver work, for weights that an H200
reads in about 60 microseconds. A captured graph replays all of them with one launch (the technique of vLLM's
and TensorRT-LLM's decode; PyTorch's `torch.cuda.CUDAGraph`).

A graph has fixed shapes and fixed addresses, so one is captured per (rows, key bucket): the step's token ids,
cache rows and positions are copied into static tensors before each replay. Rows are padded to a power of two with
rows that write into a scratch cache row (the engine allocates one more row than it hands out), and attention reads
the first `bucket` key positions of each row (the next power of two >= the longest position + 1, at least 64)
while the mask (`CacheRows.mask`, built from the positions inside the graph) hides each row's keys past its own
position: a server with 16 rows and 704 positions needs at most 5 x 5 graphs, whatever the mix of requests (twice
that: when the padded rows are rows 0, 1, ..., a full batch say, attention reads them as a view instead of
gathering their keys and values, a copy of 9% of Llama-2-7B's weight bytes per step at 16 rows).
Graphs share one memory pool (only one replays at a time) and at most `max_graphs` are kept.

The first step of a key runs the step eagerly (the warm-up CUDA asks for before a capture), captures it, then
replays it: writing a step's keys/values twice stores the same values, so nothing is lost. Models whose step
needs the host mid-pass (dynamic NTK RoPE reads the longest position) run eagerly; so does everything when a
capture fails, after a one-line warning.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict

import torch

from llamaherd.model import GPT, CacheRows, SlotCache

MIN_BUCKET = 64  # key positions a graph reads at least


def capturable(model: GPT) -> bool:
    """Whether the model's decode step can be captured: it is on a CUDA device, and its RoPE is not dynamic NTK
    (which reads the longest position on the host at every step)."""
    return model.model.embed_tokens.weight.device.type == "cuda" and not model.rope.dynamic


class _Graph:
    """One captured decode step: its static inputs (ids, slots, positions as rows of one tensor) and logits."""

    def __init__(self, inputs: torch.Tensor, logits: torch.Tensor, graph: torch.cuda.CUDAGraph | None,
                 run) -> None:
        self.inputs, self.logits, self.graph, self.run = inputs, logits, graph, run


class GraphedDecode:
    """The engine's decode step as CUDA graph replays; see the module docstring.

    capture=False keeps the same static inputs, buckets and views but runs the step eagerly each time (a CPU
    test of everything except the capture itself).
    """

    def __init__(self, model: GPT, cache: SlotCache, scratch: int, max_graphs: int = 128, capture: bool = True) -> None:
        """scratch: a cache row that no sequence holds, written by the padding rows."""
        self.model, self.cache, self.scratch = model, cache, scratch
        self.max_graphs, self.capture = max_graphs, capture
        self.graphs: OrderedDict[tuple[int, int, bool], _Graph] = OrderedDict()
        # Streams and capture on the cache's GPU, whatever the calling thread's current device (a server's engine
        # thread starts on cuda:0 even when the model is on cuda:1).
        self.on_device = torch.cuda.device(cache.k.device) if capture else contextlib.nullcontext()
        with self.on_device:
            self.pool = torch.cuda.graph_pool_handle() if capture else None
            self.stream = torch.cuda.Stream() if capture else None
        self.failed = False  # a capture raised: every later step runs eagerly

    def bucket(self, end: int) -> int:
        """Key positions read for a step whose longest position is end - 1."""
        return min(self.cache.max_len, max(MIN_BUCKET, 1 << (end - 1).bit_length()))

    def __call__(self, ids: list[int], slots: list[int], positions: list[int]) -> torch.Tensor | None:
        """Logits (B, V) of one decode step: token ids[b] at positions[b] of cache row slots[b]; valid until the
        next call. None when graphs are off (a capture failed): the caller runs the step eagerly."""
        if self.failed:
            return None
        B = len(ids)
        pad = (1 << (B - 1).bit_length()) - B
        slots = slots + [self.scratch] * pad
        key = (B + pad, self.bucket(max(positions) + 1), slots == list(range(B + pad)))
        step = torch.tensor([ids + [0] * pad, slots, positions + [0] * pad], dtype=torch.long)
        with self.on_device:
            graph = self.graphs.get(key)
            if graph is None:
                logits = self._capture(key, step)
            else:
                self.graphs.move_to_end(key)
                graph.inputs.copy_(step)
                if graph.graph is None:
                    logits = graph.run()
                else:
                    graph.graph.replay()
                    logits = graph.logits
        return None if logits is None else logits[:B]

    def _capture(self, key: tuple[int, int, bool], step: torch.Tensor) -> torch.Tensor | None:
        n_rows, bucket, view = key
        inputs = step.to(self.cache.k.device)
        span = slice(0, n_rows) if view else None
        rows = CacheRows(self.cache, inputs[1], inputs[2][:, None], bucket, span, None, False)

        def run() -> torch.Tensor:
            return self.model(inputs[0][:, None], cache=rows)[:, 0]

        if not self.capture:
            logits = run()
            self._keep(key, _Graph(inputs, logits, None, run))
            return logits
        try:
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                run()  # warm-up: this very step, computed eagerly
            torch.cuda.current_stream().wait_stream(self.stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                logits = run()
            graph.replay()
        # Any failure (an out-of-memory during capture too) turns graphs off for good: `failed` keeps later steps
        # away from a half-closed capture, and decoding goes on eagerly.
        except Exception as error:  # noqa: BLE001
            self.failed = True
            self.graphs.clear()
            warnings.warn(f"CUDA graphs off, decoding eagerly: capturing the decode step failed ({error})",
                          stacklevel=2)
            return None
        self._keep(key, _Graph(inputs, logits, graph, run))
        return logits

    def _keep(self, key, graph: _Graph) -> None:
        self.graphs[key] = graph
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
