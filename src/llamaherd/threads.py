"""Share the CPU cores between llamaherd processes that run at the same time.

PyTorch runs each CPU op on an OpenMP team of one thread per core, and the team's threads busy-wait at a
barrier after every op (libgomp's default wait policy). Two such processes on the same cores preempt each
other's threads mid-op, and every barrier then waits for a thread that is not running: on a 2-core machine a
LoRA `herd finetune` fell from 178 to 49 tokens/s beside one `herd eval` (issue 11, point 8).

So each llamaherd process that is computing marks itself busy (a file named by its pid in one directory
per machine, refreshed every `HEARTBEAT_S` while the process uses CPU), and at each layer of a forward or
backward pass (at most every `CHECK_EVERY_S`) runs `cores // busy processes` intra-op threads (at least 1).
Checking per layer matters: a training step can take seconds, and a step run at the wrong thread count beside
another process is the very stall this avoids. With one thread a process never waits at a
barrier; alone, a process keeps torch's default thread count and loses nothing.

The user's choice wins: with `OMP_NUM_THREADS` or `MKL_NUM_THREADS` in the environment, or after a
`torch.set_num_threads` call (noticed at the next check), a process keeps its thread count but still marks
itself busy, so the others make room; `LLAMAHERD_SHARE_CORES=0` (or false/no/off) opts out altogether.
Names in the directory that are not plain pids are ignored, and a removed directory is made again.
`benchmarks/contention.py` measures the effect.
"""

from __future__ import annotations

import atexit
import os
import tempfile
import threading
import time
from pathlib import Path

import torch

CHECK_EVERY_S = 0.25  # how often `share_cores` looks at the other processes (it runs at every layer)
HEARTBEAT_S = 0.5  # how often a computing process refreshes its mark
BUSY_WINDOW_S = 3.0  # a mark refreshed within this long counts as a busy process
BUSY_CPU_SHARE = 0.2  # a process that used at least this share of one core since its last heartbeat is busy
OFF_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
OFF_VALUES = ("0", "false", "no", "off")  # LLAMAHERD_SHARE_CORES values that opt out
MAX_PID = 2**22  # Linux's largest pid_max


def default_directory() -> Path:
    """Where the marks live: `LLAMAHERD_BUSY_DIR`, or shared memory when the machine has it (no disk writes),
    else the temp dir. Processes share the cores with those that use the same directory."""
    if os.environ.get("LLAMAHERD_BUSY_DIR"):
        return Path(os.environ["LLAMAHERD_BUSY_DIR"])
    shm = Path("/dev/shm")
    return (shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())) / "llamaherd-busy"


def count_busy(directory: Path) -> int:
    """Processes whose mark in `directory` was refreshed within `BUSY_WINDOW_S` and that are still alive."""
    now, busy = time.time(), 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        # The directory is everyone's: a name that is not a plain pid is somebody else's file.
        pid = int(entry.name) if entry.name.isascii() and entry.name.isdigit() else 0
        if not (0 < pid <= MAX_PID and entry.is_file(follow_symlinks=False)):
            continue
        try:
            fresh = entry.stat(follow_symlinks=False).st_mtime >= now - BUSY_WINDOW_S
            os.kill(pid, 0)
        except ProcessLookupError:
            _remove(Path(entry.path))  # a process that died without cleaning up
            continue
        except PermissionError:  # alive, another user's
            pass
        except OSError:
            continue
        busy += fresh
    return busy


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


class CoreShare:
    """One process's side of the sharing: its busy mark, its heartbeat thread and its thread count."""

    def __init__(self, directory: Path | None = None, cores: int | None = None) -> None:
        self.directory = directory or default_directory()
        self.cores = cores or torch.get_num_threads()
        # marking: this process tells the others when it computes; adapting: it also follows them.
        self.marking = os.environ.get("LLAMAHERD_SHARE_CORES", "1").strip().lower() not in OFF_VALUES
        self.adapting = self.marking and not any(os.environ.get(v) for v in OFF_VARIABLES)
        self.pid = os.getpid()
        self.mark = self.directory / str(self.pid)
        self.threads_set: int | None = None
        self.next_check = 0.0
        self.heartbeat: threading.Thread | None = None
        self.stop = threading.Event()

    def mark_busy(self) -> bool:
        """Refresh the mark (making the directory again if it was removed); start the heartbeat the first time.
        False when the directory cannot be written: the process then computes as if alone."""
        try:
            os.utime(self.mark)
        except OSError:
            try:
                if not self.directory.is_dir():
                    self.directory.mkdir(parents=True, exist_ok=True)
                    self.directory.chmod(0o1777)  # every user's processes share the cores (sticky: own marks only)
                self.mark.touch()
            except OSError:
                return False
        if self.heartbeat is None:
            self.heartbeat = threading.Thread(target=self._beat, name="llamaherd-heartbeat", daemon=True)
            self.heartbeat.start()
            atexit.register(self.close)
        return True

    def _beat(self) -> None:
        """Refresh the mark while the process keeps the CPU busy (computing, or in OpenMP's busy-wait)."""
        cpu, wall = time.process_time(), time.monotonic()
        while not self.stop.wait(HEARTBEAT_S):
            cpu_now, wall_now = time.process_time(), time.monotonic()
            if cpu_now - cpu >= BUSY_CPU_SHARE * (wall_now - wall):
                try:
                    os.utime(self.mark)
                except OSError:
                    pass
            cpu, wall = cpu_now, wall_now

    def check(self) -> None:
        """Set torch's thread count for the busy processes now; a no-op between checks (see `share_cores`)."""
        now = time.monotonic()
        if now < self.next_check or not self.marking:
            return
        self.next_check = now + CHECK_EVERY_S
        if not self.mark_busy() or not self.adapting:  # about to compute: busy now, before the heartbeat notices
            return
        current = torch.get_num_threads()
        if self.threads_set is not None and current != self.threads_set:
            self.adapting = False  # the user called torch.set_num_threads: theirs wins
            return
        wanted = max(1, self.cores // max(1, count_busy(self.directory)))
        if wanted != current:
            torch.set_num_threads(wanted)
        self.threads_set = wanted

    def close(self) -> None:
        self.stop.set()
        _remove(self.mark)


_share: CoreShare | None = None


@torch.compiler.disable
def share_cores(x: torch.Tensor | None = None) -> None:
    """Before compute: run `cores // busy llamaherd processes` threads (see the module docstring).

    x: a tensor that backward will pass through (a layer's input); the check then runs there too, so a long
    backward pass follows the other processes as well. Must run on the thread that launches the ops (OpenMP's
    thread count is per calling thread; autograd runs CPU backward on the thread that called it).
    """
    global _share
    if _share is None or _share.pid != os.getpid():  # first call, or a forked child
        _share = CoreShare()
    _share.check()
    if x is not None and x.requires_grad and _share.adapting:
        x.register_hook(_check_in_backward)


def _check_in_backward(grad: torch.Tensor) -> None:
    if _share is not None:
        _share.check()
