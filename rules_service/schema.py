"""The user document: what a bid request becomes, and the mapping audience rules are written against.

This module is the single source of truth for the schema. The same ``USER_MAPPING`` is:
* the Elasticsearch mapping of the percolator index (plus the percolator field, see percolators/);
* what the embedded percolator validates rules against (a rule on an unmapped field is rejected);
* what ``GET /v1/schema`` serves to advertisers.

Fields (source in the OpenRTB 2.5/2.6 BidRequest in brackets):

==================== ========== ==========================================================
field                type       source
==================== ========== ==========================================================
user_id              keyword    user.id, else device.ifa
age                  integer    year of the event minus user.yob
age_band             keyword    age bucketed: 13-17, 18-24, 25-34, 35-44, 45-54, 55-64, 65+
gender               keyword    user.gender M/F/O -> male/female/other
occupation           keyword    user.ext.occupation
interests            keyword[]  user.keywords split on commas + user.data[].segment[].name
language             keyword    device.language
geo.location         geo_point  device.geo lat/lon, else user.geo
geo.city             keyword    device.geo.city, else user.geo.city
geo.postcode         keyword    device.geo.zip, else user.geo.zip
geo.region           keyword    device.geo.region, else user.geo.region
geo.country          keyword    device.geo.country, else user.geo.country
device.os            keyword    device.os
device.os_version    keyword    device.osv
device.make          keyword    device.make
device.model         keyword    device.model
device.carrier       keyword    device.carrier
device.type          keyword    device.devicetype code as a name (see DEVICE_TYPES)
publisher.bundle     keyword    app.bundle
publisher.domain     keyword    site.domain
publisher.category   keyword[]  app.cat or site.cat
exchange             keyword    ext.exchange
ad_slot.w, ad_slot.h integer    first imp's banner w/h
last_seen            date       the event time (ext.received_at, else the log timestamp)
==================== ========== ==========================================================
"""

from __future__ import annotations

from typing import Any

#: OpenRTB 2.5 devicetype codes (section 5.21) as names.
DEVICE_TYPES: dict[int, str] = {
    1: "mobile",
    2: "desktop",
    3: "connected_tv",
    4: "phone",
    5: "tablet",
    6: "connected_device",
    7: "set_top_box",
}

#: OpenRTB user.gender codes.
GENDERS: dict[str, str] = {"M": "male", "F": "female", "O": "other"}

#: Age bands used for the ``age_band`` insight dimension: (label, lowest age, highest age).
AGE_BANDS: tuple[tuple[str, int, int], ...] = (
    ("13-17", 13, 17),
    ("18-24", 18, 24),
    ("25-34", 25, 34),
    ("35-44", 35, 44),
    ("45-54", 45, 54),
    ("55-64", 55, 64),
    ("65+", 65, 200),
)


def age_band(age: int | None) -> str | None:
    if age is None:
        return None
    for label, low, high in AGE_BANDS:
        if low <= age <= high:
            return label
    return None


_KEYWORD: dict[str, Any] = {"type": "keyword"}

#: The Elasticsearch mapping of the user document (``{"properties": ...}``).
USER_MAPPING: dict[str, Any] = {
    "properties": {
        "user_id": _KEYWORD,
        "age": {"type": "integer"},
        "age_band": _KEYWORD,
        "gender": _KEYWORD,
        "occupation": _KEYWORD,
        "interests": _KEYWORD,
        "language": _KEYWORD,
        "geo": {
            "properties": {
                "location": {"type": "geo_point"},
                "city": _KEYWORD,
                "postcode": _KEYWORD,
                "region": _KEYWORD,
                "country": _KEYWORD,
            }
        },
        "device": {
            "properties": {
                "os": _KEYWORD,
                "os_version": _KEYWORD,
                "make": _KEYWORD,
                "model": _KEYWORD,
                "carrier": _KEYWORD,
                "type": _KEYWORD,
            }
        },
        "publisher": {
            "properties": {
                "bundle": _KEYWORD,
                "domain": _KEYWORD,
                "category": _KEYWORD,
            }
        },
        "exchange": _KEYWORD,
        "ad_slot": {"properties": {"w": {"type": "integer"}, "h": {"type": "integer"}}},
        "last_seen": {"type": "date"},
    }
}
