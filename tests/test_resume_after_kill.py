"""Kill -9 the driver in the middle of a stage, rerun the same command: identical reports."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq


def _cmd(shards, run_dir):
    return [str(Path(sys.executable).with_name("dedup2b")), "run", "--input", str(shards),
            "--run-dir", str(run_dir), "--executor", "local"]


def test_killed_driver_resumes_to_identical_reports(demo_corpus, tmp_path):
    _, shards = demo_corpus
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    clean = subprocess.run(_cmd(shards, tmp_path / "clean"), env=env, capture_output=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-2000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(shards, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "embed" / "_done" / "00000.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed mid-embed"
    os.kill(proc.pid, signal.SIGKILL)                   # mid-embed: shard 00000 done, 00001 not
    proc.wait(timeout=30)
    assert not (killed / "embed" / "_done" / "00001.json").exists()

    again = subprocess.run(_cmd(shards, killed), env=env, capture_output=True, timeout=600, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "[embed] shards=1" in again.stdout            # only the unfinished shard is redone
    for name in ("samples.parquet", "pairs.parquet", "groups.parquet"):
        a = pq.read_table(tmp_path / "clean" / "report" / name)
        b = pq.read_table(killed / "report" / name)
        assert a.equals(b), name
