"""Import the MATLAB NetVLAD releases (Arandjelovic et al.) as a VPRNet.

The file is the matconvnet network with its custom layers converted to plain
structs (`net_class2struct.m` of uzh-rpg/netvlad_tf_open), as hloc serves
Pitts30K_struct.mat and TokyoTM_struct.mat; scipy reads it without running or
unpickling anything. Its layout, `net.layers` in order:

- 0..28: VGG16 up to conv5_3, the same sequence as torchvision's
  `vgg16().features[:29]` (conv, relu, pool; no ReLU after conv5_3). A conv's
  `weights` are {W (kh, kw, in, out) = HWIO, bias (out,)}, pad 1, stride 1;
  pools are 2x2 max, stride 2, no padding.
- `normalize` (preL2): L2 over channels, x / sqrt(sum x^2 + eps).
- custom `vlad_core`: `weights` = {A (D, K), C (D, K)}: soft-assignment
  a = softmax_k(A^T x) with no bias (vladv1; a third weight would be the bias),
  and C holds MINUS the centroids: V[d, k] = sum_n a_kn (x_nd + C[d, k]).
- `normalize` (intra-normalisation: each cluster's D-vector to unit L2).
- custom `postL2`: the (D, K) matrix flattened d-major (index d*K + k), L2.
- conv `WPCA`: weights {W (1, 1, D*K, out), bias (out,)}: whitening projection.
- custom `finalL2`.
- `meta.normalization.averageImage`: the RGB mean subtracted from 0..255 input
  (as hloc and netvlad_tf_open read it: its [0, 0, :] pixel).

The conversion to this project's VPRNet: conv weights HWIO -> OIHW, with
conv1_1's input channels reversed because the `caffe` preprocessing feeds BGR;
the NetVLAD conv gets A^T and a zero bias, the centroids -C^T; the whitening's
input columns are permuted from MATLAB's d*K + k order to ours (k*D + d).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vpr.model.backbones import VGG16_CONV_INDICES
from vpr.model.config import BackboneConfig, ModelConfig, NetVLADConfig, PreprocessConfig
from vpr.model.fileio import sha256_file
from vpr.model.network import VPRNet, build_model
from vpr.model.weights import WeightsError, check_state_dict

# matconvnet layer types of VGG16 up to conv5_3, in torchvision's `features` order.
VGG16_TO_CONV5_3 = (
    ["conv", "relu", "conv", "relu", "pool"] * 2
    + ["conv", "relu", "conv", "relu", "conv", "relu", "pool"] * 2
    + ["conv", "relu", "conv", "relu", "conv"]
)
# The mean that the `caffe` preprocessing subtracts (model/preprocess.py's CAFFE_BGR_MEAN, as RGB).
CAFFE_RGB_MEAN = (123.68, 116.779, 103.939)
MEAN_TOLERANCE = 0.01  # on the 0..255 scale; float32 storage of the same mean differs by ~1e-5


def read_net(path: Path) -> Any:
    """`net` of a struct-converted matconvnet .mat file (scipy, no code runs)."""
    from scipy.io import loadmat

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        mat = loadmat(str(path), struct_as_record=False, squeeze_me=True)
    except NotImplementedError as e:  # scipy's answer to MATLAB v7.3 (HDF5) files
        raise WeightsError(f"{path}: a MATLAB v7.3 file ({e}); save it with `save(..., '-v7')`") from e
    except Exception as e:  # scipy raises ValueError/TypeError/OSError on files that are not .mat
        raise WeightsError(f"{path}: not a readable MATLAB .mat file ({e})") from e
    net = mat.get("net")
    if net is None or not hasattr(net, "layers"):
        raise WeightsError(f"{path}: no `net` struct with `layers` (the MATLAB NetVLAD release layout)")
    return net


def _layers(net: Any, path: Path) -> list[Any]:
    layers = list(np.atleast_1d(np.asarray(net.layers, dtype=object)))
    for i, layer in enumerate(layers):
        if not (hasattr(layer, "type") and hasattr(layer, "name")):
            raise WeightsError(
                f"{path}: layer {i} is a {type(layer).__name__}, not a struct: the original release stores MATLAB "
                "class objects scipy cannot read; use the struct export (`vpr weights fetch netvlad-pitts30k`) "
                "or convert it with netvlad_tf_open's net_class2struct.m"
            )
    return layers


def _weights(layer: Any) -> list[np.ndarray]:
    w = getattr(layer, "weights", None)
    if w is None:
        return []
    arr = np.asarray(w, dtype=object) if isinstance(w, (list, tuple)) else w
    if isinstance(arr, np.ndarray) and arr.dtype == object:
        return [np.asarray(x, dtype=np.float32) for x in arr.ravel()]
    a = np.asarray(arr, dtype=np.float32)
    return [] if a.size == 0 else [a]


def _ints(value: Any, default: int) -> set[int]:
    """A matconvnet scalar-or-vector field as a set of ints (an empty field: its default)."""
    flat = np.atleast_1d(np.asarray(value, dtype=np.float64)).ravel()
    return {int(v) for v in flat} if flat.size else {default}


def _check_backbone(layers: list[Any], path: Path) -> None:
    types = [str(layer.type) for layer in layers[: len(VGG16_TO_CONV5_3)]]
    if types != VGG16_TO_CONV5_3:
        raise WeightsError(
            f"{path}: the first layers are {types}, not VGG16 up to conv5_3 ({VGG16_TO_CONV5_3}); "
            "only the VGG16 NetVLAD releases are supported"
        )
    for i, layer in enumerate(layers[: len(VGG16_TO_CONV5_3)]):
        pad, stride = _ints(getattr(layer, "pad", 1), 1), _ints(getattr(layer, "stride", 1), 1)
        if layer.type == "conv" and (pad != {1} or stride != {1}):
            raise WeightsError(f"{path}: conv layer {i} ({layer.name}) has pad/stride other than 1")
        if layer.type == "relu" and np.any(np.asarray(getattr(layer, "leak", 0), dtype=np.float64) != 0):
            raise WeightsError(f"{path}: relu layer {i} ({layer.name}) is leaky")
        if layer.type == "pool":
            ok = (
                str(getattr(layer, "method", "max")) == "max"
                and _ints(getattr(layer, "pool", 2), 2) == {2}
                and stride == {2}
                and _ints(getattr(layer, "pad", 0), 0) == {0}
            )
            if not ok:
                raise WeightsError(f"{path}: pool layer {i} ({layer.name}) is not a 2x2 max pool, stride 2, no padding")


def _head(layers: list[Any], path: Path) -> dict[str, Any]:
    """Find preL2, vlad_core, intra-normalisation, postL2, WPCA and finalL2 after conv5_3."""
    rest = layers[len(VGG16_TO_CONV5_3) :]
    kinds = [f"{layer.type}:{layer.name}" for layer in rest]
    found: dict[str, Any] = {}
    stage = "preL2"
    for layer in rest:
        t, name = str(layer.type), str(layer.name)
        if stage == "preL2":
            if t != "normalize":
                raise WeightsError(
                    f"{path}: after conv5_3 comes {t}:{name}, expected the L2 normalisation of the NetVLAD "
                    f"release (layers after conv5_3: {kinds})"
                )
            found["eps"] = _l2_eps(layer, path)
            stage = "vlad"
        elif stage == "vlad":
            if not (t == "custom" and len(_weights(layer)) in (2, 3)):
                raise WeightsError(f"{path}: expected the NetVLAD layer after the L2 normalisation, got {t}:{name}")
            found["vlad"] = layer
            stage = "intra"
        elif stage == "intra":
            if t != "normalize":
                raise WeightsError(
                    f"{path}: the NetVLAD layer is followed by {t}:{name}, not intra-normalisation; only the "
                    "`vlad_preL2_intra` releases are supported"
                )
            if _l2_eps(layer, path) != found["eps"]:
                raise WeightsError(f"{path}: the two L2 normalisations ({kinds}) use different epsilons")
            stage = "postL2"
        elif stage == "postL2":
            if t != "custom":
                raise WeightsError(f"{path}: expected the post-VLAD L2 layer, got {t}:{name}")
            stage = "wpca"
        elif stage == "wpca":
            if t != "conv":
                raise WeightsError(f"{path}: expected the WPCA conv after the VLAD L2, got {t}:{name}")
            found["wpca"] = layer
            stage = "finalL2"
        elif stage == "finalL2":
            if t != "custom":
                raise WeightsError(f"{path}: expected the final L2 layer after WPCA, got {t}:{name}")
            stage = "done"
        else:
            raise WeightsError(f"{path}: unexpected layer {t}:{name} after the final L2 normalisation")
    if stage not in ("wpca", "done"):
        raise WeightsError(f"{path}: the NetVLAD head is incomplete (layers after conv5_3: {kinds})")
    found["layers"] = kinds
    return found


def _l2_eps(layer: Any, path: Path) -> float:
    """matconvnet's `normalize` layer computes x / (kappa + alpha * sum_N x^2)^beta over N
    channels; param = [N, kappa, alpha, beta]. The release's is an L2 norm: N covers every
    channel, alpha 1, beta 0.5. Returns kappa (the epsilon under the square root)."""
    param = np.asarray(getattr(layer, "param", [1024, 1e-12, 1, 0.5]), dtype=np.float64).ravel()
    if param.shape != (4,) or param[0] < 2 * 512 or param[2] != 1 or param[3] != 0.5 or param[1] <= 0:
        raise WeightsError(f"{path}: normalize layer {layer.name} has param {param.tolist()}, not an L2 norm")
    return float(param[1])


def _average_rgb(net: Any, path: Path) -> np.ndarray:
    try:
        avg = np.asarray(net.meta.normalization.averageImage, dtype=np.float64)
    except AttributeError:
        raise WeightsError(f"{path}: no net.meta.normalization.averageImage") from None
    if avg.shape == (3,):
        return avg
    if avg.ndim == 3 and avg.shape[2] == 3:
        return avg[0, 0, :]
    raise WeightsError(f"{path}: averageImage has shape {avg.shape}, expected (3,) or (H, W, 3)")


def import_netvlad_mat(path: Path) -> tuple[VPRNet, dict]:
    """A VPRNet whose descriptors are the MATLAB model's (see the module docstring), and
    the details the registry records (source file, its sha256, the layout found)."""
    path = Path(path)
    net_mat = read_net(path)
    layers = _layers(net_mat, path)
    _check_backbone(layers, path)
    head = _head(layers, path)

    mean = _average_rgb(net_mat, path)
    if np.abs(mean - np.asarray(CAFFE_RGB_MEAN)).max() > MEAN_TOLERANCE:
        raise WeightsError(
            f"{path}: averageImage RGB {mean.round(3).tolist()} is not the caffe mean {list(CAFFE_RGB_MEAN)} that "
            "this project's `caffe` preprocessing subtracts; this file cannot be reproduced exactly"
        )

    vlad = _weights(head["vlad"])
    assign, neg_centroids = (np.asarray(w, dtype=np.float32).squeeze() for w in vlad[:2])
    if assign.ndim != 2 or assign.shape != neg_centroids.shape:
        raise WeightsError(
            f"{path}: NetVLAD weights of shapes {assign.shape} and {neg_centroids.shape}, expected (D, K)"
        )
    dim, clusters = assign.shape
    if dim != 512:
        raise WeightsError(f"{path}: NetVLAD input dimension {dim}, expected 512 (VGG16 conv5_3)")

    pca_dim = None
    wpca_w = wpca_b = None
    if "wpca" in head:
        ww = _weights(head["wpca"])
        if len(ww) != 2:
            raise WeightsError(f"{path}: the WPCA layer has {len(ww)} weights, expected weights and bias")
        wpca_w = ww[0].reshape(-1, ww[0].shape[-1]) if ww[0].ndim > 1 else ww[0].reshape(-1, 1)
        wpca_b = ww[1].reshape(-1)
        if wpca_w.shape[0] != dim * clusters or wpca_w.shape[1] != wpca_b.shape[0]:
            raise WeightsError(
                f"{path}: WPCA weights {ww[0].shape} / bias {ww[1].shape} do not fit a {dim * clusters}-d VLAD"
            )
        pca_dim = int(wpca_w.shape[1])

    config = ModelConfig(
        backbone=BackboneConfig(name="vgg16"),
        netvlad=NetVLADConfig(clusters=clusters, norm_eps=head["eps"]),
        # The release ran images at their own size (Pittsburgh and Tokyo are 640x480): never
        # upsampled; larger ones are capped at 640 px as in the NetVLAD evaluation of Tokyo 24/7.
        preprocess=PreprocessConfig(mode="caffe", max_side=640, small_policy="native"),
        pca_dim=pca_dim,
    )
    net = build_model(config)
    state: dict[str, torch.Tensor] = {}
    convs = [layer for layer in layers[: len(VGG16_TO_CONV5_3)] if layer.type == "conv"]
    for n, (index, layer) in enumerate(zip(VGG16_CONV_INDICES, convs, strict=True)):
        ws = _weights(layer)
        if len(ws) != 2 or ws[0].ndim != 4:
            raise WeightsError(f"{path}: conv layer {layer.name} needs weights (kh, kw, in, out) and a bias")
        w = ws[0].transpose(3, 2, 0, 1)  # HWIO -> OIHW
        if n == 0:
            w = w[:, ::-1]  # RGB -> BGR: the caffe preprocessing feeds BGR
        state[f"backbone.features.{index}.weight"] = torch.from_numpy(np.ascontiguousarray(w))
        state[f"backbone.features.{index}.bias"] = torch.from_numpy(ws[1].reshape(-1).copy())
    state["netvlad.conv.weight"] = torch.from_numpy(np.ascontiguousarray(assign.T)).reshape(clusters, dim, 1, 1)
    bias = vlad[2].reshape(-1) if len(vlad) == 3 else np.zeros(clusters, dtype=np.float32)
    state["netvlad.conv.bias"] = torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32))
    state["netvlad.centroids"] = torch.from_numpy(np.ascontiguousarray(-neg_centroids.T))
    if wpca_w is not None and wpca_b is not None:
        # MATLAB's input index d*K + k -> ours k*D + d.
        ours = wpca_w.reshape(dim, clusters, -1).transpose(1, 0, 2).reshape(dim * clusters, -1)
        state["pca.proj.weight"] = torch.from_numpy(np.ascontiguousarray(ours.T))
        state["pca.proj.bias"] = torch.from_numpy(wpca_b.copy())
    check_state_dict(net.state_dict(), state, str(path))
    net.load_state_dict(state, strict=True)
    net.eval()
    details = {
        "source": "matlab-netvlad",
        "file": str(path.resolve()),
        "source_sha256": sha256_file(path),
        "clusters": clusters,
        "dim": dim,
        "whitening": pca_dim,
        "average_rgb": [round(float(v), 4) for v in mean],
        "head_layers": head["layers"],
    }
    return net, details
