"""Configuration models: the architecture of a network and the home folder.

The architecture config is stored in every registry manifest, so that a
version can be rebuilt exactly; one pydantic model per concept, validated
choices with messages that list what is allowed.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

BACKBONES = ("vgg16", "resnet18", "resnet50")


class BackboneConfig(BaseModel):
    """Which CNN produces the local features, where it is cut and what trains."""

    model_config = ConfigDict(extra="forbid")

    name: str = "vgg16"
    # ResNets only: cut after "layer3" (1/16 resolution) or "layer4" (1/32).
    cut: Literal["layer3", "layer4"] = "layer3"
    # Names of the top-level blocks that stay trainable (see Backbone.blocks()).
    # None means the backbone's own default (vgg16: conv5 only, as in the paper).
    trainable: list[str] | None = None

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in BACKBONES:
            raise ValueError(f"unknown backbone {v!r}; choose one of {', '.join(BACKBONES)}")
        return v


class NetVLADConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clusters: int = Field(64, ge=1, le=1024)
    # Sharpness of the soft assignment used to initialise the 1x1 conv from the
    # centroids (NetVLAD paper, Arandjelovic et al. 2016, alpha).
    alpha: float = Field(100.0, gt=0)
    # How NetVLAD and the whitening L2-normalise: None, PyTorch's x / max(|x|, 1e-12);
    # a value e, matconvnet's x / sqrt(|x|^2 + e) (the MATLAB releases, model/matlab.py),
    # which differs for near-empty clusters.
    norm_eps: float | None = Field(None, gt=0)

    @model_serializer(mode="wrap")
    def _omit_unset_norm_eps(self, handler: SerializerFunctionWrapHandler) -> dict:
        """Manifests of networks without it stay as they were (benches compare configs)."""
        data = handler(self)
        if data.get("norm_eps") is None:
            data.pop("norm_eps", None)
        return data


SmallPolicy = Literal["database", "native", "upsample"]
# The largest total stride of any backbone: vgg16 at conv5_3 and the ResNets cut
# at layer3 divide by 16, ResNets cut at layer4 by 32. VGG16's max-pools floor,
# so a side under 16 px leaves it no feature map at all.
MIN_INPUT_SIDE = 32
SMALL_POLICIES: tuple[str, ...] = get_args(SmallPolicy)


class PreprocessConfig(BaseModel):
    """How a decoded image becomes the network's input tensor.

    `max_side` caps the longer side (aspect kept). `small_policy` decides what
    happens to images smaller than that:

    - `database` (the default for new models): the input size follows the
      database, not `max_side`. Database images are fed at their own size
      (capped at `max_side`, never upsampled); the index records the size they
      were described at (`index.meta.description_record`), and queries are
      resized to it, small ones up and large ones down
      (`model.preprocess.query_config`). Why: upsampling a 160x120 database
      4x to 640 px turns compression blocks into "structure" and cost up to 33
      points of recall on a small-image set (issue 12); at 960x540 (Gardens
      Point, 640 px) it gives exactly what `upsample` gave. Where no database
      size is known (an index built before the record, `vpr eval` without
      one), images are prepared as under `upsample`.
    - `native` feeds every image at its own size (capped).
    - `upsample` resizes every image up to `max_side` first. Measured on Gardens
      Point at 640 px (docs/BENCHMARKS.md, "Which policy to serve"): upsample
      wins for day queries, native for night ones.

    Models keep the policy they were registered with (manifests store it), so
    existing models behave as before; a student inherits its teacher's.
    """

    model_config = ConfigDict(extra="forbid")

    mode: Literal["caffe", "imagenet"] = "caffe"
    max_side: int = Field(640, ge=MIN_INPUT_SIDE, le=4096)
    small_policy: SmallPolicy = "database"
    # A shorter side after resizing is padded up to this (mean colour), so that a
    # 1000x60 strip still leaves a feature map. At least the largest stride of any
    # backbone (MIN_INPUT_SIDE), so every backbone keeps one cell at least;
    # manifests written before this field load with the default.
    min_side: int = Field(MIN_INPUT_SIDE, ge=MIN_INPUT_SIDE, le=4096)

    @model_validator(mode="after")
    def _sides(self) -> PreprocessConfig:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side {self.min_side} exceeds max_side {self.max_side}")
        return self


class ModelConfig(BaseModel):
    """The full architecture of one place-recognition network."""

    model_config = ConfigDict(extra="forbid")

    backbone: BackboneConfig = BackboneConfig()
    netvlad: NetVLADConfig = NetVLADConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    # Output dimension of the optional PCA-whitening projection; None = raw NetVLAD.
    pca_dim: int | None = Field(None, ge=1)
