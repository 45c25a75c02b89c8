"""Groups that never hold two distinct images (a folder of real photos through the whole pipeline):
each image below is a copy of the next (each holds more than half of the other's content), yet
the last holds too little of the first to be a copy of it. Connected components chain the three;
the member check splits off the row that is not a copy of the row the group keeps."""
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from dedup2b.core import config
from dedup2b.core.executor import LocalExecutor
from dedup2b.driver import run_stages
from dedup2b.stages import open_run


def _strip(parts: list[Image.Image]) -> Image.Image:
    w, h = parts[0].size
    out = Image.new("RGB", (w * len(parts), h))
    for k, p in enumerate(parts):
        out.paste(p, (k * w, 0))
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A strip of three panels (a photo, its mirror image, its upside-down image: equally rich in
    detail), its last two panels (2/3 of the strip), and the right 70 % of those (1.4 panels):
    each holds more than half of its neighbour's content, the last under half of the strip's."""
    import skimage.data
    root = tmp_path_factory.mktemp("chain")
    photo = Image.fromarray(skimage.data.coffee()).convert("RGB")
    panels = [photo, ImageOps.mirror(photo), ImageOps.flip(photo)]
    two = _strip(panels[1:])
    w, h = two.size
    for name, img in {"a_strip": _strip(panels), "b_two_panels": two, "c_one_panel": two.crop((w * 3 // 10, 0, w, h)),
                      "d_other": Image.fromarray(skimage.data.chelsea())}.items():
        img.save(root / f"{name}.png")
    return root


def test_a_member_that_is_not_a_copy_of_the_kept_row_is_split_off(folder, tmp_path):
    found = {}
    for check in ("true", "false"):   # verify.low 0: every pair is a candidate (a strip and one of
                                      # its panels are far apart in a global descriptor)
        cfg = config.build(None, [f"group.member_check={check}", "verify.low=0.0"], tmp_path / check,
                           {"input.path": str(folder)})
        stats = run_stages(cfg, LocalExecutor(), stages=["ingest", "embed", "index", "search", "verify", "group"])
        run = open_run(cfg)
        rows = pq.read_table(run.group_rows_dir()).to_pandas()
        ing = run.ingest_table(columns=["gid", "key"]).to_pandas().set_index("gid")["key"]
        rows["key"] = rows["gid"].map(ing)
        groups = rows.groupby("group_id")["key"].apply(lambda k: tuple(sorted(k))).tolist()
        found[check] = (sorted(groups), stats)
    chained, checked = found["false"][0], found["true"][0]
    # the chain is there: without the check the crop of the crop joins the photo's group
    assert ("a_strip.png", "b_two_panels.png", "c_one_panel.png") in chained, chained
    assert ("a_strip.png", "b_two_panels.png") in checked and ("c_one_panel.png",) in checked, checked
    assert ("d_other.png",) in checked
    group_stats = found["true"][1]["group"]
    assert group_stats["member_checks_pixels"] >= 1 and group_stats["member_checks_failed"] >= 1


@pytest.fixture(scope="module")
def copies(tmp_path_factory, folder):
    """The chain above, plus a photo and four copies of it (JPEG at three qualities, mirrored)."""
    import shutil

    import skimage.data
    root = tmp_path_factory.mktemp("copies")
    for f in folder.iterdir():
        shutil.copy(f, root / f.name)
    cat = Image.fromarray(skimage.data.chelsea())
    for q in (90, 70, 50):
        cat.save(root / f"cat_q{q}.jpg", quality=q)
    ImageOps.mirror(cat).save(root / "cat_mirror.png")
    return root


def test_pairs_already_connected_are_not_checked_and_the_groups_stay(copies, tmp_path):
    """verify.skip_connected: pairs are checked most similar first and a pair whose rows accepted
    edges already connect is not checked; the groups are those of checking every pair."""
    folder = copies
    found = {}
    for skip in ("true", "false"):
        cfg = config.build(None, [f"verify.skip_connected={skip}", "verify.low=0.0"], tmp_path / skip,
                           {"input.path": str(folder)})
        stats = run_stages(cfg, LocalExecutor(), stages=["ingest", "embed", "index", "search", "verify", "group"])
        run = open_run(cfg)
        rows = pq.read_table(run.group_rows_dir()).to_pandas()
        found[skip] = (sorted(rows.groupby("group_id")["gid"].apply(lambda g: tuple(sorted(g))).tolist()),
                       stats["verify"])
    assert found["true"][0] == found["false"][0]
    assert found["true"][1]["pairs_implied"] >= 1
    assert found["true"][1]["pairs_checked"] + found["true"][1]["pairs_implied"] == found["false"][1]["pairs_checked"]


def test_a_member_rejected_against_its_kept_row_passes_through_a_full_copy(tmp_path):
    """The kept row is the photo on a canvas (as where it holds more picture than the photo alone); a
    copy turned on another canvas fails against it but is a clear copy of the unedited photo, which
    is a full copy of the kept row (each holds >= verify.FULL_SHARE of the other): it stays, through that anchor and only through it. A part of
    the kept row is not rescued: a crop whose pixels agree with the photo on a canvas but hold less
    than pixels.MIN_SHARE of it stays out, though it is a clear copy of the unedited photo."""
    import numpy as np

    from bench.copies import build_set
    from dedup2b.lib import pixels
    from dedup2b.stages import verify
    cs = build_set(0)
    names = ["rocket|canvas", "rocket", "rocket|canvas+text+rot90", "lfw[3]", "astronaut|canvas", "astronaut", "astronaut|crop"]
    feats = [pixels.features(cs.images[cs.names.index(n)]) for n in names]
    path = tmp_path / "00000.npz"
    np.savez(path, gid=np.arange(len(feats), dtype=np.int64), **verify.pack(feats))
    job = {"a": [2, 2, 3, 6], "b": [0, 0, 0, 4], "alt": [[1], [], [1], [5]], "features": {0: str(path)}}
    got = verify.decide_members(job)
    assert got["pixels"] == [1, 0, 0, 0] and got["via_full_copy"] == 1
    assert not pixels.verify(feats[2], feats[0])[0] and pixels.verify(feats[2], feats[1])[1] >= verify.ANCHOR_ACCEPT
    assert not pixels.explain(feats[2], feats[0], {"min_share": 0.0})["copy"]      # not a part: misaligned
    assert pixels.verify(feats[6], feats[5])[1] >= verify.ANCHOR_ACCEPT and not pixels.verify(feats[6], feats[4])[0]
    assert pixels.explain(feats[6], feats[4], {"min_share": 0.0})["copy"]          # a part of the kept row


def test_keypoints_are_computed_once_per_image_in_bounded_memory(tmp_path):
    """verify.FeatureStore keeps the last `keep` images; an image dropped from them leaves its
    keypoints in a temporary file and gets them back, not computed again."""
    import io

    import numpy as np
    import skimage.data
    from PIL import Image

    from dedup2b.lib import pixels
    from dedup2b.stages import verify

    def jpeg(img):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        return buf.getvalue()
    rocket, astronaut = Image.fromarray(skimage.data.rocket()), Image.fromarray(skimage.data.astronaut())
    images = [rocket, rocket.crop((30, 20, 600, 400)), astronaut, astronaut.transpose(Image.ROTATE_90)]
    path = tmp_path / "00000.npz"
    np.savez(path, gid=np.arange(len(images), dtype=np.int64),
             **verify.pack([pixels.features(jpeg(i)) for i in images]))
    store = verify.FeatureStore({0: path}, keep=2, spill_dir=tmp_path / "spill")
    assert pixels.verify(store.get(0), store.get(1))[0]      # a crop: keypoints on both sides
    first = [store.get(g).keypoints() for g in (0, 1)]
    assert store.keypoint_work()["keypoints"] == 2
    assert pixels.verify(store.get(2), store.get(3))[0]      # a 90 degree turn: keypoints; 0 and 1 dropped
    assert len(store.recent) == 2 and set(store.spilled) == {(0, 0), (0, 1)}
    again = store.get(0)
    assert again.has_keypoints and again.keypoint_s == 0
    assert np.array_equal(again.desc, first[0][1]) and np.array_equal(again.xy, first[0][0])
    assert pixels.verify(again, store.get(1))[0]
    assert store.keypoint_work()["keypoints"] == 4           # each image's once


def test_checks_run_ahead_on_threads_give_what_checking_one_by_one_gives():
    """verify.in_order: with threads the pairs are checked ahead of their turn; a pair whose rows
    the accepted pairs before it connect by its turn comes out unchecked (None), exactly as when
    the pairs are checked one by one, whatever the threads finish first."""
    import random
    import time

    import numpy as np

    from dedup2b.stages import verify
    rng = random.Random(3)
    pairs = [(rng.randrange(40), rng.randrange(40)) for _ in range(400)]
    accept = {i: rng.random() < 0.4 for i in range(len(pairs))}

    def check(i):
        time.sleep(rng.random() * 1e-4)      # threads finish out of order
        return accept[i]

    def one_pass(threads):
        parent = np.arange(40)

        def root(x):
            while parent[x] != x:
                x = parent[x]
            return x
        out = []
        for i, result in verify.in_order(list(range(len(pairs))), check, threads,
                                         lambda i: root(pairs[i][0]) == root(pairs[i][1])):
            out.append((i, result))
            if result:
                parent[root(pairs[i][0])] = root(pairs[i][1])
        return out
    alone = one_pass(1)
    assert [i for i, _ in alone] == list(range(len(pairs)))
    assert sum(r is None for _, r in alone) > 50 and sum(r is True for _, r in alone) > 10
    for threads in (2, 4):
        assert one_pass(threads) == alone


def test_byte_identical_rows_share_one_set_of_features(copies, tmp_path):
    """The verify stage computes the features of each distinct content once: a row whose bytes
    repeat another's gets the same features, stored once."""
    import shutil

    import numpy as np

    from dedup2b.stages import verify
    folder = tmp_path / "in"
    shutil.copytree(copies, folder)
    shutil.copy(folder / "cat_q90.jpg", folder / "cat_q90_again.jpg")
    cfg = config.build(None, ["verify.low=0.0"], tmp_path / "run", {"input.path": str(folder)})
    stats = run_stages(cfg, LocalExecutor(), stages=["ingest", "embed", "index", "search", "verify"])["verify"]
    run = open_run(cfg)
    keys = run.ingest_table(columns=["gid", "key"]).to_pandas().set_index("key")["gid"]
    z = dict(np.load(verify.feature_file(run, run.shards[0].name)))
    assert stats["rows_with_features"] == len(z["gid"]) == stats["images_with_features"] + 1
    assert len(z["work__off"]) - 1 == stats["images_with_features"]           # images stored once
    store = verify.FeatureStore({run.shards[0].index: verify.feature_file(run, run.shards[0].name)})
    a, b = store.get(keys["cat_q90.jpg"]), store.get(keys["cat_q90_again.jpg"])
    other = store.get(keys["cat_q70.jpg"])
    assert a is not None and a is b and np.array_equal(a.desc, store.get(keys["cat_q90.jpg"]).desc)
    assert not np.array_equal(a.thumb, other.thumb)


def test_a_smooth_picture_is_a_copy_where_its_pixels_accept_it(tmp_path):
    """A clock face has too few keypoints (under verify.MIN_KEYPOINTS) to reject a pair on, but an
    alignment whose pixels agree still says copy: its mirror image is accepted (decision 1), a
    different photo is no evidence (2: the descriptor decides), never a rejection. Against a kept
    row where it finds no alignment (the clock on a canvas), its copy stays through the unedited
    clock, which is a full copy of that row (the canvas's edge is the frame, not content)."""
    import numpy as np

    from bench.copies import build_set
    from dedup2b.lib import pixels
    from dedup2b.stages import verify
    cs = build_set(0)
    names = ["clock|canvas", "clock", "clock|mirror", "clock|color", "coffee"]
    feats = [pixels.features(cs.images[cs.names.index(n)]) for n in names]
    assert all(len(f.xy) < verify.MIN_KEYPOINTS for f in feats[2:4])
    assert verify._decide(pixels, feats[2], feats[1])[0] == 1
    assert verify._decide(pixels, feats[2], feats[4])[0] == verify.NO_EVIDENCE
    path = tmp_path / "00000.npz"
    np.savez(path, gid=np.arange(len(feats), dtype=np.int64), **verify.pack(feats))
    job = {"a": [2, 3, 2], "b": [0, 0, 0], "alt": [[1], [1], []], "features": {0: str(path)}}
    got = verify.decide_members(job)
    assert got["pixels"] == [1, 1, verify.NO_EVIDENCE] and got["via_full_copy"] == 2


def test_the_photo_is_kept_not_its_copy_on_a_canvas(tmp_path):
    """Where the pixel check runs, the representative rule counts a frame's padding against it
    (lib/nodes.picture_pixels): a photo is kept over the same photo pasted on a larger canvas or
    between letterbox bars (more pixels, the same picture), and an enlarged version of a photo (more
    picture) still over the photo. With the pixel check off the rule is the pixels alone."""
    import numpy as np
    import skimage.data

    from dedup2b.lib import pixels
    from dedup2b.lib.nodes import picture_pixels
    folder = tmp_path / "images"
    folder.mkdir()
    photo = Image.fromarray(skimage.data.coffee()).convert("RGB")          # 600 x 400
    w, h = photo.size
    canvas = Image.new("RGB", (w * 4 // 3, h * 3 // 2), (40, 90, 160))
    canvas.paste(photo, (w // 9, h // 7))
    bars = Image.new("RGB", (w, w), (0, 0, 0))
    bars.paste(photo, (0, (w - h) // 2))
    cat = Image.fromarray(skimage.data.chelsea()).convert("RGB")
    images = {"a_photo": photo, "b_canvas": canvas, "c_letterbox": bars,
              "d_cat": cat, "e_cat_larger": cat.resize((cat.width * 3 // 2, cat.height * 3 // 2), Image.LANCZOS)}
    for name, img in images.items():
        img.save(folder / f"{name}.png")
    share = {n: pixels.picture_share(pixels.features((folder / f"{n}.png").read_bytes())) for n in images}
    assert share["a_photo"] > 0.95 and share["e_cat_larger"] > 0.95
    assert share["b_canvas"] < 0.6 and share["c_letterbox"] < 0.8
    counted = {n: int(picture_pixels(np.array([images[n].width * images[n].height]), np.array([share[n]]))[0])
               for n in images}
    assert counted["a_photo"] > max(counted["b_canvas"], counted["c_letterbox"])
    assert counted["e_cat_larger"] > counted["d_cat"]
    kept = {}
    for method in ("pixels", "off"):
        cfg = config.build(None, [f"verify.method={method}", "verify.low=0.0", "search.threshold=0.5"],
                           tmp_path / method, {"input.path": str(folder)})
        run_stages(cfg, LocalExecutor(), stages=["ingest", "embed", "index", "search", "verify", "group"])
        run = open_run(cfg)
        rows = pq.read_table(run.group_rows_dir()).to_pandas()
        ing = run.ingest_table(columns=["gid", "key"]).to_pandas().set_index("gid")["key"]
        rows["key"], rows["rep"] = rows["gid"].map(ing), rows["group_id"].map(ing)
        kept[method] = dict(zip(rows["key"], rows["rep"]))
    px = kept["pixels"]
    assert px["b_canvas.png"] == px["c_letterbox.png"] == px["a_photo.png"] == "a_photo.png", px
    assert px["d_cat.png"] == "e_cat_larger.png", px
    assert kept["off"]["a_photo.png"] in ("b_canvas.png", "c_letterbox.png"), kept["off"]
