"""The local cluster's temp dir is this user's alone, its token new and private, and `down` signals
only this cluster's processes whatever its state file says (no Ray started here)."""
import json
import os
import stat
import subprocess
import sys
import time

import pytest

from jobs import cluster


def test_temp_dir_is_created_private_and_foreign_or_open_ones_are_refused(tmp_path):
    d = cluster.private_dir(tmp_path / "ray")
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    cluster._write_token(d)
    token = d / "auth_token"
    assert stat.S_IMODE(os.stat(token).st_mode) == 0o600 and len(token.read_text()) == 64
    first = token.read_text()
    cluster._write_token(d)
    assert token.read_text() != first                  # a new cluster never reuses a token found there

    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    with pytest.raises(cluster.UnsafeTempDir, match="writable by other users"):
        cluster.private_dir(open_dir)
    link = tmp_path / "link"
    link.symlink_to(d)
    with pytest.raises(cluster.UnsafeTempDir, match="symbolic link"):
        cluster.private_dir(link)
    if os.getuid() == 0:                               # as root, make one that belongs to someone else
        other = tmp_path / "other"
        other.mkdir(mode=0o700)
        os.chown(other, 4242, 4242)
        with pytest.raises(cluster.UnsafeTempDir, match="belongs to uid 4242"):
            cluster.private_dir(other)
        with pytest.raises(cluster.UnsafeTempDir):
            cluster.up(other)                          # refused before anything starts


def test_a_token_planted_as_a_link_is_never_written_through(tmp_path):
    d = cluster.private_dir(tmp_path / "ray")
    target = tmp_path / "victim"
    target.write_text("keep")
    (d / "auth_token").symlink_to(target)
    cluster._write_token(d)
    assert target.read_text() == "keep" and not (d / "auth_token").is_symlink()


def test_down_never_signals_a_process_a_forged_state_lists(tmp_path):
    d = cluster.private_dir(tmp_path / "ray")
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        forged = {"temp_dir": "/", "port": 1, "sessions": [victim.pid], "nodes": ["head"]}
        (d / cluster.STATE).write_text(json.dumps(forged))
        os.chmod(d / cluster.STATE, 0o600)
        cluster.down(d)
        time.sleep(0.3)
        assert victim.poll() is None, "down killed a process that is not this cluster's"
        # a state file others may write is refused outright
        cluster._write_state(d, forged)
        os.chmod(d / cluster.STATE, 0o666)
        with pytest.raises(cluster.UnsafeTempDir, match="state file"):
            cluster.down(d)
    finally:
        victim.kill()
        victim.wait()


def test_down_never_signals_the_command_that_called_it(tmp_path):
    """`make cluster-down RAY_TMP=DIR` names the dir on its own command line: it survives."""
    d = cluster.private_dir(tmp_path / "ray")
    cluster._write_state(d, {"temp_dir": str(d), "port": 1, "sessions": [], "nodes": ["head"]})
    script = (f"{sys.executable} -c 'from jobs import cluster; cluster.down(\"{d}\")' && echo survived "
              f"# the caller names {d} ")
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0 and "survived" in done.stdout, (done.returncode, done.stderr[-500:])
