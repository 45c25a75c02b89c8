"""Hugging Face parquet as input (files written by `datasets` itself, an `Image()` feature holding
real photos, a JPEG re-encoded copy, a null image and bytes that are no image): detected, the copy
grouped with its original, failed rows with their reasons, every row accounted for, and the hf
export the input's own rows and columns, kept rows only, bytes unchanged."""
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dedup2b.cli import main
from dedup2b.core import config
from dedup2b.sources import InputError, detect, hf

GARBAGE = b"this is not an image, only some bytes"


def _encode(array, fmt: str, **kw) -> bytes:
    from PIL import Image
    out = io.BytesIO()
    Image.fromarray(array).save(out, fmt, **kw)
    return out.getvalue()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """Two parquet files written by datasets.Dataset.to_parquet under data/ (the Hub's layout)."""
    import datasets
    from skimage import data as sk
    photos = {name: _encode(getattr(sk, name)(), "PNG") for name in ("astronaut", "coffee", "chelsea", "camera")}
    copy = _encode(sk.chelsea(), "JPEG", quality=80)         # the same photo, re-encoded
    images = [photos["astronaut"], photos["coffee"], photos["chelsea"], None, photos["camera"], copy, GARBAGE]
    names = ["astronaut", "coffee", "chelsea", "none", "camera", "chelsea-jpeg", "garbage"]
    ds = datasets.Dataset.from_dict(
        {"image": [None if b is None else {"bytes": b, "path": f"{n}.png"} for b, n in zip(images, names)],
         "caption": [f"a photo: {n}" for n in names], "source_id": list(range(100, 107)),
         "tags": [[n, "skimage"] for n in names]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                    "source_id": datasets.Value("int64"),
                                    "tags": datasets.Sequence(datasets.Value("string"))}))
    root = tmp_path_factory.mktemp("hfset")
    (root / "data").mkdir()
    for i, (lo, hi) in enumerate(((0, 4), (4, 7))):
        ds.select(range(lo, hi)).to_parquet(str(root / "data" / f"train-{i:05d}-of-00002.parquet"))
    keys = {f"data/train-00000-of-00002/{r}": names[r] for r in range(4)}
    keys.update({f"data/train-00001-of-00002/{r - 4}": names[r] for r in range(4, 7)})
    return root, keys


def _input_rows(root) -> dict:
    """key -> the input row (as python), read back with pyarrow."""
    out = {}
    for p in sorted((root / "data").glob("*.parquet")):
        for i, row in enumerate(pq.read_table(p).to_pylist()):
            out[f"data/{p.stem}/{i}"] = row
    return out


@pytest.fixture(scope="module")
def hf_run(hf_folder, tmp_path_factory):
    """`dedup2b run --input FOLDER` (format not given), local executor, default offline model."""
    root, keys = hf_folder
    tmp = tmp_path_factory.mktemp("hfrun")
    argv = ["run", "--input", str(root), "--run-dir", str(tmp / "run"), "--index-dir", str(tmp / "idx"),
            "--executor", "local"]
    assert main(argv) == 0
    return tmp / "run", root, keys


def test_an_hf_folder_is_detected_as_hf(hf_folder, tmp_path):
    root, _ = hf_folder
    assert detect(root) == "hf"
    cfg = config.build(None, [], tmp_path, {"input.path": str(root)})
    assert cfg.input.format == "hf" and cfg.input.image_column == "image"
    shards = hf.list_shards(root)
    assert [s.parquet.name for s in shards] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert [hf.count_rows(s) for s in shards] == [4, 3]


def test_img2dataset_and_embeddings_folders_are_still_theirs(tmp_path):
    """Their folders hold parquet files too; a binary column there does not make them hf."""
    img, emb = tmp_path / "img", tmp_path / "emb"
    img.mkdir(), (emb / "img_emb").mkdir(parents=True), (emb / "metadata").mkdir()
    table = pa.table({"key": ["a"], "jpg": pa.array([b"\xff\xd8"], pa.binary())})
    pq.write_table(table, img / "00000.parquet")
    (img / "00000.tar").write_bytes(b"")
    (emb / "img_emb" / "img_emb_0000.npy").write_bytes(b"")
    pq.write_table(table, emb / "metadata" / "metadata_0000.parquet")
    assert detect(img) == "img2dataset" and detect(emb) == "embeddings"
    assert not hf.detect(img) and not hf.detect(emb)


def test_the_copy_is_grouped_and_every_row_accounted_for(hf_run):
    run, root, keys = hf_run
    s = pq.read_table(run / "report" / "samples.parquet").to_pandas().set_index("key")
    assert sorted(s.index) == sorted(keys)
    name = keys
    by = {name[k]: r for k, r in s.iterrows()}
    assert by["none"].status == "failed" and "image column 'image' is null" in by["none"].error
    assert "train-00000-of-00002.parquet row 3" in by["none"].error
    assert by["garbage"].status == "failed" and by["garbage"].error.startswith("decode")
    ok = s[s.status == "ok"]
    groups = {frozenset(name[k] for k in g.index) for _, g in ok.groupby("group_id")}
    assert groups == {frozenset({"chelsea", "chelsea-jpeg"}), frozenset({"astronaut"}), frozenset({"coffee"}),
                      frozenset({"camera"})}
    assert by["coffee"].caption == "a photo: coffee"
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert summary["input_rows"] == 7 == summary["kept"] + summary["removed"] + summary["failed"]
    assert (summary["kept"], summary["removed"], summary["failed"]) == (4, 1, 2)


def test_the_hf_export_is_the_inputs_kept_rows_with_its_columns(hf_run, tmp_path):
    import datasets
    run, root, keys = hf_run
    keep = pq.read_table(run / "export" / "keep.parquet").to_pandas()
    inputs = _input_rows(root)
    files = sorted((run / "export" / "hf").glob("*.parquet"))
    assert [p.name for p in files] == ["00000.parquet", "00001.parquet"]
    in_schema = pq.read_schema(root / "data" / "train-00000-of-00002.parquet")
    for p in files:
        assert pq.read_schema(p).equals(in_schema, check_metadata=True)      # HF features metadata too
    exported = pa.concat_tables([pq.read_table(p) for p in files]).to_pylist()
    # the kept rows, in input order, every column (image bytes included) exactly as the input has it
    assert exported == [inputs[k] for k in sorted(keep.key, key=lambda k: (k.rsplit("/", 1)[0], int(k.rsplit("/", 1)[1])))]
    ds = datasets.load_dataset("parquet", data_files=[str(p) for p in files], split="train",
                               cache_dir=str(tmp_path / "cache"))
    assert ds.column_names == ["image", "caption", "source_id", "tags"] and len(ds) == len(keep) == 4
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds[0]["image"].size == (512, 512)           # decodes as a PIL image, as a trainer reads it
    assert sorted(ds["source_id"]) == sorted(inputs[k]["source_id"] for k in keep.key)


def test_the_format_can_be_given(hf_folder, tmp_path):
    root, keys = hf_folder
    assert main(["ingest", "--input", str(root), "--input-format", "hf", "--run-dir", str(tmp_path / "run"),
                 "--index-dir", str(tmp_path / "idx"), "--executor", "local"]) == 0
    ingest = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "run" / "ingest").glob("*.parquet"))])
    assert sorted(ingest["key"].to_pylist()) == sorted(keys)


def test_a_missing_image_column_names_the_file_and_the_column(tmp_path, capsys):
    import datasets
    root = tmp_path / "noimg"
    root.mkdir()
    ds = datasets.Dataset.from_dict({"picture": [{"bytes": GARBAGE, "path": None}], "text": ["x"]},
                                    features=datasets.Features({"picture": datasets.Image(),
                                                                "text": datasets.Value("string")}))
    ds.to_parquet(str(root / "part.parquet"))
    shard = hf.list_shards(root)[0]
    with pytest.raises(InputError, match=r"part\.parquet: no image column 'image' \(columns: picture, text\)"):
        hf.ingest_shard(shard, config.InputConfig(path=str(root), format="hf"))
    assert main(["ingest", "--input", str(root), "--run-dir", str(tmp_path / "run"),
                 "--index-dir", str(tmp_path / "idx"), "--executor", "local"]) == 2
    err = capsys.readouterr().err
    assert "part.parquet: no image column 'image'" in err and "picture, text" in err
    # the configured column works
    table = hf.ingest_shard(shard, config.InputConfig(path=str(root), format="hf", image_column="picture"))
    assert table["status"].to_pylist() == ["ok"] and table["member"].to_pylist() == ["picture[0]"]


def test_binary_images_and_odd_captions_and_key_column(tmp_path):
    """Raw binary image column, captions that are bytes (not UTF-8) or numbers, keys from a column
    (a repeat in the file fails the later row), empty bytes; batches smaller than the file."""
    root = tmp_path / "bin"
    root.mkdir()
    blobs = [b"\x89PNG one", b"", None, b"\xff\xd8 three", b"\xff\xd8 four"]
    pq.write_table(pa.table({"jpg": pa.array(blobs, pa.binary()),
                             "caption": pa.array([b"\xff\xfe caf\xc3\xa9", b"x", None, b"y", b"z"], pa.binary()),
                             "id": ["a", "b", "c", "a", None]}), root / "x.parquet", row_group_size=2)
    shard = hf.list_shards(root)[0]
    cfg = config.InputConfig(path=str(root), format="hf", image_column="jpg", key_column="id")
    t = hf.ingest_shard(shard, cfg).to_pylist()
    assert [r["key"] for r in t] == ["a", "b", "c", "a", "x/4"]
    assert [r["status"] for r in t] == ["ok", "failed", "failed", "failed", "ok"]
    assert t[0]["caption"] == "\ufffd\ufffd café" and t[2]["caption"] is None
    assert "holds empty bytes" in t[1]["error"] and "is null" in t[2]["error"]
    assert t[3]["error"] == "key a appears twice in x.parquet (rows 0 and 3): only the first is kept"
    assert [r["row"] for r in t] == list(range(5)) and len({r["gid"] for r in t}) == 5
    got = hf.read_images(shard, {"jpg[4]": "four", "jpg[0]": "one"})
    assert got == [("one", blobs[0]), ("four", blobs[4])]
    with pytest.raises(InputError, match=r"no column 'nope' \(input.text_column; columns: jpg, caption, id\)"):
        hf.ingest_shard(shard, config.InputConfig(path=str(root), format="hf", image_column="jpg", text_column="nope"))
    out = tmp_path / "out.parquet"
    assert hf.copy_rows(shard, ["jpg[0]", "jpg[4]"], out) == 2
    assert pq.read_table(out).to_pylist() == [pq.read_table(root / "x.parquet").to_pylist()[i] for i in (0, 4)]
