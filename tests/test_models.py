"""The embedder registry: the offline encoder's real weights, open_clip's real loader, preprocessing."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dedup2b.lib import images
from dedup2b.lib.models import Embedder, build_model, parse_spec, preprocess_for


def _photo(name):
    import skimage.data
    return Image.fromarray(getattr(skimage.data, name)())


def test_offline_encoder_loads_imagenet_weights():
    model = build_model("timm:tf_efficientnet_lite0", classifier=True)
    pp = preprocess_for("timm:tf_efficientnet_lite0")
    with torch.inference_mode():
        cat = model(torch.from_numpy(images.to_pixels(_photo("chelsea"), pp))[None]).argmax().item()
        coffee = model(torch.from_numpy(images.to_pixels(_photo("coffee"), pp))[None]).argmax().item()
    assert cat in (281, 282, 285)          # tabby, tiger cat, Egyptian cat
    assert coffee in (967, 968)            # espresso, cup


def test_offline_encoder_separates_copies_from_other_photos():
    e = Embedder("timm:tf_efficientnet_lite0", threads=2)

    def vec(img, q=90):
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=q)
        return e(images.preprocess_bytes(buf.getvalue(), e.preprocess)[None])[0]
    a, a2, b = vec(_photo("astronaut")), vec(_photo("astronaut"), 50), vec(_photo("rocket"))
    assert abs(np.linalg.norm(a) - 1) < 1e-4 and e.dim == 1280
    assert a @ a2 > 0.9 > 0.6 > a @ b


def test_open_clip_random_weights_without_network():
    e = Embedder("open_clip:ViT-S-32", threads=2)
    assert e.preprocess.size == 224 and e.preprocess.mean[0] == pytest.approx(0.4815, abs=1e-3)
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    v = e(x)
    assert v.shape == (2, e.dim) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)


def test_open_clip_hub_tag_offline_fails_with_a_fix():
    with pytest.raises(RuntimeError, match="local weights file"):
        build_model("open_clip:ViT-S-32:laion2b_s34b_b79k")


def test_bad_specs_are_named():
    with pytest.raises(ValueError, match="unknown family"):
        parse_spec("keras:foo")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_model("timm:tf_efficientnet_lite0:/nope.pth")


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "I;16"])
def test_decode_converts_modes_to_rgb(mode):
    img = Image.new("RGB", (40, 30), (10, 200, 30)).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        img = Image.fromarray((np.arange(1200).reshape(30, 40) * 50).astype(np.uint16))
    buf = io.BytesIO()
    img.save(buf, format="TIFF" if mode in ("CMYK", "I;16") else "PNG")
    out = images.decode(buf.getvalue())
    assert out.mode == "RGB" and out.size == (40, 30)


def test_decode_failures_have_reasons():
    with pytest.raises(ValueError, match="0 bytes"):
        images.decode(b"")
    with pytest.raises(Exception):
        images.decode(b"\xff\xd8\xff\xe0 not really a jpeg")


def test_batches_shrink_on_cuda_out_of_memory_and_keep_every_row():
    """A batch the device cannot hold is run in halved slices, for good; no row is lost or reordered."""
    import torch

    class Picky(torch.nn.Module):            # stands in for a GPU that holds 3 images at a time
        def forward(self, x):
            if len(x) > 3:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return x.flatten(1)[:, :4] + 1.0

    e = Embedder.__new__(Embedder)
    e.model, e.device, e.dim, e._pinned, e.max_batch = Picky(), "cpu", 4, None, 0
    x = np.random.default_rng(0).normal(size=(10, 3, 2, 2)).astype(np.float32)
    got = e(x)
    want = x.reshape(10, -1)[:, :4] + 1.0
    np.testing.assert_allclose(got, want / np.linalg.norm(want, axis=1, keepdims=True), rtol=1e-6)
    assert e.max_batch == 2                  # 10 -> 5 -> 2, then kept


def test_decode_errors_read_the_same_on_every_run():
    """An undecodable image's reason holds no object address (reports equal between clean runs)."""
    import numpy as np

    from dedup2b.stages.embed import preprocess_batch
    batch = {"gid": [1, 2], "shard": ["00000", "00000"], "data": [b"not an image", b"\x89PNG broken"],
             "t_read": [0.0, 0.0]}
    pp = preprocess_for("timm:tf_efficientnet_lite0")
    first, second = preprocess_batch(dict(batch), pp)["error"], preprocess_batch(dict(batch), pp)["error"]
    assert list(first) == list(second) and all(e.startswith("decode: ") for e in first)
    assert not any("0x" in e for e in first), first
    assert np.all(preprocess_batch(dict(batch), pp)["pixels"] == 0)


class _TinyDescriptor(torch.nn.Module):
    """A stand-in for a released copy-detection descriptor: conv features, pooled, 64-d."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 64, 7, stride=4)

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1)


def test_sscd_torchscript_descriptor_runs_the_pipeline(tmp_path, demo_corpus):
    """sscd:FILE loads a TorchScript file (exported here with random weights, as a user's download
    would be) and the whole run embeds with it at SSCD's 288 px, its default threshold 0.75."""
    from dedup2b.core.config import default_threshold
    from dedup2b.driver import run_stages
    from dedup2b.core.executor import LocalExecutor
    from conftest import make_config
    torch.manual_seed(0)
    path = tmp_path / "sscd_tiny.torchscript.pt"
    torch.jit.script(_TinyDescriptor().eval()).save(str(path))
    spec = f"sscd:{path}"
    assert parse_spec(spec) == ("sscd", str(path), "")
    assert preprocess_for(spec).size == 288 and default_threshold(spec) == 0.75
    emb = Embedder(spec, device="cpu")
    v = emb(np.random.default_rng(0).integers(0, 255, (3, 288, 288, 3), dtype=np.uint8))
    assert v.shape == (3, 64) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    _, shards = demo_corpus
    cfg = make_config(tmp_path, shards, embed={"model": spec}, verify={"method": "off"},
                      export={"formats": ["keep"]})
    run_stages(cfg, LocalExecutor(), log=lambda *_: None)
    vecs = np.load(next((cfg.run_path / "embed" / "img_emb").glob("*.npy")))
    assert vecs.shape[1] == 64
    summary = json.loads((cfg.run_path / "report" / "summary.json").read_text())
    assert summary["model"] == spec and summary["threshold"] == 0.75
    with pytest.raises(RuntimeError, match="not a TorchScript model"):
        (tmp_path / "bad.pt").write_bytes(b"not a model")
        build_model(f"sscd:{tmp_path / 'bad.pt'}")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_model(f"sscd:{tmp_path / 'missing.pt'}")


def test_dinov2_weights_load_by_name_from_a_local_file(tmp_path):
    """timm's DINOv2 with a local file in Meta's layout (timm's tensor names plus mask_token, the
    order shuffled): every tensor lands by name; the threshold starts at 0.90."""
    import timm
    from dedup2b.core.config import default_threshold
    torch.manual_seed(1)
    ref = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)
    state = dict(reversed(list(ref.state_dict().items())))          # another order than the model's
    state["mask_token"] = torch.zeros(1, ref.embed_dim)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    spec = f"timm:vit_small_patch14_dinov2:{path}"
    model = build_model(spec)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert default_threshold(spec) == 0.90 and preprocess_for(spec).size == 518
    x = torch.randn(1, 3, 518, 518)
    with torch.inference_mode():
        assert torch.allclose(model(x), ref.eval()(x), atol=1e-5)
