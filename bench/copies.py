"""Copy-verifier benchmark: does dedup2b.lib.pixels accept edited copies and reject look-alikes?

    .venv/bin/python -m bench.copies                 # writes bench/results/copies.md (~1 min)
    .venv/bin/python -m bench.copies --seed 1 --faces 40 --out /tmp/copies.md

build_set(seed) makes, deterministically, a labelled set from pictures that ship with scikit-image,
scikit-learn and matplotlib (no downloads) and pages rendered with matplotlib's DejaVu fonts:
  positives  each original (22 photos, 2 rendered pages, non-overlapping crops of 5 big photos)
             against a copy under each single edit, under 4 chains of three distinct edits
             ("chain3"), and 2 pairs of its copies ("copy-copy"); 20 tiny originals (25x25 LFW
             faces) against a copy under each edit that still leaves a picture at that size
             ("tiny:<edit>", milder parameters, plus "upscale")
  negatives  distinct pictures of one kind: LFW faces of different people (every pair of the first
             `faces`), non-overlapping star-field crops, text (pages rendered from other words in
             one font and layout, small print too, and halves of scanned pages), product shots
             (different coins and objects on white), disjoint crops of one photo, textures
             (different textures, disjoint crops of one), unrelated photos, and "part-of": a
             half or less of a photo (a 1x2, 2x2 or 4x5 grid cell) against the whole photo
Edits (random parameters, see edit()): crop 50-90 % of the area, rot90, rotate 3-15 degrees
(expanded or not, any fill), mirror, letterbox (bars to another aspect), canvas (picture at
50-85 % of a bigger plain canvas), meme (white caption band), text (1-3 bold lines), watermark
(tiled or one big semi-transparent text), gray, gamma 0.5-0.8 or 1.25-2, color (saturation,
contrast, brightness, hue, channel gains), blur (sigma 0.2-0.6 % of the long side), squash
(aspect x 0.6-0.85 or 1.15-1.4), jpeg (quality 10-20), downscale (x 0.22-0.3). Copies are saved
as JPEG (quality 70-95), PNG or WebP.
Reported: acceptance per edit kind, false accepts per negative kind, pair precision / recall / F1,
ms per features() and per verify() (one thread), and the score distributions.
"""
from __future__ import annotations

import argparse
import io
import itertools
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

RESULTS = Path(__file__).parent / "results"
EDITS = ("crop", "rot90", "rotate", "mirror", "letterbox", "canvas", "meme", "text", "watermark",
         "gray", "gamma", "color", "blur", "squash", "jpeg", "downscale")
TINY_EDITS = ("crop", "rot90", "rotate", "mirror", "letterbox", "canvas", "gamma", "color", "blur",
              "squash", "jpeg", "upscale")
WORDS = ("the of and to in is was for that with as on by at from his her this which or are had be "
         "not but have they were one all their there been has when who will more no if out so said "
         "what up its about into than them can only other new some could time these two may then do "
         "first any my now such like our over man me even most made after also did many before must "
         "through back years where much your way well down should because each just those people how "
         "too little state good very make world still own see men work long get here between both life "
         "being under never day same another know while last might us great old year off come since "
         "against go came right used take three river garden window morning yellow seven market").split()


@dataclass
class CopySet:
    """images[i] are encoded bytes; pairs are (a, b, is_copy, kind) with a, b indexes of images."""
    images: list[bytes] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    pairs: list[tuple[int, int, bool, str]] = field(default_factory=list)

    def add(self, img: Image.Image, name: str, rng: random.Random, fmt: str | None = None, **kw) -> int:
        self.images.append(encode(img, rng, fmt, **kw))
        self.names.append(name)
        return len(self.images) - 1


# ---------------------------------------------------------------------------------------- sources
def _font(size: int, bold: bool = False, family: str = "DejaVuSans") -> ImageFont.FreeTypeFont:
    import matplotlib
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / f"{family}{'-Bold' if bold else ''}.ttf"
    return ImageFont.truetype(str(path), max(6, int(size)))


def _rgb(a: np.ndarray) -> Image.Image:
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
    img = Image.fromarray(a)
    if img.mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    return img.convert("RGB")


def photos() -> dict[str, Image.Image]:
    """The distinct photos available offline (skimage's cat is chelsea, so it is left out)."""
    import matplotlib.cbook as cbook
    import skimage.data as d
    from sklearn.datasets import load_sample_images
    out = {n: _rgb(getattr(d, n)()) for n in (
        "astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "camera", "brick", "grass",
        "gravel", "moon", "coins", "clock", "page", "text", "cell", "logo", "retina", "hubble_deep_field")}
    out["motorcycle"] = _rgb(d.stereo_motorcycle()[0])
    china, flower = load_sample_images().images
    out["china"], out["flower"] = _rgb(china), _rgb(flower)
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        out["grace_hopper"] = Image.open(f).convert("RGB")
    return out


def grid_crops(img: Image.Image, rows: int, cols: int) -> list[Image.Image]:
    """Non-overlapping crops of img on a rows x cols grid (share no pixel)."""
    w, h = img.size
    return [img.crop((c * w // cols, r * h // rows, (c + 1) * w // cols, (r + 1) * h // rows))
            for r in range(rows) for c in range(cols)]


def text_page(rng: random.Random, size=(420, 540), font_size=16, family="DejaVuSerif") -> Image.Image:
    """A white page of random words in one font: a look-alike of every other such page."""
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = _font(font_size, family=family)
    y, margin = 30, 30
    while y < size[1] - 40:
        line = ""
        while True:
            word = rng.choice(WORDS)
            if draw.textlength(line + " " + word, font=font) > size[0] - 2 * margin:
                break
            line = (line + " " + word).strip()
        draw.text((margin, y), line, fill=(20, 20, 20), font=font)
        y += int(font_size * 1.5)
    return img


def product_shots(rng: random.Random) -> list[Image.Image]:
    """Different objects cut out (or cropped) and centred on white canvases, like catalogue shots."""
    import skimage.data as d
    from skimage import filters, measure, morphology
    coins = d.coins()
    mask = morphology.opening(coins > filters.threshold_otsu(coins), morphology.disk(3))
    objects = []
    for reg in sorted(measure.regionprops(measure.label(mask)), key=lambda r: r.bbox):
        if reg.area < 600 or min(reg.bbox[:2]) == 0 or reg.bbox[2] == coins.shape[0] or reg.bbox[3] == coins.shape[1]:
            continue
        r0, c0, r1, c1 = reg.bbox
        crop = coins[r0:r1, c0:c1].astype(np.float32)
        m = reg.image.astype(np.float32)
        objects.append(((crop * m + 255 * (1 - m)).astype(np.uint8)))
    shots = []
    for obj in objects[:14]:
        shots.append(_rgb(np.stack([obj] * 3, -1)))
    # objects cut from photos that are also in the set: a fifth of the photo's area or less, so a
    # shot is another picture than its photo (a copy holds more than half of each image's content)
    extra = {"coffee": (d.coffee(), (80, 140, 280, 380)), "rocket": (d.rocket(), (120, 160, 350, 400)),
             "clock": (d.clock(), (60, 140, 210, 300)), "astronaut": (d.astronaut(), (120, 60, 350, 290)),
             "chelsea": (d.chelsea(), (70, 150, 230, 320)), "horse": (d.horse(), (0, 0, 328, 400)),
             "colorwheel": (d.colorwheel(), (0, 0, 370, 371))}
    for name, (a, (r0, c0, r1, c1)) in extra.items():
        shots.append(_rgb(a[r0:r1, c0:c1]))
    out = []
    for s in shots:
        canvas = Image.new("RGB", (320, 320), "white")
        f = 320 * rng.uniform(0.55, 0.8) / max(s.size)
        s = s.resize((round(s.width * f), round(s.height * f)), Image.LANCZOS)
        canvas.paste(s, ((320 - s.width) // 2, (320 - s.height) // 2))
        out.append(canvas)
    return out


# ---------------------------------------------------------------------------------------- edits
def encode(img: Image.Image, rng: random.Random, fmt: str | None = None, **kw) -> bytes:
    fmt = fmt or rng.choices(["JPEG", "PNG", "WEBP"], [0.7, 0.15, 0.15])[0]
    if fmt == "JPEG" and "quality" not in kw:
        kw["quality"] = rng.randint(70, 95)
    if fmt == "WEBP" and "quality" not in kw:
        kw["quality"] = rng.randint(70, 95)
    buf = io.BytesIO()
    (img if img.mode in ("RGB", "L") else img.convert("RGB")).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _color(rng):
    return rng.choice([(0, 0, 0), (255, 255, 255), (rng.randrange(256), rng.randrange(256), rng.randrange(256))])


def _draw_text(img: Image.Image, rng: random.Random, size_frac: float, lines: int, alpha: int = 255,
               anchor_y: float | None = None) -> Image.Image:
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    size = max(7, int(img.height * size_frac))
    font = _font(size, bold=True, family=rng.choice(["DejaVuSans", "DejaVuSerif"]))
    fill = rng.choice([(255, 255, 255), (255, 230, 0), (0, 0, 0)])
    stroke = (0, 0, 0) if fill != (0, 0, 0) else (255, 255, 255)
    for i in range(lines):
        words = " ".join(rng.choice(WORDS).upper() for _ in range(rng.randint(1, 4)))
        tw = draw.textlength(words, font=font)
        x = rng.uniform(0, max(1.0, img.width - tw))
        y = (anchor_y if anchor_y is not None else rng.uniform(0, 0.85)) * img.height + i * size * 1.2
        draw.text((x, y), words, font=font, fill=fill + (alpha,), stroke_width=max(1, size // 12),
                  stroke_fill=stroke + (alpha,))
    return Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")


def edit(img: Image.Image, kind: str, rng: random.Random, tiny: bool = False) -> tuple[Image.Image, dict]:
    """One edit with random parameters; returns the image and the bytes-encoding arguments."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    enc: dict = {}
    if kind == "crop":
        area = rng.uniform(0.7, 0.9) if tiny else rng.uniform(0.5, 0.9)
        r = rng.uniform(0.8, 1.25)
        cw, ch = min(w, round(w * (area * r) ** 0.5)), min(h, round(h * (area / r) ** 0.5))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        img = img.crop((x, y, x + cw, y + ch))
    elif kind == "rot90":
        img = img.transpose(rng.choice([Image.ROTATE_90, Image.ROTATE_180, Image.ROTATE_270]))
    elif kind == "rotate":
        angle = rng.choice([-1, 1]) * (rng.uniform(2, 10) if tiny else rng.uniform(3, 15))
        img = img.rotate(angle, Image.BICUBIC, expand=rng.random() < 0.5, fillcolor=_color(rng))
    elif kind == "mirror":
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    elif kind == "letterbox":
        target = rng.choice([1.0, 16 / 9, 9 / 16, 4 / 5, 3 / 2])
        if abs(target - w / h) < 0.15 * w / h:
            target = w / h * rng.choice([1.5, 1 / 1.5])
        cw, ch = (max(w, round(h * target)), h) if target > w / h else (w, max(h, round(w / target)))
        canvas = Image.new("RGB", (cw, ch), rng.choice([(0, 0, 0), (255, 255, 255)]))
        canvas.paste(img, ((cw - w) // 2, (ch - h) // 2))
        img = canvas
    elif kind == "canvas":
        s = rng.uniform(0.6, 0.85) if tiny else rng.uniform(0.5, 0.85)
        cw, ch = round(w / s * rng.uniform(0.9, 1.1)), round(h / s * rng.uniform(0.9, 1.1))
        canvas = Image.new("RGB", (cw, ch), _color(rng))
        canvas.paste(img, (rng.randint(0, cw - w), rng.randint(0, ch - h)))
        img = canvas
    elif kind == "meme":
        top, bottom = round(h * rng.uniform(0.15, 0.3)), round(h * rng.uniform(0, 0.2)) * (rng.random() < 0.5)
        canvas = Image.new("RGB", (w, h + top + bottom), "white")
        canvas.paste(img, (0, top))
        draw = ImageDraw.Draw(canvas)
        font = _font(top * 0.35, bold=True)
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7)))
        draw.text((w * 0.05, top * 0.25), words, font=font, fill=(0, 0, 0))
        img = canvas
    elif kind == "text":
        img = _draw_text(img, rng, rng.uniform(0.06, 0.12), rng.randint(1, 3))
    elif kind == "watermark":
        if rng.random() < 0.5:
            img = _draw_text(img, rng, rng.uniform(0.08, 0.15), 1, alpha=rng.randint(90, 160), anchor_y=0.45)
        else:
            layer = Image.new("RGBA", (w * 2, h * 2), (0, 0, 0, 0))
            draw = ImageDraw.Draw(layer)
            font = _font(max(8, h * 0.05), bold=True)
            mark = rng.choice(["(c) stock", "PREVIEW", "sample", "shutter photo"])
            step = int(h * 0.12)
            for y in range(0, 2 * h, step):
                draw.text(((y // step % 2) * step, y), ("  " + mark) * 12, font=font,
                          fill=(255, 255, 255, rng.randint(60, 120)))
            layer = layer.rotate(rng.uniform(20, 40), Image.BICUBIC).crop((w // 2, h // 2, w // 2 + w, h // 2 + h))
            img = Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")
    elif kind == "gray":
        img = img.convert("L")
    elif kind == "gamma":
        g = rng.uniform(0.5, 0.8) if rng.random() < 0.5 else rng.uniform(1.25, 2.0)
        lut = [round(255 * (i / 255) ** g) for i in range(256)]
        img = img.point(lut * len(img.getbands()))
    elif kind == "color":
        img = ImageEnhance.Color(img).enhance(rng.uniform(0.3, 1.8))
        img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.7, 1.3))
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.75, 1.25))
        hsv = np.asarray(img.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(int) + rng.randint(-30, 30)) % 256
        gains = np.array([rng.uniform(0.8, 1.2) for _ in range(3)])
        rgb = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"), np.float32) * gains
        img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    elif kind == "blur":
        sigma = rng.uniform(0.4, 0.7) if tiny else max(w, h) * rng.uniform(0.002, 0.006)
        img = img.filter(ImageFilter.GaussianBlur(sigma))
    elif kind == "squash":
        f = rng.uniform(0.6, 0.85) if rng.random() < 0.5 else rng.uniform(1.15, 1.4)
        img = img.resize((max(1, round(w * f ** 0.5)), max(1, round(h / f ** 0.5))), Image.BICUBIC)
    elif kind == "jpeg":
        q = rng.randint(25, 50) if tiny else rng.randint(10, 20)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=q)
        img = Image.open(buf)
        img.load()
        enc = {"fmt": "JPEG", "quality": q}                  # when last, the copy is this file
    elif kind == "downscale":
        f = rng.uniform(0.22, 0.3)
        img = img.resize((max(1, round(w * f)), max(1, round(h * f))),
                         rng.choice([Image.BILINEAR, Image.BICUBIC, Image.LANCZOS, Image.BOX]))
    elif kind == "upscale":
        f = rng.uniform(2, 4)
        img = img.resize((round(w * f), round(h * f)), rng.choice([Image.BILINEAR, Image.BICUBIC, Image.LANCZOS]))
    else:
        raise ValueError(f"unknown edit {kind!r}")
    return img, enc


def edited(img: Image.Image, kinds: list[str], rng: random.Random, tiny: bool = False) -> tuple[Image.Image, dict]:
    enc: dict = {}
    for k in kinds:
        img, enc = edit(img, k, rng, tiny)
    return img, enc


# ---------------------------------------------------------------------------------------- the set
def build_set(seed: int = 0, faces: int = 100, chains: int = 4, tiny: int = 20,
              unrelated: int = 200) -> CopySet:
    """The labelled set (deterministic in `seed`): see the module docstring.

    faces: the first `faces` LFW faces, every pair a negative; chains: chained copies per original;
    tiny: LFW faces used as tiny originals; unrelated: pairs of unrelated originals.
    """
    import skimage.data as d
    rng = random.Random(seed)
    cs = CopySet()
    ph = photos()
    big = {"hubble_deep_field": (2, 2), "retina": (2, 2), "motorcycle": (1, 2), "china": (1, 2),
           "flower": (1, 2)}
    originals = list(ph.items())
    originals += [("rendered-page", text_page(random.Random(seed + 101))),
                  ("small-print-page", text_page(random.Random(seed + 102), (800, 1000), 14))]
    for name, (r, c) in big.items():
        originals += [(f"{name}[{i}]", im) for i, im in enumerate(grid_crops(ph[name], r, c))]
    orig_idx, whole = [], {}
    for name, img in originals:
        o = cs.add(img, name, rng, fmt=rng.choice(["PNG", "JPEG"]))
        orig_idx.append(o)
        whole.setdefault(name, o)
        copies = []
        plans = [[k] for k in EDITS] + [rng.sample(EDITS, 3) for _ in range(chains)]
        for plan in plans:
            img2, enc = edited(img, plan, rng)
            kind = plan[0] if len(plan) == 1 else "chain3"
            c = cs.add(img2, f"{name}|{'+'.join(plan)}", rng, enc.pop("fmt", None), **enc)
            cs.pairs.append((o, c, True, kind))
            copies.append(c)
        for a, b in rng.sample(list(itertools.combinations(copies, 2)), 2):
            cs.pairs.append((a, b, True, "copy-copy"))
    lfw = d.lfw_subset()
    face_imgs = [Image.fromarray((lfw[i] * 255).round().astype(np.uint8)) for i in range(100)]
    # tiny originals: faces at 25x25 against copies under the edits that make sense at that size
    for i in range(min(tiny, 100)):
        o = cs.add(face_imgs[i], f"lfw[{i}]", rng, fmt="PNG")
        for k in TINY_EDITS:
            img2, enc = edit(face_imgs[i], k, rng, tiny=True)
            c = cs.add(img2, f"lfw[{i}]|{k}", rng, enc.pop("fmt", "PNG"), **enc)
            cs.pairs.append((o, c, True, f"tiny:{k}"))
    # negatives
    face_ids = [cs.add(face_imgs[i], f"lfw[{i}]", rng, fmt="PNG") for i in range(faces)]
    cs.pairs += [(a, b, False, "faces") for a, b in itertools.combinations(face_ids, 2)]
    stars = [cs.add(im, f"hubble[{i}]", rng) for i, im in enumerate(grid_crops(ph["hubble_deep_field"], 4, 5))]
    cs.pairs += [(a, b, False, "stars") for a, b in itertools.combinations(stars, 2)]
    # a part of a photo (a half or less, cut on a grid) is another picture than the photo: a copy
    # holds more than half of each image's content, so two disjoint parts never meet through it
    cs.pairs += [(whole["hubble_deep_field"], s, False, "part-of") for s in stars]
    cs.pairs += [(whole[name.split("[")[0]], o, False, "part-of")
                 for (name, _), o in zip(originals, orig_idx) if "[" in name]
    pages = [cs.add(text_page(rng, family=fam), f"page[{i}]", rng)
             for i, fam in enumerate(["DejaVuSerif"] * 8 + ["DejaVuSans"] * 4)]
    scans = [cs.add(im, f"page-scan[{i}]", rng)
             for i, im in enumerate(grid_crops(ph["page"], 1, 2) + grid_crops(ph["text"], 1, 2))]
    cs.pairs += [(a, b, False, "text") for a, b in itertools.combinations(pages + scans, 2)]
    # a half of a page against the page: its text is uneven (margins, short lines), so the half can
    # hold more than half of the page's detail
    cs.pairs += [(whole[name], s, False, "part-of") for name, s in zip(["page", "page", "text", "text"], scans)]
    small = [cs.add(text_page(rng, (800, 1000), 14, fam), f"small-print[{i}]", rng)
             for i, fam in enumerate(["DejaVuSerif"] * 4 + ["DejaVuSans"] * 2)]
    cs.pairs += [(a, b, False, "text") for a, b in itertools.combinations(small, 2)]
    prods = [cs.add(im, f"product[{i}]", rng) for i, im in enumerate(product_shots(rng))]
    cs.pairs += [(a, b, False, "products") for a, b in itertools.combinations(prods, 2)]
    for name in ("astronaut", "coffee", "chelsea", "rocket", "china", "flower", "camera", "motorcycle",
                 "grace_hopper", "immunohistochemistry", "moon"):   # (retina: its quarters are originals above)
        ids = [cs.add(im, f"{name}<{i}>", rng) for i, im in enumerate(grid_crops(ph[name], 2, 2))]
        cs.pairs += [(a, b, False, "disjoint-crops") for a, b in itertools.combinations(ids, 2)]
        cs.pairs += [(whole[name], a, False, "part-of") for a in ids]
        if big.get(name) == (1, 2):     # a quarter against the half it lies in (a sky is smooth:
            halves = [whole[f"{name}[{j}]"] for j in range(2)]   # the quarter below holds most detail)
            cs.pairs += [(halves[i % 2], a, False, "part-of") for i, a in enumerate(ids)]
    tex = {}
    for name in ("brick", "grass", "gravel"):
        tex[name] = [cs.add(ph[name], name, rng)] + [cs.add(im, f"{name}<{i}>", rng)
                                                      for i, im in enumerate(grid_crops(ph[name], 2, 2))]
        cs.pairs += [(a, b, False, "textures") for a, b in itertools.combinations(tex[name][1:], 2)]
    for x, y in itertools.combinations(tex, 2):
        cs.pairs += [(a, b, False, "textures") for a in tex[x] for b in tex[y]]
    # unrelated originals: pick pairs from different photo families ("hubble_deep_field[0]" is one
    # of hubble_deep_field's crops, so both share a family)
    fam = [cs.names[o].split("[")[0] for o in orig_idx]
    cand = [(a, b) for (a, fa), (b, fb) in itertools.combinations(zip(orig_idx, fam), 2) if fa != fb]
    cs.pairs += [(a, b, False, "unrelated") for a, b in rng.sample(cand, min(unrelated, len(cand)))]
    return cs


# ---------------------------------------------------------------------------------------- report
def _pct(x) -> str:
    return f"{100 * x:.1f} %"


def evaluate(cs: CopySet, log=print) -> dict:
    """features() of every image and verify() of every pair, on one thread (OpenCV and BLAS)."""
    import pickle

    import cv2
    from threadpoolctl import threadpool_limits

    from dedup2b.lib import pixels
    cv2.setNumThreads(1)
    feats, f_ms = [], []
    with threadpool_limits(1):
        for data in cs.images:
            t0 = time.perf_counter()
            feats.append(pixels.features(data))
            f_ms.append(1000 * (time.perf_counter() - t0))
        log(f"features: {len(feats)} images, median {np.median(f_ms):.1f} ms", flush=True)
        rows, v_ms = [], []
        for a, b, y, kind in cs.pairs:
            k0 = feats[a].keypoint_s + feats[b].keypoint_s
            t0 = time.perf_counter()
            ok, score = pixels.verify(feats[a], feats[b])
            # keypoints are made on first use and kept: counted apart, per image
            v_ms.append(1000 * (time.perf_counter() - t0 - (feats[a].keypoint_s + feats[b].keypoint_s - k0)))
            rows.append((a, b, y, kind, ok, score))
    sizes = [len(pickle.dumps(f)) for f in feats]
    return {"rows": rows, "features_ms": f_ms, "verify_ms": v_ms, "feature_bytes": sizes,
            "stored_bytes": [f.work.nbytes for f in feats],
            "keypoints_ms": [1000 * f.keypoint_s for f in feats if f.has_keypoints]}


def report(cs: CopySet, res: dict, cmd: str, wall_s: float) -> str:
    from dedup2b.lib import pixels
    rows = res["rows"]
    pos = [r for r in rows if r[2]]
    neg = [r for r in rows if not r[2]]

    def prf(rs_pos):
        tp, fp = sum(r[4] for r in rs_pos), sum(r[4] for r in neg)
        p, r = tp / max(tp + fp, 1), tp / max(len(rs_pos), 1)
        return p, r, 2 * p * r / max(p + r, 1e-9)

    def order(k):
        return (k.startswith("tiny:"), k in ("chain3", "copy-copy"), k)

    fm, vm = np.array(res["features_ms"]), np.array(res["verify_ms"])
    lines = [f"Command: `{cmd}` ({os.cpu_count()} cores, one thread for OpenCV and BLAS); {len(cs.images)} "
             f"images, {len(pos)} copy pairs, {len(neg)} look-alike pairs; wall {wall_s:.0f} s", "",
             f"Decision: a copy iff score >= {pixels.ACCEPT} (score: median tile correlation of fine detail "
             "after alignment, see dedup2b/lib/pixels.py)", ""]
    lines += ["## Copies: acceptance (recall) per edit", "",
              "| edit | pairs | accepted | score p5 / median |", "|---|---|---|---|"]
    for k in sorted({r[3] for r in pos}, key=order):
        rs = [r for r in pos if r[3] == k]
        sc = np.array([r[5] for r in rs])
        lines.append(f"| {k} | {len(rs)} | {_pct(np.mean([r[4] for r in rs]))} | "
                     f"{np.percentile(sc, 5):.2f} / {np.median(sc):.2f} |")
    lines += ["", "## Look-alikes: false accept rate per kind", "",
              "| kind | pairs | false accepts | rate | score median / p99 / max |", "|---|---|---|---|---|"]
    for k in sorted({r[3] for r in neg}):
        rs = [r for r in neg if r[3] == k]
        sc = np.array([r[5] for r in rs])
        lines.append(f"| {k} | {len(rs)} | {sum(r[4] for r in rs)} | {_pct(np.mean([r[4] for r in rs]))} | "
                     f"{np.median(sc):.2f} / {np.percentile(sc, 99):.2f} / {sc.max():.2f} |")
    groups = {"all copy pairs": pos,
              "photos: single edits": [r for r in pos if r[3] in EDITS],
              "photos: chains of three": [r for r in pos if r[3] == "chain3"],
              "photos: copy vs copy": [r for r in pos if r[3] == "copy-copy"],
              "tiny (25 px faces)": [r for r in pos if r[3].startswith("tiny:")]}
    lines += ["", "## Overall (every look-alike pair counts against precision)", "",
              "| copies | pairs | precision | recall | F1 |", "|---|---|---|---|---|"]
    for name, rs in groups.items():
        p, r, f = prf(rs)
        lines.append(f"| {name} | {len(rs)} | {p:.4f} | {r:.4f} | {f:.4f} |")
    lines.append(f"\nFalse accepts: {sum(r[4] for r in neg)} of {len(neg)} look-alike pairs.")
    vpos = np.array([v for r, v in zip(rows, vm) if r[2]])
    vneg = np.array([v for r, v in zip(rows, vm) if not r[2]])
    kb = np.array(res["feature_bytes"]) / 1000
    sb = np.array(res.get("stored_bytes", res["feature_bytes"])) / 1000
    km = np.array(res.get("keypoints_ms") or [0.0])
    lines += ["", "## Cost (one core)", "", "| call | median ms | p95 ms | max ms |", "|---|---|---|---|",
              f"| features() (decode, working image, thumbnail) | {np.median(fm):.1f} | {np.percentile(fm, 95):.1f} "
              f"| {fm.max():.1f} |",
              f"| keypoints, per image that needed them | {np.median(km):.1f} | {np.percentile(km, 95):.1f} "
              f"| {km.max():.1f} |",
              f"| verify(), all pairs (keypoints apart) | {np.median(vm):.2f} | {np.percentile(vm, 95):.2f} "
              f"| {vm.max():.2f} |",
              f"| verify(), copies | {np.median(vpos):.2f} | {np.percentile(vpos, 95):.2f} | {vpos.max():.2f} |",
              f"| verify(), look-alikes | {np.median(vneg):.2f} | {np.percentile(vneg, 95):.2f} | {vneg.max():.2f} |",
              "", f"Keypoints: {len(res.get('keypoints_ms') or [])} of {len(fm)} images needed them (the others' "
              "pairs were all settled on the whole frame). Stored per image (the working image): median "
              f"{np.median(sb):.0f} KB, max {sb.max():.0f} KB; in memory with keypoints and thumbnail: median "
              f"{np.median(kb):.0f} KB, max {kb.max():.0f} KB."]
    edges = [0, 0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9, 1.0001]
    hp = np.histogram(np.clip([r[5] for r in pos], 0, 1), edges)[0]
    hn = np.histogram(np.clip([r[5] for r in neg], 0, 1), edges)[0]
    lines += ["", "## Score distribution", "", "| score | copies | look-alikes |", "|---|---|---|"]
    lines += [f"| {lo:.2f}-{min(hi, 1):.2f} | {p} | {n} |" for lo, hi, p, n in zip(edges, edges[1:], hp, hn)]
    miss = sorted([r for r in pos if not r[4]], key=lambda r: r[5])
    fa = sorted([r for r in neg if r[4]], key=lambda r: -r[5])
    if miss or fa:
        lines += ["", "## Errors", ""]
        lines += [f"- missed copy ({r[3]}): {cs.names[r[0]]} vs {cs.names[r[1]]}, score {r[5]:.3f}" for r in miss]
        lines += [f"- false accept ({r[3]}): {cs.names[r[0]]} vs {cs.names[r[1]]}, score {r[5]:.3f}" for r in fa]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--faces", type=int, default=100)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--out", default=str(RESULTS / "copies.md"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    cs = build_set(args.seed, faces=args.faces, chains=args.chains)
    print(f"set: {len(cs.images)} images, {len(cs.pairs)} pairs ({time.perf_counter() - t0:.1f} s)", flush=True)
    res = evaluate(cs)
    cmd = ".venv/bin/python -m bench.copies" + "".join(
        f" --{k} {v}" for k, v in vars(args).items() if k != "out" and v != ap.get_default(k))
    md = "# Copy verifier (dedup2b.lib.pixels)\n\n" + report(cs, res, cmd, time.perf_counter() - t0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
