import pytest

from dedup2b.core.config import ConfigError, diff_fields, from_dict, load
from dedup2b.stages import FIELDS


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="search.treshold"):
        from_dict({"input": {"path": "x"}, "run_dir": "r", "search": {"treshold": 0.9}})


def test_invalid_value_is_named():
    with pytest.raises(ConfigError, match="search.threshold"):
        from_dict({"input": {"path": "x"}, "run_dir": "r", "search": {"threshold": 1.5}})
    with pytest.raises(ConfigError, match="run_dir"):
        from_dict({"input": {"path": "x"}})
    with pytest.raises(ConfigError, match="search.cell_dim"):
        from_dict({"input": {"path": "x"}, "run_dir": "r", "search": {"cell_dim": -1}})


def test_threshold_default_follows_model():
    a = from_dict({"input": {"path": "x"}, "run_dir": "r"})
    b = from_dict({"input": {"path": "x"}, "run_dir": "r", "embed": {"model": "open_clip:ViT-B-32"}})
    assert a.search.threshold == 0.80 and b.search.threshold == 0.95
    # the descriptor guard is off where every member's pixels are checked against its
    # representative (image input, member check on), below the pixel check's band without the
    # member check, else 0.10 below the threshold
    assert b.group.min_rep_similarity == -1.0
    d = from_dict({"input": {"path": "x"}, "run_dir": "r", "embed": {"model": "open_clip:ViT-B-32"},
                   "group": {"member_check": False}})
    assert d.group.min_rep_similarity == pytest.approx(d.verify.low - 0.10) == pytest.approx(0.65)
    c = from_dict({"input": {"path": "x"}, "run_dir": "r", "embed": {"model": "open_clip:ViT-B-32"},
                   "verify": {"method": "off"}})
    assert c.group.min_rep_similarity == pytest.approx(0.85)


def test_fingerprint_tracks_only_relevant_fields():
    base = {"input": {"path": "x"}, "run_dir": "r"}
    a = from_dict(base)
    b = from_dict({**base, "search": {"threshold": 0.9}})
    assert a.fingerprint(FIELDS["embed"]) == b.fingerprint(FIELDS["embed"])
    assert a.fingerprint(FIELDS["search"]) != b.fingerprint(FIELDS["search"])
    assert "search.threshold" in diff_fields(a.to_dict(), b.to_dict())


def test_yaml_load_with_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("input: {path: /data}\nrun_dir: /tmp/r\ncodec: {nlist: 64}\n")
    cfg = load(p, {"search.margin": 0.2})
    assert cfg.codec.nlist == 64 and cfg.search.margin == 0.2


def test_cli_and_jobs_build_the_same_config(tmp_path, monkeypatch):
    """One config path: the same YAML (relative paths, no run_dir or index_dir) and the same --set
    give the same config, paths included, through `dedup2b run` and through `jobs.dedup`."""
    import argparse

    from dedup2b import cli
    from jobs import dedup as job
    (tmp_path / "data").mkdir()
    for name in ("00000.parquet", "00000.tar"):           # what img2dataset output looks like
        (tmp_path / "data" / name).write_bytes(b"")
    yaml = tmp_path / "c.yaml"
    yaml.write_text("input: {path: data}\nsearch: {threshold: 0.9}\n")
    monkeypatch.chdir(tmp_path)
    sets = ["codec.nlist=64", "export.formats=[\"keep\"]"]
    args = argparse.Namespace(config=str(yaml), set=sets, input=None, model=None, threshold=None, run_dir=None,
                              index_dir=None, input_format=None)
    a = cli.build_config(args)
    b, uploads = job.load_config(argparse.Namespace(config=str(yaml), set=sets, base_dir=".", stage_dir=None))
    assert a.to_dict() == b.to_dict() and uploads == []
    assert a.run_path == tmp_path / "reports" / "data" and a.index_path == tmp_path / "indexes" / "data"
    assert a.input.path == str(tmp_path / "data") and a.codec.nlist == 64 and a.export.formats == ["keep"]
    with pytest.raises(ConfigError, match="--set"):
        cli.build_config(argparse.Namespace(**{**vars(args), "set": ["codec.nlist"]}))


def test_set_values_take_the_fields_type_and_bad_ones_are_named(tmp_path, capsys):
    from dedup2b.cli import main
    from dedup2b.core.config import build
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "00000.parquet").write_bytes(b"")
    (tmp_path / "x" / "00000.tar").write_bytes(b"")
    cfg = build(None, ["group.exact_bytes=False", "codec.opq=true", "search.threshold=0.9", "embed.batch_size=64",
                       "export.formats=keep,hf"], tmp_path, {"input.path": "x"})
    assert cfg.group.exact_bytes is False and cfg.codec.opq is True and cfg.search.threshold == 0.9
    assert cfg.embed.batch_size == 64 and cfg.export.formats == ["keep", "hf"]
    with pytest.raises(ConfigError, match="search.threshold: 'abc' is not a valid float"):
        build(None, ["search.threshold=abc"], tmp_path, {"input.path": "x"})
    with pytest.raises(ConfigError, match="embed.batch_size: 2.5 is not a valid int"):
        build(None, ["embed.batch_size=2.5"], tmp_path, {"input.path": "x"})
    listed = tmp_path / "list.yaml"
    listed.write_text("- input\n- search\n")
    shards = tmp_path / "in"
    shards.mkdir()
    (shards / "00000.parquet").write_bytes(b""), (shards / "00000.tar").write_bytes(b"")
    for argv, needle in ((["run", "--input", str(shards), "--set", "search.threshold=abc"], "search.threshold"),
                         (["run", "--config", str(listed)], "list.yaml: a config is a mapping")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_an_unwritable_run_dir_is_a_one_line_error(demo_corpus, tmp_path, capsys):
    """A run dir that cannot be made (here: under a file, which fails for root too) is named."""
    from dedup2b.cli import main
    _, shards = demo_corpus
    (tmp_path / "file").write_text("x")
    assert main(["ingest", "--input", str(shards), "--run-dir", str(tmp_path / "file" / "run"),
                 "--executor", "local"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "file") in err[0], err


def test_the_input_format_is_detected_and_said(tmp_path):
    from dedup2b.core.config import build
    from dedup2b.sources import InputError
    img, emb, empty = tmp_path / "img", tmp_path / "emb", tmp_path / "empty"
    img.mkdir(), (emb / "img_emb").mkdir(parents=True), (emb / "metadata").mkdir(), empty.mkdir()
    (img / "00003.parquet").write_bytes(b""), (img / "00003.tar").write_bytes(b"")
    (emb / "img_emb" / "img_emb_0000.npy").write_bytes(b"")
    said = []
    a = build(None, [], tmp_path, {"input.path": str(img)}, log=said.append)
    b = build(None, [], tmp_path, {"input.path": str(emb)}, log=said.append)
    assert a.input.format == "img2dataset" and b.input.format == "embeddings"
    assert b.embed.model == "precomputed:clip" and b.search.threshold == 0.95
    assert len(said) == 2 and "input format: embeddings (detected in" in said[1]
    with pytest.raises(InputError, match="no input format recognised.*NNNNN.parquet.*img_emb"):
        build(None, [], tmp_path, {"input.path": str(empty)})
    assert build(None, [], tmp_path, {"input.path": str(empty), "input.format": "img2dataset"}).input.format == "img2dataset"


def test_the_pixel_checks_band_starts_lower_for_the_offline_model():
    """verify.low defaults to the threshold less the model family's band (0.40 for the offline
    encoder, whose heavily edited copies sit down to cosine 0.4; 0.20 otherwise); given, it stays."""
    a = from_dict({"input": {"path": "x"}, "run_dir": "r"})
    b = from_dict({"input": {"path": "x"}, "run_dir": "r", "embed": {"model": "open_clip:ViT-B-32"}})
    c = from_dict({"input": {"path": "x"}, "run_dir": "r", "verify": {"low": 0.7}})
    assert a.verify.low == pytest.approx(0.40) and b.verify.low == pytest.approx(0.75)
    assert c.verify.low == pytest.approx(0.7)
