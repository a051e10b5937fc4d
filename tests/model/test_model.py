"""Model family: NetVLAD, backbones, preprocessing, PCA, weight sources."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from vpr.model.backbones import VGG16Backbone, build_backbone
from vpr.model.config import BackboneConfig, PreprocessConfig
from vpr.model.extract import embed_inputs
from vpr.model.netvlad import NetVLAD, kmeans_centroids
from vpr.model.network import PCAWhitening, build_model
from vpr.model.preprocess import ImageDecodeError, ImageTooLarge, decode_image, target_size, to_input
from vpr.model.weights import WeightsError, import_pytorch_netvlad, load_vgg16_features

SHARED_VGG_SHA256 = "e8d2dac8abab6144deb6c627fcf0e5712de9d9df17260ef61a6df167511e03c3"


def reference_vlad(
    x: torch.Tensor, conv_w: torch.Tensor, conv_b: torch.Tensor | None, centroids: torch.Tensor
) -> torch.Tensor:
    """Loop-based NetVLAD written from the paper's definition, for comparison."""
    b, d, h, w = x.shape
    k = centroids.shape[0]
    out = []
    for i in range(b):
        xi = x[i].reshape(d, -1).T  # (N, D)
        xi = xi / xi.norm(dim=1, keepdim=True).clamp_min(1e-12)
        logits = xi @ conv_w.reshape(k, d).T + (conv_b if conv_b is not None else 0)
        a = torch.softmax(logits, dim=1)  # (N, K)
        v = torch.stack([(a[:, c : c + 1] * (xi - centroids[c])).sum(0) for c in range(k)])
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        v = v.flatten()
        out.append(v / v.norm())
    return torch.stack(out)


def test_netvlad_shape_norms_and_reference():
    torch.manual_seed(0)
    layer = NetVLAD(clusters=64, dim=512)
    layer.init_from_centroids(F.normalize(torch.randn(64, 512), dim=1).numpy(), alpha=10.0)
    x = torch.randn(2, 512, 5, 7)
    y = layer(x)
    assert y.shape == (2, 32768)
    assert torch.allclose(y.norm(dim=1), torch.ones(2), atol=1e-5)
    blocks = y.view(2, 64, 512).norm(dim=2)  # intra-normalised, then global L2: each block 1/sqrt(K)
    assert torch.allclose(blocks, torch.full_like(blocks, 1 / 8), atol=1e-4)
    ref = reference_vlad(x, layer.conv.weight.data, layer.conv.bias.data, layer.centroids.data)
    assert torch.allclose(y, ref, atol=1e-5)


def test_vgg16_descriptor_is_32768_d():
    net = build_model({"preprocess": {"max_side": 64}})
    d, _ = embed_inputs(net, [to_input(Image.new("RGB", (64, 48), (120, 30, 200)), net.config.preprocess)])
    assert d.shape == (1, 32768) and d.dtype == np.float32
    assert abs(float(np.linalg.norm(d)) - 1.0) < 1e-4


def test_kmeans_recovers_clusters_and_init_assigns_nearest():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    pts = np.concatenate([c + 0.02 * rng.normal(size=(200, 16)) for c in centres]).astype(np.float32)
    found = kmeans_centroids(pts, 4, seed=1)
    nearest = np.abs(found @ centres.T).max(axis=1)  # every found centre matches a true one
    assert (nearest > 0.99).all()
    layer = NetVLAD(clusters=4, dim=16)
    layer.init_from_centroids(found)
    x = torch.from_numpy(pts).T.reshape(1, 16, -1, 1)
    assign = layer.conv(F.normalize(x, dim=1)).argmax(dim=1).flatten()
    expected = np.argmax(F.normalize(torch.from_numpy(pts), dim=1).numpy() @ found.T, axis=1)
    assert (assign.numpy() == expected).mean() > 0.99
    with pytest.raises(ValueError, match="at least 4"):
        kmeans_centroids(pts[:3], 4)


def test_backbones_and_trainable_blocks():
    vgg = build_backbone(BackboneConfig(name="vgg16"))
    trainable = {n for n, p in vgg.named_parameters() if p.requires_grad}
    assert trainable == {
        "features.24.weight",
        "features.24.bias",
        "features.26.weight",
        "features.26.bias",
        "features.28.weight",
        "features.28.bias",
    }
    out = vgg(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 512, 4, 4)
    assert (out < 0).any(), "conv5_3 is taken before its ReLU"
    r18 = build_backbone(BackboneConfig(name="resnet18", cut="layer3"))
    assert r18.out_channels == 256 and r18(torch.zeros(1, 3, 64, 64)).shape == (1, 256, 4, 4)
    r50 = build_backbone(BackboneConfig(name="resnet50", cut="layer4", trainable=["layer3", "layer4"]))
    assert r50.out_channels == 2048
    assert not r50.body.layer2[0].conv1.weight.requires_grad and r50.body.layer3[0].conv1.weight.requires_grad
    with pytest.raises(ValueError, match="unknown blocks"):
        build_backbone(BackboneConfig(name="vgg16", trainable=["conv9"]))
    with pytest.raises(ValueError, match="choose one of"):
        BackboneConfig(name="alexnet")


def test_preprocess_caffe_and_imagenet_and_policy():
    img = Image.new("RGB", (64, 32), (10, 20, 30))
    x = to_input(img, PreprocessConfig(mode="caffe", max_side=64))
    assert x.shape == (3, 32, 64)
    assert torch.allclose(x[:, 0, 0], torch.tensor([30 - 103.939, 20 - 116.779, 10 - 123.68]))
    y = to_input(img, PreprocessConfig(mode="imagenet", max_side=64))
    assert torch.allclose(
        y[:, 0, 0],
        torch.tensor([(10 / 255 - 0.485) / 0.229, (20 / 255 - 0.456) / 0.224, (30 / 255 - 0.406) / 0.225]),
        atol=1e-5,
    )
    assert target_size(960, 540, PreprocessConfig(max_side=640)) == (640, 360)
    assert target_size(320, 180, PreprocessConfig(max_side=640, small_policy="upsample")) == (640, 360)
    assert target_size(320, 180, PreprocessConfig(max_side=640, small_policy="native")) == (320, 180)


def test_decode_errors():
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "JPEG")
    data = buf.getvalue()
    assert decode_image(data).size == (64, 64)
    with pytest.raises(ImageDecodeError, match="query.jpg"):
        decode_image(data[: len(data) // 2], source="query.jpg")
    with pytest.raises(ImageDecodeError):
        decode_image(b"not an image at all")
    with pytest.raises(ImageTooLarge, match="exceeds"):
        decode_image(data, max_pixels=64 * 63)


def test_pca_whitening_reduces_and_whitens():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 50)) * np.linspace(5, 0.1, 50)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    pca = PCAWhitening(50, 8)
    pca.fit(x.astype(np.float32))
    with torch.no_grad():
        z = pca.proj(torch.from_numpy(x).float()).numpy()
    cov = np.cov(z.T, bias=True)
    assert np.allclose(cov, np.eye(8), atol=1e-3)
    out = pca(torch.from_numpy(x).float())
    assert out.shape == (200, 8) and torch.allclose(out.norm(dim=1), torch.ones(200), atol=1e-5)
    with pytest.raises(ValueError, match="more than 8"):
        PCAWhitening(50, 8).fit(x[:5])


def test_shared_vgg16_weights_load_strict(shared_dir):
    path = shared_dir / "weights" / "vgg16_imagenet_caffe_features.safetensors"
    from vpr.model.fileio import sha256_file

    assert sha256_file(path) == SHARED_VGG_SHA256
    net = build_model({"preprocess": {"mode": "caffe", "max_side": 64}})
    load_vgg16_features(net, path)
    from safetensors.torch import load_file

    ref = load_file(str(path))
    assert torch.equal(net.backbone.features[28].weight, ref["28.weight"])


def test_wrong_weights_file_is_refused(tmp_path):
    net = build_model({"preprocess": {"max_side": 64}})
    sd = {k: v.clone() for k, v in net.backbone.features.state_dict().items()}
    sd["26.weight"] = torch.zeros(512, 256, 3, 3)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    with pytest.raises(WeightsError, match=r"bad\.safetensors.*26\.weight"):
        load_vgg16_features(net, bad)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 40)
    with pytest.raises(WeightsError, match="junk.safetensors"):
        load_vgg16_features(net, junk)


@pytest.mark.slow
def test_import_pytorch_netvlad_checkpoint(tmp_path):
    """A checkpoint in pytorch-NetVLAD's layout (vladv2=False: no conv bias)
    converts to a model whose descriptor equals the original layer's."""
    torch.manual_seed(0)
    enc = VGG16Backbone().features
    k = 16
    centroids = torch.rand(k, 512)
    conv_w = torch.randn(k, 512, 1, 1) * 3
    sd = {f"encoder.{key}": v for key, v in enc.state_dict().items()}
    sd["pool.conv.weight"] = conv_w
    sd["pool.centroids"] = centroids
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 3, "best_score": 0.5, "state_dict": sd}, path)

    net, details = import_pytorch_netvlad(path)
    assert details["clusters"] == k and net.config.preprocess.mode == "imagenet"
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        expected = reference_vlad(enc(x), conv_w, None, centroids)
        got = net.eval()(x)
    assert torch.allclose(got, expected, atol=1e-5)

    with pytest.raises(WeightsError, match="pool.centroids"):
        torch.save({"state_dict": {"foo": torch.zeros(1)}}, tmp_path / "other.pth.tar")
        import_pytorch_netvlad(tmp_path / "other.pth.tar")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["vgg16", "resnet18"])
def test_torchvision_imagenet_weights_from_the_local_cache(tmp_path, monkeypatch, arch):
    """`--weights imagenet` takes torchvision's cache file once its sha256 is the
    catalogue's (offline: never downloads): a checkpoint with torchvision's full key
    set loads into the cut backbone."""
    import hashlib
    from dataclasses import replace

    import torchvision

    from vpr.model import catalogue
    from vpr.model.weights import load_torchvision_imagenet, torchvision_cache_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    config = {"backbone": {"name": arch}, "netvlad": {"clusters": 4}, "preprocess": {"max_side": 64}}
    net = build_model(config)
    with pytest.raises(ValueError, match="downloads are off"):
        load_torchvision_imagenet(net, tmp_path / "w", offline=True)
    torch.manual_seed(1)
    full = getattr(torchvision.models, arch)(weights=None)
    path = torchvision_cache_file(arch)
    path.parent.mkdir(parents=True)
    state = full.state_dict()
    if arch == "vgg16":  # its 400 MB of fully connected layers only get dropped: keep the last one to drop
        state = {k: v for k, v in state.items() if not k.startswith(("classifier.0", "classifier.3"))}
    torch.save(state, path)
    name = catalogue.IMAGENET_ENTRY[arch]
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setitem(catalogue.CATALOGUE, name, replace(catalogue.CATALOGUE[name], sha256=sha))
    load_torchvision_imagenet(net, tmp_path / "w", offline=True)
    if arch == "vgg16":
        assert torch.equal(net.backbone.features[28].weight, full.features[28].weight)
    else:
        assert torch.equal(net.backbone.body.layer3[0].conv1.weight, full.layer3[0].conv1.weight)
