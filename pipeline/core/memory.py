"""The memory guard: a unit of work that would need more memory than the machine has left stops
with an error naming the unit and the memory it needed, before it allocates, rather than being
killed for memory part way (by the kernel, or by Ray's memory monitor, again at every retry).

    need("search: join cells 000128-000192", rows * per_row + fixed)   # raises MemoryShort

What is left: the kernel's MemAvailable, or the cgroup's limit less its usage where that is lower
(a container, a Ray worker in a memory-limited pod). The estimates are the units' own: the arrays
they are about to hold (their rows times the bytes a row costs, plus their fixed buffers). A rerun
after memory is freed (or on a larger machine) resumes from the units already done.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys
from pathlib import Path

GB = 1 << 30
CGROUP = Path("/sys/fs/cgroup")


class MemoryShort(RuntimeError):
    """A unit would need more memory than is available; nothing of it was written."""


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_left() -> int | None:
    """The cgroup's memory limit less what it holds that cannot be reclaimed (its usage counts the
    page cache of the files it read: the vectors a search maps, which the kernel gives back), where
    a limit is set (cgroup v2, else v1)."""
    for limit_file, usage_file, stat_file, cache_key in (
            ("memory.max", "memory.current", "memory.stat", "file"),
            ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat", "total_cache")):
        root = CGROUP
        try:
            limit = (root / limit_file).read_text().strip()
            usage = int((root / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:
            return None
        cache = 0
        try:
            for line in (root / stat_file).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == cache_key:
                    cache = int(value)
        except (OSError, ValueError):
            pass
        return max(int(limit) - max(usage - cache, 0), 0)
    return None


def available() -> int | None:
    """Bytes this process can still allocate without the machine running short (None: unknown):
    what the machine (or cgroup) has left, plus what this process's allocator holds freed
    (KEEP_FREED: the kernel counts it as used, this process reuses it)."""
    got = [v for v in (_meminfo_available(), _cgroup_left()) if v is not None]
    return min(got) + heap_free() if got else None


# The allocator. glibc gives a freed block of 32 MB or more back to the kernel (and, in a thread
# other than the main one, any block larger than its 64 MB arena), and the next such block is
# fresh pages the kernel zeroes on first touch; on a virtual machine whose host takes freed memory
# back, each first touch is a fault in the host as well. A stage that reads and converts rows block
# after block, on the local executor's threads, then spends much of its time zeroing pages: the
# search at 1 M rows spent 46 % of its CPU time in the kernel's clear_page, 47 % with blocks kept
# out of mmap but per-thread arenas, 18 % with all of these (bench/results/memory_touch.md).
# With them, freed memory stays in the process's heap and is reused: its resident memory is its
# peak (a free top above KEEP_TRIM bytes still goes back), and `available` counts what it holds.
KEEP_TRIM = 2 << 30
KEEP_FREED = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(KEEP_TRIM)}
ONE_ARENA = {"MALLOC_ARENA_MAX": "1"}     # threads share the main heap (the local executor's tasks)


def _glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def relaunch() -> None:
    """Start this process again (exec: same pid, same arguments) with KEEP_FREED and ONE_ARENA in
    its environment where they are not there yet: glibc reads them only as a process starts. A
    variable the user set keeps its value; DEDUP2B_KEEP_FREED=0 (or a libc that is not glibc)
    leaves the process as it is. The CLI calls it first."""
    want = {**KEEP_FREED, **ONE_ARENA}
    if os.environ.get("DEDUP2B_KEEP_FREED", "1") == "0" or not _glibc() or all(k in os.environ for k in want):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**want, **os.environ})


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def heap_free() -> int:
    """Bytes this process's allocator holds freed (glibc's mallinfo2 fordblks; 0 where unknown)."""
    if not _glibc():
        return 0
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):        # glibc before 2.33
        return 0
    fn.restype = _Mallinfo2
    return int(fn().fordblks)


def need(what: str, nbytes: int) -> None:
    """Raise MemoryShort naming `what` when `nbytes` is more than is available now."""
    left = available()
    if left is not None and nbytes > left:
        raise MemoryShort(f"{what}: needs about {nbytes / GB:.2f} GB of memory, {left / GB:.2f} GB available; "
                          "nothing of it was written. Free memory (fewer tasks per machine: ray.num_cpus) "
                          "or use a larger machine, then rerun the same command: it resumes from the "
                          "units already done")
