"""Quality specs and the degradation path (issue 3)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vpr.media.degrade as dg
from vpr.cli.main import main
from vpr.media.degrade import Quality, degrade, degrade_image, degrade_sequence, parse_qualities, parse_quality


def textured(width: int = 323, height: int = 241, seed: int = 0) -> Image.Image:
    """Smooth colour blobs plus fine detail, so that codecs have work to do."""
    rng = np.random.default_rng(seed)
    blobs = Image.fromarray(rng.integers(0, 255, (8, 10, 3), dtype=np.uint8))
    coarse = blobs.resize((width, height), Image.Resampling.BICUBIC)
    fine = rng.normal(0, 18, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(coarse, np.float64) + fine, 0, 255).astype(np.uint8))


def psnr(a: Image.Image, b: Image.Image) -> float:
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return float(10 * np.log10(255**2 / max(np.mean(d * d), 1e-12)))


@pytest.mark.parametrize(
    "spec, canonical, expected",
    [
        ("orig", "orig", Quality()),
        ("h180", "h180", Quality(180)),
        ("  H180-JPEG20 ", "h180-jpeg20", Quality(180, "jpeg", 20)),
        ("h0240-webp050", "h240-webp50", Quality(240, "webp", 50)),
        ("h240-h264-qp38", "h240-h264-qp38", Quality(240, "h264", 38)),
        ("h180-h265-qp40", "h180-h265-qp40", Quality(180, "h265", 40)),
        ("h120-h264-kbps300", "h120-h264-kbps300", Quality(120, "h264", None, 300)),
        ("orig-jpeg50", "orig-jpeg50", Quality(None, "jpeg", 50)),
        ("h60-h264-qp0", "h60-h264-qp0", Quality(60, "h264", 0)),
        ("h180-DARK32-jpeg20", "h180-dark32-jpeg20", Quality(180, "jpeg", 20, dark=32)),
        ("orig-dark8", "orig-dark8", Quality(dark=8)),
        ("h120-dark16-h264-qp40", "h120-dark16-h264-qp40", Quality(120, "h264", 40, dark=16)),
        ("h120-dark4-h264-kbps200", "h120-dark4-h264-kbps200", Quality(120, "h264", None, 200, 4)),
    ],
)
def test_parse_good_specs(spec, canonical, expected):
    q = parse_quality(spec)
    assert q == expected
    assert str(q) == canonical
    assert parse_quality(str(q)) == q  # the canonical spelling round-trips
    assert parse_quality(q) is q


@pytest.mark.parametrize(
    "spec, why",
    [
        ("", "expected orig or h<N>"),
        ("h", "expected"),
        ("180", "expected"),
        ("x180", "expected"),
        ("h-180", "expected"),
        ("orig-", "expected"),
        ("h180-png20", "expected"),
        ("h180-h264", "expected"),
        ("h180-jpeg20-webp20", "expected"),
        ("h180-h265-kbps100", "expected"),
        ("h0", "height must be"),
        ("h7", "height must be"),
        ("h9000", "height must be"),
        ("h180-jpeg0", "JPEG quality must be 1..100"),
        ("h180-jpeg101", "JPEG quality must be 1..100"),
        ("h180-webp0", "WEBP quality must be 1..100"),
        ("h180-h264-qp52", "H.264 QP must be 0..51"),
        ("h180-h265-qp99", "QP must be 0..51"),
        ("h180-h264-kbps0", "bitrate must be"),
        ("h180-dark1", "light factor of -dark must be 2..1024"),
        ("h180-dark2000-jpeg20", "light factor"),
        ("h180-jpeg20-dark32", "expected"),
        ("dark32", "expected"),
        ("h180-dark", "expected"),
    ],
)
def test_parse_bad_specs(spec, why):
    with pytest.raises(ValueError) as e:
        parse_quality(spec)
    assert repr(spec) in str(e.value)
    assert why in str(e.value)


def test_parse_qualities_lists():
    assert [str(q) for q in parse_qualities("orig, h180-jpeg20,h240")] == ["orig", "h180-jpeg20", "h240"]
    assert [str(q) for q in parse_qualities(["orig,h240", "h120-h264-qp40"])] == ["orig", "h240", "h120-h264-qp40"]
    with pytest.raises(ValueError, match="empty entry"):
        parse_qualities("orig,,h240")
    with pytest.raises(ValueError, match="appears twice"):
        parse_qualities("h240,H240")
    with pytest.raises(ValueError, match="'h240-jpeg999'"):
        parse_qualities("orig,h240-jpeg999")


def test_missing_hevc_encoder_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(dg, "encoder_available", lambda name: name != "libx265")
    with pytest.raises(ValueError, match=r"no HEVC \(H.265\) encoder \(libx265\)"):
        parse_quality("h180-h265-qp30")
    assert str(parse_quality("h180-h264-qp30")) == "h180-h264-qp30"


@pytest.mark.parametrize(
    "spec",
    ["h120", "h120-jpeg30", "h120-webp30", "h121-h264-qp30", "h120-h265-qp30", "h97-h265-qp30", "h120-h264-kbps200"],
)
def test_degraded_image_has_requested_height(spec):
    img = textured(323, 241)  # odd sizes: the video paths must pad and crop
    d = degrade(img, spec)
    n = parse_quality(spec).height
    assert d.image.mode == "RGB"
    assert d.image.size == (round(323 * n / 241), n)
    if parse_quality(spec).codec:
        assert d.nbytes and d.nbytes > 0 and d.encoded is not None and len(d.encoded) == d.nbytes
    # really a (lossy) copy of the picture, not noise or a blank frame
    ref = img.resize(d.image.size, Image.Resampling.BICUBIC)
    assert psnr(ref, d.image) > 20


def test_orig_and_no_upsampling():
    img = textured(160, 120)
    d = degrade(img, "orig")
    assert d.nbytes is None and d.bitrate_kbps is None
    assert np.array_equal(np.asarray(d.image), np.asarray(img))
    big = degrade(img, "h480-jpeg50")  # smaller than the target: kept at its size, still compressed
    assert big.image.size == (160, 120) and big.nbytes > 0
    gray = degrade_image(img.convert("L"), "h60")
    assert gray.mode == "RGB" and gray.height == 60


@pytest.mark.parametrize("codec", ["h264", "h265"])
def test_bitrate_falls_as_qp_rises(codec):
    img = textured(320, 240)
    runs = [degrade(img, f"h240-{codec}-qp{qp}") for qp in (18, 28, 38, 48)]
    sizes = [d.nbytes for d in runs]
    rates = [d.bitrate_kbps for d in runs]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4, sizes
    assert rates == sorted(rates, reverse=True)
    # a one-frame clip's bitrate is its bits at the fixed frame rate
    fps = dg.VIDEO_SETTINGS["fps"]
    assert rates[0] == pytest.approx(sizes[0] * 8 * fps / 1000)
    quality = [psnr(img, d.image) for d in runs]
    assert quality == sorted(quality, reverse=True)


def test_target_bitrate_and_image_codecs_order_by_size():
    img = textured(320, 240)
    low, high = degrade(img, "h240-h264-kbps100"), degrade(img, "h240-h264-kbps3000")
    assert low.nbytes < high.nbytes
    for codec in ("jpeg", "webp"):
        s = [degrade(img, f"h240-{codec}{q}").nbytes for q in (90, 50, 10)]
        assert s[0] > s[1] > s[2], (codec, s)
        assert degrade(img, f"h240-{codec}50").bitrate_kbps is None


@pytest.mark.parametrize(
    "spec", ["h100-jpeg20", "h100-webp20", "h101-h264-qp35", "h100-h265-qp35", "h100-h264-kbps150"]
)
def test_degradation_is_deterministic(spec):
    img = textured(200, 150, seed=3)
    a, b = degrade(img, spec), degrade(img.copy(), spec)
    assert a.nbytes == b.nbytes and a.encoded == b.encoded
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def to_linear(img: Image.Image) -> np.ndarray:
    return dg._srgb_to_linear(np.asarray(img, np.float64) / 255.0)


def test_low_light_is_the_sensor_model():
    # a flat mid-grey (18 % linear) card: after the gain its mean is kept, and its
    # noise is the model's: sqrt(signal + read^2) / signal, signal = 0.18 * FULL_WELL / F
    grey = Image.new("RGB", (200, 150), (118, 118, 118))
    base = to_linear(grey).mean()
    for factor in (8, 32, 128):
        lin = to_linear(dg.low_light(grey, factor))
        signal = base * dg.FULL_WELL / factor
        expected = np.sqrt(signal + dg.READ_NOISE**2) / signal
        assert lin.mean() == pytest.approx(base, rel=0.03)  # the gain restores the brightness
        assert lin.std() / lin.mean() == pytest.approx(expected, rel=0.1), factor
    # the spec path applies it before the codec; orig-dark is not the original
    q = parse_quality("orig-dark32")
    assert not q.is_original
    assert np.array_equal(np.asarray(degrade_image(grey, q)), np.asarray(dg.low_light(grey, 32)))


def test_low_light_is_deterministic_per_image_and_noisier_with_less_light():
    img = textured(160, 120, seed=2)
    a, b = degrade_image(img, "h60-dark32-jpeg50"), degrade_image(img.copy(), "h60-dark32-jpeg50")
    assert a.size == (80, 60) and np.array_equal(np.asarray(a), np.asarray(b))
    clean = np.asarray(degrade_image(img, "h60"), np.float64)
    errors = [np.abs(np.asarray(degrade_image(img, f"h60-dark{f}"), np.float64) - clean).mean() for f in (4, 32, 256)]
    assert 0 < errors[0] < errors[1] < errors[2]
    # the noise follows the picture's content: another picture gets other noise
    other = textured(160, 120, seed=9)
    noise_a = np.asarray(dg.low_light(img, 32), np.float64) - np.asarray(img, np.float64)
    noise_b = np.asarray(dg.low_light(other, 32), np.float64) - np.asarray(other, np.float64)
    assert not np.allclose(noise_a, noise_b)
    # a clip in low light: every frame noisy, still one encode
    clip = degrade_sequence([img, other], "h60-dark32-h264-qp30")
    assert len(clip.images) == 2 and clip.bitrate_kbps is not None


def test_low_light_condition_adds_the_step_once():
    assert str(dg.in_condition("h180-jpeg20", "dark32")) == "h180-dark32-jpeg20"
    assert str(dg.in_condition("orig", "dark16")) == "orig-dark16"
    assert str(dg.in_condition("h90-dark8-h264-qp40", "dark32")) == "h90-dark8-h264-qp40"
    with pytest.raises(ValueError, match="light factor"):
        dg.in_condition("h90", "dark1")


def test_grey_step_is_a_monochrome_camera_before_the_codec():
    img = textured(160, 90, seed=3)
    assert str(dg.parse_quality("H120-GREY-JPEG20")) == "h120-grey-jpeg20"
    assert str(dg.in_condition("h90-dark32-h264-qp40", "grey")) == "h90-dark32-grey-h264-qp40"
    assert dg.in_condition(dg.in_condition("orig", "grey"), "grey") == dg.parse_quality("orig-grey")
    assert not dg.parse_quality("orig-grey").is_original  # it changes the pixels
    with pytest.raises(ValueError, match="bad quality spec"):
        dg.parse_quality("h90-grey-dark32")  # the light comes before the sensor's colour
    luma = np.asarray(img.convert("L"))
    out = np.asarray(degrade_image(img, "orig-grey"))
    assert out.shape == (90, 160, 3) and all(np.array_equal(out[..., c], luma) for c in range(3))
    for spec in ("h60-grey-jpeg20", "h60-grey-h264-qp40", "orig-dark32-grey"):
        arr = np.asarray(degrade_image(img, spec)).astype(int)
        assert np.abs(arr[..., 0] - arr[..., 1]).max() <= 2 and np.abs(arr[..., 1] - arr[..., 2]).max() <= 2, spec
    colour = np.asarray(degrade_image(img, "h60-jpeg20")).astype(int)
    assert np.abs(colour[..., 0] - colour[..., 2]).max() > 20  # the colour step keeps colour


def test_dim_step_is_low_light_without_the_gain():
    img = textured(160, 90, seed=4)
    q = dg.parse_quality("h60-dim8-jpeg20")
    assert str(q) == "h60-dim8-jpeg20" and q.dark == 8 and not q.gain
    assert str(dg.in_condition("h60-jpeg20", "dim8")) == "h60-dim8-jpeg20"
    assert str(dg.in_condition("h60-dark32-jpeg20", "dim8")) == "h60-dark32-jpeg20"  # one light step
    dim, dark = degrade_image(img, "orig-dim8"), degrade_image(img, "orig-dark8")
    assert to_linear(dim).mean() == pytest.approx(to_linear(img).mean() / 8, rel=0.05)  # eight times darker
    assert to_linear(dark).mean() == pytest.approx(to_linear(img).mean(), rel=0.05)  # the gain brings it back
    assert np.array_equal(np.asarray(dim), np.asarray(dg.low_light(img, 8, gain=False)))
    for bad in ("h90", "jpeg20", "dimx", "dark1"):
        with pytest.raises(ValueError, match="bad capture condition"):
            dg.in_condition("orig", bad)


def test_sequence_is_one_clip_with_inter_frames():
    base = textured(340, 240, seed=5)
    frames = [base.crop((2 * i, 0, 2 * i + 320, 240)) for i in range(10)]  # a slow pan
    clip = degrade_sequence(frames, "h120-h264-qp30")
    assert len(clip.images) == 10 and all(im.size == (160, 120) for im in clip.images)
    assert clip.settings["gop"] == dg.VIDEO_SETTINGS["gop"] and clip.settings["bframes"] == 0
    intra = sum(degrade(f, "h120-h264-qp30").nbytes for f in frames)
    assert clip.nbytes < 0.7 * intra  # P-frames predict from the previous frame
    assert clip.frame_bytes[0] > max(clip.frame_bytes[1:])  # the key frame is the largest
    assert clip.bitrate_kbps == pytest.approx(clip.nbytes * 8 * dg.VIDEO_SETTINGS["fps"] / 10 / 1000)
    with pytest.raises(ValueError, match="same size"):
        degrade_sequence([frames[0], textured(100, 90)], "h120-h264-qp30")
    jpeg = degrade_sequence(frames[:3], "h120-jpeg40")
    assert jpeg.bitrate_kbps is None and jpeg.nbytes == sum(jpeg.frame_bytes)


def test_cli_degrade_writes_same_names(tmp_path: Path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    textured(200, 150, 1).save(src / "a.jpg", quality=95)
    textured(180, 120, 2).save(src / "b.png")
    dst = tmp_path / "out"
    assert main(["degrade", str(src), str(dst), "--quality", "h60-jpeg30", "--no-progress"]) == 0
    assert sorted(p.name for p in dst.iterdir()) == ["a.jpg", "b.png", "degrade.json"]
    for name in ("a.jpg", "b.png"):
        with Image.open(dst / name) as im:
            assert im.height == 60
    with Image.open(dst / "a.jpg") as im:  # the codec's own bytes, not a re-encode
        assert im.format == "JPEG"
    report = json.loads((dst / "degrade.json").read_text())
    assert report["quality"] == "h60-jpeg30" and report["count"] == 2
    assert report["total_bytes"] == sum(f["bytes"] for f in report["files"]) > 0
    assert "degraded 2 images" in capsys.readouterr().out

    vid = tmp_path / "vid"
    assert main(["degrade", str(src), str(vid), "--quality", "h61-h264-qp40", "--no-progress"]) == 0
    rep = json.loads((vid / "degrade.json").read_text())
    assert all(f["height"] == 61 and f["bitrate_kbps"] > 0 for f in rep["files"])


def test_cli_degrade_bad_input(tmp_path: Path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    textured(64, 48).save(src / "a.png")
    assert main(["degrade", str(src), str(tmp_path / "o"), "--quality", "h60-jpeg0"]) == 2
    assert "'h60-jpeg0'" in capsys.readouterr().err
    assert main(["degrade", str(src), str(src / "inner"), "--quality", "h40"]) == 2
    assert "must not be the source folder" in capsys.readouterr().err
    assert main(["degrade", str(tmp_path / "nope"), str(tmp_path / "o"), "--quality", "h40"]) == 2
    assert "nope: not a folder" in capsys.readouterr().err


def test_codec_versions_name_the_libraries_that_make_the_bytes():
    import av
    import PIL

    v = dg.codec_versions()
    assert set(v) == {"pillow", "jpeg", "webp", "av", "libavcodec"}
    assert v["pillow"] == PIL.__version__ and v["av"] == str(av.__version__)
    assert v["jpeg"].startswith(("libjpeg-turbo ", "libjpeg ")) and v["jpeg"].split()[-1][0].isdigit()
    assert v["libavcodec"].count(".") == 2 and all(p.isdigit() for p in v["libavcodec"].split("."))
