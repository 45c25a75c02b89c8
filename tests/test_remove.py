"""`dedup2b remove`: removal requests applied to a built index and its runs, on real photos in
img2dataset shards (local executor, the offline default model).

The corpus (shard 00000): 7 photos and a half-size q=70 copy of the astronaut (one group of two).
Request 1 (--images): an edited copy of the cat (10% crop, q=60). Request 2 (--keys): the
astronaut's copy (its group's representative goes with it) and a key the index does not hold yet.
Then an incremental run (shard 00001) against the index: a new copy of the cat, a row with the
requested key, and a photo nobody asked about."""
import io
import json
import tarfile

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dedup2b import demo
from dedup2b.cli import main
from dedup2b.lib import requests

CORPUS = ("astronaut", "chelsea", "rocket", "camera", "brick", "moon", "coins")
LATER = ("chelsea", "coffee", "horse")          # shard 00001: a cat copy, the requested key, a new photo


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _samples(run_dir):
    return pq.read_table(run_dir / "report" / "samples.parquet").to_pandas().set_index("key")


def _tar_samples(run_dir) -> set[str]:
    names = set()
    for tar in (run_dir / "export" / "webdataset").glob("*.tar"):
        with tarfile.open(tar) as t:
            names |= {m.name.rpartition(".")[0] for m in t}
    return names


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    """Run, remove by images, remove by keys, then an incremental run; what each step left."""
    root = tmp_path_factory.mktemp("remove")
    photos = dict(demo.base_images())
    rows = [{"url": f"http://x.test/{n}.jpg", "caption": f"a photo of {n}", "bytes": _jpeg(photos[n], 90)}
            for n in CORPUS]
    a = photos["astronaut"]
    rows.append({"url": "http://y.test/small.jpg", "caption": "astronaut, small",
                 "bytes": _jpeg(a.resize((a.width // 2, a.height // 2)), 70)})           # key 000000007
    cat = photos["chelsea"]
    later = [{"url": "http://z.test/cat.jpg", "caption": "cat", "bytes": _jpeg(cat.rotate(2, expand=False), 80)},
             {"url": "http://z.test/coffee.jpg", "caption": "coffee", "bytes": _jpeg(photos["coffee"], 90)},
             {"url": "http://z.test/horse.jpg", "caption": "horse", "bytes": _jpeg(photos["horse"], 90)}]
    demo.write_shards(rows + later, root / "all", rows_per_shard=len(rows))            # 00000 and 00001
    for part, shard in (("first", "00000"), ("later", "00001")):
        (root / part).mkdir()
        for ext in (".tar", ".parquet"):
            (root / part / f"{shard}{ext}").write_bytes((root / "all" / f"{shard}{ext}").read_bytes())
    run, index = root / "runs" / "first", root / "indexes" / "photos"
    assert main(["run", "--input", str(root / "first"), "--run-dir", str(run), "--index-dir", str(index),
                 "--executor", "local"]) == 0
    out = {"root": root, "run": run, "index": index, "before": _samples(run)}
    w, h = cat.size
    (root / "query.jpg").write_bytes(_jpeg(cat.crop((w // 10, h // 10, w, h)), 60))
    assert main(["remove", "--images", str(root / "query.jpg"), "--index", str(index), "--executor", "local"]) == 0
    out["by_images"] = _samples(run)
    out["keep_1"] = pq.read_table(run / "export" / "keep.parquet").to_pandas()
    out["tar_1"] = _tar_samples(run)
    out["summary_1"] = json.loads((run / "report" / "summary.json").read_text())
    (root / "keys.txt").write_text("000000007\n\n  000010001  \n")
    assert main(["remove", "--keys", str(root / "keys.txt"), "--index", str(index), "--executor", "local"]) == 0
    out["by_keys"] = _samples(run)
    out["keep_2"] = pq.read_table(run / "export" / "keep.parquet").to_pandas()
    out["remove_2"] = pq.read_table(run / "export" / "remove.parquet").to_pandas()
    out["tar_2"] = _tar_samples(run)
    out["html_2"] = (run / "report" / "index.html").read_text()
    out["logs"] = sorted((index / "requests").glob("req-*"))
    later_run = root / "runs" / "later"
    assert main(["run", "--input", str(root / "later"), "--run-dir", str(later_run), "--index-dir",
                 str(root / "indexes" / "later"), "--against", str(index), "--executor", "local"]) == 0
    out["later"] = _samples(later_run)
    out["later_keep"] = set(pq.read_table(later_run / "export" / "keep.parquet")["key"].to_pylist())
    return out


def test_remove_by_images_takes_every_copy_out_of_the_export(story):
    before, after = story["before"], story["by_images"]
    assert pd_isna(before.loc["000000001", "removed_reason"])
    assert after.loc["000000001", "removed_reason"] == "request"          # the cat, found by its edited copy
    changed = after.index[after["removed_reason"].fillna("") != before["removed_reason"].fillna("")]
    assert list(changed) == ["000000001"]                                  # nothing else moved
    assert "000000001" not in set(story["keep_1"]["key"]) and "000000001" not in story["tar_1"]
    s = story["summary_1"]
    assert s["removed_by_reason"]["request"] == 1 and s["removal_requests"] == 1
    assert s["input_rows"] == s["kept"] + s["removed"] + s["failed"] == 8


def test_remove_by_keys_takes_the_groups_with_them(story):
    s = story["by_keys"]
    # the listed copy and its group's representative (the astronaut) go; the cat stays out
    assert s.loc[["000000000", "000000007", "000000001"], "removed_reason"].tolist() == ["request"] * 3
    assert set(story["keep_2"]["key"]) == {"000000002", "000000003", "000000004", "000000005", "000000006"}
    assert set(story["remove_2"]["key"]) == {"000000000", "000000001", "000000007"}
    assert set(story["remove_2"]["removed_reason"]) == {"request"}
    assert story["tar_2"] == set(story["keep_2"]["key"])                  # the shards hold the kept rows only
    html = story["html_2"]                  # the gallery says why: the astronaut's group was requested away
    assert "<th>removed by reason</th><td>request: 3</td>" in html
    assert html.count("(removed: request)") == 2 and "(kept)" not in html
    assert len(s) == len(story["keep_2"]) + len(story["remove_2"]) + int((s["status"] != "ok").sum())


def test_the_request_log_is_in_the_index(story):
    folder = story["index"] / "requests"
    assert [p.suffix for p in story["logs"]] == [".json", ".parquet"] * 2    # a parquet and a json per request
    logs = [json.loads(p.read_text()) for p in story["logs"] if p.suffix == ".json"]
    assert len(logs) == 2 and logs[0]["time"] <= logs[1]["time"]
    assert logs[0]["rows"] == 1 and logs[0]["rows_by_via"] == {"image": 1} and logs[0]["queries"] == 1
    assert logs[1]["rows"] == 2 and logs[1]["rows_by_via"] == {"key": 1, "group": 1}
    assert logs[1]["keys"] == 2 and logs[1]["keys_not_in_index"] == 1
    rows = pq.read_table(folder / f"{logs[1]['request']}.parquet").to_pandas()
    assert set(zip(rows["key"], rows["via"])) == {("000000007", "key"), ("000000000", "group"), ("000010001", "key")}
    assert rows.loc[rows["key"] == "000010001", "gid"].isna().all()        # not in the index yet
    assert not (story["index"] / "registry" / "requests").exists()          # registry/ stays the register stage's


def test_a_later_incremental_run_keeps_removed_rows_out(story):
    s = story["later"]
    assert s.loc["000010000", "removed_reason"] == "request"     # a new copy of the removed cat
    assert s.loc["000010001", "removed_reason"] == "request"     # the requested key, ingested later
    assert pd_isna(s.loc["000010002", "removed_reason"])         # a photo nobody asked about
    assert story["later_keep"] == {"000010002"}


def pd_isna(value) -> bool:
    return pd.isna(value)


def test_a_request_logged_since_the_report_reruns_report_and_export(story, capsys):
    """The request's version is part of the report's and export's fingerprints: both are pending,
    an export alone is refused (it would ship rows the request removes), report + export apply it."""
    run = story["run"]
    requests.write(story["index"], pa.table({"gid": [2], "key": ["000000002"], "group_id": [2], "run": [str(run)],
                                             "via": ["key"], "query": ["000000002"], "similarity": [None]}),
                   {"keys": 1, "rows": 1})
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "report   {'done': 0, 'pending': 1}" in out and "export   {'done': 0, 'pending': 1}" in out
    assert main(["export", "--run-dir", str(run), "--executor", "local"]) == 2
    assert "run `dedup2b report`" in capsys.readouterr().err
    assert main(["report", "--run-dir", str(run), "--executor", "local"]) == 0
    assert main(["export", "--run-dir", str(run), "--executor", "local"]) == 0
    assert _samples(run).loc["000000002", "removed_reason"] == "request"
    assert "000000002" not in set(pq.read_table(run / "export" / "keep.parquet")["key"].to_pylist())


def test_the_command_and_the_job_want_images_or_keys(capsys, tmp_path):
    from jobs import remove as remove_job
    for argv in (["--index", str(tmp_path)], ["--index", str(tmp_path), "--keys", "k.txt", "--images", "a.jpg"]):
        with pytest.raises(SystemExit):
            main(["remove", *argv])
        with pytest.raises(SystemExit):
            remove_job.main(argv)
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert main(["remove", "--index", str(tmp_path), "--keys", str(tmp_path / "empty.txt")]) == 2
    assert "no keys" in capsys.readouterr().err
