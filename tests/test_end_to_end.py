"""The whole pipeline on the demo corpus, on a real local Ray."""
import io
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from dedup2b import demo
from dedup2b.core.executor import LocalExecutor
from dedup2b.driver import run_stages, status
from dedup2b.stages import NAMES
from dedup2b.core.run import StaleRunError

from conftest import make_config


def _members(tar_path):
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory, demo_corpus, ray_executor):
    root, shards = demo_corpus
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = make_config(tmp, shards, export={"rows_per_shard": 10})
    stats = run_stages(cfg, ray_executor, log=lambda *_: None)
    return cfg, stats, root


def test_groups_match_ground_truth(ray_run):
    cfg, stats, root = ray_run
    scores = demo.score(root / "ground_truth.parquet", cfg.run_path / "report" / "samples.parquet")
    assert scores["precision"] >= 0.95 and scores["recall"] >= 0.95, scores


def test_report_files_and_invariant(ray_run):
    cfg, stats, _ = ray_run
    rep = cfg.run_path / "report"
    for name in ("samples.parquet", "pairs.parquet", "groups.parquet", "histogram.parquet",
                 "histogram.png", "summary.json", "similarity.parquet"):
        assert (rep / name).stat().st_size > 0, name
    import json
    s = json.loads((rep / "summary.json").read_text())
    assert s["input_rows"] == s["kept"] + s["removed"] + s["failed"]
    assert s["duplicates"] == s["ok"] - s["groups"] and s["failed"] == 5
    samples = pq.read_table(rep / "samples.parquet").to_pandas()
    assert len(samples) == s["input_rows"]
    ok = samples[samples.status == "ok"]
    # every group has exactly one representative and the representative key is in the group
    reps = ok[ok.is_representative.astype(bool)]
    assert reps.group_id.is_unique and set(reps.group_id) == set(ok.group_id)
    assert (ok.representative_key == ok.group_id.map(reps.set_index("group_id").key)).all()
    pairs = pq.read_table(rep / "pairs.parquet").to_pandas()
    assert {"bytes", "descriptor"} <= set(pairs.kind) <= {"bytes", "descriptor", "pixels"}
    # descriptor edges: at/above verify.sure, or images without pixel evidence at the threshold
    assert (pairs.loc[pairs.kind == "descriptor", "similarity"] >= cfg.search.threshold).all()
    assert (pairs.loc[pairs.kind == "pixels", "similarity"] >= cfg.verify.low).all()
    assert pairs.loc[pairs.kind == "pixels", "pixel_score"].notna().all()
    groups = pq.read_table(rep / "groups.parquet").to_pandas()
    assert (groups["min_similarity"] >= cfg.group.min_rep_similarity - 1e-6).all()


def test_export_holds_exactly_the_kept_rows_byte_identical(ray_run):
    cfg, _, _ = ray_run
    samples = pq.read_table(cfg.run_path / "report" / "samples.parquet").to_pandas()
    kept = set(samples.loc[(samples.status == "ok") & ~samples.is_duplicate.fillna(True).astype(bool), "key"])
    exported = {}
    src = {}
    for p in sorted(Path(cfg.input.path).glob("*.tar")):
        src.update(_members(p))
    for tar_path in sorted((cfg.run_path / "export" / "webdataset").glob("*.tar")):
        for name, data in _members(tar_path).items():
            assert src[name] == data, name          # original bytes, captions and json
            exported.setdefault(name.rpartition(".")[0], set()).add(name.rpartition(".")[2])
    assert set(exported) == kept
    assert all({"txt", "json"} <= exts for exts in exported.values())
    keep = pq.read_table(cfg.run_path / "export" / "keep.parquet").to_pandas()
    assert set(keep.key) == kept
    subset = np.load(cfg.run_path / "export" / "subset.npy", allow_pickle=False)
    assert len(subset) == len(kept) and np.all(np.sort(subset, order=["hi", "lo"]) == subset)
    # a DataComp-style lookup: searchsorted of every row's uid in subset.npy selects the kept rows
    from dedup2b.stages.export import uid128
    ok = samples[samples.status == "ok"]
    uids = uid128(ok.uid.tolist())
    pos = np.minimum(np.searchsorted(subset, uids), len(subset) - 1)
    assert set(ok.key[subset[pos] == uids]) == kept


def test_rerun_resumes_and_refuses_a_changed_config(ray_run, ray_executor):
    cfg, _, _ = ray_run
    before = (cfg.run_path / "report" / "samples.parquet").read_bytes()
    stats = run_stages(cfg, ray_executor, log=lambda *_: None)
    assert stats["ingest"]["shards"] == 0 and stats["embed"]["shards"] == 0 and stats["search"]["shards"] == 0
    assert pq.read_table(io.BytesIO(before)).equals(pq.read_table(cfg.run_path / "report" / "samples.parquet"))
    st = status(cfg.run_path)
    assert st["embed"] == {"done": 2, "pending": 0}
    changed = make_config(cfg.run_path.parent, cfg.input.path, search={"threshold": 0.9})
    with pytest.raises(StaleRunError, match="search.threshold"):
        run_stages(changed, ray_executor, log=lambda *_: None)
    # how the work runs may change between resumes: nothing is redone
    tuned = make_config(cfg.run_path.parent, cfg.input.path, embed={"batch_size": 5, "decode_cpus": 0.25})
    stats = run_stages(tuned, ray_executor, stages=("ingest", "embed"), log=lambda *_: None)
    assert stats["embed"]["shards"] == 0


def test_local_executor_gives_the_same_groups_and_vectors(ray_run, tmp_path, monkeypatch):
    """Also with the group stage streaming its edges in chunks of 7 (every pass multi-chunk) and its
    components in buckets of 5 rows through files flushed every 4 kB; that group output equals the
    one of a single chunk and a single bucket, column by column (edges sorted: they come bucket by
    bucket)."""
    from dedup2b.lib import spill
    from dedup2b.stages import group
    monkeypatch.setattr(group, "CHUNK", 7)
    monkeypatch.setattr(group, "BUCKET_ROWS", 5)
    monkeypatch.setattr(group, "DIGEST_ROWS", 5)
    monkeypatch.setattr(spill, "BUFFER", 4096)
    cfg, _, _ = ray_run
    local = make_config(tmp_path, cfg.input.path)
    stats = run_stages(local, LocalExecutor(), stages=NAMES[:-1], log=lambda *_: None)
    assert stats["group"]["buckets"] > 1
    a = pq.read_table(cfg.run_path / "report" / "samples.parquet").to_pandas()
    b = pq.read_table(local.run_path / "report" / "samples.parquet").to_pandas()
    assert (a.group_id.fillna(-1) == b.group_id.fillna(-1)).all()
    chunked = {n: pq.read_table(local.run_path / "group" / n) for n in ("rows", "edges.parquet")}
    assert chunked["edges.parquet"].num_rows > 7 * 3
    (local.run_path / "group" / "_done" / "group.json").unlink()
    monkeypatch.setattr(group, "CHUNK", 10**9)
    monkeypatch.setattr(group, "BUCKET_ROWS", 10**9)
    monkeypatch.setattr(group, "DIGEST_ROWS", 10**9)
    monkeypatch.setattr(spill, "BUFFER", 1 << 30)
    stats = run_stages(local, LocalExecutor(), stages=("group",), log=lambda *_: None)
    assert stats["group"]["buckets"] == 1
    by_edge = [("gid_a", "ascending"), ("gid_b", "ascending")]
    assert chunked["rows"].equals(pq.read_table(local.run_path / "group" / "rows"))
    assert chunked["edges.parquet"].sort_by(by_edge).equals(
        pq.read_table(local.run_path / "group" / "edges.parquet").sort_by(by_edge))
    # deterministic reports: same pairs and groups, whatever executed them (pairs in bucket order)
    for name in ("pairs.parquet", "groups.parquet", "histogram.parquet"):
        ta = pq.read_table(cfg.run_path / "report" / name).to_pandas()
        tb = pq.read_table(local.run_path / "report" / name).to_pandas()
        if name == "pairs.parquet":
            ta, tb = (t.sort_values(["key_a", "key_b"], ignore_index=True) for t in (ta, tb))
        assert ta.drop(columns=[c for c in ta if "similarity" in c]).equals(
            tb.drop(columns=[c for c in tb if "similarity" in c])), name
    for name in ("00000", "00001"):
        va = np.load(cfg.run_path / "embed" / "img_emb" / f"img_emb_{name}.npy")
        vb = np.load(local.run_path / "embed" / "img_emb" / f"img_emb_{name}.npy")
        np.testing.assert_allclose(va.astype(np.float32), vb.astype(np.float32), atol=2e-3)


def test_keys_stay_aligned_with_vectors_through_repartitioning(ray_run, ray_executor, tmp_path):
    """Odd batch sizes and two model actors: batches straddle shards and come back out of order;
    every key must still get its own image's vector."""
    cfg, _, _ = ray_run
    odd = make_config(tmp_path, cfg.input.path, embed={"batch_size": 7, "actors": 2})
    run_stages(odd, ray_executor, stages=("ingest", "embed"), log=lambda *_: None)
    for name in ("00000", "00001"):
        meta_a = pq.read_table(cfg.run_path / "embed" / "metadata" / f"metadata_{name}.parquet").to_pandas()
        meta_b = pq.read_table(odd.run_path / "embed" / "metadata" / f"metadata_{name}.parquet").to_pandas()
        assert meta_a.key.tolist() == meta_b.key.tolist() and meta_a.gid.is_monotonic_increasing
        va = np.load(cfg.run_path / "embed" / "img_emb" / f"img_emb_{name}.npy").astype(np.float32)
        vb = np.load(odd.run_path / "embed" / "img_emb" / f"img_emb_{name}.npy").astype(np.float32)
        np.testing.assert_allclose(va, vb, atol=2e-3)     # every key kept its own image's vector


def test_lost_shard_output_is_redone_and_downstream_recomputed(ray_run, ray_executor):
    cfg, _, _ = ray_run
    before = pq.read_table(cfg.run_path / "report" / "samples.parquet")
    (cfg.run_path / "embed" / "img_emb" / "img_emb_00001.npy").unlink()   # a lost output file
    (cfg.run_path / "search" / ".00000.parquet.dead.tmp").write_bytes(b"partial")  # a killed write
    stats = run_stages(cfg, ray_executor, log=lambda *_: None)
    assert stats["embed"]["shards"] == 1                   # only the damaged shard is re-embedded
    assert stats["search"]["shards"] == 2                  # the rebuilt index invalidates all searches
    assert not (cfg.run_path / "search" / ".00000.parquet.dead.tmp").exists()
    assert before.equals(pq.read_table(cfg.run_path / "report" / "samples.parquet"))


def test_exact_copies_are_embedded_once_and_share_the_vector(ray_run):
    cfg, stats, _ = ray_run
    ingest = pq.read_table(cfg.run_path / "ingest" / "00000.parquet").to_pandas()
    ingest = pd.concat([ingest, pq.read_table(cfg.run_path / "ingest" / "00001.parquet").to_pandas()])
    ok = ingest[ingest.status == "ok"]
    assert stats["embed"]["copies_skipped"] == len(ok) - ok.sha256.nunique() > 0
    vec = {}
    for name in ("00000", "00001"):
        v = np.load(cfg.run_path / "embed" / "img_emb" / f"img_emb_{name}.npy")
        g = pq.read_table(cfg.run_path / "embed" / "metadata" / f"metadata_{name}.parquet")["gid"].to_numpy()
        vec.update(zip(g.tolist(), v))
    for _, rows in ok.groupby("sha256"):
        first = vec[rows.gid.iloc[0]]
        assert all(np.array_equal(vec[g], first) for g in rows.gid)
    assert {"read_s", "decode_s", "infer_s", "write_s"} <= set(stats["embed"])


def test_hf_parquet_export_embeds_the_original_image_bytes(ray_run):
    import json as _json
    cfg, _, _ = ray_run
    samples = pq.read_table(cfg.run_path / "report" / "samples.parquet").to_pandas()
    kept = samples[(samples.status == "ok") & ~samples.is_duplicate.fillna(True).astype(bool)]
    parts = sorted((cfg.run_path / "export" / "hf").glob("*.parquet"))
    table = pq.read_table(parts[0])
    feats = _json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
    assert feats["image"] == {"_type": "Image"} and feats["text"]["dtype"] == "string"
    rows = [r for p in parts for r in pq.read_table(p).to_pylist()]
    assert {r["key"] for r in rows} == set(kept.key)
    for p in parts:
        src = _members(Path(cfg.input.path) / f"{p.stem}.tar")
        for r in pq.read_table(p).to_pylist():
            assert r["image"]["bytes"] == src[r["image"]["path"]]
            assert r["text"] == kept.set_index("key").caption[r["key"]]


def test_html_report_renders_in_headless_chromium(ray_run, tmp_path):
    import re

    from conftest import chromium_dom
    cfg, _, _ = ray_run
    page = cfg.run_path / "report" / "index.html"
    dom = chromium_dom(page, tmp_path / "profile")
    body = re.search(r'<body data-images="(\d+)" data-loaded="(\d+)"', dom)
    assert body, "the page's load handler did not run"
    assert int(body.group(1)) > 20 and body.group(1) == body.group(2)      # every thumbnail decoded
    groups = pq.read_table(cfg.run_path / "report" / "groups.parquet").num_rows
    assert dom.count('class="group"') == min(groups, 40) > 0
    assert 'id="borderline"' in dom
    shot = tmp_path / "report.png"
    chromium_dom(page, tmp_path / "profile", "--window-size=1200,1600", f"--screenshot={shot}")
    assert shot.stat().st_size > 20_000
    top = pq.read_table(cfg.run_path / "report" / "top_groups.parquet").to_pandas()
    assert top["size"].is_monotonic_decreasing and set(top.columns) >= {"representative_key", "size", "url", "caption"}


def test_webdataset_export_reads_back_with_webdataset(ray_run):
    """The export loads the way open_clip's loader reads it: webdataset samples + sizes.json."""
    import json as _json

    import webdataset as wds
    cfg, _, _ = ray_run
    folder = cfg.run_path / "export" / "webdataset"
    tars = sorted(str(p) for p in folder.glob("*.tar"))
    sizes = _json.loads((folder / "sizes.json").read_text())
    samples = list(wds.WebDataset(tars, shardshuffle=False))
    assert len(samples) == sum(sizes.values()) > 0
    src = {}
    for p in sorted(Path(cfg.input.path).glob("*.tar")):
        src.update(_members(p))
    for s in samples:
        image_ext = next(e for e in ("jpg", "png") if e in s)
        assert s[image_ext] == src[f"{s['__key__']}.{image_ext}"]
        assert s["txt"] == src[f"{s['__key__']}.txt"] and s["json"] == src[f"{s['__key__']}.json"]
    # resharded to export.rows_per_shard; each shard's parquet lists its tar's samples in order
    assert len(tars) == -(-len(samples) // 10) and max(sizes.values()) == 10
    for t in tars:
        in_tar = [s["__key__"] for s in wds.WebDataset(t, shardshuffle=False)]
        assert pq.read_table(Path(t).with_suffix(".parquet"))["key"].to_pylist() == in_tar
        assert sizes[Path(t).name] == len(in_tar)


def test_hf_parquet_export_loads_with_datasets_as_an_image_feature(ray_run, tmp_path):
    """The HF export loads the way TRL / verl data code loads parquet: datasets.load_dataset."""
    datasets = pytest.importorskip("datasets")
    cfg, _, _ = ray_run
    files = sorted(str(p) for p in (cfg.run_path / "export" / "hf").glob("*.parquet"))
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "cache"))
    assert isinstance(ds.features["image"], datasets.Image) and ds.features["text"].dtype == "string"
    keep = pq.read_table(cfg.run_path / "export" / "keep.parquet").to_pandas()
    assert sorted(ds["key"]) == sorted(keep["key"])
    first = ds[0]
    assert first["image"].size[0] > 0 and first["image"].mode in ("RGB", "L", "RGBA", "P")
    raw = ds.cast_column("image", datasets.Image(decode=False))
    src = {}
    for p in sorted(Path(cfg.input.path).glob("*.tar")):
        src.update(_members(p))
    assert all(r["image"]["bytes"] == src[r["image"]["path"]] for r in raw)
