"""The one path from bytes or files to the network's input tensor.

The server, the index builder, evaluation and training all call
`decode_image` / `load_image` and then `to_input`, so a query is prepared
exactly like the database images it is compared with.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vpr.model.config import PreprocessConfig

CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MAX_PIXELS = 40_000_000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm")


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image (corrupt, truncated, unknown format)."""


class ImageTooLarge(ValueError):
    """The image declares more pixels than allowed (decompression-bomb guard)."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, source: str = "image") -> Image.Image:
    """Decode compressed bytes to RGB, refusing bombs before allocating pixels."""
    try:
        with warnings.catch_warnings():
            # Pillow warns (or raises) on huge declared sizes; our own limit decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:
            raise ImageTooLarge(f"{source}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
        return img.convert("RGB")
    except ImageTooLarge:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLarge(f"{source}: too many pixels ({e})") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(f"{source}: not a decodable image ({e})") from e


def load_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageDecodeError(f"{path}: cannot read ({e.strerror or e})") from e
    return decode_image(data, max_pixels, source=str(path))


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name; a clear error if none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def target_size(width: int, height: int, cfg: PreprocessConfig) -> tuple[int, int]:
    """Size the network sees: longer side capped at max_side; smaller images
    are upsampled to max_side under the `upsample` policy, kept under `native`."""
    longer = max(width, height)
    if longer > cfg.max_side or (longer < cfg.max_side and cfg.small_policy == "upsample"):
        scale = cfg.max_side / longer
        return max(1, round(width * scale)), max(1, round(height * scale))
    return width, height


def to_input(img: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    """RGB PIL image -> normalised float tensor (3, H, W) for the network."""
    size = target_size(*img.size, cfg)
    if size != img.size:
        img = img.resize(size, Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
    if cfg.mode == "caffe":
        x = x[[2, 1, 0]] - torch.tensor(CAFFE_BGR_MEAN).view(3, 1, 1)
    else:
        x = (x / 255.0 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return x.contiguous()
