import pytest

from pipeline.config import ConfigError, diff_fields, from_dict, load


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="search.treshold"):
        from_dict({"input": {"path": "x"}, "run_dir": "r", "search": {"treshold": 0.9}})


def test_invalid_value_is_named():
    with pytest.raises(ConfigError, match="search.threshold"):
        from_dict({"input": {"path": "x"}, "run_dir": "r", "search": {"threshold": 1.5}})
    with pytest.raises(ConfigError, match="run_dir"):
        from_dict({"input": {"path": "x"}})


def test_threshold_default_follows_model():
    a = from_dict({"input": {"path": "x"}, "run_dir": "r"})
    b = from_dict({"input": {"path": "x"}, "run_dir": "r", "embed": {"model": "open_clip:ViT-B-32"}})
    assert a.search.threshold == 0.80 and b.search.threshold == 0.95
    assert b.group.min_rep_similarity == pytest.approx(0.85)


def test_fingerprint_tracks_only_relevant_fields():
    base = {"input": {"path": "x"}, "run_dir": "r"}
    a = from_dict(base)
    b = from_dict({**base, "search": {"threshold": 0.9}})
    assert a.fingerprint("embed") == b.fingerprint("embed")
    assert a.fingerprint("search") != b.fingerprint("search")
    assert "search.threshold" in diff_fields(a.to_dict(), b.to_dict())


def test_yaml_load_with_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("input: {path: /data}\nrun_dir: /tmp/r\ncodec: {nlist: 64}\n")
    cfg = load(p, {"search.margin": 0.2})
    assert cfg.codec.nlist == 64 and cfg.search.margin == 0.2
