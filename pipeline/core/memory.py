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
    """The cgroup (v2, else v1) memory limit less its usage, where a limit is set."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:
            return None
        return max(int(limit) - usage, 0)
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
