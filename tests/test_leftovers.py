"""Nothing of a Ray session outlives it: kill -9 an embedded run's driver and every process of its
Ray session is gone within seconds; `make cluster-down` stops the cluster's processes and no
other, even one whose command line names the cluster's temp dir, and exits 0.

Processes are told apart here by what /proc says of them (session, parent, start time), never by
their command lines; the test reads /proc itself rather than through the code it checks."""
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jobs import cluster

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent
GONE_WITHIN_S = 8


def _procs() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, session id, start ticks) of live processes (zombies count as gone)."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                text = (d / "stat").read_text()
            except OSError:
                continue
            f = text[text.rindex(")") + 2:].split()
            if f[0] != "Z":
                out[int(d.name)] = (int(f[1]), int(f[3]), int(f[19]))
    return out


def _session_and_descendants(root: int, seen: set) -> None:
    """Add (pid, start) of every process in `root`'s session or below it to `seen`."""
    table = _procs()
    mine = {pid for pid, (_, sid, _) in table.items() if sid == root} | {root}
    grew = True
    while grew:
        kids = {pid for pid, (ppid, _, _) in table.items() if ppid in mine and pid not in mine}
        mine |= kids
        grew = bool(kids)
    seen |= {(pid, table[pid][2]) for pid in mine if pid in table}


def _left(seen: set) -> set:
    table = _procs()
    return {(pid, start) for pid, start in seen if pid in table and table[pid][2] == start}


def _wait_gone(seen: set, within: float) -> tuple[set, float]:
    t0 = time.time()
    while _left(seen) and time.time() - t0 < within:
        time.sleep(0.1)
    return _left(seen), time.time() - t0


def _kill(procs: set) -> None:
    for pid, _ in procs:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_killed_embedded_run_leaves_no_process(demo_corpus, tmp_path):
    _, shards = demo_corpus
    run_dir = tmp_path / "run"
    cmd = [str(Path(sys.executable).with_name("dedup2b")), "run", "--input", str(shards), "--run-dir", str(run_dir),
           "--executor", "ray"]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    seen: set = set()
    try:
        marker = run_dir / "ingest" / "_done" / "00001.json"   # Ray is up and has run tasks
        deadline = time.time() + 240
        while not marker.exists() and driver.poll() is None and time.time() < deadline:
            _session_and_descendants(driver.pid, seen)
            time.sleep(0.1)
        for _ in range(10):                                     # its agents and workers, all of them
            _session_and_descendants(driver.pid, seen)
            time.sleep(0.1)
        assert driver.poll() is None, "the run ended before it could be killed"
        assert len(seen) >= 4, seen                             # the driver, GCS, raylet, agents, workers
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        left, waited = _wait_gone(seen, GONE_WITHIN_S)
        assert not left, f"{len(left)} of {len(seen)} processes of the killed run still running after {waited:.1f} s"
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        _kill(_left(seen))


def _make_down(temp: str) -> subprocess.CompletedProcess:
    """`make cluster-down RAY_TMP=temp` as typed (this environment, never rebuilt)."""
    return subprocess.run(["make", "-s", "-o", f"{VENV}/.installed", "cluster-down", f"RAY_TMP={temp}",
                           f"VENV={VENV}"], cwd=ROOT, capture_output=True, text=True, timeout=120)


def _bystander(temp: str) -> subprocess.Popen:
    """A process of this user, not the cluster's, whose command line names the temp dir."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", f"{temp}/ray/session_latest"],
                            start_new_session=True)


def test_cluster_down_spares_a_process_naming_its_dir(tmp_path):
    temp = cluster.private_dir(tmp_path / "ray")
    cluster._write_state(temp, {"temp_dir": str(temp), "port": 1, "dashboard": "http://127.0.0.1:1",
                                "sessions": [], "nodes": ["head"]})
    other = _bystander(str(temp))
    try:
        done = _make_down(str(temp))
        assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
        time.sleep(0.3)
        assert other.poll() is None, "cluster-down killed a process that only names its temp dir"
    finally:
        other.kill()
        other.wait()


def test_cluster_down_stops_the_cluster_and_nothing_else(tmp_path):
    """A real head: every process of its session or below it is gone after `make cluster-down`; a
    process naming the temp dir and make itself are not touched."""
    from test_cluster import _free_port_block
    temp = tempfile.mkdtemp(prefix="d2b-", dir="/tmp")       # short: Ray's unix sockets live under it
    port = _free_port_block()
    seen: set = set()
    other = None
    try:
        state = cluster.up(temp, port=port, dashboard_port=port + 2, num_cpus=1, object_store_mb=200)
        time.sleep(1)
        for session in state["sessions"]:
            _session_and_descendants(session, seen)
        assert len(seen) >= 4, seen
        other = _bystander(temp)
        done = _make_down(temp)
        assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
        assert "stopped" in done.stdout
        left, waited = _wait_gone(seen, 2)
        assert not left, f"{len(left)} of {len(seen)} cluster processes still running after cluster-down"
        assert other.poll() is None, "cluster-down killed a process that only names its temp dir"
        assert not (Path(temp) / cluster.STATE).exists()
    finally:
        if other is not None:
            other.kill()
            other.wait()
        if (Path(temp) / cluster.STATE).exists():
            cluster.down(temp)
        _kill(_left(seen))
        subprocess.run(["rm", "-rf", temp])
