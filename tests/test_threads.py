"""Core sharing between llamaherd processes (llamaherd.threads): counting busy processes, the thread count each
runs, and the user's explicit settings winning. Expected values are worked out by hand from the rule
`max(1, cores // busy processes)`."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from llamaherd import threads
from llamaherd.threads import BUSY_WINDOW_S, CoreShare, count_busy


@pytest.fixture
def neighbour():
    """A live process that is not this one (its pid names a busy mark)."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p.pid
    p.kill()
    p.wait()


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def mark(directory, pid: int, age_s: float = 0.0) -> None:
    path = directory / str(pid)
    path.touch()
    t = time.time() - age_s
    os.utime(path, (t, t))


def check_now(share: CoreShare) -> None:
    share.next_check = 0.0  # skip the rate limit between checks
    share.check()


def test_count_busy_counts_fresh_marks_of_live_processes(tmp_path, neighbour):
    mark(tmp_path, os.getpid())
    mark(tmp_path, neighbour)
    (tmp_path / "notes.txt").touch()  # not a mark
    assert count_busy(tmp_path) == 2
    mark(tmp_path, neighbour, age_s=BUSY_WINDOW_S + 1)  # alive but idle
    assert count_busy(tmp_path) == 1


def test_count_busy_removes_marks_of_dead_processes(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    mark(tmp_path, p.pid)
    assert count_busy(tmp_path) == 0
    assert not (tmp_path / str(p.pid)).exists()
    assert count_busy(tmp_path / "missing") == 0


def test_threads_follow_the_busy_processes(tmp_path, neighbour, restore_threads, monkeypatch):
    for var in threads.OFF_VARIABLES + ("LLAMAHERD_SHARE_CORES",):
        monkeypatch.delenv(var, raising=False)
    torch.set_num_threads(4)
    share = CoreShare(tmp_path)
    try:
        check_now(share)
        assert (share.cores, torch.get_num_threads()) == (4, 4)  # alone: all cores
        assert (tmp_path / str(os.getpid())).exists()
        mark(tmp_path, neighbour)
        check_now(share)
        assert torch.get_num_threads() == 2  # 4 cores // 2 busy processes
        third = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            mark(tmp_path, third.pid)
            check_now(share)
            assert torch.get_num_threads() == 1  # 4 // 3
        finally:
            third.kill()
            third.wait()
        mark(tmp_path, neighbour, age_s=BUSY_WINDOW_S + 1)
        check_now(share)
        assert torch.get_num_threads() == 4  # the others went idle or died: all cores again
    finally:
        share.close()
    assert not (tmp_path / str(os.getpid())).exists()


def test_a_user_set_thread_count_wins(tmp_path, neighbour, restore_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    share = CoreShare(tmp_path)
    try:
        mark(tmp_path, neighbour)
        check_now(share)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(3)  # the user's call
        check_now(share)
        assert not share.adapting and torch.get_num_threads() == 3
        check_now(share)
        assert torch.get_num_threads() == 3
    finally:
        share.close()


@pytest.mark.parametrize("env, marked", [({"OMP_NUM_THREADS": "2"}, True), ({"MKL_NUM_THREADS": "2"}, True),
                                         ({"LLAMAHERD_SHARE_CORES": "0"}, False),
                                         ({"LLAMAHERD_SHARE_CORES": " Off"}, False)])
def test_explicit_environment_keeps_the_thread_count(tmp_path, neighbour, restore_threads, monkeypatch, env, marked):
    """An explicit thread count is kept, but still marked busy so that the others make room; the opt-out is total."""
    for var in threads.OFF_VARIABLES + ("LLAMAHERD_SHARE_CORES",):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    torch.set_num_threads(2)
    share = CoreShare(tmp_path)
    try:
        mark(tmp_path, neighbour)
        check_now(share)
        assert not share.adapting and torch.get_num_threads() == 2
        assert (tmp_path / str(os.getpid())).exists() == marked
    finally:
        share.close()


def test_hostile_directory_contents_are_ignored(tmp_path, neighbour, restore_threads, monkeypatch):
    """The directory is world-writable: names that are not pids are skipped, a removed directory is made again."""
    for var in threads.OFF_VARIABLES + ("LLAMAHERD_SHARE_CORES",):
        monkeypatch.delenv(var, raising=False)
    for name in ("99999999999999999999", "\u00b2", "0", "-1", "12a", str(2**22 + 1)):
        (tmp_path / name).touch()
    (tmp_path / str(neighbour)).mkdir()  # named like a live pid, but not a file: not a mark
    assert count_busy(tmp_path) == 0
    torch.set_num_threads(2)
    directory = tmp_path / "busy"
    share = CoreShare(directory)
    try:
        check_now(share)
        mark(directory, neighbour)
        check_now(share)
        assert torch.get_num_threads() == 1
        for f in directory.iterdir():
            f.unlink()
        directory.rmdir()  # removed under a running job: made again at the next check, no crash
        check_now(share)
        assert (directory / str(os.getpid())).exists() and torch.get_num_threads() == 2
    finally:
        share.close()


def test_heartbeat_marks_busy_only_while_computing(tmp_path, monkeypatch):
    monkeypatch.setattr(threads, "HEARTBEAT_S", 0.05)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.delenv("LLAMAHERD_SHARE_CORES", raising=False)
    share = CoreShare(tmp_path, cores=1)
    own = tmp_path / str(os.getpid())
    try:
        assert share.mark_busy()
        old = time.time() - 100
        os.utime(own, (old, old))
        time.sleep(0.3)  # idle: the mark stays old
        assert own.stat().st_mtime == pytest.approx(old, abs=1)
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:  # busy on the CPU: the heartbeat refreshes it
            sum(range(1000))
        time.sleep(0.1)
        assert own.stat().st_mtime > time.time() - 1
    finally:
        share.close()


def test_model_forward_shares_the_cores(tmp_path, request):
    """The hook sits in GPT.forward: a process computing beside a busy neighbour runs half the threads."""
    script = (
        "import torch\n"
        "from llamaherd.config import Config\n"
        "from llamaherd.model import GPT\n"
        "torch.set_num_threads(2)\n"
        "m = GPT(Config(vocab_size=32, n_layer=1, n_head=2, n_embd=16, intermediate_size=32))\n"
        "before = torch.get_num_threads()\n"
        "m(torch.zeros(1, 4, dtype=torch.long))\n"
        "print(before, torch.get_num_threads())\n"
    )
    busy = ("import os, pathlib, time\n"
            f"mark = pathlib.Path({str(tmp_path)!r}) / str(os.getpid())\n"
            "for _ in range(600):\n    mark.touch()\n    time.sleep(0.1)\n")
    refreshing = subprocess.Popen([sys.executable, "-c", busy])  # a neighbour that keeps its mark fresh
    request.addfinalizer(refreshing.kill)
    env = {k: v for k, v in os.environ.items() if k not in threads.OFF_VARIABLES + ("LLAMAHERD_SHARE_CORES",)}
    env["LLAMAHERD_BUSY_DIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["2", "1"]
    env["OMP_NUM_THREADS"] = "2"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["2", "2"]


def test_backward_follows_the_other_processes(tmp_path, neighbour, restore_threads, monkeypatch):
    """A neighbour that turns busy during a training step is seen in backward, not only at the next forward."""
    from llamaherd.config import Config
    from llamaherd.model import GPT

    for var in threads.OFF_VARIABLES + ("LLAMAHERD_SHARE_CORES",):
        monkeypatch.delenv(var, raising=False)
    torch.set_num_threads(2)
    share = CoreShare(tmp_path)
    monkeypatch.setattr(threads, "_share", share)
    try:
        model = GPT(Config(vocab_size=32, n_layer=2, n_head=2, n_embd=16, intermediate_size=32))
        loss = model(torch.zeros(1, 4, dtype=torch.long)).sum()
        assert torch.get_num_threads() == 2
        mark(tmp_path, neighbour)
        share.next_check = 0.0
        loss.backward()
        assert torch.get_num_threads() == 1
    finally:
        share.close()
