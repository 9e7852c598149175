"""The `herd serve` subcommand: load a model, build the app, run it under uvicorn."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading

from llamaherd.config import DEFAULT_MAX_LEN
from llamaherd.errors import InputError
from llamaherd.terminal import printable

API_KEY_ENV = "LLAMAHERD_API_KEY"


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `herd serve` on the `herd` parser's subcommands."""
    from llamaherd.cli import _add_model_options

    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server (chat, completions, logprobs) on 127.0.0.1",
        description="Serve MODEL over OpenAI's HTTP API (/v1/models, /v1/chat/completions, /v1/completions, "
                    "/health, /metrics) with continuous batching. See docs/serving.md.")
    _add_model_options(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=8000, help="default: 8000")
    p.add_argument("--max-batch", type=int, default=4, help="sequences decoded together, one KV-cache row each "
                                                            "(default: 4)")
    p.add_argument("--max-len", type=int, default=None,
                   help=f"positions per KV-cache row: prompt + completion (default: the model's context, at most "
                        f"{DEFAULT_MAX_LEN}); the cache of max-batch x max-len is allocated at start")
    p.add_argument("--max-queue", type=int, default=64,
                   help="sequences (prompts x n) that may wait for a row beyond the running ones; more get 429 "
                        "(default: 64)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, which keeps the key out of "
                        "the process list)")
    p.add_argument("--chat-format", default=None, help="built-in format name (overrides the model's template)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1, ... (default: cuda when available); on CUDA each decode step is a "
                        "captured CUDA graph")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run_serve)
    return p


def _device(name: str | None) -> str:
    """--device checked before the model loads: cuda when available and none is named."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not (torch.cuda.is_available()
                                      and (device.index or 0) < torch.cuda.device_count()):
        raise InputError(f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} found); "
                         "use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {name}: herd serve runs on cpu or cuda")
    return name


def _check_port_free(host: str, port: int) -> int:
    """The port to serve on: `port`, or for 0 one the system picks now (so the banner names the real address);
    InputError naming the address when nothing can listen on host:port (in use, or not this machine's)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as e:
            raise InputError(f"cannot listen on {host}:{port} ({e.strerror or e}); pass another --port, or --host "
                             "an address of this machine") from None
        return probe.getsockname()[1]


def run_serve(args: argparse.Namespace) -> None:
    """`herd serve`: check the limits, load the model, print the KV-cache size, serve until interrupted."""
    import uvicorn

    from llamaherd.cli import _load
    from llamaherd.serve.app import ServeConfig, create_app

    for name in ("max_batch", "max_queue", "port"):
        if getattr(args, name) < (1 if name == "max_batch" else 0):
            raise InputError(f"--{name.replace('_', '-')} must be >= {1 if name == 'max_batch' else 0}, "
                             f"got {getattr(args, name)}")
    if args.port > 65535:
        raise InputError(f"--port must be between 0 and 65535, got {args.port}")
    port = _check_port_free(args.host, args.port)  # before the model loads: a busy port is a one-line error
    loaded = _load(args, device=_device(args.device))
    block = loaded.config.block_size
    max_len = args.max_len or min(block, DEFAULT_MAX_LEN)
    if not 2 <= max_len <= block:
        raise InputError(f"--max-len must be between 2 and the model's context of {block} tokens, got {max_len}")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    config = ServeConfig(max_batch=args.max_batch, max_len=max_len, max_queue=args.max_queue, api_key=api_key,
                         chat_format=args.chat_format)
    app = create_app(loaded, config)
    server = app.state.server
    cache = server.engine.cache
    size = 2 * cache.k.numel() * cache.k.element_size()
    scratch = " + 1 scratch row (CUDA graphs)" if cache.k.shape[1] > args.max_batch else ""
    print(printable(f"serving {server.model_id} ({loaded.source.path}) on http://{args.host}:{port}/v1"),
          file=sys.stderr)
    print(f"KV cache: {args.max_batch} rows{scratch} x {max_len} positions, {size / 2**20:.1f} MiB ({cache.k.dtype}); "
          f"queue up to {args.max_queue} sequences (prompts x n); API key {'required' if api_key else 'not required'}",
          file=sys.stderr)
    _serve(app, server.runner, uvicorn.Config(app, host=args.host, port=port, log_level=args.log_level))


def _serve(app, runner, config) -> None:
    """uvicorn on a second thread, the engine loop on this one (the thread that loaded the model: see
    `EngineRunner`), until the HTTP server ends (its lifespan stops the loop), Ctrl-C or SIGTERM."""
    import uvicorn

    web = uvicorn.Server(config)
    if threading.current_thread() is not threading.main_thread():  # called from a thread (signals are the main
        web.run()  # thread's): uvicorn here, the engine on its own thread, started and stopped by the lifespan
        return
    runner.use_calling_thread()

    def http() -> None:
        try:
            web.run()
        finally:
            runner.stop()  # also when uvicorn could not start: the loop below must end with it

    def handle_exit(signum, _frame) -> None:  # as uvicorn's own handlers, which it installs on the main thread only
        if web.should_exit and signum == signal.SIGINT:
            web.force_exit = True  # a second Ctrl-C: do not wait for open streams
        web.should_exit = True  # the loop below keeps running, so requests in flight finish

    previous = {sig: signal.signal(sig, handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=http, name="llamaherd-http", daemon=True)
    thread.start()
    try:
        runner.run()  # until the lifespan's shutdown (or a failed start) stops it
    finally:
        web.should_exit = True
        thread.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not web.started:
        raise InputError(f"the HTTP server could not start on {config.host}:{config.port} (uvicorn's log says why; "
                         "--log-level info shows it)")
