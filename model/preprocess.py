"""The one path from bytes or files to the network's input tensor.

The server, the index builder, evaluation and training all call
`decode_image` / `load_image` and then `to_input`, so a query is prepared
exactly like the database images it is compared with.
"""

from __future__ import annotations

import io
import logging
import re
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


# Transparent pixels are composited on white, as image viewers and browsers
# show them; the same for database images and queries.
TRANSPARENCY_BACKGROUND = (255, 255, 255)
# EXIF orientation (tag 0x0112) -> the transpose that shows the photo upright.
EXIF_ORIENTATION_TAG = 0x0112
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
PNG_EXIF_TEXT = b"Raw profile type exif"  # EXIF as ImageMagick writes it into PNG text: kept
_PILLOW_BOMB = re.compile(r"\((\d+) pixels\)")
log = logging.getLogger(__name__)


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image (corrupt, truncated, unknown format)."""


class ImageTooLarge(ValueError):
    """The image declares more pixels than allowed (decompression-bomb guard)."""


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, source: str = "image", formats: tuple[str, ...] | None = None
) -> Image.Image:
    """Decode compressed bytes to an upright 8-bit RGB image, refusing bombs
    before allocating pixels.

    Every mode a camera, phone or editor writes ends up RGB the same way:
    the first frame of animations; the EXIF orientation applied (an invalid
    tag is ignored); transparency composited on `TRANSPARENCY_BACKGROUND`;
    16-bit grey scaled (65535 -> 255), not clipped; CMYK, YCbCr, LAB converted
    by Pillow (embedded ICC profiles are not applied, for database and
    queries alike). PNG text chunks (XMP, comments; EXIF kept) are skipped:
    pixels never depend on them, and Pillow refuses large compressed ones. `formats`
    (Pillow names) restricts the decoders tried: bytes from outside that fail
    as a JPEG must not be retried as, say, a signature-less TGA.
    """
    try:
        with warnings.catch_warnings():
            # Pillow warns on huge declared sizes (our own limit decides) and on
            # corrupt metadata (ignored, see `upright`): nothing for the logs.
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(_without_png_text(data)), formats=formats)
            w, h = img.size
            if w * h > max_pixels:
                raise ImageTooLarge(f"{source}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
            img.load()  # the first frame of an animation
            shown = upright(img)
        return to_rgb(shown)
    except ImageTooLarge:
        raise
    except Image.DecompressionBombError as e:
        # Raised by Image.open above Pillow's own hard limit; quote ours.
        found = _PILLOW_BOMB.search(str(e))
        declared = int(found.group(1)) if found else None
        what = f"{declared} pixels" if declared else "the declared size"
        limit = max_pixels if declared is None or declared > max_pixels else 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise ImageTooLarge(f"{source}: {what} exceeds the limit of {limit}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(f"{source}: not a decodable image ({e})") from e
    except Exception as e:  # Pillow's decoders raise many other types on malformed files
        raise ImageDecodeError(f"{source}: not a decodable image ({type(e).__name__}: {e})") from e


def upright(img: Image.Image) -> Image.Image:
    """The image as its EXIF orientation says it is seen; unchanged when the
    tag is absent, 1, or unreadable (phones and editors write broken ones)."""
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception as e:  # any malformed EXIF block: the pixels are still good
        log.debug("unreadable EXIF ignored: %s", e)
        return img
    method = ORIENTATION_TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    return img if method is None else img.transpose(method)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded Pillow image -> 8-bit RGB (see `decode_image` for the rules)."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit grey (PNG, PPM): scale to 8 bits; Pillow's convert would clip at 255.
        grey = np.asarray(img, dtype=np.float64).clip(0, 65535) / 257.0
        return Image.fromarray(np.rint(grey).astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*TRANSPARENCY_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _without_png_text(data: bytes) -> bytes:
    """A PNG without its text chunks but EXIF (anything else is returned
    unchanged). Malformed chunk structure is left for Pillow to report."""
    if not data.startswith(PNG_SIGNATURE):
        return data
    kept, pos, dropped = [PNG_SIGNATURE], len(PNG_SIGNATURE), False
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        end = pos + 12 + length
        if end > len(data):
            return data
        if data[pos + 4 : pos + 8] in PNG_TEXT_CHUNKS and not data[pos + 8 :].startswith(PNG_EXIF_TEXT):
            dropped = True
        else:
            kept.append(data[pos:end])
        pos = end
    if not dropped:
        return data
    kept.append(data[pos:])
    return b"".join(kept)


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
    """Size the image is resized to: longer side capped at max_side; smaller
    images are upsampled to max_side under the `upsample` policy (and under an
    unresolved `database` policy, see `PreprocessConfig`), kept under `native`.
    `to_input` then pads a short side below `min_side`."""
    longer = max(width, height)
    upsample = cfg.small_policy in ("upsample", "database")
    if longer > cfg.max_side or (longer < cfg.max_side and upsample):
        scale = cfg.max_side / longer
        return max(1, round(width * scale)), max(1, round(height * scale))
    return width, height


# ---- the database-relative size rule (small_policy "database") -------------------------------
def database_config(cfg: PreprocessConfig) -> PreprocessConfig:
    """How database images are prepared: under `database`, at their own size
    (capped at max_side, never upsampled); other policies unchanged."""
    if cfg.small_policy != "database":
        return cfg
    return cfg.model_copy(update={"small_policy": "native"})


def query_config(cfg: PreprocessConfig, side: int | None) -> PreprocessConfig:
    """How queries against a database described at longer side `side` are
    prepared: under `database`, resized (up or down) so that their longer side
    is `side` (kept within [min_side, max_side]); without a known side, as
    under `upsample` (today's default before the rule). Other policies unchanged."""
    if cfg.small_policy != "database":
        return cfg
    if side is None:
        return cfg.model_copy(update={"small_policy": "upsample"})
    side = min(max(int(side), cfg.min_side), cfg.max_side)
    return cfg.model_copy(update={"small_policy": "upsample", "max_side": side})


def image_side(path: Path) -> int | None:
    """Longer side of an image file from its header (no pixel decoding); None
    when unreadable (the describe step reports or skips those)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(Path(path)) as img:
                return int(max(img.size))
    except Exception:  # any unreadable file: not ours to report here
        return None


def input_side(side: int, cfg: PreprocessConfig) -> int:
    """Longer side of the network input of an image whose longer side is `side`."""
    return max(target_size(side, side, cfg))


def input_size(width: int, height: int, cfg: PreprocessConfig) -> tuple[int, int]:
    """Size of the network's input: `target_size`, each side at least `min_side`."""
    w, h = target_size(width, height, cfg)
    return max(w, cfg.min_side), max(h, cfg.min_side)


def to_input(img: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    """RGB PIL image -> normalised float tensor (3, H, W) for the network.

    A side shorter than `cfg.min_side` after resizing (a 1000x60 strip, a
    one-pixel image) is padded with zeros, the mean colour after
    normalisation, centred, so that every backbone still has a feature map;
    images whose sides reach `min_side` are not touched."""
    size = target_size(*img.size, cfg)
    if size != img.size:
        img = img.resize(size, Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
    if cfg.mode == "caffe":
        x = x[[2, 1, 0]] - torch.tensor(CAFFE_BGR_MEAN).view(3, 1, 1)
    else:
        x = (x / 255.0 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return _pad_to(x.contiguous(), cfg.min_side)


def _pad_to(x: torch.Tensor, min_side: int) -> torch.Tensor:
    pad_w, pad_h = max(0, min_side - x.shape[2]), max(0, min_side - x.shape[1])
    if not pad_w and not pad_h:
        return x
    left, top = pad_w // 2, pad_h // 2
    return torch.nn.functional.pad(x, (left, pad_w - left, top, pad_h - top)).contiguous()
