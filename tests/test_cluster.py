"""Cluster mode: `ray job submit` to a Ray head started on this machine, then to a head plus a second
raylet; the job's reports must equal an embedded-mode run's on the same input.

Each cluster has its own short temp dir and ports away from Ray's defaults, and is stopped in the
fixture's teardown (test failures included) by stopping only its own processes.
"""
import json
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from jobs import cluster, paths
from dedup2b.core import config as config_mod
from dedup2b.driver import run_stages

ROOT = Path(__file__).resolve().parents[1]
JOB_TIMEOUT = 300
# run-dependent: wall times, and the run directory's size (stage_stats.json records the tasks per node)
TIMING = ("stage_seconds", "embed_phases_s", "run_dir_bytes_per_row", "pixel_check_cost")


def _free_port_block() -> int:
    """A GCS port whose derived ports (client, dashboard, agents) nobody listens on."""
    for _ in range(100):
        base = random.randrange(30000, 39000, 500)
        try:
            for port in (base, base + 1, base + 2, base + 10, base + 11):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port block")


@pytest.fixture
def start_cluster():
    """Starts clusters on demand; every one is stopped at teardown, and no process of it may remain."""
    started = []

    def start(head_cpus: int, extra_nodes: tuple[str, ...] = ()) -> dict:
        temp = tempfile.mkdtemp(prefix="d2b-", dir="/tmp")   # short: Ray's unix sockets live under it
        started.append(temp)
        port = _free_port_block()
        state = cluster.up(temp, port=port, dashboard_port=port + 2, num_cpus=head_cpus, object_store_mb=400)
        for name in extra_nodes:
            state = cluster.add_node(temp, name, num_cpus=1, object_store_mb=300)
        return state

    yield start
    for temp in started:
        try:
            state = cluster.read_state(temp)
            cluster.down(temp)
            assert not (state and cluster.cluster_processes(state)), "cluster processes left running"
        finally:
            shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def job_config(tmp_path_factory, demo_corpus):
    """configs/demo.yaml pointed at the test's demo corpus, with absolute paths."""
    _, shards = demo_corpus
    base = tmp_path_factory.mktemp("cluster")
    data = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    data["input"]["path"] = str(shards)

    def for_run(name: str) -> tuple[Path, Path]:
        """(config file, run dir) of a run named name."""
        d = dict(data, run_dir=str(base / name / "run"), index_dir=str(base / name / "index"))
        path = base / f"{name}.yaml"
        path.write_text(yaml.safe_dump(d))
        return path, base / name / "run"
    return for_run


@pytest.fixture(scope="module")
def embedded_run(job_config, ray_executor):
    cfg = config_mod.from_dict(yaml.safe_load(job_config("embedded")[0].read_text()))
    run_stages(cfg, ray_executor, log=lambda *_: None)
    return cfg.run_path


def submit(state: dict, config: Path) -> str:
    """`ray job submit` as a user types it; returns the followed logs."""
    cmd = [cluster.ray_cli(), "job", "submit", "--address", state["dashboard"], "--working-dir", str(ROOT),
           "--runtime-env", str(ROOT / "jobs" / "runtime_env.yaml"), "--",
           "python", "-m", "jobs.dedup", "--config", str(config)]
    for attempt in range(3):
        try:
            out = subprocess.run(cmd, cwd=ROOT, env=cluster.cluster_env(state["temp_dir"]), capture_output=True,
                                 text=True, timeout=JOB_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"job did not finish within {JOB_TIMEOUT}s:\n{(exc.stdout or b'')[-3000:]}")
        # Ray's job server refuses a job ("try again later") until a node's agent has registered
        if "No available agent" not in out.stderr:
            break
        time.sleep(5)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-3000:]
    return out.stdout


def assert_same_reports(a: Path, b: Path) -> None:
    for name in ("samples", "pairs", "groups"):
        ta = pq.read_table(a / "report" / f"{name}.parquet").to_pandas()
        tb = pq.read_table(b / "report" / f"{name}.parquet").to_pandas()
        pd.testing.assert_frame_equal(ta, tb, check_exact=True, obj=name)
    sa, sb = (json.loads((p / "report" / "summary.json").read_text()) for p in (a, b))
    for key in TIMING:
        sa.pop(key, None), sb.pop(key, None)
    assert sa == sb


def test_submitted_job_reports_equal_embedded(start_cluster, job_config, embedded_run):
    state = start_cluster(head_cpus=2)
    config, run = job_config("one-node")
    logs = submit(state, config)
    # progress while it runs, then the summary
    assert "[ingest] 2/2 tasks done" in logs and "[search]" in logs and "[export]" in logs
    assert "invariant" in logs and "[job] done in" in logs
    assert_same_reports(embedded_run, run)


def test_two_nodes_share_the_shards(start_cluster, job_config, embedded_run):
    state = start_cluster(head_cpus=1, extra_nodes=("node_b",))
    config, run = job_config("two-node")
    logs = submit(state, config)
    stats = json.loads((run / "stage_stats.json").read_text())
    by_node = {s: stats[s]["tasks_by_node"] for s in ("ingest", "search", "export")}
    assert sum(by_node["ingest"].values()) == 2
    used = {node for counts in by_node.values() for node in counts}
    assert used == {"head", "node_b"}, by_node
    assert "on node_b" in logs and "[nodes] ingest:" in logs
    assert_same_reports(embedded_run, run)


def test_url_paths_are_staged(tmp_path):
    """Inputs given as fsspec URLs are copied to the stage dir (once); URL outputs uploaded after."""
    import fsspec
    fs = fsspec.filesystem("memory")
    fs.pipe({"/corpus/00000.tar": b"tar bytes", "/corpus/00000.parquet": b"parquet bytes"})
    data = {"input": {"path": "memory://corpus"}, "run_dir": "memory://out/run", "index_dir": "idx"}
    logs = []
    uploads = paths.resolve(data, tmp_path, str(tmp_path / "stage"), logs.append)
    staged = Path(data["input"]["path"])
    assert (staged / "00000.tar").read_bytes() == b"tar bytes" and staged.parent == tmp_path / "stage"
    assert data["index_dir"] == str(tmp_path / "idx")
    assert "2 files copied" in logs[-1]
    paths.resolve({"input": {"path": "memory://corpus"}}, tmp_path, str(tmp_path / "stage"), logs.append)
    assert "0 files copied, 2 already there" in logs[-1]
    (work, url), = uploads
    (work / "reports").mkdir(parents=True)
    (work / "reports" / "summary.json").write_text("{}")
    paths.stage_out(work, url, logs.append)
    assert fs.cat("/out/run/reports/summary.json") == b"{}"
    with pytest.raises(ValueError, match="--stage-dir"):
        paths.resolve({"input": {"path": "s3://bucket/corpus"}}, tmp_path, None)


def test_removal_request_as_a_job(start_cluster, job_config, tmp_path):
    """`jobs.remove` submitted like `jobs.dedup`: the listed key goes from the run's report and
    export with reason `request`, and the index logs the request."""
    state = start_cluster(head_cpus=2)
    config, run = job_config("removal")
    submit(state, config)
    samples = pq.read_table(run / "report" / "samples.parquet").to_pandas().set_index("key")
    kept = samples[(samples["status"] == "ok") & samples["removed_reason"].isna()]
    victim = sorted(kept.index[kept["group_size"].fillna(1) <= 1])[0]       # a row alone: it goes by itself
    (tmp_path / "takedown.txt").write_text(f"{victim}\n")
    index_dir = yaml.safe_load(config.read_text())["index_dir"]
    cmd = [cluster.ray_cli(), "job", "submit", "--address", state["dashboard"], "--working-dir", str(ROOT),
           "--runtime-env", str(ROOT / "jobs" / "runtime_env.yaml"), "--",
           "python", "-m", "jobs.remove", "--index", index_dir, "--keys", str(tmp_path / "takedown.txt")]
    out = subprocess.run(cmd, cwd=ROOT, env=cluster.cluster_env(state["temp_dir"]), capture_output=True,
                         text=True, timeout=JOB_TIMEOUT)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-3000:]
    after = pq.read_table(run / "report" / "samples.parquet").to_pandas().set_index("key")
    assert after.loc[victim, "removed_reason"] == "request"
    assert len(after) == len(samples)                       # every input row still accounted for
    keep = set(pq.read_table(run / "export" / "keep.parquet", columns=["key"])["key"].to_pylist())
    assert victim not in keep and len(keep) == len(kept) - 1
    assert list((Path(index_dir) / "requests").glob("*.parquet"))


def test_hf_and_folder_inputs_and_find_as_jobs(start_cluster, tmp_path):
    """The other input formats through `jobs.dedup` on the cluster (a folder tree of images and
    Hugging Face parquet of the same photos, a re-encoded copy in each), then `jobs.find` with a
    copy of one photo against the folder run's index."""
    import io
    import datasets
    from dedup2b import demo
    photos = dict(demo.base_images()[:4])

    def jpeg(img, q):
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=q)
        return buf.getvalue()
    name0 = next(iter(photos))
    files = {f"{n}.jpg": jpeg(img, 90) for n, img in photos.items()} | {f"copy/{name0}.jpg": jpeg(photos[name0], 60)}
    folder = tmp_path / "folder"
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    (tmp_path / "hf").mkdir()
    datasets.Dataset.from_dict({"image": [{"bytes": b, "path": k} for k, b in files.items()],
                                "caption": list(files)},
                               features=datasets.Features({"image": datasets.Image(),
                                                           "caption": datasets.Value("string")})
                               ).to_parquet(str(tmp_path / "hf" / "train.parquet"))
    state = start_cluster(head_cpus=2)
    for fmt in ("folder", "hf"):
        config = tmp_path / f"{fmt}.yaml"
        config.write_text(yaml.safe_dump({"input": {"path": str(tmp_path / fmt), "format": fmt},
                                          "run_dir": str(tmp_path / f"run-{fmt}"),
                                          "index_dir": str(tmp_path / f"index-{fmt}")}))
        submit(state, config)
        samples = pq.read_table(tmp_path / f"run-{fmt}" / "report" / "samples.parquet").to_pandas()
        assert len(samples) == len(files) and (samples["status"] == "ok").all()
        assert (samples["removed_reason"] == "duplicate").sum() == 1            # the copy
    query = tmp_path / "query.jpg"
    query.write_bytes(jpeg(photos[name0].resize((photos[name0].width // 2, photos[name0].height // 2)), 75))
    cmd = [cluster.ray_cli(), "job", "submit", "--address", state["dashboard"], "--working-dir", str(ROOT),
           "--runtime-env", str(ROOT / "jobs" / "runtime_env.yaml"), "--", "python", "-m", "jobs.find",
           str(query), "--index", str(tmp_path / "index-folder"), "--out", str(tmp_path / "find.parquet")]
    out = subprocess.run(cmd, cwd=ROOT, env=cluster.cluster_env(state["temp_dir"]), capture_output=True,
                         text=True, timeout=JOB_TIMEOUT)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-3000:]
    found = pq.read_table(tmp_path / "find.parquet").to_pandas()
    assert set(found["key"]) == {f"{name0}.jpg", f"copy/{name0}.jpg"}
