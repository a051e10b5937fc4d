"""The `@UTM@` file names of the deep-visual-geo-localization-benchmark (dvgl):
`@UTM_east@UTM_north@zone@band@lat@lon@pano@tile@heading@pitch@roll@height@time@note@.jpg`.

Writers (the synthetic route, video + GPS) and the folder reader share this
module, so that they depend on the naming and not on each other.
"""

from __future__ import annotations

import math
from pathlib import Path


def dvgl_name(
    east: float,
    north: float,
    zone: int | str | None = None,
    band: str | None = None,
    lat: float | None = None,
    lon: float | None = None,
    pano_id: str = "",
    tile: str = "",
    heading: float | None = None,
    timestamp: str = "",
    note: str = "",
    suffix: str = ".jpg",
) -> str:
    """The dvgl file name `@east@north@zone@band@lat@lon@pano@tile@heading@pitch@roll@height@time@note@.jpg`."""

    def clean(text: str) -> str:
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))

    fields = [
        "",
        f"{east:.2f}",
        f"{north:.2f}",
        "" if zone is None else (f"{zone:02d}" if isinstance(zone, int) else str(zone)),
        band or "",
        "" if lat is None else f"{lat:.7f}",
        "" if lon is None else f"{lon:.7f}",
        clean(pano_id),
        clean(tile),
        "" if heading is None else f"{heading % 360:.1f}",
        "",
        "",
        "",
        clean(timestamp),
        clean(note),
        "",
    ]
    return "@".join(fields) + suffix


def parse_dvgl_name(path: Path) -> tuple[tuple[float, float], str | None, tuple[float, float] | None]:
    """`@east@north@zone@letter@lat@lon@...` -> (utm, zone or None, latlon or None)."""
    fields = path.stem.split("@")
    if len(fields) < 3 or fields[0] != "":
        raise ValueError(f"{path}: file name does not follow @UTM_east@UTM_north@...@ (dvgl format)")
    try:
        east, north = float(fields[1]), float(fields[2])
    except ValueError:
        raise ValueError(
            f"{path}: UTM east/north {fields[1]!r}, {fields[2]!r} in the file name are not numbers"
        ) from None
    if not (math.isfinite(east) and math.isfinite(north)):
        raise ValueError(f"{path}: UTM east/north in the file name are not finite")
    zone = None
    if len(fields) > 4 and fields[3].strip():
        zone = f"{fields[3].strip().lstrip('0') or '0'}{fields[4].strip().upper()}"
    latlon = None
    if len(fields) > 6 and fields[5].strip() and fields[6].strip():
        try:
            latlon = (float(fields[5]), float(fields[6]))
        except ValueError:
            raise ValueError(
                f"{path}: latitude/longitude {fields[5]!r}, {fields[6]!r} in the file name are not numbers"
            ) from None
    return (east, north), zone, latlon
