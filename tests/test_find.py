"""`dedup2b find`: rows of a built index that copy given images. A real run (folder input, local
executor, the offline default model) on real photos and a resized re-encode of one; queries are an
edited copy (10% crop + JPEG q=60), a photo not in the corpus, an undecodable file."""
import io

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dedup2b import demo, lookup
from dedup2b.cli import main

CORPUS = ("astronaut", "chelsea", "rocket", "camera", "brick", "moon", "coins", "horse", "motorcycle", "flower")


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A finished run over 10 photos + a half-size q=70 copy of chelsea; its index is
    <root>/indexes/photos. Queries under <root>/queries."""
    root = tmp_path_factory.mktemp("find")
    photos = dict(demo.base_images())
    corpus = root / "photos"
    (corpus / "copies").mkdir(parents=True)
    for name in CORPUS:
        (corpus / f"{name}.jpg").write_bytes(_jpeg(photos[name], 90))
    cat = photos["chelsea"]
    (corpus / "copies" / "chelsea_small.jpg").write_bytes(_jpeg(cat.resize((cat.width // 2, cat.height // 2)), 70))
    assert main(["run", "--input", str(corpus), "--run-dir", str(root / "reports" / "photos"),
                 "--index-dir", str(root / "indexes" / "photos"), "--executor", "local"]) == 0
    q = root / "queries"
    q.mkdir()
    w, h = cat.size
    (q / "edited_cat.jpg").write_bytes(_jpeg(cat.crop((w // 10, h // 10, w, h)), 60))   # crop 10% + q=60
    (q / "coffee.png").write_bytes(_jpeg(photos["coffee"], 90))          # not in the corpus (a JPEG named .png)
    return root


def test_an_edited_copy_finds_its_rows(built):
    found = lookup.find(built / "indexes" / "photos", [built / "queries" / "edited_cat.jpg"])
    assert list(found.columns) == lookup.COLUMNS
    assert found.attrs["threshold"] == pytest.approx(0.80)        # the run's threshold (the model's default)
    assert "reports/photos" in found.attrs["threshold_from"]
    assert set(found["key"]) == {"chelsea.jpg", "copies/chelsea_small.jpg"}
    assert (found["similarity"] >= 0.80).all() and found["similarity"].is_monotonic_decreasing
    assert found["pixel_check"].isna().all() and (found["gid"].to_numpy() >> 32 == 0).all()


def test_an_unrelated_photo_finds_nothing(built):
    found = lookup.find(built / "indexes" / "photos", [built / "queries" / "coffee.png"])
    assert found.empty and found.attrs["queries"] == 1 and list(found.columns) == lookup.COLUMNS


def test_a_folder_with_an_undecodable_file(built, capsys):
    q = built / "queries"
    (q / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (q / "notes.txt").write_text("not an image, not a query")
    try:
        found = lookup.find(built / "indexes" / "photos", [q])
    finally:
        (q / "broken.jpg").unlink()
        (q / "notes.txt").unlink()
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "decode" in err and "notes.txt" not in err
    assert found.attrs["queries"] == 2
    assert set(found["query"]) == {str(q / "edited_cat.jpg")}
    assert set(found["key"]) == {"chelsea.jpg", "copies/chelsea_small.jpg"}


def test_the_cli_prints_the_table_and_writes_parquet(built, capsys, monkeypatch):
    monkeypatch.chdir(built)                     # --index NAME: indexes/NAME under the current folder
    assert main(["find", "queries", "--index", "photos", "--out", "hits.parquet"]) == 0
    out = capsys.readouterr().out
    assert "similarity" in out and "queries/edited_cat.jpg" in out and "copies/chelsea_small.jpg" in out
    assert "threshold 0.800" in out
    table = pq.read_table(built / "hits.parquet")
    assert table.column_names == lookup.COLUMNS
    df = table.to_pandas()
    # the folder run's rows have their images: each match is checked by pixels, and confirmed
    assert set(df["key"]) == {"chelsea.jpg", "copies/chelsea_small.jpg"} and df["pixel_check"].all()
    assert str(table.schema.field("pixel_check").type) == "bool" and "pixel check" in out
    assert main(["find", "queries", "--index", "photos", "--out", "raw.parquet", "--no-pixels"]) == 0
    assert pq.read_table(built / "raw.parquet").to_pandas()["pixel_check"].isna().all()
    # a query without copies, and --threshold above the copy's similarity: "no copies found", exit 0
    assert main(["find", "queries/coffee.png", "--index", "photos", "--out", "none.parquet"]) == 0
    assert "no copies found" in capsys.readouterr().out
    assert pq.read_table(built / "none.parquet").num_rows == 0
    assert main(["find", "queries/edited_cat.jpg", "--index", "photos", "--threshold", "0.99"]) == 0
    out = capsys.readouterr().out
    assert "no copies found" in out and "threshold 0.990 (--threshold)" in out


def test_errors_exit_2_with_one_line(built, capsys, tmp_path):
    bare = tmp_path / "bare"               # an index folder whose register stage never ran
    bare.mkdir()
    (bare / "codec.json").write_bytes((built / "indexes" / "photos" / "codec.json").read_bytes())
    assert main(["find", str(built / "queries"), "--index", str(bare)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(bare) in err and "registry" in err and len(err.splitlines()) == 1
    assert main(["find", "--index", str(built / "indexes" / "photos")]) == 2          # no images at all
    err = capsys.readouterr().err.strip()
    assert "no images" in err and len(err.splitlines()) == 1
    (tmp_path / "empty").mkdir()
    assert main(["find", str(tmp_path / "empty"), "--index", str(built / "indexes" / "photos")]) == 2
    assert main(["find", str(built / "queries"), "--index", str(tmp_path / "nowhere")]) == 2
    assert "no such index folder" in capsys.readouterr().err


def test_the_search_is_exact(built):
    """The fp16 GEMM only picks candidates: at any threshold the answer is the exact brute force."""
    index = lookup.open_index(built / "indexes" / "photos")
    gids = np.sort(pq.read_table(built / "indexes" / "photos" / "registry" / "registry.parquet")["gid"].to_numpy())
    stored = index.target.get(gids)
    rng = np.random.default_rng(0)
    queries = stored[[1, 4]] + 0.3 * rng.standard_normal((2, stored.shape[1])).astype(np.float32) / np.sqrt(
        stored.shape[1])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = queries @ stored.T
    top = np.sort(exact.ravel())
    for thr in (0.3, 0.6, float(top[-3] + top[-4]) / 2):
        found = lookup.find(index, vectors=queries, names=["a", "b"], threshold=thr)
        want = {(("a", "b")[i], int(gids[j])) for i, j in zip(*np.nonzero(exact >= thr))}
        assert set(zip(found["query"], found["gid"].astype(int))) == want
        qi, g, _ = lookup.search(index, queries, thr, chunk=4)         # several chunks per shard
        assert {(("a", "b")[i], int(x)) for i, x in zip(qi, g)} == want
        sims = dict(zip(zip(found["query"], found["gid"].astype(int)), found["similarity"]))
        for (q, g), s in sims.items():
            assert s == pytest.approx(exact[("a", "b").index(q), np.searchsorted(gids, g)], abs=1e-6)


def test_the_pixel_verifier_hook_gets_both_images(built):
    """check_pixels hands verify() the query's bytes and the row's own bytes, read back from the
    run's input; a test verifier (byte equality) shows which is which."""
    corpus_moon = built / "photos" / "moon.jpg"
    found = lookup.find(built / "indexes" / "photos", [corpus_moon, built / "queries" / "edited_cat.jpg"],
                        verify=lambda q, row: (q == row["image"], 1.0))
    got = dict(zip(found["key"], found["pixel_check"]))
    assert got == {"moon.jpg": True, "chelsea.jpg": False, "copies/chelsea_small.jpg": False}
    assert found["pixel_check"].dtype == pd.BooleanDtype()
