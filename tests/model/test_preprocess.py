"""THE decoding path (`decode_image`, `to_input`): every decodable image, of any
size, mode or container, becomes a valid network input the same way for
database images and queries."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from vpr.model.config import MIN_INPUT_SIDE, ModelConfig, PreprocessConfig
from vpr.model.network import build_model
from vpr.model.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDecodeError,
    ImageTooLarge,
    decode_image,
    input_size,
    load_image,
    target_size,
    to_input,
)

WHITE, RED, BLUE = (255, 255, 255), (255, 0, 0), (0, 0, 255)


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def asymmetric(w: int = 12, h: int = 8) -> Image.Image:
    """Distinct pixels everywhere, so any rotation or flip shows."""
    return Image.fromarray(np.arange(w * h * 3, dtype=np.uint8).reshape(h, w, 3) * 2)


def with_orientation(orientation: object) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


# ---- the minimum input side ----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "backbone",
    [{"name": "vgg16"}, {"name": "resnet18", "cut": "layer3"}, {"name": "resnet18", "cut": "layer4"}],
    ids=["vgg16", "resnet18-layer3", "resnet18-layer4"],
)
@pytest.mark.parametrize("policy", ["native", "upsample"])
def test_every_backbone_describes_any_size_of_at_least_one_pixel(backbone, policy, one_torch_thread):
    torch.manual_seed(0)
    net = build_model({"backbone": backbone, "netvlad": {"clusters": 4}, "preprocess": {"max_side": 96}}).eval()
    cfg = net.config.preprocess.model_copy(update={"small_policy": policy})
    sizes = [(1, 1), (1000, 60), (60, 1000), (1, 1000), (2000, 2), (15, 15), (31, 33)]
    with torch.no_grad():
        for w, h in sizes:
            x = to_input(Image.new("RGB", (w, h), (90, 140, 200)), cfg)
            assert min(x.shape[1:]) >= MIN_INPUT_SIDE and max(x.shape[1:]) <= cfg.max_side, (w, h)
            assert tuple(x.shape[1:]) == input_size(w, h, cfg)[::-1]
            d = net(x[None])
            assert d.shape == (1, net.descriptor_dim) and torch.isfinite(d).all(), (backbone, w, h)


def test_images_at_or_over_the_minimum_are_not_padded():
    """Ordinary images keep exactly the input they had before `min_side` existed."""
    cfg = PreprocessConfig(mode="imagenet", max_side=96)
    img = asymmetric(120, 40)  # -> 96x32: the short side is exactly the minimum
    x = to_input(img, cfg)
    resized = img.resize(target_size(120, 40, cfg), Image.Resampling.BICUBIC)
    want = torch.from_numpy(np.asarray(resized, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    want = (want - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert x.shape == (3, 32, 96) and torch.equal(x, want)


def test_short_sides_are_padded_with_the_mean_colour_centred():
    cfg = PreprocessConfig(mode="caffe", max_side=96, small_policy="native")
    img = Image.new("RGB", (90, 10), (200, 10, 50))
    x = to_input(img, cfg)
    assert x.shape == (3, MIN_INPUT_SIDE, 90)
    top = (MIN_INPUT_SIDE - 10) // 2
    assert torch.equal(x[:, :top], torch.zeros(3, top, 90)) and torch.equal(
        x[:, top + 10 :], torch.zeros_like(x[:, top + 10 :])
    )
    unpadded = x[:, top : top + 10]
    assert torch.allclose(unpadded[:, 0, 0], torch.tensor([50 - 103.939, 10 - 116.779, 200 - 123.68]))


def test_min_side_in_the_config():
    """Manifests written before `min_side` existed load with the default."""
    old = ModelConfig.model_validate({"preprocess": {"mode": "caffe", "max_side": 320}})
    assert old.preprocess.min_side == MIN_INPUT_SIDE
    with pytest.raises(ValueError, match="min_side"):
        PreprocessConfig(max_side=64, min_side=128)
    with pytest.raises(ValueError, match="min_side"):
        PreprocessConfig(min_side=8)  # below the largest backbone stride


# ---- orientation -----------------------------------------------------------------------------
# What a camera stores for an upright scene U under each orientation tag.
STORED = {
    1: lambda u: u,
    2: lambda u: u.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    3: lambda u: u.transpose(Image.Transpose.ROTATE_180),
    4: lambda u: u.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
    5: lambda u: u.transpose(Image.Transpose.TRANSPOSE),
    6: lambda u: u.transpose(Image.Transpose.ROTATE_90),
    7: lambda u: u.transpose(Image.Transpose.TRANSVERSE),
    8: lambda u: u.transpose(Image.Transpose.ROTATE_270),
}


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
@pytest.mark.parametrize("orientation", sorted(STORED))
def test_exif_orientation_is_applied(orientation, fmt):
    upright = asymmetric()
    kw = {"lossless": True} if fmt == "WEBP" else {}
    data = encoded(STORED[orientation](upright), fmt, exif=with_orientation(orientation), **kw)
    got = decode_image(data)
    assert got.size == upright.size and np.array_equal(np.asarray(got), np.asarray(upright))


def test_exif_orientation_of_a_jpeg_and_of_a_database_file(tmp_path: Path):
    upright = Image.new("RGB", (64, 32), RED)
    upright.paste(BLUE, (0, 0, 16, 32))  # blue on the left
    data = encoded(STORED[6](upright), "JPEG", quality=95, exif=with_orientation(6))
    path = tmp_path / "phone.jpg"
    path.write_bytes(data)
    for got in (decode_image(data), load_image(path)):
        assert got.size == (64, 32)
        assert np.asarray(got)[16, 4, 2] > 200 and np.asarray(got)[16, 60, 0] > 200


def ascii_orientation() -> bytes:
    """An EXIF block whose orientation is the text "6" rather than a number."""
    entry = struct.pack("<HHI4s", 0x0112, 2, 2, b"6\x00\x00\x00")
    return b"Exif\x00\x00II*\x00" + struct.pack("<IH", 8, 1) + entry + struct.pack("<I", 0)


@pytest.mark.parametrize("orientation", [0, 9, 65535, "ascii"])
def test_invalid_orientation_tags_are_ignored(orientation):
    img = asymmetric()
    exif = ascii_orientation() if orientation == "ascii" else with_orientation(orientation)
    for fmt in ("PNG", "JPEG"):
        got = decode_image(encoded(img, fmt, exif=exif, **({"quality": 100} if fmt == "JPEG" else {})))
        assert got.size == img.size
        if fmt == "PNG":
            assert np.array_equal(np.asarray(got), np.asarray(img))


def test_a_corrupt_exif_block_is_ignored():
    img = Image.new("RGB", (16, 8), RED)
    for exif in (b"Exif\x00\x00MM\x00*garbage", b"Exif\x00\x00II*\x00\xff\xff\xff\x7f", b"\x00" * 40):
        got = decode_image(encoded(img, "JPEG", exif=exif))
        assert got.size == (16, 8) and got.mode == "RGB"


# ---- modes and containers ---------------------------------------------------------------------
def rgb_at(img: Image.Image, x: int = 0, y: int = 0) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(img)[y, x])


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    rgba.putpixel((2, 0), (0, 0, 255, 128))
    for fmt, kw in [("PNG", {}), ("WEBP", {"lossless": True})]:
        got = decode_image(encoded(rgba, fmt, **kw))
        assert rgb_at(got, 0) == WHITE and rgb_at(got, 1) == RED
        assert rgb_at(got, 2) == pytest.approx((127, 127, 255), abs=2)
    la = Image.new("LA", (4, 4), (30, 0))
    assert rgb_at(decode_image(encoded(la, "PNG"))) == WHITE
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((1, 0), 0)
    for fmt in ("PNG",):
        got = decode_image(encoded(pal, fmt, transparency=0))
        assert rgb_at(got, 1) == WHITE and rgb_at(got, 0) == RED
    grey_trns = Image.new("L", (4, 4), 7)
    assert rgb_at(decode_image(encoded(grey_trns, "PNG", transparency=7))) == WHITE


def test_sixteen_bit_grey_is_scaled_not_clipped():
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    for fmt in ("PNG", "PPM"):
        got = decode_image(encoded(Image.fromarray(values), fmt))
        assert got.mode == "RGB"
        assert [rgb_at(got, x)[0] for x in range(4)] == [0, 1, 128, 255], fmt


def test_other_modes_decode_to_rgb():
    cmyk = Image.new("CMYK", (8, 8), (255, 0, 0, 0))  # pure cyan
    got = decode_image(encoded(cmyk, "JPEG", quality=95))
    assert rgb_at(got) == pytest.approx((0, 255, 255), abs=4)
    grey = decode_image(encoded(Image.new("L", (8, 8), 77), "JPEG"))
    assert rgb_at(grey) == pytest.approx((77, 77, 77), abs=2)
    bits = Image.new("1", (8, 8), 1)
    assert rgb_at(decode_image(encoded(bits, "PNG"))) == WHITE
    ycc = decode_image(encoded(Image.new("RGB", (8, 8), RED), "JPEG", quality=100, subsampling=0))
    assert ycc.mode == "RGB"


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF"])
def test_animations_give_their_first_frame(fmt):
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, BLUE, WHITE)]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    data = encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)
    got = decode_image(data)
    assert got.mode == "RGB" and got.size == (16, 16)
    assert rgb_at(got, 8, 8) == pytest.approx(RED, abs=3)


def test_large_profiles_and_metadata_decode():
    img = Image.new("RGB", (16, 16), BLUE)
    icc = bytes(range(256)) * 2000  # 512 kB, split over many APP2 segments
    assert rgb_at(decode_image(encoded(img, "JPEG", icc_profile=icc))) == pytest.approx(BLUE, abs=4)
    info = PngImagePlugin.PngInfo()
    info.add_text("XML:com.adobe.xmp", "x" * 3_000_000, zip=True)  # over Pillow's text limit
    info.add_itxt("Comment", "y" * 200_000)
    info.add_text("Software", "editor")
    assert rgb_at(decode_image(encoded(img, "PNG", pnginfo=info))) == BLUE


def test_exif_in_png_text_is_kept_while_other_text_is_skipped():
    """ImageMagick writes a PNG's EXIF as a "Raw profile type exif" text chunk."""
    raw = b"Exif\x00\x00" + with_orientation(6).tobytes()
    info = PngImagePlugin.PngInfo()
    info.add_text("Raw profile type exif", f"\nexif\n{len(raw):8d}\n{raw.hex()}\n", zip=True)
    info.add_text("XML:com.adobe.xmp", "x" * 3_000_000, zip=True)
    upright = asymmetric()
    got = decode_image(encoded(STORED[6](upright), "PNG", pnginfo=info))
    assert np.array_equal(np.asarray(got), np.asarray(upright))


def test_multi_picture_jpeg_gives_its_first_picture():
    pics = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    data = encoded(pics[0], "MPO", save_all=True, append_images=pics[1:], quality=95)
    assert rgb_at(decode_image(data), 8, 8) == pytest.approx(RED, abs=4)


# ---- refusals ------------------------------------------------------------------------------
def png_header_only(width: int, height: int) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_bombs_quote_the_configured_limit():
    for w, h in [(50_000, 50_000), (1000, 1000)]:  # above Pillow's own hard limit, and below it
        with pytest.raises(ImageTooLarge) as e:
            decode_image(png_header_only(w, h), max_pixels=12_345, source="q.png")
        assert "limit of 12345" in str(e.value) and str(w * h) in str(e.value) and "q.png" in str(e.value)
        assert "178956970" not in str(e.value)


def test_garbage_is_a_decode_error():
    for data in (b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, b"\xff\xd8\xff" + bytes(100)):
        with pytest.raises(ImageDecodeError, match="not a decodable image"):
            decode_image(data)
