"""Pixel-level copy verifier: are two images copies of one picture (allowing edits), or two
different pictures that merely look alike?

A global descriptor (CLIP, EfficientNet) says "the same kind of picture"; this module says "the same
picture". It compares the images themselves, through their features:

    fa, fb = features(jpeg_bytes), features(png_bytes)   # per image: ~2 ms, ~140 KB of numpy
    same, score = verify(fa, fb)                         # per pair: ~1.5 ms (most look-alikes) to ~7 ms,
                                                         # and ~30 ms per image whose keypoints it needs
    same, score = verify_bytes(a, b)                     # both at once; verify_many() caches by content

Method
  features  decode (PIL; JPEG draft mode for big files; EXIF orientation; transparency over white),
            grayscale, long side resized to WORK_SIDE (small images are enlarged, so a 25 px face
            and its 100 px copy are seen alike): the working image, and a THUMB_SIDE grayscale
            thumbnail. SIFT keypoints (the N_KEYPOINTS strongest, a low contrast threshold so smooth
            pictures get some) as RootSIFT uint8 descriptors, computed on first use and kept (they
            cost an image about 15 times its decoding). Mirrors need no second SIFT run: the
            descriptor of a mirrored patch is a fixed permutation of the original's (4x4 grid rows
            reversed, the 8 orientation bins negated), applied at match time.
  first look  the whole frame, as it is and mirrored, where the two thumbnails squeezed to
            COARSE_SIDE squares correlate (a re-encode, a resize, a colour edit, a squash): the
            pixel check below, but with no keypoint to support the map, nearly all of the picture
            must agree (the tiles' correlation at its weighted 20th percentile >= FIRST_ACCEPT,
            not the median: shared structure such as letterbox bars or a circle's edge can carry
            a median). A copy it accepts needs no keypoints; any other pair is decided as before.
  align     descriptors matched (mutual nearest neighbours + Lowe's ratio test), as they are and
            mirrored. Per match set: an affine model by RANSAC (covers crops, canvas, letterbox,
            rotations, squash, scale) kept with >= MIN_INLIERS inliers, sane scale and shear,
            mapping one image onto >= MIN_COVER of the other, and a shared part that holds >=
            MIN_SHARE (more than half) of EACH image's content, counted in detailed thumbnail
            pixels that land on the other's picture or on the edge of its frame (a half of a photo
            is another picture: two disjoint parts must not meet through the whole; plain borders
            and canvases are flat, so they do not count, and the edge between a pasted picture and
            its canvas is the frame, not content the other lacks); and the 8 full-frame maps (4
            rotations x mirror, any aspect change) that >= MIN_SUPPORT matches agree with. Those
            align tiny and featureless images better than a fit, and being 8 fixed guesses, a
            few agreeing matches are already unlikely by chance.
  compare   the decision. Inliers cannot tell a copy from a look-alike (faces share eyes and
            mouths, pages share their layout, bricks and star fields repeat), so each alignment
            is checked on pixels: one thumbnail is warped onto the other, in the frame that holds
            the shared part in fewer pixels (anti-aliased); both are band-passed at the finest
            scale (difference of Gaussians SIGMA_FINE, SIGMA_COARSE); the sharper is blurred until
            both hold as much fine detail (blur, downscale, JPEG remove it); per TILE x TILE tile,
            each row's and each column's mean is removed (2-D detail stays; text lines and
            stripes, which look-alikes share, go) unless an image is enlarged there; the score is
            the median of the tiles' normalised cross-correlations weighted by the square root of
            their shared detail energy: overlays (text, watermark, borders) spoil a minority of
            tiles, flat tiles count little, a few strong edges (a frame, a circle) cannot decide.
  decide    a copy iff the score of some alignment >= ACCEPT; the score (clipped to [0, 1]) is that
            of the first accepted alignment, or the best one tried. Deterministic (seeded RANSAC,
            no randomness elsewhere).

Measured with bench/copies.py (make bench-copies; bench/results/copies.md), seed 0: 1076 copy
pairs (16 edits, chains of three, copy vs copy, 25 px faces) and 5938 look-alike pairs (4950 of
them LFW faces; halves and quarters of a photo against it).
  recall 0.981 (single edits 0.987, chains of three 0.941, copy vs copy 0.961, tiny faces 0.996);
  1 false accept in 5938 look-alike pairs (two LFW faces of different men, score 0.547); a half
  of a photo is rejected by the share rule. Copies that fail: crops keeping less than about 60 %
  of a picture's detail (the rule), watermarks or text over nearly featureless pictures (a
  blurred clock, a smooth fundus), where the overlay holds all the detail.
  cost, one core: features 1.4 ms median, 9 ms p95 (large PNG decodes); keypoints 29 ms median,
  55 ms p95, for the 854 of 1280 images a pair needed them for; verify (keypoints apart) 1.25 ms
  median, 12 ms p95, 6 ms median on copies. With keypoints for every image, the release before
  measured features at 31 ms median (37 and 28 on other days: the box's speed moves).
  Detectors at WORK_SIDE 320 with the same pixel check (an earlier measurement, seed 1): SIFT
  24 ms per image, 0.99 of single edits / 0.93 of chains; AKAZE (run twice, for the mirror) 13 ms,
  0.91 / 0.80; ORB (twice) 4 ms, 0.88 / 0.75.
Known limits: periodic structure (a lattice, brick courses) can align by one period and agree in
pixels; two 25 px portraits with the same pose and light can score like a JPEG'd copy of one.
"""
from __future__ import annotations

import hashlib
import io
import re
import threading
import time
import warnings

import cv2
import numpy as np
from PIL import Image, ImageOps

WORK_SIDE = 320          # long side keypoints are found at (every image is resized to it)
THUMB_SIDE = 256         # long side of the thumbnail the pixel check compares
N_KEYPOINTS = 1000       # SIFT keypoints kept per image (strongest first)
MAX_PIXELS = 64_000_000  # larger images are refused (decompression bombs)

RATIO = 0.85             # Lowe's ratio test (with mutual nearest neighbours)
RANSAC_PX = 3.0          # inlier distance, working pixels of a native-resolution image
MIN_INLIERS = 8          # a RANSAC model needs this many inliers (it searches many: chance consensus)
MIN_SUPPORT = 3          # a full-frame map (one of 8 fixed ones) needs this many agreeing matches
MIN_COVER = 0.3          # a model must map one image onto >= this share of the other
MIN_SHARE = 0.6          # and the shared part must hold >= this share of EACH image's content
                         # (its detailed thumbnail pixels): more than half, with a margin, so two copies of one
                         # picture always share some of it and disjoint parts (two halves) never
                         # meet through the whole photo
FLAT_STD = 0.5           # a thumbnail pixel whose 5 x 5 neighbourhood spreads less holds no content
                         # (plain borders, canvases, letterbox bars, a fill: constant grey levels). Not
                         # higher: a smooth sky or page margin is picture, and at 2.0 it was not, so a
                         # quarter of a photo held more than 60 % of the half it lies in (bench.copies,
                         # part-of pairs: 3 false accepts at 2.0, none at 0.5, copies alike)
MAX_SCALE, MAX_ANISO = 8.0, 3.0   # sane models: scale within 1/8..8, axis ratio <= 3
SIGMA_FINE, SIGMA_COARSE = 0.7, 1.5   # the band compared, thumbnail pixels
TILE = 16                # tile side for the robust correlation, thumbnail pixels
ACCEPT = 0.5             # decision threshold on the score: look-alikes <= 0.45 but one pair in 17,550,
                         # copies mostly > 0.6 (bench/results/copies.md, score distribution)
SEED = 12345
FIRST_QUANTILE, FIRST_ACCEPT = 0.2, 0.6   # the first look takes a whole frame without keypoints when
                         # the tiles' correlation is >= 0.6 at its weighted 20th percentile: nearly all
                         # of the picture agrees. Not the median: two letterboxed 25 px faces, or the
                         # mirrored quarters of a fundus (a circle's edge), reach a median of 0.85-0.9
                         # on a frame no keypoint supports; their 20th percentile stays <= 0.43 (the
                         # quality set's 2803 look-alike first looks), copies' mostly > 0.7
COARSE_SIDE = 24         # the first look: thumbnails squeezed to this square...
COARSE_CORR = 0.7        # ...that correlate this well are first compared as whole frames. Only cost
                         # depends on it (a pair below goes straight to the keypoints). bench.copies:
                         # at 0.5, 574 of 1076 copy pairs accepted on the whole frame and 1614 of 5938
                         # look-alike pairs compared in vain; at 0.7, 567 and 372
_OPEN_LOCK = threading.Lock()
_DILATE = np.ones((7, 7), np.uint8)
_FAR = np.ones((15, 15), np.uint8)   # beyond a frame's edge: more than 7 thumbnail pixels out
AREA_STD = 0.1           # a thumbnail pixel whose neighbourhood spreads more is picture (plain fill is constant)
PLAIN_FILL = 0.05        # a fill beyond a frame is plain when at most this share of it is detail

_P = dict(ratio=RATIO, ransac_px=RANSAC_PX, min_inliers=MIN_INLIERS, min_support=MIN_SUPPORT,
          min_cover=MIN_COVER, min_share=MIN_SHARE, s1=SIGMA_FINE, s2=SIGMA_COARSE, tile=TILE, accept=ACCEPT,
          equalise=1.3, min_tiles=4, center_max_up=1.5)


class Features:
    """What verify() needs of one image: the working image (long side WORK_SIDE, grayscale uint8),
    its THUMB_SIDE thumbnail, and its SIFT keypoints (xy, desc), computed from the working image on
    first use and kept: a copy that the full-frame check accepts (a re-encode, a resize, a colour
    edit) needs no keypoints at all. Safe across threads (one computation per image)."""

    __slots__ = ("size", "native", "work", "thumb", "keypoint_s", "_xy", "_desc", "_lock")

    def __init__(self, size: tuple[int, int], native: int, thumb: np.ndarray, work: np.ndarray | None = None,
                 xy: np.ndarray | None = None, desc: np.ndarray | None = None):
        self.size = tuple(int(v) for v in size)   # (w, h) of the working image the keypoints live in
        self.native = int(native)                 # long side of the decoded image, pixels
        self.thumb = thumb                        # (h, w) uint8 grayscale, long side THUMB_SIDE
        self.work = work                          # (h, w) uint8 working image; None when keypoints are given
        self._xy, self._desc = xy, desc           # (n, 2) float32 working pixels; (n, 128) uint8 RootSIFT x 255
        self.keypoint_s = 0.0                     # seconds this object spent computing its keypoints
        self._lock = threading.Lock()
        if work is None and (xy is None or desc is None):
            raise ValueError("Features need the working image or the keypoints")

    @property
    def xy(self) -> np.ndarray:
        return self.keypoints()[0]

    @property
    def desc(self) -> np.ndarray:
        return self.keypoints()[1]

    @property
    def has_keypoints(self) -> bool:
        return self._xy is not None

    def keypoints(self) -> tuple[np.ndarray, np.ndarray]:
        if self._xy is None:
            with self._lock:
                if self._xy is None:
                    t0 = time.perf_counter()
                    xy, desc = _sift(self.work)
                    self._desc, self._xy = desc, xy
                    self.keypoint_s = time.perf_counter() - t0
        return self._xy, self._desc

    def __getstate__(self):
        return {k: getattr(self, k) for k in self.__slots__ if k != "_lock"}

    def __setstate__(self, state):
        for k, v in state.items():
            object.__setattr__(self, k, v)
        self._lock = threading.Lock()


# ----------------------------------------------------------------------------------- decoding
def _reason(e: Exception) -> str:
    """An exception's message without object reprs (`<_io.BytesIO object at 0x...>`)."""
    msg = re.sub(r"\s*<[^>]*>", "", str(e)).strip(" :") or type(e).__name__
    return msg[:200]


def decode_gray(data: bytes, side: int = WORK_SIDE) -> np.ndarray:
    """Image bytes -> grayscale uint8 (EXIF orientation applied, transparency over white). JPEGs
    are decoded at a reduced size (draft) when much larger than `side`. ValueError with a
    deterministic message when the bytes are not a readable image."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"image data must be bytes, not {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("empty image (0 bytes)")
    try:
        # the decompression-bomb check runs in open(); the warnings filters are global, so the
        # threads of one features task take turns setting them (open reads a header only)
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_PIXELS:
            raise ValueError(f"image too large ({img.width}x{img.height} pixels)")
        if img.format == "JPEG":
            img.draft("L", (side, side))
        img.load()
        img = ImageOps.exif_transpose(img)
    except Image.UnidentifiedImageError:
        raise ValueError(f"undecodable image ({len(data)} bytes): not a known image format") from None
    except ValueError as e:
        if str(e).startswith("image too large"):
            raise
        raise ValueError(f"undecodable image ({len(data)} bytes): {_reason(e)}") from None
    except Exception as e:   # PIL raises OSError, SyntaxError, struct.error... on damaged files
        raise ValueError(f"undecodable image ({len(data)} bytes): {_reason(e)}") from None
    if img.width < 1 or img.height < 1:
        raise ValueError(f"undecodable image ({len(data)} bytes): empty picture")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        arr = arr - arr.min()
        return (arr * (255.0 / (arr.max() or 1.0))).astype(np.uint8)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(img.convert("L"), dtype=np.uint8)


def _resize_long(gray: np.ndarray, side: int) -> np.ndarray:
    h, w = gray.shape
    s = side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    if size == (w, h):
        return gray
    return cv2.resize(gray, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)


# ----------------------------------------------------------------------------------- features
def features_gray(gray: np.ndarray) -> Features:
    """Features of a decoded grayscale uint8 image (keypoints on first use)."""
    work = np.ascontiguousarray(_resize_long(np.ascontiguousarray(gray, dtype=np.uint8), WORK_SIDE))
    return from_work(work, int(max(gray.shape)))


def from_work(work: np.ndarray, native: int) -> Features:
    """Features of a working image (long side WORK_SIDE), its thumbnail made from it."""
    return Features((work.shape[1], work.shape[0]), native, np.ascontiguousarray(_resize_long(work, THUMB_SIDE)),
                    work=work)


def _sift(work: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SIFT keypoints of a working image: positions and RootSIFT uint8 descriptors."""
    # a low contrast threshold: smooth and low-contrast pictures get keypoints too; the strongest
    # N_KEYPOINTS are kept either way (a detector per call: cheap, and safe across threads)
    kps, desc = cv2.SIFT_create(N_KEYPOINTS, 3, 0.01, 10, 1.6).detectAndCompute(work, None)
    xy = np.array([k.pt for k in kps], np.float32).reshape(-1, 2)
    if desc is None or len(kps) == 0:
        return xy[:0], np.zeros((0, 128), np.uint8)
    d = desc.astype(np.float32)     # RootSIFT: L1-normalise, square root (unit L2 norm), as uint8
    return xy, np.round(255 * np.sqrt(d / (d.sum(1, keepdims=True) + 1e-7))).astype(np.uint8)


def picture_share(f: Features) -> float:
    """The share of an image's frame that is picture: thumbnail pixels that are not plain fill
    (spread > AREA_STD, as _content_share counts a picture's area). A canvas, letterbox bars or the
    fill around a rotation lower it; an image without any detail counts as all picture."""
    picture = _spread2(f.thumb) > AREA_STD ** 2
    return float(picture.mean()) if picture.any() else 1.0


def features(data: bytes) -> Features:
    """Decode image bytes and compute what verify() compares. ValueError on undecodable bytes."""
    return features_gray(decode_gray(data))


# ----------------------------------------------------------------------------------- alignment
# SIFT's descriptor of the mirrored patch: rows of the 4x4 grid reversed, orientation bins negated
_MIRROR = np.arange(128).reshape(4, 4, 8)[::-1][..., (-np.arange(8)) % 8].reshape(-1)


def _matches(da: np.ndarray, db: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest neighbours passing the ratio test: (indices in a, indices in b)."""
    if len(da) < 2 or len(db) < 2:
        return np.zeros(0, int), np.zeros(0, int)
    s = da.astype(np.float32) @ db.astype(np.float32).T     # cosine x 255^2 (unit RootSIFT vectors)
    rows = np.arange(len(da))
    best = s.argmax(1)
    s1 = s[rows, best]
    back = s.argmax(0)
    s[rows, best] = -np.inf
    s2 = s.max(1)
    k = 2.0 / 255 ** 2                                     # squared distance = 2 - 2 cosine
    d1 = np.sqrt(np.maximum(2 - k * s1, 0))
    d2 = np.sqrt(np.maximum(2 - k * s2, 0))
    i = np.nonzero((back[best] == rows) & (d1 < ratio * d2))[0]
    return i, best[i]


def _flip(w: int) -> np.ndarray:
    return np.array([[-1, 0, w - 1], [0, 1, 0], [0, 0, 1]], np.float64)


def _to_thumb(f: Features) -> np.ndarray:
    """3x3 map working pixels -> thumbnail pixels (pixel centres)."""
    sx, sy = f.thumb.shape[1] / f.size[0], f.thumb.shape[0] / f.size[1]
    return np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]], np.float64)


def _sane(h: np.ndarray) -> bool:
    sv = np.linalg.svd(h[:2, :2], compute_uv=False)
    return bool(sv[1] > 1 / MAX_SCALE and sv[0] < MAX_SCALE and sv[0] < MAX_ANISO * sv[1])


def _rect(w: int, h: int) -> np.ndarray:
    return np.array([[-0.5, -0.5], [w - 0.5, -0.5], [w - 0.5, h - 0.5], [-0.5, h - 0.5]], np.float32)


def _cover(fa: Features, fb: Features, h: np.ndarray) -> float:
    """Largest of: share of A covered by B under h, share of B whose image lands inside A."""
    pb = cv2.transform(_rect(*fb.size)[None], h[:2].astype(np.float32))[0]
    if cv2.contourArea(pb, oriented=True) < 0:
        pb = np.ascontiguousarray(pb[::-1])
    area, _ = cv2.intersectConvexConvex(_rect(*fa.size), pb)
    det = abs(np.linalg.det(h[:2, :2]))
    return float(max(area / (fa.size[0] * fa.size[1]), area / max(det * fb.size[0] * fb.size[1], 1e-9)))


def _spread2(thumb: np.ndarray) -> np.ndarray:
    """Each thumbnail pixel's grey-level variance over its 5 x 5 neighbourhood: a picture is where
    it is large (a plain border, canvas or letterbox bar has none; a picture's edge against it
    makes a band two pixels wide)."""
    x = thumb.astype(np.float32)
    m = cv2.blur(x, (5, 5))
    return cv2.blur(x * x, (5, 5)) - m * m


def _content_share(fa: Features, fb: Features, h: np.ndarray) -> float:
    """The smaller of the two images' shares of content inside the part they share under h (B's
    working pixels onto A's): for each image, the share of its detailed thumbnail pixels (spread
    >= FLAT_STD, see _spread2) that land on the other's picture (its detail, a few pixels wider and at a lower
    spread, so that blur in one does not count as a difference; warped onto this thumbnail).
    Plain borders, canvases and bars are neither content nor picture, so they never count; pixels
    weigh every part of a picture alike, where keypoints would crowd into its busiest part. Each
    share is also at most the share of the image's picture area (pixels that are not plain fill)
    inside the other's frame. An image without detail counts by area."""
    shares = []
    sa, sb = _spread2(fa.thumb), _spread2(fb.thumb)
    for f, g, sf, sg, m in ((fa, fb, sa, sb, np.linalg.inv(h)), (fb, fa, sb, sa, h)):   # m: f's working pixels -> g's
        detail = sf >= FLAT_STD ** 2
        n = int(np.count_nonzero(detail))
        if n < 64:
            quad = cv2.transform(_rect(*g.size)[None], np.linalg.inv(m)[:2].astype(np.float32))[0]
            if cv2.contourArea(quad, oriented=True) < 0:
                quad = np.ascontiguousarray(quad[::-1])
            area, _ = cv2.intersectConvexConvex(_rect(*f.size), quad)
            shares.append(float(area) / (f.size[0] * f.size[1]))
            continue
        t = _to_thumb(g) @ m @ np.linalg.inv(_to_thumb(f))           # f's thumbnail -> g's
        picture = cv2.dilate((sg >= (0.5 * FLAT_STD) ** 2).view(np.uint8), _DILATE)
        size = (f.thumb.shape[1], f.thumb.shape[0])
        on = cv2.warpAffine(picture, t[:2], size, flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP, borderValue=0)
        shared = on > 0
        # the edge of g's frame: where f is g pasted on a plain canvas (letterbox bars, a fill
        # around a rotation), f's border between the picture and the fill is detail g cannot
        # have (g ends there): the frame, not content f holds and g lacks. Only where f beyond
        # g's frame is plain fill; beyond a crop's frame lies more picture, and that is content
        frame = cv2.warpAffine(np.ones(sg.shape, np.uint8), t[:2], size,
                               flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP, borderValue=0)
        if frame.all():              # g's frame covers f: no edge, all of f's picture inside it
            shares.append(int(np.count_nonzero(detail & shared)) / n)
            continue
        near = cv2.dilate(frame, _DILATE) > 0
        beyond = cv2.dilate(frame, _FAR) == 0
        n_beyond = int(np.count_nonzero(beyond))
        if n_beyond and np.count_nonzero(detail & beyond) <= PLAIN_FILL * n_beyond:
            shared |= near & (cv2.erode(frame, _DILATE, borderValue=1) == 0)
        # and by area: f's picture (every pixel that is not plain fill; a smooth sky is picture,
        # though a blur can take its detail) must lie inside g's frame as much: a part of a
        # photo whose detail sits below a blurred sky is still a part
        picture_f = sf > AREA_STD ** 2
        m_pic = int(np.count_nonzero(picture_f))
        by_area = int(np.count_nonzero(picture_f & near)) / m_pic if m_pic >= 64 else 1.0
        shares.append(min(int(np.count_nonzero(detail & shared)) / n, by_area))
    return min(shares)


def _box_maps(fa: Features, fb: Features):
    """The 8 maps of B's frame onto A's (4 rotations x mirror), working pixels, 3x3."""
    (wa, ha), (wb, hb) = fa.size, fb.size
    to_u = np.array([[1 / wb, 0, 0.5 / wb], [0, 1 / hb, 0.5 / hb], [0, 0, 1]])
    from_u = np.array([[wa, 0, -0.5], [0, ha, -0.5], [0, 0, 1]])
    rot = np.array([[0, -1, 1], [1, 0, 0], [0, 0, 1]], np.float64)       # unit square, 90 degrees
    for mirror in (False, True):
        d = _flip(2) if mirror else np.eye(3)      # x -> 1 - x on the unit square
        for _ in range(4):
            yield mirror, from_u @ d @ to_u
            d = rot @ d


def _models(fa: Features, fb: Features, p):
    """Candidate alignments (kind, 3x3 map of B's working pixels onto A's, support), generated
    lazily: the mirrored matching runs only when the plain one did not settle the question."""
    # keypoints of an enlarged image are located no better than its own pixels
    thr = p["ransac_px"] * float(np.clip(max(fa.size) / min(fa.native, fb.native), 1.0, 4.0))
    for mirror in (False, True):
        ia, ib = _matches(fa.desc[:, _MIRROR] if mirror else fa.desc, fb.desc, p["ratio"])
        pa, pb = fa.xy[ia].astype(np.float32), fb.xy[ib]
        if mirror:                                  # A's keypoints as seen in the mirrored image
            pa[:, 0] = fa.size[0] - 1 - pa[:, 0]
        found = []
        if len(ia) >= p["min_inliers"]:
            cv2.setRNGSeed(SEED)
            m, inl = cv2.estimateAffine2D(pb, pa, method=cv2.RANSAC, ransacReprojThreshold=thr,
                                          maxIters=2000, confidence=0.995, refineIters=10)
            if m is not None and int(inl.sum()) >= p["min_inliers"]:
                h = np.vstack([m, [0, 0, 1]])
                if mirror:
                    h = _flip(fa.size[0]) @ h
                if (_sane(h) and _cover(fa, fb, h) >= p["min_cover"]
                        and _content_share(fa, fb, h) >= p["min_share"]):
                    found.append(("mirror" if mirror else "affine", h, int(inl.sum())))
        if len(ia) >= p["min_support"]:
            # full-frame maps (rotations of the whole frame; with or without mirror as matched)
            # that enough matches agree with
            for mirrored_map, h in _box_maps(fa, fb):
                if mirrored_map != mirror or not _sane(h):
                    continue
                g = _flip(fa.size[0]) @ h if mirror else h      # B -> the frame pa lives in
                proj = pb @ g[:2, :2].T.astype(np.float32) + g[:2, 2].astype(np.float32)
                support = int((np.linalg.norm(proj - pa, axis=1) < 2 * thr).sum())
                if support >= p["min_support"]:
                    found.append(("frame", h, support))
        yield from sorted(found, key=lambda x: -x[2])


def _first_frames(fa: Features, fb: Features):
    """The full-frame maps (3x3, B's working pixels onto A's) looked at before any keypoint: the
    frame as it is and mirrored, where the two thumbnails, squeezed to COARSE_SIDE squares,
    correlate >= COARSE_CORR (a re-encode, a resize, a colour edit, an aspect squash). Without
    keypoints to support the map, the pixels must agree nearly everywhere (FIRST_ACCEPT); a pair
    that does not goes on to the keypoints, as every pair did before. Most web copies are of this
    kind, and keypoints cost an image about ten times what a pair's pixel check does."""
    a = _coarse(fa.thumb)
    b = _coarse(fb.thumb)
    if a is None or b is None:
        return
    for mirrored, h in _box_maps(fa, fb):
        if h[0, 1] != 0 or h[1, 0] != 0 or h[1, 1] < 0 or not _sane(h):   # rotations need keypoints
            continue
        bb = b[:, ::-1] if mirrored else b
        if float((a * bb).sum()) >= COARSE_CORR:
            yield h


def _coarse(thumb: np.ndarray) -> np.ndarray | None:
    """A thumbnail squeezed to COARSE_SIDE x COARSE_SIDE, zero mean, unit norm (None if flat)."""
    x = cv2.resize(thumb, (COARSE_SIDE, COARSE_SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)
    x -= x.mean()
    n = float(np.sqrt((x * x).sum()))
    return x / n if n > 1e-3 * COARSE_SIDE else None


# ----------------------------------------------------------------------------------- pixel check
def _bandpass(img: np.ndarray, s1: float, s2: float) -> np.ndarray:
    g1 = cv2.GaussianBlur(img, (0, 0), s1)
    return g1 - cv2.GaussianBlur(g1, (0, 0), s2)


def _tile_sums(x: np.ndarray, t: int) -> np.ndarray:
    h, w = x.shape
    return x[:h // t * t, :w // t * t].reshape(h // t, t, w // t, t).sum(axis=(1, 3)).ravel()


def _center_rows_cols(x: np.ndarray, m: np.ndarray, t: int) -> np.ndarray:
    """Per tile, remove the mean of every row and of every column (inside the mask): what is left
    is 2-D detail, not the 1-D structure (text lines, stripes) look-alikes share."""
    h, w = x.shape
    h, w = h // t * t, w // t * t
    xs = x[:h, :w].reshape(h // t, t, w // t, t)
    ms = m[:h, :w].reshape(h // t, t, w // t, t)
    rows = xs.sum(3, keepdims=True) / np.maximum(ms.sum(3, keepdims=True), 1)
    xs = (xs - rows) * ms
    cols = xs.sum(1, keepdims=True) / np.maximum(ms.sum(1, keepdims=True), 1)
    xs = (xs - cols) * ms
    out = np.zeros_like(x)
    out[:h, :w] = xs.reshape(h, w)
    return out


def _fine_share(x: np.ndarray, mask: np.ndarray, p) -> tuple[np.ndarray, float]:
    """(fine band of x, its energy over the next coarser band's) inside mask."""
    fine = _bandpass(x, p["s1"], p["s2"])
    coarse = _bandpass(x, p["s2"], 2 * p["s2"])
    t = p["tile"]     # the median over tiles: an overlay's sharp edges do not make an image "sharp"
    ef, ec = _tile_sums(fine * fine * mask, t), _tile_sums(coarse * coarse * mask, t)
    good = ec > 1e-3 * max(float(ec.max()), 1e-9)
    return fine, float(np.median(ef[good] / ec[good])) if good.any() else 0.0


def _agreement(ta: np.ndarray, tb: np.ndarray, h: np.ndarray, p, native: tuple[int, int] = (0, 0)) -> float:
    """How well two thumbnails agree in fine detail once aligned by h (B thumb -> A thumb, 3x3):
    the median over tiles of their band-passed correlation, weighted by shared detail."""
    return _quantile(_tiles(ta, tb, h, p, native), 0.5)


def _quantile(tiles, q: float) -> float:
    """The weighted q-quantile of the tiles' correlations (0 without tiles)."""
    if tiles is None:
        return 0.0
    ncc, w = tiles
    order = np.argsort(ncc)
    cum = np.cumsum(w[order])
    return float(ncc[order][min(len(order) - 1, int(np.searchsorted(cum, q * cum[-1])))])


def _tiles(ta: np.ndarray, tb: np.ndarray, h: np.ndarray, p, native: tuple[int, int] = (0, 0)):
    """(correlation, weight) per tile of two thumbnails aligned by h (see _agreement), or None
    where they share too few tiles or no detail."""
    if abs(np.linalg.det(h[:2, :2])) > 1:     # compare in the frame that holds the overlap in fewer pixels
        ta, tb, h = tb, ta, np.linalg.inv(h)
        native = native[::-1]
    # how many frame pixels one native pixel of each image spans: an enlarged image has no detail
    # inside a tile to test for 2-D structure
    up_a = max(ta.shape) / max(native[0], 1)
    up_b = max(tb.shape) / max(native[1], 1) * np.sqrt(abs(np.linalg.det(h[:2, :2])))
    enlarged = max(up_a, up_b) > p["center_max_up"]
    src = tb.astype(np.float32)
    shrink = 1.0 / max(np.linalg.svd(h[:2, :2], compute_uv=False)[1], 1e-9)
    if shrink > 1.05:                          # anti-alias what the warp shrinks
        src = cv2.GaussianBlur(src, (0, 0), 0.5 * np.sqrt(shrink ** 2 - 1))
    hh, ww = ta.shape
    b = cv2.warpAffine(src, h[:2], (ww, hh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    mask = cv2.warpAffine(np.ones_like(src), h[:2], (ww, hh), flags=cv2.INTER_NEAREST, borderValue=0)
    mask = cv2.erode(mask, np.ones((3, 3), np.uint8))
    t = p["tile"]
    n = _tile_sums(mask, t)
    ok = n >= 0.5 * t * t
    if ok.sum() < p["min_tiles"]:
        return None
    a = ta.astype(np.float32)
    fa, sa = _fine_share(a, mask, p)
    fb, sb = _fine_share(b, mask, p)
    if max(sa, sb) > p["equalise"] * min(sa, sb):
        # the sharper image is blurred until it holds as much fine detail as the other: the
        # comparison happens at the finest detail both still have (blur, downscale, JPEG)
        sharp, target = (a, sb) if sa > sb else (b, sa)
        for e in (0.5, 0.75, 1.0, 1.4, 2.0, 2.8, 4.0):
            f, s = _fine_share(cv2.GaussianBlur(sharp, (0, 0), e), mask, p)
            if s <= 1.05 * target:
                break
        if sa > sb:
            fa = f
        else:
            fb = f
    fa, fb, nn = fa * mask, fb * mask, n[ok]
    if not enlarged:
        fa, fb = _center_rows_cols(fa, mask, t), _center_rows_cols(fb, mask, t)
    suma, sumb = _tile_sums(fa, t)[ok], _tile_sums(fb, t)[ok]
    vaa = _tile_sums(fa * fa, t)[ok] - suma * suma / nn
    vbb = _tile_sums(fb * fb, t)[ok] - sumb * sumb / nn
    vab = _tile_sums(fa * fb, t)[ok] - suma * sumb / nn
    ncc = vab / np.sqrt(np.maximum(vaa * vbb, 1e-12))
    # weight: the detail energy both tiles hold (B's scaled to A's by the typical ratio), so flat
    # tiles and tiles where one side has an overlay count little; square root: no few strong
    # edges decide alone
    ratio = float(np.median(vbb / np.maximum(vaa, 1e-9)))
    w = np.sqrt(np.maximum(np.minimum(vaa * ratio, vbb), 0))
    return (ncc, w) if w.sum() > 0 else None


# ----------------------------------------------------------------------------------- decision
_BLAS = None


def _one_blas_thread():
    """A pair's products are small (1000 x 128 x 1000): one BLAS thread. Measured on 2 busy cores:
    3.1-3.6 ms per look-alike pair with one thread, 25-30 ms with the default two (the threads
    spin against the other work); pairs run in parallel as tasks instead."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController
        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


def explain(fa: Features, fb: Features, params: dict | None = None, stop: bool = False) -> dict:
    """Every alignment tried, with its support and pixel score; `score` is the best. With `stop`,
    the search ends at the first alignment that is accepted (what verify() does)."""
    with _one_blas_thread():
        return _explain(fa, fb, params, stop)


def _explain(fa: Features, fb: Features, params: dict | None, stop: bool) -> dict:
    p = {**_P, **(params or {})}
    tried, best, looked = [], 0.0, {}

    def done() -> dict:
        b = float(np.clip(best, 0.0, 1.0))
        return {"copy": b >= p["accept"], "score": b, "tried": tried}

    for h in _first_frames(fa, fb):
        ht = _to_thumb(fa) @ h @ np.linalg.inv(_to_thumb(fb))
        tiles = looked[np.round(h, 6).tobytes()] = _tiles(fa.thumb, fb.thumb, ht, p, (fa.native, fb.native))
        s, low = _quantile(tiles, 0.5), _quantile(tiles, FIRST_QUANTILE)
        tried.append({"kind": "first look", "support": 0, "score": round(s, 4), "low": round(low, 4)})
        if low >= FIRST_ACCEPT:    # nearly all of the picture agrees: a copy without keypoints
            best = max(best, s)
            if stop and best >= p["accept"]:
                return done()
    for kind, h, support in _models(fa, fb, p):
        ht = _to_thumb(fa) @ h @ np.linalg.inv(_to_thumb(fb))
        key = np.round(h, 6).tobytes() if kind == "frame" else None
        tiles = looked[key] if key in looked else _tiles(fa.thumb, fb.thumb, ht, p, (fa.native, fb.native))
        s = _quantile(tiles, 0.5)
        tried.append({"kind": kind, "support": support, "score": round(s, 4)})
        best = max(best, s)
        if stop and best >= p["accept"]:
            break
    return done()


def verify(fa: Features, fb: Features) -> tuple[bool, float]:
    """(is a copy, score in [0, 1]): the pixel agreement of the first accepted alignment, or of
    the best one tried when none is accepted. Deterministic."""
    e = explain(fa, fb, stop=True)
    return e["copy"], e["score"]


def verify_bytes(a: bytes, b: bytes) -> tuple[bool, float]:
    """verify() on two encoded images. ValueError when either cannot be decoded."""
    return verify(features(a), features(b))


def verify_many(pairs, errors: str = "raise") -> list[tuple[bool, float]]:
    """verify() over (bytes, bytes) pairs, computing each distinct image's features once.

    errors="raise": ValueError naming the pair of the first undecodable image; errors="reject":
    such a pair is answered (False, 0.0)."""
    if errors not in ("raise", "reject"):
        raise ValueError(f"errors must be 'raise' or 'reject', not {errors!r}")
    cache: dict[bytes, Features | ValueError] = {}

    def get(data):
        key = hashlib.blake2b(bytes(data), digest_size=16).digest()
        if key not in cache:
            try:
                cache[key] = features(data)
            except ValueError as e:
                cache[key] = e
        return cache[key]

    out = []
    for i, (a, b) in enumerate(pairs):
        fa, fb = get(a), get(b)
        bad = next((x for x in (fa, fb) if isinstance(x, ValueError)), None)
        if bad is not None:
            if errors == "raise":
                raise ValueError(f"pair {i}: {bad}")
            out.append((False, 0.0))
        else:
            out.append(verify(fa, fb))
    return out
