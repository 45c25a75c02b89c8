"""A folder of images as input (real demo photos and their copies, nested folders, sidecar
captions, a link out of the tree, a broken file): detected, grouped like the same images in
img2dataset shards, keys = relative paths, every file accounted for; the webdataset export read back
byte for byte."""
import json
import os
import tarfile

import pyarrow.parquet as pq
import pytest

from dedup2b import demo
from dedup2b.core import config
from dedup2b.core.executor import LocalExecutor
from dedup2b.driver import run_stages
from dedup2b.sources import detect, folder


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rows = [r for r in demo.build_rows(0) if r["bytes"] is not None]
    truth = {}
    for i, r in enumerate(rows):
        rel = f"{r['cluster']}/{i:03d}.jpg" if i % 2 else f"all/sub{i % 3}/{i:03d}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(r["bytes"])
        truth[rel] = r["cluster"]
        if i % 5 == 0:
            (root / rel).with_suffix(".txt").write_text(r["caption"])
    outside = tmp_path_factory.mktemp("outside") / "secret.jpg"
    outside.write_bytes(rows[0]["bytes"])
    os.symlink(outside, root / "all" / "leak.jpg")                 # leads out of the tree: never read
    (root / "all" / "broken.png").write_bytes(b"\x89PNG not really")  # not decodable: a failed row
    (root / "notes.md").write_text("not an image")                  # not a row
    return root, truth, len(rows)


def test_a_folder_tree_is_detected_and_deduplicated(tree, tmp_path):
    root, truth, n_images = tree
    assert detect(root) == "folder"
    cfg = config.build(None, ["export.formats=keep,hf,webdataset"], tmp_path, {"input.path": str(root)})
    assert cfg.input.format == "folder"
    stats = run_stages(cfg, LocalExecutor(), log=lambda *_: None)
    s = pq.read_table(cfg.run_path / "report" / "samples.parquet").to_pandas().set_index("key")
    assert len(s) == n_images + 2 and stats["report"]["invariant_holds"]
    assert s.loc["all/leak.jpg", "status"] == "failed" and "leads out of" in s.loc["all/leak.jpg", "error"]
    assert s.loc["all/broken.png", "status"] == "failed" and s.loc["all/broken.png", "error"].startswith("decode")
    assert s.loc[next(k for k in truth if k.startswith("all/sub0/")), "caption"]      # sidecar caption
    # the same grouping as the ground truth of the demo photos (copies under edits)
    ok = s[s.status == "ok"]
    found = {frozenset(g.index) for _, g in ok.groupby("group_id")}
    want = {}
    for rel, cluster in truth.items():
        want.setdefault(cluster, set()).add(rel)
    assert found == {frozenset(v) for v in want.values()}
    keep = pq.read_table(cfg.run_path / "export" / "keep.parquet").to_pandas()
    assert set(keep.key) <= set(truth) and len(keep) == len(want)                 # keep-list of paths
    hf = pq.read_table(cfg.run_path / "export" / "hf").to_pandas()
    assert sorted(hf.key) == sorted(keep.key)
    assert all(r["image"]["bytes"] == (root / r["key"]).read_bytes() for _, r in hf.iterrows())
    # webdataset: a sample per kept file, its bytes, sidecar caption and row, read back from the tars
    wds = cfg.run_path / "export" / "webdataset"
    members = {}
    for tar in sorted(wds.glob("*.tar")):
        with tarfile.open(tar) as t:
            members.update({m.name: t.extractfile(m).read() for m in t})
    want = {}
    for key in keep.key:
        sample = folder.sample_name(key)
        want[f"{sample}.{key.rpartition('.')[2]}"] = (root / key).read_bytes()
        side = (root / key).with_suffix(".txt")
        if side.exists():
            want[f"{sample}.txt"] = side.read_bytes()
    assert {k: v for k, v in members.items() if not k.endswith(".json")} == want
    metas = [json.loads(v) for k, v in members.items() if k.endswith(".json")]
    assert sorted(m["key"] for m in metas) == sorted(keep.key) and stats["export"]["exported"] == len(keep)
    assert sum(json.loads((wds / "sizes.json").read_text()).values()) == len(keep)
    assert sorted(pq.read_table(next(wds.glob("*.parquet"))).to_pandas().key) == sorted(keep.key)
    assert "webdataset" not in stats["export"]


def test_sample_names_keep_every_file_apart():
    names = ["cats/a.jpg", "cats/a.png", "v1.0/b.c.jpg", "x%2Ejpg.jpg"]
    got = [folder.sample_name(n) for n in names]
    assert got == ["cats/a%2Ejpg", "cats/a%2Epng", "v1.0/b%2Ec%2Ejpg", "x%252Ejpg%2Ejpg"]
    assert len(set(got)) == len(got) and all("." not in g.rpartition("/")[2] for g in got)


def test_reads_never_follow_a_link_out_of_the_tree(tree):
    root, _, _ = tree
    shard = folder.list_shards(root)[0]
    assert folder.read_images(shard, {"all/leak.jpg": 1}) == []
    assert folder.count_rows(shard) == len(folder.shard_files(shard))
