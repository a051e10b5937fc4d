"""Map a new place from a video and its GPS track: frames sampled by distance
travelled, positioned in UTM metres, written as a folder dataset.

Input:
- a video PyAV can decode (any container/codec FFmpeg reads);
- a GPS CSV with a header holding at least `time_s` (seconds from the start
  of the video), `lat` and `lon` (WGS84 degrees); other columns are ignored.
  Rows with lat = lon = 0 (cameras write these before a fix) are dropped.

Positions are projected to UTM (one zone for the whole track, the zone of
its first fix; `data.geo`), smoothed by a local linear fit over `smooth_s`
seconds (which keeps steady motion exact but stops GPS jitter while standing
still from adding distance), and integrated into distance travelled. A frame
is kept each time the distance passes the next multiple of `spacing` metres;
frames outside the GPS time span are skipped.

Output: `database/` (and with `split_queries`, `queries/` sampled half-way
between the database samples, or the samples of a second video) with dvgl
names `@east@north@zone@band@lat@lon@<video>@<frame>@<heading>@@@@<time>@@.jpg`
and `dataset.json` describing the conversion. The folder appears atomically.
Rotation metadata of the video is not applied (frames are stored as decoded).
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from vpr.data.geo import latlon_to_utm, utm_to_latlon
from vpr.data.names import dvgl_name
from vpr.model.fileio import atomic_write_json, sha256_file, staged_dir

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("time_s", "lat", "lon")
INFO_FILE = "dataset.json"


@dataclass
class GpsTrack:
    source: Path
    t: np.ndarray  # seconds from the start of the video, strictly increasing
    lat: np.ndarray
    lon: np.ndarray
    east: np.ndarray  # smoothed UTM (m)
    north: np.ndarray
    zone: int
    band: str
    south: bool
    dist: np.ndarray  # cumulative distance along the smoothed track (m)
    dropped: int = 0  # rows without a fix
    smooth_s: float = 0.0

    def at(self, t: float) -> dict[str, float]:
        """Interpolated position, distance and heading at time `t`."""
        e, n = float(np.interp(t, self.t, self.east)), float(np.interp(t, self.t, self.north))
        i = int(np.clip(np.searchsorted(self.t, t), 1, len(self.t) - 1))
        j0, j1 = max(0, i - 3), min(len(self.t) - 1, i + 2)
        heading = math.degrees(math.atan2(self.east[j1] - self.east[j0], self.north[j1] - self.north[j0])) % 360
        lat, lon = utm_to_latlon(e, n, self.zone, self.south)  # of the smoothed position
        return {
            "east": e,
            "north": n,
            "lat": lat,
            "lon": lon,
            "dist": float(np.interp(t, self.t, self.dist)),
            "heading": heading,
        }


def _local_linear(t: np.ndarray, x: np.ndarray, window_s: float) -> np.ndarray:
    """Value of a least-squares line fit over t +- window/2 at each sample
    (exact for steady motion, including at the ends of the track)."""
    if window_s <= 0 or len(t) < 3:
        return x.copy()
    tc = t - t.mean()
    lo = np.searchsorted(tc, tc - window_s / 2, side="left")
    hi = np.searchsorted(tc, tc + window_s / 2, side="right")

    def wsum(v: np.ndarray) -> np.ndarray:
        c = np.concatenate([[0.0], np.cumsum(v)])
        return c[hi] - c[lo]

    s0, s1, s2 = wsum(np.ones_like(tc)), wsum(tc), wsum(tc * tc)
    sx, stx = wsum(x), wsum(tc * x)
    den = s0 * s2 - s1 * s1
    ok = den > 1e-12 * np.maximum(s0 * s2, 1e-300)
    b = np.where(ok, (s0 * stx - s1 * sx) / np.where(ok, den, 1.0), 0.0)
    a = (sx - b * s1) / s0
    return np.where(ok, a + b * tc, x)


def read_gps_csv(path: Path, smooth_s: float = 1.0) -> GpsTrack:
    """Read and project a GPS CSV; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GPS file")
    rows: list[tuple[float, float, float]] = []
    dropped = 0
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in cols]
        if missing:
            raise ValueError(
                f"{path}: line 1: missing column(s) {', '.join(missing)}; "
                f"the header needs {', '.join(REQUIRED_COLUMNS)} (found {', '.join(cols) or 'nothing'})"
            )
        reader.fieldnames = cols
        for row in reader:
            line = reader.line_num
            try:
                t, lat, lon = (float(row[c]) for c in REQUIRED_COLUMNS)
            except (TypeError, ValueError):
                raise ValueError(
                    f"{path}: line {line}: time_s, lat, lon must be numbers, got "
                    f"{[row.get(c) for c in REQUIRED_COLUMNS]}"
                ) from None
            if not all(map(math.isfinite, (t, lat, lon))):
                raise ValueError(f"{path}: line {line}: non-finite value")
            if lat == 0 and lon == 0:
                dropped += 1
                continue
            if not (-80 <= lat <= 84 and -180 <= lon <= 180):
                raise ValueError(f"{path}: line {line}: lat {lat}, lon {lon} outside UTM's range (-80..84, -180..180)")
            if rows and t <= rows[-1][0]:
                raise ValueError(f"{path}: line {line}: time_s {t} does not increase (previous {rows[-1][0]})")
            rows.append((t, lat, lon))
    if len(rows) < 2:
        raise ValueError(
            f"{path}: needs at least 2 GPS fixes, found {len(rows)}"
            + (f" ({dropped} rows without a fix dropped)" if dropped else "")
        )
    if dropped:
        log.warning("%s: dropped %d rows without a GPS fix (lat = lon = 0)", path, dropped)
    arr = np.array(rows)
    times, lats, lons = arr[:, 0], arr[:, 1], arr[:, 2]
    east, north, zone, band = latlon_to_utm(lats, lons)
    south = bool(lats[0] < 0)
    east, north = _local_linear(times, east, smooth_s), _local_linear(times, north, smooth_s)
    dist = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(east), np.diff(north)))])
    return GpsTrack(path, times, lats, lons, east, north, zone, band, south, dist, dropped, smooth_s)


@dataclass
class Sample:
    frame_index: int
    time_s: float
    subset: str  # database | queries
    name: str
    position: dict[str, float]


@dataclass
class VideoDatasetReport:
    out: Path
    database: int
    queries: int
    track_length_m: float
    frames_decoded: int
    frames_outside_gps: int
    skipped_thresholds: int
    samples: list[Sample] = field(default_factory=list)


def _frame_times(stream) -> float:
    return float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0


def _sample_video(
    video: Path,
    track: GpsTrack,
    out: Path,
    plan: list[tuple[str, float]],
    spacing: float,
    max_side: int | None,
    jpeg_quality: int,
    progress: bool,
) -> tuple[list[Sample], int, int, int]:
    """Decode `video`, writing a frame whenever the distance passes the next
    threshold of a subset; `plan` = [(subset, first threshold)]."""
    import av

    try:
        container = av.open(str(video))
    except (av.error.FFmpegError, OSError) as e:
        raise ValueError(f"{video}: cannot open the video ({e})") from e
    samples: list[Sample] = []
    skipped = outside = decoded = 0
    nxt = {subset: first for subset, first in plan}
    with container:
        if not container.streams.video:
            raise ValueError(f"{video}: has no video stream")
        stream = container.streams.video[0]
        if stream.time_base is None:
            raise ValueError(f"{video}: the video stream has no time base; frames cannot be timed")
        time_base = stream.time_base
        stream.thread_type = "AUTO"
        t0 = _frame_times(stream)
        total = stream.frames or None
        bar = tqdm(total=total, desc=f"frames {video.name}", unit="frame", disable=not progress)
        try:
            for frame in container.decode(stream):
                decoded += 1
                bar.update()
                if frame.pts is None:
                    continue
                t = float(frame.pts * time_base) - t0
                if t < track.t[0] or t > track.t[-1]:
                    outside += 1
                    continue
                pos = track.at(t)
                due = [s for s, _ in plan if pos["dist"] >= nxt[s]]
                if not due:
                    continue
                subset = min(due, key=lambda s: nxt[s])  # one frame serves one subset
                passed = int((pos["dist"] - nxt[subset]) // spacing)
                skipped += passed
                nxt[subset] += (passed + 1) * spacing
                name = dvgl_name(
                    pos["east"],
                    pos["north"],
                    track.zone,
                    track.band,
                    pos["lat"],
                    pos["lon"],
                    pano_id=video.stem,
                    tile=f"{decoded - 1:06d}",
                    heading=pos["heading"],
                    timestamp=f"{t:.3f}",
                )
                img = frame.to_image()
                if max_side and max(img.size) > max_side:
                    s = max_side / max(img.size)
                    img = img.resize(
                        (max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.BICUBIC
                    )
                buf = io.BytesIO()
                img.convert("RGB").save(buf, format="JPEG", quality=jpeg_quality)
                (out / subset).mkdir(exist_ok=True)
                (out / subset / name).write_bytes(buf.getvalue())
                samples.append(Sample(decoded - 1, t, subset, name, pos))
        except av.error.FFmpegError as e:
            raise ValueError(f"{video}: decoding failed after {decoded} frames ({e})") from e
        finally:
            bar.close()
    if decoded == 0:
        raise ValueError(f"{video}: no decodable video frames")
    return samples, decoded, outside, skipped


def video_to_dataset(
    video: Path,
    gps: Path,
    out: Path,
    spacing: float = 1.0,
    split_queries: bool = False,
    queries_video: Path | None = None,
    queries_gps: Path | None = None,
    max_side: int | None = None,
    smooth_s: float = 1.0,
    jpeg_quality: int = 95,
    overwrite: bool = False,
    progress: bool = True,
) -> VideoDatasetReport:
    """Convert a video + GPS CSV into a folder dataset (see the module doc).

    `split_queries` samples queries from the same video half-way between the
    database samples; `queries_video`/`queries_gps` take them from a second
    walk of the same place instead.
    """
    video, gps, out = Path(video), Path(gps), Path(out)
    if not video.is_file():
        raise FileNotFoundError(f"{video}: no such video file")
    if not (math.isfinite(spacing) and spacing > 0):
        raise ValueError(f"frame spacing must be > 0 metres, got {spacing}")
    if max_side is not None and max_side < 16:
        raise ValueError(f"max side must be at least 16 pixels, got {max_side}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"JPEG quality must be 1..100, got {jpeg_quality}")
    if (queries_video is None) != (queries_gps is None):
        raise ValueError("a queries video needs its GPS CSV (give both or neither)")
    if split_queries and queries_video is not None:
        raise ValueError("choose either split queries from the same video or a second queries video, not both")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out}: exists and is not empty; choose another folder or pass overwrite")
    track = read_gps_csv(gps, smooth_s)
    qtrack = read_gps_csv(Path(queries_gps), smooth_s) if queries_gps is not None else None
    if qtrack is not None and qtrack.zone != track.zone:
        qtrack = _reproject(qtrack, track.zone, track.south)
    with staged_dir(out) as tmp:
        plan = [("database", 0.0)] + ([("queries", spacing / 2)] if split_queries else [])
        samples, decoded, outside, skipped = _sample_video(
            video, track, tmp, plan, spacing, max_side, jpeg_quality, progress
        )
        if queries_video is not None and qtrack is not None:  # both or neither (checked above)
            qs, qd, qo, qsk = _sample_video(
                Path(queries_video), qtrack, tmp, [("queries", 0.0)], spacing, max_side, jpeg_quality, progress
            )
            samples += qs
            decoded, outside, skipped = decoded + qd, outside + qo, skipped + qsk
        counts = {s: sum(1 for x in samples if x.subset == s) for s in ("database", "queries")}
        if counts["database"] == 0:
            raise ValueError(
                f"{video}: no frame lies within the GPS time span of {gps} ({track.t[0]:.2f}..{track.t[-1]:.2f} s)"
            )
        if skipped:
            log.warning(
                "%s: moved more than %.2f m between consecutive frames %d times; use a larger spacing",
                video,
                spacing,
                skipped,
            )
        info: dict[str, Any] = {
            "format": "vpr-video-dataset",
            "video": str(video.resolve()),
            "video_sha256": sha256_file(video),
            "gps": str(gps.resolve()),
            "spacing_m": spacing,
            "smooth_s": smooth_s,
            "max_side": max_side,
            "utm_zone": f"{track.zone}{track.band}",
            "track_length_m": float(track.dist[-1]),
            "gps_fixes": len(track.t),
            "gps_rows_dropped": track.dropped,
            "frames_decoded": decoded,
            "frames_outside_gps": outside,
            "skipped_thresholds": skipped,
            "counts": counts,
            "queries": ("split" if split_queries else str(Path(queries_video).resolve()) if queries_video else None),
            "samples": [
                {"subset": s.subset, "frame": s.frame_index, "time_s": round(s.time_s, 4), "file": s.name}
                for s in samples
            ],
        }
        atomic_write_json(tmp / INFO_FILE, info)
    log.info(
        "%s: %d database and %d query frames every %.2f m along %.1f m -> %s",
        video,
        counts["database"],
        counts["queries"],
        spacing,
        track.dist[-1],
        out,
    )
    return VideoDatasetReport(
        out, counts["database"], counts["queries"], float(track.dist[-1]), decoded, outside, skipped, samples
    )


def _reproject(track: GpsTrack, zone: int, south: bool) -> GpsTrack:
    """Put a second track in the first track's UTM zone (one metric frame)."""
    east, north, _, _ = latlon_to_utm(track.lat, track.lon, zone=zone, south=south)
    east, north = _local_linear(track.t, east, track.smooth_s), _local_linear(track.t, north, track.smooth_s)
    track.east, track.north, track.zone, track.south = east, north, zone, south
    track.dist = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(east), np.diff(north)))])
    return track
