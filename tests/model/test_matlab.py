"""MATLAB NetVLAD import: a .mat file written here in the release's layout (the
struct export hloc serves: VGG16 to conv5_3, preL2, vlad_core, intra-norm,
postL2, WPCA, finalL2; full-size VGG16 and K=64 x D=512 VLAD tensors, a smaller
whitening output and small images) is imported, and our network is compared
layer by layer and end to end with a plain numpy implementation of the MATLAB
forward pass (HWIO convolutions on RGB 0..255 minus averageImage, x + C
residuals, d-major flattening before the whitening)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.io import savemat

from vpr.model.matlab import CAFFE_RGB_MEAN, VGG16_TO_CONV5_3, import_netvlad_mat
from vpr.model.preprocess import to_input
from vpr.model.weights import WeightsError

K, D, WHITE = 64, 512, 96
VGG_CHANNELS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
EPS = 1e-12


def _cell(items: list[np.ndarray]) -> np.ndarray:
    cell = np.empty((1, len(items)), dtype=object)
    for i, item in enumerate(items):
        cell[0, i] = item
    return cell


def make_release(seed: int = 0, mean=CAFFE_RGB_MEAN, head: list[str] | None = None) -> tuple[list[dict], np.ndarray]:
    """The release's layer list (dicts savemat writes as structs) and its averageImage."""
    rng = np.random.default_rng(seed)
    layers: list[dict] = []
    cin, convs = 3, iter(VGG_CHANNELS)
    names = iter(f"conv{b}_{i}" for b, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)) for i in range(1, n + 1))
    for i, kind in enumerate(VGG16_TO_CONV5_3):
        if kind == "conv":
            cout = next(convs)
            w = (rng.standard_normal((3, 3, cin, cout)) * np.sqrt(2.0 / (9 * cin))).astype(np.float32)
            b = (rng.standard_normal(cout) * 0.1).astype(np.float32)
            layers.append({"name": next(names), "type": "conv", "weights": _cell([w, b]), "pad": 1.0, "stride": 1.0})
            cin = cout
        elif kind == "relu":
            layers.append({"name": f"relu{i}", "type": "relu", "weights": _cell([]), "leak": 0.0})
        else:
            layers.append(
                {"name": f"pool{i}", "type": "pool", "weights": _cell([]), "method": "max", "pool": [2.0, 2.0],
                 "stride": 2.0, "pad": [0.0, 0.0, 0.0, 0.0]}
            )  # fmt: skip
    centroids = rng.standard_normal((D, K)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=0, keepdims=True)
    assign = (rng.standard_normal((D, K)) * 5).astype(np.float32)
    wpca = (rng.standard_normal((D * K, WHITE)) / np.sqrt(D * K)).astype(np.float32)
    bias = (rng.standard_normal(WHITE) * 0.01).astype(np.float32)
    norm = np.array([1024, 1e-12, 1, 0.5])
    tail = {
        "preL2": {"name": "preL2", "type": "normalize", "weights": _cell([]), "param": norm},
        "vlad": {"name": "vlad_core", "type": "custom", "weights": _cell([assign, -centroids]), "K": float(K)},
        "intra": {"name": "vlad:intranorm", "type": "normalize", "weights": _cell([]), "param": norm},
        "postL2": {"name": "postL2", "type": "custom", "weights": _cell([])},
        "wpca": {"name": "WPCA", "type": "conv", "weights": _cell([wpca.reshape(1, 1, D * K, WHITE), bias]),
                 "pad": 0.0, "stride": 1.0},
        "relu": {"name": "relu5_3", "type": "relu", "weights": _cell([]), "leak": 0.0},
        "finalL2": {"name": "finalL2", "type": "custom", "weights": _cell([])},
    }  # fmt: skip
    for name in head or ["preL2", "vlad", "intra", "postL2", "wpca", "finalL2"]:
        layers.append(tail[name])
    avg = np.broadcast_to(np.asarray(mean, dtype=np.float32), (4, 4, 3)).copy()  # a constant image, as released
    return layers, avg


def write_release(path: Path, layers: list[dict], avg: np.ndarray) -> Path:
    cells = np.empty((1, len(layers)), dtype=object)
    for i, layer in enumerate(layers):
        cells[0, i] = layer
    savemat(str(path), {"net": {"layers": cells, "meta": {"normalization": {"averageImage": avg}}}})
    return path


# ---- the MATLAB forward pass, in numpy (float64) ------------------------------------------------
def matlab_forward(layers: list[dict], avg: np.ndarray, rgb: np.ndarray) -> list[np.ndarray]:
    """Every layer's output (H x W x C maps, then the VLAD matrices and vectors)."""
    x = rgb.astype(np.float64) - avg[0, 0].astype(np.float64)
    outs = []
    for layer in layers:
        t, w = layer["type"], [np.asarray(v, dtype=np.float64) for v in layer["weights"].ravel()]
        if t == "conv" and x.ndim == 3:
            pad = np.pad(x, ((1, 1), (1, 1), (0, 0)))
            win = np.lib.stride_tricks.sliding_window_view(pad, (3, 3), axis=(0, 1))  # H, W, C, 3, 3
            x = np.einsum("hwcij,ijco->hwo", win, w[0], optimize=True) + w[1]
        elif t == "relu":
            x = np.maximum(x, 0)
        elif t == "pool":
            h, wd = x.shape[0] // 2, x.shape[1] // 2
            x = x[: 2 * h, : 2 * wd].reshape(h, 2, wd, 2, -1).max(axis=(1, 3))
        elif t == "normalize" and x.ndim == 3:  # preL2: over channels
            x = x / np.sqrt((x * x).sum(axis=2, keepdims=True) + EPS)
        elif layer["name"] == "vlad_core":
            feats = x.reshape(-1, x.shape[2])  # N x D
            s = feats @ w[0]
            a = np.exp(s - s.max(axis=1, keepdims=True))
            a /= a.sum(axis=1, keepdims=True)
            x = feats.T @ a + w[1] * a.sum(axis=0)[None, :]  # V[d, k] = sum_n a_nk (x_nd + C_dk)
            outs.append(a)
        elif t == "normalize":  # intra-normalisation of each cluster's column
            x = x / np.sqrt((x * x).sum(axis=0, keepdims=True) + EPS)
        elif layer["name"] in ("postL2", "finalL2"):
            x = x.reshape(-1)  # d-major: index d*K + k
            x = x / np.sqrt((x * x).sum() + EPS)
        elif layer["name"] == "WPCA":
            x = x @ w[0].reshape(D * K, -1) + w[1]
        else:
            raise AssertionError(f"no reference for {t}:{layer['name']}")
        outs.append(x)
    return outs


def close(ours: np.ndarray, ref: np.ndarray, what: str, rtol: float = 1e-7) -> None:
    err = np.abs(ours - ref).max()
    scale = np.abs(ref).max()
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs {ref.shape}"
    assert err <= rtol * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    layers, avg = make_release()
    path = write_release(tmp_path_factory.mktemp("mat") / "Pitts30K_struct.mat", layers, avg)
    return path, layers, avg


@pytest.fixture(scope="module")
def imported(release):
    net, details = import_netvlad_mat(release[0])
    return net, details


def test_layer_by_layer_and_end_to_end_against_numpy_matlab(release, imported):
    path, layers, avg = release
    net, details = imported
    rng = np.random.default_rng(5)
    small = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    rgb = np.asarray(Image.fromarray(small).resize((56, 40), Image.Resampling.BILINEAR))  # 40 x 56, textured
    ref = matlab_forward(layers, avg, rgb)
    x = to_input(Image.fromarray(rgb), net.config.preprocess)
    assert tuple(x.shape) == (3, 40, 56)  # native size: no resize, no padding
    x = x.unsqueeze(0).double()
    net = net.double()
    with torch.no_grad():
        feats = x
        for i, module in enumerate(net.backbone.features):  # MATLAB layers 0..28 are torchvision's order
            feats = module(feats)
            close(feats[0].permute(1, 2, 0).numpy(), ref[i], f"layer {i} {layers[i]['type']}:{layers[i]['name']}")
        n = len(VGG16_TO_CONV5_3)
        xn = F.normalize(feats, dim=1)
        close(xn[0].permute(1, 2, 0).numpy(), ref[n], "preL2")
        soft = F.softmax(net.netvlad.conv(xn).flatten(2), dim=1)[0].T  # N x K
        close(soft.numpy(), ref[n + 1], "soft assignment")
        vlad = net.netvlad(feats)[0].reshape(K, D).T.reshape(-1)  # ours k*D + d -> MATLAB's d*K + k
        close(vlad.numpy(), ref[n + 4], "VLAD after intra-normalisation and L2")
        desc = net(x)[0].numpy()
    close(desc, ref[-1], "final descriptor")
    assert desc.shape == (WHITE,) and abs(np.linalg.norm(desc) - 1) < 1e-9
    # the float32 network as registered agrees too
    with torch.no_grad():
        desc32 = net.float()(x.float())[0].numpy()
    close(desc32, ref[-1], "final descriptor (float32)", rtol=1e-3)
    assert details["clusters"] == K and details["whitening"] == WHITE and details["dim"] == D
    assert details["head_layers"][1] == "custom:vlad_core"


def test_details_record_the_source_file_hash(release, imported):
    import hashlib

    _, details = imported
    assert details["source_sha256"] == hashlib.sha256(release[0].read_bytes()).hexdigest()
    assert details["average_rgb"] == pytest.approx(list(CAFFE_RGB_MEAN), abs=1e-3)
    assert imported[0].config.preprocess.mode == "caffe"


@pytest.mark.parametrize(
    ("head", "mean", "message"),
    [
        (["relu", "preL2", "vlad", "intra", "postL2", "wpca", "finalL2"], CAFFE_RGB_MEAN, "after conv5_3 comes relu"),
        (["preL2", "vlad", "postL2", "wpca", "finalL2"], CAFFE_RGB_MEAN, "not intra-normalisation"),
        (["preL2", "vlad"], CAFFE_RGB_MEAN, "incomplete"),
        (None, (122.0, 116.0, 104.0), "not the caffe mean"),
    ],
)
def test_layouts_it_cannot_reproduce_are_refused(tmp_path, head, mean, message):
    layers, avg = make_release(seed=1, mean=mean, head=head)
    path = write_release(tmp_path / "other.mat", layers, avg)
    with pytest.raises(WeightsError, match=message):
        import_netvlad_mat(path)


def test_files_that_are_not_the_release(tmp_path):
    bad = tmp_path / "bad.mat"
    bad.write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(WeightsError, match="not a readable MATLAB"):
        import_netvlad_mat(bad)
    other = tmp_path / "other.mat"
    savemat(str(other), {"weights": np.zeros(3)})
    with pytest.raises(WeightsError, match="no `net` struct"):
        import_netvlad_mat(other)
    with pytest.raises(WeightsError, match="no such file"):
        import_netvlad_mat(tmp_path / "missing.mat")
