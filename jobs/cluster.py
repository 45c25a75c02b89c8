"""A Ray cluster on this machine: `make cluster-up / cluster-node / cluster-status / cluster-down`.

    python -m jobs.cluster up       [--temp-dir D] [--port 6379] [--dashboard-port 8265] [--num-cpus N]
    python -m jobs.cluster add-node [--temp-dir D] --name node_b [--num-cpus N]
    python -m jobs.cluster status   [--temp-dir D]
    python -m jobs.cluster down     [--temp-dir D]

The head's dashboard and job server listen on 127.0.0.1 only; the object store is capped. A second
raylet joins the head as another node with its own resource label (`{"node_b": 1}`), so shard tasks
are scheduled on two nodes of one machine. `down` stops only this cluster's processes, never another
Ray on the machine, which `ray stop` would: the processes each `ray start` left running, recorded by
pid and start time when it returned, every process below them and the rest of their sessions
(cluster_processes). It never picks a process by its command line: a `tail -f` of a log, an editor
or `make cluster-down RAY_TMP=DIR` itself naming the temp dir are not the cluster's.
The state (ports, sessions, processes) lives in `<temp dir>/dedup2b-cluster.json`.

The temp dir holds the cluster's token and the state `down` acts on, so it must be this user's
alone: it is created 0700, and one owned by another user, writable by others, or a link is refused.
Ray's own temp dir is `<temp dir>/ray` (Ray makes it world-writable; nobody else can reach it).
The dashboard and job server listen on 127.0.0.1; Ray 2.60's `ray start` turns a node address of
127.0.0.1 into the machine's outward address for the GCS, raylets and workers of a cluster that
can take more nodes (its single-node switch refuses a second raylet), guarded by the token.
The token is created anew, exclusively, 0600; the state file is written 0600 and refused when it
is not this user's. `down` signals only processes of this user, through pidfds checked against
the recorded start times: a pid reused since is never signalled.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from dedup2b.core import procs

STATE = "dedup2b-cluster.json"
DEFAULT_TEMP = "/tmp/dedup2b-ray"
ENV = {"RAY_USAGE_STATS_ENABLED": "0", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
       "NO_ALBUMENTATIONS_UPDATE": "1"}


def ray_cli() -> str:
    """The `ray` of this Python, so the cluster's workers run this environment."""
    return str(Path(sys.executable).parent / "ray")


def ray_dir(temp_dir) -> Path:
    """Ray's temp dir (sessions, logs, unix sockets) inside the private one."""
    return Path(temp_dir) / "ray"


def _state_path(temp_dir) -> Path:
    return Path(temp_dir) / STATE


class UnsafeTempDir(RuntimeError):
    """The cluster's temp dir (or a file in it) could have been written by another user."""


def _check_private(path: Path, kind: str) -> os.stat_result:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeTempDir(f"{path}: the cluster's {kind} is a symbolic link; remove it or choose another --temp-dir")
    if st.st_uid != os.getuid():
        raise UnsafeTempDir(f"{path}: the cluster's {kind} belongs to uid {st.st_uid}, not to you (uid "
                            f"{os.getuid()}); choose another --temp-dir")
    if st.st_mode & 0o022:
        raise UnsafeTempDir(f"{path}: the cluster's {kind} is writable by other users (mode "
                            f"{stat.S_IMODE(st.st_mode):04o}); remove it (after `make cluster-down` with a safe "
                            "copy) or choose another --temp-dir")
    return st


def private_dir(temp_dir) -> Path:
    """The temp dir, created 0700 by this user, or refused (see the module's docstring)."""
    path = Path(temp_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    if not stat.S_ISDIR(_check_private(path, "temp dir").st_mode):
        raise UnsafeTempDir(f"{path}: not a directory; choose another --temp-dir")
    os.chmod(path, 0o700)       # group/others may not even list it
    return path


def read_state(temp_dir) -> dict | None:
    p = _state_path(temp_dir)
    if not p.exists():
        return None
    _check_private(Path(temp_dir), "temp dir")
    _check_private(p, "state file")
    return json.loads(p.read_text())


def _write_state(temp_dir, state: dict) -> None:
    _write_private(_state_path(temp_dir), json.dumps(state, indent=1))


def _write_private(path: Path, text: str) -> None:
    """`text` into `path`, through a new file only this user can read (O_EXCL: never a file or link
    someone else made), moved into place."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _node_ports(port: int, k: int) -> list[str]:
    """Fixed ports of node k (0 = head), derived from the head's port: nothing on Ray's defaults
    except what the caller chose, so this cluster never collides with another one."""
    return [f"--dashboard-agent-listen-port={port + 10 + k}",
            f"--min-worker-port={port + 100 + 100 * k}", f"--max-worker-port={port + 199 + 100 * k}"]


def cluster_env(temp_dir) -> dict:
    """Environment of the cluster's processes and of every client: token auth with the cluster's own
    token (`<temp dir>/auth_token`, written by `up`), and this environment's bin first on PATH."""
    env = {**os.environ, **ENV, "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(Path(temp_dir).resolve() / "auth_token"),
           # a job's `python` is this environment's python
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    env.pop("RAY_ADDRESS", None)
    return env


def _write_token(temp_dir) -> None:
    """A new token for a new cluster, never one found in the folder."""
    _write_private(Path(temp_dir) / "auth_token", secrets.token_hex(32))


def _ray_start(args: list[str], timeout: float, env: dict) -> tuple[int, list[list[int]]]:
    """`ray start` in a session of its own; returns the session id (= the pid of `ray start`) and
    [pid, start] of the processes it left running (the ids `down` stops them by)."""
    proc = subprocess.Popen([ray_cli(), "start", *args, "--disable-usage-stats"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        out, proc.returncode = f"ray start did not finish within {timeout:.0f}s", -1
    started = session_processes(proc.pid)
    if proc.returncode != 0:
        procs.stop(procs.descendants({p for p, _ in started}, procs.table()))
        raise RuntimeError(f"ray start failed (exit {proc.returncode}):\n{out[-3000:]}")
    return proc.pid, started


def wait_http(url: str, timeout: float) -> None:
    """Until the server answers; 401 counts (Ray's token auth, which the `ray` CLI handles)."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                return
        except OSError:
            pass
        if time.time() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")
        time.sleep(0.5)


def wait_port(port: int, timeout: float) -> None:
    """Until something listens on 127.0.0.1:port (a node's dashboard agent: the job server sends
    a submitted job to one, and answers "No available agent" while none has started)."""
    import socket
    deadline = time.time() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                return
        except OSError:
            if time.time() > deadline:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")
            time.sleep(0.5)


def up(temp_dir=DEFAULT_TEMP, port: int = 6379, dashboard_port: int = 8265, num_cpus: int = 0,
       object_store_mb: int = 1024, resources: dict | None = None, timeout: float = 120) -> dict:
    """Start a head node (or reuse the one this temp dir already runs); returns the state."""
    temp_dir = str(Path(temp_dir).resolve())
    private_dir(temp_dir)
    state = read_state(temp_dir)
    if state and cluster_processes(state):
        return state
    _write_token(temp_dir)
    args = ["--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--ray-client-server-port={port + 1}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
            f"--num-cpus={num_cpus or os.cpu_count()}", f"--object-store-memory={object_store_mb * 1024 ** 2}",
            f"--temp-dir={ray_dir(temp_dir)}", *_node_ports(port, 0)]
    if resources:
        args.append("--resources=" + json.dumps(resources))
    state = {"temp_dir": temp_dir, "port": port, "dashboard": f"http://127.0.0.1:{dashboard_port}",
             "sessions": [], "processes": [], "nodes": ["head"]}
    _add_session(state, _ray_start(args, timeout, cluster_env(temp_dir)))
    _write_state(temp_dir, state)
    try:
        wait_http(state["dashboard"] + "/api/version", timeout)
        wait_port(port + 10, timeout)   # the head's dashboard agent (see _node_ports)
    except RuntimeError:
        down(temp_dir)
        raise
    return state


def add_node(temp_dir=DEFAULT_TEMP, name: str = "node_b", num_cpus: int = 1, object_store_mb: int = 512,
             timeout: float = 120) -> dict:
    """A second raylet on this machine joined to the head, labelled with the resource `{name: 1}`."""
    state = read_state(temp_dir)
    if not state:
        raise RuntimeError(f"no cluster in {temp_dir}: start one with `make cluster-up`")
    if name in state["nodes"]:
        return state
    k = len(state["nodes"])
    args = [f"--address=127.0.0.1:{state['port']}", f"--num-cpus={num_cpus}",
            f"--object-store-memory={object_store_mb * 1024 ** 2}", "--resources=" + json.dumps({name: 1}),
            # a temp dir of its own: nodes sharing one would share (and delete) unpacked working dirs
            f"--temp-dir={ray_dir(state['temp_dir']) / name}", *_node_ports(state["port"], k)]
    _add_session(state, _ray_start(args, timeout, cluster_env(temp_dir)))
    state["nodes"].append(name)
    _write_state(temp_dir, state)
    wait_port(state["port"] + 10 + k, timeout)   # its dashboard agent, which may run submitted jobs
    return state


def _add_session(state: dict, started: tuple[int, list[list[int]]]) -> None:
    session, processes = started
    state["sessions"].append(session)
    state.setdefault("processes", []).extend(processes)


def _self_and_ancestors(tab: dict) -> set[int]:
    """This process and every process above it (its parent, the parent's parent, ...)."""
    out, pid = set(), os.getpid()
    while pid > 1 and pid not in out:
        out.add(pid)
        pid = tab[pid][0] if pid in tab else 0
    return out


def session_processes(session: int) -> list[list[int]]:
    """[pid, start] of every process `ray start` (session leader `session`) left running."""
    return [[pid, start] for pid, (_, sid, start) in procs.table().items() if sid == session]


def cluster_processes(state: dict) -> set[procs.Proc]:
    """The cluster's processes, by the ids recorded when `ray start` returned (pid and start time,
    so a reused pid is never one of them): those still running, every process below them (agents,
    workers, a job's driver in a session of its own), and the rest of their sessions (a process
    whose parent died). A session counts only while a recorded process holds it: no other process
    can then have its id. Never this process or those that started it (`make cluster-down`)."""
    tab = procs.table()
    recorded = procs.alive(state.get("processes", []), tab)
    sessions = {tab[pid][1] for pid, _ in recorded} & set(state.get("sessions", []))
    tops = {pid for pid, _ in recorded} | {pid for pid, (_, sid, _) in tab.items() if sid in sessions}
    me = _self_and_ancestors(tab)
    return {p for p in procs.descendants(tops, tab) if p[0] not in me}


def down(temp_dir=DEFAULT_TEMP) -> int:
    """Stop this cluster's processes only; returns how many were stopped."""
    temp_dir = str(Path(temp_dir).resolve())
    state = read_state(temp_dir)
    if not state:
        return 0
    state["temp_dir"] = temp_dir      # the folder asked for, whatever the file says
    targets = cluster_processes(state)
    left = procs.stop(targets)
    left |= procs.stop(cluster_processes(state))    # any started while the others stopped
    if left:
        raise RuntimeError(f"processes still running after SIGKILL: {sorted(p for p, _ in left)}")
    _state_path(temp_dir).unlink(missing_ok=True)
    return len(targets)


def status(temp_dir=DEFAULT_TEMP) -> int:
    state = read_state(temp_dir)
    if not state:
        print(f"no cluster started from {temp_dir}")
        return 1
    print(f"head 127.0.0.1:{state['port']}  dashboard {state['dashboard']}  nodes {', '.join(state['nodes'])}  "
          f"processes {len(cluster_processes(state))}")
    env = cluster_env(temp_dir)
    rc = subprocess.call([ray_cli(), "status", f"--address=127.0.0.1:{state['port']}"], env=env, timeout=60)
    subprocess.call([ray_cli(), "list", "jobs", f"--address={state['dashboard']}"], env=env, timeout=60)
    return rc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="jobs.cluster", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("up", "add-node", "status", "down"):
        p = sub.add_parser(name)
        p.add_argument("--temp-dir", default=DEFAULT_TEMP, help="Ray's temp dir for this cluster (keep it short)")
        if name == "up":
            p.add_argument("--port", type=int, default=6379, help="GCS port; client, agent and worker ports follow it")
            p.add_argument("--dashboard-port", type=int, default=8265)
            p.add_argument("--num-cpus", type=int, default=0, help="0 = every core")
            p.add_argument("--object-store-mb", type=int, default=1024)
        if name == "add-node":
            p.add_argument("--name", default="node_b", help="the node's resource label")
            p.add_argument("--num-cpus", type=int, default=1)
            p.add_argument("--object-store-mb", type=int, default=512)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "up":
            s = up(args.temp_dir, args.port, args.dashboard_port, args.num_cpus, args.object_store_mb)
            print(f"Ray head up: 127.0.0.1:{s['port']}, dashboard and job server {s['dashboard']}, "
                  f"temp dir {s['temp_dir']}")
        elif args.cmd == "add-node":
            s = add_node(args.temp_dir, args.name, args.num_cpus, args.object_store_mb)
            print(f"nodes: {', '.join(s['nodes'])}")
        elif args.cmd == "status":
            return status(args.temp_dir)
        else:
            print(f"stopped {down(args.temp_dir)} processes of the cluster in {args.temp_dir}")
    except RuntimeError as exc:
        print(f"jobs.cluster: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
