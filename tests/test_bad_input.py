"""Bad input: each case is a failed row with a reason or an error naming the file, and the
invariant input rows = kept + removed + failed holds after every run."""
import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dedup2b.core.executor import LocalExecutor, ShardFailed
from dedup2b.sources.img2dataset import InputError
from dedup2b.driver import run_stages

from conftest import make_config


def _img(mode="RGB", size=(64, 48), fmt="JPEG", color=(200, 30, 30), **kw):
    img = Image.new("RGB", size, color)
    img = img.convert(mode) if mode != "RGB" else img
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _bomb():
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")   # ~50 KB declaring 400 M pixels
    return buf.getvalue()


def _animated():
    frames = [Image.new("P", (32, 32), i * 40) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _shard(folder, index, members, keys=None):
    """Write NNNNN.tar with (key, ext, bytes) members and a parquet naming `keys`."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{index:05d}"
    with tarfile.open(folder / f"{name}.tar", "w") as tar:
        for key, ext, data in members:
            for suffix, blob in ((ext, data), ("txt", f"caption {key}".encode("latin-1")), ("json", b"{}")):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    keys = keys if keys is not None else [k for k, _, _ in members]
    pq.write_table(pa.table({"key": keys, "url": [f"http://x/{k}" for k in keys],
                             "caption": [f"caption {k}" for k in keys], "status": ["success"] * len(keys)}),
                   folder / f"{name}.parquet")


def _run(tmp_path, folder):
    cfg = make_config(tmp_path, folder)
    run_stages(cfg, LocalExecutor(), log=lambda *_: None)
    s = json.loads((cfg.run_path / "report" / "summary.json").read_text())
    assert s["input_rows"] == s["kept"] + s["removed"] + s["failed"]
    samples = pq.read_table(cfg.run_path / "report" / "samples.parquet").to_pandas()
    return s, samples.set_index("key")


def test_undecodable_and_odd_images(tmp_path):
    good = _img()
    members = [("ok", "jpg", good), ("copy", "jpg", good), ("corrupt", "jpg", good[:40] + b"\x00" * 50),
               ("empty", "jpg", b""), ("bomb", "png", _bomb()), ("cmyk", "jpg", _img("CMYK")),
               ("p16", "png", _img("I;16", fmt="PNG")), ("pal", "png", _img("P", fmt="PNG")),
               ("anim", "gif", _animated()), ("tiny", "png", _img(size=(1, 1), fmt="PNG")),
               ("text", "jpg", b"this is not an image")]
    _shard(tmp_path / "in", 0, members)
    s, rows = _run(tmp_path, tmp_path / "in")
    assert s["input_rows"] == len(members)
    failed = rows[rows.status == "failed"].error
    assert set(failed.index) == {"corrupt", "empty", "bomb", "text"}
    assert "0 bytes" in failed["empty"] and "DecompressionBomb" in failed["bomb"]
    assert rows.loc["copy", "group_id"] == rows.loc["ok", "group_id"]        # exact copy grouped
    assert (rows.loc[["cmyk", "p16", "pal", "anim", "tiny"], "status"] == "ok").all()


def test_tar_and_parquet_disagree(tmp_path):
    img = _img()
    _shard(tmp_path / "in", 0, [("a", "jpg", img), ("extra", "jpg", _img(color=(0, 0, 200)))], keys=["a", "gone"])
    s, rows = _run(tmp_path, tmp_path / "in")
    assert s["input_rows"] == 3
    assert "missing from 00000.tar" in rows.loc["gone", "error"]
    assert "in 00000.tar but not in 00000.parquet" in rows.loc["extra", "error"]


def test_empty_shard_beside_a_normal_one(tmp_path):
    _shard(tmp_path / "in", 0, [("a", "jpg", _img()), ("b", "jpg", _img(color=(0, 200, 0)))])
    _shard(tmp_path / "in", 1, [])
    s, rows = _run(tmp_path, tmp_path / "in")
    assert s["input_rows"] == 2 and s["failed"] == 0


def test_fatal_input_errors_name_the_file(tmp_path):
    _shard(tmp_path / "a", 0, [("k", "jpg", _img())])
    _shard(tmp_path / "a", 1, [("k", "jpg", _img())])                 # same key in two shards
    with pytest.raises(InputError, match="key 'k' appears in shard 00000 and shard 00001"):
        run_stages(make_config(tmp_path / "ra", tmp_path / "a"), LocalExecutor(), log=lambda *_: None)
    _shard(tmp_path / "b", 0, [("k", "jpg", _img())])
    (tmp_path / "b" / "00001.tar").write_bytes((tmp_path / "b" / "00000.tar").read_bytes())
    with pytest.raises(InputError, match="00001.tar without the .parquet sidecar"):
        run_stages(make_config(tmp_path / "rb", tmp_path / "b"), LocalExecutor(), log=lambda *_: None)



def test_a_failing_shard_is_named_and_the_rest_is_kept(tmp_path, ray_executor):
    _shard(tmp_path / "c", 0, [("k", "jpg", _img())])
    _shard(tmp_path / "c", 1, [("l", "jpg", _img()), ("m", "jpg", _img())])
    data = (tmp_path / "c" / "00001.tar").read_bytes()
    (tmp_path / "c" / "00001.tar").write_bytes(data[:700])              # truncated mid-member
    cfg = make_config(tmp_path / "rc", tmp_path / "c", ray={"max_retries": 1})
    with pytest.raises(ShardFailed, match=r"(?s)Rerunning the same command is safe.*shard 00001.*"
                                          r"00001.tar: unreadable tar"):
        run_stages(cfg, ray_executor, log=lambda *_: None)
    assert (cfg.run_path / "ingest" / "_done" / "00000.json").exists()     # the good shard is kept
    assert not (cfg.run_path / "ingest" / "_done" / "00001.json").exists()


def test_non_utf8_caption_and_absolute_member_name(tmp_path):
    _shard(tmp_path / "in", 0, [("a", "jpg", _img())])
    pq.write_table(pa.table({"key": ["a"], "url": ["http://x/a"], "caption": pa.array([b"caf\xe9 \xff"], pa.binary()),
                             "status": ["success"]}), tmp_path / "in" / "00000.parquet")
    s, rows = _run(tmp_path, tmp_path / "in")
    assert rows.loc["a", "status"] == "ok" and rows.loc["a", "caption"] == "caf\ufffd \ufffd"
    folder = tmp_path / "abs"
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as tar:
        info = tarfile.TarInfo("/etc/evil.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    pq.write_table(pa.table({"key": ["evil"]}), folder / "00000.parquet")
    with pytest.raises(ShardFailed, match="unsafe member name '/etc/evil.jpg'"):
        run_stages(make_config(tmp_path / "r2", folder), LocalExecutor(), log=lambda *_: None)


def test_every_row_failed_still_gives_a_report(tmp_path):
    """A corpus where no row decodes: every stage runs, the report lists every row as failed with
    its reason, and the export is empty (no 'no embedded rows' error)."""
    _shard(tmp_path / "in", 0, [("a", "jpg", b"not an image"), ("b", "jpg", b""), ("c", "png", b"\x89PNG broken")])
    s, rows = _run(tmp_path, tmp_path / "in")
    assert s["input_rows"] == 3 and s["failed"] == 3 and s["kept"] == s["removed"] == 0
    assert (rows.status == "failed").all() and rows.error.str.len().gt(0).all()
    assert s["codec"] is None and s["verified_pairs"] == 0
