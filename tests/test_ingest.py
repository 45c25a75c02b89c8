import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dedup2b.sources import img2dataset as ingest


def test_demo_shards_ingest(demo_corpus):
    _, shards_dir = demo_corpus
    shards = ingest.list_shards(shards_dir)
    assert [s.name for s in shards] == ["00000", "00001"]
    tables = [ingest.ingest_shard(s) for s in shards]
    rows = sum(t.num_rows for t in tables)
    truth = pq.read_table(shards_dir.parent / "ground_truth.parquet")
    assert rows == truth.num_rows
    t = pa.concat_tables(tables)
    failed = t.filter(pa.compute.equal(t["status"], "failed"))
    assert failed.num_rows == 5
    assert all(e.startswith("img2dataset: failed_to_download") for e in failed["error"].to_pylist())
    ok = t.filter(pa.compute.equal(t["status"], "ok"))
    assert all(len(h) == 64 for h in ok["sha256"].to_pylist())
    gids = t["gid"].to_pylist()
    assert len(set(gids)) == len(gids)
    assert ingest.make_gid(1, 7) in gids   # shard 1, row 7
    keys = t["key"].to_pylist()
    assert len(set(keys)) == len(keys)


def _write_shard(folder, members):
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"key": ["a"], "url": ["u"], "caption": ["c"], "status": ["success"]}),
                   folder / "00000.parquet")
    return ingest.list_shards(folder)[0]


def test_unsafe_member_names_are_refused(tmp_path):
    shard = _write_shard(tmp_path / "s", [("../evil.jpg", b"x")])
    with pytest.raises(ingest.InputError, match="unsafe member name"):
        ingest.ingest_shard(shard)


def test_missing_image_is_a_failed_row(tmp_path):
    shard = _write_shard(tmp_path / "s", [("b.jpg", b"x")])
    t = ingest.ingest_shard(shard).to_pylist()
    assert t[0]["status"] == "failed" and "missing from 00000.tar" in t[0]["error"]


def test_missing_folder_and_tar_are_named(tmp_path):
    with pytest.raises(ingest.InputError, match="input folder not found"):
        ingest.list_shards(tmp_path / "nope")
    (tmp_path / "s").mkdir()
    pq.write_table(pa.table({"key": ["a"]}), tmp_path / "s" / "00003.parquet")
    with pytest.raises(ingest.InputError, match="00003.tar: tar missing"):
        ingest.ingest_shard(ingest.list_shards(tmp_path / "s")[0])
