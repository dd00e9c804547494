"""Geo points, distances and geohashes, as Elasticsearch 8 computes them.

* Points (documents and query centres) accept every geo_point format: ``{"lat": .., "lon": ..}``
  (numbers or numeric strings), GeoJSON ``{"type": "Point", "coordinates": [lon, lat]}``,
  ``[lon, lat]`` (optionally ``[lon, lat, z]``), ``"lat,lon"``, a geohash and WKT
  ``"POINT (lon lat)"``. A geohash decodes to the south-west corner of its cell, as
  ``GeoPoint.resetFromGeoHash`` does (morton decoding with the remaining bits zero).
* ``arc_distance`` is the haversine formula on a sphere of radius 6,371,008.7714 m
  (``GeoUtils.EARTH_MEAN_RADIUS``, used by Lucene ``SloppyMath.haversinMeters``); Lucene uses
  sloppy trigonometry, so results may differ from ours by well under a millimetre.
* Document points are quantised like Lucene ``LatLonPoint`` (32-bit encoding, about 1 cm), which
  is what a ``geo_distance`` query sees.
* Distances (``DistanceUnit.parse``): a number or a string ending with a unit name, checked in
  Elasticsearch's enum order; ``"5km"`` and ``"5 km"`` both parse; a bare number is metres; unit
  names are case-sensitive (``NM`` but not ``KM``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

EARTH_MEAN_RADIUS_M = 6_371_008.7714

# DistanceUnit enum order matters: the first unit whose name ends the string wins.
_UNITS: tuple[tuple[float, tuple[str, ...]], ...] = (
    (0.0254, ("in", "inch")),
    (0.9144, ("yd", "yards")),
    (0.3048, ("ft", "feet")),
    (1000.0, ("km", "kilometers")),
    (1852.0, ("NM", "nmi", "nauticalmiles")),
    (0.001, ("mm", "millimeters")),
    (0.01, ("cm", "centimeters")),
    (1609.344, ("mi", "miles")),
    (1.0, ("m", "meters")),
)
# java.lang.Double.parseDouble syntax (trimmed), without hex floats
_JAVA_DOUBLE = re.compile(r"[+-]?(?:NaN|Infinity|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)[fFdD]?")
_GEOHASH_ALPHABET = "0123456789bcdefghjkmnpqrstuvwxyz"
_GEOHASH_INDEX = {ch: i for i, ch in enumerate(_GEOHASH_ALPHABET)}
_WKT_POINT = re.compile(r"\s*POINT\s*\(\s*(\S+)\s+(\S+)(?:\s+(\S+))?\s*\)\s*", re.IGNORECASE)

_LAT_DECODE = 180.0 / (1 << 32)
_LON_DECODE = 360.0 / (1 << 32)


class GeoError(ValueError):
    """A malformed point or distance."""


def java_double(text: str) -> float:
    """``Double.parseDouble``: trims whitespace, accepts ``1e3``, ``5d``; rejects ``1_000``."""
    stripped = text.strip()
    if not _JAVA_DOUBLE.fullmatch(stripped):
        raise ValueError(f'For input string: "{text}"')
    if stripped[-1] in "fFdD" and not stripped.endswith("Infinity"):
        stripped = stripped[:-1]
    return float(stripped.replace("Infinity", "inf"))


def parse_distance(value: Any) -> float:
    """Metres for an Elasticsearch distance (``"5km"``, ``"5 km"``, ``"200m"``, ``12.5``)."""
    if isinstance(value, bool):
        raise GeoError(f"invalid distance [{value}]")
    if isinstance(value, int | float):
        metres = float(value)
    elif isinstance(value, str):
        if not value.strip():
            raise GeoError("distance must not be null or empty")
        metres = math.nan
        for factor, names in _UNITS:
            for name in names:
                if value.endswith(name):
                    try:
                        metres = java_double(value[: -len(name)]) * factor
                    except ValueError:
                        raise GeoError(f"invalid distance [{value}]") from None
                    break
            else:
                continue
            break
        else:
            try:
                metres = java_double(value)
            except ValueError:
                raise GeoError(f"invalid distance [{value}]") from None
    else:
        raise GeoError(f"invalid distance [{value!r}]: expected a number or a string like '5km'")
    if not math.isfinite(metres):
        raise GeoError(f"invalid distance [{value}]")
    return metres


def format_distance(metres: float) -> str:
    if metres >= 1000:
        return f"{round(metres / 1000, 1):g} km"
    return f"{metres:.0f} m"


def _coord(value: Any, name: str) -> float:
    if isinstance(value, bool) or value is None:
        raise GeoError(f"{name} must be a number")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return java_double(value)
        except ValueError:
            raise GeoError(f"[{name}] must be a number, got [{value}]") from None
    raise GeoError(f"{name} must be a number")


def parse_point(value: Any, *, validate: bool = True) -> tuple[float, float]:
    """(lat, lon) from any geo_point format. Raises GeoError (with ``validate``, also for
    latitude outside [-90, 90] or longitude outside [-180, 180], the default strict behaviour)."""
    if isinstance(value, Mapping):
        if "lat" in value or "lon" in value:
            extra = set(value) - {"lat", "lon", "z"}
            if extra:
                raise GeoError(f"field must be either [lat], [lon] or [z], found {sorted(extra)}")
            if "lat" not in value:
                raise GeoError("field [lat] missing")
            if "lon" not in value:
                raise GeoError("field [lon] missing")
            lat, lon = _coord(value["lat"], "lat"), _coord(value["lon"], "lon")
        elif value.get("type") in ("Point", "point") and "coordinates" in value:
            coords = value["coordinates"]
            if not isinstance(coords, list) or len(coords) not in (2, 3):
                raise GeoError("GeoJSON point coordinates must be [lon, lat]")
            lon, lat = _coord(coords[0], "lon"), _coord(coords[1], "lat")
        else:
            raise GeoError("geo_point expected an object with [lat] and [lon]")
    elif isinstance(value, list | tuple):
        if len(value) not in (2, 3):
            raise GeoError(f"geo_point array must be [lon, lat], got {len(value)} values")
        lon, lat = _coord(value[0], "lon"), _coord(value[1], "lat")
    elif isinstance(value, str):
        lat, lon = _parse_point_string(value)
    else:
        raise GeoError(f"geo_point expected an object, array or string, got {value!r}")
    if math.isnan(lat) or math.isnan(lon):
        raise GeoError("latitude and longitude must be numbers")
    if validate:
        if not -90.0 <= lat <= 90.0:
            raise GeoError(f"illegal latitude value [{lat}]")
        if not -180.0 <= lon <= 180.0:
            raise GeoError(f"illegal longitude value [{lon}]")
    return lat, lon


def _parse_point_string(text: str) -> tuple[float, float]:
    wkt = _WKT_POINT.fullmatch(text)
    if wkt:
        return _coord(wkt[2], "lat"), _coord(wkt[1], "lon")
    if "," in text:
        parts = text.split(",")
        if len(parts) not in (2, 3):
            raise GeoError(f"failed to parse [{text}]: expected 'lat,lon'")
        return _coord(parts[0], "lat"), _coord(parts[1], "lon")
    return geohash_decode(text)


def normalize_point(lat: float, lon: float) -> tuple[float, float]:
    """``validation_method: COERCE``: wrap longitude and reflect latitude into range
    (GeoUtils.normalizePoint)."""
    lon = ((lon + 180.0) % 360.0) - 180.0 if not -180.0 <= lon <= 180.0 else lon
    lat = ((lat + 180.0) % 360.0) - 180.0 if not -180.0 <= lat <= 180.0 else lat
    if lat > 90.0:
        lat, lon = 180.0 - lat, lon + 180.0
    elif lat < -90.0:
        lat, lon = -180.0 - lat, lon + 180.0
    if lon > 180.0:
        lon -= 360.0
    return lat, lon


def quantize(lat: float, lon: float) -> tuple[float, float]:
    """Round-trip through Lucene's 32-bit ``GeoEncodingUtils`` encoding (what the index stores)."""
    lat_q = math.floor(lat / _LAT_DECODE) if lat != 90.0 else (1 << 31) - 1
    lon_q = math.floor(lon / _LON_DECODE) if lon != 180.0 else (1 << 31) - 1
    return lat_q * _LAT_DECODE, lon_q * _LON_DECODE


def arc_distance(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Haversine great-circle distance in metres."""
    rlat1, rlat2 = math.radians(lat1), math.radians(lat2)
    h = (
        math.sin((rlat2 - rlat1) / 2) ** 2
        + math.cos(rlat1) * math.cos(rlat2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    )
    return 2 * EARTH_MEAN_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def plane_distance(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """``GeoUtils.planeDistance``: equirectangular approximation, fast and inexact far away."""
    x = math.radians(lon2 - lon1) * math.cos(math.radians((lat2 + lat1) / 2.0))
    y = math.radians(lat2 - lat1)
    return math.sqrt(x * x + y * y) * EARTH_MEAN_RADIUS_M


# ---------------------------------------------------------------------------------------------
# Geohash


def geohash_encode(lat: float, lon: float, precision: int = 12) -> str:
    lat_lo, lat_hi, lon_lo, lon_hi = -90.0, 90.0, -180.0, 180.0
    out: list[str] = []
    bits = 0
    ch = 0
    even = True
    while len(out) < precision:
        if even:
            mid = (lon_lo + lon_hi) / 2
            if lon >= mid:
                ch = ch * 2 + 1
                lon_lo = mid
            else:
                ch *= 2
                lon_hi = mid
        else:
            mid = (lat_lo + lat_hi) / 2
            if lat >= mid:
                ch = ch * 2 + 1
                lat_lo = mid
            else:
                ch *= 2
                lat_hi = mid
        even = not even
        bits += 1
        if bits == 5:
            out.append(_GEOHASH_ALPHABET[ch])
            bits = ch = 0
    return "".join(out)


def geohash_bounds(geohash: str) -> tuple[float, float, float, float]:
    """(min_lat, max_lat, min_lon, max_lon) of a geohash cell. Raises GeoError."""
    if not geohash or len(geohash) > 12:
        raise GeoError(f"unsupported geohash [{geohash}]")
    lat_lo, lat_hi, lon_lo, lon_hi = -90.0, 90.0, -180.0, 180.0
    even = True
    for ch in geohash:
        idx = _GEOHASH_INDEX.get(ch)
        if idx is None:
            raise GeoError(f"unsupported symbol [{ch}] in geohash [{geohash}]")
        for shift in range(4, -1, -1):
            bit = (idx >> shift) & 1
            if even:
                mid = (lon_lo + lon_hi) / 2
                lon_lo, lon_hi = (mid, lon_hi) if bit else (lon_lo, mid)
            else:
                mid = (lat_lo + lat_hi) / 2
                lat_lo, lat_hi = (mid, lat_hi) if bit else (lat_lo, mid)
            even = not even
    return lat_lo, lat_hi, lon_lo, lon_hi


def geohash_decode(geohash: str) -> tuple[float, float]:
    """(lat, lon) of the cell's south-west corner (Elasticsearch ``resetFromGeoHash``)."""
    lat_lo, _, lon_lo, _ = geohash_bounds(geohash)
    return lat_lo, lon_lo


def _cell_size(precision: int) -> tuple[float, float]:
    bits = precision * 5
    lon_bits = (bits + 1) // 2
    lat_bits = bits // 2
    return 180.0 / (1 << lat_bits), 360.0 / (1 << lon_bits)


def cells_covering(lat: float, lon: float, distance_m: float, precision: int, *, max_cells: int = 4096) -> set[str]:
    """Geohash cells of ``precision`` that together cover the circle of ``distance_m`` around
    (lat, lon): every point within the distance lies in one of them (a superset is fine).

    Raises ValueError when more than ``max_cells`` would be needed (use a lower precision).
    """
    dlat = math.degrees(distance_m / EARTH_MEAN_RADIUS_M) * 1.0001 + 1e-9
    min_lat, max_lat = max(-90.0, lat - dlat), min(90.0, lat + dlat)
    if min_lat <= -90.0 or max_lat >= 90.0:
        dlon = 180.0
    else:
        cos_lat = min(math.cos(math.radians(min_lat)), math.cos(math.radians(max_lat)))
        dlon = 180.0 if cos_lat <= 1e-12 else min(180.0, dlat / cos_lat)
    h, w = _cell_size(precision)
    lat_steps = math.floor((max_lat + 90.0) / h) - math.floor((min_lat + 90.0) / h) + 1
    lon_span = 360.0 if dlon >= 180.0 else 2 * dlon
    lon_steps = min(math.floor(lon_span / w) + 2, round(360.0 / w))
    if lat_steps * lon_steps > max_cells:
        raise ValueError(f"{lat_steps * lon_steps} cells needed at precision {precision}; lower the precision")
    cells: set[str] = set()
    lat_start = math.floor((min_lat + 90.0) / h) * h - 90.0
    lon_start = -180.0 if dlon >= 180.0 else math.floor((lon - dlon + 180.0) / w) * w - 180.0
    for i in range(lat_steps):
        cell_lat = min(89.999999999, lat_start + (i + 0.5) * h)
        for j in range(lon_steps):
            cell_lon = lon_start + (j + 0.5) * w
            cell_lon = ((cell_lon + 180.0) % 360.0) - 180.0
            code = geohash_encode(cell_lat, cell_lon, precision)
            if _min_distance_to_cell(lat, lon, code) <= distance_m:
                cells.add(code)
    return cells


def _min_distance_to_cell(lat: float, lon: float, code: str) -> float:
    lat_lo, lat_hi, lon_lo, lon_hi = geohash_bounds(code)
    if lat_lo <= lat <= lat_hi and lon_lo <= lon <= lon_hi:
        return 0.0
    # the closest point of the box; longitudes compared the short way round the globe
    clat = min(max(lat, lat_lo), lat_hi)
    best = math.inf
    for shift in (-360.0, 0.0, 360.0):
        clon = min(max(lon, lon_lo + shift), lon_hi + shift)
        # along a meridian-bounded box the nearest point can lie on an edge at another
        # latitude; checking the clamped point and the edge midpoints is conservative enough
        # once we subtract the box half-diagonal slack below
        best = min(best, arc_distance(lat, lon, clat, clon))
    slack = arc_distance(lat_lo, lon_lo, lat_hi, lon_hi) * 0.01
    return max(0.0, best - slack)
