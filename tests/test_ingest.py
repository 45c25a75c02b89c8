import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dedup2b.sources import img2dataset as ingest
from dedup2b.sources.base import InputError


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


def _tar(folder, members):
    """folder/00000.tar holding these (name, bytes) members, in order."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _write_shard(folder, members):
    return _shard(folder, members, ["a"])


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


def _shard(folder, members, keys):
    """A shard with these tar members and one parquet row per key (keys may repeat)."""
    _tar(folder, members)
    n = len(keys)
    pq.write_table(pa.table({"key": keys, "url": [f"u{i}" for i in range(n)], "caption": ["c"] * n,
                             "status": ["success"] * n}), folder / "00000.parquet")
    return ingest.list_shards(folder)[0]


def test_a_member_name_twice_fails_its_row_naming_file_and_key(tmp_path):
    shard = _shard(tmp_path / "s", [("a.jpg", b"one"), ("b.jpg", b"b"), ("a.jpg", b"two")], ["a", "b"])
    rows = {r["key"]: r for r in ingest.ingest_shard(shard).to_pylist()}
    assert rows["a"]["status"] == "failed" and "member a.jpg appears twice in 00000.tar" in rows["a"]["error"]
    assert rows["b"]["status"] == "ok"
    # and a reader never yields a repeated member twice
    assert [v for v, _ in ingest.read_tar_members(str(shard.data), {"a.jpg": 1, "b.jpg": 2})] == [1, 2]


def test_a_key_in_two_folders_of_the_tar_is_a_failed_row(tmp_path):
    shard = _shard(tmp_path / "s", [("plain0.jpg", b"top"), ("other/plain0.jpg", b"sub")], ["plain0"])
    (row,) = ingest.ingest_shard(shard).to_pylist()
    assert row["status"] == "failed" and "key plain0 names members in two folders of 00000.tar" in row["error"]


def test_a_key_twice_in_the_parquet_keeps_the_first_row_only(tmp_path):
    shard = _shard(tmp_path / "s", [("a.jpg", b"a"), ("b.jpg", b"b")], ["a", "b", "a"])
    rows = ingest.ingest_shard(shard).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    assert "key a appears twice in 00000.parquet (rows 0 and 2)" in rows[2]["error"]
    ok = [r["key"] for r in rows if r["status"] == "ok"]
    assert len(ok) == len(set(ok))                    # a key is never both kept and removed


def test_an_integer_key_zero_is_a_key(tmp_path):
    folder = tmp_path / "s"
    _tar(folder, [("0.jpg", b"x")])
    pq.write_table(pa.table({"key": [0], "status": ["success"]}), folder / "00000.parquet")
    (row,) = ingest.ingest_shard(ingest.list_shards(folder)[0]).to_pylist()
    assert row["key"] == "0" and row["status"] == "ok"


def test_a_parquet_without_keys_and_odd_uids_are_handled_at_ingest(tmp_path):
    folder = tmp_path / "s"
    _tar(folder, [("a.jpg", b"x"), ("b.jpg", b"x")])
    pq.write_table(pa.table({"url": ["u"], "status": ["success"]}), folder / "00000.parquet")
    with pytest.raises(ingest.InputError, match="00000.parquet: no 'key' column"):
        ingest.ingest_shard(ingest.list_shards(folder)[0])
    pq.write_table(pa.table({"key": ["a", "b"], "uid": ["not-hex!", "ABCDEF0123456789ABCDEF0123456789"],
                             "status": ["success"] * 2}), folder / "00000.parquet")
    rows = ingest.ingest_shard(ingest.list_shards(folder)[0]).to_pylist()
    from dedup2b.stages.export import uid128
    assert rows[1]["uid"] == "abcdef0123456789abcdef0123456789" and len(rows[0]["uid"]) == 32
    assert len(uid128([r["uid"] for r in rows])) == 2          # the export can read every uid


@pytest.mark.parametrize("budget", [1 << 27, 1000])     # one pass; several passes over the hash space
def test_unique_key_check_by_hashes(budget):
    from dedup2b.sources.base import check_unique_keys
    rng = np.random.default_rng(3)
    words = [f"k{v}" for v in rng.permutation(10**6)[:20_000]]
    shards = {f"{i:05d}": pa.array(words[i * 5000:(i + 1) * 5000]) for i in range(4)}
    shards["00002"] = pa.concat_arrays([shards["00002"], pa.array(["k-local", "k-local"])])  # a repeat inside one shard
    calls = []
    readers = {n: (lambda a=a, n=n: calls.append(n) or a) for n, a in shards.items()}
    check_unique_keys(readers, 20_002, budget=budget)                      # unique across shards
    passes = -(-20_002 // budget)
    assert len(calls) >= 4 * passes
    shards["00003"] = pa.concat_arrays([shards["00003"], pa.array([words[1234]])])   # a key of shard 00000 again
    readers = {n: (lambda a=a: a) for n, a in shards.items()}
    with pytest.raises(InputError, match=f"key '{words[1234]}' appears in shard 00000 and shard 00003"):
        check_unique_keys(readers, 20_003, budget=budget)
