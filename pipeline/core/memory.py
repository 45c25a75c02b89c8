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
    """Bytes this process can still allocate without the machine running short (None: unknown)."""
    got = [v for v in (_meminfo_available(), _cgroup_left()) if v is not None]
    return min(got) if got else None


def need(what: str, nbytes: int) -> None:
    """Raise MemoryShort naming `what` when `nbytes` is more than is available now."""
    left = available()
    if left is not None and nbytes > left:
        raise MemoryShort(f"{what}: needs about {nbytes / GB:.2f} GB of memory, {left / GB:.2f} GB available; "
                          "nothing of it was written. Free memory (fewer tasks per machine: ray.num_cpus) "
                          "or use a larger machine, then rerun the same command: it resumes from the "
                          "units already done")
