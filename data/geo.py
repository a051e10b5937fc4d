"""WGS84 latitude/longitude <-> UTM metres, our own code (no extra dependency).

Transverse Mercator by Krueger's series to the third order in n (Karney
2011, "Transverse Mercator with an accuracy of a few nanometers", the form
the UTM Wikipedia article gives): about a millimetre of error inside a zone,
far below GPS noise. Standard zone rules, including the Norway and Svalbard
exceptions; latitudes outside -80..84 (the polar UPS system) are refused.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

A_WGS84 = 6378137.0
F_WGS84 = 1 / 298.257223563
K0 = 0.9996
E0 = 500_000.0
N0_SOUTH = 10_000_000.0
BANDS = "CDEFGHJKLMNPQRSTUVWX"

_n = F_WGS84 / (2 - F_WGS84)
_A = A_WGS84 / (1 + _n) * (1 + _n**2 / 4 + _n**4 / 64)
_ALPHA = (_n / 2 - 2 / 3 * _n**2 + 5 / 16 * _n**3, 13 / 48 * _n**2 - 3 / 5 * _n**3, 61 / 240 * _n**3)
_BETA = (_n / 2 - 2 / 3 * _n**2 + 37 / 96 * _n**3, 1 / 48 * _n**2 + 1 / 15 * _n**3, 17 / 480 * _n**3)
_DELTA = (2 * _n - 2 / 3 * _n**2 - 2 * _n**3, 7 / 3 * _n**2 - 8 / 5 * _n**3, 56 / 15 * _n**3)
_C = 2 * np.sqrt(_n) / (1 + _n)


def zone_number(lat: float, lon: float) -> int:
    """UTM zone (1..60) of a point, with the Norway/Svalbard exceptions."""
    check_latlon(lat, lon)
    lon = (lon + 180) % 360 - 180
    if 56 <= lat < 64 and 3 <= lon < 12:
        return 32
    if 72 <= lat <= 84 and 0 <= lon < 42:
        return 31 if lon < 9 else 33 if lon < 21 else 35 if lon < 33 else 37
    return min(int((lon + 180) // 6) + 1, 60)


def band_letter(lat: float) -> str:
    check_latlon(lat, 0.0)
    return BANDS[min(int((lat + 80) // 8), len(BANDS) - 1)]


def check_latlon(lat: float, lon: float) -> None:
    if not (np.isfinite(lat) and np.isfinite(lon)):
        raise ValueError(f"latitude/longitude must be finite numbers, got {lat}, {lon}")
    if not -80 <= lat <= 84:
        raise ValueError(f"latitude {lat} is outside UTM's -80..84 degrees (polar regions use UPS)")
    if not -180 <= lon <= 180:
        raise ValueError(f"longitude {lon} is outside -180..180 degrees")


def central_meridian(zone: int) -> float:
    return (zone - 1) * 6 - 180 + 3


def latlon_to_utm(
    lat: npt.ArrayLike, lon: npt.ArrayLike, zone: int | None = None, south: bool | None = None
) -> tuple[Any, Any, int, str]:
    """(lat, lon) in degrees (scalars or arrays) -> (easting, northing, zone, letter),
    easting and northing as floats for scalars and as arrays for arrays.

    `zone`/`south` force one projection for all points (a track crossing a
    zone border must stay in one metric frame); by default they come from the
    first point. `letter` is the latitude band of the first point.
    """
    lat_a = np.atleast_1d(np.asarray(lat, dtype=np.float64))
    lon_a = np.atleast_1d(np.asarray(lon, dtype=np.float64))
    if lat_a.shape != lon_a.shape or lat_a.size == 0:
        raise ValueError(
            f"latitude and longitude arrays must have the same non-empty shape, got {lat_a.shape} and {lon_a.shape}"
        )
    for la, lo in zip(lat_a.ravel(), lon_a.ravel()):
        check_latlon(float(la), float(lo))
    first_lat, first_lon = float(lat_a.ravel()[0]), float(lon_a.ravel()[0])
    zone = zone_number(first_lat, first_lon) if zone is None else int(zone)
    if not 1 <= zone <= 60:
        raise ValueError(f"UTM zone must be 1..60, got {zone}")
    south = first_lat < 0 if south is None else south
    phi = np.radians(lat_a)
    dlam = np.radians((lon_a - central_meridian(zone) + 180) % 360 - 180)
    sphi = np.sin(phi)
    t = np.sinh(np.arctanh(sphi) - _C * np.arctanh(_C * sphi))
    xi_p = np.arctan2(t, np.cos(dlam))
    eta_p = np.arctanh(np.sin(dlam) / np.sqrt(1 + t * t))
    e = eta_p.copy()
    nn = xi_p.copy()
    for j, a in enumerate(_ALPHA, start=1):
        e += a * np.cos(2 * j * xi_p) * np.sinh(2 * j * eta_p)
        nn += a * np.sin(2 * j * xi_p) * np.cosh(2 * j * eta_p)
    easting = E0 + K0 * _A * e
    northing = (N0_SOUTH if south else 0.0) + K0 * _A * nn
    if np.ndim(lat) == 0:
        return float(easting[0]), float(northing[0]), zone, band_letter(first_lat)
    return easting, northing, zone, band_letter(first_lat)


def utm_to_latlon(easting: npt.ArrayLike, northing: npt.ArrayLike, zone: int, south: bool = False) -> tuple[Any, Any]:
    """Inverse of `latlon_to_utm` -> (lat, lon) in degrees (floats for scalars, else arrays)."""
    e = np.asarray(easting, dtype=np.float64)
    n = np.asarray(northing, dtype=np.float64)
    xi = (n - (N0_SOUTH if south else 0.0)) / (K0 * _A)
    eta = (e - E0) / (K0 * _A)
    xi_p, eta_p = xi.copy(), eta.copy()
    for j, b in enumerate(_BETA, start=1):
        xi_p = xi_p - b * np.sin(2 * j * xi) * np.cosh(2 * j * eta)
        eta_p = eta_p - b * np.cos(2 * j * xi) * np.sinh(2 * j * eta)
    chi = np.arcsin(np.sin(xi_p) / np.cosh(eta_p))
    phi = chi.copy()
    for j, d in enumerate(_DELTA, start=1):
        phi = phi + d * np.sin(2 * j * chi)
    lam = np.radians(central_meridian(zone)) + np.arctan2(np.sinh(eta_p), np.cos(xi_p))
    lat, lon = np.degrees(phi), np.degrees(lam)
    if np.ndim(easting) == 0:
        return float(lat), float(lon)
    return lat, lon
