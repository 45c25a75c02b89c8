"""Typed run configuration: dataclasses, YAML loading, validation and fingerprints.

Every field is validated when the config is built; errors name the field. The fingerprint of
the fields that change a stage's output is stored with that stage's outputs, so a rerun with a
different config refuses to mix stale results and says which field changed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


# Default thresholds per model family, measured on the demo corpus (see README, "Threshold"):
# the offline encoder's near-duplicates sit at cosine >= 0.72 and its distinct photos <= 0.74
# (retina crops), with 0.80 separating all but the hardest; CLIP's is the paper's 0.95.
# sscd and DINOv2 (timm:*dinov2*): starting points, not measured here (no weights ship offline);
# `dedup2b calibrate` on your own run says where to move them.
DEFAULT_THRESHOLDS = {"timm:tf_efficientnet_lite0": 0.80, "timm": 0.85, "open_clip": 0.95, "precomputed": 0.95,
                      "sscd": 0.75, "dinov2": 0.90}


# How far below the threshold the pixel check's candidates start (verify.low = threshold - this),
# per model family: the offline encoder puts copies under heavy edits (a 90 degree turn, a
# watermark, chains of three) down to cosine 0.4 and below (bench/results/quality.md: pair recall
# 0.929 with candidates from 0.50, 0.954 from 0.40 at 18 % more pixel checks, precision 1.000
# both); others keep 0.20 until measured.
DEFAULT_BAND_BELOW = {"timm:tf_efficientnet_lite0": 0.40}


def default_low(model: str, threshold: float) -> float:
    return round(threshold - DEFAULT_BAND_BELOW.get(model, 0.20), 6)


def default_threshold(model: str) -> float:
    parts = model.split(":")
    if len(parts) > 1 and "dinov2" in parts[1]:
        return DEFAULT_THRESHOLDS["dinov2"]
    return DEFAULT_THRESHOLDS.get(model, DEFAULT_THRESHOLDS.get(parts[0], 0.90))


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the field."""


@dataclass
class InputConfig:
    path: str = ""                # a folder of img2dataset shards, or of clip-retrieval embeddings
    format: str = "img2dataset"   # img2dataset (NNNNN.tar + .parquet) | embeddings (img_emb/ + metadata/)
                                  # | folder (image files) | hf (Hugging Face parquet with image bytes);
                                  # the CLI, jobs and API detect it from the folder when not given
    renormalize: bool = False     # embeddings: normalise vectors whose norm is off 1
    norm_tolerance: float = 0.01  # embeddings: allowed |norm - 1| without renormalize
    copy_vectors: bool = False    # embeddings: copy the vectors into the run (default: read the input's
                                  # files in place where every row is valid and none is renormalised)
    image_column: str = "image"   # hf: the column of the images (`datasets` Image {bytes, path}, or binary)
    text_column: str = ""         # hf: the caption column; "" = the first of text, caption, problem present
    key_column: str = ""          # hf: the column of row keys; "" = <file path without .parquet>/<row index>

    def validate(self) -> None:
        if not self.path:
            raise ConfigError("input.path: required (a folder of img2dataset shards or embeddings)")
        if not self.image_column:
            raise ConfigError("input.image_column: required (the column that holds the images, default 'image')")
        from ..sources import SOURCES
        if self.format not in SOURCES:
            raise ConfigError(f"input.format: unknown format {self.format!r}; known: {', '.join(SOURCES)}")


@dataclass
class EmbedConfig:
    model: str = "timm:tf_efficientnet_lite0"   # registry spec, see pipeline/models.py
    batch_size: int = 0                          # rows per model batch; 0 = 256 where the cluster has
                                                 # GPUs (halved on CUDA out-of-memory), else 32
    actors: int = 1                              # model actors in the pool
    threads: int = 0                             # torch threads per actor (0 = cpus of the actor)
    decode_cpus: float = 0.5                     # CPU request of each decode/preprocess task

    def validate(self) -> None:
        if ":" not in self.model:
            raise ConfigError(f"embed.model: {self.model!r} is not a registry spec like "
                              "'timm:tf_efficientnet_lite0', 'open_clip:ViT-B-32' or, for embeddings "
                              "input, 'precomputed:ViT-L-14'")
        if self.batch_size < 0 or self.actors < 1:
            raise ConfigError("embed.batch_size: must be >= 0 (0 = automatic); embed.actors: must be >= 1")


@dataclass
class CodecConfig:
    """FAISS codec: [OPQ] -> IVF -> PQ, trained once on a seeded sample."""
    nlist: int = 0             # IVF cells; 0 = chosen from the corpus size
    pq_m: int = 0              # PQ sub-quantizers; 0 = chosen from the dimension
    pq_bits: int = 8
    opq: bool = False          # a learned rotation before PQ (better codes, slow training)
    bytes_per_vector: int = 16  # memory budget per vector in the index, ids included
    train_size: int = 100_000  # vectors sampled for training
    seed: int = 1234

    def validate(self) -> None:
        if self.nlist < 0 or self.pq_m < 0:
            raise ConfigError("codec.nlist / codec.pq_m: must be >= 0 (0 = automatic)")
        if not 1 <= self.pq_bits <= 16:
            raise ConfigError("codec.pq_bits: must be in 1..16")
        if self.bytes_per_vector < 9:
            raise ConfigError("codec.bytes_per_vector: must be >= 9 (8-byte id + at least 1 code byte)")


@dataclass
class SearchConfig:
    threshold: float | None = None   # exact cosine at/above which rows are near duplicates;
                                     # None = the model's default (DEFAULT_THRESHOLDS)
    method: str = "cells"       # cells: cell join + exact bound (default); pq: IVF-PQ range search
    band: float = 0.03          # pairs in [threshold - band, threshold) are kept as near misses
    cells: int = 0              # cell-join cells; 0 = rows / cell_rows
    cell_rows: int = 250        # rows per cell when cells = 0: bounded, so a row's join cost is
                                # flat in rows (a row sits in ~2.5 cells under the nested assignment:
                                # ~600 memberships a cell)
    # how rows find their cells: nested = the coarse cells within coarse_delta of the row's best,
    # in each the best fine cell and those within border of it (~3 sqrt(cells) products a row, so
    # a row's cost barely grows with rows); flat = every cell scored, the best and those within
    # border of it (cells products a row; beyond 8,192 cells two levels where they prune)
    assign: str = "nested"
    coarse_delta: float = 0.0075
    proj_dim: int = 128         # cell-join projection (the join's bound); 0 = full dimension
    cell_dim: int = 64          # cells are trained and assigned in the projection's first cell_dim
                                # dims (0 = all of them): the assignment's rows x cells product at
                                # 0.56-0.64 of the cost (bench/results/ab_cell_dim.md)
    border: float = 0.007       # also put a vector in cells scoring within this of its best (nested:
                                # of its best inside each probed coarse cell)
    max_cells: int = 6          # cells per vector at most
    cells_per_task: int = 256   # cells joined by one task (~150,000 memberships at the defaults)
    device: str = "auto"        # cell-join products: auto (CUDA when visible, else numpy), numpy, cpu, cuda
    # which verified edges are kept: forest = the edges of a spanning forest of each group (pairs
    # .parquet holds n - groups edges; a cell of dense_cell rows or more whose probed rows average
    # 32+ neighbours is joined as components, not pair by pair: a group of 100,000 copies costs
    # O(rows), not 5e9 pairs); all = every pair at or above the threshold, everywhere (small runs:
    # the cost grows with the pairs)
    pairs: str = "forest"
    dense_cell: int = 128
    margin: float = 0.15        # pq: candidates down to threshold - margin, then verified
    nprobe: int = 8             # pq, and the cross search: IVF cells visited per query
    cross_k: int = 16           # cross search (--against, decontaminate): nearest registered rows per
                                # query by the IVF-PQ estimate, each re-scored exactly (k grows where
                                # the k-th still matches)
    query_batch: int = 4096

    def validate(self) -> None:
        if self.threshold is None or not -1.0 <= self.threshold <= 1.0:
            raise ConfigError("search.threshold: a cosine in [-1, 1]")
        if self.margin < 0 or self.band < 0 or self.border < 0 or self.coarse_delta < 0:
            raise ConfigError("search.margin / search.band / search.border / search.coarse_delta: must be >= 0")
        if self.assign not in ("nested", "flat"):
            raise ConfigError(f"search.assign: {self.assign!r}; known: nested, flat")
        if self.method not in ("cells", "pq"):
            raise ConfigError(f"search.method: {self.method!r}; known: cells, pq")
        if self.device not in ("auto", "numpy", "cpu", "cuda"):
            raise ConfigError(f"search.device: {self.device!r}; known: auto, numpy, cpu, cuda")
        if self.max_cells < 1 or self.cells_per_task < 1 or self.cell_rows < 1 or self.cross_k < 1:
            raise ConfigError("search.max_cells / search.cells_per_task / search.cell_rows / search.cross_k: "
                              "must be >= 1")
        if self.pairs not in ("forest", "all"):
            raise ConfigError(f"search.pairs: {self.pairs!r}; known: forest, all")
        if self.cell_dim < 0 or self.proj_dim < 0:
            raise ConfigError("search.cell_dim / search.proj_dim: must be >= 0 (0 = all dims)")
        if self.dense_cell < 2:
            raise ConfigError("search.dense_cell: must be >= 2 (rows of a cell joined as components)")


@dataclass
class VerifyConfig:
    # pixels: candidate pairs the descriptor cannot settle alone (similarity in [low, sure)) are
    # checked on the images (local features + geometric verification, lib/pixels.py) where the
    # input has images; off: the descriptor alone decides at search.threshold
    # (bench/results/copies.md, quality.md: with the default model, copies under heavy edits sit
    # down to cosine 0.5 and different text pages up to 0.996, so every candidate is checked)
    method: str = "pixels"
    low: float | None = None    # candidates from here; None = search.threshold - 0.20 (- 0.40 for
                                # the offline default model: DEFAULT_BAND_BELOW)
    sure: float | None = None   # at/above: a copy on the descriptor alone, unchecked; None = 1.0
                                # (every candidate checked; byte-identical copies never need it)
    # pairs checked by their better row (the rows groups keep first), then most similar first; a
    # pair whose rows accepted edges already connect is not checked (its edge changes no group;
    # group.member_check confirms members, mostly through the star edges already checked): a group
    # of n copies costs ~n checks, not n^2/2. Off (and with search.pairs all or
    # group.duplicate_key image+text): every candidate pair checked, most similar first
    skip_connected: bool = True

    def validate(self) -> None:
        if self.method not in ("pixels", "off"):
            raise ConfigError(f"verify.method: {self.method!r}; known: pixels, off")
        if not -1.0 <= self.low <= self.sure <= 1.0001:
            raise ConfigError(f"verify.low / verify.sure: cosines with low <= sure (got {self.low}, {self.sure})")


@dataclass
class GroupConfig:
    # A member must be at least this similar to its group's representative; components that chain
    # dissimilar rows through intermediates are split. -1 disables the guard.
    min_rep_similarity: float | None = None   # None = search.threshold - 0.10; where the pixel check
                                              # runs: off (-1) with group.member_check, else verify.low - 0.10
    # where the pixel check runs: every member is checked against its group's representative,
    # by an accepted edge between them or else by the pixels of the two (the descriptor at
    # search.threshold where an image has no pixel evidence); a member that fails is split off and
    # regrouped with the others split off, so no member is in a group through a chain alone
    member_check: bool = True
    member_hops: int = 1        # 2: an accepted edge to a member that has one to the representative
                                # also confirms (a bounded path instead of the pixels of the two)
    exact_bytes: bool = True    # rows with equal sha256 are duplicates even without vectors
    # image: near-duplicate images are duplicates; image+text: only when their texts are also equal
    # after normalisation (NFKC, case-folded, whitespace collapsed) — for VQA / RL data
    duplicate_key: str = "image"
    # which row of a group is kept: quality = most pixels (where the pixel check ran, a frame's
    # padding discounted: lib/nodes.picture_pixels), then most bytes, then smallest key;
    # first = the first row in input order (smallest gid): what an incremental run keeps, so
    # increments give exactly the all-at-once kept set
    representative: str = "quality"

    def validate(self) -> None:
        if self.representative not in ("quality", "first"):
            raise ConfigError(f"group.representative: {self.representative!r}; known: quality, first")
        if self.duplicate_key not in ("image", "image+text"):
            raise ConfigError(f"group.duplicate_key: {self.duplicate_key!r}; known: image, image+text")
        if self.member_hops not in (1, 2):
            raise ConfigError(f"group.member_hops: {self.member_hops}; 1 (direct) or 2")
        if self.min_rep_similarity is not None and not -1.0 <= self.min_rep_similarity <= 1.0:
            raise ConfigError("group.min_rep_similarity: a cosine in [-1, 1]")


@dataclass
class ExportConfig:
    formats: list[str] = field(default_factory=lambda: ["webdataset", "keep", "hf"])
    rows_per_shard: int = 10000   # webdataset output shards; 0 = one output shard per input shard

    def validate(self) -> None:
        bad = set(self.formats) - {"webdataset", "keep", "hf"}
        if bad:
            raise ConfigError(f"export.formats: unknown {sorted(bad)}; known: webdataset, keep, hf")
        if self.rows_per_shard < 0:
            raise ConfigError(f"export.rows_per_shard: {self.rows_per_shard} must be >= 0")


@dataclass
class RayConfig:
    address: str = ""             # "" = start an embedded local Ray; "auto" = attach to a cluster
    num_cpus: int = 0             # embedded mode only; 0 = all cores
    object_store_mb: int = 1024   # embedded mode only
    max_retries: int = 2          # per shard task

    def validate(self) -> None:
        if self.num_cpus < 0 or self.object_store_mb < 100:
            raise ConfigError("ray.num_cpus >= 0 and ray.object_store_mb >= 100")


@dataclass
class DecontaminateConfig:
    eval: list[str] = field(default_factory=list)   # index folders of evaluation sets (see lib/registry.py)

    def validate(self) -> None:
        if isinstance(self.eval, str):
            self.eval = [self.eval]
        names = [Path(p).name for p in self.eval]
        if len(set(names)) != len(names):
            raise ConfigError(f"decontaminate.eval: folder names must differ (they name the eval sets): {names}")


@dataclass
class RunConfig:
    input: InputConfig = field(default_factory=InputConfig)
    run_dir: str = ""
    index_dir: str = ""          # the run's index folder; the CLI, jobs and API default it to
                                 # indexes/<run name> (resolve_paths); left empty: <run_dir>/index
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    group: GroupConfig = field(default_factory=GroupConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    against: str = ""            # incremental: index folder of earlier runs to dedup against and extend
    decontaminate: DecontaminateConfig = field(default_factory=DecontaminateConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.search.threshold is None:
            self.search.threshold = default_threshold(self.embed.model)
        t = self.search.threshold
        if isinstance(t, (int, float)):
            if self.verify.low is None:
                self.verify.low = default_low(self.embed.model, t)
            if self.verify.sure is None:
                self.verify.sure = 1.0
        if self.group.min_rep_similarity is None:
            # with the member check every member's pixels are checked against its representative's:
            # the descriptor guard would only split off copies the descriptor ranks low (a 90 degree
            # turn, a watermark: cosine 0.3-0.5); with the pixel check alone it sits below its band
            self.group.min_rep_similarity = (-1.0 if self.pixel_check and self.group.member_check else
                                             round((self.verify.low if self.pixel_check else t) - 0.10, 6))
        if not self.run_dir:
            raise ConfigError("run_dir: required (where this run's outputs go)")
        if (self.input.format == "embeddings") != self.embed.model.startswith("precomputed:"):
            raise ConfigError("embed.model: use 'precomputed:NAME' exactly when input.format is embeddings "
                              f"(got format {self.input.format!r}, model {self.embed.model!r})")
        if self.against and Path(self.against).resolve() == self.index_path.resolve():
            raise ConfigError(f"against: {self.against} is this run's own index folder; give the new run "
                              "its own --index-dir")
        for section in ("input", "embed", "codec", "search", "verify", "group", "export", "ray", "decontaminate"):
            getattr(self, section).validate()

    @property
    def pixel_check(self) -> bool:
        """Whether candidate pairs are checked by pixels: verify.method pixels and an image input."""
        from ..sources import SOURCES
        source = SOURCES.get(self.input.format)
        return self.verify.method == "pixels" and bool(source is not None and source.HAS_IMAGES)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)

    @property
    def index_path(self) -> Path:
        return Path(self.index_dir) if self.index_dir else self.run_path / "index"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def stage_view(self, fields: tuple[str, ...]) -> dict[str, Any]:
        """The values of the dotted config fields a stage's outputs depend on."""
        full = self.to_dict()
        view: dict[str, Any] = {}
        for name in fields:
            node: Any = full
            for part in name.split("."):
                node = node[part]
            view[name] = node
        return view

    def fingerprint(self, fields: tuple[str, ...]) -> str:
        """Hash of those fields' values: stored in a stage's done markers (see stages.STAGES' FIELDS)."""
        blob = json.dumps(self.stage_view(fields), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


_SECTIONS = {"input": InputConfig, "embed": EmbedConfig, "codec": CodecConfig, "search": SearchConfig,
             "verify": VerifyConfig, "group": GroupConfig, "export": ExportConfig, "ray": RayConfig, "decontaminate": DecontaminateConfig}


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def coerce(name: str, value: Any, kind: str) -> Any:
    """A value (from YAML or a --set string) as the field's declared type, or a ConfigError naming
    the field: "False" is false for a bool, "0.9" a float, "a,b" or '["a"]' a list."""
    if value is None:
        if "None" in kind:
            return None
        raise ConfigError(f"{name}: a value is required")
    base = kind.replace(" | None", "").strip()
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
            if str(value).strip().lower() in _TRUE | _FALSE and not isinstance(value, float):
                return str(value).strip().lower() in _TRUE
            raise ValueError
        if base in ("int", "float"):
            if isinstance(value, bool):
                raise ValueError
            number = float(value) if isinstance(value, str) else value
            if not isinstance(number, (int, float)) or number != number:
                raise ValueError
            if base == "int":
                if float(number) != int(number):
                    raise ValueError
                return int(number)
            return float(number)
        if base.startswith("list"):
            if isinstance(value, str):
                text = value.strip()
                value = json.loads(text) if text.startswith("[") else [v.strip() for v in text.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return [str(v) for v in value]
        if base == "str":
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (ValueError, TypeError, json.JSONDecodeError):
        raise ConfigError(f"{name}: {value!r} is not a valid {base}") from None
    return value


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from nested dicts; unknown keys are errors that name the key; values are
    converted to each field's type (coerce)."""
    if not isinstance(data or {}, dict):
        raise ConfigError(f"config: expected a mapping of sections at the top level, got {type(data).__name__}")
    kwargs: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    for key, value in (data or {}).items():
        if key not in fields:
            raise ConfigError(f"{key}: unknown config key; known: {sorted(fields)}")
        cls = _SECTIONS.get(key)
        if cls is None:
            kwargs[key] = coerce(key, value, str(fields[key].type))
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        for sub in value:
            if sub not in known:
                raise ConfigError(f"{key}.{sub}: unknown config key; known: {sorted(known)}")
        kwargs[key] = cls(**{sub: coerce(f"{key}.{sub}", v, str(known[sub].type)) for sub, v in value.items()})
    return RunConfig(**kwargs)


def read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config is a mapping of sections (input:, search:, ...), got a "
                          f"{type(data).__name__} at the top level")
    return data


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted fields ("search.threshold") in nested config dicts, in place."""
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return data


def load(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    return from_dict(apply_overrides(read_yaml(path), overrides or {}))


def parse_value(text: str) -> Any:
    """A --set value: JSON where it parses (numbers, booleans, lists), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """`--set FIELD=VALUE` items -> {dotted field: value}."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE, e.g. search.threshold=0.9")
        key, value = item.split("=", 1)
        out[key] = parse_value(value)
    return out


def resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """The one rule every front door (CLI, Ray jobs, the Python API) applies, in place: relative
    local paths are taken against `base`; run_dir defaults to base/reports/<input folder name>;
    index_dir to base/indexes/<run name>. URLs (scheme://) are left to the caller."""
    def local(p: str) -> str:
        if p.startswith("file://"):
            p = p[len("file://"):]
        if "://" in p or not p:
            return p
        return str((base / Path(p).expanduser()).resolve())
    inp = data.setdefault("input", {}) or {}
    data["input"] = inp
    if inp.get("path"):
        inp["path"] = local(inp["path"])
    if not data.get("run_dir"):
        data["run_dir"] = str(base / "reports" / (Path(inp.get("path") or "run").name or "run"))
    data["run_dir"] = local(data["run_dir"])
    if not data.get("index_dir"):
        data["index_dir"] = str(base / "indexes" / Path(data["run_dir"]).name)
    data["index_dir"] = local(data["index_dir"])
    for key in ("against",):
        if data.get(key):
            data[key] = local(data[key])
    dec = data.get("decontaminate") or {}
    if dec.get("eval"):
        dec["eval"] = [local(p) for p in ([dec["eval"]] if isinstance(dec["eval"], str) else dec["eval"])]
    return data


def detect_format(data: dict[str, Any], log=None) -> dict[str, Any]:
    """input.format, when not given, from what the input folder holds (sources.detect), said in the
    log; released embeddings default to embed.model precomputed:clip."""
    from ..sources import detect
    inp = data.get("input") or {}
    if not inp.get("format") and inp.get("path") and "://" not in inp["path"]:
        inp["format"] = detect(inp["path"])
        if log:
            log(f"input format: {inp['format']} (detected in {inp['path']}; --input-format to choose)")
    if inp.get("format") == "embeddings" and not (data.get("embed") or {}).get("model"):
        data.setdefault("embed", {})["model"] = "precomputed:clip"
    return data


def build(config: str | Path | None = None, sets: list[str] | None = None, base: str | Path = ".",
          overrides: dict[str, Any] | None = None, prepare=None, log=None) -> RunConfig:
    """A RunConfig from an optional YAML file, --set items and named overrides (in that order of
    precedence, lowest first), paths resolved against `base` (resolve_paths), the input format
    detected when not given (detect_format, said through `log`). `prepare(data)`, when given,
    rewrites the raw dict first (the Ray jobs stage URL paths there)."""
    data = read_yaml(config) if config else {}
    apply_overrides(data, parse_sets(sets))
    apply_overrides(data, overrides or {})
    if prepare is not None:
        prepare(data)
    return from_dict(detect_format(resolve_paths(data, Path(base).resolve()), log))


def diff_fields(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_fields(a, b, name + ".")
        elif a != b:
            out.append(name)
    return out
