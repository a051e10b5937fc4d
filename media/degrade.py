"""Low-quality query simulation: the one parser of quality specs and the one
degradation path used by training, evaluation and the benchmarks.

A quality spec is a short string:

- ``orig``: the image as it is.
- ``h<N>``: downscaled to height N (aspect kept, bicubic). An image that is
  already N pixels high or smaller is kept at its size: a spec models a
  camera or link limit, and upsampling is not a degradation (how a small
  query then reaches the network is the model's `small_policy`).
- ``h<N>`` (or ``orig``) optionally followed by ``-dark<F>``: the scene
  gave the camera F times less light (night, indoors), the camera's gain
  brought the brightness back, and the sensor's shot and read noise came
  with it (`low_light`: a physical model, not a filter fitted to a dataset).
  ``-dim<F>`` instead: the same light and noise without the gain, so the
  frame stays F times darker (a camera at its exposure and gain limits).
- then optionally ``-grey``: a monochrome camera (robots' global-shutter
  sensors, IR night modes): the picture's luma (ITU-R 601, Pillow's "L") in
  all three channels.
- then optionally one codec step:
  ``-jpeg<Q>`` / ``-webp<Q>`` (Pillow, Q in 1..100),
  ``-h264-qp<Q>`` / ``-h265-qp<Q>`` (constant QP 0..51, libx264 / libx265
  through PyAV), or ``-h264-kbps<N>`` (libx264 average bitrate N kbit/s with a
  one-second VBV buffer; a one-frame clip gives the rate control a single
  intra frame to work with, so the achieved bitrate, which is reported, can
  be far from the target: use QP specs to compare single images).

Video codecs really run: frames are encoded by PyAV and decoded back, with
the GOP, B-frame, preset and threading settings fixed in `VIDEO_SETTINGS`
(recorded in every evaluation report), so the same input and spec always
give the same pixels. A single image is a one-frame clip; its "bitrate" is
what a stream of such frames at `VIDEO_SETTINGS["fps"]` would cost.
`degrade_sequence` encodes several frames as one clip (real inter-frame
prediction) and reports the clip's achieved bitrate.

H.264/H.265 in 4:2:0 need even frame sizes (libx265 also at least 16 pixels
a side), so a frame is padded by replicating its last row/column before
encoding and cropped back after decoding: the result has exactly the size
the spec asks for, whatever the aspect ratio.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image
from tqdm import tqdm

if TYPE_CHECKING:
    from av.video.codeccontext import VideoCodecContext

log = logging.getLogger(__name__)

# Bump when a change to this module changes the pixels a spec produces: it is
# part of the descriptor cache key (describe/cache.py).
DEGRADE_VERSION = 1

VIDEO_SETTINGS: dict = {
    "fps": 30,  # time base of the clip; single images cost bytes * 8 * fps
    "gop": 30,  # one key frame per second
    "bframes": 0,  # low-latency streaming (robot or phone uplink): no B-frames
    "scenecut": 0,  # key frames only on the GOP grid
    "preset": "medium",
    "pix_fmt": "yuv420p",
    "threads": 1,  # single-threaded encoders are bit-exact run to run
    "kbps_vbv_buffer_s": 1.0,
    "padding": "edge replication to even sizes (H.265: >= 16 px a side), cropped after decoding",
}
# Literal names select PyAV's overload of CodecContext.create that returns a VideoCodecContext.
_ENCODERS: dict[str, Literal["libx264", "libx265"]] = {"h264": "libx264", "h265": "libx265"}
_DECODERS: dict[str, Literal["h264", "hevc"]] = {"h264": "h264", "h265": "hevc"}
_MIN_SIDE = {"h264": 2, "h265": 16}
_LABELS = {"h264": "H.264", "h265": "HEVC (H.265)"}

SPEC_HELP = (
    "orig or h<N>, optionally followed by -dark<F> (F times less light) or -dim<F> (the same "
    "without the camera's gain), then by -grey "
    "(a monochrome camera), then optionally by one of "
    "-jpeg<Q>, -webp<Q>, -h264-qp<Q>, -h265-qp<Q>, -h264-kbps<N> (e.g. h180-jpeg20, h240-h264-qp38, "
    "h180-dark32-jpeg20, h120-grey-jpeg20)"
)
_SPEC_RE = re.compile(
    r"^(?:(?P<orig>orig)|h(?P<height>\d+))"
    r"(?:-(?P<light>dark|dim)(?P<dark>\d+))?"
    r"(?P<grey>-grey)?"
    r"(?:-(?P<img>jpeg|webp)(?P<imgq>\d+)"
    r"|-(?P<vid>h264|h265)-qp(?P<qp>\d+)"
    r"|-h264-kbps(?P<kbps>\d+))?$"
)
MIN_HEIGHT, MAX_HEIGHT = 8, 8640
MAX_KBPS = 1_000_000
MAX_DARK = 1024

# The low-light sensor model (`low_light`): a small phone-camera pixel. At the
# exposure the image was taken with, white fills FULL_WELL electrons; read noise
# is READ_NOISE electrons (typical of 1-1.4 um smartphone pixels: full wells of
# a few thousand electrons, read noise of 1.5-3 e-). Photon shot noise is the
# square root of the signal. With F times less light, a mid-grey pixel (18 %)
# collects 0.18 * FULL_WELL / F electrons: at F=32 about 34, a signal-to-noise
# ratio near 5 once the gain has restored the brightness.
FULL_WELL = 6000.0
READ_NOISE = 2.5


@dataclass(frozen=True)
class Quality:
    """A parsed quality spec; `str(q)` is its canonical spelling."""

    height: int | None = None  # None: keep the size
    codec: str | None = None  # jpeg | webp | h264 | h265 | None
    level: int | None = None  # JPEG/WebP quality, or the video QP
    kbps: int | None = None  # H.264 target bitrate (instead of a QP)
    dark: int | None = None  # low light: F times less light before the codec (None: as taken)
    grey: bool = False  # a monochrome camera: luma in all three channels, after the light, before the codec
    gain: bool = True  # low light: the camera's gain restores the brightness (-dark) or not (-dim)

    def __str__(self) -> str:
        base = "orig" if self.height is None else f"h{self.height}"
        if self.dark is not None:
            base += f"-{'dark' if self.gain else 'dim'}{self.dark}"
        if self.grey:
            base += "-grey"
        if self.codec in ("jpeg", "webp"):
            return f"{base}-{self.codec}{self.level}"
        if self.codec in _ENCODERS:
            return (
                f"{base}-{self.codec}-kbps{self.kbps}"
                if self.kbps is not None
                else f"{base}-{self.codec}-qp{self.level}"
            )
        return base

    @property
    def is_original(self) -> bool:
        return self.height is None and self.codec is None and self.dark is None and not self.grey

    @property
    def is_video(self) -> bool:
        return self.codec in _ENCODERS

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """Size of the degraded image for a (width, height) source; codecs keep sizes."""
        if self.height is None or height <= self.height:
            return width, height
        return max(1, round(width * self.height / height)), self.height


@functools.cache
def encoder_available(name: str) -> bool:
    """Whether the installed PyAV/FFmpeg build can encode with `name`."""
    import av

    try:
        av.codec.Codec(name, "w")
        return True
    except Exception:  # UnknownCodecError and friends differ between PyAV versions
        return False


def codec_versions() -> dict[str, str]:
    """The libraries whose output a degraded copy is: Pillow (resampling, the light steps),
    libjpeg(-turbo) and libwebp (image codecs), PyAV and FFmpeg's libavcodec (video codecs).
    Another version may encode other bytes, so benchmark reports record these."""
    import av
    from PIL import __version__ as pillow
    from PIL import features

    def lib(name: str) -> str:
        return str(features.version(name) or "absent")

    turbo = features.check_feature("libjpeg_turbo")
    return {
        "pillow": pillow,
        "jpeg": f"libjpeg-turbo {lib('libjpeg_turbo')}" if turbo else f"libjpeg {lib('jpg')}",
        "webp": lib("webp"),
        "av": str(av.__version__),
        "libavcodec": ".".join(str(v) for v in av.library_versions["libavcodec"]),
    }


def _bad(spec: str, why: str) -> ValueError:
    return ValueError(f"bad quality spec {spec!r}: {why}")


def parse_quality(spec: str | Quality) -> Quality:
    """Parse one spec (case and surrounding spaces ignored); ValueError says what is wrong."""
    if isinstance(spec, Quality):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"bad quality spec {spec!r}: expected a string like {SPEC_HELP}")
    text = spec.strip().lower()
    m = _SPEC_RE.match(text)
    if not m:
        raise _bad(spec, f"expected {SPEC_HELP}")
    height = None if m["orig"] else int(m["height"])
    if height is not None and not MIN_HEIGHT <= height <= MAX_HEIGHT:
        raise _bad(spec, f"height must be {MIN_HEIGHT}..{MAX_HEIGHT} pixels, got {height}")
    dark = None if m["dark"] is None else int(m["dark"])
    grey = m["grey"] is not None
    gain = m["light"] != "dim"
    if dark is not None and not 2 <= dark <= MAX_DARK:
        raise _bad(spec, f"the light factor of -{m['light']} must be 2..{MAX_DARK}, got {dark}")
    if m["img"]:
        q = int(m["imgq"])
        if not 1 <= q <= 100:
            raise _bad(spec, f"{m['img'].upper()} quality must be 1..100, got {q}")
        return Quality(height, m["img"], q, dark=dark, grey=grey, gain=gain)
    if m["vid"] or m["kbps"]:
        codec = m["vid"] or "h264"
        _require_encoder(spec, codec)
        if m["kbps"]:
            kbps = int(m["kbps"])
            if not 1 <= kbps <= MAX_KBPS:
                raise _bad(spec, f"bitrate must be 1..{MAX_KBPS} kbit/s, got {kbps}")
            return Quality(height, codec, None, kbps, dark, grey, gain)
        qp = int(m["qp"])
        if not 0 <= qp <= 51:
            raise _bad(spec, f"{_LABELS[codec]} QP must be 0..51, got {qp}")
        return Quality(height, codec, qp, dark=dark, grey=grey, gain=gain)
    return Quality(height, dark=dark, grey=grey, gain=gain)


def in_condition(spec: str | Quality, condition: str) -> Quality:
    """`spec` taken under a capture condition, written as its step without the
    dash: `dark<F>`, `dim<F>` or `grey` (parsed as a spec's step is). A spec
    that already has a light step keeps its own; `grey` is idempotent."""
    try:
        cond = parse_quality(f"orig-{condition}")
    except ValueError as e:
        raise ValueError(f"bad capture condition {condition!r}: expected dark<F>, dim<F> or grey ({e})") from None
    if cond.codec is not None:
        raise ValueError(f"bad capture condition {condition!r}: expected dark<F>, dim<F> or grey, not a codec")
    q = parse_quality(spec)
    if cond.dark is not None and q.dark is None:
        q = dataclasses.replace(q, dark=cond.dark, gain=cond.gain)
    return dataclasses.replace(q, grey=q.grey or cond.grey)


def _require_encoder(spec: str, codec: str) -> None:
    name = _ENCODERS[codec]
    if not encoder_available(name):
        raise _bad(
            spec,
            f"the installed PyAV/FFmpeg has no {_LABELS[codec]} encoder ({name}); "
            f"install a PyAV wheel built with {name}, or use another codec step",
        )


def parse_qualities(specs: str | Sequence[str]) -> list[Quality]:
    """Comma-separated specs (or a list of them) -> qualities, in order, without repeats."""
    parts = specs.split(",") if isinstance(specs, str) else [p for s in specs for p in str(s).split(",")]
    out: list[Quality] = []
    for part in parts:
        if not part.strip():
            raise ValueError(f"bad quality list {specs!r}: empty entry (use e.g. orig,h240,h180-jpeg20)")
        q = parse_quality(part)
        if q in out:
            raise ValueError(f"bad quality list {specs!r}: {q} appears twice")
        out.append(q)
    if not out:
        raise ValueError("no quality spec given")
    return out


@dataclass
class Degraded:
    """A degraded image and what it cost to send."""

    image: Image.Image  # RGB, at Quality.output_size
    quality: Quality
    nbytes: int | None = None  # compressed size; None for orig / plain resizing
    bitrate_kbps: float | None = None  # video codecs: achieved bitrate
    encoded: bytes | None = field(default=None, repr=False)  # the JPEG/WebP file or H.26x bitstream


@dataclass
class DegradedClip:
    images: list[Image.Image]
    quality: Quality
    nbytes: int | None
    bitrate_kbps: float | None
    frame_bytes: list[int] | None
    settings: dict


def _srgb_to_linear(v: np.ndarray) -> np.ndarray:
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(v: np.ndarray) -> np.ndarray:
    return np.where(v <= 0.0031308, v * 12.92, 1.055 * np.power(v, 1 / 2.4) - 0.055)


def low_light(img: Image.Image, factor: int, gain: bool = True) -> Image.Image:
    """The picture as a camera would take it with `factor` times less light.

    Per pixel and colour channel: sRGB -> linear light -> electrons collected
    (`FULL_WELL` for white, divided by `factor`) -> plus shot noise (variance =
    the signal) and read noise (`READ_NOISE`) -> times the gain `factor`, which
    restores the brightness (without `gain`, the -dim step: times 1, the frame
    stays dark) -> clipped -> sRGB, 8 bits. The noise is drawn from a generator
    seeded by the image's own pixels: same input, same output."""
    arr = np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
    rng = np.random.default_rng([zlib.crc32(arr.tobytes()), arr.shape[0], arr.shape[1], factor])
    electrons = _srgb_to_linear(arr.astype(np.float64) / 255.0) * (FULL_WELL / factor)
    noisy = electrons + rng.standard_normal(arr.shape) * np.sqrt(electrons + READ_NOISE**2)
    linear = np.clip(noisy * ((factor if gain else 1) / FULL_WELL), 0.0, 1.0)
    return Image.fromarray(np.round(_linear_to_srgb(linear) * 255.0).astype(np.uint8))


def _before_codec(img: Image.Image, q: Quality) -> Image.Image:
    """Everything before the codec: the size, the light, then the sensor's colour."""
    img = img if img.mode == "RGB" else img.convert("RGB")
    size = q.output_size(*img.size)
    img = img if size == img.size else img.resize(size, Image.Resampling.BICUBIC)
    img = img if q.dark is None else low_light(img, q.dark, q.gain)
    return img.convert("L").convert("RGB") if q.grey else img


def _encode_image(img: Image.Image, q: Quality) -> tuple[Image.Image, bytes]:
    buf = io.BytesIO()
    if q.codec == "jpeg":
        img.save(buf, format="JPEG", quality=q.level, optimize=False, subsampling="4:2:0")
    else:
        img.save(buf, format="WEBP", quality=q.level, method=4, lossless=False)
    data = buf.getvalue()
    out = Image.open(io.BytesIO(data))
    out.load()
    return out.convert("RGB"), data


def _pad(arr: np.ndarray, codec: str) -> np.ndarray:
    h, w = arr.shape[:2]
    m = _MIN_SIDE[codec]
    ph, pw = max(h + h % 2, m) - h, max(w + w % 2, m) - w
    return np.pad(arr, ((0, ph), (0, pw), (0, 0)), mode="edge") if ph or pw else arr


def _video_context(codec: str, q: Quality, width: int, height: int) -> VideoCodecContext:
    import av

    s = VIDEO_SETTINGS
    ctx = av.CodecContext.create(_ENCODERS[codec], "w")
    ctx.width, ctx.height, ctx.pix_fmt = width, height, s["pix_fmt"]
    ctx.time_base = Fraction(1, s["fps"])
    ctx.framerate = Fraction(s["fps"], 1)
    ctx.gop_size, ctx.max_b_frames, ctx.thread_count = s["gop"], s["bframes"], s["threads"]
    common = f"keyint={s['gop']}:min-keyint={s['gop']}:scenecut={s['scenecut']}:bframes={s['bframes']}"
    if codec == "h264":
        params = common + ":threads=1"
        opts = {"preset": s["preset"]}
        if q.kbps is not None:
            vbv = round(q.kbps * s["kbps_vbv_buffer_s"])
            params += f":vbv-maxrate={q.kbps}:vbv-bufsize={vbv}"
            ctx.bit_rate = q.kbps * 1000
        else:
            opts["qp"] = str(q.level)
        opts["x264-params"] = params
    else:
        rate = f"bitrate={q.kbps}:vbv-maxrate={q.kbps}:vbv-bufsize={q.kbps}" if q.kbps else f"qp={q.level}"
        opts = {"preset": s["preset"], "x265-params": f"{common}:{rate}:log-level=none:pools=1:frame-threads=1:wpp=0"}
    ctx.options = opts
    return ctx


def _video_roundtrip(frames: Sequence[Image.Image], q: Quality) -> tuple[list[Image.Image], list[int], bytes]:
    """Encode RGB frames of one size as a clip and decode them back."""
    import av

    codec = q.codec
    assert codec is not None  # callers pass video qualities only (Quality.is_video)
    w, h = frames[0].size
    arrays = [_pad(np.asarray(f, dtype=np.uint8), codec) for f in frames]
    ph, pw = arrays[0].shape[:2]
    try:
        enc = _video_context(codec, q, pw, ph)
        packets = []
        for i, arr in enumerate(arrays):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
            frame.pts = i
            packets.extend(enc.encode(frame))
        packets.extend(enc.encode(None))
    except av.error.FFmpegError as e:
        raise ValueError(f"{q}: {_ENCODERS[codec]} failed on a {w}x{h} frame ({e})") from e
    stream = b"".join(bytes(p) for p in packets)
    dec = av.CodecContext.create(_DECODERS[codec], "r")
    decoded = []
    for p in packets:
        decoded.extend(dec.decode(p))
    decoded.extend(dec.decode(None))
    if len(decoded) != len(frames):
        raise RuntimeError(f"{q}: decoded {len(decoded)} frames from {len(frames)} encoded")
    images = [Image.fromarray(d.to_ndarray(format="rgb24")[:h, :w]) for d in decoded]
    by_pts = sorted(packets, key=lambda p: p.pts if p.pts is not None else 0)
    return images, [p.size for p in by_pts], stream


def _kbps(nbytes: int, frames: int) -> float:
    return nbytes * 8 * VIDEO_SETTINGS["fps"] / frames / 1000.0


def degrade(img: Image.Image, spec: str | Quality) -> Degraded:
    """Degrade one image to `spec`. Deterministic: same pixels, same bytes."""
    q = parse_quality(spec)
    if q.is_original:
        return Degraded(img if img.mode == "RGB" else img.convert("RGB"), q)
    small = _before_codec(img, q)
    if q.codec is None:
        return Degraded(small, q)
    if q.codec in ("jpeg", "webp"):
        out, data = _encode_image(small, q)
        return Degraded(out, q, nbytes=len(data), encoded=data)
    frames, _, stream = _video_roundtrip([small], q)
    return Degraded(frames[0], q, nbytes=len(stream), bitrate_kbps=_kbps(len(stream), 1), encoded=stream)


def degrade_image(img: Image.Image, spec: str | Quality) -> Image.Image:
    """Shortcut: just the degraded RGB image."""
    return degrade(img, spec).image


def degrade_sequence(frames: Sequence[Image.Image], spec: str | Quality) -> DegradedClip:
    """Degrade consecutive video frames as ONE clip (inter-frame coding for
    H.26x), reporting the clip's achieved bitrate at VIDEO_SETTINGS['fps']."""
    q = parse_quality(spec)
    if not frames:
        raise ValueError("degrade_sequence needs at least one frame")
    sizes_out = {q.output_size(*f.size) for f in frames}
    if len(sizes_out) != 1:
        raise ValueError(f"{q}: all frames of a clip must have the same size, got {sorted(sizes_out)}")
    if not q.is_video:
        parts = [degrade(f, q) for f in frames]
        sizes: list[int] | None = None
        if q.codec:
            sizes = []
            for p in parts:
                assert p.nbytes is not None  # degrade() reports the size of every JPEG/WebP file
                sizes.append(p.nbytes)
        return DegradedClip([p.image for p in parts], q, sum(sizes) if sizes else None, None, sizes, {})
    images, frame_sizes, stream = _video_roundtrip([_before_codec(f, q) for f in frames], q)
    return DegradedClip(images, q, len(stream), _kbps(len(stream), len(frames)), frame_sizes, dict(VIDEO_SETTINGS))


def degrade_sequence_files(paths: Sequence[Path], spec: str | Quality, dst: Path) -> tuple[list[Path], DegradedClip]:
    """Degrade image files as ONE clip (`degrade_sequence`: for H.26x one encode of
    the whole sequence, as a real stream would be) and write the frames
    losslessly as `dst/frame-NNNNNN.png`, so that THE description path can
    describe them at `orig` like any image files. Written atomically; a `dst`
    that already holds the frames (same count) is reused as is."""
    from vpr.model.fileio import atomic_write_bytes
    from vpr.model.preprocess import load_image

    dst = Path(dst)
    out = [dst / f"frame-{i:06d}.png" for i in range(len(paths))]
    clip = degrade_sequence([load_image(p) for p in paths], spec)
    if all(p.is_file() for p in out):
        return out, clip
    dst.mkdir(parents=True, exist_ok=True)
    for path, img in zip(out, clip.images):
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=1)
        atomic_write_bytes(path, buf.getvalue())
    return out, clip


def codec_info() -> dict:
    """Versions and settings that determine degraded pixels (for reports)."""
    import av

    info = {
        "degrade_version": DEGRADE_VERSION,
        "pyav": av.__version__,
        "video_settings": dict(VIDEO_SETTINGS),
        "jpeg": "Pillow, 4:2:0, optimize off",
        "webp": "Pillow, method 4, lossy",
    }
    with contextlib.suppress(Exception):  # not exposed by every PyAV build
        info["ffmpeg"] = {k: ".".join(map(str, v)) for k, v in av.library_versions.items()}
    info["encoders"] = {c: encoder_available(n) for c, n in _ENCODERS.items()}
    return info


# ---- folders ---------------------------------------------------------------

LOSSLESS_SUFFIXES = (".png", ".bmp", ".ppm")


@dataclass
class FolderReport:
    source: Path
    target: Path
    quality: str
    count: int
    total_bytes: int | None
    mean_bitrate_kbps: float | None
    files: list[dict]


def _save(path: Path, d: Degraded) -> None:
    """Write the degraded image under its original name without adding loss
    where the format allows: JPEG/WebP bytes as they came out of the codec when
    the name matches the codec, lossless formats as is; a .jpg name for any
    other degradation gets JPEG quality 100 with 4:4:4 chroma (near-lossless)."""
    from vpr.model.fileio import atomic_write_bytes

    suffix = path.suffix.lower()
    if d.encoded is not None and (
        (d.quality.codec == "jpeg" and suffix in (".jpg", ".jpeg")) or (d.quality.codec == "webp" and suffix == ".webp")
    ):
        atomic_write_bytes(path, d.encoded)
        return
    buf = io.BytesIO()
    if suffix in (".jpg", ".jpeg"):
        d.image.save(buf, format="JPEG", quality=100, subsampling="4:4:4")
    elif suffix == ".webp":
        d.image.save(buf, format="WEBP", lossless=True)
    else:
        d.image.save(buf, format={".png": "PNG", ".bmp": "BMP", ".ppm": "PPM"}.get(suffix, "PNG"))
    atomic_write_bytes(path, buf.getvalue())


def degrade_folder(
    src: Path,
    dst: Path,
    spec: str | Quality,
    recursive: bool = False,
    progress: bool = True,
    on_file: Callable[[int, int], None] | None = None,
) -> FolderReport:
    """Write degraded copies of the images in `src` to `dst` (same relative
    names) and `dst/degrade.json` with per-file sizes and bitrates."""
    from vpr.model.fileio import atomic_write_json
    from vpr.model.preprocess import IMAGE_EXTENSIONS, list_images, load_image

    q = parse_quality(spec)
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if src == dst or src in dst.parents:
        raise ValueError(f"{dst}: the destination must not be the source folder {src} or inside it")
    if recursive:
        if not src.is_dir():
            raise FileNotFoundError(f"{src}: not a folder")
        files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FileNotFoundError(f"{src}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    else:
        files = list_images(src)
    dst.mkdir(parents=True, exist_ok=True)
    records, total, kbps = [], 0, []
    for i, path in enumerate(tqdm(files, desc=f"degrade {q}", unit="img", disable=not progress)):
        d = degrade(load_image(path), q)
        rel = path.relative_to(src)
        _save(dst / rel, d)
        records.append(
            {
                "file": rel.as_posix(),
                "width": d.image.width,
                "height": d.image.height,
                "bytes": d.nbytes,
                "bitrate_kbps": d.bitrate_kbps,
            }
        )
        total += d.nbytes or 0
        if d.bitrate_kbps is not None:
            kbps.append(d.bitrate_kbps)
        if on_file:
            on_file(i + 1, len(files))
    report = FolderReport(
        src, dst, str(q), len(files), total if q.codec else None, float(np.mean(kbps)) if kbps else None, records
    )
    atomic_write_json(
        dst / "degrade.json",
        {
            "source": str(src),
            "quality": str(q),
            "count": report.count,
            "total_bytes": report.total_bytes,
            "mean_bitrate_kbps": report.mean_bitrate_kbps,
            "codec": codec_info(),
            "files": records,
        },
    )
    log.info("degraded %d images from %s to %s at %s", len(files), src, dst, q)
    return report
