"""The pixel-level copy verifier (dedup2b.lib.pixels): edited copies accepted, look-alikes of the
same kind rejected, deterministic answers, and undecodable bytes named in a ValueError."""
import io
import pickle
import random

import numpy as np
import pytest
from PIL import Image

from bench.copies import edited, encode, grid_crops, text_page
from dedup2b.lib import pixels


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo():
    import skimage.data
    return Image.fromarray(skimage.data.coffee())


@pytest.fixture(scope="module")
def faces():
    import skimage.data
    return [Image.fromarray((f * 255).round().astype(np.uint8)) for f in skimage.data.lfw_subset()[:100]]


@pytest.mark.parametrize("plan", [["crop", "mirror", "jpeg"], ["letterbox"], ["rot90"], ["gray"],
                                  ["text"], ["squash", "rotate", "downscale"]])
def test_edited_copies_are_accepted(photo, plan):
    rng = random.Random(5)            # (the crop keeps 75 % of the photo: a copy holds >= MIN_SHARE)
    copy, enc = edited(photo, plan, rng)
    same, score = pixels.verify_bytes(_jpeg(photo), encode(copy, rng, enc.pop("fmt", None), **enc))
    assert same, (plan, score)
    assert pixels.ACCEPT <= score <= 1.0


def test_tiny_face_copies_are_accepted(faces):
    face = faces[3]
    mirrored = face.transpose(Image.FLIP_LEFT_RIGHT).point(lambda v: round(255 * (v / 255) ** 0.7))
    upscaled = face.resize((75, 75), Image.BICUBIC)
    for copy in (mirrored, upscaled):
        assert pixels.verify_bytes(_png(face), _jpeg(copy, 60))[0]


def test_different_faces_are_rejected(faces):
    # small grayscale portraits of different people: the same layout, not the same picture
    feats = [pixels.features(_png(f)) for f in faces[:12]]
    for i in range(len(feats)):
        for j in range(i + 1, len(feats)):
            same, score = pixels.verify(feats[i], feats[j])
            assert not same, (i, j, score)


def test_faces_that_look_alike_squeezed_are_still_rejected(faces):
    # aligned portraits can pass the first look's gate: compared as whole frames, then rejected
    feats = [pixels.features(_png(f)) for f in faces[:40]]
    gated = [(i, j) for i in range(len(feats)) for j in range(i + 1, len(feats))
             if any(True for _ in pixels._first_frames(feats[i], feats[j]))]
    assert len(gated) >= 5
    for i, j in gated:
        assert not pixels.verify(feats[i], feats[j])[0], (i, j)


def test_a_whole_frame_copy_needs_no_keypoints(photo):
    """A re-encoded, resized or mirrored copy is accepted on its whole frame before any keypoint is
    computed; a crop needs keypoints, and gets them (once per image)."""
    whole = pixels.features(_jpeg(photo))
    small = pixels.features(_jpeg(photo.resize((200, 133)), 40))
    mirrored = pixels.features(_jpeg(photo.transpose(Image.FLIP_LEFT_RIGHT), 70))
    assert pixels.verify(whole, small)[0] and pixels.verify(whole, mirrored)[0]
    assert not (whole.has_keypoints or small.has_keypoints or mirrored.has_keypoints)
    crop = pixels.features(_jpeg(photo.crop((60, 40, 560, 380))))
    assert pixels.verify(whole, crop)[0]
    assert whole.has_keypoints and crop.has_keypoints and whole.keypoint_s > 0
    xy = whole.xy
    assert pixels.verify(whole, crop)[0] and whole.xy is xy


def test_disjoint_crops_of_one_photo_are_rejected(photo):
    left, right = grid_crops(photo, 1, 2)
    top, bottom = grid_crops(photo, 2, 1)
    assert not pixels.verify_bytes(_jpeg(left), _jpeg(right))[0]
    assert not pixels.verify_bytes(_jpeg(top), _jpeg(bottom))[0]


def test_a_half_of_a_photo_is_not_a_copy_of_it_but_a_large_crop_is(photo):
    """Two disjoint parts of a photo must not meet through the whole photo: a copy shares more
    than half (MIN_SHARE) of each image's content with the other."""
    import skimage.data
    whole = pixels.features(_jpeg(photo))
    for part in grid_crops(photo, 2, 2) + grid_crops(photo, 1, 2) + grid_crops(photo, 2, 1):
        assert not pixels.verify(whole, pixels.features(_jpeg(part)))[0]
    # what decides is the share, not the pixels: the same half passes with the bound lowered
    assert pixels.explain(whole, pixels.features(_jpeg(grid_crops(photo, 1, 2)[0])), {"min_share": 0.0})["copy"]
    stars = Image.fromarray(skimage.data.hubble_deep_field())
    sky = pixels.features(_jpeg(stars))
    for part in grid_crops(stars, 2, 2):
        assert not pixels.verify(sky, pixels.features(_jpeg(part)))[0]
    w, h = photo.size
    big = photo.crop((w // 12, h // 12, w - w // 12, h - h // 12))     # 69 % of the area
    assert pixels.verify(whole, pixels.features(_jpeg(big, 80)))[0]
    assert pixels.explain(whole, pixels.features(_jpeg(grid_crops(photo, 2, 2)[0])), {"min_share": 0.0})["copy"]


def test_a_part_with_most_of_the_detail_is_still_a_part():
    """Smooth picture (a sky, a page's margin) is content: the lower quarter of a photo under a
    clear sky holds most of the detail of the half it lies in, but only half of its picture; a half
    of a scanned page against the page, whose other half holds shorter lines."""
    from sklearn.datasets import load_sample_images
    import skimage.data
    china = Image.fromarray(load_sample_images().images[0])
    for half, quarters in zip(grid_crops(china, 1, 2), ([0, 2], [1, 3])):
        whole = pixels.features(_jpeg(half))
        for q in quarters:
            part = pixels.features(_jpeg(grid_crops(china, 2, 2)[q]))
            assert not pixels.verify(whole, part)[0], q
        assert pixels.verify(whole, pixels.features(_jpeg(half, 30)))[0]     # a copy still is one
    page = Image.fromarray(skimage.data.page())
    whole = pixels.features(_png(page))
    for part in grid_crops(page, 1, 2):
        assert not pixels.verify(whole, pixels.features(_png(part)))[0]


def test_different_text_pages_are_rejected():
    rng = random.Random(1)
    a, b = text_page(rng), text_page(rng)              # same font, size and layout; other words
    assert not pixels.verify_bytes(_png(a), _jpeg(b))[0]
    big_a, big_b = text_page(rng, (800, 1000), 14), text_page(rng, (800, 1000), 14)   # small print
    assert not pixels.verify_bytes(_jpeg(big_a), _jpeg(big_b))[0]
    assert pixels.verify_bytes(_jpeg(big_a), _jpeg(big_a, 15))[0]      # ...while a copy still is one


def test_different_star_fields_are_rejected():
    import skimage.data
    crops = grid_crops(Image.fromarray(skimage.data.hubble_deep_field()), 2, 3)
    feats = [pixels.features(_jpeg(c)) for c in crops]
    for i in range(len(feats)):
        for j in range(i + 1, len(feats)):
            assert not pixels.verify(feats[i], feats[j])[0], (i, j)


def test_answers_are_deterministic(photo):
    rng = random.Random(3)
    copy, _ = edited(photo, ["crop", "rotate", "color"], rng)
    a, b = _jpeg(photo), _jpeg(copy, 40)
    first = pixels.verify_bytes(a, b)
    assert pixels.verify_bytes(a, b) == first
    assert pixels.verify(pixels.features(a), pixels.features(b)) == first
    assert pixels.verify_many([(a, b), (a, b)]) == [first, first]


def test_features_pickle_and_stay_small(photo):
    f = pixels.features(_jpeg(photo))
    g = pickle.loads(pickle.dumps(f))
    assert pixels.verify(f, g) == pixels.verify(f, f)
    assert f.work.nbytes <= pixels.WORK_SIDE ** 2 and len(pickle.dumps(f)) < 200_000
    assert f.thumb.dtype == np.uint8 and f.desc.dtype == np.uint8
    g = pickle.loads(pickle.dumps(f))        # with its keypoints
    assert g.has_keypoints and np.array_equal(g.desc, f.desc) and np.array_equal(g.xy, f.xy)


def test_odd_but_valid_images_do_not_crash():
    tiny = Image.new("RGB", (1, 1), (10, 20, 30))
    strip = Image.fromarray(np.random.default_rng(0).integers(0, 255, (3, 900), dtype=np.uint8))
    rgba = Image.new("RGBA", (64, 48), (255, 0, 0, 0))
    for img in (tiny, strip, rgba):
        same, score = pixels.verify_bytes(_png(img), _png(img))
        assert 0.0 <= score <= 1.0


@pytest.mark.parametrize("data, words", [
    (b"", "empty image"),
    (b"this is not an image at all", "not a known image format"),
    (_jpeg(Image.new("RGB", (300, 200), (90, 120, 200)))[:400], "undecodable image"),
])
def test_undecodable_bytes_raise_a_value_error_naming_the_problem(data, words):
    with pytest.raises(ValueError) as first:
        pixels.features(data)
    assert words in str(first.value)
    assert " at 0x" not in str(first.value)                   # no object reprs
    with pytest.raises(ValueError) as second:
        pixels.verify_bytes(data, data)
    assert str(second.value) == str(first.value)               # deterministic


def test_verify_many_names_the_pair_or_rejects_it(photo):
    good = _jpeg(photo)
    pairs = [(good, good), (good, b"garbage")]
    with pytest.raises(ValueError, match=r"pair 1: undecodable image"):
        pixels.verify_many(pairs)
    out = pixels.verify_many(pairs, errors="reject")
    assert out[0][0] and out[1] == (False, 0.0)


@pytest.mark.parametrize("name,side,fill", [("coffee", 0.5, (255, 255, 255)), ("retina", 0.5, (0, 0, 0)),
                                            ("retina", 0.6, (40, 120, 200))])
def test_a_photo_on_a_canvas_holds_all_of_it(name, side, fill):
    """The edge between a pasted picture and its plain canvas is detail only the canvas has: it is
    the frame, not content the photo lacks. A photo and the same photo on a canvas (the photo
    `side` of its sides) each hold nearly all of the other's content (measured: 0.99-1.0; 0.87-0.90
    when the frame's edge counted as content the photo lacks), so either stands for the other in
    the member check (a full copy, an anchor of the representative: FULL_SHARE)."""
    import skimage.data
    photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    w, h = photo.size
    canvas = Image.new("RGB", (round(w / side), round(h / side)), fill)
    canvas.paste(photo, (round(0.1 * w), round(0.2 * h)))
    a, b = pixels.features(_jpeg(photo, 95)), pixels.features(_jpeg(canvas, 85))
    assert pixels.explain(a, b, {"min_share": 0.95}, stop=True)["copy"]
    assert pixels.explain(b, a, {"min_share": 0.95}, stop=True)["copy"]


def test_a_shared_outline_alone_is_no_copy():
    """Two quarters of a fundus photo mirror each other's outline (the circle's edge on black):
    compared as whole frames with no keypoint to support the map, the outline carries the median
    tile but not nearly all of the picture, so the first look does not take them; no alignment
    with keypoints does either."""
    import skimage.data
    quarters = grid_crops(Image.fromarray(skimage.data.retina()), 2, 2)
    gamma = [q.point(lambda v: round(255 * (v / 255) ** 0.6)) for q in quarters]
    for a, b in ((0, 1), (2, 3)):
        fa, fb = pixels.features(_jpeg(gamma[a])), pixels.features(_jpeg(gamma[b]))
        assert list(pixels._first_frames(fa, fb))          # the outlines look alike squeezed
        assert not pixels.verify(fa, fb)[0], (a, b)
    assert pixels.verify(pixels.features(_jpeg(quarters[1])), pixels.features(_jpeg(gamma[1], 60)))[0]
