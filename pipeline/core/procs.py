"""Processes by the ids they were started with, never by command-line text.

A process is named by (pid, start): its pid and its start time in clock ticks since boot
(/proc/PID/stat). A pid is reused after its process ends; the pair is not, and a signal goes
through a pidfd opened before the start time is checked, so it cannot reach a newer process.

`guard` ends an embedded Ray with its driver. Ray starts the GCS and raylet so that they die with
the driver (PR_SET_PDEATHSIG), but the agents the raylet starts (ray::DashboardAgent,
ray::RuntimeEnvAgent) then spend 8-60 s reporting the raylet's death to the dead GCS. The guard
(`python procs.py DRIVER_PID`, started by core/executor.py before ray.init) is told the ids of the
processes Ray started (a "pid start" line each on its stdin) and follows their descendants through
/proc parent links every half second; when its stdin closes (the driver exited, however) or the
driver is gone, it kills every one of them still running, and exits. Stdlib only, run as a script.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

Proc = tuple[int, int]          # (pid, start ticks)


def table() -> dict[int, tuple[int, int, int]]:
    """pid -> (parent pid, session id, start ticks) of this user's live processes (zombies left out)."""
    out, uid = {}, os.getuid()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if d.stat().st_uid != uid:
                continue
            line = (d / "stat").read_text()
        except OSError:
            continue
        f = line[line.rindex(")") + 2:].split()     # the name may hold spaces and ')': cut after the last
        if f[0] != "Z":
            out[int(d.name)] = (int(f[1]), int(f[3]), int(f[19]))
    return out


def start_of(pid: int) -> int | None:
    try:
        line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    f = line[line.rindex(")") + 2:].split()
    return None if f[0] == "Z" else int(f[19])


def alive(procs, tab: dict) -> set[Proc]:
    """Those of `procs` ((pid, start) pairs) still running: same pid, same start time."""
    return {(int(p), int(s)) for p, s in procs if p in tab and tab[p][2] == s}


def descendants(pids: set[int], tab: dict) -> set[Proc]:
    """These processes and every process below them, by parent links."""
    out = {p for p in pids if p in tab}
    grew = out
    while grew:
        grew = {p for p, (ppid, _, _) in tab.items() if ppid in grew and p not in out}
        out |= grew
    return {(p, tab[p][2]) for p in out}


def send_signal(proc: Proc, sig: int) -> bool:
    """Signal `proc` if it is still the process of that pid and start time; whether it was sent."""
    pid, start = proc
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except (AttributeError, OSError):    # no pidfd here: the check and the signal are not atomic
        fd = None
    try:
        if start_of(pid) != start:
            return False
        if fd is None:
            os.kill(pid, sig)
        else:
            signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        if fd is not None:
            os.close(fd)


def stop(procs: set[Proc], grace: float = 4, kill_wait: float = 5) -> set[Proc]:
    """SIGTERM, `grace` seconds (0: straight to SIGKILL), SIGKILL; returns those still running."""
    rounds = ((signal.SIGTERM, grace), (signal.SIGKILL, kill_wait)) if grace > 0 else ((signal.SIGKILL, kill_wait),)
    left = set(procs)
    for sig, wait in rounds:
        left = {p for p in left if send_signal(p, sig)}
        deadline = time.time() + wait
        while left and time.time() < deadline:
            time.sleep(0.1)
            left = alive(left, table())
    return left


def start_guard() -> subprocess.Popen:
    """The guard of this process's embedded Ray; tell it Ray's processes with `guard_add`, close its
    stdin after ray.shutdown. A session of its own: a Ctrl-C of the driver's terminal is not its."""
    return subprocess.Popen([sys.executable, "-I", "-S", __file__, str(os.getpid())], stdin=subprocess.PIPE,
                            start_new_session=True)


def guard_add(guard: subprocess.Popen, pids) -> None:
    lines = "".join(f"{pid} {start}\n" for pid in pids if (start := start_of(pid)) is not None)
    guard.stdin.write(lines.encode())
    guard.stdin.flush()


def guard(driver: int, interval: float = 0.5) -> None:
    """Follow the processes named on stdin (until they arrive: the driver's children started after
    this guard) and their descendants; kill them all when stdin closes or the driver is gone."""
    me, tab = os.getpid(), table()
    drv = {(driver, tab[driver][2])} if driver in tab else set()
    before = {p for p, (ppid, _, _) in tab.items() if ppid == driver}
    roots: set[Proc] = set()
    seen: set[Proc] = set()
    buf, fd = b"", sys.stdin.fileno()
    while True:
        ready, _, _ = select.select([fd], [], [], interval)
        data = os.read(fd, 4096) if ready else None
        if data:
            buf += data
            *lines, buf = buf.split(b"\n")
            roots |= {(int(a), int(b)) for a, b in (ln.split() for ln in lines if ln.strip())}
        tab = table()
        tops = {p for p, _ in alive(roots, tab)} if roots else \
            {p for p, (ppid, _, _) in tab.items() if ppid == driver and p not in before and p != me}
        seen |= descendants(tops, tab)
        if data == b"" or not alive(drv, tab):
            break
    seen.discard((me, tab.get(me, (0, 0, 0))[2]))
    stop(alive(seen, table()), grace=0)


if __name__ == "__main__":
    guard(int(sys.argv[1]))
