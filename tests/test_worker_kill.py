"""kill -9 a Ray worker in the middle of the search: Ray retries the task, the pairs are unchanged."""
import os
import signal
import subprocess
import threading
import time

import numpy as np

from dedup2b.lib import codec as index
from dedup2b.core.config import CodecConfig, SearchConfig
from dedup2b.core.executor import LocalExecutor
from dedup2b.stages.search import SearchJob, find_pairs, pair_files
from bench.corpora import clip_like, write_corpus
from dedup2b.core.vectors import VectorStore


def _pairs(out):
    import pyarrow.parquet as pq
    return {(a, b) for p in pair_files(out) for a, b in zip(*(pq.read_table(p)[c].to_pylist() for c in ("gid_a", "gid_b")))}


def _kill_first(pattern: str, stop: threading.Event, killed: list, after_s: float = 0.0):
    """Kill -9 the first process whose command line shows `pattern`, `after_s` after it appears."""
    start = None
    while not stop.is_set() and not killed:
        ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
        hit = [int(line.split()[0]) for line in ps.splitlines() if pattern in line]
        if hit:
            start = start or time.time()
            if time.time() - start >= after_s:
                try:
                    os.kill(hit[0], signal.SIGKILL)
                    killed.append(hit[0])
                except ProcessLookupError:
                    pass
        time.sleep(0.01)


def test_search_survives_a_killed_worker(tmp_path, ray_executor):
    x, src = clip_like(40000, 256, seed=21, max_group=400)
    names = write_corpus(tmp_path / "embed", x, src, rows_per_shard=10000)
    shards = dict(enumerate(names))
    store = VectorStore(tmp_path / "embed", shards)
    counts = {i: len(store.shard(i)[0]) for i in shards}
    index.train_all(store, counts, CodecConfig(train_size=20000), tmp_path / "index", "fp", "syn", cells=64, proj_dim=64)

    def job(out):
        return SearchJob(tmp_path / "embed", shards, tmp_path / "index", out,
                         SearchConfig(threshold=0.95, cells_per_task=2, pairs="all"), "fp", "fp-s")
    find_pairs(job(tmp_path / "plain"), LocalExecutor())
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_first, args=("ray::_call_with_env", stop, killed))
    killer.start()
    try:
        find_pairs(job(tmp_path / "killed"), ray_executor)
    finally:
        stop.set()
        killer.join()
    assert killed, "no task worker was seen running"
    assert _pairs(tmp_path / "killed") == _pairs(tmp_path / "plain")


def test_embed_survives_a_killed_model_actor(tmp_path, demo_corpus, ray_executor):
    from conftest import make_config
    from dedup2b.driver import run_stages
    _, shards = demo_corpus
    plain = make_config(tmp_path / "plain", shards)
    run_stages(plain, LocalExecutor(), stages=("ingest", "embed"), log=lambda *_: None)
    cfg = make_config(tmp_path / "killed", shards)
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_first, args=("MapBatches(EmbedActor)", stop, killed, 2.0))
    killer.start()
    try:
        run_stages(cfg, ray_executor, stages=("ingest", "embed"), log=lambda *_: None)
    finally:
        stop.set()
        killer.join()
    assert killed, "the model actor was never seen"
    for name in ("00000", "00001"):
        a = np.load(plain.run_path / "embed" / "img_emb" / f"img_emb_{name}.npy").astype(np.float32)
        b = np.load(cfg.run_path / "embed" / "img_emb" / f"img_emb_{name}.npy").astype(np.float32)
        np.testing.assert_allclose(a, b, atol=2e-3)
