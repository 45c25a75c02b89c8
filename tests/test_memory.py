"""The allocator setting the CLI and Ray workers start with (core/memory.py: KEEP_FREED): memory a
stage frees stays in its process and is reused, not zeroed again by the kernel page by page."""
import subprocess
import sys

import pytest

from dedup2b.core import memory

# a thread (as the local executor runs tasks) allocates, fills and frees 128 MB ten times; it
# prints the page faults of rounds 2-10 and the environment the process was started with
CHURN = """
import resource, threading
import numpy as np
from dedup2b.core.memory import relaunch
relaunch()
out = {}
def churn():
    np.ones(16 << 20)                       # round 1: the heap grows
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(9):
        np.ones(16 << 20)
    out["faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
t = threading.Thread(target=churn)
t.start(); t.join()
print(out["faults"])
print(open("/proc/self/environ", "rb").read().replace(b"\\0", b" ").decode(errors="replace"))
"""


def _churn(env: dict) -> tuple[int, str]:
    import os
    done = subprocess.run([sys.executable, "-c", CHURN], capture_output=True, text=True, timeout=120,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, **env})
    assert done.returncode == 0, done.stderr
    faults, environ = done.stdout.split("\n", 1)
    return int(faults), environ


@pytest.mark.skipif(not memory._glibc(), reason="the setting is glibc's")
def test_a_relaunched_process_reuses_the_memory_it_frees():
    kept, environ = _churn({})
    for key, value in {**memory.KEEP_FREED, **memory.ONE_ARENA}.items():
        assert f"{key}={value}" in environ          # in the environment glibc read as the process started
    plain, environ = _churn({"DEDUP2B_KEEP_FREED": "0"})
    assert "MALLOC_ARENA_MAX" not in environ
    # without it each 128 MB block is fresh pages (32,768 faults, 64 with transparent huge pages)
    assert kept * 8 < plain, (kept, plain)


@pytest.mark.skipif(not memory._glibc(), reason="the setting is glibc's")
def test_a_user_setting_of_the_allocator_is_kept():
    _, environ = _churn({"MALLOC_ARENA_MAX": "4"})
    assert "MALLOC_ARENA_MAX=4" in environ and "MALLOC_MMAP_MAX_=0" in environ


def test_memory_the_process_holds_freed_counts_as_available(monkeypatch):
    monkeypatch.setattr(memory, "_meminfo_available", lambda: 1 << 30)
    monkeypatch.setattr(memory, "_cgroup_left", lambda: 3 << 29)
    monkeypatch.setattr(memory, "heap_free", lambda: 1 << 28)
    assert memory.available() == (1 << 30) + (1 << 28)
    with pytest.raises(memory.MemoryShort, match="needs about 1.30 GB of memory, 1.25 GB available"):
        memory.need("a unit", int(1.3 * (1 << 30)))


@pytest.mark.skipif(not memory._glibc(), reason="the setting is glibc's")
def test_ray_workers_start_with_the_setting(ray_executor):
    from pathlib import Path
    for environ in ray_executor.map(Path.read_bytes, [Path("/proc/self/environ")] * 2):
        for key, value in memory.KEEP_FREED.items():
            assert f"{key}={value}".encode() in environ.split(b"\0")
