"""LAION-style precomputed embeddings (clip-retrieval layout) as input: validation and a full run."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dedup2b.core.config import from_dict
from dedup2b.sources.embeddings import InputError
from dedup2b.core.executor import LocalExecutor, ShardFailed
from dedup2b.driver import run_stages
from bench.corpora import clip_like, exhaustive_pairs, write_corpus


def _write(folder, x, names=("0000", "0001"), meta_rows=None):
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir(parents=True)
    per = (len(x) + len(names) - 1) // len(names)
    for k, name in enumerate(names):
        part = x[k * per:(k + 1) * per]
        np.save(folder / "img_emb" / f"img_emb_{name}.npy", part)
        n = meta_rows if meta_rows is not None else len(part)
        pq.write_table(pa.table({"url": [f"http://x/{name}/{i}.jpg" for i in range(n)],
                                 "caption": [f"c{i}" for i in range(n)]}),
                       folder / "metadata" / f"metadata_{name}.parquet")


def _cfg(tmp_path, folder, **inp):
    return from_dict({"input": {"path": str(folder), "format": "embeddings", **inp},
                      "run_dir": str(tmp_path / "run"), "embed": {"model": "precomputed:synthetic"}})


def test_run_on_released_style_embeddings(tmp_path):
    x, src = clip_like(3000, 128, seed=11, max_group=40)
    x = x.astype(np.float16)
    x[5] = np.nan                       # a corrupt vector
    x[17] = 0                           # an empty one
    _write(tmp_path / "emb", x)
    cfg = _cfg(tmp_path, tmp_path / "emb")
    assert cfg.search.threshold == 0.95
    run_stages(cfg, LocalExecutor(), log=lambda *_: None)
    s = json.loads((cfg.run_path / "report" / "summary.json").read_text())
    assert s["input_rows"] == 3000 and s["failed"] == 2 and s["invariant_holds"]
    samples = pq.read_table(cfg.run_path / "report" / "samples.parquet").to_pandas()
    assert set(samples.loc[samples.status == "failed", "error"]) == {"vector: non-finite values", "vector: zero norm"}
    assert samples.key.iloc[0] == "0000_0000000" and samples.uid.str.len().eq(32).all()
    # groups equal the components of exhaustive search at the threshold
    ok = samples[samples.status == "ok"].reset_index(drop=True)
    xv = x.astype(np.float32)[ok.row + 1500 * (ok.shard == "0001")]
    xv /= np.linalg.norm(xv, axis=1, keepdims=True)
    from dedup2b.stages.group import components
    pairs = np.array(sorted(exhaustive_pairs(xv, 0.95)))
    labels = components(len(ok), [(pairs[:, 0], pairs[:, 1])])
    assert len(set(zip(labels.tolist(), ok.group_id.tolist()))) == len(set(labels.tolist())) == ok.group_id.nunique()
    keep = pq.read_table(cfg.run_path / "export" / "keep.parquet").to_pandas()
    assert len(keep) == s["kept"] and not (cfg.run_path / "export" / "webdataset").exists()


def test_row_count_mismatch_names_both_files(tmp_path):
    x, _ = clip_like(100, 32, seed=1)
    _write(tmp_path / "emb", x, names=("0000",), meta_rows=99)
    with pytest.raises(InputError, match="img_emb_0000.npy: 100 vectors but .*metadata_0000.parquet has 99"):
        run_stages(_cfg(tmp_path, tmp_path / "emb"), LocalExecutor(), log=lambda *_: None)


def test_norms_off_one_need_renormalize(tmp_path):
    x, _ = clip_like(200, 32, seed=2)
    _write(tmp_path / "emb", 3 * x, names=("0000",))
    with pytest.raises(ShardFailed, match="(?s)shard 0000.*renormalize"):
        run_stages(_cfg(tmp_path, tmp_path / "emb"), LocalExecutor(), log=lambda *_: None)
    cfg = _cfg(tmp_path / "b", tmp_path / "emb", renormalize=True)
    run_stages(cfg, LocalExecutor(), log=lambda *_: None)
    v = np.load(cfg.run_path / "embed" / "img_emb" / "img_emb_0000.npy").astype(np.float32)
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=2e-3)


def test_dimensions_must_agree(tmp_path):
    x, _ = clip_like(100, 32, seed=3)
    _write(tmp_path / "emb", x, names=("0000",))
    np.save(tmp_path / "emb" / "img_emb" / "img_emb_0001.npy", np.ones((3, 16), np.float16))
    pq.write_table(pa.table({"url": ["a", "b", "c"]}), tmp_path / "emb" / "metadata" / "metadata_0001.parquet")
    with pytest.raises(InputError, match="dimensions differ"):
        run_stages(_cfg(tmp_path, tmp_path / "emb"), LocalExecutor(), log=lambda *_: None)


def test_model_spec_must_match_the_format(tmp_path):
    from dedup2b.core.config import ConfigError
    with pytest.raises(ConfigError, match="precomputed"):
        from_dict({"input": {"path": "x", "format": "embeddings"}, "run_dir": "r"})


def test_cli_runs_released_embeddings_and_exports_chosen_formats(tmp_path):
    """`dedup2b run --input-format embeddings`, then `dedup2b export --format keep` on the same run."""
    from dedup2b.cli import main
    x, _ = clip_like(1200, 64, seed=5, max_group=20)
    _write(tmp_path / "emb", x.astype(np.float16))
    run = tmp_path / "cli"
    assert main(["run", "--input", str(tmp_path / "emb"), "--input-format", "embeddings", "--executor", "local",
                 "--run-dir", str(run), "--index-dir", str(tmp_path / "idx")]) == 0
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert summary["invariant_holds"] and summary["input_rows"] == 1200 and summary["removed"] > 0
    (run / "export" / "keep.parquet").unlink()
    assert main(["export", "--input", str(tmp_path / "emb"), "--input-format", "embeddings", "--executor", "local",
                 "--run-dir", str(run), "--index-dir", str(tmp_path / "idx"), "--format", "keep"]) == 0
    keep = pq.read_table(run / "export" / "keep.parquet")
    assert keep.num_rows == summary["kept"]


def test_binary_captions_and_overflowing_norms(tmp_path):
    """Binary metadata text is decoded (U+FFFD where not UTF-8); a vector whose norm overflows
    float32 is renormalised exactly, never an all-zero ok row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dedup2b.core.config import InputConfig
    from dedup2b.sources import embeddings
    (tmp_path / "e" / "img_emb").mkdir(parents=True)
    (tmp_path / "e" / "metadata").mkdir()
    x = np.ones((3, 8), np.float32)
    x[1] *= 3e19                                                  # |x|^2 overflows float32
    np.save(tmp_path / "e" / "img_emb" / "img_emb_0000.npy", x)
    pq.write_table(pa.table({"caption": pa.array([b"ok", b"\xff\xfebin", None], pa.binary()),
                             "url": ["u0", "u1", "u2"]}), tmp_path / "e" / "metadata" / "metadata_0000.parquet")
    shard = embeddings.list_shards(tmp_path / "e")[0]
    cfg = InputConfig(path=str(tmp_path / "e"), format="embeddings", renormalize=True)
    rows = embeddings.ingest_shard(shard, cfg).to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 3 and rows[0]["caption"] == "ok" and "\ufffd" in rows[1]["caption"]
    v = embeddings.unit_vectors(shard, np.arange(3), cfg).astype(np.float32)
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-3) and np.allclose(v[1], v[0], atol=1e-3)


def test_released_embeddings_are_read_in_place_not_copied(tmp_path):
    """Valid released vectors are memory-mapped from the input (a link in the run), with the same
    groups as a copy; a changed input file is refused, never misread."""
    import pyarrow.parquet as pq

    from dedup2b.core.vectors import emb_path, link_path
    x, _ = clip_like(3000, 64, seed=11, max_group=40)
    write_corpus(tmp_path / "emb", x, np.zeros(len(x), np.int64), rows_per_shard=1500)
    runs = {}
    for name, copy in (("linked", False), ("copied", True)):
        cfg = from_dict({"input": {"path": str(tmp_path / "emb"), "format": "embeddings", "copy_vectors": copy},
                         "run_dir": str(tmp_path / name), "embed": {"model": "precomputed:synthetic"}})
        stats = run_stages(cfg, LocalExecutor(), log=lambda *_: None)
        runs[name] = (cfg, stats)
    linked, copied = runs["linked"][0], runs["copied"][0]
    assert runs["linked"][1]["embed"]["shards_read_in_place"] == 2
    assert link_path(linked.run_path / "embed", "00000").exists() and not emb_path(linked.run_path / "embed", "00000").exists()
    a = pq.read_table(linked.run_path / "report" / "samples.parquet").to_pandas()
    b = pq.read_table(copied.run_path / "report" / "samples.parquet").to_pandas()
    assert a.group_id.equals(b.group_id)
    sa = json.loads((linked.run_path / "report" / "summary.json").read_text())
    sb = json.loads((copied.run_path / "report" / "summary.json").read_text())
    assert sa["run_dir_bytes_per_row"] < sb["run_dir_bytes_per_row"] - 100     # 64 fp16 = 128 B a row not copied
    # the input changes under the run: its embed marker no longer holds, a reader refuses the file
    src = tmp_path / "emb" / "img_emb" / "img_emb_00000.npy"
    np.save(src, np.zeros((10, 64), np.float16))
    from dedup2b.driver import open_existing
    with pytest.raises(ValueError, match="changed or is gone"):
        open_existing(linked.run_path).vectors().shard(0)


def _mapped_kb(path) -> int:
    """Resident kB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:        # a mapping's header line
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


def test_vectors_read_leave_no_file_pages_resident(tmp_path):
    """A gather or a shard scan maps vector-file pages only while it reads them: the process's
    resident memory does not grow with the files it has read (15 GB of vectors at 10 M rows)."""
    from dedup2b.lib.codec import sample
    x, _ = clip_like(40000, 256, seed=3, max_group=10)
    write_corpus(tmp_path / "emb", x, np.zeros(len(x), np.int64), rows_per_shard=40000)
    cfg = from_dict({"input": {"path": str(tmp_path / "emb"), "format": "embeddings"},
                     "run_dir": str(tmp_path / "run"), "embed": {"model": "precomputed:synthetic"}})
    run_stages(cfg, LocalExecutor(), stages=("ingest", "embed"), log=lambda *_: None)
    from dedup2b.driver import open_existing
    store = open_existing(cfg.run_path).vectors()
    gids, vecs = store.shard(0)
    src = (tmp_path / "emb" / "img_emb" / "img_emb_00000.npy").resolve()
    pick = np.sort(np.random.default_rng(0).choice(gids, 20000, replace=False))
    got = store.get(pick)
    want = x[np.searchsorted(gids, pick)].astype(np.float16).astype(np.float32)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    assert np.allclose(got, want, atol=1e-6)               # the right rows, read after the release
    assert _mapped_kb(src) < 512                           # of a 20 MB file
    np.asarray(vecs[:30000], dtype=np.float32)             # a scan without release maps what it read
    assert _mapped_kb(src) > 10_000
    store.release(0)
    assert _mapped_kb(src) < 512
    sample(store, {0: len(gids)}, 10000, seed=1)
    assert _mapped_kb(src) < 512


def test_raw_gather_gives_the_float32_rows_bit_for_bit(tmp_path):
    """The search join reads a block's vectors as stored (fp16) and converts only the rows it
    multiplies (celljoin.Vectors): the same float32 rows as VectorStore.get, whether the store
    holds its own normalised copy or reads the input's file in place, normalising as it reads."""
    from dedup2b.core.vectors import Rows
    from dedup2b.driver import open_existing
    from dedup2b.lib import celljoin
    x, _ = clip_like(5000, 64, seed=5, max_group=30)
    x = x * np.random.default_rng(1).uniform(0.9995, 1.0005, (len(x), 1))   # norms a little off one
    write_corpus(tmp_path / "emb", x, np.zeros(len(x), np.int64), rows_per_shard=2000)
    rng = np.random.default_rng(2)
    proj = np.linalg.qr(rng.standard_normal((64, 16)))[0].T.astype(np.float32)
    for copy in (False, True):
        cfg = from_dict({"input": {"path": str(tmp_path / "emb"), "format": "embeddings", "copy_vectors": copy},
                         "run_dir": str(tmp_path / f"run{copy}"), "embed": {"model": "precomputed:synthetic"}})
        run_stages(cfg, LocalExecutor(), stages=("ingest", "embed"), log=lambda *_: None)
        store = open_existing(cfg.run_path).vectors()
        gids = np.concatenate([store.shard(i)[0] for i in sorted(store.shards)])
        pick = rng.permutation(gids)[:3000]                    # every shard, in no order
        want = store.get(pick)
        raw, norm = store.get_raw(pick)
        assert raw.dtype == np.float16 and (norm is None) == copy
        v = celljoin.Vectors(raw, norm)
        rows = rng.permutation(len(pick))[:700]
        assert np.array_equal(v[rows], want[rows]) and np.array_equal(v[100:900], want[100:900])
        lazy = Rows(store, pick)                               # the join's candidate rows, read as stored
        held = celljoin.Vectors(*lazy.raw(rows))
        assert np.array_equal(held[np.arange(len(rows))], want[rows]) and lazy.read == len(rows)
        # (the projection in chunks: equal up to the BLAS kernel a chunk size picks)
        assert np.allclose(v.project_zr(proj, chunk=512), celljoin.project_zr(want, proj), rtol=0, atol=1e-6)
        if not copy:                                           # the read normalised the input's rows
            assert not np.allclose(raw.astype(np.float32), want, atol=1e-5)


def test_shard_gids_from_the_footer_or_the_column(tmp_path):
    """A vector shard's gids come from the footer's statistics when they are consecutive (held
    as (first, count): nothing per row), and are read from the column when a row is missing (a
    failed row has no vector)."""
    from dedup2b.core.vectors import _shard_gids
    base = 7 << 32
    for gids in (np.arange(base, base + 5000), np.r_[np.arange(base, base + 30), np.arange(base + 31, base + 5000)]):
        path = tmp_path / f"m{len(gids)}.parquet"
        pq.write_table(pa.table({"gid": gids, "key": [str(g) for g in gids]}), path, row_group_size=1000)
        got = _shard_gids(path)
        if len(gids) == 5000:
            assert got == (base, 5000)
        else:
            assert np.array_equal(got, gids)


def test_short_memory_stops_a_unit_with_its_need_and_a_rerun_resumes(tmp_path, monkeypatch):
    """The memory guard: with less memory available than a join block needs, the search stops
    with an error naming the stage, the unit and the memory it needed, before writing it; the
    assignments already done stay done, and the same run completes once memory is there."""
    from dedup2b.core import memory
    x, _ = clip_like(2000, 128, seed=5, max_group=30)
    _write(tmp_path / "emb", x.astype(np.float16))
    cfg = _cfg(tmp_path, tmp_path / "emb")
    monkeypatch.setattr(memory, "available", lambda: 64 << 10)          # 64 KB left
    with pytest.raises(ShardFailed) as err:
        run_stages(cfg, LocalExecutor(), log=lambda *_: None)
    msg = str(err.value)
    assert "search: join of cells" in msg and "MemoryShort" in msg and "GB of memory" in msg, msg
    assert "0.00 GB available" in msg and "rerun the same command" in msg
    assert not list((cfg.run_path / "search" / "pairs").glob("*.parquet"))
    monkeypatch.undo()
    stats = run_stages(cfg, LocalExecutor(), log=lambda *_: None)
    assert stats["search"]["shards"] == 0            # the assignments were not redone
    assert json.loads((cfg.run_path / "report" / "summary.json").read_text())["invariant_holds"]


def test_short_memory_names_the_group_stage_and_its_rows(tmp_path, monkeypatch):
    from dedup2b.core import memory
    x, _ = clip_like(1000, 64, seed=6, max_group=10)
    _write(tmp_path / "emb", x.astype(np.float16))
    cfg = _cfg(tmp_path, tmp_path / "emb")
    run_stages(cfg, LocalExecutor(), stages=["ingest", "embed", "index", "search", "verify"], log=lambda *_: None)
    monkeypatch.setattr(memory, "available", lambda: 1 << 20)
    with pytest.raises(memory.MemoryShort, match=r"group: the components of 1,000 rows: needs about 0\.\d\d GB"):
        run_stages(cfg, LocalExecutor(), stages=["group"], log=lambda *_: None)


def test_the_memory_left_in_a_cgroup_counts_its_page_cache_as_free(tmp_path, monkeypatch):
    """A container's limit less what it holds: the page cache of the files it read (which the
    kernel reclaims) is not held; no limit ("max") is no bound."""
    from dedup2b.core import memory
    gb = 1 << 30
    (tmp_path / "memory.max").write_text(f"{10 * gb}\n")
    (tmp_path / "memory.current").write_text(f"{8 * gb}\n")
    (tmp_path / "memory.stat").write_text(f"anon {2 * gb}\nfile {6 * gb}\nshmem 0\n")
    monkeypatch.setattr(memory, "CGROUP", tmp_path)
    assert memory._cgroup_left() == 8 * gb
    (tmp_path / "memory.max").write_text("max\n")
    assert memory._cgroup_left() is None
